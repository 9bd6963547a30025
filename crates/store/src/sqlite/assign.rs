//! A placement round's claim on SQLite, in one transaction on the calling thread (see
//! [`super::direct`]): a lone task waits on the claim between its submit and its start, and
//! as round trips to sqlx's worker thread it took seven, then two.
//!
//! The reads find everything the writes and the round's answer need: the placed nodes' loads,
//! the placed tasks still queued (with their jobs' states, names and plans), and the last
//! attempt id. The single writer serialises the transaction with every other write, so what
//! it reads holds until the commit: the attempts' ids are given here (the table's
//! `AUTOINCREMENT` counts on after them), and a job that was not running yet is set running
//! without reading its tasks back (a job with a task assigned is running, see
//! [`JobState::derive`]).

use std::collections::BTreeSet;

use rusqlite::Connection;
use serde::Serialize;

use super::direct::{self, get_u32, get_u64};
use super::job_changes::Ahead;
use super::*;

/// The claim's reads. Their parameter is a JSON object: `nodes`, the placed nodes' ids;
/// `tasks`, the placed tasks' ids.
mod reads {
    /// Per placed node still ready, its capacity and what its open attempts hold.
    pub(super) const NODES: &str = "SELECT n.id, n.cores, n.memory, COALESCE(SUM(a.cores), 0), \
         COALESCE(SUM(a.memory), 0), n.epoch, n.name \
         FROM nodes n LEFT JOIN attempts a ON a.node_id = n.id AND a.state != 'ended' \
         WHERE n.state = 'ready' AND n.id IN (SELECT value FROM json_each(?1, '$.nodes')) GROUP BY n.id";
    /// Per placed task still queued, its needs, job, job state, name, frame, attempts so far
    /// and plan. `CROSS JOIN` keeps the placed tasks the outer loop: SQLite would otherwise
    /// walk every queued task.
    pub(super) const TASKS: &str = "SELECT t.id, t.cores, t.memory, t.job_id, j.state, t.name, t.frame, \
         t.attempts, t.plan \
         FROM json_each(?1, '$.tasks') AS p CROSS JOIN tasks t ON t.id = p.value JOIN jobs j ON j.id = t.job_id \
         WHERE t.state = 'queued'";
    /// The highest attempt id ever given.
    pub(super) const LAST_ATTEMPT: &str = "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence \
         WHERE name = 'attempts'), 0), COALESCE((SELECT MAX(id) FROM attempts), 0))";
}

/// The claim's writes, ahead of the job changes, reading `claims` (`[{attempt, task, node,
/// epoch}]`) and `now` from the job changes' JSON parameter: each claimed task's attempt
/// (metered against the price table in force now, for good), then the task pointed at it.
/// (`+tasks.state` keeps SQLite from walking every queued task through the state index.)
macro_rules! claim_sql {
    () => {
        "INSERT INTO attempts (id, task_id, job_id, number, node_id, epoch, state, cores, memory, assigned_ms, \
         price_version) \
         SELECT c.value ->> 'attempt', t.id, t.job_id, t.attempts + 1, c.value ->> 'node', c.value ->> 'epoch', \
         'assigned', t.cores, t.memory, ?1 ->> '$.now', (SELECT COALESCE(MAX(version), 0) FROM prices) \
         FROM json_each(?1, '$.claims') AS c CROSS JOIN tasks t ON t.id = c.value ->> 'task' \
         WHERE t.state = 'queued'; \
         UPDATE tasks SET state = 'assigned', attempts = attempts + 1, node_id = c.value ->> 'node', reason = '', \
         started_ms = NULL, ended_ms = NULL, current_attempt = c.value ->> 'attempt' \
         FROM json_each(?1, '$.claims') AS c WHERE tasks.id = c.value ->> 'task' AND +tasks.state = 'queued';"
    };
}

/// A claim as the claim's statements read it.
#[derive(Serialize)]
struct ClaimArg {
    attempt: i64,
    task: i64,
    node: i64,
    epoch: i64,
}

/// A placed task still queued, as the read found it.
struct Queued {
    job_id: i64,
    job_state: JobState,
    name: String,
    frame: Option<i64>,
    attempts: u32,
    plan: String,
}

