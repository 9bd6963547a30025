//! An attempt's setup (inputs, image, services) runs inside the task's timeout and ends on
//! cancel: a download that never finishes or a service that never gets healthy ends the
//! attempt with its reason instead of holding the node.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::harness::{BUSYBOX, Cluster, ensure_busybox_image, task};

const T: Duration = Duration::from_secs(90);

/// A loopback HTTP server that announces a large body and sends a byte of it every 100 ms,
/// never finishing; returns its port and how many requests it took.
fn serve_forever_slowly() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = Arc::new(AtomicUsize::new(0));
    let seen = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            seen.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf);
                let _ = write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n");
                // Ends when the agent hangs up.
                while stream.write_all(b"x").is_ok() {
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
    });
    (port, requests)
}

fn cluster_allowing_local_urls() -> Cluster {
    let mut c = Cluster::start_with(0, 2, &[], &[]);
    c.add_agent_with(2, &["--allow-local-urls"], &[]);
    c.wait_for_nodes(1);
    c
}

#[test]
fn a_tasks_setup_timeout_bounds_each_setup_phase_and_its_retry_gets_another() {
    let c = cluster_allowing_local_urls();
    let (port, requests) = serve_forever_slowly();
    let job = c.submit(&format!(
        r#"
version: 1
name: slow-input-own-limit
tasks:
  - name: fetch
    setup_timeout: 2s
    retries: {{ count: 1, backoff: 0s, on: [start] }}
    inputs:
      - {{ url: "http://127.0.0.1:{port}/big", to: big }}
    command: "echo never runs"
"#
    ));
    let status = c.wait_done(job, T);
    let t = task(&status, "fetch");
    assert_eq!((t["state"].as_str(), t["failure"].as_str()), (Some("failed"), Some("start")), "{t:#}");
    assert_eq!(t["attempts"], 2, "{t:#}");
    assert!(
        t["reason"].as_str().unwrap_or_default().contains("placing its inputs took longer than 2s"),
        "{t:#}"
    );
    assert_eq!(requests.load(Ordering::SeqCst), 2, "each attempt downloads once");
}

#[test]
fn an_input_that_never_finishes_downloading_ends_the_attempt_at_the_tasks_timeout() {
    let c = cluster_allowing_local_urls();
    let (port, _) = serve_forever_slowly();
    let job = c.submit(&format!(
        r#"
version: 1
name: slow-input
tasks:
  - name: fetch
    timeout: 3s
    inputs:
      - {{ url: "http://127.0.0.1:{port}/big", to: big }}
    command: "echo never runs"
"#
    ));
    let status = c.wait_done(job, T);
    let t = task(&status, "fetch");
    assert_eq!(t["state"], "failed", "{status:#}");
    assert_eq!(t["failure"], "timeout", "{t:#}");
    assert!(
        t["reason"].as_str().unwrap_or_default().contains("timeout of 3s while placing its inputs"),
        "{t:#}"
    );
    let logs = c.ok(&["logs", &job.to_string()]);
    assert!(!logs.contains("never runs"), "{logs}");
}

#[test]
fn a_cancel_ends_an_attempt_that_is_still_downloading_its_input() {
    let c = cluster_allowing_local_urls();
    let (port, requests) = serve_forever_slowly();
    let job = c.submit(&format!(
        r#"
version: 1
name: cancelled-input
tasks:
  - name: fetch
    inputs:
      - {{ url: "http://127.0.0.1:{port}/big", to: big }}
    command: "echo never runs"
"#
    ));
    let start = Instant::now();
    while requests.load(Ordering::SeqCst) == 0 {
        assert!(start.elapsed() < T, "the agent never asked for the input");
        std::thread::sleep(Duration::from_millis(50));
    }
    c.ok(&["cancel", &job.to_string()]);
    let status = c.wait_done(job, T);
    let t = task(&status, "fetch");
    assert_eq!(t["state"], "cancelled", "{status:#}");
    assert!(t["reason"].as_str().unwrap_or_default().contains("cancelled while placing its inputs"), "{t:#}");
}

#[test]
fn a_service_that_never_gets_healthy_ends_the_attempt_at_the_tasks_timeout() {
    ensure_busybox_image();
    let c = Cluster::start(1, 2);
    let job = c.submit(&format!(
        r#"
version: 1
name: unhealthy
tasks:
  - name: check
    runtime: docker
    image: {BUSYBOX}
    timeout: 5s
    services:
      - name: web
        image: {BUSYBOX}
        command: ["sleep", "600"]
        healthcheck:
          command: ["false"]
          interval: 200ms
          timeout: 1s
          retries: 100000
    command: "echo never runs"
"#
    ));
    let status = c.wait_done(job, T);
    let t = task(&status, "check");
    assert_eq!(t["state"], "failed", "{status:#}");
    assert_eq!(t["failure"], "timeout", "{t:#}");
    assert!(
        t["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("timeout of 5s while starting its sandbox and services"),
        "{t:#}"
    );
}
