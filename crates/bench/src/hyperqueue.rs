//! HyperQueue on this machine, for the throughput peer figure. Its Python package
//! (`pip install hyperqueue`) ships no `hq` executable: `hyperqueue.cluster.LocalCluster` runs
//! the server and a worker as threads of the package's native module inside the Python process.
//! So the measurement is a Python driver (`peers/hyperqueue_throughput.py`, embedded in this
//! binary and run with `python3 -c`) that starts the cluster, runs the jobs, stops the cluster and
//! reports one JSON line per run.
//!
//! The driver runs in a process group of its own. Once its output ends, the whole group is
//! killed (a task process its worker left behind included) before the driver itself is reaped:
//! until then the group id cannot have been reused by anyone else.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// The driver, run with `python3 -c`.
const DRIVER: &str = include_str!("peers/hyperqueue_throughput.py");

/// Time for Python to start, load the native module and start the first cluster.
const STARTUP: Duration = Duration::from_secs(60);

/// Per run, on top of the deadline: describing and submitting the job, and restarting the
/// cluster after a run that was cut.
const PER_RUN_SLACK: Duration = Duration::from_secs(30);

/// How long the driver may take to exit once its output has ended.
const EXIT_GRACE: Duration = Duration::from_secs(10);

/// What one throughput measurement is asked to do.
pub struct ThroughputOptions {
    /// Tasks per run, each running `true`.
    pub tasks: usize,
    /// Cores the single worker offers; each task takes one.
    pub cores: usize,
    /// Number of runs, all on the same cluster unless one was cut.
    pub runs: usize,
    /// Longest a run may take; the run's figure is then the tasks finished by that time.
    pub deadline: Duration,
}

/// What a throughput measurement gave.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// HyperQueue cannot run here, and why (what is missing and how to install it).
    Unavailable(String),
    /// Every run was measured.
    Measured {
        /// HyperQueue's version, as its native module reports it.
        version: String,
        /// One entry per run, in order.
        runs: Vec<Run>,
    },
}

/// One run of the throughput job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Run {
    /// Tasks finished when the clock stopped: all of them, unless the deadline cut the run.
    pub done: usize,
    /// Seconds from before the submit until every task finished, or until the deadline.
    pub secs: f64,
}

