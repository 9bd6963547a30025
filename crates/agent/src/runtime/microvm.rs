//! The microVM runtime: each attempt runs in its own QEMU `microvm` virtual machine, with the
//! `drover-guest` agent as PID 1.
//!
//! - **Root filesystem**: an initramfs built from the task's Docker image (`docker export`,
//!   converted to cpio and cached by image id) or from a host directory (`dir:/path`), followed
//!   by the agent archive (guest agent, modules, mount points; `microvm/image.rs`). The guest agent
//!   must be a static binary: build it with
//!   `RUSTFLAGS='-C target-feature=+crt-static' cargo build --release -p drover-guest --target x86_64-unknown-linux-gnu`.
//! - **Kernel**: the host's (newest `/boot/vmlinuz-*` by default). Debian's cloud kernel builds
//!   virtio, virtio-mmio and virtio-console as modules, so the matching `.ko` files from
//!   `/lib/modules/VERSION` are shipped in the initramfs and loaded by the guest agent. The
//!   microvm machine describes its virtio-mmio devices over ACPI.
//! - **Channel**: two virtio-serial ports backed by Unix sockets on which QEMU listens; the
//!   runtime that boots a VM uses the first, `attach` after an agent restart the second.
//! - **Workspace**: no 9p in the cloud kernel and no virtiofsd by default, so the host
//!   workspace is copied into the guest (`/workspace`) after boot, and the guest sends back
//!   what each step changed before it reports the step's end. When `wait` returns, the host
//!   workspace holds the step's results.
//! - **Network**: by default QEMU gets no network device at all; inside, only `lo` exists. A
//!   task with `network: { egress: [...] }` or with host ports gets one virtio-net device on
//!   QEMU user-mode networking with `restrict=on`, so the guest reaches nothing but a few
//!   fixed forwards (`guestfwd`) to Unix sockets in the VM directory (`drover_guest::net`): an
//!   HTTP proxy that connects only to the allow-list (`HTTP(S)_PROXY` is set for the steps;
//!   `microvm/proxy.rs`), and the task's host ports (`DROVER_HOST_<NAME>`). `bridge` and `full`
//!   are refused.
//! - **Warm pool and snapshots**: the runtime keeps booted, idle VMs per configured image
//!   ([`MicroVmConfig::warm`]; `microvm/pool.rs`) and restores VMs from a per-image snapshot
//!   instead of booting them when [`MicroVmConfig::snapshots`] is on (`microvm/boot.rs`). Warm
//!   VMs have no network device, like the default `network: none`, and serve tasks that need
//!   none; snapshots come in both kinds (with the restricted device for tasks with egress or
//!   host ports, without for the others), each taken on first use.
//! - **Accelerator**: KVM when a real probe boot succeeds within
//!   [`MicroVmConfig::kvm_probe_timeout`] (KVM may hang under nested virtualisation), TCG
//!   otherwise; see [`MicroVmRuntime::accelerator`].
//! - **Limits**: guest memory is the task's memory limit (at least
//!   [`MicroVmConfig::min_memory_mib`]), one vCPU per reserved host CPU, and QEMU is pinned to
//!   the reserved CPUs.
//! - **Usage**: reported by the guest (rusage of the step, live `/proc` scans).
//! - **User**: steps run as root inside the VM (the VM is the sandbox) unless the task names a
//!   numeric `uid[:gid]`.
//! - **Restart**: VMs outlive the agent process; `attach` reconnects through the VM directory
//!   (`vm.json`, second port), follows the step's output and end, and serves the task's
//!   forwards again, so the attempt resumes. The guest holds the output written while no
//!   agent listened (up to 8 MiB; beyond it the step's output says how much went) and hands
//!   it to the next host that connects.
//!
//! Host requirements (Debian 12): `apt-get install --no-install-recommends qemu-system-x86
//! linux-image-cloud-amd64` (QEMU 7.2 with the `microvm` machine; a kernel in `/boot` whose
//! modules sit in `/lib/modules`), the `docker` CLI for Docker images, and the static guest agent.
//!
//! Under TCG the guest kernel is told the host TSC frequency (`tsc_early_khz`): its own PIT
//! calibration fails on a loaded host and then hangs the boot.

mod boot;
mod forward;
mod image;
mod pool;
mod proxy;
mod qmp;
mod session;
mod vm;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use drover_guest::protocol::{GUEST_WORKSPACE, HostMessage, StartErrorKind, StepState};

use self::boot::{Booted, Booter, Shape};
use self::forward::Forwards;
pub use self::image::DIR_IMAGE_PREFIX;
use self::pool::Pool;
use self::session::{Session, StartFailure};
use self::vm::VmRecord;
pub use self::vm::{Vm, VmSpec};
use super::{ExitStatus, OutputSink, RunHandle, Runtime, RuntimeError, StopSignal, TaskSpec, Usage};

