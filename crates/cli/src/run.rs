//! `up`, `server` and `agent`: the long-running modes, and `config print`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use std::os::unix::fs::DirBuilderExt as _;

use anyhow::{Context, Result, anyhow, bail};
use drover_agent::runtime::docker::DockerRuntime;
use drover_agent::runtime::process::{ProcessConfig, ProcessRuntime};
use drover_agent::{Agent, AgentConfig, monitor};
use drover_server::{Backends, ServerConfig, TlsSettings};
use drover_store::sqlite::SqliteStore;
use drover_tls::Trust;
use tokio::net::TcpListener;

use crate::args::{AgentArgs, PrintArgs, ServerCommand, UpArgs};
use crate::client::ServerOpt;
use crate::config::{AgentSettings, Config, Overrides, ServerSettings};
use crate::credentials::{self, CredentialsFile, ServerCredentials};
use crate::jobs;

/// Name of the first operator key in the data directory.
const OPERATOR_KEY: &str = "operator.key";

/// Reads the configuration of a command: the file, then its flags and variables.
fn load_config(file: Option<&Path>, set: impl FnOnce(&mut Overrides)) -> Result<Config> {
    let mut overrides = Overrides::default();
    set(&mut overrides);
    Ok(crate::config::load(file, overrides)?)
}

/// Opens the database and blob store the server settings name.
async fn open_backends(s: &ServerSettings) -> Result<Backends> {
    if !s.data_dir.exists() {
        // The database, the keys and the blobs: nobody else's business, tasks of a local
        // agent included.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&s.data_dir)
            .with_context(|| format!("cannot create the data directory {}", s.data_dir.display()))?;
    }
    let blobs_url = match &s.blobs {
        Some(url) => url.clone(),
        None => s.data_dir.join("blobs").display().to_string(),
    };
    let mut s3 = drover_blobs::S3Options::from_env();
    if let Some(endpoint) = &s.s3_endpoint {
        s3.allow_http = endpoint.starts_with("http://");
        s3.endpoint = Some(endpoint.clone());
    }
    if let Some(region) = &s.s3_region {
        s3.region = Some(region.clone());
    }
    let blobs = drover_blobs::open_blob_store(&blobs_url, &s3)
        .map_err(|e| anyhow!("cannot open the blob store {blobs_url}: {e}"))?;
    match s.database.as_deref() {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let store = drover_store::postgres::PostgresStore::connect(url)
                .await
                .map_err(|e| anyhow!("cannot open the PostgreSQL database: {e}"))?;
            let store = Arc::new(store);
            Ok(backends(store, blobs))
        }
        Some(url) => {
            let Some(path) = url.strip_prefix("sqlite://") else {
                bail!("server.database `{url}` is neither postgres://... nor sqlite://PATH");
            };
            let store = open_sqlite(Path::new(path)).await?;
            Ok(backends(store, blobs))
        }
        None => {
            let store = open_sqlite(&s.data_dir.join("drover.db")).await?;
            Ok(backends(store, blobs))
        }
    }
}

