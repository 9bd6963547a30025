//! A Drover cluster made of the real binaries: one `drover server` and one agent (`drover-agent`,
//! see [`AgentProgram`]) as child processes on a loopback port, driven through the gRPC client API. The children are killed when
//! the cluster is dropped.
//!
//! Authorization is on, as users run it: the bench reads the operator key the server writes on
//! its first start, every call carries it, and the agent enrolls with a join token made through
//! the API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use drover_core::JobState;
use drover_core::spec::{TemplateContext, compile};
use drover_proto as pb;
use drover_proto::Bearer;
use drover_proto::drover_client::DroverClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The client type used throughout: every call carries the operator key.
pub type Client = DroverClient<InterceptedService<Channel, Bearer>>;

/// The file a server writes its first operator key to, in its data directory.
const OPERATOR_KEY: &str = "operator.key";

/// A running server and agent.
pub struct Cluster {
    /// The server's URL, `http://127.0.0.1:PORT`.
    pub url: String,
    /// Scratch directory of this cluster (data, work dirs, daemon logs).
    pub dir: PathBuf,
    /// The operator key the server wrote on its first start.
    key: String,
    server: Child,
    agent: Child,
}

/// How an agent is started.
pub struct AgentOptions {
    /// Cores the agent offers.
    pub cores: u32,
    /// Which executable.
    pub program: AgentProgram,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The agent first: it stops while its server still answers.
        stop_gracefully(std::slice::from_mut(&mut self.agent), STOP_GRACE);
        stop_gracefully(std::slice::from_mut(&mut self.server), STOP_GRACE);
    }
}

/// How the bench starts agents.
#[derive(Debug, Clone)]
pub enum AgentProgram {
    /// An executable that is the agent alone (`drover-agent`), as worker nodes run it.
    Alone(PathBuf),
    /// The `agent` command of a `drover` executable (for a build without `drover-agent`).
    Subcommand(PathBuf),
}

impl AgentProgram {
    /// `given`, else `drover-agent` beside `drover`, else `drover agent`.
    pub fn find(drover: &Path, given: Option<&Path>) -> AgentProgram {
        if let Some(agent) = given {
            return AgentProgram::Alone(agent.to_path_buf());
        }
        let beside = drover.with_file_name("drover-agent");
        if beside.is_file() {
            AgentProgram::Alone(beside)
        } else {
            AgentProgram::Subcommand(drover.to_path_buf())
        }
    }

    /// How the figures name it.
    pub fn name(&self) -> &'static str {
        match self {
            AgentProgram::Alone(_) => "drover-agent",
            AgentProgram::Subcommand(_) => "drover agent",
        }
    }

    /// The executable.
    pub fn path(&self) -> &Path {
        match self {
            AgentProgram::Alone(p) | AgentProgram::Subcommand(p) => p,
        }
    }

    /// A command that starts an agent; its flags follow.
    pub fn command(&self) -> Command {
        let mut command = Command::new(self.path());
        if let AgentProgram::Subcommand(_) = self {
            command.arg("agent");
        }
        command
    }
}

impl Cluster {
    /// Starts a server and one agent under `dir` and waits until the agent's node is ready.
    pub async fn start(drover: &Path, dir: &Path, agent: AgentOptions) -> Result<Cluster> {
        Cluster::start_with(drover, dir, agent, &[]).await
    }

