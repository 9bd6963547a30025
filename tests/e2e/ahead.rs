//! Assigning ahead: a busy node is also given tasks that wait on its agent and start the
//! moment a task there ends. They never run beyond the node's cores, a cancel reaches them
//! while they wait, and `--no-assign-ahead` keeps them in the server's queue.

use std::time::Duration;

use serde_json::Value;

use crate::harness::Cluster;

const T: Duration = Duration::from_secs(60);

/// How many of the job's tasks are in `state`.
fn count(status: &Value, state: &str) -> usize {
    status["tasks"].as_array().map_or(0, |tasks| tasks.iter().filter(|t| t["state"] == state).count())
}

/// Each frame marks itself running, counts the frames running with it, and unmarks itself.
const COUNTING: &str = r#"
version: 1
name: ahead
tasks:
  - name: f
    array: "1-10"
    command: >-
      umask 0; mkdir {{ params.dir }}/running-{{ frame }};
      ls {{ params.dir }} | grep -c '^running-' >> {{ params.dir }}/counts;
      sleep 0.4; rmdir {{ params.dir }}/running-{{ frame }}
"#;

#[test]
fn tasks_wait_ahead_on_a_busy_node_and_never_run_beyond_its_cores() {
    let c = Cluster::start(1, 2);
    let job = c.submit(COUNTING);
    // Two run, two more wait on the node as assigned; the rest stay queued.
    c.wait_until(job, T, "two running and two waiting ahead", |v| {
        count(v, "running") == 2 && count(v, "assigned") == 2
    });
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    let counts = std::fs::read_to_string(c.path("counts")).expect("counts");
    let seen: Vec<u32> = counts.lines().map(|l| l.trim().parse().expect("a count")).collect();
    assert_eq!(seen.len(), 10, "{counts}");
    assert!(
        seen.iter().all(|n| (1..=2).contains(n)),
        "more frames ran at once than the node has cores: {seen:?}"
    );
}

#[test]
fn a_cancel_reaches_tasks_waiting_ahead() {
    let c = Cluster::start(1, 1);
    let job = c.submit(
        r#"
version: 1
name: long
tasks:
  - name: s
    array: "1-3"
    command: sleep 60
"#,
    );
    c.wait_until(job, T, "one running and one waiting ahead", |v| {
        count(v, "running") == 1 && count(v, "assigned") == 1 && count(v, "queued") == 1
    });
    c.ok(&["cancel", &job.to_string()]);
    let status =
        c.wait_until(job, Duration::from_secs(20), "every task cancelled", |v| count(v, "cancelled") == 3);
    assert_eq!(status["state"], "cancelled", "{status:#}");
    // The node is free again: a new job runs at once.
    let next = c.submit("version: 1\nname: next\ntasks:\n  - name: t\n    command: \"true\"\n");
    assert_eq!(c.wait_done(next, T)["state"], "succeeded");
}

#[test]
fn without_assign_ahead_tasks_wait_in_the_servers_queue() {
    let c = Cluster::start_with(1, 1, &["--no-assign-ahead"], &[]);
    let job = c.submit(
        r#"
version: 1
name: queued
tasks:
  - name: s
    array: "1-3"
    command: sleep 0.5
"#,
    );
    // Polled to the end: never more on the node than its one core.
    let status = c.wait_until(job, T, "the job to end", |v| {
        assert!(count(v, "running") + count(v, "assigned") <= 1, "a task waits on the node: {v:#}");
        v["state"] == "succeeded" || v["state"] == "failed"
    });
    assert_eq!(status["state"], "succeeded", "{status:#}");
}
