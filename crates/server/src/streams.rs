//! Client streams that wait for something (watch, log follow, live file reads): how many are
//! open, and how their producers notice that the client left.
//!
//! Each stream is a task that feeds a channel the response body reads from. When the client
//! goes away, the transport (tonic or hyper) drops the body and with it the channel's receiver.
//! A producer that is sending learns it from the failed send; one that is waiting for a change
//! (or for an agent) would not until it had something to send, possibly never, so every wait
//! also races the sender's `closed()`. The producer holds a [`StreamGuard`] for its whole life:
//! the count of open streams is the count of producers still running, which is what a leak of
//! them would show.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// Longest a stream waits for a change before checking the store again anyway (a signal lost
/// between replicas only delays a stream by this much).
pub(crate) const POLL_FALLBACK: Duration = Duration::from_secs(1);

/// What a client stream serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamKind {
    /// A job's events (`Watch`).
    Watch,
    /// A job's output (`Logs`, and the HTTP logs route).
    Logs,
    /// A file read live from a running task's workspace.
    LiveFile,
}

impl StreamKind {
    fn index(self) -> usize {
        match self {
            StreamKind::Watch => 0,
            StreamKind::Logs => 1,
            StreamKind::LiveFile => 2,
        }
    }

    fn name(self) -> &'static str {
        match self {
            StreamKind::Watch => "watch",
            StreamKind::Logs => "logs",
            StreamKind::LiveFile => "live_file",
        }
    }
}

/// The client streams open on this server, by kind.
#[derive(Debug, Default, Clone)]
pub(crate) struct OpenStreams(Arc<[AtomicUsize; 3]>);

impl OpenStreams {
    /// Counts a stream as open until the returned guard is dropped.
    pub(crate) fn open(&self, kind: StreamKind) -> StreamGuard {
        let open = self.0[kind.index()].fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(kind = kind.name(), open, "client stream opened");
        StreamGuard { streams: self.clone(), kind }
    }

    /// Streams of `kind` open now.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn count(&self, kind: StreamKind) -> usize {
        self.0[kind.index()].load(Ordering::Relaxed)
    }
}

/// An open stream, counted until dropped (however its producer ends: done, error, client gone,
/// or panic).
#[derive(Debug)]
pub(crate) struct StreamGuard {
    streams: OpenStreams,
    kind: StreamKind,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let open = self.streams.0[self.kind.index()].fetch_sub(1, Ordering::Relaxed) - 1;
        tracing::debug!(kind = self.kind.name(), open, "client stream closed");
    }
}

/// Waits until `changes` moves, [`POLL_FALLBACK`] passes, or the client reading from `tx`'s
/// channel goes away. `false` means the client left and the stream should end.
pub(crate) async fn wait_for_change<T>(changes: &mut watch::Receiver<u64>, tx: &mpsc::Sender<T>) -> bool {
    tokio::select! {
        _ = tx.closed() => false,
        _ = tokio::time::timeout(POLL_FALLBACK, changes.changed()) => true,
    }
}

#[cfg(test)]
mod tests;
