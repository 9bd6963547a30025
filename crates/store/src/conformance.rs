//! The store contract as executable checks. Every backend runs all of them (see the
//! `store_conformance!` macro), so SQLite and PostgreSQL behave the same.

use std::collections::BTreeMap;
use std::time::Duration;

use drover_core::placement::{Placement, place};
use drover_core::{
    Command, ExitCodes, FailureClass, JobPlan, JobState, Resources, RetryPolicy, TaskPlan, TaskState,
};

use crate::*;

mod access;
mod pages;
mod queue_feed;
mod retention;
mod tenancy;
pub use access::*;
pub use pages::*;
pub use queue_feed::*;
pub use retention::*;
pub use tenancy::*;

/// A one-step task with no dependencies.
pub fn task(name: &str, deps: &[&str]) -> TaskPlan {
    TaskPlan {
        name: name.into(),
        frame: None,
        steps: vec![Command::Shell("true".into())],
        env: BTreeMap::new(),
        resources: Resources { cores: 1, memory: 0, pids: 0 },
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

/// A process node of `cores` cores and 1 GiB whose lease runs until `lease_until_ms`.
pub fn node(name: &str, cores: u32, lease_until_ms: i64) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        labels: BTreeMap::new(),
        cores,
        memory: 1 << 30,
        runtimes: vec!["process".into()],
        lease_until_ms,
    }
}

/// The report that `attempt` exited with `code`.
pub fn done(attempt: &Assignment, code: i32) -> AttemptReport {
    AttemptReport {
        attempt_id: attempt.attempt_id,
        epoch: attempt.epoch,
        exit_code: Some(code),
        signal: None,
        failure: None,
        message: String::new(),
        cpu_seconds: 0.5,
        peak_memory: 1 << 20,
        input_tokens: 0,
        output_tokens: 0,
    }
}

/// Places and assigns whatever fits right now.
pub async fn schedule(store: &dyn Store, now: i64) -> Vec<Assignment> {
    let (nodes, queue) = snapshot(store, now, &[]).await;
    store.assign(&place(&nodes, &queue), now).await.unwrap()
}

/// What a scheduler serving every ready node would place from now, read whole from the store:
/// the ready nodes with what they have free, and the queued tasks whose backoff has passed,
/// best first, leaving out the projects in `held`.
pub async fn snapshot(
    store: &dyn Store,
    now: i64,
    held: &[String],
) -> (Vec<drover_core::placement::NodeView>, Vec<drover_core::placement::QueuedTask>) {
    let mut state = drover_core::schedule_state::ScheduleState::new();
    for entry in store.queue_changes(None).await.unwrap().queued {
        state.queued(entry);
    }
    let ready: Vec<i64> = store
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .filter(|n| n.state == drover_core::NodeState::Ready)
        .map(|n| n.id)
        .collect();
    for book in store.node_books(&ready).await.unwrap() {
        state.node_joined(book);
    }
    let queue = state.candidates(now, held, usize::MAX);
    (state.node_views(false), queue)
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
    assert!(store.cancelled_attempts_on(a[0].node_id).await.unwrap().is_empty());
    let open = store.cancel_job(id, 3).await.unwrap();
    assert_eq!(open, vec![OpenAttempt { attempt_id: a[0].attempt_id, node_id: a[0].node_id }]);
    assert_eq!(store.job(id).await.unwrap().unwrap().state, JobState::Running);
    // The cancel is kept for a node that was away when it was sent.
    assert_eq!(store.cancelled_attempts_on(a[0].node_id).await.unwrap(), vec![a[0].attempt_id]);
    let mut r = done(&a[0], 143);
    r.failure = Some(FailureClass::Cancelled);
    store.attempt_finished(&r, 4).await.unwrap();
    assert_eq!(store.job(id).await.unwrap().unwrap().state, JobState::Cancelled);
    assert!(
        store.cancelled_attempts_on(a[0].node_id).await.unwrap().is_empty(),
        "an ended attempt is done with"
    );
    assert!(matches!(store.cancel_job(999_999, 5).await, Err(StoreError::NotFound { .. })));
}

