//! The [`TenantStore`] contract, and what tenancy relies on in [`Store`]: settings, what
//! projects hold and store, queue reasons, placement leaving held projects out, price
//! versions stamped on attempts, metering, and the audit trail.

use std::collections::BTreeMap;
use std::time::Duration;

use drover_core::tenancy::{Budget, Metered, Period, PriceTable, ProjectSettings};
use drover_core::{Resources, RetryPolicy, TaskPlan, TaskState};

use super::{done, job, node, schedule, task};
use crate::*;

/// A node with room for everything these checks submit.
fn big_node(name: &str, cores: u32) -> NodeSpec {
    NodeSpec { memory: 1 << 40, ..node(name, cores, 1_000_000) }
}

/// A task reserving `cores` and `memory`.
fn sized(name: &str, cores: u32, memory: u64) -> TaskPlan {
    TaskPlan { resources: Resources { cores, memory, pids: 0 }, ..task(name, &[]) }
}

/// A job of `tasks` in `project`.
fn job_in(project: &str, tasks: Vec<TaskPlan>) -> JobPlan {
    JobPlan { project: project.into(), ..job(tasks) }
}

/// The reason of each task of a job, by name.
async fn reasons(store: &dyn Store, job_id: i64) -> Vec<(String, String)> {
    store.tasks(job_id).await.unwrap().into_iter().map(|t| (t.name, t.reason)).collect()
}

fn used(core_seconds: f64, gib_seconds: f64, input_tokens: u64, output_tokens: u64) -> Metered {
    Metered { core_seconds, gib_seconds, gpu_seconds: 0.0, input_tokens, output_tokens }
}

/// A project never configured has the default settings (the migration's `{}`); settings
/// round-trip; unknown projects have none and cannot be set.
pub async fn project_settings_round_trip<S: AccessStore + TenantStore>(store: &S) {
    assert_eq!(store.project_settings("default").await.unwrap(), Some(ProjectSettings::default()));
    assert_eq!(store.project_settings("nope").await.unwrap(), None);
    assert!(!store.set_project_settings("nope", &ProjectSettings::default()).await.unwrap());
    assert_eq!(store.project_settings("nope").await.unwrap(), None, "setting does not create");

    store.create_project("team", 1).await.unwrap();
    assert_eq!(store.project_settings("team").await.unwrap(), Some(ProjectSettings::default()));
    let mut settings = ProjectSettings::default();
    settings.set("quota.cores", "40").unwrap();
    settings.set("quota.memory", "64GiB").unwrap();
    settings.set("runtimes", "docker").unwrap();
    settings.budget = Some(Budget { amount: 12.5, period: Period::Week });
    assert!(store.set_project_settings("team", &settings).await.unwrap());
    assert_eq!(store.project_settings("team").await.unwrap(), Some(settings.clone()));
    assert!(store.set_project_settings("team", &settings).await.unwrap(), "setting the same again");
    let all = store.all_project_settings().await.unwrap();
    assert_eq!(
        all,
        BTreeMap::from([("default".into(), ProjectSettings::default()), ("team".into(), settings)])
    );
}

