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
