//! The append-only history of a job: events with consecutive sequence numbers.

use super::*;

pub(super) use crate::event_row::Ev;

/// Appends events to a job's history with consecutive sequence numbers.
pub(super) async fn emit(
    conn: &mut SqliteConnection,
    job_id: i64,
    now_ms: i64,
    events: Vec<Ev>,
) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let last: i64 =
        sqlx::query_scalar("UPDATE jobs SET last_seq = last_seq + ? WHERE id = ? RETURNING last_seq")
            .bind(events.len() as i64)
            .bind(job_id)
            .fetch_one(&mut *conn)
            .await?;
    let first = last - events.len() as i64 + 1;
    let mut seq = first;
    for chunk in events.chunks(INSERT_CHUNK) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO events (job_id, seq, time_ms, kind, task_id, task_name, frame, state, message, exit_code, attempt, node) ",
        );
        q.push_values(chunk, |mut b, e| {
            b.push_bind(job_id)
                .push_bind(seq)
                .push_bind(now_ms)
                .push_bind(e.kind)
                .push_bind(e.task_id)
                .push_bind(&e.task_name)
                .push_bind(e.frame)
                .push_bind(&e.state)
                .push_bind(&e.message)
                .push_bind(e.exit_code)
                .push_bind(e.attempt as i64)
                .push_bind(&e.node);
            seq += 1;
        });
        q.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// A job's events after `after_seq`, at most `limit`, in order.
pub(super) fn after(
    conn: &rusqlite::Connection,
    job_id: i64,
    after_seq: i64,
    limit: u32,
) -> Result<Vec<EventRecord>> {
    let mut statement = conn.prepare_cached(
        "SELECT job_id, seq, time_ms, kind, task_id, task_name, frame, state, message, exit_code, attempt, node \
         FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
    )?;
    let rows = statement.query_map(rusqlite::params![job_id, after_seq, limit], |r| {
        Ok(EventRecord {
            job_id: r.get(0)?,
            seq: r.get(1)?,
            time_ms: r.get(2)?,
            kind: r.get(3)?,
            task_id: r.get(4)?,
            task_name: r.get(5)?,
            frame: r.get(6)?,
            state: r.get(7)?,
            message: r.get(8)?,
            exit_code: r.get(9)?,
            attempt: r.get::<_, i64>(10)?.clamp(0, i64::from(u32::MAX)) as u32,
            node: r.get(11)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

/// A job's row, if it exists.
pub(super) fn job(conn: &rusqlite::Connection, job_id: i64) -> Result<Option<JobRecord>> {
    let mut statement = conn.prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?"))?;
    let mut rows = statement.query([job_id])?;
    let Some(r) = rows.next()? else { return Ok(None) };
    Ok(Some(JobRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        project: r.get(2)?,
        priority: r.get(3)?,
        state: parse_word("job state", &r.get::<_, String>(4)?)?,
        cancelled: r.get(5)?,
        created_ms: r.get(6)?,
        last_seq: r.get(7)?,
    }))
}
