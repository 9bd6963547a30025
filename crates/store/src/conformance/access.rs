//! The [`AccessStore`] contract, and what identities rely on in [`Store`]: projects, keys,
//! single-use join tokens, node credentials and their revocation, blob ownership, and epochs
//! unique across nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use drover_core::{FailureClass, NodeState, RetryPolicy, Role, TaskState};

use super::{done, job, node, schedule, task};
use crate::*;

fn key(id: &str, project: Option<&str>, role: Role, created_ms: i64) -> KeyRecord {
    KeyRecord {
        id: id.into(),
        secret_sha256: format!("hash of {id}").into_bytes(),
        project: project.map(str::to_string),
        role,
        name: format!("key {id}"),
        created_ms,
        expires_ms: None,
        revoked_ms: None,
        created_by: "op".into(),
    }
}

fn token(id: &str, expires_ms: i64) -> JoinTokenRecord {
    JoinTokenRecord {
        id: id.into(),
        secret_sha256: vec![0, 1, 2, 255],
        labels: BTreeMap::from([("zone".to_string(), "a".to_string())]),
        created_ms: 1,
        expires_ms,
        used_ms: None,
        used_by: None,
        created_by: "op".into(),
    }
}

fn credential(id: &str, node_name: &str) -> NodeCredentialRecord {
    NodeCredentialRecord {
        id: id.into(),
        secret_sha256: vec![9, 8, 7],
        node_name: node_name.into(),
        labels: BTreeMap::from([("zone".to_string(), "a".to_string())]),
        created_ms: 10,
        revoked_ms: None,
    }
}

/// `default` exists from the start; creating a project is idempotent; projects list by name.
pub async fn projects_exist_once<S: AccessStore>(store: &S) {
    let default = ProjectRecord { name: "default".into(), created_ms: 0 };
    assert_eq!(store.projects().await.unwrap(), vec![default.clone()]);
    assert!(store.create_project("team", 5).await.unwrap());
    assert!(!store.create_project("team", 6).await.unwrap(), "created twice");
    assert!(!store.create_project("default", 7).await.unwrap());
    assert!(store.create_project("alpha", 8).await.unwrap());
    assert_eq!(
        store.projects().await.unwrap(),
        vec![
            ProjectRecord { name: "alpha".into(), created_ms: 8 },
            default,
            ProjectRecord { name: "team".into(), created_ms: 5 },
        ]
    );
}

/// Keys are stored as given, listed per project (or all) oldest first, and revoked once.
pub async fn api_keys_are_kept_and_revoked<S: AccessStore>(store: &S) {
    let op = key("op", None, Role::Operator, 1);
    let viewer = KeyRecord { expires_ms: Some(100), ..key("v1", Some("team"), Role::Viewer, 2) };
    let admin = key("a1", Some("team"), Role::Admin, 3);
    let other = key("o1", Some("other"), Role::Submitter, 4);
    for k in [&admin, &other, &op, &viewer] {
        store.create_key(k).await.unwrap();
    }
    assert_eq!(store.key("v1").await.unwrap(), Some(viewer.clone()), "expired keys are returned too");
    assert_eq!(store.key("op").await.unwrap(), Some(op.clone()));
    assert_eq!(store.key("nope").await.unwrap(), None);
    assert_eq!(store.keys(Some("team")).await.unwrap(), vec![viewer.clone(), admin.clone()]);
    assert!(store.keys(Some("empty")).await.unwrap().is_empty());
    let all: Vec<String> = store.keys(None).await.unwrap().into_iter().map(|k| k.id).collect();
    assert_eq!(all, ["op", "v1", "a1", "o1"]);
    assert!(matches!(store.create_key(&admin).await, Err(StoreError::Database(_))), "ids are unique");

    assert!(store.revoke_key("a1", 10).await.unwrap());
    assert!(!store.revoke_key("a1", 11).await.unwrap(), "revoked twice");
    assert!(!store.revoke_key("nope", 11).await.unwrap());
    assert_eq!(store.key("a1").await.unwrap().unwrap().revoked_ms, Some(10));
    assert_eq!(store.keys(Some("team")).await.unwrap().len(), 2, "revoked keys are listed");
}

