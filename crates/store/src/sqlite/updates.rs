//! `apply_updates` on SQLite: a batch of starts and finishes in a fixed number of statements
//! (see [`crate::update_batch`]), whatever its size. Lists travel as one JSON parameter, read
//! back with `json_each`.
//!
//! A batch runs in one transaction on the calling thread (see [`super::direct`]): the reads,
//! then the writes. Nothing is read after writing, so the jobs' new states are derived from
//! what the read finds outside the batch (see [`update_batch::job_states_after`]). A batch
//! that releases dependents changes tasks outside it, and takes the longer way, on the sqlx
//! writer (the dependency rows are read and written by [`release_after`], which is async):
//! it writes, releases, reads its jobs' task states back, then commits.

use rusqlite::Connection;
use serde_json::json as json_value;
use tokio::sync::OwnedMutexGuard;

use super::direct;
use super::job_changes::{Ahead, task_states};
use super::open_tx::OpenTx;
use super::settle::release_dependents;
use super::*;
use crate::update_batch::{self, AttemptView, Decided, JobBefore, TaskFacts};

/// The batch's attempts. Its parameter is a JSON object: `attempts`, the batch's attempts;
/// `finishing`, those it finishes. It returns, per attempt, its row with its task's (the
/// task's plan only for a finish), 14 columns, read by [`Read`].
macro_rules! read_sql {
    () => {
        "SELECT a.id, a.task_id, a.job_id, a.number, a.epoch, a.state, t.current_attempt, n.name, t.name, t.frame, \
         j.cancelled, j.has_deps, CASE WHEN a.id IN (SELECT value FROM json_each(?1, '$.finishing')) THEN t.plan END, \
         t.state \
         FROM json_each(?1, '$.attempts') AS i CROSS JOIN attempts a ON a.id = i.value \
         JOIN tasks t ON t.id = a.task_id JOIN jobs j ON j.id = a.job_id JOIN nodes n ON n.id = a.node_id"
    };
}
/// What a batch with finishes also reads besides [`read_sql`]: for each job of a
/// finish, its state, cancelled flag and the distinct states of its tasks outside the batch,
/// 4 columns (the same loose index scan as `job_changes_sql`, keeping a state only when a task
/// outside the batch is in it). A batch of starts alone changes no job's state.
macro_rules! others_sql {
    () => {
        "WITH RECURSIVE b(task) AS ( \
             SELECT a.task_id FROM json_each(?1, '$.attempts') AS i CROSS JOIN attempts a ON a.id = i.value), \
         r(job) AS ( \
             SELECT DISTINCT a.job_id FROM json_each(?1, '$.finishing') AS i CROSS JOIN attempts a ON a.id = i.value), \
         s(job, state) AS ( \
             SELECT r.job, (SELECT MIN(t.state) FROM tasks t WHERE t.job_id = r.job) FROM r \
             UNION ALL \
             SELECT s.job, (SELECT MIN(t.state) FROM tasks t WHERE t.job_id = s.job AND t.state > s.state) \
             FROM s WHERE s.state IS NOT NULL), \
         g(job, states) AS ( \
             SELECT s.job, group_concat(s.state, ' ') FROM s WHERE s.state IS NOT NULL AND ( \
                 SELECT 1 FROM tasks t WHERE t.job_id = s.job AND t.state = s.state \
                 AND t.id NOT IN (SELECT task FROM b) LIMIT 1) IS NOT NULL \
             GROUP BY s.job) \
         SELECT j.id, j.state, j.cancelled, g.states FROM r CROSS JOIN jobs j ON j.id = r.job \
         LEFT JOIN g ON g.job = j.id"
    };
}

/// One row of [`read_sql`], as read.
struct Read {
    id: i64,
    view: AttemptView,
    /// The task's plan, for a finish.
    plan: Option<String>,
    cancelled: bool,
    has_deps: bool,
}

impl Read {
    fn direct(r: &rusqlite::Row<'_>) -> Result<Read> {
        let id: i64 = r.get(0)?;
        Ok(Read {
            id,
            view: view(
                (r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?),
                r.get::<_, Option<i64>>(6)? == Some(id),
                &r.get::<_, String>(13)?,
                (r.get(7)?, r.get(8)?, r.get(9)?),
            )?,
            plan: r.get(12)?,
            cancelled: r.get(10)?,
            has_deps: r.get(11)?,
        })
    }

