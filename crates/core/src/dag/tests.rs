//! Incremental release checked against the rule it implements, stated the slow way.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use proptest::prelude::*;

use super::*;
use TaskState::*;

/// Runs a future whose every await is ready at once (the in-memory rows never wait).
fn ready<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
    }
}

/// The rule, recomputed from every task of the job until nothing changes: a waiting task is
/// queued once every frame of each dependency ended in a state that satisfies dependents, and
/// skipped as soon as one frame of a dependency ended in one that does not.
fn reference(tasks: &mut [Task]) {
    loop {
        let mut groups: BTreeMap<&str, (bool, bool)> = BTreeMap::new();
        for t in tasks.iter() {
            let g = groups.entry(t.name.as_str()).or_insert((true, false));
            g.0 &= t.state.is_final();
            g.1 |= t.state.is_final() && !t.state.satisfies_dependents();
        }
        let mut next = Vec::new();
        for (i, t) in tasks.iter().enumerate() {
            if t.state != Waiting {
                continue;
            }
            let blocked = t.deps.iter().any(|d| groups[d.as_str()].1);
            let ready = t.deps.iter().all(|d| groups[d.as_str()].0);
            if blocked {
                next.push((i, Skipped));
            } else if ready {
                next.push((i, Queued));
            }
        }
        if next.is_empty() {
            return;
        }
        for (i, s) in next {
            tasks[i].state = s;
        }
    }
}

#[derive(Debug, Clone)]
struct Task {
    id: i64,
    name: String,
    deps: Vec<String>,
    state: TaskState,
    deps_left: u32,
}

/// A job's dependency rows in memory, as a store keeps them.
struct Rows {
    tasks: Vec<Task>,
    groups: BTreeMap<String, DependencyGroup>,
}

impl Rows {
    fn new(tasks: Vec<Task>) -> Rows {
        let mut groups: BTreeMap<String, DependencyGroup> = BTreeMap::new();
        for t in &tasks {
            groups.entry(t.name.clone()).or_default().frames += 1;
        }
        Rows { tasks, groups }
    }
}

impl DependencyRows for Rows {
    type Error = std::convert::Infallible;

    async fn group(&mut self, name: &str) -> Result<DependencyGroup, Self::Error> {
        Ok(self.groups[name])
    }

    async fn save_group(&mut self, name: &str, group: &DependencyGroup) -> Result<(), Self::Error> {
        self.groups.insert(name.to_string(), *group);
        Ok(())
    }

    async fn waiting_on(&mut self, name: &str) -> Result<Vec<Dependent>, Self::Error> {
        Ok(self
            .tasks
            .iter()
            .filter(|t| t.state == Waiting && t.deps.iter().any(|d| d == name))
            .map(|t| Dependent { id: t.id, name: t.name.clone(), frame: None, deps_left: t.deps_left })
            .collect())
    }

    async fn save_dependent(&mut self, task: &Dependent, step: &DependentStep) -> Result<(), Self::Error> {
        let t = &mut self.tasks[task.id as usize];
        match step {
            DependentStep::Wait { deps_left } => t.deps_left = *deps_left,
            DependentStep::Release { state, .. } => t.state = *state,
        }
        Ok(())
    }
}

/// A random job: `names` task names, each with 1-3 frames, each depending on some earlier names.
fn job() -> impl Strategy<Value = Vec<Task>> {
    (1usize..8)
        .prop_flat_map(|names| {
            (
                proptest::collection::vec(1u32..4, names),
                proptest::collection::vec(proptest::collection::vec(any::<bool>(), names), names),
            )
        })
        .prop_map(|(frames, edges)| {
            let mut tasks = Vec::new();
            for (n, f) in frames.iter().enumerate() {
                let deps: Vec<String> = (0..n).filter(|&d| edges[n][d]).map(|d| format!("t{d}")).collect();
                for _ in 0..*f {
                    tasks.push(Task {
                        id: tasks.len() as i64,
                        name: format!("t{n}"),
                        deps_left: deps.len() as u32,
                        state: if deps.is_empty() { Queued } else { Waiting },
                        deps: deps.clone(),
                    });
                }
            }
            tasks
        })
}

proptest! {
    /// After every task's end, incremental release leaves each task in the state the rule
    /// gives; in the end every task is final, and a task whose dependency did not succeed is
    /// skipped without having run.
    #[test]
    fn incremental_release_follows_the_rule(
        tasks in job(),
        picks in proptest::collection::vec((any::<proptest::sample::Index>(), 0usize..5), 64),
    ) {
        let outcomes = [Succeeded, Warning, Failed, Skipped, Cancelled];
        let mut rows = Rows::new(tasks.clone());
        let mut model = tasks;
        let mut ran = vec![false; model.len()];
        for step in 0.. {
            let queued: Vec<usize> = (0..model.len()).filter(|&i| model[i].state == Queued).collect();
            if queued.is_empty() {
                break;
            }
            // Random picks first, then every task left succeeds in order.
            let (i, outcome) = match picks.get(step) {
                Some((pick, outcome)) => (queued[pick.index(queued.len())], *outcome),
                None => (queued[0], 0),
            };
            let end = outcomes[outcome];
            ran[i] = true;
            model[i].state = end;
            reference(&mut model);
            rows.tasks[i].state = end;
            let name = rows.tasks[i].name.clone();
            let released = ready(release_after(&mut rows, &name, end)).unwrap_or_else(|e| match e {});
            for r in &released {
                prop_assert!(r.state == Queued || r.state == Skipped);
            }
            let got: Vec<TaskState> = rows.tasks.iter().map(|t| t.state).collect();
            let want: Vec<TaskState> = model.iter().map(|t| t.state).collect();
            prop_assert_eq!(got, want);
        }
        for (i, t) in rows.tasks.iter().enumerate() {
            prop_assert!(t.state.is_final(), "task {} ended {}", i, t.state);
            let failed_dep = t.deps.iter().any(|d| {
                rows.tasks.iter().any(|o| &o.name == d && !o.state.satisfies_dependents())
            });
            if failed_dep {
                prop_assert_eq!(t.state, Skipped);
                prop_assert!(!ran[i]);
            }
        }
    }
}

#[test]
fn frames_gate_together_and_skips_cascade() {
    let mut g = DependencyGroup { frames: 2, ..Default::default() };
    assert_eq!(g.record_end(Succeeded), GroupNews::Nothing);
    assert_eq!(g.record_end(Warning), GroupNews::Satisfied);

    let mut g = DependencyGroup { frames: 3, ..Default::default() };
    assert_eq!(g.record_end(Failed), GroupNews::Blocked(Failed));
    assert_eq!(g.record_end(Succeeded), GroupNews::Nothing);
    assert_eq!(g.record_end(Cancelled), GroupNews::Nothing);

    let task = |id: i64, name: &str, deps: &[&str]| Task {
        id,
        name: name.into(),
        deps: deps.iter().map(|d| d.to_string()).collect(),
        state: if deps.is_empty() { Queued } else { Waiting },
        deps_left: deps.len() as u32,
    };
    let mut rows = Rows::new(vec![task(0, "a", &[]), task(1, "b", &["a"]), task(2, "c", &["b"])]);
    rows.tasks[0].state = Failed;
    let released = ready(release_after(&mut rows, "a", Failed)).unwrap_or_else(|e| match e {});
    assert_eq!(released.len(), 2);
    assert_eq!(released[0].reason, "dependency `a` ended failed");
    assert_eq!(released[1].reason, "dependency `b` ended skipped");
}
