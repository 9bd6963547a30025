//! Group commit of attempt updates, and acknowledging reports in the order agents sent them.
//!
//! Starts and finishes arrive from every agent session at once. Committing each on its own
//! makes the database's commit rate the ceiling of the whole cluster, so one writer task per
//! server drains them from a channel and applies whatever has queued up (up to a limit) with
//! [`Store::apply_updates`], one transaction for the lot. While a commit is in flight the next
//! batch fills up, so batches grow with the load and a lone update waits for no timer.
//!
//! An agent drops a report from its outbox when the server acknowledges its sequence number,
//! and an acknowledgement covers every report before it. So each session acknowledges in
//! arrival order ([`Acks`]), and a report is acknowledged only after its commit: a report
//! acknowledged is durable, and a report lost with a crashed server is re-sent by the agent,
//! where fencing makes the repeat `Stale` instead of recording it twice.

use std::sync::Arc;

use drover_proto as pb;
use drover_proto::server_message::Msg as Out;
use drover_store::{Applied, AttemptUpdate, Signal, Store, StoreError};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::Status;

use crate::convert::status;
use crate::now_ms;
use crate::schedule_memory::ScheduleMemory;

/// Updates waiting for the writer; beyond this, sessions wait (backpressure on agents).
const QUEUE: usize = 8192;

/// Reports of one session waiting for their acknowledgement.
const ACK_QUEUE: usize = 4096;

/// The outcome of one update, delivered once its batch committed (or failed).
pub(crate) type Reply = Result<Applied, StoreError>;

/// An update and where its outcome goes.
struct Queued {
    update: AttemptUpdate,
    reply: oneshot::Sender<Reply>,
}

/// The sending side of the group-commit writer.
pub(crate) struct Completions {
    tx: mpsc::Sender<Queued>,
}

/// The writer went away (the server is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the attempt update writer has stopped")]
pub(crate) struct WriterStopped;

impl Completions {
    /// Starts the writer, committing up to `max_batch` updates per transaction (1 commits every
    /// update on its own).
    /// Every committed finish is released from `memory`, so its node's room can be placed.
    pub(crate) fn spawn(
        store: Arc<dyn Store>,
        memory: Arc<ScheduleMemory>,
        max_batch: usize,
    ) -> (Completions, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer = tokio::spawn(async move {
            write(store, memory, rx, max_batch.max(1)).await;
        });
        (Completions { tx }, writer)
    }

    /// Queues an update; the receiver yields its outcome after the commit.
    pub(crate) async fn submit(
        &self,
        update: AttemptUpdate,
    ) -> Result<oneshot::Receiver<Reply>, WriterStopped> {
        let (reply, outcome) = oneshot::channel();
        self.tx.send(Queued { update, reply }).await.map_err(|_| WriterStopped)?;
        Ok(outcome)
    }
}

/// The writer: takes whatever has queued up, commits it, answers, and starts over until every
/// sender is gone. Returns how many transactions it committed.
async fn write(
    store: Arc<dyn Store>,
    memory: Arc<ScheduleMemory>,
    mut rx: mpsc::Receiver<Queued>,
    max_batch: usize,
) -> u64 {
    let mut batch = Vec::with_capacity(max_batch);
    let mut batches = 0;
    while rx.recv_many(&mut batch, max_batch).await > 0 {
        commit(store.as_ref(), &memory, std::mem::take(&mut batch)).await;
        batches += 1;
    }
    batches
}

/// Commits one batch and answers every update in it.
async fn commit(store: &dyn Store, memory: &ScheduleMemory, batch: Vec<Queued>) {
    let updates: Vec<AttemptUpdate> = batch.iter().map(|q| q.update.clone()).collect();
    let now = now_ms();
    let outcomes: Vec<Reply> = match store.apply_updates(&updates, now).await {
        Ok(applied) => applied.into_iter().map(Ok).collect(),
        Err(error) if updates.len() > 1 => {
            // One bad update must not fail its neighbours: nothing was committed, so apply them
            // one by one and let each answer for itself.
            tracing::warn!(%error, updates = updates.len(), "batch of attempt updates failed; applying them one by one");
            let mut each = Vec::with_capacity(updates.len());
            for update in &updates {
                each.push(store.apply_updates(std::slice::from_ref(update), now).await.and_then(|mut a| {
                    a.pop().ok_or(StoreError::Corrupt { what: "batch result", detail: "no outcome".into() })
                }));
            }
            each
        }
        Err(error) => vec![Err(error)],
    };
    if outcomes.len() != batch.len() {
        tracing::error!(
            updates = batch.len(),
            outcomes = outcomes.len(),
            "store answered a batch with the wrong count"
        );
    }
    let mut changed = false;
    let mut finished = false;
    // A finish committed, or found stale (its attempt had already ended), frees its room.
    let ended: Vec<i64> = updates
        .iter()
        .zip(&outcomes)
        .filter_map(|(update, outcome)| match (update, outcome) {
            (AttemptUpdate::Finished(r), Ok(_)) => Some(r.attempt_id),
            _ => None,
        })
        .collect();
    memory.released(&ended);
    for (update, outcome) in updates.iter().zip(&outcomes) {
        if let Ok(Applied::Applied) = outcome {
            changed = true;
            if let AttemptUpdate::Finished(r) = update {
                finished = true;
                tracing::info!(attempt_id = r.attempt_id, exit_code = ?r.exit_code, failure = ?r.failure, "attempt finished");
            }
        }
    }
    tracing::debug!(updates = batch.len(), "attempt updates committed");
    // Freed cores first: placement waits on it, watchers and acknowledgements do not.
    if finished {
        publish(store, Signal::Schedule).await;
    }
    if changed {
        publish(store, Signal::Changed { job_id: 0 }).await;
    }
    let mut outcomes = outcomes.into_iter();
    for queued in batch {
        let outcome = outcomes
            .next()
            .unwrap_or(Err(StoreError::Corrupt { what: "batch result", detail: "no outcome".into() }));
        // A session that ended meanwhile no longer waits; its agent re-sends the report.
        let _ = queued.reply.send(outcome);
    }
}