/// Holdings are the cores, memory and count of each project's assigned and running attempts.
pub async fn holdings_follow_attempts<S: Store + TenantStore>(store: &S) {
    assert!(store.holdings().await.unwrap().is_empty());
    let team = job_in("team", vec![sized("a", 2, 1 << 30), sized("b", 3, 1 << 20)]);
    store.submit(&team, "", "f", 1).await.unwrap();
    store.submit(&job_in("other", vec![sized("c", 1, 0)]), "", "f", 1).await.unwrap();
    store.register_node(&big_node("h1", 8), &[], 1).await.unwrap();
    let a = schedule(store, 2).await;
    assert_eq!(a.len(), 3);
    let of = |name: &str| a.iter().find(|x| x.plan.name == name).unwrap();
    assert_eq!(store.attempt_project(of("a").attempt_id).await.unwrap().as_deref(), Some("team"));
    assert_eq!(store.attempt_project(of("c").attempt_id).await.unwrap().as_deref(), Some("other"));
    assert_eq!(store.attempt_project(987_654).await.unwrap(), None);
    let held = store.holdings().await.unwrap();
    assert_eq!(
        held,
        BTreeMap::from([
            ("team".into(), Holding { cores: 5, memory: (1 << 30) + (1 << 20), tasks: 2 }),
            ("other".into(), Holding { cores: 1, memory: 0, tasks: 1 }),
        ])
    );
    store.attempt_started(of("a").attempt_id, of("a").epoch, 3).await.unwrap();
    store.attempt_finished(&done(of("b"), 0), 4).await.unwrap();
    store.attempt_finished(&done(of("c"), 0), 4).await.unwrap();
    let held = store.holdings().await.unwrap();
    assert_eq!(held, BTreeMap::from([("team".into(), Holding { cores: 2, memory: 1 << 30, tasks: 1 })]));
    store.attempt_finished(&done(of("a"), 0), 5).await.unwrap();
    assert!(store.holdings().await.unwrap().is_empty(), "projects holding nothing are absent");
}

/// A project stores the sizes of the blobs it holds, each once; a blob shared by two projects
/// counts for both.
pub async fn stored_bytes_count_each_projects_blobs<S: AccessStore + TenantStore>(store: &S) {
    assert_eq!(store.stored_bytes("team").await.unwrap(), 0);
    store.add_project_blob("team", "sha256:a", 10, 1).await.unwrap();
    store.add_project_blob("team", "sha256:a", 10, 2).await.unwrap();
    store.add_project_blob("team", "sha256:b", 5, 3).await.unwrap();
    store.add_project_blob("alpha", "sha256:a", 10, 4).await.unwrap();
    assert_eq!(store.stored_bytes("team").await.unwrap(), 15);
    assert_eq!(store.stored_bytes("alpha").await.unwrap(), 10);
    assert_eq!(store.stored_bytes("nope").await.unwrap(), 0);
}

/// Queue reasons land on queued tasks only, append no event, and clearing a project removes
/// only the reasons a hold set; assigning a task clears its reason.
pub async fn queue_reasons_mark_held_tasks<S: Store + TenantStore>(store: &S) {
    let plan = job_in("team", vec![task("a", &[]), task("b", &[]), task("c", &[])]);
    let team = store.submit(&plan, "", "f", 1).await.unwrap();
    let other = store.submit(&job_in("other", vec![task("d", &[])]), "", "f", 1).await.unwrap();
    store.register_node(&big_node("q1", 1), &[], 1).await.unwrap();
    let a = schedule(store, 2).await;
    assert_eq!(a.iter().map(|x| x.plan.name.as_str()).collect::<Vec<_>>(), ["a"]);
    let ids: BTreeMap<String, i64> =
        store.tasks(team).await.unwrap().into_iter().map(|t| (t.name, t.id)).collect();
    let last_seq = store.job(team).await.unwrap().unwrap().last_seq;

    let quota = "project quota: cores 1/1".to_string();
    store.set_queue_reasons(&[(ids["a"], quota.clone()), (ids["b"], quota.clone())]).await.unwrap();
    store.set_queue_reasons(&[(ids["b"], quota.clone())]).await.unwrap();
    let expect = |a: &str, b: &str, c: &str| -> Vec<(String, String)> {
        [("a", a), ("b", b), ("c", c)].iter().map(|(n, r)| (n.to_string(), r.to_string())).collect()
    };
    assert_eq!(reasons(store, team).await, expect("", &quota, ""), "an assigned task keeps no reason");
    assert_eq!(store.job(team).await.unwrap().unwrap().last_seq, last_seq, "a reason is not an event");

    let budget = "budget: 10.00 of 10.00 spent this month";
    store.set_project_queue_reason("team", budget).await.unwrap();
    assert_eq!(reasons(store, team).await, expect("", budget, budget));
    assert_eq!(reasons(store, other).await, [("d".to_string(), String::new())], "another project");

    store.set_queue_reasons(&[(ids["c"], "waiting for a GPU".into())]).await.unwrap();
    store.set_project_queue_reason("team", "").await.unwrap();
    assert_eq!(reasons(store, team).await, expect("", "", "waiting for a GPU"), "only holds are cleared");
    store.set_queue_reasons(&[(ids["b"], quota.clone())]).await.unwrap();
    store.set_project_queue_reason("team", "").await.unwrap();
    assert_eq!(reasons(store, team).await, expect("", "", "waiting for a GPU"));
    assert_eq!(store.job(team).await.unwrap().unwrap().last_seq, last_seq);

    // A held task that gets placed runs without its old reason.
    store.set_queue_reasons(&[(ids["b"], quota.clone())]).await.unwrap();
    store.attempt_finished(&done(&a[0], 0), 3).await.unwrap();
    let b = schedule(store, 4).await;
    assert_eq!(b.iter().map(|x| x.plan.name.as_str()).collect::<Vec<_>>(), ["b"]);
    let tasks = store.tasks(team).await.unwrap();
    assert_eq!((tasks[1].state, tasks[1].reason.as_str()), (TaskState::Assigned, ""));
}

