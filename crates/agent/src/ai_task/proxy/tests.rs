//! End-to-end tests of the proxy against a fake upstream on loopback that speaks both API
//! shapes, with JSON bodies and SSE streams sent in delayed chunks that split lines.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Response};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::*;

const REAL_KEY: &str = "sk-ant-REAL-key-0123456789abcdef";
const TASK_TOKEN: &str = "drv-task-token-0123456789";
const WAIT: Duration = Duration::from_secs(10);

/// One request as the fake upstream received it.
#[derive(Debug, Clone)]
struct Seen {
    uri: String,
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Default)]
struct UpState {
    requests: Mutex<Vec<Seen>>,
    /// The `gated` stream waits on this after its first event.
    gate: Notify,
    /// Set when the `gated` stream has sent its last byte.
    finished: AtomicBool,
}

struct Upstream {
    addr: std::net::SocketAddr,
    state: Arc<UpState>,
}

impl Upstream {
    async fn start() -> Upstream {
        let state = Arc::new(UpState::default());
        let app = Router::new().fallback(upstream_handler).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind fake upstream");
        let addr = listener.local_addr().expect("fake upstream addr");
        tokio::spawn(async move { axum::serve(listener, app).await.expect("fake upstream serves") });
        Upstream { addr, state }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<Seen> {
        self.state.requests.lock().expect("lock").clone()
    }
}

const ANTHROPIC_JSON: &str = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude","content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","usage":{"input_tokens":40,"cache_creation_input_tokens":3,"cache_read_input_tokens":7,"output_tokens":12}}"#;

const ANTHROPIC_SSE: &str = "event: message_start\n\
data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude\",\"usage\":{\"input_tokens\":25,\"cache_read_input_tokens\":5,\"output_tokens\":1}}}\n\n\
event: content_block_start\n\
data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
event: ping\n\
data: {\"type\": \"ping\"}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n\
event: content_block_stop\n\
data: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n\
event: message_stop\n\
data: {\"type\":\"message_stop\"}\n\n";

const OPENAI_JSON: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":21,"completion_tokens":9,"total_tokens":30}}"#;

const OPENAI_SSE: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi\"}}],\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":34,\"total_tokens\":46}}\n\n\
data: [DONE]\n\n";

/// Splits `text` right after each marker (in order), so chunk boundaries fall inside lines,
/// inside JSON strings and inside numbers.
fn split_after(text: &str, markers: &[&str]) -> Vec<Bytes> {
    let mut chunks = Vec::new();
    let mut rest = text;
    for m in markers {
        let at = rest.find(m).expect("marker in text") + m.len();
        chunks.push(Bytes::copy_from_slice(&rest.as_bytes()[..at]));
        rest = &rest[at..];
    }
    chunks.push(Bytes::copy_from_slice(rest.as_bytes()));
    chunks
}

/// A body that sends `chunks` with a pause before each but the first; when `gate` is given,
/// it also waits for it before the second chunk and marks `finished` after the last.
fn chunked(chunks: Vec<Bytes>, gate: Option<Arc<UpState>>) -> Body {
    let stream = futures::stream::unfold((0usize, chunks, gate), |(i, chunks, gate)| async move {
        if i >= chunks.len() {
            if let Some(g) = &gate {
                g.finished.store(true, Ordering::SeqCst);
            }
            return None;
        }
        if i > 0 {
            if i == 1
                && let Some(g) = &gate
            {
                g.gate.notified().await;
            }
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        let chunk = chunks[i].clone();
        Some((Ok::<_, std::io::Error>(chunk), (i + 1, chunks, gate)))
    });
    Body::from_stream(stream)
}

fn respond(status: u16, content_type: &str, body: Body) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("request-id", "req_fake")
        .body(body)
        .expect("valid response")
}

async fn upstream_handler(State(up): State<Arc<UpState>>, req: Request) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
    let uri = parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default();
    up.requests.lock().expect("lock").push(Seen { uri, headers: parts.headers.clone(), body: body.clone() });
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let stream = req["stream"] == json!(true);
    match (parts.uri.path(), stream, req["model"].as_str().unwrap_or("")) {
        ("/v1/messages", false, _) => respond(200, "application/json", Body::from(ANTHROPIC_JSON)),
        ("/v1/messages", true, "gated") => {
            let chunks = split_after(ANTHROPIC_SSE, &["\n\n"]);
            respond(200, "text/event-stream", chunked(chunks, Some(up.clone())))
        }
        ("/v1/messages", true, _) => {
            let chunks = split_after(
                ANTHROPIC_SSE,
                &["\"input_tok", "\"ping\"}\n", "\"output_tokens\":1", "message_stop\"}\n"],
            );
            respond(200, "text/event-stream; charset=utf-8", chunked(chunks, None))
        }
        ("/v1/chat/completions", false, _) => respond(200, "application/json", Body::from(OPENAI_JSON)),
        ("/v1/chat/completions", true, _) => {
            let chunks = split_after(
                OPENAI_SSE,
                &["\"choices\":[{\"ind", "\"usage\":{\"prompt_", "\"completion_tokens\":3"],
            );
            respond(200, "text/event-stream", chunked(chunks, None))
        }
        ("/v1/overloaded", _, _) => respond(
            529,
            "application/json",
            Body::from(r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#),
        ),
        ("/v1/leaky", _, _) => {
            // A misbehaving upstream that echoes the key it got, in a header and across a
            // chunk boundary in the body.
            let key = parts.headers.get("x-api-key").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            let text = format!(
                r#"{{"type":"error","error":{{"type":"authentication_error","message":"bad key {key}"}}}}"#
            );
            let chunks = split_after(&text, &["sk-ant-RE"]);
            let mut response = respond(401, "application/json", chunked(chunks, None));
            if let Ok(v) = key.parse() {
                response.headers_mut().insert("x-debug-key", v);
            }
            response
        }
        _ => respond(
            404,
            "application/json",
            Body::from(r#"{"type":"error","error":{"type":"not_found_error"}}"#),
        ),
    }
}

/// `RequestBuilder::json` without reqwest's `json` feature.
trait JsonBody {
    fn json_body(self, body: &Value) -> Self;
}

impl JsonBody for reqwest::RequestBuilder {
    fn json_body(self, body: &Value) -> Self {
        self.header("content-type", "application/json").body(body.to_string())
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().expect("client")
}

async fn start_proxy(up: &Upstream, budget: Option<u64>) -> MeteringProxy {
    let mut config = ProxyConfig::new(up.url(), REAL_KEY, TASK_TOKEN);
    config.budget = budget;
    MeteringProxy::start(config).await.expect("proxy starts")
}

/// What the client got back, whole.
struct Got {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// Sends through the proxy and reads the whole answer, checking it never holds the real key.
async fn send(req: reqwest::RequestBuilder) -> Got {
    let resp = tokio::time::timeout(WAIT, req.send()).await.expect("in time").expect("proxy answers");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = tokio::time::timeout(WAIT, resp.text()).await.expect("in time").expect("body");
    let got = Got { status, headers, body };
    assert_no_key(&got);
    got
}

fn assert_no_key(got: &Got) {
    assert!(!got.body.contains(REAL_KEY), "real key in body: {}", got.body);
    for (name, value) in &got.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        assert!(!value.contains(REAL_KEY), "real key in header {name}");
    }
}

fn anthropic(proxy: &MeteringProxy, path: &str, body: Value) -> reqwest::RequestBuilder {
    client()
        .post(format!("{}{path}", proxy.base_url()))
        .header("x-api-key", TASK_TOKEN)
        .header("anthropic-version", "2023-06-01")
        .json_body(&body)
}

fn openai(proxy: &MeteringProxy, body: Value) -> reqwest::RequestBuilder {
    client()
        .post(format!("{}/v1/chat/completions", proxy.base_url()))
        .bearer_auth(TASK_TOKEN)
        .json_body(&body)
}

fn assert_no_task_token(seen: &Seen) {
    for (name, value) in &seen.headers {
        assert!(
            !String::from_utf8_lossy(value.as_bytes()).contains(TASK_TOKEN),
            "task token in upstream header {name}"
        );
    }
    assert!(!String::from_utf8_lossy(&seen.body).contains(TASK_TOKEN), "task token in upstream body");
}

#[tokio::test]
async fn anthropic_json_usage_counts_cache_as_input() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&up, None).await;
    let got =
        send(anthropic(&proxy, "/v1/messages?beta=true", json!({"model": "claude", "max_tokens": 10}))).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, ANTHROPIC_JSON, "body forwarded unchanged");
    assert_eq!(got.headers.get("request-id").map(|v| v.as_bytes()), Some(&b"req_fake"[..]));
    assert_eq!(proxy.usage(), TokenUsage { input_tokens: 50, output_tokens: 12, calls: 1, refused: 0 });

    let seen = &up.requests()[0];
    assert_eq!(seen.uri, "/v1/messages?beta=true");
    assert_eq!(seen.headers.get("x-api-key").map(|v| v.as_bytes()), Some(REAL_KEY.as_bytes()));
    assert_eq!(seen.headers.get("anthropic-version").map(|v| v.as_bytes()), Some(&b"2023-06-01"[..]));
    assert!(seen.headers.get("authorization").is_none());
    assert_no_task_token(seen);
    assert_eq!(proxy.shutdown().await.total_tokens(), 62);
}

#[tokio::test]
async fn anthropic_sse_usage_from_message_start_and_delta() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&up, None).await;
    let got = send(anthropic(&proxy, "/v1/messages", json!({"model": "claude", "stream": true}))).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, ANTHROPIC_SSE, "stream forwarded byte for byte");
    assert_eq!(proxy.usage(), TokenUsage { input_tokens: 30, output_tokens: 15, calls: 1, refused: 0 });
    proxy.shutdown().await;
}

