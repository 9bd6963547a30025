//! The pure placement function: given a snapshot of nodes and queued tasks, decide which task
//! goes where. The server reads the snapshot, calls [`place`], and applies the plan in one
//! store transaction; nothing here does I/O, so it can be property-tested and benchmarked alone.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

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
    /// Room beyond `free` for attempts assigned ahead: they wait on the node's agent and start
    /// the moment an attempt there ends, so a busy node never idles between tasks for a
    /// round trip to the server. Taken only by tasks that fit no node's `free`
    /// ([`Placement::ahead`]); [`Resources::NONE`] assigns nothing ahead.
    pub ahead: Resources,
    /// Sandboxes the node can run.
    pub runtimes: Vec<RuntimeKind>,
    /// Booted, idle microVMs per image that a microvm task of that image can claim.
    pub warm: BTreeMap<String, u32>,
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
    /// The image of a microvm task, matched against the nodes' warm VMs; `None` otherwise.
    pub image: Option<String>,
    /// The project of the task's job, whose quota it counts against.
    pub project: String,
}

/// What a project may still take this round, under its quota; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Room {
    /// Cores: (in use, limit).
    pub cores: Option<(u64, u64)>,
    /// Memory bytes: (in use, limit).
    pub memory: Option<(u64, u64)>,
    /// Tasks: (in use, limit).
    pub tasks: Option<(u64, u64)>,
}

impl Room {
    /// Why a task needing `need` does not fit (the quota and its use, like
    /// `project quota: cores 40/40`), or `None` when it fits.
    pub fn refuses(&self, need: &Resources) -> Option<String> {
        let over = |what: &str, limit: Option<(u64, u64)>, more: u64| match limit {
            Some((used, max)) if used + more > max => Some(format!("project quota: {what} {used}/{max}")),
            _ => None,
        };
        over("cores", self.cores, u64::from(need.cores))
            .or_else(|| {
                over("memory", self.memory, need.memory).map(|_| {
                    let (used, max) = self.memory.unwrap_or_default();
                    format!(
                        "project quota: memory {}/{}",
                        crate::resources::format_memory(used),
                        crate::resources::format_memory(max)
                    )
                })
            })
            .or_else(|| over("tasks", self.tasks, 1))
    }

    /// Whether any quota applies.
    pub fn limits(&self) -> bool {
        self.cores.is_some() || self.memory.is_some() || self.tasks.is_some()
    }

    /// Counts a placed task against the room.
    fn take(&mut self, need: &Resources) {
        let add = |limit: &mut Option<(u64, u64)>, more: u64| {
            if let Some((used, _)) = limit {
                *used += more;
            }
        };
        add(&mut self.cores, u64::from(need.cores));
        add(&mut self.memory, need.memory);
        add(&mut self.tasks, 1);
    }
}

/// A placement round's decisions, and the tasks a project's quota kept waiting (with why).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Placed {
    /// Where tasks go, in the order decided.
    pub placements: Vec<Placement>,
    /// Tasks that would have been considered but their project's quota is full.
    pub held: Vec<(i64, String)>,
}

/// One decision: run `task_id` on `node_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The task placed.
    pub task_id: i64,
    /// The node chosen.
    pub node_id: i64,
    /// Whether the task goes to the node ahead of room: it waits on the node until an attempt
    /// there ends (see [`NodeView::ahead`]).
    pub ahead: bool,
}

/// How much of a node its open attempts hold, for [`admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeLoad {
    /// What the node offers in all.
    pub capacity: Resources,
    /// What its open attempts (running or waiting on it) reserve together.
    pub reserved: Resources,
}

impl NodeLoad {
    /// What a placement may still take: what is free, or for a placement ahead
    /// ([`Placement::ahead`]) what is free plus one more node's worth, the most an agent holds
    /// waiting.
    pub fn room(&self, ahead: bool) -> Resources {
        let limit = if ahead { self.capacity.plus(&self.capacity) } else { self.capacity };
        limit.minus(&self.reserved)
    }

    /// The room a node keeps for placements ahead, beyond what is free (see
    /// [`NodeView::ahead`]).
    pub fn ahead(&self) -> Resources {
        self.room(true).minus(&self.room(false))
    }
}

