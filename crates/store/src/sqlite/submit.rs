//! A job's submit on SQLite: the job, its tasks and their first events in one transaction on
//! the calling thread (see [`super::direct`]); a lone task's latency waits on it. The events
//! are numbered in SQL by [`JobChanges`].

use rusqlite::{Connection, params};

use super::job_changes::Ahead;
use super::*;

/// Tasks a job may have for its submit to run on the caller's thread without handing the
/// runtime's other tasks to another (about a millisecond's work).
pub(super) const SHORT: usize = 256;

/// Inserts the job and its tasks as queued (waiting, for a task with dependencies), with the
/// job's `submitted` event and each task's first event, inside the caller's transaction on
/// the direct connection; the job's id.
pub(super) fn insert(
    conn: &Connection,
    plan: &JobPlan,
    source: &str,
    filename: &str,
    now_ms: i64,
) -> Result<i64> {
    let has_deps = plan.tasks.iter().any(|t| !t.depends_on.is_empty());
    let job_id: i64 = conn
        .prepare_cached(
            "INSERT INTO jobs (name, project, priority, labels, source, filename, state, has_deps, created_ms) \
             VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?) RETURNING id",
        )?
        .query_row(
            params![
                plan.name,
                plan.project,
                plan.priority,
                to_json("labels", &plan.labels)?,
                source,
                filename,
                has_deps,
                now_ms
            ],
            |r| r.get(0),
        )?;
    let mut changes = JobChanges::default();
    changes.events(
        job_id,
        [Ev::job(job_id, JobState::Queued, format!("submitted with {} tasks", plan.tasks.len()))],
    );
    let mut graph = Vec::with_capacity(if has_deps { plan.tasks.len() } else { 0 });
    // One prepared insert per task: on this thread a row costs microseconds, so there is
    // nothing to gain from multi-row statements of varying shape.
    let mut insert = conn.prepare_cached(
        "INSERT INTO tasks (job_id, name, frame, plan, priority, cores, memory, constraints, runtime, state, \
         deps_left) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
    )?;
    for t in &plan.tasks {
        let state = if t.depends_on.is_empty() { TaskState::Queued } else { TaskState::Waiting };
        let id: i64 = insert.query_row(
            params![
                job_id,
                t.name,
                t.frame,
                to_json("task plan", t)?,
                plan.priority,
                t.resources.cores as i64,
                t.resources.memory as i64,
                to_json("constraints", &t.constraints)?,
                t.runtime.as_str(),
                state.as_str(),
                t.depends_on.len() as i64
            ],
            |r| r.get(0),
        )?;
        changes.events(job_id, [Ev::task(job_id, id, &t.name, t.frame, state)]);
        if has_deps {
            graph.push((id, t.name.as_str(), t.depends_on.as_slice()));
        }
    }
    if has_deps {
        dependencies::record_graph(conn, job_id, &graph)?;
    }
    let mut blob =
        conn.prepare_cached("INSERT INTO job_blobs (job_id, digest) VALUES (?, ?) ON CONFLICT DO NOTHING")?;
    for digest in crate::retention::plan_blobs(plan) {
        blob.execute(params![job_id, digest])?;
    }
    let nothing_ahead = Ahead { statements: String::new(), lists: serde_json::Map::new() };
    changes.write_direct(conn, now_ms, nothing_ahead)?;
    Ok(job_id)
}
