//! The per-task LLM metering proxy.
//!
//! For an AI-agent task the node starts one [`MeteringProxy`] on loopback (or on an address a
//! microVM reaches through a forwarded port). The sandbox gets the proxy's [`base_url`] and a
//! per-task token, never the real API key. For every request the proxy
//!
//! 1. checks the task token (`x-api-key` or `Authorization: Bearer`), answering 401 otherwise;
//! 2. refuses with 429 once the task's token budget is spent, without contacting the upstream;
//! 3. swaps the task token for the real key in the header style the upstream API expects;
//! 4. forwards the request and streams the response back as it arrives, while counting the input
//!    and output tokens the response reports (JSON bodies and server-sent event streams, in the
//!    Anthropic Messages and OpenAI Chat Completions shapes).
//!
//! The real key never reaches the client: the proxy's own answers never contain it, upstream
//! response headers carrying it are dropped and any occurrence in an upstream body is masked.
//! Neither the key nor the full task token is ever logged.
//!
//! [`base_url`]: MeteringProxy::base_url

mod forward;
mod meter;
mod redact;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderValue;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use self::forward::ProxyState;
use self::meter::Meter;

/// How long [`MeteringProxy::shutdown`] lets in-flight requests (long SSE streams) finish before
/// cutting them off.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long connections get to close once their streams were cut off, before the server task is
/// aborted outright.
const CUT_OFF_GRACE: Duration = Duration::from_secs(1);

/// Which LLM HTTP API a request speaks; decides where the real key goes and the shape of the
/// proxy's own error bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiFlavor {
    /// Anthropic Messages API: key in `x-api-key`, errors as `{"type":"error","error":{…}}`.
    Anthropic,
    /// OpenAI Chat Completions API: key in `Authorization: Bearer`, errors as `{"error":{…}}`.
    #[serde(rename = "openai")]
    OpenAi,
}

/// What a [`MeteringProxy`] needs to serve one task.
///
/// `Debug` redacts the key and the token, so a config can be logged safely.
#[derive(Clone)]
pub struct ProxyConfig {
    /// Base URL of the upstream API, e.g. `https://api.anthropic.com`; a path prefix is kept and
    /// the client's request path is appended to it. Must be `http` or `https`.
    pub upstream: String,
    /// The real API key. Sent only to the upstream: never returned to the client, never logged.
    pub api_key: String,
    /// The only credential the sandbox gets; clients present it as `x-api-key` or as
    /// `Authorization: Bearer`.
    pub task_token: String,
    /// Token budget (input + output) for the whole task; `None` means unlimited.
    pub budget: Option<u64>,
    /// Which API the upstream speaks, for paths that do not say it themselves (`/v1/models`).
    /// `None`: decided per request from the path, then from the header the client used.
    pub flavor: Option<ApiFlavor>,
    /// Address to listen on; `127.0.0.1:0` (any free loopback port) by default.
    pub listen: SocketAddr,
    /// What the task used before this proxy started (through the proxy an earlier agent run
    /// kept for it): counted in, and against the budget.
    pub used: TokenUsage,
}

impl ProxyConfig {
    /// A config with no budget, no flavor hint, listening on `127.0.0.1:0`.
    pub fn new(
        upstream: impl Into<String>,
        api_key: impl Into<String>,
        task_token: impl Into<String>,
    ) -> Self {
        ProxyConfig {
            upstream: upstream.into(),
            api_key: api_key.into(),
            task_token: task_token.into(),
            budget: None,
            flavor: None,
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            used: TokenUsage::default(),
        }
    }

    /// Counts in what the task used before (see [`ProxyConfig::used`]).
    pub fn with_used(mut self, used: TokenUsage) -> Self {
        self.used = used;
        self
    }

    /// Sets the task's token budget (input + output tokens).
    pub fn with_budget(mut self, budget: u64) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Sets which API the upstream speaks.
    pub fn with_flavor(mut self, flavor: ApiFlavor) -> Self {
        self.flavor = Some(flavor);
        self
    }

    /// Sets the address to listen on (e.g. one a VM's forwarded port reaches).
    pub fn with_listen(mut self, listen: SocketAddr) -> Self {
        self.listen = listen;
        self
    }
}

impl fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyConfig")
            .field("upstream", &self.upstream)
            .field("api_key", &"<redacted>")
            .field("task_token", &token_hint(&self.task_token))
            .field("budget", &self.budget)
            .field("flavor", &self.flavor)
            .field("listen", &self.listen)
            .field("used", &self.used)
            .finish()
    }
}

