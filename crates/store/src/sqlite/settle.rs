//! What follows an attempt's report: starting it, ending it and settling its task (retry or
//! final state, then dependents and the job's state), inside the caller's transaction.

use super::*;

/// Queues or skips the waiting tasks that the end of a task of group `name` (in final state
/// `state`) releases, cascading skips; touches only that group's dependents.
pub(super) async fn release_dependents(
    conn: &mut SqliteConnection,
    changes: &mut JobChanges,
    job_id: i64,
    name: &str,
    state: TaskState,
    now_ms: i64,
) -> Result<()> {
    let mut rows = dependencies::JobDependencies { conn: &mut *conn, job_id, now_ms };
    let released = release_after(&mut rows, name, state).await?;
    let events = released.into_iter().map(|r| {
        let mut ev = Ev::task(job_id, r.task.id, &r.task.name, r.task.frame, r.state);
        ev.message = r.reason;
        ev
    });
    changes.events(job_id, events);
    Ok(())
}

/// The parts of an attempt row that settling needs.
pub(super) struct AttemptRow {
    pub(super) id: i64,
    pub(super) task_id: i64,
    pub(super) job_id: i64,
    pub(super) number: u32,
    pub(super) node: String,
}

/// Ends an attempt and settles its task: final state (then dependents and job state) or retry.
pub(super) async fn settle_attempt(
    conn: &mut SqliteConnection,
    changes: &mut JobChanges,
    attempt: &AttemptRow,
    report: &AttemptReport,
    now_ms: i64,
) -> Result<()> {
    sqlx::query(
        "UPDATE attempts SET state = 'ended', ended_ms = ?, exit_code = ?, signal = ?, failure = ?, message = ?, \
         cpu_seconds = ?, peak_memory = ?, input_tokens = MAX(input_tokens, ?), \
         output_tokens = MAX(output_tokens, ?) WHERE id = ?",
    )
    .bind(now_ms)
    .bind(report.exit_code)
    .bind(report.signal)
    .bind(report.failure.map(|f| f.as_str()))
    .bind(&report.message)
    .bind(report.cpu_seconds)
    .bind(report.peak_memory as i64)
    .bind(i64::try_from(report.input_tokens).unwrap_or(i64::MAX))
    .bind(i64::try_from(report.output_tokens).unwrap_or(i64::MAX))
    .bind(attempt.id)
    .execute(&mut *conn)
    .await?;
    let row = sqlx::query(
        "SELECT t.name, t.frame, t.plan, j.cancelled, j.has_deps FROM tasks t JOIN jobs j ON j.id = t.job_id \
         WHERE t.id = ?",
    )
    .bind(attempt.task_id)
    .fetch_one(&mut *conn)
    .await?;
    let name: String = row.get(0);
    let frame: Option<i64> = row.get(1);
    let plan: TaskPlan = json("task plan", row.get::<&str, _>(2))?;
    let cancelled: bool = row.get(3);
    let has_deps: bool = row.get(4);
    let end = AttemptEnd { exit_code: report.exit_code, failure: report.failure };
    let settled = settle_task(&plan, attempt.number, end, &report.message, cancelled, now_ms);
    let state = settled.state;
    sqlx::query(
        "UPDATE tasks SET state = ?, reason = ?, not_before_ms = ?, ended_ms = ?, exit_code = ?, failure = ?, \
         cpu_seconds = ?, peak_memory = ? WHERE id = ?",
    )
    .bind(state.as_str())
    .bind(&settled.reason)
    .bind(settled.not_before_ms)
    .bind(settled.ended_ms)
    .bind(report.exit_code)
    .bind(settled.failure.map(|f| f.as_str()))
    .bind(report.cpu_seconds)
    .bind(report.peak_memory as i64)
    .bind(attempt.task_id)
    .execute(&mut *conn)
    .await?;
    let mut ev = Ev::task(attempt.job_id, attempt.task_id, &name, frame, state);
    ev.message = settled.reason;
    ev.exit_code = report.exit_code;
    ev.attempt = attempt.number;
    ev.node = attempt.node.clone();
    changes.events(attempt.job_id, [ev]);
    if state.is_final() && has_deps {
        release_dependents(conn, changes, attempt.job_id, &name, state, now_ms).await?;
    }
    changes.refresh(attempt.job_id);
    Ok(())
}

/// Returns the task of an attempt that never reached its agent to the queue, as if the
/// attempt had not been made.
pub(super) async fn requeue_undelivered(
    conn: &mut SqliteConnection,
    changes: &mut JobChanges,
    attempt_id: i64,
    now_ms: i64,
) -> Result<()> {
    sqlx::query(
        "UPDATE attempts SET state = 'ended', ended_ms = ?, failure = 'lost', message = 'never delivered' \
         WHERE id = ?",
    )
    .bind(now_ms)
    .bind(attempt_id)
    .execute(&mut *conn)
    .await?;
    let row = sqlx::query(
        "UPDATE tasks SET state = 'queued', attempts = attempts - 1, current_attempt = NULL, node_id = NULL \
         WHERE current_attempt = ? RETURNING id, job_id, name, frame",
    )
    .bind(attempt_id)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(r) = row {
        let job_id: i64 = r.get(1);
        let mut ev = Ev::task(job_id, r.get(0), r.get::<&str, _>(2), r.get(3), TaskState::Queued);
        ev.message = "assignment was not delivered; queued again".into();
        changes.events(job_id, [ev]);
    }
    Ok(())
}

/// Loads an attempt that is still open and current, checking the fencing token.
pub(super) async fn open_attempt(
    conn: &mut SqliteConnection,
    attempt_id: i64,
    epoch: Option<i64>,
) -> Result<Option<AttemptRow>> {
    let row = sqlx::query(
        "SELECT a.id, a.task_id, a.job_id, a.number, a.epoch, a.state, t.current_attempt, n.name \
         FROM attempts a JOIN tasks t ON t.id = a.task_id JOIN nodes n ON n.id = a.node_id WHERE a.id = ?",
    )
    .bind(attempt_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let current: Option<i64> = row.get(6);
    let state: &str = row.get(5);
    if current != Some(attempt_id) || state == "ended" || epoch.is_some_and(|e| e != row.get::<i64, _>(4)) {
        return Ok(None);
    }
    Ok(Some(AttemptRow {
        id: row.get(0),
        task_id: row.get(1),
        job_id: row.get(2),
        number: row.get::<i64, _>(3) as u32,
        node: row.get(7),
    }))
}

/// Ends every open attempt of a node that went away (its lease ran out, or it was revoked)
/// and settles each as lost with `why` as the message: its task is retried or fails as its
/// retry policy says. Returns the attempts ended, in id order.
pub(super) async fn lose_node_attempts(
    conn: &mut SqliteConnection,
    changes: &mut JobChanges,
    node_id: i64,
    why: &str,
    now_ms: i64,
) -> Result<Vec<i64>> {
    let open: Vec<(i64, i64)> =
        sqlx::query_as("SELECT id, epoch FROM attempts WHERE node_id = ? AND state != 'ended' ORDER BY id")
            .bind(node_id)
            .fetch_all(&mut *conn)
            .await?;
    for (attempt_id, epoch) in &open {
        if let Some(a) = open_attempt(conn, *attempt_id, None).await? {
            settle_attempt(conn, changes, &a, &lost_report(*attempt_id, *epoch, why), now_ms).await?;
        } else {
            sqlx::query("UPDATE attempts SET state = 'ended', ended_ms = ? WHERE id = ?")
                .bind(now_ms)
                .bind(attempt_id)
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(open.into_iter().map(|(id, _)| id).collect())
}
