//! A report of output appended on SQLite, in one transaction on the calling thread (see
//! [`super::direct`]): a fast writer's output is a report every few milliseconds.

use rusqlite::{Connection, OptionalExtension, params};

use super::*;
use crate::log_chunks::NewChunk;

/// Stores `rows` of the attempt's output if the attempt is still open and current under
/// `epoch`, and if `seq` (the agent's number for the report) is past the last one stored;
/// a report stored before is `Applied` again without storing anything.
pub(super) fn append(
    conn: &Connection,
    attempt_id: i64,
    epoch: i64,
    seq: Option<i64>,
    rows: &[NewChunk<'_>],
) -> Result<Applied> {
    let open = conn
        .prepare_cached(
            "SELECT a.task_id, a.job_id, a.number FROM attempts a JOIN tasks t ON t.id = a.task_id \
             WHERE a.id = ?1 AND a.epoch = ?2 AND a.state != 'ended' AND t.current_attempt = a.id",
        )?
        .query_row(params![attempt_id, epoch], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        })
        .optional()?;
    let Some((task_id, job_id, number)) = open else { return Ok(Applied::Stale) };
    if let Some(seq) = seq {
        let newer = conn
            .prepare_cached("UPDATE attempts SET output_seq = ?1 WHERE id = ?2 AND output_seq < ?1")?
            .execute(params![seq, attempt_id])?;
        if newer == 0 {
            // Stored when it came the first time; its acknowledgement was lost.
            return Ok(Applied::Applied);
        }
    }
    // Rows are numbered in order.
    let mut insert = conn.prepare_cached(
        "INSERT INTO log_chunks (job_id, task_id, attempt_id, attempt, heads, data) VALUES (?, ?, ?, ?, ?, ?)",
    )?;
    for chunk in rows {
        insert.execute(params![
            job_id,
            task_id,
            attempt_id,
            number,
            chunk.heads.as_str(),
            chunk.data.as_ref()
        ])?;
    }
    Ok(Applied::Applied)
}
