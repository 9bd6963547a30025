//! The agent's outbox: every report (attempt started, output, attempt finished) waits here
//! until the server acknowledges it, and is sent again, in order, after a reconnect. The
//! server's handling is idempotent (a repeated `finished` is recognised as stale), so
//! re-sending is always safe.
//!
//! A durable outbox ([`Outbox::durable`]) also appends each report to the agent's state log
//! before it can be sent, and each acknowledgement after it, so that an agent restarted at
//! any point sends again what the server had not acknowledged.
//!
//! Reports leave in batches. A session sends from the stream [`Outbox::reports`] gives it;
//! the transport polls that stream whenever it can take another message, and each poll takes
//! everything that waits by then (within the protocol's limits) as one `Reports` message. So
//! a quiet session sends each report as it comes, and a busy one (many attempts ending at
//! once, output of many tasks) sends fewer, larger messages: the shape of the server's group
//! commit, with no timer.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use drover_proto as pb;
use drover_proto::agent_message::Msg;
use drover_proto::report::Kind;
use futures::Stream;
use tokio::sync::Notify;

use crate::reach::OutputReach;
use crate::state_log::{Appending, LoggedReport, Record, StateLog};

/// Stop accepting output from tasks while this many bytes wait for acknowledgement, so a slow
/// or absent server slows tasks' output instead of growing the agent's memory without bound.
const MAX_PENDING_BYTES: usize = 64 << 20;

/// Most bytes (as estimated by their pushers) of reports in one message, well under what a
/// server decodes (4 MiB); a single larger report still goes, alone.
const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// A report waiting for acknowledgement.
#[derive(Debug, Clone)]
struct Pending {
    seq: u64,
    attempt_id: i64,
    report: Kind,
    bytes: usize,
    /// Not to be sent yet: its record is on its way to the state log.
    held: bool,
}

/// The session reports go to, once it registered.
#[derive(Debug, Clone, Copy)]
struct Link {
    /// The epoch the server gave the session; every report sent on it carries this one.
    epoch: i64,
    /// The last sequence number handed to the session's stream: reports after it are unsent.
    sent: u64,
}

#[derive(Default)]
struct Inner {
    next_seq: u64,
    pending: VecDeque<Pending>,
    pending_bytes: usize,
    /// Bumped for each session's stream and at each disconnect: a stream of an older
    /// generation ends, so reports never leave on a session that is gone.
    generation: u64,
    /// The live session, when one is registered.
    link: Option<Link>,
}

impl Inner {
    /// The next message of reports not yet sent on the live session, if any wait.
    fn take_batch(&mut self) -> Option<pb::AgentMessage> {
        let link = self.link.as_mut()?;
        let first = self.pending.partition_point(|p| p.seq <= link.sent);
        let mut reports = Vec::new();
        let mut bytes = 0;
        for p in self.pending.range(first..) {
            if p.held
                || reports.len() == pb::MAX_REPORTS_PER_MESSAGE
                || (!reports.is_empty() && bytes + p.bytes > MAX_MESSAGE_BYTES)
            {
                break;
            }
            bytes += p.bytes;
            reports.push(stamp(p.report.clone(), p.seq, link.epoch));
            link.sent = p.seq;
        }
        if reports.is_empty() {
            return None;
        }
        Some(pb::AgentMessage { msg: Some(Msg::Reports(pb::Reports { reports })) })
    }
}

/// Reports waiting for the server.
#[derive(Default)]
pub struct Outbox {
    inner: Mutex<Inner>,
    acked: Notify,
    /// Wakes the live session's stream: a report was queued, or the session changed.
    ready: Notify,
    /// Where reports and acknowledgements are kept across agent runs, when durable.
    log: Option<Arc<StateLog>>,
}

fn stamp(mut report: Kind, seq: u64, epoch: i64) -> pb::Report {
    match &mut report {
        Kind::Update(u) => {
            u.seq = seq;
            u.epoch = epoch;
        }
        Kind::Output(o) => {
            o.seq = seq;
            o.epoch = epoch;
        }
    }
    pb::Report { kind: Some(report) }
}

