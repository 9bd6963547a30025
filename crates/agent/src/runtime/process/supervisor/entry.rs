//! The launcher's side: a function in `.init_array`, which the C runtime calls before `main`
//! with the program's arguments. When the first argument is [`LAUNCHER_ARG`], the process serves
//! step requests on its standard input until the agent closes it, and exits; `main` never runs.
//! Any other process returns from the hook at once.
//!
//! A hook rather than a branch in `main`, because every program that links the agent must be
//! able to launch its steps: the `drover` binary, and the test binaries that run agents.
//!
//! The launcher is single-threaded and small, so forking a supervisor off it is cheap and safe:
//! the supervisor may allocate, and nothing the agent does touches its pages.

use std::ffi::{CStr, CString, c_char, c_int};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;

use nix::sys::resource::{Resource, setrlimit};
use nix::unistd::Pid;

use super::{LAUNCHER_ARG, Plan, REQUEST_LIMIT, StepRequest, pipe, supervise};

#[cfg(not(target_env = "gnu"))]
compile_error!("the step launcher's hook needs the arguments glibc passes to .init_array functions");

/// The hook's entry in `.init_array`.
#[used]
#[unsafe(link_section = ".init_array")]
pub(super) static HOOK: extern "C" fn(c_int, *const *const c_char, *const *const c_char) = hook;

extern "C" fn hook(argc: c_int, argv: *const *const c_char, _envp: *const *const c_char) {
    if argc < 2 || argv.is_null() {
        return;
    }
    // SAFETY: glibc passes the process's argc and argv; argv[1] exists as argc >= 2.
    let first = unsafe { *argv.add(1) };
    // SAFETY: a non-null argv entry is a NUL-terminated string.
    if first.is_null() || unsafe { CStr::from_ptr(first) }.to_bytes() != LAUNCHER_ARG.as_bytes() {
        return;
    }
    // A panic must not unwind into the C runtime.
    let code = std::panic::catch_unwind(serve).map_or(101, |()| 0);
    // SAFETY: ends this process without running `main`.
    unsafe { libc::_exit(code) }
}

/// Serves requests from standard input, answering each on standard output, until end of input.
fn serve() {
    // SAFETY: signal dispositions of this single-threaded process. Supervisors are reaped by the
    // kernel (the agent learns of their end through a pidfd); a write to a gone agent is an
    // error, not a death.
    unsafe {
        libc::signal(libc::SIGCHLD, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let mut input = io::stdin().lock();
    let mut output = io::stdout().lock();
    loop {
        let mut length = [0u8; 4];
        if input.read_exact(&mut length).is_err() {
            return;
        }
        let length = u32::from_le_bytes(length);
        if length > REQUEST_LIMIT {
            // The stream can no longer be followed: say why and stop.
            let _ =
                writeln!(output, "error a request of {length} bytes is beyond the limit of {REQUEST_LIMIT}");
            return;
        }
        let mut body = vec![0u8; length as usize];
        if input.read_exact(&mut body).is_err() {
            return;
        }
        let answer = launch(&body);
        if output.write_all(answer.as_bytes()).and_then(|()| output.flush()).is_err() {
            return;
        }
    }
}

/// Forks a supervisor for one request; returns the answer line for the agent.
fn launch(body: &[u8]) -> String {
    let request: StepRequest = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(e) => return format!("error cannot read the request: {e}\n"),
    };
    let prepared = match Prepared::new(request) {
        Ok(prepared) => prepared,
        Err(e) => return format!("error cannot prepare the step: {e}\n"),
    };
    let (answer_read, answer_write) = match pipe() {
        Ok(pipe) => pipe,
        Err(e) => return format!("error cannot make a pipe: {e}\n"),
    };
    // SAFETY: this process is single-threaded, so the child may do anything the parent could.
    let supervisor = unsafe { libc::fork() };
    if supervisor < 0 {
        return format!("error cannot fork a supervisor: {}\n", io::Error::last_os_error());
    }
    if supervisor == 0 {
        drop(answer_read);
        let setup = || prepared.setup();
        supervise(&prepared.plan, &setup, answer_write.as_raw_fd());
    }
    drop(answer_write);
    // The supervisor answers once the step has exec'd (or failed to), then closes its end.
    let mut line = String::new();
    let read = std::fs::File::from(answer_read).take(super::ANSWER_LIMIT).read_to_string(&mut line);
    match (read, line.strip_prefix("started ")) {
        (Ok(_), Some(step)) => format!("started {supervisor} {}\n", step.trim_end()),
        (Ok(_), None) if line.ends_with('\n') => line,
        (Ok(_), None) => "error the step's supervisor ended without an answer\n".to_owned(),
        (Err(e), _) => format!("error cannot read the supervisor's answer: {e}\n"),
    }
}

/// A request turned into what the step's start uses, built before the supervisor forks.
struct Prepared {
    plan: Plan,
    cpus: Option<nix::sched::CpuSet>,
    open_files: u64,
    cgroup_procs: Vec<CString>,
    confinement: Option<super::Confinement>,
}

impl Prepared {
    fn new(request: StepRequest) -> io::Result<Prepared> {
        let plan = Plan::new(&request.program, &request.argv, &request.env, &request.cwd, &request.files)?;
        let cpus = if request.cpus.is_empty() {
            None
        } else {
            let mut set = nix::sched::CpuSet::new();
            for &cpu in &request.cpus {
                set.set(cpu).map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidInput, format!("cpu {cpu} is out of range"))
                })?;
            }
            Some(set)
        };
        let cgroup_procs = request
            .cgroup_procs
            .iter()
            .map(|p| {
                CString::new(p.as_os_str().as_bytes())
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a cgroup path"))
            })
            .collect::<io::Result<_>>()?;
        Ok(Prepared {
            plan,
            cpus,
            open_files: request.open_files,
            cgroup_procs,
            confinement: request.confinement,
        })
    }

    /// Runs in the step's child before exec, sharing the supervisor's memory: only raw system
    /// calls on what [`Prepared::new`] built, nothing that allocates.
    fn setup(&self) -> io::Result<()> {
        if let Some(cpus) = &self.cpus {
            nix::sched::sched_setaffinity(Pid::from_raw(0), cpus)?;
        }
        // No core dumps: a dump of a task's memory would land in its workspace, secrets and all.
        setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
        setrlimit(Resource::RLIMIT_NOFILE, self.open_files, self.open_files)?;
        for procs in &self.cgroup_procs {
            join_cgroup(procs)?;
        }
        // Last: joining cgroups and mounting need the root the task is about to lose.
        if let Some(confinement) = &self.confinement {
            confinement.apply()?;
        }
        Ok(())
    }
}

/// Moves the calling process into a cgroup by writing to its `cgroup.procs` (or `tasks`) file.
fn join_cgroup(procs: &CStr) -> io::Result<()> {
    // SAFETY: `procs` is a valid NUL-terminated path; open, write and close take no locks and
    // the buffer is a static byte string.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // Writing 0 means "the writing process" in both cgroup v1 and v2.
        let written = libc::write(fd, b"0".as_ptr().cast(), 1);
        let error = io::Error::last_os_error();
        libc::close(fd);
        if written != 1 {
            return Err(error);
        }
    }
    Ok(())
}
