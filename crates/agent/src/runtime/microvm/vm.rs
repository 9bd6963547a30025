//! One QEMU `microvm` virtual machine: boot, the boot session with its guest agent, and
//! shutdown. A `Vm` knows nothing about tasks, so a warm pool can hold booted, idle VMs and
//! hand them out later.
//!
//! Each VM lives in its own directory: `p0.sock` and `p1.sock` (the guest agent's ports, QEMU
//! listening), `qmp.sock` (QEMU's control socket), `console.log` (kernel and guest agent log),
//! `qemu.log` (QEMU's stderr), `vm.json` (what a restarted agent needs to find it again) and,
//! when the VM has a network device, the forward sockets the host serves (`egress.sock`,
//! `hpN.sock`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::process::Child;

use super::qmp::{self, Qmp};
use super::session::Session;
use crate::runtime::{HostPort, RuntimeError};
use drover_core::NetworkPolicy;
use drover_guest::net;
use drover_guest::protocol::HostMessage;

/// Socket of the port the booting host uses.
pub(crate) const BOOT_PORT: &str = "p0.sock";
/// Socket of the port a restarted agent attaches on.
pub(crate) const ATTACH_PORT: &str = "p1.sock";
const QMP_SOCKET: &str = "qmp.sock";
const RECORD: &str = "vm.json";

/// Longest path a Unix socket address can hold (`sun_path` minus the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Everything needed to boot one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// QEMU binary (`qemu-system-x86_64`).
    pub qemu: PathBuf,
    /// `kvm` or `tcg`.
    pub accelerator: String,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Initramfs (image plus guest agent).
    pub initramfs: PathBuf,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub vcpus: usize,
    /// Host CPUs QEMU is pinned to; empty = no pinning.
    pub host_cpus: Vec<usize>,
    /// The VM's directory (sockets, logs); created by `boot`.
    pub dir: PathBuf,
    /// Extra kernel command-line arguments.
    pub kernel_args: String,
    /// How long the guest agent may take to greet the host.
    pub boot_timeout: Duration,
    /// The static guest agent, when the VM gets its network device: QEMU runs it as the
    /// `relay` of each forward (see [`drover_guest::net`]). `None` = no network device at all.
    pub relay: Option<PathBuf>,
    /// A snapshot's state file to restore instead of booting.
    pub incoming: Option<PathBuf>,
    /// Where QEMU's uid comes from when it must not run as the agent's (root) user.
    pub uids: Option<std::sync::Arc<crate::runtime::uids::UidPool>>,
}

/// What a restarted agent needs to find a VM: kept as `vm.json` in the VM's directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct VmRecord {
    /// Attempt the VM runs.
    pub attempt_id: i64,
    /// Host workspace of the attempt.
    pub workspace: PathBuf,
    /// QEMU's pid.
    pub qemu_pid: Option<u32>,
    /// `KEY=value` environment of the image, for steps started after a restart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_env: Vec<String>,
    /// The task's network policy, whose forwards a restarted agent serves again.
    #[serde(default)]
    pub network: NetworkPolicy,
    /// The task's host ports, served again after a restart too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_ports: Vec<HostPort>,
}

/// A booted VM with its boot session.
pub struct Vm {
    dir: PathBuf,
    initramfs: PathBuf,
    child: tokio::sync::Mutex<Option<Child>>,
    pid: Option<u32>,
    session: Session,
    boot_time: Duration,
    accelerator: String,
    /// The uid QEMU runs as, given back when the VM is gone.
    uid: Option<crate::runtime::uids::UidLease>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("dir", &self.dir).field("pid", &self.pid).finish_non_exhaustive()
    }
}

