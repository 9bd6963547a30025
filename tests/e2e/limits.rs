//! Each limit with its default overridden: upload size, outputs per task, log per attempt.

use std::time::Duration;

use crate::harness::{Cluster, task};

const T: Duration = Duration::from_secs(90);

#[test]
fn an_upload_over_the_limit_is_refused_clearly() {
    let c = Cluster::start_with(1, 2, &["--max-upload", "1KiB"], &[]);
    std::fs::write(c.path("big.bin"), vec![7u8; 5000]).unwrap();
    std::fs::write(c.path("small.bin"), vec![7u8; 500]).unwrap();
    let file = c.job_file(
        "upload.yaml",
        r#"
version: 1
name: upload
tasks:
  - name: use
    inputs: [{ path: big.bin, to: big.bin }]
    command: "wc -c big.bin"
"#,
    );
    let out = c.drover(&["submit", &file.display().to_string()]);
    assert!(!out.status.success(), "an oversized input must be refused");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("larger than the server's limit of 1024 bytes"), "{stderr}");
    let ok = c.submit(
        r#"
version: 1
name: upload
tasks:
  - name: use
    inputs: [{ path: small.bin, to: small.bin }]
    command: "wc -c < small.bin"
"#,
    );
    assert_eq!(c.wait_done(ok, T)["state"], "succeeded");
    assert_eq!(c.ok(&["logs", &ok.to_string(), "use"]).trim(), "500");
}

#[test]
fn outputs_over_the_per_task_limit_are_not_kept_and_the_task_says_so() {
    let c = Cluster::start_with(1, 2, &["--max-outputs-size", "1000B"], &[]);
    let job = c.submit(
        r#"
version: 1
name: outputs
tasks:
  - name: make
    outputs: ["*.bin"]
    command: "head -c 600 /dev/zero > a.bin && head -c 600 /dev/zero > b.bin && head -c 300 /dev/zero > c.bin"
"#,
    );
    let status = c.wait_done(job, T);
    let t = task(&status, "make");
    assert_eq!(t["state"], "succeeded", "{status:#}");
    let reason = t["reason"].as_str().unwrap_or_default().to_string();
    let events = c.ok(&["watch", &job.to_string()]);
    assert!(
        events.contains("outputs over the limit of 1000 bytes per task not kept: `b.bin` (600 bytes)"),
        "{events}\n{reason}"
    );
    let ls = c.ok(&["artifacts", "ls", &job.to_string(), "-o", "json"]);
    let ls: serde_json::Value = serde_json::from_str(&ls).unwrap();
    let paths: Vec<&str> = ls.as_array().unwrap().iter().map(|a| a["path"].as_str().unwrap()).collect();
    assert_eq!(paths, vec!["a.bin", "c.bin"]);
}

#[test]
fn a_log_over_the_per_attempt_limit_keeps_its_beginning_and_end() {
    let c = Cluster::start_with(1, 2, &["--max-log-size", "4KiB"], &[]);
    let job = c.submit(
        r#"
version: 1
name: flood
tasks:
  - name: count
    command: "seq 1 20000"
"#,
    );
    assert_eq!(c.wait_done(job, T)["state"], "succeeded");
    assert_head_and_tail_of_20000_lines(&c, job);
}

/// An agent killed twice while a task's output runs past the limit: the head is not shipped
/// again and the tail is read again from the step's files, so the log is what it would have
/// been without the restarts.
#[test]
fn a_log_over_the_limit_keeps_its_beginning_and_end_across_agent_restarts() {
    let mut c = Cluster::start_with(1, 1, &["--max-log-size", "4KiB"], &[]);
    let job = c.submit(
        r#"
version: 1
name: flood
tasks:
  - name: count
    command: |
      for b in $(seq 0 39); do
        seq $((b * 500 + 1)) $((b * 500 + 500))
        [ $b = 4 ] && touch {{ params.dir }}/past-head
        [ $b = 24 ] && touch {{ params.dir }}/later
        sleep 0.08
      done
"#,
    );
    for (round, mark) in [(1, "past-head"), (2, "later")] {
        let start = std::time::Instant::now();
        while !c.path(mark).exists() {
            assert!(start.elapsed() < T, "the task never got to {mark}");
            std::thread::sleep(Duration::from_millis(10));
        }
        c.kill_and_reattach(0, 1, round);
    }
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    assert_eq!(task(&status, "count")["attempts"], 1, "re-attached, not retried: {status:#}");
    assert_head_and_tail_of_20000_lines(&c, job);
}

/// An agent killed in a later step of a task whose log went past the limit in an earlier
/// one, once the earlier step's head was shipped: the tail the killed agent held in memory is
/// read again from the earlier step's files, so the log ends with the last lines of both.
#[test]
fn the_held_tail_of_an_earlier_step_survives_an_agent_restart_in_a_later_one() {
    restart_in_the_second_step_of_a_flood("sleep 1");
}

/// As above, with the agent killed the moment the second step started, before any of the
/// first step's output was in its outbox: all of it is read again.
#[test]
fn an_earlier_steps_output_not_yet_shipped_survives_an_agent_restart_in_a_later_one() {
    restart_in_the_second_step_of_a_flood("true");
}

/// A task printing 1 to 19,990 in its first step and 19,991 to 20,000 in its second, past a
/// 4 KiB limit; its agent is killed and restarted in the second step after `pause`.
fn restart_in_the_second_step_of_a_flood(pause: &str) {
    let mut c = Cluster::start_with(1, 1, &["--max-log-size", "4KiB"], &[]);
    let job = c.submit(&format!(
        r#"
version: 1
name: flood
tasks:
  - name: count
    steps:
      - "seq 1 19990"
      - |
        {pause}
        touch {{{{ params.dir }}}}/second
        while [ ! -e {{{{ params.dir }}}}/go ]; do sleep 0.05; done
        seq 19991 20000
"#
    ));
    let start = std::time::Instant::now();
    while !c.path("second").exists() {
        assert!(start.elapsed() < T, "the second step never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    c.kill_and_reattach(0, 1, 1);
    std::fs::write(c.path("go"), "").unwrap();
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    assert_eq!(task(&status, "count")["attempts"], 1, "re-attached, not retried: {status:#}");
    assert_head_and_tail_of_20000_lines(&c, job);
}

/// The log of task `count` of `job`, which printed the numbers 1 to 20,000 past a 4 KiB limit,
/// is its real beginning and end with a marker that counts exactly what was cut.
fn assert_head_and_tail_of_20000_lines(c: &Cluster, job: i64) {
    let full: String = (1..=20_000).map(|i| format!("{i}\n")).collect();
    let out = c.drover(&["logs", &job.to_string(), "count"]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(stdout.starts_with("1\n2\n3\n"), "{stdout}");
    assert!(stdout.ends_with("19999\n20000\n"), "{stdout}");
    assert!(stdout.len() <= 4096, "{} bytes shipped past a 4 KiB limit", stdout.len());
    let cut: usize = stderr
        .strip_prefix("... ")
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no cut marker in {stderr:?}"));
    assert!(stderr.contains("bytes cut"), "{stderr}");
    // What was kept and what was cut add up to everything the task wrote, and the kept head
    // and tail are the real beginning and end.
    assert_eq!(stdout.len() + cut, full.len());
    let head_len = (0..=stdout.len()).rev().find(|&n| full.starts_with(&stdout[..n])).unwrap();
    assert_eq!(&stdout[head_len..], &full[head_len + cut..]);
}
