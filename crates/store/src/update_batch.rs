//! A batch of attempt updates decided in memory, so that a store applies the whole batch
//! with a fixed number of statements instead of several per update.
//!
//! The store reads every attempt the batch names (with its task's name and frame) and, in
//! the same read, the facts that settling needs of each finished attempt's task.
//! [`decide`] then walks the updates in order, as if applying them one after the other: an
//! update of an attempt that is no longer open and current, or of another epoch, is stale,
//! and an attempt a finish ended earlier in the batch is ended for the updates after it.
//! What it returns is written set by set: every start, then every finish, then the
//! dependents of tasks that reached a final state, then events and job states.
//!
//! Writing starts before finishes gives the same rows as the order of the batch: an attempt
//! that starts and finishes in one batch is started first either way, and a start after a
//! finish of the same attempt is stale.

use std::collections::HashMap;

use drover_core::outcome::{AttemptEnd, TaskSettled, settle_task};
use drover_core::{JobState, TaskPlan, TaskState};

use crate::event_row::Ev;
use crate::{Applied, AttemptReport, AttemptUpdate};

/// An attempt as the batch reads it.
#[derive(Debug, Clone)]
pub(crate) struct AttemptView {
    pub(crate) task_id: i64,
    pub(crate) job_id: i64,
    /// Attempt number of its task, from 1.
    pub(crate) number: u32,
    /// Fencing epoch of the node session it belongs to.
    pub(crate) epoch: i64,
    /// `assigned`, `running` or `ended`.
    pub(crate) state: String,
    /// Whether it is its task's current attempt.
    pub(crate) current: bool,
    /// Its task's state as read.
    pub(crate) task_state: TaskState,
    /// Name of its node.
    pub(crate) node: String,
    pub(crate) task_name: String,
    pub(crate) frame: Option<i64>,
}

/// What settling a finished attempt's task needs besides the report.
#[derive(Debug, Clone)]
pub(crate) struct TaskFacts {
    pub(crate) plan: TaskPlan,
    /// Whether the task's job was cancelled.
    pub(crate) cancelled: bool,
    /// Whether any task of the job depends on another.
    pub(crate) has_deps: bool,
}

/// An attempt that starts running (its task with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Start {
    pub(crate) attempt_id: i64,
    pub(crate) task_id: i64,
}

/// An attempt that ends, and what its task becomes.
#[derive(Debug, Clone)]
pub(crate) struct Finish<'a> {
    pub(crate) attempt_id: i64,
    pub(crate) task_id: i64,
    pub(crate) report: &'a AttemptReport,
    pub(crate) settled: TaskSettled,
}

/// A task that reached a final state in a job with dependencies: its dependents are
/// released (or skipped) after the batch's writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Release {
    pub(crate) job_id: i64,
    pub(crate) task_name: String,
    pub(crate) state: TaskState,
}

/// What a batch writes, decided by [`decide`].
#[derive(Debug, Default)]
pub(crate) struct Decided<'a> {
    /// Per update, in the batch's order.
    pub(crate) applied: Vec<Applied>,
    pub(crate) starts: Vec<Start>,
    pub(crate) finishes: Vec<Finish<'a>>,
    pub(crate) releases: Vec<Release>,
    /// Task events, in the batch's order.
    pub(crate) events: Vec<Ev>,
    /// Jobs whose state must be derived again, in id order without repeats: those with a
    /// finish. A start never changes its job's state: the job became running when the task
    /// was assigned, and a job with an assigned or running task is running.
    pub(crate) jobs: Vec<i64>,
}

/// A job whose state a batch may change, as read before the batch's writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JobBefore {
    /// Its stored state.
    pub(crate) state: JobState,
    pub(crate) cancelled: bool,
    /// The distinct states of its tasks that the batch does not write (see
    /// [`written_tasks`]).
    pub(crate) others: Vec<TaskState>,
}

