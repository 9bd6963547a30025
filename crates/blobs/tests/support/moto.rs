//! A moto S3 server for the conformance suite: one per test process, started on first use.
//!
//! moto comes from PyPI: `pip install 'moto[server]'`. The server runs in a small Python launcher
//! that binds port 0 on 127.0.0.1 (so there is no port race), creates the test bucket, prints
//! `ready <port>`, and then waits for its stdin to close. The test process holds the other end of
//! that pipe in a static and never closes it, so the kernel closes it when the test process exits
//! (normally, by panic or by SIGKILL) and the launcher exits with it: no server outlives its tests.
//!
//! Set `DROVER_TEST_S3_ENDPOINT` (and `DROVER_TEST_S3_BUCKET`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`) to run the suite against an existing S3-compatible
//! server instead; the bucket must exist. `DROVER_TEST_PYTHON` picks the Python interpreter.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use drover_blobs::S3Options;

const BUCKET: &str = "drover-blobs-test";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

const LAUNCHER: &str = r#"
import logging, os, sys
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.server import ThreadedMotoServer
import boto3

server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
s3 = boto3.client(
    "s3",
    endpoint_url=f"http://{host}:{port}",
    region_name="us-east-1",
    aws_access_key_id="testing",
    aws_secret_access_key="testing",
)
s3.create_bucket(Bucket=sys.argv[1])
print(f"ready {port}", flush=True)
sys.stdin.read()  # returns when the test process exits and its end of the pipe closes
os._exit(0)
"#;

/// Where the suite's S3 server is and how to reach it.
pub struct S3Server {
    pub bucket: String,
    pub options: S3Options,
    /// Keeps the launcher alive: it exits when this pipe closes (at process exit).
    _child: Option<(Child, ChildStdin)>,
}

/// The process-wide server, started on first use. Panics with install instructions if moto is
/// missing: the S3 backend must not silently go untested.
pub fn server() -> &'static S3Server {
    static SERVER: OnceLock<Result<S3Server, String>> = OnceLock::new();
    match SERVER.get_or_init(start) {
        Ok(server) => server,
        Err(message) => panic!("{message}"),
    }
}

fn start() -> Result<S3Server, String> {
    if let Ok(endpoint) = std::env::var("DROVER_TEST_S3_ENDPOINT") {
        let mut options = S3Options::from_env();
        options.allow_http = endpoint.starts_with("http://");
        options.endpoint = Some(endpoint);
        let bucket = std::env::var("DROVER_TEST_S3_BUCKET").unwrap_or_else(|_| BUCKET.to_owned());
        return Ok(S3Server { bucket, options, _child: None });
    }

    let python = std::env::var("DROVER_TEST_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let started = Instant::now();
    let mut child = Command::new(&python)
        .arg("-c")
        .arg(LAUNCHER)
        .arg(BUCKET)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| format!("cannot run {python} for the moto S3 test server: {err}; {INSTALL}"))?;
    let stdin = child.stdin.take().ok_or("no stdin pipe")?;
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let mut stderr = child.stderr.take().ok_or("no stderr pipe")?;

    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(STARTUP_TIMEOUT).unwrap_or_default();
    let port = line.trim().strip_prefix("ready ").and_then(|port| port.parse::<u16>().ok());
    let Some(port) = port else {
        let _ = child.kill();
        let mut err = String::new();
        let _ = stderr.read_to_string(&mut err);
        return Err(format!("the moto S3 test server did not start: {}; {INSTALL}", err.trim()));
    };
    // Drain stderr so a chatty server can never block on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    eprintln!("moto S3 test server on 127.0.0.1:{port} (started in {:?})", started.elapsed());

    let options = S3Options {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        region: Some("us-east-1".to_owned()),
        access_key_id: Some("testing".to_owned()),
        secret_access_key: Some("testing".to_owned()),
        allow_http: true,
        // The smallest S3 allows, so that the 12 MiB blobs of the suite take three parts to
        // upload and two ranged GETs to download.
        part_size: Some(5 * 1024 * 1024),
        ..S3Options::default()
    };
    Ok(S3Server { bucket: BUCKET.to_owned(), options, _child: Some((child, stdin)) })
}

const INSTALL: &str = "the S3 blob store tests need moto: run `pip install 'moto[server]'` \
    (or point DROVER_TEST_S3_ENDPOINT at an S3-compatible server)";