#[tokio::test]
async fn openai_json_usage_and_bearer_key() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&up, None).await;
    let got = send(openai(&proxy, json!({"model": "gpt", "messages": []}))).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, OPENAI_JSON);
    assert_eq!(proxy.usage(), TokenUsage { input_tokens: 21, output_tokens: 9, calls: 1, refused: 0 });

    let seen = &up.requests()[0];
    let expected = format!("Bearer {REAL_KEY}");
    assert_eq!(seen.headers.get("authorization").map(|v| v.as_bytes()), Some(expected.as_bytes()));
    assert!(seen.headers.get("x-api-key").is_none());
    assert_no_task_token(seen);
    proxy.shutdown().await;
}

#[tokio::test]
async fn openai_sse_usage_from_final_chunk() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&up, None).await;
    let got = send(openai(&proxy, json!({"model": "gpt", "stream": true, "messages": []}))).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, OPENAI_SSE);
    assert_eq!(proxy.usage(), TokenUsage { input_tokens: 12, output_tokens: 34, calls: 1, refused: 0 });

    // The proxy asked for the usage chunk on the client's behalf.
    let sent: Value = serde_json::from_slice(&up.requests()[0].body).unwrap_or(Value::Null);
    assert_eq!(sent["stream_options"]["include_usage"], json!(true));
    assert_eq!(sent["model"], json!("gpt"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn bearer_token_on_anthropic_path_becomes_x_api_key() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&up, None).await;
    let req = client()
        .post(format!("{}/v1/messages", proxy.base_url()))
        .bearer_auth(TASK_TOKEN)
        .json_body(&json!({}));
    assert_eq!(send(req).await.status, 200);
    let seen = &up.requests()[0];
    assert_eq!(seen.headers.get("x-api-key").map(|v| v.as_bytes()), Some(REAL_KEY.as_bytes()));
    assert!(seen.headers.get("authorization").is_none());
    assert_no_task_token(seen);
    proxy.shutdown().await;
}

