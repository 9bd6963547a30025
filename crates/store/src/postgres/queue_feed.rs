//! The queue feed and node books on PostgreSQL, for schedulers that keep them in memory.
//!
//! A trigger stamps a task with the id of the transaction that moves it into or out of the
//! queue. Transactions commit in any order, so a reader cannot resume after the largest id it
//! saw: it resumes from the oldest transaction still running when it last read
//! (`pg_snapshot_xmin`, taken *before* the rows), because every transaction older than that had
//! ended by then, and the read that followed saw what it wrote. Rows stamped by transactions
//! in flight then are read again next time, and reported again: harmless, since a report says
//! what the task is now.

use std::collections::{BTreeMap, HashMap};

use super::*;
use crate::decode::{QueueRow, node_book};

/// What every feed query selects, in [`QueueRow`]'s order.
const COLUMNS: &str = "t.id, t.priority, t.cores, t.memory, t.constraints, t.runtime, \
     CASE WHEN t.runtime = 'microvm' THEN t.plan::jsonb ->> 'image' END, j.project, t.not_before_ms, \
     t.state = 'queued' \
     FROM tasks t JOIN jobs j ON j.id = t.job_id";

pub(super) async fn queue_changes(pool: &PgPool, since: Option<i64>) -> Result<QueueChanges> {
    let cursor: i64 = sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
        .fetch_one(pool)
        .await?;
    let rows = match since {
        None => sqlx::query(&format!("SELECT {COLUMNS} WHERE t.state = 'queued'")).fetch_all(pool).await?,
        Some(since) => {
            sqlx::query(&format!("SELECT {COLUMNS} WHERE t.queue_xid >= $1::text::xid8"))
                .bind(since.to_string())
                .fetch_all(pool)
                .await?
        }
    };
    let rows: Vec<QueueRow> = rows
        .iter()
        .map(|r| {
            Ok(QueueRow {
                id: r.try_get(0)?,
                priority: r.try_get(1)?,
                cores: r.try_get(2)?,
                memory: r.try_get(3)?,
                constraints: r.try_get(4)?,
                runtime: r.try_get(5)?,
                image: r.try_get(6)?,
                project: r.try_get(7)?,
                not_before_ms: r.try_get(8)?,
                queued: r.try_get(9)?,
            })
        })
        .collect::<Result<_>>()?;
    crate::decode::queue_changes(cursor, rows.into_iter().map(Ok))
}

pub(super) async fn node_books(pool: &PgPool, node_ids: &[i64]) -> Result<Vec<NodeBook>> {
    if node_ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut held: HashMap<i64, BTreeMap<i64, Resources>> = HashMap::new();
    let attempts = sqlx::query(
        "SELECT node_id, id, cores, memory FROM attempts WHERE state <> 'ended' AND node_id = ANY($1)",
    )
    .bind(node_ids)
    .fetch_all(pool)
    .await?;
    for r in &attempts {
        let need = Resources { cores: get_u32(r, 2)?, memory: get_u64(r, 3)?, pids: 0 };
        held.entry(r.try_get(0)?).or_default().insert(r.try_get(1)?, need);
    }
    let nodes = sqlx::query(
        "SELECT id, labels, runtimes, cores, memory FROM nodes WHERE state = 'ready' AND id = ANY($1) ORDER BY id",
    )
    .bind(node_ids)
    .fetch_all(pool)
    .await?;
    nodes
        .iter()
        .map(|r| {
            let id: i64 = r.try_get(0)?;
            let capacity = Resources { cores: get_u32(r, 3)?, memory: get_u64(r, 4)?, pids: 0 };
            node_book(id, r.try_get(1)?, r.try_get(2)?, capacity, held.remove(&id).unwrap_or_default())
        })
        .collect()
}
