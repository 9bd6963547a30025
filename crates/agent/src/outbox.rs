//! The agent's outbox: every report (attempt started, output, attempt finished) waits here
//! until the server acknowledges it, and is sent again, in order, after a reconnect. The
//! server's handling is idempotent (a repeated `finished` is recognised as stale), so
//! re-sending is always safe.

use std::collections::VecDeque;
use std::sync::Mutex;

use drover_proto::AgentMessage;
use drover_proto::agent_message::Msg;
use tokio::sync::{Notify, mpsc};

/// Stop accepting output from tasks while this many bytes wait for acknowledgement, so a slow
/// or absent server slows tasks' output instead of growing the agent's memory without bound.
const MAX_PENDING_BYTES: usize = 64 << 20;

/// A report waiting for acknowledgement.
#[derive(Debug, Clone)]
struct Pending {
    seq: u64,
    attempt_id: i64,
    msg: Msg,
    bytes: usize,
}

#[derive(Default)]
struct Inner {
    next_seq: u64,
    pending: VecDeque<Pending>,
    pending_bytes: usize,
    /// The live session's sender and epoch, when connected.
    link: Option<(mpsc::UnboundedSender<AgentMessage>, i64)>,
}

/// Reports waiting for the server.
#[derive(Default)]
pub struct Outbox {
    inner: Mutex<Inner>,
    acked: Notify,
}

fn stamp(mut msg: Msg, seq: u64, epoch: i64) -> AgentMessage {
    match &mut msg {
        Msg::Update(u) => {
            u.seq = seq;
            u.epoch = epoch;
        }
        Msg::Output(o) => {
            o.seq = seq;
            o.epoch = epoch;
        }
        Msg::Register(_) | Msg::Heartbeat(_) | Msg::FileChunk(_) => {}
    }
    AgentMessage { msg: Some(msg) }
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a report about `attempt_id` and sends it now if connected.
    pub async fn push(&self, attempt_id: i64, msg: Msg, bytes: usize) {
        loop {
            let notified = self.acked.notified();
            if self.lock().pending_bytes < MAX_PENDING_BYTES {
                break;
            }
            notified.await;
        }
        let mut inner = self.lock();
        inner.next_seq += 1;
        let seq = inner.next_seq;
        inner.pending.push_back(Pending { seq, attempt_id, msg: msg.clone(), bytes });
        inner.pending_bytes += bytes;
        if let Some((tx, epoch)) = &inner.link {
            // Sent under the lock so that reports leave in sequence order. A failed send means
            // the session just broke; the report stays pending and goes out after the reconnect.
            let _ = tx.send(stamp(msg, seq, *epoch));
        }
    }

    /// Drops every report up to and including `seq`.
    pub fn ack(&self, seq: u64) {
        let mut inner = self.lock();
        while inner.pending.front().is_some_and(|p| p.seq <= seq) {
            if let Some(p) = inner.pending.pop_front() {
                inner.pending_bytes -= p.bytes;
            }
        }
        drop(inner);
        self.acked.notify_waiters();
    }

    /// Attempts that still have reports waiting; the server must keep them on registration.
    pub fn attempts(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self.lock().pending.iter().map(|p| p.attempt_id).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// A session is up: re-sends everything pending, stamped with the new epoch, then sends
    /// new reports directly.
    pub fn connect(&self, tx: mpsc::UnboundedSender<AgentMessage>, epoch: i64) {
        let mut inner = self.lock();
        for p in &inner.pending {
            if tx.send(stamp(p.msg.clone(), p.seq, epoch)).is_err() {
                return;
            }
        }
        inner.link = Some((tx, epoch));
    }

    /// The session broke; reports accumulate until the next `connect`.
    pub fn disconnect(&self) {
        self.lock().link = None;
    }

    /// Number of reports waiting.
    pub fn len(&self) -> usize {
        self.lock().pending.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