/// A join token enrols one node once; unknown, used and expired tokens and a name already
/// held change nothing; revoking the holder frees the name.
pub async fn join_tokens_enrol_one_node<S: Store + AccessStore>(store: &S) {
    for t in [token("t1", 1000), token("t2", 1000), token("t3", 50)] {
        store.create_join_token(&t).await.unwrap();
    }
    assert_eq!(store.join_token("t1").await.unwrap(), Some(token("t1", 1000)));
    assert_eq!(store.join_token("nope").await.unwrap(), None);

    let redeem = |t: &'static str, c: NodeCredentialRecord, now: i64| async move {
        store.redeem_join_token(t, &c, now).await.unwrap()
    };
    assert_eq!(redeem("nope", credential("c0", "n-a"), 10).await, Redeemed::Unknown);
    assert_eq!(redeem("t3", credential("c0", "n-a"), 50).await, Redeemed::Expired, "expires at 50");
    assert_eq!(store.node_credential("c0").await.unwrap(), None);
    assert_eq!(store.join_token("t3").await.unwrap().unwrap().used_ms, None);

    assert_eq!(redeem("t1", credential("c1", "n-a"), 10).await, Redeemed::Enrolled);
    assert_eq!(store.node_credential("c1").await.unwrap(), Some(credential("c1", "n-a")));
    let spent = store.join_token("t1").await.unwrap().unwrap();
    assert_eq!((spent.used_ms, spent.used_by.as_deref()), (Some(10), Some("n-a")));

    assert_eq!(redeem("t1", credential("c2", "n-b"), 11).await, Redeemed::AlreadyUsed);
    assert_eq!(store.node_credential("c2").await.unwrap(), None);

    assert_eq!(redeem("t2", credential("c3", "n-a"), 12).await, Redeemed::NameTaken);
    assert_eq!(store.node_credential("c3").await.unwrap(), None);
    assert_eq!(store.join_token("t2").await.unwrap().unwrap().used_ms, None, "the token stays unused");

    let revoked = store.revoke_node("n-a", 20).await.unwrap();
    assert_eq!(revoked, Some(RevokedNode { node_id: None, credentials: 1, lost: Vec::new() }));
    assert_eq!(store.node_credential("c1").await.unwrap().unwrap().revoked_ms, Some(20));
    assert_eq!(redeem("t2", credential("c3", "n-a"), 21).await, Redeemed::Enrolled, "the name is free again");
    assert_eq!(store.node_credential("c3").await.unwrap().unwrap().revoked_ms, None);
}

/// Two redemptions of one token at once: exactly one enrols. Two tokens enrolling one name
/// at once: exactly one enrols, and the other token stays unused.
pub async fn concurrent_redemptions_enrol_once<S: AccessStore + Clone>(store: &S) {
    let race = |token_id: String, cred: NodeCredentialRecord| {
        let store = store.clone();
        tokio::spawn(async move { store.redeem_join_token(&token_id, &cred, 10).await.unwrap() })
    };
    for i in 0..8 {
        let t = format!("race-{i}");
        store.create_join_token(&token(&t, 1000)).await.unwrap();
        let a = race(t.clone(), credential(&format!("ca-{i}"), &format!("racer-a-{i}")));
        let b = race(t.clone(), credential(&format!("cb-{i}"), &format!("racer-b-{i}")));
        let mut outcomes = vec![a.await.unwrap(), b.await.unwrap()];
        outcomes.sort_by_key(|r| *r != Redeemed::Enrolled);
        assert_eq!(outcomes, [Redeemed::Enrolled, Redeemed::AlreadyUsed], "round {i}");
        let a = store.node_credential(&format!("ca-{i}")).await.unwrap();
        let b = store.node_credential(&format!("cb-{i}")).await.unwrap();
        assert!(a.is_some() != b.is_some(), "round {i}: exactly one credential");
        let used_by = store.join_token(&t).await.unwrap().unwrap().used_by.unwrap();
        assert_eq!(used_by, a.or(b).unwrap().node_name);
    }
    for i in 0..8 {
        let (t, u) = (format!("name-{i}-t"), format!("name-{i}-u"));
        store.create_join_token(&token(&t, 1000)).await.unwrap();
        store.create_join_token(&token(&u, 1000)).await.unwrap();
        let name = format!("contested-{i}");
        let a = race(t.clone(), credential(&format!("ct-{i}"), &name));
        let b = race(u.clone(), credential(&format!("cu-{i}"), &name));
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        let mut outcomes = vec![a, b];
        outcomes.sort_by_key(|r| *r != Redeemed::Enrolled);
        assert_eq!(outcomes, [Redeemed::Enrolled, Redeemed::NameTaken], "round {i}");
        let loser = if a == Redeemed::Enrolled { &u } else { &t };
        assert_eq!(store.join_token(loser).await.unwrap().unwrap().used_ms, None, "round {i}");
    }
}

