//! The claim of an assignment round on SQLite: every admitted placement's attempt, then its
//! task, in two statements whatever the round's size (they used to be two per placement, and
//! every statement is a round trip to the connection's worker thread).

use serde::Serialize;

use super::*;

/// A placement as the claim's statements read it.
#[derive(Serialize)]
struct PlacementArg {
    task: i64,
    node: i64,
    epoch: i64,
}

/// A claimed attempt as its task's update reads it.
#[derive(Serialize)]
struct AttemptArg {
    attempt: i64,
    task: i64,
    node: i64,
}

/// Claims the admitted placements of `plan` (each task once, while it is still queued) on
/// the nodes `nodes` describes (epoch and name): inserts their attempts, points their tasks
/// at them, and returns each assignment with its task's `assigned` event, in plan order.
pub(super) async fn claim(
    conn: &mut SqliteConnection,
    plan: &[Placement],
    nodes: &HashMap<i64, (i64, String)>,
    now_ms: i64,
) -> Result<Vec<(Assignment, Ev)>> {
    let mut order = HashMap::with_capacity(plan.len());
    let mut placements = Vec::with_capacity(plan.len());
    for p in plan {
        let Some((epoch, _)) = nodes.get(&p.node_id) else { continue };
        // A task placed twice is claimed once, where it was placed first.
        if order.contains_key(&p.task_id) {
            continue;
        }
        order.insert(p.task_id, order.len());
        placements.push(PlacementArg { task: p.task_id, node: p.node_id, epoch: *epoch });
    }
    if placements.is_empty() {
        return Ok(Vec::new());
    }
    // Metered against the price table in force now, for good. `CROSS JOIN` keeps the
    // placements the outer loop: SQLite would otherwise walk every queued task.
    let inserted = sqlx::query(
        "INSERT INTO attempts (task_id, job_id, number, node_id, epoch, state, cores, memory, assigned_ms, \
         price_version) \
         SELECT t.id, t.job_id, t.attempts + 1, p.value ->> 'node', p.value ->> 'epoch', 'assigned', t.cores, \
         t.memory, ?2, (SELECT COALESCE(MAX(version), 0) FROM prices) \
         FROM json_each(?1) AS p CROSS JOIN tasks t ON t.id = p.value ->> 'task' WHERE t.state = 'queued' \
         RETURNING id, task_id, node_id",
    )
    .bind(to_json("placements", &placements)?)
    .bind(now_ms)
    .fetch_all(&mut *conn)
    .await?;
    let mut attempts = Vec::with_capacity(inserted.len());
    for r in &inserted {
        attempts.push(AttemptArg { attempt: r.try_get(0)?, task: r.try_get(1)?, node: r.try_get(2)? });
    }
    let tasks = sqlx::query(
        "UPDATE tasks SET state = 'assigned', attempts = attempts + 1, node_id = a.value ->> 'node', reason = '', \
         started_ms = NULL, ended_ms = NULL, current_attempt = a.value ->> 'attempt' \
         FROM json_each(?1) AS a WHERE tasks.id = a.value ->> 'task' \
         RETURNING tasks.id, tasks.job_id, tasks.name, tasks.frame, tasks.plan, tasks.attempts, \
         tasks.current_attempt, tasks.node_id",
    )
    .bind(to_json("attempts", &attempts)?)
    .fetch_all(&mut *conn)
    .await?;
    let mut out = Vec::with_capacity(tasks.len());
    for r in &tasks {
        let task_id: i64 = r.try_get(0)?;
        let job_id: i64 = r.try_get(1)?;
        let node_id: i64 = r.try_get(7)?;
        let Some((epoch, node_name)) = nodes.get(&node_id) else { continue };
        let number = rows::get_u32(r, 5);
        let mut ev = Ev::task(job_id, task_id, r.try_get::<&str, _>(2)?, r.try_get(3)?, TaskState::Assigned);
        ev.attempt = number;
        ev.node = node_name.clone();
        let assignment = Assignment {
            attempt_id: r.try_get(6)?,
            epoch: *epoch,
            number,
            node_id,
            task_id,
            job_id,
            plan: json("task plan", r.try_get::<&str, _>(4)?)?,
            // One server writes an SQLite store: no other scheduler takes a placed task.
            instead_of: None,
        };
        out.push((assignment, ev));
    }
    out.sort_by_key(|(a, _)| order.get(&a.task_id).copied().unwrap_or(usize::MAX));
    Ok(out)
}
