//! `apply_updates` on PostgreSQL: a batch of starts and finishes in a fixed number of
//! statements (see [`crate::update_batch`]), whatever its size.

use super::settle::release_dependents;
use super::*;
use crate::update_batch::{self, AttemptView, Decided, TaskFacts};

/// Applies `updates` in the caller's transaction; per update, whether it applied.
pub(super) async fn apply(
    conn: &mut PgConnection,
    updates: &[AttemptUpdate],
    now_ms: i64,
) -> Result<Vec<Applied>> {
    // Every lock the batch needs, up front and in the global order (attempts, then jobs, each
    // by id). When an attempt changed while this waited for its lock, PostgreSQL re-reads the
    // attempt (READ COMMITTED) but not the joined task; every change of `current_attempt`
    // away from an open attempt also ends that attempt, so the attempt's state decides.
    let attempt_ids = update_batch::attempt_ids(updates);
    let finishing = update_batch::finishing_attempts(updates);
    // Plans never change, so they are read here, and only for the attempts the batch finishes.
    let rows = sqlx::query(
        "SELECT a.id, a.task_id, a.job_id, a.number, a.epoch, a.state, t.current_attempt, n.name, t.name, t.frame, \
         CASE WHEN a.id = ANY($2) THEN t.plan END \
         FROM attempts a JOIN tasks t ON t.id = a.task_id JOIN nodes n ON n.id = a.node_id \
         WHERE a.id = ANY($1) ORDER BY a.id FOR NO KEY UPDATE OF a",
    )
    .bind(&attempt_ids)
    .bind(&finishing)
    .fetch_all(&mut *conn)
    .await?;
    let mut attempts = HashMap::with_capacity(rows.len());
    for r in &rows {
        let id: i64 = r.try_get(0)?;
        let current: Option<i64> = r.try_get(6)?;
        attempts.insert(
            id,
            AttemptView {
                task_id: r.try_get(1)?,
                job_id: r.try_get(2)?,
                number: get_u32(r, 3)?,
                epoch: r.try_get(4)?,
                state: r.try_get(5)?,
                current: current == Some(id),
                node: r.try_get(7)?,
                task_name: r.try_get(8)?,
                frame: r.try_get(9)?,
            },
        );
    }
    let jobs: Vec<i64> = attempts.values().map(|a| a.job_id).collect();
    // Under the jobs' locks, `cancelled` cannot change before this commits: a concurrent
    // cancel either came first (and these settle as cancelled) or waits for this.
    let flags = lock_jobs_reading_flags(conn, &jobs).await?;
    let finished = update_batch::finished_tasks(updates, &attempts);
    let mut facts = HashMap::with_capacity(finished.len());
    for r in &rows {
        let task_id: i64 = r.try_get(1)?;
        let Some(plan) = r.try_get::<Option<&str>, _>(10)? else { continue };
        if finished.binary_search(&task_id).is_err() || facts.contains_key(&task_id) {
            continue;
        }
        let job_id: i64 = r.try_get(2)?;
        let &(cancelled, has_deps) =
            flags.get(&job_id).ok_or(StoreError::NotFound { what: "job", id: job_id })?;
        let plan: TaskPlan = json("task plan", plan)?;
        facts.insert(task_id, TaskFacts { plan, cancelled, has_deps });
    }
    let decided = update_batch::decide(updates, &attempts, &facts, now_ms)
        .map_err(|id| StoreError::NotFound { what: "task", id })?;
    write_starts(conn, &decided, now_ms).await?;
    write_finishes(conn, &decided, now_ms).await?;
    let Decided { applied, releases, events, jobs, .. } = decided;
    let mut changes = JobChanges::default();
    changes.events(events);
    for r in releases {
        release_dependents(conn, &mut changes, r.job_id, &r.task_name, r.state, now_ms).await?;
    }
    for job in jobs {
        changes.refresh(job);
    }
    changes.write(conn, now_ms).await?;
    Ok(applied)
}