/// How long a restarted agent waits for the end of a step the guest says ended: the guest
/// sends it right after its answer.
const END_BEHIND_STATUS: Duration = Duration::from_secs(5);
/// PATH of steps whose image sets none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Modules the guest needs for its ports, in load order (dependencies first). Those not found
/// in the kernel's `modules.dep` are assumed built in.
const GUEST_MODULES: [&str; 7] =
    ["virtio_ring", "virtio", "virtio_mmio", "virtio_console", "failover", "net_failover", "virtio_net"];

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Accelerator {
    /// KVM if a probe boot works, TCG otherwise.
    #[default]
    Auto,
    /// KVM, without probing.
    Kvm,
    /// TCG (software emulation), always available.
    Tcg,
}

/// Configuration of the microVM runtime.
#[derive(Debug, Clone)]
pub struct MicroVmConfig {
    /// QEMU binary; a bare name is looked up in `PATH`.
    pub qemu: PathBuf,
    /// Guest kernel; `None` = the newest `/boot/vmlinuz-*`.
    pub kernel: Option<PathBuf>,
    /// The static `drover-guest` binary; `None` = `$DROVER_GUEST_AGENT`, else `drover-guest`
    /// next to the running executable.
    pub guest_agent: Option<PathBuf>,
    /// Where built root filesystems are cached.
    pub cache_dir: PathBuf,
    /// Where VM directories (sockets, logs) live; keep it short, socket paths are limited to
    /// 107 bytes.
    pub run_dir: PathBuf,
    /// Guest memory when the task sets no limit, in MiB.
    pub memory_mib: u64,
    /// Smallest guest memory, in MiB: a kernel plus initramfs need some room.
    pub min_memory_mib: u64,
    /// vCPUs when the task reserves no CPUs.
    pub vcpus: usize,
    /// Accelerator choice.
    pub accelerator: Accelerator,
    /// How long the KVM probe boot may take before KVM is declared unusable.
    pub kvm_probe_timeout: Duration,
    /// How long a boot may take until the guest agent greets the host.
    pub boot_timeout: Duration,
    /// How long `cleanup` waits for the guest to power off before QEMU is told to quit.
    pub shutdown_grace: Duration,
    /// Image for tasks that name none; `None` makes such tasks fail in `prepare`.
    pub default_image: Option<String>,
    /// Warm VMs to keep per image. Docker image names are turned into image ids, which is how
    /// tasks of shipped images name them.
    pub warm: BTreeMap<String, usize>,
    /// Warm VMs of the default image when [`MicroVmConfig::warm`] does not name it and KVM is
    /// in use; under TCG a boot costs seconds of a host CPU, so only configured pools are kept.
    pub warm_default_kvm: usize,
    /// Whether new VMs of the pool shape are restored from a per-image snapshot instead of
    /// booted.
    pub snapshots: bool,
    /// Host directories `dir:` images may come from (their own trees included); empty: no
    /// `dir:` image is accepted. A job must not be able to copy any host directory into a VM.
    pub image_dirs: Vec<PathBuf>,
    /// Uids QEMU runs as (one per VM, `-runas`) when the agent is root; `None` runs QEMU as the
    /// agent's own user.
    pub uids: Option<std::sync::Arc<crate::runtime::uids::UidPool>>,
}

impl Default for MicroVmConfig {
    fn default() -> Self {
        let base = std::env::temp_dir().join("drover");
        MicroVmConfig {
            qemu: PathBuf::from("qemu-system-x86_64"),
            kernel: None,
            guest_agent: None,
            cache_dir: base.join("microvm-cache"),
            run_dir: base.join("vm"),
            memory_mib: 256,
            min_memory_mib: 128,
            vcpus: 1,
            accelerator: Accelerator::Auto,
            kvm_probe_timeout: Duration::from_secs(10),
            boot_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(3),
            default_image: None,
            warm: BTreeMap::new(),
            warm_default_kvm: 1,
            snapshots: true,
            image_dirs: Vec::new(),
            uids: None,
        }
    }
}

/// How the VM of an attempt came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmOrigin {
    /// Booted for the attempt.
    Cold,
    /// Restored from the image's snapshot for the attempt.
    Restored,
    /// Taken from the warm pool, booted (or restored) before the attempt came.
    Warm {
        /// When QEMU was started for it.
        launched_at: Instant,
        /// When it was ready in the pool.
        ready_at: Instant,
    },
}

