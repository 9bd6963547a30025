//! Drover's durable state behind one [`Store`] trait. SQLite is the embedded default; the
//! PostgreSQL implementation follows the same contract, and one conformance suite
//! ([`conformance`]) runs against every backend.
//!
//! Every method that changes state commits before it returns, and every change to a task or job
//! appends an event with the job's next sequence number in the same transaction, so watch
//! streams never miss or reorder a change.
#![warn(missing_docs)]

pub mod access;
pub mod archive;
pub mod artifacts;
pub mod conformance;
mod decode;
mod event_row;
mod log_chunks;
pub mod pages;
#[cfg(any(test, feature = "test-support"))]
pub mod pg_test;
pub mod postgres;
mod record_rows;
mod records;
pub mod retention;
pub mod secrets;
pub mod sqlite;
pub mod tenancy;
mod update_batch;
mod usage;

use async_trait::async_trait;
use drover_core::JobPlan;
use drover_core::placement::Placement;
use drover_core::schedule_state::NodeBook;

pub use access::{
    AccessStore, JoinTokenRecord, KeyRecord, NodeCredentialRecord, ProjectRecord, Redeemed, RevokedNode,
};
pub use archive::{ArchiveStore, LiveAttempt, LogArchiveRecord, UnarchivedAttempt};
pub use artifacts::{ArtifactRecord, ArtifactStore, OutputFile};
pub use log_chunks::{BadChunk, LogChunk, OutputChunk};
pub use pages::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, Page, PageRequest};
pub use records::*;
pub use retention::RetentionStore;
pub use secrets::{SecretStore, valid_secret_name};
pub use tenancy::{AuditFilter, AuditRecord, Holding, JobMetered, TenantStore};
pub use usage::{JobUsage, RetiredUsage, UsageFilter};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed or could not be reached.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The SQLite database failed in a transaction run on the calling thread.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The caller handed in something malformed (output chunks whose heads do not describe
    /// their bytes); nothing was stored.
    #[error("invalid {what}: {detail}")]
    Invalid {
        /// What was refused.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// Migrations failed.
    #[error("cannot migrate the database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored value could not be decoded (a bug or a hand-edited database).
    #[error("corrupt {what} in the store: {detail}")]
    Corrupt {
        /// What was being decoded.
        what: &'static str,
        /// The decoder's complaint.
        detail: String,
    },
    /// The request names something that does not exist.
    #[error("{what} {id} not found")]
    NotFound {
        /// Kind of thing.
        what: &'static str,
        /// Its id.
        id: i64,
    },
}

/// A notice from one server to every server sharing the store (NOTIFY on PostgreSQL; a local
/// channel on SQLite, where one server owns the database).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Something of this job changed: watch and log streams should look again.
    Changed {
        /// The job.
        job_id: i64,
    },
    /// Tasks may be placeable: schedulers should run a round.
    Schedule,
    /// The server holding the node's session should tell its agent to stop the attempt.
    Cancel {
        /// Attempt to stop.
        attempt_id: i64,
        /// Node running it.
        node_id: i64,
    },
    /// The node's credential was revoked: the server holding its session ends it at once.
    NodeRevoked {
        /// The node.
        node_id: i64,
    },
}

/// Being the one server that runs a singleton loop (the lease reaper, the autoscaler).
pub trait Leadership: Send + Sync {
    /// Whether this server still leads; false once the lock was lost (e.g. its database
    /// connection broke), after which the loop must stop and try to lead again.
    fn is_held(&self) -> bool;
}

/// Short for results of the store.
pub type Result<T> = std::result::Result<T, StoreError>;

