//! Downloads while a task runs: the agent streams a file's current content from the task's
//! workspace through the server, over gRPC (`drover artifacts get`) and the HTTP API; once the
//! task ended, the same requests are served from the blob store.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Cluster, task};

const T: Duration = Duration::from_secs(90);

/// A cluster whose server also serves the HTTP API, on a port it picks; returns the API's
/// base URL, which the server prints before it starts listening for gRPC.
fn with_http_api() -> (Cluster, String) {
    let c = Cluster::start_with(1, 2, &["--http", "127.0.0.1:0"], &[]);
    let log = std::fs::read_to_string(c.path("server.log")).expect("server log");
    let base = log
        .lines()
        .find_map(|l| l.strip_prefix("http api on "))
        .unwrap_or_else(|| panic!("the server did not say where the http api is:\n{log}"))
        .trim()
        .to_string();
    (c, format!("{base}/v1"))
}

/// A GET with a real HTTP client carrying `key`: status, Content-Length header, body.
pub fn http_get(key: &str, url: &str) -> (u16, Option<u64>, Vec<u8>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let resp = reqwest::Client::new()
            .get(url)
            .bearer_auth(key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = resp.status().as_u16();
        let length = resp
            .headers()
            .get(reqwest::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body = resp.bytes().await.unwrap_or_else(|e| panic!("GET {url} body: {e}")).to_vec();
        (status, length, body)
    })
}

/// Lines `line 0`, `line 1`, ... in order; a trailing partial line is ignored.
fn assert_counting(text: &str) -> usize {
    let complete = &text[..text.rfind('\n').map(|i| i + 1).unwrap_or(0)];
    for (i, line) in complete.lines().enumerate() {
        assert_eq!(line, format!("line {i}"), "in {text:?}");
    }
    complete.lines().count()
}

