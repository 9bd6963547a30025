//! AI-agent tasks end to end: a stand-in coding agent (a shell script calling the LLM through
//! the node's metering proxy with curl) edits a checkout; its changes come back as the
//! `agent.patch` artifact and as a branch pushed to a bare repository; tokens show in
//! `drover usage`; a spent budget fails the task with the `budget` class.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::harness::{Cluster, task};

const T: Duration = Duration::from_secs(90);
pub(crate) const REAL_KEY: &str = "sk-ant-real-key-only-the-node-may-see";

/// A fake Anthropic Messages API on loopback: every call reports 8 input and 5 output tokens.
/// Returns its base URL and the `x-api-key` of every call it got.
pub(crate) fn fake_llm() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let keys = Arc::new(Mutex::new(Vec::new()));
    let seen = keys.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let (mut key, mut length) = (String::new(), 0usize);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("x-api-key:") {
                    key = line[line.len() - v.len()..].trim().to_owned();
                } else if let Some(v) = lower.strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; length];
            let _ = reader.read_exact(&mut body);
            seen.lock().unwrap().push(key);
            let reply = r#"{"type":"message","role":"assistant","content":[{"type":"text","text":"add a line"}],"usage":{"input_tokens":8,"output_tokens":5}}"#;
            let _ = write!(
                reader.get_mut(),
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                reply.len()
            );
        }
    });
    (url, keys)
}

pub(crate) fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@localhost", "-c", "init.defaultBranch=main"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A repository with one commit and an empty bare repository to push to, in the scratch dir.
pub(crate) fn repos(c: &Cluster) {
    let origin = c.path("origin");
    std::fs::create_dir_all(&origin).unwrap();
    git(&origin, &["init", "-q"]);
    std::fs::write(origin.join("README"), "hello\n").unwrap();
    git(&origin, &["add", "README"]);
    git(&origin, &["commit", "-q", "-m", "first"]);
    git(&c.path(""), &["init", "-q", "--bare", "remote.git"]);
}

/// Lets the default project's agents reach the stand-in LLM, which speaks plain HTTP on
/// loopback (projects allow https upstreams only by default).
pub(crate) fn allow_loopback_llm(c: &Cluster) {
    c.ok(&["projects", "set", "default", "llm_upstreams=https://*,http://127.0.0.1:*"]);
}

/// The stand-in coding agent: one LLM call through the proxy, then it edits the checkout and
/// leaves what it saw (prompt on stdin, environment) as files, which end up in the patch.
const FAKE_AGENT: &str = r#"#!/bin/sh
set -e
curl -sf -H "x-api-key: $ANTHROPIC_API_KEY" -H 'content-type: application/json' \
  -d '{"model":"m","max_tokens":10,"messages":[]}' "$ANTHROPIC_BASE_URL/v1/messages" > reply.json
cat > prompt-seen.txt
env | sort > env.txt
echo "fixed by the agent" >> README
echo "agent done"
"#;

#[test]
fn an_agent_task_leaves_a_patch_and_a_pushed_branch_and_never_sees_the_key() {
    let c = Cluster::start(1, 2);
    repos(&c);
    let (llm, keys) = fake_llm();
    std::fs::write(c.path("fake-agent.sh"), FAKE_AGENT).unwrap();
    c.set_secret("LLM_KEY", REAL_KEY);
    allow_loopback_llm(&c);
    let job = c.submit(&format!(
        r#"
version: 1
name: agent
tasks:
  - name: fix
    runtime: process
    agent:
      command: ["/bin/sh", "{{{{ params.dir }}}}/fake-agent.sh"]
      prompt: "Add a line to README"
      repo: "file://{{{{ params.dir }}}}/origin"
      budget: {{ tokens: 1000 }}
      provider: anthropic
      upstream: "{llm}"
      key_secret: LLM_KEY
      push: {{ remote: "file://{{{{ params.dir }}}}/remote.git", branch: drover/fix }}
"#
    ));
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    assert_eq!(c.ok(&["logs", &job.to_string(), "fix"]), "agent done\n");
    assert_eq!(*keys.lock().unwrap(), vec![REAL_KEY.to_owned()], "the upstream gets the real key, once");

    let patch = c.ok(&["artifacts", "get", &job.to_string(), "fix", "agent.patch", "-o", "-"]);
    assert!(patch.contains("+fixed by the agent"), "{patch}");
    assert!(patch.contains("+Add a line to README"), "the prompt arrives on stdin: {patch}");
    assert!(patch.contains("+ANTHROPIC_API_KEY=drover-task-"), "{patch}");
    assert!(patch.contains("+ANTHROPIC_BASE_URL=http://127.0.0.1:"), "{patch}");
    assert!(!patch.contains(REAL_KEY), "the real key reached the sandbox: {patch}");

    let remote = c.path("remote.git");
    assert_eq!(git(&remote, &["show", "drover/fix:README"]), "hello\nfixed by the agent\n");
    assert_eq!(git(&remote, &["log", "-1", "--format=%s", "drover/fix"]), "Add a line to README\n");

    let usage: Value = serde_json::from_str(&c.ok(&["usage", "--job", &job.to_string(), "--json"])).unwrap();
    let row = &usage["jobs"][0];
    assert_eq!(
        (row["input_tokens"].as_u64(), row["output_tokens"].as_u64()),
        (Some(8), Some(5)),
        "{usage:#}"
    );
    assert_eq!(usage["projects"][0]["project"], "default", "{usage:#}");
    assert_eq!(usage["projects"][0]["input_tokens"], 8, "{usage:#}");
    let table = c.ok(&["usage"]);
    assert!(table.contains("INPUT TOKENS") && table.contains("agent"), "{table}");
}

