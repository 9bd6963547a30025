//! Jobs that run to their end: DAGs, arrays, retries, exit-code semantics.

use std::time::Duration;

use crate::harness::{Cluster, task};

const T: Duration = Duration::from_secs(60);

#[test]
fn dag_of_three_runs_in_dependency_order() {
    // Each task runs as a uid of its own: they share the file by making it writable to all.
    let c = Cluster::start(1, 4);
    let job = c.submit(
        r#"
version: 1
name: dag
tasks:
  - name: c
    depends_on: [b]
    command: "umask 0; echo c >> {{ params.dir }}/order"
  - name: a
    command: "sleep 0.3; umask 0; echo a >> {{ params.dir }}/order"
  - name: b
    depends_on: [a]
    command: "umask 0; echo b >> {{ params.dir }}/order"
"#,
    );
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    let order = std::fs::read_to_string(c.path("order")).unwrap();
    assert_eq!(order, "a\nb\nc\n");
    for name in ["a", "b", "c"] {
        let t = task(&status, name);
        assert_eq!(t["state"], "succeeded");
        assert_eq!(t["exit_code"], 0);
        assert_eq!(t["attempts"], 1);
        assert_eq!(t["node"], "agent-0");
    }
}

#[test]
fn array_of_twenty_frames_renders_each_frame() {
    let c = Cluster::start(2, 2);
    let job = c.submit(
        r#"
version: 1
name: frames
tasks:
  - name: render
    array: "1-20"
    command: "echo rendering frame {{ frame }}"
"#,
    );
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    let tasks = status["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 20);
    let frames: Vec<i64> = tasks.iter().map(|t| t["frame"].as_i64().unwrap()).collect();
    assert_eq!(frames, (1..=20).collect::<Vec<_>>());
    let nodes: std::collections::BTreeSet<&str> = tasks.iter().map(|t| t["node"].as_str().unwrap()).collect();
    assert_eq!(nodes.len(), 2, "work spreads over both agents: {nodes:?}");
    let logs = c.ok(&["logs", &job.to_string()]);
    for f in 1..=20 {
        let line = format!("render[{f}] | rendering frame {f}\n");
        assert_eq!(logs.matches(&line).count(), 1, "frame {f} once in:\n{logs}");
    }
    let one = c.ok(&["logs", &job.to_string(), "render[7]"]);
    assert_eq!(one, "rendering frame 7\n");
}

#[test]
fn a_client_piped_into_a_reader_that_stops_early_ends_quietly() {
    let c = Cluster::start(1, 1);
    // Far more output than a pipe holds, so the CLI is still writing when the reader leaves.
    let job = c.submit(
        r#"
version: 1
name: chatty
tasks:
  - name: t
    command: "seq 1 100000"
"#,
    );
    assert_eq!(c.wait_done(job, T)["state"], "succeeded");
    let mut child = c
        .command(&["logs", &job.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn drover logs");
    let mut first = String::new();
    let stdout = child.stdout.take().expect("stdout");
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut first).expect("first line");
    assert!(first.trim_end().ends_with(" 1") || first == "1\n", "{first:?}");
    // The reader is gone (like `| head -1`): the CLI ends by SIGPIPE, as command-line tools do,
    // without a panic message.
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(nix::sys::signal::Signal::SIGPIPE as i32),
        "{:?}: {stderr}",
        out.status
    );
}

#[test]
fn retries_count_attempts_until_success_or_exhaustion() {
    let c = Cluster::start(1, 2);
    let job = c.submit(
        r#"
version: 1
name: retries
tasks:
  - name: flaky
    retries: { count: 3, backoff: 100ms }
    command: |
      umask 0
      n=$(cat {{ params.dir }}/count 2>/dev/null || echo 0)
      n=$((n + 1))
      echo $n > {{ params.dir }}/count
      echo "attempt $n"
      [ $n -ge 3 ]
  - name: hopeless
    retries: 1
    command: "exit 5"
"#,
    );
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "failed", "{status:#}");
    let flaky = task(&status, "flaky");
    assert_eq!(flaky["state"], "succeeded");
    assert_eq!(flaky["attempts"], 3);
    let hopeless = task(&status, "hopeless");
    assert_eq!(hopeless["state"], "failed");
    assert_eq!(hopeless["attempts"], 2);
    assert_eq!(hopeless["exit_code"], 5);
    assert_eq!(hopeless["failure"], "exit");
    assert!(hopeless["reason"].as_str().unwrap().contains("no retries left"), "{hopeless:#}");
    let logs = c.ok(&["logs", &job.to_string(), "flaky"]);
    assert_eq!(logs, "attempt 1\nattempt 2\nattempt 3\n");
}

