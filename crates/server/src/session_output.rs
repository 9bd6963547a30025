//! An agent session's output, stored off the session's read loop.
//!
//! Appending a report of output to the store waits for its commit. Done inline, the session
//! decoded its next message only after that commit, so a task writing output fast had the
//! server decode and commit by turns. One writer task per session appends the session's
//! output in the order it arrived while the session reads on; the acknowledgement of each
//! report waits for its own append (see [`crate::completions::Acks`]), so an acknowledged
//! report is still a stored one.
//!
//! The store keeps output only for attempts that are still open, so an attempt's finish must
//! not be committed before the output the agent sent ahead of it: [`SessionOutput::stored`]
//! waits for those appends before the session queues the finish.

use std::collections::HashMap;
use std::sync::Arc;

use drover_store::{Applied, OutputChunk, Signal, Store};
use tokio::sync::{mpsc, oneshot, watch};

use crate::completions::{Reply, WriterStopped};

/// Output reports of one session queued for its writer; beyond this, the session waits before
/// it reads on (each report is at most a few MiB, so this bounds the memory a session holds).
const QUEUE: usize = 8;

/// One report of output to append.
struct Append {
    attempt_id: i64,
    epoch: i64,
    /// The agent's number for the report: one stored already is not stored again.
    seq: u64,
    chunks: Vec<OutputChunk>,
    reply: oneshot::Sender<Reply>,
}

/// The session's side of its output writer.
pub(crate) struct SessionOutput {
    tx: mpsc::Sender<Append>,
    /// How many appends the writer has finished, in queue order.
    done: watch::Receiver<u64>,
    /// How many appends were queued so far.
    queued: u64,
    /// Per attempt with output in flight, the number its last append has in the queue.
    last: HashMap<i64, u64>,
}

impl SessionOutput {
    /// Starts the session's writer; it ends when the session lets go of this.
    pub(crate) fn spawn(store: Arc<dyn Store>) -> SessionOutput {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (done_tx, done) = watch::channel(0);
        tokio::spawn(write(store, rx, done_tx));
        SessionOutput { tx, done, queued: 0, last: HashMap::new() }
    }

    /// Queues output of an attempt; the receiver yields the outcome once it is stored.
    pub(crate) async fn append(
        &mut self,
        attempt_id: i64,
        epoch: i64,
        seq: u64,
        chunks: Vec<OutputChunk>,
    ) -> Result<oneshot::Receiver<Reply>, WriterStopped> {
        let (reply, stored) = oneshot::channel();
        self.tx.send(Append { attempt_id, epoch, seq, chunks, reply }).await.map_err(|_| WriterStopped)?;
        self.queued += 1;
        self.last.insert(attempt_id, self.queued);
        Ok(stored)
    }

    /// Waits until every append of `attempt_id` queued so far is done (stored or failed).
    pub(crate) async fn stored(&mut self, attempt_id: i64) -> Result<(), WriterStopped> {
        let Some(last) = self.last.remove(&attempt_id) else { return Ok(()) };
        self.done.wait_for(|done| *done >= last).await.map_err(|_| WriterStopped)?;
        Ok(())
    }
}

/// The writer: appends each report in turn, answers it, and counts it done.
async fn write(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Append>, done: watch::Sender<u64>) {
    while let Some(a) = rx.recv().await {
        let outcome = store.append_chunks(a.attempt_id, a.epoch, Some(a.seq), &a.chunks).await;
        if let Ok(Applied::Applied) = outcome
            && let Err(e) = store.publish(Signal::Changed { job_id: 0 }).await
        {
            // Followers also poll, so a lost signal only delays them.
            tracing::warn!(error = %e, "cannot publish signal");
        }
        // A session that ended meanwhile no longer waits; its agent re-sends the report.
        let _ = a.reply.send(outcome);
        done.send_modify(|n| *n += 1);
    }
}

#[cfg(test)]
mod tests {
    use drover_store::sqlite::SqliteStore;

    use super::*;

    #[tokio::test]
    async fn a_finish_waits_only_for_its_own_attempts_output() {
        let dir = tempfile::tempdir().expect("dir");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("db")).await.expect("store"));
        let mut output = SessionOutput::spawn(store);
        // No attempt exists: every append is stale, which is an outcome like any other.
        let chunk = OutputChunk { step: 0, stderr: false, lens: vec![3], data: b"hi\n".to_vec() };
        let first = output.append(1, 1, 1, vec![chunk.clone()]).await.expect("queued");
        let second = output.append(2, 1, 2, vec![chunk]).await.expect("queued");
        output.stored(1).await.expect("writer runs");
        assert!(matches!(first.await, Ok(Ok(Applied::Stale))));
        output.stored(3).await.expect("nothing of attempt 3 is in flight");
        output.stored(2).await.expect("writer runs");
        assert!(matches!(second.await, Ok(Ok(Applied::Stale))));
        assert!(output.last.is_empty());
    }
}
