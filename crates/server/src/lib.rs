//! Drover's control plane: the client API, the agent sessions, the scheduler loop that applies
//! the pure placement function, and the lease reaper.
#![warn(missing_docs)]

mod access_api;
mod agent_api;
mod audit;
pub mod auth;
mod client_api;
mod completions;
mod convert;
mod disk;
mod dispatch;
mod downloads;
mod http;
mod intake;
mod live_files;
mod log_archive;
mod loops;
mod paging;
mod projects_api;
mod retention;
mod schedule_memory;
pub mod sealed;
mod session_output;
mod streams;
mod tenancy;
#[cfg(test)]
mod testing;
mod transfer;
mod usage;

pub use log_archive::DEFAULT_RETENTION;
pub use retention::DEFAULT_BLOB_GRACE;

/// The paths of every HTTP API route, as the router is built from them: what tests walk to
/// cover each route.
pub fn http_route_paths() -> Vec<&'static str> {
    http::routes().into_iter().map(|(path, _)| path).collect()
}

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drover_blobs::BlobStore;
use drover_proto::ServerMessage;
use drover_proto::agent_session_server::AgentSessionServer;
use drover_proto::drover_server::DroverServer;
use drover_store::{AccessStore, ArtifactStore, RetentionStore, SecretStore, Signal, Store, TenantStore};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, watch};

/// Default of [`ServerConfig::min_free`]: 512 MiB.
pub const DEFAULT_MIN_FREE: u64 = 512 << 20;

/// Default of [`ServerConfig::completion_batch`].
pub const DEFAULT_COMPLETION_BATCH: usize = 256;

/// Timing and limits of the server's loops and leases.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// How often agents send heartbeats.
    pub heartbeat: Duration,
    /// Largest blob a client may upload, in bytes.
    pub max_upload: u64,
    /// How long a node stays ready without a heartbeat before it is marked down and its tasks
    /// are retried elsewhere.
    pub lease: Duration,
    /// The longest the scheduler sleeps when nothing wakes it (retry backoffs end on this tick).
    pub schedule_tick: Duration,
    /// Most bytes of outputs one task may keep (enforced by agents).
    pub max_outputs: u64,
    /// Most bytes of output one attempt may ship; agents cut the middle beyond it.
    pub max_log: u64,
    /// How long archived attempt logs are kept after their attempt ended.
    pub log_retention: Duration,
    /// How often ended attempts' logs are archived (and old archives dropped).
    pub archive_tick: Duration,
    /// How often jobs past retention are deleted, and unreferenced blobs collected.
    pub retention_tick: Duration,
    /// How long a blob nothing references any more stays before it is deleted: a job that
    /// names it again meanwhile keeps it.
    pub blob_grace: Duration,
    /// Most attempt starts and finishes committed in one transaction. Updates that arrive
    /// while a commit is in flight wait for the next one, so batches only grow under load;
    /// 1 commits every update on its own.
    pub completion_batch: usize,
    /// Whether a busy node is also given tasks that wait on it, up to its own size again,
    /// and start the moment a task there ends (see `drover_core::placement::NodeView::ahead`).
    pub assign_ahead: bool,
    /// Whether every call must carry a credential. Off only with `--no-auth`, which the
    /// binary allows on loopback addresses alone.
    pub auth: bool,
    /// TLS for both listeners; `None` serves plain text (loopback only, the binary checks).
    pub tls: Option<TlsSettings>,
    /// Sign-in through an OpenID Connect identity provider, besides API keys.
    pub oidc: Option<auth::oidc::OidcConfig>,
    /// Directories whose filesystems hold what the server keeps (its database, its blobs).
    pub data_dirs: Vec<std::path::PathBuf>,
    /// Bytes kept free on each of them: below it, submits and uploads are refused (0: no
    /// check).
    pub min_free: u64,
}

