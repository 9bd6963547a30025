//! An agent task on the host with real git, the real process runtime, the real proxy and a
//! fake LLM upstream on loopback.

use std::path::Path;
use std::process::Command as Std;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::HeaderMap;
use drover_core::{Command, PushSpec};
use tokio::sync::mpsc;

use super::*;
use crate::runtime::Runtime;
use crate::runtime::process::ProcessRuntime;

const REAL_KEY: &str = "sk-real-key-that-stays-on-the-host";

type Keys = Arc<Mutex<Vec<String>>>;

/// A fake Anthropic API: every call costs 8 input and 5 output tokens. Returns its base URL
/// and the keys it was called with.
async fn upstream() -> (String, Keys) {
    let keys: Keys = Arc::default();
    let app = axum::Router::new()
        .fallback(|State(keys): State<Keys>, headers: HeaderMap| async move {
            let key = headers.get("x-api-key").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            keys.lock().unwrap_or_else(|e| e.into_inner()).push(key);
            (
                [("content-type", "application/json")],
                r#"{"type":"message","content":[],"usage":{"input_tokens":8,"output_tokens":5}}"#,
            )
        })
        .with_state(keys.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), keys)
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Std::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@localhost", "-c", "init.defaultBranch=main"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A repository with one commit, and an empty bare one to push to; returns their URLs.
fn repos(root: &Path) -> (String, String) {
    let origin = root.join("origin");
    std::fs::create_dir_all(&origin).unwrap();
    git(&origin, &["init", "-q"]);
    std::fs::write(origin.join("README"), "hello\n").unwrap();
    git(&origin, &["add", "README"]);
    git(&origin, &["commit", "-q", "-m", "first"]);
    git(root, &["init", "-q", "--bare", "remote.git"]);
    (format!("file://{}", origin.display()), format!("file://{}", root.join("remote.git").display()))
}

/// Runs every step of `task` with the process runtime; returns the last exit code.
async fn run_steps(task: &TaskSpec) -> Option<i32> {
    let runtime = ProcessRuntime::new();
    runtime.prepare(task).await.unwrap();
    let mut code = None;
    for step in 0..task.steps.len() {
        let (tx, mut rx) = mpsc::channel::<crate::runtime::OutputChunk>(64);
        let drain = tokio::spawn(async move {
            let mut text = Vec::new();
            while let Some(c) = rx.recv().await {
                text.extend_from_slice(&c.data);
            }
            text
        });
        let handle = runtime.start(task, step, tx).await.unwrap();
        code = runtime.wait(&handle).await.unwrap().code;
        let text = drain.await.unwrap();
        eprintln!("step {step}: {}", String::from_utf8_lossy(&text));
    }
    runtime.cleanup(task).await.unwrap();
    code
}

fn agent(script: &str, repo: &str, upstream: &str, budget: Option<u64>, push: Option<PushSpec>) -> AiTask {
    AiTask {
        spec: AgentSpec {
            command: Command::Argv(vec!["/bin/sh".into(), "-c".into(), script.into()]),
            prompt: "Add a line to README\nand nothing else".into(),
            prompt_file: None,
            repo: Some(repo.into()),
            budget,
            push,
            provider: LlmProvider::Anthropic,
            upstream: Some(upstream.into()),
            key_secret: Some("LLM_KEY".into()),
        },
        inputs: vec![],
        llm_key: REAL_KEY.into(),
        default_upstream: None,
    }
}

/// The stand-in agent: calls the LLM through the proxy, keeps the prompt and its environment
/// (both land in the patch), edits a file, and plants git hooks and config in the workspace
/// that would run a command on the host if the host's git read them.
const SCRIPT: &str = r#"set -e
curl -sf -H "x-api-key: $ANTHROPIC_API_KEY" -d '{"model":"m"}' "$ANTHROPIC_BASE_URL/v1/messages" > reply.json
cat > prompt-seen.txt
env | sort > env.txt
echo fixed >> README
mkdir -p .git/hooks
printf '#!/bin/sh\ntouch "%s"\n' "$MARKER" > .git/hooks/pre-commit
chmod +x .git/hooks/pre-commit
printf '[core]\n\tfsmonitor = touch %s\n\thooksPath = .git/hooks\n' "$MARKER" > .git/config
"#;

