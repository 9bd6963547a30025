//! The SQLite store: the embedded default.
//!
//! SQLite allows one writer at a time, so all writes go through exactly one connection, held
//! behind a lock: transactions queue in-process instead of failing with `SQLITE_BUSY`, and a
//! deferred `BEGIN` is safe because no other connection can write between its read and its
//! write. (A pool of one connection would do the same, but it tests the connection with a
//! round trip to its thread every time it comes back, and hands it on from a task of its own:
//! about half a millisecond between any two writes.) Reads use a separate pool and see the
//! last committed state (WAL).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use drover_core::dag::release_after;
use drover_core::outcome::{AttemptEnd, settle_task};
use drover_core::placement::{NodeLoad, Placement, admit};
use drover_core::schedule_state::NodeBook;
use drover_core::{JobPlan, JobState, Resources, TaskPlan, TaskState};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection, QueryBuilder, Row, Sqlite, SqliteConnection};

/// Page cache per connection, KiB.
const CACHE_KIB: u32 = 32 * 1024;

mod access;
mod archive;
mod artifacts;
mod assign;
mod checkpoint;
mod dependencies;
mod direct;
mod events;
mod job_changes;
mod lists;
mod open_tx;
mod output;
mod queue_feed;
mod retention;
mod rows;
mod secrets;
mod settle;
mod submit;
mod tenancy;
mod updates;

use events::{Ev, emit};
use job_changes::{JobChanges, refresh_job};
use rows::stored_chunk;
use settle::{lose_node_attempts, open_attempt, requeue_undelivered, settle_attempt};

use crate::artifacts::{ArtifactStore, OutputFile};
use crate::decode::{corrupt, json, lost_report, parse_word, to_json};
use crate::log_chunks;
use crate::record_rows::{JOB_COLUMNS, TASK_COLUMNS, job_record, task_record};
use crate::secrets::SecretStore;
use crate::*;

/// Connections for the hot path's small reads: one per core of a small server; a read
/// finding both busy waits microseconds.
const QUICK_READERS: usize = 2;

/// Rows per multi-row INSERT; keeps statements under SQLite's variable limit.
const INSERT_CHUNK: usize = 500;

/// The SQLite implementation of [`Store`].
#[derive(Clone)]
pub struct SqliteStore {
    writer: Arc<tokio::sync::Mutex<SqliteConnection>>,
    /// The second write connection, used only while `writer` is locked (see [`direct`]).
    direct: Arc<direct::Direct>,
    /// Readers for the hot path's small reads (see [`direct::Readers`]).
    quick: Arc<direct::Readers>,
    reader: SqlitePool,
    signals: tokio::sync::broadcast::Sender<Signal>,
}

/// One server owns a SQLite database, so it always leads.
struct SoleServer;

