//! Logs outlive their attempts: archived to the blob store when an attempt ends, served from
//! there once the live rows are gone (and the agent with them), dropped after retention with
//! their job.

use std::path::Path;
use std::time::{Duration, Instant};

use drover_store::sqlite::SqliteStore;
use drover_store::{ArchiveStore, LogArchiveRecord, Store, TaskFilter};

use crate::harness::Cluster;

const T: Duration = Duration::from_secs(90);

const JOB: &str = r#"
version: 1
name: chatty
tasks:
  - name: talk
    command: "for i in $(seq 1 300); do echo out $i; echo err $i >&2; done"
  - name: hush
    command: "echo one line"
"#;

fn expected(stream: &str) -> String {
    (1..=300).map(|i| format!("{stream} {i}\n")).collect()
}

/// Reads the server's database directly (the server keeps running): the job's archives and how
/// many live log rows it still has.
fn archive_state(db: &Path, job: i64) -> (Vec<LogArchiveRecord>, usize) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let store = SqliteStore::open(db).await.expect("open the server's database");
        let archives = store.log_archives(job, &TaskFilter::default()).await.expect("archives");
        let live = store.logs_after(job, &TaskFilter::default(), 0, 10_000).await.expect("live rows");
        (archives, live.len())
    })
}

fn wait_archived(c: &Cluster, job: i64, attempts: usize) -> Vec<LogArchiveRecord> {
    let start = Instant::now();
    loop {
        let (archives, live) = archive_state(&c.path("server-data/drover.db"), job);
        if archives.len() == attempts && live == 0 {
            return archives;
        }
        assert!(start.elapsed() < T, "logs never archived: {archives:?}, {live} live rows");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn logs_of_a_finished_job_are_served_from_the_archive_after_its_agent_is_gone() {
    let mut c = Cluster::start(1, 2);
    let job = c.submit(JOB);
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    c.kill_agent(0);
    let archives = wait_archived(&c, job, 2);
    assert!(archives.iter().all(|a| a.digest.starts_with("sha256:") && a.size > 0), "{archives:?}");

    let out = c.drover(&["logs", &job.to_string(), "talk"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected("out"));
    assert_eq!(String::from_utf8_lossy(&out.stderr), expected("err"));
    let all = c.ok(&["logs", &job.to_string()]);
    assert!(all.contains("talk | out 300\n") && all.contains("hush | one line\n"), "{all}");
    // Following a finished job ends at once, from the archive too.
    assert_eq!(c.ok(&["logs", "-f", &job.to_string(), "hush"]), "one line\n");
}

/// When the job's last task ended, read from the server's database.
fn job_ended_ms(db: &Path, job: i64) -> i64 {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let store = SqliteStore::open(db).await.expect("open the server's database");
        let tasks = store.tasks(job).await.expect("tasks");
        tasks.iter().filter_map(|t| t.ended_ms).max().expect("the job's tasks ended")
    })
}

#[test]
fn archived_logs_are_kept_for_the_retention_period_then_deleted() {
    let retention = Duration::from_secs(20);
    let c = Cluster::start_with(1, 2, &["--log-retention", "20s", "--blob-grace", "1s"], &[]);
    let job = c.submit(JOB);
    c.wait_done(job, T);
    let archives = wait_archived(&c, job, 2);
    let ended_ms = job_ended_ms(&c.path("server-data/drover.db"), job);
    assert_eq!(c.ok(&["logs", &job.to_string(), "hush"]), "one line\n");
    let blob = |digest: &str| {
        let hex = digest.trim_start_matches("sha256:");
        c.path(&format!("server-data/blobs/sha256/{}/{}", &hex[..2], &hex[2..]))
    };
    for a in &archives {
        assert!(blob(&a.digest).exists(), "archive blob {} missing", a.digest);
    }
    let start = Instant::now();
    loop {
        let (left, _) = archive_state(&c.path("server-data/drover.db"), job);
        if left.is_empty() {
            break;
        }
        assert!(start.elapsed() < retention + T, "archives never expired");
        std::thread::sleep(Duration::from_millis(500));
    }
    // The archives go when they expire or with their job, whichever comes first: never before
    // the retention period has passed since the job ended.
    let now_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    assert!(
        now_ms - ended_ms >= retention.as_millis() as i64,
        "an archive was dropped before the retention period passed"
    );
    let start = Instant::now();
    while archives.iter().any(|a| blob(&a.digest).exists()) {
        assert!(start.elapsed() < T, "expired archive blobs were never deleted");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The job itself is past the same retention (the server's default for its project).
    let start = Instant::now();
    loop {
        let out = c.drover(&["logs", &job.to_string()]);
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("not found"), "{err}");
            break;
        }
        assert!(start.elapsed() < T, "the job was never deleted");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn following_a_task_through_its_end_and_archiving_sends_every_line_once() {
    let c = Cluster::start(1, 2);
    let job = c.submit(
        r#"
version: 1
name: follow
tasks:
  - name: two-halves
    command: |
      for i in $(seq 1 50); do echo "a $i"; done
      while [ ! -e {{ params.dir }}/release ]; do sleep 0.05; done
      for i in $(seq 1 50); do echo "b $i"; done
"#,
    );
    let id = job.to_string();
    let start = Instant::now();
    while c.ok(&["logs", &id, "two-halves"]).lines().count() < 50 {
        assert!(start.elapsed() < T, "the first half never showed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let follower = c
        .command(&["logs", "-f", &id, "two-halves"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn logs -f");
    std::fs::write(c.path("release"), "").unwrap();
    let out = follower.wait_with_output().expect("logs -f ends with the task");
    assert!(out.status.success());
    let expected: String =
        ["a", "b"].iter().flat_map(|h| (1..=50).map(move |i| format!("{h} {i}\n"))).collect();
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
    // Once archived, the same request gives the same lines.
    wait_archived(&c, job, 1);
    assert_eq!(c.ok(&["logs", "-f", &id, "two-halves"]), expected);
}