/// Revoking a node revokes its credentials, marks it down and settles its open attempts as
/// lost by each task's retry policy; its session is over and late reports are stale.
pub async fn revoking_a_node_settles_its_attempts<S: Store + AccessStore>(store: &S) {
    let mut retried = task("retried", &[]);
    retried.retries = RetryPolicy { count: 1, backoff: Duration::ZERO, ..Default::default() };
    let id = store.submit(&job(vec![retried, task("once", &[])]), "", "f", 1).await.unwrap();
    store.create_join_token(&token("rt", 1000)).await.unwrap();
    assert_eq!(store.redeem_join_token("rt", &credential("rc", "rv1"), 1).await.unwrap(), Redeemed::Enrolled);
    let n = store.register_node(&node("rv1", 2, 100_000), &[], 1).await.unwrap();
    let a = schedule(store, 2).await;
    assert_eq!(a.len(), 2);
    store.attempt_started(a[0].attempt_id, a[0].epoch, 3).await.unwrap();

    let r = store.revoke_node("rv1", 5).await.unwrap().unwrap();
    let mut open: Vec<i64> = a.iter().map(|x| x.attempt_id).collect();
    open.sort_unstable();
    assert_eq!(r, RevokedNode { node_id: Some(n.node_id), credentials: 1, lost: open });
    assert_eq!(store.node_credential("rc").await.unwrap().unwrap().revoked_ms, Some(5));
    let down = store.nodes().await.unwrap().into_iter().find(|x| x.id == n.node_id).unwrap();
    assert_eq!((down.state, down.running), (NodeState::Down, 0));
    assert!(
        !store.renew_lease(n.node_id, n.epoch, 200_000, 6).await.unwrap(),
        "a revoked node's session ends"
    );
    for x in &a {
        assert_eq!(store.attempt_finished(&done(x, 0), 7).await.unwrap(), Applied::Stale);
    }
    let tasks = store.tasks(id).await.unwrap();
    let by_name = |name: &str| tasks.iter().find(|t| t.name == name).unwrap();
    let (retried, once) = (by_name("retried"), by_name("once"));
    assert_eq!((retried.state, retried.attempts), (TaskState::Queued, 1), "retried by its policy");
    assert_eq!((once.state, once.failure), (TaskState::Failed, Some(FailureClass::Lost)));
    assert!(once.reason.contains("node rv1 was revoked by an operator"), "{}", once.reason);

    let again = store.revoke_node("rv1", 8).await.unwrap();
    assert_eq!(again, Some(RevokedNode { node_id: Some(n.node_id), credentials: 0, lost: Vec::new() }));
    assert_eq!(store.node_credential("rc").await.unwrap().unwrap().revoked_ms, Some(5), "revoked once");
    assert_eq!(store.revoke_node("ghost", 8).await.unwrap(), None);
    let plain = store.register_node(&node("plain", 1, 100_000), &[], 9).await.unwrap();
    let r = store.revoke_node("plain", 10).await.unwrap();
    assert_eq!(r, Some(RevokedNode { node_id: Some(plain.node_id), credentials: 0, lost: Vec::new() }));
}

