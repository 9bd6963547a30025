//! Whole-core reservation: each running task holds distinct CPU ids and is pinned to them, so
//! tasks on one node never compete for a core. Attempts the server assigned ahead (beyond
//! what is free) wait in line, in the order they came, and start as running ones give back
//! their cores and memory.

use std::collections::{BTreeSet, VecDeque};

use tokio::sync::oneshot;

/// The node's cores and which are free.
#[derive(Debug)]
pub struct CoreSet {
    free: BTreeSet<usize>,
    /// Whether reserved ids are real CPUs that can be pinned. When the operator advertises more
    /// cores than the machine has, ids are only counted, never pinned.
    pinnable: bool,
}

impl CoreSet {
    /// `advertised` cores, of which the first `physical` ids exist on this machine.
    pub fn new(advertised: u32, physical: u32) -> CoreSet {
        CoreSet { free: (0..advertised as usize).collect(), pinnable: advertised <= physical }
    }

    /// Takes `n` free cores. Returns the CPU ids to pin to (empty when pinning is off), or
    /// `None` if fewer than `n` are free.
    pub fn reserve(&mut self, n: u32) -> Option<Reserved> {
        if self.free.len() < n as usize {
            return None;
        }
        let ids: Vec<usize> = self.free.iter().take(n as usize).copied().collect();
        for id in &ids {
            self.free.remove(id);
        }
        Some(Reserved { ids, pinnable: self.pinnable, memory: 0 })
    }

    fn free_count(&self) -> usize {
        self.free.len()
    }

    /// Returns cores to the free set.
    pub fn release(&mut self, reserved: &Reserved) {
        self.free.extend(reserved.ids.iter().copied());
    }
}

/// Cores (and memory) held by one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    ids: Vec<usize>,
    pinnable: bool,
    /// Bytes of the node's memory held; 0 when memory is not counted.
    memory: u64,
}

impl Reserved {
    /// CPU ids to pin the task to; empty when pinning is off.
    pub fn pin_to(&self) -> Vec<usize> {
        if self.pinnable { self.ids.clone() } else { Vec::new() }
    }
}

/// Most attempts that may wait for room at once: far beyond what a server assigns ahead (one
/// node's worth), so that only a server gone wrong meets it, and the line stays bounded.
pub const MAX_WAITING: usize = 4096;

/// Whether an attempt may start now, must wait its turn, or can never run on this node.
#[derive(Debug)]
pub enum Admission {
    /// It holds what it needs: start it.
    Now(Reserved),
    /// It waits in line; the receiver yields its reservation when its turn comes (and is
    /// never answered if it is withdrawn first).
    Later(oneshot::Receiver<Reserved>),
    /// It needs more than the node offers in all, with why.
    Never(String),
}

/// An attempt waiting for room.
#[derive(Debug)]
struct Waiter {
    attempt_id: i64,
    cores: u32,
    memory: u64,
    turn: oneshot::Sender<Reserved>,
}

/// The node's cores and memory, what running attempts hold of them, and the attempts waiting
/// for room in the order they came. First come, first served: a waiting attempt is never
/// overtaken, even by a smaller one that would fit, so that the order the server assigned in
/// (priority first) holds on the node too.
#[derive(Debug)]
pub struct Capacity {
    cores: CoreSet,
    advertised_cores: u32,
    /// Memory offered in all, bytes; 0 when the node offers none and memory is not counted.
    memory: u64,
    memory_free: u64,
    waiting: VecDeque<Waiter>,
}

impl Capacity {
    /// `advertised` cores, of which the first `physical` exist here, and `memory` bytes.
    pub fn new(advertised: u32, physical: u32, memory: u64) -> Capacity {
        Capacity {
            cores: CoreSet::new(advertised, physical),
            advertised_cores: advertised,
            memory,
            memory_free: memory,
            waiting: VecDeque::new(),
        }
    }

