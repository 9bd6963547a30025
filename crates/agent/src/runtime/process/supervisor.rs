//! The per-step supervisor: a small process between the agent and the step that outlives the
//! agent (like slurmstepd or containerd's shim), so that an agent restart loses neither the
//! step's output nor its exit status.
//!
//! Supervisors are forked by a launcher, never by the agent. A forked agent shares its pages
//! copy-on-write for as long as the supervisor lives: every page the agent then writes costs a
//! fault, a copy and a TLB shootdown on every core, which made that fork the largest cost per
//! task (the more so with a server in the same process). The launcher is this program started
//! once more (`/proc/self/exe` with [`LAUNCHER_ARG`]); a hook that runs before `main`
//! ([`entry`]) turns it into a small single-threaded process whose fork costs next to nothing.
//! Every program that links the agent (the `drover` binary, test binaries) can be one.
//!
//! The agent ([`Launcher`]) sends a [`StepRequest`] over a socket and reads one line back: the
//! supervisor's and the step's pids, or why the step could not be started. The supervisor
//! starts a session of its own, starts the step the way `posix_spawn` does (a child sharing its
//! memory, on a stack of its own, that runs until it execs), closes what it inherited, waits for
//! the step and writes how it ended (wait status and rusage) to a status file, atomically
//! (written aside, then renamed). The step writes its output straight to two files, which the
//! agent tails. Both files and the status live in the agent's state directory, out of the task's
//! reach. The agent learns of the supervisor's end through a pidfd.

mod entry;
mod launcher;

pub(crate) use launcher::Launcher;

use std::ffi::{CString, c_int};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::confine::Confinement;
use crate::runtime::Usage;

/// The argument that makes this program a launcher of step supervisors (see [`entry`]).
pub(crate) const LAUNCHER_ARG: &str = "__drover-step-launcher";

/// Most bytes of an answer line that are read.
const ANSWER_LIMIT: u64 = 4096;

/// Most bytes of a request a launcher reads.
const REQUEST_LIMIT: u32 = 16 << 20;

/// Everything a supervisor needs to start a step, sent to it as JSON on its standard input.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct StepRequest {
    /// The program, resolved to a path.
    pub program: PathBuf,
    /// Its arguments, `argv[0]` included.
    pub argv: Vec<String>,
    /// The step's whole environment.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: PathBuf,
    /// Where its output and status go.
    pub files: StepFiles,
    /// CPUs the step is pinned to; empty pins nothing.
    pub cpus: Vec<usize>,
    /// Open files per process (soft and hard `RLIMIT_NOFILE`).
    pub open_files: u64,
    /// The `cgroup.procs` (or v1 `tasks`) files the step joins before exec.
    pub cgroup_procs: Vec<PathBuf>,
    /// Identity and mount namespace, when the agent confines tasks.
    pub confinement: Option<Confinement>,
}

/// The files of one step in the agent's state directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StepFiles {
    base: PathBuf,
}

impl StepFiles {
    /// The files of step `step` of attempt `attempt_id` under `dir`.
    pub fn new(dir: &Path, attempt_id: i64, step: usize) -> StepFiles {
        StepFiles { base: dir.join(format!("attempt-{attempt_id}-step-{step}")) }
    }

    /// Standard output of the step.
    pub fn stdout(&self) -> PathBuf {
        self.base.with_extension("out")
    }

    /// Standard error of the step.
    pub fn stderr(&self) -> PathBuf {
        self.base.with_extension("err")
    }

    /// How the step ended, once it did.
    pub fn status(&self) -> PathBuf {
        self.base.with_extension("status")
    }

    fn status_tmp(&self) -> PathBuf {
        self.base.with_extension("status.tmp")
    }

    /// Removes every file of the step.
    pub fn remove(&self) {
        let files = [self.stdout(), self.stderr(), self.status(), self.status_tmp()];
        for path in files {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// How a step ended, as its supervisor recorded it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Ended {
    /// The raw wait status.
    pub raw: c_int,
    /// CPU time and peak memory from the step's rusage (descendants it waited for included).
    pub usage: Usage,
}

/// Reads a status file; `None` while the step runs (the file appears whole, by rename).
pub(crate) fn read_status(path: &Path) -> Option<Ended> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<i64>().ok());
    let (raw, utime, stime, maxrss) = (fields.next()??, fields.next()??, fields.next()??, fields.next()??);
    Some(Ended {
        raw: c_int::try_from(raw).ok()?,
        usage: Usage {
            cpu_seconds: (utime.max(0) + stime.max(0)) as f64 / 1e6,
            peak_memory_bytes: (maxrss.max(0) as u64) * 1024,
        },
    })
}

