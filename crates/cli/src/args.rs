//! The flags of `server`, `agent` and `up`. Each flag is a configuration key of the same name
//! (see [`crate::config`]) and reads a `DROVER_*` variable when it is not given; flags that are
//! absent leave the key to the config file or the default.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::config::{Overrides, TlsMode};

fn duration_text(s: &str) -> Result<String, String> {
    humantime::parse_duration(s)
        .map(|_| s.to_owned())
        .map_err(|e| format!("`{s}` is not a duration like 15s or 30days: {e}"))
}

fn size_text(s: &str) -> Result<String, String> {
    drover_core::resources::parse_memory(s).map(|_| s.to_owned()).map_err(|e| e.to_string())
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("`{s}` is not a label; write key=value"))
}

fn parse_warm(s: &str) -> Result<(String, usize), String> {
    let (image, count) = s.rsplit_once('=').ok_or_else(|| format!("`{s}` is not IMAGE=N"))?;
    let count = count.trim().parse().map_err(|_| format!("`{count}` in `{s}` is not a number of VMs"))?;
    if image.trim().is_empty() {
        return Err(format!("`{s}` names no image"));
    }
    Ok((image.trim().to_owned(), count))
}

fn text(path: &Option<PathBuf>) -> Option<String> {
    path.as_ref().map(|p| p.display().to_string())
}

/// `--config FILE`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ConfigFile {
    /// A TOML config file ([server] and [agent] sections, keys named like the flags with `_`);
    /// environment variables and flags override it. `drover config print` shows the result.
    #[arg(long, env = "DROVER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Options of the server part.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ServerArgs {
    /// Address to listen on for clients and agents [default: 127.0.0.1:7370].
    #[arg(long, env = "DROVER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for the database, blobs, TLS files and the first operator key
    /// [default: .drover].
    #[arg(long, env = "DROVER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The database: postgres://user:pass@host/db (several servers may share it), or
    /// sqlite://PATH. Default: SQLite at <data dir>/drover.db.
    #[arg(long, env = "DROVER_DATABASE", hide_env_values = true)]
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
    /// Largest upload a client may send, like 10GiB [default: 10GiB].
    #[arg(long, env = "DROVER_MAX_UPLOAD", value_parser = size_text)]
    pub max_upload: Option<String>,
    /// Most bytes of outputs one task may keep, like 10GiB; outputs past it are not kept and
    /// the task's reason says which [default: 10GiB].
    #[arg(long, env = "DROVER_MAX_OUTPUTS_SIZE", value_parser = size_text)]
    pub max_outputs_size: Option<String>,
    /// Most output one attempt may log, like 64MiB; past it the beginning and the end are kept
    /// and a line says how much was cut [default: 64MiB].
    #[arg(long, env = "DROVER_MAX_LOG_SIZE", value_parser = size_text)]
    pub max_log_size: Option<String>,
    /// How long the logs of ended attempts are kept, like 30days; they are archived to the blob
    /// store when the attempt ends and deleted after this [default: 30days].
    #[arg(long, env = "DROVER_LOG_RETENTION", value_parser = duration_text)]
    pub log_retention: Option<String>,
    /// How long a blob nothing references any more (its jobs deleted by retention, its log
    /// archive expired) stays before it is deleted, like 1h; a job naming it again meanwhile
    /// keeps it [default: 1h].
    #[arg(long, env = "DROVER_BLOB_GRACE", value_parser = duration_text)]
    pub blob_grace: Option<String>,
    /// Also serve the HTTP API (JSON and downloads) on this address, like 127.0.0.1:7371.
    #[arg(long, env = "DROVER_HTTP")]
    pub http: Option<SocketAddr>,
    /// How long a node may stay silent before it is marked down and its tasks retried
    /// elsewhere [default: 15s].
    #[arg(long, env = "DROVER_LEASE", value_parser = duration_text)]
    pub lease: Option<String>,
    /// How often agents send heartbeats (keep well under --lease) [default: 2s].
    #[arg(long, env = "DROVER_HEARTBEAT", value_parser = duration_text)]
    pub heartbeat: Option<String>,
    /// Most attempt starts and finishes committed in one database transaction (1 commits each
    /// on its own). Batches only fill up while a commit is in flight, so this costs no latency
    /// [default: 256].
    #[arg(long, env = "DROVER_COMPLETION_BATCH")]
    pub completion_batch: Option<usize>,
    /// Do not assign tasks ahead. By default a busy node is also given up to its own size
    /// again in tasks that wait on it and start the moment a task there ends, so short tasks
    /// run back to back; with this, every task waits in the server's queue until a node has
    /// room, so that a node freed later can still take it (farms of long tasks on nodes of
    /// different speeds).
    #[arg(long, env = "DROVER_NO_ASSIGN_AHEAD")]
    pub no_assign_ahead: bool,
    /// TLS on both listeners: auto (on unless listening on loopback), on, or off (loopback
    /// only). Without --tls-cert the server makes its own CA in <data dir>/tls on first start
    /// and prints its fingerprint [default: auto].
    #[arg(long, env = "DROVER_TLS", value_enum)]
    pub tls: Option<TlsMode>,
    /// Certificate chain (PEM) to present instead of the server-made one.
    #[arg(long, env = "DROVER_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "DROVER_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// More names (DNS names or IPs) for the server-made certificate, such as the name
    /// agents and clients dial; comma-separated.
    #[arg(long = "tls-name", env = "DROVER_TLS_NAMES", value_delimiter = ',', value_name = "NAME")]
    pub tls_names: Vec<String>,
    /// Accept every call without a credential. Allowed on loopback addresses only, for tests
    /// and benchmarks; the server warns at start.
    #[arg(long, env = "DROVER_NO_AUTH")]
    pub no_auth: bool,
    /// Space to keep free under the data dir (and a local blob dir), like 512MiB: below it,
    /// submits and uploads are refused with a clear error, and what was accepted goes on
    /// [default: 512MiB].
    #[arg(long, env = "DROVER_MIN_FREE", value_parser = size_text)]
    pub min_free: Option<String>,
    /// The key file that seals project secrets in the database (`<id> <base64 key>` per line;
    /// the first seals, all open). Default: <data dir>/secrets.key, made on first start.
    /// Replicas sharing a database need the same file.
    #[arg(long, env = "DROVER_SECRETS_KEY", value_name = "FILE")]
    pub secrets_key: Option<PathBuf>,
}