async fn publish(store: &dyn Store, signal: Signal) {
    if let Err(e) = store.publish(signal).await {
        // Watchers and the scheduler also poll, so a lost signal only delays them.
        tracing::warn!(error = %e, ?signal, "cannot publish signal");
    }
}

/// A report of one session, in the order it arrived.
enum Report {
    /// Already applied (or found stale).
    Done { attempt_id: i64, seq: u64, applied: Applied },
    /// Waiting for the group commit.
    Queued { attempt_id: i64, seq: u64, outcome: oneshot::Receiver<Reply> },
}

/// One session's acknowledgements, sent strictly in arrival order by a task of their own so
/// that the session keeps reading (and the writer keeps batching) while commits are in flight.
pub(crate) struct Acks {
    tx: mpsc::Sender<Report>,
}

/// The session's acknowledger stopped after a failed commit; the session must end.
#[derive(Debug, thiserror::Error)]
#[error("the session's acknowledgements stopped")]
pub(crate) struct AcksStopped;

impl Acks {
    /// Starts acknowledging reports of a session whose outbound stream is `out`.
    pub(crate) fn spawn(store: Arc<dyn Store>, out: mpsc::Sender<Result<pb::ServerMessage, Status>>) -> Acks {
        let (tx, rx) = mpsc::channel(ACK_QUEUE);
        tokio::spawn(acknowledge(store, rx, out));
        Acks { tx }
    }

    /// A report applied synchronously.
    pub(crate) async fn done(&self, attempt_id: i64, seq: u64, applied: Applied) -> Result<(), AcksStopped> {
        self.tx.send(Report::Done { attempt_id, seq, applied }).await.map_err(|_| AcksStopped)
    }

    /// A report queued for the group commit.
    pub(crate) async fn queued(
        &self,
        attempt_id: i64,
        seq: u64,
        outcome: oneshot::Receiver<Reply>,
    ) -> Result<(), AcksStopped> {
        self.tx.send(Report::Queued { attempt_id, seq, outcome }).await.map_err(|_| AcksStopped)
    }
}

async fn acknowledge(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<Report>,
    out: mpsc::Sender<Result<pb::ServerMessage, Status>>,
) {
    while let Some(report) = rx.recv().await {
        let (attempt_id, seq, applied, committed_by_writer) = match report {
            Report::Done { attempt_id, seq, applied } => (attempt_id, seq, applied, false),
            Report::Queued { attempt_id, seq, outcome } => match outcome.await {
                Ok(Ok(applied)) => (attempt_id, seq, applied, true),
                Ok(Err(e)) => {
                    // Not acknowledged: the agent keeps the report and sends it again after it
                    // reconnects, as after any failed report.
                    tracing::error!(attempt_id, error = %e, "attempt update failed");
                    let _ = out.send(Err(status(e))).await;
                    return;
                }
                Err(_) => {
                    let _ = out.send(Err(Status::unavailable("the server is shutting down"))).await;
                    return;
                }
            },
        };
        if applied == Applied::Stale {
            tracing::info!(attempt_id, "stale report ignored; telling the agent to stop the attempt");
            let _ = out
                .send(Ok(pb::ServerMessage {
                    msg: Some(Out::Cancel(pb::CancelAttempt {
                        attempt_id,
                        reason: "attempt is no longer current".into(),
                    })),
                }))
                .await;
        } else if !committed_by_writer {
            // The writer publishes once per batch for its own updates.
            publish(store.as_ref(), Signal::Changed { job_id: 0 }).await;
        }
        let _ = out.send(Ok(pb::ServerMessage { msg: Some(Out::Ack(pb::Ack { seq })) })).await;
    }
}

#[cfg(test)]
mod tests;
