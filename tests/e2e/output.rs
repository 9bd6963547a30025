//! Output: nothing lost, long lines split, live following.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use crate::harness::{Cluster, task};

const T: Duration = Duration::from_secs(120);

#[test]
fn hundred_thousand_lines_arrive_complete_and_in_order() {
    let c = Cluster::start(1, 2);
    let job = c.submit(
        r#"
version: 1
name: chatty
tasks:
  - name: chatty
    command: "seq 1 100000; echo to-stderr >&2"
"#,
    );
    let status = c.wait_done(job, T);
    assert_eq!(task(&status, "chatty")["state"], "succeeded");
    let out = c.drover(&["logs", &job.to_string(), "chatty"]);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 100_000);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(*l, (i + 1).to_string(), "line {} out of order", i + 1);
    }
    assert_eq!(String::from_utf8_lossy(&out.stderr), "to-stderr\n");
}

#[test]
fn lines_longer_than_64k_are_split_not_lost() {
    let c = Cluster::start(1, 2);
    let job = c.submit(
        r#"
version: 1
name: wide
tasks:
  - name: wide
    command: "head -c 200000 /dev/zero | tr '\\0' x; echo; echo after"
"#,
    );
    c.wait_done(job, T);
    let out = c.ok(&["logs", &job.to_string(), "wide"]);
    let joined: String = out.split('\n').collect::<Vec<_>>().concat();
    assert_eq!(joined.matches('x').count(), 200_000);
    assert!(out.ends_with("after\n"));
}

#[test]
fn logs_follow_streams_lines_while_the_task_runs() {
    let c = Cluster::start(1, 2);
    let job = c.submit(
        r#"
version: 1
name: ticker
tasks:
  - name: ticker
    steps:
      - "echo first"
      - "while [ ! -e {{ params.dir }}/go ]; do sleep 0.05; done; echo second"
"#,
    );
    let mut follower = c
        .command(&["logs", "-f", &job.to_string(), "ticker"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(follower.stdout.take().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "first\n", "the first step's line arrives while the task still runs");
    let status = c.status(job);
    assert_eq!(task(&status, "ticker")["state"], "running");
    std::fs::write(c.path("go"), "").unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "second\n");
    // The follower ends by itself once the task has ended.
    assert!(follower.wait().unwrap().success());
}
