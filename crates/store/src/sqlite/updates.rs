//! `apply_updates` on SQLite: a batch of starts and finishes in a fixed number of statements
//! (see [`crate::update_batch`]), whatever its size. Every statement is a round trip to the
//! connection's worker thread, so the count, not the rows, is what a batch costs. Lists travel
//! as one JSON parameter each, read back with `json_each`.

use serde_json::json as json_value;

use super::job_changes::{Ahead, job_changes_sql};
use super::settle::release_dependents;
use super::*;
use crate::update_batch::{self, AttemptView, Decided, TaskFacts};

/// Applies `updates` in the caller's transaction (on the single writer, which serialises it
/// with every other write); per update, whether it applied.
pub(super) async fn apply(
    conn: &mut SqliteConnection,
    updates: &[AttemptUpdate],
    now_ms: i64,
) -> Result<Vec<Applied>> {
    let attempt_ids = to_json("attempt ids", &update_batch::attempt_ids(updates))?;
    let finishing = to_json("attempt ids", &update_batch::finishing_attempts(updates))?;
    // The single writer serialises this with every other write, so the job's flags read
    // here hold until the commit. Plans are read only for the attempts the batch finishes.
    let rows = sqlx::query(
        "SELECT a.id, a.task_id, a.job_id, a.number, a.epoch, a.state, t.current_attempt, n.name, t.name, t.frame, \
         j.cancelled, j.has_deps, CASE WHEN a.id IN (SELECT value FROM json_each(?2)) THEN t.plan END \
         FROM attempts a JOIN tasks t ON t.id = a.task_id JOIN jobs j ON j.id = a.job_id \
         JOIN nodes n ON n.id = a.node_id \
         WHERE a.id IN (SELECT value FROM json_each(?1))",
    )
    .bind(&attempt_ids)
    .bind(&finishing)
    .fetch_all(&mut *conn)
    .await?;
    let mut attempts = HashMap::with_capacity(rows.len());
    for r in &rows {
        let id: i64 = r.try_get(0)?;
        let current: Option<i64> = r.try_get(6)?;
        let number: i64 = r.try_get(3)?;
        attempts.insert(
            id,
            AttemptView {
                task_id: r.try_get(1)?,
                job_id: r.try_get(2)?,
                number: u32::try_from(number).map_err(|e| corrupt("attempt number", e))?,
                epoch: r.try_get(4)?,
                state: r.try_get(5)?,
                current: current == Some(id),
                node: r.try_get(7)?,
                task_name: r.try_get(8)?,
                frame: r.try_get(9)?,
            },
        );
    }
    let finished = update_batch::finished_tasks(updates, &attempts);
    let mut facts = HashMap::with_capacity(finished.len());
    for r in &rows {
        let task_id: i64 = r.try_get(1)?;
        let Some(plan) = r.try_get::<Option<&str>, _>(12)? else { continue };
        if finished.binary_search(&task_id).is_ok() && !facts.contains_key(&task_id) {
            let plan: TaskPlan = json("task plan", plan)?;
            facts.insert(task_id, TaskFacts { plan, cancelled: r.try_get(10)?, has_deps: r.try_get(11)? });
        }
    }
    let decided = update_batch::decide(updates, &attempts, &facts, now_ms)
        .map_err(|id| StoreError::NotFound { what: "task", id })?;
    let writes = writes(&decided);
    let Decided { applied, releases, events, jobs, .. } = decided;
    let mut changes = JobChanges::default();
    for ev in events {
        changes.events(ev.job_id, [ev]);
    }
    for job in jobs {
        changes.refresh(job);
    }
    if releases.is_empty() {
        // The common case: the starts and finishes, the events and the jobs' states in one trip.
        changes.write_after(conn, now_ms, Some(writes)).await?;
    } else {
        // Releasing dependents reads the finished tasks' states, so the writes go first.
        writes.run(conn, now_ms).await?;
        for r in releases {
            release_dependents(conn, &mut changes, r.job_id, &r.task_name, r.state, now_ms).await?;
        }
        changes.write(conn, now_ms).await?;
    }
    Ok(applied)
}

