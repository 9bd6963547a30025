//! What follows an attempt's report: starting it, ending it and settling its task (retry or
//! final state, then dependents and the job's state), inside the caller's transaction and
//! under the lock order of this module's parent.

use super::*;

/// The distinct states of the tasks of job `j` (a row of the enclosing query), as the
/// recursive CTE `s(state)` ending in a `NULL` row: a "loose index scan" of
/// `tasks_by_job_state`, one index probe per state instead of reading every task, which
/// matters because this runs on every task settled (PostgreSQL has no skip scan of its own
/// before version 18).
macro_rules! job_task_states_scan {
    () => {
        "WITH RECURSIVE s(state) AS ( \
             (SELECT t.state FROM tasks t WHERE t.job_id = j.id ORDER BY t.state LIMIT 1) \
             UNION ALL \
             SELECT (SELECT t.state FROM tasks t WHERE t.job_id = j.id AND t.state > s.state \
                     ORDER BY t.state LIMIT 1) \
             FROM s WHERE s.state IS NOT NULL) "
    };
}
pub(super) use job_task_states_scan;

/// Recomputes jobs' states from their tasks and records a job event for each that changed.
/// The caller holds the jobs' row locks.
pub(super) async fn refresh_jobs(conn: &mut PgConnection, job_ids: &[i64], now_ms: i64) -> Result<()> {
    let rows = sqlx::query(concat!(
        "SELECT j.id, j.state, j.cancelled, ARRAY(",
        job_task_states_scan!(),
        "SELECT state FROM s WHERE state IS NOT NULL) FROM jobs j WHERE j.id = ANY($1) ORDER BY j.id"
    ))
    .bind(job_ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut events = Vec::new();
    for r in &rows {
        let job_id: i64 = r.try_get(0)?;
        let old: JobState = parse_word("job state", r.try_get::<&str, _>(1)?)?;
        let cancelled: bool = r.try_get(2)?;
        let states: Vec<String> = r.try_get(3)?;
        let states =
            states.iter().map(|s| parse_word::<TaskState>("task state", s)).collect::<Result<Vec<_>>>()?;
        let new = JobState::derive(states, cancelled);
        if new != old {
            let ended = new.is_final().then_some(now_ms);
            sqlx::query("UPDATE jobs SET state = $1, ended_ms = $2 WHERE id = $3")
                .bind(new.as_str())
                .bind(ended)
                .bind(job_id)
                .execute(&mut *conn)
                .await?;
            events.push(Ev::job(job_id, new, String::new()));
        }
    }
    emit(conn, now_ms, events).await
}

/// Events and job-state refreshes a transaction collects as it settles attempts, written once
/// when it is done ([`JobChanges::write`]): a batch of reports then costs one event insert and
/// one state derivation for all its jobs instead of one each per report. The caller holds the
/// jobs' row locks, so writing them last changes no lock order.
#[derive(Default)]
pub(super) struct JobChanges {
    events: Vec<Ev>,
    refresh: std::collections::BTreeSet<i64>,
}

impl JobChanges {
    /// Adds events to their jobs' histories, after those added before.
    pub(super) fn events(&mut self, events: impl IntoIterator<Item = Ev>) {
        self.events.extend(events);
    }

    /// Marks a job's state for derivation once its tasks' changes are in.
    pub(super) fn refresh(&mut self, job_id: i64) {
        self.refresh.insert(job_id);
    }

    /// Writes the events, then derives each marked job's state (which may add job events).
    pub(super) async fn write(self, conn: &mut PgConnection, now_ms: i64) -> Result<()> {
        emit(conn, now_ms, self.events).await?;
        let jobs: Vec<i64> = self.refresh.into_iter().collect();
        if jobs.is_empty() {
            return Ok(());
        }
        refresh_jobs(conn, &jobs, now_ms).await
    }
}

/// Queues or skips the waiting tasks that the end of a task of group `name` (in final state
/// `state`) releases, cascading skips; touches only that group's dependents. The caller holds
/// the job's row lock.
pub(super) async fn release_dependents(
    conn: &mut PgConnection,
    changes: &mut JobChanges,
    job_id: i64,
    name: &str,
    state: TaskState,
    now_ms: i64,
) -> Result<()> {
    let mut rows = dependencies::JobDependencies { conn: &mut *conn, job_id, now_ms };
    let released = release_after(&mut rows, name, state).await?;
    changes.events(released.into_iter().map(|r| {
        let mut ev = Ev::task(job_id, r.task.id, &r.task.name, r.task.frame, r.state);
        ev.message = r.reason;
        ev
    }));
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

/// How [`open_attempt`] locks the attempt row.
#[derive(Clone, Copy)]
pub(super) enum AttemptLock {
    /// For changing the attempt (reports, settling).
    Update,
    /// For appending output: concurrent appends proceed, a report waits for them.
    Share,
}

/// Locks an attempt and returns it when it is still open and current, checking the fencing
/// token. The lock makes the check and what the caller does next one step: a report that
/// raced with another one for the same attempt waits here and then sees it ended.
pub(super) async fn open_attempt(
    conn: &mut PgConnection,
    attempt_id: i64,
    epoch: Option<i64>,
    lock: AttemptLock,
) -> Result<Option<AttemptRow>> {
    // When the row changed while this waited for the lock, PostgreSQL re-reads the attempt
    // (READ COMMITTED), but not the joined task; every change of `current_attempt` away from
    // an open attempt also ends that attempt, so the attempt's state is what decides.
    let sql = match lock {
        AttemptLock::Update => {
            "SELECT a.id, a.task_id, a.job_id, a.number, a.epoch, a.state, t.current_attempt, n.name \
             FROM attempts a JOIN tasks t ON t.id = a.task_id JOIN nodes n ON n.id = a.node_id \
             WHERE a.id = $1 FOR NO KEY UPDATE OF a"
        }
        AttemptLock::Share => {
            "SELECT a.id, a.task_id, a.job_id, a.number, a.epoch, a.state, t.current_attempt, n.name \
             FROM attempts a JOIN tasks t ON t.id = a.task_id JOIN nodes n ON n.id = a.node_id \
             WHERE a.id = $1 FOR SHARE OF a"
        }
    };
    let row = sqlx::query(sql).bind(attempt_id).fetch_optional(&mut *conn).await?;
    let Some(row) = row else { return Ok(None) };
    let current: Option<i64> = row.try_get(6)?;
    let state: &str = row.try_get(5)?;
    let row_epoch: i64 = row.try_get(4)?;
    if current != Some(attempt_id) || state == "ended" || epoch.is_some_and(|e| e != row_epoch) {
        return Ok(None);
    }
    Ok(Some(AttemptRow {
        id: row.try_get(0)?,
        task_id: row.try_get(1)?,
        job_id: row.try_get(2)?,
        number: get_u32(&row, 3)?,
        node: row.try_get(7)?,
    }))
}

/// Ends an attempt and settles its task: final state (then dependents and job state) or retry.
/// The caller holds the attempt's row lock; this takes the job's.
pub(super) async fn settle_attempt(
    conn: &mut PgConnection,
    changes: &mut JobChanges,
    attempt: &AttemptRow,
    report: &AttemptReport,
    now_ms: i64,
) -> Result<()> {
    // Under the job's lock, `cancelled` cannot change before this commits: a concurrent
    // cancel either came first (and this settles as cancelled) or waits for this. The task
    // row read along is current: a task with an open attempt is only written under that
    // attempt's lock, which the caller holds.
    let row = sqlx::query(
        "SELECT j.cancelled, j.has_deps, t.name, t.frame, t.plan FROM jobs j, tasks t \
         WHERE j.id = $1 AND t.id = $2 FOR NO KEY UPDATE OF j",
    )
    .bind(attempt.job_id)
    .bind(attempt.task_id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(StoreError::NotFound { what: "task", id: attempt.task_id })?;
    let cancelled: bool = row.try_get(0)?;
    let has_deps: bool = row.try_get(1)?;
    let name: String = row.try_get(2)?;
    let frame: Option<i64> = row.try_get(3)?;
    let plan: TaskPlan = json("task plan", row.try_get::<&str, _>(4)?)?;
    let end = AttemptEnd { exit_code: report.exit_code, failure: report.failure };
    let settled = settle_task(&plan, attempt.number, end, &report.message, cancelled, now_ms);
    let state = settled.state;
    sqlx::query(
        "WITH ended AS ( \
             UPDATE attempts SET state = 'ended', ended_ms = $1, exit_code = $2, signal = $3, failure = $4, \
             message = $5, cpu_seconds = $6, peak_memory = $7, input_tokens = GREATEST(input_tokens, $15), \
             output_tokens = GREATEST(output_tokens, $16) WHERE id = $8) \
         UPDATE tasks SET state = $9, reason = $10, not_before_ms = $11, ended_ms = $12, exit_code = $2, \
         failure = $13, cpu_seconds = $6, peak_memory = $7 WHERE id = $14",
    )
    .bind(now_ms)
    .bind(report.exit_code)
    .bind(report.signal)
    .bind(report.failure.map(|f| f.as_str()))
    .bind(&report.message)
    .bind(report.cpu_seconds)
    .bind(report.peak_memory as i64)
    .bind(attempt.id)
    .bind(state.as_str())
    .bind(&settled.reason)
    .bind(settled.not_before_ms)
    .bind(settled.ended_ms)
    .bind(settled.failure.map(|f| f.as_str()))
    .bind(attempt.task_id)
    .bind(i64::try_from(report.input_tokens).unwrap_or(i64::MAX))
    .bind(i64::try_from(report.output_tokens).unwrap_or(i64::MAX))
    .execute(&mut *conn)
    .await?;
    let mut ev = Ev::task(attempt.job_id, attempt.task_id, &name, frame, state);
    ev.message = settled.reason;
    ev.exit_code = report.exit_code;
    ev.attempt = attempt.number;
    ev.node = attempt.node.clone();
    changes.events([ev]);
    if state.is_final() && has_deps {
        release_dependents(conn, changes, attempt.job_id, &name, state, now_ms).await?;
    }
    changes.refresh(attempt.job_id);
    Ok(())
}

/// Returns the task of an attempt that never reached its agent to the queue, as if the
/// attempt had not been made. The caller holds the attempt's and the job's row locks.
pub(super) async fn requeue_undelivered(
    conn: &mut PgConnection,
    changes: &mut JobChanges,
    attempt_id: i64,
    task_id: i64,
    now_ms: i64,
) -> Result<()> {
    let row = sqlx::query(
        "WITH ended AS ( \
             UPDATE attempts SET state = 'ended', ended_ms = $1, failure = 'lost', message = 'never delivered' \
             WHERE id = $2) \
         UPDATE tasks SET state = 'queued', attempts = attempts - 1, current_attempt = NULL, node_id = NULL \
         WHERE id = $3 AND current_attempt = $2 RETURNING id, job_id, name, frame",
    )
    .bind(now_ms)
    .bind(attempt_id)
    .bind(task_id)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(r) = row {
        let mut ev = Ev::task(
            r.try_get(1)?,
            r.try_get(0)?,
            r.try_get::<&str, _>(2)?,
            r.try_get(3)?,
            TaskState::Queued,
        );
        ev.message = "assignment was not delivered; queued again".into();
        changes.events([ev]);
    }
    Ok(())
}

/// Ends every open attempt of nodes that went away (their lease ran out, or they were revoked)
/// and settles each as lost with `why(node_id)` as the message: its task is retried or fails
/// as its retry policy says. The caller holds the nodes' row locks (first in the lock order);
/// this takes the attempts' and then their jobs'. Returns the attempts ended, in id order.
pub(super) async fn lose_node_attempts(
    conn: &mut PgConnection,
    node_ids: &[i64],
    why: &(dyn Fn(i64) -> String + Sync),
    now_ms: i64,
) -> Result<Vec<i64>> {
    let open: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT id, epoch, job_id, node_id FROM attempts WHERE node_id = ANY($1) AND state <> 'ended' \
         ORDER BY id FOR NO KEY UPDATE",
    )
    .bind(node_ids)
    .fetch_all(&mut *conn)
    .await?;
    let jobs: Vec<i64> = open.iter().map(|(_, _, job_id, _)| *job_id).collect();
    lock_jobs(conn, &jobs).await?;
    let mut changes = JobChanges::default();
    for (attempt_id, epoch, _, node_id) in &open {
        if let Some(a) = open_attempt(conn, *attempt_id, None, AttemptLock::Update).await? {
            let report = lost_report(*attempt_id, *epoch, &why(*node_id));
            settle_attempt(conn, &mut changes, &a, &report, now_ms).await?;
        } else {
            sqlx::query("UPDATE attempts SET state = 'ended', ended_ms = $1 WHERE id = $2")
                .bind(now_ms)
                .bind(attempt_id)
                .execute(&mut *conn)
                .await?;
        }
    }
    changes.write(conn, now_ms).await?;
    Ok(open.into_iter().map(|(id, ..)| id).collect())
}
