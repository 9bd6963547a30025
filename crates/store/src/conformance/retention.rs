//! The [`RetentionStore`] contract: which jobs retention deletes, what goes with them, and
//! which blobs garbage collection may delete.

use drover_core::{InputSource, InputSpec, JobPlan};

use super::{done, job, node, schedule, task};
use crate::*;

/// A one-task job of `project` whose task reads the uploaded blobs `inputs`.
fn job_reading(project: &str, inputs: &[&str]) -> JobPlan {
    let mut t = task("a", &[]);
    t.inputs = inputs
        .iter()
        .map(|d| InputSpec {
            source: InputSource::Blob { digest: d.to_string(), directory: false },
            to: d.trim_start_matches("sha256:").into(),
        })
        .collect();
    let mut plan = job(vec![t]);
    plan.project = project.into();
    plan
}

/// Runs the only queued task of `job_id` to success at `end_ms`, keeping the outputs `outputs`
/// and a line of output archived as `log`.
async fn run<S: Store + ArtifactStore>(store: &S, job_id: i64, at_ms: i64, outputs: &[&str], log: &str) {
    let assigned = schedule(store, at_ms).await;
    let a = assigned.iter().find(|a| a.job_id == job_id).expect("the job's task is placed");
    let line = OutputLine { step: 0, stderr: false, data: b"hello\n".to_vec() };
    store.append_output(a.attempt_id, a.epoch, &[line]).await.unwrap();
    let files: Vec<OutputFile> = outputs
        .iter()
        .enumerate()
        .map(|(i, d)| OutputFile { path: format!("out{i}"), size: 1, digest: d.to_string() })
        .collect();
    assert_eq!(store.record_outputs(a.attempt_id, a.epoch, &files, at_ms).await.unwrap(), Applied::Applied);
    store.attempt_started(a.attempt_id, a.epoch, at_ms).await.unwrap();
    let end = AttemptReport { input_tokens: 7, output_tokens: 3, ..done(a, 0) };
    store.attempt_finished(&end, at_ms + 1).await.unwrap();
    store.record_log_archive(a.attempt_id, log, 6, at_ms + 2).await.unwrap();
}

/// Asserts that two spends are the same, up to the rounding of sums taken in another order.
fn same_spend(
    got: &std::collections::BTreeMap<String, drover_core::tenancy::MeteredByVersion>,
    want: &std::collections::BTreeMap<String, drover_core::tenancy::MeteredByVersion>,
) {
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0);
    let keys = |m: &std::collections::BTreeMap<String, drover_core::tenancy::MeteredByVersion>| {
        m.iter().flat_map(|(p, v)| v.keys().map(move |k| (p.clone(), *k))).collect::<Vec<_>>()
    };
    assert_eq!(keys(got), keys(want), "the spend is kept: {got:?} against {want:?}");
    for (project, versions) in want {
        for (version, w) in versions {
            let g = got[project][version];
            assert!(
                close(g.core_seconds, w.core_seconds)
                    && close(g.gib_seconds, w.gib_seconds)
                    && g.input_tokens == w.input_tokens
                    && g.output_tokens == w.output_tokens,
                "the spend is kept: {g:?} against {w:?}"
            );
        }
    }
}

/// A job that ended before its project's cutoff is deleted with its tasks, attempts, events,
/// output, artifacts and log archives, while what its attempts used still counts towards its
/// project's budget; it reports the blobs it held the last reference to, not those another
/// job still points to. Jobs still running or not yet archived, newer jobs and
/// other projects' jobs stay.
pub async fn retention_deletes_old_jobs_with_what_they_own<
    S: Store + ArtifactStore + RetentionStore + TenantStore,
