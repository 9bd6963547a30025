//! The pure placement function: given a snapshot of nodes and queued tasks, decide which task
//! goes where. The server reads the snapshot, calls [`place`], and applies the plan in one
//! store transaction; nothing here does I/O, so it can be property-tested and benchmarked alone.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use crate::job::RuntimeKind;
use crate::resources::Resources;

/// A node as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    /// Node id.
    pub id: i64,
    /// Labels that task constraints match against.
    pub labels: BTreeMap<String, String>,
    /// Resources not yet reserved by tasks on the node.
    pub free: Resources,
    /// Sandboxes the node can run.
    pub runtimes: Vec<RuntimeKind>,
}

/// A queued task as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedTask {
    /// Task id; lower ids were submitted earlier.
    pub id: i64,
    /// Priority of the task's job; higher first.
    pub priority: i32,
    /// What the task reserves.
    pub resources: Resources,
    /// Labels a node must carry.
    pub constraints: BTreeMap<String, String>,
    /// The sandbox it needs.
    pub runtime: RuntimeKind,
}

/// One decision: run `task_id` on `node_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The task placed.
    pub task_id: i64,
    /// The node chosen.
    pub node_id: i64,
}

/// Whether a node's labels satisfy a task's constraints.
pub fn matches_constraints(
    labels: &BTreeMap<String, String>,
    constraints: &BTreeMap<String, String>,
) -> bool {
    constraints.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Places queued tasks on nodes: highest priority first, then first submitted; each on the
/// node with the most free cores among those it fits and whose labels match, so work spreads
/// across the fleet. A task that fits nowhere is skipped, and smaller tasks behind it may still
/// run (backfill). Returns placements in the order they were decided.
pub fn place(nodes: &[NodeView], queue: &[QueuedTask]) -> Vec<Placement> {
    let mut free: Vec<Resources> = nodes.iter().map(|n| n.free).collect();
    let mut order: Vec<&QueuedTask> = queue.iter().collect();
    order.sort_by_key(|t| (Reverse(t.priority), t.id));
    let mut plan = Vec::new();
    let mut cores_left: u64 = free.iter().map(|r| r.cores as u64).sum();
    let smallest_need = order.iter().map(|t| t.resources.cores).min().unwrap_or(0) as u64;
    for task in order {
        if cores_left < smallest_need.max(1) {
            break;
        }
        let best = nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| {
                free[*i].fits(&task.resources)
                    && n.runtimes.contains(&task.runtime)
                    && matches_constraints(&n.labels, &task.constraints)
            })
            .max_by_key(|(i, n)| (free[*i].cores, free[*i].memory, Reverse(n.id)));
        if let Some((i, node)) = best {
            free[i] = free[i].minus(&task.resources);
            cores_left -= task.resources.cores as u64;
            plan.push(Placement { task_id: task.id, node_id: node.id });
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(id: i64, cores: u32, labels: &[(&str, &str)]) -> NodeView {
        NodeView {
            id,
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            free: Resources { cores, memory: 8 << 30 },
            runtimes: vec![RuntimeKind::Process],
        }
    }

    fn task(id: i64, priority: i32, cores: u32) -> QueuedTask {
        QueuedTask {
            id,
            priority,
            resources: Resources { cores, memory: 0 },
            constraints: BTreeMap::new(),
            runtime: RuntimeKind::Process,
        }
    }

    #[test]
    fn priority_then_fifo() {
        let plan = place(&[node(1, 1, &[])], &[task(1, 0, 1), task(2, 5, 1), task(3, 5, 1)]);
        assert_eq!(plan, vec![Placement { task_id: 2, node_id: 1 }]);
    }

    #[test]
    fn constraints_pick_matching_node() {
        let mut t = task(1, 0, 1);
        t.constraints.insert("gpu".into(), "true".into());
        let plan = place(&[node(1, 8, &[]), node(2, 1, &[("gpu", "true")])], &[t]);
        assert_eq!(plan, vec![Placement { task_id: 1, node_id: 2 }]);
    }

    #[test]
    fn tasks_go_only_to_nodes_with_their_runtime() {
        let mut t = task(1, 0, 1);
        t.runtime = RuntimeKind::Docker;
        let mut docker = node(2, 1, &[]);
        docker.runtimes.push(RuntimeKind::Docker);
        assert_eq!(
            place(&[node(1, 8, &[]), docker], &[t.clone()]),
            vec![Placement { task_id: 1, node_id: 2 }]
        );
        assert!(place(&[node(1, 8, &[])], &[t]).is_empty());
    }

    #[test]
    fn big_task_does_not_block_small_ones() {
        let plan = place(&[node(1, 2, &[])], &[task(1, 0, 4), task(2, 0, 1)]);
        assert_eq!(plan, vec![Placement { task_id: 2, node_id: 1 }]);
    }

    #[test]
    fn spreads_across_nodes() {
        let plan = place(&[node(1, 2, &[]), node(2, 2, &[])], &[task(1, 0, 1), task(2, 0, 1)]);
        assert_ne!(plan[0].node_id, plan[1].node_id);
    }

    proptest! {
        #[test]
        fn never_overcommits(
            caps in proptest::collection::vec(0u32..8, 1..6),
            needs in proptest::collection::vec((1u32..4, -2i32..3), 0..40),
        ) {
            let nodes: Vec<NodeView> = caps.iter().enumerate().map(|(i, c)| node(i as i64, *c, &[])).collect();
            let queue: Vec<QueuedTask> = needs.iter().enumerate().map(|(i, (c, p))| task(i as i64, *p, *c)).collect();
            let plan = place(&nodes, &queue);
            let mut used = vec![0u32; nodes.len()];
            let mut seen = std::collections::BTreeSet::new();
            for p in &plan {
                prop_assert!(seen.insert(p.task_id), "task placed twice");
                used[p.node_id as usize] += queue[p.task_id as usize].resources.cores;
            }
            for (u, c) in used.iter().zip(&caps) {
                prop_assert!(u <= c);
            }
        }
    }
}
