//! The agent's view of its node's lease: when the server last renewed it, measured on the
//! agent's own clock so that the agent never believes in a lease the server let run out.
//!
//! The server renews a node's lease when it reads a heartbeat, for one lease from then, and
//! answers with the heartbeat's number. The agent counts the lease from when it *sent* that
//! heartbeat, which is no later than when the server read it: so the lease the agent counts
//! ends no later than the one the server counts, and the agent stops its attempts before the
//! server's reaper can hand them to another node. Registration counts as a renewal from when
//! the agent sent `Register`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Heartbeats the agent remembers sending while it waits for their renewals. The server
/// answers in order, within a lease, so a few dozen cover any sane heartbeat period.
const REMEMBERED_BEATS: usize = 64;

/// When the node's lease was last renewed, as far as this agent can tell.
#[derive(Default)]
pub(crate) struct LeaseClock {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The lease the server grants; `None` before the first registration.
    lease: Option<Duration>,
    /// The send time of the last message the server renewed the lease for; `None` once the
    /// lease was given up for lost.
    renewed_from: Option<Instant>,
    /// Heartbeats of this session not answered yet: number and send time.
    sent: VecDeque<(u64, Instant)>,
    next_seq: u64,
    /// Whether a session is up.
    connected: bool,
    /// Whether the server of this session answers heartbeats. A server of an earlier
    /// release does not; the agent then trusts the connection as it did before.
    server_renews: bool,
}

impl LeaseClock {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A session registered: the lease of `lease` runs from `register_sent`.
    pub(crate) fn registered(&self, register_sent: Instant, lease: Duration) {
        let mut inner = self.inner();
        inner.lease = Some(lease);
        inner.renewed_from = Some(register_sent);
        inner.sent.clear();
        inner.next_seq = 1;
        inner.connected = true;
        inner.server_renews = false;
    }

    /// A heartbeat is about to be sent now; returns its number.
    pub(crate) fn beat(&self) -> u64 {
        let mut inner = self.inner();
        let seq = inner.next_seq;
        inner.next_seq += 1;
        if inner.sent.len() == REMEMBERED_BEATS {
            inner.sent.pop_front();
        }
        inner.sent.push_back((seq, Instant::now()));
        seq
    }

    /// The server renewed the lease on reading heartbeat `seq`.
    pub(crate) fn renewed(&self, seq: u64) {
        let mut inner = self.inner();
        inner.server_renews = true;
        while let Some(&(sent_seq, sent_at)) = inner.sent.front() {
            if sent_seq > seq {
                break;
            }
            inner.sent.pop_front();
            if sent_seq == seq && inner.renewed_from.is_some_and(|from| from < sent_at) {
                inner.renewed_from = Some(sent_at);
            }
        }
    }

    /// The session ended; the lease runs on from its last renewal.
    pub(crate) fn disconnected(&self) {
        self.inner().connected = false;
    }

    /// The lease, when it ran out by `now` and this is the first time it is asked since:
    /// the attempts running here were handed on (or are about to be) and must stop.
    pub(crate) fn lapsed(&self, now: Instant) -> Option<Duration> {
        let mut inner = self.inner();
        let lease = inner.lease?;
        let from = inner.renewed_from?;
        if now < from + lease || (inner.connected && !inner.server_renews) {
            return None;
        }
        inner.renewed_from = None;
        Some(lease)
    }

    /// The longest pause between connection attempts: while the lease lasts, a quarter of
    /// it, so a server back from a restart hears from the agent well within the lease (and
    /// within the grace its reaper gives agents after a start).
    pub(crate) fn longest_reconnect_pause(&self) -> Duration {
        let inner = self.inner();
        match (inner.lease, inner.renewed_from) {
            (Some(lease), Some(_)) => lease / 4,
            _ => Duration::MAX,
        }
    }

    /// How often to look whether the lease lapsed: a small part of it, so attempts stop soon
    /// after it ends and well before the server's reaper (which looks every quarter lease)
    /// is likely to hand them on.
    pub(crate) fn check_period(&self) -> Duration {
        let lease = self.inner().lease.unwrap_or(Duration::from_secs(1));
        (lease / 20).clamp(Duration::from_millis(20), Duration::from_millis(500))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(10);

    #[test]
    fn a_lease_counts_from_the_sending_of_the_renewed_heartbeat() {
        let clock = LeaseClock::default();
        let start = Instant::now();
        assert_eq!(clock.lapsed(start + LEASE * 5), None, "no lease before registering");
        clock.registered(start, LEASE);
        let first = clock.beat();
        let sent = Instant::now();
        let second = clock.beat();
        clock.renewed(first);
        // Renewed from the first beat's sending, not from now and not from the second beat.
        assert_eq!(clock.lapsed(sent + LEASE - Duration::from_millis(1)), None);
        clock.renewed(second);
        clock.disconnected();
        let later = Instant::now() + LEASE + Duration::from_millis(1);
        assert_eq!(clock.lapsed(later), Some(LEASE));
        assert_eq!(clock.lapsed(later), None, "a lapse is told once");
        // A new registration brings the lease back.
        clock.registered(later, LEASE);
        assert_eq!(clock.lapsed(later + LEASE / 2), None);
    }

    #[test]
    fn renewals_out_of_order_or_unknown_never_move_the_lease_back() {
        let clock = LeaseClock::default();
        let start = Instant::now();
        clock.registered(start, LEASE);
        let a = clock.beat();
        let b = clock.beat();
        clock.renewed(b);
        let after_b = clock.inner().renewed_from;
        clock.renewed(a);
        clock.renewed(999);
        assert_eq!(clock.inner().renewed_from, after_b);
        assert!(clock.inner().sent.is_empty());
    }

    #[test]
    fn a_connected_server_that_never_renews_is_trusted_but_a_lost_session_is_not() {
        let clock = LeaseClock::default();
        let start = Instant::now();
        clock.registered(start, LEASE);
        for _ in 0..REMEMBERED_BEATS * 2 {
            clock.beat();
        }
        assert_eq!(clock.inner().sent.len(), REMEMBERED_BEATS);
        assert_eq!(clock.lapsed(start + LEASE * 2), None, "an earlier server does not renew");
        clock.disconnected();
        assert_eq!(clock.lapsed(start + LEASE * 2), Some(LEASE));
    }

    #[test]
    fn a_silent_server_ends_the_lease_while_the_session_looks_up() {
        let clock = LeaseClock::default();
        let start = Instant::now();
        clock.registered(start, LEASE);
        let seq = clock.beat();
        clock.renewed(seq);
        // Heartbeats go out into a connection nobody reads: no renewal comes back.
        clock.beat();
        clock.beat();
        assert_eq!(clock.lapsed(Instant::now() + LEASE), Some(LEASE));
    }
}
