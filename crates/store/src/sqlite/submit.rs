//! A job's submit on SQLite: the job, its tasks and their first events in one transaction of
//! three round trips for a job of up to [`INSERT_CHUNK`] tasks (one more per further chunk,
//! and for a dependency graph or blobs to hold). Every statement is a round trip to the
//! connection's worker thread, and a lone task's latency waits on each of them; a submit
//! used to take six.
//!
//! The transaction's `BEGIN` rides with the job's insert and its `COMMIT` with the events
//! (see [`super::open_tx`]); the events are numbered in SQL by [`JobChanges`].

use tokio::sync::OwnedMutexGuard;

use super::open_tx::OpenTx;
use super::*;

/// Inserts the job and its tasks as queued (waiting, for a task with dependencies), with the
/// job's `submitted` event and each task's first event, in a transaction of its own on the
/// writer; the job's id.
pub(super) async fn submit(
    writer: OwnedMutexGuard<SqliteConnection>,
    plan: &JobPlan,
    source: &str,
    filename: &str,
    now_ms: i64,
) -> Result<i64> {
    let mut open = OpenTx::new(writer);
    let Some(conn) = open.conn() else { return Err(corrupt("submit", "the writer was given up")) };
    let result = insert(conn, plan, source, filename, now_ms).await;
    open.close(result).await
}

async fn insert(
    conn: &mut SqliteConnection,
    plan: &JobPlan,
    source: &str,
    filename: &str,
    now_ms: i64,
) -> Result<i64> {
    let has_deps = plan.tasks.iter().any(|t| !t.depends_on.is_empty());
    let job_id: i64 = sqlx::query_scalar(
        "BEGIN; INSERT INTO jobs (name, project, priority, labels, source, filename, state, has_deps, created_ms) \
         VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?) RETURNING id",
    )
    .bind(&plan.name)
    .bind(&plan.project)
    .bind(plan.priority)
    .bind(to_json("labels", &plan.labels)?)
    .bind(source)
    .bind(filename)
    .bind(has_deps)
    .bind(now_ms)
    .fetch_one(&mut *conn)
    .await?;
    let mut changes = JobChanges::default();
    changes.events(
        job_id,
        [Ev::job(job_id, JobState::Queued, format!("submitted with {} tasks", plan.tasks.len()))],
    );
    let mut graph = Vec::with_capacity(if has_deps { plan.tasks.len() } else { 0 });
    for chunk in plan.tasks.chunks(INSERT_CHUNK) {
        let rows = chunk
            .iter()
            .map(|t| {
                let state = if t.depends_on.is_empty() { TaskState::Queued } else { TaskState::Waiting };
                Ok((t, state, to_json("task plan", t)?, to_json("constraints", &t.constraints)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO tasks (job_id, name, frame, plan, priority, cores, memory, constraints, runtime, state, \
             deps_left) ",
        );
        q.push_values(&rows, |mut b, (t, state, plan_json, constraints)| {
            b.push_bind(job_id)
                .push_bind(&t.name)
                .push_bind(t.frame)
                .push_bind(plan_json)
                .push_bind(plan.priority)
                .push_bind(t.resources.cores as i64)
                .push_bind(t.resources.memory as i64)
                .push_bind(constraints)
                .push_bind(t.runtime.as_str())
                .push_bind(state.as_str())
                .push_bind(t.depends_on.len() as i64);
        });
        q.push(" RETURNING id");
        let ids: Vec<i64> = q.build_query_scalar().fetch_all(&mut *conn).await?;
        for ((t, state, _, _), id) in rows.iter().zip(ids) {
            changes.events(job_id, [Ev::task(job_id, id, &t.name, t.frame, *state)]);
            if has_deps {
                graph.push((id, t.name.as_str(), t.depends_on.as_slice()));
            }
        }
    }
    if has_deps {
        dependencies::record_graph(conn, job_id, &graph).await?;
    }
    for digest in crate::retention::plan_blobs(plan) {
        sqlx::query("INSERT INTO job_blobs (job_id, digest) VALUES (?, ?) ON CONFLICT DO NOTHING")
            .bind(job_id)
            .bind(digest)
            .execute(&mut *conn)
            .await?;
    }
    changes.commit(conn, now_ms).await?;
    Ok(job_id)
}