#[test]
fn a_spent_budget_refuses_calls_and_fails_the_task_with_budget() {
    let c = Cluster::start(1, 2);
    let (llm, keys) = fake_llm();
    c.set_secret("LLM_KEY", REAL_KEY);
    allow_loopback_llm(&c);
    // Each call costs 13 tokens against a budget of 20: the third call is refused with 429.
    let job = c.submit(&format!(
        r#"
version: 1
name: over-budget
tasks:
  - name: spend
    runtime: process
    agent:
      command: |
        for i in 1 2 3; do
          curl -s -o /dev/null -w '%{{http_code}}\n' -H "x-api-key: $ANTHROPIC_API_KEY" -d '{{}}' "$ANTHROPIC_BASE_URL/v1/messages"
        done
      prompt: "Spend"
      budget: 20
      upstream: "{llm}"
      key_secret: LLM_KEY
"#
    ));
    let status = c.wait_done(job, T);
    let t = task(&status, "spend");
    assert_eq!((t["state"].as_str(), t["failure"].as_str()), (Some("failed"), Some("budget")), "{status:#}");
    assert!(t["reason"].as_str().unwrap_or_default().contains("token budget spent"), "{status:#}");
    assert_eq!(c.ok(&["logs", &job.to_string(), "spend"]), "200\n200\n429\n");
    assert_eq!(keys.lock().unwrap().len(), 2, "the refused call never reaches the upstream");
    let usage: Value =
        serde_json::from_str(&c.ok(&["usage", "--job", &job.to_string(), "-o", "json"])).unwrap();
    assert_eq!(usage["jobs"][0]["input_tokens"], 16, "{usage:#}");
    assert_eq!(usage["jobs"][0]["output_tokens"], 10, "{usage:#}");
}

#[test]
fn a_restarted_agent_takes_its_agent_task_over_and_the_budget_holds_across_the_restart() {
    let mut c = Cluster::start(1, 2);
    let (llm, keys) = fake_llm();
    c.set_secret("LLM_KEY", REAL_KEY);
    allow_loopback_llm(&c);
    // One call before the agent dies, two after: 13 tokens each against a budget of 20, so
    // the third is refused only if the restarted proxy counts the first.
    let job = c.submit(&format!(
        r#"
version: 1
name: restart
tasks:
  - name: agent
    runtime: process
    agent:
      command: |
        call() {{ curl -s -o /dev/null -w '%{{http_code}}\n' -H "x-api-key: $ANTHROPIC_API_KEY" -d '{{}}' "$ANTHROPIC_BASE_URL/v1/messages"; }}
        call
        echo $$ > {{{{ params.dir }}}}/agent.pid
        while [ ! -e {{{{ params.dir }}}}/go ]; do sleep 0.05; done
        call
        call
      prompt: "Spend"
      budget: 20
      upstream: "{llm}"
      key_secret: LLM_KEY
"#
    ));
    let pid = crate::harness::read_pid(&c.path("agent.pid"));
    // At once: the first call's tokens were written down before its response reached the task.
    c.kill_agent(0);
    assert!(crate::harness::alive(pid), "the task outlives a SIGKILLed agent");
    c.restart_agent(0, 2);
    crate::harness::wait_for_line(&c, "agent-0.log", "taken over after a restart", T);
    std::fs::write(c.path("go"), "").unwrap();
    let status = c.wait_done(job, T);
    let t = task(&status, "agent");
    assert_eq!((t["state"].as_str(), t["failure"].as_str()), (Some("failed"), Some("budget")), "{status:#}");
    assert_eq!(t["attempts"], 1, "taken over, not retried: {status:#}");
    assert_eq!(c.ok(&["logs", &job.to_string(), "agent"]), "200\n200\n429\n");
    assert_eq!(*keys.lock().unwrap(), vec![REAL_KEY.to_owned(); 2], "the restarted proxy has the real key");
    let usage: Value =
        serde_json::from_str(&c.ok(&["usage", "--job", &job.to_string(), "-o", "json"])).unwrap();
    assert_eq!(usage["jobs"][0]["input_tokens"], 16, "both runs' calls counted: {usage:#}");
    assert_eq!(usage["jobs"][0]["output_tokens"], 10, "{usage:#}");
}
