//! A cluster harness: a real `drover server` and real `drover-agent`s on loopback ports, driven
//! through the real CLI. Every process is killed when the cluster is dropped; their logs are
//! printed when a test fails.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test.
pub fn drover_bin() -> &'static str {
    env!("CARGO_BIN_EXE_drover")
}

/// The agent alone, as worker nodes run it: the harness's agents are `drover-agent`s (other
/// tests start `drover agent`, the same agent inside `drover`).
pub fn agent_bin() -> &'static str {
    env!("CARGO_BIN_EXE_drover-agent")
}

/// Lease and heartbeat short enough that node loss is noticed within seconds.
const LEASE: &str = "3s";
const HEARTBEAT: &str = "300ms";

/// A server, its agents, and a scratch directory.
pub struct Cluster {
    /// Scratch space: data dir, logs, job files, marker files.
    pub dir: tempfile::TempDir,
    /// The server's address, `127.0.0.1:PORT`.
    pub addr: String,
    /// The server's URL: `http://` + addr, or `https://` + addr with `--tls on`.
    pub url: String,
    server: Option<Child>,
    agents: Vec<Option<Child>>,
    /// Agents that reach the server another way than its URL (through a proxy), by index.
    via: std::collections::HashMap<usize, String>,
    server_starts: usize,
    /// More arguments and environment for the server, from [`Cluster::start_with`].
    server_args: Vec<String>,
    server_env: Vec<(String, String)>,
    /// The operator key the server wrote on its first start; every CLI call carries it.
    pub key: String,
}

impl Cluster {
    /// A server and `agents` agents named `agent-0`, `agent-1`, ... with `cores` each.
    pub fn start(agents: usize, cores: u32) -> Cluster {
        Cluster::start_with(agents, cores, &[], &[])
    }

    /// [`Cluster::start`] with more server arguments and environment variables.
    pub fn start_with(
        agents: usize,
        cores: u32,
        server_args: &[&str],
        server_env: &[(&str, &str)],
    ) -> Cluster {
        Cluster::start_inner(agents, cores, server_args, server_env, |_| {})
    }

    /// [`Cluster::start_with`] (no extra environment), running `prepare` on the scratch
    /// directory before the server starts: to mount a small filesystem where the server's
    /// data goes (`server-data`), say.
    pub fn start_prepared(
        agents: usize,
        cores: u32,
        server_args: &[&str],
        prepare: impl FnOnce(&Path),
    ) -> Cluster {
        Cluster::start_inner(agents, cores, server_args, &[], prepare)
    }

    fn start_inner(
        agents: usize,
        cores: u32,
        server_args: &[&str],
        server_env: &[(&str, &str)],
        prepare: impl FnOnce(&Path),
    ) -> Cluster {
        let dir = scratch_dir();
        prepare(dir.path());
        let mut c = Cluster {
            dir,
            addr: "127.0.0.1:0".into(),
            url: String::new(),
            server: None,
            agents: Vec::new(),
            via: Default::default(),
            server_starts: 0,
            server_args: server_args.iter().map(|a| a.to_string()).collect(),
            server_env: server_env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            key: String::new(),
        };
        c.start_server();
        for _ in 0..agents {
            c.add_agent(cores);
        }
        c.wait_for_nodes(agents);
        c
    }

