//! Runs one attempt: prepares the sandbox, runs the steps in order under the timeout, ships
//! output in batches, and reports how it ended. Every report goes through the outbox.

use std::sync::Arc;
use std::time::Duration;

use drover_proto as pb;
use drover_proto::agent_message::Msg;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::Instrument;

use crate::ai_task::{self, AiTask};
use crate::files::{self, ServerLink};
use crate::journal::{Entry, Journal};
use crate::log_cap::{LogCap, Piece};
use crate::outbox::Outbox;
use crate::proxy::TokenUsage;
use crate::runtime::{
    ExitStatus, OutputChunk, RunHandle, Runtime, RuntimeError, Stream, TaskSpec, Usage, stop_gracefully,
};

/// Lines per output batch; a batch also closes after [`BATCH_BYTES`] or [`BATCH_DELAY`].
const BATCH_LINES: usize = 1000;
const BATCH_BYTES: usize = 256 * 1024;
/// How long a line may wait for companions before it is shipped: the bound on how stale a
/// `logs -f` reader can be.
const BATCH_DELAY: Duration = Duration::from_millis(20);

/// Why the agent stops an attempt early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Keep running.
    None,
    /// The user cancelled the job, or the server no longer wants the attempt.
    Cancel,
    /// The agent is shutting down.
    Shutdown,
}

/// How an attempt ended, as reported to the server.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Exit code of the last step run.
    pub exit_code: Option<i32>,
    /// Signal that killed the last step.
    pub signal: Option<i32>,
    /// Failure class word, empty on a plain exit.
    pub failure: &'static str,
    /// Detail for people.
    pub message: String,
    /// Usage summed over the steps.
    pub usage: Usage,
    /// LLM tokens of an agent task, as its metering proxy counted them.
    pub tokens: TokenUsage,
}

/// A step that an earlier agent run started and this one re-attached to.
#[derive(Debug, Clone)]
pub struct Resume {
    /// The step in flight.
    pub step: usize,
    /// Its handle, attached.
    pub handle: RunHandle,
}

/// Runs an attempt to its end (or, with `resume`, from a re-attached step on) and reports
/// everything through the runner's outbox.
pub async fn run(
    runner: Runner,
    spec: TaskSpec,
    timeout: Option<Duration>,
    stop: watch::Receiver<StopReason>,
    resume: Option<Resume>,
) -> Outcome {
    let Runner { runtime, outbox, journal, grace, io, max_log, ai } = runner;
    let span = tracing::info_span!(
        "attempt",
        job_id = spec.job_id,
        task_id = spec.task_id,
        attempt_id = spec.attempt_id
    );
    async move {
        let mut spec = spec;
        let attempt_id = spec.attempt_id;
        if resume.is_none() {
            started(&outbox, attempt_id).await;
        }
        let (tx, rx) = mpsc::channel(1024);
        let llm_key = ai.as_ref().map(|a| a.llm_key.as_str());
        let secrets: Vec<Vec<u8>> = spec
            .secrets
            .values()
            .map(String::as_str)
            .chain(llm_key)
            .filter(|v| !v.is_empty())
            .map(|v| v.as_bytes().to_vec())
            .collect();
        let shipper = tokio::spawn(ship_output(outbox.clone(), attempt_id, rx, secrets, max_log));
        let inputs = match (&resume, &io) {
            (None, Some(io)) if !io.inputs.is_empty() => {
                files::fetch_inputs(&io.link, &spec.workspace, &io.inputs).await
            }
            _ => Ok(()),
        };
        let mut agent_task = None;
        let inputs = match (inputs, &ai, &resume) {
            (Ok(()), Some(ai), None) => match ai_task::prepare(ai, &mut spec).await {
                Ok(prepared) => {
                    agent_task = Some(prepared);
                    Ok(())
                }
                Err(e) => Err(format!("agent task not set up: {e}")),
            },
            (inputs, ..) => inputs,
        };
        let mut outcome = match inputs {
            Ok(()) => {
                let steps = Steps { runtime: &*runtime, journal: &journal, spec: &spec, timeout, grace };
                run_steps(steps, stop, tx, resume).await
            }
            Err(why) => {
                drop(tx);
                tracing::warn!(error = %why, "inputs could not be placed");
                Outcome {
                    exit_code: None,
                    signal: None,
                    failure: "start",
                    message: why,
                    usage: Usage::default(),
                    tokens: TokenUsage::default(),
                }
            }
        };
        if let Err(e) = runtime.cleanup(&spec).await {
            tracing::warn!(error = %e, "cleanup failed");
        }
        if let Some(prepared) = agent_task {
            wrap_up_agent(prepared, &mut outcome).await;
        }
        if let Some(io) = &io {
            keep_outputs(&outbox, io, &spec, &mut outcome).await;
        }
        journal.forget(attempt_id).await;
        // All output must be queued before the end is reported: the server stores output only
        // for attempts that are still open.
        let _ = shipper.await;
        tracing::info!(exit_code = ?outcome.exit_code, failure = outcome.failure, "attempt ended");
        finished(&outbox, attempt_id, &outcome).await;
        outcome
    }
    .instrument(span)
    .await
}