/// Runs each attempt in its own microVM.
pub struct MicroVmRuntime {
    booter: Arc<Booter>,
    pool: Arc<Pool>,
    vms: Mutex<HashMap<i64, Arc<Entry>>>,
}

impl std::fmt::Debug for MicroVmRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MicroVmRuntime")
            .field("kernel", &self.booter.kernel)
            .field("accelerator", &self.booter.accelerator)
            .finish_non_exhaustive()
    }
}

/// Accelerator probe results by QEMU binary and kernel, shared by the runtimes of a process.
type ProbeResults = HashMap<(PathBuf, PathBuf), Arc<tokio::sync::OnceCell<String>>>;

/// A VM of one attempt: booted here, or found again after an agent restart.
enum Vmh {
    Owned(Box<Vm>),
    Attached { session: Session, dir: PathBuf, record: Box<VmRecord> },
}

struct Entry {
    vm: Vmh,
    /// `KEY=value` environment of the image.
    image_env: Vec<String>,
    /// The VM's name and directory under the run dir.
    sandbox: String,
    /// How the VM came to be; `None` for a VM found after a restart.
    origin: Option<VmOrigin>,
    /// The task's network forwards, served while the entry lives.
    _forwards: Forwards,
    /// Where steps find the forwards.
    net_env: Vec<(String, String)>,
}

impl Entry {
    fn session(&self) -> &Session {
        match &self.vm {
            Vmh::Owned(vm) => vm.session(),
            Vmh::Attached { session, .. } => session,
        }
    }
}

fn unavailable(reason: impl Into<String>) -> RuntimeError {
    RuntimeError::Unavailable { runtime: "microvm", reason: reason.into() }
}

impl MicroVmRuntime {
    /// Checks QEMU, the kernel and its modules and the guest agent, builds the agent archive,
    /// and picks the accelerator (probing KVM with a real boot when asked to).
    pub async fn new(config: MicroVmConfig) -> Result<Self, RuntimeError> {
        let qemu = find_in_path(&config.qemu).ok_or_else(|| {
            unavailable(format!("{} not found (install the qemu-system-x86 package)", config.qemu.display()))
        })?;
        let kernel = match &config.kernel {
            Some(kernel) => kernel.clone(),
            None => newest_kernel().ok_or_else(|| {
                unavailable("no kernel in /boot/vmlinuz-* (install linux-image-cloud-amd64)")
            })?,
        };
        if std::fs::File::open(&kernel).is_err() {
            return Err(unavailable(format!("kernel {} is not readable", kernel.display())));
        }
        let modules = guest_modules(&kernel);
        let guest_agent = find_guest_agent(config.guest_agent.as_deref())?;
        match image::is_static_elf(&guest_agent) {
            Ok(true) => {}
            Ok(false) => {
                return Err(unavailable(format!(
                    "guest agent {} is dynamically linked; build it with \
                     RUSTFLAGS='-C target-feature=+crt-static' cargo build --release -p drover-guest \
                     --target x86_64-unknown-linux-gnu",
                    guest_agent.display()
                )));
            }
            Err(error) => return Err(unavailable(format!("guest agent {}: {error}", guest_agent.display()))),
        }
        let archive = {
            let (agent, modules) = (guest_agent.clone(), modules.clone());
            tokio::task::spawn_blocking(move || image::agent_archive(&agent, &modules))
                .await
                .map_err(|e| RuntimeError::Io {
                    context: "build agent archive".into(),
                    source: std::io::Error::other(e),
                })?
                .map_err(|source| RuntimeError::Io { context: "build agent archive".into(), source })?
        };
        sweep_stale_warm_vms(&config.run_dir).await;
        let mut booter = Booter::new(config, qemu, kernel, guest_agent.clone(), archive);
        booter.accelerator = choose_accelerator(&booter).await;
        if booter.accelerator == "tcg"
            && let Ok(Some(khz)) = tokio::task::spawn_blocking(tsc_khz).await
        {
            booter.kernel_args = format!("tsc_early_khz={khz} tsc=reliable no_timer_check");
        }
        let mut targets = BTreeMap::new();
        for (image, count) in &booter.config.warm {
            targets.insert(image::canonical_name(image).await, *count);
        }
        if booter.accelerator == "kvm"
            && let Some(image) = &booter.config.default_image
        {
            targets.entry(image::canonical_name(image).await).or_insert(booter.config.warm_default_kvm);
        }
        let snapshots = booter.config.snapshots;
        let booter = Arc::new(booter);
        let pool = Pool::new(booter.clone(), targets, snapshots);
        pool.refill();
        let runtime = MicroVmRuntime { booter, pool, vms: Mutex::default() };
        tracing::info!(
            kernel = %runtime.booter.kernel.display(),
            guest_agent = %guest_agent.display(),
            modules = modules.len(),
            accelerator = %runtime.booter.accelerator,
            warm = ?runtime.pool.counts(),
            "microvm runtime ready"
        );
        Ok(runtime)
    }

