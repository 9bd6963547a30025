//! The store contract as executable checks. Every backend runs all of them (see the
//! `store_conformance!` macro), so SQLite and PostgreSQL behave the same.

use std::collections::BTreeMap;
use std::time::Duration;

use drover_core::placement::place;
use drover_core::{
    Command, ExitCodes, FailureClass, JobPlan, JobState, Resources, RetryPolicy, TaskPlan, TaskState,
};

use crate::*;

/// A one-step task with no dependencies.
pub fn task(name: &str, deps: &[&str]) -> TaskPlan {
    TaskPlan {
        name: name.into(),
        frame: None,
        steps: vec![Command::Shell("true".into())],
        env: BTreeMap::new(),
        resources: Resources { cores: 1, memory: 0 },
        timeout: None,
        retries: RetryPolicy::default(),
        depends_on: deps.iter().map(|s| s.to_string()).collect(),
        exit_codes: ExitCodes::default(),
        constraints: BTreeMap::new(),
        ..TaskPlan::default()
    }
}

/// A job of the given tasks.
pub fn job(tasks: Vec<TaskPlan>) -> JobPlan {
    JobPlan { name: "test".into(), project: "default".into(), priority: 0, labels: BTreeMap::new(), tasks }
}

fn node(name: &str, cores: u32, lease_until_ms: i64) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        labels: BTreeMap::new(),
        cores,
        memory: 1 << 30,
        runtimes: vec!["process".into()],
        lease_until_ms,
    }
}

fn done(attempt: &Assignment, code: i32) -> AttemptReport {
    AttemptReport {
        attempt_id: attempt.attempt_id,
        epoch: attempt.epoch,
        exit_code: Some(code),
        signal: None,
        failure: None,
        message: String::new(),
        cpu_seconds: 0.5,
        peak_memory: 1 << 20,
    }
}

/// Places and assigns whatever fits right now.
pub async fn schedule(store: &dyn Store, now: i64) -> Vec<Assignment> {
    let (nodes, queue) = store.placement_snapshot(now, 1000).await.unwrap();
    store.assign(&place(&nodes, &queue), now).await.unwrap()
}

async fn states(store: &dyn Store, job_id: i64) -> Vec<(String, TaskState)> {
    store.tasks(job_id).await.unwrap().into_iter().map(|t| (t.name, t.state)).collect()
}

/// A job runs to success; events are numbered 1, 2, 3 ... and end with the job's final state.
pub async fn job_runs_to_success(store: &dyn Store) {
    let id = store.submit(&job(vec![task("a", &[])]), "src", "f.yaml", 1).await.unwrap();
    store.register_node(&node("n1", 2, 10_000), &[], 1).await.unwrap();
    let a = schedule(store, 2).await;
    assert_eq!(a.len(), 1);
    assert_eq!(store.attempt_started(a[0].attempt_id, a[0].epoch, 3).await.unwrap(), Applied::Applied);
    store
        .append_output(
            a[0].attempt_id,
            a[0].epoch,
            &[OutputLine { step: 0, stderr: false, data: b"hi\n".to_vec() }],
        )
        .await
        .unwrap();
    assert_eq!(store.attempt_finished(&done(&a[0], 0), 4).await.unwrap(), Applied::Applied);
    let j = store.job(id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Succeeded);
    let t = &store.tasks(id).await.unwrap()[0];
    assert_eq!((t.state, t.exit_code, t.attempts), (TaskState::Succeeded, Some(0), 1));
    assert_eq!(t.node.as_deref(), Some("n1"));
    let events = store.events_after(id, 0, 100).await.unwrap();
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as i64).collect::<Vec<_>>());
    assert_eq!(events.last().map(|e| e.state.as_str()), Some("succeeded"));
    assert_eq!(store.events_after(id, j.last_seq, 100).await.unwrap().len(), 0);
    let logs = store.logs_after(id, &TaskFilter::default(), 0, 10).await.unwrap();
    assert_eq!(logs.len(), 1);
    assert_eq!(logs[0].data, b"hi\n");
}