/// The control plane's durable state.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a validated job with its tasks (queued, or waiting when they have dependencies)
    /// and returns its id. Committed when this returns.
    async fn submit(&self, plan: &JobPlan, source: &str, filename: &str, now_ms: i64) -> Result<i64>;

    /// One job.
    async fn job(&self, job_id: i64) -> Result<Option<JobRecord>>;

    /// The tasks of a job, in submit order.
    async fn tasks(&self, job_id: i64) -> Result<Vec<TaskRecord>>;

    /// One job and its tasks (in submit order) as of one moment: read apart, a commit between
    /// the reads could show a job still running over tasks that all ended.
    async fn job_with_tasks(&self, job_id: i64) -> Result<Option<(JobRecord, Vec<TaskRecord>)>>;

    /// A page of jobs, newest first; without `include_final`, only jobs still queued or
    /// running; with `projects`, only jobs of those projects (the filter applies to every
    /// page, whatever the token says). See [`pages`] for sizes, tokens and errors.
    async fn list_jobs(
        &self,
        include_final: bool,
        projects: Option<&[String]>,
        page: &PageRequest,
    ) -> Result<Page<JobSummary>>;

    /// A page of [`nodes`](Self::nodes), by name.
    async fn list_nodes(&self, page: &PageRequest) -> Result<Page<NodeRecord>>;

    /// Events of a job with a sequence number above `after_seq`, in order.
    async fn events_after(&self, job_id: i64, after_seq: i64, limit: u32) -> Result<Vec<EventRecord>>;

    /// Cancels a job: tasks not yet placed end as cancelled at once; attempts on nodes are
    /// returned so the caller can tell their agents to stop them (they end as cancelled when
    /// the agent reports). `NotFound` if there is no such job.
    async fn cancel_job(&self, job_id: i64, now_ms: i64) -> Result<Vec<OpenAttempt>>;

    /// Registers (or re-registers) a node by name and starts a new epoch, one that no node ever
    /// had (epochs are unique across nodes and grow), so an attempt's `(id, epoch)` names the
    /// one node session it belongs to. Open attempts on the node that the agent does not list
    /// in `known_attempts` are lost; listed ones are adopted into the new epoch.
    async fn register_node(
        &self,
        node: &NodeSpec,
        known_attempts: &[i64],
        now_ms: i64,
    ) -> Result<NodeRegistration>;

    /// The project and plan of attempt `attempt_id` while it is open (its task's current
    /// attempt, not ended) on the node named `node`; `None` otherwise. What a restarted agent
    /// may learn again of an attempt it took over.
    async fn open_attempt_plan(
        &self,
        attempt_id: i64,
        node: &str,
    ) -> Result<Option<(String, drover_core::TaskPlan)>>;

    /// Open attempts on node `node_id` whose job was cancelled. A server asks a newly
    /// registered agent to stop them: a cancel sent while the node was away reached no one.
    async fn cancelled_attempts_on(&self, node_id: i64) -> Result<Vec<i64>>;

    /// Extends a node's lease. `false` when the epoch is stale (the agent must register again).
    async fn renew_lease(&self, node_id: i64, epoch: i64, lease_until_ms: i64, now_ms: i64) -> Result<bool>;

    /// Marks nodes whose lease ran out as down and settles their open attempts as lost.
    /// Returns the ids of the nodes marked down.
    async fn expire_nodes(&self, now_ms: i64) -> Result<Vec<i64>>;

    /// Every known node with what it has reserved.
    async fn nodes(&self) -> Result<Vec<NodeRecord>>;

    /// The queue as a feed, for schedulers that keep it in memory: with `since` = `None`,
    /// every queued task; with the cursor a previous call returned, every task that entered
    /// or left the queue since (a task may be reported again; never is a change missed).
    /// Cost: O(changes), whatever the queue's length.
    async fn queue_changes(&self, since: Option<i64>) -> Result<QueueChanges>;

    /// What a scheduler needs of the nodes in `node_ids` that are ready: labels, runtimes,
    /// capacity, and what each of their open attempts reserves. Others are left out.
    async fn node_books(&self, node_ids: &[i64]) -> Result<Vec<NodeBook>>;

    /// Applies a placement plan: each task still queued on a node still ready gets a new
    /// attempt, metered under the latest price version (see [`TenantStore::record_prices`]),
    /// and loses its reason (a hold's or a retry's no longer applies once it runs). Returns
    /// what to send to the agents, in plan order. Where replicas race (PostgreSQL), a
    /// placement whose task another replica took may be filled by an interchangeable queued
    /// task instead (same job, task name, resources, constraints and runtime); its
    /// [`Assignment::instead_of`] names the placed task.
    async fn assign(&self, plan: &[Placement], now_ms: i64) -> Result<Vec<Assignment>>;

    /// Records that an attempt started running: [`apply_updates`](Self::apply_updates) of one
    /// update.
    async fn attempt_started(&self, attempt_id: i64, epoch: i64, now_ms: i64) -> Result<Applied> {
        let update = AttemptUpdate::Started { attempt_id, epoch };
        Ok(self.apply_updates(&[update], now_ms).await?.pop().unwrap_or(Applied::Stale))
    }

    /// Records how an attempt ended (with the LLM tokens it used) and settles its task (final
    /// state or retry), releases dependents, and updates the job's state:
    /// [`apply_updates`](Self::apply_updates) of one update.
    async fn attempt_finished(&self, report: &AttemptReport, now_ms: i64) -> Result<Applied> {
        let update = AttemptUpdate::Finished(report.clone());
        Ok(self.apply_updates(&[update], now_ms).await?.pop().unwrap_or(Applied::Stale))
    }

    /// Compute and tokens per job, ordered by project and job id.
    async fn usage(&self, filter: &UsageFilter) -> Result<Vec<JobUsage>>;
    /// Applies several attempt updates in one transaction, in order, and returns one result
    /// per update. Each update is fenced on its own exactly as [`Store::attempt_started`] and
    /// [`Store::attempt_finished`] fence it: a stale or repeated one is `Stale` and changes
    /// nothing, without affecting the others. One commit for many updates is what lets one
    /// database keep up with many agents; nothing is visible before the commit.
    async fn apply_updates(&self, updates: &[AttemptUpdate], now_ms: i64) -> Result<Vec<Applied>>;

    /// Appends output of an attempt, as the agent shipped it: runs of lines, each stored
    /// without being split into lines. A chunk whose line lengths do not add up to its bytes
    /// is refused ([`StoreError::Invalid`]) and nothing is stored.
    ///
    /// `seq` is the number the agent gave the report (increasing across its reports and its
    /// restarts): a report numbered at or below the last one stored for the attempt was
    /// stored already, and is `Applied` again without storing anything. `None` always stores.
    async fn append_chunks(
        &self,
        attempt_id: i64,
        epoch: i64,
        seq: Option<u64>,
        chunks: &[OutputChunk],
    ) -> Result<Applied>;

    /// Appends output lines of an attempt.
    async fn append_output(&self, attempt_id: i64, epoch: i64, lines: &[OutputLine]) -> Result<Applied> {
        self.append_chunks(attempt_id, epoch, None, &OutputChunk::from_lines(lines)).await
    }

    /// Output of a job with a line id above `after_id`, optionally of one task, in order, as
    /// runs of lines: about `max_bytes` of it (whole stored chunks, at least one when there is
    /// any), so a reader resumes after the last line returned.
    async fn log_chunks_after(
        &self,
        job_id: i64,
        filter: &TaskFilter,
        after_id: i64,
        max_bytes: usize,
    ) -> Result<Vec<LogChunk>>;

    /// Output lines of a job with an id above `after_id`, optionally of one task, in order,
    /// one record per line (at most `limit`).
    async fn logs_after(
        &self,
        job_id: i64,
        filter: &TaskFilter,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<LogRecord>> {
        log_chunks::read_lines(after_id, limit, |after, max| {
            self.log_chunks_after(job_id, filter, after, max)
        })
        .await
    }

    /// Sends `signal` to every server sharing this store, this one included.
    async fn publish(&self, signal: Signal) -> Result<()>;

    /// Signals published by any server sharing this store. A receiver that lags behind gets
    /// `Lagged` and should treat it as "everything may have changed".
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Signal>;

    /// Tries to become the one server running the singleton loop `name`. `None` while another
    /// server leads.
    async fn try_lead(&self, name: &str) -> Result<Option<Box<dyn Leadership>>>;
}

impl From<BadChunk> for StoreError {
    fn from(e: BadChunk) -> StoreError {
        StoreError::Invalid { what: "output chunk", detail: e.to_string() }
    }
}
