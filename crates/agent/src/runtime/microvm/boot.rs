//! How the runtime gets a booted VM: a cold boot, or a restore from the image's snapshot.
//!
//! Snapshots use QEMU migration to a file: an idle VM of the warm-pool shape is booted once
//! per image, its session closed (so the guest's ports are unconnected in the saved state),
//! then stopped and migrated with `exec:cat > FILE`; new VMs start with the same command line
//! plus `-incoming exec:cat FILE`, are resumed with `cont`, and greet their new host on a fresh
//! channel. (`savevm`/`loadvm` would need a qcow2 drive, and the VMs have no drives.) The
//! snapshot holds the whole guest memory, so its size is about the memory the guest touched.
//! Snapshots live in the run directory and last as long as the runtime.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::image::{self, ImageConfig};
use super::vm::{Vm, VmSpec};
use super::{MicroVmConfig, VmOrigin};
use crate::runtime::RuntimeError;

/// The size and devices of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Shape {
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub vcpus: usize,
    /// Host CPUs QEMU is pinned to; empty = none.
    pub host_cpus: Vec<usize>,
    /// Whether the VM gets its (restricted) network device.
    pub network: bool,
}

/// A booted VM with its image's environment and how it came to be.
pub(crate) struct Booted {
    /// The VM.
    pub vm: Vm,
    /// `KEY=value` environment of the image.
    pub image_env: Vec<String>,
    /// Cold boot or restore.
    pub origin: VmOrigin,
    /// When QEMU was started for it.
    pub launched_at: Instant,
}

/// An image's snapshot.
#[derive(Debug, Clone)]
struct Snapshot {
    state: PathBuf,
    initramfs: PathBuf,
    image_env: Vec<String>,
}

/// A snapshot taken once, by the first VM that needs it.
type SnapshotCell = Arc<tokio::sync::OnceCell<Snapshot>>;

/// Everything needed to boot VMs, shared by the runtime and its warm pool.
pub(crate) struct Booter {
    pub config: MicroVmConfig,
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    /// The static guest agent; QEMU also runs it as the relay of network forwards.
    pub guest_agent: PathBuf,
    pub agent_archive: Arc<Vec<u8>>,
    pub agent_hash: String,
    pub accelerator: String,
    /// Kernel arguments added to every boot (TSC frequency under TCG).
    pub kernel_args: String,
    image_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Snapshots by image and whether the VM has its network device.
    snapshots: Mutex<HashMap<(String, bool), SnapshotCell>>,
    launches: AtomicU64,
}

impl Booter {
    /// A booter; `accelerator` and `kernel_args` are filled in once the accelerator is known.
    pub fn new(
        config: MicroVmConfig,
        qemu: PathBuf,
        kernel: PathBuf,
        guest_agent: PathBuf,
        agent_archive: Vec<u8>,
    ) -> Booter {
        Booter {
            agent_hash: image::short_hash(&agent_archive),
            agent_archive: Arc::new(agent_archive),
            config,
            qemu,
            kernel,
            guest_agent,
            accelerator: String::new(),
            kernel_args: String::new(),
            image_locks: Mutex::default(),
            snapshots: Mutex::default(),
            launches: AtomicU64::new(0),
        }
    }

    /// How many times QEMU was started (boots and restores).
    pub fn launches(&self) -> u64 {
        self.launches.load(Ordering::SeqCst)
    }

    /// The shape of warm and restored VMs: the default size, with the network device or
    /// without (a task without egress or host ports gets a VM that has none).
    pub fn pool_shape(&self, network: bool) -> Shape {
        Shape {
            memory_mib: self.config.memory_mib.max(self.config.min_memory_mib),
            vcpus: self.config.vcpus.max(1),
            host_cpus: Vec::new(),
            network,
        }
    }

    /// Builds (or takes from the cache) the initramfs of `image`, one build per image at a time.
    pub async fn initramfs(&self, image: &str, dir: &Path) -> Result<(PathBuf, ImageConfig), RuntimeError> {
        if let Some(path) = image.strip_prefix(image::DIR_IMAGE_PREFIX) {
            allowed_dir_image(Path::new(path), &self.config.image_dirs)?;
        }
        let lock = self
            .image_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(image.to_owned())
            .or_default()
            .clone();
        let _building = lock.lock().await;
        image::initramfs(image, &self.agent_archive, &self.agent_hash, &self.config.cache_dir, dir).await
    }

    fn spec(&self, dir: &Path, initramfs: PathBuf, shape: &Shape, incoming: Option<PathBuf>) -> VmSpec {
        VmSpec {
            qemu: self.qemu.clone(),
            accelerator: self.accelerator.clone(),
            kernel: self.kernel.clone(),
            initramfs,
            memory_mib: shape.memory_mib,
            vcpus: shape.vcpus,
            host_cpus: shape.host_cpus.clone(),
            dir: dir.to_path_buf(),
            kernel_args: self.kernel_args.clone(),
            boot_timeout: self.config.boot_timeout,
            relay: shape.network.then(|| self.guest_agent.clone()),
            incoming,
            uids: self.config.uids.clone(),
        }
    }

