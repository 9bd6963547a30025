//! MicroVM start: how long until a microvm task's VM is ready for its first step (the
//! runtime's `prepare`, workspace upload included), three ways: a cold boot, a restore from the
//! image's snapshot, and a claim from the warm pool. Same image (a busybox directory), same
//! size (192 MiB, one vCPU), same accelerator (KVM where a probe boot works, TCG otherwise).
//! The rows compare restore and warm claim against the cold boot. Needs QEMU, the guest kernel,
//! `/bin/busybox` and the static guest agent (`$DROVER_GUEST_AGENT` or `drover-guest` next to
//! this executable).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use drover_agent::runtime::microvm::{DIR_IMAGE_PREFIX, MicroVmConfig, MicroVmRuntime, VmOrigin};
use drover_agent::runtime::{Runtime, RuntimeError, TaskSpec};

use super::measure;
use crate::Ctx;
use crate::report::{Better, Measure, Row};

/// The static busybox the guest's root filesystem is made of.
const BUSYBOX: &str = "/bin/busybox";

/// Milliseconds until a VM is ready, per run: cold boot, snapshot restore, warm claim.
struct Starts {
    cold: Vec<f64>,
    restore: Vec<f64>,
    warm: Vec<f64>,
    accelerator: String,
}

/// What the section found: figures, or why this machine cannot produce them.
enum Outcome {
    Measured(Starts),
    Unavailable(String),
}

/// Runs the section.
pub async fn run(ctx: &Ctx) -> Vec<Row> {
    let result = starts(ctx).await;
    let (cold, restore, warm, accelerator) = match result {
        Ok(Outcome::Measured(s)) => {
            (Measure::Runs(s.cold), Measure::Runs(s.restore), Measure::Runs(s.warm), s.accelerator)
        }
        Ok(Outcome::Unavailable(why)) => {
            let m = Measure::Unavailable(why);
            (m.clone(), m.clone(), m, "n/a".to_string())
        }
        Err(e) => {
            let m = measure("microvm start", Err(e));
            (m.clone(), m.clone(), m, "n/a".to_string())
        }
    };
    let row = |figure: &str, drover: Measure, peer: &str, peer_value: Measure| Row {
        section: "microvm",
        figure: format!("{figure} ({accelerator}), prepare until ready"),
        unit: "ms",
        better: Better::Lower,
        drover,
        peer: peer.to_string(),
        peer_value,
    };
    vec![
        row("cold boot", cold.clone(), "-", Measure::Unavailable("baseline".into())),
        row("snapshot restore", restore, "cold boot", cold.clone()),
        row("warm-pool claim", warm, "cold boot", cold),
    ]
}

async fn starts(ctx: &Ctx) -> Result<Outcome> {
    if !Path::new(BUSYBOX).exists() {
        return Ok(Outcome::Unavailable(format!("no {BUSYBOX} (apt-get install busybox-static)")));
    }
    let scratch = ctx.dir("microvm")?;
    // Socket paths in the run dir must stay short.
    let run_root = tempfile::Builder::new().prefix("dbm-").tempdir_in(std::env::temp_dir())?;
    let rootfs = busybox_rootfs(&scratch.join("rootfs"))?;
    let image = format!("{DIR_IMAGE_PREFIX}{}", rootfs.display());
    let config = |name: &str| MicroVmConfig {
        cache_dir: scratch.join("cache"),
        run_dir: run_root.path().join(name),
        memory_mib: 192,
        snapshots: false,
        image_dirs: vec![scratch.clone()],
        ..Default::default()
    };
    let runs = ctx.runs.max(3);
    let workspace = |i: usize| scratch.join(format!("ws-{i}"));
    let mut next_attempt = 1_000_000i64;
    let mut task = |i: usize| {
        next_attempt += 1;
        TaskSpec {
            attempt_id: next_attempt,
            steps: vec![vec!["true".into()]],
            workspace: workspace(i),
            image: Some(image.clone()),
            ..Default::default()
        }
    };

    let cold_runtime = match MicroVmRuntime::new(config("c")).await {
        Ok(runtime) => runtime,
        // No QEMU, kernel or static guest agent here: nothing to measure, as with a missing peer.
        Err(RuntimeError::Unavailable { reason, .. }) => return Ok(Outcome::Unavailable(reason)),
        Err(e) => return Err(e).context("microvm runtime"),
    };
    let accelerator = cold_runtime.accelerator().to_owned();
    let mut cold = Vec::new();
    for i in 0..runs {
        cold.push(timed_prepare(&cold_runtime, &task(i), |o| o == VmOrigin::Cold).await?);
    }

    let restore_runtime = MicroVmRuntime::new(MicroVmConfig { snapshots: true, ..config("r") }).await?;
    // The first restore takes the snapshot; it is not a restore figure.
    timed_prepare(&restore_runtime, &task(0), |o| o == VmOrigin::Restored).await?;
    let mut restore = Vec::new();
    for i in 0..runs {
        restore.push(timed_prepare(&restore_runtime, &task(i), |o| o == VmOrigin::Restored).await?);
    }
    restore_runtime.shutdown_pool().await;

    let warm_runtime =
        MicroVmRuntime::new(MicroVmConfig { warm: [(image.clone(), 1)].into(), ..config("w") }).await?;
    let mut warm = Vec::new();
    for i in 0..runs {
        let deadline = Instant::now() + Duration::from_secs(300);
        while warm_runtime.warm_counts().get(&image).copied().unwrap_or(0) < 1 {
            if Instant::now() > deadline {
                bail!("the warm pool did not fill within 5 minutes");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        warm.push(timed_prepare(&warm_runtime, &task(i), |o| matches!(o, VmOrigin::Warm { .. })).await?);
    }
    warm_runtime.shutdown_pool().await;
    Ok(Outcome::Measured(Starts { cold, restore, warm, accelerator }))
}

/// Milliseconds `prepare` took; checks the VM came the expected way, and cleans up.
async fn timed_prepare(
    runtime: &MicroVmRuntime,
    task: &TaskSpec,
    expected: impl Fn(VmOrigin) -> bool,
) -> Result<f64> {
    let began = Instant::now();
    runtime.prepare(task).await.context("prepare")?;
    let took = began.elapsed().as_secs_f64();
    let origin = runtime.origin(task.attempt_id);
    runtime.cleanup(task).await.context("cleanup")?;
    match origin {
        Some(o) if expected(o) => Ok(took * 1000.0),
        other => bail!("the vm came another way than measured: {other:?}"),
    }
}

/// A busybox root filesystem: applets linked in `/bin`.
fn busybox_rootfs(root: &Path) -> Result<PathBuf> {
    let busybox = Path::new(BUSYBOX);
    std::fs::create_dir_all(root.join("bin"))?;
    std::fs::create_dir_all(root.join("etc"))?;
    std::fs::copy(busybox, root.join("bin/busybox"))?;
    let list = std::process::Command::new(busybox).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines().filter(|a| !a.is_empty() && *a != "busybox") {
        let link = root.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", link)?;
        }
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    Ok(root.to_path_buf())
}