#[tokio::test]
async fn the_agent_edits_a_checkout_and_its_changes_become_a_patch_and_a_branch() {
    let root = tempfile::tempdir().unwrap();
    let (origin, remote) = repos(root.path());
    let (upstream, keys) = upstream().await;
    let push = PushSpec { remote: remote.clone(), branch: "drover/fix".into() };
    let ai = agent(SCRIPT, &origin, &upstream, Some(1000), Some(push));
    let marker = root.path().join("host-command-ran");
    let mut task = TaskSpec {
        job_id: 1,
        task_id: 2,
        attempt_id: 3,
        steps: vec![ai.spec.command.to_argv()],
        env: [("MARKER".to_owned(), marker.display().to_string())].into(),
        workspace: root.path().join("work/attempt-3"),
        ..Default::default()
    };
    let prepared = prepare(&ai, &mut task).await.unwrap();
    assert_eq!(task.host_ports.len(), 1);
    assert_eq!(task.host_ports[0].name, "llm");
    let token = task.env["ANTHROPIC_API_KEY"].clone();
    assert!(token.starts_with("drover-task-") && token != REAL_KEY);
    assert_eq!(task.env["OPENAI_API_KEY"], token);
    assert!(!root.path().join("work/attempt-3/.git").exists(), "the git directory is outside the workspace");

    assert_eq!(run_steps(&task).await, Some(0));
    let wrapup = prepared.finish(true).await;
    assert_eq!(wrapup.notes, Vec::<String>::new());
    assert_eq!((wrapup.tokens.input_tokens, wrapup.tokens.output_tokens, wrapup.tokens.calls), (8, 5, 1));
    assert!(!wrapup.budget_spent);
    assert_eq!(*keys.lock().unwrap(), vec![REAL_KEY.to_owned()], "the upstream got the real key");

    let ws = root.path().join("work/attempt-3");
    let env = std::fs::read_to_string(ws.join("env.txt")).unwrap();
    assert!(!env.contains(REAL_KEY), "the real key reached the sandbox");
    assert!(env.contains(&format!("ANTHROPIC_API_KEY={token}")));
    assert!(env.contains(&format!("DROVER_HOST_LLM={}", task.host_ports[0].addr)));
    assert_eq!(std::fs::read_to_string(ws.join("prompt-seen.txt")).unwrap(), ai.spec.prompt);
    let patch = std::fs::read_to_string(ws.join(PATCH_FILE)).unwrap();
    assert!(patch.contains("+fixed"), "{patch}");
    assert!(patch.contains("b/env.txt") && patch.contains("b/reply.json"), "{patch}");
    assert!(!patch.contains("prompt.txt") && !patch.contains("agent.patch"), "{patch}");
    assert!(!marker.exists(), "git on the host ran a command the sandbox planted");

    let pushed = root.path().join("remote.git");
    assert_eq!(git(&pushed, &["show", "drover/fix:README"]), "hello\nfixed\n");
    let message = git(&pushed, &["log", "-1", "--format=%s%n%b", "drover/fix"]);
    assert!(message.starts_with("Add a line to README\n"), "{message}");
    assert!(message.contains("job 1, task 2, attempt 3"), "{message}");
    assert!(!root.path().join("work/attempt-3.git").exists(), "the git directory is removed");
}

#[tokio::test]
async fn a_spent_budget_refuses_calls_and_nothing_is_pushed() {
    let root = tempfile::tempdir().unwrap();
    let (origin, remote) = repos(root.path());
    let (upstream, keys) = upstream().await;
    // Two calls of 13 tokens against a budget of 10: the second is refused with 429.
    let script = r#"
call() { curl -s -o /dev/null -w '%{http_code}\n' -H "x-api-key: $ANTHROPIC_API_KEY" -d '{}' "$ANTHROPIC_BASE_URL/v1/messages"; }
call > codes.txt; call >> codes.txt
echo more >> README
"#;
    let push = PushSpec { remote, branch: "drover/never".into() };
    let ai = agent(script, &origin, &upstream, Some(10), Some(push));
    let mut task = TaskSpec {
        steps: vec![ai.spec.command.to_argv()],
        workspace: root.path().join("ws"),
        ..Default::default()
    };
    let prepared = prepare(&ai, &mut task).await.unwrap();
    assert_eq!(run_steps(&task).await, Some(0));
    let wrapup = prepared.finish(true).await;
    assert!(wrapup.budget_spent);
    assert_eq!((wrapup.tokens.total_tokens(), wrapup.tokens.calls, wrapup.tokens.refused), (13, 1, 1));
    assert_eq!(std::fs::read_to_string(root.path().join("ws/codes.txt")).unwrap(), "200\n429\n");
    assert_eq!(keys.lock().unwrap().len(), 1, "the refused call never reached the upstream");
    let patch = std::fs::read_to_string(root.path().join("ws").join(PATCH_FILE)).unwrap();
    assert!(patch.contains("+more"), "{patch}");
    let branches = git(&root.path().join("remote.git"), &["branch", "--list"]);
    assert_eq!(branches, "", "a task over budget pushes nothing");
}

