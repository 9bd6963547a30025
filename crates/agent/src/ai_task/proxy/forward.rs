//! The request path: authenticate the task token, enforce the budget, swap credentials, forward,
//! and stream the metered response back.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Response, StatusCode};
use bytes::Bytes;
use futures::Stream;
use futures::stream::BoxStream;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::sync::watch;

use super::meter::{CallMeter, Meter};
use super::redact::Redactor;
use super::{ApiFlavor, ProxyConfig};

/// Largest request body forwarded (the Anthropic API itself stops at 32 MB).
const MAX_REQUEST_BODY: usize = 64 << 20;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// long-standing non-standard ones; never forwarded in either direction.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Everything a request handler needs; one per proxy.
pub(super) struct ProxyState {
    /// Upstream base URL without a trailing slash.
    upstream: String,
    /// The real key as a header value marked sensitive (hyper neither logs nor indexes it).
    real_key: HeaderValue,
    /// The same key prefixed with `Bearer `, for OpenAI-style upstreams.
    real_bearer: HeaderValue,
    /// The raw key, to mask it in anything coming back from the upstream.
    real_key_bytes: Box<[u8]>,
    task_token: Box<[u8]>,
    flavor_hint: Option<ApiFlavor>,
    client: reqwest::Client,
    meter: Arc<Meter>,
    /// `true` (or closed) once the proxy stops: in-flight requests give up.
    stop: watch::Receiver<bool>,
}

impl ProxyState {
    /// `upstream` is the validated base URL and `real_key` the config's key already checked to
    /// be a valid header value.
    pub(super) fn new(
        config: &ProxyConfig,
        upstream: String,
        mut real_key: HeaderValue,
        client: reqwest::Client,
        meter: Arc<Meter>,
        stop: watch::Receiver<bool>,
    ) -> Arc<Self> {
        real_key.set_sensitive(true);
        let mut bearer = b"Bearer ".to_vec();
        bearer.extend_from_slice(real_key.as_bytes());
        // Cannot fail: `real_key` is a valid header value and the prefix is visible ASCII.
        let mut real_bearer = HeaderValue::from_bytes(&bearer).unwrap_or_else(|_| real_key.clone());
        real_bearer.set_sensitive(true);
        Arc::new(ProxyState {
            upstream,
            real_key,
            real_bearer,
            real_key_bytes: config.api_key.as_bytes().into(),
            task_token: config.task_token.as_bytes().into(),
            flavor_hint: config.flavor,
            client,
            meter,
            stop,
        })
    }

    /// Resolves once the proxy stops (or was dropped).
    fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut stop = self.stop.clone();
        async move {
            // An error means the sender was dropped along with the proxy: stopped as well.
            let _ = stop.wait_for(|stopped| *stopped).await;
        }
    }
}

/// Every method and path goes to [`proxy`].
pub(super) fn router(state: Arc<ProxyState>) -> Router {
    Router::new().fallback(proxy).with_state(state)
}

/// Which credential header the client used, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presented {
    ApiKey,
    Bearer,
}