/// Everything the supervisor and the step need, built by the supervisor before the step starts.
pub(crate) struct Plan {
    program: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    cwd: CString,
    stdout: OwnedFd,
    stderr: OwnedFd,
    devnull: OwnedFd,
    status_tmp: CString,
    status: CString,
    /// The stack the step runs on until it execs (see [`spawn_step`]).
    _stack: Vec<u8>,
    /// Its highest address, where the stack starts (it grows down).
    stack_top: *mut libc::c_void,
}

/// Bytes of stack for the step between its start and exec (setup, confinement included).
const STEP_STACK: usize = 256 * 1024;

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a path, argument or variable")
    })
}

impl Plan {
    /// Prepares running `program` with `argv` (argv[0] included) and `env` in `cwd`, its
    /// output going to the step's files.
    pub fn new(
        program: &Path,
        argv: &[String],
        env: &[(String, String)],
        cwd: &Path,
        files: &StepFiles,
    ) -> io::Result<Plan> {
        let argv: Vec<CString> = argv.iter().map(|a| cstring(a.as_bytes())).collect::<io::Result<_>>()?;
        let envp: Vec<CString> =
            env.iter().map(|(k, v)| cstring(format!("{k}={v}").as_bytes())).collect::<io::Result<_>>()?;
        let pointers = |list: &[CString]| {
            list.iter().map(|c| c.as_ptr()).chain(std::iter::once(std::ptr::null())).collect::<Vec<_>>()
        };
        let output = |path: PathBuf| -> io::Result<OwnedFd> {
            use std::os::unix::fs::OpenOptionsExt;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)?;
            Ok(OwnedFd::from(file))
        };
        let devnull = OwnedFd::from(std::fs::File::open("/dev/null")?);
        // Zeroed memory from the allocator: mapped lazily, so untouched pages cost nothing.
        let mut stack = vec![0u8; STEP_STACK];
        // SAFETY: one past the end of the buffer, rounded down to the 16 bytes the ABI wants.
        let stack_top = unsafe { stack.as_mut_ptr().add(STEP_STACK) };
        let stack_top = (stack_top as usize & !15) as *mut libc::c_void;
        Ok(Plan {
            _stack: stack,
            stack_top,
            program: cstring(program.as_os_str().as_bytes())?,
            argv_ptrs: pointers(&argv),
            _argv: argv,
            envp_ptrs: pointers(&envp),
            _envp: envp,
            cwd: cstring(cwd.as_os_str().as_bytes())?,
            stdout: output(files.stdout())?,
            stderr: output(files.stderr())?,
            devnull,
            status_tmp: cstring(files.status_tmp().as_os_str().as_bytes())?,
            status: cstring(files.status().as_os_str().as_bytes())?,
        })
    }
}

/// The two processes of a started step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Launched {
    /// The supervisor (a child of the launcher).
    pub supervisor: i32,
    /// The step: leader of its own process group.
    pub step: i32,
}

/// The launcher's answer: `started SUPERVISOR STEP`, `exec-error ERRNO` (the step could not be
/// set up or exec'd) or `error MESSAGE`.
pub(super) fn parse_answer(line: &str) -> io::Result<Launched> {
    let line = line.trim_end();
    let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
    let odd = || io::Error::other(format!("the step's launcher said {line:?}"));
    match word {
        "started" => {
            let (supervisor, step) = rest.split_once(' ').ok_or_else(odd)?;
            Ok(Launched {
                supervisor: supervisor.parse().map_err(|_| odd())?,
                step: step.parse().map_err(|_| odd())?,
            })
        }
        "exec-error" => Err(io::Error::from_raw_os_error(rest.parse().map_err(|_| odd())?)),
        "error" => Err(io::Error::other(format!("the step's supervisor failed: {rest}"))),
        "" => Err(io::Error::other("the step's launcher ended without an answer")),
        _ => Err(odd()),
    }
}

fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: waitpid on our own child with a valid out pointer.
    while unsafe { libc::waitpid(pid, &mut status, 0) } == -1
        && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
    {}
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn read_exact(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: reads into the unfilled part of `buf`.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf[done..].as_mut_ptr().cast(), buf.len() - done) };
        match n {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n if n > 0 => done += n as usize,
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            _ => return Err(io::Error::last_os_error()),
        }
    }
    Ok(())
}

