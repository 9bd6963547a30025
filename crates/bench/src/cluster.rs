//! A Drover cluster made of the real binary: one `drover server` and one `drover agent` as child
//! processes on a loopback port, driven through the gRPC client API. The children are killed when
//! the cluster is dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use drover_core::JobState;
use drover_core::spec::{TemplateContext, compile};
use drover_proto as pb;
use drover_proto::drover_client::DroverClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// The client type used throughout.
pub type Client = DroverClient<Channel>;

/// A running server and agent.
pub struct Cluster {
    /// The server's URL, `http://127.0.0.1:PORT`.
    pub url: String,
    /// Scratch directory of this cluster (data, work dirs, daemon logs).
    pub dir: PathBuf,
    server: Child,
    agent: Child,
}

/// How an agent is started.
pub struct AgentOptions {
    /// Cores the agent offers.
    pub cores: u32,
}

impl Cluster {
    /// Starts a server and one agent under `dir` and waits until the agent's node is ready.
    pub async fn start(drover: &Path, dir: &Path, agent: AgentOptions) -> Result<Cluster> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let log = |name: &str| -> Result<std::fs::File> {
            let path = dir.join(name);
            std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))
        };
        let mut server = Command::new(drover)
            .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.join("server-data"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log("server.log")?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {} server", drover.display()))?;
        let stdout = server.stdout.take().ok_or_else(|| anyhow!("server stdout missing"))?;
        let mut lines = BufReader::new(stdout).lines();
        let banner = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .map_err(|_| anyhow!("the server printed nothing within 30s (see {}/server.log)", dir.display()))?
            .context("cannot read the server's banner")?
            .ok_or_else(|| anyhow!("the server exited at once (see {}/server.log)", dir.display()))?;
        let url = banner
            .rsplit(' ')
            .next()
            .filter(|u| u.starts_with("http://"))
            .ok_or_else(|| anyhow!("unexpected server banner {banner:?}"))?
            .to_string();
        // Keep draining stdout so the server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let agent = Command::new(drover)
            .args(["agent", "--server", &url, "--name", "bench-agent", "--cores"])
            .arg(agent.cores.to_string())
            .arg("--work-dir")
            .arg(dir.join("agent-work"))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log("agent.log")?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {} agent", drover.display()))?;
        let cluster = Cluster { url, dir: dir.to_path_buf(), server, agent };
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

    /// A new client connection.
    pub async fn client(&self) -> Result<Client> {
        let channel = Channel::from_shared(self.url.clone())?
            .connect()
            .await
            .with_context(|| format!("cannot connect to {}", self.url))?;
        Ok(DroverClient::new(channel).max_decoding_message_size(256 << 20))
    }

    async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let mut client = self.client().await?;
        loop {
            let nodes = client.list_nodes(pb::ListNodesRequest {}).await?.into_inner().nodes;
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
        .logs(pb::LogsRequest { job_id, task: String::new(), follow: false, after_id: 0 })
        .await?
        .into_inner();
    let mut total = 0u64;
    while let Some(batch) = stream.next().await {
        total += batch?.lines.iter().map(|l| l.data.len() as u64).sum::<u64>();
    }
    Ok(total)
}
