//! The PostgreSQL store: many `drover server` replicas share one database.
//!
//! Same contract as [`crate::sqlite`], but writers run concurrently, so every transaction
//! relies on row locks rather than on a single writer:
//!
//! - **Claims.** `assign` locks the chosen nodes, admits placements that still fit, and claims
//!   tasks with `UPDATE tasks ... WHERE state = 'queued' AND id IN (... FOR UPDATE SKIP
//!   LOCKED) RETURNING`: a task that another replica claimed (or is claiming) is skipped, so no task is ever placed twice and no node is
//!   over-committed by two schedulers working from the same snapshot.
//! - **Fencing.** Reports lock their attempt row (`FOR NO KEY UPDATE`) before checking that it
//!   is open, current and of the right epoch, so a duplicated report is applied once.
//! - **Events.** Every event writer first advances `jobs.last_seq` with an `UPDATE`, which holds
//!   the job's row lock until commit: per-job sequence numbers are consecutive, unique, and
//!   committed in order, so a reader that saw `seq = n` never misses `n - 1`. Every change to a
//!   job's tasks happens under that same lock, which also keeps derived job states exact.
//! - **Log lines** of one job are appended under a per-job transaction advisory lock, so their
//!   ids are committed in increasing order and `logs_after` cursors never skip a line.
//!
//! To never deadlock, writers take row locks in one order: **nodes → attempts → jobs (by id)
//! → tasks** (revoking a node locks its credentials right after the node). Locks of several
//! rows of one table are taken in one statement ordered by id.
//! One refinement keeps the job lock (which serialises a job's writers) short: a task with an
//! open attempt is only ever written by the holder of that attempt's lock (`cancel_job`,
//! `assign` and dependency release touch only waiting or queued tasks), so `attempt_started`
//! updates such a task before `emit` takes the job's lock.
//! Queue reasons (`tenancy`) are the one write to tasks without the job's lock: a reason is
//! not a state and appends no event, and those writes lock only task rows, in id order with
//! `SKIP LOCKED`, so they never wait for another writer and cannot be part of a deadlock.
//! Should PostgreSQL still abort a transaction as a deadlock victim or serialization failure,
//! it is run again (see `transaction!`).
//!
//! Wake-ups go through `NOTIFY drover_signals` (see `signals`), singleton loops run under a
//! session advisory lock on a dedicated connection (see `leader`).

mod leader;
mod signals;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use drover_core::dag::release_after;
use drover_core::outcome::{AttemptEnd, settle_task};
use drover_core::placement::{NodeLoad, Placement, admit};
use drover_core::schedule_state::NodeBook;
use drover_core::{JobPlan, JobState, NodeState, Resources, TaskPlan, TaskState};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Postgres, QueryBuilder, Row};

use crate::decode::{corrupt, json, lost_report, parse_word, to_json};
use crate::log_chunks;
use crate::record_rows::{JOB_COLUMNS, TASK_COLUMNS, job_record, task_record};
use crate::*;

/// Tasks per INSERT statement at submit; bounds the size of one statement for huge arrays.
const INSERT_CHUNK: usize = 5000;

/// How often a transaction aborted as a deadlock victim or serialization failure is tried.
const MAX_TRIES: u32 = 5;

/// First key of the per-job advisory locks that order log line ids (`drov` in ASCII).
const LOG_LOCK_CLASS: i32 = 0x6472_6f76;

/// Connections of the pool that [`PostgresStore::connect`] opens.
const DEFAULT_MAX_CONNECTIONS: u32 = 16;

