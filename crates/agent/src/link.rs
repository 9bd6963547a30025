//! How the agent reaches its servers: their addresses, the TLS trust it checks them with, and
//! the node credential every call carries.
//!
//! An agent is enrolled once: it exchanges a single-use join token (`drover agent --join`)
//! for a credential bound to its node name, and keeps that credential, with the server's CA
//! certificate, in a file of its state directory readable by its user only. Later starts
//! read the file, so the same command line (token included) can restart an agent forever.

use std::path::PathBuf;
use std::sync::RwLock;
use std::time::Duration;

use drover_core::access::{Credential, CredentialKind};
use drover_proto as pb;
use drover_proto::Bearer;
use drover_proto::agent_session_client::AgentSessionClient;
use drover_proto::drover_client::DroverClient;
use drover_tls::Trust;
use serde::{Deserialize, Serialize};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// How long connecting (TCP and TLS) may take before the next server is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A client of the client API that carries the node's credential.
pub type Client = DroverClient<InterceptedService<Channel, Bearer>>;
/// A client of the agent API that carries the node's credential.
pub type SessionClient = AgentSessionClient<InterceptedService<Channel, Bearer>>;

/// Why the agent cannot reach or enroll with its servers.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// No server answered.
    #[error("cannot reach a server: {0}")]
    Unreachable(String),
    /// A server answered and refused: a bad token, a name taken, a revoked credential.
    #[error("the server refused this agent: {0}")]
    Refused(String),
    /// The agent's state (its enrollment file) is not usable.
    #[error("{0}")]
    State(String),
}

impl LinkError {
    /// Whether trying again later may help.
    pub fn is_transient(&self) -> bool {
        matches!(self, LinkError::Unreachable(_))
    }
}

/// What an enrolled agent keeps: its credential and whom to trust.
#[derive(Serialize, Deserialize)]
struct Enrollment {
    /// The node name the credential is bound to.
    name: String,
    /// `drn_<id>_<secret>`.
    credential: String,
    /// The server's CA certificate (PEM); empty when the server has no TLS.
    #[serde(default)]
    ca_pem: String,
}

/// The agent's way to its servers.
pub struct Link {
    servers: Vec<String>,
    /// The trust given on the command line (`--ca`); it wins over the enrolled CA.
    explicit_trust: Option<Trust>,
    trust: RwLock<Option<Trust>>,
    bearer: RwLock<Bearer>,
    state_file: PathBuf,
}

fn read_lock<T: Clone>(lock: &RwLock<T>) -> T {
    lock.read().unwrap_or_else(|e| e.into_inner()).clone()
}

fn write_lock<T>(lock: &RwLock<T>, value: T) {
    *lock.write().unwrap_or_else(|e| e.into_inner()) = value;
}

impl Link {
    /// A link to `servers` (URLs), checking them with `trust` when given, keeping its
    /// enrollment in `state_file`.
    pub fn new(servers: Vec<String>, trust: Option<Trust>, state_file: PathBuf) -> Link {
        Link {
            servers,
            trust: RwLock::new(trust.clone()),
            explicit_trust: trust,
            bearer: RwLock::new(Bearer::default()),
            state_file,
        }
    }

    /// The server URLs, in the order they are tried.
    pub fn servers(&self) -> &[String] {
        &self.servers
    }

    /// Makes sure the agent holds a credential for node `name`: the one kept in the state
    /// file, or, failing that, one exchanged for `join` (a single-use token). Without either,
    /// the agent goes on without a credential (a server started with `--no-auth` accepts
    /// that; any other refuses the session with a message saying to enroll).
    pub async fn enroll(&self, name: &str, join: Option<&str>) -> Result<(), LinkError> {
        if let Some(kept) = self.load()? {
            if kept.name != name {
                return Err(LinkError::State(format!(
                    "this agent's state directory is enrolled as node `{}`; start it with --name {} or give it another --work-dir",
                    kept.name, kept.name
                )));
            }
            if join.is_some() {
                tracing::info!(node = name, "already enrolled; the join token was not used");
            }
            self.adopt(&kept)?;
            return Ok(());
        }
        let Some(token) = join else { return Ok(()) };
        let parsed =
            Credential::parse(token).filter(|c| c.kind == CredentialKind::JoinToken).ok_or_else(|| {
                LinkError::State(
                    "--join takes a join token (drj_...) from `drover nodes token create`".into(),
                )
            })?;
        // The token pins the server's CA; trust it for the exchange unless --ca says otherwise.
        if self.explicit_trust.is_none()
            && let Some(fp) = &parsed.ca_fingerprint
        {
            write_lock(&self.trust, Some(Trust::Fingerprint(fp.clone())));
        }
        let mut last = LinkError::Unreachable("no server address".into());
        for url in &self.servers {
            let channel = match self.channel(url).await {
                Ok(c) => c,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            let answer = AgentSessionClient::new(channel)
                .join(pb::JoinRequest { token: token.to_owned(), name: name.to_owned() })
                .await;
            match answer {
                Ok(r) => {
                    let r = r.into_inner();
                    let enrollment = Enrollment { name: r.name, credential: r.credential, ca_pem: r.ca_pem };
                    self.save(&enrollment)?;
                    self.adopt(&enrollment)?;
                    tracing::info!(node = name, server = %url, "enrolled with the server");
                    return Ok(());
                }
                Err(s) if s.code() == tonic::Code::Unavailable => {
                    last = LinkError::Unreachable(format!("{url}: {}", s.message()));
                }
                Err(s) => return Err(LinkError::Refused(s.message().to_owned())),
            }
        }
        Err(last)
    }

    /// Uses an enrollment's credential and, unless `--ca` was given, its CA.
    fn adopt(&self, enrollment: &Enrollment) -> Result<(), LinkError> {
        let bearer =
            Bearer::new(Some(&enrollment.credential)).map_err(|e| LinkError::State(e.to_string()))?;
        write_lock(&self.bearer, bearer);
        if self.explicit_trust.is_none() && !enrollment.ca_pem.is_empty() {
            write_lock(&self.trust, Some(Trust::CaPem(enrollment.ca_pem.clone().into_bytes())));
        }
        Ok(())
    }

    fn load(&self) -> Result<Option<Enrollment>, LinkError> {
        let text = match std::fs::read_to_string(&self.state_file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(LinkError::State(format!("cannot read {}: {e}", self.state_file.display())));
            }
        };
        serde_json::from_str(&text).map(Some).map_err(|e| {
            LinkError::State(format!(
                "{} is damaged ({e}); remove it and enroll the agent again with a new join token",
                self.state_file.display()
            ))
        })
    }