#[tokio::test]
async fn sse_reaches_the_client_before_the_upstream_finishes() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&up, None).await;
    let mut resp = tokio::time::timeout(
        WAIT,
        anthropic(&proxy, "/v1/messages", json!({"model": "gated", "stream": true})).send(),
    )
    .await
    .expect("headers in time")
    .expect("proxy answers");
    assert_eq!(resp.status(), 200);

    // The upstream will not send anything more until the gate opens, so the first event can
    // only be here if the proxy passed it on as it came.
    let first = tokio::time::timeout(WAIT, resp.chunk()).await.expect("first event in time").expect("chunk");
    let first = String::from_utf8_lossy(&first.unwrap_or_default()).into_owned();
    assert!(first.contains("message_start"), "first chunk: {first}");
    assert!(!up.state.finished.load(Ordering::SeqCst));
    assert_eq!(proxy.usage().input_tokens, 30, "counted as it streams");

    up.state.gate.notify_one();
    let mut rest = String::new();
    while let Some(chunk) = tokio::time::timeout(WAIT, resp.chunk()).await.expect("in time").expect("chunk") {
        rest.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(up.state.finished.load(Ordering::SeqCst));
    assert_eq!(format!("{first}{rest}"), ANTHROPIC_SSE);
    assert_eq!(proxy.usage(), TokenUsage { input_tokens: 30, output_tokens: 15, calls: 1, refused: 0 });
    proxy.shutdown().await;
}