async fn proxy(State(state): State<Arc<ProxyState>>, req: Request) -> Response<Body> {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let method = parts.method.clone();

    let (presented, authorized) = check_token(&parts.headers, &state.task_token);
    let flavor = flavor_for(&path, state.flavor_hint, presented);
    if !authorized {
        let reason = if presented.is_some() { "wrong task token" } else { "no task token" };
        tracing::warn!(%method, %path, reason, "llm proxy request rejected");
        return error_response(flavor, StatusCode::UNAUTHORIZED, "authentication_error", reason);
    }

    if state.meter.is_spent() {
        state.meter.count_refused();
        let usage = state.meter.usage();
        let budget = state.meter.budget().unwrap_or(0);
        let total_tokens = usage.total_tokens();
        tracing::info!(%method, %path, budget, total_tokens, "llm request refused: budget spent");
        let message = format!(
            "the task's token budget is spent ({} of {budget} input+output tokens used)",
            usage.total_tokens()
        );
        let kind = match flavor {
            ApiFlavor::Anthropic => "rate_limit_error",
            ApiFlavor::OpenAi => "insufficient_quota",
        };
        return error_response(flavor, StatusCode::TOO_MANY_REQUESTS, kind, &message);
    }

    let mut body = match axum::body::to_bytes(body, MAX_REQUEST_BODY).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(%method, %path, error = %e, "llm proxy request body unreadable");
            return error_response(
                flavor,
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                "request body unreadable or too large",
            );
        }
    };
    if flavor == ApiFlavor::OpenAi && path.ends_with("/chat/completions") {
        body = request_stream_usage(body);
    }

    let query = parts.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let url = format!("{}{path}{query}", state.upstream);
    let mut headers = forwardable(&parts.headers);
    for name in [header::HOST, header::CONTENT_LENGTH, header::AUTHORIZATION, header::ACCEPT_ENCODING] {
        headers.remove(name);
    }
    headers.remove("x-api-key");
    // Metering must read the body, so ask for it uncompressed.
    headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    match flavor {
        ApiFlavor::Anthropic => headers.insert("x-api-key", state.real_key.clone()),
        ApiFlavor::OpenAi => headers.insert(header::AUTHORIZATION, state.real_bearer.clone()),
    };

    tracing::debug!(%method, %path, ?flavor, bytes = body.len(), "forwarding llm request");
    let send = state.client.request(method.clone(), &url).headers(headers).body(body).send();
    let outcome = tokio::select! {
        outcome = send => outcome,
        () = state.stopped() => {
            tracing::info!(%method, %path, "llm request cut off: proxy stopping");
            let status = StatusCode::SERVICE_UNAVAILABLE;
            return error_response(flavor, status, "api_error", "metering proxy stopping");
        }
    };
    let upstream = match outcome {
        Ok(r) => r,
        Err(e) => {
            // reqwest's error names the URL, which holds no secret; the key is only in headers.
            tracing::warn!(%method, %path, error = %e, "llm upstream unreachable");
            return error_response(flavor, StatusCode::BAD_GATEWAY, "api_error", "upstream api unreachable");
        }
    };

    let status = upstream.status();
    let mut response_headers = forwardable(upstream.headers());
    drop_headers_containing(&mut response_headers, &state.real_key_bytes);
    let content_type =
        response_headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let call = CallMeter::new(state.meter.clone(), flavor, status.as_u16(), &content_type, started);
    let body = MeteredBody {
        inner: Box::pin(upstream.bytes_stream()),
        stopped: Box::pin(state.stopped()),
        call,
        redactor: Redactor::new(&state.real_key_bytes),
        done: false,
        last_byte: None,
        waiting: None,
    };

    let mut response = Response::new(Body::from_stream(body));
    *response.status_mut() = status;
    *response.headers_mut() = response_headers;
    response
}

/// Looks for the task token in `x-api-key` and `Authorization: Bearer`; returns which header
/// was used and whether a presented token matched (compared in constant time).
fn check_token(headers: &HeaderMap, token: &[u8]) -> (Option<Presented>, bool) {
    let matches = |v: &[u8]| bool::from(v.ct_eq(token));
    let api_key = headers.get("x-api-key").map(HeaderValue::as_bytes);
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| {
        let v = v.as_bytes();
        (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| v[7..].trim_ascii())
    });
    let presented = match (api_key, bearer) {
        (Some(_), _) => Some(Presented::ApiKey),
        (None, Some(_)) => Some(Presented::Bearer),
        (None, None) if headers.contains_key(header::AUTHORIZATION) => Some(Presented::Bearer),
        (None, None) => None,
    };
    let authorized = api_key.is_some_and(matches) | bearer.is_some_and(matches);
    (presented, authorized)
}

/// Which API a request speaks: the path says it where it can; otherwise the configured hint;
/// otherwise the header the client put its token in; Anthropic by default.
fn flavor_for(path: &str, hint: Option<ApiFlavor>, presented: Option<Presented>) -> ApiFlavor {
    if path.ends_with("/messages") || path.contains("/messages/") || path.ends_with("/complete") {
        return ApiFlavor::Anthropic;
    }
    if ["/chat/completions", "/completions", "/embeddings", "/responses"].iter().any(|p| path.ends_with(p)) {
        return ApiFlavor::OpenAi;
    }
    match (hint, presented) {
        (Some(f), _) => f,
        (None, Some(Presented::Bearer)) => ApiFlavor::OpenAi,
        (None, _) => ApiFlavor::Anthropic,
    }
}

