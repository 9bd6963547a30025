//! Crashes: the server and agents die with SIGKILL; nothing acknowledged is lost.

use std::io::Read;
use std::process::Stdio;
use std::time::Duration;

use drover_agent::state_log;
use drover_proto as pb;

use crate::harness::{Cluster, alive, read_pid, task};

const T: Duration = Duration::from_secs(90);

#[test]
fn server_killed_after_submit_restarts_and_the_job_completes() {
    let mut c = Cluster::start(1, 2);
    let job = c.submit(
        r#"
version: 1
name: survivor
tasks:
  - name: first
    command: "sleep 1; echo first"
  - name: second
    depends_on: [first]
    command: "echo second"
"#,
    );
    // The submit was acknowledged; kill the server before it could finish anything.
    c.kill_server();
    c.start_server();
    assert_eq!(c.server_starts(), 2);
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    assert_eq!(task(&status, "first")["state"], "succeeded");
    assert_eq!(task(&status, "second")["state"], "succeeded");
    let logs = c.ok(&["logs", &job.to_string()]);
    assert!(logs.contains("first | first\n") && logs.contains("second | second\n"), "{logs}");
}

#[test]
fn agent_killed_mid_task_is_retried_on_the_other_agent() {
    let mut c = Cluster::start(1, 1);
    let job = c.submit(
        r#"
version: 1
name: lost-node
tasks:
  - name: work
    retries: { count: 2, backoff: 0s, on: [lost] }
    command: "echo $DROVER_ATTEMPT_ID >> {{ params.dir }}/attempts; sleep 3; echo done"
"#,
    );
    c.wait_until(job, T, "the task to run on agent-0", |v| {
        task(v, "work")["state"] == "running" && task(v, "work")["node"] == "agent-0"
    });
    let second = c.add_agent(1);
    c.kill_agent(0);
    let status = c.wait_done(job, T);
    let t = task(&status, "work");
    assert_eq!(status["state"], "succeeded", "{status:#}");
    assert_eq!(t["attempts"], 2);
    assert_eq!(t["node"], format!("agent-{second}"));
    let nodes = c.ok(&["nodes", "-o", "json"]);
    let nodes: serde_json::Value = serde_json::from_str(&nodes).unwrap();
    let dead = nodes.as_array().unwrap().iter().find(|n| n["name"] == "agent-0").unwrap();
    assert_eq!(dead["state"], "down");
    let events = c.ok(&["watch", &job.to_string()]);
    assert!(events.contains("node lost"), "{events}");
}

#[test]
fn watch_resumes_after_the_server_comes_back() {
    let mut c = Cluster::start(1, 2);
    let job = c.submit(
        r#"
version: 1
name: watched
tasks:
  - name: one
    command: "while [ ! -e {{ params.dir }}/go ]; do sleep 0.05; done"
  - name: two
    depends_on: [one]
    command: "true"
"#,
    );
    let mut watcher = c
        .command(&["watch", &job.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.wait_until(job, T, "one to run", |v| task(v, "one")["state"] == "running");
    c.kill_server();
    std::thread::sleep(Duration::from_millis(500));
    c.start_server();
    std::fs::write(c.path("go"), "").unwrap();
    let status = watcher.wait().unwrap();
    let mut out = String::new();
    watcher.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let mut err = String::new();
    watcher.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "watch failed: {err}\n{out}");
    assert!(err.contains("reconnecting"), "the watcher noticed the outage: {err}");
    // Every event exactly once: resumed after the last one seen, not from the start.
    let count = |what: &str, state: &str| {
        out.lines()
            .filter(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                words.get(1) == Some(&what) && words.get(2) == Some(&state)
            })
            .count()
    };
    assert_eq!(count("one", "running"), 1, "{out}");
    assert_eq!(count("two", "succeeded"), 1, "{out}");
    assert_eq!(out.matches(&format!("job {job} succeeded")).count(), 1, "{out}");
    // An explicit --after resumes from a sequence number.
    let status = c.status(job);
    let last = status["last_seq"].as_i64().unwrap();
    let tail = c.ok(&["watch", &job.to_string(), "--after", &(last - 1).to_string()]);
    assert_eq!(tail.lines().count(), 1, "{tail}");
    assert!(tail.contains(&format!("job {job} succeeded")));
}