    /// Takes `cores` and `memory` for `attempt_id` if they are free and nobody waits before
    /// it; otherwise puts it in line.
    pub fn admit(&mut self, attempt_id: i64, cores: u32, memory: u64) -> Admission {
        let memory = self.counted(memory);
        if cores > self.advertised_cores || memory > self.memory {
            return Admission::Never(format!(
                "the task needs {cores} cores and {} of memory; this node offers {} cores and {} in all",
                drover_core::resources::format_memory(memory),
                self.advertised_cores,
                drover_core::resources::format_memory(self.memory),
            ));
        }
        if self.waiting.is_empty()
            && let Some(reserved) = self.take(cores, memory)
        {
            return Admission::Now(reserved);
        }
        if self.waiting.len() >= MAX_WAITING {
            return Admission::Never(format!(
                "{} attempts already wait for room on this node; it takes no more",
                self.waiting.len()
            ));
        }
        let (turn, wait) = oneshot::channel();
        self.waiting.push_back(Waiter { attempt_id, cores, memory, turn });
        Admission::Later(wait)
    }

    /// Gives back what an attempt held, and hands the room to the attempts waiting first.
    pub fn release(&mut self, reserved: Reserved) {
        self.cores.release(&reserved);
        self.memory_free = (self.memory_free + reserved.memory).min(self.memory);
        while let Some(head) = self.waiting.front() {
            let (cores, memory) = (head.cores, head.memory);
            let Some(reserved) = self.take(cores, memory) else { break };
            let Some(head) = self.waiting.pop_front() else { break };
            if let Err(unclaimed) = head.turn.send(reserved) {
                // Its attempt stopped waiting without withdrawing: the room goes on.
                self.cores.release(&unclaimed);
                self.memory_free += unclaimed.memory;
            }
        }
    }

    /// Takes a waiting attempt out of line (it was cancelled before its turn); whether it was
    /// waiting.
    pub fn withdraw(&mut self, attempt_id: i64) -> bool {
        let before = self.waiting.len();
        self.waiting.retain(|w| w.attempt_id != attempt_id);
        before != self.waiting.len()
    }

    /// Takes exactly the CPU ids `ids` (those still free) and `memory` for an attempt an
    /// earlier agent run started and this one re-attached to, so that new attempts wait for
    /// what it holds.
    pub fn hold(&mut self, ids: &[usize], memory: u64) -> Reserved {
        let ids: Vec<usize> = ids.iter().copied().filter(|id| self.cores.free.remove(id)).collect();
        let memory = self.counted(memory).min(self.memory_free);
        self.memory_free -= memory;
        Reserved { ids, pinnable: self.cores.pinnable, memory }
    }

    /// How many attempts wait for room.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Memory as counted here: none when the node offers none.
    fn counted(&self, memory: u64) -> u64 {
        if self.memory == 0 { 0 } else { memory }
    }

