//! Uids handed out to sandboxes when the agent runs as root: every process task and every
//! microVM's QEMU gets one of its own from the same pool, so no two sandboxes share a uid (and
//! could signal or read each other) while both run.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// Hands out task uids, one per attempt.
#[derive(Debug)]
pub struct UidPool {
    range: std::ops::Range<u32>,
    taken: Mutex<BTreeSet<u32>>,
}

impl UidPool {
    /// A pool of the uids in `range`.
    pub fn new(range: std::ops::Range<u32>) -> UidPool {
        UidPool { range, taken: Mutex::new(BTreeSet::new()) }
    }

    /// A free uid, preferring one derived from the attempt so that ids spread over the range.
    pub fn take(&self, attempt_id: i64) -> Option<u32> {
        let size = self.range.end.checked_sub(self.range.start).filter(|s| *s > 0)?;
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        let first = (attempt_id.rem_euclid(i64::from(size))) as u32;
        let uid = (0..size).map(|i| self.range.start + (first + i) % size).find(|u| !taken.contains(u))?;
        taken.insert(uid);
        Some(uid)
    }

    /// Marks `uid` as in use (an attempt found again after a restart).
    pub fn claim(&self, uid: u32) {
        self.taken.lock().unwrap_or_else(|e| e.into_inner()).insert(uid);
    }

    /// Gives `uid` back.
    pub fn give_back(&self, uid: u32) {
        self.taken.lock().unwrap_or_else(|e| e.into_inner()).remove(&uid);
    }
}

/// A uid taken from a pool, given back when dropped.
#[derive(Debug)]
pub struct UidLease {
    pool: Arc<UidPool>,
    uid: u32,
}

impl UidLease {
    /// The uid.
    pub fn uid(&self) -> u32 {
        self.uid
    }
}

impl Drop for UidLease {
    fn drop(&mut self) {
        self.pool.give_back(self.uid);
    }
}

/// Takes a uid from `pool` for as long as the lease lives.
pub fn lease(pool: &Arc<UidPool>, hint: i64) -> Option<UidLease> {
    Some(UidLease { pool: pool.clone(), uid: pool.take(hint)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_unique_while_taken_and_come_back() {
        let pool = UidPool::new(10..13);
        let a = pool.take(1).expect("a");
        let b = pool.take(1).expect("b");
        let c = pool.take(1).expect("c");
        assert_eq!(BTreeSet::from([a, b, c]), BTreeSet::from([10, 11, 12]));
        assert_eq!(pool.take(7), None, "the range is used up");
        pool.give_back(b);
        assert_eq!(pool.take(99), Some(b));
        assert_eq!(UidPool::new(5..5).take(1), None);
    }

    #[test]
    fn a_lease_gives_its_uid_back() {
        let pool = Arc::new(UidPool::new(7..8));
        let first = lease(&pool, 0).expect("one uid");
        assert!(lease(&pool, 0).is_none());
        drop(first);
        assert_eq!(lease(&pool, 0).map(|l| l.uid()), Some(7));
    }
}