#[test]
fn exit_codes_42_and_43_mean_warning_and_skipped() {
    let c = Cluster::start(1, 2);
    let job = c.submit(
        r#"
version: 1
name: codes
tasks:
  - name: warn
    command: "exit 42"
  - name: skip
    command: "exit 43"
  - name: custom
    exit_codes: { warning: [3], skip: [] }
    command: "exit 3"
  - name: after-warn
    depends_on: [warn]
    command: "true"
"#,
    );
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "warning", "{status:#}");
    assert_eq!(task(&status, "warn")["state"], "warning");
    assert_eq!(task(&status, "warn")["exit_code"], 42);
    assert_eq!(task(&status, "skip")["state"], "skipped");
    assert_eq!(task(&status, "skip")["exit_code"], 43);
    assert_eq!(task(&status, "custom")["state"], "warning");
    assert_eq!(task(&status, "after-warn")["state"], "succeeded", "a warning satisfies dependents");
    // watch exits 0 for a job that ended with warnings.
    let out = c.drover(&["watch", &job.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn failed_dependency_skips_dependents_with_a_reason() {
    let c = Cluster::start(1, 2);
    let job = c.submit(
        r#"
version: 1
name: broken-chain
tasks:
  - name: build
    command: "exit 1"
  - name: test
    depends_on: [build]
    command: "true"
"#,
    );
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "failed");
    let t = task(&status, "test");
    assert_eq!(t["state"], "skipped");
    assert_eq!(t["attempts"], 0);
    assert!(t["reason"].as_str().unwrap().contains("`build` ended failed"), "{t:#}");
    let out = c.drover(&["watch", &job.to_string()]);
    assert!(!out.status.success(), "watch exits non-zero for a failed job");
}

#[test]
fn constraints_place_tasks_on_matching_nodes_and_env_reaches_tasks() {
    let c = Cluster::start(1, 2);
    let job = c.submit(
        r#"
version: 1
name: env-and-labels
env: { GREETING: hello, SHARED: job }
tasks:
  - name: show
    env: { SHARED: task }
    command: "echo $GREETING $SHARED $DROVER_JOB_ID"
  - name: picky
    constraints: { gpu: "true" }
    command: "true"
"#,
    );
    let status = c.wait_until(job, T, "show to finish", |v| task(v, "show")["state"] == "succeeded");
    assert_eq!(task(&status, "picky")["state"], "queued", "no node has gpu=true yet");
    let logs = c.ok(&["logs", &job.to_string(), "show"]);
    assert_eq!(logs, format!("hello task {job}\n"));
    // A node with the label arrives; the task runs there.
    let mut agent = c
        .command(&["agent", "--name", "gpu-node", "--labels", "gpu=true", "--cores", "1", "--work-dir"])
        .arg(c.path("gpu-work"))
        .args(["--server", &c.addr, "--join", &c.join_token()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let status = c.wait_done(job, T);
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(task(&status, "picky")["node"], "gpu-node");
}

/// A process task gets the secrets it names, as a container does, and they never reach its log.
#[test]
fn a_process_task_gets_its_secrets_masked_in_the_log() {
    let c = Cluster::start(1, 1);
    c.set_secret("API_TOKEN", "s3cret-value");
    let job = c.submit(
        "version: 1\nname: secret\ntasks:\n  - name: t\n    secrets: [API_TOKEN]\n    command: 'test \"$API_TOKEN\" = s3cret-value && echo \"got $API_TOKEN\"'\n",
    );
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    let logs = c.ok(&["logs", &job.to_string()]);
    assert!(logs.contains("got ***") && !logs.contains("s3cret-value"), "{logs}");
}