/// Uploads, artifacts and log archives make a project hold a blob; a node may read a blob
/// only while it runs an open attempt of a project that holds it.
pub async fn blobs_belong_to_projects<S: Store + AccessStore + ArtifactStore>(store: &S) {
    store.add_project_blob("team", "sha256:up", 10, 1).await.unwrap();
    store.add_project_blob("team", "sha256:up", 10, 2).await.unwrap();
    store.add_project_blob("alpha", "sha256:up", 10, 3).await.unwrap();
    store.add_project_blob("alpha", "sha256:alpha-only", 1, 3).await.unwrap();
    assert_eq!(store.blob_projects("sha256:up").await.unwrap(), ["alpha", "team"]);
    assert!(store.blob_projects("sha256:none").await.unwrap().is_empty());

    let mut plan = job(vec![task("a", &[]), task("b", &[])]);
    plan.project = "team".into();
    store.submit(&plan, "", "f", 1).await.unwrap();
    let runner = store.register_node(&node("blob-runner", 2, 100_000), &[], 1).await.unwrap();
    let a = schedule(store, 2).await;
    assert_eq!(a.len(), 2);
    let idle = store.register_node(&node("blob-idle", 2, 100_000), &[], 3).await.unwrap();

    let out = |path: &str| OutputFile { path: path.into(), size: 5, digest: "sha256:out".into() };
    let files = [out("out.txt"), out("copy.txt")];
    assert_eq!(store.record_outputs(a[0].attempt_id, a[0].epoch, &files, 4).await.unwrap(), Applied::Applied);
    assert_eq!(store.record_outputs(a[1].attempt_id, a[1].epoch, &files, 4).await.unwrap(), Applied::Applied);
    assert_eq!(store.blob_projects("sha256:out").await.unwrap(), ["team"]);

    let may = |node_id: i64, digest: &'static str| async move {
        store.node_may_read_blob(node_id, digest).await.unwrap()
    };
    assert!(may(runner.node_id, "sha256:out").await);
    assert!(may(runner.node_id, "sha256:up").await, "an upload of the project");
    assert!(!may(runner.node_id, "sha256:alpha-only").await, "another project's blob");
    assert!(!may(runner.node_id, "sha256:none").await);
    assert!(!may(idle.node_id, "sha256:up").await, "a node running nothing of the project");

    store.attempt_finished(&done(&a[0], 0), 5).await.unwrap();
    assert!(may(runner.node_id, "sha256:up").await, "one attempt is still open");
    store.attempt_finished(&done(&a[1], 0), 6).await.unwrap();
    assert!(!may(runner.node_id, "sha256:up").await, "every attempt ended");

    let late = [OutputFile { path: "late".into(), size: 1, digest: "sha256:late".into() }];
    assert_eq!(store.record_outputs(a[0].attempt_id, a[0].epoch, &late, 7).await.unwrap(), Applied::Stale);
    assert!(store.blob_projects("sha256:late").await.unwrap().is_empty());

    store.record_log_archive(a[0].attempt_id, "sha256:log", 7, 8).await.unwrap();
    assert_eq!(store.blob_projects("sha256:log").await.unwrap(), ["team"]);
    // Expired and unused, the archive's blob is unreferenced; the project holds it until blob
    // collection deletes it (see `retention_collects_only_unreferenced_blobs`).
    assert_eq!(store.expire_log_archives(100, 9, 10).await.unwrap(), ["sha256:log"]);
    assert_eq!(store.blob_projects("sha256:log").await.unwrap(), ["team"]);
}

/// No two registrations of any nodes share an epoch, so an attempt's (id, epoch) names one
/// node session; registering again gives a fresh epoch.
pub async fn epochs_are_unique_across_nodes(store: &dyn Store) {
    let mut seen = BTreeSet::new();
    let mut last = 0;
    for name in ["e1", "e2", "e1", "e3", "e2", "e2"] {
        let reg = store.register_node(&node(name, 1, 100_000), &[], 1).await.unwrap();
        assert!(seen.insert(reg.epoch), "epoch {} handed out twice", reg.epoch);
        assert!(reg.epoch > last, "epochs grow");
        last = reg.epoch;
    }
    let nodes = store.nodes().await.unwrap();
    assert_eq!(nodes.len(), 3);
}

/// Rows an older server left (jobs of two projects, a secret of a third, an artifact, an
/// archived log, a node at epoch 7), in SQL both dialects run, for [`upgraded_store_keeps_working`].
pub const LEGACY_ROWS: &str = "
INSERT INTO jobs (id, name, project, priority, labels, source, filename, state, has_deps, created_ms) VALUES
    (1, 'old', 'default', 0, '{}', '', 'f', 'succeeded', FALSE, 100),
    (2, 'old', 'legacy', 0, '{}', '', 'f', 'succeeded', FALSE, 200),
    (3, 'older', 'legacy', 0, '{}', '', 'f', 'succeeded', FALSE, 150);
INSERT INTO tasks (id, job_id, name, plan, priority, cores, memory, constraints, runtime, state)
    VALUES (1, 2, 'a', '{}', 0, 1, 0, '{}', 'process', 'succeeded');
INSERT INTO nodes (id, name, state, labels, cores, memory, runtimes, epoch, lease_until_ms, last_seen_ms)
    VALUES (1, 'old-node', 'down', '{}', 1, 0, '[]', 7, 0, 0);
INSERT INTO attempts (id, task_id, job_id, number, node_id, epoch, state, cores, memory, assigned_ms,
                      log_digest, log_size, log_archived_ms)
    VALUES (1, 1, 2, 1, 1, 7, 'ended', 1, 0, 200, 'sha256:oldlog', 3, 300);
