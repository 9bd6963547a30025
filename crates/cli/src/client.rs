//! Connecting to a server, with errors that say how to fix the problem.
//!
//! Where a command goes and what it carries, each from the first place that has it:
//! - server: `--server`, `DROVER_SERVER`, the credentials file's default, `127.0.0.1:7370`;
//! - key: `--key`, `DROVER_KEY`, the credentials file's key (or `drover login --oidc` token)
//!   for that server;
//! - trust: `--ca`, `DROVER_CA`, the credentials file's `ca` for that server.

use std::time::Duration;

use anyhow::{Result, anyhow};
use drover_proto::Bearer;
use drover_proto::drover_client::DroverClient;
use drover_tls::Trust;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::credentials::{self, CredentialsFile};

/// The server a fresh machine runs (`drover up`).
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7370";
/// How long connecting (TCP and TLS) may take before the next server is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A client of the API that carries the caller's key.
pub type Client = DroverClient<InterceptedService<Channel, Bearer>>;

/// Where the server is and how to talk to it.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ServerOpt {
    /// Server address (host:port, http://host:port or https://host:port); several,
    /// comma-separated, are tried in turn, so a client keeps working while one server replica
    /// is down. Default: the credentials file's default server, else 127.0.0.1:7370.
    #[arg(long, env = "DROVER_SERVER", global = true)]
    pub server: Option<String>,
    /// API key (drv_...). Default: the key `drover login` (or `drover up`) stored for the server.
    #[arg(long, env = "DROVER_KEY", global = true, hide_env_values = true)]
    pub key: Option<String>,
    /// The server's CA certificate (a PEM file), or sha256:FINGERPRINT of it, for https
    /// servers. Default: the one stored for the server by `drover login`.
    #[arg(long, env = "DROVER_CA", global = true)]
    pub ca: Option<String>,
}

/// One server to try, with what to send it.
#[derive(Debug, Clone)]
pub struct Target {
    /// Its URL.
    pub url: String,
    /// The key for it.
    pub key: Option<String>,
    /// How to trust it.
    pub trust: Option<Trust>,
}

/// `host:port` → `https://host:port` when a CA is known for it, else `http://host:port`.
pub fn normalize(addr: &str, tls: bool) -> String {
    let addr = addr.trim().trim_end_matches('/');
    if addr.contains("://") {
        addr.to_string()
    } else if tls {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    }
}

impl ServerOpt {
    /// The servers to try, in order, each with its key and trust.
    pub fn targets(&self) -> Result<Vec<Target>> {
        // The file is read only when the command line leaves something open, so a damaged
        // file never gets in the way of explicit options.
        // An empty DROVER_SERVER counts as unset.
        let given = self.server.clone().filter(|s| !s.trim().is_empty());
        let file = match (&given, &self.key, &self.ca) {
            (Some(_), Some(_), Some(_)) => CredentialsFile::default(),
            _ => match credentials::default_path() {
                Some(path) => CredentialsFile::load(&path)?,
                None => CredentialsFile::default(),
            },
        };
        let servers = given.or(file.default.clone()).unwrap_or_else(|| DEFAULT_SERVER.to_owned());
        let mut targets = Vec::new();
        for addr in servers.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            let stored = [normalize(addr, false), normalize(addr, true)]
                .into_iter()
                .find_map(|u| file.servers.get(&u).cloned());
            let ca = self.ca.clone().or_else(|| stored.as_ref().and_then(|s| s.ca.clone()));
            let trust = ca.as_deref().map(Trust::parse).transpose().map_err(|e| anyhow!("--ca: {e}"))?;
            targets.push(Target {
                url: normalize(addr, trust.is_some()),
                key: self.key.clone().or_else(|| stored.and_then(|s| s.bearer())),
                trust,
            });
        }
        if targets.is_empty() {
            return Err(anyhow!("--server names no server"));
        }
        Ok(targets)
    }
}

/// Connects to one target.
pub async fn connect_target(target: &Target) -> Result<Client, String> {
    let bearer = Bearer::new(target.key.as_deref()).map_err(|e| e.to_string())?;
    let channel = drover_tls::channel(&target.url, target.trust.as_ref(), CONNECT_TIMEOUT)
        .await
        .map_err(|e| format!("{} ({e})", target.url))?;
    Ok(DroverClient::with_interceptor(channel, bearer).max_decoding_message_size(256 << 20))
}

/// Connects to the server or explains how to start one.
pub async fn connect(opt: &ServerOpt) -> Result<Client> {
    let mut failures = Vec::new();
    for target in opt.targets()? {
        match connect_target(&target).await {
            Ok(client) => return Ok(client),
            Err(e) => failures.push(e),
        }
    }
    Err(anyhow!(
        "cannot reach the drover server at {}\n  hint: start one with `drover up`, or point --server / \
         DROVER_SERVER at a running server (https://HOST:PORT with --ca for a server off this machine)",
        failures.join(", ")
    ))
}

/// Turns a gRPC status into an error that reads well.
pub fn rpc_error(status: tonic::Status) -> anyhow::Error {
    match status.code() {
        tonic::Code::Unavailable => anyhow!("the server is unavailable: {}", status.message()),
        tonic::Code::Unauthenticated => anyhow!("the server refused the credentials: {}", status.message()),
        _ => anyhow!("{}", status.message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_get_a_scheme() {
        assert_eq!(normalize("127.0.0.1:7370", false), "http://127.0.0.1:7370");
        assert_eq!(normalize("farm:7370", true), "https://farm:7370");
        assert_eq!(normalize("http://x:1/", true), "http://x:1");
    }
}