/// A job and its tasks are read at one moment: while a cancel ends every task and the job in
/// one commit, no view shows a job's state that disagrees with its tasks'.
pub async fn a_job_and_its_tasks_are_read_at_one_moment(store: &dyn Store) {
    let tasks = (0..200).map(|i| task(&format!("t{i}"), &[])).collect();
    let id = store.submit(&job(tasks), "", "f", 1).await.unwrap();
    let (job, tasks) = store.job_with_tasks(id).await.unwrap().unwrap();
    assert_eq!(job, store.job(id).await.unwrap().unwrap());
    assert_eq!(tasks, store.tasks(id).await.unwrap());
    assert!(store.job_with_tasks(999_999).await.unwrap().is_none());
    let reader = async {
        let mut views = 0;
        loop {
            let (job, tasks) = store.job_with_tasks(id).await.unwrap().unwrap();
            views += 1;
            let ended = tasks.iter().filter(|t| t.state.is_final()).count();
            assert!(ended == 0 || ended == tasks.len(), "half a commit: {ended} of {} ended", tasks.len());
            assert_eq!(
                job.state.is_final(),
                ended == tasks.len(),
                "job {:?} over {ended} ended tasks",
                job.state
            );
            if job.state.is_final() {
                return views;
            }
            tokio::task::yield_now().await;
        }
    };
    let cancel = async {
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        store.cancel_job(id, 2).await.unwrap()
    };
    let (views, open) = tokio::join!(reader, cancel);
    assert!(open.is_empty());
    assert!(views >= 1);
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
    assert!(again.epoch > n.epoch, "a registration starts a new epoch");
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

/// An attempt's plan is told again only to its own node while the attempt is open.
pub async fn open_attempts_tell_their_plan_to_their_node_only(store: &dyn Store) {
    store.submit(&job(vec![task("a", &[]), task("b", &[])]), "", "f", 1).await.unwrap();
    store.register_node(&node("keyed", 2, 100_000), &[], 1).await.unwrap();
    let a = schedule(store, 2).await;
    assert_eq!(a.len(), 2);
    let (project, plan) = store.open_attempt_plan(a[0].attempt_id, "keyed").await.unwrap().expect("open");
    assert_eq!((project.as_str(), plan.name.as_str()), ("default", a[0].plan.name.as_str()));
    assert!(store.open_attempt_plan(a[0].attempt_id, "elsewhere").await.unwrap().is_none(), "another node");
    assert!(store.open_attempt_plan(i64::MAX, "keyed").await.unwrap().is_none(), "no such attempt");
    store.attempt_finished(&done(&a[0], 0), 3).await.unwrap();
    assert!(store.open_attempt_plan(a[0].attempt_id, "keyed").await.unwrap().is_none(), "ended");
    assert!(store.open_attempt_plan(a[1].attempt_id, "keyed").await.unwrap().is_some());
}

/// Archiving an ended attempt's log replaces its live rows; only ended attempts are archived,
/// each once; expiring an archive reports its blob as unused unless something else uses it.
pub async fn log_archives_replace_live_lines<S: Store + ArtifactStore>(store: &S) {
    let id = store.submit(&job(vec![task("a", &[]), task("b", &[])]), "", "f", 1).await.unwrap();
    store.register_node(&node("n9", 2, 100_000), &[], 1).await.unwrap();
    let a = schedule(store, 2).await;
    assert_eq!(a.len(), 2);
    for (i, x) in a.iter().enumerate() {
        let line = OutputLine { step: 0, stderr: i == 1, data: format!("line {i}\n").into_bytes() };
        store.append_output(x.attempt_id, x.epoch, &[line]).await.unwrap();
    }
    let live = store.live_attempts(id, &TaskFilter::default()).await.unwrap();
    assert_eq!(live.len(), 2);
    let only_a = TaskFilter { name: Some(a[0].plan.name.clone()), frame: None };
    let live_a = store.live_attempts(id, &only_a).await.unwrap();
    assert_eq!((live_a.len(), live_a[0].attempt_id, live_a[0].node_id), (1, a[0].attempt_id, a[0].node_id));

    store.attempt_finished(&done(&a[0], 0), 3).await.unwrap();
    let pending = store.unarchived_attempts(100).await.unwrap();
    assert_eq!(pending.iter().map(|p| p.attempt_id).collect::<Vec<_>>(), vec![a[0].attempt_id]);
    assert_eq!((pending[0].job_id, pending[0].task_id), (id, a[0].task_id));
    let lines = store.attempt_log(a[0].attempt_id, 0, 100).await.unwrap();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0].data, b"line 0\n");
    assert!(store.attempt_log(a[0].attempt_id, lines[0].id, 100).await.unwrap().is_empty());

    // An attempt still running is never archived.
    store.record_log_archive(a[1].attempt_id, "sha256:running", 1, 4).await.unwrap();
    assert!(store.log_archives(id, &TaskFilter::default()).await.unwrap().is_empty());

    store.record_log_archive(a[0].attempt_id, "sha256:one", 42, 5).await.unwrap();
    store.record_log_archive(a[0].attempt_id, "sha256:two", 43, 6).await.unwrap();
    let archives = store.log_archives(id, &TaskFilter::default()).await.unwrap();
    assert_eq!(archives.len(), 1);
    let arch = &archives[0];
    assert_eq!((arch.attempt_id, arch.task_id, arch.attempt), (a[0].attempt_id, a[0].task_id, 1));
    assert_eq!((arch.digest.as_str(), arch.size, arch.archived_ms), ("sha256:one", 42, 5));
    assert!(store.unarchived_attempts(100).await.unwrap().is_empty());
    let remaining = store.logs_after(id, &TaskFilter::default(), 0, 100).await.unwrap();
    assert_eq!(remaining.len(), 1, "only the running attempt's line is live");
    assert_eq!(remaining[0].data, b"line 1\n");

    // The second attempt's log happens to be the same blob,.
    store.attempt_finished(&done(&a[1], 0), 7).await.unwrap();
    store.record_log_archive(a[1].attempt_id, "sha256:one", 42, 8).await.unwrap();
    assert!(store.expire_log_archives(5, 9, 100).await.unwrap().is_empty(), "nothing is older than 5");
    assert!(store.expire_log_archives(6, 9, 100).await.unwrap().is_empty(), "the blob is still used");
    assert_eq!(store.log_archives(id, &TaskFilter::default()).await.unwrap().len(), 1);
    assert_eq!(store.expire_log_archives(100, 9, 100).await.unwrap(), vec!["sha256:one".to_string()]);
    assert!(store.log_archives(id, &TaskFilter::default()).await.unwrap().is_empty());
    assert!(store.unarchived_attempts(100).await.unwrap().is_empty(), "expired is not unarchived");
}

