//! Stopping work: timeouts and cancel kill the whole process tree.

use std::time::{Duration, Instant};

use crate::harness::{Cluster, alive, read_pid, task};

const T: Duration = Duration::from_secs(60);

fn wait_dead(pid: i32) {
    let start = Instant::now();
    while alive(pid) {
        assert!(start.elapsed() < Duration::from_secs(10), "process {pid} survived");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn timeout_kills_the_process_tree_including_grandchildren() {
    let c = Cluster::start(1, 2);
    let job = c.submit(
        r#"
version: 1
name: slow
tasks:
  - name: slow
    timeout: 1s
    command: |
      trap '' TERM
      sh -c 'trap "" TERM; sleep 300' &
      echo $! > {{ params.dir }}/grandchild.pid
      echo $$ > {{ params.dir }}/child.pid
      wait
"#,
    );
    let grandchild = read_pid(&c.path("grandchild.pid"));
    let child = read_pid(&c.path("child.pid"));
    let status = c.wait_done(job, T);
    let t = task(&status, "slow");
    assert_eq!(t["state"], "failed", "{status:#}");
    assert_eq!(t["failure"], "timeout");
    assert!(t["reason"].as_str().unwrap().contains("timed out after 1s"), "{t:#}");
    // Both ignored SIGTERM, so only the SIGKILL after the grace period ended them.
    wait_dead(child);
    wait_dead(grandchild);
}

#[test]
fn cancel_stops_running_tasks_and_drops_queued_ones() {
    let c = Cluster::start(1, 1);
    let job = c.submit(
        r#"
version: 1
name: to-cancel
tasks:
  - name: running
    command: "echo $$ > {{ params.dir }}/running.pid; sleep 300"
  - name: queued
    command: "true"
  - name: waiting
    depends_on: [running]
    command: "true"
"#,
    );
    let pid = read_pid(&c.path("running.pid"));
    c.wait_until(job, T, "the task to run", |v| task(v, "running")["state"] == "running");
    let out = c.ok(&["cancel", &job.to_string()]);
    assert!(out.contains("cancelled"), "{out}");
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "cancelled", "{status:#}");
    for name in ["running", "queued", "waiting"] {
        assert_eq!(task(&status, name)["state"], "cancelled", "{name}: {status:#}");
    }
    wait_dead(pid);
    let watch = c.drover(&["watch", &job.to_string()]);
    assert!(!watch.status.success(), "watch of a cancelled job exits non-zero");
    // Cancelling an unknown job is a clear error.
    let out = c.drover(&["cancel", "99999"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("job 99999 not found"));
}
