//! MicroVM tasks end to end: an agent started with `--microvm` (QEMU, TCG where KVM does not
//! work) runs a task of a Docker image in a VM booted from the image, and its output and exit
//! code come back through the server. Needs `qemu-system-x86`, `linux-image-cloud-amd64`, a
//! Docker engine; the static guest agent is built into `target/guest-static`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{BUSYBOX, Cluster, ensure_busybox_image, task};

const T: Duration = Duration::from_secs(300);

/// The static guest agent, built once per test process (or `$DROVER_GUEST_AGENT`).
fn guest_agent() -> PathBuf {
    drover_agent::test_support::static_guest_agent().expect("the static guest agent")
}

/// The node's report, once `ready` holds for it.
fn wait_for_node(c: &Cluster, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let nodes: Value = serde_json::from_str(&c.ok(&["nodes", "-o", "json"])).expect("nodes json");
        if let Some(node) = nodes.as_array().and_then(|a| a.first()).filter(|n| ready(n)) {
            return node.clone();
        }
        assert!(start.elapsed() < T, "never saw {what}: {nodes:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_microvm_task_runs_through_the_cli_and_its_output_and_exit_code_come_back() {
    ensure_busybox_image();
    let guest = guest_agent();
    let mut c = Stopping(Cluster::start(0, 1));
    let warm = format!("{BUSYBOX}=1");
    c.0.add_agent_with(
        1,
        &["--microvm", "--microvm-warm", &warm],
        &[("DROVER_GUEST_AGENT", &guest.display().to_string())],
    );
    let node = wait_for_node(&c, "the microvm runtime", |n| {
        n["runtimes"].as_array().is_some_and(|r| r.iter().any(|r| r == "microvm"))
    });
    // The node says which accelerator its VMs use, as a label constraints can name.
    let accelerator = node["labels"]["drover.microvm"].as_str().unwrap_or_default();
    assert!(matches!(accelerator, "kvm" | "tcg"), "{node:#}");
    // The agent reports its warm VM (keyed by the image id, as shipped tasks name it).
    let node =
        wait_for_node(&c, "a warm vm", |n| n["warm"].as_object().is_some_and(|w| w.values().any(|c| c == 1)));
    let table = c.ok(&["nodes"]);
    assert!(table.contains("WARM VMS") && table.contains("=1"), "{table}");
    assert!(node["warm"].as_object().is_some_and(|w| w.keys().all(|k| k.starts_with("sha256:"))), "{node:#}");
    let job = c.submit(&format!(
        r#"
version: 1
name: vm
tasks:
  - name: vm
    runtime: microvm
    image: {BUSYBOX}
    steps:
      - "echo hello from $(uname -s) pid1=$(cat /proc/1/comm); ls /sys/class/net | tr '\n' ' '; echo"
      - "echo made-in-vm > result.txt; echo to-stderr >&2; exit 7"
"#
    ));
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "failed", "{status:#}");
    let t = task(&status, "vm");
    assert_eq!(t["exit_code"], 7, "{status:#}");
    let out = c.drover(&["logs", &job.to_string(), "vm"]);
    assert!(out.status.success());
    let (logs, errors) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(logs.contains("hello from Linux pid1=init"), "{logs}");
    assert_eq!(errors, "to-stderr\n");
    // The task (`network: none`) claimed the warm VM, which has no network device at all.
    assert!(logs.contains("pid1=init\nlo \n"), "{logs}");
}

/// A server and one microVM agent, for tests that restart the agent; the guest agent's path,
/// which a restart needs again. The restarted agent probes KVM again before it reconnects (up
/// to 10 s): a lease longer than that keeps its node, and so its attempt, from being given up
/// meanwhile.
fn restartable_microvm_cluster() -> (Stopping, String) {
    ensure_busybox_image();
    let guest = guest_agent().display().to_string();
    let mut c = Stopping(Cluster::start_with(0, 1, &["--lease", "60s", "--heartbeat", "300ms"], &[]));
    c.0.add_agent_with(1, &["--microvm"], &[("DROVER_GUEST_AGENT", guest.as_str())]);
    wait_for_node(&c, "the microvm runtime", |n| {
        n["runtimes"].as_array().is_some_and(|r| r.iter().any(|r| r == "microvm"))
    });
    (c, guest)
}