/// A copy of `headers` without hop-by-hop headers, including those `Connection` names.
fn forwardable(headers: &HeaderMap) -> HeaderMap {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let mut out = headers.clone();
    for name in HOP_BY_HOP {
        out.remove(name);
    }
    for name in named {
        out.remove(name);
    }
    out
}

/// Removes every header whose value contains `secret`.
fn drop_headers_containing(headers: &mut HeaderMap, secret: &[u8]) {
    if secret.is_empty() {
        return;
    }
    let leaking: Vec<HeaderName> = headers
        .iter()
        .filter(|(_, v)| v.as_bytes().windows(secret.len()).any(|w| w == secret))
        .map(|(n, _)| n.clone())
        .collect();
    for name in leaking {
        tracing::warn!(header = %name, "upstream response header carried the api key; dropped");
        headers.remove(name);
    }
}

/// OpenAI streams report usage only when asked (`stream_options.include_usage`); without it a
/// streamed call could not be metered, so the proxy asks on the client's behalf. The extra
/// final chunk has empty `choices`, which OpenAI clients handle.
fn request_stream_usage(body: Bytes) -> Bytes {
    let Ok(mut v) = serde_json::from_slice::<Value>(&body) else { return body };
    let Some(obj) = v.as_object_mut() else { return body };
    if obj.get("stream") != Some(&Value::Bool(true)) {
        return body;
    }
    let options = obj.entry("stream_options").or_insert_with(|| json!({}));
    let Some(options) = options.as_object_mut() else { return body };
    if options.get("include_usage") == Some(&Value::Bool(true)) {
        return body;
    }
    options.insert("include_usage".to_owned(), Value::Bool(true));
    serde_json::to_vec(&v).map(Bytes::from).unwrap_or(body)
}

/// An error the proxy answers itself, in the shape the client's SDK parses. `x-should-retry:
/// false` tells the Anthropic and OpenAI SDKs not to retry it.
fn error_response(flavor: ApiFlavor, status: StatusCode, kind: &str, message: &str) -> Response<Body> {
    let body = match flavor {
        ApiFlavor::Anthropic => json!({"type": "error", "error": {"type": kind, "message": message}}),
        ApiFlavor::OpenAi => {
            json!({"error": {"message": message, "type": kind, "param": null, "code": kind}})
        }
    };
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if status != StatusCode::BAD_GATEWAY {
        headers.insert("x-should-retry", HeaderValue::from_static("false"));
    }
    response
}

/// The upstream body on its way to the client: every chunk is metered, then masked, then sent
/// on at once. Ends with an error if the proxy stops first.
///
/// While the task's usage is written down (see [`super::UsageProbe::record`]), bytes that
/// carried tokens wait until the count with them is written; a JSON body, counted only at its
/// end, keeps its last byte back until then, so the task never holds a whole response whose
/// tokens a restarted agent would not count.
struct MeteredBody {
    inner: BoxStream<'static, reqwest::Result<Bytes>>,
    stopped: Waiting,
    call: CallMeter,
    redactor: Redactor,
    done: bool,
    /// The last byte sent so far of a body counted at its end, held back until then.
    last_byte: Option<Bytes>,
    /// Bytes ready to go once the usage counted with them is written down.
    waiting: Option<(Bytes, Waiting)>,
}

/// Something a response body waits for.
type Waiting = Pin<Box<dyn Future<Output = ()> + Send>>;

impl MeteredBody {
    /// Sends `out` now, or once what was counted since `before` is written down. An empty
    /// `out` sends nothing (`None`).
    fn send_after_count(
        &mut self,
        before: u64,
        out: Bytes,
        cx: &mut Context<'_>,
    ) -> Option<Poll<Option<std::io::Result<Bytes>>>> {
        if out.is_empty() {
            return None;
        }
        let meter = self.call.meter().clone();
        let counted = meter.generation();
        if counted == before || !meter.is_written() {
            return Some(Poll::Ready(Some(Ok(out))));
        }
        let mut written: Waiting = Box::pin(async move { meter.wait_written(counted).await });
        match written.as_mut().poll(cx) {
            Poll::Ready(()) => Some(Poll::Ready(Some(Ok(out)))),
            Poll::Pending => {
                self.waiting = Some((out, written));
                Some(Poll::Pending)
            }
        }
    }