/// An output report sent again (its acknowledgement was lost, or the agent restarted) is
/// stored once; one numbered past it is stored; an unnumbered one always is.
pub async fn resent_output_is_stored_once<S: Store + ArchiveStore>(store: &S) {
    store.submit(&job(vec![task("a", &[])]), "", "f", 1).await.unwrap();
    store.register_node(&node("n1", 2, 100_000), &[], 1).await.unwrap();
    let a = schedule(store, 2).await;
    let chunk = |text: &str| {
        vec![OutputChunk {
            step: 0,
            stderr: false,
            lens: vec![text.len() as u32],
            data: text.as_bytes().to_vec(),
        }]
    };
    let (attempt, epoch) = (a[0].attempt_id, a[0].epoch);
    for (seq, text) in [
        (Some(4), "four\n"),
        (Some(4), "four\n"),
        (Some(3), "three\n"),
        (Some(7), "seven\n"),
        (None, "plain\n"),
        (Some(0), "zero\n"),
    ] {
        assert_eq!(
            store.append_chunks(attempt, epoch, seq, &chunk(text)).await.unwrap(),
            Applied::Applied,
            "{seq:?}"
        );
    }
    let lines: Vec<Vec<u8>> =
        store.attempt_log(attempt, 0, 100).await.unwrap().into_iter().map(|l| l.data).collect();
    assert_eq!(lines, vec![b"four\n".to_vec(), b"seven\n".to_vec(), b"plain\n".to_vec(), b"zero\n".to_vec()]);
    // A stale epoch stores nothing, numbered or not.
    assert_eq!(
        store.append_chunks(attempt, epoch + 100, Some(9), &chunk("late\n")).await.unwrap(),
        Applied::Stale
    );
    assert!(store.append_chunks(attempt, epoch, Some(u64::MAX), &chunk("huge\n")).await.is_err());
}