    /// [`Cluster::start`] with more arguments for the server.
    pub async fn start_with(
        drover: &Path,
        dir: &Path,
        agent: AgentOptions,
        server_args: &[String],
    ) -> Result<Cluster> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let log = |name: &str| -> Result<std::fs::File> {
            let path = dir.join(name);
            std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))
        };
        let data_dir = dir.join("server-data");
        let mut server = Command::new(drover)
            .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data_dir)
            .args(server_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log("server.log")?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {} server", drover.display()))?;
        let url = banner(&mut server, dir).await?;
        let key = operator_key(std::slice::from_ref(&data_dir)).await?;
        let token = join_token(&mut connect(&url, &key).await?).await?;
        let agent = agent
            .program
            .command()
            .args(["--server", &url, "--join", &token, "--name", "bench-agent", "--cores"])
            .arg(agent.cores.to_string())
            .arg("--work-dir")
            .arg(dir.join("agent-work"))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log("agent.log")?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", agent.program.path().display()))?;
        let cluster = Cluster { url, dir: dir.to_path_buf(), key, server, agent };
        cluster.wait_ready(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    /// Process id of the server.
    pub fn server_pid(&self) -> Result<u32> {
        self.server.id().ok_or_else(|| anyhow!("the server has exited"))
    }

    /// Process id of the agent.
    pub fn agent_pid(&self) -> Result<u32> {
        self.agent.id().ok_or_else(|| anyhow!("the agent has exited"))
    }

    /// The operator key, for `drover` commands run against the cluster (as `DROVER_KEY`).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// A new client connection.
    pub async fn client(&self) -> Result<Client> {
        connect(&self.url, &self.key).await
    }

    async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let mut client = self.client().await?;
        loop {
            let nodes = client.list_nodes(pb::ListNodesRequest::default()).await?.into_inner().nodes;
            if nodes.iter().any(|n| n.state == "ready") {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!("the agent did not register within {timeout:?} (see {}/agent.log)", self.dir.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// How long [`stop_gracefully`] waits for the processes it asked to stop.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Asks `children` to stop (SIGTERM) one after the other, each given up to `grace` to exit;
/// one still running after that is left to `kill_on_drop`. An agent that stops this way
/// removes its idle cgroups, which a killed one leaves behind on the machine for good.
/// Blocking: meant for teardown.
pub fn stop_gracefully(children: &mut [Child], grace: Duration) {
    for child in children {
        let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) else { continue };
        // SAFETY: a signal to our own child, which is not reaped yet (`id` is `Some`).
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            continue;
        }
        let asked = Instant::now();
        while matches!(child.try_wait(), Ok(None)) && asked.elapsed() < grace {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Reads the URL a starting server prints (`drover server listening on URL`), then keeps
/// draining its stdout so the server never blocks on a full pipe. `dir` holds its log.
pub async fn banner(server: &mut Child, dir: &Path) -> Result<String> {
    let stdout = server.stdout.take().ok_or_else(|| anyhow!("server stdout missing"))?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .map_err(|_| anyhow!("a server printed nothing within 30s (see {})", dir.display()))?
        .context("cannot read a server's banner")?
        .ok_or_else(|| anyhow!("a server exited at once (see {})", dir.display()))?;
    let url = line
        .rsplit(' ')
        .next()
        .filter(|u| u.starts_with("http://"))
        .ok_or_else(|| anyhow!("unexpected server banner {line:?}"))?
        .to_string();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(url)
}

/// The first operator key, from whichever of these server data directories has one. A server
/// writes it (before its banner) only when it finds no key in the store, so of replicas sharing
/// one database usually only the first does; replicas started together can race and each write
/// one, and then any of them works. After every banner at least one directory holds a key.
pub async fn operator_key(data_dirs: &[PathBuf]) -> Result<String> {
    let timeout = Duration::from_secs(30);
    let start = Instant::now();
    loop {
        for dir in data_dirs {
            let path = dir.join(OPERATOR_KEY);
            match tokio::fs::read_to_string(&path).await {
                Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
            }
        }
        if start.elapsed() > timeout {
            let dirs: Vec<String> = data_dirs.iter().map(|d| d.display().to_string()).collect();
            bail!(
                "no {OPERATOR_KEY} appeared in {} within {timeout:?} (was a server started with --no-auth?)",
                dirs.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client of the server at `url` whose calls carry `key`.
pub async fn connect(url: &str, key: &str) -> Result<Client> {
    let bearer = Bearer::new(Some(key))?;
    let channel = Channel::from_shared(url.to_string())?
        .connect()
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    Ok(DroverClient::with_interceptor(channel, bearer).max_decoding_message_size(256 << 20))
}

/// A single-use join token that enrolls one agent, valid for the server's default lifetime.
pub async fn join_token(client: &mut Client) -> Result<String> {
    let resp = client
        .create_join_token(pb::CreateJoinTokenRequest { labels: Default::default(), expires_in_ms: 0 })
        .await
        .context("cannot create a join token")?;
    Ok(resp.into_inner().token)
}

/// Compiles a job file's text into the plan `Submit` takes, as JSON.
pub fn plan_json(yaml: &str) -> Result<String> {
    let ctx = TemplateContext { env: BTreeMap::new(), params: BTreeMap::new() };
    let plan = compile(yaml, "bench.yaml", &ctx).map_err(|e| anyhow!("bench job does not compile: {e}"))?;
    Ok(serde_json::to_string(&plan)?)
}

/// Submits a compiled plan; returns the job id once the server committed it.
pub async fn submit(client: &mut Client, plan_json: &str) -> Result<i64> {
    let resp = client
        .submit(pb::SubmitRequest {
            plan_json: plan_json.to_string(),
            source: String::new(),
            filename: "bench.yaml".into(),
            ..Default::default()
        })
        .await?;
    Ok(resp.into_inner().job_id)
}

/// When a watched job's milestones were seen by the client.
pub struct Watched {
    /// The first `running` event of a task.
    pub first_running: Option<Instant>,
    /// The job's final event.
    pub done: Instant,
    /// The job's final state.
    pub state: JobState,
}

/// Follows a job's events until it reaches a final state or `timeout` passes.
pub async fn watch(client: &mut Client, job_id: i64, timeout: Duration) -> Result<Watched> {
    let follow = async {
        let mut stream = client.watch(pb::WatchRequest { job_id, after_seq: 0 }).await?.into_inner();
        let mut first_running = None;
        while let Some(ev) = stream.next().await {
            let ev = ev?;
            if ev.kind == "task" && ev.state == "running" && first_running.is_none() {
                first_running = Some(Instant::now());
            }
            if ev.kind == "job"
                && let Ok(state) = JobState::from_str(&ev.state)
                && state.is_final()
            {
                return Ok(Watched { first_running, done: Instant::now(), state });
            }
        }
        bail!("the watch stream of job {job_id} ended before the job did")
    };
    tokio::time::timeout(timeout, follow)
        .await
        .map_err(|_| anyhow!("job {job_id} did not end within {timeout:?}"))?
}

/// Counts the bytes of a job's stored output, through the `Logs` API.
pub async fn stored_output_bytes(client: &mut Client, job_id: i64) -> Result<u64> {
    let mut stream = client
        .logs(pb::LogsRequest { job_id, task: String::new(), follow: false, after_id: 0, chunks: true })
        .await?
        .into_inner();
    let mut total = 0u64;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        total += batch.lines.iter().map(|l| l.data.len() as u64).sum::<u64>();
        total += batch.chunks.iter().map(|c| c.data.len() as u64).sum::<u64>();
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spawn(script: &str) -> Child {
        Command::new("sh").args(["-c", script]).kill_on_drop(true).spawn().expect("spawn sh")
    }

    #[tokio::test]
    async fn a_child_is_asked_to_stop_and_one_that_will_not_is_left_after_the_grace() {
        // `exec` so that the signal reaches sleep itself, which ends on it.
        let mut obliging = [spawn("exec sleep 30")];
        stop_gracefully(&mut obliging, Duration::from_secs(30));
        let status = obliging[0].try_wait().expect("wait").expect("it stopped");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGTERM));

        let mut stubborn = [Command::new("sh")
            .args(["-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn sh")];
        // Asked only once its trap is set.
        let mut ready = String::new();
        let stdout = stubborn[0].stdout.take().expect("stdout");
        BufReader::new(stdout).read_line(&mut ready).await.expect("read");
        assert_eq!(ready, "ready\n");
        stop_gracefully(&mut stubborn, Duration::from_millis(100));
        assert!(matches!(stubborn[0].try_wait(), Ok(None)), "still running after the grace");
        stubborn[0].kill().await.expect("kill");
    }
}
