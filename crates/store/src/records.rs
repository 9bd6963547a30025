//! Plain records that cross the [`crate::Store`] boundary.

use std::collections::BTreeMap;

use drover_core::{FailureClass, JobState, NodeState, TaskPlan, TaskState};

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    /// Job id.
    pub id: i64,
    /// Name from the job file.
    pub name: String,
    /// Owning project.
    pub project: String,
    /// Priority.
    pub priority: i32,
    /// Derived state.
    pub state: JobState,
    /// Whether a user cancelled it.
    pub cancelled: bool,
    /// When it was submitted.
    pub created_ms: i64,
    /// Sequence number of its latest event.
    pub last_seq: i64,
}

/// A task as stored, with what users want to see of its latest attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRecord {
    /// Task id.
    pub id: i64,
    /// Job id.
    pub job_id: i64,
    /// Task name.
    pub name: String,
    /// Frame of an array task.
    pub frame: Option<i64>,
    /// Current state.
    pub state: TaskState,
    /// Exit code of the latest ended attempt.
    pub exit_code: Option<i32>,
    /// How many attempts were made.
    pub attempts: u32,
    /// Name of the node of the latest attempt.
    pub node: Option<String>,
    /// Why it is in its state (retry reason, skip reason, failure).
    pub reason: String,
    /// Failure class of the latest failed attempt.
    pub failure: Option<FailureClass>,
    /// CPU seconds of the latest attempt.
    pub cpu_seconds: f64,
    /// Peak memory of the latest attempt.
    pub peak_memory: u64,
    /// When the latest attempt started running.
    pub started_ms: Option<i64>,
    /// When the task reached a final state.
    pub ended_ms: Option<i64>,
}

/// One line of `ps`.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSummary {
    /// Job id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// Project.
    pub project: String,
    /// State.
    pub state: JobState,
    /// Submit time.
    pub created_ms: i64,
    /// Number of tasks.
    pub total: u32,
    /// Tasks in a final state.
    pub done: u32,
    /// Tasks assigned or running.
    pub running: u32,
    /// Tasks that failed.
    pub failed: u32,
}

/// One event of a job's append-only history.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    /// Job id.
    pub job_id: i64,
    /// Sequence number within the job, from 1.
    pub seq: i64,
    /// When it happened.
    pub time_ms: i64,
    /// `job` or `task`.
    pub kind: String,
    /// Task id, 0 for job events.
    pub task_id: i64,
    /// Task name, empty for job events.
    pub task_name: String,
    /// Frame of an array task.
    pub frame: Option<i64>,
    /// The new state.
    pub state: String,
    /// Why, in words.
    pub message: String,
    /// Exit code, for ended attempts.
    pub exit_code: Option<i32>,
    /// Attempt number.
    pub attempt: u32,
    /// Node name, when a node is involved.
    pub node: String,
}

/// An attempt still on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenAttempt {
    /// Attempt id.
    pub attempt_id: i64,
    /// Node running it.
    pub node_id: i64,
}

/// What a node says about itself when it registers.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSpec {
    /// Stable name.
    pub name: String,
    /// Labels for constraints.
    pub labels: BTreeMap<String, String>,
    /// Cores it offers.
    pub cores: u32,
    /// Memory it offers, bytes.
    pub memory: u64,
    /// Runtimes it can run.
    pub runtimes: Vec<String>,
    /// Lease end for the new registration.
    pub lease_until_ms: i64,
}

/// The answer to a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeRegistration {
    /// The node's id (kept across re-registrations).
    pub node_id: i64,
    /// The new epoch.
    pub epoch: i64,
}

/// A node as stored, with its current reservations.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRecord {
    /// Node id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// State.
    pub state: NodeState,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Cores offered.
    pub cores: u32,
    /// Memory offered.
    pub memory: u64,
    /// Cores reserved by open attempts.
    pub cores_used: u32,
    /// Memory reserved by open attempts.
    pub memory_used: u64,
    /// Open attempts.
    pub running: u32,
    /// Last heartbeat.
    pub last_seen_ms: i64,
    /// Runtimes it offers.
    pub runtimes: Vec<String>,
}