/// Tokens recorded with an attempt's end, and its compute, sum up per job; filters by
/// project and job; a stale epoch records nothing.
pub async fn usage_sums_tokens_and_compute(store: &dyn Store) {
    let mut t = task("a", &[]);
    t.retries = RetryPolicy { count: 1, backoff: Duration::ZERO, ..Default::default() };
    let first = store.submit(&job(vec![t, task("b", &[])]), "", "f", 1).await.unwrap();
    let mut other = job(vec![task("c", &[])]);
    other.project = "team".into();
    let second = store.submit(&other, "", "f", 1).await.unwrap();
    store.register_node(&node("n9", 8, 100_000), &[], 1).await.unwrap();
    let a = schedule(store, 2).await;
    assert_eq!(a.len(), 3);
    for x in &a {
        store.attempt_started(x.attempt_id, x.epoch, 1_000).await.unwrap();
    }
    let by_name = |name: &str| a.iter().find(|x| x.plan.name == name).unwrap();
    let (ta, tb) = (by_name("a"), by_name("b"));
    let tokens = |x: &Assignment, code: i32, input: u64, output: u64| AttemptReport {
        input_tokens: input,
        output_tokens: output,
        ..done(x, code)
    };
    let stale = AttemptReport { epoch: ta.epoch + 1, ..tokens(ta, 1, 5, 5) };
    assert_eq!(store.attempt_finished(&stale, 2_000).await.unwrap(), Applied::Stale);
    assert_eq!(store.attempt_finished(&tokens(ta, 1, 100, 20), 3_000).await.unwrap(), Applied::Applied);
    assert_eq!(store.attempt_finished(&tokens(ta, 1, 9, 9), 3_000).await.unwrap(), Applied::Stale, "ended");
    let retry = schedule(store, 3_000).await;
    assert_eq!(retry.len(), 1);
    store.attempt_started(retry[0].attempt_id, retry[0].epoch, 3_000).await.unwrap();
    store.attempt_finished(&tokens(&retry[0], 0, 7, 3), 3_500).await.unwrap();
    // In a batch of updates too, in the same transaction.
    store.apply_updates(&[AttemptUpdate::Finished(tokens(tb, 0, 30, 6))], 1_500).await.unwrap();

    let all = store.usage(&UsageFilter::default()).await.unwrap();
    assert_eq!(
        all.iter().map(|u| (u.project.as_str(), u.job_id)).collect::<Vec<_>>(),
        vec![("default", first), ("team", second)]
    );
    let u = &all[0];
    assert_eq!((u.tasks, u.attempts, u.input_tokens, u.output_tokens), (2, 3, 137, 29));
    assert!((u.cpu_seconds - 1.5).abs() < 1e-9, "{}", u.cpu_seconds);
    assert!((u.wall_seconds - 3.0).abs() < 1e-9, "{}", u.wall_seconds);
    let c = &all[1];
    assert_eq!((c.tasks, c.attempts, c.input_tokens, c.output_tokens), (1, 1, 0, 0));
    assert_eq!(c.wall_seconds, 0.0, "a running attempt adds no wall time yet");
    let team = store.usage(&UsageFilter { project: Some("team".into()), job_id: None }).await.unwrap();
    assert_eq!(team.iter().map(|u| u.job_id).collect::<Vec<_>>(), vec![second]);
    let one = store.usage(&UsageFilter { project: None, job_id: Some(first) }).await.unwrap();
    assert_eq!(one, vec![all[0].clone()]);
}

