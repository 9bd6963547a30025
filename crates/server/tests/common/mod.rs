//! A real server in-process on a loopback port, with a SQLite store and in-memory blobs, and
//! clients that carry credentials.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use drover_blobs::BlobStore;
use drover_proto as pb;
use drover_proto::Bearer;
use drover_proto::agent_session_client::AgentSessionClient;
use drover_proto::drover_client::DroverClient;
use drover_server::{Backends, ServerConfig};
use drover_store::sqlite::SqliteStore;
use tokio_stream::StreamExt;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A client of the client API with a key.
pub type Client = DroverClient<InterceptedService<Channel, Bearer>>;

/// A running server.
pub struct Server {
    /// `http://127.0.0.1:PORT` of the gRPC API.
    pub url: String,
    /// `http://127.0.0.1:PORT` of the HTTP API.
    pub http: String,
    /// The first operator key.
    pub operator: String,
    /// The store, to check what changed.
    pub store: Arc<SqliteStore>,
    /// The blob store.
    pub blobs: Arc<dyn BlobStore>,
    dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Server {
    /// Starts a server with authorization on.
    pub async fn start() -> Server {
        Server::start_with(|_| {}).await
    }

    /// [`Server::start`] with the configuration changed by `tweak`.
    pub async fn start_with(tweak: impl FnOnce(&mut ServerConfig)) -> Server {
        drover_tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("drover.db")).await.unwrap());
        let blobs: Arc<dyn BlobStore> = Arc::new(drover_blobs::MemoryBlobStore::new());
        let operator_file = dir.path().join("operator.key");
        drover_server::auth::first_operator_key(&*store, &operator_file).await.unwrap();
        let operator = std::fs::read_to_string(&operator_file).unwrap().trim().to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let http_url = format!("http://{}", http.local_addr().unwrap());
        let backends = Backends {
            store: store.clone(),
            secrets: store.clone(),
            artifacts: store.clone(),
            access: store.clone(),
            tenants: store.clone(),
            retention: store.clone(),
            blobs: blobs.clone(),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut config = ServerConfig {
            heartbeat: Duration::from_millis(200),
            schedule_tick: Duration::from_millis(50),
            ..ServerConfig::default()
        };
        tweak(&mut config);
        tokio::spawn(drover_server::serve_with_http(listener, Some(http), backends, config, async {
            let _ = stopped.await;
        }));
        Server { url, http: http_url, operator, store, blobs, dir, _stop: stop }
    }

    /// A client carrying `key` (none when `None`).
    pub async fn client(&self, key: Option<&str>) -> Client {
        let channel = Channel::from_shared(self.url.clone()).unwrap().connect().await.unwrap();
        DroverClient::with_interceptor(channel, Bearer::new(key).unwrap())
    }

    /// A client of the operator.
    pub async fn operator(&self) -> Client {
        self.client(Some(&self.operator)).await
    }

    /// A fresh single-use join token.
    pub async fn join_token(&self) -> String {
        let mut op = self.operator().await;
        op.create_join_token(pb::CreateJoinTokenRequest::default()).await.unwrap().into_inner().token
    }

    /// Exchanges `token` for a credential of node `name`.
    pub async fn join(&self, token: &str, name: &str) -> Result<String, Status> {
        let channel = Channel::from_shared(self.url.clone()).unwrap().connect().await.unwrap();
        let mut agents = AgentSessionClient::new(channel);
        let req = pb::JoinRequest { token: token.into(), name: name.into() };
        Ok(agents.join(req).await?.into_inner().credential)
    }

    /// Enrolls node `name` and returns its credential.
    pub async fn enroll(&self, name: &str) -> String {
        let token = self.join_token().await;
        self.join(&token, name).await.unwrap()
    }

    /// Opens an agent session carrying `credential` that registers as `name`.
    pub async fn session(&self, credential: Option<&str>, name: &str) -> Result<Session, Status> {
        let register = pb::Register {
            name: name.into(),
            cores: 1,
            memory: 1 << 30,
            runtimes: vec!["process".into()],
            protocol: pb::PROTOCOL_VERSION,
            ..Default::default()
        };
        self.session_registering(credential, register).await
    }

