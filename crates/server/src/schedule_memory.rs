//! The scheduler's memory and how it is kept current: the queue through the store's queue
//! feed, the nodes through their sessions here, and attempts' reservations through this
//! server's own assignments and committed finishes.
//!
//! Only the scheduler loop reads the store into it and assigns, one round at a time; the
//! group-commit writer releases finished attempts. The store stays the record: whatever the
//! memory gets wrong, `assign` re-checks (a task no longer queued is not claimed, a node
//! without room refuses), and the next round's read corrects it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use drover_core::placement::{QueuedTask, Room, place_within};
use drover_core::schedule_state::ScheduleState;
use drover_store::{Assignment, QueueChanges, Store, StoreError};
use tracing::Instrument;

/// Most queued tasks considered in one placement round.
const MAX_CANDIDATES: usize = 512;

/// What a placement round may do.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rules<'a> {
    /// Projects held whole: none of their tasks is considered.
    pub(crate) held: &'a [String],
    /// What each project's quota leaves it.
    pub(crate) rooms: &'a BTreeMap<String, Room>,
    /// Whether tasks that fit no node's free room may be assigned ahead onto busy nodes.
    pub(crate) ahead: bool,
}

/// What one placement round did.
#[derive(Debug, Default)]
pub(crate) struct Round {
    /// The attempts created, to send to their agents.
    pub(crate) assignments: Vec<Assignment>,
    /// How many attempts were created (still known once `assignments` went to dispatch).
    pub(crate) assigned: usize,
    /// Tasks a project's quota kept waiting, with why.
    pub(crate) held: Vec<(i64, String)>,
    /// Placements the store did not take (the task or the node had changed since the memory
    /// was read); the next round's read catches up.
    pub(crate) refused: usize,
    /// Whether, as far as the memory knows, room and queued tasks are both left after the
    /// round, so that another round at once may place more.
    pub(crate) more: bool,
}

/// Whether `queue`'s tasks ask for at least `free_cores` together, so that they could fill
/// the nodes.
fn fills(queue: &[QueuedTask], free_cores: u64) -> bool {
    queue.iter().map(|t| u64::from(t.resources.cores)).sum::<u64>() >= free_cores
}

/// What the scheduler keeps between rounds.
#[derive(Default)]
pub(crate) struct ScheduleMemory {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    state: ScheduleState,
    /// Where the queue feed resumes; `None` until the whole queue was read (again).
    cursor: Option<i64>,
    /// The session epoch each kept node was read for: a new epoch (the agent registered
    /// again) calls for a new read.
    epochs: HashMap<i64, i64>,
    /// Nodes to read again at the next round: an assignment to them was refused.
    recheck: HashSet<i64>,
    /// Attempts released while node books were being read, released again once the books are
    /// in (the read may predate their finish).
    released_during_read: Option<Vec<i64>>,
}

impl ScheduleMemory {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings the memory up to date before a round: the queue's changes since the last read
    /// (the whole queue after [`resync`](Self::resync)), and the nodes of `sessions` (node id →
    /// session epoch) that are new here, registered again, or to be re-checked. Nodes without
    /// a session here are forgotten: this server places only onto its own agents.
    pub(crate) async fn sync(
        &self,
        store: &dyn Store,
        sessions: &HashMap<i64, i64>,
    ) -> Result<(), StoreError> {
        self.read_queue(store).await?;

        let stale: Vec<i64> = {
            let mut inner = self.lock();
            let gone: Vec<i64> =
                inner.state.node_ids().into_iter().filter(|id| !sessions.contains_key(id)).collect();
            for id in gone {
                inner.epochs.remove(&id);
                inner.state.node_left(id);
            }
            let stale: Vec<i64> = sessions
                .iter()
                .filter(|(id, epoch)| inner.epochs.get(id) != Some(epoch) || inner.recheck.contains(id))
                .map(|(id, _)| *id)
                .collect();
            if !stale.is_empty() {
                inner.released_during_read = Some(Vec::new());
            }
            stale
        };
        if stale.is_empty() {
            return Ok(());
        }
        let books = store.node_books(&stale).await;
        let mut inner = self.lock();
        let released = inner.released_during_read.take().unwrap_or_default();
        let books = books?;
        for id in &stale {
            inner.state.node_left(*id);
            inner.epochs.remove(id);
            inner.recheck.remove(id);
        }
        for book in books {
            if let Some(epoch) = sessions.get(&book.id) {
                inner.epochs.insert(book.id, *epoch);
            }
            inner.state.node_joined(book);
        }
        for attempt in released {
            inner.state.release(attempt);
        }
        Ok(())
    }