/// Runs N `true` tasks per run on a private HyperQueue cluster under `dir` and times each run
/// from submit until every task finished. HyperQueue's log and the driver's errors are kept in
/// `dir/hyperqueue.log`.
pub fn throughput(dir: &Path, options: &ThroughputOptions) -> Result<Outcome> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let log_path = dir.join("hyperqueue.log");
    let log =
        std::fs::File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    let spawned = Command::new("python3")
        .arg("-c")
        .arg(DRIVER)
        .args(["--tasks", &options.tasks.to_string()])
        .args(["--cores", &options.cores.to_string()])
        .args(["--runs", &options.runs.to_string()])
        .args(["--deadline", &options.deadline.as_secs_f64().to_string()])
        .arg("--dir")
        .arg(dir)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .process_group(0)
        .spawn();
    let child = match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Outcome::Unavailable(
                "python3 not found (HyperQueue runs from its Python package: pip install hyperqueue)".into(),
            ));
        }
        Err(e) => return Err(e).context("cannot start python3"),
    };
    let mut driver = Driver { child, log: log_path, reaped: false };
    let stdout = driver.child.stdout.take().ok_or_else(|| anyhow!("the driver's stdout is not a pipe"))?;
    // Lines arrive on a channel so that waiting for the next one can time out.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let run_count = u32::try_from(options.runs).unwrap_or(u32::MAX);
    let limit = STARTUP.saturating_add((options.deadline + PER_RUN_SLACK).saturating_mul(run_count));
    let started = Instant::now();
    let mut version = None;
    let mut runs = Vec::new();
    loop {
        match rx.recv_timeout(limit.saturating_sub(started.elapsed())) {
            Ok(line) => {
                let line = line.context("cannot read the HyperQueue driver's output")?;
                match parse(&line)? {
                    Report::Unavailable(why) => {
                        driver.finish()?;
                        return Ok(Outcome::Unavailable(why));
                    }
                    Report::Version(v) => version = Some(v),
                    Report::Run(run) => {
                        eprintln!(
                            "  hyperqueue run {}: {} of {} tasks in {:.2}s",
                            runs.len() + 1,
                            run.done,
                            options.tasks,
                            run.secs
                        );
                        runs.push(run);
                    }
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
            // Dropping the driver kills its process group.
            Err(RecvTimeoutError::Timeout) => {
                bail!("the HyperQueue driver was still running after {limit:?}; {}", driver.log_tail())
            }
        }
    }
    let status = driver.finish()?;
    if !status.success() {
        bail!("the HyperQueue driver exited {status}; {}", driver.log_tail());
    }
    let version = version.ok_or_else(|| anyhow!("the HyperQueue driver reported no version"))?;
    if runs.len() != options.runs {
        bail!(
            "the HyperQueue driver reported {} of {} runs; {}",
            runs.len(),
            options.runs,
            driver.log_tail()
        );
    }
    Ok(Outcome::Measured { version, runs })
}

/// One line of the driver's output.
#[derive(Debug, PartialEq)]
enum Report {
    Unavailable(String),
    Version(String),
    Run(Run),
}

fn parse(line: &str) -> Result<Report> {
    let value: serde_json::Value = serde_json::from_str(line)
        .with_context(|| format!("unexpected line from the HyperQueue driver: {line:?}"))?;
    let text = |key: &str| value.get(key).and_then(|v| v.as_str()).map(str::to_string);
    if let Some(why) = text("unavailable") {
        return Ok(Report::Unavailable(why));
    }
    if let Some(version) = text("version") {
        return Ok(Report::Version(version));
    }
    let done = value.get("done").and_then(|v| v.as_u64());
    let secs = value.get("secs").and_then(|v| v.as_f64());
    match (value.get("run"), done, secs) {
        (Some(_), Some(done), Some(secs)) if secs > 0.0 => Ok(Report::Run(Run { done: done as usize, secs })),
        _ => bail!("unexpected line from the HyperQueue driver: {line:?}"),
    }
}

/// The driver process and its process group.
struct Driver {
    child: Child,
    /// Its stderr: HyperQueue's logging and Python tracebacks.
    log: PathBuf,
    /// Whether `child` was waited for; its pid, and so its group id, may then belong to others.
    reaped: bool,
}

impl Driver {
    /// Waits up to [`EXIT_GRACE`] for the driver to exit, kills what is left of its group, and
    /// reaps it.
    fn finish(&mut self) -> Result<ExitStatus> {
        let start = Instant::now();
        while !self.exited_unreaped() && start.elapsed() < EXIT_GRACE {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill_group();
        let status = self.child.wait().context("cannot wait for the HyperQueue driver")?;
        self.reaped = true;
        Ok(status)
    }

    /// Whether the driver has exited, without reaping it (`WNOWAIT`), so that its pid stays
    /// reserved and its group id cannot name another group.
    fn exited_unreaped(&self) -> bool {
        // SAFETY: an all-zero siginfo_t is a valid value (a plain C struct).
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid only writes into `info`, which lives for the call; the pid is our own
        // child, not yet reaped.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                self.child.id(),
                &mut info,
                libc::WEXITED | libc::WNOWAIT | libc::WNOHANG,
            )
        };
        // SAFETY: waitid succeeded, so `info` is initialised; with WNOHANG and no exited child
        // it leaves si_pid at zero.
        rc == 0 && unsafe { info.si_pid() } != 0
    }

    /// SIGKILL to every process of the driver's group.
    fn kill_group(&self) {
        if self.reaped {
            return;
        }
        // SAFETY: kill(2) on the process group our unreaped child leads (process_group(0)).
        unsafe {
            libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL);
        }
    }

    /// The end of the driver's stderr, for error messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(5)..].join(" / ");
        if tail.is_empty() {
            format!("nothing in {}", self.log.display())
        } else {
            format!("{} ends: {tail}", self.log.display())
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if !self.reaped {
            self.kill_group();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_lines_parse() {
        assert_eq!(
            parse(r#"{"unavailable": "Python package hyperqueue not installed"}"#).ok(),
            Some(Report::Unavailable("Python package hyperqueue not installed".into()))
        );
        assert_eq!(parse(r#"{"version": "0.27.0"}"#).ok(), Some(Report::Version("0.27.0".into())));
        assert_eq!(
            parse(r#"{"run": 1, "done": 2000, "secs": 2.5}"#).ok(),
            Some(Report::Run(Run { done: 2000, secs: 2.5 }))
        );
    }

    #[test]
    fn malformed_driver_lines_are_errors() {
        assert!(parse("Traceback (most recent call last):").is_err());
        assert!(parse(r#"{"run": 1, "done": 2000}"#).is_err());
        assert!(parse(r#"{"run": 1, "done": 2000, "secs": 0.0}"#).is_err());
    }
}