impl ServerArgs {
    /// The keys these flags set.
    pub fn overrides(&self, o: &mut Overrides) {
        let s = "server";
        o.set(s, "listen", self.listen.map(|a| a.to_string()));
        o.set(s, "data_dir", text(&self.data_dir));
        o.set(s, "database", self.database.clone());
        o.set(s, "blobs", self.blobs.clone());
        o.set(s, "s3_endpoint", self.s3_endpoint.clone());
        o.set(s, "s3_region", self.s3_region.clone());
        o.set(s, "max_upload", self.max_upload.clone());
        o.set(s, "max_outputs_size", self.max_outputs_size.clone());
        o.set(s, "max_log_size", self.max_log_size.clone());
        o.set(s, "log_retention", self.log_retention.clone());
        o.set(s, "blob_grace", self.blob_grace.clone());
        o.set(s, "http", self.http.map(|a| a.to_string()));
        o.set(s, "lease", self.lease.clone());
        o.set(s, "heartbeat", self.heartbeat.clone());
        o.set(s, "completion_batch", self.completion_batch);
        o.set(s, "assign_ahead", self.no_assign_ahead.then_some(false));
        o.set(s, "tls", self.tls.map(|t| serde_json::to_value(t).unwrap_or_default()));
        o.set(s, "tls_cert", text(&self.tls_cert));
        o.set(s, "tls_key", text(&self.tls_key));
        o.set(s, "tls_names", (!self.tls_names.is_empty()).then(|| self.tls_names.clone()));
        o.flag(s, "no_auth", self.no_auth);
        o.set(s, "min_free", self.min_free.clone());
        o.set(s, "secrets_key", text(&self.secrets_key));
    }
}

