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
    let marker = format!("bomb-{}", std::process::id());
    let job = c.submit(&format!(
        r#"
version: 1
name: bomb
tasks:
  - name: bomb
    resources: {{ pids: 32 }}
    command: "b() {{ b & b & }}; b; sleep 2; echo {marker}; exit 3"
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
