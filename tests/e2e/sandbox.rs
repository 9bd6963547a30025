//! The process sandbox on a real node: the agent says at start which limits it enforces and
//! advertises them, a fork bomb stops at its pids limit and leaves nothing behind, and memory
//! over the limit ends the task as `oom`. CI runs as root with the memory and pids
//! controllers, so these run there; a host without them skips with a line saying why.

use std::time::Duration;

use crate::harness::{Cluster, task};

const T: Duration = Duration::from_secs(90);

/// Whether the node's agent enforces `limit`, from its node labels; in CI it must.
fn enforces(c: &Cluster, limit: &str) -> bool {
    let nodes: serde_json::Value = serde_json::from_str(&c.ok(&["nodes", "-o", "json"])).expect("nodes json");
    let label = format!("drover.enforces.{limit}");
    let yes = nodes.as_array().into_iter().flatten().all(|n| n["labels"][&label] == "yes");
    assert!(yes || std::env::var_os("CI").is_none(), "CI nodes must enforce {limit} limits: {nodes:#}");
    if !yes {
        eprintln!("this host's agent does not enforce {limit} limits; skipping");
    }
    yes
}

#[test]
fn the_agent_names_what_it_enforces_and_a_fork_bomb_stops_at_its_limit() {
    let c = Cluster::start(1, 2);
    let log = std::fs::read_to_string(c.path("agent-0.log")).expect("agent log");
    assert!(log.contains("limits this node enforces on process tasks"), "{log}");
    if !enforces(&c, "pids") {
        return;
    }
    assert!(log.contains("enforces=memory,pids"), "{log}");
    // A marker in the command line, so that any survivor can be found in /proc afterwards.
    // The task's own shell forks its timer and the bomb's root before the bomb grows, and
    // then forks nothing more: a shell that cannot fork exits 2, so a fork of its own after
    // the bomb filled the limit would race the bomb for the last pid.
    let marker = format!("bomb-{}", std::process::id());
    let job = c.submit(&format!(
        r#"
version: 1
name: bomb
tasks:
  - name: bomb
    resources: {{ pids: 32 }}
    command: "sleep 2 & s=$!; (b() {{ b & b & }}; b) & wait $s; echo {marker}; exit 3"
"#
    ));
    let status = c.wait_done(job, T);
    let t = task(&status, "bomb");
    assert_eq!((t["state"].as_str(), t["exit_code"].as_i64()), (Some("failed"), Some(3)), "{status:#}");
    let out = c.drover(&["logs", &job.to_string(), "bomb"]);
    let logs = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let logs = logs.to_lowercase();
    assert!(logs.contains("fork"), "the shell should say it could not fork: {logs}");
    // Cleanup killed the whole cgroup: no process of the bomb is left.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let survivors: Vec<String> = std::fs::read_dir("/proc")
            .expect("/proc")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
            .filter(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .is_ok_and(|cmd| String::from_utf8_lossy(&cmd).contains(&marker))
            })
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if survivors.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "bomb processes survived: {survivors:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn memory_over_the_limit_ends_the_task_as_oom() {
    let c = Cluster::start(1, 2);
    if !enforces(&c, "memory") {
        return;
    }
    let job = c.submit(
        r#"
version: 1
name: hog
tasks:
  - name: hog
    resources: { memory: 20MiB }
    command: "dd if=/dev/zero of=/dev/null bs=100M count=1"
"#,
    );
    let status = c.wait_done(job, T);
    let t = task(&status, "hog");
    assert_eq!((t["state"].as_str(), t["failure"].as_str()), (Some("failed"), Some("oom")), "{status:#}");
}

#[test]
fn a_process_task_cannot_read_the_journal_another_workspace_or_the_database() {
    let mut c = Cluster::start(0, 2);
    let server_data = c.path("server-data");
    c.add_agent_with(2, &["--hide-from-tasks", &server_data.display().to_string()], &[]);
    c.wait_for_nodes(1);
    let work = c.path("agent-0-work");
    let job = c.submit(&format!(
        r#"
version: 1
name: neighbours
tasks:
  - name: victim
    command: "echo victim-secret > secret.txt; sleep 4"
  - name: intruder
    command: |
      sleep 1
      id -u
      cat {work}/.state/log && echo LEAK-state
      cat {work}/.node-credential.json && echo LEAK-credential
      cat {work}/job-*/attempt-*/secret.txt && echo LEAK-workspace
      ls -A {data} | grep . && echo LEAK-listed-data
      cat {data}/drover.db > /dev/null && echo LEAK-database
      echo planted > {work}/planted && echo LEAK-write
      echo done
"#,
        work = work.display(),
        data = server_data.display(),
    ));
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    let out = c.drover(&["logs", &job.to_string(), "intruder"]);
    let logs = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(logs.contains("done"), "{logs}");
    assert!(!logs.contains("LEAK") && !logs.contains("victim-secret"), "{logs}");
    let uid: u32 = logs.lines().find_map(|l| l.trim().parse().ok()).expect("the task's uid");
    assert_ne!(uid, 0, "tasks never run as root");
    assert!(!work.join("planted").exists());
    // The node is unchanged: its state log and credential are still the agent's alone.
    use std::os::unix::fs::MetadataExt;
    for file in [".state", ".state/log", ".node-credential.json"] {
        if let Ok(meta) = std::fs::metadata(work.join(file)) {
            assert_eq!((meta.uid(), meta.mode() & 0o077), (0, 0), "{file}");
        }
    }
}

#[test]
fn a_named_account_runs_the_task_only_where_project_and_node_allow_it() {
    let mut c = Cluster::start(0, 2);
    c.add_agent_with(2, &["--run-as", "nobody"], &[]);
    c.wait_for_nodes(1);
    let job_file = c.job_file(
        "artist.yaml",
        "version: 1\nname: artist\ntasks:\n  - name: frame\n    user: nobody\n    command: id -un\n",
    );
    // The project does not allow it yet: the submit is refused, naming the setting.
    let refused = c.drover(&["submit", &job_file.display().to_string()]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("run_as"), "{refused:?}");
    c.ok(&["projects", "set", "default", "run_as=nobody"]);
    let job = c
        .submit("version: 1\nname: artist\ntasks:\n  - name: frame\n    user: nobody\n    command: id -un\n");
    let status = c.wait_done(job, T);
    if status["state"] != "succeeded" && !running_as_root() {
        // An agent that is not root cannot switch accounts; the task says so.
        return;
    }
    assert_eq!(status["state"], "succeeded", "{status:#}");
    let out = c.drover(&["logs", &job.to_string(), "frame"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "nobody");
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Uid:").map(|v| v.split_whitespace().next() == Some("0")))
        })
        .unwrap_or(false)
}
