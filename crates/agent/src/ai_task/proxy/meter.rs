//! Token counting: the task-wide [`Meter`], the per-response [`CallMeter`] and the SSE line
//! parser that feeds it.
//!
//! Both APIs report cumulative figures (an Anthropic `message_delta` carries the output tokens
//! so far, not an increment), so a call keeps the largest input and output it has seen and adds
//! only the growth to the task's totals. That keeps the totals live while a stream runs, which
//! is what lets the budget stop the next request as soon as it is reached.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde_json::Value;
use tokio::sync::watch;

use super::{ApiFlavor, TokenUsage};

/// Largest SSE line kept while looking for usage; longer lines are passed through uncounted.
const MAX_SSE_LINE: usize = 8 << 20;
/// Largest non-streamed body copied for counting; larger ones are passed through uncounted.
const MAX_JSON_BODY: usize = 16 << 20;

/// Task-wide counters shared by every request of one proxy.
#[derive(Debug)]
pub(super) struct Meter {
    input: AtomicU64,
    output: AtomicU64,
    calls: AtomicU64,
    refused: AtomicU64,
    budget: Option<u64>,
    /// Flips to true once when the budget is reached; `MeteringProxy::wait_budget_spent`
    /// subscribes to it.
    spent: watch::Sender<bool>,
    /// Counts every change of the figures (see [`Meter::generation`]).
    generation: watch::Sender<u64>,
    /// Up to which generation the figures are written down; `None` while nothing writes them
    /// (no response then waits for it).
    written: watch::Sender<Option<u64>>,
}

impl Meter {
    /// A meter that has counted `used` already (a task resumed after an agent restart).
    pub(super) fn starting_from(budget: Option<u64>, used: TokenUsage) -> Self {
        let spent = watch::Sender::new(budget.is_some_and(|b| used.total_tokens() >= b));
        Meter {
            input: AtomicU64::new(used.input_tokens),
            output: AtomicU64::new(used.output_tokens),
            calls: AtomicU64::new(used.calls),
            refused: AtomicU64::new(used.refused),
            budget,
            spent,
            generation: watch::Sender::new(0),
            written: watch::Sender::new(None),
        }
    }

    /// How many times the token figures changed. Read before [`usage`](Self::usage), a
    /// generation is covered by the usage read after it.
    pub(super) fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Resolves once the figures of `generation` are written down, or at once when nothing
    /// writes them.
    pub(super) async fn wait_written(&self, generation: u64) {
        let mut rx = self.written.subscribe();
        // The sender lives in `self`, so the channel cannot close while `self` is borrowed.
        let _ = rx.wait_for(|w| w.is_none_or(|w| w >= generation)).await;
    }

    /// Whether something writes the figures down (responses then wait for it).
    pub(super) fn is_written(&self) -> bool {
        self.written.borrow().is_some()
    }

    /// Notes that the figures up to `generation` are written down (`None`: the writer left).
    pub(super) fn set_written(&self, generation: Option<u64>) {
        self.written.send_replace(generation);
    }

    /// Waits until the figures change past `generation`.
    pub(super) async fn changed_after(&self, generation: u64) {
        let mut rx = self.generation.subscribe();
        let _ = rx.wait_for(|g| *g > generation).await;
    }