>(
    store: &S,
) {
    store.register_node(&node("keeper", 8, 1_000_000), &[], 1).await.unwrap();
    let old = store
        .submit(&job_reading("default", &["sha256:in-old", "sha256:in-both"]), "", "f", 1)
        .await
        .unwrap();
    run(store, old, 2, &["sha256:out-old", "sha256:out-both"], "sha256:log-old").await;
    let running = store.submit(&job_reading("default", &[]), "", "f", 1).await.unwrap();
    let live = schedule(store, 5).await;
    assert!(live.iter().any(|a| a.job_id == running), "the second job runs");
    let other = store.submit(&job_reading("keep", &[]), "", "f", 1).await.unwrap();
    run(store, other, 6, &[], "sha256:log-other").await;
    // Ended, but its log is not archived yet: kept until it is.
    let unarchived = store.submit(&job_reading("default", &[]), "", "f", 1).await.unwrap();
    let placed = schedule(store, 7).await;
    let u = placed.iter().find(|a| a.job_id == unarchived).expect("placed");
    store.attempt_finished(&done(u, 0), 8).await.unwrap();
    let newer = store.submit(&job_reading("default", &["sha256:in-both"]), "", "f", 1).await.unwrap();
    run(store, newer, 50, &["sha256:out-both"], "sha256:log-newer").await;

    assert_eq!(store.expired_jobs("default", 20, 100).await.unwrap(), [old], "ended before 20, not running");
    assert_eq!(store.expired_jobs("default", 100, 1).await.unwrap(), [old], "oldest end first, bounded");
    assert_eq!(
        store.expired_jobs("keep", 5, 100).await.unwrap(),
        Vec::<i64>::new(),
        "a later cutoff keeps it"
    );
    assert_eq!(store.expired_jobs("keep", 20, 100).await.unwrap(), [other]);

    let spent_before = store.metered_since(0, 100).await.unwrap();
    let default = spent_before["default"][&0];
    assert!(
        default.core_seconds > 0.0 && default.input_tokens >= 7,
        "the old job used something: {default:?}"
    );
    let old_filter = UsageFilter { job_id: Some(old), ..Default::default() };
    let old_usage = store.usage(&old_filter).await.unwrap().remove(0);
    let old_metered = store.metered(&old_filter, 100).await.unwrap().remove(0);
    assert!(store.retired_usage(None).await.unwrap().is_empty(), "nothing deleted yet");
    assert_eq!(store.delete_job(running, 60).await.unwrap(), None, "a running job is never deleted");
    assert_eq!(store.delete_job(unarchived, 60).await.unwrap(), None, "its log is not archived yet");
    assert!(store.job(running).await.unwrap().is_some());
    let unused = store.delete_job(old, 60).await.unwrap().expect("the old job ended");
    assert_eq!(unused, ["sha256:in-old", "sha256:log-old", "sha256:out-old"]);
    assert_eq!(store.delete_job(old, 61).await.unwrap(), None, "deleted once");

    assert!(store.job(old).await.unwrap().is_none());
    assert!(store.tasks(old).await.unwrap().is_empty());
    assert!(store.events_after(old, 0, 100).await.unwrap().is_empty());
    assert!(store.artifacts(old, &TaskFilter::default()).await.unwrap().is_empty());
    assert!(store.log_archives(old, &TaskFilter::default()).await.unwrap().is_empty());
    assert!(store.logs_after(old, &TaskFilter::default(), 0, 100).await.unwrap().is_empty());
    let usage = store.usage(&UsageFilter::default()).await.unwrap();
    assert!(usage.iter().all(|u| u.job_id != old), "its attempts are gone");
    // What they used still counts against the project's budget, from the day they ran on.
    same_spend(&store.metered_since(0, 100).await.unwrap(), &spent_before);
    // And in the project's usage totals.
    let retired = store.retired_usage(None).await.unwrap();
    assert_eq!(retired.len(), 1, "only the project that lost a job: {retired:?}");
    let r = &retired[0];
    assert_eq!(
        (r.project.as_str(), r.jobs, r.tasks, r.attempts, r.input_tokens, r.output_tokens),
        ("default", 1, 1, 1, 7, 3)
    );
    assert_eq!((r.cpu_seconds, r.wall_seconds), (old_usage.cpu_seconds, old_usage.wall_seconds));
    let mut old_spend = std::collections::BTreeMap::new();
    for by_version in old_metered.tasks.values() {
        for (version, used) in by_version {
            crate::tenancy::add_spend(&mut old_spend, "default".into(), *version, *used);
        }
    }
    same_spend(&[(r.project.clone(), r.spend.clone())].into(), &old_spend);
    assert_eq!(store.retired_usage(Some("default")).await.unwrap(), retired);
    assert!(store.retired_usage(Some("keep")).await.unwrap().is_empty());
    let today = store.metered_since(86_400_000, 86_400_100).await.unwrap();
    assert!(today.is_empty(), "nothing was assigned on the day after: {today:?}");

    for kept in ["sha256:in-both", "sha256:out-both", "sha256:log-newer", "sha256:log-other"] {
        assert!(store.blob_referenced(kept).await.unwrap(), "{kept} is still referenced");
    }
    for gone in &unused {
        assert!(!store.blob_referenced(gone).await.unwrap(), "{gone} lost its last reference");
    }
    assert_eq!(store.artifacts(newer, &TaskFilter::default()).await.unwrap().len(), 1);
    assert_eq!(
        store.expired_jobs("default", 1_000, 100).await.unwrap(),
        [newer],
        "neither running nor unarchived"
    );
    store.record_log_archive(u.attempt_id, "sha256:log-late", 6, 70).await.unwrap();
    assert_eq!(store.expired_jobs("default", 1_000, 100).await.unwrap(), [unarchived, newer]);
}

/// Garbage collection takes only blobs unreferenced for longer than its grace, checks them
/// again, and marks them as being deleted: a claim (a new upload) then fails until the
/// deletion ends, a claim before restarts the grace, a new reference keeps the blob, and an
/// upload no job names is collected after the grace.
pub async fn retention_collects_only_unreferenced_blobs<
    S: Store + AccessStore + ArtifactStore + RetentionStore,
