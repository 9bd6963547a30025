//! Whole-core reservation: each running task holds distinct CPU ids and is pinned to them, so
//! tasks on one node never compete for a core.

use std::collections::BTreeSet;

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
        Some(Reserved { ids, pinnable: self.pinnable })
    }

    /// Returns cores to the free set.
    pub fn release(&mut self, reserved: &Reserved) {
        self.free.extend(reserved.ids.iter().copied());
    }
}

/// Cores held by one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    ids: Vec<usize>,
    pinnable: bool,
}

impl Reserved {
    /// CPU ids to pin the task to; empty when pinning is off.
    pub fn pin_to(&self) -> Vec<usize> {
        if self.pinnable { self.ids.clone() } else { Vec::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
