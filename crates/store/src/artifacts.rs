//! Artifacts: the outputs attempts kept. The store records where each one is (a blob digest);
//! the bytes live in the blob store.

use async_trait::async_trait;

use crate::{Applied, Page, PageRequest, Result, TaskFilter};

/// One kept output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactRecord {
    /// Task id.
    pub task_id: i64,
    /// Task name.
    pub task_name: String,
    /// Frame of an array task.
    pub frame: Option<i64>,
    /// Attempt number that produced it.
    pub attempt: u32,
    /// Path relative to the workspace.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Blob digest, `sha256:...`.
    pub digest: String,
    /// When it was recorded.
    pub created_ms: i64,
}

/// A file an attempt reports as kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFile {
    /// Path relative to the workspace.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Blob digest.
    pub digest: String,
}

/// Where artifacts are recorded. Kept apart from [`crate::Store`]; only the API, the agent
/// sessions and the log archiver touch it (log archives are an attempt's artifact too).
#[async_trait]
pub trait ArtifactStore: crate::ArchiveStore {
    /// Records the outputs of an attempt that is still open (fenced like every report); the
    /// job's project then holds their blobs (see [`crate::AccessStore::blob_projects`]).
    async fn record_outputs(
        &self,
        attempt_id: i64,
        epoch: i64,
        files: &[OutputFile],
        now_ms: i64,
    ) -> Result<Applied>;

    /// Artifacts of a job by task and path, newest attempt first per task and path (and of
    /// one attempt, the file kept last first).
    async fn artifacts(&self, job_id: i64, filter: &TaskFilter) -> Result<Vec<ArtifactRecord>>;

    /// A page of the [`artifacts`](Self::artifacts) of a job's tasks that `filter` selects, in
    /// the same order (by task, then path, newest attempt first).
    async fn list_artifacts(
        &self,
        job_id: i64,
        filter: &TaskFilter,
        page: &PageRequest,
    ) -> Result<Page<ArtifactRecord>>;
}