/// Reports with a stale fencing token change nothing.
pub async fn stale_reports_are_rejected(store: &dyn Store) {
    store.submit(&job(vec![task("a", &[])]), "", "f", 1).await.unwrap();
    store.register_node(&node("n2", 1, 10_000), &[], 1).await.unwrap();
    let a = schedule(store, 2).await;
    let mut stale = done(&a[0], 0);
    stale.epoch += 1;
    assert_eq!(store.attempt_finished(&stale, 3).await.unwrap(), Applied::Stale);
    assert_eq!(store.attempt_finished(&done(&a[0], 0), 3).await.unwrap(), Applied::Applied);
    assert_eq!(store.attempt_finished(&done(&a[0], 0), 4).await.unwrap(), Applied::Stale, "reported twice");
}

/// A failing task is retried after its backoff, then fails for good.
pub async fn retries_back_off_then_fail(store: &dyn Store) {
    let mut t = task("a", &[]);
    t.retries = RetryPolicy { count: 1, backoff: Duration::from_millis(1000), ..Default::default() };
    let id = store.submit(&job(vec![t]), "", "f", 1).await.unwrap();
    store.register_node(&node("n3", 1, 100_000), &[], 1).await.unwrap();
    let a = schedule(store, 2).await;
    store.attempt_finished(&done(&a[0], 3), 10).await.unwrap();
    assert_eq!(states(store, id).await[0].1, TaskState::Queued);
    assert!(schedule(store, 500).await.is_empty(), "retried before its backoff");
    let b = schedule(store, 1100).await;
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].number, 2);
    store.attempt_finished(&done(&b[0], 3), 1200).await.unwrap();
    let t = &store.tasks(id).await.unwrap()[0];
    assert_eq!((t.state, t.attempts, t.failure), (TaskState::Failed, 2, Some(FailureClass::Exit)));
    assert!(t.reason.contains("no retries left"), "{}", t.reason);
}

/// Dependents wait, then run; a failed dependency skips them with a reason.
pub async fn dependencies_gate_and_skip(store: &dyn Store) {
    let id = store
        .submit(&job(vec![task("a", &[]), task("b", &["a"]), task("c", &["b"])]), "", "f", 1)
        .await
        .unwrap();
    assert_eq!(
        states(store, id).await.iter().map(|s| s.1).collect::<Vec<_>>(),
        vec![TaskState::Queued, TaskState::Waiting, TaskState::Waiting]
    );
    store.register_node(&node("n4", 4, 100_000), &[], 1).await.unwrap();
    let a = schedule(store, 2).await;
    assert_eq!(a.len(), 1, "only the task without dependencies runs");
    store.attempt_finished(&done(&a[0], 0), 3).await.unwrap();
    let b = schedule(store, 4).await;
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].plan.name, "b");
    store.attempt_finished(&done(&b[0], 1), 5).await.unwrap();
    let tasks = store.tasks(id).await.unwrap();
    assert_eq!(tasks[2].state, TaskState::Skipped);
    assert!(tasks[2].reason.contains("`b` ended failed"), "{}", tasks[2].reason);
    assert_eq!(store.job(id).await.unwrap().unwrap().state, JobState::Failed);
}

/// Cancel ends queued tasks at once and returns the attempts to stop.
pub async fn cancel_stops_everything(store: &dyn Store) {
    let id = store.submit(&job(vec![task("a", &[]), task("b", &[])]), "", "f", 1).await.unwrap();
    store.register_node(&node("n5", 1, 100_000), &[], 1).await.unwrap();
    let a = schedule(store, 2).await;
    let open = store.cancel_job(id, 3).await.unwrap();
    assert_eq!(open, vec![OpenAttempt { attempt_id: a[0].attempt_id, node_id: a[0].node_id }]);
    assert_eq!(store.job(id).await.unwrap().unwrap().state, JobState::Running);
    let mut r = done(&a[0], 143);
    r.failure = Some(FailureClass::Cancelled);
    store.attempt_finished(&r, 4).await.unwrap();
    assert_eq!(store.job(id).await.unwrap().unwrap().state, JobState::Cancelled);
    assert!(matches!(store.cancel_job(999_999, 5).await, Err(StoreError::NotFound { .. })));
}