/// A batch of updates commits as one, but each update is fenced on its own: a repeated, stale
/// or unknown one inside the batch is `Stale` and changes nothing, and the others apply.
pub async fn batched_updates_are_fenced_one_by_one(store: &dyn Store) {
    assert_eq!(store.apply_updates(&[], 1).await.unwrap(), Vec::<Applied>::new());
    let id =
        store.submit(&job(vec![task("a", &[]), task("b", &[]), task("c", &[])]), "", "f", 1).await.unwrap();
    let other = store.submit(&job(vec![task("d", &[])]), "", "f", 1).await.unwrap();
    store.register_node(&node("n9", 4, 100_000), &[], 1).await.unwrap();
    let assigned = schedule(store, 2).await;
    assert_eq!(assigned.len(), 4);
    let find = |name: &str| assigned.iter().find(|x| x.plan.name == name).cloned().unwrap();
    let (a, b, c, d) = (find("a"), find("b"), find("c"), find("d"));
    let started = |x: &Assignment| AttemptUpdate::Started { attempt_id: x.attempt_id, epoch: x.epoch };
    let mut wrong_epoch = done(&c, 0);
    wrong_epoch.epoch += 1;
    let updates = vec![
        started(&a),
        started(&b),
        AttemptUpdate::Finished(done(&a, 0)),
        AttemptUpdate::Finished(done(&a, 0)),
        AttemptUpdate::Started { attempt_id: c.attempt_id, epoch: c.epoch + 1 },
        AttemptUpdate::Finished(wrong_epoch),
        AttemptUpdate::Finished(done(&d, 0)),
        AttemptUpdate::Started { attempt_id: 999_999, epoch: 1 },
        AttemptUpdate::Finished(done(&c, 0)),
    ];
    use Applied::{Applied as A, Stale as S};
    assert_eq!(store.apply_updates(&updates, 3).await.unwrap(), vec![A, A, A, S, S, S, A, S, A]);
    let tasks = store.tasks(id).await.unwrap();
    assert_eq!(
        tasks.iter().map(|t| (t.state, t.attempts)).collect::<Vec<_>>(),
        vec![(TaskState::Succeeded, 1), (TaskState::Running, 1), (TaskState::Succeeded, 1)]
    );
    assert_eq!(store.job(other).await.unwrap().unwrap().state, JobState::Succeeded);
    let events = store.events_after(id, 0, 100).await.unwrap();
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as i64).collect::<Vec<_>>());
    let ended_a = events.iter().filter(|e| e.task_name == "a" && e.state == "succeeded").count();
    assert_eq!(ended_a, 1, "a finish reported twice in one batch is recorded once");

    // The same batch again, as an agent re-sends its outbox to another server after a
    // failover: only the running attempt's repeated start is accepted, and nothing changes.
    let last_seq = store.job(id).await.unwrap().unwrap().last_seq;
    let again = store.apply_updates(&updates, 4).await.unwrap();
    assert_eq!(again, vec![S, A, S, S, S, S, S, S, S]);
    assert_eq!(store.job(id).await.unwrap().unwrap().last_seq, last_seq);
    assert_eq!(store.tasks(id).await.unwrap(), tasks);

    // Finishing the last task through a batch settles the job like a single report does.
    assert_eq!(store.apply_updates(&[AttemptUpdate::Finished(done(&b, 0))], 5).await.unwrap(), vec![A]);
    let j = store.job(id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Succeeded);
    assert_eq!(store.events_after(id, 0, 100).await.unwrap().last().map(|e| e.kind.as_str()), Some("job"));
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
    let (_, queue) = snapshot(store, 2, &[]).await;
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

/// A dependency on an array waits for every frame; a warning satisfies dependents; one failed
/// frame skips the dependents at once, and the skip cascades; fan-in waits for every name.
pub async fn array_dependencies_wait_for_every_frame(store: &dyn Store) {
    let frame = |name: &str, f: i64, deps: &[&str]| TaskPlan { frame: Some(f), ..task(name, deps) };
    let id = store
        .submit(
            &job(vec![
                frame("a", 0, &[]),
                frame("a", 1, &[]),
                task("x", &[]),
                task("b", &["a", "x"]),
                frame("f", 0, &[]),
                frame("f", 1, &[]),
                task("g", &["f"]),
                task("h", &["g", "b"]),
            ]),
            "",
            "f",
            1,
        )
        .await
        .unwrap();
    store.register_node(&node("n5", 8, 100_000), &[], 1).await.unwrap();
    let first = schedule(store, 2).await;
    assert_eq!(first.len(), 5, "a×2, x and f×2 have no dependencies");
    let of = |name: &str| first.iter().filter(|x| x.plan.name == name).cloned().collect::<Vec<_>>();
    store.attempt_finished(&done(&of("a")[0], 42), 3).await.unwrap();
    store.attempt_finished(&done(&of("x")[0], 0), 3).await.unwrap();
    assert!(schedule(store, 4).await.is_empty(), "b waits for the second frame of a");
    store.attempt_finished(&done(&of("a")[1], 0), 5).await.unwrap();
    let b = schedule(store, 6).await;
    assert_eq!(b.iter().map(|x| x.plan.name.as_str()).collect::<Vec<_>>(), ["b"], "a warning satisfies");
    store.attempt_finished(&done(&of("f")[0], 1), 7).await.unwrap();
    let by_name = |tasks: &[TaskRecord], name: &str| tasks.iter().find(|t| t.name == name).cloned().unwrap();
    let tasks = store.tasks(id).await.unwrap();
    assert_eq!(by_name(&tasks, "g").state, TaskState::Skipped, "one failed frame is enough");
    assert_eq!(by_name(&tasks, "h").state, TaskState::Skipped, "the skip cascades");
    assert!(by_name(&tasks, "h").reason.contains("`g` ended skipped"), "{}", by_name(&tasks, "h").reason);
    store.attempt_finished(&done(&of("f")[1], 0), 8).await.unwrap();
    store.attempt_finished(&done(&b[0], 0), 9).await.unwrap();
    assert!(schedule(store, 10).await.is_empty(), "h stays skipped");
    let tasks = store.tasks(id).await.unwrap();
    assert!(tasks.iter().all(|t| t.state.is_final()), "{tasks:?}");
    assert_eq!(store.job(id).await.unwrap().unwrap().state, JobState::Failed);
}

