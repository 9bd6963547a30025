//! Running steps: spawning, reaping, output, signals and usage.
//!
//! PID 1 inherits every orphan, so one reaper thread waits for any child. It peeks at the next
//! exited child with `waitid(WNOWAIT)`, then looks the pid up under the same lock `run` holds
//! while spawning and registering a step, so a step that exits at once is never reaped before
//! it is known, and the exit status (with the rusage of the step and its waited-for
//! descendants) reaches the step's supervisor.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use drover_guest::procs;
use drover_guest::protocol::{
    GuestMessage, MAX_CHUNK, OutputStream, StartErrorKind, StepExit, StepState, StepUsage,
};

use crate::sync::Workspace;
use crate::{Outbox, log, poll_one};

/// How long output may keep flowing after the step's leader exited; background processes
/// still holding the pipes after that are no longer read (like the process runtime).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(3);

/// PATH when the step's environment has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

type Reaped = (libc::c_int, libc::rusage);

/// All steps of this VM.
#[derive(Clone)]
pub(crate) struct Steps {
    inner: Arc<Mutex<Inner>>,
    workspace: Arc<Mutex<Workspace>>,
    outbox: Outbox,
}

#[derive(Default)]
struct Inner {
    steps: HashMap<usize, Record>,
    /// Leaders of running steps, to hand their exit status to their supervisor.
    waiters: HashMap<i32, Sender<Reaped>>,
}

struct Record {
    pid: i32,
    /// Highest live usage seen, so the final usage is never below a live reading.
    live: StepUsage,
    exit: Option<(StepExit, StepUsage)>,
}

impl Steps {
    /// Starts the reaper and returns the (empty) step table.
    pub(crate) fn start(outbox: Outbox) -> Steps {
        let steps =
            Steps { inner: Arc::default(), workspace: Arc::new(Mutex::new(Workspace::new())), outbox };
        let inner = steps.inner.clone();
        std::thread::spawn(move || reap_forever(&inner));
        steps
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update is a single insert or field write, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The guest workspace, shared by the main loop (uploads) and supervisors (sync back).
    pub(crate) fn workspace(&self) -> MutexGuard<'_, Workspace> {
        self.workspace.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts a step and answers `Started` or `StartFailed`.
    pub(crate) fn run(
        &self,
        step: usize,
        argv: &[String],
        env: Vec<(String, String)>,
        cwd: &str,
        user: Option<(u32, u32)>,
    ) {
        let failed = |kind, message: String| GuestMessage::StartFailed { step, kind, message };
        let Some(name) = argv.first() else {
            self.outbox.broadcast(&failed(StartErrorKind::Invalid, "empty command".into()));
            return;
        };
        let path = env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str()).unwrap_or(DEFAULT_PATH);
        let cwd = Path::new(cwd);
        let program = match procs::resolve_program(name, path, cwd) {
            Ok(program) => program,
            Err(error) => {
                self.outbox.broadcast(&failed(kind_of(&error), error.to_string()));
                return;
            }
        };
        if let Err(error) = std::fs::create_dir_all(cwd) {
            self.outbox.broadcast(&failed(kind_of(&error), format!("working directory: {error}")));
            return;
        }
        let mut command = std::process::Command::new(&program);
        command
            .arg0(name)
            .args(&argv[1..])
            .env_clear()
            .envs(env)
            .current_dir(cwd)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = user {
            command.uid(uid).gid(gid);
        }

        let oom_before = oom_kills();
        let (tx, rx) = mpsc::channel();
        let spawned = {
            let mut inner = self.lock();
            if inner.steps.contains_key(&step) {
                drop(inner);
                self.outbox.broadcast(&failed(StartErrorKind::Invalid, format!("step {step} already ran")));
                return;
            }
            // Spawn and register under the lock the reaper takes before reaping (module docs).
            command.spawn().map(|mut child| {
                let pid = child.id() as i32;
                inner.waiters.insert(pid, tx);
                inner.steps.insert(step, Record { pid, live: StepUsage::default(), exit: None });
                (pid, child.stdout.take(), child.stderr.take())
            })
        };
        let (pid, stdout, stderr) = match spawned {
            Ok(spawned) => spawned,
            Err(error) => {
                self.outbox.broadcast(&failed(kind_of(&error), error.to_string()));
                return;
            }
        };
        log!("step {step} started as pid {pid}: {}", program.display());
        self.outbox.broadcast(&GuestMessage::Started { step, pid });
        let readers: Vec<_> = [
            (stdout.map(OwnedFd::from), OutputStream::Stdout),
            (stderr.map(OwnedFd::from), OutputStream::Stderr),
        ]
        .into_iter()
        .filter_map(|(fd, stream)| fd.map(|fd| (fd, stream)))
        .collect();
        let steps = self.clone();
        std::thread::spawn(move || steps.supervise(step, pid, readers, &rx, oom_before));
    }