/// Every start of the batch, attempts and tasks, in one statement. No job lock is needed for
/// the tasks: a task with an open attempt is only written by holders of that attempt's lock.
async fn write_starts(conn: &mut PgConnection, decided: &Decided<'_>, now_ms: i64) -> Result<()> {
    if decided.starts.is_empty() {
        return Ok(());
    }
    let attempts: Vec<i64> = decided.starts.iter().map(|s| s.attempt_id).collect();
    let tasks: Vec<i64> = decided.starts.iter().map(|s| s.task_id).collect();
    sqlx::query(
        "WITH started AS ( \
             UPDATE attempts SET state = 'running', started_ms = $1 WHERE id = ANY($2) AND state = 'assigned') \
         UPDATE tasks SET state = 'running', started_ms = $1 WHERE id = ANY($3) AND state = 'assigned'",
    )
    .bind(now_ms)
    .bind(&attempts)
    .bind(&tasks)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Every finish of the batch, attempts and their settled tasks, in one statement.
async fn write_finishes(conn: &mut PgConnection, decided: &Decided<'_>, now_ms: i64) -> Result<()> {
    let f = &decided.finishes;
    if f.is_empty() {
        return Ok(());
    }
    let attempt: Vec<i64> = f.iter().map(|x| x.attempt_id).collect();
    let task: Vec<i64> = f.iter().map(|x| x.task_id).collect();
    let exit_code: Vec<Option<i32>> = f.iter().map(|x| x.report.exit_code).collect();
    let signal: Vec<Option<i32>> = f.iter().map(|x| x.report.signal).collect();
    let failure: Vec<Option<&str>> = f.iter().map(|x| x.report.failure.map(|c| c.as_str())).collect();
    let message: Vec<&str> = f.iter().map(|x| x.report.message.as_str()).collect();
    let cpu: Vec<f64> = f.iter().map(|x| x.report.cpu_seconds).collect();
    let peak: Vec<i64> = f.iter().map(|x| i64::try_from(x.report.peak_memory).unwrap_or(i64::MAX)).collect();
    let input: Vec<i64> =
        f.iter().map(|x| i64::try_from(x.report.input_tokens).unwrap_or(i64::MAX)).collect();
    let output: Vec<i64> =
        f.iter().map(|x| i64::try_from(x.report.output_tokens).unwrap_or(i64::MAX)).collect();
    let state: Vec<&str> = f.iter().map(|x| x.settled.state.as_str()).collect();
    let reason: Vec<&str> = f.iter().map(|x| x.settled.reason.as_str()).collect();
    let not_before: Vec<i64> = f.iter().map(|x| x.settled.not_before_ms).collect();
    let ended: Vec<Option<i64>> = f.iter().map(|x| x.settled.ended_ms).collect();
    let settled_failure: Vec<Option<&str>> =
        f.iter().map(|x| x.settled.failure.map(|c| c.as_str())).collect();
    sqlx::query(
        "WITH u AS ( \
             SELECT * FROM UNNEST($2::BIGINT[], $3::BIGINT[], $4::INT[], $5::INT[], $6::TEXT[], $7::TEXT[], \
                                  $8::DOUBLE PRECISION[], $9::BIGINT[], $10::BIGINT[], $11::BIGINT[], $12::TEXT[], \
                                  $13::TEXT[], $14::BIGINT[], $15::BIGINT[], $16::TEXT[]) \
             AS u(attempt_id, task_id, exit_code, signal, failure, message, cpu, peak, input_tokens, \
                  output_tokens, state, reason, not_before_ms, ended_ms, task_failure)), \
         ended AS ( \
             UPDATE attempts a SET state = 'ended', ended_ms = $1, exit_code = u.exit_code, signal = u.signal, \
             failure = u.failure, message = u.message, cpu_seconds = u.cpu, peak_memory = u.peak, \
             input_tokens = GREATEST(a.input_tokens, u.input_tokens), \
             output_tokens = GREATEST(a.output_tokens, u.output_tokens) \
             FROM u WHERE a.id = u.attempt_id) \
         UPDATE tasks t SET state = u.state, reason = u.reason, not_before_ms = u.not_before_ms, \
         ended_ms = u.ended_ms, exit_code = u.exit_code, failure = u.task_failure, cpu_seconds = u.cpu, \
         peak_memory = u.peak FROM u WHERE t.id = u.task_id",
    )
    .bind(now_ms)
    .bind(&attempt)
    .bind(&task)
    .bind(&exit_code)
    .bind(&signal)
    .bind(&failure)
    .bind(&message)
    .bind(&cpu)
    .bind(&peak)
    .bind(&input)
    .bind(&output)
    .bind(&state)
    .bind(&reason)
    .bind(&not_before)
    .bind(&ended)
    .bind(&settled_failure)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
