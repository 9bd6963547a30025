//! The append-only history of a job: events with consecutive sequence numbers, appended
//! under the job's row lock.

use super::*;

pub(super) use crate::event_row::Ev;

/// Appends events to their jobs' histories with consecutive sequence numbers, in the order
/// given. Advancing `last_seq` takes each job's row lock; when events of several jobs are
/// appended at once, the caller must hold those locks already (see [`lock_jobs`]), since one
/// `UPDATE` of several rows takes them in no defined order.
pub(super) async fn emit(conn: &mut PgConnection, now_ms: i64, events: Vec<Ev>) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let mut counts: BTreeMap<i64, i64> = BTreeMap::new();
    for e in &events {
        *counts.entry(e.job_id).or_default() += 1;
    }
    if let [(job_id, n)] = counts.iter().map(|(j, n)| (*j, *n)).collect::<Vec<_>>()[..] {
        return emit_one(conn, now_ms, job_id, n, events).await;
    }
    let (ids, ns): (Vec<i64>, Vec<i64>) = counts.iter().map(|(j, n)| (*j, *n)).unzip();
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "UPDATE jobs j SET last_seq = j.last_seq + c.n FROM UNNEST($1::BIGINT[], $2::BIGINT[]) AS c(id, n) \
         WHERE j.id = c.id RETURNING j.id, j.last_seq",
    )
    .bind(ids)
    .bind(ns)
    .fetch_all(&mut *conn)
    .await?;
    // Next sequence number per job.
    let mut next: HashMap<i64, i64> = HashMap::with_capacity(rows.len());
    for (job_id, last) in rows {
        next.insert(job_id, last - counts.get(&job_id).copied().unwrap_or(0) + 1);
    }
    let n = events.len();
    let (mut job_ids, mut seqs, mut kinds, mut task_ids, mut task_names, mut frames) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut states, mut messages, mut exit_codes, mut attempts, mut nodes) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for e in events {
        let Some(seq) = next.get_mut(&e.job_id) else {
            return Err(StoreError::NotFound { what: "job", id: e.job_id });
        };
        job_ids.push(e.job_id);
        seqs.push(*seq);
        *seq += 1;
        kinds.push(e.kind);
        task_ids.push(e.task_id);
        task_names.push(e.task_name);
        frames.push(e.frame);
        states.push(e.state);
        messages.push(e.message);
        exit_codes.push(e.exit_code);
        attempts.push(i64::from(e.attempt));
        nodes.push(e.node);
    }
    sqlx::query(
        "INSERT INTO events (job_id, seq, time_ms, kind, task_id, task_name, frame, state, message, exit_code, attempt, node) \
         SELECT u.job_id, u.seq, $1, u.kind, u.task_id, u.task_name, u.frame, u.state, u.message, u.exit_code, u.attempt, u.node \
         FROM UNNEST($2::BIGINT[], $3::BIGINT[], $4::TEXT[], $5::BIGINT[], $6::TEXT[], $7::BIGINT[], $8::TEXT[], \
                     $9::TEXT[], $10::INTEGER[], $11::BIGINT[], $12::TEXT[]) \
              AS u(job_id, seq, kind, task_id, task_name, frame, state, message, exit_code, attempt, node)",
    )
    .bind(now_ms)
    .bind(job_ids)
    .bind(seqs)
    .bind(kinds)
    .bind(task_ids)
    .bind(task_names)
    .bind(frames)
    .bind(states)
    .bind(messages)
    .bind(exit_codes)
    .bind(attempts)
    .bind(nodes)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// [`emit`] for events of one job (the common case): one statement, one round trip under
/// the job's row lock.
pub(super) async fn emit_one(
    conn: &mut PgConnection,
    now_ms: i64,
    job_id: i64,
    n: i64,
    events: Vec<Ev>,
) -> Result<()> {
    let mut kinds = Vec::with_capacity(events.len());
    let mut task_ids = Vec::with_capacity(events.len());
    let mut task_names = Vec::with_capacity(events.len());
    let mut frames = Vec::with_capacity(events.len());
    let mut states = Vec::with_capacity(events.len());
    let mut messages = Vec::with_capacity(events.len());
    let mut exit_codes = Vec::with_capacity(events.len());
    let mut attempts = Vec::with_capacity(events.len());
    let mut nodes = Vec::with_capacity(events.len());
    for e in events {
        kinds.push(e.kind);
        task_ids.push(e.task_id);
        task_names.push(e.task_name);
        frames.push(e.frame);
        states.push(e.state);
        messages.push(e.message);
        exit_codes.push(e.exit_code);
        attempts.push(i64::from(e.attempt));
        nodes.push(e.node);
    }
    let inserted = sqlx::query(
        "WITH bump AS (UPDATE jobs SET last_seq = last_seq + $2 WHERE id = $1 RETURNING last_seq) \
         INSERT INTO events (job_id, seq, time_ms, kind, task_id, task_name, frame, state, message, exit_code, attempt, node) \
         SELECT $1, bump.last_seq - $2 + u.n, $3, u.kind, u.task_id, u.task_name, u.frame, u.state, u.message, \
                u.exit_code, u.attempt, u.node \
         FROM bump, UNNEST($4::TEXT[], $5::BIGINT[], $6::TEXT[], $7::BIGINT[], $8::TEXT[], $9::TEXT[], \
                           $10::INTEGER[], $11::BIGINT[], $12::TEXT[]) \
              WITH ORDINALITY AS u(kind, task_id, task_name, frame, state, message, exit_code, attempt, node, n)",
    )
    .bind(job_id)
    .bind(n)
    .bind(now_ms)
    .bind(kinds)
    .bind(task_ids)
    .bind(task_names)
    .bind(frames)
    .bind(states)
    .bind(messages)
    .bind(exit_codes)
    .bind(attempts)
    .bind(nodes)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if inserted as i64 != n {
        return Err(StoreError::NotFound { what: "job", id: job_id });
    }
    Ok(())
}

/// Takes the row locks of jobs in id order (the deadlock-free order).
pub(super) async fn lock_jobs(conn: &mut PgConnection, job_ids: &[i64]) -> Result<()> {
    sqlx::query("SELECT id FROM jobs WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
        .bind(sorted_ids(job_ids))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Takes the row locks of jobs as [`lock_jobs`] does and reads, per job, whether it was
/// cancelled and whether any of its tasks has dependencies: flags that cannot change while
/// the locks are held.
pub(super) async fn lock_jobs_reading_flags(
    conn: &mut PgConnection,
    job_ids: &[i64],
) -> Result<HashMap<i64, (bool, bool)>> {
    let rows = sqlx::query(
        "SELECT id, cancelled, has_deps FROM jobs WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
    )
    .bind(sorted_ids(job_ids))
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(|r| Ok((r.try_get(0)?, (r.try_get(1)?, r.try_get(2)?)))).collect()
}

fn sorted_ids(ids: &[i64]) -> Vec<i64> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    ids
}