/// Re-checks a placement plan when it is applied, against what the nodes hold at that moment
/// (another server may have filled a node since the plan was made): keeps placements in plan
/// order while they still fit ([`NodeLoad::room`]: a placement ahead may go up to one node's
/// worth beyond capacity), each task at most once, and adds what each admitted task needs to
/// its node's load. A task missing from `need` (no longer queued) or a node missing from
/// `loads` (no longer ready) is left out. Returns the admitted placements.
pub fn admit(
    plan: &[Placement],
    loads: &mut HashMap<i64, NodeLoad>,
    need: &HashMap<i64, Resources>,
) -> Vec<Placement> {
    let mut seen = HashSet::with_capacity(plan.len());
    let mut admitted = Vec::with_capacity(plan.len());
    for p in plan {
        let (Some(load), Some(need)) = (loads.get_mut(&p.node_id), need.get(&p.task_id)) else { continue };
        if load.room(p.ahead).fits(need) && seen.insert(p.task_id) {
            load.reserved = load.reserved.plus(need);
            admitted.push(*p);
        }
    }
    admitted
}

/// Whether a node's labels satisfy a task's constraints.
pub fn matches_constraints(
    labels: &BTreeMap<String, String>,
    constraints: &BTreeMap<String, String>,
) -> bool {
    constraints.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Most distinct (runtime, constraints) combinations that get their own node index in one call;
/// tasks with rarer combinations fall back to scanning every node. Building an index costs about
/// one scan, and every index that holds a node is updated when the node's free resources change,
/// so the cap bounds that upkeep when a queue carries many distinct constraint sets.
const MAX_INDEXES: usize = 64;

/// Places queued tasks on nodes: highest priority first, then first submitted; each on the
/// node with the most free cores among those it fits and whose labels match, so work spreads
/// across the fleet. A microvm task prefers, among those nodes, the ones with a warm VM of its
/// image left (each placement uses one up), since it starts there without a boot. A task that fits nowhere is skipped, and smaller tasks behind it may still
/// run (backfill). Returns placements in the order they were decided.
///
/// Cost: O(T log T) to order the queue plus O(log N) per placement in the common case, instead
/// of a scan of every node per task. Tasks are grouped by what they require (runtime and
/// constraints); each group gets an index of its eligible nodes, ordered by the placement key
/// (free cores, then free memory, then lowest id), so the best node is the index's largest entry.
/// Only when that node lacks the memory the task needs does the search walk down the index.
pub fn place(nodes: &[NodeView], queue: &[QueuedTask]) -> Vec<Placement> {
    place_with(nodes, queue, &BTreeMap::new(), MAX_INDEXES).placements
}

/// [`place`] within projects' quotas: a task whose project has no room left for it (see
/// [`Room`]) is not placed and is listed in [`Placed::held`] with the reason; tasks of projects
/// without an entry in `rooms` have no limit.
pub fn place_within(nodes: &[NodeView], queue: &[QueuedTask], rooms: &BTreeMap<String, Room>) -> Placed {
    place_with(nodes, queue, rooms, MAX_INDEXES)
}

/// A node's position in an index: larger is better. The node's position in `nodes` breaks the
/// remaining ties the way a linear `max_by_key` does (the last of equal nodes wins).
type Rank = (u32, u64, Reverse<i64>, usize);

fn rank(nodes: &[NodeView], free: &[Resources], i: usize) -> Rank {
    (free[i].cores, free[i].memory, Reverse(nodes[i].id), i)
}

/// The eligible nodes of one group of tasks, best last.
struct NodeIndex {
    ranked: BTreeSet<Rank>,
}

/// [`place_within`] with a configurable cap on the number of indexes (tests use 0 to exercise
/// the scan).
fn place_with(
    nodes: &[NodeView],
    queue: &[QueuedTask],
    rooms: &BTreeMap<String, Room>,
    max_indexes: usize,
) -> Placed {
    let mut rooms = rooms.clone();
    let mut free: Vec<Resources> = nodes.iter().map(|n| n.free).collect();
    let (mut plan, mut held) = place_pass(nodes, queue, &mut rooms, &mut free, max_indexes, false);
    // What fits no node's free room may wait on a busy node that keeps room ahead.
    if nodes.iter().any(|n| n.ahead.cores > 0 || n.ahead.memory > 0) {
        let decided: HashSet<i64> =
            plan.iter().map(|p| p.task_id).chain(held.iter().map(|(id, _)| *id)).collect();
        // A project under a quota counts waiting attempts as in use: they would take its room
        // from running ones, so its tasks wait in the server's queue instead.
        let limited = |t: &QueuedTask| rooms.get(&t.project).is_some_and(Room::limits);
        let rest: Vec<QueuedTask> =
            queue.iter().filter(|t| !decided.contains(&t.id) && !limited(t)).cloned().collect();
        if !rest.is_empty() {
            let mut room: Vec<Resources> = free.iter().zip(nodes).map(|(f, n)| f.plus(&n.ahead)).collect();
            let (ahead, ahead_held) = place_pass(nodes, &rest, &mut rooms, &mut room, max_indexes, true);
            plan.extend(ahead);
            held.extend(ahead_held);
        }
    }
    held.extend(unplaceable(nodes, queue, &plan, &held));
    Placed { placements: plan, held }
}

/// One pass of [`place_with`] over `queue` within `free` (taking from it and from `rooms`):
/// the placements made, marked `ahead` as given, and the tasks a quota held. Warm VMs are
/// preferred only in the first pass: an attempt waiting ahead claims no VM until it starts.
fn place_pass(
    nodes: &[NodeView],
    queue: &[QueuedTask],
    rooms: &mut BTreeMap<String, Room>,
    free: &mut [Resources],
    max_indexes: usize,
    ahead: bool,
) -> (Vec<Placement>, Vec<(i64, String)>) {
    let mut held = Vec::new();
    let mut order: Vec<&QueuedTask> = queue.iter().collect();
    // Stable, so tasks with equal keys keep their queue order.
    order.sort_by_key(|t| (Reverse(t.priority), t.id));
    let mut plan = Vec::new();
    let mut cores_left: u64 = free.iter().map(|r| r.cores as u64).sum();
    let smallest_need = order.iter().map(|t| t.resources.cores).min().unwrap_or(0) as u64;
    // Group key → index number (or `None` once the cap was reached for that key).
    let mut groups: HashMap<(RuntimeKind, &BTreeMap<String, String>), Option<usize>> = HashMap::new();
    let mut indexes: Vec<NodeIndex> = Vec::new();
    // For every node, the indexes that hold it, so a reservation updates all of them.
    let mut member_of: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    // Warm VMs not yet promised to a task, per (node, image); few nodes have any, so a scan of
    // those is cheap.
    let mut warm_left: HashMap<(usize, &str), u32> = nodes
        .iter()
        .filter(|_| !ahead)
        .enumerate()
        .flat_map(|(i, n)| {
            n.warm.iter().filter(|(_, c)| **c > 0).map(move |(image, c)| ((i, image.as_str()), *c))
        })
        .collect();
    for task in order {
        if cores_left < smallest_need.max(1) {
            break;
        }
        if let Some(room) = rooms.get(&task.project)
            && let Some(reason) = room.refuses(&task.resources)
        {
            held.push((task.id, reason));
            continue;
        }
        let group = *groups.entry((task.runtime, &task.constraints)).or_insert_with(|| {
            if indexes.len() >= max_indexes {
                return None;
            }
            let id = indexes.len();
            let ranked = (0..nodes.len())
                .filter(|&i| eligible(&nodes[i], task))
                .inspect(|&i| member_of[i].push(id))
                .map(|i| rank(nodes, free, i))
                .collect();
            indexes.push(NodeIndex { ranked });
            Some(id)
        });
        let warm_image = task.image.as_deref().filter(|_| task.runtime == RuntimeKind::Microvm);
        let warm_best = warm_image.and_then(|image| {
            warm_left
                .iter()
                .filter(|((i, img), left)| {
                    *img == image
                        && **left > 0
                        && free[*i].fits(&task.resources)
                        && eligible(&nodes[*i], task)
                })
                .map(|((i, _), _)| *i)
                .max_by_key(|&i| rank(nodes, free, i))
        });
        if let (Some(i), Some(image)) = (warm_best, warm_image)
            && let Some(left) = warm_left.get_mut(&(i, image))
        {
            *left -= 1;
        }
        let best = match group {
            _ if warm_best.is_some() => warm_best,
            Some(g) => indexes[g]
                .ranked
                .iter()
                .rev()
                // Ranked by cores first: once one lacks cores, every node below does too.
                .take_while(|r| r.0 >= task.resources.cores)
                .find(|r| free[r.3].fits(&task.resources))
                .map(|r| r.3),
            None => (0..nodes.len())
                .filter(|&i| free[i].fits(&task.resources) && eligible(&nodes[i], task))
                .max_by_key(|&i| rank(nodes, free, i)),
        };
        if let Some(i) = best {
            let before = rank(nodes, free, i);
            free[i] = free[i].minus(&task.resources);
            let after = rank(nodes, free, i);
            for &g in &member_of[i] {
                indexes[g].ranked.remove(&before);
                indexes[g].ranked.insert(after);
            }
            cores_left -= task.resources.cores as u64;
            if let Some(room) = rooms.get_mut(&task.project) {
                room.take(&task.resources);
            }
            plan.push(Placement { task_id: task.id, node_id: nodes[i].id, ahead });
        }
    }
    (plan, held)
}

/// The tasks of `queue` that no node can take whatever its load (no node offers their runtime
/// or carries their labels), with why, so that they do not wait without a word. Tasks already
/// placed or held are skipped; the answer is worked out once per (runtime, constraints).
fn unplaceable(
    nodes: &[NodeView],
    queue: &[QueuedTask],
    placed: &[Placement],
    held: &[(i64, String)],
) -> Vec<(i64, String)> {
    let decided: HashSet<i64> =
        placed.iter().map(|p| p.task_id).chain(held.iter().map(|(id, _)| *id)).collect();
    let mut verdicts: HashMap<(RuntimeKind, &BTreeMap<String, String>), Option<String>> = HashMap::new();
    let mut out = Vec::new();
    for task in queue.iter().filter(|t| !decided.contains(&t.id)) {
        let verdict = verdicts.entry((task.runtime, &task.constraints)).or_insert_with(|| {
            let offering = nodes.iter().filter(|n| n.runtimes.contains(&task.runtime));
            if offering.clone().next().is_none() {
                return Some(format!("no ready node offers the {} runtime", task.runtime.as_str()));
            }
            crate::enforce::why_unplaceable(&task.constraints, offering.map(|n| &n.labels))
        });
        if let Some(reason) = verdict {
            out.push((task.id, reason.clone()));
        }
    }
    out
}

/// Whether a node can ever take a task: it offers the task's runtime and carries its labels.
fn eligible(node: &NodeView, task: &QueuedTask) -> bool {
    node.runtimes.contains(&task.runtime) && matches_constraints(&node.labels, &task.constraints)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admit_rechecks_fit_in_plan_order() {
        let r = |cores| Resources { cores, memory: 0, pids: 0 };
        let plan = [
            Placement { task_id: 1, node_id: 10, ahead: false },
            Placement { task_id: 2, node_id: 10, ahead: false },
            Placement { task_id: 1, node_id: 11, ahead: false },
            Placement { task_id: 3, node_id: 12, ahead: false },
            Placement { task_id: 4, node_id: 10, ahead: false },
        ];
        let load = |cores, held| NodeLoad { capacity: r(cores), reserved: r(held) };
        let mut loads = HashMap::from([(10, load(4, 1)), (11, load(8, 0))]);
        let need = HashMap::from([(1, r(2)), (2, r(2)), (4, r(1))]);
        let got = admit(&plan, &mut loads, &need);
        // Task 2 no longer fits on node 10, task 1 is taken once, node 12 is gone.
        assert_eq!(got, vec![plan[0], plan[4]]);
        assert_eq!(loads[&10].reserved.cores, 4);
    }

    #[test]
    fn admit_lets_a_placement_ahead_wait_up_to_one_node_beyond_capacity() {
        let r = |cores| Resources { cores, memory: 0, pids: 0 };
        let at = |task_id, ahead| Placement { task_id, node_id: 10, ahead };
        let plan = [at(1, false), at(2, true), at(3, true), at(4, true), at(5, false)];
        let mut loads = HashMap::from([(10, NodeLoad { capacity: r(2), reserved: r(1) })]);
        let need: HashMap<i64, Resources> = (1..=5).map(|id| (id, r(1))).collect();
        // 1 fills the node, 2 and 3 wait ahead; 4 would go beyond twice the capacity, and 5
        // asks for free room, which there is none of.
        assert_eq!(admit(&plan, &mut loads, &need), vec![plan[0], plan[1], plan[2]]);
        assert_eq!(loads[&10].reserved.cores, 4);
        assert_eq!(loads[&10].ahead(), Resources::NONE);
        let half = NodeLoad { capacity: r(4), reserved: r(5) };
        assert_eq!((half.room(false).cores, half.room(true).cores, half.ahead().cores), (0, 3, 3));
    }
    use proptest::prelude::*;

    fn node(id: i64, cores: u32, labels: &[(&str, &str)]) -> NodeView {
        NodeView {
            id,
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            free: Resources { cores, memory: 8 << 30, pids: 0 },
            ahead: Resources::NONE,
            runtimes: vec![RuntimeKind::Process],
            warm: BTreeMap::new(),
        }
    }

    fn task(id: i64, priority: i32, cores: u32) -> QueuedTask {
        QueuedTask {
            id,
            priority,
            resources: Resources { cores, memory: 0, pids: 0 },
            constraints: BTreeMap::new(),
            runtime: RuntimeKind::Process,
            image: None,
            project: "p".into(),
        }
    }

    #[test]
    fn a_task_no_node_can_take_waits_with_the_reason() {
        let nodes = vec![node(1, 4, &[("drover.enforces.memory", "yes")])];
        let mut pids = task(1, 0, 1);
        pids.constraints.insert("drover.enforces.pids".into(), "yes".into());
        let mut memory = task(2, 0, 1);
        memory.constraints.insert("drover.enforces.memory".into(), "yes".into());
        let mut docker = task(3, 0, 1);
        docker.runtime = RuntimeKind::Docker;
        let placed = place_within(&nodes, &[pids, memory, docker], &BTreeMap::new());
        assert_eq!(placed.placements, vec![Placement { task_id: 2, node_id: 1, ahead: false }]);
        assert_eq!(placed.held.len(), 2, "{:?}", placed.held);
        assert!(placed.held[0].1.contains("enforce a pids limit"), "{:?}", placed.held);
        assert_eq!(placed.held[1], (3, "no ready node offers the docker runtime".to_string()));
    }

    #[test]
    fn quotas_hold_a_projects_tasks_and_leave_others_alone() {
        let mut a = task(1, 0, 2);
        a.project = "a".into();
        let mut a2 = task(2, 0, 1);
        a2.project = "a".into();
        let b = task(3, 0, 1);
        let rooms = BTreeMap::from([("a".to_string(), Room { cores: Some((1, 2)), ..Room::default() })]);
        let placed = place_within(&[node(1, 8, &[])], &[a, a2, b], &rooms);
        // Task 1 needs 2 cores with 1 of 2 in use; task 2 takes the last core; task 3's project
        // has no quota.
        assert_eq!(placed.placements.iter().map(|p| p.task_id).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(placed.held, vec![(1, "project quota: cores 1/2".to_string())]);
        let full = Room { tasks: Some((3, 3)), ..Room::default() };
        assert_eq!(
            full.refuses(&Resources { cores: 1, memory: 0, pids: 0 }).as_deref(),
            Some("project quota: tasks 3/3")
        );
        let mem = Room { memory: Some((1 << 30, 1 << 30)), ..Room::default() };
        assert_eq!(
            mem.refuses(&Resources { cores: 1, memory: 1, pids: 0 }).as_deref(),
            Some("project quota: memory 1GiB/1GiB")
        );
    }

    #[test]
    fn priority_then_fifo() {
        let plan = place(&[node(1, 1, &[])], &[task(1, 0, 1), task(2, 5, 1), task(3, 5, 1)]);
        assert_eq!(plan, vec![Placement { task_id: 2, node_id: 1, ahead: false }]);
    }

    #[test]
    fn constraints_pick_matching_node() {
        let mut t = task(1, 0, 1);
        t.constraints.insert("gpu".into(), "true".into());
        let plan = place(&[node(1, 8, &[]), node(2, 1, &[("gpu", "true")])], &[t]);
        assert_eq!(plan, vec![Placement { task_id: 1, node_id: 2, ahead: false }]);
    }

    #[test]
    fn tasks_go_only_to_nodes_with_their_runtime() {
        let mut t = task(1, 0, 1);
        t.runtime = RuntimeKind::Docker;
        let mut docker = node(2, 1, &[]);
        docker.runtimes.push(RuntimeKind::Docker);
        assert_eq!(
            place(&[node(1, 8, &[]), docker], &[t.clone()]),
            vec![Placement { task_id: 1, node_id: 2, ahead: false }]
        );
        assert!(place(&[node(1, 8, &[])], &[t]).is_empty());
    }

    #[test]
    fn microvm_tasks_prefer_nodes_with_a_warm_vm_of_their_image() {
        let microvm = |id: i64, cores: u32, warm: &[(&str, u32)]| {
            let mut n = node(id, cores, &[]);
            n.runtimes.push(RuntimeKind::Microvm);
            n.warm = warm.iter().map(|(i, c)| (i.to_string(), *c)).collect();
            n
        };
        let vm_task = |id: i64, image: &str| {
            let mut t = task(id, 0, 1);
            t.runtime = RuntimeKind::Microvm;
            t.image = Some(image.into());
            t
        };
        let nodes = [microvm(1, 8, &[("other", 3)]), microvm(2, 2, &[("img", 1)]), microvm(3, 8, &[])];
        // The first task takes the only warm VM of its image, on the smaller node; the second
        // finds none left and goes where any task would (most free cores, then lowest id).
        let plan = place(&nodes, &[vm_task(1, "img"), vm_task(2, "img")]);
        assert_eq!(
            plan,
            vec![
                Placement { task_id: 1, node_id: 2, ahead: false },
                Placement { task_id: 2, node_id: 1, ahead: false }
            ]
        );
        // A process task ignores warm VMs.
        let mut p = task(3, 0, 1);
        p.image = Some("img".into());
        assert_eq!(place(&nodes, &[p]), vec![Placement { task_id: 3, node_id: 1, ahead: false }]);
    }

    #[test]
    fn tasks_go_ahead_onto_a_busy_node_only_once_no_node_has_free_room() {
        let mut busy = node(1, 0, &[]);
        busy.ahead = Resources { cores: 2, memory: 8 << 30, pids: 0 };
        let mut idle = node(2, 1, &[]);
        idle.ahead = Resources { cores: 2, memory: 8 << 30, pids: 0 };
        let plan = place(&[busy, idle], &[task(1, 0, 1), task(2, 0, 1), task(3, 0, 1), task(4, 0, 2)]);
        // Task 1 takes the free core; 2 and 3 wait ahead, spread by room; 4 finds no room left
        // ahead for two cores on either node.
        assert_eq!(plan[0], Placement { task_id: 1, node_id: 2, ahead: false });
        assert!(plan[1..].iter().all(|p| p.ahead), "{plan:?}");
        assert_eq!(plan.len(), 3, "{plan:?}");
        assert_ne!(plan[1].node_id, plan[2].node_id, "{plan:?}");
        // A project under a quota gets nothing ahead.
        let mut busy = node(1, 0, &[]);
        busy.ahead = Resources { cores: 2, memory: 8 << 30, pids: 0 };
        let rooms = BTreeMap::from([("p".to_string(), Room { tasks: Some((0, 10)), ..Room::default() })]);
        assert!(place_within(&[busy], &[task(1, 0, 1)], &rooms).placements.is_empty());
        // Without room ahead, the same queue places one task.
        assert_eq!(place(&[node(1, 0, &[]), node(2, 1, &[])], &[task(1, 0, 1), task(2, 0, 1)]).len(), 1);
    }

    #[test]
    fn big_task_does_not_block_small_ones() {
        let plan = place(&[node(1, 2, &[])], &[task(1, 0, 4), task(2, 0, 1)]);
        assert_eq!(plan, vec![Placement { task_id: 2, node_id: 1, ahead: false }]);
    }

    #[test]
    fn spreads_across_nodes() {
        let plan = place(&[node(1, 2, &[]), node(2, 2, &[])], &[task(1, 0, 1), task(2, 0, 1)]);
        assert_ne!(plan[0].node_id, plan[1].node_id);
    }

    /// The straightforward O(tasks × nodes) placement the indexed one must agree with.
    fn reference_place(nodes: &[NodeView], queue: &[QueuedTask]) -> Vec<Placement> {
        let mut free: Vec<Resources> = nodes.iter().map(|n| n.free).collect();
        let mut order: Vec<&QueuedTask> = queue.iter().collect();
        order.sort_by_key(|t| (Reverse(t.priority), t.id));
        let mut plan = Vec::new();
        let mut cores_left: u64 = free.iter().map(|r| r.cores as u64).sum();
        let smallest_need = order.iter().map(|t| t.resources.cores).min().unwrap_or(0) as u64;
        let mut warm: Vec<BTreeMap<String, u32>> = nodes.iter().map(|n| n.warm.clone()).collect();
        for task in order {
            if cores_left < smallest_need.max(1) {
                break;
            }
            let candidates: Vec<usize> = (0..nodes.len())
                .filter(|&i| {
                    free[i].fits(&task.resources)
                        && nodes[i].runtimes.contains(&task.runtime)
                        && matches_constraints(&nodes[i].labels, &task.constraints)
                })
                .collect();
            let image = task.image.as_ref().filter(|_| task.runtime == RuntimeKind::Microvm);
            let has_warm = |i: &usize| image.is_some_and(|img| warm[*i].get(img).is_some_and(|c| *c > 0));
            let pool: Vec<usize> = if candidates.iter().any(has_warm) {
                candidates.iter().copied().filter(has_warm).collect()
            } else {
                candidates
            };
            let best = pool
                .into_iter()
                .map(|i| (i, &nodes[i]))
                .max_by_key(|(i, n)| (free[*i].cores, free[*i].memory, Reverse(n.id)));
            if let Some((i, node)) = best {
                if let Some(count) = image.and_then(|img| warm[i].get_mut(img)) {
                    *count = count.saturating_sub(1);
                }
                free[i] = free[i].minus(&task.resources);
                cores_left -= task.resources.cores as u64;
                plan.push(Placement { task_id: task.id, node_id: node.id, ahead: false });
            }
        }
        plan
    }

    #[test]
    fn prefers_more_free_memory_on_equal_cores_then_lower_id() {
        let mut a = node(7, 4, &[]);
        a.free.memory = 1 << 30;
        let b = node(9, 4, &[]);
        let c = node(3, 4, &[]);
        let plan = place(&[a, b, c], &[task(1, 0, 1), task(2, 0, 1)]);
        assert_eq!(
            plan,
            vec![
                Placement { task_id: 1, node_id: 3, ahead: false },
                Placement { task_id: 2, node_id: 9, ahead: false }
            ]
        );
    }

    #[test]
    fn memory_shortfall_on_the_top_node_falls_to_the_next() {
        let mut big = node(1, 8, &[]);
        big.free.memory = 1 << 20;
        let small = node(2, 2, &[]);
        let mut t = task(1, 0, 1);
        t.resources.memory = 1 << 30;
        assert_eq!(place(&[big, small], &[t]), vec![Placement { task_id: 1, node_id: 2, ahead: false }]);
    }

    fn arb_node() -> impl Strategy<Value = NodeView> {
        (
            0i64..6,
            0u32..5,
            0u64..4,
            proptest::option::of(prop_oneof![Just("a"), Just("b")]),
            any::<bool>(),
            any::<bool>(),
            proptest::collection::btree_map(
                prop_oneof![Just("x".to_string()), Just("y".to_string())],
                0u32..3,
                0..2,
            ),
        )
            .prop_map(|(id, cores, memory, zone, gpu, docker, warm)| {
                let mut labels = BTreeMap::new();
                if let Some(z) = zone {
                    labels.insert("zone".to_string(), z.to_string());
                }
                if gpu {
                    labels.insert("gpu".to_string(), "true".to_string());
                }
                let mut runtimes = vec![RuntimeKind::Process];
                if docker {
                    runtimes.push(RuntimeKind::Docker);
                }
                if !warm.is_empty() {
                    runtimes.push(RuntimeKind::Microvm);
                }
                NodeView {
                    id,
                    labels,
                    free: Resources { cores, memory, pids: 0 },
                    ahead: Resources::NONE,
                    runtimes,
                    warm,
                }
            })
    }

    fn arb_task() -> impl Strategy<Value = QueuedTask> {
        (
            -1i32..2,
            0u32..4,
            0u64..3,
            proptest::option::of(prop_oneof![Just("a"), Just("b"), Just("c")]),
            proptest::bool::weighted(0.2),
            prop_oneof![Just(RuntimeKind::Process), Just(RuntimeKind::Docker), Just(RuntimeKind::Microvm)],
            proptest::option::of(prop_oneof![Just("x".to_string()), Just("y".to_string())]),
        )
            .prop_map(|(priority, cores, memory, zone, gpu, runtime, image)| {
                let mut constraints = BTreeMap::new();
                if let Some(z) = zone {
                    constraints.insert("zone".to_string(), z.to_string());
                }
                if gpu {
                    constraints.insert("gpu".to_string(), "true".to_string());
                }
                QueuedTask {
                    id: 0,
                    priority,
                    resources: Resources { cores, memory, pids: 0 },
                    constraints,
                    runtime,
                    image,
                    project: String::new(),
                }
            })
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

        #[test]
        fn placements_ahead_stay_within_one_node_beyond_capacity(
            nodes in proptest::collection::vec((0u32..6, 0u32..6), 1..6),
            needs in proptest::collection::vec((1u32..4, -2i32..3), 0..40),
        ) {
            // (capacity, reserved) per node, as the server derives free room and room ahead.
            let views: Vec<NodeView> = nodes.iter().enumerate().map(|(i, (cap, held))| {
                let load = NodeLoad { capacity: Resources { cores: *cap, memory: 0, pids: 0 }, reserved: Resources { cores: *held, memory: 0, pids: 0 } };
                let mut view = node(i as i64, load.room(false).cores, &[]);
                view.free.memory = 0;
                view.ahead = load.ahead();
                view
            }).collect();
            let queue: Vec<QueuedTask> = needs.iter().enumerate().map(|(i, (c, p))| task(i as i64, *p, *c)).collect();
            let plan = place(&views, &queue);
            let mut seen = std::collections::BTreeSet::new();
            let mut loads: HashMap<i64, NodeLoad> = nodes.iter().enumerate().map(|(i, (cap, held))| {
                (i as i64, NodeLoad { capacity: Resources { cores: *cap, memory: 0, pids: 0 }, reserved: Resources { cores: *held, memory: 0, pids: 0 } })
            }).collect();
            for p in &plan {
                prop_assert!(seen.insert(p.task_id), "task placed twice");
                let need = queue[p.task_id as usize].resources;
                let load = loads.get_mut(&p.node_id).unwrap();
                prop_assert!(load.room(p.ahead).fits(&need), "{p:?} does not fit {load:?}");
                load.reserved = load.reserved.plus(&need);
            }
            // Every placement ahead comes after those into free room, and none was made while
            // the task could have had free room somewhere.
            let first_ahead = plan.iter().position(|p| p.ahead).unwrap_or(plan.len());
            prop_assert!(plan[first_ahead..].iter().all(|p| p.ahead));
            // The store's re-check takes the whole plan as made.
            let need: HashMap<i64, Resources> = queue.iter().map(|t| (t.id, t.resources)).collect();
            let mut fresh: HashMap<i64, NodeLoad> = nodes.iter().enumerate().map(|(i, (cap, held))| {
                (i as i64, NodeLoad { capacity: Resources { cores: *cap, memory: 0, pids: 0 }, reserved: Resources { cores: *held, memory: 0, pids: 0 } })
            }).collect();
            prop_assert_eq!(admit(&plan, &mut fresh, &need), plan);
        }

        #[test]
        fn indexed_placement_equals_the_reference(
            nodes in proptest::collection::vec(arb_node(), 0..8),
            tasks in proptest::collection::vec((arb_task(), 0i64..30), 0..40),
            max_indexes in prop_oneof![Just(0usize), Just(1), Just(2), Just(MAX_INDEXES)],
        ) {
            // Ids may repeat, as may (priority, id) pairs: ties must break the same way too.
            let queue: Vec<QueuedTask> = tasks.into_iter().map(|(mut t, id)| { t.id = id; t }).collect();
            prop_assert_eq!(place_with(&nodes, &queue, &BTreeMap::new(), max_indexes).placements, reference_place(&nodes, &queue));
        }
    }
}
