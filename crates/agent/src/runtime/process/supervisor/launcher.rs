//! The agent's side of the launcher: starts it on first use, sends it requests, reads its
//! answers, and starts a new one when the last one is gone.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::Mutex;

use super::{ANSWER_LIMIT, LAUNCHER_ARG, Launched, StepRequest, entry, parse_answer};

/// Starts steps through a launcher process of this agent's own.
#[derive(Debug, Default)]
pub(crate) struct Launcher {
    connection: Mutex<Option<Connection>>,
}

#[derive(Debug)]
struct Connection {
    pid: i32,
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Launcher {
    /// Starts a supervisor for `request` and waits until the step has exec'd; returns both
    /// pids, or why the step could not start. Blocking.
    pub fn launch(&self, request: &StepRequest) -> io::Result<Launched> {
        let body = serde_json::to_vec(request).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let length = u32::try_from(body.len())
            .ok()
            .filter(|n| *n <= super::REQUEST_LIMIT)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the step's request is too large"))?;
        let mut guard = self.connection.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Some(Connection::start()?);
        }
        let Some(connection) = guard.as_mut() else {
            return Err(io::Error::other("no launcher"));
        };
        match connection.exchange(length, &body) {
            Ok(line) => parse_answer(&line),
            Err(e) => {
                // The launcher is gone or out of step. Never resend: it may have started the
                // step. The next launch starts a new launcher.
                if let Some(old) = guard.take() {
                    old.close();
                }
                Err(io::Error::other(format!("the step's launcher failed: {e}")))
            }
        }
    }
}

impl Connection {
    fn start() -> io::Result<Connection> {
        // Referenced here so that the hook is linked into every program that launches steps,
        // or the new process would not know it is a launcher.
        std::hint::black_box(&entry::HOOK);
        let (ours, theirs) = UnixStream::pair()?;
        let theirs = OwnedFd::from(theirs);
        // Without a pre-exec closure, std spawns with posix_spawn (a vfork): the agent's page
        // tables are not copied.
        let child = std::process::Command::new("/proc/self/exe")
            .arg0("drover-step-launcher")
            .arg(LAUNCHER_ARG)
            .stdin(Stdio::from(theirs.try_clone()?))
            .stdout(Stdio::from(theirs))
            .stderr(Stdio::null())
            .spawn()?;
        let pid = i32::try_from(child.id()).map_err(io::Error::other)?;
        let reader = BufReader::new(ours.try_clone()?);
        tracing::debug!(pid, "started the step launcher");
        Ok(Connection { pid, writer: ours, reader })
    }

    fn exchange(&mut self, length: u32, body: &[u8]) -> io::Result<String> {
        self.writer.write_all(&length.to_le_bytes())?;
        self.writer.write_all(body)?;
        let mut line = String::new();
        (&mut self.reader).take(ANSWER_LIMIT).read_line(&mut line)?;
        if !line.ends_with('\n') {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the launcher closed its end"));
        }
        Ok(line)
    }

    /// Closes the connection (a live launcher exits on it) and reaps the launcher if it ended.
    fn close(self) {
        let Connection { pid, writer, reader } = self;
        drop(writer);
        drop(reader);
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        // SAFETY: waitpid on our own child with a valid out pointer.
        let mut status = 0;
        unsafe { libc::waitpid(pid, &mut status, 0) };
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        let connection = self.connection.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(connection) = connection {
            connection.close();
        }
    }
}