impl Leadership for SoleServer {
    fn is_held(&self) -> bool {
        true
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path` and runs migrations.
    pub async fn open(path: &Path) -> Result<SqliteStore> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL in WAL mode is durable against process crashes (kill -9), which is what
            // an acknowledged submit must survive; FULL would add an fsync per commit.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            // SQLite's default page cache is 2 MiB per connection; a database of a few large
            // jobs is tens of MiB, and every miss is a system call. Pages are taken as used.
            .pragma("cache_size", format!("-{}", CACHE_KIB))
            // Checkpoints run in the background (see `checkpoint`); a commit checkpoints only
            // when that falls behind.
            .pragma("wal_autocheckpoint", checkpoint::WRITER_BACKSTOP.to_string());
        let mut writer = SqliteConnection::connect_with(&options).await?;
        sqlx::migrate!("migrations/sqlite").run(&mut writer).await?;
        // Reader connections are local and cannot break between uses: no test on the way out.
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .connect_with(options.clone().read_only(true))
            .await?;
        // After the migrations: it must see the schema they made.
        let direct = Arc::new(direct::Direct::open(path)?);
        let quick = Arc::new(direct::Readers::open(path, QUICK_READERS)?);
        let writer = Arc::new(tokio::sync::Mutex::new(writer));
        checkpoint::spawn(&options, Arc::downgrade(&writer)).await?;
        Ok(SqliteStore { writer, direct, quick, reader, signals: tokio::sync::broadcast::channel(1024).0 })
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn submit(&self, plan: &JobPlan, source: &str, filename: &str, now_ms: i64) -> Result<i64> {
        let mut writer = self.writer.lock().await;
        let mut insert = move || {
            self.direct.transaction(&mut writer, |conn| submit::insert(conn, plan, source, filename, now_ms))
        };
        match plan.tasks.len() > submit::SHORT {
            // A job of many tasks holds the thread for a while.
            true => direct::long(insert),
            false => insert(),
        }
    }

    async fn job(&self, job_id: i64) -> Result<Option<JobRecord>> {
        // Every call about a job reads it to check who may see it: a quick read.
        self.quick.read(|conn| events::job(conn, job_id))
    }

    async fn tasks(&self, job_id: i64) -> Result<Vec<TaskRecord>> {
        read_tasks(&self.reader, job_id).await
    }

    async fn job_with_tasks(&self, job_id: i64) -> Result<Option<(JobRecord, Vec<TaskRecord>)>> {
        // In WAL mode a read transaction keeps the snapshot of its first read to its end.
        let mut tx = self.reader.begin().await?;
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
        lists::jobs(&self.reader, include_final, projects, page).await
    }

    async fn list_nodes(&self, page: &PageRequest) -> Result<Page<NodeRecord>> {
        lists::nodes(&self.reader, page).await
    }

    async fn events_after(&self, job_id: i64, after_seq: i64, limit: u32) -> Result<Vec<EventRecord>> {
        // A watcher reads after every change it is told of: a quick read.
        self.quick.read(|conn| events::after(conn, job_id, after_seq, limit))
    }

    async fn cancel_job(&self, job_id: i64, now_ms: i64) -> Result<Vec<OpenAttempt>> {
        let mut writer = self.writer.lock().await;
        let mut tx = writer.begin().await?;
        let found = sqlx::query("UPDATE jobs SET cancelled = 1 WHERE id = ?")
            .bind(job_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if found == 0 {
            return Err(StoreError::NotFound { what: "job", id: job_id });
        }
        let pending = sqlx::query(
            "UPDATE tasks SET state = 'cancelled', reason = 'cancelled by user', ended_ms = ? \
             WHERE job_id = ? AND state IN ('waiting', 'queued') RETURNING id, name, frame",
        )
        .bind(now_ms)
        .bind(job_id)
        .fetch_all(&mut *tx)
        .await?;
        let events = pending
            .iter()
            .map(|r| {
                let mut ev = Ev::task(job_id, r.get(0), r.get::<&str, _>(1), r.get(2), TaskState::Cancelled);
                ev.message = "cancelled by user".into();
                ev
            })
            .collect();
        emit(&mut tx, job_id, now_ms, events).await?;
        let open = sqlx::query_as::<_, (i64, i64)>(
            "SELECT a.id, a.node_id FROM attempts a JOIN tasks t ON t.current_attempt = a.id \
             WHERE t.job_id = ? AND a.state != 'ended'",
        )
        .bind(job_id)
        .fetch_all(&mut *tx)
        .await?;
        refresh_job(&mut tx, job_id, now_ms).await?;
        tx.commit().await?;
        Ok(open.into_iter().map(|(attempt_id, node_id)| OpenAttempt { attempt_id, node_id }).collect())
    }

    async fn register_node(
        &self,
        node: &NodeSpec,
        known_attempts: &[i64],
        now_ms: i64,
    ) -> Result<NodeRegistration> {
        let mut writer = self.writer.lock().await;
        let mut tx = writer.begin().await?;
        // Epochs are unique across nodes, not just per node, so an attempt's (id, epoch) names
        // one node session: the next one is above every epoch ever handed out. The single
        // writer makes reading the maximum and writing it one step (nodes are never deleted).
        let row = sqlx::query(
            "INSERT INTO nodes (name, state, labels, cores, memory, runtimes, epoch, lease_until_ms, last_seen_ms) \
             VALUES (?, 'ready', ?, ?, ?, ?, (SELECT COALESCE(MAX(epoch), 0) + 1 FROM nodes), ?, ?) \
             ON CONFLICT (name) DO UPDATE SET state = 'ready', labels = excluded.labels, cores = excluded.cores, \
             memory = excluded.memory, runtimes = excluded.runtimes, epoch = excluded.epoch, \
             lease_until_ms = excluded.lease_until_ms, last_seen_ms = excluded.last_seen_ms \
             RETURNING id, epoch",
        )
        .bind(&node.name)
        .bind(to_json("labels", &node.labels)?)
        .bind(node.cores as i64)
        .bind(node.memory as i64)
        .bind(to_json("runtimes", &node.runtimes)?)
        .bind(node.lease_until_ms)
        .bind(now_ms)
        .fetch_one(&mut *tx)
        .await?;
        let reg = NodeRegistration { node_id: row.get(0), epoch: row.get(1) };
        let open: Vec<(i64, String)> =
            sqlx::query_as("SELECT id, state FROM attempts WHERE node_id = ? AND state != 'ended'")
                .bind(reg.node_id)
                .fetch_all(&mut *tx)
                .await?;
        let mut changes = JobChanges::default();
        for (attempt_id, state) in open {
            if known_attempts.contains(&attempt_id) {
                sqlx::query("UPDATE attempts SET epoch = ? WHERE id = ?")
                    .bind(reg.epoch)
                    .bind(attempt_id)
                    .execute(&mut *tx)
                    .await?;
            } else if state == "assigned" {
                // The agent never received it (the assignment went to a session that was
                // already gone): hand it back without spending one of the task's retries.
                requeue_undelivered(&mut tx, &mut changes, attempt_id, now_ms).await?;
            } else if let Some(a) = open_attempt(&mut tx, attempt_id, None).await? {
                let report = lost_report(attempt_id, reg.epoch, "the agent restarted without it");
                settle_attempt(&mut tx, &mut changes, &a, &report, now_ms).await?;
            }
        }
        changes.write(&mut tx, now_ms).await?;
        tx.commit().await?;
        Ok(reg)
    }

    async fn open_attempt_plan(&self, attempt_id: i64, node: &str) -> Result<Option<(String, TaskPlan)>> {
        let row: Option<(String, String)> = sqlx::query_as(
            "SELECT j.project, t.plan FROM attempts a JOIN tasks t ON t.id = a.task_id \
             JOIN jobs j ON j.id = a.job_id JOIN nodes n ON n.id = a.node_id \
             WHERE a.id = ? AND n.name = ? AND a.state != 'ended' AND t.current_attempt = a.id",
        )
        .bind(attempt_id)
        .bind(node)
        .fetch_optional(&self.reader)
        .await?;
        row.map(|(project, plan)| Ok((project, json("task plan", &plan)?))).transpose()
    }

    async fn cancelled_attempts_on(&self, node_id: i64) -> Result<Vec<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT a.id FROM attempts a JOIN jobs j ON j.id = a.job_id \
             WHERE a.node_id = ? AND a.state != 'ended' AND j.cancelled = 1 ORDER BY a.id",
        )
        .bind(node_id)
        .fetch_all(&self.reader)
        .await?)
    }

    async fn renew_lease(&self, node_id: i64, epoch: i64, lease_until_ms: i64, now_ms: i64) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE nodes SET lease_until_ms = ?, last_seen_ms = ? WHERE id = ? AND epoch = ? AND state != 'down'",
        )
        .bind(lease_until_ms)
        .bind(now_ms)
        .bind(node_id)
        .bind(epoch)
        .execute(&mut *self.writer.lock().await)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    async fn expire_nodes(&self, now_ms: i64) -> Result<Vec<i64>> {
        let mut writer = self.writer.lock().await;
        let mut tx = writer.begin().await?;
        let expired: Vec<(i64, String)> = sqlx::query_as(
            "UPDATE nodes SET state = 'down' WHERE state IN ('ready', 'draining') AND lease_until_ms < ? RETURNING id, name",
        )
        .bind(now_ms)
        .fetch_all(&mut *tx)
        .await?;
        let mut changes = JobChanges::default();
        for (node_id, name) in &expired {
            let why = format!("node {name} went silent past its lease");
            lose_node_attempts(&mut tx, &mut changes, *node_id, &why, now_ms).await?;
        }
        changes.write(&mut tx, now_ms).await?;
        tx.commit().await?;
        Ok(expired.into_iter().map(|(id, _)| id).collect())
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>> {
        let sql = format!(
            "SELECT {} FROM nodes n LEFT JOIN attempts a ON a.node_id = n.id AND a.state != 'ended' \
             GROUP BY n.id ORDER BY n.name",
            lists::NODE_COLUMNS
        );
        let rows = sqlx::query(&sql).fetch_all(&self.reader).await?;
        rows.iter().map(lists::node_record).collect()
    }

    async fn queue_changes(&self, since: Option<i64>) -> Result<QueueChanges> {
        queue_feed::queue_changes(&self.reader, since).await
    }

    async fn node_books(&self, node_ids: &[i64]) -> Result<Vec<NodeBook>> {
        queue_feed::node_books(&self.reader, node_ids).await
    }

    async fn assign(&self, plan: &[Placement], now_ms: i64) -> Result<Vec<Assignment>> {
        if plan.is_empty() {
            return Ok(Vec::new());
        }
        let mut writer = self.writer.lock().await;
        self.direct.transaction(&mut writer, |conn| assign::claim(conn, plan, now_ms))
    }

    async fn apply_updates(&self, updates: &[AttemptUpdate], now_ms: i64) -> Result<Vec<Applied>> {
        if updates.is_empty() {
            return Ok(Vec::new());
        }
        // Owned: should the caller go away during a batch that releases dependents (on the
        // sqlx writer), the rollback takes the writer with it.
        let mut writer = Arc::clone(&self.writer).lock_owned().await;
        if let Some(applied) =
            self.direct.transaction(&mut writer, |conn| updates::apply_direct(conn, updates, now_ms))?
        {
            return Ok(applied);
        }
        updates::apply_committing(writer, updates, now_ms).await
    }

    async fn usage(&self, filter: &UsageFilter) -> Result<Vec<JobUsage>> {
        let mut q = QueryBuilder::<Sqlite>::new(
            "SELECT j.project, j.id, j.name, (SELECT COUNT(*) FROM tasks t WHERE t.job_id = j.id), COUNT(a.id), \
             COALESCE(SUM(a.cpu_seconds), 0.0), \
             COALESCE(SUM(CASE WHEN a.ended_ms IS NOT NULL AND a.started_ms IS NOT NULL \
                 THEN a.ended_ms - a.started_ms ELSE 0 END), 0), \
             COALESCE(SUM(a.input_tokens), 0), COALESCE(SUM(a.output_tokens), 0) \
             FROM jobs j LEFT JOIN attempts a ON a.job_id = j.id WHERE 1 = 1",
        );
        if let Some(project) = &filter.project {
            q.push(" AND j.project = ").push_bind(project);
        }
        if let Some(job_id) = filter.job_id {
            q.push(" AND j.id = ").push_bind(job_id);
        }
        q.push(" GROUP BY j.id ORDER BY j.project, j.id");
        let rows = q.build().fetch_all(&self.reader).await?;
        Ok(rows
            .iter()
            .map(|r| JobUsage {
                project: r.get(0),
                job_id: r.get(1),
                job_name: r.get(2),
                tasks: r.get::<i64, _>(3) as u32,
                attempts: r.get::<i64, _>(4) as u32,
                cpu_seconds: r.get(5),
                wall_seconds: r.get::<i64, _>(6) as f64 / 1000.0,
                input_tokens: r.get::<i64, _>(7).max(0) as u64,
                output_tokens: r.get::<i64, _>(8).max(0) as u64,
            })
            .collect())
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
        let mut writer = self.writer.lock().await;
        self.direct.transaction(&mut writer, |conn| output::append(conn, attempt_id, epoch, seq, &rows))
    }

    async fn log_chunks_after(
        &self,
        job_id: i64,
        filter: &TaskFilter,
        after_id: i64,
        max_bytes: usize,
    ) -> Result<Vec<LogChunk>> {
        log_chunks::read_chunks(after_id, max_bytes, |from, n| async move {
            let mut q = QueryBuilder::<Sqlite>::new(
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
            let rows = q.build().fetch_all(&self.reader).await?;
            Ok(rows.iter().map(stored_chunk).collect())
        })
        .await
    }

    async fn publish(&self, signal: Signal) -> Result<()> {
        // No receiver (no server loop yet) is fine: nobody needs to hear it.
        let _ = self.signals.send(signal);
        Ok(())
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Signal> {
        self.signals.subscribe()
    }

    async fn try_lead(&self, _name: &str) -> Result<Option<Box<dyn Leadership>>> {
        Ok(Some(Box::new(SoleServer)))
    }
}

/// One job, read through `db` (a pool, or a transaction for a consistent view).
async fn read_job<'e>(db: impl sqlx::SqliteExecutor<'e>, job_id: i64) -> Result<Option<JobRecord>> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?");
    let row = sqlx::query(&sql).bind(job_id).fetch_optional(db).await?;
    row.as_ref().map(job_record).transpose()
}

/// The tasks of a job in submit order, read through `db`.
async fn read_tasks<'e>(db: impl sqlx::SqliteExecutor<'e>, job_id: i64) -> Result<Vec<TaskRecord>> {
    let sql = format!(
        "SELECT {TASK_COLUMNS} FROM tasks t LEFT JOIN nodes n ON n.id = t.node_id WHERE t.job_id = ? ORDER BY t.id"
    );
    let rows = sqlx::query(&sql).bind(job_id).fetch_all(db).await?;
    rows.iter().map(task_record).collect()
}

#[cfg(test)]
mod tests {
    /// A fresh database in a temporary directory, kept alive as long as the store.
    struct Fresh {
        store: super::SqliteStore,
        _dir: tempfile::TempDir,
    }

    impl std::ops::Deref for Fresh {
        type Target = super::SqliteStore;
        fn deref(&self) -> &super::SqliteStore {
            &self.store
        }
    }

    async fn fresh() -> Fresh {
        let dir = tempfile::tempdir().unwrap();
        let store = super::SqliteStore::open(&dir.path().join("drover.db")).await.unwrap();
        Fresh { store, _dir: dir }
    }

    crate::store_conformance!(fresh().await);

    /// Every lookup of a node's attempts asks for its open ones; the index must hold only
    /// those, or a node's lookups grow with every attempt it ever ran.
    #[tokio::test]
    async fn a_nodes_open_attempts_are_found_without_reading_its_ended_ones() {
        use sqlx::Row;
        let store = fresh().await;
        let sql: String = sqlx::query(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = 'attempts_open_by_node'",
        )
        .fetch_one(&store.reader)
        .await
        .unwrap()
        .get(0);
        assert!(sql.contains("(node_id) WHERE state <> 'ended'"), "{sql}");
        let open_on_node = [
            "SELECT id, epoch FROM attempts WHERE node_id = 1 AND state != 'ended' ORDER BY id",
            "SELECT n.id, COALESCE(SUM(a.cores), 0) FROM nodes n \
             LEFT JOIN attempts a ON a.node_id = n.id AND a.state != 'ended' WHERE n.id IN (1) GROUP BY n.id",
        ];
        for query in open_on_node {
            let plan: Vec<String> = sqlx::query(&format!("EXPLAIN QUERY PLAN {query}"))
                .fetch_all(&store.reader)
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<String, _>(3))
                .collect();
            assert!(plan.iter().any(|p| p.contains("attempts_open_by_node")), "{query}: {plan:?}");
        }
    }

    /// The length at which release used to be quadratic.
    #[tokio::test]
    async fn long_chain_runs_to_the_end() {
        crate::conformance::long_chain_runs_to_the_end(&*fresh().await, 20_000).await;
    }

    /// An update batch begins and commits a transaction of its own: one that fails halfway
    /// (a task plan that cannot be read) stores nothing and leaves the writer usable, and so
    /// does one whose caller goes away (left open, the next batch's `BEGIN` would fail).
    #[tokio::test]
    async fn an_update_batch_that_fails_or_is_abandoned_leaves_no_transaction_open() {
        use crate::conformance::{done, job, node, schedule, task};
        use crate::{Applied, Store};
        use drover_core::TaskState;
        let store = fresh().await;
        let job_id = store.submit(&job(vec![task("a", &[]), task("b", &[])]), "", "f", 1).await.unwrap();
        store.register_node(&node("n", 2, 100_000), &[], 1).await.unwrap();
        let assigned = schedule(&*store, 2).await;
        let (a, b) = (&assigned[0], &assigned[1]);
        sqlx::query("UPDATE tasks SET plan = 'not a plan' WHERE id = ?")
            .bind(a.task_id)
            .execute(&mut *store.writer.lock().await)
            .await
            .unwrap();
        let both = [
            crate::AttemptUpdate::Started { attempt_id: b.attempt_id, epoch: b.epoch },
            crate::AttemptUpdate::Finished(done(a, 0)),
        ];
        let error = store.apply_updates(&both, 3).await.expect_err("the plan cannot be read");
        assert!(error.to_string().contains("task plan"), "{error}");
        let state = |id: i64| {
            let store = &store;
            async move { store.tasks(job_id).await.unwrap().into_iter().find(|t| t.id == id).unwrap().state }
        };
        assert_eq!(state(b.task_id).await, TaskState::Assigned, "nothing of the failed batch is stored");
        assert_eq!(store.attempt_started(b.attempt_id, b.epoch, 4).await.unwrap(), Applied::Applied);
        // Polled once, then dropped. Its trips are usually still under way, and then it is
        // rolled back unless its commit went through; on a fast worker thread it may also
        // have ended within that poll. Either way the next batch gets a writer with no
        // transaction open, and the finish is recorded once.
        let report = done(b, 0);
        let abandoned = store.attempt_finished(&report, 5);
        let first_poll = tokio::select! {
            biased;
            applied = abandoned => Some(applied.unwrap()),
            () = std::future::ready(()) => None,
        };
        let next = store.attempt_finished(&report, 6).await.unwrap();
        match first_poll {
            Some(applied) => assert_eq!((applied, next), (Applied::Applied, Applied::Stale)),
            None => assert!(matches!(next, Applied::Applied | Applied::Stale), "{next:?}"),
        }
        assert_eq!(state(b.task_id).await, TaskState::Succeeded);
        assert_eq!(store.attempt_finished(&report, 7).await.unwrap(), Applied::Stale, "finished once");
    }

    /// A placement round's claim begins and commits a transaction of its own and gives the
    /// attempts their ids: one that fails halfway stores nothing, one whose caller goes away
    /// claims its tasks once or not at all, and ids never come back after their attempts were
    /// deleted (as `AUTOINCREMENT` promises).
    #[tokio::test]
    async fn a_claim_that_fails_or_is_abandoned_leaves_no_transaction_open() {
        use crate::Store;
        use crate::conformance::{job, node, task};
        use drover_core::TaskState;
        use drover_core::placement::Placement;
        let store = fresh().await;
        let job_id = store
            .submit(&job(vec![task("a", &[]), task("b", &[]), task("c", &[])]), "", "f", 1)
            .await
            .unwrap();
        let node_id = store.register_node(&node("n", 8, 100_000), &[], 1).await.unwrap().node_id;
        let ids: Vec<i64> = store.tasks(job_id).await.unwrap().iter().map(|t| t.id).collect();
        let at = |task_id: i64| Placement { task_id, node_id, ahead: false };
        let raw = |sql: &'static str, id: i64| {
            let store = &store;
            async move { sqlx::query(sql).bind(id).execute(&mut *store.writer.lock().await).await.unwrap() }
        };
        let states = || {
            let store = &store;
            async move { store.tasks(job_id).await.unwrap().iter().map(|t| t.state).collect::<Vec<_>>() }
        };

        raw("UPDATE tasks SET plan = 'not a plan' WHERE id = ?", ids[1]).await;
        let error = store.assign(&[at(ids[0]), at(ids[1])], 2).await.expect_err("the plan cannot be read");
        assert!(error.to_string().contains("task plan"), "{error}");
        assert_eq!(states().await, vec![TaskState::Queued; 3], "nothing of the failed claim is stored");

        // Polled once, then dropped: rolled back, or committed if it ended within that poll.
        let only_a = [at(ids[0])];
        let abandoned = store.assign(&only_a, 3);
        let first_poll = tokio::select! {
            biased;
            claimed = abandoned => Some(claimed.unwrap()),
            () = std::future::ready(()) => None,
        };
        let again = store.assign(&[at(ids[0])], 4).await.unwrap();
        let claimed: Vec<_> = first_poll.unwrap_or_default().into_iter().chain(again).collect();
        assert_eq!(claimed.len(), 1, "task a claimed once: {claimed:?}");
        assert_eq!(claimed[0].number, 1);
        assert_eq!(store.tasks(job_id).await.unwrap()[0].state, TaskState::Assigned);

        // The newest attempt deleted: the next one still gets a new id.
        let first = claimed[0].attempt_id;
        raw("UPDATE tasks SET current_attempt = NULL, state = 'queued', attempts = 0 WHERE id = ?", ids[0])
            .await;
        raw("DELETE FROM attempts WHERE id = ?", first).await;
        let next = store.assign(&[at(ids[0]), at(ids[2])], 5).await.unwrap();
        let next_ids: Vec<i64> = next.iter().map(|a| a.attempt_id).collect();
        assert_eq!(next_ids, vec![first + 1, first + 2], "ids go on after the deleted one, in plan order");
        let events = store.events_after(job_id, 0, 100).await.unwrap();
        let assigned = events.iter().filter(|e| e.kind == "task" && e.state == "assigned").count();
        let running = events.iter().filter(|e| e.kind == "job" && e.state == "running").count();
        assert_eq!((assigned, running), (3, 1), "{events:?}");
    }

    /// A submit begins and commits a transaction of its own: one whose caller goes away
    /// stores the whole job or nothing of it, and leaves the writer usable.
    #[tokio::test]
    async fn an_abandoned_submit_stores_the_whole_job_or_nothing() {
        use crate::Store;
        use crate::conformance::{job, task};
        let store = fresh().await;
        let plan = job(vec![task("a", &[]), task("b", &["a"])]);
        // Polled once, then dropped: its trips are usually still under way.
        let abandoned = store.submit(&plan, "", "f", 1);
        let first_poll = tokio::select! {
            biased;
            id = abandoned => Some(id.unwrap()),
            () = std::future::ready(()) => None,
        };
        let next = store.submit(&plan, "", "f", 2).await.unwrap();
        for id in 1..=next {
            let Some(found) = store.job(id).await.unwrap() else {
                assert_eq!(first_poll, None, "job {id} was acknowledged, yet it is not stored");
                continue;
            };
            let tasks = store.tasks(id).await.unwrap();
            let events = store.events_after(id, 0, 100).await.unwrap();
            assert_eq!((tasks.len(), events.len(), found.last_seq), (2, 3, 3), "job {id}: {events:?}");
        }
    }

    #[tokio::test]
    async fn large_job_records_every_task_once() {
        crate::conformance::large_job_records_every_task_once(&*fresh().await, 20_000).await;
    }
}
