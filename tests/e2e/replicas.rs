//! Several server replicas on one PostgreSQL: a replica dies with SIGKILL mid-run and every
//! task still ends exactly once; PostgreSQL itself restarts and nothing acknowledged is lost.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover_store::pg_test::TempPostgres;

use crate::harness::{AGENT_STOP_GRACE, drover_bin, stop_within};

/// Replicas and agents sharing one database.
struct Fleet {
    dir: tempfile::TempDir,
    database: String,
    servers: Vec<(String, Option<Child>)>,
    agents: Vec<Child>,
    /// The operator key the first replica wrote (the others find keys in the shared store).
    key: String,
}

impl Fleet {
    fn start(database: String, servers: usize, agents: usize) -> Fleet {
        let dir = crate::harness::scratch_dir();
        let mut fleet = Fleet { dir, database, servers: Vec::new(), agents: Vec::new(), key: String::new() };
        for i in 0..servers {
            let (addr, child) = fleet.spawn_server(i, "127.0.0.1:0");
            fleet.servers.push((addr, Some(child)));
            if i == 0 {
                fleet.key = crate::harness::operator_key(&fleet.dir.path().join("server-0"));
            }
        }
        for i in 0..agents {
            // Each agent prefers a different replica, and knows them all.
            let mut list: Vec<String> = fleet.servers.iter().map(|(a, _)| a.clone()).collect();
            list.rotate_left(i % servers);
            let token = fleet.join_token();
            let child = Command::new(drover_bin())
                .args(["agent", "--server", &list.join(","), "--name", &format!("agent-{i}"), "--cores", "2"])
                .args(["--join", &token])
                .args(["--no-docker", "--work-dir"])
                .arg(fleet.dir.path().join(format!("agent-{i}")))
                .stdout(Stdio::null())
                .stderr(fleet.log(&format!("agent-{i}")))
                .spawn()
                .unwrap();
            fleet.agents.push(child);
        }
        fleet
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .unwrap()
    }

    fn spawn_server(&self, i: usize, listen: &str) -> (String, Child) {
        let mut child = Command::new(drover_bin())
            .args(["server", "--listen", listen, "--lease", "3s", "--heartbeat", "300ms"])
            .args(["--database", &self.database, "--data-dir"])
            .arg(self.dir.path().join(format!("server-{i}")))
            .arg("--blobs")
            .arg(self.dir.path().join("blobs"))
            .stdout(Stdio::piped())
            .stderr(self.log(&format!("server-{i}")))
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line.trim().rsplit(' ').next().unwrap().trim_start_matches("http://").to_string();
        (addr, child)
    }

    fn all_servers(&self) -> String {
        self.servers.iter().map(|(a, _)| a.as_str()).collect::<Vec<_>>().join(",")
    }

    fn command(&self, server: &str, args: &[&str]) -> Command {
        let mut c = Command::new(drover_bin());
        c.args(args)
            .env("DROVER_SERVER", server)
            .env("DROVER_KEY", &self.key)
            .env("DROVER_CREDENTIALS", self.dir.path().join("credentials"));
        c
    }

    fn drover(&self, server: &str, args: &[&str]) -> std::process::Output {
        self.command(server, args).output().unwrap()
    }