#[tokio::test]
async fn wrong_or_missing_token_gets_401_without_calling_upstream() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&up, None).await;
    let url = format!("{}/v1/messages", proxy.base_url());
    let cases = [
        client().post(&url).json_body(&json!({})),
        client().post(&url).header("x-api-key", "drv-task-token-wrong").json_body(&json!({})),
        client().post(&url).header("x-api-key", REAL_KEY).json_body(&json!({})),
        client().post(&url).bearer_auth("nope").json_body(&json!({})),
        client().post(&url).header("authorization", format!("Basic {TASK_TOKEN}")).json_body(&json!({})),
    ];
    for req in cases {
        let got = send(req).await;
        assert_eq!(got.status, 401);
        assert_eq!(got.json()["error"]["type"], json!("authentication_error"));
    }
    let got =
        send(client().post(format!("{}/v1/chat/completions", proxy.base_url())).json_body(&json!({}))).await;
    assert_eq!(got.status, 401);
    assert!(got.json()["error"]["message"].is_string(), "openai shape: {}", got.body);

    assert!(up.requests().is_empty(), "upstream must not be called");
    assert_eq!(proxy.usage(), TokenUsage::default());
    proxy.shutdown().await;
}

#[tokio::test]
async fn budget_cut_off_refuses_with_429_and_signals() {
    let up = Upstream::start().await;
    // Each Anthropic JSON call uses 62 tokens: the first leaves room, the second reaches 124.
    let proxy = start_proxy(&up, Some(100)).await;
    let body = json!({"model": "claude"});
    assert_eq!(send(anthropic(&proxy, "/v1/messages", body.clone())).await.status, 200);
    assert!(!proxy.budget_spent());
    assert_eq!(send(anthropic(&proxy, "/v1/messages", body.clone())).await.status, 200);
    assert!(proxy.budget_spent());
    tokio::time::timeout(WAIT, proxy.wait_budget_spent()).await.expect("spent signal");

    let got = send(anthropic(&proxy, "/v1/messages", body.clone())).await;
    assert_eq!(got.status, 429);
    assert_eq!(got.headers.get("x-should-retry").map(|v| v.as_bytes()), Some(&b"false"[..]));
    assert_eq!(got.json()["type"], json!("error"));
    assert_eq!(got.json()["error"]["type"], json!("rate_limit_error"));
    let message = got.json()["error"]["message"].as_str().unwrap_or("").to_owned();
    assert!(message.contains("budget is spent"), "{message}");

    let got = send(openai(&proxy, json!({"model": "gpt", "stream": true}))).await;
    assert_eq!(got.status, 429);
    assert_eq!(got.json()["error"]["code"], json!("insufficient_quota"));

    assert_eq!(up.requests().len(), 2, "refused calls never reach the upstream");
    assert_eq!(proxy.usage(), TokenUsage { input_tokens: 100, output_tokens: 24, calls: 2, refused: 2 });
    proxy.shutdown().await;
}

/// A proxy started again for a task taken over after an agent restart counts from what the
/// earlier one counted, on the address the sandbox knows: the budget holds across the restart.
#[tokio::test]
async fn a_proxy_started_again_counts_on_from_what_was_used() {
    let up = Upstream::start().await;
    let first = start_proxy(&up, Some(100)).await;
    let body = json!({"model": "claude"});
    assert_eq!(send(anthropic(&first, "/v1/messages", body.clone())).await.status, 200);
    let listen = first.local_addr();
    let used = first.shutdown().await;

    let config =
        ProxyConfig::new(up.url(), REAL_KEY, TASK_TOKEN).with_budget(100).with_listen(listen).with_used(used);
    let again = MeteringProxy::start(config).await.expect("proxy starts again");
    assert_eq!(again.local_addr(), listen);
    assert!(!again.budget_spent());
    assert_eq!(send(anthropic(&again, "/v1/messages", body.clone())).await.status, 200);
    assert!(again.budget_spent(), "62 + 62 tokens reach the budget of 100");
    assert_eq!(send(anthropic(&again, "/v1/messages", body)).await.status, 429);
    assert_eq!(again.usage(), TokenUsage { input_tokens: 100, output_tokens: 24, calls: 2, refused: 1 });
    again.shutdown().await;
}