/// A long dependency chain runs to its end, one task at a time: each finish releases exactly
/// the next task, at a cost that does not grow with the chain (it was quadratic when every
/// finish read the whole job). Each step assigns the one queued task directly rather than
/// through a placement round, which other checks cover. Not in [`store_conformance!`]: each
/// backend runs it with a length it can afford in a test.
pub async fn long_chain_runs_to_the_end(store: &dyn Store, n: usize) {
    let tasks: Vec<TaskPlan> = (0..n)
        .map(|i| if i == 0 { task("c0", &[]) } else { task(&format!("c{i}"), &[&format!("c{}", i - 1)]) })
        .collect();
    let id = store.submit(&job(tasks), "", "f", 1).await.unwrap();
    let reg = store.register_node(&node("n6", 4, i64::MAX), &[], 1).await.unwrap();
    let ids: Vec<i64> = store.tasks(id).await.unwrap().iter().map(|t| t.id).collect();
    for (i, task_id) in ids.iter().enumerate() {
        let a = store
            .assign(&[Placement { task_id: *task_id, node_id: reg.node_id, ahead: false }], 2)
            .await
            .unwrap();
        assert_eq!(a.len(), 1, "step {i}: the task was released by the one before");
        if i + 1 < n && i % 1000 == 0 {
            let next = Placement { task_id: ids[i + 1], node_id: reg.node_id, ahead: false };
            assert!(store.assign(&[next], 2).await.unwrap().is_empty(), "step {i}: the next one waits");
        }
        let end = [
            AttemptUpdate::Started { attempt_id: a[0].attempt_id, epoch: a[0].epoch },
            AttemptUpdate::Finished(done(&a[0], 0)),
        ];
        assert_eq!(store.apply_updates(&end, 3).await.unwrap(), vec![Applied::Applied; 2]);
    }
    assert_eq!(store.job(id).await.unwrap().unwrap().state, JobState::Succeeded);
}

/// Every task of a large array runs exactly once: one attempt each, one `succeeded` event each.
/// Not in [`store_conformance!`]: each backend runs it with a size it can afford in a test.
pub async fn large_job_records_every_task_once(store: &dyn Store, n: usize) {
    let tasks: Vec<TaskPlan> =
        (0..n).map(|i| TaskPlan { frame: Some(i as i64), ..task("sweep", &[]) }).collect();
    let id = store.submit(&job(tasks), "", "f", 1).await.unwrap();
    store.register_node(&node("n7", 1_000, i64::MAX), &[], 1).await.unwrap();
    let mut ran = 0;
    loop {
        let batch = schedule(store, 2).await;
        if batch.is_empty() {
            break;
        }
        ran += batch.len();
        let updates: Vec<AttemptUpdate> = batch
            .iter()
            .flat_map(|a| {
                [
                    AttemptUpdate::Started { attempt_id: a.attempt_id, epoch: a.epoch },
                    AttemptUpdate::Finished(done(a, 0)),
                ]
            })
            .collect();
        let applied = store.apply_updates(&updates, 3).await.unwrap();
        assert!(applied.iter().all(|a| *a == Applied::Applied));
    }
    assert_eq!(ran, n);
    let tasks = store.tasks(id).await.unwrap();
    assert_eq!(tasks.len(), n);
    assert!(tasks.iter().all(|t| t.state == TaskState::Succeeded && t.attempts == 1));
    let mut succeeded = 0;
    let mut after = 0;
    loop {
        let events = store.events_after(id, after, 10_000).await.unwrap();
        let Some(last) = events.last() else { break };
        after = last.seq;
        succeeded += events.iter().filter(|e| e.kind == "task" && e.state == "succeeded").count();
    }
    assert_eq!(succeeded, n);
    assert_eq!(store.job(id).await.unwrap().unwrap().state, JobState::Succeeded);
}

