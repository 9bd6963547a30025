//! Lifecycle states of tasks, jobs and nodes, and the classes of failure that retry policies name.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// Every value, in lifecycle order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The lowercase word used in the API, the store and the CLI.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownWord;
            fn from_str(s: &str) -> Result<Self, UnknownWord> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownWord { kind: stringify!($name), word: s.to_string() }),
                }
            }
        }
    };
}

/// A word that names no state or class.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} `{word}`")]
pub struct UnknownWord {
    /// Which vocabulary was searched.
    pub kind: &'static str,
    /// The word that matched nothing.
    pub word: String,
}

string_enum! {
    /// Where a task is in its life.
    TaskState {
        /// Waiting for its dependencies.
        Waiting => "waiting",
        /// Ready to be placed on a node.
        Queued => "queued",
        /// Placed on a node; the agent has not started it yet.
        Assigned => "assigned",
        /// Running on a node.
        Running => "running",
        /// Ended with exit code 0.
        Succeeded => "succeeded",
        /// Ended with a warning exit code; counts as done for dependents.
        Warning => "warning",
        /// Ended in failure, with no retry left.
        Failed => "failed",
        /// Skipped: its exit code said so, or a dependency did not succeed.
        Skipped => "skipped",
        /// Cancelled by a user.
        Cancelled => "cancelled",
    }
}

impl TaskState {
    /// Whether the task will never change state again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded
                | TaskState::Warning
                | TaskState::Failed
                | TaskState::Skipped
                | TaskState::Cancelled
        )
    }

    /// Whether dependents of a task in this state may run.
    pub fn satisfies_dependents(self) -> bool {
        matches!(self, TaskState::Succeeded | TaskState::Warning)
    }

    /// Whether the task holds (or is about to hold) resources on a node.
    pub fn is_on_node(self) -> bool {
        matches!(self, TaskState::Assigned | TaskState::Running)
    }
}

string_enum! {
    /// The state of a job, derived from its tasks.
    JobState {
        /// No task has started yet.
        Queued => "queued",
        /// Some task is placed or running, or some tasks are done and others still to do.
        Running => "running",
        /// Every task succeeded.
        Succeeded => "succeeded",
        /// Every task ended, none failed, and some ended with warnings or were skipped by exit code.
        Warning => "warning",
        /// Every task ended and at least one failed.
        Failed => "failed",
        /// The job was cancelled.
        Cancelled => "cancelled",
    }
}

impl JobState {
    /// Whether the job will never change state again.
    pub fn is_final(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }

    /// Whether a watcher should report success.
    pub fn is_success(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Warning)
    }

    /// Derives a job's state from its tasks' states and whether it was cancelled.
    pub fn derive(tasks: impl IntoIterator<Item = TaskState>, cancelled: bool) -> JobState {
        let (mut all_final, mut any_started, mut any_failed, mut any_warn, mut any) =
            (true, false, false, false, false);
        for t in tasks {
            any = true;
            all_final &= t.is_final();
            any_started |= !matches!(t, TaskState::Waiting | TaskState::Queued);
            any_failed |= t == TaskState::Failed;
            any_warn |= matches!(t, TaskState::Warning | TaskState::Skipped);
        }
        if cancelled && all_final {
            return JobState::Cancelled;
        }
        if !any || !all_final {
            return if any_started || cancelled { JobState::Running } else { JobState::Queued };
        }
        if any_failed {
            JobState::Failed
        } else if any_warn {
            JobState::Warning
        } else {
            JobState::Succeeded
        }
    }
}

string_enum! {
    /// Where a worker node is in its life.
    NodeState {
        /// Being started; not yet registered.
        Provisioning => "provisioning",
        /// Registered and taking work.
        Ready => "ready",
        /// Finishing its tasks; takes no new work.
        Draining => "draining",
        /// Silent past its lease; its tasks were handed back.
        Down => "down",
        /// Gone for good.
        Terminated => "terminated",
    }
}

string_enum! {
    /// Why an attempt failed; retry policies choose which classes they retry.
    FailureClass {
        /// The command exited with a code that means failure.
        Exit => "exit",
        /// The task ran past its timeout.
        Timeout => "timeout",
        /// The node running it went silent past its lease, or lost the task.
        Lost => "lost",
        /// The sandbox was killed for using more memory than its limit.
        Oom => "oom",
        /// The command could not be started at all (missing binary, bad workspace).
        Start => "start",
        /// The task spent its LLM token budget.
        Budget => "budget",
        /// A user cancelled it; never retried.
        Cancelled => "cancelled",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip() {
        for s in TaskState::ALL {
            assert_eq!(s.as_str().parse::<TaskState>().unwrap(), *s);
        }
        assert!("bogus".parse::<TaskState>().is_err());
    }

    #[test]
    fn job_state_derivation() {
        use TaskState::*;
        assert_eq!(JobState::derive([Queued, Waiting], false), JobState::Queued);
        assert_eq!(JobState::derive([Succeeded, Queued], false), JobState::Running);
        assert_eq!(JobState::derive([Succeeded, Warning], false), JobState::Warning);
        assert_eq!(JobState::derive([Succeeded, Failed, Skipped], false), JobState::Failed);
        assert_eq!(JobState::derive([Succeeded, Cancelled], true), JobState::Cancelled);
        assert_eq!(JobState::derive([Running], true), JobState::Running);
    }
}