/// The PostgreSQL implementation of [`Store`]. Cheap to clone; clones share the pool and the
/// signal listener, which stops when the last clone is dropped.
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// For the dedicated connections of leadership locks.
    options: PgConnectOptions,
    signals: tokio::sync::broadcast::Sender<Signal>,
    /// Aborts the NOTIFY listener task when the last clone goes away.
    _listener: Arc<signals::ListenerTask>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("host", &self.options.get_host())
            .field("port", &self.options.get_port())
            .field("database", &self.options.get_database())
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/database`), runs
    /// migrations, and starts listening for signals. Several servers may start at once:
    /// migrations run under PostgreSQL's advisory lock, so exactly one of them applies each.
    pub async fn connect(url: &str) -> Result<PostgresStore> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(DEFAULT_MAX_CONNECTIONS)
            .acquire_timeout(Duration::from_secs(10));
        PostgresStore::connect_with(options, pool).await
    }

    /// Like [`PostgresStore::connect`], with explicit connection and pool settings.
    pub async fn connect_with(options: PgConnectOptions, pool: PgPoolOptions) -> Result<PostgresStore> {
        let options = options.application_name("drover");
        migrate(&options).await?;
        let pool = pool.connect_with(options.clone()).await?;
        let (signals, _) = tokio::sync::broadcast::channel(1024);
        let listener = signals::ListenerTask::start(options.clone(), signals.clone()).await?;
        tracing::debug!(
            host = options.get_host(),
            port = options.get_port(),
            database = options.get_database(),
            "connected to postgresql"
        );
        Ok(PostgresStore { pool, options, signals, _listener: Arc::new(listener) })
    }

    /// The connection pool, for tests and tools that need raw access.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// Runs the migrations on a connection of their own. sqlx holds a session advisory lock
/// (keyed by the database name) while it migrates, so concurrent starts wait for each other;
/// closing the connection afterwards releases the lock even if a migration failed half-way.
async fn migrate(options: &PgConnectOptions) -> Result<()> {
    let mut conn = PgConnection::connect_with(options).await?;
    // `run_direct` is `run` without the `Acquire` bound that makes the future not `Send`
    // (sqlx's own workaround, doc-hidden but public).
    let result = sqlx::migrate!("migrations/postgres").run_direct(&mut conn).await;
    // Closing only matters for the lock; a failure here is the server's business.
    let _ = conn.close().await;
    Ok(result?)
}

/// Runs `$body` in a transaction on `$pool` and commits it when it returns `Ok`. The body is an
/// async block with `$tx` (a `Transaction`) in scope; a `return` in it ends the attempt. When
/// PostgreSQL aborted the transaction to break a deadlock or a serialization conflict, the
/// body runs again, up to `MAX_TRIES` times, since nothing of it was committed.
macro_rules! transaction {
    ($pool:expr, $op:literal, |$tx:ident| $body:block) => {{
        let mut tries = 0u32;
        loop {
            tries += 1;
            let mut $tx = $pool.begin().await?;
            let result: Result<_> = async { $body }.await;
            match result {
                Ok(value) => {
                    $tx.commit().await?;
                    break Ok(value);
                }
                Err(error) if tries < MAX_TRIES && retryable(&error) => {
                    tracing::warn!(op = $op, tries, %error, "transaction aborted by postgresql; trying again");
                    drop($tx);
                }
                Err(error) => break Err(error),
            }
        }
    }};
}

/// One job, read through `db` (a pool, or a transaction for a consistent view).
async fn read_job<'e>(db: impl sqlx::PgExecutor<'e>, job_id: i64) -> Result<Option<JobRecord>> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
    let row = sqlx::query(&sql).bind(job_id).fetch_optional(db).await?;
    row.as_ref().map(job_record).transpose()
}

/// The tasks of a job in submit order, read through `db`.
async fn read_tasks<'e>(db: impl sqlx::PgExecutor<'e>, job_id: i64) -> Result<Vec<TaskRecord>> {
    let sql = format!(
        "SELECT {TASK_COLUMNS} FROM tasks t LEFT JOIN nodes n ON n.id = t.node_id WHERE t.job_id = $1 ORDER BY t.id"
    );
    let rows = sqlx::query(&sql).bind(job_id).fetch_all(db).await?;
    rows.iter().map(task_record).collect()
}

/// Whether PostgreSQL aborted a transaction that may succeed when run again.
fn retryable(error: &StoreError) -> bool {
    match error {
        StoreError::Database(sqlx::Error::Database(db)) => {
            // 40P01 deadlock_detected, 40001 serialization_failure.
            matches!(db.code().as_deref(), Some("40P01" | "40001"))
        }
        _ => false,
    }
}

/// A column as `u32`/`u64` from a `BIGINT`: counts and sizes the store itself wrote.
fn get_u64(row: &PgRow, index: usize) -> Result<u64> {
    let value: i64 = row.try_get(index)?;
    u64::try_from(value).map_err(|e| corrupt("count", e))
}

/// A chunk read with the columns `c.id, c.task_id, t.name, t.frame, c.attempt, c.heads,
/// c.data`, in that order (every log query selects them so).
fn stored_chunk(r: &PgRow) -> Result<log_chunks::StoredChunk> {
    Ok(log_chunks::StoredChunk {
        id: r.try_get(0)?,
        task_id: r.try_get(1)?,
        task_name: r.try_get(2)?,
        frame: r.try_get(3)?,
        attempt: get_u32(r, 4)?,
        heads: r.try_get(5)?,
        data: r.try_get(6)?,
    })
}