/// Ends an agent task: tokens into the report, `budget` as the failure when the proxy had to
/// refuse calls (unless the user cancelled), and the wrap-up's notes into the message.
async fn wrap_up_agent(prepared: ai_task::Prepared, outcome: &mut Outcome) {
    let succeeded = outcome.failure.is_empty() && outcome.exit_code == Some(0);
    let wrapup = prepared.finish(succeeded).await;
    outcome.tokens = wrapup.tokens;
    let mut notes = wrapup.notes;
    if wrapup.budget_spent && outcome.failure != "cancelled" {
        tracing::info!(
            input_tokens = wrapup.tokens.input_tokens,
            output_tokens = wrapup.tokens.output_tokens,
            refused = wrapup.tokens.refused,
            "token budget spent"
        );
        outcome.failure = "budget";
        notes.insert(
            0,
            format!(
                "token budget spent after {} tokens; {} llm calls refused",
                wrapup.tokens.total_tokens(),
                wrapup.tokens.refused
            ),
        );
    }
    for note in notes {
        outcome.message =
            if outcome.message.is_empty() { note } else { format!("{}; {note}", outcome.message) };
    }
}

/// Files an attempt moves: inputs placed before it starts, outputs kept after it ends.
#[derive(Debug, Clone)]
pub struct TaskIo {
    /// Inputs to place.
    pub inputs: Vec<drover_core::InputSpec>,
    /// Output globs.
    pub outputs: Vec<String>,
    /// Whether outputs are kept when the attempt failed.
    pub outputs_on_failure: bool,
    /// How to reach the server for transfers.
    pub link: ServerLink,
    /// Most bytes of outputs kept.
    pub max_outputs: u64,
}

/// Uploads the attempt's outputs and reports them (before its end is reported, so the server
/// still accepts them). Refused paths and upload failures are added to the attempt's message.
async fn keep_outputs(outbox: &Outbox, io: &TaskIo, spec: &TaskSpec, outcome: &mut Outcome) {
    let succeeded = outcome.failure.is_empty() && outcome.exit_code == Some(0);
    if io.outputs.is_empty() || (!succeeded && !io.outputs_on_failure) {
        return;
    }
    let (found, refused) = files::collect_outputs(&spec.workspace, &io.outputs);
    let mut notes = refused.iter().map(|r| format!("output refused: {r}")).collect::<Vec<_>>();
    let (found, over) = files::within_limit(&spec.workspace, found, io.max_outputs);
    notes.extend(over);
    match files::upload_outputs(&io.link, &spec.workspace, &found).await {
        Ok(kept) if !kept.is_empty() => {
            tracing::info!(files = kept.len(), "outputs kept");
            let msg = Msg::Update(pb::AttemptUpdate {
                attempt_id: spec.attempt_id,
                epoch: 0,
                seq: 0,
                kind: Some(pb::attempt_update::Kind::Outputs(pb::Outputs { files: kept })),
            });
            outbox.push(spec.attempt_id, msg, 256).await;
        }
        Ok(_) => {}
        Err(e) => notes.push(format!("outputs not kept: {e}")),
    }
    if !notes.is_empty() {
        tracing::warn!(notes = ?notes, "outputs");
        let joined = notes.join("; ");
        outcome.message =
            if outcome.message.is_empty() { joined } else { format!("{}; {joined}", outcome.message) };
    }
}

/// What an attempt needs from the agent.
pub struct Runner {
    /// The sandbox technology.
    pub runtime: Arc<dyn Runtime>,
    /// Where reports go.
    pub outbox: Arc<Outbox>,
    /// Where running steps are recorded for crash recovery.
    pub journal: Journal,
    /// Time between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// Inputs and outputs, when the task has any.
    pub io: Option<TaskIo>,
    /// Most bytes of output shipped; the middle is cut beyond it (see [`crate::log_cap`]).
    pub max_log: u64,
    /// The agent block of an AI-agent task, with its key.
    pub ai: Option<AiTask>,
}