INSERT INTO artifacts (job_id, task_id, attempt_id, attempt, path, size, digest, created_ms)
    VALUES (2, 1, 1, 1, 'out', 4, 'sha256:oldout', 250);
INSERT INTO secrets (project, name, value, updated_ms) VALUES ('vault', 'KEY', 'value', 1);
";

/// A store migrated from a database holding [`LEGACY_ROWS`] knows every project its jobs and
/// secrets name (with default settings), which projects hold the old artifacts and logs,
/// meters old attempts under price version 0, and hands out epochs above the old ones.
pub async fn upgraded_store_keeps_working<S: Store + AccessStore + TenantStore>(store: &S) {
    let projects: Vec<(String, i64)> =
        store.projects().await.unwrap().into_iter().map(|p| (p.name, p.created_ms)).collect();
    let expected = [("default", 0), ("legacy", 150), ("vault", 0)];
    assert_eq!(projects, expected.map(|(n, t)| (n.to_string(), t)));
    assert_eq!(store.blob_projects("sha256:oldout").await.unwrap(), ["legacy"]);
    assert_eq!(store.blob_projects("sha256:oldlog").await.unwrap(), ["legacy"]);
    let settings = store.all_project_settings().await.unwrap();
    assert!(
        settings.values().all(|s| *s == drover_core::tenancy::ProjectSettings::default()),
        "{settings:?}"
    );
    let old = store.metered(&UsageFilter { project: None, job_id: Some(2) }, 1_000).await.unwrap();
    assert_eq!(old[0].tasks[&1].keys().copied().collect::<Vec<_>>(), [0]);
    let reg = store.register_node(&node("old-node", 1, 100_000), &[], 400).await.unwrap();
    assert_eq!((reg.node_id, reg.epoch), (1, 8));
}

/// Copies the migrations of `dialect` (`sqlite` or `postgres`) numbered below `version` into a
/// new directory `to`: the schema an older server left, to upgrade from.
pub fn copy_migrations_before(dialect: &str, version: i64, to: &std::path::Path) {
    std::fs::create_dir(to).unwrap();
    let from = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations").join(dialect);
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let number: i64 = name.split('_').next().unwrap().parse().unwrap();
        if number < version {
            std::fs::copy(&path, to.join(name)).unwrap();
        }
    }
}

/// `list_jobs` with a project filter lists only those projects' jobs; an empty filter lists
/// nothing.
pub async fn jobs_are_listed_by_project<S: Store>(store: &S) {
    let mut other = job(vec![task("t", &[])]);
    other.project = "other".into();
    let a = store.submit(&job(vec![task("t", &[])]), "", "f", 1).await.unwrap();
    let b = store.submit(&other, "", "f", 2).await.unwrap();
    let list = async |all: bool, projects: Option<&[String]>| {
        let page = store.list_jobs(all, projects, &PageRequest::first(10)).await.unwrap();
        page.items.into_iter().map(|j| j.id).collect::<Vec<_>>()
    };
    assert_eq!(list(true, None).await, vec![b, a]);
    assert_eq!(list(true, Some(&["default".to_string()])).await, vec![a]);
    let both = ["other".to_string(), "default".to_string()];
    assert_eq!(list(false, Some(&both)).await, vec![b, a]);
    assert!(list(true, Some(&[])).await.is_empty());
}

/// Of several servers starting together on one database, exactly one makes the first
/// operator key, and no second bootstrap key is ever made.
pub async fn one_first_operator_key<S: AccessStore + Clone>(store: &S) {
    let first = |id: &str| KeyRecord { created_by: "bootstrap".into(), ..key(id, None, Role::Operator, 1) };
    let racers: Vec<_> = (0..4)
        .map(|i| {
            let (store, key) = (store.clone(), first(&format!("boot-{i}")));
            tokio::spawn(async move { store.create_first_key(&key).await.unwrap() })
        })
        .collect();
    let mut made = 0;
    for r in racers {
        made += usize::from(r.await.unwrap());
    }
    assert_eq!(made, 1, "exactly one first key");
    assert!(!store.create_first_key(&first("later")).await.unwrap());
    assert_eq!(store.keys(None).await.unwrap().len(), 1);
    // Ordinary keys are not limited.
    store.create_key(&key("k2", None, Role::Operator, 2)).await.unwrap();
}