/// Tokens and calls one task has used through its proxy so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    /// Input tokens, including cache reads and cache writes where the API reports them.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Requests forwarded to the upstream that got a response (any status).
    pub calls: u64,
    /// Requests refused with 429 because the budget was spent.
    pub refused: u64,
}

impl TokenUsage {
    /// The later of two readings of the same counters (each only grows).
    pub fn latest(self, other: TokenUsage) -> TokenUsage {
        TokenUsage {
            input_tokens: self.input_tokens.max(other.input_tokens),
            output_tokens: self.output_tokens.max(other.output_tokens),
            calls: self.calls.max(other.calls),
            refused: self.refused.max(other.refused),
        }
    }

    /// Input plus output tokens, the quantity the budget limits.
    pub fn total_tokens(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }
}

/// Why a [`MeteringProxy`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The upstream base URL is unusable.
    #[error("invalid upstream url {upstream:?}: {reason}")]
    InvalidUpstream {
        /// The URL as configured.
        upstream: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A config field is unusable; the message never contains the secret itself.
    #[error("invalid proxy config field {field}: {reason}")]
    InvalidConfig {
        /// The field's name.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP client for the upstream could not be built (TLS setup).
    #[error("cannot build the upstream http client")]
    Client(#[source] reqwest::Error),
}

/// Reads a running proxy's usage (see [`MeteringProxy::probe`]).
#[derive(Debug, Clone)]
pub struct UsageProbe(Arc<Meter>);

impl UsageProbe {
    /// Tokens and calls used so far.
    pub fn usage(&self) -> TokenUsage {
        self.0.usage()
    }

    /// Writes the usage down with `write` each time it changes, until the returned future is
    /// dropped. While it runs, the proxy sends a response's bytes that carry tokens to the task
    /// only once `write` has returned with them counted: what the task received is never more
    /// than what a restarted agent counts on from.
    pub fn record<F, Fut>(&self, mut write: F) -> impl Future<Output = ()> + Send + 'static
    where
        F: FnMut(TokenUsage) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let meter = self.0.clone();
        async move {
            /// Lets responses go on unwritten once nothing writes the usage any more.
            struct Detach(Arc<Meter>);
            impl Drop for Detach {
                fn drop(&mut self) {
                    self.0.set_written(None);
                }
            }
            let _detach = Detach(meter.clone());
            let mut generation = meter.generation();
            meter.set_written(Some(generation.saturating_sub(1)));
            loop {
                write(meter.usage()).await;
                meter.set_written(Some(generation));
                meter.changed_after(generation).await;
                generation = meter.generation();
            }
        }
    }
}

/// A running per-task metering proxy. Dropping it without [`shutdown`](Self::shutdown) stops it
/// at once: the listener closes and open responses end with an error.
pub struct MeteringProxy {
    addr: SocketAddr,
    meter: Arc<Meter>,
    /// Asks the accept loop to stop and idle connections to close (graceful).
    shutdown_tx: Option<oneshot::Sender<()>>,
    /// Cuts off requests still in flight: every handler and response body holds a receiver and
    /// gives up when this says `true` or is dropped (so dropping the proxy cuts them off too).
    /// Needed because aborting the accept loop leaves already spawned connection tasks running.
    stop_tx: watch::Sender<bool>,
    server: Option<JoinHandle<()>>,
}

impl MeteringProxy {
    /// Validates the config, binds the listen address and starts serving in the background.
    ///
    /// The server task runs inside the caller's current `tracing` span (typically the task's),
    /// so its log lines carry the task's fields.
    pub async fn start(config: ProxyConfig) -> Result<MeteringProxy, ProxyError> {
        let upstream = validate_upstream(&config.upstream)?;
        if config.task_token.is_empty() {
            return Err(ProxyError::InvalidConfig { field: "task_token", reason: "must not be empty" });
        }
        if config.api_key.is_empty() {
            return Err(ProxyError::InvalidConfig { field: "api_key", reason: "must not be empty" });
        }
        if config.api_key == config.task_token {
            return Err(ProxyError::InvalidConfig {
                field: "task_token",
                reason: "must differ from the real api key",
            });
        }
        let real_key = HeaderValue::from_str(&config.api_key).map_err(|_| ProxyError::InvalidConfig {
            field: "api_key",
            reason: "not a valid http header value",
        })?;

        let client = reqwest::Client::builder()
            // Never follow redirects: reqwest keeps custom headers such as `x-api-key` across
            // hosts, so following one could hand the real key to a third party.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(30))
            // Long non-streamed generations can be silent for minutes; this only bounds a
            // stalled connection, not a whole response.
            .read_timeout(Duration::from_secs(15 * 60))
            .build()
            .map_err(ProxyError::Client)?;

        let meter = Arc::new(Meter::starting_from(config.budget, config.used));
        let (stop_tx, stop_rx) = watch::channel(false);
        let state = ProxyState::new(&config, upstream.clone(), real_key, client, meter.clone(), stop_rx);

        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| ProxyError::Bind { addr: config.listen, source })?;
        let addr =
            listener.local_addr().map_err(|source| ProxyError::Bind { addr: config.listen, source })?;

        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let app = forward::router(state);
        let span = tracing::Span::current();
        let server = tokio::spawn(
            async move {
                let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                    let _ = shutdown_rx.await;
                });
                if let Err(e) = serve.await {
                    tracing::warn!(error = %e, "llm proxy server failed");
                }
            }
            .instrument(span),
        );
        tracing::info!(
            %addr,
            upstream = %upstream,
            budget = ?config.budget,
            flavor = ?config.flavor,
            task_token = %token_hint(&config.task_token),
            "llm metering proxy started"
        );
        Ok(MeteringProxy { addr, meter, shutdown_tx: Some(shutdown_tx), stop_tx, server: Some(server) })
    }

    /// The address the proxy listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL to hand to the sandbox, e.g. `http://127.0.0.1:41234` (no trailing slash),
    /// suitable for `ANTHROPIC_BASE_URL`; OpenAI clients want `{base_url}/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Tokens and calls used so far; streamed responses are counted as their events arrive.
    pub fn usage(&self) -> TokenUsage {
        self.meter.usage()
    }

    /// A handle that reads the usage while the proxy runs, from anywhere.
    pub fn probe(&self) -> UsageProbe {
        UsageProbe(self.meter.clone())
    }

    /// True once input + output tokens reached the budget; from then on every request is
    /// refused with 429. Always false without a budget.
    pub fn budget_spent(&self) -> bool {
        self.meter.is_spent()
    }

    /// Resolves when the budget is spent (never, without a budget), so the agent can fail the
    /// task with failure class `budget` without polling.
    pub async fn wait_budget_spent(&self) {
        let mut rx = self.meter.subscribe_spent();
        // The sender lives in `self.meter`, so the channel cannot close while `self` is borrowed.
        let _ = rx.wait_for(|spent| *spent).await;
    }

    /// Stops accepting connections and waits up to a short grace period for in-flight requests,
    /// then cuts off whatever is left. Returns the final usage.
    pub async fn shutdown(mut self) -> TokenUsage {
        if let Some(tx) = self.shutdown_tx.take() {
            let _ = tx.send(());
        }
        if let Some(mut server) = self.server.take()
            && tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await.is_err()
        {
            tracing::info!(grace_ms = SHUTDOWN_GRACE.as_millis() as u64, "cutting off open llm streams");
            self.stop_tx.send_replace(true);
            if tokio::time::timeout(CUT_OFF_GRACE, &mut server).await.is_err() {
                server.abort();
            }
        }
        let usage = self.meter.usage();
        tracing::info!(
            input_tokens = usage.input_tokens,
            output_tokens = usage.output_tokens,
            calls = usage.calls,
            refused = usage.refused,
            "llm metering proxy stopped"
        );
        usage
    }
}

impl Drop for MeteringProxy {
    fn drop(&mut self) {
        self.stop_tx.send_replace(true);
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

impl fmt::Debug for MeteringProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeteringProxy").field("addr", &self.addr).field("usage", &self.usage()).finish()
    }
}

/// Checks the upstream base URL and returns it without a trailing slash.
fn validate_upstream(upstream: &str) -> Result<String, ProxyError> {
    let invalid =
        |reason: &str| ProxyError::InvalidUpstream { upstream: upstream.to_owned(), reason: reason.into() };
    let url = reqwest::Url::parse(upstream).map_err(|e| invalid(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("scheme must be http or https"));
    }
    if url.host_str().is_none() {
        return Err(invalid("no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("must not have a query or fragment"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid("must not carry credentials"));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// A loggable stand-in for a task token: its first four characters when it is long enough for
/// that to reveal little, else nothing.
fn token_hint(token: &str) -> String {
    match token.get(..4) {
        Some(prefix) if token.len() >= 16 => format!("{prefix}…"),
        _ => "…".to_owned(),
    }
}
