//! Runtimes run a task's commands inside a sandbox. Every runtime (process, docker, microvm)
//! implements the same [`Runtime`] trait, and one conformance suite runs against each.
//!
//! The agent drives a task through `prepare` → for each step `start` + `wait` → `cleanup`, and
//! calls `signal` to stop it on timeout or cancel (see [`stop_gracefully`]). A [`RunHandle`] is
//! plain data that the agent can persist, so that after a restart `attach` can find a step that
//! is still running.

/// The environment of a step: `base` (what the runtime itself sets), then the task's variables,
/// then its secrets; a later layer wins over an earlier one. The one rule every runtime
/// follows, so a secret reaches a process task exactly as it reaches a container.
pub(crate) fn layered_env(base: Vec<(String, String)>, task: &TaskSpec) -> Vec<(String, String)> {
    let overridden = |k: &str| task.env.contains_key(k) || task.secrets.contains_key(k);
    let mut env: Vec<(String, String)> = base.into_iter().filter(|(k, _)| !overridden(k)).collect();
    env.extend(
        task.env.iter().filter(|(k, _)| !task.secrets.contains_key(*k)).map(|(k, v)| (k.clone(), v.clone())),
    );
    env.extend(task.secrets.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

mod cgroup_read;
#[cfg(test)]
pub mod conformance;
pub mod docker;
mod lines;
pub mod microvm;
pub mod process;
mod steps;
pub mod uids;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use drover_core::{NetworkPolicy, ServiceSpec};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Longest line shipped as one chunk; longer lines are split so nothing is lost.
pub const MAX_LINE: usize = 64 * 1024;

/// Everything a runtime needs to run one attempt of a task.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Job the task belongs to.
    pub job_id: i64,
    /// Task id.
    pub task_id: i64,
    /// Attempt id; unique across all attempts of all tasks.
    pub attempt_id: i64,
    /// The argv of each step, run in order.
    pub steps: Vec<Vec<String>>,
    /// Environment variables for every step (added to a minimal base environment).
    pub env: BTreeMap<String, String>,
    /// Directory the steps run in; created by `prepare`.
    pub workspace: PathBuf,
    /// Host CPU ids reserved for the task; the sandbox is pinned to them. Empty = no pinning.
    pub cpus: Vec<usize>,
    /// Memory limit in bytes; 0 = none.
    pub memory_limit: u64,
    /// Most processes and threads; 0 = the runtime's default.
    #[serde(default)]
    pub pids_limit: u64,
    /// Whether the task's project lets its containers run as root; a container runtime
    /// refuses `user: root` (of the task or a service) without it.
    #[serde(default)]
    pub allow_root: bool,
    /// Image for the container and VM runtimes: a local image reference or `sha256:` digest.
    #[serde(default)]
    pub image: Option<String>,
    /// User to run as inside the sandbox; runtimes pick an unprivileged default.
    #[serde(default)]
    pub user: Option<String>,
    /// What the sandbox may reach over the network.
    #[serde(default)]
    pub network: NetworkPolicy,
    /// Side containers to start (healthy) before the first step and remove after the task.
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    /// Secret values by variable name: added to the environment like `env`, and masked in
    /// the output the agent ships.
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
    /// Host endpoints the sandbox must reach even without network; the runtime makes each
    /// reachable and sets env `DROVER_HOST_<NAME uppercased>` to the `host:port` at which the
    /// sandbox reaches it.
    #[serde(default)]
    pub host_ports: Vec<HostPort>,
    /// The task's limit for each setup phase, when it sets one (see
    /// [`crate::setup::PHASE_TIMEOUT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup_timeout: Option<std::time::Duration>,
}

/// A host endpoint a sandbox must reach (see [`TaskSpec::host_ports`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPort {
    /// Name; the sandbox finds the endpoint in `DROVER_HOST_<NAME uppercased>`.
    pub name: String,
    /// Where the endpoint listens on the host.
    pub addr: std::net::SocketAddr,
}

impl HostPort {
    /// The variable that tells the sandbox where it reaches this endpoint: `DROVER_HOST_` and
    /// the name uppercased, with anything but ASCII letters and digits turned into `_`.
    pub fn env_var(&self) -> String {
        let name: String = self
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' })
            .collect();
        format!("DROVER_HOST_{name}")
    }
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One line of output (or a piece of a line longer than [`MAX_LINE`]), newline included when
/// the line had one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    /// Which stream.
    pub stream: Stream,
    /// Which step (0-based) wrote it.
    pub step: usize,
    /// The bytes.
    pub data: Vec<u8>,
    /// Where in the step's output file of this stream the bytes end, for a runtime whose
    /// steps write their output to files that a restarted agent reads on (see
    /// [`crate::reach`]); `None` for the others.
    pub end: Option<u64>,
}

/// Where a runtime sends output. Bounded, so a slow consumer slows the reader instead of
/// growing memory without limit.
pub type OutputSink = mpsc::Sender<OutputChunk>;

/// Identifies a running step so that it can be signalled, waited on, measured, and found again
/// after an agent restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunHandle {
    /// Attempt the step belongs to.
    pub attempt_id: i64,
    /// Step index.
    pub step: usize,
    /// Process id of the step's leader (process runtime), or of the container's init.
    pub pid: Option<i32>,
    /// Start time of `pid` in clock ticks since boot (from `/proc/PID/stat`), so that a reused
    /// pid is never mistaken for ours.
    pub pid_start_ticks: Option<u64>,
    /// Container or VM id for the runtimes that have one.
    pub sandbox_id: Option<String>,
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, when the step exited normally.
    pub code: Option<i32>,
    /// Signal number, when the step was killed by a signal.
    pub signal: Option<i32>,
    /// Whether the sandbox's memory limit killed it.
    pub oom: bool,
}

