//! The queue feed and node books on SQLite, for schedulers that keep them in memory.
//!
//! Triggers stamp a task with the next number of the `queue_feed` counter whenever it enters
//! or leaves the queue. The cursor is that counter as read *before* the rows: every stamp up
//! to it was committed by then, so the read that follows sees it; stamps above it that the
//! read also sees are simply reported again next time.

use std::collections::{BTreeMap, HashMap};

use super::*;
use crate::decode::{QueueRow, node_book};

/// What every feed query selects, in [`QueueRow`]'s order.
const COLUMNS: &str = "t.id, t.priority, t.cores, t.memory, t.constraints, t.runtime, \
     CASE WHEN t.runtime = 'microvm' THEN json_extract(t.plan, '$.image') END, j.project, t.not_before_ms, \
     t.state = 'queued' \
     FROM tasks t JOIN jobs j ON j.id = t.job_id";

pub(super) async fn queue_changes(reader: &SqlitePool, since: Option<i64>) -> Result<QueueChanges> {
    // The cursor, then the rows, in one round trip: a placement round waits on this read.
    const CURSOR: &str = "SELECT seq FROM queue_feed WHERE id = 1";
    let rows = match since {
        None => {
            sqlx::query(&format!("{CURSOR}; SELECT {COLUMNS} WHERE t.state = 'queued'"))
                .fetch_all(reader)
                .await?
        }
        Some(since) => {
            sqlx::query(&format!("{CURSOR}; SELECT {COLUMNS} WHERE t.queue_seq > ?"))
                .bind(since)
                .fetch_all(reader)
                .await?
        }
    };
    let (cursor, rows) = match rows.split_first() {
        Some((first, rows)) if first.len() == 1 => (first.try_get::<i64, _>(0)?, rows),
        _ => return Err(corrupt("queue feed", "no cursor read")),
    };
    crate::decode::queue_changes(
        cursor,
        rows.iter().map(|r| {
            Ok(QueueRow {
                id: r.get(0),
                priority: r.get(1),
                cores: r.get(2),
                memory: r.get(3),
                constraints: r.get(4),
                runtime: r.get(5),
                image: r.get(6),
                project: r.get(7),
                not_before_ms: r.get(8),
                queued: r.get(9),
            })
        }),
    )
}

pub(super) async fn node_books(reader: &SqlitePool, node_ids: &[i64]) -> Result<Vec<NodeBook>> {
    if node_ids.is_empty() {
        return Ok(Vec::new());
    }
    let ids = to_json("node ids", &node_ids)?;
    let mut held: HashMap<i64, BTreeMap<i64, Resources>> = HashMap::new();
    let attempts = sqlx::query(
        "SELECT node_id, id, cores, memory FROM attempts \
         WHERE state != 'ended' AND node_id IN (SELECT value FROM json_each(?))",
    )
    .bind(&ids)
    .fetch_all(reader)
    .await?;
    for r in &attempts {
        let need = Resources { cores: rows::get_u32(r, 2), memory: rows::get_u64(r, 3), pids: 0 };
        held.entry(r.get(0)).or_default().insert(r.get(1), need);
    }
    let nodes = sqlx::query(
        "SELECT id, labels, runtimes, cores, memory FROM nodes \
         WHERE state = 'ready' AND id IN (SELECT value FROM json_each(?)) ORDER BY id",
    )
    .bind(&ids)
    .fetch_all(reader)
    .await?;
    nodes
        .iter()
        .map(|r| {
            let id: i64 = r.get(0);
            let capacity = Resources { cores: rows::get_u32(r, 3), memory: rows::get_u64(r, 4), pids: 0 };
            node_book(id, r.get(1), r.get(2), capacity, held.remove(&id).unwrap_or_default())
        })
        .collect()
}