#[tokio::test]
async fn a_stream_in_flight_when_the_budget_runs_out_completes() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&up, Some(50)).await;
    let req = anthropic(&proxy, "/v1/messages", json!({"model": "gated", "stream": true}));
    let mut stream = tokio::time::timeout(WAIT, req.send()).await.expect("in time").expect("proxy answers");
    let first = tokio::time::timeout(WAIT, stream.chunk()).await.expect("in time").expect("chunk");
    assert!(first.is_some());
    assert!(!proxy.budget_spent(), "30 of 50 so far");

    // Another call spends the budget while the stream is still open.
    assert_eq!(send(anthropic(&proxy, "/v1/messages", json!({}))).await.status, 200);
    assert!(proxy.budget_spent());

    up.state.gate.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = tokio::time::timeout(WAIT, stream.chunk()).await.expect("in time").expect("chunk")
    {
        rest.extend_from_slice(&chunk);
    }
    assert!(String::from_utf8_lossy(&rest).contains("message_stop"), "the open stream ran to its end");
    assert_eq!(proxy.usage(), TokenUsage { input_tokens: 80, output_tokens: 27, calls: 2, refused: 0 });
    assert_eq!(send(anthropic(&proxy, "/v1/messages", json!({}))).await.status, 429);
    proxy.shutdown().await;
}

#[tokio::test]
async fn non_2xx_is_forwarded_unchanged_and_counted() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&up, None).await;
    let got = send(anthropic(&proxy, "/v1/overloaded", json!({}))).await;
    assert_eq!(got.status, 529);
    assert_eq!(got.json()["error"]["type"], json!("overloaded_error"));
    assert_eq!(proxy.usage(), TokenUsage { input_tokens: 0, output_tokens: 0, calls: 1, refused: 0 });
    proxy.shutdown().await;
}

#[tokio::test]
async fn real_key_echoed_by_upstream_never_reaches_the_client() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&up, None).await;
    // `send` asserts the key is absent from headers and body.
    let got = send(anthropic(&proxy, "/v1/leaky", json!({}))).await;
    assert_eq!(got.status, 401);
    assert!(got.headers.get("x-debug-key").is_none());
    assert!(got.body.contains("bad key ****"), "masked in place: {}", got.body);
    assert_eq!(
        got.body.len(),
        format!(
            r#"{{"type":"error","error":{{"type":"authentication_error","message":"bad key {REAL_KEY}"}}}}"#
        )
        .len()
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn unreachable_upstream_gets_502() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = closed.local_addr().expect("addr");
    drop(closed);
    let config = ProxyConfig::new(format!("http://{addr}/"), REAL_KEY, TASK_TOKEN);
    let proxy = MeteringProxy::start(config).await.expect("proxy starts");
    let got = send(anthropic(&proxy, "/v1/messages", json!({}))).await;
    assert_eq!(got.status, 502);
    assert_eq!(got.json()["error"]["type"], json!("api_error"));
    assert_eq!(proxy.usage().calls, 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn bad_configs_are_refused() {
    let bad = [
        ProxyConfig::new("ftp://x", REAL_KEY, TASK_TOKEN),
        ProxyConfig::new("not a url", REAL_KEY, TASK_TOKEN),
        ProxyConfig::new("http://h/?q=1", REAL_KEY, TASK_TOKEN),
        ProxyConfig::new("http://u:p@h", REAL_KEY, TASK_TOKEN),
        ProxyConfig::new("http://h", REAL_KEY, ""),
        ProxyConfig::new("http://h", "", TASK_TOKEN),
        ProxyConfig::new("http://h", REAL_KEY, REAL_KEY),
        ProxyConfig::new("http://h", "bad\nkey", TASK_TOKEN),
    ];
    for config in bad {
        let err = MeteringProxy::start(config).await.expect_err("refused");
        assert!(!err.to_string().contains(REAL_KEY));
    }
    let debug = format!("{:?}", ProxyConfig::new("http://h", REAL_KEY, TASK_TOKEN));
    assert!(!debug.contains(REAL_KEY) && !debug.contains(TASK_TOKEN), "{debug}");
}

#[tokio::test]
async fn shutdown_stops_listening() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&up, None).await;
    let addr = proxy.local_addr();
    proxy.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn dropping_the_proxy_cuts_off_open_streams() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&up, None).await;
    let req = anthropic(&proxy, "/v1/messages", json!({"model": "gated", "stream": true}));
    let mut resp = tokio::time::timeout(WAIT, req.send()).await.expect("in time").expect("proxy answers");
    let first = tokio::time::timeout(WAIT, resp.chunk()).await.expect("in time").expect("first chunk");
    assert!(first.is_some());
    drop(proxy);
    // The upstream is still holding the stream open; the client must not hang on it.
    let rest = tokio::time::timeout(WAIT, resp.chunk()).await.expect("cut off in time");
    assert!(rest.is_err(), "stream ends with an error, got {rest:?}");
    assert!(!up.state.finished.load(Ordering::SeqCst));
}