/// Waits until the output of `job` holds `what`.
fn wait_for_output(c: &Cluster, job: i64, what: &str) {
    let start = Instant::now();
    while !c.ok(&["logs", &job.to_string()]).contains(what) {
        assert!(start.elapsed() < T, "{what:?} never arrived");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_restarted_agent_reattaches_its_running_microvm_task_and_the_output_flows_on() {
    let (mut c, guest) = restartable_microvm_cluster();
    let env = [("DROVER_GUEST_AGENT", guest.as_str())];
    // The VM sees no host files: the step sleeps long enough for a restart to happen meanwhile.
    let job = c.submit(&format!(
        r#"
version: 1
name: vm-restart
tasks:
  - name: vm
    runtime: microvm
    image: {BUSYBOX}
    steps:
      - "echo before the restart; sleep 4; echo while no agent listened; sleep 26; echo after the restart; echo kept > result.txt"
      - "cat result.txt"
"#
    ));
    wait_for_output(&c, job, "before the restart");
    c.0.kill_agent(0);
    // The step writes a line while no agent runs: the guest holds it for the next one.
    std::thread::sleep(Duration::from_secs(5));
    c.0.restart_agent_with(0, 1, &["--microvm"], &env);
    crate::harness::wait_for_line(&c, "agent-0.log", "re-attached to a step", T);
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    assert_eq!(task(&status, "vm")["attempts"], 1, "re-attached, not retried: {status:#}");
    let logs = c.ok(&["logs", &job.to_string()]);
    assert_eq!(logs.matches("before the restart").count(), 1, "{logs}");
    assert_eq!(logs.matches("while no agent listened").count(), 1, "{logs}");
    assert_eq!(logs.matches("after the restart").count(), 1, "{logs}");
    // The second step ran in the same VM, on the files the first one left.
    assert!(logs.contains("kept"), "{logs}");
}

#[test]
fn a_microvm_step_that_ends_while_no_agent_listens_is_taken_over_with_its_files() {
    let (mut c, guest) = restartable_microvm_cluster();
    let env = [("DROVER_GUEST_AGENT", guest.as_str())];
    // The step ends (and changes a file) while its agent is away; the guest keeps its end,
    // output and changes for the restarted agent.
    let job = c.submit(&format!(
        r#"
version: 1
name: vm-ended-meanwhile
tasks:
  - name: vm
    runtime: microvm
    image: {BUSYBOX}
    steps:
      - "echo before the restart; sleep 3; echo ended while no agent listened; echo kept > result.txt; printf 'last words'"
      - "cat result.txt"
"#
    ));
    wait_for_output(&c, job, "before the restart");
    c.0.kill_agent(0);
    std::thread::sleep(Duration::from_secs(6));
    c.0.restart_agent_with(0, 1, &["--microvm"], &env);
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    assert_eq!(task(&status, "vm")["attempts"], 1, "taken over, not retried: {status:#}");
    let logs = c.ok(&["logs", &job.to_string(), "vm"]);
    assert_eq!(logs, "before the restart\nended while no agent listened\nlast words\nkept\n");
}

/// Stops the agent with SIGTERM however the test ends, so that it powers its warm VMs off
/// (the cluster's own teardown kills agents outright).
struct Stopping(Cluster);

impl std::ops::Deref for Stopping {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.0
    }
}

impl Drop for Stopping {
    fn drop(&mut self) {
        self.0.terminate_agent(0);
    }
}

/// An AI-agent task in a microVM: the repository is checked out on the node, the stand-in agent
/// runs inside the VM and reaches the LLM only through the node's metering proxy (the VM has
/// no other way out), and its edits come back as the patch artifact and a pushed branch.
#[test]
fn an_agent_task_runs_in_a_microvm_and_reaches_the_llm_only_through_the_proxy() {
    use crate::ai_agent::{REAL_KEY, allow_loopback_llm, fake_llm, git, repos};

    ensure_busybox_image();
    let guest = guest_agent();
    let mut c = Stopping(Cluster::start(0, 1));
    c.0.add_agent_with(1, &["--microvm"], &[("DROVER_GUEST_AGENT", &guest.display().to_string())]);
    wait_for_node(&c, "the microvm runtime", |n| {
        n["runtimes"].as_array().is_some_and(|r| r.iter().any(|r| r == "microvm"))
    });
    repos(&c);
    let (llm, keys) = fake_llm();
    // The host as user-mode networking would show it to the guest, were it not restricted.
    let llm_port = llm.rsplit(':').next().unwrap_or_default().to_owned();
    c.set_secret("LLM_KEY", REAL_KEY);
    allow_loopback_llm(&c);
    // busybox wget ignores NO_PROXY, hence `-Y off` for the proxy's host port.
    let job = c.submit(&format!(
        r#"
version: 1
name: vm-agent
tasks:
  - name: fix
    runtime: microvm
    image: {BUSYBOX}
    agent:
      command: |
        set -e
        wget -q -Y off -O reply.json --header "x-api-key: $ANTHROPIC_API_KEY" --header 'content-type: application/json' --post-data '{{"model":"m","max_tokens":10,"messages":[]}}' "$ANTHROPIC_BASE_URL/v1/messages"
        cat > prompt-seen.txt
        env | sort > env.txt
        cat /proc/1/comm > pid1.txt
        if wget -q -T 3 -Y off -O /dev/null "http://10.0.2.2:{llm_port}/v1/messages" 2>/dev/null; then echo reached > direct.txt; fi
        echo "fixed in the vm" >> README
        echo "agent done"
      prompt: "Add a line to README"
      repo: "file://{{{{ params.dir }}}}/origin"
      budget: {{ tokens: 1000 }}
      upstream: "{llm}"
      key_secret: LLM_KEY
      push: {{ remote: "file://{{{{ params.dir }}}}/remote.git", branch: drover/vm }}
"#
    ));
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    assert_eq!(c.ok(&["logs", &job.to_string(), "fix"]), "agent done\n");
    assert_eq!(*keys.lock().unwrap(), vec![REAL_KEY.to_owned()], "the upstream gets the real key, once");

    let patch = c.ok(&["artifacts", "get", &job.to_string(), "fix", "agent.patch", "-o", "-"]);
    assert!(patch.contains("+fixed in the vm"), "{patch}");
    assert!(patch.contains("+init"), "the agent ran in the VM, under the guest agent: {patch}");
    assert!(patch.contains("+Add a line to README"), "the prompt arrives on stdin: {patch}");
    assert!(patch.contains("+ANTHROPIC_BASE_URL=http://10.0.2.100:"), "{patch}");
    assert!(!patch.contains("direct.txt"), "the VM reached the upstream without the proxy: {patch}");
    assert!(!patch.contains(REAL_KEY), "the real key reached the VM: {patch}");
    assert_eq!(git(&c.path("remote.git"), &["show", "drover/vm:README"]), "hello\nfixed in the vm\n");
    let usage: Value = serde_json::from_str(&c.ok(&["usage", "--job", &job.to_string(), "--json"])).unwrap();
    assert_eq!(usage["jobs"][0]["input_tokens"], 8, "{usage:#}");
    assert_eq!(usage["jobs"][0]["output_tokens"], 5, "{usage:#}");
}