fn get_u32(row: &PgRow, index: usize) -> Result<u32> {
    let value: i64 = row.try_get(index)?;
    u32::try_from(value).map_err(|e| corrupt("count", e))
}

// Declared after `transaction!`, which they use.
mod access;
mod archive;
mod artifacts;
mod assign;
mod dependencies;
mod events;
mod lists;
mod queue_feed;
mod retention;
mod secrets;
mod settle;
mod tenancy;
mod updates;

use events::{Ev, emit, lock_jobs, lock_jobs_reading_flags};
use settle::{
    AttemptLock, JobChanges, lose_node_attempts, open_attempt, refresh_jobs, requeue_undelivered,
    settle_attempt,
};

/// Columns of [`node_record`], in its order, over `nodes n` joined with the node's open
/// attempts `a`, grouped by node.
const NODE_COLUMNS: &str = "n.id, n.name, n.state, n.labels, n.cores, n.memory, \
     COALESCE(SUM(a.cores), 0)::BIGINT, COALESCE(SUM(a.memory), 0)::BIGINT, COUNT(a.id), n.last_seen_ms, \
     n.runtimes";

/// Nodes with their reservations; with `live_at`, only ready nodes whose lease lasts until then.
async fn node_records(pool: &PgPool, live_at: Option<i64>) -> Result<Vec<NodeRecord>> {
    let filter = if live_at.is_some() { "WHERE n.state = 'ready' AND n.lease_until_ms >= $1" } else { "" };
    let sql = format!(
        "SELECT {NODE_COLUMNS} \
         FROM nodes n LEFT JOIN attempts a ON a.node_id = n.id AND a.state <> 'ended' {filter} \
         GROUP BY n.id ORDER BY n.name"
    );
    let mut query = sqlx::query(&sql);
    if let Some(now_ms) = live_at {
        query = query.bind(now_ms);
    }
    let rows = query.fetch_all(pool).await?;
    rows.iter().map(node_record).collect()
}

/// A node read with [`NODE_COLUMNS`].
fn node_record(r: &PgRow) -> Result<NodeRecord> {
    Ok(NodeRecord {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        state: parse_word::<NodeState>("node state", r.try_get::<&str, _>(2)?)?,
        labels: json("labels", r.try_get::<&str, _>(3)?)?,
        cores: get_u32(r, 4)?,
        memory: get_u64(r, 5)?,
        cores_used: get_u32(r, 6)?,
        memory_used: get_u64(r, 7)?,
        running: get_u32(r, 8)?,
        last_seen_ms: r.try_get(9)?,
        runtimes: json("runtimes", r.try_get::<&str, _>(10)?)?,
    })
}

