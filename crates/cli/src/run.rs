//! `up`, `server` and `agent`: the long-running modes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use drover_agent::runtime::docker::DockerRuntime;
use drover_agent::runtime::process::ProcessRuntime;
use drover_agent::{Agent, AgentConfig, monitor};
use drover_server::{Backends, ServerConfig};
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
    /// The database: postgres://user:pass@host/db (several servers may share it), or
    /// sqlite://PATH. Default: SQLite at <data dir>/drover.db.
    #[arg(long, env = "DROVER_DATABASE")]
    pub database: Option<String>,
    /// Where blobs (image archives, inputs, outputs, logs) live: a directory, file:///path,
    /// or s3://bucket/prefix (endpoint and region from --s3-endpoint and --s3-region,
    /// credentials from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY). Default: <data dir>/blobs.
    #[arg(long, env = "DROVER_BLOBS")]
    pub blobs: Option<String>,
    /// S3 endpoint for s3:// blob stores (default: AWS_ENDPOINT_URL, else AWS itself).
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub s3_endpoint: Option<String>,
    /// S3 region for s3:// blob stores (default: AWS_REGION).
    #[arg(long, env = "AWS_REGION")]
    pub s3_region: Option<String>,
    /// Largest upload a client may send, like 10GiB.
    #[arg(long, default_value = "10GiB", value_parser = parse_memory)]
    pub max_upload: u64,
    /// Most bytes of outputs one task may keep, like 10GiB; outputs past it are not kept and
    /// the task's reason says which.
    #[arg(long, default_value = "10GiB", value_parser = parse_memory)]
    pub max_outputs_size: u64,
    /// Most output one attempt may log, like 64MiB; past it the beginning and the end are kept
    /// and a line says how much was cut.
    #[arg(long, default_value = "64MiB", value_parser = parse_memory)]
    pub max_log_size: u64,
    /// How long the logs of ended attempts are kept, like 30days; they are archived to the blob
    /// store when the attempt ends and deleted after this.
    #[arg(long, default_value = "30days", value_parser = humantime::parse_duration)]
    pub log_retention: Duration,
    /// Also serve the HTTP API (JSON and downloads) on this address, like 127.0.0.1:7371.
    #[arg(long, env = "DROVER_HTTP")]
    pub http: Option<SocketAddr>,
    /// How long a node may stay silent before it is marked down and its tasks retried elsewhere.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease: Duration,
    /// How often agents send heartbeats (keep well under --lease).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,
    /// Most attempt starts and finishes committed in one database transaction (1 commits each
    /// on its own). Batches only fill up while a commit is in flight, so this costs no latency.
    #[arg(long, default_value_t = drover_server::DEFAULT_COMPLETION_BATCH, value_parser = parse_batch)]
    pub completion_batch: usize,
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
    /// Do not offer the docker runtime even when a Docker engine is reachable.
    #[arg(long)]
    pub no_docker: bool,
    /// Offer the microvm runtime (QEMU microVMs; needs qemu-system-x86, a guest kernel and the
    /// static drover-guest binary next to drover or in DROVER_GUEST_AGENT). Off by default
    /// because checking whether KVM works boots a probe VM at start.
    #[arg(long)]
    pub microvm: bool,
    /// Keep N booted, idle microVMs of IMAGE for tasks to claim (IMAGE=N, repeatable).
    #[arg(long = "microvm-warm", value_name = "IMAGE=N", value_parser = parse_warm)]
    pub microvm_warm: Vec<(String, usize)>,
    /// Boot every microVM instead of restoring it from a per-image snapshot.
    #[arg(long)]
    pub microvm_no_snapshots: bool,
    /// Guest kernel for microVMs (default: the newest /boot/vmlinuz-*; its modules must be in
    /// /lib/modules/VERSION).
    #[arg(long, value_name = "PATH")]
    pub microvm_kernel: Option<PathBuf>,
    /// Time between SIGTERM and SIGKILL when a task is stopped.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub kill_grace: Duration,
    /// LLM API that agent tasks' metering proxies forward to when their job names no
    /// `upstream`, like https://api.anthropic.com.
    #[arg(long, env = "DROVER_LLM_UPSTREAM", value_name = "URL")]
    pub llm_upstream: Option<String>,
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

fn parse_batch(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=65_536).contains(&n) => Ok(n),
        _ => Err(format!("`{s}` is not a batch size; give a number from 1 to 65536")),
    }
}

fn parse_warm(s: &str) -> Result<(String, usize), String> {
    let (image, count) = s.rsplit_once('=').ok_or_else(|| format!("`{s}` is not IMAGE=N"))?;
    let count = count.trim().parse().map_err(|_| format!("`{count}` in `{s}` is not a number of VMs"))?;
    if image.trim().is_empty() {
        return Err(format!("`{s}` names no image"));
    }
    Ok((image.trim().to_owned(), count))
}

fn parse_memory(s: &str) -> Result<u64, String> {
    drover_core::resources::parse_memory(s).map_err(|e| e.to_string())
}

