//! Inputs in, outputs out: artifacts between tasks, local and http inputs, refused paths,
//! corruption detected on download.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use crate::harness::{Cluster, task};

const T: Duration = Duration::from_secs(90);

/// Serves `body` to every GET on a loopback port, in a background thread.
fn serve_once_per_request(body: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

#[test]
fn a_task_consumes_another_tasks_output_and_inputs_arrive_from_disk_and_http() {
    // The http input is served from this machine's loopback, which agents refuse by default.
    let mut c = Cluster::start_with(0, 2, &[], &[]);
    c.add_agent_with(2, &["--allow-local-urls"], &[]);
    c.wait_for_nodes(1);
    std::fs::create_dir_all(c.path("data/nested")).unwrap();
    std::fs::write(c.path("data/a.txt"), "local file a\n").unwrap();
    std::fs::write(c.path("data/nested/b.txt"), "local file b\n").unwrap();
    let port = serve_once_per_request("from http\n");
    let job = c.submit(&format!(
        r#"
version: 1
name: pipeline
tasks:
  - name: produce
    outputs: ["out/*.txt"]
    command: "mkdir -p out && echo result-42 > out/result.txt && echo other > out/other.txt"
  - name: consume
    inputs:
      - {{ from: "produce:out/result.txt", to: in/result.txt }}
      - {{ path: data, to: data }}
      - {{ url: "http://127.0.0.1:{port}/file.txt", to: web.txt }}
    command: "cat in/result.txt data/a.txt data/nested/b.txt web.txt"
"#
    ));
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    let logs = c.ok(&["logs", &job.to_string(), "consume"]);
    assert_eq!(logs, "result-42\nlocal file a\nlocal file b\nfrom http\n");
    let ls = c.ok(&["artifacts", "ls", &job.to_string(), "-o", "json"]);
    let ls: serde_json::Value = serde_json::from_str(&ls).unwrap();
    let paths: Vec<&str> = ls.as_array().unwrap().iter().map(|a| a["path"].as_str().unwrap()).collect();
    assert_eq!(paths, vec!["out/other.txt", "out/result.txt"]);
    let got = c.ok(&["artifacts", "get", &job.to_string(), "produce", "out/result.txt", "-o", "-"]);
    assert_eq!(got, "result-42\n");
    // Into a directory, under the output's file name.
    std::fs::create_dir_all(c.path("downloads")).unwrap();
    let dest = c.path("downloads").display().to_string();
    c.ok(&["artifacts", "get", &job.to_string(), "produce", "out/other.txt", "-o", &dest]);
    assert_eq!(std::fs::read_to_string(c.path("downloads/other.txt")).unwrap(), "other\n");
    let missing = c.drover(&["artifacts", "get", &job.to_string(), "produce", "out/nope.txt", "-o", "-"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no artifact `out/nope.txt`"));
}

#[test]
fn outputs_that_escape_the_workspace_are_refused() {
    let c = Cluster::start(1, 2);
    std::fs::write(c.path("outside.txt"), "must never be read").unwrap();
    let job = c.submit(
        r#"
version: 1
name: escape
tasks:
  - name: sneaky
    outputs: ["out/*"]
    command: "mkdir -p out && echo fine > out/ok.txt && ln -s {{ params.dir }}/outside.txt out/leak.txt && ln -s /etc out/etc"
"#,
    );
    let status = c.wait_done(job, T);
    let t = task(&status, "sneaky");
    assert_eq!(t["state"], "succeeded", "{status:#}");
    let reason = t["reason"].as_str().unwrap_or_default().to_string();
    let events = c.ok(&["watch", &job.to_string()]);
    assert!(events.contains("output refused: `out/leak.txt` is a link"), "{events}\n{reason}");
    let ls = c.ok(&["artifacts", "ls", &job.to_string(), "-o", "json"]);
    assert!(ls.contains("out/ok.txt") && !ls.contains("leak") && !ls.contains("\"out/etc\""), "{ls}");
}

#[test]
fn a_corrupted_blob_is_detected_on_download() {
    let c = Cluster::start(1, 2);
    let job = c.submit(
        r#"
version: 1
name: corrupt
tasks:
  - name: make
    outputs: [data.bin]
    command: "head -c 300000 /dev/urandom > data.bin"
"#,
    );
    c.wait_done(job, T);
    let ls = c.ok(&["artifacts", "ls", &job.to_string(), "-o", "json"]);
    let ls: serde_json::Value = serde_json::from_str(&ls).unwrap();
    let digest = ls[0]["digest"].as_str().unwrap().trim_start_matches("sha256:").to_string();
    let blob = c.path(&format!("server-data/blobs/sha256/{}/{}", &digest[..2], &digest[2..]));
    let mut perms = std::fs::metadata(&blob).expect("blob file").permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&blob, perms).unwrap();
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let out = c.drover(&["artifacts", "get", &job.to_string(), "make", "data.bin", "-o", "-"]);
    assert!(!out.status.success(), "a corrupted download must fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("corrupt") || stderr.contains("does not match"), "{stderr}");
}

/// An empty output (like the patch of an AI agent that changed nothing) is kept as an empty
/// artifact, not a failed upload.
#[test]
fn an_empty_output_is_kept_as_an_empty_artifact() {
    let c = Cluster::start(1, 1);
    let job = c.submit("version: 1\nname: empty\ntasks:\n  - name: t\n    outputs: [empty.txt]\n    command: ': > empty.txt'\n");
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    assert_eq!(task(&status, "t")["reason"], "", "{status:#}");
    let list: serde_json::Value =
        serde_json::from_str(&c.ok(&["artifacts", "ls", &job.to_string(), "-o", "json"])).unwrap();
    let files = list.as_array().unwrap();
    assert_eq!(
        (files.len(), files[0]["path"].as_str(), files[0]["size"].as_u64()),
        (1, Some("empty.txt"), Some(0)),
        "{list}"
    );
}