impl Outbox {
    /// An outbox kept in `log`, holding the reports an earlier agent run left unacknowledged
    /// there; its sequence numbers go on after `last_seq`.
    pub fn durable(log: Arc<StateLog>, reports: Vec<LoggedReport>, last_seq: u64) -> Outbox {
        let mut inner = Inner { next_seq: last_seq, ..Inner::default() };
        for r in reports {
            let Some(report) = r.report.kind else { continue };
            let bytes = usize::try_from(r.bytes).unwrap_or(usize::MAX);
            inner.next_seq = inner.next_seq.max(r.seq);
            inner.pending_bytes = inner.pending_bytes.saturating_add(bytes);
            inner.pending.push_back(Pending {
                seq: r.seq,
                attempt_id: r.attempt_id,
                report,
                bytes,
                held: false,
            });
        }
        Outbox { inner: Mutex::new(inner), log: Some(log), ..Outbox::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a report about `attempt_id`; the live session (if any) sends it with whatever
    /// else waits when it can.
    pub async fn push(&self, attempt_id: i64, report: Kind, bytes: usize) {
        self.wait_for_room().await;
        // Not waited for: the log keeps its records in the order they come, so the
        // acknowledgement of this report can never reach it first.
        self.enqueue(attempt_id, report, bytes, None);
        self.ready.notify_waiters();
    }

    /// Queues a report of a step's output that reaches `reach` into the step's files (see
    /// [`crate::reach`]). It is sent only once it is in the state log: a server never stores
    /// output past the reach a restarted agent reads on from. Reports queued after it wait
    /// behind it, so the order holds.
    pub async fn push_output(&self, attempt_id: i64, report: Kind, bytes: usize, reach: OutputReach) {
        self.wait_for_room().await;
        if let Some((seq, appending)) = self.enqueue(attempt_id, report, bytes, Some(reach)) {
            if let Err(e) = appending.written().await {
                // Sent all the same: losing the record only means shipping this output again
                // after a restart.
                tracing::warn!(attempt_id, error = %e, "an output report is not in the state log");
            }
            self.release(seq);
        }
        self.ready.notify_waiters();
    }

    /// Lets report `seq` go: its record is in the log.
    fn release(&self, seq: u64) {
        let mut inner = self.lock();
        // Pending reports are in sequence order.
        let at = inner.pending.partition_point(|p| p.seq < seq);
        if let Some(p) = inner.pending.get_mut(at).filter(|p| p.seq == seq) {
            p.held = false;
        }
    }

    async fn wait_for_room(&self) {
        loop {
            let notified = self.acked.notified();
            if self.lock().pending_bytes < MAX_PENDING_BYTES {
                break;
            }
            notified.await;
        }
    }

    /// Queues a report, appending it to the log when there is one; with `reach`, it is held
    /// back until what is returned says it is in the log.
    fn enqueue(
        &self,
        attempt_id: i64,
        report: Kind,
        bytes: usize,
        reach: Option<OutputReach>,
    ) -> Option<(u64, Appending)> {
        let mut inner = self.lock();
        inner.next_seq += 1;
        let seq = inner.next_seq;
        let mut appending = None;
        if let Some(log) = &self.log {
            let record = Record::Report(LoggedReport {
                seq,
                attempt_id,
                bytes: bytes as u64,
                report: pb::Report { kind: Some(report.clone()) },
                reach,
            });
            if reach.is_some() {
                match log.append_in_order(record) {
                    Ok(a) => appending = Some((seq, a)),
                    Err(e) => tracing::warn!(attempt_id, error = %e, "cannot append to the state log"),
                }
            } else {
                log.append_later(record);
            }
        }
        let held = appending.is_some();
        inner.pending.push_back(Pending { seq, attempt_id, report, bytes, held });
        inner.pending_bytes += bytes;
        appending
    }

    /// Drops every report up to and including `seq`.
    pub fn ack(&self, seq: u64) {
        let mut inner = self.lock();
        let mut dropped = false;
        while inner.pending.front().is_some_and(|p| p.seq <= seq) {
            if let Some(p) = inner.pending.pop_front() {
                inner.pending_bytes -= p.bytes;
                dropped = true;
            }
        }
        drop(inner);
        if let (true, Some(log)) = (dropped, &self.log) {
            // Lost in a crash, it only makes the next run send these reports again.
            log.append_later(Record::Acked(seq));
        }
        self.acked.notify_waiters();
    }

    /// Attempts whose end waits to be acknowledged.
    pub fn finished_attempts(&self) -> HashSet<i64> {
        self.lock()
            .pending
            .iter()
            .filter(|p| {
                matches!(&p.report, Kind::Update(u) if matches!(u.kind, Some(pb::attempt_update::Kind::Finished(_))))
            })
            .map(|p| p.attempt_id)
            .collect()
    }

    /// Attempts that still have reports waiting; the server must keep them on registration.
    pub fn attempts(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self.lock().pending.iter().map(|p| p.attempt_id).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// The stream a new session sends reports from, merged into its outbound messages. It
    /// yields nothing until [`Outbox::connect`] (so that `Register` goes first), then batches
    /// of everything pending, and it ends when the session disconnects or a newer one begins.
    pub fn reports(self: &Arc<Self>) -> impl Stream<Item = pb::AgentMessage> + Send + 'static {
        let generation = {
            let mut inner = self.lock();
            inner.generation += 1;
            inner.link = None;
            inner.generation
        };
        self.ready.notify_waiters();
        futures::stream::unfold(self.clone(), move |outbox| async move {
            let msg = outbox.next_batch(generation).await?;
            Some((msg, outbox))
        })
    }

    async fn next_batch(&self, generation: u64) -> Option<pb::AgentMessage> {
        loop {
            // Registered before looking, so a push between the look and the wait still wakes.
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut inner = self.lock();
                if inner.generation != generation {
                    return None;
                }
                if let Some(batch) = inner.take_batch() {
                    return Some(batch);
                }
            }
            notified.await;
        }
    }

    /// The session registered with `epoch`: its stream sends everything pending, stamped with
    /// the new epoch, then new reports as they come.
    pub fn connect(&self, epoch: i64) {
        self.lock().link = Some(Link { epoch, sent: 0 });
        self.ready.notify_waiters();
    }

    /// The session broke; reports accumulate until the next session connects.
    pub fn disconnect(&self) {
        {
            let mut inner = self.lock();
            inner.link = None;
            inner.generation += 1;
        }
        self.ready.notify_waiters();
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

#[cfg(test)]
mod tests {
    use futures::{FutureExt, StreamExt};

    use super::*;

    fn started(attempt_id: i64) -> Kind {
        Kind::Update(pb::AttemptUpdate {
            attempt_id,
            kind: Some(pb::attempt_update::Kind::Started(pb::Started {})),
            ..Default::default()
        })
    }

    /// (attempt id, seq, epoch) of each report of a message.
    fn contents(msg: pb::AgentMessage) -> Vec<(i64, u64, i64)> {
        let Some(Msg::Reports(r)) = msg.msg else { panic!("not reports: {msg:?}") };
        r.reports
            .into_iter()
            .map(|r| match r.kind {
                Some(Kind::Update(u)) => (u.attempt_id, u.seq, u.epoch),
                Some(Kind::Output(o)) => (o.attempt_id, o.seq, o.epoch),
                None => panic!("a report without a kind"),
            })
            .collect()
    }

    /// The message the stream has ready now, if any.
    fn ready(stream: &mut (impl Stream<Item = pb::AgentMessage> + Unpin)) -> Option<pb::AgentMessage> {
        stream.next().now_or_never().flatten()
    }

    #[tokio::test]
    async fn what_waits_goes_in_one_message_in_order_and_again_after_a_reconnect() {
        let outbox = Arc::new(Outbox::default());
        let mut first = Box::pin(outbox.reports());
        for id in 1..=3 {
            outbox.push(id, started(id), 64).await;
        }
        assert!(ready(&mut first).is_none(), "sent before the session registered");
        outbox.connect(7);
        assert_eq!(contents(ready(&mut first).unwrap()), vec![(1, 1, 7), (2, 2, 7), (3, 3, 7)]);
        assert!(ready(&mut first).is_none(), "sent twice");
        outbox.push(4, started(4), 64).await;
        assert_eq!(contents(ready(&mut first).unwrap()), vec![(4, 4, 7)]);

        // Acknowledged reports are gone; the rest go out again on the next session.
        outbox.ack(2);
        outbox.disconnect();
        assert_eq!(first.next().await, None, "the old session's stream goes on");
        let mut second = Box::pin(outbox.reports());
        outbox.connect(8);
        assert_eq!(contents(ready(&mut second).unwrap()), vec![(3, 3, 8), (4, 4, 8)]);
        assert_eq!(outbox.attempts(), vec![3, 4]);
        // A newer session ends the stream of the one before it.
        let mut third = Box::pin(outbox.reports());
        assert_eq!(second.next().await, None);
        outbox.connect(9);
        assert_eq!(contents(ready(&mut third).unwrap()).len(), 2);
    }

    #[tokio::test]
    async fn a_durable_outbox_sends_after_a_restart_what_was_not_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        {
            let (log, recovered) = StateLog::open(&state).unwrap();
            let outbox = Arc::new(Outbox::durable(log, recovered.reports, recovered.last_seq));
            let mut sent = Box::pin(outbox.reports());
            outbox.connect(3);
            for id in 1..=4 {
                outbox.push(id, started(id), 64).await;
            }
            assert_eq!(contents(ready(&mut sent).unwrap()).len(), 4);
            outbox.ack(2);
            // The agent dies here: the server acknowledged two of the four.
        }
        let (log, recovered) = StateLog::open(&state).unwrap();
        let outbox = Arc::new(Outbox::durable(log, recovered.reports, recovered.last_seq));
        assert_eq!(outbox.attempts(), vec![3, 4]);
        let mut sent = Box::pin(outbox.reports());
        outbox.connect(4);
        outbox.push(5, started(5), 64).await;
        // Sent again in order under the new session's epoch; numbering goes on after them.
        assert_eq!(contents(ready(&mut sent).unwrap()), vec![(3, 3, 4), (4, 4, 4), (5, 5, 4)]);
        let ended = Kind::Update(pb::AttemptUpdate {
            attempt_id: 6,
            kind: Some(pb::attempt_update::Kind::Finished(pb::Finished::default())),
            ..Default::default()
        });
        outbox.push(6, ended, 64).await;
        assert_eq!(outbox.finished_attempts(), HashSet::from([6]));
    }

    #[tokio::test]
    async fn output_with_a_reach_leaves_only_once_in_the_log_and_what_follows_waits_behind_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let (log, recovered) = StateLog::open(&state).unwrap();
        let outbox = Arc::new(Outbox::durable(log, recovered.reports, recovered.last_seq));
        let mut sent = Box::pin(outbox.reports());
        outbox.connect(1);
        let reach = OutputReach { step: 0, ..OutputReach::default() };
        let output = Kind::Output(pb::AttemptOutput { attempt_id: 1, ..Default::default() });
        let (seq, appending) = outbox.enqueue(1, output, 64, Some(reach)).expect("a durable outbox logs it");
        outbox.enqueue(2, started(2), 64, None);
        assert!(ready(&mut sent).is_none(), "sent before it was in the log");
        appending.written().await.unwrap();
        outbox.release(seq);
        outbox.ready.notify_waiters();
        assert_eq!(contents(ready(&mut sent).unwrap()), vec![(1, 1, 1), (2, 2, 1)]);
        let kept = crate::state_log::peek(&state).unwrap();
        assert_eq!(kept.reports[0].reach, Some(reach));
        assert_eq!(kept.reach.get(&1), None, "no entry of attempt 1: nothing to resume");
        // Through the public way, too.
        outbox.push_output(3, started(3), 64, reach).await;
        assert_eq!(contents(ready(&mut sent).unwrap()), vec![(3, 3, 1)]);
    }

    #[tokio::test]
    async fn a_batch_stays_within_the_count_and_size_limits() {
        let outbox = Arc::new(Outbox::default());
        let mut reports = Box::pin(outbox.reports());
        outbox.connect(1);
        let n = pb::MAX_REPORTS_PER_MESSAGE + 10;
        for id in 1..=n as i64 {
            outbox.push(id, started(id), 64).await;
        }
        assert_eq!(contents(ready(&mut reports).unwrap()).len(), pb::MAX_REPORTS_PER_MESSAGE);
        assert_eq!(contents(ready(&mut reports).unwrap()).len(), 10);

        // By size: two halves fit, a third waits; one report over the limit goes alone.
        for (id, bytes) in [(1, MAX_MESSAGE_BYTES / 2), (2, MAX_MESSAGE_BYTES / 2), (3, 10)] {
            outbox.push(id, started(id), bytes).await;
        }
        outbox.push(4, started(4), MAX_MESSAGE_BYTES * 2).await;
        let sizes: Vec<usize> =
            std::iter::from_fn(|| ready(&mut reports)).map(|m| contents(m).len()).collect();
        assert_eq!(sizes, vec![2, 1, 1]);
    }

    #[tokio::test]
    async fn a_waiting_stream_wakes_for_a_new_report() {
        let outbox = Arc::new(Outbox::default());
        let mut reports = Box::pin(outbox.reports());
        outbox.connect(1);
        let pusher = {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                outbox.push(5, started(5), 64).await;
            })
        };
        let msg = tokio::time::timeout(std::time::Duration::from_secs(5), reports.next()).await.unwrap();
        assert_eq!(contents(msg.unwrap()), vec![(5, 1, 1)]);
        pusher.await.unwrap();
    }
}