/// Claims the admitted placements of `plan` (each task once, while it is still queued, on a
/// node still ready with room) inside the caller's transaction on the direct connection:
/// inserts their attempts, points their tasks at them, records their `assigned` events, and
/// returns the assignments in plan order.
pub(super) fn claim(conn: &Connection, plan: &[Placement], now_ms: i64) -> Result<Vec<Assignment>> {
    let ids = serde_json::json!({
        "nodes": plan.iter().map(|p| p.node_id).collect::<Vec<_>>(),
        "tasks": plan.iter().map(|p| p.task_id).collect::<Vec<_>>(),
    })
    .to_string();
    let mut loads = HashMap::new();
    let mut nodes = HashMap::new();
    for (id, load, epoch, name) in direct::rows(conn, reads::NODES, &ids, |r| {
        let capacity = Resources { cores: get_u32(r, 1)?, memory: get_u64(r, 2)?, pids: 0 };
        let reserved = Resources { cores: get_u32(r, 3)?, memory: get_u64(r, 4)?, pids: 0 };
        Ok((
            r.get::<_, i64>(0)?,
            NodeLoad { capacity, reserved },
            r.get::<_, i64>(5)?,
            r.get::<_, String>(6)?,
        ))
    })? {
        loads.insert(id, load);
        nodes.insert(id, (epoch, name));
    }
    let mut need = HashMap::new();
    let mut queued = HashMap::new();
    for (id, needs, task) in direct::rows(conn, reads::TASKS, &ids, |r| {
        let needs = Resources { cores: get_u32(r, 1)?, memory: get_u64(r, 2)?, pids: 0 };
        let task = Queued {
            job_id: r.get(3)?,
            job_state: parse_word("job state", &r.get::<_, String>(4)?)?,
            name: r.get(5)?,
            frame: r.get(6)?,
            attempts: get_u32(r, 7)?,
            plan: r.get(8)?,
        };
        Ok((r.get::<_, i64>(0)?, needs, task))
    })? {
        need.insert(id, needs);
        queued.insert(id, task);
    }
    let mut next_attempt = direct::rows(conn, reads::LAST_ATTEMPT, &ids, |r| Ok(r.get::<_, i64>(0)?))?
        .pop()
        .ok_or_else(|| corrupt("claim", "no last attempt id read"))?;
    let mut claims = Vec::new();
    let mut assigned = Vec::new();
    let mut changes = JobChanges::default();
    let mut now_running = BTreeSet::new();
    for p in admit(plan, &mut loads, &need) {
        let (Some(task), Some((epoch, node_name))) = (queued.get(&p.task_id), nodes.get(&p.node_id)) else {
            continue;
        };
        next_attempt += 1;
        let number = task.attempts.saturating_add(1);
        claims.push(ClaimArg { attempt: next_attempt, task: p.task_id, node: p.node_id, epoch: *epoch });
        let mut ev = Ev::task(task.job_id, p.task_id, &task.name, task.frame, TaskState::Assigned);
        ev.attempt = number;
        ev.node = node_name.clone();
        changes.events(task.job_id, [ev]);
        if task.job_state != JobState::Running {
            now_running.insert(task.job_id);
        }
        assigned.push(Assignment {
            attempt_id: next_attempt,
            epoch: *epoch,
            number,
            node_id: p.node_id,
            task_id: p.task_id,
            job_id: task.job_id,
            plan: json("task plan", &task.plan)?,
            // One server writes an SQLite store: no other scheduler takes a placed task.
            instead_of: None,
        });
    }
    if claims.is_empty() {
        return Ok(Vec::new());
    }
    // After the jobs' task events, so the job event follows them.
    for job_id in now_running {
        changes.set_state(job_id, JobState::Running, now_ms);
    }
    let mut lists = serde_json::Map::new();
    lists.insert("claims".into(), serde_json::to_value(&claims).map_err(|e| corrupt("claims", e))?);
    let ahead = Ahead { statements: claim_sql!().to_owned(), lists };
    changes.write_direct(conn, now_ms, ahead)?;
    Ok(assigned)
}