    fn supervise(
        &self,
        step: usize,
        pid: i32,
        pipes: Vec<(OwnedFd, OutputStream)>,
        reaped: &Receiver<Reaped>,
        oom_before: u64,
    ) {
        let deadline = Arc::new(Mutex::new(None::<Instant>));
        let readers: Vec<JoinHandle<()>> = pipes
            .into_iter()
            .map(|(fd, stream)| {
                let (outbox, deadline) = (self.outbox.clone(), deadline.clone());
                std::thread::spawn(move || pump(fd, stream, step, &outbox, &deadline))
            })
            .collect();
        // The sender lives in the reaper's table until the leader is reaped.
        let (raw, rusage) = match reaped.recv() {
            Ok(reaped) => reaped,
            Err(_) => (0, zeroed_rusage()),
        };
        if let Ok(mut deadline) = deadline.lock() {
            *deadline = Some(Instant::now() + DRAIN_AFTER_EXIT);
        }
        for reader in readers {
            let _ = reader.join();
        }
        let mut exit = decode_status(raw);
        exit.oom = oom_kills() > oom_before;
        let final_usage = rusage_usage(&rusage);
        // Sent while no host listens (its agent restarting), the step's end would be lost, and
        // with it the files it changed: it waits for the next host, which gets it after the
        // output held for it. Until then the step reads as running.
        self.outbox.wait_for_host();
        self.workspace().send_changes(&self.outbox);
        let usage = {
            let mut inner = self.lock();
            let usage = inner.steps.get(&step).map_or(final_usage, |r| larger(r.live, final_usage));
            if let Some(record) = inner.steps.get_mut(&step) {
                record.exit = Some((exit, usage));
            }
            usage
        };
        log!("step {step} (pid {pid}) ended: {exit:?}");
        self.outbox.broadcast(&GuestMessage::Exited { step, exit, usage });
    }

    /// Sends `signal` to the step's process group, if it still runs.
    pub(crate) fn signal(&self, step: usize, signal: i32) {
        let pid = match self.lock().steps.get(&step) {
            Some(record) if record.exit.is_none() => record.pid,
            _ => return,
        };
        // SAFETY: killpg has no memory arguments; signalling an exited group is harmless (ESRCH).
        if unsafe { libc::killpg(pid, signal) } != 0 {
            log!("killpg {pid} {signal}: {}", std::io::Error::last_os_error());
        }
    }

    /// The step's state; for a running step, its usage so far.
    pub(crate) fn status(&self, step: usize) -> StepState {
        let Some(pid) = self.lock().steps.get(&step).map(|r| r.pid) else {
            return StepState::Unknown;
        };
        let now = group_usage(pid);
        let mut inner = self.lock();
        let Some(record) = inner.steps.get_mut(&step) else {
            return StepState::Unknown;
        };
        match record.exit {
            Some((exit, usage)) => StepState::Exited { exit, usage },
            None => {
                record.live = larger(record.live, now);
                StepState::Running { usage: record.live }
            }
        }
    }
}

