//! `assign` on PostgreSQL: claims placed tasks for their nodes, where replicas race.
//!
//! Every replica's scheduler sees the same queue, so several of them often place the same
//! tasks at the head of it in the same moment, each onto its own agents. The job's row lock
//! serialises their claims; the first takes the tasks, and the others would take nothing and
//! try again a round later. Instead, a placement whose task is gone is filled by a task that
//! can stand in for it: still queued, of the same job and task name (the frames of one array),
//! with the same resources, constraints and runtime, so the fit the scheduler checked holds.
//! The claim locks stand-ins with `SKIP LOCKED` too, so two replicas never take the same one.

use super::*;

/// A node locked by `assign`, with what it offers and holds.
struct LockedNode {
    epoch: i64,
    name: String,
    load: NodeLoad,
}

/// A placed task as the claim reads it.
#[derive(sqlx::FromRow)]
struct PlacedTask {
    id: i64,
    #[sqlx(flatten)]
    kind: Kind,
    /// Still queued: not taken by another replica since the scheduler's snapshot.
    queued: bool,
}

/// What a placed task must share with a task that stands in for it.
#[derive(Clone, PartialEq, Eq, Hash, sqlx::FromRow)]
struct Kind {
    job_id: i64,
    name: String,
    cores: i64,
    memory: i64,
    constraints: String,
    runtime: String,
}

/// Claims `(task, node)` pairs that are still queued and not being claimed by another
/// transaction; returns the claimed rows.
async fn claim(tx: &mut PgConnection, tasks: &[i64], nodes: &[i64]) -> Result<Vec<PgRow>> {
    // `FOR UPDATE SKIP LOCKED` passes over rows another replica is claiming at this moment
    // instead of waiting for its commit, so concurrent schedulers never block each other and
    // never take the same task.
    Ok(sqlx::query(
        "UPDATE tasks t SET state = 'assigned', attempts = t.attempts + 1, node_id = p.node_id, reason = '', \
         started_ms = NULL, ended_ms = NULL \
         FROM UNNEST($1::BIGINT[], $2::BIGINT[]) AS p(task_id, node_id) \
         WHERE t.id = p.task_id AND t.state = 'queued' \
         AND t.id IN (SELECT id FROM tasks WHERE id = ANY($1) AND state = 'queued' \
                      ORDER BY id FOR UPDATE SKIP LOCKED) \
         RETURNING t.id, t.job_id, t.name, t.frame, t.plan, t.attempts, t.cores, t.memory, p.node_id",
    )
    .bind(tasks)
    .bind(nodes)
    .fetch_all(&mut *tx)
    .await?)
}

/// Up to `n` queued tasks of `kind` that may start by `now_ms`, not in `taken`, locked for
/// this transaction; in queue order.
async fn stand_ins(
    tx: &mut PgConnection,
    kind: &Kind,
    taken: &[i64],
    n: usize,
    now_ms: i64,
) -> Result<Vec<i64>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM tasks WHERE state = 'queued' AND job_id = $1 AND name = $2 AND cores = $3 \
         AND memory = $4 AND constraints = $5 AND runtime = $6 AND not_before_ms <= $7 AND id <> ALL($8) \
         ORDER BY priority DESC, id LIMIT $9 FOR UPDATE SKIP LOCKED",
    )
    .bind(kind.job_id)
    .bind(&kind.name)
    .bind(kind.cores)
    .bind(kind.memory)
    .bind(&kind.constraints)
    .bind(&kind.runtime)
    .bind(now_ms)
    .bind(taken)
    .bind(i64::try_from(n).unwrap_or(i64::MAX))
    .fetch_all(&mut *tx)
    .await?)
}