    async fn launch(&self, spec: &VmSpec) -> Result<(Vm, Instant), RuntimeError> {
        self.launches.fetch_add(1, Ordering::SeqCst);
        let launched_at = Instant::now();
        Ok((Vm::boot(spec).await?, launched_at))
    }

    /// Boots a VM of `image` in `dir` from scratch.
    pub async fn cold(&self, image: &str, dir: &Path, shape: &Shape) -> Result<Booted, RuntimeError> {
        create_dir(dir).await?;
        let (initramfs, config) = self.initramfs(image, dir).await?;
        let (vm, launched_at) = self.launch(&self.spec(dir, initramfs, shape, None)).await?;
        Ok(Booted { vm, image_env: config.env, origin: VmOrigin::Cold, launched_at })
    }

    /// Restores a VM of `image` (pool shape, with the network device or without) in `dir` from
    /// the matching snapshot, taking that snapshot first if there is none yet.
    pub async fn restore(&self, image: &str, network: bool, dir: &Path) -> Result<Booted, RuntimeError> {
        let snapshot = self.snapshot(image, network).await?;
        create_dir(dir).await?;
        let shape = self.pool_shape(network);
        let spec = self.spec(dir, snapshot.initramfs.clone(), &shape, Some(snapshot.state.clone()));
        // The boot session sets the clock, which stopped when the snapshot was saved.
        let (vm, launched_at) = self.launch(&spec).await?;
        Ok(Booted { vm, image_env: snapshot.image_env, origin: VmOrigin::Restored, launched_at })
    }

    /// The image's snapshot with or without the network device, taken on first use.
    async fn snapshot(&self, image: &str, network: bool) -> Result<Snapshot, RuntimeError> {
        let cell = self
            .snapshots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((image.to_owned(), network))
            .or_default()
            .clone();
        cell.get_or_try_init(|| self.take_snapshot(image, network)).await.cloned()
    }

    async fn take_snapshot(&self, image: &str, network: bool) -> Result<Snapshot, RuntimeError> {
        let flavour = if network { "net" } else { "nonet" };
        let dir = self.config.run_dir.join(format!("s-{}-{flavour}", image::short_hash(image.as_bytes())));
        let _ = tokio::fs::remove_dir_all(&dir).await;
        let began = Instant::now();
        let booted = self.cold(image, &dir, &self.pool_shape(network)).await?;
        let initramfs = booted.vm.dir().join("snapshot-initramfs.cpio");
        // The initramfs may be the image cache's shared file or the VM's own; keep a copy that
        // no other VM's cleanup removes.
        let source = booted.vm.initramfs().to_path_buf();
        if let Err(source_error) = tokio::fs::copy(&source, &initramfs).await {
            booted.vm.shutdown(self.config.shutdown_grace).await;
            return Err(RuntimeError::Io {
                context: format!("copy {}", source.display()),
                source: source_error,
            });
        }
        let state = dir.join("state.bin");
        booted.vm.save_snapshot(&state).await?;
        let size = tokio::fs::metadata(&state).await.map(|m| m.len()).unwrap_or_default();
        tracing::info!(
            image,
            network,
            took_ms = began.elapsed().as_millis() as u64,
            bytes = size,
            "microvm snapshot taken"
        );
        Ok(Snapshot { state, initramfs, image_env: booted.image_env })
    }

    /// Removes the snapshots taken so far.
    pub async fn remove_snapshots(&self) {
        let cells: Vec<_> = self.snapshots.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
        for (_, cell) in cells {
            if let Some(snapshot) = cell.get()
                && let Some(dir) = snapshot.state.parent()
            {
                let _ = tokio::fs::remove_dir_all(dir).await;
            }
        }
    }
}

/// Refuses a `dir:` image outside the operator's image directories. Both sides are resolved
/// first, so neither `..` nor a symlink leads out of them.
fn allowed_dir_image(path: &Path, roots: &[PathBuf]) -> Result<(), RuntimeError> {
    let refused = |why: String| RuntimeError::Io {
        context: format!("use image dir:{}", path.display()),
        source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, why),
    };
    let resolved = std::fs::canonicalize(path).map_err(|e| refused(format!("it cannot be read: {e}")))?;
    let inside =
        roots.iter().filter_map(|r| std::fs::canonicalize(r).ok()).any(|root| resolved.starts_with(root));
    if inside {
        Ok(())
    } else if roots.is_empty() {
        Err(refused(
            "this node takes no `dir:` images (an operator allows directories with --microvm-image-dir)"
                .into(),
        ))
    } else {
        Err(refused(format!(
            "it is outside the directories this node takes `dir:` images from ({})",
            roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ")
        )))
    }
}

async fn create_dir(dir: &Path) -> Result<(), RuntimeError> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|source| RuntimeError::Io { context: format!("create {}", dir.display()), source })
}

/// Now, in milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The message that brings a VM that waited (in a pool or a snapshot) up to date: the host's
/// time, and fresh random bytes so that VMs restored from one snapshot do not share their
/// random state.
pub(crate) fn catch_up_message() -> drover_guest::protocol::HostMessage {
    drover_guest::protocol::HostMessage::SetClock {
        unix_ms: unix_ms(),
        seed: rand::random::<[u8; 32]>().to_vec(),
    }
}
