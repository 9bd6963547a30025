//! Dependency gating: which waiting tasks may be queued, and which must be skipped because a
//! dependency did not succeed. A dependency on a name covers every frame of that task.
//!
//! Release is incremental, so that a task's end costs O(its dependents), not O(its job): the
//! store keeps, per job and task name, a [`DependencyGroup`] (frames, frames ended, the first
//! state that blocks dependents), and per waiting task the number of its dependencies not yet
//! satisfied. [`release_after`] decides everything that follows one task's end, cascading
//! skips down the graph; the store only loads and saves the rows it names
//! ([`DependencyRows`]).

use std::future::Future;

use crate::state::TaskState;

/// The frames of one task name, as its dependents see them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DependencyGroup {
    /// Frames (tasks) with this name.
    pub frames: u32,
    /// Frames that reached a final state.
    pub ended: u32,
    /// The first final state that does not satisfy dependents, once one frame ended so.
    pub blocked_by: Option<TaskState>,
}

/// What one frame's end means for the dependents of its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupNews {
    /// Nothing changes for them yet.
    Nothing,
    /// Every frame ended and each satisfies dependents: one dependency fewer to wait for.
    Satisfied,
    /// A frame ended in this state, which does not satisfy dependents: they are skipped.
    Blocked(TaskState),
}

impl DependencyGroup {
    /// Records that one frame reached the final `state`.
    pub fn record_end(&mut self, state: TaskState) -> GroupNews {
        self.ended = self.ended.saturating_add(1).min(self.frames.max(1));
        if self.blocked_by.is_some() {
            return GroupNews::Nothing;
        }
        if !state.satisfies_dependents() {
            self.blocked_by = Some(state);
            return GroupNews::Blocked(state);
        }
        if self.ended >= self.frames { GroupNews::Satisfied } else { GroupNews::Nothing }
    }
}

/// A waiting task that depends on a group with news.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependent {
    /// Task id.
    pub id: i64,
    /// Task name (its own group, for the cascade).
    pub name: String,
    /// Frame of an array task.
    pub frame: Option<i64>,
    /// Dependencies (names) not yet satisfied.
    pub deps_left: u32,
}

/// What happens to a [`Dependent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DependentStep {
    /// It keeps waiting, now for this many dependencies.
    Wait {
        /// Dependencies not yet satisfied.
        deps_left: u32,
    },
    /// It leaves `waiting`: `Queued`, or `Skipped` with the reason.
    Release {
        /// `Queued` or `Skipped`.
        state: TaskState,
        /// Why it was skipped; empty when queued.
        reason: String,
    },
}

/// Decides what a waiting dependent does when its dependency `dependency` has `news`.
pub fn dependent_step(dependency: &str, news: GroupNews, deps_left: u32) -> Option<DependentStep> {
    match news {
        GroupNews::Nothing => None,
        GroupNews::Blocked(bad) => Some(DependentStep::Release {
            state: TaskState::Skipped,
            reason: format!("dependency `{dependency}` ended {bad}"),
        }),
        GroupNews::Satisfied if deps_left <= 1 => {
            Some(DependentStep::Release { state: TaskState::Queued, reason: String::new() })
        }
        GroupNews::Satisfied => Some(DependentStep::Wait { deps_left: deps_left - 1 }),
    }
}

/// A dependent that left `waiting`, as [`release_after`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// The task.
    pub task: Dependent,
    /// `Queued` or `Skipped`.
    pub state: TaskState,
    /// Why it was skipped; empty when queued.
    pub reason: String,
}

/// The rows of one job that dependency release reads and writes, inside the caller's
/// transaction. Implemented by each store; every decision is [`release_after`]'s.
pub trait DependencyRows: Send {
    /// The store's error.
    type Error: Send;
    /// The group of `name`.
    fn group(&mut self, name: &str) -> impl Future<Output = Result<DependencyGroup, Self::Error>> + Send;
    /// Saves the group of `name`.
    fn save_group(
        &mut self,
        name: &str,
        group: &DependencyGroup,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Tasks still waiting that depend on `name`, in id order.
    fn waiting_on(&mut self, name: &str) -> impl Future<Output = Result<Vec<Dependent>, Self::Error>> + Send;
    /// Saves what happens to a dependent.
    fn save_dependent(
        &mut self,
        task: &Dependent,
        step: &DependentStep,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// Applies the end of one task (of group `name`, in final state `state`) to the job's
/// dependency rows, cascading skips, and returns every dependent that left `waiting`.
pub async fn release_after<R: DependencyRows>(
    rows: &mut R,
    name: &str,
    state: TaskState,
) -> Result<Vec<Released>, R::Error> {
    let mut released = Vec::new();
    let mut ended = vec![(name.to_string(), state)];
    while let Some((name, state)) = ended.pop() {
        let mut group = rows.group(&name).await?;
        let news = group.record_end(state);
        rows.save_group(&name, &group).await?;
        if news == GroupNews::Nothing {
            continue;
        }
        for task in rows.waiting_on(&name).await? {
            let Some(step) = dependent_step(&name, news, task.deps_left) else { continue };
            rows.save_dependent(&task, &step).await?;
            if let DependentStep::Release { state, reason } = step {
                if state.is_final() {
                    ended.push((task.name.clone(), state));
                }
                released.push(Released { task, state, reason });
            }
        }
    }
    Ok(released)
}

#[cfg(test)]
mod tests;
