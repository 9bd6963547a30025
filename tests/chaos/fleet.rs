//! The fleet under test: server replicas over one private PostgreSQL, and agents that reach
//! every replica through proxies of their own, so that one agent can be cut off alone.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use drover_store::pg_test::TempPostgres;

use crate::harness::{AGENT_STOP_GRACE, Tmpfs, drover_bin, operator_key, scratch_dir, stop_within};
use crate::proxy::Proxy;

/// The lease every replica grants; a partition lasts longer than this.
pub const LEASE: Duration = Duration::from_secs(3);

/// The size of the small filesystem the replicas keep their blobs on, and the space they keep
/// free on it: a fault fills it past that.
const BLOB_DISK_MIB: u64 = 128;
const MIN_FREE_MIB: u64 = 32;

/// How long one CLI command may take before the run fails on it.
const CLI_PATIENCE: Duration = Duration::from_secs(60);

/// Reads a child's pipe to its end on a thread of its own (so the child never blocks on it).
fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

/// A server replica: where it listens (kept across restarts) and its process.
struct Replica {
    addr: String,
    child: Option<Child>,
}

/// An agent: its process and its ways to the replicas.
struct Node {
    child: Option<Child>,
    proxies: Vec<Proxy>,
}

/// Replicas, agents and the database they share.
pub struct Fleet {
    /// Scratch space: data dirs, logs, job files, the ledger.
    pub dir: tempfile::TempDir,
    pg: TempPostgres,
    database: String,
    replicas: Vec<Replica>,
    nodes: Vec<Node>,
    key: String,
    runtime: tokio::runtime::Runtime,
    /// The small filesystem of the blobs (dropped, so unmounted, after the replicas stop).
    blob_disk: Option<Tmpfs>,
}

impl Fleet {
    /// `servers` replicas and `agents` agents of `cores` cores each.
    pub fn start(servers: usize, agents: usize, cores: u32) -> Fleet {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let pg = TempPostgres::start().expect("a private PostgreSQL");
        let database = runtime.block_on(pg.url_for_new_database());
        let dir = scratch_dir();
        let blob_disk = Some(Tmpfs::mount(&dir.path().join("blobs"), BLOB_DISK_MIB, "0700"));
        let mut fleet = Fleet {
            dir,
            blob_disk,
            pg,
            database,
            replicas: Vec::new(),
            nodes: Vec::new(),
            key: String::new(),
            runtime,
        };
        for i in 0..servers {
            let (addr, child) = fleet.spawn_server(i, "127.0.0.1:0");
            fleet.replicas.push(Replica { addr, child: Some(child) });
            if i == 0 {
                fleet.key = operator_key(&fleet.dir.path().join("server-0"));
            }
        }
        for i in 0..agents {
            let proxies: Vec<Proxy> = fleet.replicas.iter().map(|r| Proxy::start(&r.addr)).collect();
            fleet.nodes.push(Node { child: None, proxies });
            let token = fleet.join_token();
            let child = fleet.spawn_agent(i, cores, Some(&token));
            fleet.nodes[i].child = Some(child);
        }
        fleet
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .expect("log file")
    }