/// Opens the database and blob store the server arguments name.
async fn open_backends(args: &ServerArgs) -> Result<Backends> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create the data directory {}", args.data_dir.display()))?;
    let blobs_url = match &args.blobs {
        Some(url) => url.clone(),
        None => args.data_dir.join("blobs").display().to_string(),
    };
    let mut s3 = drover_blobs::S3Options::from_env();
    if let Some(endpoint) = &args.s3_endpoint {
        s3.allow_http = endpoint.starts_with("http://");
        s3.endpoint = Some(endpoint.clone());
    }
    if let Some(region) = &args.s3_region {
        s3.region = Some(region.clone());
    }
    let blobs = drover_blobs::open_blob_store(&blobs_url, &s3)
        .map_err(|e| anyhow!("cannot open the blob store {blobs_url}: {e}"))?;
    match args.database.as_deref() {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let store = drover_store::postgres::PostgresStore::connect(url)
                .await
                .map_err(|e| anyhow!("cannot open the PostgreSQL database: {e}"))?;
            let store = Arc::new(store);
            Ok(Backends { store: store.clone(), secrets: store.clone(), artifacts: store, blobs })
        }
        Some(url) => {
            let Some(path) = url.strip_prefix("sqlite://") else {
                bail!("--database `{url}` is neither postgres://... nor sqlite://PATH");
            };
            let store = open_sqlite(Path::new(path)).await?;
            Ok(Backends { store: store.clone(), secrets: store.clone(), artifacts: store, blobs })
        }
        None => {
            let store = open_sqlite(&args.data_dir.join("drover.db")).await?;
            Ok(Backends { store: store.clone(), secrets: store.clone(), artifacts: store, blobs })
        }
    }
}

async fn open_sqlite(path: &Path) -> Result<Arc<SqliteStore>> {
    let store = SqliteStore::open(path)
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
    Ok(ServerConfig {
        heartbeat: args.heartbeat,
        lease: args.lease,
        max_upload: args.max_upload,
        max_outputs: args.max_outputs_size,
        max_log: args.max_log_size,
        log_retention: args.log_retention,
        completion_batch: args.completion_batch,
        ..ServerConfig::default()
    })
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
        // Absolute, because container runtimes bind-mount workspaces by path.
        work_dir: {
            let dir = node.work_dir.clone().unwrap_or(default_work);
            std::path::absolute(&dir).unwrap_or(dir)
        },
        kill_grace: node.kill_grace,
    }
}

/// The runtimes this node can offer: always the process runtime; docker when an engine answers.
async fn build_agent(node: &NodeArgs, mut config: AgentConfig) -> Result<Agent> {
    let mut runtimes: Vec<Arc<dyn drover_agent::runtime::Runtime>> = vec![Arc::new(ProcessRuntime::new())];
    let mut docker = None;
    if !node.no_docker {
        // Containers are scoped by the agent's work dir: stable across its restarts, distinct
        // from any other agent sharing the engine.
        let scope = {
            use sha2::Digest as _;
            let digest = sha2::Sha256::digest(config.work_dir.display().to_string().as_bytes());
            hex::encode(&digest[..6])
        };
        match DockerRuntime::connect_scoped(&scope).await {
            Ok(d) => {
                // Leftovers of this agent's earlier run are found through its journal; a sweep
                // of every Drover container here would also hit other agents sharing the engine.
                let d = Arc::new(d);
                runtimes.push(d.clone());
                docker = Some(d);
            }
            Err(e) => tracing::warn!(error = %e, "not offering the docker runtime"),
        }
    }
    if node.microvm {
        let vm_config = drover_agent::runtime::microvm::MicroVmConfig {
            cache_dir: config.work_dir.join(".microvm-cache"),
            run_dir: config.work_dir.join(".vm"),
            warm: node.microvm_warm.iter().cloned().collect(),
            snapshots: !node.microvm_no_snapshots,
            kernel: node.microvm_kernel.clone(),
            ..Default::default()
        };
        match drover_agent::runtime::microvm::MicroVmRuntime::new(vm_config).await {
            Ok(vm) => {
                tracing::info!(accelerator = vm.accelerator(), "microvm runtime ready");
                // Shown by `drover nodes`, and a constraint can ask for KVM-backed VMs.
                config.labels.insert("drover.microvm".into(), vm.accelerator().to_owned());
                runtimes.push(Arc::new(vm));
            }
            Err(e) => tracing::warn!(error = %e, "not offering the microvm runtime"),
        }
    }
    let names: Vec<&str> = runtimes.iter().map(|r| r.kind()).collect();
    tracing::info!(runtimes = ?names, "runtimes available");
    let agent = Agent::new(config, runtimes)?.with_llm_upstream(node.llm_upstream.clone());
    Ok(match docker {
        Some(d) => agent.with_images(d),
        None => agent,
    })
}

/// `drover server`.
pub async fn server(args: ServerArgs) -> Result<ExitCode> {
    let config = server_config(&args)?;
    let backends = open_backends(&args).await?;
    let listener = bind(args.listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, data_dir = %args.data_dir.display(), "drover server listening");
    let http = match args.http {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    if let Some(http) = &http {
        eprintln!("http api on http://{}", http.local_addr()?);
    }
    println!("drover server listening on http://{addr}");
    drover_server::serve_with_http(listener, http, backends, config, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// `drover agent`.
pub async fn agent(args: AgentArgs) -> Result<ExitCode> {
    let config = agent_config(&args.node, args.server.clone(), PathBuf::from(".drover/agent/work"));
    tracing::info!(name = %config.name, cores = config.cores, memory = config.memory, servers = ?config.servers, "drover agent starting");
    let agent = build_agent(&args.node, config).await?;
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
    let backends = open_backends(&args.server).await?;
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
    let http = match args.server.http {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    if let Some(http) = &http {
        eprintln!("http api on http://{}", http.local_addr()?);
    }
    let server = tokio::spawn(drover_server::serve_with_http(listener, http, backends, config, server_stop));
    let agent_config = agent_config(&args.node, vec![url.clone()], args.server.data_dir.join("work"));
    let agent = build_agent(&args.node, agent_config).await?;
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
            let tasks = job.tasks.len();
            let job_id = jobs::send_job(&opt, job, source, filename).await?;
            eprintln!("submitted job {job_id} ({tasks} tasks)");
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