/// Writes `text` whole to `fd`, retrying short writes; errors are ignored (the reader is gone).
fn write_all_fd(fd: c_int, text: &[u8]) {
    let mut done = 0;
    while done < text.len() {
        // SAFETY: writes from the unwritten part of a live slice.
        let n = unsafe { libc::write(fd, text[done..].as_ptr().cast(), text.len() - done) };
        if n > 0 {
            done += n as usize;
        } else if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        } else {
            return;
        }
    }
}

/// The supervisor's work, in a process of its own (forked by the launcher): starts the step,
/// answers on `answer` (`started STEP`, or why not), waits for the step and records how it
/// ended. `setup` runs in the step before exec (see [`run_step`]). Never returns.
pub(super) fn supervise(plan: &Plan, setup: &dyn Fn() -> io::Result<()>, answer: c_int) -> ! {
    let exit_with = |text: &str| -> ! {
        write_all_fd(answer, text.as_bytes());
        // SAFETY: ends this process.
        unsafe { libc::_exit(1) }
    };
    // SAFETY: setsid and signal changes of this (single-threaded) process.
    unsafe {
        libc::setsid();
        // Signals as a fresh process has them; a write to the answer pipe after the agent died
        // must not kill the supervisor.
        reset_signals();
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let exec_error = match pipe() {
        Ok(pipe) => pipe,
        Err(e) => exit_with(&format!("error cannot make a pipe: {e}\n")),
    };
    // SAFETY: the plan and setup outlive the call; the child only reads them until it execs.
    let step = unsafe { spawn_step(plan, setup, exec_error.1.as_raw_fd()) };
    drop(exec_error.1);
    if step < 0 {
        exit_with(&format!("error cannot start the step: {}\n", io::Error::last_os_error()));
    }
    // The step has exec'd (its end of the pipe closed on exec) or failed before and said why.
    let mut errno = [0u8; 4];
    match read_exact(&exec_error.0, &mut errno) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            write_all_fd(answer, format!("started {step}\n").as_bytes());
        }
        Ok(()) => {
            reap(step);
            exit_with(&format!("exec-error {}\n", i32::from_ne_bytes(errno)));
        }
        Err(e) => {
            reap(step);
            exit_with(&format!("error cannot learn whether the step started: {e}\n"));
        }
    }
    // SAFETY (whole body): raw system calls on descriptors and strings of the plan.
    unsafe {
        // Nothing of the launcher's stays open here (which also tells it the answer is complete),
        // and the supervisor's own standard streams go nowhere.
        let null = plan.devnull.as_raw_fd();
        for fd in 0..3 {
            libc::dup2(null, fd);
        }
        close_from(3);
        let mut status: c_int = 0;
        let mut usage: libc::rusage = std::mem::zeroed();
        while libc::wait4(step, &mut status, 0, &mut usage) == -1 && *libc::__errno_location() == libc::EINTR
        {
        }
        let micros = |t: libc::timeval| t.tv_sec.saturating_mul(1_000_000).saturating_add(t.tv_usec);
        let line =
            format!("{} {} {} {}\n", status, micros(usage.ru_utime), micros(usage.ru_stime), usage.ru_maxrss);
        // Written aside, then renamed: a reader sees no file or the whole line. No fsync: the
        // file must outlive the agent, not the machine (a reboot ends the step anyway), and a
        // sync here would delay every task's end by a disk flush.
        let fd = libc::open(
            plan.status_tmp.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
            0o600,
        );
        if fd >= 0 {
            libc::write(fd, line.as_ptr().cast(), line.len());
            libc::close(fd);
            libc::rename(plan.status_tmp.as_ptr(), plan.status.as_ptr());
        }
        libc::_exit(0)
    }
}

/// What the step's start needs, passed to [`step_entry`] by pointer.
struct StepStart<'a> {
    plan: &'a Plan,
    setup: &'a dyn Fn() -> io::Result<()>,
    exec_error: c_int,
}

/// Starts the step as `posix_spawn` does: a child that shares the supervisor's memory and runs
/// on the plan's stack, while the supervisor waits until it has exec'd or exited
/// (`CLONE_VFORK`): no copy of its page tables, only to be thrown away by exec. Returns the
/// child's pid, or -1.
unsafe fn spawn_step(plan: &Plan, setup: &dyn Fn() -> io::Result<()>, exec_error: c_int) -> libc::pid_t {
    let start = StepStart { plan, setup, exec_error };
    // SAFETY: the child runs `step_entry` on the plan's stack, which nothing else uses, and only
    // reads `start` (alive on this frame: the supervisor is suspended until the child execs or
    // exits). Descriptors and signal dispositions are the child's own copies (no CLONE_FILES,
    // no CLONE_SIGHAND), so what it changes there stays its own.
    unsafe {
        libc::clone(
            step_entry,
            plan.stack_top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&start as *const StepStart<'_>).cast_mut().cast(),
        )
    }
}