    fn sqlx(r: &sqlx::sqlite::SqliteRow) -> Result<Read> {
        let id: i64 = r.try_get(0)?;
        Ok(Read {
            id,
            view: view(
                (r.try_get(1)?, r.try_get(2)?, r.try_get(3)?, r.try_get(4)?, r.try_get(5)?),
                r.try_get::<Option<i64>, _>(6)? == Some(id),
                r.try_get::<&str, _>(13)?,
                (r.try_get(7)?, r.try_get(8)?, r.try_get(9)?),
            )?,
            plan: r.try_get(12)?,
            cancelled: r.try_get(10)?,
            has_deps: r.try_get(11)?,
        })
    }
}

/// An attempt's view from its columns: (task, job, number, epoch, state), whether it is its
/// task's current attempt, its task's state, and (node, task name, frame).
fn view(
    (task_id, job_id, number, epoch, state): (i64, i64, i64, i64, String),
    current: bool,
    task_state: &str,
    (node, task_name, frame): (String, String, Option<i64>),
) -> Result<AttemptView> {
    Ok(AttemptView {
        task_id,
        job_id,
        number: u32::try_from(number).map_err(|e| corrupt("attempt number", e))?,
        epoch,
        state,
        current,
        task_state: parse_word("task state", task_state)?,
        node,
        task_name,
        frame,
    })
}

/// The read's parameter.
fn read_arg(updates: &[AttemptUpdate], finishing: &[i64]) -> String {
    json_value!({ "attempts": update_batch::attempt_ids(updates), "finishing": finishing }).to_string()
}

/// The attempts read, by id, and the facts of the tasks the batch finishes.
fn attempts_and_facts(
    updates: &[AttemptUpdate],
    read: Vec<Read>,
) -> Result<(HashMap<i64, AttemptView>, HashMap<i64, TaskFacts>)> {
    let mut attempts = HashMap::with_capacity(read.len());
    let mut plans = Vec::new();
    for r in read {
        if let Some(plan) = r.plan {
            plans.push((r.view.task_id, plan, r.cancelled, r.has_deps));
        }
        attempts.insert(r.id, r.view);
    }
    let finished = update_batch::finished_tasks(updates, &attempts);
    let mut facts = HashMap::with_capacity(finished.len());
    for (task_id, plan, cancelled, has_deps) in plans {
        if finished.binary_search(&task_id).is_ok() && !facts.contains_key(&task_id) {
            let plan: TaskPlan = json("task plan", &plan)?;
            facts.insert(task_id, TaskFacts { plan, cancelled, has_deps });
        }
    }
    Ok((attempts, facts))
}

/// Applies `updates` inside the caller's transaction on the direct connection; per update,
/// whether it applied. `None` when the batch releases dependents: nothing was written, and
/// the caller applies it with [`apply_committing`].
pub(super) fn apply_direct(
    conn: &Connection,
    updates: &[AttemptUpdate],
    now_ms: i64,
) -> Result<Option<Vec<Applied>>> {
    let finishing = update_batch::finishing_attempts(updates);
    let arg = read_arg(updates, &finishing);
    let read = direct::rows(conn, read_sql!(), &arg, Read::direct)?;
    let (attempts, facts) = attempts_and_facts(updates, read)?;
    let decided = update_batch::decide(updates, &attempts, &facts, now_ms)
        .map_err(|id| StoreError::NotFound { what: "task", id })?;
    if !decided.releases.is_empty() {
        return Ok(None);
    }
    // A batch of starts alone changes no job's state.
    let mut before = HashMap::new();
    if !finishing.is_empty() {
        for (job_id, job) in direct::rows(conn, others_sql!(), &arg, |r| {
            let others = task_states(r.get::<_, Option<String>>(3)?.as_deref())?;
            let state = parse_word("job state", &r.get::<_, String>(1)?)?;
            Ok((r.get::<_, i64>(0)?, JobBefore { state, cancelled: r.get(2)?, others }))
        })? {
            before.insert(job_id, job);
        }
    }
    let writes = writes(&decided);
    // The read of the jobs left out every task of the batch; those it does not write count
    // as read.
    let written = update_batch::written_tasks(&decided);
    for a in attempts.values().filter(|a| written.binary_search(&a.task_id).is_err()) {
        if let Some(job) = before.get_mut(&a.job_id) {
            job.others.push(a.task_state);
        }
    }
    let states = update_batch::job_states_after(&decided, &attempts, &before)
        .map_err(|id| StoreError::NotFound { what: "job", id })?;
    let Decided { applied, events, .. } = decided;
    let mut changes = JobChanges::default();
    for ev in events {
        changes.events(ev.job_id, [ev]);
    }
    for (job_id, state) in states {
        changes.set_state(job_id, state, now_ms);
    }
    changes.write_direct(conn, now_ms, writes)?;
    Ok(Some(applied))
}

