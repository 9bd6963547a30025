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
/// A cancelled job never retries, and none of its attempts that ends after the cancel
/// succeeds: the agent may have run it to its end while the cancel could not reach it (its
/// node was cut off), and a user who cancelled must not find it `succeeded`.
pub fn settle(plan: &TaskPlan, attempt: u32, end: AttemptEnd, job_cancelled: bool) -> Settlement {
    if job_cancelled && end.failure.is_none() {
        let how = match end.exit_code {
            Some(code) => format!("exit code {code}"),
            None => "a signal".to_string(),
        };
        return final_state(
            TaskState::Cancelled,
            format!("cancelled; its attempt ended with {how} after the cancel"),
        );
    }
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

/// Everything the store writes to a task whose attempt ended, decided here so that every
/// store persists the same thing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSettled {
    /// The task's new state: final, or `Queued` for a retry.
    pub state: TaskState,
    /// Why, in words: the settlement's reason with the attempt's own message after it.
    pub reason: String,
    /// Earliest time of the next attempt (0 when the task is final).
    pub not_before_ms: i64,
    /// When the task ended, if it did.
    pub ended_ms: Option<i64>,
    /// The class of the attempt's failure, if it failed (an exit code that means warning or
    /// skip is not a failure).
    pub failure: Option<FailureClass>,
}

/// Settles attempt number `attempt` of `plan` that ended as `end` with the agent's `message`,
/// at `now_ms`: [`settle`] plus the fields the store records.
pub fn settle_task(
    plan: &TaskPlan,
    attempt: u32,
    end: AttemptEnd,
    message: &str,
    job_cancelled: bool,
    now_ms: i64,
) -> TaskSettled {
    // The class `settle` retried or failed on; none when the code means success, warning or skip.
    let failure = end.failure.or(match end.exit_code {
        Some(0) => None,
        Some(c) if plan.exit_codes.warning.contains(&c) || plan.exit_codes.skip.contains(&c) => None,
        Some(_) | None => Some(FailureClass::Exit),
    });
    let (state, reason, not_before_ms, ended_ms) = match settle(plan, attempt, end, job_cancelled) {
        Settlement::Final { state, reason } => (state, reason, 0, Some(now_ms)),
        Settlement::Retry { after, reason } => {
            let after = i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
            (TaskState::Queued, reason, now_ms.saturating_add(after), None)
        }
    };
    let reason = match (reason.is_empty(), message.is_empty()) {
        (_, true) => reason,
        (true, false) => message.to_string(),
        (false, false) => format!("{reason} ({message})"),
    };
    TaskSettled { state, reason, not_before_ms, ended_ms, failure }
}

fn final_state(state: TaskState, reason: String) -> Settlement {
    Settlement::Final { state, reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Command, ExitCodes, RetryPolicy};
    use crate::resources::Resources;
    use proptest::prelude::*;

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

    fn class() -> impl Strategy<Value = FailureClass> {
        proptest::sample::select(FailureClass::ALL.to_vec())
    }

    proptest! {
        /// Attempts of a task, each ending at random, reach exactly one final state within
        /// `count + 1` attempts; a retry happens only for a class the policy names, never for a
        /// cancelled job or class, and only while retries are left.
        #[test]
        fn every_task_ends_once(
            count in 0u32..4,
            on in proptest::collection::btree_set(class(), 0..4),
            ends in proptest::collection::vec((proptest::option::of(-2i32..50), proptest::option::of(class())), 8),
            cancelled in any::<bool>(),
        ) {
            let mut p = plan(count);
            p.retries.on = on.clone();
            let mut finals = 0;
            for (n, (code, failure)) in ends.iter().enumerate() {
                let attempt = n as u32 + 1;
                let end = AttemptEnd { exit_code: *code, failure: *failure };
                let got = settle_task(&p, attempt, end, "msg", cancelled, 1_000);
                prop_assert!(got.reason.ends_with("msg") || got.reason.ends_with("(msg)"));
                if got.state.is_final() {
                    prop_assert_eq!(got.ended_ms, Some(1_000));
                    prop_assert_eq!(got.not_before_ms, 0);
                    finals += 1;
                    break;
                }
                prop_assert_eq!(got.state, TaskState::Queued);
                prop_assert!(attempt <= count, "retried past the count");
                prop_assert!(!cancelled && got.failure != Some(FailureClass::Cancelled));
                prop_assert!(got.failure.is_some_and(|c| on.contains(&c)));
                prop_assert!(got.not_before_ms >= 1_000 && got.ended_ms.is_none());
            }
            if ends.len() as u32 > count {
                prop_assert_eq!(finals, 1);
            }
        }
    }

    #[test]
    fn an_attempt_of_a_cancelled_job_never_succeeds() {
        let mut p = plan(0);
        p.exit_codes.warning = vec![3];
        for code in [Some(0), Some(3), Some(1), None] {
            let got = settle_task(&p, 1, AttemptEnd { exit_code: code, failure: None }, "", true, 5);
            assert_eq!(got.state, TaskState::Cancelled, "{code:?}");
            assert!(got.reason.starts_with("cancelled; its attempt ended with"), "{}", got.reason);
        }
        let got = settle_task(&p, 1, AttemptEnd { exit_code: Some(0), failure: None }, "", false, 5);
        assert_eq!(got.state, TaskState::Succeeded);
    }

    #[test]
    fn cancel_never_retries() {
        let p = plan(5);
        let lost = AttemptEnd { exit_code: None, failure: Some(FailureClass::Lost) };
        assert!(matches!(settle(&p, 1, lost, true), Settlement::Final { state: TaskState::Cancelled, .. }));
        assert!(matches!(settle(&p, 1, lost, false), Settlement::Retry { .. }));
    }
}
