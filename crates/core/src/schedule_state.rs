//! What a server's scheduler keeps in memory between placement rounds: the queued tasks and
//! the nodes it places onto with what each has reserved.
//!
//! The database stays the record. This is a mirror kept current by the changes the store
//! reports (tasks entering and leaving the queue, attempts reserving and releasing a node), so
//! that a round reads only what changed instead of the whole queue, and picks its candidates
//! in O(candidates) rather than O(queue). Nothing here does I/O: the server feeds it, and a
//! property test checks that feeding it changes gives what a rebuild from the store gives.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};

use crate::job::RuntimeKind;
use crate::placement::{NodeLoad, NodeView, QueuedTask};
use crate::resources::Resources;

/// A queued task and when its retry backoff ends.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueEntry {
    /// What placement needs of the task.
    pub task: QueuedTask,
    /// It may not be placed before this time (ms since the epoch); 0 when it may at once.
    pub not_before_ms: i64,
}

/// A node as the scheduler keeps it: what it offers and the open attempts holding part of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeBook {
    /// Node id.
    pub id: i64,
    /// Labels that task constraints match against.
    pub labels: BTreeMap<String, String>,
    /// Sandboxes the node can run.
    pub runtimes: Vec<RuntimeKind>,
    /// What the node offers in all.
    pub capacity: Resources,
    /// What each open attempt on the node reserved, by attempt id.
    pub attempts: BTreeMap<i64, Resources>,
}

impl NodeBook {
    /// What is not reserved by the node's open attempts.
    pub fn free(&self) -> Resources {
        self.load().room(false)
    }

    /// What the node offers and what its open attempts reserve together.
    pub fn load(&self) -> NodeLoad {
        let reserved = self.attempts.values().fold(Resources::NONE, |sum, held| sum.plus(held));
        NodeLoad { capacity: self.capacity, reserved }
    }
}

/// Where a queued task is kept, so that it can be found by id.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Slot {
    /// Placeable now, in its project's queue under this key.
    Ready { project: String, key: (Reverse<i32>, i64) },
    /// Waiting out a backoff, under this key of `later`.
    Later { key: (i64, i64) },
}

/// The scheduler's memory: queued tasks by project in placement order, tasks in backoff by
/// the time they may run, and the nodes this server places onto.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScheduleState {
    /// Placeable tasks per project, highest priority then lowest id first.
    ready: BTreeMap<String, BTreeMap<(Reverse<i32>, i64), QueueEntry>>,
    /// Tasks that may wait out a retry backoff, by (not before, id), until a round finds
    /// their time has come.
    later: BTreeMap<(i64, i64), QueueEntry>,
    /// Every queued task's slot.
    slots: HashMap<i64, Slot>,
    /// Nodes by id.
    nodes: BTreeMap<i64, NodeBook>,
    /// The node of every attempt held in `nodes`.
    attempt_nodes: HashMap<i64, i64>,
}

impl ScheduleState {
    /// An empty state.
    pub fn new() -> ScheduleState {
        ScheduleState::default()
    }

    /// Records that a task is queued (newly, or again with new details): it replaces whatever
    /// was kept for that id.
    pub fn queued(&mut self, entry: QueueEntry) {
        let id = entry.task.id;
        self.left_queue(id);
        if entry.not_before_ms > 0 {
            let key = (entry.not_before_ms, id);
            self.later.insert(key, entry);
            self.slots.insert(id, Slot::Later { key });
        } else {
            self.insert_ready(entry);
        }
    }

    fn insert_ready(&mut self, entry: QueueEntry) {
        let id = entry.task.id;
        let key = (Reverse(entry.task.priority), id);
        let project = entry.task.project.clone();
        self.ready.entry(project.clone()).or_default().insert(key, entry);
        self.slots.insert(id, Slot::Ready { project, key });
    }

    /// Records that a task left the queue (assigned, cancelled, or anything else); a task not
    /// kept is ignored.
    pub fn left_queue(&mut self, task_id: i64) {
        match self.slots.remove(&task_id) {
            Some(Slot::Ready { project, key }) => {
                if let Some(queue) = self.ready.get_mut(&project) {
                    queue.remove(&key);
                    if queue.is_empty() {
                        self.ready.remove(&project);
                    }
                }
            }
            Some(Slot::Later { key }) => {
                self.later.remove(&key);
            }
            None => {}
        }
    }

    /// Forgets every queued task (before the whole queue is read again); nodes stay.
    pub fn clear_queue(&mut self) {
        self.ready.clear();
        self.later.clear();
        self.slots.clear();
    }

    /// How many tasks are queued, placeable or not.
    pub fn queue_len(&self) -> usize {
        self.slots.len()
    }