/// One store serving every part of the server's state.
fn backends<S>(store: Arc<S>, blobs: Arc<dyn drover_blobs::BlobStore>) -> Backends
where
    S: drover_store::Store
        + drover_store::SecretStore
        + drover_store::ArtifactStore
        + drover_store::AccessStore
        + drover_store::TenantStore
        + drover_store::RetentionStore,
{
    Backends {
        store: store.clone(),
        secrets: store.clone(),
        artifacts: store.clone(),
        access: store.clone(),
        tenants: store.clone(),
        retention: store,
        blobs,
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

/// The names a server-made certificate must cover: what clients may dial. For a wildcard
/// address, every address of this machine and its host name.
fn certificate_names(s: &ServerSettings) -> Vec<String> {
    let mut names =
        vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned(), monitor::hostname()];
    let mut add_ip = |ip: IpAddr| names.push(ip.to_string());
    for addr in std::iter::once(s.listen).chain(s.http) {
        if addr.ip().is_unspecified() {
            if let Ok(interfaces) = nix::ifaddrs::getifaddrs() {
                for ifa in interfaces {
                    let Some(a) = ifa.address else { continue };
                    if let Some(v4) = a.as_sockaddr_in() {
                        add_ip(IpAddr::V4(v4.ip()));
                    } else if let Some(v6) = a.as_sockaddr_in6()
                        && !v6.ip().is_unicast_link_local()
                    {
                        add_ip(IpAddr::V6(v6.ip()));
                    }
                }
            }
        } else {
            add_ip(addr.ip());
        }
    }
    names.extend(s.tls_names.iter().cloned());
    names.sort();
    names.dedup();
    names
}

/// The listeners' TLS, when the configuration asks for it: the given certificate, or the
/// server-made CA in `<data dir>/tls` (created on first start). Prints where the CA is and its
/// fingerprint, which clients pin.
fn server_tls(config: &Config) -> Result<Option<TlsSettings>> {
    if !config.server_tls() {
        return Ok(None);
    }
    let s = &config.server;
    let identity = match (&s.tls_cert, &s.tls_key) {
        (Some(cert), Some(key)) => drover_tls::load_server_identity(cert, key)?,
        _ => {
            let dir = s.data_dir.join("tls");
            let (identity, created) = drover_tls::ensure_server_identity(&dir, &certificate_names(s))?;
            if created {
                eprintln!("made a certificate authority for this server in {}", dir.display());
            }
            identity
        }
    };
    let tls_config = drover_tls::server_config(&identity)?;
    let (ca_pem, ca_fingerprint) = match (identity.ca_pem.clone(), identity.ca_fingerprint.clone()) {
        (Some(pem), Some(fp)) => (pem, fp),
        _ => (String::new(), String::new()),
    };
    if !ca_fingerprint.is_empty() {
        eprintln!("tls on; clients trust the CA {} (sha256:{ca_fingerprint})", ca_file(s).display());
    }
    Ok(Some(TlsSettings { config: tls_config, ca_pem, ca_fingerprint }))
}

/// Where clients on this machine find the server's CA certificate.
fn ca_file(s: &ServerSettings) -> PathBuf {
    let path = match &s.tls_cert {
        Some(cert) => cert.clone(),
        None => s.data_dir.join("tls").join("ca.pem"),
    };
    std::path::absolute(&path).unwrap_or(path)
}

/// The directories whose filesystems hold what the server keeps: its data dir, and its blob
/// dir when blobs are kept on a local disk.
fn kept_dirs(s: &crate::config::ServerSettings) -> Vec<PathBuf> {
    let mut dirs = vec![s.data_dir.clone()];
    if let Some(blobs) = &s.blobs
        && !blobs.contains("://")
    {
        dirs.push(PathBuf::from(blobs));
    } else if let Some(path) = s.blobs.as_deref().and_then(|b| b.strip_prefix("file://")) {
        dirs.push(PathBuf::from(path));
    }
    dirs
}

fn server_config(config: &Config, tls: Option<TlsSettings>) -> ServerConfig {
    let s = &config.server;
    ServerConfig {
        heartbeat: s.heartbeat,
        lease: s.lease,
        max_upload: s.max_upload,
        max_outputs: s.max_outputs_size,
        max_log: s.max_log_size,
        log_retention: s.log_retention,
        blob_grace: s.blob_grace,
        completion_batch: s.completion_batch,
        assign_ahead: s.assign_ahead,
        auth: !s.no_auth,
        tls,
        oidc: config.oidc.as_ref().map(crate::config::OidcSection::server_config),
        data_dirs: kept_dirs(s),
        min_free: s.min_free,
        ..ServerConfig::default()
    }
}

/// A server ready to serve: its store and blobs opened, its listeners bound, its first
/// operator key written.
struct Prepared {
    listener: TcpListener,
    http: Option<TcpListener>,
    backends: Backends,
    config: ServerConfig,
    /// `http://` or `https://` and the address it listens on.
    url: String,
}

async fn prepare_server(config: &Config) -> Result<Prepared> {
    let s = &config.server;
    let tls = server_tls(config)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut backends = open_backends(s).await?;
    seal_secrets(s, &mut backends).await?;
    apply_tenancy(config, &backends).await?;
    if !s.no_auth {
        let path = s.data_dir.join(OPERATOR_KEY);
        if let Some(path) = drover_server::auth::first_operator_key(&*backends.access, &path).await? {
            eprintln!(
                "wrote the first operator key to {} (readable by you only; it is not shown again)",
                path.display()
            );
        }
    }
    let listener = bind(s.listen).await?;
    let addr = listener.local_addr()?;
    let http = match s.http {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    if let Some(http) = &http {
        eprintln!("http api on {scheme}://{}", http.local_addr()?);
    }
    tracing::info!(%addr, data_dir = %s.data_dir.display(), tls = tls.is_some(), auth = !s.no_auth, "drover server listening");
    // A wildcard address is reached through loopback from this machine.
    let local = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::from(([127, 0, 0, 1], addr.port())),
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    };
    Ok(Prepared {
        listener,
        http,
        backends,
        config: server_config(config, tls),
        url: format!("{scheme}://{local}"),
    })
}

/// Puts the secret key file's seal on the backends' secrets, making the key file on first
/// start when none is configured, and seals again whatever is in plain text or under an older
/// key (which completes a rotation).
async fn seal_secrets(s: &ServerSettings, backends: &mut Backends) -> Result<()> {
    use drover_server::sealed::{SealedSecrets, SecretKeys};
    let (path, create) = match &s.secrets_key {
        Some(path) => (path.clone(), false),
        None => (s.data_dir.join("secrets.key"), true),
    };
    let (keys, created) = SecretKeys::load_or_create(&path, create)?;
    if created {
        eprintln!("made the key that seals project secrets: {} (keep it, and back it up)", path.display());
        let shared_db = s.database.as_deref().is_some_and(|d| d.starts_with("postgres"));
        if shared_db {
            tracing::warn!(path = %path.display(), "replicas sharing this database need this same secrets key file (--secrets-key)");
        }
    }
    let sealed = SealedSecrets::new(backends.secrets.clone(), keys);
    let projects: Vec<String> = backends.access.projects().await?.into_iter().map(|p| p.name).collect();
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis()
            as i64;
    let resealed = sealed.reseal_all(&projects, now).await?;
    if resealed > 0 {
        tracing::info!(resealed, "sealed project secrets with the current key");
    }
    backends.secrets = Arc::new(sealed);
    Ok(())
}

/// Records the config file's prices and applies its `[projects.NAME]` settings (creating the
/// projects it names), so the file stays the record of what an operator set there.
async fn apply_tenancy(config: &Config, backends: &Backends) -> Result<()> {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis()
            as i64;
    if let Some(prices) = &config.prices {
        let version = backends.tenants.record_prices(prices, now).await?;
        tracing::info!(version, "prices in force");
    }
    for (project, pairs) in config.project_settings() {
        if backends.access.create_project(&project, now).await? {
            tracing::info!(project = %project, "project created from the config file");
        }
        let mut settings = backends.tenants.project_settings(&project).await?.unwrap_or_default();
        for (key, value) in &pairs {
            settings.set(key, value).map_err(|e| anyhow!("projects.{project}.{key}: {e}"))?;
        }
        backends.tenants.set_project_settings(&project, &settings).await?;
    }
    Ok(())
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

fn agent_config(
    a: &AgentSettings,
    servers: Vec<String>,
    default_work: PathBuf,
    trust: Option<Trust>,
) -> AgentConfig {
    AgentConfig {
        servers,
        name: a.name.clone().unwrap_or_else(monitor::hostname),
        labels: a.labels.clone(),
        cores: a.cores.unwrap_or_else(monitor::detect_cores),
        memory: a.memory.unwrap_or_else(monitor::detect_memory),
        // Absolute, because container runtimes bind-mount workspaces by path.
        work_dir: {
            let dir = a.work_dir.clone().unwrap_or(default_work);
            std::path::absolute(&dir).unwrap_or(dir)
        },
        kill_grace: a.kill_grace,
        join: a.join.clone(),
        trust,
        allow_local_urls: a.allow_local_urls,
        min_free: a.min_free,
    }
}

/// The addresses the servers' URLs resolve to (containers must reach none of them); names that
/// do not resolve now are skipped with a warning.
async fn server_addresses(servers: &[String]) -> Vec<std::net::IpAddr> {
    let mut out = Vec::new();
    for server in servers {
        let Ok(url) = reqwest::Url::parse(server) else { continue };
        let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else { continue };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match tokio::net::lookup_host((host, port)).await {
            Ok(found) => out.extend(found.map(|a| a.ip())),
            Err(e) => {
                tracing::warn!(server, error = %e, "cannot resolve a server at start; containers are not kept off its address")
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The runtimes this node can offer: always the process runtime; docker when an engine answers.
async fn build_agent(node: &AgentSettings, mut config: AgentConfig) -> Result<Agent> {
    // Containers and cgroups are scoped by the agent's work dir: stable across its restarts,
    // distinct from any other agent sharing the host.
    let scope = {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(config.work_dir.display().to_string().as_bytes());
        hex::encode(&digest[..6])
    };
    let isolation = drover_agent::runtime::process::Isolation {
        uids: crate::config::uid_range(&node.task_uids).map_err(|e| anyhow!("agent.task_uids: {e}"))?,
        run_as: node.run_as.clone(),
        state_dir: config.work_dir.clone(),
        hide: node.hide_from_tasks.clone(),
    };
    std::fs::create_dir_all(&config.work_dir)?;
    let process = ProcessRuntime::with_config(ProcessConfig {
        scope: scope.clone(),
        default_pids: node.task_pids,
        isolation: Some(isolation),
        // Beside the journal: a restarted agent finds its steps' output and exit status there.
        steps_dir: Some(config.work_dir.join(".steps")),
        ..ProcessConfig::default()
    });
    let enforces: Vec<&str> = process.enforces().iter().map(|l| l.name()).collect();
    tracing::info!(
        enforces = %if enforces.is_empty() { "nothing".to_owned() } else { enforces.join(",") },
        cgroups = %process.describe_cgroups(),
        "process sandbox: limits this node enforces on process tasks"
    );
    tracing::info!("process sandbox: {}", process.describe_confinement());
    // The labels placement matches tasks' limits against; set here, after the operator's
    // labels, so that a label cannot claim enforcement the node lacks.
    config.labels.retain(|k, _| !k.starts_with(drover_core::enforce::LABEL_PREFIX));
    for limit in process.enforces() {
        config.labels.insert(limit.label(), drover_core::enforce::ENFORCED.to_owned());
    }
    // One pool for every sandbox's uid: process tasks and microVMs' QEMU never share one.
    let process_uids = process.uid_pool();
    let mut runtimes: Vec<Arc<dyn drover_agent::runtime::Runtime>> = vec![Arc::new(process)];
    let mut docker = None;
    if !node.no_docker {
        match DockerRuntime::connect_scoped(&scope).await {
            Ok(d) => {
                // Leftovers of this agent's earlier run are found through its journal; a sweep
                // of every Drover container here would also hit other agents sharing the engine.
                let d = Arc::new(d.with_servers(server_addresses(&config.servers).await));
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
            warm: node.microvm_warm.clone(),
            snapshots: !node.microvm_no_snapshots,
            image_dirs: node.microvm_image_dirs.clone(),
            kernel: node.microvm_kernel.clone(),
            uids: process_uids,
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
    // Process-wide: the agent's configuration does not reach its input fetching yet.

    let agent = Agent::new(config, runtimes)?.with_llm_upstream(node.llm_upstream.clone());
    Ok(match docker {
        Some(d) => agent.with_images(d),
        None => agent,
    })
}

/// `drover server`.
pub async fn server(args: ServerCommand) -> Result<ExitCode> {
    let config = load_config(args.config.config.as_deref(), |o| args.server.overrides(o))?;
    let p = prepare_server(&config).await?;
    // The first line on stdout says where the server is, for scripts that start it.
    println!("drover server listening on {}", p.url);
    drover_server::serve_with_http(p.listener, p.http, p.backends, p.config, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// `drover agent`.
pub async fn agent(args: AgentArgs) -> Result<ExitCode> {
    let config = load_config(args.config.config.as_deref(), |o| args.overrides(o))?;
    let a = &config.agent;
    if a.servers.is_empty() {
        bail!("the agent needs a server: pass --server URL (or set [agent] servers in the config file)");
    }
    let trust = a.ca.as_deref().map(Trust::parse).transpose().map_err(|e| anyhow!("--ca: {e}"))?;
    let pinned =
        a.join.as_deref().and_then(drover_core::access::Credential::parse).and_then(|c| c.ca_fingerprint);
    let has_trust = trust.is_some() || pinned.is_some();
    let servers = a.servers.iter().map(|s| crate::client::normalize(s, has_trust)).collect();
    let agent_config = agent_config(a, servers, PathBuf::from(".drover/agent/work"), trust);
    tracing::info!(name = %agent_config.name, cores = agent_config.cores, memory = agent_config.memory, servers = ?agent_config.servers, "drover agent starting");
    let agent = build_agent(a, agent_config).await?;
    agent.enroll().await?;
    agent.run(shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Stores the operator key of `up`'s data directory as the credentials of `url`, so client
/// commands on this machine just work.
fn install_operator_key(s: &ServerSettings, url: &str, tls: bool) -> Result<Option<PathBuf>> {
    let key_path = s.data_dir.join(OPERATOR_KEY);
    let key = match std::fs::read_to_string(&key_path) {
        Ok(k) => k.trim().to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow!("cannot read {}: {e}", key_path.display())),
    };
    let Some(path) = credentials::default_path() else { return Ok(None) };
    let mut file = CredentialsFile::load(&path)?;
    let ca = tls.then(|| ca_file(s).display().to_string());
    let creds = ServerCredentials { key, ca, ..ServerCredentials::default() };
    if file.servers.get(url) != Some(&creds) {
        file.set(url, creds, false);
        file.save(&path)?;
    }
    Ok(Some(path))
}

/// `drover up`: a server and one local agent in one process.
pub async fn up(args: UpArgs) -> Result<ExitCode> {
    let config = load_config(args.config.config.as_deref(), |o| {
        args.server.overrides(o);
        args.node.overrides(o);
    })?;
    // Validate the job before starting anything, so a typo fails fast.
    let job = match &args.submit {
        Some(path) => match jobs::compile_file(path, &args.params)? {
            Ok(job) => Some(job),
            Err(code) => return Ok(code),
        },
        None => None,
    };
    let s = config.server.clone();
    let p = prepare_server(&config).await?;
    let url = p.url.clone();
    let access = p.backends.access.clone();
    let tls = p.config.tls.clone();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let server = tokio::spawn(drover_server::serve_with_http(
        p.listener,
        p.http,
        p.backends,
        p.config,
        stopped(stop_rx.clone()),
    ));

    // The local agent enrolls like any other, with a token made here, once: later starts find
    // its credential in its work dir.
    let fingerprint = tls.as_ref().map(|t| t.ca_fingerprint.clone()).filter(|f| !f.is_empty());
    let trust =
        tls.as_ref().filter(|t| !t.ca_pem.is_empty()).map(|t| Trust::CaPem(t.ca_pem.clone().into_bytes()));
    let mut agent_config =
        agent_config(&config.agent, vec![url.clone()], s.data_dir.join("work"), trust.clone());
    let enrolled = agent_config.work_dir.join(drover_agent::CREDENTIAL_FILE).exists();
    if !enrolled && !s.no_auth {
        let (token, _) = drover_server::auth::issue_join_token(
            &*access,
            fingerprint.clone(),
            Default::default(),
            Duration::from_secs(600),
            "drover up",
        )
        .await?;
        agent_config.join = Some(token);
    }
    // The server's data (its database above all) shares this machine: tasks must not see it.
    let mut node = config.agent.clone();
    node.hide_from_tasks.push(s.data_dir.clone());
    let agent = build_agent(&node, agent_config).await?;
    agent.enroll().await?;
    let agent = tokio::spawn(agent.run(stopped(stop_rx.clone())));

    let credentials = if s.no_auth { None } else { install_operator_key(&s, &url, tls.is_some())? };
    eprintln!("drover is up: server and local agent on {url}, data in {}", s.data_dir.display());
    let opt = ServerOpt { server: Some(url.clone()), ..Default::default() };
    let opt = match &credentials {
        Some(path) => {
            eprintln!("the operator key is in {}; `drover` commands on this machine use it", path.display());
            opt
        }
        // Without a credentials file, `--submit` still reads the key directly.
        None => ServerOpt {
            key: std::fs::read_to_string(s.data_dir.join(OPERATOR_KEY)).ok().map(|k| k.trim().to_owned()),
            ca: tls.is_some().then(|| ca_file(&s).display().to_string()),
            ..opt
        },
    };
    let code = match job {
        Some((job, source, filename)) => {
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
                s.data_dir.display()
            );
            code
        }
        None => {
            eprintln!("submit a job from another terminal:  drover submit examples/hello.yaml --watch");
            if !s.no_auth {
                print_remote_hints(&*access, &s, tls.as_ref(), fingerprint).await?;
            }
            shutdown_signal().await;
            ExitCode::SUCCESS
        }
    };
    let _ = stop_tx.send(true);
    match agent.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "the local agent stopped with an error"),
        Ok(Ok(())) => {}
        Err(e) => tracing::warn!(error = %e, "the local agent task failed"),
    }
    // Clients still streaming (a `watch` in another terminal) would hold the server open.
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(r)) => r?,
        Ok(Err(e)) => bail!("server task failed: {e}"),
        Err(_) => tracing::warn!("server did not stop within 5s; exiting anyway"),
    }
    Ok(code)
}

/// Tells how to serve other machines and, when this server already does, prints the command
/// that adds a remote agent, with a fresh single-use token.
async fn print_remote_hints(
    access: &dyn drover_store::AccessStore,
    s: &ServerSettings,
    tls: Option<&TlsSettings>,
    fingerprint: Option<String>,
) -> Result<()> {
    let port = s.listen.port();
    if drover_tls::is_loopback(&s.listen) {
        // A token printed now would not carry the CA that a network listener makes.
        eprintln!(
            "to serve other machines, start with --listen 0.0.0.0:{port} (TLS turns on, with a CA made in {}); \
             it then prints the command that adds a remote agent",
            s.data_dir.join("tls").display()
        );
        return Ok(());
    }
    let ttl = Duration::from_secs(3600);
    let (token, _) =
        drover_server::auth::issue_join_token(access, fingerprint, Default::default(), ttl, "drover up")
            .await?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    eprintln!(
        "add a remote agent (single-use token, valid for 1 hour; more with `drover nodes token create`):\n  \
         drover agent --server {scheme}://{}:{port} --join {token}",
        monitor::hostname()
    );
    Ok(())
}

/// `drover config print`: the effective configuration, secrets elided.
pub fn config_print(args: PrintArgs) -> Result<ExitCode> {
    let config = load_config(args.config.config.as_deref(), |o| {
        args.server.overrides(o);
        args.link.overrides(o);
        args.node.overrides(o);
    })?;
    print!("{}", config.to_toml_elided()?);
    Ok(ExitCode::SUCCESS)
}