    /// Reads the queue's changes since the last read (the whole queue after a resync) into
    /// the memory.
    async fn read_queue(&self, store: &dyn Store) -> Result<(), StoreError> {
        let since = self.lock().cursor;
        let changes = store.queue_changes(since).await?;
        self.apply(changes, since.is_none());
        Ok(())
    }

    fn apply(&self, changes: QueueChanges, whole: bool) {
        let mut inner = self.lock();
        if whole {
            inner.state.clear_queue();
        }
        for id in changes.left {
            inner.state.left_queue(id);
        }
        for entry in changes.queued {
            inner.state.queued(entry);
        }
        inner.cursor = Some(changes.cursor);
    }

    /// Forgets everything, so that the next round reads the whole queue and every node again:
    /// for when signals may have been missed or a round failed.
    pub(crate) fn resync(&self) {
        let mut inner = self.lock();
        inner.cursor = None;
        inner.epochs.clear();
    }

    /// One placement round onto the nodes of `sessions` (node id → session epoch): brings the
    /// memory up to date ([`sync`](Self::sync)), places the best candidates as `rules` allow,
    /// assigns in the store, and records what the store took. `warm` lists each node's idle
    /// microVMs per image.
    pub(crate) async fn place(
        &self,
        store: &dyn Store,
        sessions: &HashMap<i64, i64>,
        warm: &HashMap<i64, BTreeMap<String, u32>>,
        now_ms: i64,
        rules: Rules<'_>,
    ) -> Result<Round, StoreError> {
        let Rules { held, rooms, ahead } = rules;
        self.sync(store, sessions).await?;
        let (mut nodes, queue, free_cores) = {
            let mut inner = self.lock();
            // Twice the free cores in candidates is enough to fill every node with small
            // tasks; only when that leaves room (tasks too large, or held by a quota) does the
            // round look deeper.
            let free_cores = inner.state.free_cores(ahead);
            let narrow =
                usize::try_from(free_cores.saturating_mul(2)).unwrap_or(usize::MAX).clamp(1, MAX_CANDIDATES);
            let queue = inner.state.candidates(now_ms, held, narrow);
            let queue = if queue.len() == narrow && narrow < MAX_CANDIDATES && !fills(&queue, free_cores) {
                inner.state.candidates(now_ms, held, MAX_CANDIDATES)
            } else {
                queue
            };
            (inner.state.node_views(ahead), queue, free_cores)
        };
        let mut round = Round::default();
        if queue.is_empty() || free_cores == 0 {
            return Ok(round);
        }
        for node in &mut nodes {
            if let Some(vms) = warm.get(&node.id) {
                node.warm = vms.clone();
            }
        }
        let placed = place_within(&nodes, &queue, rooms);
        round.held = placed.held;
        if placed.placements.is_empty() {
            return Ok(round);
        }
        let span = tracing::debug_span!("assign", tasks = placed.placements.len());
        let assignments = store.assign(&placed.placements, now_ms).instrument(span).await?;
        // A placement is filled by its task, or by one that stood in for it.
        let taken: HashSet<i64> = assignments.iter().map(|a| a.instead_of.unwrap_or(a.task_id)).collect();
        let refused: Vec<_> =
            placed.placements.iter().filter(|p| !taken.contains(&p.task_id)).copied().collect();
        round.refused = refused.len();
        {
            let mut inner = self.lock();
            for a in &assignments {
                inner.state.left_queue(a.task_id);
                inner.state.reserve(a.node_id, a.attempt_id, a.plan.resources);
            }
            round.more = inner.state.free_cores(ahead) > 0 && inner.state.queue_len() > 0;
        }
        if !refused.is_empty() {
            // Most refusals are tasks another replica claimed first: the queue's changes tell.
            // Only a refused task that is still queued says its node was not as remembered.
            self.read_queue(store).await?;
            let mut inner = self.lock();
            for p in refused {
                if inner.state.is_queued(p.task_id) {
                    inner.recheck.insert(p.node_id);
                }
            }
        }
        round.assigned = assignments.len();
        round.assignments = assignments;
        Ok(round)
    }

    /// Records that attempts ended (their finish is committed): their nodes have the room back.
    pub(crate) fn released(&self, attempts: &[i64]) {
        let mut inner = self.lock();
        for attempt in attempts {
            inner.state.release(*attempt);
        }
        if let Some(during) = inner.released_during_read.as_mut() {
            during.extend_from_slice(attempts);
        }
    }

    /// A copy of the state, for checks.
    #[cfg(test)]
    pub(crate) fn state(&self) -> ScheduleState {
        self.lock().state.clone()
    }
}

#[cfg(test)]
mod tests;