/// Reaps every child forever; hands step leaders' statuses to their supervisors.
fn reap_forever(inner: &Mutex<Inner>) {
    loop {
        // SAFETY: siginfo_t is a plain C struct for which all-zero bytes are valid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable siginfo_t; WNOWAIT leaves the child reapable.
        let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc != 0 {
            // ECHILD: nothing to wait for yet; EINTR: try again.
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        // SAFETY: waitid succeeded with WEXITED, so the siginfo describes a child (SIGCHLD).
        let pid = unsafe { info.si_pid() };
        let waiter = inner.lock().unwrap_or_else(|p| p.into_inner()).waiters.remove(&pid);
        let mut status: libc::c_int = 0;
        let mut rusage = zeroed_rusage();
        // SAFETY: both pointers point to live, writable locals of the types wait4 expects.
        let reaped = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut rusage) };
        if reaped == pid
            && let Some(waiter) = waiter
        {
            let _ = waiter.send((status, rusage));
        }
    }
}

/// Forwards one output pipe in chunks of at most [`MAX_CHUNK`] bytes until end of file, or
/// until the drain deadline set after the leader's exit has passed.
fn pump(fd: OwnedFd, stream: OutputStream, step: usize, outbox: &Outbox, deadline: &Mutex<Option<Instant>>) {
    let mut file = std::fs::File::from(fd);
    let mut buffer = vec![0u8; MAX_CHUNK];
    loop {
        let expired = deadline.lock().map(|d| d.is_some_and(|d| Instant::now() > d)).unwrap_or(true);
        if expired {
            return;
        }
        if poll_one(&file, libc::POLLIN, 100) == 0 {
            continue;
        }
        match file.read(&mut buffer) {
            Ok(0) => return,
            Ok(n) => outbox.broadcast(&GuestMessage::Output { step, stream, data: buffer[..n].to_vec() }),
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

fn zeroed_rusage() -> libc::rusage {
    // SAFETY: rusage is a plain C struct of integers, for which all-zero bytes are valid.
    unsafe { std::mem::zeroed() }
}

fn decode_status(raw: libc::c_int) -> StepExit {
    let status = procs::decode_wait(raw);
    StepExit { code: status.code, signal: status.signal, oom: false }
}

fn rusage_usage(rusage: &libc::rusage) -> StepUsage {
    let (cpu_seconds, peak_memory_bytes) = procs::rusage_totals(rusage);
    StepUsage { cpu_seconds, peak_memory_bytes }
}

fn larger(a: StepUsage, b: StepUsage) -> StepUsage {
    StepUsage {
        cpu_seconds: a.cpu_seconds.max(b.cpu_seconds),
        peak_memory_bytes: a.peak_memory_bytes.max(b.peak_memory_bytes),
    }
}

/// CPU time and resident memory of the live members of process group `pgid`, from `/proc`.
fn group_usage(pgid: i32) -> StepUsage {
    let group = procs::group_usage(pgid);
    StepUsage { cpu_seconds: group.cpu_seconds, peak_memory_bytes: group.rss_bytes }
}

/// The kernel's OOM-kill counter, to tell whether one happened during a step.
fn oom_kills() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok()))
        .unwrap_or(0)
}

fn kind_of(error: &std::io::Error) -> StartErrorKind {
    match error.kind() {
        std::io::ErrorKind::NotFound => StartErrorKind::NotFound,
        std::io::ErrorKind::PermissionDenied => StartErrorKind::PermissionDenied,
        _ => StartErrorKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_wait_statuses() {
        assert_eq!(decode_status(7 << 8).code, Some(7));
        assert_eq!(decode_status(9).signal, Some(9));
    }

    #[test]
    fn resolves_programs_in_path() {
        assert!(procs::resolve_program("sh", "/usr/bin:/bin", Path::new("/")).is_ok());
        let missing = procs::resolve_program("drover-no-such-program", "/bin", Path::new("/")).unwrap_err();
        assert_eq!(kind_of(&missing), StartErrorKind::NotFound);
    }

    #[test]
    fn group_usage_of_our_own_group_is_positive() {
        // SAFETY: getpgrp has no arguments.
        let usage = group_usage(unsafe { libc::getpgrp() });
        assert!(usage.peak_memory_bytes > 0, "{usage:?}");
    }
}