/// A retry's reason is the settlement's, and a hold does not clear it.
pub async fn clearing_holds_keeps_retry_reasons<S: Store + TenantStore>(store: &S) {
    let mut t = task("a", &[]);
    t.retries = RetryPolicy { count: 1, backoff: Duration::from_secs(60), ..Default::default() };
    let id = store.submit(&job_in("team", vec![t]), "", "f", 1).await.unwrap();
    store.register_node(&big_node("r1", 1), &[], 1).await.unwrap();
    let a = schedule(store, 2).await;
    store.attempt_finished(&done(&a[0], 1), 3).await.unwrap();
    let retrying = store.tasks(id).await.unwrap()[0].reason.clone();
    assert!(!retrying.is_empty());
    store.set_project_queue_reason("team", "").await.unwrap();
    assert_eq!(store.tasks(id).await.unwrap()[0].reason, retrying);
}

/// Queued tasks carry their job's project, and a round leaves out held projects.
pub async fn placement_skips_held_projects(store: &dyn Store) {
    store.submit(&job_in("team", vec![task("a", &[]), task("b", &[])]), "", "f", 1).await.unwrap();
    store.submit(&job_in("other", vec![task("c", &[])]), "", "f", 1).await.unwrap();
    store.submit(&job_in("third", vec![task("d", &[])]), "", "f", 1).await.unwrap();
    store.register_node(&big_node("p1", 4), &[], 1).await.unwrap();
    let projects = |queue: Vec<drover_core::placement::QueuedTask>| {
        queue.into_iter().map(|t| t.project).collect::<Vec<_>>()
    };
    let (_, queue) = crate::conformance::snapshot(store, 2, &[]).await;
    assert_eq!(projects(queue), ["team", "team", "other", "third"]);
    let (_, queue) = crate::conformance::snapshot(store, 2, &["team".into(), "third".into()]).await;
    assert_eq!(projects(queue), ["other"]);
    let (_, queue) = crate::conformance::snapshot(store, 2, &["nope".into()]).await;
    assert_eq!(queue.len(), 4);
}

