//! The step bookkeeping every runtime keeps: what it knows of each running (or attached) step,
//! found by the attempt and step a [`RunHandle`] names.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{RunHandle, RuntimeError};

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