impl Vm {
    /// Starts QEMU and waits until the guest agent greets the host on the boot port.
    pub async fn boot(spec: &VmSpec) -> Result<Vm, RuntimeError> {
        let io = |context: String| move |source| RuntimeError::Io { context, source };
        let socket = spec.dir.join(BOOT_PORT);
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(RuntimeError::Io {
                context: format!("vm directory {}", spec.dir.display()),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "path too long for a Unix socket",
                ),
            });
        }
        tokio::fs::create_dir_all(&spec.dir).await.map_err(io(format!("create {}", spec.dir.display())))?;
        for name in [BOOT_PORT, ATTACH_PORT, QMP_SOCKET] {
            let _ = tokio::fs::remove_file(spec.dir.join(name)).await;
        }
        let log = std::fs::File::create(spec.dir.join("qemu.log")).map_err(io("create qemu.log".into()))?;
        // QEMU opens its files, devices and sockets as root, then becomes a uid of its own
        // (`-runas`), which owns the VM's directory (where its relays connect from).
        let uid = match &spec.uids {
            Some(pool) => {
                let lease =
                    crate::runtime::uids::lease(pool, rand::random::<u32>().into()).ok_or_else(|| {
                        RuntimeError::Unavailable {
                            runtime: "microvm",
                            reason: "every sandbox uid of this node is in use".into(),
                        }
                    })?;
                std::os::unix::fs::chown(&spec.dir, Some(lease.uid()), Some(lease.uid()))
                    .map_err(io(format!("give {} to uid {}", spec.dir.display(), lease.uid())))?;
                Some(lease)
            }
            None => None,
        };
        let mut command = qemu_command(spec, uid.as_ref().map(|l| l.uid()));
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).kill_on_drop(true);
        if !spec.host_cpus.is_empty() {
            let mut set = nix::sched::CpuSet::new();
            for &cpu in &spec.host_cpus {
                set.set(cpu).map_err(|_| RuntimeError::Start {
                    command: spec.qemu.display().to_string(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("cpu {cpu} out of range"),
                    ),
                })?;
            }
            // SAFETY: runs in the forked child before exec; sched_setaffinity is a raw syscall
            // and the CpuSet was built before fork, so nothing allocates.
            unsafe {
                command.pre_exec(move || {
                    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
                    Ok(())
                });
            }
        }
        let began = Instant::now();
        let mut child = command
            .spawn()
            .map_err(|source| RuntimeError::Start { command: spec.qemu.display().to_string(), source })?;
        let pid = child.id();
        tracing::debug!(dir = %spec.dir.display(), pid, accelerator = %spec.accelerator, "qemu started");

        let ready = async {
            if let Some(state) = &spec.incoming {
                resume_incoming(&spec.dir.join(QMP_SOCKET), state, spec.boot_timeout).await?;
            }
            let nudge = spec.incoming.as_ref().map(|_| super::boot::catch_up_message());
            connect_when_ready(&socket, spec.boot_timeout, nudge.as_ref()).await
        };
        let session = tokio::select! {
            session = ready => session,
            exited = child.wait() => {
                let log = tail(&spec.dir.join("qemu.log")).await;
                let status = exited.map(|s| s.to_string()).unwrap_or_default();
                Err(RuntimeError::Io {
                    context: "boot microvm".into(),
                    source: std::io::Error::other(format!("qemu exited during boot ({status}): {log}")),
                })
            }
        };
        let session = match session {
            Ok(session) => session,
            Err(error) => {
                let _ = child.kill().await;
                let console = tail(&spec.dir.join("console.log")).await;
                tracing::warn!(dir = %spec.dir.display(), console, "microvm boot failed");
                return Err(error);
            }
        };
        let boot_time = began.elapsed();
        tracing::info!(
            dir = %spec.dir.display(),
            pid,
            accelerator = %spec.accelerator,
            restored = spec.incoming.is_some(),
            boot_ms = boot_time.as_millis() as u64,
            guest_uptime_ms = session.guest_uptime.as_millis() as u64,
            "microvm booted"
        );
        Ok(Vm {
            dir: spec.dir.clone(),
            initramfs: spec.initramfs.clone(),
            child: tokio::sync::Mutex::new(Some(child)),
            pid,
            session,
            boot_time,
            accelerator: spec.accelerator.clone(),
            uid,
        })
    }

    /// The boot session with the guest agent.
    pub(crate) fn session(&self) -> &Session {
        &self.session
    }

    /// Time from starting QEMU to the guest agent's hello.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// `kvm` or `tcg`.
    pub fn accelerator(&self) -> &str {
        &self.accelerator
    }

    /// QEMU's process id.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// The VM's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The initramfs the VM booted from.
    pub fn initramfs(&self) -> &Path {
        &self.initramfs
    }

    /// Pins every QEMU thread (vCPUs included) to `cpus`, for a VM booted before its task
    /// reserved them.
    pub(crate) fn pin(&self, cpus: &[usize]) -> std::io::Result<()> {
        let Some(pid) = self.pid else {
            return Ok(());
        };
        let mut set = nix::sched::CpuSet::new();
        for &cpu in cpus {
            set.set(cpu).map_err(std::io::Error::from)?;
        }
        for thread in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
            if let Some(tid) = thread.file_name().to_str().and_then(|t| t.parse::<i32>().ok()) {
                nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set)
                    .map_err(std::io::Error::from)?;
            }
        }
        Ok(())
    }

    /// Saves the idle VM as a snapshot in `state` and ends it. The session is closed first, so
    /// the guest's ports are unconnected in the snapshot and every restored VM greets its new
    /// host.
    pub(crate) async fn save_snapshot(self, state: &Path) -> Result<(), RuntimeError> {
        let Vm { dir, child, session, uid, .. } = self;
        drop(session);
        // The guest notices the closed port within its poll interval.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let partial = state.with_extension("partial");
        // QEMU writes the state as its own uid: the file it writes into is made for it.
        if let Some(lease) = &uid {
            let made = std::fs::File::create(&partial)
                .and_then(|_| std::os::unix::fs::chown(&partial, Some(lease.uid()), Some(lease.uid())));
            if let Err(source) = made {
                return Err(RuntimeError::Io { context: format!("prepare {}", partial.display()), source });
            }
        }
        let saved = async {
            let mut qmp = Qmp::connect(&dir.join(QMP_SOCKET)).await?;
            qmp.execute("stop", None).await?;
            let uri = format!("exec:cat > {}", qmp::shell_quote(&partial));
            qmp.execute("migrate", Some(serde_json::json!({ "uri": uri }))).await?;
            qmp.await_migration(Duration::from_secs(120)).await?;
            let _ = qmp.execute("quit", None).await;
            tokio::fs::rename(&partial, state).await
        };
        let result = saved.await;
        if let Some(mut process) = child.lock().await.take()
            && tokio::time::timeout(Duration::from_secs(2), process.wait()).await.is_err()
        {
            let _ = process.kill().await;
        }
        result.map_err(|source| RuntimeError::Io { context: format!("snapshot {}", dir.display()), source })
    }

    /// Powers the VM off: asks the guest, then QEMU (QMP `quit`), then kills QEMU; waits for
    /// the process to end either way, so no QEMU process is left behind.
    pub async fn shutdown(&self, grace: Duration) {
        let mut child = self.child.lock().await;
        let Some(process) = child.as_mut() else {
            return;
        };
        if !self.session.is_closed() {
            let _ = self.session.send(&HostMessage::Shutdown).await;
        }
        if tokio::time::timeout(grace, process.wait()).await.is_err() {
            tracing::debug!(dir = %self.dir.display(), "guest did not power off in time; quitting qemu");
            let _ = qmp::quit(&self.dir.join(QMP_SOCKET)).await;
            if tokio::time::timeout(Duration::from_secs(2), process.wait()).await.is_err() {
                tracing::warn!(dir = %self.dir.display(), pid = self.pid, "killing qemu");
                let _ = process.kill().await;
            }
        }
        *child = None;
    }
}