    /// The accelerator VMs use: `kvm` or `tcg`.
    pub fn accelerator(&self) -> &str {
        &self.booter.accelerator
    }

    /// The guest kernel.
    pub fn kernel(&self) -> &Path {
        &self.booter.kernel
    }

    /// Boot time (QEMU start to guest agent hello, or to the restored guest's hello) of the VM
    /// of an attempt booted here.
    pub fn boot_time(&self, attempt_id: i64) -> Option<Duration> {
        match &self.lock().get(&attempt_id)?.vm {
            Vmh::Owned(vm) => Some(vm.boot_time()),
            Vmh::Attached { .. } => None,
        }
    }

    /// How the VM of an attempt prepared here came to be.
    pub fn origin(&self, attempt_id: i64) -> Option<VmOrigin> {
        self.lock().get(&attempt_id)?.origin
    }

    /// How many times QEMU was started so far (boots and restores, warm pool included).
    pub fn launches(&self) -> u64 {
        self.booter.launches()
    }

    /// Stops refilling the warm pool, powers its idle VMs off and removes the snapshots.
    /// VMs of running attempts are left alone.
    pub async fn shutdown_pool(&self) {
        self.pool.shutdown().await;
        self.booter.remove_snapshots().await;
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i64, Arc<Entry>>> {
        // Every update is a single insert or remove, so a poisoned lock is still usable.
        self.vms.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn entry(&self, handle: &RunHandle) -> Result<Arc<Entry>, RuntimeError> {
        self.lock()
            .get(&handle.attempt_id)
            .cloned()
            .ok_or(RuntimeError::UnknownHandle { attempt_id: handle.attempt_id, step: handle.step })
    }

    fn vm_dir(&self, sandbox_id: &str) -> PathBuf {
        self.booter.config.run_dir.join(sandbox_id)
    }

    /// The directory of an attempt's VM that this process does not know: its own, or a warm
    /// VM's whose record names the attempt.
    async fn find_vm_dir(&self, attempt_id: i64) -> PathBuf {
        let own = self.vm_dir(&sandbox_id(attempt_id));
        if own.exists() {
            return own;
        }
        if let Ok(mut entries) = tokio::fs::read_dir(&self.booter.config.run_dir).await {
            while let Ok(Some(entry)) = entries.next_entry().await {
                let warm = entry.file_name().to_string_lossy().starts_with(pool::WARM_PREFIX);
                if warm && vm::read_record(&entry.path()).await.is_some_and(|r| r.attempt_id == attempt_id) {
                    return entry.path();
                }
            }
        }
        own
    }

    fn memory_mib(&self, task: &TaskSpec) -> u64 {
        let config = &self.booter.config;
        let mib =
            if task.memory_limit == 0 { config.memory_mib } else { task.memory_limit.div_ceil(1024 * 1024) };
        mib.max(config.min_memory_mib)
    }

    /// The environment of a step: the image's, then the Drover base and the network forwards,
    /// then the task's.
    fn step_env(
        task: &TaskSpec,
        image_env: &[String],
        net_env: &[(String, String)],
    ) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = image_env
            .iter()
            .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect();
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.push(("PATH".into(), DEFAULT_PATH.into()));
        }
        let base = [
            ("HOME", GUEST_WORKSPACE.to_owned()),
            ("DROVER_JOB_ID", task.job_id.to_string()),
            ("DROVER_TASK_ID", task.task_id.to_string()),
            ("DROVER_ATTEMPT_ID", task.attempt_id.to_string()),
            ("DROVER_WORKSPACE", GUEST_WORKSPACE.to_owned()),
        ];
        let mut set = |key: &str, value: String| {
            env.retain(|(k, _)| k != key);
            env.push((key.to_owned(), value));
        };
        for (key, value) in base {
            set(key, value);
        }
        for (key, value) in net_env {
            set(key, value.clone());
        }
        for (key, value) in task.env.iter().chain(&task.secrets) {
            set(key, value.clone());
        }
        env
    }
}

