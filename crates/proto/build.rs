//! Compiles the protocol with protox (pure Rust), so building needs no system `protoc`.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(["proto/drover.proto"], ["proto"])?;
    // The descriptors are kept too: tests enumerate every method of every service from them, so
    // a method added without an authorization case fails its test.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("drover_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto/drover.proto");
    Ok(())
}