/// A new attempt to send to a node.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// Attempt id.
    pub attempt_id: i64,
    /// Fencing epoch.
    pub epoch: i64,
    /// Attempt number of the task, from 1.
    pub number: u32,
    /// Node chosen.
    pub node_id: i64,
    /// Task id.
    pub task_id: i64,
    /// Job id.
    pub job_id: i64,
    /// What to run.
    pub plan: TaskPlan,
    /// The placed task this one stands in for, when that task was gone by the time of the
    /// claim (another replica took it) and an interchangeable queued task took its place.
    pub instead_of: Option<i64>,
}

/// An agent's report that an attempt ended.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AttemptReport {
    /// Attempt id.
    pub attempt_id: i64,
    /// Fencing epoch the agent holds.
    pub epoch: i64,
    /// Exit code of the last step run.
    pub exit_code: Option<i32>,
    /// Signal that killed it.
    pub signal: Option<i32>,
    /// Failure class, when not an ordinary exit.
    pub failure: Option<FailureClass>,
    /// Detail for people.
    pub message: String,
    /// CPU seconds used.
    pub cpu_seconds: f64,
    /// Peak memory used.
    pub peak_memory: u64,
    /// LLM input tokens the attempt's metering proxy counted (agent tasks), recorded in the
    /// same transaction as the end so that usage never lags the task's state.
    pub input_tokens: u64,
    /// LLM output tokens, likewise.
    pub output_tokens: u64,
}

/// A change of an attempt's state reported by its agent, as applied in batches by
/// [`crate::Store::apply_updates`].
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptUpdate {
    /// The attempt started running.
    Started {
        /// Attempt id.
        attempt_id: i64,
        /// Fencing epoch the agent holds.
        epoch: i64,
    },
    /// The attempt ended.
    Finished(AttemptReport),
}

impl AttemptUpdate {
    /// The attempt the update is about.
    pub fn attempt_id(&self) -> i64 {
        match self {
            AttemptUpdate::Started { attempt_id, .. } => *attempt_id,
            AttemptUpdate::Finished(r) => r.attempt_id,
        }
    }

    /// Whether the update ends the attempt.
    pub fn is_finished(&self) -> bool {
        matches!(self, AttemptUpdate::Finished(_))
    }
}

/// Whether a report was applied or ignored as stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Recorded.
    Applied,
    /// Ignored: the attempt is not the task's current one, already ended, or the epoch is old.
    Stale,
}

/// One line of output to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLine {
    /// Step index.
    pub step: u32,
    /// From stderr rather than stdout.
    pub stderr: bool,
    /// Bytes of the line.
    pub data: Vec<u8>,
}

/// A stored output line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// Line id, increasing.
    pub id: i64,
    /// Task id.
    pub task_id: i64,
    /// Task name.
    pub task_name: String,
    /// Frame.
    pub frame: Option<i64>,
    /// Attempt number.
    pub attempt: u32,
    /// Step.
    pub step: u32,
    /// From stderr.
    pub stderr: bool,
    /// Bytes.
    pub data: Vec<u8>,
}

/// Which tasks' output to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskFilter {
    /// Only this task name (all frames unless `frame` is set).
    pub name: Option<String>,
    /// Only this frame.
    pub frame: Option<i64>,
}

impl TaskFilter {
    /// Parses `name` or `name[frame]`; empty selects every task.
    pub fn parse(text: &str) -> Option<TaskFilter> {
        let text = text.trim();
        if text.is_empty() {
            return Some(TaskFilter::default());
        }
        match text.strip_suffix(']').and_then(|t| t.split_once('[')) {
            Some((name, frame)) => {
                Some(TaskFilter { name: Some(name.to_string()), frame: Some(frame.parse().ok()?) })
            }
            None => Some(TaskFilter { name: Some(text.to_string()), frame: None }),
        }
    }

    /// Whether a task matches.
    pub fn matches(&self, name: &str, frame: Option<i64>) -> bool {
        self.name.as_deref().is_none_or(|n| n == name) && (self.frame.is_none() || self.frame == frame)
    }
}

/// What changed in the queue since a cursor (see [`crate::Store::queue_changes`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueChanges {
    /// Where the next read resumes.
    pub cursor: i64,
    /// Tasks queued now, with what placement needs of them.
    pub queued: Vec<drover_core::schedule_state::QueueEntry>,
    /// Tasks no longer queued.
    pub left: Vec<i64>,
}
