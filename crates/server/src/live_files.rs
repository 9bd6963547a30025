//! Live downloads: reading a file from a running attempt's workspace through its agent.
//!
//! The server asks the agent for one window of the file at a time (`ReadFile`) and asks for
//! the next only once the previous one went out to the client, so a slow client holds at most
//! one window in memory here and nothing on the agent. An agent that stops answering ends the
//! download with an error after [`AGENT_TIMEOUT`].

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use drover_proto as pb;
use drover_proto::server_message::Msg as Out;
use drover_store::LiveAttempt;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::Shared;
use crate::streams::StreamKind;

/// Bytes the agent sends per `ReadFile`.
const WINDOW: u64 = 1 << 20;
/// Chunks a window arrives in at most (the agent sends 256 KiB chunks), plus room for the end.
const CHUNKS_PER_WINDOW: usize = 8;
/// How long the agent may take to answer before the download fails.
const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A live download in flight: its chunks, in order, as the agent sends them.
type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::BlobChunk, Status>> + Send>>;

/// A live read waiting for chunks: the node asked, and where its chunks go.
struct Waiting {
    node_id: i64,
    tx: mpsc::Sender<pb::FileChunk>,
}

/// Live reads waiting for chunks from agents, by request id.
#[derive(Default)]
pub(crate) struct Reads {
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, Waiting>>,
}

impl Reads {
    fn open(&self, node_id: i64) -> (u64, mpsc::Receiver<pb::FileChunk>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(CHUNKS_PER_WINDOW + 2);
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).insert(id, Waiting { node_id, tx });
        (id, rx)
    }

    fn close(&self, id: u64) {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }

    /// Hands a chunk from node `node_id`'s agent to the download waiting for it. Only the node
    /// that was asked may answer: a chunk from any other node is dropped. Never blocks the
    /// agent's session: a window always fits the channel, and chunks of finished downloads
    /// are dropped.
    pub(crate) fn deliver(&self, node_id: i64, chunk: pb::FileChunk) {
        let tx = {
            let waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            match waiting.get(&chunk.request_id) {
                Some(w) if w.node_id != node_id => {
                    tracing::warn!(
                        node_id,
                        asked = w.node_id,
                        request_id = chunk.request_id,
                        "dropped a live read chunk from a node that was not asked"
                    );
                    return;
                }
                Some(w) => Some(w.tx.clone()),
                None => None,
            }
        };
        match tx {
            Some(tx) => {
                if tx.try_send(chunk).is_err() {
                    tracing::debug!("live read chunk dropped: its download ended or overran its window");
                }
            }
            None => tracing::debug!(request_id = chunk.request_id, "chunk for a live read that ended"),
        }
    }
}

/// Removes the request from [`Reads`] however the download ends.
struct Registration {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.reads.close(self.id);
    }
}

/// Streams `path` from the workspace of a running attempt: the file's content as it is while
/// it is read (a file still growing is read up to where it ends then). Fails before streaming
/// when the agent refuses the path or is not connected to this server.
pub(crate) async fn read(
    shared: Arc<Shared>,
    attempt: &LiveAttempt,
    path: &str,
) -> Result<ChunkStream, Status> {
    let session = {
        let sessions = shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.get(&attempt.node_id).map(|s| s.tx.clone())
    };
    let Some(session) = session else {
        return Err(Status::unavailable(format!(
            "task `{}` is running on a node not connected to this server; try again, or ask the server it is connected to",
            attempt.task_name
        )));
    };
    let (id, mut chunks) = shared.reads.open(attempt.node_id);
    let registration = Registration { shared: shared.clone(), id };
    let attempt_id = attempt.attempt_id;
    let path = path.to_string();
    let ask = move |offset: u64| {
        let session = session.clone();
        let path = path.clone();
        async move {
            let msg = pb::ServerMessage {
                msg: Some(Out::ReadFile(pb::ReadFile {
                    request_id: id,
                    attempt_id,
                    path,
                    offset,
                    length: WINDOW,
                })),
            };
            session.send(Ok(msg)).await.map_err(|_| Status::unavailable("the agent disconnected"))
        }
    };
    ask(0).await?;
    let first = next_chunk(&mut chunks).await?;
    let (tx, rx) = mpsc::channel(4);
    let open = shared.streams.open(StreamKind::LiveFile);
    tokio::spawn(async move {
        let _open = open;
        let _registration = registration;
        let mut offset = 0u64;
        let mut chunk = first;
        let mut first_chunk = true;
        loop {
            offset += chunk.data.len() as u64;
            let (last, eof) = (chunk.last, chunk.eof);
            let out = pb::BlobChunk {
                digest: String::new(),
                size: if first_chunk { chunk.size } else { 0 },
                data: chunk.data,
                project: String::new(),
            };
            first_chunk = false;
            if tx.send(Ok(out)).await.is_err() {
                return;
            }
            if last && eof {
                tracing::debug!(attempt_id, bytes = offset, "live read done");
                return;
            }
            if last && let Err(e) = ask(offset).await {
                let _ = tx.send(Err(e)).await;
                return;
            }
            // The agent may take a while to answer; a client that left meanwhile ends the read
            // now rather than when the next window arrives.
            let next = tokio::select! {
                next = next_chunk(&mut chunks) => next,
                _ = tx.closed() => {
                    tracing::debug!(attempt_id, bytes = offset, "live read client left");
                    return;
                }
            };
            chunk = match next {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}

async fn next_chunk(chunks: &mut mpsc::Receiver<pb::FileChunk>) -> Result<pb::FileChunk, Status> {
    match tokio::time::timeout(AGENT_TIMEOUT, chunks.recv()).await {
        Ok(Some(c)) if c.error.is_empty() => Ok(c),
        Ok(Some(c)) => Err(Status::failed_precondition(c.error)),
        Ok(None) => Err(Status::unavailable("the live read was dropped")),
        Err(_) => Err(Status::unavailable(format!(
            "the agent did not answer within {}s; it may be gone",
            AGENT_TIMEOUT.as_secs()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_node_asked_may_answer_a_live_read() {
        let reads = Reads::default();
        let (id, mut rx) = reads.open(7);
        let chunk = |data: &[u8]| pb::FileChunk { request_id: id, data: data.to_vec(), ..Default::default() };
        reads.deliver(8, chunk(b"forged"));
        reads.deliver(7, chunk(b"real"));
        assert_eq!(rx.try_recv().unwrap().data, b"real");
        assert!(rx.try_recv().is_err(), "the other node's chunk was dropped");
    }
}