/// The batch's writes, reading from the job changes' JSON parameter: `now`; `starts`, the
/// started attempts; `start_tasks`, their tasks; `finishes` (`[{attempt, task, …}]`). A list
/// that is empty changes nothing. (`+tasks.state` keeps SQLite from walking every assigned
/// task through the state index instead of looking up the started ones by id.)
macro_rules! writes_sql {
    () => {
        "UPDATE attempts SET state = 'running', started_ms = ?1 ->> '$.now' \
         WHERE id IN (SELECT value FROM json_each(?1, '$.starts')) AND state = 'assigned'; \
         UPDATE tasks SET state = 'running', started_ms = ?1 ->> '$.now' FROM json_each(?1, '$.start_tasks') AS s \
         WHERE tasks.id = s.value AND +tasks.state = 'assigned'; \
         UPDATE attempts AS a SET state = 'ended', ended_ms = ?1 ->> '$.now', exit_code = u.value ->> 'exit_code', \
         signal = u.value ->> 'signal', failure = u.value ->> 'failure', message = u.value ->> 'message', \
         cpu_seconds = u.value ->> 'cpu', peak_memory = u.value ->> 'peak', \
         input_tokens = MAX(a.input_tokens, u.value ->> 'input_tokens'), \
         output_tokens = MAX(a.output_tokens, u.value ->> 'output_tokens') \
         FROM json_each(?1, '$.finishes') AS u WHERE a.id = u.value ->> 'attempt'; \
         UPDATE tasks AS t SET state = u.value ->> 'state', reason = u.value ->> 'reason', \
         not_before_ms = u.value ->> 'not_before', ended_ms = u.value ->> 'ended', \
         exit_code = u.value ->> 'exit_code', failure = u.value ->> 'task_failure', \
         cpu_seconds = u.value ->> 'cpu', peak_memory = u.value ->> 'peak' \
         FROM json_each(?1, '$.finishes') AS u WHERE t.id = u.value ->> 'task';"
    };
}

/// Every start of the batch (its attempts, then their tasks), then every finish (its
/// attempts, then their settled tasks), as statements to run ahead of the job changes.
fn writes(decided: &Decided<'_>) -> Ahead {
    let attempts: Vec<serde_json::Value> = decided.starts.iter().map(|s| s.attempt_id.into()).collect();
    let tasks: Vec<serde_json::Value> = decided.starts.iter().map(|s| s.task_id.into()).collect();
    let rows: Vec<serde_json::Value> = decided
        .finishes
        .iter()
        .map(|f| {
            json_value!({
                "attempt": f.attempt_id,
                "task": f.task_id,
                "exit_code": f.report.exit_code,
                "signal": f.report.signal,
                "failure": f.report.failure.map(|c| c.as_str()),
                "message": f.report.message,
                "cpu": f.report.cpu_seconds,
                "peak": i64::try_from(f.report.peak_memory).unwrap_or(i64::MAX),
                "input_tokens": i64::try_from(f.report.input_tokens).unwrap_or(i64::MAX),
                "output_tokens": i64::try_from(f.report.output_tokens).unwrap_or(i64::MAX),
                "state": f.settled.state.as_str(),
                "reason": f.settled.reason,
                "not_before": f.settled.not_before_ms,
                "ended": f.settled.ended_ms,
                "task_failure": f.settled.failure.map(|c| c.as_str()),
            })
        })
        .collect();
    let mut lists = serde_json::Map::new();
    lists.insert("starts".into(), attempts.into());
    lists.insert("start_tasks".into(), tasks.into());
    lists.insert("finishes".into(), rows.into());
    Ahead { alone: writes_sql!(), with_changes: concat!(writes_sql!(), " ", job_changes_sql!()), lists }
}