    /// `out` with the body's last byte held back, for a body counted at its end.
    fn hold_last_byte(&mut self, out: Bytes) -> Bytes {
        let mut all = match self.last_byte.take() {
            Some(b) if !out.is_empty() => Bytes::from([b, out].concat()),
            Some(b) => b,
            None => out,
        };
        if self.call.counts_at_end() && !all.is_empty() {
            self.last_byte = Some(all.split_off(all.len() - 1));
        }
        all
    }
}

impl Stream for MeteredBody {
    type Item = std::io::Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some((_, written)) = this.waiting.as_mut() {
                if written.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                if let Some((out, _)) = this.waiting.take() {
                    return Poll::Ready(Some(Ok(out)));
                }
            }
            if this.done {
                return Poll::Ready(None);
            }
            if this.stopped.as_mut().poll(cx).is_ready() {
                tracing::info!("llm response cut off: proxy stopping");
                this.done = true;
                this.call.finish(false);
                return Poll::Ready(Some(Err(std::io::Error::other("metering proxy stopped"))));
            }
            let before = this.call.meter().generation();
            match this.inner.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(chunk))) => {
                    this.call.feed(&chunk);
                    let out = this.redactor.push(chunk);
                    let out = this.hold_last_byte(out);
                    if let Some(poll) = this.send_after_count(before, out, cx) {
                        return poll;
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::warn!(error = %e, "llm upstream body failed");
                    this.done = true;
                    this.call.finish(false);
                    return Poll::Ready(Some(Err(std::io::Error::other(e))));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    this.call.finish(true);
                    let tail = this.redactor.finish();
                    let tail = this.hold_last_byte(tail);
                    if let Some(poll) = this.send_after_count(before, tail, cx) {
                        return poll;
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavor_from_path_then_hint_then_header() {
        use ApiFlavor::*;
        assert_eq!(flavor_for("/v1/messages", Some(OpenAi), Some(Presented::Bearer)), Anthropic);
        assert_eq!(flavor_for("/v1/messages/count_tokens", None, Some(Presented::Bearer)), Anthropic);
        assert_eq!(flavor_for("/v1/chat/completions", Some(Anthropic), Some(Presented::ApiKey)), OpenAi);
        assert_eq!(flavor_for("/v1/models", Some(OpenAi), Some(Presented::ApiKey)), OpenAi);
        assert_eq!(flavor_for("/v1/models", None, Some(Presented::Bearer)), OpenAi);
        assert_eq!(flavor_for("/v1/models", None, Some(Presented::ApiKey)), Anthropic);
        assert_eq!(flavor_for("/v1/models", None, None), Anthropic);
    }

    #[test]
    fn token_accepted_in_either_header() {
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("tok"));
        assert_eq!(check_token(&h, b"tok"), (Some(Presented::ApiKey), true));
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer tok"));
        assert_eq!(check_token(&h, b"tok"), (Some(Presented::Bearer), true));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic tok"));
        assert_eq!(check_token(&h, b"tok"), (Some(Presented::Bearer), false));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer to"));
        assert_eq!(check_token(&h, b"tok"), (Some(Presented::Bearer), false));
        assert_eq!(check_token(&HeaderMap::new(), b"tok"), (None, false));
    }

    #[test]
    fn stream_usage_is_requested_once() {
        let asked = request_stream_usage(Bytes::from_static(br#"{"model":"m","stream":true}"#));
        let v: Value = serde_json::from_slice(&asked).unwrap_or_default();
        assert_eq!(v["stream_options"]["include_usage"], Value::Bool(true));
        let plain = Bytes::from_static(br#"{"model":"m"}"#);
        assert_eq!(request_stream_usage(plain.clone()), plain);
        let not_json = Bytes::from_static(b"nope");
        assert_eq!(request_stream_usage(not_json.clone()), not_json);
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
        let out = forwardable(&h);
        assert_eq!(out.len(), 1);
        assert!(out.contains_key("anthropic-version"));
    }
}
