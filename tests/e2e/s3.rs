//! The server on an S3 blob store (a moto server on loopback): inputs, outputs and archived
//! logs all go to the bucket, nothing to local disk.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use drover_blobs::{Digest, S3Options, open_blob_store};
use drover_store::sqlite::SqliteStore;
use drover_store::{ArchiveStore, TaskFilter};

use crate::harness::Cluster;

const T: Duration = Duration::from_secs(90);
const BUCKET: &str = "drover-e2e";

/// Starts moto on a loopback port it picks itself and creates the bucket. The launcher exits
/// when its stdin closes, which happens when this test process ends, however it ends.
const LAUNCHER: &str = r#"
import logging, os, sys
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.server import ThreadedMotoServer
import boto3
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
s3 = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
                  aws_access_key_id="testing", aws_secret_access_key="testing")
s3.create_bucket(Bucket=sys.argv[1])
print(f"ready {port}", flush=True)
sys.stdin.read()
os._exit(0)
"#;

struct Moto {
    port: u16,
    child: Child,
    _stdin: ChildStdin,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto() -> Moto {
    let mut child = Command::new("python3")
        .args(["-c", LAUNCHER, BUCKET])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 with moto[server] is needed for the S3 end-to-end test");
    let stdin = child.stdin.take().expect("moto stdin");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("moto stdout")).read_line(&mut line).expect("moto banner");
    let port = line
        .trim()
        .strip_prefix("ready ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("moto did not start (is `moto[server]` installed?): {line:?}"));
    Moto { port, child, _stdin: stdin }
}

#[test]
fn a_server_on_an_s3_blob_store_keeps_inputs_outputs_and_logs_in_the_bucket() {
    let s3 = moto();
    let endpoint = format!("http://127.0.0.1:{}", s3.port);
    let url = format!("s3://{BUCKET}/cluster");
    let c = Cluster::start_with(
        1,
        2,
        &["--blobs", &url, "--s3-endpoint", &endpoint, "--s3-region", "us-east-1"],
        &[("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")],
    );
    std::fs::write(c.path("input.txt"), "from the client\n").unwrap();
    let job = c.submit(
        r#"
version: 1
name: s3
tasks:
  - name: produce
    outputs: ["out.txt"]
    inputs: [{ path: input.txt, to: in.txt }]
    command: "cat in.txt > out.txt && echo produced >> out.txt && echo produce ran"
  - name: consume
    inputs: [{ from: "produce:out.txt", to: got.txt }]
    command: "cat got.txt"
"#,
    );
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    let id = job.to_string();
    assert_eq!(
        c.ok(&["artifacts", "get", &id, "produce", "out.txt", "-o", "-"]),
        "from the client\nproduced\n"
    );
    assert_eq!(c.ok(&["logs", &id, "consume"]), "from the client\nproduced\n");

    // Everything is in the bucket, read back with the blob store's own S3 client.
    let options = S3Options {
        endpoint: Some(endpoint.clone()),
        region: Some("us-east-1".into()),
        access_key_id: Some("testing".into()),
        secret_access_key: Some("testing".into()),
        allow_http: true,
        ..S3Options::default()
    };
    let bucket = open_blob_store(&url, &options).expect("s3 blob store");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ls = c.ok(&["artifacts", "ls", &id, "-o", "json"]);
    let ls: serde_json::Value = serde_json::from_str(&ls).unwrap();
    let digest: Digest = ls[0]["digest"].as_str().unwrap().parse().unwrap();
    assert_eq!(rt.block_on(bucket.get_bytes(&digest)).unwrap(), b"from the client\nproduced\n");
    let start = Instant::now();
    let archives = loop {
        let archives = rt.block_on(async {
            let store = SqliteStore::open(&c.path("server-data/drover.db")).await.unwrap();
            store.log_archives(job, &TaskFilter::default()).await.unwrap()
        });
        if archives.len() == 2 {
            break archives;
        }
        assert!(start.elapsed() < T, "logs never archived: {archives:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    for a in &archives {
        let digest: Digest = a.digest.parse().unwrap();
        assert_eq!(
            rt.block_on(bucket.stat(&digest)).unwrap(),
            Some(a.size),
            "archive {} not in the bucket",
            a.digest
        );
    }
    assert_eq!(c.ok(&["logs", &id, "produce"]), "produce ran\n");
    assert!(!c.path("server-data/blobs").exists(), "nothing may go to the local blob directory");
}