#[test]
fn a_restarted_agent_reattaches_its_running_process_task_and_the_output_flows_on() {
    let mut c = Cluster::start(1, 1);
    let job = c.submit(
        r#"
version: 1
name: restart
tasks:
  - name: work
    command: |
      echo $$ > {{ params.dir }}/first.pid
      echo before the restart
      while [ ! -e {{ params.dir }}/go ]; do sleep 0.05; done
      echo after the restart
"#,
    );
    let first = read_pid(&c.path("first.pid"));
    let start = std::time::Instant::now();
    while !c.ok(&["logs", &job.to_string()]).contains("before the restart") {
        assert!(start.elapsed() < T, "the first line never arrived");
        std::thread::sleep(Duration::from_millis(100));
    }
    c.kill_and_reattach(0, 1, 1);
    assert!(alive(first), "the task outlives a SIGKILLed agent (its supervisor holds it)");
    std::fs::write(c.path("go"), "").unwrap();
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    assert_eq!(task(&status, "work")["attempts"], 1, "re-attached, not retried: {status:#}");
    let logs = c.ok(&["logs", &job.to_string()]);
    assert_eq!(logs.matches("before the restart").count(), 1, "{logs}");
    assert_eq!(logs.matches("after the restart").count(), 1, "{logs}");
    assert!(!alive(first));
}

#[test]
fn output_of_a_reattached_process_task_arrives_exactly_once_across_agent_kills() {
    let mut c = Cluster::start(1, 1);
    // 8,000 numbered lines in 80 bursts over about 4 s: the agent is killed twice while they
    // flow, and the lines written while it is away wait in the step's files.
    let job = c.submit(
        r#"
version: 1
name: flowing
tasks:
  - name: work
    command: |
      for b in $(seq 0 79); do seq $((b * 100 + 1)) $((b * 100 + 100)) | sed 's/^/line /'; sleep 0.05; done
"#,
    );
    let logs = |c: &Cluster| c.ok(&["logs", &job.to_string(), "work"]);
    let start = std::time::Instant::now();
    for (round, after) in [(1, "line 500\n"), (2, "line 4000\n")] {
        while !logs(&c).contains(after) {
            assert!(start.elapsed() < T, "{after:?} never arrived");
            std::thread::sleep(Duration::from_millis(20));
        }
        // No pause for the agent to write anything down: it dies mid-flow.
        c.kill_and_reattach(0, 1, round);
    }
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    assert_eq!(task(&status, "work")["attempts"], 1, "re-attached, not retried: {status:#}");
    let expected: String = (1..=8000).map(|i| format!("line {i}\n")).collect();
    let got = logs(&c);
    if got != expected {
        let lines: Vec<&str> = got.lines().collect();
        let first_wrong = lines.iter().zip(expected.lines()).position(|(a, b)| a != &b);
        panic!(
            "{} lines instead of 8000; first difference at line {first_wrong:?}: {:?}",
            lines.len(),
            first_wrong.map(|i| &lines[i.saturating_sub(2)..(i + 3).min(lines.len())])
        );
    }
}

#[test]
fn an_end_the_server_never_acknowledged_survives_an_agent_kill_and_is_recorded_once() {
    let mut c = Cluster::start(1, 1);
    let job = c.submit(
        r#"
version: 1
name: unacknowledged
tasks:
  - name: work
    retries: { count: 2, backoff: 0s, on: [lost] }
    command: |
      echo $DROVER_ATTEMPT_ID >> {{ params.dir }}/attempts
      while [ ! -e {{ params.dir }}/go ]; do sleep 0.05; done
      echo last words
"#,
    );
    c.wait_until(job, T, "the task to run", |v| task(v, "work")["state"] == "running");
    // With the server away the task ends: its output and end wait in the agent's outbox.
    c.kill_server();
    std::fs::write(c.path("go"), "").unwrap();
    let state = c.path("agent-0-work").join(".state");
    let start = std::time::Instant::now();
    loop {
        let kept = state_log::peek(&state).expect("read the agent's state log");
        let ended = kept.reports.iter().any(|r| {
            matches!(&r.report.kind, Some(pb::report::Kind::Update(u))
                if matches!(u.kind, Some(pb::attempt_update::Kind::Finished(_))))
        });
        if ended {
            break;
        }
        assert!(start.elapsed() < T, "the end never reached the state log: {kept:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The agent dies before any server saw the end; both come back.
    c.kill_agent(0);
    c.start_server();
    c.restart_agent(0, 1);
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    assert_eq!(task(&status, "work")["attempts"], 1, "the ended attempt was run again: {status:#}");
    let attempts = std::fs::read_to_string(c.path("attempts")).unwrap();
    assert_eq!(attempts.lines().count(), 1, "{attempts}");
    let logs = c.ok(&["logs", &job.to_string()]);
    assert_eq!(logs.matches("last words").count(), 1, "{logs}");
}