    /// Opens an agent session carrying `credential` that sends `register`.
    pub async fn session_registering(
        &self,
        credential: Option<&str>,
        register: pb::Register,
    ) -> Result<Session, Status> {
        let channel = Channel::from_shared(self.url.clone()).unwrap().connect().await.unwrap();
        let mut agents = AgentSessionClient::with_interceptor(channel, Bearer::new(credential).unwrap());
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tx.send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Register(register)) }).await.unwrap();
        let mut inbound = agents.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
        match inbound.next().await {
            Some(Ok(pb::ServerMessage { msg: Some(pb::server_message::Msg::Registered(r)) })) => {
                Ok(Session { tx, inbound, node_id: r.node_id, epoch: r.epoch, assigned: Default::default() })
            }
            Some(Err(s)) => Err(s),
            other => panic!("unexpected answer to Register: {other:?}"),
        }
    }
}

/// A raw agent session.
pub struct Session {
    /// Messages to the server.
    pub tx: tokio::sync::mpsc::Sender<pb::AgentMessage>,
    /// Messages from the server.
    pub inbound: tonic::Streaming<pb::ServerMessage>,
    /// The node's id.
    pub node_id: i64,
    /// The session's epoch.
    pub epoch: i64,
    /// Assignments received and not yet taken by [`Session::assign`].
    assigned: std::collections::VecDeque<pb::Assign>,
}

/// Reports in one message, as an agent's outbox batches them.
pub fn reports(kinds: Vec<pb::report::Kind>) -> pb::agent_message::Msg {
    let reports = kinds.into_iter().map(|kind| pb::Report { kind: Some(kind) }).collect();
    pb::agent_message::Msg::Reports(pb::Reports { reports })
}

/// An attempt update alone in a message.
pub fn update(update: pb::AttemptUpdate) -> pb::agent_message::Msg {
    reports(vec![pb::report::Kind::Update(update)])
}

impl Session {
    /// Sends one message.
    pub async fn send(&self, msg: pb::agent_message::Msg) {
        self.tx.send(pb::AgentMessage { msg: Some(msg) }).await.unwrap();
    }

    /// Waits until the server acknowledged everything up to `seq` (applied or dropped as stale).
    pub async fn wait_ack(&mut self, seq: u64, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.inbound.next()).await {
                Ok(Some(Ok(pb::ServerMessage { msg: Some(pb::server_message::Msg::Ack(a)) })))
                    if a.seq >= seq =>
                {
                    return;
                }
                Ok(Some(Ok(_))) => continue,
                other => panic!("no acknowledgement of {seq}: {other:?}"),
            }
        }
    }

    /// The next assignment within `timeout`, one at a time from however many each message
    /// carried; other messages are skipped.
    pub async fn assign(&mut self, timeout: Duration) -> Option<pb::Assign> {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.assigned.is_empty() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(Ok(pb::server_message::Msg::Assign(batch))) => self.assigned.extend(batch.attempts),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
        self.assigned.pop_front()
    }

    /// The next message from the server within `timeout`, skipping acknowledgements.
    pub async fn next(&mut self, timeout: Duration) -> Option<Result<pb::server_message::Msg, Status>> {
        loop {
            match tokio::time::timeout(timeout, self.inbound.next()).await {
                Ok(Some(Ok(pb::ServerMessage { msg: Some(pb::server_message::Msg::Ack(_)) }))) => continue,
                Ok(Some(Ok(pb::ServerMessage { msg: Some(m) }))) => return Some(Ok(m)),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(s))) => return Some(Err(s)),
                Ok(None) | Err(_) => return None,
            }
        }
    }
}

/// An AI-agent block calling `upstream`, with its key in the project secret `key_secret`.
pub fn agent_block(upstream: &str, key_secret: Option<&str>) -> drover_core::AgentSpec {
    drover_core::AgentSpec {
        command: drover_core::Command::Shell("agent".into()),
        prompt: "p".into(),
        prompt_file: None,
        repo: None,
        budget: None,
        push: None,
        provider: drover_core::LlmProvider::Anthropic,
        upstream: Some(upstream.into()),
        key_secret: key_secret.map(Into::into),
    }
}