    fn join_token(&self) -> String {
        let out = self.drover(&self.all_servers(), &["nodes", "token", "create", "-o", "json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn submit(&self, server: &str, name: &str, frames: usize) -> i64 {
        let path = self.dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &path,
            format!("version: 1\nname: {name}\ntasks:\n  - name: t\n    array: \"1-{frames}\"\n    command: [\"true\"]\n"),
        )
        .unwrap();
        let out = self.drover(server, &["submit", "-o", "json", &path.display().to_string()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["id"].as_i64().unwrap()
    }

    fn status(&self, job: i64) -> Option<serde_json::Value> {
        let out = self.drover(&self.all_servers(), &["status", "-o", "json", &job.to_string()]);
        out.status.success().then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    fn server_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("server-{i}.log"))).unwrap_or_default()
    }

    fn kill_server(&mut self, i: usize) {
        if let Some(mut c) = self.servers[i].1.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A `drover watch` whose transcript goes to `watch-JOB.txt` (a file, not a pipe: a pipe
    /// nobody reads would fill up and stall the watcher).
    fn watch(&self, server: &str, job: i64) -> Child {
        let transcript = std::fs::File::create(self.dir.path().join(format!("watch-{job}.txt"))).unwrap();
        self.command(server, &["watch", &job.to_string()])
            .stdout(transcript)
            .stderr(self.log(&format!("watch-{job}")))
            .spawn()
            .unwrap()
    }

    fn wait_final(&self, job: i64, timeout: Duration) -> serde_json::Value {
        let start = Instant::now();
        loop {
            if let Some(v) = self.status(job)
                && matches!(v["state"].as_str(), Some("succeeded" | "failed" | "cancelled" | "warning"))
            {
                return v;
            }
            assert!(start.elapsed() < timeout, "job {job} did not end in time");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn dump_logs(&self) {
        crate::harness::print_log_tails(self.dir.path(), 25);
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        // Agents first, while their servers still answer; a stopped agent leaves no idle
        // cgroup behind.
        for c in &mut self.agents {
            stop_within(c, AGENT_STOP_GRACE);
            let _ = c.kill();
            let _ = c.wait();
        }
        for (_, c) in &mut self.servers {
            if let Some(c) = c {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Frames per job; four jobs make the 2,000 tasks of the scenario.
const FRAMES: usize = 500;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Counts, per task, how often each final state appears in a watch transcript.
fn finals(transcript: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for line in transcript.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() >= 3 && words[1] != "job" && words[2] == "succeeded" {
            *out.entry(words[1].to_string()).or_default() += 1;
        }
    }
    out
}

#[test]
fn three_replicas_lose_one_and_every_task_ends_exactly_once() {
    let pg = TempPostgres::shared();
    let database = runtime().block_on(pg.url_for_new_database());
    let mut fleet = Fleet::start(database, 3, 3);
    let servers: Vec<String> = fleet.servers.iter().map(|(a, _)| a.clone()).collect();
    // 2,000 tasks in four jobs, submitted across the replicas.
    let jobs: Vec<i64> =
        (0..4).map(|i| fleet.submit(&servers[i % 3], &format!("batch-{i}"), FRAMES)).collect();
    // Each watcher prefers another replica but knows them all, as clients of a fleet do.
    let mut watchers: Vec<Child> = jobs
        .iter()
        .enumerate()
        .map(|(i, job)| {
            let mut list = servers.clone();
            list.rotate_left((i + 1) % 3);
            fleet.watch(&list.join(","), *job)
        })
        .collect();
    // Kill the replica that leads the lease reaper once work is flowing.
    let start = Instant::now();
    let leader = loop {
        if let Some(i) = (0..3).find(|i| fleet.server_log(*i).contains("leading the lease reaper")) {
            break i;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no replica leads the lease reaper");
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(1500));
    fleet.kill_server(leader);
    let survivors: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let start = Instant::now();
    while !survivors.iter().any(|i| fleet.server_log(*i).contains("leading the lease reaper")) {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the lease reaper did not move to a surviving replica"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for job in &jobs {
        let status = fleet.wait_final(*job, Duration::from_secs(300));
        assert_eq!(status["state"], "succeeded", "job {job}");
        let tasks = status["tasks"].as_array().unwrap();
        assert_eq!(tasks.len(), FRAMES);
        assert!(tasks.iter().all(|t| t["state"] == "succeeded"), "job {job}");
    }
    // Every watch stream, even those whose replica died, reached the final state, and no task
    // was recorded as succeeded twice.
    let survivor = &servers[survivors[0]];
    for (job, watcher) in jobs.iter().zip(&mut watchers) {
        let status = watcher.wait().unwrap();
        assert!(status.success(), "watch of job {job} did not end with the job");
        let live = std::fs::read_to_string(fleet.dir.path().join(format!("watch-{job}.txt"))).unwrap();
        assert_eq!(finals(&live).len(), FRAMES, "job {job}: the live watch saw every frame end");
        let out = fleet.drover(survivor, &["watch", &job.to_string()]);
        let counts = finals(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(counts.len(), FRAMES, "job {job}: every frame succeeded once");
        assert!(counts.values().all(|n| *n == 1), "job {job}: a task succeeded twice: {counts:?}");
    }
}

#[test]
fn postgresql_restart_mid_run_loses_nothing_acknowledged() {
    let pg = TempPostgres::start().expect("a private PostgreSQL");
    let rt = runtime();
    let database = rt.block_on(pg.url_for_new_database());
    let fleet = Fleet::start(database, 1, 1);
    let server = fleet.servers[0].0.clone();
    let first = fleet.submit(&server, "before-restart", 200);
    rt.block_on(pg.restart()).expect("restart PostgreSQL");
    // Submits during and after the outage either fail clearly or are kept; retry until kept.
    let start = Instant::now();
    let second = loop {
        let path = fleet.dir.path().join("after.yaml");
        std::fs::write(
            &path,
            "version: 1\nname: after\ntasks:\n  - name: t\n    array: \"1-100\"\n    command: [\"true\"]\n",
        )
        .unwrap();
        let out = fleet.drover(&server, &["submit", "-o", "json", &path.display().to_string()]);
        if out.status.success() {
            break serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["id"].as_i64().unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(60), "the server never recovered");
        std::thread::sleep(Duration::from_millis(300));
    };
    for (job, n) in [(first, 200), (second, 100)] {
        let status = fleet.wait_final(job, Duration::from_secs(180));
        assert_eq!(status["state"], "succeeded", "job {job}");
        assert_eq!(status["tasks"].as_array().unwrap().len(), n);
    }
}

/// A running task's file can only be read through the replica its agent is connected to; a
/// client that asks another replica first is sent on and still gets the file.
#[test]
fn a_live_download_through_the_wrong_replica_reaches_the_right_one() {
    let pg = TempPostgres::shared();
    let database = runtime().block_on(pg.url_for_new_database());
    // One agent, which prefers (and so connects to) replica 0.
    let fleet = Fleet::start(database, 2, 1);
    let (first, second) = (fleet.servers[0].0.clone(), fleet.servers[1].0.clone());
    let release = fleet.dir.path().join("release");
    let path = fleet.dir.path().join("live.yaml");
    std::fs::write(
        &path,
        format!(
            "version: 1\nname: live\ntasks:\n  - name: grow\n    command: \"echo ready > state.txt; \
             while [ ! -e {} ]; do sleep 0.1; done\"\n",
            release.display()
        ),
    )
    .unwrap();
    let out = fleet.drover(&second, &["submit", "-o", "json", &path.display().to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let job = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["id"].as_i64().unwrap();
    let id = job.to_string();
    let get =
        |servers: &str| fleet.drover(servers, &["artifacts", "get", &id, "grow", "state.txt", "-o", "-"]);
    let start = Instant::now();
    // Replica 1 alone cannot serve it, and says where the problem is.
    loop {
        let out = get(&second);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        if err.contains("not connected to this server") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no clear refusal from replica 1: {err}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Asking replica 1 first, knowing both, gets the file from replica 0 (once the task has
    // written it).
    let out = loop {
        let out = get(&format!("{second},{first}"));
        if out.status.success() {
            break out;
        }
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!err.contains("not connected to this server"), "not sent on to replica 0: {err}");
        assert!(start.elapsed() < Duration::from_secs(60), "the file never arrived: {err}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ready\n");
    std::fs::write(&release, "").unwrap();
    assert_eq!(fleet.wait_final(job, Duration::from_secs(60))["state"], "succeeded");
}
