//! Agents cut off from their server, or left on a link that carries nothing: cancels sent
//! meanwhile are kept and applied when the agent is back, outputs kept meanwhile are
//! uploaded when it is back, an agent stops what its server handed on, and a restarted
//! server gives its agents a lease to come back.

use std::time::{Duration, Instant};

use crate::harness::{self, Cluster, alive, read_pid, task};
use crate::proxy::Proxy;

const T: Duration = Duration::from_secs(90);

/// Waits until `file` (a log) contains `what`.
fn wait_for_line(c: &Cluster, file: &str, what: &str) {
    harness::wait_for_line(c, file, what, T);
}

/// Waits until `file` (a log) contains `what` `n` times.
fn wait_for_lines(c: &Cluster, file: &str, what: &str, n: usize) {
    harness::wait_for_lines(c, file, what, n, T);
}

/// Waits until the task wrote `name` in the cluster's scratch dir.
fn wait_for_file(c: &Cluster, name: &str) {
    let start = Instant::now();
    while !c.path(name).exists() {
        assert!(start.elapsed() < T, "{name} never appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A server whose lease outlasts every cut here, and one agent of `cores` cores that reaches
/// it through a proxy the test can cut.
fn reached_through_a_proxy(cores: u32) -> (Cluster, Proxy) {
    let mut c = Cluster::start_with(0, cores, &["--lease", "60s", "--heartbeat", "300ms"], &[]);
    let proxy = Proxy::start(&c.addr);
    c.add_agent_via(cores, &proxy.url);
    c.wait_for_nodes(1);
    (c, proxy)
}

fn wait_gone(pid: i32, what: &str) {
    let start = Instant::now();
    while alive(pid) {
        assert!(start.elapsed() < Duration::from_secs(20), "{what} still runs");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_cancel_sent_while_the_node_was_cut_off_is_applied_when_it_is_back() {
    // A lease far longer than the cut: the node is never given up for lost, so only the kept
    // cancel can stop its attempts.
    let (c, proxy) = reached_through_a_proxy(2);
    let job = c.submit(
        r#"
version: 1
name: cut-off
tasks:
  - name: finisher
    command: "while [ ! -e {{ params.dir }}/go ]; do sleep 0.05; done; echo finished > {{ params.dir }}/finished"
  - name: looper
    command: "echo $$ > {{ params.dir }}/looper.pid; while true; do sleep 0.05; done"
"#,
    );
    c.wait_until(job, T, "both tasks to run", |v| {
        task(v, "finisher")["state"] == "running" && task(v, "looper")["state"] == "running"
    });
    let looper = read_pid(&c.path("looper.pid"));

    proxy.cut();
    wait_for_line(&c, "agent-0.log", "session with server failed");
    c.ok(&["cancel", &job.to_string()]);
    // While the node is away, one attempt runs to its end and the other runs on.
    std::fs::write(c.path("go"), "").unwrap();
    wait_for_file(&c, "finished");
    assert!(alive(looper), "the cancel could not have reached the node");
    assert_eq!(c.status(job)["state"], "running", "the job waits for its attempts");

    proxy.heal();
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "cancelled", "{status:#}");
    let finisher = task(&status, "finisher");
    assert_eq!(
        finisher["state"], "cancelled",
        "an attempt that ended after the cancel never succeeds: {finisher:#}"
    );
    assert!(finisher["reason"].as_str().unwrap_or_default().contains("after the cancel"), "{finisher:#}");
    assert_eq!(task(&status, "looper")["state"], "cancelled", "{status:#}");
    assert_eq!(task(&status, "looper")["attempts"], 1);
    wait_gone(looper, "the cancelled looper");
    c.wait_for_nodes(1);
}

#[test]
fn an_output_kept_while_the_server_is_out_of_reach_is_uploaded_when_it_is_back() {
    let (c, proxy) = reached_through_a_proxy(1);
    let job = c.submit(
        r#"
version: 1
name: cut-at-the-end
tasks:
  - name: render
    outputs: ["out/*.txt"]
    command: "mkdir -p out && echo frame > out/frame.txt && touch {{ params.dir }}/written; while [ ! -e {{ params.dir }}/go ]; do sleep 0.05; done"
"#,
    );
    wait_for_file(&c, "written");
    proxy.cut();
    wait_for_line(&c, "agent-0.log", "session with server failed");
    // The task ends while no server can be reached: its output's upload waits for one.
    std::fs::write(c.path("go"), "").unwrap();
    wait_for_lines(&c, "agent-0.log", "output upload failed; trying again", 2);
    assert_eq!(c.status(job)["state"], "running", "the attempt waits for its output");

    proxy.heal();
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    assert_eq!(task(&status, "render")["attempts"], 1, "{status:#}");
    let ls: serde_json::Value =
        serde_json::from_str(&c.ok(&["artifacts", "ls", &job.to_string(), "-o", "json"])).unwrap();
    assert_eq!(ls.as_array().map(Vec::len), Some(1), "{ls:#}");
    let got = c.ok(&["artifacts", "get", &job.to_string(), "render", "out/frame.txt", "-o", "-"]);
    assert_eq!(got, "frame\n");
}

#[test]
fn an_agent_on_a_link_that_carries_nothing_stops_its_task_before_it_is_handed_on() {
    let mut c = Cluster::start_with(0, 1, &[], &[]);
    let proxy = Proxy::start(&c.addr);
    c.add_agent_via(1, &proxy.url);
    c.wait_for_nodes(1);
    // Every attempt appends to a ledger outside Drover: the first one forever, the second
    // one once. Nothing of the first may come after the second began.
    let job = c.submit(
        r#"
version: 1
name: half-open
tasks:
  - name: work
    retries: { count: 1, backoff: 0s, on: [lost] }
    command: |
      if mkdir {{ params.dir }}/first 2>/dev/null; then
        echo $$ > {{ params.dir }}/first.pid
        # Each attempt runs as its own user: let the next one append too.
        touch {{ params.dir }}/ledger && chmod 0666 {{ params.dir }}/ledger
        while true; do echo "1 $(date +%s%N)" >> {{ params.dir }}/ledger; sleep 0.05; done
      fi
      echo "2 $(date +%s%N)" >> {{ params.dir }}/ledger
"#,
    );
    c.wait_until(job, T, "the first attempt to run", |v| task(v, "work")["state"] == "running");
    let first = read_pid(&c.path("first.pid"));

    proxy.freeze();
    // The server hears nothing for a lease and hands the task on; the agent, hearing of no
    // renewal for a lease, has stopped it by then.
    c.wait_until(job, T, "the task to be handed back to the queue", |v| task(v, "work")["state"] == "queued");
    wait_gone(first, "the first attempt");
    wait_for_line(&c, "agent-0.log", "lease ran out");

    proxy.heal();
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    let ledger = std::fs::read_to_string(c.path("ledger")).unwrap();
    let lines: Vec<&str> = ledger.lines().collect();
    let second = lines.iter().position(|l| l.starts_with("2 ")).expect("the second attempt ran");
    assert!(second > 0, "the first attempt ran before it: {ledger}");
    assert!(
        lines[second..].iter().all(|l| !l.starts_with("1 ")),
        "the first attempt ran on after the second began:\n{ledger}"
    );
}

#[test]
fn a_restarted_server_gives_its_agents_a_lease_to_come_back() {
    let mut c = Cluster::start(1, 1);
    let job = c.submit(
        r#"
version: 1
name: outage
tasks:
  - name: work
    command: "while [ ! -e {{ params.dir }}/go ]; do sleep 0.05; done; echo done"
"#,
    );
    c.wait_until(job, T, "the task to run", |v| task(v, "work")["state"] == "running");
    c.kill_server();
    // Down for a third of the lease: the agent's lease still runs when the server is back.
    std::thread::sleep(Duration::from_secs(1));
    c.start_server();
    wait_for_line(&c, "server.log", "agents have one lease to reconnect");
    wait_for_lines(&c, "agent-0.log", "registered with server", 2);
    c.wait_for_nodes(1);
    std::fs::write(c.path("go"), "").unwrap();
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    assert_eq!(task(&status, "work")["attempts"], 1, "nothing was lost: {status:#}");
    assert!(!c.server_log().contains("node lease expired"), "no node was given up");
}
