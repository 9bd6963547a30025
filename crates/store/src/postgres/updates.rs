//! `apply_updates` on PostgreSQL: a batch of starts and finishes in a fixed number of
//! statements (see [`crate::update_batch`]), whatever its size: the attempts read and
//! locked, the jobs locked (unless the batch only starts tasks of one job), then one
//! statement that writes everything and reads what the jobs' new states are derived from;
//! only a job whose state changed takes one more. Each statement is a network round trip,
//! and PostgreSQL plans each anew with the batch's values.

use super::settle::{job_task_states_scan, release_dependents};
use super::*;
use crate::update_batch::{self, AttemptView, Decided, JobBefore, TaskFacts};

/// Applies `updates` in the caller's transaction; per update, whether it applied.
pub(super) async fn apply(
    conn: &mut PgConnection,
    updates: &[AttemptUpdate],
    now_ms: i64,
) -> Result<Vec<Applied>> {
    // The locks the batch needs, in the global order (attempts, then jobs, each by id). When an attempt changed while this waited for its lock, PostgreSQL re-reads the
    // attempt (READ COMMITTED) but not the joined task; every change of `current_attempt`
    // away from an open attempt also ends that attempt, so the attempt's state decides.
    let attempt_ids = update_batch::attempt_ids(updates);
    let finishing = update_batch::finishing_attempts(updates);
    // Plans never change, so they are read here, and only for the attempts the batch finishes.
    let rows = sqlx::query(
        "SELECT a.id, a.task_id, a.job_id, a.number, a.epoch, a.state, t.current_attempt, n.name, t.name, t.frame, \
         CASE WHEN a.id = ANY($2) THEN t.plan END, t.state \
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
                task_state: parse_word("task state", r.try_get::<&str, _>(11)?)?,
                node: r.try_get(7)?,
                task_name: r.try_get(8)?,
                frame: r.try_get(9)?,
            },
        );
    }
    let jobs: Vec<i64> = attempts.values().map(|a| a.job_id).collect();
    // Under the jobs' locks, `cancelled` cannot change before this commits: a concurrent
    // cancel either came first (and these settle as cancelled) or waits for this. A batch of
    // starts only needs no job's flags and takes its one job's lock with the writes; locks
    // on several jobs are taken here, in id order, so that two batches cannot deadlock.
    let mut flags = HashMap::new();
    if !finishing.is_empty() || jobs.iter().collect::<HashSet<_>>().len() > 1 {
        flags = lock_jobs_reading_flags(conn, &jobs).await?;
    }
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
    if decided.releases.is_empty() {
        // Nothing outside the batch changes: the statement that writes it also reads, under
        // the jobs' locks taken above, what their new states are derived from, and only a
        // job whose state changed takes one more trip.
        let written = update_batch::written_tasks(&decided);
        let before = write_batch(conn, &decided, &decided.jobs, &written, now_ms).await?;
        let states = update_batch::job_states_after(&decided, &attempts, &before)
            .map_err(|id| StoreError::NotFound { what: "job", id })?;
        set_job_states(conn, &states, now_ms).await?;
        return Ok(decided.applied);
    }
    // Releasing dependents changes tasks outside the batch: the jobs' states are derived
    // from their tasks read back afterwards.
    write_batch(conn, &decided, &[], &[], now_ms).await?;
    let Decided { applied, releases, jobs, .. } = decided;
    let mut changes = JobChanges::default();
    for r in releases {
        release_dependents(conn, &mut changes, r.job_id, &r.task_name, r.state, now_ms).await?;
    }
    for job in jobs {
        changes.refresh(job);
    }
    changes.write(conn, now_ms).await?;
    Ok(applied)
}