    fn spawn_server(&self, i: usize, listen: &str) -> (String, Child) {
        let lease = format!("{}s", LEASE.as_secs());
        let mut child = Command::new(drover_bin())
            .args(["server", "--listen", listen, "--lease", &lease, "--heartbeat", "300ms"])
            .args(["--database", &self.database, "--data-dir"])
            .arg(self.dir.path().join(format!("server-{i}")))
            .arg("--blobs")
            .arg(self.blobs_dir())
            .args(["--min-free", &format!("{MIN_FREE_MIB}MiB")])
            .env("DROVER_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(self.log(&format!("server-{i}")))
            .spawn()
            .expect("spawn server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("server stdout")).read_line(&mut line).expect("banner");
        let addr =
            line.trim().rsplit(' ').next().unwrap_or_default().trim_start_matches("http://").to_string();
        assert!(!addr.is_empty(), "unexpected server banner: {line:?}");
        (addr, child)
    }

    fn spawn_agent(&self, i: usize, cores: u32, join: Option<&str>) -> Child {
        let servers: Vec<&str> = self.nodes[i].proxies.iter().map(|p| p.url.as_str()).collect();
        let mut command = Command::new(drover_bin());
        command
            .args(["agent", "--server", &servers.join(","), "--name", &format!("agent-{i}")])
            .args(["--cores", &cores.to_string(), "--kill-grace", "1s", "--no-docker", "--work-dir"])
            .arg(self.dir.path().join(format!("agent-{i}")))
            .env("DROVER_LOG", "info")
            .stdout(Stdio::null())
            .stderr(self.log(&format!("agent-{i}")));
        if let Some(token) = join {
            command.args(["--join", token]);
        }
        command.spawn().expect("spawn agent")
    }

    /// Where the replicas keep their blobs: a small filesystem of its own.
    pub fn blobs_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("blobs")
    }

    /// How much the blobs' filesystem keeps free, in bytes.
    pub fn min_free(&self) -> u64 {
        MIN_FREE_MIB << 20
    }

    /// Every replica's address, for clients.
    pub fn servers(&self) -> String {
        self.replicas.iter().map(|r| r.addr.as_str()).collect::<Vec<_>>().join(",")
    }

    /// How many replicas and agents there are.
    pub fn size(&self) -> (usize, usize) {
        (self.replicas.len(), self.nodes.len())
    }

    /// Runs the CLI against the fleet as the operator. A command that has not answered within
    /// [`CLI_PATIENCE`] fails the run, naming itself, instead of hanging it.
    pub fn drover(&self, args: &[&str]) -> Output {
        let mut child = Command::new(drover_bin())
            .args(args)
            .env("DROVER_SERVER", self.servers())
            .env("DROVER_KEY", &self.key)
            .env("DROVER_CREDENTIALS", self.dir.path().join("credentials"))
            .current_dir(self.dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run drover");
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        let began = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for drover") {
                break status;
            }
            if began.elapsed() > CLI_PATIENCE {
                let _ = child.kill();
                let _ = child.wait();
                panic!("drover {args:?} did not answer within {CLI_PATIENCE:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        }
    }

    /// Runs the CLI and insists that it succeeds; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.drover(args);
        assert!(out.status.success(), "drover {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn join_token(&self) -> String {
        let out = self.ok(&["nodes", "token", "create", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("token json");
        v["token"].as_str().expect("token").to_string()
    }

    /// Kills agent `i` with SIGKILL.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts agent `i` again on its work dir (it finds its credential there).
    pub fn restart_agent(&mut self, i: usize, cores: u32) {
        let child = self.spawn_agent(i, cores, None);
        self.nodes[i].child = Some(child);
    }

    /// Kills replica `i` with SIGKILL.
    pub fn kill_server(&mut self, i: usize) {
        if let Some(mut c) = self.replicas[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts replica `i` again on its address.
    pub fn restart_server(&mut self, i: usize) {
        let addr = self.replicas[i].addr.clone();
        let (_, child) = self.spawn_server(i, &addr);
        self.replicas[i].child = Some(child);
    }

    /// Cuts agent `i` off every replica without closing its connections: they carry nothing.
    pub fn partition(&self, i: usize) {
        self.nodes[i].proxies.iter().for_each(Proxy::freeze);
    }

    /// Lets agent `i` reach the replicas again.
    pub fn heal(&self, i: usize) {
        self.nodes[i].proxies.iter().for_each(Proxy::heal);
    }

    /// Restarts PostgreSQL under the replicas.
    pub fn restart_postgres(&self) {
        self.runtime.block_on(self.pg.restart()).expect("restart PostgreSQL");
    }

    /// Stops every agent as an operator would (SIGTERM), so that whatever is still left
    /// afterwards was left by Drover.
    pub fn stop_agents(&mut self) {
        for node in &mut self.nodes {
            if let Some(c) = node.child.as_mut() {
                stop_within(c, AGENT_STOP_GRACE);
            }
            if let Some(mut c) = node.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// The last lines of every log, for a failed run.
    pub fn dump_logs(&self) {
        crate::harness::print_log_tails(self.dir.path(), 30);
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        self.stop_agents();
        for i in 0..self.replicas.len() {
            self.kill_server(i);
        }
        self.blob_disk.take();
    }
}