    fn save(&self, enrollment: &Enrollment) -> Result<(), LinkError> {
        let text = serde_json::to_string_pretty(enrollment).map_err(|e| LinkError::State(e.to_string()))?;
        drover_tls::write_private_file(&self.state_file, text.as_bytes()).map_err(|e| {
            LinkError::State(format!("cannot keep the node credential in {}: {e}", self.state_file.display()))
        })
    }

    /// A channel to `url`, with TLS when the URL says `https`.
    async fn channel(&self, url: &str) -> Result<Channel, LinkError> {
        let trust = read_lock(&self.trust);
        drover_tls::channel(url, trust.as_ref(), CONNECT_TIMEOUT)
            .await
            .map_err(|e| LinkError::Unreachable(format!("{url}: {e}")))
    }

    /// A client of the client API on the first server that answers.
    pub async fn client(&self) -> Result<Client, LinkError> {
        let mut last = LinkError::Unreachable("no server address".into());
        for url in &self.servers {
            match self.channel(url).await {
                Ok(channel) => {
                    return Ok(DroverClient::with_interceptor(channel, read_lock(&self.bearer))
                        .max_decoding_message_size(64 << 20));
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// A client of the agent API on `url`.
    pub async fn session_client(&self, url: &str) -> Result<SessionClient, LinkError> {
        let channel = self.channel(url).await?;
        Ok(AgentSessionClient::with_interceptor(channel, read_lock(&self.bearer))
            .max_decoding_message_size(64 << 20))
    }

    /// The LLM key and the secrets of attempt `attempt_id` that node `node` (this agent)
    /// runs, from the first server that answers. A refusal (the attempt is not open on this
    /// node any more) is [`LinkError::Refused`].
    pub async fn attempt_keys(
        &self,
        node: &str,
        attempt_id: i64,
    ) -> Result<pb::AttemptKeyResponse, LinkError> {
        let mut last = LinkError::Unreachable("no server address".into());
        for url in &self.servers {
            let mut client = match self.session_client(url).await {
                Ok(client) => client,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            let request = pb::AttemptKeyRequest { node: node.to_owned(), attempt_id };
            match client.attempt_key(request).await {
                Ok(answer) => return Ok(answer.into_inner()),
                // The server (or the way to it) could not answer now: another may, or later.
                Err(status)
                    if matches!(
                        status.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::Unknown
                            | tonic::Code::Cancelled
                            | tonic::Code::DeadlineExceeded
                            | tonic::Code::Aborted
                    ) =>
                {
                    last = LinkError::Unreachable(format!("{url}: {}", status.message()));
                }
                Err(status) => return Err(LinkError::Refused(status.message().to_owned())),
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[tokio::test]
    async fn a_kept_enrollment_is_private_and_bound_to_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state/node-credential.json");
        let link = Link::new(vec!["http://127.0.0.1:1".into()], None, file.clone());
        let credential = format!("drn_{}_{}", "1".repeat(16), "2".repeat(64));
        link.save(&Enrollment { name: "n1".into(), credential, ca_pem: String::new() }).unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        link.enroll("n1", None).await.unwrap();
        let err = link.enroll("n2", None).await.unwrap_err();
        assert!(err.to_string().contains("enrolled as node `n1`"), "{err}");
        // No credential and no token: the agent goes on bare.
        let bare = Link::new(vec![], None, dir.path().join("none.json"));
        bare.enroll("n1", None).await.unwrap();
        assert!(bare.enroll("n1", Some("drv_nope")).await.is_err());
        std::fs::write(dir.path().join("bad.json"), "{").unwrap();
        let damaged = Link::new(vec![], None, dir.path().join("bad.json"));
        assert!(damaged.enroll("n1", None).await.unwrap_err().to_string().contains("damaged"));
    }
}