#[tokio::test]
async fn an_input_tree_becomes_the_repository_and_the_agent_runs_in_it() {
    let root = tempfile::tempdir().unwrap();
    let ws = root.path().join("ws");
    std::fs::create_dir_all(ws.join("src")).unwrap();
    std::fs::write(ws.join("src/lib.txt"), "v1\n").unwrap();
    let mut ai = agent("pwd > where.txt; echo v2 > lib.txt", "src/", "http://127.0.0.1:9", None, None);
    ai.spec.key_secret = None;
    ai.inputs = vec![InputSpec { source: drover_core::InputSource::Path("./src".into()), to: "src".into() }];
    let mut task =
        TaskSpec { steps: vec![ai.spec.command.to_argv()], workspace: ws.clone(), ..Default::default() };
    let prepared = prepare(&ai, &mut task).await.unwrap();
    assert!(task.host_ports.is_empty() && !task.env.contains_key("ANTHROPIC_API_KEY"), "no key, no proxy");
    assert_eq!(run_steps(&task).await, Some(0));
    let wrapup = prepared.finish(true).await;
    assert_eq!(wrapup.tokens, TokenUsage::default());
    let patch = std::fs::read_to_string(ws.join(PATCH_FILE)).unwrap();
    assert!(patch.contains("-v1\n+v2"), "{patch}");
    assert!(patch.contains("b/where.txt"), "{patch}");
    let canonical = std::fs::canonicalize(ws.join("src")).unwrap();
    assert_eq!(
        std::fs::read_to_string(ws.join("src/where.txt")).unwrap().trim(),
        canonical.display().to_string()
    );
}

#[tokio::test]
async fn the_prompt_can_come_from_a_file_in_the_checkout_but_not_from_outside() {
    let root = tempfile::tempdir().unwrap();
    let (origin, _) = repos(root.path());
    std::fs::write(root.path().join("outside.md"), "secret plans\n").unwrap();
    let mut ai = agent("cat > seen.txt", &origin, "http://127.0.0.1:9", None, None);
    ai.spec.key_secret = None;
    ai.spec.prompt = String::new();
    ai.spec.prompt_file = Some("README".into());
    let mut task = TaskSpec {
        steps: vec![ai.spec.command.to_argv()],
        workspace: root.path().join("ws"),
        ..Default::default()
    };
    let prepared = prepare(&ai, &mut task).await.unwrap();
    assert_eq!(run_steps(&task).await, Some(0));
    prepared.finish(true).await;
    assert_eq!(std::fs::read_to_string(root.path().join("ws/seen.txt")).unwrap(), "hello\n");

    let ws = root.path().join("ws2");
    std::fs::create_dir_all(&ws).unwrap();
    std::os::unix::fs::symlink(root.path().join("outside.md"), ws.join("link.md")).unwrap();
    ai.spec.repo = None;
    ai.spec.prompt_file = Some("link.md".into());
    let mut task = TaskSpec { workspace: ws, ..Default::default() };
    let e = prepare(&ai, &mut task).await.err().expect("a link out of the workspace");
    assert!(e.to_string().contains("leads outside the workspace"), "{e}");
    assert!(!root.path().join("ws2.git").exists());
}

#[tokio::test]
async fn a_missing_key_or_upstream_is_a_setup_error() {
    let root = tempfile::tempdir().unwrap();
    let mut ai = agent("true", "", "http://127.0.0.1:9", None, None);
    ai.spec.repo = None;
    ai.llm_key = String::new();
    let mut task = TaskSpec { steps: vec![], workspace: root.path().join("ws"), ..Default::default() };
    let e = prepare(&ai, &mut task).await.err().expect("no key");
    assert!(e.to_string().contains("no secret `LLM_KEY`"), "{e}");
    assert!(!root.path().join("ws.git").exists(), "a failed setup leaves no git directory");
    ai.llm_key = REAL_KEY.into();
    ai.spec.upstream = None;
    let e = prepare(&ai, &mut task).await.err().expect("no upstream");
    assert!(e.to_string().contains("--llm-upstream"), "{e}");
}

#[test]
fn commit_messages_use_the_prompts_first_line() {
    assert_eq!(
        commit_message("\n  Fix it  \nmore", (1, 2, 3)),
        "Fix it\n\nMade by drover job 1, task 2, attempt 3.\n"
    );
}
