//! Retention: ended jobs past their project's retention are deleted with everything they own,
//! and the blobs they were the last to point to are garbage-collected.
//!
//! A blob is referenced while any of these points to it: an artifact row (an output), an
//! attempt's log archive, or a stored job whose plan names it (`job_blobs`: input uploads and
//! shipped image archives). `project_blobs` is not a reference but a grant (which projects may
//! read it); it goes when the blob does.
//!
//! A blob file is deleted in three steps, so that a new reference made while it is being
//! deleted never points to a missing file:
//!
//! 1. When something drops a blob's last reference (a job deleted, a log archive expired), the
//!    digest is recorded in `unreferenced_blobs` with the time.
//! 2. [`RetentionStore::doom_blobs`] picks digests unreferenced for longer than a grace period,
//!    checks again that nothing points to them, and marks them `deleting` in one transaction;
//!    the caller then deletes the files and calls [`RetentionStore::blobs_deleted`].
//! 3. Every blob written by an upload or the log archiver is claimed after it is written
//!    ([`RetentionStore::claim_blob`]): the claim drops the digest's `unreferenced_blobs` row
//!    when something points to the blob, or marks it unreferenced from now when nothing does
//!    yet (so an upload no job ever names is collected after the grace too), or fails while
//!    the digest is `deleting`; the writer checks the file exists after the claim. A claim
//!    before step 2 restarts the grace; one during it is refused (the writer tries again
//!    later); one after it finds the file gone and writes it anew.
//!
//! The grace period covers what no claim covers: a job submitted with a digest its project
//! uploaded long ago, while another job's deletion has just orphaned the same digest.

use std::collections::BTreeSet;

use async_trait::async_trait;
use drover_core::{InputSource, JobPlan};

use crate::Result;

/// Deleting old jobs and collecting the blobs nobody points to. Every method commits before it
/// returns.
#[async_trait]
pub trait RetentionStore: Send + Sync + 'static {
    /// Up to `limit` jobs of `project` that ended before `ended_before_ms`, oldest end first.
    /// Jobs still queued or running, or with an attempt whose log is not archived yet, are
    /// not listed.
    async fn expired_jobs(&self, project: &str, ended_before_ms: i64, limit: u32) -> Result<Vec<i64>>;

    /// Deletes an ended job with its tasks, attempts, events, output, artifact and log archive
    /// records, in one transaction, and returns the digests it held the last reference to
    /// (recorded as unreferenced since `now_ms`). `None`, with nothing deleted, when there is
    /// no such job, it has not ended, or an attempt's log is not archived yet.
    async fn delete_job(&self, job_id: i64, now_ms: i64) -> Result<Option<Vec<String>>>;

    /// Up to `limit` digests unreferenced since before `unreferenced_before_ms` that nothing
    /// points to now, marked as being deleted: the caller deletes their files, then calls
    /// [`blobs_deleted`](Self::blobs_deleted). No project holds them any more. A digest found
    /// referenced again loses its unreferenced mark.
    async fn doom_blobs(&self, unreferenced_before_ms: i64, limit: u32) -> Result<Vec<String>>;

    /// Ends the deletion of blobs [`doom_blobs`](Self::doom_blobs) returned: their digests may
    /// be uploaded and referenced again.
    async fn blobs_deleted(&self, digests: &[String]) -> Result<()>;

    /// Claims a blob just written at `now_ms`. A blob something points to is no longer
    /// unreferenced; one nothing points to yet (an upload its job has not named so far) is
    /// unreferenced from `now_ms`, so the collector takes it after the grace unless a
    /// reference comes first. `false` while its deletion is under way: the writer must write
    /// it again later.
    async fn claim_blob(&self, digest: &str, now_ms: i64) -> Result<bool>;

    /// Whether anything (an artifact, a log archive, a stored job's plan) points to `digest`.
    async fn blob_referenced(&self, digest: &str) -> Result<bool>;
}

/// The blobs a plan names: input uploads and shipped image archives.
pub(crate) fn plan_blobs(plan: &JobPlan) -> BTreeSet<&str> {
    let images = plan.tasks.iter().filter_map(|t| t.image_blob.as_deref());
    let inputs = plan.tasks.iter().flat_map(|t| &t.inputs).filter_map(|i| match &i.source {
        InputSource::Blob { digest, .. } => Some(digest.as_str()),
        _ => None,
    });
    images.chain(inputs).collect()
}

/// SQL whose one row says whether anything points to the digest named `:d` (each dialect puts
/// its own placeholder in with [`referenced_sql`]).
const REFERENCED_SQL: &str = "SELECT EXISTS (SELECT 1 FROM artifacts WHERE digest = :d) \
     OR EXISTS (SELECT 1 FROM attempts WHERE log_digest = :d) \
     OR EXISTS (SELECT 1 FROM job_blobs WHERE digest = :d)";

/// [`REFERENCED_SQL`] with `placeholder` (`?1`, `$1`) for the digest.
pub(crate) fn referenced_sql(placeholder: &str) -> String {
    REFERENCED_SQL.replace(":d", placeholder)
}

/// The tables whose rows belong to one job, by `job_id`, children first.
pub(crate) const JOB_TABLES: [&str; 8] =
    ["log_chunks", "events", "artifacts", "attempts", "task_deps", "task_groups", "tasks", "job_blobs"];