    pub(super) fn usage(&self) -> TokenUsage {
        TokenUsage {
            input_tokens: self.input.load(Ordering::Relaxed),
            output_tokens: self.output.load(Ordering::Relaxed),
            calls: self.calls.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    fn total(&self) -> u64 {
        self.input.load(Ordering::Relaxed).saturating_add(self.output.load(Ordering::Relaxed))
    }

    pub(super) fn budget(&self) -> Option<u64> {
        self.budget
    }

    pub(super) fn is_spent(&self) -> bool {
        self.budget.is_some_and(|b| self.total() >= b)
    }

    pub(super) fn subscribe_spent(&self) -> watch::Receiver<bool> {
        self.spent.subscribe()
    }

    pub(super) fn count_call(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn count_refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    fn add(&self, input: u64, output: u64) {
        if input == 0 && output == 0 {
            return;
        }
        self.input.fetch_add(input, Ordering::Relaxed);
        self.output.fetch_add(output, Ordering::Relaxed);
        // After the figures: a writer that sees this generation reads them too (the watch's
        // lock orders the two).
        self.generation.send_modify(|g| *g += 1);
        if let Some(budget) = self.budget {
            let total = self.total();
            if total >= budget && self.spent.send_if_modified(|s| !std::mem::replace(s, true)) {
                tracing::info!(budget, total_tokens = total, "task token budget spent");
            }
        }
    }
}

/// Token figures found in one JSON object; `None` where the object says nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Observed {
    pub(super) input: Option<u64>,
    pub(super) output: Option<u64>,
}

/// Finds the usage an API response object (or one streamed event) reports.
///
/// - Anthropic Messages: `usage` (JSON body, `message_delta`) or `message.usage`
///   (`message_start`); `input_tokens` plus `cache_creation_input_tokens` and
///   `cache_read_input_tokens` are input, `output_tokens` is output.
/// - OpenAI Chat Completions: `usage.prompt_tokens` (already includes cached tokens) and
///   `usage.completion_tokens`; streamed chunks carry `"usage": null` until the last.
/// - OpenAI Responses (`response.completed` events): `response.usage`.
pub(super) fn observe_usage(v: &Value) -> Option<Observed> {
    let usage = [v.get("usage"), v.pointer("/message/usage"), v.pointer("/response/usage")]
        .into_iter()
        .flatten()
        .find(|u| u.is_object())?;
    let field = |name: &str| usage.get(name).and_then(Value::as_u64);
    let input_fields =
        ["input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "prompt_tokens"]
            .map(field);
    let input = input_fields.iter().flatten().copied().reduce(u64::saturating_add);
    let output = field("output_tokens").or_else(|| field("completion_tokens"));
    (input.is_some() || output.is_some()).then_some(Observed { input, output })
}

/// Splits a server-sent event stream into events' `data` payloads, across arbitrary chunk
/// boundaries (a chunk may end in the middle of a line, or between `\r` and `\n`).
#[derive(Debug, Default)]
pub(super) struct SseParser {
    /// The current line's bytes so far (without its terminator).
    line: Vec<u8>,
    /// True while skipping the rest of a line longer than [`MAX_SSE_LINE`].
    skipping: bool,
    /// The current event's `data` lines, joined with `\n` as the SSE spec says.
    data: String,
    has_data: bool,
}

impl SseParser {
    /// Feeds one chunk; pushes the `data` of every event it completes onto `events`.
    pub(super) fn push(&mut self, mut chunk: &[u8], events: &mut Vec<String>) {
        while !chunk.is_empty() {
            match chunk.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    self.extend_line(&chunk[..end]);
                    self.end_line(events);
                    chunk = &chunk[end + 1..];
                }
                None => {
                    self.extend_line(chunk);
                    chunk = &[];
                }
            }
        }
    }

    /// Ends the stream: a last event without its blank line still counts.
    pub(super) fn finish(&mut self, events: &mut Vec<String>) {
        if !self.line.is_empty() {
            self.end_line(events);
        }
        self.dispatch(events);
    }

    fn extend_line(&mut self, bytes: &[u8]) {
        if self.skipping {
            return;
        }
        if self.line.len() + bytes.len() > MAX_SSE_LINE {
            tracing::debug!(limit = MAX_SSE_LINE, "sse line too long to meter; skipped");
            self.line.clear();
            self.skipping = true;
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    fn end_line(&mut self, events: &mut Vec<String>) {
        if std::mem::take(&mut self.skipping) {
            return;
        }
        let mut line = std::mem::take(&mut self.line);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.is_empty() {
            self.dispatch(events);
        } else if let Some(value) = line.strip_prefix(b"data") {
            // `data:value`, `data: value` (one space dropped) and a bare `data` are all valid.
            let value = match value {
                [b':', b' ', rest @ ..] | [b':', rest @ ..] => rest,
                [] => &[],
                _ => return, // some other field whose name starts with "data"
            };
            if self.has_data {
                self.data.push('\n');
            }
            self.data.push_str(&String::from_utf8_lossy(value));
            self.has_data = true;
        }
        // Comments (`:`), `event:`, `id:` and `retry:` lines carry no usage.
        line.clear();
        self.line = line; // keep the allocation
    }

    fn dispatch(&mut self, events: &mut Vec<String>) {
        if std::mem::take(&mut self.has_data) {
            events.push(std::mem::take(&mut self.data));
        }
    }
}

/// How a response body is read for usage.
#[derive(Debug)]
enum BodyReader {
    /// `text/event-stream`: usage is read event by event as it streams.
    Sse(SseParser),
    /// A JSON body: copied (up to [`MAX_JSON_BODY`]) and parsed at its end.
    Json { buf: Vec<u8>, overflow: bool },
    /// Anything else carries no usage we know of.
    Other,
}

/// Counts the tokens of one upstream response while its body streams to the client, and logs
/// the call when the body ends (or the client goes away).
#[derive(Debug)]
pub(super) struct CallMeter {
    meter: Arc<Meter>,
    reader: BodyReader,
    flavor: ApiFlavor,
    status: u16,
    started: Instant,
    /// The largest figures this call reported so far; already added to `meter`.
    input: u64,
    output: u64,
    saw_usage: bool,
    finished: bool,
}

impl CallMeter {
    /// Starts metering a response with this status and `content-type`; counts it as a call.
    pub(super) fn new(
        meter: Arc<Meter>,
        flavor: ApiFlavor,
        status: u16,
        content_type: &str,
        started: Instant,
    ) -> Self {
        meter.count_call();
        let content_type = content_type.to_ascii_lowercase();
        let reader = if content_type.starts_with("text/event-stream") {
            BodyReader::Sse(SseParser::default())
        } else if content_type.contains("json") {
            BodyReader::Json { buf: Vec::new(), overflow: false }
        } else {
            BodyReader::Other
        };
        CallMeter {
            meter,
            reader,
            flavor,
            status,
            started,
            input: 0,
            output: 0,
            saw_usage: false,
            finished: false,
        }
    }

    /// The task-wide meter this call adds to.
    pub(super) fn meter(&self) -> &Arc<Meter> {
        &self.meter
    }

    /// Whether this call's usage is read only at the body's end (a JSON body), so the body's
    /// last byte must wait for it.
    pub(super) fn counts_at_end(&self) -> bool {
        matches!(self.reader, BodyReader::Json { overflow: false, .. })
    }

    /// Reads one chunk of the response body.
    pub(super) fn feed(&mut self, chunk: &[u8]) {
        match &mut self.reader {
            BodyReader::Sse(parser) => {
                let mut events = Vec::new();
                parser.push(chunk, &mut events);
                self.observe_events(&events);
            }
            BodyReader::Json { buf, overflow } => {
                if *overflow {
                } else if buf.len() + chunk.len() > MAX_JSON_BODY {
                    *overflow = true;
                    *buf = Vec::new();
                    tracing::warn!(limit = MAX_JSON_BODY, "response body too large to meter");
                } else {
                    buf.extend_from_slice(chunk);
                }
            }
            BodyReader::Other => {}
        }
    }

    /// The body ended (completely or not): reads what is left and logs the call. Idempotent.
    pub(super) fn finish(&mut self, complete: bool) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        match std::mem::replace(&mut self.reader, BodyReader::Other) {
            BodyReader::Sse(mut parser) => {
                let mut events = Vec::new();
                parser.finish(&mut events);
                self.observe_events(&events);
            }
            BodyReader::Json { buf, overflow: false } if !buf.is_empty() => {
                match serde_json::from_slice::<Value>(&buf) {
                    Ok(v) => self.observe(&v),
                    Err(e) => tracing::debug!(error = %e, "response body is not json; no usage counted"),
                }
            }
            _ => {}
        }
        let duration_ms = self.started.elapsed().as_millis() as u64;
        let (status, flavor, input, output) = (self.status, self.flavor, self.input, self.output);
        if !complete {
            tracing::info!(status, ?flavor, input, output, duration_ms, "llm call cut short");
        } else if !self.saw_usage && (200..300).contains(&status) {
            tracing::warn!(status, ?flavor, duration_ms, "llm call reported no token usage");
        } else {
            tracing::info!(status, ?flavor, input, output, duration_ms, "llm call metered");
        }
    }

    fn observe_events(&mut self, events: &[String]) {
        for data in events {
            let data = data.trim();
            if data.is_empty() || data == "[DONE]" {
                continue;
            }
            match serde_json::from_str::<Value>(data) {
                Ok(v) => self.observe(&v),
                Err(e) => tracing::debug!(error = %e, "sse event data is not json"),
            }
        }
    }

    fn observe(&mut self, v: &Value) {
        let Some(seen) = observe_usage(v) else { return };
        self.saw_usage = true;
        let input = seen.input.unwrap_or(0).max(self.input);
        let output = seen.output.unwrap_or(0).max(self.output);
        self.meter.add(input - self.input, output - self.output);
        self.input = input;
        self.output = output;
    }
}

impl Drop for CallMeter {
    fn drop(&mut self) {
        // The client went away or the upstream failed mid-body: keep what was seen.
        self.finish(false);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn events_of(chunks: &[&[u8]]) -> Vec<String> {
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        for c in chunks {
            parser.push(c, &mut events);
        }
        parser.finish(&mut events);
        events
    }

    #[test]
    fn sse_parser_joins_lines_split_across_chunks() {
        let whole = b"event: message_start\ndata: {\"a\":1}\n\n: ping\r\ndata:{\"b\":\r\ndata: 2}\r\n\r\ndata: [DONE]";
        let expected = vec!["{\"a\":1}".to_owned(), "{\"b\":\n2}".to_owned(), "[DONE]".to_owned()];
        assert_eq!(events_of(&[whole]), expected);
        // Every possible single split point, and byte-by-byte.
        for at in 0..whole.len() {
            assert_eq!(events_of(&[&whole[..at], &whole[at..]]), expected, "split at {at}");
        }
        let bytes: Vec<&[u8]> = whole.chunks(1).collect();
        assert_eq!(events_of(&bytes), expected);
    }

    #[test]
    fn sse_parser_ignores_other_fields() {
        assert_eq!(events_of(&[b"datum: x\nid: 1\nretry: 5\nevent: e\n\ndata\n\n"]), vec![String::new()]);
    }

    #[test]
    fn usage_shapes() {
        let anthropic = json!({"usage": {"input_tokens": 10, "cache_creation_input_tokens": 5,
            "cache_read_input_tokens": 100, "output_tokens": 7}});
        assert_eq!(observe_usage(&anthropic), Some(Observed { input: Some(115), output: Some(7) }));
        let start =
            json!({"type": "message_start", "message": {"usage": {"input_tokens": 3, "output_tokens": 1}}});
        assert_eq!(observe_usage(&start), Some(Observed { input: Some(3), output: Some(1) }));
        let delta = json!({"type": "message_delta", "usage": {"output_tokens": 42}});
        assert_eq!(observe_usage(&delta), Some(Observed { input: None, output: Some(42) }));
        let openai = json!({"usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13,
            "prompt_tokens_details": {"cached_tokens": 8}}});
        assert_eq!(observe_usage(&openai), Some(Observed { input: Some(9), output: Some(4) }));
        assert_eq!(observe_usage(&json!({"choices": [], "usage": null})), None);
        let responses = json!({"type": "response.completed", "response": {"usage": {"input_tokens": 2, "output_tokens": 3}}});
        assert_eq!(observe_usage(&responses), Some(Observed { input: Some(2), output: Some(3) }));
    }

    #[test]
    fn cumulative_figures_add_only_their_growth() {
        let meter = Arc::new(Meter::starting_from(Some(100), TokenUsage::default()));
        let mut call =
            CallMeter::new(meter.clone(), ApiFlavor::Anthropic, 200, "text/event-stream", Instant::now());
        call.feed(b"data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":20,\"output_tokens\":1}}}\n\n");
        call.feed(b"data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":30}}\n\n");
        call.feed(b"data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":50}}\n\n");
        let usage = meter.usage();
        assert_eq!((usage.input_tokens, usage.output_tokens, usage.calls), (20, 50, 1));
        assert!(!meter.is_spent());
        call.feed(
            b"data: {\"type\":\"message_delta\",\"usage\":{\"input_tokens\":20,\"output_tokens\":80}}\n\n",
        );
        call.finish(true);
        assert_eq!(meter.usage().total_tokens(), 100);
        assert!(meter.is_spent());
        assert!(*meter.subscribe_spent().borrow());
    }
}