/// Options of the agent part.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct NodeArgs {
    /// Node name, stable across restarts (default: the host name).
    #[arg(long, env = "DROVER_NAME")]
    pub name: Option<String>,
    /// Labels for task constraints: k=v,k2=v2.
    #[arg(long, env = "DROVER_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Cores to offer (default: all this machine has).
    #[arg(long, env = "DROVER_CORES")]
    pub cores: Option<u32>,
    /// Memory to offer, like 8GiB (default: all this machine has).
    #[arg(long, env = "DROVER_MEMORY", value_parser = size_text)]
    pub memory: Option<String>,
    /// Directory for task workspaces and the agent's state, its node credential included
    /// (default: <data dir>/work, or ./.drover/agent/work).
    #[arg(long, env = "DROVER_WORK_DIR")]
    pub work_dir: Option<PathBuf>,
    /// Do not offer the docker runtime even when a Docker engine is reachable.
    #[arg(long, env = "DROVER_NO_DOCKER")]
    pub no_docker: bool,
    /// Offer the microvm runtime (QEMU microVMs; needs qemu-system-x86, a guest kernel and the
    /// static drover-guest binary next to drover or in DROVER_GUEST_AGENT). Off by default
    /// because checking whether KVM works boots a probe VM at start.
    #[arg(long, env = "DROVER_MICROVM")]
    pub microvm: bool,
    /// Keep N booted, idle microVMs of IMAGE for tasks to claim (IMAGE=N, repeatable).
    #[arg(long = "microvm-warm", value_name = "IMAGE=N", value_parser = parse_warm)]
    pub microvm_warm: Vec<(String, usize)>,
    /// A host directory that `dir:` microVM images may come from (repeatable); without one, no
    /// `dir:` image is accepted.
    #[arg(
        long = "microvm-image-dir",
        env = "DROVER_MICROVM_IMAGE_DIRS",
        value_delimiter = ',',
        value_name = "DIR"
    )]
    pub microvm_image_dirs: Vec<PathBuf>,
    /// Boot every microVM instead of restoring it from a per-image snapshot.
    #[arg(long, env = "DROVER_MICROVM_NO_SNAPSHOTS")]
    pub microvm_no_snapshots: bool,
    /// Guest kernel for microVMs (default: the newest /boot/vmlinuz-*; its modules must be in
    /// /lib/modules/VERSION).
    #[arg(long, env = "DROVER_MICROVM_KERNEL", value_name = "PATH")]
    pub microvm_kernel: Option<PathBuf>,
    /// Time between SIGTERM and SIGKILL when a task is stopped [default: 10s].
    #[arg(long, env = "DROVER_KILL_GRACE", value_parser = duration_text)]
    pub kill_grace: Option<String>,
    /// LLM API that agent tasks' metering proxies forward to when their job names no
    /// `upstream`, like https://api.anthropic.com.
    #[arg(long, env = "DROVER_LLM_UPSTREAM", value_name = "URL")]
    pub llm_upstream: Option<String>,
    /// Let URL inputs reach this node's loopback, link-local and unspecified addresses
    /// (127.0.0.1, 169.254.169.254, ...), for inputs served from the node itself. Off by
    /// default, so that a job cannot read the node's local services.
    #[arg(long, env = "DROVER_ALLOW_LOCAL_URLS")]
    pub allow_local_urls: bool,
    /// Uids handed out to process tasks, one per running task, when the agent runs as root
    /// (FIRST-LAST) [default: 1000000-1065535].
    #[arg(long, env = "DROVER_TASK_UIDS", value_name = "FIRST-LAST", value_parser = parse_uid_range)]
    pub task_uids: Option<String>,
    /// Accounts (names or uids; `*` matches any run of characters) a process task's `user:`
    /// may name on this node; the task's project must allow them too. Default: none.
    #[arg(long, env = "DROVER_RUN_AS", value_delimiter = ',', value_name = "ACCOUNT")]
    pub run_as: Vec<String>,
    /// A directory process tasks must not see (repeatable), like a database's; the agent's
    /// work dir is always hidden but for the task's own workspace.
    #[arg(
        long = "hide-from-tasks",
        env = "DROVER_HIDE_FROM_TASKS",
        value_delimiter = ',',
        value_name = "DIR"
    )]
    pub hide_from_tasks: Vec<PathBuf>,
    /// Most processes and threads of a process task that sets no `resources.pids`
    /// [default: 8192].
    #[arg(long, env = "DROVER_TASK_PIDS")]
    pub task_pids: Option<u64>,
    /// Space to keep free in the work dir, like 512MiB: below it, the node takes no new work
    /// (what runs goes on) until space returns [default: 512MiB].
    #[arg(long = "work-dir-min-free", env = "DROVER_WORK_DIR_MIN_FREE", value_parser = size_text)]
    pub agent_min_free: Option<String>,
}

/// Checks `FIRST-LAST` uid ranges: at least one uid, never root.
fn parse_uid_range(s: &str) -> Result<String, String> {
    crate::config::uid_range(s).map(|_| s.to_owned())
}