>(
    store: &S,
) {
    store.register_node(&node("collector", 8, 1_000_000), &[], 1).await.unwrap();
    for d in ["sha256:in", "sha256:again"] {
        store.add_project_blob("default", d, 1, 1).await.unwrap();
    }
    let id = store.submit(&job_reading("default", &["sha256:in", "sha256:again"]), "", "f", 1).await.unwrap();
    run(store, id, 2, &["sha256:out"], "sha256:log").await;
    store.add_project_blob("default", "sha256:out", 1, 3).await.unwrap();
    let unused = store.delete_job(id, 10).await.unwrap().expect("ended");
    assert_eq!(unused, ["sha256:again", "sha256:in", "sha256:log", "sha256:out"]);

    assert!(store.doom_blobs(10, 100).await.unwrap().is_empty(), "not unreferenced for long enough");
    assert!(store.claim_blob("sha256:again", 11).await.unwrap(), "uploaded again: its grace starts anew");
    // A new job names `sha256:in` again before collection: it is referenced once more.
    let reader = store.submit(&job_reading("default", &["sha256:in"]), "", "f", 11).await.unwrap();

    assert_eq!(store.doom_blobs(11, 100).await.unwrap(), ["sha256:log", "sha256:out"]);
    assert!(store.blob_projects("sha256:out").await.unwrap().is_empty(), "no project holds a doomed blob");
    assert_eq!(store.blob_projects("sha256:in").await.unwrap(), ["default"]);
    assert_eq!(store.blob_projects("sha256:again").await.unwrap(), ["default"]);
    assert!(!store.claim_blob("sha256:out", 11).await.unwrap(), "refused while its deletion is under way");
    assert_eq!(
        store.doom_blobs(11, 100).await.unwrap(),
        ["sha256:log", "sha256:out"],
        "returned again until the deletion ends"
    );
    store.blobs_deleted(&["sha256:out".to_string(), "sha256:log".to_string()]).await.unwrap();
    assert!(store.claim_blob("sha256:out", 12).await.unwrap(), "deleted: it may be uploaded again");
    // Uploaded again but never named by a job: collected once their grace has passed too.
    assert!(store.doom_blobs(11, 100).await.unwrap().is_empty(), "within their grace");
    assert_eq!(store.doom_blobs(1_000, 100).await.unwrap(), ["sha256:again", "sha256:out"]);
    store.blobs_deleted(&["sha256:again".to_string(), "sha256:out".to_string()]).await.unwrap();
    // An upload a job names before the grace ends is kept; one claimed after the job named
    // it is not even marked.
    assert!(store.claim_blob("sha256:fresh", 20).await.unwrap());
    assert!(store.claim_blob("sha256:in", 20).await.unwrap(), "named by a job already");
    let named = store.submit(&job_reading("default", &["sha256:fresh"]), "", "f", 21).await.unwrap();
    assert!(store.doom_blobs(1_000, 100).await.unwrap().is_empty(), "both are referenced");
    assert!(store.blob_referenced("sha256:in").await.unwrap());
    assert!(store.job(reader).await.unwrap().is_some());
    assert!(store.job(named).await.unwrap().is_some());
}

/// Rows an older server stored: an ended job whose plan names an image archive and an input
/// upload, and an upload no job names, for the retention migrations to backfill.
pub const RETENTION_LEGACY_ROWS: &str = r#"
INSERT INTO jobs (id, name, project, priority, labels, source, filename, state, has_deps, created_ms, ended_ms)
    VALUES (1, 'old', 'default', 0, '{}', '', 'f', 'succeeded', FALSE, 100, 200);
INSERT INTO tasks (id, job_id, name, plan, priority, cores, memory, constraints, runtime, state) VALUES
    (1, 1, 'a', '{"image_blob":"sha256:image","inputs":[{"source":{"blob":{"digest":"sha256:input","directory":false}},"to":"x"},{"source":{"url":"https://example.com/x"},"to":"y"}]}',
     0, 1, 0, '{}', 'process', 'succeeded'),
    (2, 1, 'b', '{}', 0, 1, 0, '{}', 'process', 'succeeded');
INSERT INTO project_blobs (project, digest, size, created_ms) VALUES
    ('default', 'sha256:input', 1, 50), ('default', 'sha256:unnamed', 1, 60);
"#;

/// A store migrated from a database holding [`RETENTION_LEGACY_ROWS`] knows the blobs the old
/// job's plan names, and deleting the job reports them; the upload no job names is
/// unreferenced from the migration on.
pub async fn upgraded_jobs_keep_their_blobs<S: Store + RetentionStore>(store: &S) {
    assert!(store.blob_referenced("sha256:image").await.unwrap());
    assert!(store.blob_referenced("sha256:input").await.unwrap());
    assert!(store.doom_blobs(300, 10).await.unwrap().is_empty(), "marked at the migration, long after");
    assert_eq!(store.expired_jobs("default", 300, 10).await.unwrap(), [1]);
    let unused = store.delete_job(1, 300).await.unwrap().expect("the old job ended");
    assert_eq!(unused, ["sha256:image", "sha256:input"]);
    assert_eq!(
        store.doom_blobs(i64::MAX, 10).await.unwrap(),
        ["sha256:image", "sha256:input", "sha256:unnamed"]
    );
}