/// Assigning re-checks that each placement still fits: a plan made from a stale snapshot
/// cannot over-commit a node.
pub async fn assign_rechecks_fit(store: &dyn Store) {
    store.submit(&job(vec![task("a", &[]), task("b", &[]), task("c", &[])]), "", "f", 1).await.unwrap();
    let reg = store.register_node(&node("n8", 2, 100_000), &[], 1).await.unwrap();
    let (_, queue) = snapshot(store, 2, &[]).await;
    let plan: Vec<Placement> =
        queue.iter().map(|t| Placement { task_id: t.id, node_id: reg.node_id, ahead: false }).collect();
    assert_eq!(plan.len(), 3);
    assert_eq!(store.assign(&plan, 2).await.unwrap().len(), 2, "two cores, two tasks");
    assert!(store.assign(&plan, 3).await.unwrap().is_empty(), "nothing is placed twice or beyond room");
}

/// A placement ahead may wait on a full node, up to one more node's worth of what it offers,
/// and no further.
pub async fn assign_ahead_waits_up_to_one_node_beyond_capacity(store: &dyn Store) {
    let names = ["a", "b", "c", "d", "e"];
    store.submit(&job(names.iter().map(|n| task(n, &[])).collect()), "", "f", 1).await.unwrap();
    let reg = store.register_node(&node("n8a", 2, 100_000), &[], 1).await.unwrap();
    let (_, queue) = snapshot(store, 2, &[]).await;
    let at = |ahead| -> Vec<Placement> {
        queue.iter().map(|t| Placement { task_id: t.id, node_id: reg.node_id, ahead }).collect()
    };
    assert_eq!(store.assign(&at(false), 2).await.unwrap().len(), 2, "two cores, two tasks");
    let ahead = store.assign(&at(true), 3).await.unwrap();
    assert_eq!(ahead.len(), 2, "two more wait ahead on a two-core node");
    assert!(store.assign(&at(true), 4).await.unwrap().is_empty(), "not beyond twice the capacity");
    // Once one attempt ends, one more may wait.
    store.attempt_finished(&done(&ahead[0], 0), 5).await.unwrap();
    assert_eq!(store.assign(&at(true), 6).await.unwrap().len(), 1);
    assert!(store.assign(&at(false), 7).await.unwrap().is_empty(), "the node has no free room");
}

/// Secrets are per project: a second set replaces the value, values are read only by name, and
/// a delete removes a secret once.
pub async fn secrets_are_per_project<S: Store + SecretStore>(store: &S) {
    assert!(store.set_secret("p", "TOKEN", "one", 1).await.unwrap());
    assert!(!store.set_secret("p", "TOKEN", "two", 2).await.unwrap());
    store.set_secret("q", "OTHER", "x", 3).await.unwrap();
    assert_eq!(store.secret_names("p").await.unwrap(), vec!["TOKEN".to_string()]);
    let values = store.secret_values("p", &["TOKEN".into(), "OTHER".into()]).await.unwrap();
    assert_eq!(values.len(), 1, "another project's secret is not found by name");
    assert_eq!(values["TOKEN"], "two");
    assert!(store.delete_secret("p", "TOKEN").await.unwrap());
    assert!(!store.delete_secret("p", "TOKEN").await.unwrap());
    assert!(store.secret_names("p").await.unwrap().is_empty());
}

