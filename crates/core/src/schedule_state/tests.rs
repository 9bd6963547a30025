use super::*;

fn entry(id: i64, priority: i32, project: &str, cores: u32, not_before_ms: i64) -> QueueEntry {
    QueueEntry {
        task: QueuedTask {
            id,
            priority,
            resources: Resources { cores, memory: 0, pids: 0 },
            constraints: BTreeMap::new(),
            runtime: RuntimeKind::Process,
            image: None,
            project: project.into(),
        },
        not_before_ms,
    }
}

fn node(id: i64, cores: u32) -> NodeBook {
    NodeBook {
        id,
        labels: BTreeMap::new(),
        runtimes: vec![RuntimeKind::Process],
        capacity: Resources { cores, memory: 1 << 30, pids: 0 },
        attempts: BTreeMap::new(),
    }
}

fn ids(tasks: &[QueuedTask]) -> Vec<i64> {
    tasks.iter().map(|t| t.id).collect()
}

#[test]
fn candidates_come_by_priority_then_id_across_projects() {
    let mut state = ScheduleState::new();
    state.node_joined(node(1, 100));
    state.queued(entry(5, 0, "a", 1, 0));
    state.queued(entry(3, 0, "b", 1, 0));
    state.queued(entry(9, 7, "b", 1, 0));
    state.queued(entry(4, 0, "a", 1, 0));
    assert_eq!(ids(&state.candidates(0, &[], 10)), vec![9, 3, 4, 5]);
    // A held project is passed over; `max` bounds the walk.
    assert_eq!(ids(&state.candidates(0, &["b".into()], 10)), vec![4, 5]);
    assert_eq!(ids(&state.candidates(0, &[], 2)), vec![9, 3]);
}

#[test]
fn free_cores_count_every_node_minus_its_reservations() {
    let mut state = ScheduleState::new();
    state.node_joined(node(1, 2));
    state.node_joined(node(2, 6));
    state.reserve(2, 70, Resources { cores: 5, memory: 0, pids: 0 });
    assert_eq!(state.free_cores(false), 3);
    // Room ahead: one more node's worth each, less what is already beyond capacity.
    assert_eq!(state.free_cores(true), 4 + 7);
    state.reserve(1, 71, Resources { cores: 3, memory: 0, pids: 0 });
    assert_eq!(state.free_cores(true), 1 + 7);
    let views = state.node_views(true);
    assert_eq!((views[0].free.cores, views[0].ahead.cores), (0, 1));
    assert_eq!((views[1].free.cores, views[1].ahead.cores), (1, 6));
    assert_eq!(state.node_views(false)[1].ahead, Resources::NONE);
}

#[test]
fn a_backoff_keeps_a_task_back_until_its_time() {
    let mut state = ScheduleState::new();
    state.node_joined(node(1, 8));
    state.queued(entry(1, 0, "p", 1, 1_000));
    state.queued(entry(2, 0, "p", 1, 0));
    assert_eq!(ids(&state.candidates(999, &[], 10)), vec![2]);
    assert_eq!(ids(&state.candidates(1_000, &[], 10)), vec![1, 2]);
    // Promotion does not change what is kept.
    assert_eq!(state.queue_snapshot()[&1].not_before_ms, 1_000);
}

#[test]
fn queueing_again_replaces_and_leaving_removes() {
    let mut state = ScheduleState::new();
    state.queued(entry(1, 0, "p", 1, 0));
    state.queued(entry(1, 5, "q", 2, 50));
    assert_eq!(state.queue_len(), 1);
    assert_eq!(state.queue_snapshot()[&1], entry(1, 5, "q", 2, 50));
    state.left_queue(1);
    state.left_queue(1);
    assert_eq!(state, ScheduleState::new());
}

#[test]
fn reservations_are_released_once_and_go_with_their_node() {
    let mut state = ScheduleState::new();
    state.node_joined(node(1, 4));
    let two = Resources { cores: 2, memory: 0, pids: 0 };
    state.reserve(1, 10, two);
    state.reserve(1, 11, two);
    state.reserve(2, 12, two); // not kept: ignored
    assert_eq!(state.node_views(false)[0].free.cores, 0);
    state.release(10);
    state.release(10);
    assert_eq!(state.node_views(false)[0].free.cores, 2);
    state.node_left(1);
    state.release(11);
    assert!(state.node_views(false).is_empty());
    assert_eq!(state, ScheduleState::new());
}