/// A `MakeWriter` that appends to a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Runs every kind of request once: rejected, streamed, leaky, refused.
async fn every_kind_of_request() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&up, Some(60)).await;
    send(client().post(format!("{}/v1/messages", proxy.base_url())).bearer_auth("wrong")).await;
    send(anthropic(&proxy, "/v1/messages", json!({"stream": true}))).await;
    send(anthropic(&proxy, "/v1/leaky", json!({}))).await;
    send(openai(&proxy, json!({"stream": true}))).await;
    send(anthropic(&proxy, "/v1/messages", json!({}))).await;
    assert!(proxy.budget_spent());
    proxy.shutdown().await;
}

#[tokio::test]
async fn logs_hold_neither_key_nor_task_token() {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    // Current-thread runtime: the proxy's and the fake upstream's tasks run on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);

    // Tests running in parallel register the same callsites; one registered while this
    // subscriber was being installed can keep a stale "never" interest. A first pass registers
    // every callsite, then the cache is rebuilt with this subscriber in it.
    every_kind_of_request().await;
    tracing::callsite::rebuild_interest_cache();
    logs.0.lock().expect("lock").clear();
    every_kind_of_request().await;

    let text = String::from_utf8_lossy(&logs.0.lock().expect("lock")).into_owned();
    assert!(text.contains("llm call metered") && text.contains("budget spent"), "{text}");
    assert!(!text.contains(REAL_KEY), "real key logged");
    assert!(!text.contains(TASK_TOKEN), "task token logged");
}

/// While the task's usage is written down, the bytes that carried tokens reach the task only
/// once the count with them is written: a JSON body's last byte and a stream's event with
/// usage wait for the write. Once nothing writes the usage, nothing waits.
#[tokio::test]
async fn tokens_are_written_down_before_the_task_gets_what_carried_them() {
    let up = Upstream::start().await;
    let proxy = start_proxy(&up, None).await;
    let written = Arc::new(Mutex::new(Vec::<TokenUsage>::new()));
    // Writes of usage up to this many tokens return; larger ones wait.
    let (open_tx, open_rx) = tokio::sync::watch::channel(0u64);
    let seen = written.clone();
    let writer = tokio::spawn(proxy.probe().record(move |used| {
        let seen = seen.clone();
        let mut open = open_rx.clone();
        async move {
            let _ = open.wait_for(|up_to| used.total_tokens() <= *up_to).await;
            seen.lock().expect("lock").push(used);
        }
    }));

    let call = tokio::spawn(send(anthropic(&proxy, "/v1/messages", json!({"model": "claude"}))));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!call.is_finished(), "the body's end waits until its 62 tokens are written");
    open_tx.send_replace(62);
    let got = tokio::time::timeout(WAIT, call).await.expect("in time").expect("joined");
    assert_eq!(got.status, 200);
    let body: Value = serde_json::from_str(&got.body).expect("the whole body arrived");
    assert_eq!(body["usage"]["output_tokens"], 12);
    assert_eq!(written.lock().expect("lock").last().copied(), Some(proxy.usage()));

    let req = anthropic(&proxy, "/v1/messages", json!({"model": "gated", "stream": true}));
    let mut stream = tokio::time::timeout(WAIT, req.send()).await.expect("in time").expect("proxy answers");
    let early = tokio::time::timeout(Duration::from_millis(300), stream.chunk()).await;
    assert!(early.is_err(), "the event with 31 tokens waits for their write");
    open_tx.send_replace(u64::MAX);
    let first = tokio::time::timeout(WAIT, stream.chunk()).await.expect("in time").expect("chunk");
    assert!(String::from_utf8_lossy(&first.unwrap_or_default()).contains("message_start"));
    assert_eq!(written.lock().expect("lock").last().map(|u| u.input_tokens), Some(50 + 30));
    up.state.gate.notify_one();
    while tokio::time::timeout(WAIT, stream.chunk()).await.expect("in time").expect("chunk").is_some() {}

    writer.abort();
    let _ = writer.await;
    open_tx.send_replace(0);
    assert_eq!(send(anthropic(&proxy, "/v1/messages", json!({}))).await.status, 200, "nothing waits");
    proxy.shutdown().await;
}