/// The step's first function (see [`spawn_step`]). Never returns.
extern "C" fn step_entry(arg: *mut libc::c_void) -> c_int {
    // SAFETY: `arg` is the `StepStart` of `spawn_step`, alive while this runs.
    unsafe {
        let start = &*(arg as *const StepStart<'_>);
        run_step(start.plan, start.setup, start.exec_error)
    }
}

/// The step, in the supervisor's child: standard streams, setup, exec. On failure the errno
/// goes to the supervisor through `exec_error`. The child shares the supervisor's memory until
/// it execs, so it only makes raw system calls on data built beforehand.
unsafe fn run_step(plan: &Plan, setup: &dyn Fn() -> io::Result<()>, exec_error: c_int) -> ! {
    // SAFETY (whole body): raw system calls on data prepared before the child started.
    unsafe {
        let fail = |errno: c_int| -> ! {
            let bytes = errno.to_ne_bytes();
            libc::write(exec_error, bytes.as_ptr().cast(), bytes.len());
            libc::_exit(127)
        };
        libc::setpgid(0, 0);
        // The supervisor ignores SIGPIPE, and an ignored signal stays ignored across exec: a
        // step must get it as any program does (`yes | head` ends quietly).
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        if libc::dup2(plan.devnull.as_raw_fd(), 0) < 0
            || libc::dup2(plan.stdout.as_raw_fd(), 1) < 0
            || libc::dup2(plan.stderr.as_raw_fd(), 2) < 0
        {
            fail(*libc::__errno_location());
        }
        if libc::chdir(plan.cwd.as_ptr()) != 0 {
            fail(*libc::__errno_location());
        }
        if let Err(e) = setup() {
            fail(e.raw_os_error().unwrap_or(libc::EPERM));
        }
        libc::execve(plan.program.as_ptr(), plan.argv_ptrs.as_ptr(), plan.envp_ptrs.as_ptr());
        fail(*libc::__errno_location())
    }
}

/// Every signal back to its default action and unblocked.
unsafe fn reset_signals() {
    // SAFETY: sigset manipulation on a local, and signal/sigprocmask system calls.
    unsafe {
        for signal in 1..32 {
            if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                libc::signal(signal, libc::SIG_DFL);
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
}

/// Closes every descriptor from `first` on.
unsafe fn close_from(first: c_int) {
    // SAFETY: close_range and close only close descriptors of this process.
    unsafe {
        if libc::syscall(libc::SYS_close_range, first as libc::c_uint, libc::c_uint::MAX, 0) != 0 {
            // Kernels before 5.9: close them one by one.
            let max = libc::sysconf(libc::_SC_OPEN_MAX).clamp(1024, 1 << 16) as c_int;
            for fd in first..max {
                libc::close(fd);
            }
        }
    }
}

/// Writes `n` in decimal into `buf`; returns the number of bytes written. Allocation-free.
pub(super) fn write_int(buf: &mut [u8], n: i64) -> usize {
    let mut digits = [0u8; 20];
    let mut len = 0;
    let mut v = n.unsigned_abs();
    loop {
        digits[len] = b'0' + (v % 10) as u8;
        len += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let mut at = 0;
    if n < 0 {
        buf[0] = b'-';
        at = 1;
    }
    for i in 0..len {
        buf[at + i] = digits[len - 1 - i];
    }
    at + len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_written_without_allocating() {
        let mut buf = [0u8; 24];
        let n = write_int(&mut buf, -1234);
        assert_eq!(&buf[..n], b"-1234");
        let n = write_int(&mut buf, 0);
        assert_eq!(&buf[..n], b"0");
        let n = write_int(&mut buf, i64::MIN);
        assert_eq!(&buf[..n], i64::MIN.to_string().as_bytes());
    }

    #[test]
    fn status_files_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s");
        assert_eq!(read_status(&path), None);
        std::fs::write(&path, "768 1500000 500000 2048\n").expect("write");
        let ended = read_status(&path).expect("status");
        assert_eq!(ended.raw, 768);
        assert!((ended.usage.cpu_seconds - 2.0).abs() < 1e-9);
        assert_eq!(ended.usage.peak_memory_bytes, 2 << 20);
        std::fs::write(&path, "garbage").expect("write");
        assert_eq!(read_status(&path), None);
    }
}