#[async_trait]
impl Runtime for MicroVmRuntime {
    fn kind(&self) -> &'static str {
        "microvm"
    }

    async fn prepare(&self, task: &TaskSpec) -> Result<(), RuntimeError> {
        if self.lock().contains_key(&task.attempt_id) {
            return Ok(());
        }
        let image =
            task.image.clone().or_else(|| self.booter.config.default_image.clone()).ok_or_else(|| {
                RuntimeError::Io {
                    context: "choose the vm image".into(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "the task names no image and the microvm runtime has no default image",
                    ),
                }
            })?;
        let network = forward::needs_network(task)?;
        tokio::fs::create_dir_all(&task.workspace).await.map_err(|source| RuntimeError::Io {
            context: format!("create workspace {}", task.workspace.display()),
            source,
        })?;
        let shape = Shape {
            memory_mib: self.memory_mib(task),
            vcpus: if task.cpus.is_empty() { self.booter.config.vcpus } else { task.cpus.len() },
            host_cpus: task.cpus.clone(),
            network,
        };
        let (booted, sandbox, origin) = match self.pool.claim(&image, &shape) {
            Some(warm) => {
                let origin = VmOrigin::Warm { launched_at: warm.booted.launched_at, ready_at: warm.ready_at };
                (warm.booted, warm.sandbox, origin)
            }
            None => {
                let sandbox = sandbox_id(task.attempt_id);
                let dir = self.vm_dir(&sandbox);
                if let Some(stale) = vm::read_record(&dir).await {
                    vm::stop_recorded(&dir, &stale).await;
                }
                let _ = tokio::fs::remove_dir_all(&dir).await;
                let restorable = self.booter.config.snapshots
                    && Shape { host_cpus: Vec::new(), ..shape.clone() } == self.booter.pool_shape(network);
                let booted = if restorable {
                    self.booter.restore(&image, network, &dir).await?
                } else {
                    self.booter.cold(&image, &dir, &shape).await?
                };
                let origin = booted.origin;
                (booted, sandbox, origin)
            }
        };
        let Booted { vm, image_env, .. } = booted;
        let ready = async {
            let dir = vm.dir().to_path_buf();
            // Warm and restored VMs were started before the task's CPUs were known.
            if origin != VmOrigin::Cold && !task.cpus.is_empty() {
                vm.pin(&task.cpus)
                    .map_err(|source| RuntimeError::Io { context: "pin the vm".into(), source })?;
            }
            if matches!(origin, VmOrigin::Warm { .. }) {
                // The clock may have stood still in a snapshot, or drifted while the VM waited.
                vm.session().send(&boot::catch_up_message()).await?;
            }
            let record = VmRecord {
                attempt_id: task.attempt_id,
                workspace: task.workspace.clone(),
                qemu_pid: vm.pid(),
                image_env: image_env.clone(),
                network: task.network.clone(),
                host_ports: task.host_ports.clone(),
            };
            vm::write_record(&dir, &record).await?;
            let (forwards, net_env) = Forwards::start(&dir, task)?;
            vm.session().set_workspace(task.workspace.clone());
            vm.session().upload_workspace(&task.workspace).await?;
            Ok::<_, RuntimeError>((forwards, net_env))
        };
        let (forwards, net_env) = match ready.await {
            Ok(ready) => ready,
            Err(error) => {
                vm.shutdown(self.booter.config.shutdown_grace).await;
                let _ = tokio::fs::remove_dir_all(vm.dir()).await;
                return Err(error);
            }
        };
        tracing::info!(
            job_id = task.job_id,
            task_id = task.task_id,
            attempt_id = task.attempt_id,
            image,
            sandbox,
            origin = ?origin,
            boot_ms = vm.boot_time().as_millis() as u64,
            network,
            "microvm prepared"
        );
        self.lock().insert(
            task.attempt_id,
            Arc::new(Entry {
                vm: Vmh::Owned(Box::new(vm)),
                image_env,
                sandbox,
                origin: Some(origin),
                _forwards: forwards,
                net_env,
            }),
        );
        Ok(())
    }

    async fn start(&self, task: &TaskSpec, step: usize, out: OutputSink) -> Result<RunHandle, RuntimeError> {
        let argv = super::steps::argv_of(task, step)?;
        let entry = self
            .lock()
            .get(&task.attempt_id)
            .cloned()
            .ok_or(RuntimeError::UnknownHandle { attempt_id: task.attempt_id, step })?;
        let user = task.user.as_deref().and_then(numeric_user);
        if task.user.is_some() && user.is_none() {
            tracing::warn!(attempt_id = task.attempt_id, user = ?task.user, "microvm runs named users as root");
        }
        let run = HostMessage::Run {
            step,
            argv: argv.clone(),
            env: Self::step_env(task, &entry.image_env, &entry.net_env),
            cwd: GUEST_WORKSPACE.into(),
            user,
        };
        match entry.session().run(step, run, out).await {
            Ok(pid) => {
                tracing::info!(
                    attempt_id = task.attempt_id,
                    step,
                    guest_pid = pid,
                    "step started in microvm"
                );
                Ok(RunHandle {
                    attempt_id: task.attempt_id,
                    step,
                    // Guest pids mean nothing on the host.
                    pid: None,
                    pid_start_ticks: None,
                    sandbox_id: Some(entry.sandbox.clone()),
                })
            }
            Err(StartFailure::Guest(kind, message)) => {
                let kind = match kind {
                    StartErrorKind::NotFound => std::io::ErrorKind::NotFound,
                    StartErrorKind::PermissionDenied => std::io::ErrorKind::PermissionDenied,
                    StartErrorKind::Invalid => std::io::ErrorKind::InvalidInput,
                    StartErrorKind::Other => std::io::ErrorKind::Other,
                };
                Err(RuntimeError::Start {
                    command: argv[0].clone(),
                    source: std::io::Error::new(kind, message),
                })
            }
            Err(StartFailure::Runtime(error)) => Err(error),
        }
    }

    /// Finds a step of a VM that survived an agent restart, through the VM's second port, and
    /// follows it: its output goes to `out` (first what the guest held while no agent
    /// listened, up to 8 MiB), its end is reported as it comes, and later steps start in the
    /// same VM with the image's environment and the task's forwards served again (both kept
    /// in the VM's record).
    async fn attach(
        &self,
        handle: &RunHandle,
        out: OutputSink,
        _from: (u64, u64),
    ) -> Result<bool, RuntimeError> {
        let existing = self.lock().get(&handle.attempt_id).cloned();
        let (entry, restarted) = match existing {
            Some(entry) => (entry, false),
            None => {
                let Some(id) = handle.sandbox_id.as_deref().filter(|id| is_plain_name(id)) else {
                    return Ok(false);
                };
                let dir = self.vm_dir(id);
                let Some(record) = vm::read_record(&dir).await else {
                    return Ok(false);
                };
                if record.attempt_id != handle.attempt_id {
                    return Ok(false);
                }
                let session = match vm::attach_session(&dir, record.workspace.clone()).await {
                    Ok(session) => session,
                    Err(error) => {
                        tracing::info!(attempt_id = handle.attempt_id, %error, "cannot reach the vm of the handle");
                        return Ok(false);
                    }
                };
                let forwarded = TaskSpec {
                    attempt_id: record.attempt_id,
                    network: record.network.clone(),
                    host_ports: record.host_ports.clone(),
                    ..Default::default()
                };
                let (forwards, net_env) = match Forwards::start(&dir, &forwarded) {
                    Ok(started) => started,
                    Err(error) => {
                        tracing::warn!(attempt_id = handle.attempt_id, %error, "cannot serve the vm's forwards again");
                        return Ok(false);
                    }
                };
                let entry = Arc::new(Entry {
                    image_env: record.image_env.clone(),
                    vm: Vmh::Attached { session, dir, record: Box::new(record) },
                    sandbox: id.to_owned(),
                    origin: None,
                    _forwards: forwards,
                    net_env,
                });
                (self.lock().entry(handle.attempt_id).or_insert(entry).clone(), true)
            }
        };
        let session = entry.session();
        // The guest keeps the end of a step that ended while no agent listened (its workspace
        // changes, then its exit) for the next host, which gets it right after the hello: a
        // restarted agent takes such a step over as it ended.
        let followable = match (session.finished(handle.step).is_some(), restarted) {
            (true, ended_meanwhile) => ended_meanwhile,
            (false, _) => match session.status(handle.step).await? {
                StepState::Running { .. } => true,
                // Ended as the host came: its end is right behind this answer.
                StepState::Exited { .. } if restarted => tokio::time::timeout(END_BEHIND_STATUS, async {
                    while session.finished(handle.step).is_none() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
                .await
                .is_ok(),
                _ => false,
            },
        };
        if !followable {
            return Ok(false);
        }
        if restarted {
            tracing::info!(
                attempt_id = handle.attempt_id,
                step = handle.step,
                "following a step after a restart"
            );
        }
        // The output the guest held while no agent listened comes first.
        session.follow(handle.step, out).await;
        tracing::info!(attempt_id = handle.attempt_id, step = handle.step, "attached to step in microvm");
        Ok(true)
    }

    async fn signal(&self, handle: &RunHandle, signal: StopSignal) -> Result<(), RuntimeError> {
        let entry = self.entry(handle)?;
        let number = match signal {
            StopSignal::Terminate => libc::SIGTERM,
            StopSignal::Kill => libc::SIGKILL,
        };
        tracing::debug!(
            attempt_id = handle.attempt_id,
            step = handle.step,
            signal = number,
            "signalling guest step"
        );
        entry.session().send(&HostMessage::Signal { step: handle.step, signal: number }).await
    }

    async fn wait(&self, handle: &RunHandle) -> Result<ExitStatus, RuntimeError> {
        let entry = self.entry(handle)?;
        if !entry.session().knows(handle.step) {
            return Err(RuntimeError::UnknownHandle { attempt_id: handle.attempt_id, step: handle.step });
        }
        entry
            .session()
            .wait(handle.step)
            .await
            .map(|(status, _)| status)
            .ok_or(RuntimeError::UnknownHandle { attempt_id: handle.attempt_id, step: handle.step })
    }

    async fn stats(&self, handle: &RunHandle) -> Result<Usage, RuntimeError> {
        let entry = self.entry(handle)?;
        if let Some((_, usage)) = entry.session().finished(handle.step) {
            return Ok(usage);
        }
        let usage = match entry.session().status(handle.step).await? {
            StepState::Running { usage } | StepState::Exited { usage, .. } => usage,
            StepState::Unknown => {
                return Err(RuntimeError::UnknownHandle { attempt_id: handle.attempt_id, step: handle.step });
            }
        };
        Ok(Usage { cpu_seconds: usage.cpu_seconds, peak_memory_bytes: usage.peak_memory_bytes })
    }

    /// Idle warm VMs per configured image (Docker images by id).
    fn warm_counts(&self) -> BTreeMap<String, u32> {
        self.pool.counts()
    }

    async fn cleanup(&self, task: &TaskSpec) -> Result<(), RuntimeError> {
        let entry = self.lock().remove(&task.attempt_id);
        let dir = match &entry {
            Some(entry) => self.vm_dir(&entry.sandbox),
            None => self.find_vm_dir(task.attempt_id).await,
        };
        match entry.as_deref().map(|e| &e.vm) {
            Some(Vmh::Owned(vm)) => vm.shutdown(self.booter.config.shutdown_grace).await,
            Some(Vmh::Attached { session, dir, record }) => {
                let _ = session.send(&HostMessage::Shutdown).await;
                vm::stop_recorded(dir, record).await;
            }
            None => {
                if let Some(record) = vm::read_record(&dir).await {
                    vm::stop_recorded(&dir, &record).await;
                }
            }
        }
        // The forwards stop serving before their sockets' directory goes.
        drop(entry);
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(RuntimeError::Io { context: format!("remove {}", dir.display()), source });
            }
        }
        tracing::debug!(
            job_id = task.job_id,
            task_id = task.task_id,
            attempt_id = task.attempt_id,
            "microvm cleaned up"
        );
        Ok(())
    }
}

