//! What a settling transaction changes in its jobs, written in one round trip.
//!
//! Every statement is a round trip to the connection's worker thread, and on the hot path
//! those trips cost more than the statements: a start used to take eight of them. So the
//! changes a transaction collects (task events, jobs whose state must be derived again) go
//! out as one multi-statement query whose lists travel as JSON parameters: the events are
//! appended with their sequence numbers computed in SQL, the jobs' counters moved on, and the
//! jobs' task states read back for [`JobState::derive`]. Only a job whose state changed needs
//! a second trip (its new state and job event). A caller may put its own writes ahead of
//! these in the same query ([`Ahead`]).

use serde::Serialize;

use super::*;

/// The job-changes statements. Their one parameter, `?1`, is a JSON object ([`Args`]):
/// `now`, the time; `states`, jobs' new states (`[{job, state, ended}]`); `events`
/// (`[{job, i, …}]`, `i` counting from 1 within each job); `jobs`, the ids of the jobs whose
/// task states to read back. (One parameter for every statement because sqlx numbers the
/// parameters of a multi-statement query as if they were positional: a statement that skips
/// a number shifts the values of the statements after it.) The last statement is the only one
/// that returns rows: per job of `jobs`, its id, stored state, cancelled flag and its tasks'
/// distinct states, found by a "loose index scan" of `tasks_by_job_state` (one index probe
/// per state instead of reading every task, since this runs on every task settled).
macro_rules! job_changes_sql {
    () => {
        concat!(job_states_sql!(), " ", job_events_sql!(), " ", job_scan_sql!())
    };
}

/// The first of [`job_changes_sql`]'s statements: the jobs' new states.
macro_rules! job_states_sql {
    () => {
        "UPDATE jobs AS j SET state = c.value ->> 'state', ended_ms = c.value ->> 'ended' \
         FROM json_each(?1, '$.states') AS c WHERE j.id = c.value ->> 'job';"
    };
}

/// The events of [`job_changes_sql`], and the jobs' event counters moved on past them.
macro_rules! job_events_sql {
    () => {
        "INSERT INTO events (job_id, seq, time_ms, kind, task_id, task_name, frame, state, message, exit_code, \
             attempt, node) \
         SELECT j.id, j.last_seq + (e.value ->> 'i'), ?1 ->> '$.now', e.value ->> 'kind', e.value ->> 'task', \
             e.value ->> 'name', e.value ->> 'frame', e.value ->> 'state', e.value ->> 'message', \
             e.value ->> 'exit', e.value ->> 'attempt', e.value ->> 'node' \
         FROM json_each(?1, '$.events') AS e CROSS JOIN jobs j ON j.id = e.value ->> 'job'; \
         UPDATE jobs AS j SET last_seq = j.last_seq + c.n \
         FROM (SELECT value ->> 'job' AS job, MAX(value ->> 'i') AS n FROM json_each(?1, '$.events') GROUP BY 1) AS c \
         WHERE j.id = c.job;"
    };
}

/// The last of [`job_changes_sql`]'s statements: the task states of the jobs to derive.
macro_rules! job_scan_sql {
    () => {
        "WITH RECURSIVE r(job) AS (SELECT value FROM json_each(?1, '$.jobs')), \
         s(job, state) AS ( \
             SELECT r.job, (SELECT MIN(t.state) FROM tasks t WHERE t.job_id = r.job) FROM r \
             UNION ALL \
             SELECT s.job, (SELECT MIN(t.state) FROM tasks t WHERE t.job_id = s.job AND t.state > s.state) \
             FROM s WHERE s.state IS NOT NULL), \
         g(job, states) AS (SELECT job, group_concat(state, ' ') FROM s WHERE state IS NOT NULL GROUP BY job) \
         SELECT j.id, j.state, j.cancelled, g.states \
         FROM r CROSS JOIN jobs j ON j.id = r.job LEFT JOIN g ON g.job = j.id;"
    };
}

/// Writes a caller puts ahead of the job changes and the commit in the same round trip:
/// statements that read their lists from the same JSON parameter as the job changes
/// ([`Args`]), under keys of their own (they may use `now`).
pub(super) struct Ahead {
    /// The statements; a caller leaves out those its lists give nothing to do, since every
    /// statement costs the trip a result to hand back.
    pub(super) statements: String,
    /// Their lists, by key.
    pub(super) lists: serde_json::Map<String, serde_json::Value>,
}

impl Ahead {
    /// Runs the statements on their own.
    pub(super) async fn run(self, conn: &mut SqliteConnection, now_ms: i64) -> Result<()> {
        if self.statements.is_empty() {
            return Ok(());
        }
        let args = Args { now: now_ms, ahead: self.lists, ..Args::default() };
        sqlx::query(&self.statements)
            .bind(to_json("statement arguments", &args)?)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}

/// The one parameter of the job-changes statements and the writes ahead of them.
#[derive(Serialize, Default)]
struct Args<'a> {
    now: i64,
    states: Vec<StateArg>,
    events: Vec<EventArg<'a>>,
    jobs: Vec<i64>,
    #[serde(flatten)]
    ahead: serde_json::Map<String, serde_json::Value>,
}

/// Events and job-state derivations a transaction collects as it settles attempts, written
/// when it is done ([`JobChanges::write`]): a batch of reports for one job then costs one
/// event insert and one state derivation instead of one per report.
#[derive(Default)]
pub(super) struct JobChanges {
    events: BTreeMap<i64, Vec<Ev>>,
    refresh: std::collections::BTreeSet<i64>,
    /// Jobs' new states decided by the caller (see [`JobChanges::set_state`]).
    states: Vec<StateArg>,
}