/// The server's TLS: what its listeners present, and the CA that clients and agents trust.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// The rustls configuration of both listeners.
    pub config: Arc<rustls::ServerConfig>,
    /// The CA certificate (PEM) that issued the server's certificate; enrolled agents get it.
    pub ca_pem: String,
    /// SHA-256 of the CA certificate (hex), pinned in join tokens.
    pub ca_fingerprint: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            heartbeat: Duration::from_secs(2),
            lease: Duration::from_secs(15),
            max_upload: 10 << 30,
            schedule_tick: Duration::from_millis(250),
            max_outputs: 10 << 30,
            max_log: 64 << 20,
            log_retention: DEFAULT_RETENTION,
            archive_tick: Duration::from_secs(1),
            retention_tick: Duration::from_secs(10),
            blob_grace: retention::DEFAULT_BLOB_GRACE,
            completion_batch: DEFAULT_COMPLETION_BATCH,
            assign_ahead: true,
            auth: true,
            tls: None,
            oidc: None,
            data_dirs: Vec::new(),
            min_free: DEFAULT_MIN_FREE,
        }
    }
}

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The gRPC server failed.
    #[error("grpc server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The HTTP API failed.
    #[error("http api failed: {0}")]
    Http(#[source] std::io::Error),
}

/// Where the server keeps its state.
pub struct Backends {
    /// Jobs, tasks, nodes, events, logs.
    pub store: Arc<dyn Store>,
    /// Project secrets.
    pub secrets: Arc<dyn SecretStore>,
    /// Where outputs are recorded.
    pub artifacts: Arc<dyn ArtifactStore>,
    /// Content-addressed blobs: image archives, inputs, outputs.
    pub blobs: Arc<dyn BlobStore>,
    /// Projects, keys, join tokens, node credentials.
    pub access: Arc<dyn AccessStore>,
    /// Project settings, holdings, prices, the audit trail.
    pub tenants: Arc<dyn TenantStore>,
    /// Deleting jobs past retention and the blobs nothing references.
    pub retention: Arc<dyn RetentionStore>,
}

/// The sender half of a connected agent's session.
struct Session {
    /// The node's name, as its credential binds it.
    name: String,
    /// Ends the session's receiving loop (the node's credential was revoked).
    stop: Arc<Notify>,
    epoch: i64,
    tx: mpsc::Sender<Result<ServerMessage, tonic::Status>>,
    /// Idle microVMs per image, from the agent's last heartbeat. Kept with the session rather
    /// than in the store: only the replica holding the session places work on the node.
    warm: std::collections::BTreeMap<String, u32>,
    /// Why the agent takes no new work now (its disk is full); empty while it does.
    paused: String,
}

/// State shared by the API handlers and the loops.
pub(crate) struct Shared {
    store: Arc<dyn Store>,
    secrets: Arc<dyn SecretStore>,
    artifacts: Arc<dyn ArtifactStore>,
    blobs: Arc<dyn BlobStore>,
    access: Arc<dyn AccessStore>,
    tenants: Arc<dyn TenantStore>,
    retention: Arc<dyn RetentionStore>,
    /// Projects' settings and budget state, as the scheduler last read them.
    policy: tenancy::PolicyCache,
    config: ServerConfig,
    /// Bumped after every committed change; watch and log streams wait on it.
    changes: watch::Sender<u64>,
    /// Client streams open now (watch, log follow, live reads), by kind.
    streams: streams::OpenStreams,
    /// Wakes the scheduler when there may be something to place.
    schedule: Notify,
    /// Connected agents by node id.
    sessions: Mutex<HashMap<i64, Session>>,
    /// What the scheduler keeps between rounds.
    memory: Arc<schedule_memory::ScheduleMemory>,
    /// Live file reads waiting for their agents.
    reads: live_files::Reads,
    /// The group commit of attempt starts and finishes.
    completions: completions::Completions,
    /// The verifier of identity provider tokens, when `[oidc]` is configured.
    oidc: Option<auth::oidc::Oidc>,
    /// Free space under what the server keeps.
    disk: disk::DiskGuard,
}

impl Shared {
    /// Tells every server sharing the store (this one included) about a change.
    async fn publish(&self, signal: Signal) {
        if let Err(e) = self.store.publish(signal).await {
            // Watchers still poll as a fallback, so a lost signal only delays them.
            tracing::warn!(error = %e, ?signal, "cannot publish signal");
        }
    }

    /// Acts on a signal from any server.
    async fn on_signal(&self, signal: Signal) {
        match signal {
            Signal::Changed { .. } => self.changes.send_modify(|v| *v = v.wrapping_add(1)),
            Signal::Schedule => self.schedule.notify_one(),
            Signal::Cancel { attempt_id, node_id } => {
                let msg = ServerMessage {
                    msg: Some(drover_proto::server_message::Msg::Cancel(drover_proto::CancelAttempt {
                        attempt_id,
                        reason: "cancelled by user".into(),
                    })),
                };
                self.send_to_node(node_id, msg).await;
            }
            Signal::NodeRevoked { node_id } => self.end_session(node_id, "the node's credential was revoked"),
        }
    }