/// A price table gets a new version only when it changes; attempts carry the version in force
/// when they were assigned; before any table, version 0.
pub async fn prices_are_versioned<S: Store + TenantStore>(store: &S) {
    assert_eq!(store.record_prices(&PriceTable::default(), 1).await.unwrap(), 0, "free is version 0");
    assert!(store.price_versions().await.unwrap().is_empty());
    let id =
        store.submit(&job(vec![task("a", &[]), task("b", &[]), task("c", &[])]), "", "f", 1).await.unwrap();
    store.register_node(&big_node("v1", 1), &[], 1).await.unwrap();
    let first = schedule(store, 2).await;

    // A third does not survive a JSON round trip exactly without `float_roundtrip`.
    let one = PriceTable { core_hour: 1.0 / 3.0, gib_hour: 0.1, ..Default::default() };
    let two = PriceTable { core_hour: 0.5, input_tokens_1k: 0.003, ..Default::default() };
    assert_eq!(store.record_prices(&one, 10).await.unwrap(), 1);
    assert_eq!(store.record_prices(&one, 11).await.unwrap(), 1, "the same table again");
    store.attempt_finished(&done(&first[0], 0), 12).await.unwrap();
    let second = schedule(store, 13).await;
    assert_eq!(store.record_prices(&two, 20).await.unwrap(), 2);
    assert_eq!(store.record_prices(&two, 21).await.unwrap(), 2);
    assert_eq!(store.record_prices(&one, 22).await.unwrap(), 3, "going back is a change too");
    assert_eq!(store.record_prices(&PriceTable::default(), 23).await.unwrap(), 4, "free from now on");
    assert_eq!(store.record_prices(&PriceTable::default(), 24).await.unwrap(), 4);
    store.attempt_finished(&done(&second[0], 0), 25).await.unwrap();
    let third = schedule(store, 26).await;
    assert_eq!(
        store.price_versions().await.unwrap(),
        BTreeMap::from([(1, one), (2, two), (3, one), (4, PriceTable::default())])
    );

    let metered = store.metered(&UsageFilter { project: None, job_id: Some(id) }, 30).await.unwrap();
    assert_eq!(metered.len(), 1);
    let versions: Vec<(i64, Vec<i64>)> =
        metered[0].tasks.iter().map(|(task, by)| (*task, by.keys().copied().collect())).collect();
    let expected = [(first[0].task_id, vec![0]), (second[0].task_id, vec![1]), (third[0].task_id, vec![4])];
    assert_eq!(versions, expected);
}

/// Replicas recording the same table at once agree on one version.
pub async fn concurrent_price_records_agree<S: TenantStore + Clone>(store: &S) {
    let prices = PriceTable { core_hour: 0.25, ..Default::default() };
    let racers: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.record_prices(&prices, 5).await.unwrap() })
        })
        .collect();
    for r in racers {
        assert_eq!(r.await.unwrap(), 1);
    }
    assert_eq!(store.price_versions().await.unwrap().len(), 1);
}