/// Outputs are recorded only for an open attempt (fenced like every report) and listed per
/// job, filtered by task.
pub async fn outputs_are_fenced_and_listed<S: Store + ArtifactStore>(store: &S) {
    let id = store.submit(&job(vec![task("a", &[]), task("b", &[])]), "", "f", 1).await.unwrap();
    store.register_node(&node("n10", 2, 100_000), &[], 1).await.unwrap();
    let assigned = schedule(store, 2).await;
    let a = assigned.iter().find(|x| x.plan.name == "a").cloned().unwrap();
    let file = OutputFile { path: "out/frame.png".into(), size: 3, digest: "sha256:aa".into() };
    let files = std::slice::from_ref(&file);
    assert_eq!(store.record_outputs(a.attempt_id, a.epoch + 1, files, 3).await.unwrap(), Applied::Stale);
    assert_eq!(store.record_outputs(a.attempt_id, a.epoch, files, 3).await.unwrap(), Applied::Applied);
    store.attempt_finished(&done(&a, 0), 4).await.unwrap();
    assert_eq!(store.record_outputs(a.attempt_id, a.epoch, files, 5).await.unwrap(), Applied::Stale, "ended");
    let kept = store.artifacts(id, &TaskFilter::default()).await.unwrap();
    assert_eq!(kept.len(), 1);
    let k = &kept[0];
    assert_eq!(
        (k.task_name.as_str(), k.path.as_str(), k.size, k.digest.as_str()),
        ("a", "out/frame.png", 3, "sha256:aa")
    );
    assert_eq!(k.attempt, 1);
    let of_b = TaskFilter { name: Some("b".into()), frame: None };
    assert!(store.artifacts(id, &of_b).await.unwrap().is_empty());
}

/// A published signal reaches this store's own subscribers; a lone server leads singleton loops.
pub async fn signals_reach_subscribers(store: &dyn Store) {
    let mut rx = store.subscribe();
    store.publish(Signal::Changed { job_id: 7 }).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(Signal::Changed { job_id: 7 })) => break,
            Ok(Ok(_)) => continue,
            other => panic!("the signal did not arrive: {other:?}"),
        }
    }
    let lead = store.try_lead("conformance").await.unwrap();
    assert!(lead.is_some_and(|l| l.is_held()), "nobody else leads");
}

/// Instantiates every conformance check as a `#[tokio::test]` for a backend. `$make` is an
/// async expression producing a fresh, empty store (a value whose `Deref` is a `Store`).
#[macro_export]
macro_rules! store_conformance {
    ($make:expr) => {
        $crate::store_conformance!(@tests $make;
            jobs_page_newest_first, page_requests_are_checked, nodes_and_projects_page_by_name,
            keys_secrets_and_audit_page, artifacts_page_by_task_and_path);
        $crate::store_conformance!(@tests $make;
            job_runs_to_success, stale_reports_are_rejected, retries_back_off_then_fail,
            dependencies_gate_and_skip, cancel_stops_everything, a_job_and_its_tasks_are_read_at_one_moment, expired_node_loses_its_tasks,
            reregistration_adopts_known_attempts, open_attempts_tell_their_plan_to_their_node_only, log_archives_replace_live_lines, resent_output_is_stored_once, usage_sums_tokens_and_compute,
            batched_updates_are_fenced_one_by_one, queued_microvm_tasks_carry_their_image,
            array_dependencies_wait_for_every_frame,
            assign_rechecks_fit, assign_ahead_waits_up_to_one_node_beyond_capacity, secrets_are_per_project, outputs_are_fenced_and_listed, signals_reach_subscribers,
            queue_feed_mirrors_the_queue,
            projects_exist_once, api_keys_are_kept_and_revoked, join_tokens_enrol_one_node,
            concurrent_redemptions_enrol_once, revoking_a_node_settles_its_attempts, blobs_belong_to_projects,
            epochs_are_unique_across_nodes, jobs_are_listed_by_project, one_first_operator_key,
            project_settings_round_trip, holdings_follow_attempts, stored_bytes_count_each_projects_blobs,
            queue_reasons_mark_held_tasks, clearing_holds_keeps_retry_reasons, placement_skips_held_projects,
            prices_are_versioned, concurrent_price_records_agree, metering_counts_reserved_time,
            audit_trail_filters, retention_deletes_old_jobs_with_what_they_own,
            retention_collects_only_unreferenced_blobs);
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
