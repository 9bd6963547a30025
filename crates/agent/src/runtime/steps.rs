//! The step bookkeeping every runtime keeps: what it knows of each running (or attached) step,
//! found by the attempt and step a [`RunHandle`] names.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use super::{ExitStatus, RunHandle, RuntimeError, Usage};

/// How a step ended, and what it used.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Finished {
    /// Exit code, signal, OOM kill.
    pub status: ExitStatus,
    /// CPU time and peak memory over the whole step.
    pub usage: Usage,
}

/// The highest usage seen of a running step, so that the final usage is never below a live
/// reading (an end-of-step source can miss what a live one saw, like descendants never waited
/// for).
#[derive(Debug, Default)]
pub(crate) struct LiveMax {
    peak_bytes: AtomicU64,
    cpu_nanos: AtomicU64,
}

impl LiveMax {
    /// Takes in a reading; returns the highest usage seen so far.
    pub fn record(&self, usage: Usage) -> Usage {
        self.peak_bytes.fetch_max(usage.peak_memory_bytes, Ordering::Relaxed);
        self.cpu_nanos.fetch_max((usage.cpu_seconds * 1e9) as u64, Ordering::Relaxed);
        self.get()
    }

    /// The highest usage seen so far.
    pub fn get(&self) -> Usage {
        Usage {
            cpu_seconds: self.cpu_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            peak_memory_bytes: self.peak_bytes.load(Ordering::Relaxed),
        }
    }
}

/// The argv of step `step` of `task`, or a start error when there is none (or it is empty).
pub(crate) fn argv_of(task: &super::TaskSpec, step: usize) -> Result<&Vec<String>, RuntimeError> {
    task.steps.get(step).filter(|argv| !argv.is_empty()).ok_or_else(|| RuntimeError::Start {
        command: String::new(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("step {step} has no command")),
    })
}

/// Component-wise maximum of two readings of the same usage from different sources.
pub(crate) fn larger(a: Usage, b: Usage) -> Usage {
    Usage {
        cpu_seconds: a.cpu_seconds.max(b.cpu_seconds),
        peak_memory_bytes: a.peak_memory_bytes.max(b.peak_memory_bytes),
    }
}

/// Logs a step's end (the same event for every runtime; `sandbox` says what ran it, like
/// `pid 42` or `container drover-1`) and publishes it to the step's waiters.
pub(crate) fn publish_end(
    tx: &watch::Sender<Option<Finished>>,
    finished: Finished,
    attempt_id: i64,
    step: usize,
    sandbox: &str,
) {
    let Finished { status, usage } = finished;
    tracing::info!(
        attempt_id,
        step,
        sandbox,
        code = ?status.code,
        signal = ?status.signal,
        oom = status.oom,
        cpu_seconds = usage.cpu_seconds,
        peak_memory_bytes = usage.peak_memory_bytes,
        "step ended"
    );
    let _ = tx.send(Some(finished));
}

/// Waits until the step whose end `finished` publishes has ended; `what` names its watcher
/// in the error when that went away without a word.
pub(crate) async fn wait_finished(
    finished: &watch::Receiver<Option<Finished>>,
    what: &str,
) -> Result<Finished, RuntimeError> {
    let mut rx = finished.clone();
    let ended = rx.wait_for(Option::is_some).await.map_err(|_| RuntimeError::Io {
        context: format!("{what} ended without a result"),
        source: std::io::Error::other("supervisor task ended"),
    })?;
    // wait_for returned because the value is Some.
    Ok(ended.unwrap_or(Finished {
        status: ExitStatus { code: None, signal: None, oom: false },
        usage: Usage::default(),
    }))
}

/// Locks `mutex`, also after a panic elsewhere: runtimes update their maps with single inserts
/// and removes, so a poisoned lock still guards consistent data.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a runtime knows of its steps, by (attempt, step).
#[derive(Debug)]
pub(crate) struct StepTable<S> {
    steps: Mutex<HashMap<(i64, usize), Arc<S>>>,
}

impl<S> Default for StepTable<S> {
    fn default() -> Self {
        StepTable { steps: Mutex::new(HashMap::new()) }
    }
}

impl<S> StepTable<S> {
    /// The step `handle` names, or [`RuntimeError::UnknownHandle`].
    pub fn get(&self, handle: &RunHandle) -> Result<Arc<S>, RuntimeError> {
        lock(&self.steps)
            .get(&(handle.attempt_id, handle.step))
            .cloned()
            .ok_or(RuntimeError::UnknownHandle { attempt_id: handle.attempt_id, step: handle.step })
    }

    /// Records step `step` of `attempt_id`, replacing what was known of it.
    pub fn insert(&self, attempt_id: i64, step: usize, state: Arc<S>) {
        lock(&self.steps).insert((attempt_id, step), state);
    }

    /// Forgets every step of `attempt_id` and returns them.
    pub fn take_attempt(&self, attempt_id: i64) -> Vec<Arc<S>> {
        let mut steps = lock(&self.steps);
        let keys: Vec<_> = steps.keys().filter(|(a, _)| *a == attempt_id).copied().collect();
        keys.iter().filter_map(|k| steps.remove(k)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(attempt_id: i64, step: usize) -> RunHandle {
        RunHandle { attempt_id, step, pid: None, pid_start_ticks: None, sandbox_id: None }
    }

    #[test]
    fn steps_are_found_by_handle_and_forgotten_by_attempt() {
        let table = StepTable::default();
        table.insert(1, 0, Arc::new("a"));
        table.insert(1, 1, Arc::new("b"));
        table.insert(2, 0, Arc::new("c"));
        assert_eq!(*table.get(&handle(1, 1)).expect("known"), "b");
        assert!(matches!(
            table.get(&handle(3, 0)),
            Err(RuntimeError::UnknownHandle { attempt_id: 3, step: 0 })
        ));
        let mut taken: Vec<&str> = table.take_attempt(1).iter().map(|s| **s).collect();
        taken.sort();
        assert_eq!(taken, ["a", "b"]);
        assert!(table.get(&handle(1, 0)).is_err());
        assert!(table.get(&handle(2, 0)).is_ok());
    }
}
