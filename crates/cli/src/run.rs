//! `up`, `server` and `agent`: the long-running modes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use drover_agent::runtime::process::ProcessRuntime;
use drover_agent::{Agent, AgentConfig, monitor};
use drover_server::ServerConfig;
use drover_store::sqlite::SqliteStore;
use tokio::net::TcpListener;

use crate::client::ServerOpt;
use crate::jobs;

/// Options of the server part.
#[derive(clap::Args, Clone, Debug)]
pub struct ServerArgs {
    /// Address to listen on for clients and agents.
    #[arg(long, default_value = "127.0.0.1:7370", env = "DROVER_LISTEN")]
    pub listen: SocketAddr,
    /// Directory for the database (and, later, blobs).
    #[arg(long, default_value = ".drover", env = "DROVER_DATA_DIR")]
    pub data_dir: PathBuf,
    /// How long a node may stay silent before it is marked down and its tasks retried elsewhere.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease: Duration,
    /// How often agents send heartbeats (keep well under --lease).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,
}

/// Options of the agent part.
#[derive(clap::Args, Clone, Debug)]
pub struct NodeArgs {
    /// Node name, stable across restarts (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Labels for task constraints: k=v,k2=v2.
    #[arg(long, value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Cores to offer (default: all this machine has).
    #[arg(long)]
    pub cores: Option<u32>,
    /// Memory to offer, like 8GiB (default: all this machine has).
    #[arg(long, value_parser = parse_memory)]
    pub memory: Option<u64>,
    /// Directory for task workspaces (default: <data dir>/work, or ./.drover/agent/work).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Time between SIGTERM and SIGKILL when a task is stopped.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub kill_grace: Duration,
}

/// `drover agent`.
#[derive(clap::Args, Clone, Debug)]
pub struct AgentArgs {
    /// Server address(es), comma-separated; tried in turn when one stops answering.
    #[arg(long, env = "DROVER_SERVER", value_delimiter = ',', required = true)]
    pub server: Vec<String>,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// `drover up`.
#[derive(clap::Args, Clone, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub node: NodeArgs,
    /// Submit this job file once up, watch it, and exit with its result.
    #[arg(long, value_name = "FILE")]
    pub submit: Option<PathBuf>,
    /// Template parameters for --submit: K=V.
    #[arg(long = "param", value_parser = jobs::parse_param)]
    pub params: Vec<(String, String)>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("`{s}` is not a label; write key=value"))
}

fn parse_memory(s: &str) -> Result<u64, String> {
    drover_core::resources::parse_memory(s).map_err(|e| e.to_string())
}

async fn open_store(data_dir: &Path) -> Result<Arc<SqliteStore>> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let path = data_dir.join("drover.db");
    let store = SqliteStore::open(&path)
        .await
        .with_context(|| format!("cannot open the database {}", path.display()))?;
    Ok(Arc::new(store))
}

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow!("{addr} is already in use (is another drover running?)\n  hint: pick another with --listen 127.0.0.1:PORT")
        } else {
            anyhow!("cannot listen on {addr}: {e}")
        }
    })
}

fn server_config(args: &ServerArgs) -> Result<ServerConfig> {
    if args.heartbeat >= args.lease {
        bail!("--heartbeat ({:?}) must be shorter than --lease ({:?})", args.heartbeat, args.lease);
    }
    Ok(ServerConfig { heartbeat: args.heartbeat, lease: args.lease, ..ServerConfig::default() })
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}

fn agent_config(node: &NodeArgs, servers: Vec<String>, default_work: PathBuf) -> AgentConfig {
    AgentConfig {
        servers: servers.iter().map(|s| crate::client::normalize(s)).collect(),
        name: node.name.clone().unwrap_or_else(monitor::hostname),
        labels: node.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
        cores: node.cores.unwrap_or_else(monitor::detect_cores),
        memory: node.memory.unwrap_or_else(monitor::detect_memory),
        work_dir: node.work_dir.clone().unwrap_or(default_work),
        kill_grace: node.kill_grace,
    }
}

/// `drover server`.
pub async fn server(args: ServerArgs) -> Result<ExitCode> {
    let config = server_config(&args)?;
    let store = open_store(&args.data_dir).await?;
    let listener = bind(args.listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, data_dir = %args.data_dir.display(), "drover server listening");
    println!("drover server listening on http://{addr}");
    drover_server::serve(listener, store, config, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// `drover agent`.
pub async fn agent(args: AgentArgs) -> Result<ExitCode> {
    let config = agent_config(&args.node, args.server.clone(), PathBuf::from(".drover/agent/work"));
    tracing::info!(name = %config.name, cores = config.cores, memory = config.memory, servers = ?config.servers, "drover agent starting");
    let agent = Agent::new(config, vec![Arc::new(ProcessRuntime::new())])?;
    agent.run(shutdown_signal()).await;
    Ok(ExitCode::SUCCESS)
}

/// `drover up`: a server and one local agent in one process.
pub async fn up(args: UpArgs) -> Result<ExitCode> {
    let config = server_config(&args.server)?;
    // Validate the job before starting anything, so a typo fails fast.
    let job = match &args.submit {
        Some(path) => match jobs::compile_file(path, &args.params)? {
            Ok(job) => Some(job),
            Err(code) => return Ok(code),
        },
        None => None,
    };
    let store = open_store(&args.server.data_dir).await?;
    let listener = bind(args.server.listen).await?;
    let addr = listener.local_addr()?;
    let url = format!("http://{addr}");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server_stop = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let server = tokio::spawn(drover_server::serve(listener, store, config, server_stop));
    let agent_config = agent_config(&args.node, vec![url.clone()], args.server.data_dir.join("work"));
    let agent = Agent::new(agent_config, vec![Arc::new(ProcessRuntime::new())])?;
    let agent_stop = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let agent = tokio::spawn(agent.run(agent_stop));
    eprintln!("drover is up: server and local agent on {url}, data in {}", args.server.data_dir.display());
    let code = match job {
        Some((job, source, filename)) => {
            let opt = ServerOpt { server: url.clone() };
            let job_id = jobs::send_job(&opt, &job, source, filename).await?;
            eprintln!("submitted job {job_id} ({} tasks)", job.tasks.len());
            let code = tokio::select! {
                r = jobs::follow_job(&opt, job_id, 0) => r?,
                _ = shutdown_signal() => return Ok(ExitCode::FAILURE),
            };
            jobs::print_summary(&opt, job_id).await?;
            eprintln!(
                "\nthe job and its logs are kept in {}: run `drover up` again to browse them \
                 (`drover ps --all`, `drover status {job_id}`, `drover logs {job_id}`)",
                args.server.data_dir.display()
            );
            code
        }
        None => {
            eprintln!(
                "submit a job from another terminal:  drover submit examples/hello.yaml --watch --server {url}"
            );
            shutdown_signal().await;
            ExitCode::SUCCESS
        }
    };
    let _ = stop_tx.send(true);
    let _ = agent.await;
    // Clients still streaming (a `watch` in another terminal) would hold the server open.
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(r)) => r?,
        Ok(Err(e)) => bail!("server task failed: {e}"),
        Err(_) => tracing::warn!("server did not stop within 5s; exiting anyway"),
    }
    Ok(code)
}
