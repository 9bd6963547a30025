//! Deadlines for an attempt's setup: placing its inputs, loading its image, checking out its
//! repository, starting its sandbox and services. Each phase gets at most [`PHASE_TIMEOUT`]
//! (or the task's `setup_timeout`), all of them inside the task's own timeout, and each ends at once when the attempt is
//! stopped: a download that never finishes or a service that never gets healthy ends the
//! attempt with its reason instead of holding the node's room forever.

use std::future::Future;
use std::time::Duration;

use drover_core::FailureClass;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::attempt::StopReason;

/// The longest one setup phase may take when the task sets no `setup_timeout`, whatever its
/// timeout.
pub const PHASE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// How an attempt's setup ended early: the failure class and the reason reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupEnd {
    /// `timeout`, `start`, `cancelled` or `lost`.
    pub failure: FailureClass,
    /// Says which phase and why.
    pub message: String,
}

/// When the task's time runs out: its timeout counts from the attempt's start, setup
/// included.
#[derive(Debug, Clone, Copy)]
pub struct TaskClock {
    /// The task's timeout, for messages.
    pub timeout: Option<Duration>,
    /// When it runs out.
    pub deadline: Option<Instant>,
    /// The longest one setup phase may take.
    pub phase_limit: Duration,
}

impl TaskClock {
    /// The clock of an attempt starting now, each setup phase limited to [`PHASE_TIMEOUT`].
    pub fn starting_now(timeout: Option<Duration>) -> TaskClock {
        TaskClock { timeout, deadline: timeout.map(|t| Instant::now() + t), phase_limit: PHASE_TIMEOUT }
    }

    /// The same clock with each setup phase limited to `limit` (the task's `setup_timeout`)
    /// instead, when there is one.
    pub fn with_phase_limit(self, limit: Option<Duration>) -> TaskClock {
        TaskClock { phase_limit: limit.unwrap_or(self.phase_limit), ..self }
    }
}

/// Runs one setup phase (`doing`, as in "placing its inputs") to its end, or ends it at the
/// first of: the task's deadline, the phase's own deadline, a stop of the attempt.
pub async fn bounded<T>(
    doing: &str,
    clock: TaskClock,
    stop: &mut watch::Receiver<StopReason>,
    phase: impl Future<Output = T>,
) -> Result<T, SetupEnd> {
    let phase_deadline = Instant::now() + clock.phase_limit;
    let (deadline, task_runs_out) = match clock.deadline {
        Some(task) if task <= phase_deadline => (task, true),
        _ => (phase_deadline, false),
    };
    tokio::select! {
        done = phase => Ok(done),
        _ = tokio::time::sleep_until(deadline) => Err(if task_runs_out {
            let t = clock.timeout.map(|t| humantime::format_duration(t).to_string()).unwrap_or_default();
            SetupEnd { failure: FailureClass::Timeout, message: format!("ran past its timeout of {t} while {doing}") }
        } else {
            SetupEnd {
                failure: FailureClass::Start,
                message: format!("{doing} took longer than {}", humantime::format_duration(clock.phase_limit)),
            }
        }),
        reason = stopped(stop) => Err(match reason {
            StopReason::LeaseLost => SetupEnd { failure: FailureClass::Lost, message: format!("the node's lease ran out while {doing}") },
            _ => SetupEnd { failure: FailureClass::Cancelled, message: format!("cancelled while {doing}") },
        }),
    }
}

/// Resolves once the attempt is asked to stop; never when its sender is gone without asking.
async fn stopped(stop: &mut watch::Receiver<StopReason>) -> StopReason {
    loop {
        let reason = *stop.borrow_and_update();
        if reason != StopReason::None {
            return reason;
        }
        if stop.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_phase_ends_at_the_tasks_deadline_with_the_phase_named() {
        let (_tx, mut stop) = watch::channel(StopReason::None);
        let clock = TaskClock::starting_now(Some(Duration::from_secs(3)));
        let end = bounded("placing its inputs", clock, &mut stop, std::future::pending::<()>()).await;
        assert_eq!(
            end,
            Err(SetupEnd {
                failure: FailureClass::Timeout,
                message: "ran past its timeout of 3s while placing its inputs".into()
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_phase_without_a_task_timeout_still_ends() {
        let (_tx, mut stop) = watch::channel(StopReason::None);
        let clock = TaskClock::starting_now(None);
        let end = bounded("loading its image", clock, &mut stop, std::future::pending::<()>()).await;
        let end = end.unwrap_err();
        assert_eq!(end.failure, FailureClass::Start);
        assert_eq!(end.message, "loading its image took longer than 15m");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_ends_a_phase_at_once_and_a_finished_phase_returns_its_result() {
        let (tx, mut stop) = watch::channel(StopReason::None);
        let clock = TaskClock::starting_now(Some(Duration::from_secs(3600)));
        assert_eq!(bounded("x", clock, &mut stop, async { 7 }).await, Ok(7));
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            tx.send(StopReason::Cancel).unwrap();
            tx
        });
        let began = Instant::now();
        let end =
            bounded("checking out its repository", clock, &mut stop, std::future::pending::<()>()).await;
        assert_eq!(end.unwrap_err().message, "cancelled while checking out its repository");
        assert_eq!(began.elapsed(), Duration::from_secs(1));
        let tx = stopper.await.unwrap();
        tx.send(StopReason::LeaseLost).unwrap();
        let end = bounded("starting its services", clock, &mut stop, std::future::pending::<()>()).await;
        assert_eq!(end.unwrap_err().failure, FailureClass::Lost);
    }
}