    fn take(&mut self, cores: u32, memory: u64) -> Option<Reserved> {
        if memory > self.memory_free || self.cores.free_count() < cores as usize {
            return None;
        }
        let mut reserved = self.cores.reserve(cores)?;
        reserved.memory = memory;
        self.memory_free -= memory;
        Some(reserved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now(a: Admission) -> Reserved {
        match a {
            Admission::Now(r) => r,
            other => panic!("not admitted at once: {other:?}"),
        }
    }

    fn later(a: Admission) -> oneshot::Receiver<Reserved> {
        match a {
            Admission::Later(r) => r,
            other => panic!("not put in line: {other:?}"),
        }
    }

    #[test]
    fn attempts_beyond_room_wait_their_turn_first_come_first_served() {
        let mut cap = Capacity::new(2, 2, 1 << 30);
        let a = now(cap.admit(1, 1, 0));
        let b = now(cap.admit(2, 1, 0));
        let mut big = later(cap.admit(3, 2, 0));
        // A smaller one behind the big one does not overtake it.
        let mut small = later(cap.admit(4, 1, 0));
        assert_eq!(cap.waiting(), 2);
        cap.release(a);
        assert!(big.try_recv().is_err() && small.try_recv().is_err(), "the head needs two cores");
        cap.release(b);
        let big_cores = big.try_recv().expect("the head's turn");
        assert_eq!(big_cores.pin_to(), vec![0, 1]);
        assert!(small.try_recv().is_err());
        cap.release(big_cores);
        assert_eq!(small.try_recv().expect("next in line").pin_to(), vec![0]);
        assert_eq!(cap.waiting(), 0);
    }

    #[test]
    fn memory_is_waited_for_like_cores() {
        let mut cap = Capacity::new(4, 4, 1_000);
        let a = now(cap.admit(1, 1, 800));
        let mut b = later(cap.admit(2, 1, 300));
        cap.release(a);
        assert!(b.try_recv().is_ok());
        // A node that offers no memory counts none.
        let mut uncounted = Capacity::new(1, 1, 0);
        now(uncounted.admit(1, 1, 5 << 30));
    }

    #[test]
    fn a_withdrawn_or_abandoned_waiter_gives_its_turn_on() {
        let mut cap = Capacity::new(1, 1, 0);
        let a = now(cap.admit(1, 1, 0));
        let _withdrawn = later(cap.admit(2, 1, 0));
        let abandoned = later(cap.admit(3, 1, 0));
        let mut last = later(cap.admit(4, 1, 0));
        assert!(cap.withdraw(2));
        assert!(!cap.withdraw(2));
        drop(abandoned);
        cap.release(a);
        assert_eq!(last.try_recv().expect("the turn passed on").pin_to(), vec![0]);
    }

    #[test]
    fn the_line_is_bounded() {
        let mut cap = Capacity::new(1, 1, 0);
        let _running = now(cap.admit(0, 1, 0));
        let _line: Vec<_> = (1..=MAX_WAITING as i64).map(|id| later(cap.admit(id, 1, 0))).collect();
        match cap.admit(-1, 1, 0) {
            Admission::Never(why) => assert!(why.contains("already wait"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(cap.waiting(), MAX_WAITING);
    }

    #[test]
    fn a_resumed_attempt_holds_its_own_cores() {
        let mut cap = Capacity::new(2, 2, 100);
        let resumed = cap.hold(&[1, 7], 60);
        assert_eq!(resumed.pin_to(), vec![1], "an id the node does not have is not held");
        let a = now(cap.admit(1, 1, 40));
        assert_eq!(a.pin_to(), vec![0]);
        let mut b = later(cap.admit(2, 1, 0));
        cap.release(resumed);
        assert_eq!(b.try_recv().expect("room given back").pin_to(), vec![1]);
    }

    #[test]
    fn a_task_larger_than_the_node_is_refused_with_the_sizes() {
        let mut cap = Capacity::new(2, 2, 1 << 30);
        match cap.admit(1, 3, 0) {
            Admission::Never(why) => {
                assert!(why.contains("needs 3 cores") && why.contains("offers 2 cores"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(cap.admit(2, 1, 2 << 30), Admission::Never(_)));
    }

    #[test]
    fn reserves_distinct_cores() {
        let mut set = CoreSet::new(4, 4);
        let a = set.reserve(2).unwrap();
        let b = set.reserve(2).unwrap();
        assert_eq!(a.pin_to(), vec![0, 1]);
        assert_eq!(b.pin_to(), vec![2, 3]);
        assert!(set.reserve(1).is_none());
        set.release(&a);
        assert_eq!(set.reserve(1).unwrap().pin_to(), vec![0]);
    }

    #[test]
    fn oversubscribed_nodes_do_not_pin() {
        let mut set = CoreSet::new(8, 2);
        assert!(set.reserve(3).unwrap().pin_to().is_empty());
    }
}