/// Metering multiplies reserved cores and memory by the time from start to end (or to now),
/// adds tokens, per task and price version; `metered_since` sums per project the attempts
/// assigned since a time.
pub async fn metering_counts_reserved_time<S: Store + TenantStore>(store: &S) {
    let mut a = sized("a", 2, 2 << 30);
    a.retries = RetryPolicy { count: 1, backoff: Duration::ZERO, ..Default::default() };
    let team = store.submit(&job_in("team", vec![a, sized("b", 1, 512 << 20)]), "", "f", 1).await.unwrap();
    let idle = store.submit(&job_in("idle", vec![sized("w", 1, 0)]), "", "f", 1).await.unwrap();
    store.cancel_job(idle, 1).await.unwrap();
    store.record_prices(&PriceTable { core_hour: 1.0, ..Default::default() }, 1).await.unwrap();
    store.register_node(&big_node("m1", 8), &[], 1).await.unwrap();
    let first = schedule(store, 1_000).await;
    let of = |name: &str| first.iter().find(|x| x.plan.name == name).unwrap().clone();
    let (a1, b1) = (of("a"), of("b"));
    store.attempt_started(a1.attempt_id, a1.epoch, 2_000).await.unwrap();
    store.attempt_started(b1.attempt_id, b1.epoch, 3_000).await.unwrap();
    let a1_end = AttemptReport { input_tokens: 100, output_tokens: 20, ..done(&a1, 1) };
    store.attempt_finished(&a1_end, 12_000).await.unwrap();

    store.record_prices(&PriceTable { core_hour: 2.0, ..Default::default() }, 12_000).await.unwrap();
    let retry = schedule(store, 12_000).await;
    assert_eq!(retry.len(), 1);
    let a2 = &retry[0];
    store.attempt_started(a2.attempt_id, a2.epoch, 13_000).await.unwrap();
    let with_tokens = AttemptReport { input_tokens: 7, output_tokens: 3, ..done(a2, 0) };
    store.attempt_finished(&with_tokens, 15_000).await.unwrap();

    let now = 23_000;
    let all = store.metered(&UsageFilter::default(), now).await.unwrap();
    assert_eq!(
        all.iter().map(|j| (j.project.as_str(), j.job_id)).collect::<Vec<_>>(),
        [("idle", idle), ("team", team)]
    );
    assert!(all[0].tasks.is_empty(), "a job without attempts used nothing");
    let expected = BTreeMap::from([
        // 2 cores and 2 GiB for 10 s, then for 2 s under the next prices.
        (a1.task_id, BTreeMap::from([(1, used(20.0, 20.0, 100, 20)), (2, used(4.0, 4.0, 7, 3))])),
        // Still running: 1 core and 0.5 GiB from 3 s to now.
        (b1.task_id, BTreeMap::from([(1, used(20.0, 10.0, 0, 0))])),
    ]);
    assert_eq!(all[1], JobMetered { project: "team".into(), job_id: team, tasks: expected.clone() });
    let only = store.metered(&UsageFilter { project: Some("team".into()), job_id: None }, now).await.unwrap();
    assert_eq!(only, vec![all[1].clone()]);
    let one = store.metered(&UsageFilter { project: None, job_id: Some(idle) }, now).await.unwrap();
    assert_eq!(one, vec![all[0].clone()]);

    let since = store.metered_since(0, now).await.unwrap();
    let whole = BTreeMap::from([(1, used(40.0, 30.0, 100, 20)), (2, used(4.0, 4.0, 7, 3))]);
    assert_eq!(since, BTreeMap::from([("team".into(), whole)]));
    let since = store.metered_since(12_000, now).await.unwrap();
    assert_eq!(since, BTreeMap::from([("team".into(), BTreeMap::from([(2, used(4.0, 4.0, 7, 3))]))]));
    assert!(store.metered_since(12_001, now).await.unwrap().is_empty());
}

/// Audit records come back oldest first, filtered by project (cluster-wide ones only without
/// a project filter), time and id, and limited.
pub async fn audit_trail_filters<S: TenantStore>(store: &S) {
    let record = |time_ms: i64, project: Option<&str>, action: &str| AuditRecord {
        id: 0,
        time_ms,
        actor: "key k1".into(),
        address: "10.0.0.1:5000".into(),
        project: project.map(str::to_string),
        action: action.into(),
        target: "t".into(),
        detail: format!("at {time_ms}"),
    };
    let mut stored = Vec::new();
    for r in [
        record(1, None, "node.join"),
        record(2, Some("team"), "job.submit"),
        record(3, Some("other"), "secret.set"),
        record(4, Some("team"), "job.cancel"),
    ] {
        let id = store.append_audit(&r).await.unwrap();
        stored.push(AuditRecord { id, ..r });
    }
    assert!(stored.windows(2).all(|w| w[0].id < w[1].id), "ids increase");
    let read = |filter: AuditFilter| async move { store.audit(&filter).await.unwrap() };
    assert_eq!(read(AuditFilter::default()).await, stored);
    let team = AuditFilter { projects: Some(vec!["team".into()]), ..Default::default() };
    assert_eq!(read(team.clone()).await, [stored[1].clone(), stored[3].clone()]);
    let two = AuditFilter { projects: Some(vec!["team".into(), "other".into()]), ..Default::default() };
    assert_eq!(read(two).await, stored[1..]);
    assert!(read(AuditFilter { projects: Some(Vec::new()), ..Default::default() }).await.is_empty());
    assert_eq!(read(AuditFilter { since_ms: Some(3), ..Default::default() }).await, stored[2..]);
    assert_eq!(read(AuditFilter { after_id: stored[1].id, ..Default::default() }).await, stored[2..]);
    assert_eq!(read(AuditFilter { limit: 2, ..Default::default() }).await, stored[..2]);
    let page = AuditFilter { after_id: stored[1].id, limit: 1, ..team };
    assert_eq!(read(page).await, [stored[3].clone()]);
}