#[async_trait]
impl Store for PostgresStore {
    async fn submit(&self, plan: &JobPlan, source: &str, filename: &str, now_ms: i64) -> Result<i64> {
        let has_deps = plan.tasks.iter().any(|t| !t.depends_on.is_empty());
        // Everything that can fail without the database, before the transaction.
        let mut rows = Vec::with_capacity(plan.tasks.len());
        for t in &plan.tasks {
            let state = if t.depends_on.is_empty() { TaskState::Queued } else { TaskState::Waiting };
            rows.push((t, state, to_json("task plan", t)?, to_json("constraints", &t.constraints)?));
        }
        let labels = to_json("labels", &plan.labels)?;
        let job_id = transaction!(self.pool, "submit", |tx| {
            let job_id: i64 = sqlx::query_scalar(
                "INSERT INTO jobs (name, project, priority, labels, source, filename, state, has_deps, created_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7, $8) RETURNING id",
            )
            .bind(&plan.name)
            .bind(&plan.project)
            .bind(plan.priority)
            .bind(&labels)
            .bind(source)
            .bind(filename)
            .bind(has_deps)
            .bind(now_ms)
            .fetch_one(&mut *tx)
            .await?;
            let mut events = Vec::with_capacity(rows.len() + 1);
            let mut graph = Vec::new();
            events.push(Ev::job(
                job_id,
                JobState::Queued,
                format!("submitted with {} tasks", plan.tasks.len()),
            ));
            for chunk in rows.chunks(INSERT_CHUNK) {
                // Ids are drawn first so that they follow submit order, which `tasks` reports
                // in; an INSERT ... SELECT does not promise to draw them in row order.
                let mut ids: Vec<i64> =
                    sqlx::query_scalar("SELECT nextval('tasks_id_seq') FROM generate_series(1, $1)")
                        .bind(chunk.len() as i64)
                        .fetch_all(&mut *tx)
                        .await?;
                ids.sort_unstable();
                sqlx::query(
                    "INSERT INTO tasks (id, job_id, name, frame, plan, priority, cores, memory, constraints, runtime, state, \
                     deps_left) \
                     SELECT u.id, $1, u.name, u.frame, u.plan, $2, u.cores, u.memory, u.constraints, u.runtime, u.state, \
                     u.deps_left \
                     FROM UNNEST($3::BIGINT[], $4::TEXT[], $5::BIGINT[], $6::TEXT[], $7::BIGINT[], $8::BIGINT[], \
                                 $9::TEXT[], $10::TEXT[], $11::TEXT[], $12::BIGINT[]) \
                          AS u(id, name, frame, plan, cores, memory, constraints, runtime, state, deps_left)",
                )
                .bind(job_id)
                .bind(plan.priority)
                .bind(&ids)
                .bind(chunk.iter().map(|(t, ..)| t.name.as_str()).collect::<Vec<_>>())
                .bind(chunk.iter().map(|(t, ..)| t.frame).collect::<Vec<_>>())
                .bind(chunk.iter().map(|(_, _, p, _)| p.as_str()).collect::<Vec<_>>())
                .bind(chunk.iter().map(|(t, ..)| i64::from(t.resources.cores)).collect::<Vec<_>>())
                .bind(chunk.iter().map(|(t, ..)| t.resources.memory as i64).collect::<Vec<_>>())
                .bind(chunk.iter().map(|(_, _, _, c)| c.as_str()).collect::<Vec<_>>())
                .bind(chunk.iter().map(|(t, ..)| t.runtime.as_str()).collect::<Vec<_>>())
                .bind(chunk.iter().map(|(_, s, ..)| s.as_str()).collect::<Vec<_>>())
                .bind(chunk.iter().map(|(t, ..)| t.depends_on.len() as i64).collect::<Vec<_>>())
                .execute(&mut *tx)
                .await?;
                for ((t, state, _, _), id) in chunk.iter().zip(ids) {
                    events.push(Ev::task(job_id, id, &t.name, t.frame, *state));
                    if has_deps {
                        graph.push((id, t.name.as_str(), t.depends_on.as_slice()));
                    }
                }
            }
            if has_deps {
                dependencies::record_graph(&mut tx, job_id, &graph).await?;
            }
            let digests: Vec<&str> = crate::retention::plan_blobs(plan).into_iter().collect();
            sqlx::query(
                "INSERT INTO job_blobs (job_id, digest) SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING",
            )
            .bind(job_id)
            .bind(&digests)
            .execute(&mut *tx)
            .await?;
            emit(&mut tx, now_ms, events).await?;
            Ok(job_id)
        })?;
        tracing::debug!(job_id, tasks = plan.tasks.len(), "job submitted");
        Ok(job_id)
    }

    async fn job(&self, job_id: i64) -> Result<Option<JobRecord>> {
        read_job(&self.pool, job_id).await
    }

    async fn tasks(&self, job_id: i64) -> Result<Vec<TaskRecord>> {
        read_tasks(&self.pool, job_id).await
    }