impl ExitStatus {
    /// Whether the step exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// What a step used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// User plus system CPU time, in seconds.
    pub cpu_seconds: f64,
    /// Peak resident memory, in bytes.
    pub peak_memory_bytes: u64,
}

impl Usage {
    /// Combines the usage of two steps: CPU adds up, peak memory is the larger.
    pub fn merge(self, other: Usage) -> Usage {
        Usage {
            cpu_seconds: self.cpu_seconds + other.cpu_seconds,
            peak_memory_bytes: self.peak_memory_bytes.max(other.peak_memory_bytes),
        }
    }
}

/// A signal the agent sends to a running step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// Ask politely (SIGTERM).
    Terminate,
    /// Force (SIGKILL).
    Kill,
}

/// Errors of runtimes.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The command could not be started (missing binary, permission denied, bad workspace).
    #[error("cannot start `{command}`: {source}")]
    Start {
        /// The program that failed to start.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// The handle names nothing this runtime runs.
    #[error("no running step for attempt {attempt_id} step {step}")]
    UnknownHandle {
        /// Attempt id of the handle.
        attempt_id: i64,
        /// Step of the handle.
        step: usize,
    },
    /// The runtime cannot run on this node (missing engine, missing kernel support).
    #[error("runtime {runtime} is unavailable: {reason}")]
    Unavailable {
        /// Runtime name.
        runtime: &'static str,
        /// Why.
        reason: String,
    },
    /// A limit the task asked for cannot be enforced here; the task does not run without it.
    #[error("{0}")]
    Limit(String),
    /// An I/O error in the runtime's own work (workspace, /proc, pipes).
    #[error("{context}: {source}")]
    Io {
        /// What the runtime was doing.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

/// A sandbox technology. Implementations keep their live state (child processes, containers)
/// internally, keyed by [`RunHandle`].
#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// Short name: `process`, `docker` or `microvm`.
    fn kind(&self) -> &'static str;

    /// Prepares the sandbox for an attempt: workspace, container, VM.
    async fn prepare(&self, task: &TaskSpec) -> Result<(), RuntimeError>;

    /// Starts step `step` of the task; output goes to `out` line by line.
    async fn start(&self, task: &TaskSpec, step: usize, out: OutputSink) -> Result<RunHandle, RuntimeError>;

    /// Finds a step started before an agent restart. Returns `false` if it can no longer be
    /// followed. A runtime that keeps the exit status of a step that ended while no agent ran
    /// (Docker keeps it with the exec) returns `true`, and `wait` then reports that status.
    /// `from` says where in the step's (stdout, stderr) output files to read on, for a runtime
    /// whose chunks say where they end (see [`OutputChunk::end`]); the others ignore it.
    async fn attach(
        &self,
        handle: &RunHandle,
        out: OutputSink,
        from: (u64, u64),
    ) -> Result<bool, RuntimeError>;

    /// Sends a signal to everything the step started (the whole process group or container).
    async fn signal(&self, handle: &RunHandle, signal: StopSignal) -> Result<(), RuntimeError>;

    /// Waits until the step ends. Output has been fully sent to the sink when this returns.
    async fn wait(&self, handle: &RunHandle) -> Result<ExitStatus, RuntimeError>;

    /// Resources the step used so far (or in total, once it ended).
    async fn stats(&self, handle: &RunHandle) -> Result<Usage, RuntimeError>;

    /// Removes what `prepare` and `start` left behind, except the workspace's declared outputs.
    async fn cleanup(&self, task: &TaskSpec) -> Result<(), RuntimeError>;

    /// Whether its chunks say where they end in the step's output files, which `attach`
    /// reads on from (see [`crate::reach`]).
    fn output_has_offsets(&self) -> bool {
        false
    }

    /// Sends again the output of an earlier step of an attempt, which ended, from `from`
    /// (stdout, stderr offsets) to the end of its files, standard output first; returns once
    /// all of it was sent. For a runtime whose output says where it ends: a restarted agent
    /// rebuilds from it what the earlier run held in memory and had not shipped (see
    /// [`crate::reach`]). `Ok(false)` when the step's output is not kept (the default).
    async fn replay(
        &self,
        _attempt_id: i64,
        _step: usize,
        _from: (u64, u64),
        _out: OutputSink,
    ) -> Result<bool, RuntimeError> {
        Ok(false)
    }

    /// Sandboxes booted ahead of tasks, idle, per image; reported to the server for placement.
    fn warm_counts(&self) -> BTreeMap<String, u32> {
        BTreeMap::new()
    }
}

/// Stops a running step: `Terminate`, then `Kill` if it is still running after `grace`.
/// Returns how the step ended.
pub async fn stop_gracefully(
    runtime: &dyn Runtime,
    handle: &RunHandle,
    grace: Duration,
) -> Result<ExitStatus, RuntimeError> {
    runtime.signal(handle, StopSignal::Terminate).await?;
    match tokio::time::timeout(grace, runtime.wait(handle)).await {
        Ok(status) => status,
        Err(_) => {
            runtime.signal(handle, StopSignal::Kill).await?;
            runtime.wait(handle).await
        }
    }
}
