//! Store: the durable dispatch rate, measured directly against the store (no server, no
//! agent). N tasks are submitted, then the scheduler's and agent's store calls run in a loop —
//! the queue's changes since the last round (`queue_changes`, into the scheduler's in-memory
//! state as the server keeps it) + `place` + `assign` for a batch, then `attempt_started` and
//! `attempt_finished` for each task — until every task is done; tasks/s over the loop.
//! The node offers 64 cores, so batches are up to 64 tasks. The batched variant applies a
//! round's starts with one `apply_updates` call and then its finishes with another, as the
//! server's group commit does under load: two commits per round instead of two per task.
//!
//! PostgreSQL runs the same loop against `PostgresStore` on a throwaway server
//! (`drover_store::pg_test`, which starts it with `fsync=off`; every database here is set to
//! `synchronous_commit=on`, so each commit waits for its WAL write: durable against a crash of
//! the process, like SQLite's WAL with synchronous=NORMAL, not against power loss).
//!
//! Peer: the floor of the same work on SQLite without Drover's bookkeeping: one plain
//! table, the same pragmas (WAL, synchronous=NORMAL, one writer connection) and the same
//! number of commits (one claim `UPDATE … RETURNING` per batch, one commit per start and per
//! finish), called on the benchmark's own thread as the SQLite store runs its hot
//! transactions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use drover_core::placement::place;
use drover_core::schedule_state::ScheduleState;
use drover_store::pg_test::TempPostgres;
use drover_store::postgres::PostgresStore;
use drover_store::sqlite::SqliteStore;
use drover_store::{Applied, AttemptReport, AttemptUpdate, NodeSpec, Store};
use sqlx::postgres::PgPoolOptions;

use super::measure;
use crate::Ctx;
use crate::report::{Better, Measure, Row};

/// Cores of the simulated node: the largest batch one placement round can assign.
const NODE_CORES: u32 = 64;

