//! Dependency gating: which waiting tasks may be queued, and which must be skipped because a
//! dependency did not succeed. A dependency on a name covers every frame of that task.

use std::collections::BTreeMap;

use crate::state::TaskState;

/// A task as the gate sees it.
#[derive(Debug, Clone)]
pub struct GateTask<'a> {
    /// Task name (shared by all frames of an array task).
    pub name: &'a str,
    /// Current state.
    pub state: TaskState,
    /// Names this task depends on.
    pub depends_on: &'a [String],
}

/// A state change decided by [`release`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// Index into the slice given to [`release`].
    pub index: usize,
    /// `Queued`, or `Skipped` when a dependency did not succeed.
    pub state: TaskState,
    /// Why it was skipped; empty when queued.
    pub reason: String,
}

/// Decides the new state of every waiting task whose dependencies have all ended, cascading
/// skips down the graph (a task skipped here skips its own dependents too).
pub fn release(tasks: &[GateTask<'_>]) -> Vec<Release> {
    let mut states: Vec<TaskState> = tasks.iter().map(|t| t.state).collect();
    let mut out = Vec::new();
    loop {
        // Per name: (all frames final, first frame that did not succeed).
        let mut groups: BTreeMap<&str, (bool, Option<TaskState>)> = BTreeMap::new();
        for (t, s) in tasks.iter().zip(&states) {
            let g = groups.entry(t.name).or_insert((true, None));
            g.0 &= s.is_final();
            if s.is_final() && !s.satisfies_dependents() && g.1.is_none() {
                g.1 = Some(*s);
            }
        }
        let mut changed = false;
        for (i, t) in tasks.iter().enumerate() {
            if states[i] != TaskState::Waiting {
                continue;
            }
            let mut ready = true;
            let mut blocked = None;
            for d in t.depends_on {
                match groups.get(d.as_str()) {
                    Some((_, Some(bad))) => {
                        blocked = Some(format!("dependency `{d}` ended {bad}"));
                        break;
                    }
                    Some((true, None)) => {}
                    _ => ready = false,
                }
            }
            let decided = match blocked {
                Some(reason) => Some((TaskState::Skipped, reason)),
                None if ready => Some((TaskState::Queued, String::new())),
                None => None,
            };
            if let Some((state, reason)) = decided {
                states[i] = state;
                out.push(Release { index: i, state, reason });
                changed = true;
            }
        }
        if !changed {
            return out;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TaskState::*;

    #[test]
    fn queues_when_all_frames_done_and_cascades_skips() {
        let a = vec![];
        let dep_a = vec!["a".to_string()];
        let dep_b = vec!["b".to_string()];
        let tasks = vec![
            GateTask { name: "a", state: Succeeded, depends_on: &a },
            GateTask { name: "a", state: Running, depends_on: &a },
            GateTask { name: "b", state: Waiting, depends_on: &dep_a },
        ];
        assert!(release(&tasks).is_empty());

        let tasks = vec![
            GateTask { name: "a", state: Succeeded, depends_on: &a },
            GateTask { name: "a", state: Warning, depends_on: &a },
            GateTask { name: "b", state: Waiting, depends_on: &dep_a },
        ];
        assert_eq!(release(&tasks), vec![Release { index: 2, state: Queued, reason: String::new() }]);

        let tasks = vec![
            GateTask { name: "a", state: Failed, depends_on: &a },
            GateTask { name: "b", state: Waiting, depends_on: &dep_a },
            GateTask { name: "c", state: Waiting, depends_on: &dep_b },
        ];
        let r = release(&tasks);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].state, Skipped);
        assert!(r[0].reason.contains("`a` ended failed"));
        assert!(r[1].reason.contains("`b` ended skipped"));
    }
}