#[test]
fn a_file_still_being_appended_downloads_live_then_from_the_blob_store() {
    let (c, api) = with_http_api();
    std::fs::write(c.path("outside.txt"), "must never be read").unwrap();
    let job = c.submit(
        r#"
version: 1
name: live
tasks:
  - name: grow
    outputs: ["progress.txt", "big.txt"]
    command: |
      seq 1 300000 > big.txt
      ln -s {{ params.dir }}/outside.txt leak.txt
      i=0
      while [ ! -e {{ params.dir }}/release ]; do echo "line $i" >> progress.txt; i=$((i+1)); sleep 0.05; done
      echo "line $i" >> progress.txt
"#,
    );
    let id = job.to_string();
    let get = |path: &str| c.drover(&["artifacts", "get", &id, "grow", path, "-o", "-"]);

    // The file appears once the task runs; read it while it grows.
    let start = Instant::now();
    let first = loop {
        let out = get("progress.txt");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && assert_counting(&text) >= 5 {
            break text;
        }
        assert!(
            start.elapsed() < T,
            "the live file never showed 5 lines: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let status = c.status(job);
    assert_eq!(task(&status, "grow")["state"], "running", "{status:#}");
    let second = loop {
        let out = get("progress.txt");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if assert_counting(&text) > assert_counting(&first) {
            break text;
        }
        assert!(start.elapsed() < T, "the live file stopped growing");
        std::thread::sleep(Duration::from_millis(200));
    };
    let complete = &first[..first.rfind('\n').unwrap() + 1];
    assert!(second.starts_with(complete), "a later read must extend the earlier one");

    // More than one window of a file, byte for byte.
    let expected_big: String = (1..=300_000).map(|i| format!("{i}\n")).collect();
    let big = get("big.txt");
    assert!(big.status.success(), "{}", String::from_utf8_lossy(&big.stderr));
    assert!(big.stdout == expected_big.as_bytes(), "live download of big.txt differs");
    // Into a directory, under the file's name, with the same content.
    std::fs::create_dir_all(c.path("downloads")).unwrap();
    c.ok(&["artifacts", "get", &id, "grow", "big.txt", "-o", &c.path("downloads").display().to_string()]);
    assert!(std::fs::read(c.path("downloads/big.txt")).unwrap() == expected_big.as_bytes());

    // The live read keeps to the workspace, like outputs do.
    let leak = get("leak.txt");
    assert!(!leak.status.success());
    assert!(String::from_utf8_lossy(&leak.stderr).contains("outside the workspace"), "{leak:?}");
    let up = get("../outside.txt");
    assert!(!up.status.success());
    assert!(String::from_utf8_lossy(&up.stderr).contains("not a path inside the workspace"), "{up:?}");
    assert!(!String::from_utf8_lossy(&leak.stdout).contains("must never be read"));

    // The HTTP API serves the same live file (length unknown while it grows) and refusals.
    let (code, length, body) =
        http_get(&c.key, &format!("{api}/jobs/{job}/tasks/grow/artifacts/progress.txt"));
    assert_eq!((code, length), (200, None));
    assert!(assert_counting(&String::from_utf8_lossy(&body)) >= 5);
    let (code, _, body) = http_get(&c.key, &format!("{api}/jobs/{job}/tasks/grow/artifacts/leak.txt"));
    assert_eq!(code, 409, "{}", String::from_utf8_lossy(&body));
    let err: Value = serde_json::from_slice(&body).unwrap();
    assert!(err["error"].as_str().unwrap().contains("outside the workspace"), "{err}");

    std::fs::write(c.path("release"), "").unwrap();
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");

    // Ended: served from the blob store, complete, with a length.
    let out = get("progress.txt");
    assert!(out.status.success());
    let last = String::from_utf8_lossy(&out.stdout).to_string();
    let n = assert_counting(&last);
    assert!(n >= assert_counting(&second) && last.starts_with(&second[..second.rfind('\n').unwrap() + 1]));
    let (code, length, body) =
        http_get(&c.key, &format!("{api}/jobs/{job}/tasks/grow/artifacts/progress.txt"));
    assert_eq!((code, length), (200, Some(body.len() as u64)));
    assert_eq!(String::from_utf8_lossy(&body), last);
    let (code, _, body) = http_get(&c.key, &format!("{api}/jobs/{job}/tasks/grow/artifacts/big.txt"));
    assert_eq!(code, 200);
    assert!(body == expected_big.as_bytes());
    let (code, _, body) = http_get(&c.key, &format!("{api}/jobs/{job}/tasks/grow/artifacts/leak.txt"));
    assert_eq!(code, 404, "{}", String::from_utf8_lossy(&body));

    let (code, _, body) = http_get(&c.key, &format!("{api}/jobs/{job}"));
    assert_eq!(code, 200);
    let j: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (j["state"].as_str(), j["tasks"][0]["name"].as_str()),
        (Some("succeeded"), Some("grow")),
        "{j}"
    );
    let (code, _, body) = http_get(&c.key, &format!("{api}/jobs/{job}/artifacts"));
    assert_eq!(code, 200);
    let list: Value = serde_json::from_slice(&body).unwrap();
    let mut paths: Vec<&str> = list.as_array().unwrap().iter().map(|a| a["path"].as_str().unwrap()).collect();
    paths.sort();
    assert_eq!(paths, vec!["big.txt", "progress.txt"]);
    let (code, _, _) = http_get(&c.key, &format!("{api}/jobs/999999"));
    assert_eq!(code, 404);
}

#[test]
fn the_http_api_serves_logs_and_reports_errors_as_json() {
    let (c, api) = with_http_api();
    let job = c.submit(
        r#"
version: 1
name: talk
tasks:
  - name: say
    command: "echo hello; echo world"
"#,
    );
    c.wait_done(job, T);
    let (code, _, body) = http_get(&c.key, &format!("{api}/jobs/{job}/tasks/say/logs"));
    assert_eq!((code, String::from_utf8_lossy(&body).as_ref()), (200, "hello\nworld\n"));
    let (code, _, body) = http_get(&c.key, &format!("{api}/jobs/{job}/tasks/nope/logs"));
    assert_eq!(code, 404);
    let err: Value = serde_json::from_slice(&body).unwrap();
    assert!(err["error"].as_str().unwrap().contains("no task `nope`"), "{err}");
    let (code, _, _) = http_get(&c.key, &format!("{api}/jobs/latest/tasks/say/logs"));
    assert_eq!(code, 400, "a job id is a number");
}

#[test]
fn a_live_download_from_a_task_whose_agent_is_gone_fails_clearly() {
    let mut c = Cluster::start(1, 2);
    let job = c.submit(
        r#"
version: 1
name: orphan
tasks:
  - name: wait
    command: "echo started > state.txt && sleep 600"
"#,
    );
    let id = job.to_string();
    let start = Instant::now();
    loop {
        let out = c.drover(&["artifacts", "get", &id, "wait", "state.txt", "-o", "-"]);
        if out.status.success() && out.stdout == b"started\n" {
            break;
        }
        assert!(start.elapsed() < T, "state.txt never readable: {}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(step_alive(c.path("").as_path()), "the step runs, as seen from outside");
    c.kill_agent(0);
    let start = Instant::now();
    loop {
        let out = c.drover(&["artifacts", "get", &id, "wait", "state.txt", "-o", "-"]);
        assert!(out.stdout.is_empty(), "nothing may be read from a node that is gone");
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        if !out.status.success()
            && (stderr.contains("not connected to this server") || stderr.contains("no such task is running"))
        {
            break;
        }
        assert!(start.elapsed() < T, "the download never failed clearly: {stderr}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The step outlived its agent (its supervisor does, by design); the next agent run stops
    // what its predecessor left, so nothing of this test keeps running after it.
    c.ok(&["cancel", &id]);
    c.restart_agent(0, 2);
    let start = Instant::now();
    while step_alive(c.path("").as_path()) {
        assert!(start.elapsed() < T, "the restarted agent left the orphaned step running");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether a process of the `orphan` job above still runs under `dir` (its agent's work dir).
fn step_alive(dir: &std::path::Path) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else { return false };
    entries.flatten().any(|e| {
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cwd = std::fs::read_link(e.path().join("cwd")).unwrap_or_default();
        cmdline.windows(24).any(|w| w == b"echo started > state.txt") && cwd.starts_with(dir)
    })
}