    /// Whether a task is kept as queued.
    pub fn is_queued(&self, task_id: i64) -> bool {
        self.slots.contains_key(&task_id)
    }

    /// The first `max` tasks the next round should consider, best first: tasks whose backoff
    /// ended by `now_ms` become placeable, and projects in `held` are passed over. Cost:
    /// O(max × projects) plus the backoffs that ended, whatever the queue's length.
    pub fn candidates(&mut self, now_ms: i64, held: &[String], max: usize) -> Vec<QueuedTask> {
        self.promote(now_ms);
        // A k-way merge over the projects' queues: few projects, so a linear pick of the best
        // head per step is cheaper than a heap.
        let mut walks: Vec<_> = self
            .ready
            .iter()
            .filter(|(project, _)| !held.contains(project))
            .map(|(_, queue)| queue.iter().peekable())
            .collect();
        let mut out = Vec::new();
        while out.len() < max {
            let best = walks
                .iter_mut()
                .enumerate()
                .filter_map(|(i, walk)| walk.peek().map(|(key, _)| (**key, i)))
                .min();
            let Some((_, i)) = best else { break };
            let Some((_, entry)) = walks[i].next() else { break };
            out.push(entry.task.clone());
        }
        out
    }

    /// Free cores of every node kept, together; with `ahead`, the cores nodes keep for
    /// attempts assigned ahead too (see [`NodeView::ahead`]).
    pub fn free_cores(&self, ahead: bool) -> u64 {
        self.nodes.values().map(|n| u64::from(n.load().room(ahead).cores)).sum()
    }

    /// Moves tasks whose backoff ended by `now_ms` to their projects' queues.
    fn promote(&mut self, now_ms: i64) {
        while let Some(entry) = self.later.first_entry() {
            if entry.key().0 > now_ms {
                break;
            }
            let entry = entry.remove();
            self.insert_ready(entry);
        }
    }

    /// Adds a node (or replaces what was kept of it, attempts included).
    pub fn node_joined(&mut self, book: NodeBook) {
        self.node_left(book.id);
        for attempt in book.attempts.keys() {
            self.attempt_nodes.insert(*attempt, book.id);
        }
        self.nodes.insert(book.id, book);
    }

    /// Forgets a node and its attempts.
    pub fn node_left(&mut self, node_id: i64) {
        if let Some(book) = self.nodes.remove(&node_id) {
            for attempt in book.attempts.keys() {
                self.attempt_nodes.remove(attempt);
            }
        }
    }

    /// Ids of the nodes kept.
    pub fn node_ids(&self) -> Vec<i64> {
        self.nodes.keys().copied().collect()
    }

    /// Records that `attempt_id` holds `held` of `node_id`; nothing for a node not kept.
    pub fn reserve(&mut self, node_id: i64, attempt_id: i64, held: Resources) {
        if let Some(book) = self.nodes.get_mut(&node_id) {
            book.attempts.insert(attempt_id, held);
            self.attempt_nodes.insert(attempt_id, node_id);
        }
    }

    /// Records that an attempt ended and gave back what it held; an attempt not kept (already
    /// released, or of a node not kept) is ignored, so a repeated report changes nothing.
    pub fn release(&mut self, attempt_id: i64) {
        if let Some(node_id) = self.attempt_nodes.remove(&attempt_id)
            && let Some(book) = self.nodes.get_mut(&node_id)
        {
            book.attempts.remove(&attempt_id);
        }
    }

    /// The nodes as placement sees them, with what each has free, and with `ahead` the room
    /// each keeps for attempts assigned ahead; warm VMs are the server's to add.
    pub fn node_views(&self, ahead: bool) -> Vec<NodeView> {
        self.nodes
            .values()
            .map(|book| (book, book.load()))
            .map(|(book, load)| NodeView {
                id: book.id,
                labels: book.labels.clone(),
                free: load.room(false),
                ahead: if ahead { load.ahead() } else { Resources::NONE },
                runtimes: book.runtimes.clone(),
                warm: BTreeMap::new(),
            })
            .collect()
    }

    /// Every queued task with its backoff end, by id: a canonical form to compare two states
    /// by what they hold rather than how.
    pub fn queue_snapshot(&self) -> BTreeMap<i64, QueueEntry> {
        let ready = self.ready.values().flat_map(|queue| queue.values());
        ready.chain(self.later.values()).map(|entry| (entry.task.id, entry.clone())).collect()
    }

    /// The nodes kept, by id.
    pub fn nodes(&self) -> &BTreeMap<i64, NodeBook> {
        &self.nodes
    }
}

#[cfg(test)]
mod tests;