impl NodeArgs {
    /// The keys these flags set.
    pub fn overrides(&self, o: &mut Overrides) {
        let a = "agent";
        o.set(a, "name", self.name.clone());
        o.set(
            a,
            "labels",
            (!self.labels.is_empty()).then(|| {
                serde_json::Value::Object(
                    self.labels
                        .iter()
                        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                        .collect(),
                )
            }),
        );
        o.set(a, "cores", self.cores);
        o.set(a, "memory", self.memory.clone());
        o.set(a, "work_dir", text(&self.work_dir));
        o.flag(a, "no_docker", self.no_docker);
        o.flag(a, "microvm", self.microvm);
        o.set(
            a,
            "microvm_warm",
            (!self.microvm_warm.is_empty()).then(|| {
                serde_json::Value::Object(
                    self.microvm_warm.iter().map(|(k, v)| (k.clone(), serde_json::Value::from(*v))).collect(),
                )
            }),
        );
        o.flag(a, "microvm_no_snapshots", self.microvm_no_snapshots);
        o.set(
            a,
            "microvm_image_dirs",
            (!self.microvm_image_dirs.is_empty())
                .then(|| self.microvm_image_dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>()),
        );
        o.set(a, "microvm_kernel", text(&self.microvm_kernel));
        o.set(a, "kill_grace", self.kill_grace.clone());
        o.set(a, "llm_upstream", self.llm_upstream.clone());
        o.flag(a, "allow_local_urls", self.allow_local_urls);
        o.set(a, "task_uids", self.task_uids.clone());
        o.set(a, "run_as", (!self.run_as.is_empty()).then(|| self.run_as.clone()));
        o.set(
            a,
            "hide_from_tasks",
            (!self.hide_from_tasks.is_empty())
                .then(|| self.hide_from_tasks.iter().map(|d| d.display().to_string()).collect::<Vec<_>>()),
        );
        o.set(a, "task_pids", self.task_pids);
        o.set(a, "min_free", self.agent_min_free.clone());
    }
}

/// How an agent reaches its servers.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct AgentLink {
    /// Server address(es), comma-separated; tried in turn when one stops answering. Use
    /// https://HOST:PORT for a server with TLS.
    #[arg(long, env = "DROVER_SERVER", value_delimiter = ',')]
    pub server: Vec<String>,
    /// A single-use join token from `drover nodes token create`: the agent exchanges it for
    /// its node credential on first start and keeps that in its work dir (later starts need no
    /// token; a token given again is not used).
    #[arg(long, env = "DROVER_JOIN", hide_env_values = true, value_name = "TOKEN")]
    pub join: Option<String>,
    /// The server's CA certificate (PEM file) or sha256:FINGERPRINT. Default: the CA the
    /// agent enrolled with, or the fingerprint its join token carries.
    #[arg(long, env = "DROVER_CA", value_name = "FILE")]
    pub ca: Option<String>,
}

impl AgentLink {
    /// The keys these flags set.
    pub fn overrides(&self, o: &mut Overrides) {
        o.set("agent", "servers", (!self.server.is_empty()).then(|| self.server.clone()));
        o.set("agent", "join", self.join.clone());
        o.set("agent", "ca", self.ca.clone());
    }
}

/// `drover agent`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct AgentArgs {
    #[command(flatten)]
    pub config: ConfigFile,
    #[command(flatten)]
    pub link: AgentLink,
    #[command(flatten)]
    pub node: NodeArgs,
}

impl AgentArgs {
    /// The keys these flags set.
    pub fn overrides(&self, o: &mut Overrides) {
        self.link.overrides(o);
        self.node.overrides(o);
    }
}

/// `drover up`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct UpArgs {
    #[command(flatten)]
    pub config: ConfigFile,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub node: NodeArgs,
    /// Submit this job file once up, watch it, and exit with its result.
    #[arg(long, value_name = "FILE")]
    pub submit: Option<PathBuf>,
    /// Template parameters for --submit: K=V.
    #[arg(long = "param", value_parser = crate::jobs::parse_param)]
    pub params: Vec<(String, String)>,
}

/// `drover server`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ServerCommand {
    #[command(flatten)]
    pub config: ConfigFile,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// `drover config print`: every server and agent flag, to see what they make of the file.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct PrintArgs {
    #[command(flatten)]
    pub config: ConfigFile,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub link: AgentLink,
    #[command(flatten)]
    pub node: NodeArgs,
}