/// An event as the job-changes statements read it.
#[derive(Serialize)]
struct EventArg<'a> {
    job: i64,
    /// Its place among the job's events of this write, from 1.
    i: i64,
    kind: &'a str,
    task: i64,
    name: &'a str,
    frame: Option<i64>,
    state: &'a str,
    message: &'a str,
    exit: Option<i32>,
    attempt: u32,
    node: &'a str,
}

/// A job's new state as the job-changes statements read it.
#[derive(Serialize)]
struct StateArg {
    job: i64,
    state: &'static str,
    ended: Option<i64>,
}

impl JobChanges {
    /// Adds events to a job's history, after those added before.
    pub(super) fn events(&mut self, job_id: i64, events: impl IntoIterator<Item = Ev>) {
        self.events.entry(job_id).or_default().extend(events);
    }

    /// Marks a job's state for derivation once its tasks' changes are in.
    pub(super) fn refresh(&mut self, job_id: i64) {
        self.refresh.insert(job_id);
    }

    /// Sets a job's new state, decided by the caller without reading its tasks back, and
    /// adds the job event saying so after the job's other events.
    pub(super) fn set_state(&mut self, job_id: i64, state: JobState, now_ms: i64) {
        self.states.push(StateArg {
            job: job_id,
            state: state.as_str(),
            ended: state.is_final().then_some(now_ms),
        });
        self.events(job_id, [Ev::job(job_id, state, String::new())]);
    }

    /// Writes `ahead`'s statements, the events and the states set with
    /// [`JobChanges::set_state`] on the direct connection, inside the caller's transaction
    /// (see [`super::direct`]). Nothing is derived after the writes (a job marked for that is
    /// refused as a bug).
    pub(super) fn write_direct(self, conn: &rusqlite::Connection, now_ms: i64, ahead: Ahead) -> Result<()> {
        if let Some(&job_id) = self.refresh.first() {
            return Err(corrupt("job changes", format!("job {job_id} to derive after a committing write")));
        }
        // Only the statements with something to do.
        let mut sql = ahead.statements;
        if !self.states.is_empty() {
            sql.push_str(concat!(" ", job_states_sql!()));
        }
        if !self.events.is_empty() {
            sql.push_str(concat!(" ", job_events_sql!()));
        }
        let args = Args {
            now: now_ms,
            states: self.states,
            events: events_arg(&self.events),
            jobs: Vec::new(),
            ahead: ahead.lists,
        };
        direct::run(conn, &sql, &to_json("statement arguments", &args)?)
    }

    /// Writes the events and the states set with [`JobChanges::set_state`], then derives each
    /// marked job's state (which may add a job event).
    pub(super) async fn write(self, conn: &mut SqliteConnection, now_ms: i64) -> Result<()> {
        if self.events.is_empty() && self.refresh.is_empty() && self.states.is_empty() {
            return Ok(());
        }
        let args = Args {
            now: now_ms,
            states: self.states,
            events: events_arg(&self.events),
            jobs: self.refresh.iter().copied().collect(),
            ahead: serde_json::Map::new(),
        };
        let rows = sqlx::query(job_changes_sql!())
            .bind(to_json("statement arguments", &args)?)
            .fetch_all(&mut *conn)
            .await?;
        // Jobs whose derived state differs from the stored one: their new state and the job
        // event saying so, in a second trip (a start or a finish seldom changes its job).
        let mut states = Vec::new();
        let mut job_events = BTreeMap::new();
        for row in &rows {
            let job_id: i64 = row.try_get(0)?;
            let old: JobState = parse_word("job state", row.try_get::<&str, _>(1)?)?;
            let cancelled: bool = row.try_get(2)?;
            let new = JobState::derive(task_states(row.try_get(3)?)?, cancelled);
            if new != old {
                states.push(StateArg {
                    job: job_id,
                    state: new.as_str(),
                    ended: new.is_final().then_some(now_ms),
                });
                job_events.insert(job_id, vec![Ev::job(job_id, new, String::new())]);
            }
        }
        if states.is_empty() {
            return Ok(());
        }
        let args = Args { now: now_ms, states, events: events_arg(&job_events), ..Args::default() };
        sqlx::query(job_changes_sql!())
            .bind(to_json("statement arguments", &args)?)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}

/// A job's distinct task states as the job-state scan gives them: space-separated, `NULL`
/// for a job without tasks.
pub(super) fn task_states(words: Option<&str>) -> Result<Vec<TaskState>> {
    words.unwrap_or_default().split_whitespace().map(|s| parse_word("task state", s)).collect()
}

/// The events of each job, numbered within their job.
fn events_arg(events: &BTreeMap<i64, Vec<Ev>>) -> Vec<EventArg<'_>> {
    events
        .iter()
        .flat_map(|(&job, evs)| {
            evs.iter().zip(1..).map(move |(e, i)| EventArg {
                job,
                i,
                kind: e.kind,
                task: e.task_id,
                name: &e.task_name,
                frame: e.frame,
                state: &e.state,
                message: &e.message,
                exit: e.exit_code,
                attempt: e.attempt,
                node: &e.node,
            })
        })
        .collect()
}

/// Recomputes a job's state from its tasks and records a job event when it changed.
pub(super) async fn refresh_job(conn: &mut SqliteConnection, job_id: i64, now_ms: i64) -> Result<()> {
    let mut changes = JobChanges::default();
    changes.refresh(job_id);
    changes.write(conn, now_ms).await
}