/// `kvm` when asked for, or when probing finds it working; `tcg` otherwise. The probe
/// result is shared by every runtime of this process with the same QEMU and kernel.
async fn choose_accelerator(booter: &Booter) -> String {
    match booter.config.accelerator {
        Accelerator::Kvm => return "kvm".into(),
        Accelerator::Tcg => return "tcg".into(),
        Accelerator::Auto => {}
    }
    static PROBES: OnceLock<Mutex<ProbeResults>> = OnceLock::new();
    let cell = PROBES
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry((booter.qemu.clone(), booter.kernel.clone()))
        .or_default()
        .clone();
    cell.get_or_init(|| probe_kvm(booter)).await.clone()
}

async fn probe_kvm(booter: &Booter) -> String {
    if let Err(error) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        tracing::info!(%error, "no usable /dev/kvm; microvms use TCG");
        return "tcg".into();
    }
    let dir = booter.config.run_dir.join(format!("probe-{}-{}", std::process::id(), rand::random::<u32>()));
    let initramfs = dir.join("agent.cpio");
    let prepared = async {
        tokio::fs::create_dir_all(&dir).await?;
        tokio::fs::write(&initramfs, booter.agent_archive.as_slice()).await
    };
    if let Err(error) = prepared.await {
        tracing::warn!(%error, "cannot prepare the KVM probe; microvms use TCG");
        return "tcg".into();
    }
    let spec = VmSpec {
        qemu: booter.qemu.clone(),
        accelerator: "kvm".into(),
        kernel: booter.kernel.clone(),
        initramfs,
        memory_mib: booter.config.min_memory_mib,
        vcpus: 1,
        host_cpus: Vec::new(),
        dir: dir.clone(),
        kernel_args: String::new(),
        boot_timeout: booter.config.kvm_probe_timeout,
        relay: None,
        incoming: None,
        uids: booter.config.uids.clone(),
    };
    let chosen = match Vm::boot(&spec).await {
        Ok(vm) => {
            tracing::info!(boot_ms = vm.boot_time().as_millis() as u64, "KVM probe boot succeeded");
            vm.shutdown(booter.config.shutdown_grace).await;
            "kvm"
        }
        Err(error) => {
            tracing::warn!(
                %error,
                timeout_s = booter.config.kvm_probe_timeout.as_secs(),
                "KVM probe boot failed (KVM may hang under nested virtualisation); microvms use TCG"
            );
            "tcg"
        }
    };
    let _ = tokio::fs::remove_dir_all(&dir).await;
    chosen.into()
}

