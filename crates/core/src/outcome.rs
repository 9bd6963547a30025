//! What an attempt's end means for its task: a final state, or a retry after a delay.
//! Pure, so the store applies the same rules on every backend.

use std::time::Duration;

use crate::job::TaskPlan;
use crate::state::{FailureClass, TaskState};

/// How an attempt ended, as the agent (or the lease reaper) reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptEnd {
    /// Exit code, when the last step exited on its own.
    pub exit_code: Option<i32>,
    /// Set when the attempt failed for a reason other than its exit code.
    pub failure: Option<FailureClass>,
}

/// The verdict for the task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// The task is done, in this state.
    Final {
        /// The final state.
        state: TaskState,
        /// Why, when the state alone does not say it.
        reason: String,
    },
    /// Queue the task again once `after` has passed.
    Retry {
        /// Backoff before the next attempt.
        after: Duration,
        /// Why it is retried.
        reason: String,
    },
}

/// Decides what follows attempt number `attempt` (1-based) of `plan` ending as `end`.
/// A cancelled job never retries.
pub fn settle(plan: &TaskPlan, attempt: u32, end: AttemptEnd, job_cancelled: bool) -> Settlement {
    let class = match (end.failure, end.exit_code) {
        (Some(class), _) => class,
        (None, Some(0)) => return final_state(TaskState::Succeeded, String::new()),
        (None, Some(code)) if plan.exit_codes.warning.contains(&code) => {
            return final_state(TaskState::Warning, format!("exit code {code} means warning"));
        }
        (None, Some(code)) if plan.exit_codes.skip.contains(&code) => {
            return final_state(TaskState::Skipped, format!("exit code {code} means skipped"));
        }
        (None, _) => FailureClass::Exit,
    };
    let what = match (class, end.exit_code) {
        (FailureClass::Exit, Some(code)) => format!("exit code {code}"),
        (FailureClass::Exit, None) => "killed by a signal".to_string(),
        (FailureClass::Timeout, _) => match plan.timeout {
            Some(t) => format!("timed out after {}", humantime::format_duration(t)),
            None => "timed out".to_string(),
        },
        (FailureClass::Lost, _) => "node lost".to_string(),
        (FailureClass::Oom, _) => "out of memory".to_string(),
        (FailureClass::Start, _) => "could not start".to_string(),
        (FailureClass::Budget, _) => "token budget spent".to_string(),
        (FailureClass::Cancelled, _) => "cancelled".to_string(),
    };
    if class == FailureClass::Cancelled || job_cancelled {
        return final_state(TaskState::Cancelled, what);
    }
    if plan.retries.retries(class, attempt) {
        let after = plan.retries.delay(attempt);
        return Settlement::Retry {
            after,
            reason: format!(
                "{what}; retry {attempt} of {} in {}",
                plan.retries.count,
                humantime::format_duration(after)
            ),
        };
    }
    let reason = if plan.retries.count > 0 && plan.retries.on.contains(&class) {
        format!("{what}; no retries left")
    } else {
        what
    };
    final_state(TaskState::Failed, reason)
}

fn final_state(state: TaskState, reason: String) -> Settlement {
    Settlement::Final { state, reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Command, ExitCodes, RetryPolicy};
    use crate::resources::Resources;

    fn plan(count: u32) -> TaskPlan {
        TaskPlan {
            name: "t".into(),
            frame: None,
            steps: vec![Command::Shell("true".into())],
            env: Default::default(),
            resources: Resources::default(),
            timeout: None,
            retries: RetryPolicy { count, backoff: Duration::from_secs(1), ..Default::default() },
            depends_on: vec![],
            exit_codes: ExitCodes::default(),
            constraints: Default::default(),
            ..TaskPlan::default()
        }
    }

    fn exit(code: i32) -> AttemptEnd {
        AttemptEnd { exit_code: Some(code), failure: None }
    }

    #[test]
    fn exit_codes_map_to_states() {
        let p = plan(0);
        assert!(matches!(
            settle(&p, 1, exit(0), false),
            Settlement::Final { state: TaskState::Succeeded, .. }
        ));
        assert!(matches!(
            settle(&p, 1, exit(42), false),
            Settlement::Final { state: TaskState::Warning, .. }
        ));
        assert!(matches!(
            settle(&p, 1, exit(43), false),
            Settlement::Final { state: TaskState::Skipped, .. }
        ));
        assert!(matches!(settle(&p, 1, exit(1), false), Settlement::Final { state: TaskState::Failed, .. }));
    }

    #[test]
    fn retries_until_count_then_fails() {
        let p = plan(2);
        assert!(matches!(settle(&p, 1, exit(1), false), Settlement::Retry { .. }));
        assert!(matches!(settle(&p, 2, exit(1), false), Settlement::Retry { .. }));
        match settle(&p, 3, exit(1), false) {
            Settlement::Final { state, reason } => {
                assert_eq!(state, TaskState::Failed);
                assert!(reason.contains("no retries left"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cancel_never_retries() {
        let p = plan(5);
        let lost = AttemptEnd { exit_code: None, failure: Some(FailureClass::Lost) };
        assert!(matches!(settle(&p, 1, lost, true), Settlement::Final { state: TaskState::Cancelled, .. }));
        assert!(matches!(settle(&p, 1, lost, false), Settlement::Retry { .. }));
    }
}
