//! Helpers for tests of this and other crates (feature `test-support`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The static `drover-guest` binary that microVMs boot with: `$DROVER_GUEST_AGENT` when set,
/// else built once per process into `target/guest-static` (its own target dir: the flags
/// differ from the workspace build, and the outer `cargo test` may hold the main one's lock).
pub fn static_guest_agent() -> Result<PathBuf, String> {
    static AGENT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    AGENT.get_or_init(build).clone()
}

fn build() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("DROVER_GUEST_AGENT") {
        return Ok(PathBuf::from(path));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("guest-static");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args(["build", "--release", "-p", "drover-guest", "--target", "x86_64-unknown-linux-gnu"])
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .map_err(|e| format!("cannot run cargo to build the guest agent: {e}"))?;
    if !status.success() {
        return Err(format!("building the static guest agent failed: {status}"));
    }
    Ok(target.join("x86_64-unknown-linux-gnu/release/drover-guest"))
}
