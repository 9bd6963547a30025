//! Limits a node's process sandbox can enforce, and the placement constraints that keep a task
//! away from nodes that would run it unlimited.
//!
//! A container or a microVM carries its own limits, but a process task is held only by the
//! cgroups its agent manages, and an agent enforces only what the node's cgroup controllers
//! allow. Each agent says at start which limits it enforces, as node labels
//! `drover.enforces.<limit>=yes`; the server adds the matching constraint to every process task
//! that sets such a limit ([`require`]), so placement never sends it where the limit would
//! silently vanish, and the task waits with a reason that names the limit ([`why_unplaceable`]).

use crate::job::{JobPlan, RuntimeKind, TaskPlan};

/// Prefix of the node labels that say which limits a node enforces.
pub const LABEL_PREFIX: &str = "drover.enforces.";

/// Value of an enforcement label.
pub const ENFORCED: &str = "yes";

/// A limit a node's process sandbox may or may not be able to enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Limit {
    /// `resources.memory`: a memory cgroup kills the task beyond it (failure class `oom`).
    Memory,
    /// `resources.pids`: a pids cgroup refuses forks beyond it.
    Pids,
}

impl Limit {
    /// Every limit, in the order agents report them.
    pub const ALL: [Limit; 2] = [Limit::Memory, Limit::Pids];

    /// Lowercase name, as in labels and messages.
    pub fn name(self) -> &'static str {
        match self {
            Limit::Memory => "memory",
            Limit::Pids => "pids",
        }
    }

    /// The node label that says this limit is enforced.
    pub fn label(self) -> String {
        format!("{LABEL_PREFIX}{}", self.name())
    }
}

/// The limits `task` sets that its node must enforce: none for containers and microVMs, whose
/// runtimes carry their own.
pub fn needed(task: &TaskPlan) -> Vec<Limit> {
    if task.runtime != RuntimeKind::Process {
        return Vec::new();
    }
    let mut limits = Vec::new();
    if task.resources.memory > 0 {
        limits.push(Limit::Memory);
    }
    if task.resources.pids > 0 {
        limits.push(Limit::Pids);
    }
    limits
}

/// Adds to each task of `plan` the constraint of every limit it needs (see [`needed`]).
pub fn require(plan: &mut JobPlan) {
    for task in &mut plan.tasks {
        for limit in needed(task) {
            task.constraints.insert(limit.label(), ENFORCED.to_owned());
        }
    }
}

/// Why a task with `constraints` cannot go to any of the nodes, whose labels are given: the
/// first constraint none of them satisfies, in words; `None` when one node satisfies them all.
pub fn why_unplaceable<'a>(
    constraints: &std::collections::BTreeMap<String, String>,
    nodes: impl Iterator<Item = &'a std::collections::BTreeMap<String, String>> + Clone,
) -> Option<String> {
    if nodes.clone().any(|labels| crate::placement::matches_constraints(labels, constraints)) {
        return None;
    }
    let missing = constraints.iter().find(|(k, v)| !nodes.clone().any(|labels| labels.get(*k) == Some(*v)));
    Some(match missing {
        Some((key, _)) if key.starts_with(LABEL_PREFIX) => {
            let limit = &key[LABEL_PREFIX.len()..];
            format!(
                "no ready node can enforce a {limit} limit on process tasks (its agent lacks the \
                 {limit} cgroup controller; `drover nodes` shows what each enforces)"
            )
        }
        Some((key, value)) => format!("no ready node has the label {key}={value}"),
        None => {
            let all: Vec<String> = constraints.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("no ready node has all of the labels {}", all.join(", "))
        }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::resources::Resources;

    fn task(runtime: RuntimeKind, memory: u64, pids: u32) -> TaskPlan {
        TaskPlan { runtime, resources: Resources { cores: 1, memory, pids }, ..TaskPlan::default() }
    }

    #[test]
    fn only_process_tasks_need_their_limits_enforced_by_the_node() {
        assert_eq!(needed(&task(RuntimeKind::Process, 1 << 20, 10)), vec![Limit::Memory, Limit::Pids]);
        assert_eq!(needed(&task(RuntimeKind::Process, 0, 0)), vec![]);
        assert_eq!(needed(&task(RuntimeKind::Docker, 1 << 20, 10)), vec![]);
        let mut plan = JobPlan {
            name: "j".into(),
            project: "p".into(),
            priority: 0,
            labels: BTreeMap::new(),
            tasks: vec![task(RuntimeKind::Process, 0, 7)],
        };
        require(&mut plan);
        assert_eq!(plan.tasks[0].constraints.get("drover.enforces.pids").map(String::as_str), Some("yes"));
        assert!(!plan.tasks[0].constraints.contains_key("drover.enforces.memory"));
    }

    #[test]
    fn the_reason_names_the_limit_no_node_enforces() {
        let enforcing: BTreeMap<String, String> = [(Limit::Memory.label(), ENFORCED.to_owned())].into();
        let plain = BTreeMap::new();
        let wants: BTreeMap<String, String> =
            [(Limit::Pids.label(), ENFORCED.to_owned()), ("gpu".to_owned(), "a100".to_owned())].into();
        let reason = why_unplaceable(&wants, [&enforcing, &plain].into_iter()).expect("unplaceable");
        assert!(reason.contains("enforce a pids limit"), "{reason}");
        let memory: BTreeMap<String, String> = [(Limit::Memory.label(), ENFORCED.to_owned())].into();
        assert_eq!(why_unplaceable(&memory, [&plain, &enforcing].into_iter()), None);
        let gpu: BTreeMap<String, String> = [("gpu".to_owned(), "a100".to_owned())].into();
        assert_eq!(
            why_unplaceable(&gpu, [&plain].into_iter()).as_deref(),
            Some("no ready node has the label gpu=a100")
        );
    }
}