/// The tasks the batch writes: those of its starts and finishes.
pub(crate) fn written_tasks(decided: &Decided<'_>) -> Vec<i64> {
    let mut ids: Vec<i64> =
        decided.starts.iter().map(|s| s.task_id).chain(decided.finishes.iter().map(|f| f.task_id)).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The jobs whose state the batch changes, with their new state, derived without reading
/// the tasks back after the writes: from the states of each job's tasks that the batch does
/// not write (read before the writes, in `before`) and those of the tasks it writes once
/// written (`running` when started, or what a finish settles them in). Only for a batch
/// that releases no dependents, which would change other tasks. `Err(job_id)` when a job to
/// derive is missing from `before` (the store read too little).
pub(crate) fn job_states_after(
    decided: &Decided<'_>,
    attempts: &HashMap<i64, AttemptView>,
    before: &HashMap<i64, JobBefore>,
) -> Result<Vec<(i64, JobState)>, i64> {
    let job_of = |attempt_id: i64| attempts.get(&attempt_id).map(|a| a.job_id);
    // Starts first, then finishes, as they are written: a finish settles a task last.
    let mut after: HashMap<i64, (Option<i64>, TaskState)> = HashMap::new();
    for s in &decided.starts {
        after.insert(s.task_id, (job_of(s.attempt_id), TaskState::Running));
    }
    for f in &decided.finishes {
        after.insert(f.task_id, (job_of(f.attempt_id), f.settled.state));
    }
    let mut changed = Vec::new();
    for &job_id in &decided.jobs {
        let job = before.get(&job_id).ok_or(job_id)?;
        let written = after.values().filter(|(job, _)| *job == Some(job_id)).map(|(_, state)| *state);
        let new = JobState::derive(job.others.iter().copied().chain(written), job.cancelled);
        if new != job.state {
            changed.push((job_id, new));
        }
    }
    Ok(changed)
}

/// The attempts a batch names, each once, in id order (the order in which stores lock them).
pub(crate) fn attempt_ids(updates: &[AttemptUpdate]) -> Vec<i64> {
    let mut ids: Vec<i64> = updates.iter().map(AttemptUpdate::attempt_id).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The attempts a batch finishes, each once, in id order: those whose task's plan the store
/// reads with the batch's attempts.
pub(crate) fn finishing_attempts(updates: &[AttemptUpdate]) -> Vec<i64> {
    let mut ids: Vec<i64> = updates
        .iter()
        .filter_map(|u| match u {
            AttemptUpdate::Finished(r) => Some(r.attempt_id),
            AttemptUpdate::Started { .. } => None,
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The tasks whose facts settling needs: those of finishes whose attempt is open and current
/// when the batch is read. (A finish that turns stale later in the batch needs none; one
/// that is open then is open when read.)
pub(crate) fn finished_tasks(updates: &[AttemptUpdate], attempts: &HashMap<i64, AttemptView>) -> Vec<i64> {
    let mut ids: Vec<i64> = updates
        .iter()
        .filter_map(|u| match u {
            AttemptUpdate::Finished(r) => {
                attempts.get(&r.attempt_id).filter(|a| a.current && a.state != "ended")
            }
            AttemptUpdate::Started { .. } => None,
        })
        .map(|a| a.task_id)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Decides a batch of updates against the attempts and task facts read for it, at `now_ms`.
/// `Err(task_id)` when a finished attempt's task has no facts (the store read too little).
pub(crate) fn decide<'a>(
    updates: &'a [AttemptUpdate],
    attempts: &HashMap<i64, AttemptView>,
    facts: &HashMap<i64, TaskFacts>,
    now_ms: i64,
) -> Result<Decided<'a>, i64> {
    let mut out = Decided { applied: Vec::with_capacity(updates.len()), ..Decided::default() };
    // The state each attempt is in so far, as the batch goes.
    let mut state: HashMap<i64, &str> = attempts.iter().map(|(id, a)| (*id, a.state.as_str())).collect();
    let open = |state: &HashMap<i64, &str>, id: i64, epoch: i64| -> Option<&AttemptView> {
        let a = attempts.get(&id)?;
        let now = state.get(&id).copied().unwrap_or("ended");
        (a.current && now != "ended" && a.epoch == epoch).then_some(a)
    };
    for update in updates {
        match update {
            AttemptUpdate::Started { attempt_id, epoch } => {
                let Some(a) = open(&state, *attempt_id, *epoch) else {
                    out.applied.push(Applied::Stale);
                    continue;
                };
                out.applied.push(Applied::Applied);
                if state.get(attempt_id) == Some(&"assigned") {
                    state.insert(*attempt_id, "running");
                    out.starts.push(Start { attempt_id: *attempt_id, task_id: a.task_id });
                    let mut ev = Ev::task(a.job_id, a.task_id, &a.task_name, a.frame, TaskState::Running);
                    ev.attempt = a.number;
                    ev.node = a.node.clone();
                    out.events.push(ev);
                }
            }
            AttemptUpdate::Finished(report) => {
                let Some(a) = open(&state, report.attempt_id, report.epoch) else {
                    tracing::debug!(
                        attempt_id = report.attempt_id,
                        epoch = report.epoch,
                        "stale attempt report ignored"
                    );
                    out.applied.push(Applied::Stale);
                    continue;
                };
                let f = facts.get(&a.task_id).ok_or(a.task_id)?;
                out.applied.push(Applied::Applied);
                state.insert(report.attempt_id, "ended");
                let end = AttemptEnd { exit_code: report.exit_code, failure: report.failure };
                let settled = settle_task(&f.plan, a.number, end, &report.message, f.cancelled, now_ms);
                let mut ev = Ev::task(a.job_id, a.task_id, &a.task_name, a.frame, settled.state);
                ev.message = settled.reason.clone();
                ev.exit_code = report.exit_code;
                ev.attempt = a.number;
                ev.node = a.node.clone();
                out.events.push(ev);
                if settled.state.is_final() && f.has_deps {
                    out.releases.push(Release {
                        job_id: a.job_id,
                        task_name: a.task_name.clone(),
                        state: settled.state,
                    });
                }
                out.jobs.push(a.job_id);
                out.finishes.push(Finish {
                    attempt_id: report.attempt_id,
                    task_id: a.task_id,
                    report,
                    settled,
                });
            }
        }
    }
    out.jobs.sort_unstable();
    out.jobs.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_core::FailureClass;

    fn view(task_id: i64, state: &str) -> AttemptView {
        AttemptView {
            task_id,
            job_id: 7,
            number: 1,
            epoch: 3,
            state: state.into(),
            current: true,
            task_state: TaskState::Running,
            node: "n".into(),
            task_name: format!("t{task_id}"),
            frame: None,
        }
    }

    fn report(attempt_id: i64, epoch: i64, exit_code: i32) -> AttemptReport {
        AttemptReport { attempt_id, epoch, exit_code: Some(exit_code), ..AttemptReport::default() }
    }

    fn facts(has_deps: bool) -> TaskFacts {
        TaskFacts { plan: TaskPlan::default(), cancelled: false, has_deps }
    }

    #[test]
    fn a_batch_is_decided_as_if_applied_one_update_after_the_other() {
        let attempts: HashMap<i64, AttemptView> = [
            (1, view(10, "assigned")),
            (2, view(20, "running")),
            (3, view(30, "ended")),
            (4, AttemptView { current: false, ..view(40, "running") }),
        ]
        .into();
        let f: HashMap<i64, TaskFacts> = [(10, facts(true)), (20, facts(false))].into();
        let updates = vec![
            AttemptUpdate::Started { attempt_id: 1, epoch: 3 },
            AttemptUpdate::Started { attempt_id: 1, epoch: 3 },
            AttemptUpdate::Finished(report(1, 3, 0)),
            AttemptUpdate::Finished(report(1, 3, 0)),
            AttemptUpdate::Started { attempt_id: 1, epoch: 3 },
            AttemptUpdate::Finished(report(2, 9, 0)),
            AttemptUpdate::Finished(report(2, 3, 1)),
            AttemptUpdate::Finished(report(3, 3, 0)),
            AttemptUpdate::Started { attempt_id: 4, epoch: 3 },
            AttemptUpdate::Started { attempt_id: 99, epoch: 3 },
        ];
        let (a, s) = (Applied::Applied, Applied::Stale);
        let d = decide(&updates, &attempts, &f, 50).expect("facts");
        assert_eq!(d.applied, vec![a, a, a, s, s, s, a, s, s, s]);
        assert_eq!(d.starts, vec![Start { attempt_id: 1, task_id: 10 }], "a second start writes nothing");
        let finished: Vec<_> = d.finishes.iter().map(|f| (f.attempt_id, f.settled.state)).collect();
        assert_eq!(finished, vec![(1, TaskState::Succeeded), (2, TaskState::Failed)]);
        assert_eq!(d.finishes[1].settled.failure, Some(FailureClass::Exit));
        assert_eq!(
            d.releases,
            vec![Release { job_id: 7, task_name: "t10".into(), state: TaskState::Succeeded }]
        );
        let events: Vec<_> = d.events.iter().map(|e| (e.task_id, e.state.as_str())).collect();
        assert_eq!(events, vec![(10, "running"), (10, "succeeded"), (20, "failed")]);
        assert_eq!(d.jobs, vec![7]);
    }

    #[test]
    fn facts_are_read_only_for_open_finishes_and_their_absence_is_an_error() {
        let attempts: HashMap<i64, AttemptView> = [(1, view(10, "running")), (2, view(20, "ended"))].into();
        let updates = vec![
            AttemptUpdate::Finished(report(1, 3, 0)),
            AttemptUpdate::Finished(report(2, 3, 0)),
            AttemptUpdate::Started { attempt_id: 1, epoch: 3 },
        ];
        assert_eq!(finished_tasks(&updates, &attempts), vec![10]);
        assert_eq!(attempt_ids(&updates), vec![1, 2]);
        assert_eq!(finishing_attempts(&updates), vec![1, 2]);
        assert_eq!(decide(&updates, &attempts, &HashMap::new(), 1).err(), Some(10));
    }

    #[test]
    fn starts_alone_derive_no_job_state() {
        let attempts: HashMap<i64, AttemptView> =
            [(1, view(10, "assigned")), (2, view(20, "assigned"))].into();
        let updates = vec![
            AttemptUpdate::Started { attempt_id: 1, epoch: 3 },
            AttemptUpdate::Started { attempt_id: 2, epoch: 3 },
        ];
        let d = decide(&updates, &attempts, &HashMap::new(), 1).expect("no facts needed");
        assert_eq!(d.starts.len(), 2);
        assert!(d.jobs.is_empty(), "{:?}", d.jobs);
        assert!(finishing_attempts(&updates).is_empty());
    }

    #[test]
    fn job_states_are_derived_from_the_tasks_outside_the_batch_and_those_it_writes() {
        let attempts: HashMap<i64, AttemptView> = [
            (1, view(10, "running")),
            (2, AttemptView { task_state: TaskState::Assigned, ..view(20, "assigned") }),
            (3, view(30, "running")),
        ]
        .into();
        let f: HashMap<i64, TaskFacts> = [(10, facts(false)), (30, facts(false))].into();
        let before = |others: Vec<TaskState>| -> HashMap<i64, JobBefore> {
            [(7, JobBefore { state: JobState::Running, cancelled: false, others })].into()
        };
        // Task 30's finish is stale (another epoch): it is not written, so its state is among
        // the others, and still running, the job is too.
        let updates =
            vec![AttemptUpdate::Finished(report(1, 3, 0)), AttemptUpdate::Finished(report(3, 9, 0))];
        let d = decide(&updates, &attempts, &f, 1).expect("facts");
        assert_eq!(written_tasks(&d), vec![10]);
        let others = vec![TaskState::Succeeded, TaskState::Running, TaskState::Assigned];
        assert_eq!(job_states_after(&d, &attempts, &before(others)), Ok(vec![]));
        // Every task of the job ends with the batch: it is derived final.
        let updates = vec![
            AttemptUpdate::Started { attempt_id: 2, epoch: 3 },
            AttemptUpdate::Finished(report(1, 3, 0)),
            AttemptUpdate::Finished(report(2, 3, 1)),
            AttemptUpdate::Finished(report(3, 3, 0)),
        ];
        let f: HashMap<i64, TaskFacts> = [(10, facts(false)), (20, facts(false)), (30, facts(false))].into();
        let d = decide(&updates, &attempts, &f, 1).expect("facts");
        assert_eq!(written_tasks(&d), vec![10, 20, 30]);
        assert_eq!(
            job_states_after(&d, &attempts, &before(vec![TaskState::Succeeded])),
            Ok(vec![(7, JobState::Failed)])
        );
        // A task outside the batch still queued keeps the job running.
        assert_eq!(job_states_after(&d, &attempts, &before(vec![TaskState::Queued])), Ok(vec![]));
        assert_eq!(job_states_after(&d, &attempts, &HashMap::new()), Err(7), "the job was not read");
    }
}