/// Writes the record a restarted agent reads.
pub(crate) async fn write_record(dir: &Path, record: &VmRecord) -> Result<(), RuntimeError> {
    let bytes = serde_json::to_vec_pretty(record).unwrap_or_default();
    tokio::fs::write(dir.join(RECORD), bytes).await.map_err(|source| RuntimeError::Io {
        context: format!("write {}", dir.join(RECORD).display()),
        source,
    })
}

/// Reads a VM's record, if the directory holds one.
pub(crate) async fn read_record(dir: &Path) -> Option<VmRecord> {
    serde_json::from_slice(&tokio::fs::read(dir.join(RECORD)).await.ok()?).ok()
}

/// Stops a VM this process did not start (found through its record): QMP `quit`, then
/// SIGKILL by pid if that process is still the QEMU of this directory.
pub(crate) async fn stop_recorded(dir: &Path, record: &VmRecord) {
    let _ = qmp::quit(&dir.join(QMP_SOCKET)).await;
    let Some(pid) = record.qemu_pid else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while is_qemu_of(pid, dir) {
        if Instant::now() > deadline {
            tracing::warn!(dir = %dir.display(), pid, "killing qemu");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `pid` is a live (not zombie) QEMU whose command line names `dir`, so a reused pid
/// is never killed.
fn is_qemu_of(pid: u32, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 1..].trim_start().starts_with('Z')))
        .unwrap_or(true);
    let needle = dir.join(BOOT_PORT);
    !zombie && String::from_utf8_lossy(&cmdline).contains(&*needle.to_string_lossy())
}