/// [`Store::assign`] on PostgreSQL.
pub(super) async fn assign(pool: &PgPool, plan: &[Placement], now_ms: i64) -> Result<Vec<Assignment>> {
    if plan.is_empty() {
        return Ok(Vec::new());
    }
    let out = transaction!(pool, "assign", |tx| {
        // 1. Lock the nodes (first in the lock order). Other replicas assigning to these
        // nodes wait here until this commits.
        let mut node_ids: Vec<i64> = plan.iter().map(|p| p.node_id).collect();
        node_ids.sort_unstable();
        node_ids.dedup();
        let rows = sqlx::query(
            "SELECT id, epoch, name, cores, memory FROM nodes WHERE id = ANY($1) AND state = 'ready' \
             ORDER BY id FOR NO KEY UPDATE",
        )
        .bind(&node_ids)
        .fetch_all(&mut *tx)
        .await?;
        let mut nodes: HashMap<i64, LockedNode> = HashMap::with_capacity(rows.len());
        for r in &rows {
            let capacity = Resources { cores: get_u32(r, 3)?, memory: get_u64(r, 4)?, pids: 0 };
            let load = NodeLoad { capacity, reserved: Resources::NONE };
            nodes.insert(r.try_get(0)?, LockedNode { epoch: r.try_get(1)?, name: r.try_get(2)?, load });
        }
        // What they have reserved, read by a statement of its own: its snapshot is taken
        // after the locks were granted, so it sees the attempts of the replica that held
        // them. (The locking statement itself still sees the database as of its start.)
        let used: Vec<(i64, i64, i64)> = sqlx::query_as(
            "SELECT node_id, SUM(cores)::BIGINT, SUM(memory)::BIGINT FROM attempts \
             WHERE node_id = ANY($1) AND state <> 'ended' GROUP BY node_id",
        )
        .bind(&node_ids)
        .fetch_all(&mut *tx)
        .await?;
        for (node_id, cores, memory) in used {
            if let Some(node) = nodes.get_mut(&node_id) {
                let cores = u32::try_from(cores).unwrap_or(u32::MAX);
                let memory = u64::try_from(memory).unwrap_or(u64::MAX);
                node.load.reserved = Resources { cores, memory, pids: 0 };
            }
        }
        // 2. Admit placements that still fit, in plan order (the snapshot may be stale:
        // another replica may have filled the node since). Placed tasks that are gone already
        // come after those still queued: a stand-in may take their place in the room left.
        let task_ids: Vec<i64> = plan.iter().map(|p| p.task_id).collect();
        let wanted: Vec<PlacedTask> = sqlx::query_as(
            "SELECT id, job_id, name, cores, memory, constraints, runtime, state = 'queued' AS queued \
             FROM tasks WHERE id = ANY($1)",
        )
        .bind(&task_ids)
        .fetch_all(&mut *tx)
        .await?;
        let mut kinds = HashMap::with_capacity(wanted.len());
        let (mut queued, mut gone) = (HashMap::with_capacity(wanted.len()), HashMap::new());
        for PlacedTask { id, kind, queued: is_queued } in wanted {
            let size = Resources {
                cores: u32::try_from(kind.cores).unwrap_or(u32::MAX),
                memory: u64::try_from(kind.memory).unwrap_or(u64::MAX),
                pids: 0,
            };
            if is_queued { &mut queued } else { &mut gone }.insert(id, size);
            kinds.insert(id, kind);
        }
        let mut loads: HashMap<i64, NodeLoad> = nodes.iter().map(|(id, n)| (*id, n.load)).collect();
        let admitted = admit(plan, &mut loads, &queued);
        let to_stand_in = admit(plan, &mut loads, &gone);
        if admitted.is_empty() && to_stand_in.is_empty() {
            return Ok(Vec::new());
        }
        // 3. Jobs before tasks, in id order.
        let jobs: Vec<i64> = admitted
            .iter()
            .chain(&to_stand_in)
            .filter_map(|p| kinds.get(&p.task_id))
            .map(|k| k.job_id)
            .collect();
        lock_jobs(&mut tx, &jobs).await?;
        // 4. Claim the placed tasks that are still queued, then stand-ins for the rest (and
        // for those another replica claimed since they were read).
        let admitted_tasks: Vec<i64> = admitted.iter().map(|p| p.task_id).collect();
        let admitted_nodes: Vec<i64> = admitted.iter().map(|p| p.node_id).collect();
        let mut claimed = claim(&mut tx, &admitted_tasks, &admitted_nodes).await?;
        // Placed task → the task that runs in its place.
        let mut runs_as: HashMap<i64, i64> = HashMap::with_capacity(admitted.len());
        for r in &claimed {
            let id: i64 = r.try_get(0)?;
            runs_as.insert(id, id);
        }
        let missing: Vec<&Placement> =
            admitted.iter().chain(&to_stand_in).filter(|p| !runs_as.contains_key(&p.task_id)).collect();
        if !missing.is_empty() {
            let mut by_kind: HashMap<&Kind, Vec<&Placement>> = HashMap::new();
            for p in missing {
                if let Some(kind) = kinds.get(&p.task_id) {
                    by_kind.entry(kind).or_default().push(p);
                }
            }
            let mut taken: Vec<i64> = task_ids.clone();
            let (mut tasks, mut on_nodes) = (Vec::new(), Vec::new());
            for (kind, placements) in by_kind {
                let found = stand_ins(&mut tx, kind, &taken, placements.len(), now_ms).await?;
                for (stand_in, p) in found.into_iter().zip(placements) {
                    taken.push(stand_in);
                    tasks.push(stand_in);
                    on_nodes.push(p.node_id);
                    runs_as.insert(p.task_id, stand_in);
                }
            }
            if !tasks.is_empty() {
                let more = claim(&mut tx, &tasks, &on_nodes).await?;
                let got: HashSet<i64> =
                    more.iter().map(|r| r.try_get(0)).collect::<std::result::Result<_, _>>()?;
                // Locked rows stay queued until this commits, so every stand-in is claimed;
                // should one not be, its placement is simply not filled.
                runs_as.retain(|placed, task| placed == task || got.contains(task));
                claimed.extend(more);
            }
        }
        if claimed.is_empty() {
            return Ok(Vec::new());
        }
        // 5. One attempt per claimed task, made current (fencing), metered against the
        // latest price table (`record_prices` commits a new version whole, so this reads
        // either the old latest or the new one).
        let n = claimed.len();
        let (mut a_task, mut a_job, mut a_number, mut a_node, mut a_epoch, mut a_cores, mut a_memory) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for r in &claimed {
            let node_id: i64 = r.try_get(8)?;
            let epoch = nodes.get(&node_id).map(|n| n.epoch).unwrap_or_default();
            a_task.push(r.try_get::<i64, _>(0)?);
            a_job.push(r.try_get::<i64, _>(1)?);
            a_number.push(r.try_get::<i64, _>(5)?);
            a_node.push(node_id);
            a_epoch.push(epoch);
            a_cores.push(r.try_get::<i64, _>(6)?);
            a_memory.push(r.try_get::<i64, _>(7)?);
        }
        let made: Vec<(i64, i64)> = sqlx::query_as(
            "WITH made AS ( \
                 INSERT INTO attempts (task_id, job_id, number, node_id, epoch, state, cores, memory, assigned_ms, \
                                       price_version) \
                 SELECT u.task_id, u.job_id, u.number, u.node_id, u.epoch, 'assigned', u.cores, u.memory, $8, \
                        (SELECT COALESCE(MAX(version), 0) FROM prices) \
                 FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[], $5::BIGINT[], $6::BIGINT[], \
                             $7::BIGINT[]) AS u(task_id, job_id, number, node_id, epoch, cores, memory) \
                 RETURNING id, task_id) \
             UPDATE tasks t SET current_attempt = made.id FROM made WHERE t.id = made.task_id \
             RETURNING made.task_id, made.id",
        )
        .bind(&a_task)
        .bind(&a_job)
        .bind(&a_number)
        .bind(&a_node)
        .bind(&a_epoch)
        .bind(&a_cores)
        .bind(&a_memory)
        .bind(now_ms)
        .fetch_all(&mut *tx)
        .await?;
        let attempt_of: HashMap<i64, i64> = made.into_iter().collect();
        // 6. Events and job states, in plan order.
        let mut out = Vec::with_capacity(n);
        let mut events = Vec::with_capacity(n);
        let by_task: HashMap<i64, &PgRow> =
            claimed.iter().map(|r| Ok((r.try_get::<i64, _>(0)?, r))).collect::<Result<_>>()?;
        for placed in &task_ids {
            let Some(task_id) = runs_as.get(placed).copied() else { continue };
            let Some(r) = by_task.get(&task_id) else { continue };
            let attempt_id =
                *attempt_of.get(&task_id).ok_or_else(|| corrupt("attempt", "insert returned no id"))?;
            let job_id: i64 = r.try_get(1)?;
            let node_id: i64 = r.try_get(8)?;
            let number = get_u32(r, 5)?;
            let Some(node) = nodes.get(&node_id) else { continue };
            let mut ev =
                Ev::task(job_id, task_id, r.try_get::<&str, _>(2)?, r.try_get(3)?, TaskState::Assigned);
            ev.attempt = number;
            ev.node = node.name.clone();
            events.push(ev);
            out.push(Assignment {
                attempt_id,
                epoch: node.epoch,
                number,
                node_id,
                task_id,
                job_id,
                plan: json("task plan", r.try_get::<&str, _>(4)?)?,
                instead_of: (task_id != *placed).then_some(*placed),
            });
        }
        let mut jobs: Vec<i64> = out.iter().map(|a| a.job_id).collect();
        jobs.sort_unstable();
        jobs.dedup();
        emit(&mut tx, now_ms, events).await?;
        refresh_jobs(&mut tx, &jobs, now_ms).await?;
        Ok(out)
    })?;
    let stood_in = out.iter().filter(|a| a.instead_of.is_some()).count();
    tracing::debug!(planned = plan.len(), assigned = out.len(), stood_in, "assigned tasks");
    Ok(out)
}