    async fn job_with_tasks(&self, job_id: i64) -> Result<Option<(JobRecord, Vec<TaskRecord>)>> {
        // Under the default READ COMMITTED every statement sees its own snapshot; REPEATABLE
        // READ gives both reads the transaction's first one.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
        let Some(job) = read_job(&mut *tx, job_id).await? else { return Ok(None) };
        let tasks = read_tasks(&mut *tx, job_id).await?;
        tx.commit().await?;
        Ok(Some((job, tasks)))
    }

    async fn list_jobs(
        &self,
        include_final: bool,
        projects: Option<&[String]>,
        page: &PageRequest,
    ) -> Result<Page<JobSummary>> {
        lists::jobs(&self.pool, include_final, projects, page).await
    }

    async fn list_nodes(&self, page: &PageRequest) -> Result<Page<NodeRecord>> {
        lists::nodes(&self.pool, page).await
    }

    async fn events_after(&self, job_id: i64, after_seq: i64, limit: u32) -> Result<Vec<EventRecord>> {
        let rows = sqlx::query(
            "SELECT job_id, seq, time_ms, kind, task_id, task_name, frame, state, message, exit_code, attempt, node \
             FROM events WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(job_id)
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(EventRecord {
                    job_id: r.try_get(0)?,
                    seq: r.try_get(1)?,
                    time_ms: r.try_get(2)?,
                    kind: r.try_get(3)?,
                    task_id: r.try_get(4)?,
                    task_name: r.try_get(5)?,
                    frame: r.try_get(6)?,
                    state: r.try_get(7)?,
                    message: r.try_get(8)?,
                    exit_code: r.try_get(9)?,
                    attempt: get_u32(r, 10)?,
                    node: r.try_get(11)?,
                })
            })
            .collect()
    }

    async fn cancel_job(&self, job_id: i64, now_ms: i64) -> Result<Vec<OpenAttempt>> {
        let open = transaction!(self.pool, "cancel_job", |tx| {
            // Takes the job's row lock first: tasks are changed only under it.
            let found = sqlx::query("UPDATE jobs SET cancelled = TRUE WHERE id = $1")
                .bind(job_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if found == 0 {
                return Err(StoreError::NotFound { what: "job", id: job_id });
            }
            let pending = sqlx::query(
                "UPDATE tasks SET state = 'cancelled', reason = 'cancelled by user', ended_ms = $1 \
                 WHERE job_id = $2 AND state IN ('waiting', 'queued') RETURNING id, name, frame",
            )
            .bind(now_ms)
            .bind(job_id)
            .fetch_all(&mut *tx)
            .await?;
            let mut events = Vec::with_capacity(pending.len());
            for r in &pending {
                let mut ev = Ev::task(
                    job_id,
                    r.try_get(0)?,
                    r.try_get::<&str, _>(1)?,
                    r.try_get(2)?,
                    TaskState::Cancelled,
                );
                ev.message = "cancelled by user".into();
                events.push(ev);
            }
            emit(&mut tx, now_ms, events).await?;
            let open = sqlx::query_as::<_, (i64, i64)>(
                "SELECT a.id, a.node_id FROM attempts a JOIN tasks t ON t.current_attempt = a.id \
                 WHERE t.job_id = $1 AND a.state <> 'ended' ORDER BY a.id",
            )
            .bind(job_id)
            .fetch_all(&mut *tx)
            .await?;
            refresh_jobs(&mut tx, &[job_id], now_ms).await?;
            Ok(open)
        })?;
        tracing::debug!(job_id, open = open.len(), "job cancelled");
        Ok(open.into_iter().map(|(attempt_id, node_id)| OpenAttempt { attempt_id, node_id }).collect())
    }

    async fn register_node(
        &self,
        node: &NodeSpec,
        known_attempts: &[i64],
        now_ms: i64,
    ) -> Result<NodeRegistration> {
        let labels = to_json("labels", &node.labels)?;
        let runtimes = to_json("runtimes", &node.runtimes)?;
        let known: HashSet<i64> = known_attempts.iter().copied().collect();
        let reg = transaction!(self.pool, "register_node", |tx| {
            // Epochs come from one sequence, so no two registrations of any nodes share one and
            // an attempt's (id, epoch) names the one node session it belongs to. A retried
            // transaction draws a new value; gaps are harmless.
            let (node_id, epoch): (i64, i64) = sqlx::query_as(
                "INSERT INTO nodes (name, state, labels, cores, memory, runtimes, epoch, lease_until_ms, last_seen_ms) \
                 VALUES ($1, 'ready', $2, $3, $4, $5, nextval('node_epochs'), $6, $7) \
                 ON CONFLICT (name) DO UPDATE SET state = 'ready', labels = excluded.labels, \
                 cores = excluded.cores, memory = excluded.memory, runtimes = excluded.runtimes, \
                 epoch = excluded.epoch, lease_until_ms = excluded.lease_until_ms, \
                 last_seen_ms = excluded.last_seen_ms \
                 RETURNING id, epoch",
            )
            .bind(&node.name)
            .bind(&labels)
            .bind(i64::from(node.cores))
            .bind(node.memory as i64)
            .bind(&runtimes)
            .bind(node.lease_until_ms)
            .bind(now_ms)
            .fetch_one(&mut *tx)
            .await?;
            let reg = NodeRegistration { node_id, epoch };
            // Lock order: the node (above), its open attempts, their jobs, then tasks.
            let open: Vec<(i64, String, i64, i64)> = sqlx::query_as(
                "SELECT id, state, job_id, task_id FROM attempts WHERE node_id = $1 AND state <> 'ended' \
                 ORDER BY id FOR NO KEY UPDATE",
            )
            .bind(node_id)
            .fetch_all(&mut *tx)
            .await?;
            let jobs: Vec<i64> = open.iter().map(|(_, _, job_id, _)| *job_id).collect();
            lock_jobs(&mut tx, &jobs).await?;
            let adopted: Vec<i64> = open.iter().map(|(id, ..)| *id).filter(|id| known.contains(id)).collect();
            if !adopted.is_empty() {
                sqlx::query("UPDATE attempts SET epoch = $1 WHERE id = ANY($2)")
                    .bind(epoch)
                    .bind(&adopted)
                    .execute(&mut *tx)
                    .await?;
            }
            let mut changes = JobChanges::default();
            for (attempt_id, state, _, task_id) in &open {
                if known.contains(attempt_id) {
                    continue;
                }
                if state == "assigned" {
                    // The agent never received it (the assignment went to a session that was
                    // already gone): hand it back without spending one of the task's retries.
                    requeue_undelivered(&mut tx, &mut changes, *attempt_id, *task_id, now_ms).await?;
                } else if let Some(a) = open_attempt(&mut tx, *attempt_id, None, AttemptLock::Update).await? {
                    let report = lost_report(*attempt_id, epoch, "the agent restarted without it");
                    settle_attempt(&mut tx, &mut changes, &a, &report, now_ms).await?;
                }
            }
            changes.write(&mut tx, now_ms).await?;
            Ok((reg, adopted.len(), open.len()))
        });
        let (reg, adopted, open) = reg?;
        tracing::info!(node = %node.name, node_id = reg.node_id, epoch = reg.epoch, adopted, lost = open - adopted, "node registered");
        Ok(reg)
    }

    async fn open_attempt_plan(&self, attempt_id: i64, node: &str) -> Result<Option<(String, TaskPlan)>> {
        let row: Option<(String, String)> = sqlx::query_as(
            "SELECT j.project, t.plan FROM attempts a JOIN tasks t ON t.id = a.task_id \
             JOIN jobs j ON j.id = a.job_id JOIN nodes n ON n.id = a.node_id \
             WHERE a.id = $1 AND n.name = $2 AND a.state <> 'ended' AND t.current_attempt = a.id",
        )
        .bind(attempt_id)
        .bind(node)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|(project, plan)| Ok((project, json("task plan", &plan)?))).transpose()
    }

    async fn cancelled_attempts_on(&self, node_id: i64) -> Result<Vec<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT a.id FROM attempts a JOIN jobs j ON j.id = a.job_id \
             WHERE a.node_id = $1 AND a.state <> 'ended' AND j.cancelled ORDER BY a.id",
        )
        .bind(node_id)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn renew_lease(&self, node_id: i64, epoch: i64, lease_until_ms: i64, now_ms: i64) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE nodes SET lease_until_ms = $1, last_seen_ms = $2 WHERE id = $3 AND epoch = $4 AND state <> 'down'",
        )
        .bind(lease_until_ms)
        .bind(now_ms)
        .bind(node_id)
        .bind(epoch)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    async fn expire_nodes(&self, now_ms: i64) -> Result<Vec<i64>> {
        let expired = transaction!(self.pool, "expire_nodes", |tx| {
            let expired: Vec<(i64, String)> = sqlx::query_as(
                "UPDATE nodes SET state = 'down' WHERE id IN ( \
                     SELECT id FROM nodes WHERE state IN ('ready', 'draining') AND lease_until_ms < $1 \
                     ORDER BY id FOR NO KEY UPDATE) \
                 RETURNING id, name",
            )
            .bind(now_ms)
            .fetch_all(&mut *tx)
            .await?;
            if expired.is_empty() {
                return Ok(expired);
            }
            let names: HashMap<i64, &str> = expired.iter().map(|(id, name)| (*id, name.as_str())).collect();
            let node_ids: Vec<i64> = expired.iter().map(|(id, _)| *id).collect();
            let why = |node_id: i64| {
                let name = names.get(&node_id).copied().unwrap_or_default();
                format!("node {name} went silent past its lease")
            };
            lose_node_attempts(&mut tx, &node_ids, &why, now_ms).await?;
            Ok(expired)
        })?;
        for (node_id, name) in &expired {
            tracing::warn!(node_id, node = %name, "node lease expired; marked down");
        }
        Ok(expired.into_iter().map(|(id, _)| id).collect())
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>> {
        node_records(&self.pool, None).await
    }

    async fn queue_changes(&self, since: Option<i64>) -> Result<QueueChanges> {
        queue_feed::queue_changes(&self.pool, since).await
    }

    async fn node_books(&self, node_ids: &[i64]) -> Result<Vec<NodeBook>> {
        queue_feed::node_books(&self.pool, node_ids).await
    }

    async fn assign(&self, plan: &[Placement], now_ms: i64) -> Result<Vec<Assignment>> {
        assign::assign(&self.pool, plan, now_ms).await
    }

    async fn apply_updates(&self, updates: &[AttemptUpdate], now_ms: i64) -> Result<Vec<Applied>> {
        if updates.is_empty() {
            return Ok(Vec::new());
        }
        let applied = transaction!(self.pool, "apply_updates", |tx| {
            updates::apply(&mut tx, updates, now_ms).await
        })?;
        let stale = applied.iter().filter(|a| **a == Applied::Stale).count();
        tracing::debug!(updates = updates.len(), stale, "attempt updates applied in one transaction");
        Ok(applied)
    }

    async fn usage(&self, filter: &UsageFilter) -> Result<Vec<JobUsage>> {
        let mut q = QueryBuilder::<Postgres>::new(
            "SELECT j.project, j.id, j.name, (SELECT COUNT(*) FROM tasks t WHERE t.job_id = j.id)::BIGINT, COUNT(a.id)::BIGINT, \
             COALESCE(SUM(a.cpu_seconds), 0.0)::DOUBLE PRECISION, \
             COALESCE(SUM(CASE WHEN a.ended_ms IS NOT NULL AND a.started_ms IS NOT NULL \
                 THEN a.ended_ms - a.started_ms ELSE 0 END), 0)::BIGINT, \
             COALESCE(SUM(a.input_tokens), 0)::BIGINT, COALESCE(SUM(a.output_tokens), 0)::BIGINT \
             FROM jobs j LEFT JOIN attempts a ON a.job_id = j.id WHERE 1 = 1",
        );
        if let Some(project) = &filter.project {
            q.push(" AND j.project = ").push_bind(project);
        }
        if let Some(job_id) = filter.job_id {
            q.push(" AND j.id = ").push_bind(job_id);
        }
        q.push(" GROUP BY j.id ORDER BY j.project, j.id");
        let rows = q.build().fetch_all(&self.pool).await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push(JobUsage {
                project: r.try_get(0)?,
                job_id: r.try_get(1)?,
                job_name: r.try_get(2)?,
                tasks: r.try_get::<i64, _>(3)? as u32,
                attempts: r.try_get::<i64, _>(4)? as u32,
                cpu_seconds: r.try_get(5)?,
                wall_seconds: r.try_get::<i64, _>(6)? as f64 / 1000.0,
                input_tokens: r.try_get::<i64, _>(7)?.max(0) as u64,
                output_tokens: r.try_get::<i64, _>(8)?.max(0) as u64,
            });
        }
        Ok(out)
    }

    async fn append_chunks(
        &self,
        attempt_id: i64,
        epoch: i64,
        seq: Option<u64>,
        chunks: &[OutputChunk],
    ) -> Result<Applied> {
        // Checked before the transaction: a malformed report stores nothing.
        let rows = log_chunks::pack(chunks)?;
        let seq = log_chunks::report_seq(seq)?;
        let heads: Vec<&str> = rows.iter().map(|c| c.heads.as_str()).collect();
        let data: Vec<&[u8]> = rows.iter().map(|c| c.data.as_ref()).collect();
        transaction!(self.pool, "append_output", |tx| {
            let Some(a) = open_attempt(&mut tx, attempt_id, Some(epoch), AttemptLock::Share).await? else {
                return Ok(Applied::Stale);
            };
            if let Some(seq) = seq {
                let newer =
                    sqlx::query("UPDATE attempts SET output_seq = $1 WHERE id = $2 AND output_seq < $1")
                        .bind(seq)
                        .bind(attempt_id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                if newer == 0 {
                    // Stored when it came the first time; its acknowledgement was lost.
                    return Ok(Applied::Applied);
                }
            }
            if rows.is_empty() {
                return Ok(Applied::Applied);
            }
            // Line ids are drawn under a per-job lock held to commit, so they become visible
            // in increasing order and a `logs_after` cursor never skips one. The two-key form
            // keeps these locks apart from the leadership locks (one 64-bit key).
            sqlx::query("SELECT pg_advisory_xact_lock($1, hashint8($2))")
                .bind(LOG_LOCK_CLASS)
                .bind(a.job_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO log_chunks (job_id, task_id, attempt_id, attempt, heads, data) \
                 SELECT $1, $2, $3, $4, u.heads, u.data \
                 FROM UNNEST($5::TEXT[], $6::BYTEA[]) WITH ORDINALITY AS u(heads, data, n) ORDER BY u.n",
            )
            .bind(a.job_id)
            .bind(a.task_id)
            .bind(a.id)
            .bind(i64::from(a.number))
            .bind(&heads)
            .bind(&data)
            .execute(&mut *tx)
            .await?;
            Ok(Applied::Applied)
        })
    }

    async fn log_chunks_after(
        &self,
        job_id: i64,
        filter: &TaskFilter,
        after_id: i64,
        max_bytes: usize,
    ) -> Result<Vec<LogChunk>> {
        log_chunks::read_chunks(after_id, max_bytes, |from, n| async move {
            let mut q = QueryBuilder::<Postgres>::new(
                "SELECT c.id, c.task_id, t.name, t.frame, c.attempt, c.heads, c.data \
                 FROM log_chunks c JOIN tasks t ON t.id = c.task_id WHERE c.job_id = ",
            );
            q.push_bind(job_id).push(" AND c.id >= ").push_bind(from);
            if let Some(name) = &filter.name {
                q.push(" AND t.name = ").push_bind(name);
            }
            if let Some(frame) = filter.frame {
                q.push(" AND t.frame = ").push_bind(frame);
            }
            q.push(" ORDER BY c.id LIMIT ").push_bind(i64::from(n));
            let rows = q.build().fetch_all(&self.pool).await?;
            rows.iter().map(stored_chunk).collect()
        })
        .await
    }

    async fn publish(&self, signal: Signal) -> Result<()> {
        // Delivered to every listener after commit, this server's own included.
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(signals::CHANNEL)
            .bind(signals::encode(signal))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Signal> {
        self.signals.subscribe()
    }

    async fn try_lead(&self, name: &str) -> Result<Option<Box<dyn Leadership>>> {
        Ok(leader::try_lead(&self.options, name).await?.map(|l| Box::new(l) as Box<dyn Leadership>))
    }
}
