//! Connecting to a server, with errors that say how to fix the problem.

use anyhow::{Result, anyhow};
use drover_proto::drover_client::DroverClient;
use tonic::transport::Channel;

/// Where the server is, from `--server` or `DROVER_SERVER`.
#[derive(clap::Args, Clone, Debug)]
pub struct ServerOpt {
    /// Server address (host:port or http://host:port); several, comma-separated, are tried in
    /// turn, so a client keeps working while one server replica is down.
    #[arg(long, env = "DROVER_SERVER", default_value = "http://127.0.0.1:7370", global = true)]
    pub server: String,
}

/// `host:port` → `http://host:port`.
pub fn normalize(addr: &str) -> String {
    if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") }
}

/// Connects to the server or explains how to start one.
pub async fn connect(opt: &ServerOpt) -> Result<DroverClient<Channel>> {
    let mut failures = Vec::new();
    for addr in opt.server.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let url = normalize(addr);
        let endpoint = Channel::from_shared(url.clone())
            .map_err(|e| anyhow!("`{addr}` is not a server address: {e}"))?;
        match endpoint.connect().await {
            Ok(channel) => return Ok(DroverClient::new(channel).max_decoding_message_size(256 << 20)),
            Err(e) => {
                let cause =
                    std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_else(|| e.to_string());
                failures.push(format!("{url} ({cause})"));
            }
        }
    }
    Err(anyhow!(
        "cannot reach the drover server at {}\n  hint: start one with `drover up`, or point --server / \
         DROVER_SERVER at a running server",
        failures.join(", ")
    ))
}

/// Turns a gRPC status into an error that reads well.
pub fn rpc_error(status: tonic::Status) -> anyhow::Error {
    match status.code() {
        tonic::Code::Unavailable => anyhow!("the server is unavailable: {}", status.message()),
        _ => anyhow!("{}", status.message()),
    }
}