/// Applies `updates` in a transaction of its own on the sqlx writer, begun and committed
/// here (the single writer serialises it with every other write); per update, whether it
/// applied. The way of a batch that releases dependents.
pub(super) async fn apply_committing(
    writer: OwnedMutexGuard<SqliteConnection>,
    updates: &[AttemptUpdate],
    now_ms: i64,
) -> Result<Vec<Applied>> {
    let mut open = OpenTx::new(writer);
    let Some(conn) = open.conn() else { return Ok(Vec::new()) };
    let result = apply(conn, updates, now_ms).await;
    open.close(result).await
}

async fn apply(conn: &mut SqliteConnection, updates: &[AttemptUpdate], now_ms: i64) -> Result<Vec<Applied>> {
    let finishing = update_batch::finishing_attempts(updates);
    let rows = sqlx::query(concat!("BEGIN; ", read_sql!()))
        .bind(read_arg(updates, &finishing))
        .fetch_all(&mut *conn)
        .await?;
    let read = rows.iter().map(Read::sqlx).collect::<Result<Vec<_>>>()?;
    let (attempts, facts) = attempts_and_facts(updates, read)?;
    let decided = update_batch::decide(updates, &attempts, &facts, now_ms)
        .map_err(|id| StoreError::NotFound { what: "task", id })?;
    let writes = writes(&decided);
    // Releasing dependents reads the finished tasks' states, so the writes go first.
    let Decided { applied, releases, events, jobs, .. } = decided;
    let mut changes = JobChanges::default();
    for ev in events {
        changes.events(ev.job_id, [ev]);
    }
    for job in jobs {
        changes.refresh(job);
    }
    writes.run(conn, now_ms).await?;
    for r in releases {
        release_dependents(conn, &mut changes, r.job_id, &r.task_name, r.state, now_ms).await?;
    }
    changes.write(conn, now_ms).await?;
    sqlx::query("COMMIT").execute(&mut *conn).await?;
    Ok(applied)
}

/// The batch's starts, reading from the job changes' JSON parameter: `now`; `starts`, the
/// started attempts; `start_tasks`, their tasks. (`+tasks.state` keeps SQLite from walking
/// every assigned task through the state index instead of looking up the started ones by id.)
macro_rules! starts_sql {
    () => {
        "UPDATE attempts SET state = 'running', started_ms = ?1 ->> '$.now' \
         WHERE id IN (SELECT value FROM json_each(?1, '$.starts')) AND state = 'assigned'; \
         UPDATE tasks SET state = 'running', started_ms = ?1 ->> '$.now' FROM json_each(?1, '$.start_tasks') AS s \
         WHERE tasks.id = s.value AND +tasks.state = 'assigned';"
    };
}

/// The batch's finishes, reading `now` and `finishes` (`[{attempt, task, …}]`) from the same
/// parameter: the attempts ended, then their tasks settled.
macro_rules! finishes_sql {
    () => {
        "UPDATE attempts AS a SET state = 'ended', ended_ms = ?1 ->> '$.now', exit_code = u.value ->> 'exit_code', \
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
    // Only the statements with something to do: each costs the trip a result to hand back.
    let statements = match (attempts.is_empty(), rows.is_empty()) {
        (false, false) => concat!(starts_sql!(), " ", finishes_sql!()),
        (false, true) => starts_sql!(),
        (true, false) => finishes_sql!(),
        (true, true) => "",
    };
    let mut lists = serde_json::Map::new();
    lists.insert("starts".into(), attempts.into());
    lists.insert("start_tasks".into(), tasks.into());
    lists.insert("finishes".into(), rows.into());
    Ahead { statements: statements.to_owned(), lists }
}
