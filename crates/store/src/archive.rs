//! What outlives a running attempt: its log, archived as one blob when it ends, and the
//! attempt's whereabouts while it runs (so files can be read from its workspace live).
//!
//! Archiving replaces the attempt's live log rows in one transaction, so at every moment each
//! line is either a live row or in an archive, never neither.

use async_trait::async_trait;

use crate::{LogChunk, LogRecord, Result, TaskFilter};

/// An attempt still on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveAttempt {
    /// Attempt id.
    pub attempt_id: i64,
    /// The node running it.
    pub node_id: i64,
    /// Task id.
    pub task_id: i64,
    /// Task name.
    pub task_name: String,
    /// Frame of an array task.
    pub frame: Option<i64>,
}

/// An ended attempt whose log is not archived yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnarchivedAttempt {
    /// Attempt id.
    pub attempt_id: i64,
    /// Job id.
    pub job_id: i64,
    /// Task id.
    pub task_id: i64,
}

/// Where an attempt's archived log is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogArchiveRecord {
    /// Attempt id.
    pub attempt_id: i64,
    /// Task id.
    pub task_id: i64,
    /// Task name.
    pub task_name: String,
    /// Frame of an array task.
    pub frame: Option<i64>,
    /// Attempt number.
    pub attempt: u32,
    /// Blob digest, `sha256:...`.
    pub digest: String,
    /// Blob size in bytes.
    pub size: u64,
    /// When it was archived.
    pub archived_ms: i64,
}

/// Log archives and live attempts.
#[async_trait]
pub trait ArchiveStore: Send + Sync + 'static {
    /// The attempts of a job's tasks that have not ended, newest first.
    async fn live_attempts(&self, job_id: i64, filter: &TaskFilter) -> Result<Vec<LiveAttempt>>;

    /// Up to `limit` ended attempts whose log was never archived, oldest first.
    async fn unarchived_attempts(&self, limit: u32) -> Result<Vec<UnarchivedAttempt>>;

    /// The live output of one attempt with a line id above `after_id`, in order, as runs of
    /// lines: about `max_bytes` of it, like [`crate::Store::log_chunks_after`].
    async fn attempt_log_chunks(
        &self,
        attempt_id: i64,
        after_id: i64,
        max_bytes: usize,
    ) -> Result<Vec<LogChunk>>;

    /// The live log lines of one attempt with an id above `after_id`, in order (at most
    /// `limit`).
    async fn attempt_log(&self, attempt_id: i64, after_id: i64, limit: u32) -> Result<Vec<LogRecord>> {
        crate::log_chunks::read_lines(after_id, limit, |after, max| {
            self.attempt_log_chunks(attempt_id, after, max)
        })
        .await
    }

    /// Records that an ended attempt's log is stored as the blob `digest` and deletes its live
    /// rows, in one transaction; the job's project then holds the blob (see
    /// [`crate::AccessStore::blob_projects`]). Recording an attempt twice keeps the first archive.
    async fn record_log_archive(&self, attempt_id: i64, digest: &str, size: u64, now_ms: i64) -> Result<()>;

    /// The archived logs of a job's tasks, in attempt order.
    async fn log_archives(&self, job_id: i64, filter: &TaskFilter) -> Result<Vec<LogArchiveRecord>>;

    /// Forgets up to `limit` archives made before `before_ms` and returns the digests nothing
    /// (archive, artifact, stored job) refers to any more, recorded as unreferenced since
    /// `now_ms`: blob garbage collection deletes them after its grace period (see
    /// [`crate::RetentionStore`]).
    async fn expire_log_archives(&self, before_ms: i64, now_ms: i64, limit: u32) -> Result<Vec<String>>;
}