/// Waits for QEMU to load a snapshot's state, then lets the VM run on.
async fn resume_incoming(qmp_socket: &Path, state: &Path, patience: Duration) -> Result<(), RuntimeError> {
    let deadline = Instant::now() + patience;
    while !qmp_socket.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let resumed = async {
        // QEMU creates the socket file before it listens on it: retry a refused connection.
        let mut qmp = loop {
            match Qmp::connect(qmp_socket).await {
                Ok(qmp) => break qmp,
                Err(error)
                    if error.kind() == std::io::ErrorKind::ConnectionRefused && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(error) => return Err(error),
            }
        };
        qmp.await_migration(deadline.saturating_duration_since(Instant::now())).await?;
        // The VM was stopped when the snapshot was saved.
        qmp.execute("cont", None).await.map(|_| ())
    };
    resumed
        .await
        .map_err(|source| RuntimeError::Io { context: format!("restore {}", state.display()), source })
}

/// Connects to a port socket once QEMU created it, and waits for the guest's hello.
async fn connect_when_ready(
    socket: &Path,
    patience: Duration,
    nudge: Option<&HostMessage>,
) -> Result<Session, RuntimeError> {
    let deadline = Instant::now() + patience;
    while !socket.exists() {
        if Instant::now() > deadline {
            return Err(RuntimeError::Io {
                context: format!("wait for {}", socket.display()),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "qemu did not create the socket"),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Session::connect(socket, None, deadline.saturating_duration_since(Instant::now()), nudge).await
}

/// Connects to a running VM's attach port.
pub(crate) async fn attach_session(dir: &Path, workspace: PathBuf) -> Result<Session, RuntimeError> {
    Session::connect(&dir.join(ATTACH_PORT), Some(workspace), Duration::from_secs(5), None).await
}

/// QEMU's seccomp policy (`-sandbox`): a guest that breaks out into QEMU meets QEMU's deny list
/// and cannot use obsolete system calls. Spawning, privilege and resource calls stay allowed:
/// the network relay and snapshot restores run as QEMU's children, under the same filter, and
/// `elevateprivileges=deny` broke the relay.
pub(crate) const SANDBOX: &str = "on,obsolete=deny";

fn qemu_command(spec: &VmSpec, run_as: Option<u32>) -> tokio::process::Command {
    let dir = &spec.dir;
    let path = |name: &str| dir.join(name).display().to_string();
    let mut command = tokio::process::Command::new(&spec.qemu);
    command.args(["-M", "microvm", "-accel", &spec.accelerator]);
    if spec.accelerator == "tcg" {
        // `max` exposes the TSC features that let the kernel skip PIT calibration, which
        // fails under TCG on a loaded host and then hangs the boot.
        command.args(["-cpu", "max"]);
    }
    command
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-sandbox", SANDBOX])
        // seccomp: a guest that breaks out into QEMU cannot use obsolete system calls, gain
        // privileges or change resource controls. Spawning stays allowed: the network relay
        // and snapshot restores run as QEMU's children.
        .args(["-m", &spec.memory_mib.to_string(), "-smp", &spec.vcpus.max(1).to_string()])
        .arg("-kernel")
        .arg(&spec.kernel)
        .arg("-initrd")
        .arg(&spec.initramfs)
        .args(["-append", &format!("console=ttyS0 quiet rdinit=/.drover/init panic=-1 {}", spec.kernel_args)])
        .args(["-serial", &format!("file:{}", path("console.log"))])
        .args(["-device", "virtio-serial-device"]);
    for (index, socket) in [BOOT_PORT, ATTACH_PORT].iter().enumerate() {
        command
            .args(["-chardev", &format!("socket,id=port{index},path={},server=on,wait=off", path(socket))])
            .args([
                "-device",
                &format!(
                    "virtserialport,chardev=port{index},name={}",
                    drover_guest::protocol::PORT_NAMES[index]
                ),
            ]);
    }
    command.args(["-qmp", &format!("unix:{},server=on,wait=off", path(QMP_SOCKET))]);
    if let Some(relay) = &spec.relay {
        command.args(["-netdev", &netdev(dir, relay), "-device", "virtio-net-device,netdev=net0"]);
    }
    if let Some(state) = &spec.incoming {
        command.args(["-incoming", &format!("exec:cat {}", qmp::shell_quote(state))]);
    }
    if let Some(uid) = run_as {
        command.args(["-runas", &format!("{uid}:{uid}")]);
    }
    command
}

/// The restricted user-mode network: the guest reaches nothing but the forwards, each relayed
/// to its Unix socket in the VM directory.
fn netdev(dir: &Path, relay: &Path) -> String {
    let forward = |guest: std::net::SocketAddrV4, socket: &str| {
        let command = format!("{} relay {}", qmp::shell_quote(relay), qmp::shell_quote(&dir.join(socket)));
        // QEMU option values escape commas by doubling them.
        format!(",guestfwd=tcp:{guest}-cmd:{}", command.replace(',', ",,"))
    };
    let mut netdev = String::from("user,id=net0,restrict=on");
    netdev.push_str(&forward(net::egress_proxy(), net::EGRESS_SOCKET));
    for slot in 0..net::HOST_PORT_SLOTS {
        netdev.push_str(&forward(net::host_port(slot), &net::host_port_socket(slot)));
    }
    netdev
}

/// Last lines of a log file, for error messages.
async fn tail(path: &Path) -> String {
    let text = tokio::fs::read_to_string(path).await.unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// The host TSC frequency in kHz. Under TCG the guest reads the host's TSC, so passing this as
/// `tsc_early_khz` spares the guest kernel a calibration that is unreliable on a busy host.
pub(crate) fn host_tsc_khz() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        let begin = Instant::now();
        // SAFETY: rdtsc has no preconditions on x86_64.
        let start = unsafe { core::arch::x86_64::_rdtsc() };
        std::thread::sleep(Duration::from_millis(20));
        // SAFETY: as above.
        let end = unsafe { core::arch::x86_64::_rdtsc() };
        let micros = begin.elapsed().as_micros() as u64;
        (micros > 0 && end > start).then(|| (end - start) * 1000 / micros)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}
