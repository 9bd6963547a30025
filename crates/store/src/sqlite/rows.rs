//! Row decoding shared by the SQLite store's queries, and the fit re-check of `assign`.

use super::*;

/// The placements of `plan` that still fit their nodes as the store stands now (see
/// [`admit`]; a placement ahead may wait beyond the node's capacity): the plan was made from a snapshot that other writes may have overtaken.
///
/// Also returns each ready node's epoch and name, which the attempts need.
pub(super) async fn admissible(
    conn: &mut SqliteConnection,
    plan: &[Placement],
) -> Result<(Vec<Placement>, HashMap<i64, (i64, String)>)> {
    if plan.is_empty() {
        return Ok((Vec::new(), HashMap::new()));
    }
    let node_ids: Vec<i64> = plan.iter().map(|p| p.node_id).collect();
    let task_ids: Vec<i64> = plan.iter().map(|p| p.task_id).collect();
    let ids = serde_json::json!({ "nodes": node_ids, "tasks": task_ids });
    // Both reads in one round trip (the lists in one parameter: see `job_changes_sql`): the
    // nodes' capacity and what their open attempts hold (seven columns), then the placed
    // tasks still queued and their needs (three), looked up by id (`CROSS JOIN` keeps SQLite
    // from walking every queued task instead).
    let rows = sqlx::query(
        "SELECT n.id, n.cores, n.memory, COALESCE(SUM(a.cores), 0), COALESCE(SUM(a.memory), 0), n.epoch, n.name \
         FROM nodes n LEFT JOIN attempts a ON a.node_id = n.id AND a.state != 'ended' \
         WHERE n.state = 'ready' AND n.id IN (SELECT value FROM json_each(?1, '$.nodes')) GROUP BY n.id; \
         SELECT t.id, t.cores, t.memory FROM json_each(?1, '$.tasks') AS p \
         CROSS JOIN tasks t ON t.id = p.value WHERE t.state = 'queued'",
    )
    .bind(ids.to_string())
    .fetch_all(&mut *conn)
    .await?;
    let mut loads = HashMap::new();
    let mut nodes = HashMap::new();
    let mut need = HashMap::new();
    for r in &rows {
        if r.len() == 7 {
            let capacity = Resources { cores: get_u32(r, 1), memory: get_u64(r, 2), pids: 0 };
            let reserved = Resources { cores: get_u32(r, 3), memory: get_u64(r, 4), pids: 0 };
            let id = r.try_get::<i64, _>(0)?;
            loads.insert(id, NodeLoad { capacity, reserved });
            nodes.insert(id, (r.try_get::<i64, _>(5)?, r.try_get::<String, _>(6)?));
        } else {
            need.insert(
                r.try_get::<i64, _>(0)?,
                Resources { cores: get_u32(r, 1), memory: get_u64(r, 2), pids: 0 },
            );
        }
    }
    Ok((admit(plan, &mut loads, &need), nodes))
}

/// A non-negative count read as `u32` (saturating: a corrupt negative reads as 0).
pub(super) fn get_u32(row: &sqlx::sqlite::SqliteRow, index: usize) -> u32 {
    u32::try_from(row.get::<i64, _>(index).max(0)).unwrap_or(u32::MAX)
}

/// A non-negative size read as `u64`.
pub(super) fn get_u64(row: &sqlx::sqlite::SqliteRow, index: usize) -> u64 {
    u64::try_from(row.get::<i64, _>(index)).unwrap_or(0)
}

/// A chunk read with the columns `c.id, c.task_id, t.name, t.frame, c.attempt, c.heads,
/// c.data`, in that order (every log query selects them so).
pub(super) fn stored_chunk(r: &sqlx::sqlite::SqliteRow) -> log_chunks::StoredChunk {
    log_chunks::StoredChunk {
        id: r.get(0),
        task_id: r.get(1),
        task_name: r.get(2),
        frame: r.get(3),
        attempt: get_u32(r, 4),
        heads: r.get(5),
        data: r.get(6),
    }
}
