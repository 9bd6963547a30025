//! Container tasks end to end: images shipped by the client, isolation, secrets.

use std::process::Command;
use std::time::Duration;

use drover_agent::state_log;

use crate::harness::{BUSYBOX, Cluster, ensure_busybox_image, task};

const T: Duration = Duration::from_secs(120);

#[test]
fn container_task_is_isolated_and_gets_secrets_that_never_reach_the_log() {
    ensure_busybox_image();
    let c = Cluster::start(1, 2);
    let job_text = format!(
        r#"
version: 1
name: boxed
tasks:
  - name: boxed
    runtime: docker
    image: {BUSYBOX}
    secrets: [API_TOKEN]
    steps:
      - "echo token=$API_TOKEN; [ \"$API_TOKEN\" = hunter2-secret ] && echo token-ok"
      - "ls /sys/class/net"
      - "touch /not-allowed 2>/dev/null && echo root-writable || echo root-read-only"
      - "id -u; echo data > /workspace/out.txt && echo workspace-writable; pwd"
"#
    );
    // A missing secret fails the submit with a clear error and stores nothing.
    let file = c.job_file("boxed.yaml", &job_text);
    let out = c.drover(&["submit", &file.display().to_string()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no secret `API_TOKEN`") && stderr.contains("drover secrets set"), "{stderr}");
    assert_eq!(c.ok(&["ps", "--all", "-o", "json"]).trim(), "[]");

    c.set_secret("API_TOKEN", "hunter2-secret");
    assert_eq!(c.ok(&["secrets", "ls"]).trim(), "API_TOKEN");
    let job = c.submit(&job_text);
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    let logs = c.ok(&["logs", &job.to_string(), "boxed"]);
    assert!(logs.contains("token=***\n"), "secret masked: {logs}");
    assert!(logs.contains("token-ok"), "the container saw the real value: {logs}");
    assert!(!logs.contains("hunter2-secret"), "{logs}");
    assert!(logs.contains("\nlo\n") && !logs.contains("eth0"), "only loopback: {logs}");
    assert!(logs.contains("root-read-only"), "{logs}");
    assert!(logs.contains("65534\nworkspace-writable\n/workspace\n"), "non-root, workspace: {logs}");
    let _ = task(&status, "boxed");
}

#[test]
fn image_built_by_the_client_runs_on_an_agent_that_never_had_it() {
    ensure_busybox_image();
    let mut c = Cluster::start(0, 1);
    let marker = format!("built-{}", std::process::id());
    std::fs::create_dir_all(c.path("ctx")).unwrap();
    std::fs::write(c.path("ctx/Dockerfile"), format!("FROM {BUSYBOX}\nRUN echo {marker} > /built.txt\n"))
        .unwrap();
    let job_text = r#"
version: 1
name: built
tasks:
  - name: show
    runtime: docker
    build: { dockerfile: ctx/Dockerfile, context: ctx }
    command: "cat /built.txt"
"#;
    let file = c.job_file("built.yaml", job_text);
    let first = c.drover(&["submit", "-o", "json", &file.display().to_string()]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(stderr.contains("uploaded image"), "{stderr}");
    let job: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    let job = job["id"].as_i64().unwrap();
    // A second submit of the unchanged image uploads nothing.
    let second = c.drover(&["submit", "-o", "json", &file.display().to_string()]);
    assert!(second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("already on the server") && !stderr.contains("uploaded image"), "{stderr}");
    let second: serde_json::Value = serde_json::from_slice(&second.stdout).unwrap();
    let second = second["id"].as_i64().unwrap();
    // Remove the image from the engine before any agent exists: the agent must fetch it.
    let id = Command::new("docker")
        .args(["build", "-q", "-f"])
        .arg(c.path("ctx/Dockerfile"))
        .arg(c.path("ctx"))
        .output()
        .unwrap();
    let id = String::from_utf8_lossy(&id.stdout).trim().to_string();
    assert!(id.starts_with("sha256:"), "{id}");
    let rmi = Command::new("docker").args(["rmi", "-f", &id]).output().unwrap();
    assert!(rmi.status.success(), "{}", String::from_utf8_lossy(&rmi.stderr));
    c.add_agent(1);
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    assert_eq!(c.ok(&["logs", &job.to_string(), "show"]), format!("{marker}\n"));
    assert_eq!(c.wait_done(second, T)["state"], "succeeded");
    let _ = Command::new("docker").args(["rmi", "-f", &id]).output();
}

#[test]
fn restarted_agent_reattaches_to_its_running_container_and_the_task_completes() {
    ensure_busybox_image();
    let mut c = Cluster::start(1, 1);
    let job = c.submit(&format!(
        r#"
version: 1
name: reattach
tasks:
  - name: long
    runtime: docker
    image: {BUSYBOX}
    steps:
      - "echo before; while [ ! -e /workspace/go ]; do sleep 0.1; done"
      - "echo after-restart"
"#
    ));
    let status = c.wait_until(job, T, "the container step to run", |v| task(v, "long")["state"] == "running");
    assert_eq!(task(&status, "long")["attempts"], 1);
    // Wait until the step runs inside its container (its first line arrived).
    let start = std::time::Instant::now();
    let state = c.path("agent-0-work/.state");
    let journaled = || state_log::peek(&state).is_ok_and(|kept| !kept.entries.is_empty());
    while !c.ok(&["logs", &job.to_string(), "long"]).contains("before") || !journaled() {
        assert!(start.elapsed() < T, "the step never printed");
        std::thread::sleep(Duration::from_millis(100));
    }
    c.kill_agent(0);
    c.restart_agent(0, 1);
    // Let the step finish only once the new agent is in charge (the node list may still show
    // the killed agent's session, so its log says when).
    wait_for_log(&c, "agent-0", "attached to running step");
    let work = c.path("agent-0-work");
    let ws = find_workspace(&work).expect("the attempt's workspace survives the agent");
    std::fs::write(ws.join("go"), "").unwrap();
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    assert_eq!(task(&status, "long")["attempts"], 1, "re-attached, not retried");
    let logs = c.ok(&["logs", &job.to_string(), "long"]);
    assert!(logs.contains("after-restart"), "{logs}");
}

#[test]
fn step_that_ends_while_the_agent_is_down_keeps_its_exit_code_and_the_task_goes_on() {
    ensure_busybox_image();
    let mut c = Cluster::start(1, 1);
    let job = c.submit(&format!(
        r#"
version: 1
name: finished-while-away
tasks:
  - name: long
    runtime: docker
    image: {BUSYBOX}
    steps:
      - "echo before; while [ ! -e /workspace/go ]; do sleep 0.1; done; touch /workspace/left"
      - "echo next-step"
"#
    ));
    let start = std::time::Instant::now();
    let state = c.path("agent-0-work/.state");
    let journaled = || state_log::peek(&state).is_ok_and(|kept| !kept.entries.is_empty());
    while !c.ok(&["logs", &job.to_string(), "long"]).contains("before") || !journaled() {
        assert!(start.elapsed() < T, "the step never printed");
        std::thread::sleep(Duration::from_millis(100));
    }
    c.kill_agent(0);
    // The step ends while no agent runs.
    let ws = find_workspace(&c.path("agent-0-work")).expect("the attempt's workspace survives the agent");
    std::fs::write(ws.join("go"), "").unwrap();
    while !ws.join("left").exists() {
        assert!(start.elapsed() < T, "the step never ended");
        std::thread::sleep(Duration::from_millis(50));
    }
    c.restart_agent(0, 1);
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    assert_eq!(task(&status, "long")["attempts"], 1, "followed, not retried");
    let logs = c.ok(&["logs", &job.to_string(), "long"]);
    assert!(logs.contains("next-step"), "{logs}");
}

/// Waits until the log of process `name` contains `needle`.
fn wait_for_log(c: &Cluster, name: &str, needle: &str) {
    let start = std::time::Instant::now();
    let path = c.path(&format!("{name}.log"));
    while !std::fs::read_to_string(&path).unwrap_or_default().contains(needle) {
        assert!(start.elapsed() < T, "{name} never logged {needle:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn find_workspace(root: &std::path::Path) -> Option<std::path::PathBuf> {
    for job in std::fs::read_dir(root).ok()?.flatten() {
        if !job.file_name().to_string_lossy().starts_with("job-") {
            continue;
        }
        if let Some(attempt) = std::fs::read_dir(job.path()).ok()?.flatten().next() {
            return Some(attempt.path());
        }
    }
    None
}