/// Runs the section.
pub async fn run(ctx: &Ctx) -> Vec<Row> {
    let n = if ctx.quick { 100 } else { ctx.tasks.max(2000) };
    let sqlite = sqlite_runs(ctx, n, false).await;
    let sqlite_batched = sqlite_runs(ctx, n, true).await;
    let raw = raw_runs(ctx, n);
    let (pg_store, pg_batched, pg_raw) = match postgres_runs(ctx, n).await {
        Ok((store, batched, raw)) => (Measure::Runs(store), Measure::Runs(batched), Measure::Runs(raw)),
        Err(e) => {
            eprintln!("drover-bench: postgresql unavailable: {e:#}");
            let why = format!("no throwaway PostgreSQL: {e:#}").replace('\n', " ");
            (Measure::Unavailable(why.clone()), Measure::Unavailable(why.clone()), Measure::Unavailable(why))
        }
    };
    let sqlite = measure("sqlite store", sqlite);
    let batched_figure = |db: &str| {
        format!(
            "{db} store: each placement round's starts, then its finishes, applied as one batch each, {n} tasks"
        )
    };
    vec![
        Row {
            section: "store",
            figure: format!(
                "SQLite store: claim + start + finish committed, {n} tasks, batches of {NODE_CORES}"
            ),
            unit: "tasks/s",
            better: Better::Higher,
            drover: sqlite.clone(),
            peer: "raw SQLite on the calling thread, same commits on a bare table".into(),
            peer_value: measure("raw sqlite", raw),
        },
        Row {
            section: "store",
            figure: batched_figure("SQLite"),
            unit: "tasks/s",
            better: Better::Higher,
            drover: measure("sqlite store, batched", sqlite_batched),
            peer: "SQLite store, one commit per start and per finish (the loop above)".into(),
            peer_value: sqlite,
        },
        Row {
            section: "store",
            figure: format!("PostgreSQL store: same loop, {n} tasks"),
            unit: "tasks/s",
            better: Better::Higher,
            drover: pg_store.clone(),
            peer: "raw PostgreSQL, same commits on a bare table".into(),
            peer_value: pg_raw,
        },
        Row {
            section: "store",
            figure: batched_figure("PostgreSQL"),
            unit: "tasks/s",
            better: Better::Higher,
            drover: pg_batched,
            peer: "PostgreSQL store, one commit per start and per finish".into(),
            peer_value: pg_store,
        },
    ]
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

async fn sqlite_runs(ctx: &Ctx, n: usize, batched: bool) -> Result<Vec<f64>> {
    let mut rates = Vec::new();
    for run in 0..ctx.runs {
        let dir = ctx.dir(&format!("store-sqlite-{run}"))?;
        let store = Arc::new(SqliteStore::open(&dir.join("drover.db")).await?);
        let rate = dispatch(store.as_ref(), n, batched).await?;
        eprintln!("  sqlite run {} (batched: {batched}): {rate:.0} tasks/s", run + 1);
        rates.push(rate);
    }
    Ok(rates)
}

/// Submits `n` trivial tasks to `store` and runs the dispatch loop; returns tasks/s. With
/// `batched`, each placement round's starts are applied in one call, then its finishes.
pub async fn dispatch(store: &dyn Store, n: usize, batched: bool) -> Result<f64> {
    let node = NodeSpec {
        name: "bench-node".into(),
        labels: BTreeMap::new(),
        cores: NODE_CORES,
        memory: 1 << 40,
        runtimes: vec!["process".into()],
        lease_until_ms: now_ms() + 3_600_000,
    };
    let registered = store.register_node(&node, &[], now_ms()).await?;
    let yaml = format!(
        "version: 1\nname: bench-store\ntasks:\n  - name: t\n    array: \"1-{n}\"\n    command: [\"true\"]\n"
    );
    let ctx = drover_core::spec::TemplateContext { env: BTreeMap::new(), params: BTreeMap::new() };
    let plan = drover_core::spec::compile(&yaml, "bench.yaml", &ctx).map_err(|e| anyhow!("{e}"))?;
    store.submit(&plan, &yaml, "bench.yaml", now_ms()).await?;
    let start = Instant::now();
    let mut finished = 0usize;
    // The scheduler's memory, kept as the server keeps it: the node read once, the queue by
    // its changes, reservations by assignments and finishes.
    let mut state = ScheduleState::new();
    for book in store.node_books(&[registered.node_id]).await? {
        state.node_joined(book);
    }
    let mut cursor = None;
    while finished < n {
        let changes = store.queue_changes(cursor).await?;
        cursor = Some(changes.cursor);
        for id in changes.left {
            state.left_queue(id);
        }
        for entry in changes.queued {
            state.queued(entry);
        }
        let queue = state.candidates(now_ms(), &[], 2 * NODE_CORES as usize);
        let plan = place(&state.node_views(false), &queue);
        if plan.is_empty() {
            bail!("nothing placeable with {finished} of {n} tasks done");
        }
        let assigned = store.assign(&plan, now_ms()).await?;
        for a in &assigned {
            state.left_queue(a.task_id);
            state.reserve(a.node_id, a.attempt_id, a.plan.resources);
        }
        if batched {
            let starts: Vec<AttemptUpdate> = assigned
                .iter()
                .map(|a| AttemptUpdate::Started { attempt_id: a.attempt_id, epoch: a.epoch })
                .collect();
            let finishes: Vec<AttemptUpdate> =
                assigned.iter().map(|a| AttemptUpdate::Finished(success(a.attempt_id, a.epoch))).collect();
            let mut applied = store.apply_updates(&starts, now_ms()).await?;
            applied.extend(store.apply_updates(&finishes, now_ms()).await?);
            if applied.iter().any(|a| *a != Applied::Applied) {
                bail!("a batched update was stale");
            }
            for a in &assigned {
                state.release(a.attempt_id);
            }
            finished += assigned.len();
            continue;
        }
        for a in assigned {
            store.attempt_started(a.attempt_id, a.epoch, now_ms()).await?;
            store.attempt_finished(&success(a.attempt_id, a.epoch), now_ms()).await?;
            state.release(a.attempt_id);
            finished += 1;
        }
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// A report that an attempt exited 0.
fn success(attempt_id: i64, epoch: i64) -> AttemptReport {
    AttemptReport {
        attempt_id,
        epoch,
        exit_code: Some(0),
        signal: None,
        failure: None,
        message: String::new(),
        cpu_seconds: 0.0,
        peak_memory: 0,
        input_tokens: 0,
        output_tokens: 0,
    }
}

/// The bare-table floor on SQLite, called on this thread (as the SQLite store runs its hot
/// transactions): no worker thread to hand each statement to.
fn raw_runs(ctx: &Ctx, n: usize) -> Result<Vec<f64>> {
    let mut rates = Vec::new();
    for run in 0..ctx.runs {
        let dir = ctx.dir(&format!("store-raw-{run}"))?;
        let mut conn = rusqlite::Connection::open(dir.join("raw.db"))?;
        conn.busy_timeout(Duration::from_secs(10))?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if mode != "wal" {
            bail!("raw SQLite: journal mode {mode}, not wal");
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute(
            "CREATE TABLE tasks (id INTEGER PRIMARY KEY, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, \
             started_ms INTEGER, ended_ms INTEGER)",
            [],
        )?;
        conn.execute("CREATE INDEX tasks_state ON tasks (state, id)", [])?;
        let tx = conn.transaction()?;
        for _ in 0..n {
            tx.execute("INSERT INTO tasks (state) VALUES ('queued')", [])?;
        }
        tx.commit()?;
        let start = Instant::now();
        let mut finished = 0usize;
        while finished < n {
            let tx = conn.transaction()?;
            let ids = tx
                .prepare_cached(
                    "UPDATE tasks SET state = 'assigned', attempts = attempts + 1 WHERE id IN \
                     (SELECT id FROM tasks WHERE state = 'queued' ORDER BY id LIMIT ?) RETURNING id",
                )?
                .query_map([NODE_CORES], |r| r.get::<_, i64>(0))?
                .collect::<rusqlite::Result<Vec<i64>>>()?;
            tx.commit()?;
            if ids.is_empty() {
                bail!("raw queue ran dry with {finished} of {n} done");
            }
            for id in ids {
                conn.prepare_cached("UPDATE tasks SET state = 'running', started_ms = ? WHERE id = ?")?
                    .execute(rusqlite::params![now_ms(), id])?;
                conn.prepare_cached("UPDATE tasks SET state = 'succeeded', ended_ms = ? WHERE id = ?")?
                    .execute(rusqlite::params![now_ms(), id])
                    .context("raw finish")?;
                finished += 1;
            }
        }
        rates.push(n as f64 / start.elapsed().as_secs_f64());
    }
    Ok(rates)
}

/// Store (one commit per update, batched) and raw rates on a throwaway PostgreSQL server, one
/// fresh database per run and kind.
async fn postgres_runs(ctx: &Ctx, n: usize) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let server = ctx.postgres().await?;
    let (mut store_rates, mut batched_rates, mut raw_rates) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..ctx.runs {
        let url = durable_database(server).await?;
        let store = PostgresStore::connect(&url).await?;
        let rate = dispatch(&store, n, false).await?;
        eprintln!("  postgresql run {}: {rate:.0} tasks/s", run + 1);
        store_rates.push(rate);
        drop(store);
        let store = PostgresStore::connect(&durable_database(server).await?).await?;
        let rate = dispatch(&store, n, true).await?;
        eprintln!("  postgresql run {} (batched): {rate:.0} tasks/s", run + 1);
        batched_rates.push(rate);
        drop(store);
        let url = durable_database(server).await?;
        let pool = PgPoolOptions::new().max_connections(1).connect(&url).await?;
        sqlx::query(
            "CREATE TABLE tasks (id BIGSERIAL PRIMARY KEY, state TEXT NOT NULL, attempts INT NOT NULL DEFAULT 0, \
             started_ms BIGINT, ended_ms BIGINT)",
        )
        .execute(&pool)
        .await?;
        sqlx::query("CREATE INDEX tasks_state ON tasks (state, id)").execute(&pool).await?;
        sqlx::query("INSERT INTO tasks (state) SELECT 'queued' FROM generate_series(1, $1)")
            .bind(n as i64)
            .execute(&pool)
            .await?;
        let start = Instant::now();
        let mut finished = 0usize;
        while finished < n {
            let ids: Vec<i64> = sqlx::query_scalar(
                "UPDATE tasks SET state = 'assigned', attempts = attempts + 1 WHERE id IN \
                 (SELECT id FROM tasks WHERE state = 'queued' ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) \
                 RETURNING id",
            )
            .bind(NODE_CORES as i64)
            .fetch_all(&pool)
            .await?;
            if ids.is_empty() {
                bail!("raw queue ran dry with {finished} of {n} done");
            }
            for id in ids {
                sqlx::query("UPDATE tasks SET state = 'running', started_ms = $1 WHERE id = $2")
                    .bind(now_ms())
                    .bind(id)
                    .execute(&pool)
                    .await?;
                sqlx::query("UPDATE tasks SET state = 'succeeded', ended_ms = $1 WHERE id = $2")
                    .bind(now_ms())
                    .bind(id)
                    .execute(&pool)
                    .await?;
                finished += 1;
            }
        }
        raw_rates.push(n as f64 / start.elapsed().as_secs_f64());
        pool.close().await;
    }
    Ok((store_rates, batched_rates, raw_rates))
}

/// A fresh database whose sessions wait for their commit's WAL write.
pub async fn durable_database(server: &TempPostgres) -> Result<String> {
    let url = server.create_database().await?;
    let name = url.rsplit('/').next().and_then(|n| n.split('?').next()).unwrap_or_default().to_string();
    let admin = PgPoolOptions::new().max_connections(1).connect(server.admin_url()).await?;
    sqlx::query(&format!("ALTER DATABASE \"{name}\" SET synchronous_commit = on")).execute(&admin).await?;
    admin.close().await;
    Ok(url)
}