    /// A path inside the scratch directory (tasks may read and write there too).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn log_file(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(&format!("{name}.log")))
            .expect("log file")
    }

    /// Starts (or restarts, on the same address and data) the server.
    pub fn start_server(&mut self) {
        let mut command = Command::new(drover_bin());
        command.args(["server", "--listen", &self.addr]);
        // A test that sets its own lease sets its own heartbeat too.
        if !self.server_args.iter().any(|a| a == "--lease") {
            command.args(["--lease", LEASE, "--heartbeat", HEARTBEAT]);
        }
        let mut child = command
            .arg("--data-dir")
            .arg(self.path("server-data"))
            .args(&self.server_args)
            .envs(self.server_env.iter().map(|(k, v)| (k, v)))
            .env("DROVER_LOG", "info,drover_server=debug")
            .stdout(Stdio::piped())
            .stderr(self.log_file("server"))
            .spawn()
            .expect("spawn server");
        let stdout = child.stdout.take().expect("server stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("server says where it listens");
        let url = line.trim().rsplit(' ').next().unwrap_or_default().to_string();
        assert!(
            url.starts_with("http://") || url.starts_with("https://"),
            "unexpected server banner: {line:?}"
        );
        self.addr = url.trim_start_matches("http://").trim_start_matches("https://").to_string();
        self.url = url;
        self.server = Some(child);
        self.server_starts += 1;
        if self.key.is_empty() {
            self.key = operator_key(&self.path("server-data"));
        }
    }

    /// Kills the server with SIGKILL (no chance to clean up).
    pub fn kill_server(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
    }

    /// Starts another agent; returns its index.
    pub fn add_agent(&mut self, cores: u32) -> usize {
        self.add_agent_with(cores, &[], &[])
    }

    /// Starts another agent with extra arguments and environment; returns its index. A
    /// restarted agent gets neither.
    pub fn add_agent_with(&mut self, cores: u32, args: &[&str], env: &[(&str, &str)]) -> usize {
        let i = self.agents.len();
        let mut command = self.agent_command(i, cores);
        command.args(args).envs(env.iter().copied());
        self.agents.push(Some(command.spawn().expect("spawn agent")));
        i
    }

    fn spawn_agent(&self, i: usize, cores: u32) -> Child {
        self.agent_command(i, cores).spawn().expect("spawn agent")
    }

    /// Starts another agent that reaches the server at `url` (a proxy in front of it);
    /// returns its index. A restart keeps the way.
    pub fn add_agent_via(&mut self, cores: u32, url: &str) -> usize {
        let i = self.agents.len();
        self.via.insert(i, url.to_owned());
        let child = self.spawn_agent(i, cores);
        self.agents.push(Some(child));
        i
    }

    fn agent_command(&self, i: usize, cores: u32) -> Command {
        let name = format!("agent-{i}");
        let work = self.path(&format!("{name}-work"));
        let server = self.via.get(&i).unwrap_or(&self.url);
        let mut command = Command::new(agent_bin());
        command
            .args(["--server", server, "--name", &name, "--cores", &cores.to_string()])
            .args(["--kill-grace", "1s", "--work-dir"])
            .arg(&work);
        // A new agent enrolls with a fresh join token; a restarted one finds its credential.
        if !work.join(".node-credential.json").exists() {
            command.args(["--join", &self.join_token()]);
        }
        command.env("DROVER_LOG", "info").stdout(Stdio::null()).stderr(self.log_file(&name));
        command
    }

    /// Starts agent `i` again (same name and work dir) after it was killed.
    pub fn restart_agent(&mut self, i: usize, cores: u32) {
        assert!(self.agents[i].is_none(), "agent {i} is still running");
        let child = self.spawn_agent(i, cores);
        self.agents[i] = Some(child);
    }

    /// Starts agent `i` again (after [`Cluster::kill_agent`]) with extra flags and environment,
    /// as [`Cluster::add_agent_with`] started it.
    pub fn restart_agent_with(&mut self, i: usize, cores: u32, args: &[&str], env: &[(&str, &str)]) {
        assert!(self.agents[i].is_none(), "agent {i} is still running");
        let mut command = self.agent_command(i, cores);
        command.args(args).envs(env.iter().copied());
        self.agents[i] = Some(command.spawn().expect("spawn agent"));
    }

    /// Kills agent `i` with SIGKILL while its tasks run, starts it again, and waits until it
    /// has re-attached a step for the `nth` time (its log keeps every run's lines).
    pub fn kill_and_reattach(&mut self, i: usize, cores: u32, nth: usize) {
        self.kill_agent(i);
        self.restart_agent(i, cores);
        wait_for_lines(
            self,
            &format!("agent-{i}.log"),
            "re-attached to a step",
            nth,
            Duration::from_secs(60),
        );
    }

    /// Stops agent `i` with SIGTERM, as an operator would, and waits for it to exit.
    pub fn terminate_agent(&mut self, i: usize) {
        if let Some(mut a) = self.agents[i].take() {
            let _ = Command::new("kill").args(["-TERM", &a.id().to_string()]).status();
            let _ = a.wait();
        }
    }

    /// Stops agent `i` with SIGTERM, killing it if it has not exited within `grace`: an agent
    /// that stops removes its idle cgroups, which a killed one leaves on the machine.
    fn stop_agent(&mut self, i: usize, grace: Duration) {
        if let Some(a) = self.agents[i].as_mut() {
            stop_within(a, grace);
        }
        self.kill_agent(i);
    }

    /// Kills agent `i` with SIGKILL.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut a) = self.agents[i].take() {
            let _ = a.kill();
            let _ = a.wait();
        }
    }

    /// Sets a secret of the default project, its value on stdin as users give it.
    pub fn set_secret(&self, name: &str, value: &str) {
        let mut child = self
            .command(&["secrets", "set", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run drover secrets set");
        child.stdin.take().expect("stdin").write_all(value.as_bytes()).expect("write the value");
        let out = child.wait_with_output().expect("wait for drover secrets set");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    /// A single-use join token for one more agent.
    pub fn join_token(&self) -> String {
        let out = self.ok(&["nodes", "token", "create", "-o", "json"]);
        let v: Value = serde_json::from_str(&out).expect("token create -o json");
        v["token"].as_str().expect("token").to_string()
    }

    /// Runs the CLI against this cluster, as the operator.
    pub fn drover(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run drover")
    }

    /// Runs the CLI against this cluster with another key (`None`: no key at all).
    pub fn drover_as(&self, key: Option<&str>, args: &[&str]) -> Output {
        let mut command = self.command(args);
        command.env_remove("DROVER_KEY");
        if let Some(key) = key {
            command.env("DROVER_KEY", key);
        }
        command.output().expect("run drover")
    }

    /// Runs the CLI and insists that it succeeds; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.drover(args);
        assert!(
            out.status.success(),
            "drover {args:?} failed: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A command that would run the CLI against this cluster, for tests that manage the child.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(drover_bin());
        c.args(args)
            .env("DROVER_SERVER", &self.url)
            .env("DROVER_KEY", &self.key)
            .env("DROVER_CREDENTIALS", self.path("credentials"))
            .current_dir(self.dir.path());
        if self.url.starts_with("https://") {
            c.env("DROVER_CA", self.path("server-data/tls/ca.pem"));
        }
        c
    }

    /// Writes a job file into the scratch directory and returns its path.
    pub fn job_file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).expect("write job file");
        path
    }

    /// Submits a job file (with `dir` set to the scratch directory as a parameter) and
    /// returns the job id.
    pub fn submit(&self, text: &str) -> i64 {
        let file = self.job_file("job.yaml", text);
        let dir = format!("dir={}", self.dir.path().display());
        let out = self.ok(&["submit", "-o", "json", "--param", &dir, &file.display().to_string()]);
        let v: Value = serde_json::from_str(&out).expect("submit -o json");
        v["id"].as_i64().expect("job id")
    }

    /// `status -o json` of a job.
    pub fn status(&self, job: i64) -> Value {
        let out = self.ok(&["status", "-o", "json", &job.to_string()]);
        serde_json::from_str(&out).expect("status -o json")
    }

    /// Polls until `check` accepts the job's status, or panics after `timeout`.
    pub fn wait_until(
        &self,
        job: i64,
        timeout: Duration,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let start = Instant::now();
        loop {
            let out = self.drover(&["status", "-o", "json", &job.to_string()]);
            if out.status.success() {
                let v: Value = serde_json::from_slice(&out.stdout).expect("status json");
                if check(&v) {
                    return v;
                }
                if start.elapsed() > timeout {
                    panic!("timed out waiting for {what}; last status: {v:#}");
                }
            } else if start.elapsed() > timeout {
                panic!(
                    "timed out waiting for {what}; status failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the job is in a final state and returns its status.
    pub fn wait_done(&self, job: i64, timeout: Duration) -> Value {
        self.wait_until(job, timeout, "the job to end", |v| {
            matches!(v["state"].as_str(), Some("succeeded" | "warning" | "failed" | "cancelled"))
        })
    }

    /// Waits until `n` nodes are ready.
    pub fn wait_for_nodes(&self, n: usize) {
        let start = Instant::now();
        loop {
            let out = self.drover(&["nodes", "-o", "json"]);
            if out.status.success() {
                let v: Value = serde_json::from_slice(&out.stdout).expect("nodes json");
                let ready =
                    v.as_array().map(|a| a.iter().filter(|n| n["state"] == "ready").count()).unwrap_or(0);
                if ready >= n {
                    return;
                }
            }
            assert!(start.elapsed() < Duration::from_secs(30), "{n} nodes never became ready");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What the server logged so far (all of its runs).
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.path("server.log")).unwrap_or_default()
    }

    /// How many times the server was started.
    pub fn server_starts(&self) -> usize {
        self.server_starts
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Agents first, while their server still answers.
        for i in 0..self.agents.len() {
            self.stop_agent(i, AGENT_STOP_GRACE);
        }
        self.kill_server();
        if std::thread::panicking() {
            print_log_tails(self.dir.path(), 60);
        }
    }
}

/// Prints the last `lines` lines of every `*.log` in `dir`: what a failed test shows.
pub fn print_log_tails(dir: &Path, lines: usize) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(lines).collect();
            eprintln!("---- {} (last lines) ----", p.display());
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// How long a test's teardown lets an agent stop before it is killed.
pub const AGENT_STOP_GRACE: Duration = Duration::from_secs(5);

/// Sends `child` SIGTERM and waits up to `grace` for it to exit; returns whether it did.
pub fn stop_within(child: &mut Child, grace: Duration) -> bool {
    if !matches!(child.try_wait(), Ok(None)) {
        return true;
    }
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let asked = Instant::now();
    while asked.elapsed() < grace {
        if !matches!(child.try_wait(), Ok(None)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// The first operator key a server wrote into its data directory, waiting for the file.
pub fn operator_key(data_dir: &Path) -> String {
    let path = data_dir.join("operator.key");
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(&path)
            && !text.trim().is_empty()
        {
            return text.trim().to_string();
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The tasks of a status, by display name (`name` or `name[frame]`).
pub fn task<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["tasks"]
        .as_array()
        .and_then(|ts| {
            ts.iter().find(|t| {
                let display = match t["frame"].as_i64() {
                    Some(f) => format!("{}[{}]", t["name"].as_str().unwrap_or_default(), f),
                    None => t["name"].as_str().unwrap_or_default().to_string(),
                };
                display == name
            })
        })
        .unwrap_or_else(|| panic!("no task {name} in {status:#}"))
}

/// Whether a process is alive (a zombie counts as dead: it runs nothing).
/// Waits until the cluster's log `file` (e.g. `agent-0.log`) contains `what`, for at most
/// `patience`.
pub fn wait_for_line(c: &Cluster, file: &str, what: &str, patience: Duration) {
    wait_for_lines(c, file, what, 1, patience);
}

/// Waits until the cluster's log `file` contains `what` `n` times, for at most `patience`.
pub fn wait_for_lines(c: &Cluster, file: &str, what: &str, n: usize, patience: Duration) {
    let start = std::time::Instant::now();
    while std::fs::read_to_string(c.path(file)).unwrap_or_default().matches(what).count() < n {
        assert!(start.elapsed() < patience, "{file} never said {what:?} {n} times");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')).unwrap_or(false)
        }
        Err(_) => false,
    }
}

/// Reads a pid written by a task, waiting for the file to appear.
pub fn read_pid(path: &Path) -> i32 {
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(pid) = text.trim().parse()
        {
            return pid;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The busybox test image every container test uses, imported from the host's
/// `busybox-static` (nothing can be pulled). Built once; racing test processes are fine because
/// `docker import` of the same tag is idempotent for our purposes.
pub const BUSYBOX: &str = "drover-test/busybox:1";

/// Makes sure [`BUSYBOX`] exists in the local Docker engine.
pub fn ensure_busybox_image() {
    let have = Command::new("docker").args(["image", "inspect", BUSYBOX]).output().expect("run docker");
    if have.status.success() {
        return;
    }
    let busybox = Path::new("/bin/busybox");
    assert!(busybox.exists(), "container tests need /bin/busybox: apt-get install -y busybox-static");
    let root = tempfile::tempdir().expect("temp dir");
    for dir in ["bin", "etc", "tmp", "workspace"] {
        std::fs::create_dir_all(root.path().join(dir)).expect("mkdir");
    }
    // The same image as the agent's container tests build under this tag (whichever runs
    // first makes it): steps run as `nobody` and need a world-writable `/tmp`.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root.path().join("tmp"), std::fs::Permissions::from_mode(0o1777))
            .expect("chmod");
    }
    std::fs::copy(busybox, root.path().join("bin/busybox")).expect("copy busybox");
    let list = Command::new(busybox).arg("--list").output().expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines().filter(|a| !a.is_empty() && *a != "busybox") {
        let _ = std::os::unix::fs::symlink("busybox", root.path().join("bin").join(applet));
    }
    std::fs::write(
        root.path().join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
    )
    .expect("passwd");
    std::fs::write(root.path().join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").expect("group");
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(root.path())
        .args(["--owner=0", "--group=0", "-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .expect("tar");
    let import = Command::new("docker")
        .args(["import", "-", BUSYBOX])
        .stdin(tar.stdout.take().expect("tar stdout"))
        .output()
        .expect("docker import");
    assert!(tar.wait().expect("tar").success(), "tar of the busybox root failed");
    assert!(import.status.success(), "docker import failed: {}", String::from_utf8_lossy(&import.stderr));
}

/// A scratch directory that process tasks can use too: they run as uids of their own and get a
/// private `/tmp`, so it lies outside `/tmp` and is world-writable (sticky, like `/tmp`). What
/// the server and agents keep there is theirs: the server's data dir is private to it, and each
/// agent's work dir is hidden from its tasks.
pub fn scratch_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("scratch dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).expect("chmod scratch dir");
    dir
}

/// A tmpfs of `mib` MiB mounted at a path until dropped (mounting needs root), for tests of
/// a full disk.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts one at `path` (made if missing) with the root directory's `mode`.
    pub fn mount(path: &Path, mib: u64, mode: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode={mode}"), "tmpfs"])
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount a tmpfs (the test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(path.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: the server or agent may still hold files there.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Bytes still free on the filesystem of `path`.
pub fn available(path: &Path) -> u64 {
    let stat = nix::sys::statvfs::statvfs(path).unwrap();
    stat.blocks_available() * stat.fragment_size()
}

/// Fills the filesystem of `dir` until `leave` bytes are left; returns the filler's path.
pub fn fill(dir: &Path, leave: u64) -> PathBuf {
    let filler = dir.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let chunk = vec![7u8; 1 << 20];
    while available(dir) > leave + chunk.len() as u64 {
        file.write_all(&chunk).unwrap();
    }
    file.sync_all().unwrap();
    filler
}