/// Stops the warm VMs an earlier agent process left behind (their records name no attempt),
/// sparing those of this process.
async fn sweep_stale_warm_vms(run_dir: &Path) {
    let Ok(mut entries) = tokio::fs::read_dir(run_dir).await else {
        return;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(number) = name.strip_prefix(pool::WARM_PREFIX) else {
            continue;
        };
        if number.is_empty() || !number.chars().all(|c| c.is_ascii_digit() || c == '-') {
            continue;
        }
        let dir = entry.path();
        let Some(record) = vm::read_record(&dir).await else {
            continue;
        };
        if record.attempt_id != 0 || record.qemu_pid.is_some_and(is_our_child) {
            continue;
        }
        tracing::info!(dir = %dir.display(), "stopping a warm microvm of an earlier agent");
        vm::stop_recorded(&dir, &record).await;
        let _ = tokio::fs::remove_dir_all(&dir).await;
    }
}

/// Whether `pid` is a child of this process.
fn is_our_child(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().nth(1)?.parse::<u32>().ok())
        })
        .is_some_and(|parent| parent == std::process::id())
}

/// Name of an attempt's VM (and of its directory under the run dir).
fn sandbox_id(attempt_id: i64) -> String {
    format!("a{attempt_id}")
}

fn is_plain_name(id: &str) -> bool {
    !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// `uid` or `uid:gid`, numeric.
fn numeric_user(user: &str) -> Option<(u32, u32)> {
    match user.split_once(':') {
        Some((uid, gid)) => Some((uid.parse().ok()?, gid.parse().ok()?)),
        None => {
            let uid = user.parse().ok()?;
            Some((uid, uid))
        }
    }
}

fn find_in_path(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|candidate| candidate.is_file())
}