/// Sets jobs' new states and appends the job event saying so, in one statement. The caller
/// holds the jobs' row locks.
async fn set_job_states(conn: &mut PgConnection, states: &[(i64, JobState)], now_ms: i64) -> Result<()> {
    if states.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = states.iter().map(|(id, _)| *id).collect();
    let words: Vec<&str> = states.iter().map(|(_, s)| s.as_str()).collect();
    let ended: Vec<Option<i64>> = states.iter().map(|(_, s)| s.is_final().then_some(now_ms)).collect();
    sqlx::query(
        "WITH c AS (SELECT * FROM UNNEST($2::BIGINT[], $3::TEXT[], $4::BIGINT[]) AS c(id, state, ended)), \
         bump AS ( \
             UPDATE jobs j SET state = c.state, ended_ms = c.ended, last_seq = j.last_seq + 1 FROM c \
             WHERE j.id = c.id RETURNING j.id, j.last_seq, c.state) \
         INSERT INTO events (job_id, seq, time_ms, kind, state, message) \
         SELECT id, last_seq, $1, 'job', state, '' FROM bump",
    )
    .bind(now_ms)
    .bind(&ids)
    .bind(&words)
    .bind(&ended)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The statement of [`write_batch`], from the parts a batch needs (each part planned costs
/// PostgreSQL time on every execution, since it plans each with the batch's values): its
/// starts, its finishes, always its events, and the read of the jobs to derive. Every
/// variant takes the same parameters.
macro_rules! write_batch_sql {
    (starts) => {
        "started_a AS ( \
             UPDATE attempts SET state = 'running', started_ms = $1 WHERE id = ANY($2) AND state = 'assigned'), \
         started_t AS ( \
             UPDATE tasks SET state = 'running', started_ms = $1 WHERE id = ANY($3) AND state = 'assigned'), \
         "
    };
    (finishes) => {
        "u AS ( \
             SELECT * FROM UNNEST($4::BIGINT[], $5::BIGINT[], $6::INT[], $7::INT[], $8::TEXT[], $9::TEXT[], \
                                  $10::DOUBLE PRECISION[], $11::BIGINT[], $12::BIGINT[], $13::BIGINT[], $14::TEXT[], \
                                  $15::TEXT[], $16::BIGINT[], $17::BIGINT[], $18::TEXT[], $19::BOOLEAN[]) \
             AS u(attempt_id, task_id, exit_code, signal, failure, message, cpu, peak, input_tokens, \
                  output_tokens, state, reason, not_before_ms, ended_ms, task_failure, started)), \
         ended AS ( \
             UPDATE attempts a SET state = 'ended', ended_ms = $1, exit_code = u.exit_code, signal = u.signal, \
             started_ms = CASE WHEN u.started THEN $1 ELSE a.started_ms END, \
             failure = u.failure, message = u.message, cpu_seconds = u.cpu, peak_memory = u.peak, \
             input_tokens = GREATEST(a.input_tokens, u.input_tokens), \
             output_tokens = GREATEST(a.output_tokens, u.output_tokens) \
             FROM u WHERE a.id = u.attempt_id), \
         settled AS ( \
             UPDATE tasks t SET state = u.state, reason = u.reason, not_before_ms = u.not_before_ms, \
             started_ms = CASE WHEN u.started THEN $1 ELSE t.started_ms END, \
             ended_ms = u.ended_ms, exit_code = u.exit_code, failure = u.task_failure, cpu_seconds = u.cpu, \
             peak_memory = u.peak FROM u WHERE t.id = u.task_id), \
         "
    };
    (events) => {
        "bump AS ( \
             UPDATE jobs j SET last_seq = j.last_seq + c.n \
             FROM UNNEST($20::BIGINT[], $21::BIGINT[]) AS c(id, n) \
             WHERE j.id = c.id RETURNING j.id, j.last_seq - c.n AS base), \
         ins AS ( \
         INSERT INTO events (job_id, seq, time_ms, kind, task_id, task_name, frame, state, message, exit_code, \
             attempt, node) \
         SELECT e.job_id, bump.base + e.i, $1, e.kind, e.task_id, e.task_name, e.frame, e.state, e.message, \
             e.exit_code, e.attempt, e.node \
         FROM UNNEST($22::BIGINT[], $23::BIGINT[], $24::TEXT[], $25::BIGINT[], $26::TEXT[], $27::BIGINT[], \
                     $28::TEXT[], $29::TEXT[], $30::INTEGER[], $31::BIGINT[], $32::TEXT[]) \
              AS e(job_id, i, kind, task_id, task_name, frame, state, message, exit_code, attempt, node) \
         JOIN bump ON bump.id = e.job_id RETURNING 1) \
         "
    };
    (derive) => {
        concat!(
            "SELECT (SELECT COUNT(*) FROM ins), j.id, j.state, j.cancelled, ARRAY(",
            job_task_states_scan!(),
            "SELECT s.state FROM s WHERE s.state IS NOT NULL AND ( \
                 SELECT 1 FROM tasks t WHERE t.job_id = j.id AND t.state = s.state AND t.id <> ALL($34) \
                 LIMIT 1) IS NOT NULL) \
             FROM (SELECT 1) AS one LEFT JOIN jobs j ON j.id = ANY($33)"
        )
    };
    (count) => {
        "SELECT (SELECT COUNT(*) FROM ins), NULL::BIGINT, NULL::TEXT, NULL::BOOLEAN, NULL::TEXT[]"
    };
}

/// The variant of [`write_batch_sql`] for a batch with starts, finishes and jobs to derive.
fn write_batch_statement(starts: bool, finishes: bool, derive: bool) -> &'static str {
    match (starts, finishes, derive) {
        (true, true, true) => concat!(
            "WITH ",
            write_batch_sql!(starts),
            write_batch_sql!(finishes),
            write_batch_sql!(events),
            write_batch_sql!(derive)
        ),
        (true, true, false) => concat!(
            "WITH ",
            write_batch_sql!(starts),
            write_batch_sql!(finishes),
            write_batch_sql!(events),
            write_batch_sql!(count)
        ),
        (true, false, true) => {
            concat!("WITH ", write_batch_sql!(starts), write_batch_sql!(events), write_batch_sql!(derive))
        }
        (true, false, false) => {
            concat!("WITH ", write_batch_sql!(starts), write_batch_sql!(events), write_batch_sql!(count))
        }
        (false, true, true) => {
            concat!("WITH ", write_batch_sql!(finishes), write_batch_sql!(events), write_batch_sql!(derive))
        }
        (false, true, false) => {
            concat!("WITH ", write_batch_sql!(finishes), write_batch_sql!(events), write_batch_sql!(count))
        }
        (false, false, true) => concat!("WITH ", write_batch_sql!(events), write_batch_sql!(derive)),
        (false, false, false) => concat!("WITH ", write_batch_sql!(events), write_batch_sql!(count)),
    }
}

/// The batch's writes in one statement: every start (attempts, then their tasks), every
/// finish (attempts and their settled tasks), the jobs' event counters and the events.
/// PostgreSQL applies at most one change to a row per statement, so an attempt that starts
/// and finishes in the batch is written once, by its finish, with its start time.
///
/// The same statement reads, for each job of `derive`, its state, its cancelled flag and the
/// distinct states of its tasks the batch does not write, those other than `written`
/// (`job_task_states_scan!`, keeping a state only when a task outside the batch is in it: a
/// probe of the index per state, which `LIMIT 1` keeps PostgreSQL from turning into a join
/// over every task of the job). The caller holds those jobs' row locks, taken by an earlier
/// statement, so this statement's snapshot has every change of their tasks committed before
/// the locks were granted.
async fn write_batch(
    conn: &mut PgConnection,
    decided: &Decided<'_>,
    derive: &[i64],
    written: &[i64],
    now_ms: i64,
) -> Result<HashMap<i64, JobBefore>> {
    if decided.events.is_empty() && derive.is_empty() {
        // Stale updates only: nothing to write (every start or finish written has its event).
        return Ok(HashMap::new());
    }
    let finishing: std::collections::HashSet<i64> = decided.finishes.iter().map(|f| f.attempt_id).collect();
    let started: std::collections::HashSet<i64> = decided.starts.iter().map(|s| s.attempt_id).collect();
    let (start_attempts, start_tasks): (Vec<i64>, Vec<i64>) = decided
        .starts
        .iter()
        .filter(|s| !finishing.contains(&s.attempt_id))
        .map(|s| (s.attempt_id, s.task_id))
        .unzip();
    let f = &decided.finishes;
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
    let also_started: Vec<bool> = f.iter().map(|x| started.contains(&x.attempt_id)).collect();
    // The events, numbered from 1 within their job.
    let mut per_job: BTreeMap<i64, i64> = BTreeMap::new();
    let numbers: Vec<i64> = decided
        .events
        .iter()
        .map(|e| {
            let n = per_job.entry(e.job_id).or_insert(0);
            *n += 1;
            *n
        })
        .collect();
    let job_ids: Vec<i64> = per_job.keys().copied().collect();
    let counts: Vec<i64> = per_job.values().copied().collect();
    let events = &decided.events;
    let sql = write_batch_statement(!start_attempts.is_empty(), !f.is_empty(), !derive.is_empty());
    let rows = sqlx::query(sql)
        .bind(now_ms)
        .bind(&start_attempts)
        .bind(&start_tasks)
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
        .bind(&also_started)
        .bind(&job_ids)
        .bind(&counts)
        .bind(events.iter().map(|e| e.job_id).collect::<Vec<_>>())
        .bind(&numbers)
        .bind(events.iter().map(|e| e.kind).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.task_id).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.task_name.as_str()).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.frame).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.state.as_str()).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.message.as_str()).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.exit_code).collect::<Vec<_>>())
        .bind(events.iter().map(|e| i64::from(e.attempt)).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.node.as_str()).collect::<Vec<_>>())
        .bind(derive)
        .bind(written)
        .fetch_all(&mut *conn)
        .await?;
    let mut before = HashMap::with_capacity(derive.len());
    for r in &rows {
        let inserted: i64 = r.try_get(0)?;
        if inserted != events.len() as i64 {
            let missing = job_ids.first().copied().unwrap_or_default();
            return Err(StoreError::NotFound { what: "job", id: missing });
        }
        let Some(job_id) = r.try_get::<Option<i64>, _>(1)? else { continue };
        let state = parse_word("job state", r.try_get::<&str, _>(2)?)?;
        let others: Vec<String> = r.try_get(4)?;
        let others =
            others.iter().map(|s| parse_word::<TaskState>("task state", s)).collect::<Result<Vec<_>>>()?;
        before.insert(job_id, JobBefore { state, cancelled: r.try_get(3)?, others });
    }
    Ok(before)
}