/// A node silent past its lease is marked down; its task is retried on another node.
pub async fn expired_node_loses_its_tasks(store: &dyn Store) {
    let mut t = task("a", &[]);
    t.retries = RetryPolicy { count: 1, backoff: Duration::ZERO, ..Default::default() };
    let id = store.submit(&job(vec![t]), "", "f", 1).await.unwrap();
    let n = store.register_node(&node("n6", 1, 100), &[], 1).await.unwrap();
    let a = schedule(store, 2).await;
    assert_eq!(a[0].node_id, n.node_id);
    assert_eq!(store.expire_nodes(50).await.unwrap(), Vec::<i64>::new());
    assert!(store.expire_nodes(200).await.unwrap().contains(&n.node_id));
    assert_eq!(states(store, id).await[0].1, TaskState::Queued);
    assert!(
        !store.renew_lease(n.node_id, n.epoch, 10_000, 200).await.unwrap(),
        "a down node must register again"
    );
    // The old attempt's late report is stale.
    assert_eq!(store.attempt_finished(&done(&a[0], 0), 210).await.unwrap(), Applied::Stale);
    store.register_node(&node("n7", 1, 100_000), &[], 220).await.unwrap();
    let b = schedule(store, 230).await;
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].number, 2);
}

/// A re-registering node keeps the attempts it lists; started ones it does not list are lost,
/// and ones it never received go back to the queue without spending a retry.
pub async fn reregistration_adopts_known_attempts(store: &dyn Store) {
    let id =
        store.submit(&job(vec![task("a", &[]), task("b", &[]), task("c", &[])]), "", "f", 1).await.unwrap();
    let n = store.register_node(&node("n8", 3, 100_000), &[], 1).await.unwrap();
    let a = schedule(store, 2).await;
    assert_eq!(a.len(), 3);
    store.attempt_started(a[0].attempt_id, a[0].epoch, 2).await.unwrap();
    store.attempt_started(a[1].attempt_id, a[1].epoch, 2).await.unwrap();
    let again = store.register_node(&node("n8", 3, 100_000), &[a[0].attempt_id], 3).await.unwrap();
    assert_eq!(again.node_id, n.node_id);
    assert_eq!(again.epoch, n.epoch + 1);
    let mut r = done(&a[0], 0);
    r.epoch = again.epoch;
    assert_eq!(store.attempt_finished(&r, 4).await.unwrap(), Applied::Applied);
    let tasks = store.tasks(id).await.unwrap();
    assert_eq!(tasks[0].state, TaskState::Succeeded);
    assert_eq!(tasks[1].state, TaskState::Failed, "a started attempt the agent forgot is lost");
    assert_eq!(tasks[1].failure, Some(FailureClass::Lost));
    assert_eq!((tasks[2].state, tasks[2].attempts), (TaskState::Queued, 0), "undelivered: queued again");
    let c = schedule(store, 5).await;
    assert_eq!((c.len(), c[0].number), (1, 1));
}

/// Queued microvm tasks carry their image, which placement matches against warm VMs; other
/// tasks carry none.
pub async fn queued_microvm_tasks_carry_their_image(store: &dyn Store) {
    let mut vm = task("vm", &[]);
    vm.runtime = drover_core::RuntimeKind::Microvm;
    vm.image = Some("sha256:abc".into());
    let mut boxed = task("boxed", &[]);
    boxed.runtime = drover_core::RuntimeKind::Docker;
    boxed.image = Some("sha256:def".into());
    store.submit(&job(vec![vm, boxed]), "src", "f.yaml", 1).await.unwrap();
    store.register_node(&node("n1", 2, 10_000), &[], 1).await.unwrap();
    let (_, queue) = store.placement_snapshot(2, 1000).await.unwrap();
    let mut images: Vec<_> = queue.iter().map(|t| (t.runtime, t.image.clone())).collect();
    images.sort();
    assert_eq!(
        images,
        [
            (drover_core::RuntimeKind::Docker, None),
            (drover_core::RuntimeKind::Microvm, Some("sha256:abc".into()))
        ]
    );
}

/// Instantiates every conformance check as a `#[tokio::test]` for a backend. `$make` is an
/// async expression producing a fresh, empty store (a value whose `Deref` is a `Store`).
#[macro_export]
macro_rules! store_conformance {
    ($make:expr) => {
        $crate::store_conformance!(@tests $make;
            job_runs_to_success, stale_reports_are_rejected, retries_back_off_then_fail,
            dependencies_gate_and_skip, cancel_stops_everything, expired_node_loses_its_tasks,
            reregistration_adopts_known_attempts, queued_microvm_tasks_carry_their_image);
    };
    (@tests $make:expr; $($name:ident),+) => {
        $(
            #[tokio::test]
            async fn $name() {
                let store = $make;
                $crate::conformance::$name(&*store).await;
            }
        )+
    };
}