    /// Ends a node's session at once, if this server holds it: the agent gets `why` as an
    /// `unauthenticated` error and nothing more it sends is read.
    fn end_session(&self, node_id: i64, why: &str) {
        let session = self.sessions.lock().unwrap_or_else(|e| e.into_inner()).remove(&node_id);
        if let Some(session) = session {
            tracing::warn!(node_id, name = %session.name, why, "ending agent session");
            session.stop.notify_one();
            let _ = session.tx.try_send(Err(tonic::Status::unauthenticated(why.to_owned())));
        }
    }

    /// Sends a message to a node's agent if it is connected. A node that is not connected
    /// gets nothing: its lease runs out and the reaper settles its attempts.
    async fn send_to_node(&self, node_id: i64, msg: ServerMessage) {
        let tx = {
            let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            sessions.get(&node_id).map(|s| s.tx.clone())
        };
        if let Some(tx) = tx
            && tx.send(Ok(msg)).await.is_err()
        {
            tracing::debug!(node_id, "agent session closed while sending");
        }
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Serves the client and agent APIs on `listener` until `shutdown` resolves, running the
/// scheduler, lease reaper and log archiver alongside.
pub async fn serve(
    listener: TcpListener,
    backends: Backends,
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    serve_with_http(listener, None, backends, config, shutdown).await
}

/// [`serve`], plus the HTTP API on `http` when given.
pub async fn serve_with_http(
    listener: TcpListener,
    http: Option<TcpListener>,
    backends: Backends,
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let Backends { store, secrets, artifacts, blobs, access, tenants, retention } = backends;
    let tls = config.tls.as_ref().map(|t| t.config.clone());
    let memory = Arc::new(schedule_memory::ScheduleMemory::default());
    let (completions, writer) =
        completions::Completions::spawn(store.clone(), memory.clone(), config.completion_batch);
    let oidc = config.oidc.clone().map(auth::oidc::Oidc::new);
    let disk = disk::DiskGuard::new(config.data_dirs.clone(), config.min_free);
    let shared = Arc::new(Shared {
        store,
        secrets,
        artifacts,
        blobs,
        access,
        tenants,
        retention,
        policy: Default::default(),
        config,
        changes: watch::channel(0).0,
        streams: Default::default(),
        schedule: Notify::new(),
        sessions: Mutex::new(HashMap::new()),
        reads: live_files::Reads::default(),
        completions,
        memory,
        oidc,
        disk,
    });
    let signals = tokio::spawn(loops::signals(shared.clone(), shared.store.subscribe()));
    let scheduler = tokio::spawn(loops::scheduler(shared.clone()));
    let reaper = tokio::spawn(loops::lease_reaper(shared.clone()));
    let archiver = tokio::spawn(log_archive::archiver(shared.clone()));
    let retention = tokio::spawn(retention::retention(shared.clone()));
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let http = http.map(|listener| {
        let listener = drover_tls::Listener::new(listener, tls.clone());
        tokio::spawn(http::serve(shared.clone(), listener, async {
            let _ = http_stopped.await;
        }))
    });
    if !shared.config.auth {
        tracing::warn!("authorization is off (--no-auth): anyone who reaches this server may do anything");
    }
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(
            DroverServer::new(client_api::ClientApi(shared.clone()))
                .max_decoding_message_size(intake::MAX_SUBMIT_MESSAGE),
        )
        .add_service(AgentSessionServer::new(agent_api::AgentApi(shared.clone())))
        .serve_with_incoming_shutdown(drover_tls::incoming(listener, tls), shutdown)
        .await;
    signals.abort();
    scheduler.abort();
    reaper.abort();
    archiver.abort();
    retention.abort();
    let _ = stop_http.send(());
    if let Some(mut http) = http {
        // Downloads still streaming would hold the process; they get a moment to finish.
        match tokio::time::timeout(Duration::from_secs(5), &mut http).await {
            Ok(Ok(Err(e))) => return Err(ServerError::Http(e)),
            Ok(Ok(Ok(()))) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "http api task failed"),
            Err(_) => http.abort(),
        }
    }
    writer.abort();
    result.map_err(ServerError::from)
}