/// The newest `/boot/vmlinuz-*`, comparing versions numerically.
fn newest_kernel() -> Option<PathBuf> {
    let entries = std::fs::read_dir("/boot").ok()?;
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))
        .max_by(|a, b| version_key(a).cmp(&version_key(b)))
}

fn version_key(path: &Path) -> Vec<u64> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    name.split(|c: char| !c.is_ascii_digit()).filter_map(|part| part.parse().ok()).collect()
}

/// The `.ko` files of [`GUEST_MODULES`] for the kernel's version, from `modules.dep`.
fn guest_modules(kernel: &Path) -> Vec<PathBuf> {
    let name = kernel.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let Some(version) = name.strip_prefix("vmlinuz-") else {
        tracing::warn!(kernel = %kernel.display(), "cannot tell the kernel version; assuming virtio drivers are built in");
        return Vec::new();
    };
    let base = Path::new("/lib/modules").join(version);
    let Ok(dep) = std::fs::read_to_string(base.join("modules.dep")) else {
        tracing::warn!(modules = %base.display(), "no modules.dep; assuming virtio drivers are built in");
        return Vec::new();
    };
    GUEST_MODULES
        .iter()
        .filter_map(|module| {
            let suffix = format!("/{module}.ko");
            dep.lines()
                .filter_map(|line| line.split(':').next())
                .find(|path| path.ends_with(&suffix))
                .map(|path| base.join(path))
        })
        .collect()
}

fn find_guest_agent(configured: Option<&Path>) -> Result<PathBuf, RuntimeError> {
    let candidates: Vec<PathBuf> = match configured {
        Some(path) => vec![path.to_path_buf()],
        None => std::env::var_os("DROVER_GUEST_AGENT")
            .map(PathBuf::from)
            .into_iter()
            .chain(std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.join("drover-guest"))))
            .collect(),
    };
    candidates.iter().find(|path| path.is_file()).cloned().ok_or_else(|| {
        unavailable(format!(
            "guest agent not found (tried {candidates:?}); set DROVER_GUEST_AGENT to a static drover-guest binary"
        ))
    })
}

/// The host TSC frequency, measured once per process.
fn tsc_khz() -> Option<u64> {
    static KHZ: OnceLock<Option<u64>> = OnceLock::new();
    *KHZ.get_or_init(vm::host_tsc_khz)
}

#[cfg(test)]
mod tests;