/// What running the steps of an attempt needs.
#[derive(Clone, Copy)]
struct Steps<'a> {
    runtime: &'a dyn Runtime,
    journal: &'a Journal,
    spec: &'a TaskSpec,
    timeout: Option<Duration>,
    grace: Duration,
}

async fn run_steps(
    steps: Steps<'_>,
    mut stop: watch::Receiver<StopReason>,
    out: mpsc::Sender<OutputChunk>,
    resume: Option<Resume>,
) -> Outcome {
    let Steps { runtime, journal, spec, timeout, grace } = steps;
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut outcome = Outcome {
        exit_code: None,
        signal: None,
        failure: "",
        message: String::new(),
        usage: Usage::default(),
        tokens: TokenUsage::default(),
    };
    let first = resume.as_ref().map(|r| r.step).unwrap_or(0);
    let mut resumed = resume.map(|r| r.handle);
    if resumed.is_none()
        && let Err(e) = runtime.prepare(spec).await
    {
        return start_failure(outcome, e);
    }
    for step in first..spec.steps.len() {
        if *stop.borrow() != StopReason::None {
            outcome.failure = "cancelled";
            outcome.message = "cancelled before it started".into();
            return outcome;
        }
        let handle = match resumed.take() {
            Some(h) => h,
            None => match runtime.start(spec, step, out.clone()).await {
                Ok(h) => h,
                Err(e) => return start_failure(outcome, e),
            },
        };
        tracing::debug!(step, pid = ?handle.pid, "step started");
        let entry = Entry {
            runtime: runtime.kind().to_string(),
            spec: spec.clone(),
            handle: Some(handle.clone()),
            timeout_ms: timeout.map(|t| t.as_millis() as u64),
        };
        journal.record(&entry).await;
        let sleep_until_deadline = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let stopped = async {
            loop {
                if *stop.borrow_and_update() != StopReason::None {
                    return;
                }
                if stop.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        };
        let (status, failure, message) = tokio::select! {
            status = runtime.wait(&handle) => (status, "", String::new()),
            _ = sleep_until_deadline => {
                tracing::info!(step, "timeout reached; stopping");
                let t = timeout.map(|t| humantime::format_duration(t).to_string()).unwrap_or_default();
                (stop_gracefully(runtime, &handle, grace).await, "timeout", format!("ran past its timeout of {t}"))
            }
            _ = stopped => {
                tracing::info!(step, "stopping on request");
                (stop_gracefully(runtime, &handle, grace).await, "cancelled", "cancelled".to_string())
            }
        };
        if let Ok(usage) = runtime.stats(&handle).await {
            outcome.usage = outcome.usage.merge(usage);
        }
        let status: ExitStatus = match status {
            Ok(s) => s,
            Err(e) => {
                outcome.failure = "lost";
                outcome.message = format!("lost track of step {step}: {e}");
                return outcome;
            }
        };
        outcome.exit_code = status.code;
        outcome.signal = status.signal;
        if !failure.is_empty() {
            outcome.failure = failure;
            outcome.message = message;
            return outcome;
        }
        if status.oom {
            outcome.failure = "oom";
            outcome.message = format!("step {} ran out of memory", step + 1);
            return outcome;
        }
        if !status.success() {
            if spec.steps.len() > 1 {
                outcome.message = format!("step {} of {} failed", step + 1, spec.steps.len());
            }
            return outcome;
        }
    }
    outcome
}

fn start_failure(mut outcome: Outcome, e: RuntimeError) -> Outcome {
    tracing::warn!(error = %e, "attempt could not start");
    outcome.failure = "start";
    outcome.message = e.to_string();
    outcome
}

/// Reports an attempt this node cannot run at all (its runtime is missing here).
pub async fn refuse(outbox: &Outbox, attempt_id: i64, why: &str) {
    tracing::warn!(attempt_id, why, "refusing attempt");
    let outcome = Outcome {
        exit_code: None,
        signal: None,
        failure: "start",
        message: why.to_string(),
        usage: Usage::default(),
        tokens: TokenUsage::default(),
    };
    finished(outbox, attempt_id, &outcome).await;
}

async fn started(outbox: &Outbox, attempt_id: i64) {
    let msg = Msg::Update(pb::AttemptUpdate {
        attempt_id,
        epoch: 0,
        seq: 0,
        kind: Some(pb::attempt_update::Kind::Started(pb::Started {})),
    });
    outbox.push(attempt_id, msg, 64).await;
}

async fn finished(outbox: &Outbox, attempt_id: i64, o: &Outcome) {
    let msg = Msg::Update(pb::AttemptUpdate {
        attempt_id,
        epoch: 0,
        seq: 0,
        kind: Some(pb::attempt_update::Kind::Finished(pb::Finished {
            exit_code: o.exit_code,
            signal: o.signal,
            failure: o.failure.to_string(),
            message: o.message.clone(),
            cpu_seconds: o.usage.cpu_seconds,
            peak_memory_bytes: o.usage.peak_memory_bytes,
            input_tokens: o.tokens.input_tokens,
            output_tokens: o.tokens.output_tokens,
        })),
    });
    outbox.push(attempt_id, msg, 128 + o.message.len()).await;
}

/// Batches output chunks into `AttemptOutput` reports until every sender is gone.
/// Replaces every occurrence of a secret value with `***`, so secrets never reach the server's
/// logs. (A secret split across two chunks of an over-long line is not caught.)
fn mask(data: Vec<u8>, secrets: &[Vec<u8>]) -> Vec<u8> {
    let mut data = data;
    for secret in secrets {
        let mut out = Vec::with_capacity(data.len());
        let mut rest = &data[..];
        let mut found = false;
        while let Some(i) = rest.windows(secret.len()).position(|w| w == &secret[..]) {
            out.extend_from_slice(&rest[..i]);
            out.extend_from_slice(b"***");
            rest = &rest[i + secret.len()..];
            found = true;
        }
        if found {
            out.extend_from_slice(rest);
            data = out;
        }
    }
    data
}

async fn ship_output(
    outbox: Arc<Outbox>,
    attempt_id: i64,
    mut rx: mpsc::Receiver<OutputChunk>,
    secrets: Vec<Vec<u8>>,
    max_log: u64,
) {
    let mut cap = LogCap::new(max_log);
    let mut lines: Vec<pb::OutputLine> = Vec::new();
    let mut bytes = 0usize;
    loop {
        let first = match rx.recv().await {
            Some(c) => c,
            None => break,
        };
        let flush_at = Instant::now() + BATCH_DELAY;
        let mut next = Some(first);
        while let Some(c) = next.take() {
            let data = if secrets.is_empty() { c.data } else { mask(c.data, &secrets) };
            let piece = Piece { step: c.step as u32, stderr: c.stream == Stream::Stderr, data };
            if let Some(p) = cap.admit(piece) {
                bytes += p.data.len();
                lines.push(pb::OutputLine { step: p.step, stderr: p.stderr, data: p.data });
            }
            if lines.len() >= BATCH_LINES || bytes >= BATCH_BYTES {
                break;
            }
            next = match tokio::time::timeout_at(flush_at, rx.recv()).await {
                Ok(Some(c)) => Some(c),
                Ok(None) | Err(_) => None,
            };
        }
        flush(&outbox, attempt_id, &mut lines, &mut bytes).await;
    }
    for p in cap.finish() {
        bytes += p.data.len();
        lines.push(pb::OutputLine { step: p.step, stderr: p.stderr, data: p.data });
        if lines.len() >= BATCH_LINES || bytes >= BATCH_BYTES {
            flush(&outbox, attempt_id, &mut lines, &mut bytes).await;
        }
    }
    flush(&outbox, attempt_id, &mut lines, &mut bytes).await;
}

async fn flush(outbox: &Outbox, attempt_id: i64, lines: &mut Vec<pb::OutputLine>, bytes: &mut usize) {
    if lines.is_empty() {
        return;
    }
    let msg = Msg::Output(pb::AttemptOutput { attempt_id, epoch: 0, seq: 0, lines: std::mem::take(lines) });
    outbox.push(attempt_id, msg, *bytes + 64).await;
    *bytes = 0;
}

#[cfg(test)]
mod tests {
    use super::mask;

    #[test]
    fn secrets_are_masked() {
        let secrets = vec![b"hunter2".to_vec(), b"s3cr3t".to_vec()];
        assert_eq!(
            mask(b"pw=hunter2 and hunter2, s3cr3t\n".to_vec(), &secrets),
            b"pw=*** and ***, ***\n".to_vec()
        );
        assert_eq!(mask(b"nothing here\n".to_vec(), &secrets), b"nothing here\n".to_vec());
    }
}
