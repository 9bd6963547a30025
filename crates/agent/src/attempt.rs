//! Runs one attempt: prepares the sandbox, runs the steps in order under the timeout, ships
//! output in batches, and reports how it ended. Every report goes through the outbox.

use std::sync::Arc;
use std::time::Duration;

use drover_core::FailureClass;
use drover_proto as pb;
use drover_proto::report::Kind;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::Instrument;

use crate::ai_task::proxy::TokenUsage;
use crate::ai_task::{self, AiTask};
use crate::files::{self, ServerLink};
use crate::journal::{AttemptLimits, Entry, Journal, KeptOutputs};
use crate::log_cap::{LogCap, Piece};
use crate::mask::{LineMasker, Masker};
use crate::outbox::Outbox;
use crate::reach::{OutputReach, StreamReach};
use crate::runtime::{
    ExitStatus, OutputChunk, OutputSink, RunHandle, Runtime, RuntimeError, Stream, TaskSpec, Usage,
    stop_gracefully,
};
use crate::setup::{self, SetupEnd, TaskClock};

/// Bytes of output per batch (one report, which the server stores in one transaction); a
/// batch also closes after [`BATCH_DELAY`], or at the protocol's most chunks per report.
const BATCH_BYTES: usize = 1 << 20;
/// How long a line may wait for companions before it is shipped: the bound on how stale a
/// `logs -f` reader can be.
const BATCH_DELAY: Duration = Duration::from_millis(20);
/// Chunks of one step's output in flight to the shipper (see [`step_sink`]).
const STEP_QUEUE: usize = 64;

/// Why a resumed attempt that could not ask for its secrets again cannot go on to its next
/// step: the journal keeps the names of the task's secrets but never their values.
pub const SECRETS_GONE: &str = "the agent restarted and no longer holds the task's secrets";

/// Why the agent stops an attempt early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Keep running.
    None,
    /// The user cancelled the job, or the server no longer wants the attempt.
    Cancel,
    /// The agent is shutting down.
    Shutdown,
    /// The node's lease ran out without the server renewing it: the server hands the attempt
    /// to another node, so this copy must stop at once.
    LeaseLost,
}

/// What an attempt stopped for a lost lease reports; the server fenced it off already, but
/// the node's own log and the attempt's record say why it ended.
const LEASE_LOST: &str =
    "stopped: the node's lease ran out without a word from the server, which hands the task on";

/// How an attempt ended, as reported to the server.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Exit code of the last step run.
    pub exit_code: Option<i32>,
    /// Signal that killed the last step.
    pub signal: Option<i32>,
    /// Why the attempt failed; `None` when its steps ran to their end (their exit code then
    /// decides).
    pub failure: Option<FailureClass>,
    /// Detail for people.
    pub message: String,
    /// Usage summed over the steps.
    pub usage: Usage,
    /// LLM tokens of an agent task, as its metering proxy counted them.
    pub tokens: TokenUsage,
}

/// A step that an earlier agent run started and this one re-attached to.
#[derive(Debug)]
pub struct Resume {
    /// The step in flight.
    pub step: usize,
    /// Its handle, attached.
    pub handle: RunHandle,
    /// Its output from where the earlier run got to; `None` when the runtime does not ship
    /// a re-attached step's output.
    pub output: Option<mpsc::Receiver<OutputChunk>>,
    /// How far its output in the outbox reaches, for a runtime whose output says where it
    /// ends: the output that comes begins at its clean offsets, and what the masker gives up
    /// to the bytes past them was shipped already.
    pub reach: Option<OutputReach>,
    /// When the outbox's output of the attempt reaches only into an earlier step, that reach:
    /// the earlier steps' output past it is sent again from their files before the step in
    /// flight's (see [`replay_earlier_steps`]).
    pub earlier: Option<OutputReach>,
    /// Where its secrets' values come from again; without it a resumed attempt with secrets
    /// starts no further step (see [`SECRETS_GONE`]).
    pub keys: Option<KeySource>,
}

/// Where a resumed attempt's LLM key and secrets are asked for again.
#[derive(Clone)]
pub struct KeySource {
    /// The way to the servers.
    pub link: Arc<crate::link::Link>,
    /// This node's name, which the server checks the attempt against.
    pub node: String,
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySource").field("node", &self.node).finish_non_exhaustive()
    }
}

/// Runs an attempt to its end (or, with `resume`, from a re-attached step on) and reports
/// everything through the runner's outbox.
pub async fn run(
    runner: Runner,
    spec: TaskSpec,
    timeout: Option<Duration>,
    mut stop: watch::Receiver<StopReason>,
    resume: Option<Resume>,
) -> Outcome {
    // The task's timeout counts from here: setup (inputs, image, checkout) is inside it.
    let clock = TaskClock::starting_now(timeout).with_phase_limit(spec.setup_timeout);
    let Runner { runtime, outbox, journal, grace, io, max_log, ai, ai_resume, image, sandbox_gone } = runner;
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
        // A resumed attempt's secrets are masked in its step's output like any other's: their
        // values come again from the server before any of that output is shipped. Without
        // them nothing of it may go out unmasked, so the attempt is lost.
        let mut secrets_lost = None;
        if let Some(keys) = resume.as_ref().and_then(|r| r.keys.as_ref()) {
            let doing = "getting its secrets again";
            match setup::bounded(doing, clock, &mut stop, secrets_again(keys, &mut spec)).await {
                Ok(Ok(())) => {}
                Ok(Err(why)) => secrets_lost = Some(why),
                Err(ended) => secrets_lost = Some(ended.message),
            }
        }
        let (tx, rx) = mpsc::channel(1024);
        let llm_key = ai.as_ref().map(|a| a.llm_key.as_str());
        let secrets = spec.secrets.values().map(String::as_str).chain(llm_key);
        let (masker, unmaskable) = match Masker::new(secrets) {
            Ok(m) => (Arc::new(m), secrets_lost),
            // Nothing runs, so nothing can leak through the empty masker.
            Err(e) => {
                (Arc::new(Masker::default()), Some(format!("the task's secrets cannot be masked: {e}")))
            }
        };
        let metered = ai.is_some() || ai_resume.is_some();
        // What taking the agent task over takes, once it is set up: journaled with its steps.
        let ai_state: Arc<std::sync::Mutex<Option<Box<ai_task::Resumable>>>> = Default::default();
        let kept = io
            .as_ref()
            .filter(|io| !io.outputs.is_empty())
            .map(|io| KeptOutputs { globs: io.outputs.clone(), on_failure: io.outputs_on_failure });
        let limits = AttemptLimits { max_log, max_outputs: io.as_ref().map_or(0, |io| io.max_outputs) };
        // Output of earlier steps sent again starts where the outbox's reach is.
        let shipped_before = resume.as_ref().and_then(|r| r.earlier.or(r.reach));
        let shipper = tokio::spawn(ship_output(
            outbox.clone(),
            attempt_id,
            rx,
            masker.clone(),
            max_log,
            shipped_before,
        ));
        // The attempt's lifecycle, in order: each hook prepares before the steps (a resumed
        // attempt was prepared by the agent run that started it, so most skip it) and wraps
        // up after them.
        let mut hooks: Vec<Box<dyn Hook>> = vec![
            Box::new(Masking { unmaskable }),
            Box::new(Inputs { io: io.clone() }),
            Box::new(Image { image }),
            Box::new(AgentSetup {
                ai,
                resume: ai_resume,
                prepared: None,
                state: ai_state.clone(),
                journal: journal.clone(),
                usage_writer: None,
            }),
            Box::new(Outputs { io, outbox: outbox.clone() }),
        ];
        let mut refused = None;
        for hook in hooks.iter_mut().filter(|h| resume.is_none() || h.also_on_resume()) {
            let (name, doing) = (hook.name(), hook.doing());
            let ended = match setup::bounded(doing, clock, &mut stop, hook.prestart(&mut spec)).await {
                Ok(Ok(())) => continue,
                // A resumed attempt did start: what cannot be taken over is lost.
                Ok(Err(why)) if resume.is_some() => SetupEnd { failure: FailureClass::Lost, message: why },
                Ok(Err(why)) => SetupEnd { failure: FailureClass::Start, message: why },
                Err(end) => end,
            };
            tracing::warn!(hook = name, error = %ended.message, "attempt not started");
            refused = Some(ended);
            break;
        }
        let ai_state = ai_state.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut outcome = match refused {
            None => {
                let steps = Steps {
                    runtime: &*runtime,
                    journal: &journal,
                    spec: &spec,
                    clock,
                    grace,
                    metered,
                    kept: &kept,
                    ai: &ai_state,
                    limits,
                };
                run_steps(steps, stop, tx, resume).await
            }
            Some(ended) => {
                drop(tx);
                Outcome {
                    exit_code: None,
                    signal: None,
                    failure: Some(ended.failure),
                    message: ended.message,
                    usage: Usage::default(),
                    tokens: TokenUsage::default(),
                }
            }
        };
        if let Err(e) = runtime.cleanup(&spec).await {
            tracing::warn!(error = %e, "cleanup failed");
        }
        if let Some(gone) = sandbox_gone {
            gone();
        }
        for hook in &mut hooks {
            hook.poststop(&spec, &mut outcome).await;
        }
        // All output must be queued before the end is reported: the server stores output only
        // for attempts that are still open.
        let _ = shipper.await;
        // Messages quote commands, paths and errors, any of which may carry a secret.
        outcome.message = masker.mask_str(&outcome.message);
        tracing::info!(
            exit_code = ?outcome.exit_code,
            failure = outcome.failure.map_or("", FailureClass::as_str),
            "attempt ended"
        );
        finished(&outbox, attempt_id, &outcome).await;
        // Only now: an agent that dies in between finds the end in its outbox and the
        // journal entry beside it, and takes the end as reported.
        journal.forget(attempt_id);
        outcome
    }
    .instrument(span)
    .await
}

/// One stage of an attempt's lifecycle around its steps. Hooks run in order: `prestart` of
/// each before the steps (the first refusal ends the attempt as `start` with its reason, and
/// the sandbox never starts), then, once the steps ended and the sandbox is cleaned up,
/// `poststop` of each, which may add to the outcome.
#[async_trait::async_trait]
trait Hook: Send {
    /// Short name for logs.
    fn name(&self) -> &'static str;

    /// What `prestart` does, for reasons: "placing its inputs".
    fn doing(&self) -> &'static str {
        "preparing it"
    }

    /// Whether `prestart` runs for an attempt resumed after an agent restart too.
    fn also_on_resume(&self) -> bool {
        false
    }

    /// Prepares the attempt; may change its spec.
    async fn prestart(&mut self, _spec: &mut TaskSpec) -> Result<(), String> {
        Ok(())
    }

    /// Wraps up after the steps.
    async fn poststop(&mut self, _spec: &TaskSpec, _outcome: &mut Outcome) {}
}

/// Refuses an attempt whose secrets could not be masked in its output (or, resumed, could not
/// be had again): why.
struct Masking {
    unmaskable: Option<String>,
}

#[async_trait::async_trait]
impl Hook for Masking {
    fn name(&self) -> &'static str {
        "masking"
    }

    fn also_on_resume(&self) -> bool {
        true
    }

    async fn prestart(&mut self, _spec: &mut TaskSpec) -> Result<(), String> {
        match self.unmaskable.take() {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }
}

/// Places the task's inputs in its workspace.
struct Inputs {
    io: Option<TaskIo>,
}

#[async_trait::async_trait]
impl Hook for Inputs {
    fn name(&self) -> &'static str {
        "inputs"
    }

    fn doing(&self) -> &'static str {
        "placing its inputs"
    }

    async fn prestart(&mut self, spec: &mut TaskSpec) -> Result<(), String> {
        match &self.io {
            Some(io) if !io.inputs.is_empty() => {
                files::place_inputs(&io.link, &spec.workspace, &io.inputs, &io.policy)
                    .await
                    .map_err(|e| e.to_string())
            }
            _ => Ok(()),
        }
    }
}

/// Loads the task's image from the archive shipped with its job, when the node lacks it.
struct Image {
    image: Option<ImageToLoad>,
}

#[async_trait::async_trait]
impl Hook for Image {
    fn name(&self) -> &'static str {
        "image"
    }

    fn doing(&self) -> &'static str {
        "loading its image"
    }

    async fn prestart(&mut self, spec: &mut TaskSpec) -> Result<(), String> {
        match (&spec.image, &self.image) {
            (Some(image), Some(ImageToLoad { blob, fetcher: Some(fetcher) })) => {
                fetcher.ensure(image, blob).await
            }
            (Some(image), Some(ImageToLoad { fetcher: None, .. })) => {
                Err(format!("cannot load image {image}: this node has no Docker"))
            }
            _ => Ok(()),
        }
    }
}

/// An AI-agent task an earlier agent run prepared, to take over after a restart.
pub struct AiResume {
    /// What the journal kept of it.
    pub state: Box<ai_task::Resumable>,
    /// Where its key comes from again.
    pub link: Arc<crate::link::Link>,
    /// This node's name, which the server checks the attempt against.
    pub node: String,
}

/// The longest pause between asks for a resumed task's key while no server answers.
const MAX_KEY_PAUSE: Duration = Duration::from_secs(5);

/// Sets an AI-agent task up (repository, prompt, metering proxy), or takes one over after an
/// agent restart, and wraps it up (tokens, budget, patch, push).
struct AgentSetup {
    ai: Option<AiTask>,
    resume: Option<AiResume>,
    prepared: Option<ai_task::Prepared>,
    /// Where the hook leaves what taking the task over takes, for the journal.
    state: Arc<std::sync::Mutex<Option<Box<ai_task::Resumable>>>>,
    journal: Journal,
    /// Writes the usage down while the task runs.
    usage_writer: Option<tokio::task::JoinHandle<()>>,
}

impl AgentSetup {
    /// Keeps what taking the task over takes, and writes its usage down each time it grows,
    /// before the task sees the response that made it grow: after an agent restart the count
    /// (and the budget) go on from there.
    fn track(&mut self, prepared: &ai_task::Prepared, attempt_id: i64) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(prepared.resumable()));
        if let Some(probe) = prepared.usage_probe() {
            let journal = self.journal.clone();
            let record = probe.record(move |used| {
                let journal = journal.clone();
                async move { journal.record_ai_usage(attempt_id, used).await }
            });
            self.usage_writer = Some(tokio::spawn(record));
        }
    }
}

/// The LLM key and secrets of a resumed attempt, asked of the servers until one answers.
async fn keys_again(
    link: &crate::link::Link,
    node: &str,
    attempt_id: i64,
) -> Result<pb::AttemptKeyResponse, String> {
    let mut pause = Duration::from_millis(200);
    loop {
        match link.attempt_keys(node, attempt_id).await {
            Ok(keys) => return Ok(keys),
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "cannot get the attempt's keys again yet; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_KEY_PAUSE);
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Gives a resumed attempt's secrets their values again (the journal keeps their names only),
/// so that they are masked in the output of the step it took over and its next steps get
/// them. An attempt without secrets asks nothing.
async fn secrets_again(keys: &KeySource, spec: &mut TaskSpec) -> Result<(), String> {
    if spec.secrets.is_empty() {
        return Ok(());
    }
    let got = keys_again(&keys.link, &keys.node, spec.attempt_id)
        .await
        .map_err(|e| format!("the agent restarted and cannot get the task's secrets again: {e}"))?;
    for (name, value) in spec.secrets.iter_mut() {
        // A secret deleted since the submit stays empty, as it was absent at assignment.
        if let Some(v) = got.secrets.get(name) {
            value.clone_from(v);
        }
    }
    Ok(())
}

impl Drop for AgentSetup {
    fn drop(&mut self) {
        if let Some(writer) = self.usage_writer.take() {
            writer.abort();
        }
    }
}

#[async_trait::async_trait]
impl Hook for AgentSetup {
    fn name(&self) -> &'static str {
        "agent task"
    }

    fn doing(&self) -> &'static str {
        "setting up its agent (repository, prompt, metering proxy)"
    }

    fn also_on_resume(&self) -> bool {
        true
    }

    async fn prestart(&mut self, spec: &mut TaskSpec) -> Result<(), String> {
        let prepared = if let Some(resume) = &self.resume {
            let key = match resume.state.proxy {
                Some(_) => {
                    keys_again(&resume.link, &resume.node, spec.attempt_id)
                        .await
                        .map_err(|e| {
                            format!("the agent restarted and cannot get the task's LLM key again: {e}")
                        })?
                        .llm_key
                }
                None => String::new(),
            };
            ai_task::Prepared::resume((*resume.state).clone(), &key)
                .await
                .map_err(|e| format!("the agent restarted and cannot take the agent task over: {e}"))?
        } else if let Some(ai) = &self.ai {
            ai_task::prepare(ai, spec).await.map_err(|e| format!("agent task not set up: {e}"))?
        } else {
            return Ok(());
        };
        self.track(&prepared, spec.attempt_id);
        self.prepared = Some(prepared);
        Ok(())
    }

    async fn poststop(&mut self, _spec: &TaskSpec, outcome: &mut Outcome) {
        if let Some(writer) = self.usage_writer.take() {
            writer.abort();
        }
        if let Some(prepared) = self.prepared.take() {
            wrap_up_agent(prepared, outcome).await;
        }
    }
}

/// Keeps the task's outputs as artifacts.
struct Outputs {
    io: Option<TaskIo>,
    outbox: Arc<Outbox>,
}

#[async_trait::async_trait]
impl Hook for Outputs {
    fn name(&self) -> &'static str {
        "outputs"
    }

    async fn poststop(&mut self, spec: &TaskSpec, outcome: &mut Outcome) {
        if let Some(io) = &self.io {
            keep_outputs(&self.outbox, io, spec, outcome).await;
        }
    }
}

/// Ends an agent task: tokens into the report, `budget` as the failure when the proxy had to
/// refuse calls (unless the user cancelled), and the wrap-up's notes into the message.
async fn wrap_up_agent(prepared: ai_task::Prepared, outcome: &mut Outcome) {
    let succeeded = outcome.failure.is_none() && outcome.exit_code == Some(0);
    let wrapup = prepared.finish(succeeded).await;
    outcome.tokens = wrapup.tokens;
    let mut notes = wrapup.notes;
    if wrapup.budget_spent && outcome.failure != Some(FailureClass::Cancelled) {
        tracing::info!(
            input_tokens = wrapup.tokens.input_tokens,
            output_tokens = wrapup.tokens.output_tokens,
            refused = wrapup.tokens.refused,
            "token budget spent"
        );
        outcome.failure = Some(FailureClass::Budget);
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
    /// Where URL inputs may point and the limits every input meets.
    pub policy: files::InputPolicy,
}

/// Uploads the attempt's outputs and reports them (before its end is reported, so the server
/// still accepts them). Refused paths and upload failures are added to the attempt's message.
/// A succeeded attempt whose outputs no server could take, even after trying for a while, is
/// `lost` instead: it never reports success without the outputs it was to keep, and its task
/// is retried as its policy says.
async fn keep_outputs(outbox: &Outbox, io: &TaskIo, spec: &TaskSpec, outcome: &mut Outcome) {
    let succeeded = outcome.failure.is_none() && outcome.exit_code == Some(0);
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
            let msg = Kind::Update(pb::AttemptUpdate {
                attempt_id: spec.attempt_id,
                epoch: 0,
                seq: 0,
                kind: Some(pb::attempt_update::Kind::Outputs(pb::Outputs { files: kept })),
            });
            outbox.push(spec.attempt_id, msg, 256).await;
        }
        Ok(_) => {}
        Err(e) => {
            if succeeded && e.is_transient() {
                outcome.failure = Some(FailureClass::Lost);
            }
            notes.push(format!("outputs not kept: {e}"));
        }
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
    /// An AI-agent task an earlier agent run prepared, to take over (a resumed attempt).
    pub ai_resume: Option<AiResume>,
    /// The image archive the task's image comes from, when it was shipped with the job.
    pub image: Option<ImageToLoad>,
    /// Called once the sandbox is cleaned up, before outputs are kept and the end is
    /// reported: the node's room is free again while the attempt wraps up.
    pub sandbox_gone: Option<Box<dyn FnOnce() + Send>>,
}

/// An image archive shipped with a job, to load when the node lacks the image.
pub struct ImageToLoad {
    /// Digest of the archive blob.
    pub blob: String,
    /// Loads it; absent on a node without Docker.
    pub fetcher: Option<Arc<crate::images::ImageFetcher>>,
}

/// What running the steps of an attempt needs.
#[derive(Clone, Copy)]
struct Steps<'a> {
    runtime: &'a dyn Runtime,
    journal: &'a Journal,
    spec: &'a TaskSpec,
    clock: TaskClock,
    grace: Duration,
    /// An AI-agent task (see [`Entry::metered`]).
    metered: bool,
    /// The outputs it keeps (see [`Entry::outputs`]).
    kept: &'a Option<KeptOutputs>,
    /// How to take its agent task over (see [`Entry::ai`]).
    ai: &'a Option<Box<ai_task::Resumable>>,
    /// The server's limits it runs under (see [`Entry::limits`]).
    limits: AttemptLimits,
}

/// What the output shipper receives.
#[derive(Debug)]
enum Shipped {
    /// A piece of a step's output.
    Chunk(OutputChunk),
    /// All output of this step has been delivered: what its maskers hold back can go.
    End(usize),
}

/// A sink for one step's output. Whatever the runtime sends is passed on to the shipper, and
/// once the runtime has dropped every copy of the sink (its output is complete) the shipper
/// hears that the step ended, so that a tail held back for masking ships with the step's end
/// rather than with the attempt's.
fn step_sink(step: usize, out: &mpsc::Sender<Shipped>) -> OutputSink {
    let (tx, mut rx) = mpsc::channel(STEP_QUEUE);
    let out = out.clone();
    tokio::spawn(async move {
        while let Some(chunk) = rx.recv().await {
            if out.send(Shipped::Chunk(chunk)).await.is_err() {
                return;
            }
        }
        let _ = out.send(Shipped::End(step)).await;
    });
    tx
}

/// Passes a re-attached step's output on to the shipper, and its end once the runtime is
/// done with it, as [`step_sink`] does for a step started here.
fn forward_resumed_output(step: usize, mut output: mpsc::Receiver<OutputChunk>, out: &mpsc::Sender<Shipped>) {
    let out = out.clone();
    tokio::spawn(async move {
        while let Some(chunk) = output.recv().await {
            if out.send(Shipped::Chunk(chunk)).await.is_err() {
                return;
            }
        }
        let _ = out.send(Shipped::End(step)).await;
    });
}

/// Sends the shipper again what the steps before `until` wrote past `from` (the reach of the
/// output the outbox holds, in one of them), step by step with each step's end, so that the
/// tail of the log an earlier agent run held in memory is rebuilt before the step in flight's
/// output follows. Each step's standard output comes before its standard error; a step whose
/// output cannot be read again is left out, with a warning.
async fn replay_earlier_steps(
    runtime: &dyn Runtime,
    attempt_id: i64,
    from: OutputReach,
    until: usize,
    out: &mpsc::Sender<Shipped>,
) {
    for step in from.step as usize..until {
        let offsets = if step == from.step as usize { from.read_from() } else { (0, 0) };
        let (tx, mut rx) = mpsc::channel(STEP_QUEUE);
        let forward = async {
            while let Some(chunk) = rx.recv().await {
                if out.send(Shipped::Chunk(chunk)).await.is_err() {
                    break;
                }
            }
        };
        let (replayed, ()) = tokio::join!(runtime.replay(attempt_id, step, offsets, tx), forward);
        match replayed {
            Ok(true) => tracing::info!(attempt_id, step, "output of an earlier step read again"),
            Ok(false) => {
                tracing::warn!(attempt_id, step, "output of an earlier step is gone: its tail is lost")
            }
            Err(error) => {
                tracing::warn!(attempt_id, step, %error, "cannot read an earlier step's output again")
            }
        }
        let _ = out.send(Shipped::End(step)).await;
    }
}

async fn run_steps(
    steps: Steps<'_>,
    mut stop: watch::Receiver<StopReason>,
    out: mpsc::Sender<Shipped>,
    resume: Option<Resume>,
) -> Outcome {
    let Steps { runtime, journal, spec, clock, grace, metered, kept, ai, limits } = steps;
    let (timeout, deadline) = (clock.timeout, clock.deadline);
    let mut outcome = Outcome {
        exit_code: None,
        signal: None,
        failure: None,
        message: String::new(),
        usage: Usage::default(),
        tokens: TokenUsage::default(),
    };
    let first = resume.as_ref().map(|r| r.step).unwrap_or(0);
    // A resumed attempt's spec comes from the journal, which keeps secret names only: the step
    // in flight has its secrets already; a new one gets them only if they came again from the
    // server (see `secrets_again`).
    let secrets_gone = resume.as_ref().is_some_and(|r| r.keys.is_none()) && !spec.secrets.is_empty();
    let mut resumed = None;
    if let Some(r) = resume {
        if let Some(earlier) = r.earlier {
            replay_earlier_steps(runtime, spec.attempt_id, earlier, r.step, &out).await;
        }
        if let Some(output) = r.output {
            forward_resumed_output(r.step, output, &out);
        }
        resumed = Some(r.handle);
    }
    if resumed.is_none() {
        match setup::bounded("starting its sandbox and services", clock, &mut stop, runtime.prepare(spec))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return start_failure(outcome, e),
            Err(ended) => {
                tracing::warn!(error = %ended.message, "attempt not started");
                outcome.failure = Some(ended.failure);
                outcome.message = ended.message;
                return outcome;
            }
        }
    }
    for step in first..spec.steps.len() {
        if *stop.borrow() != StopReason::None {
            outcome.failure = Some(FailureClass::Cancelled);
            outcome.message = "cancelled before it started".into();
            return outcome;
        }
        let handle = match resumed.take() {
            Some(h) => h,
            None if secrets_gone => {
                tracing::warn!(step, "not starting the next step of a resumed attempt: its secrets are gone");
                outcome.failure = Some(FailureClass::Lost);
                outcome.message = format!("{SECRETS_GONE}; step {} was not started", step + 1);
                return outcome;
            }
            None => match runtime.start(spec, step, step_sink(step, &out)).await {
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
            metered,
            outputs: kept.clone(),
            // The usage so far: the journal's own copy is the current one.
            ai: journal.current_ai(spec.attempt_id).or_else(|| ai.clone()),
            limits: Some(limits),
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
                let reason = *stop.borrow_and_update();
                if reason != StopReason::None {
                    return reason;
                }
                if stop.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        };
        let (status, failure, message) = tokio::select! {
            status = runtime.wait(&handle) => (status, None, String::new()),
            _ = sleep_until_deadline => {
                tracing::info!(step, "timeout reached; stopping");
                let t = timeout.map(|t| humantime::format_duration(t).to_string()).unwrap_or_default();
                (stop_gracefully(runtime, &handle, grace).await, Some(FailureClass::Timeout), format!("ran past its timeout of {t}"))
            }
            reason = stopped => match reason {
                // Another node may be starting the task already: no grace.
                StopReason::LeaseLost => {
                    tracing::warn!(step, "stopping: the node's lease ran out");
                    (stop_gracefully(runtime, &handle, Duration::ZERO).await, Some(FailureClass::Lost), LEASE_LOST.to_string())
                }
                _ => {
                    tracing::info!(step, "stopping on request");
                    (stop_gracefully(runtime, &handle, grace).await, Some(FailureClass::Cancelled), "cancelled".to_string())
                }
            }
        };
        if let Ok(usage) = runtime.stats(&handle).await {
            outcome.usage = outcome.usage.merge(usage);
        }
        let status: ExitStatus = match status {
            Ok(s) => s,
            Err(e) => {
                outcome.failure = Some(FailureClass::Lost);
                outcome.message = format!("lost track of step {step}: {e}");
                return outcome;
            }
        };
        outcome.exit_code = status.code;
        outcome.signal = status.signal;
        if failure.is_some() {
            outcome.failure = failure;
            outcome.message = message;
            return outcome;
        }
        if status.oom {
            outcome.failure = Some(FailureClass::Oom);
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
    outcome.failure = Some(FailureClass::Start);
    outcome.message = e.to_string();
    outcome
}

/// Reports an attempt this node cannot run at all (its runtime is missing here, its plan
/// cannot be read), as failed to start.
pub async fn refuse(outbox: &Outbox, attempt_id: i64, why: &str) {
    tracing::warn!(attempt_id, why, "refusing attempt");
    let outcome = Outcome {
        exit_code: None,
        signal: None,
        failure: Some(FailureClass::Start),
        message: why.to_string(),
        usage: Usage::default(),
        tokens: TokenUsage::default(),
    };
    finished(outbox, attempt_id, &outcome).await;
}

/// Reports an attempt an earlier agent run left that could not be re-attached after a
/// restart: its steps were stopped, so the server settles it as lost (and retries it as its
/// policy says).
pub async fn lost_in_restart(outbox: &Outbox, attempt_id: i64) {
    let outcome = Outcome {
        exit_code: None,
        signal: None,
        failure: Some(FailureClass::Lost),
        message: "the agent restarted and could not re-attach to its step; the step was stopped".into(),
        usage: Usage::default(),
        tokens: TokenUsage::default(),
    };
    finished(outbox, attempt_id, &outcome).await;
}

/// Reports an attempt that was cancelled while it waited for room, before anything of it ran.
pub async fn cancelled_before_start(outbox: &Outbox, attempt_id: i64) {
    let outcome = Outcome {
        exit_code: None,
        signal: None,
        failure: Some(FailureClass::Cancelled),
        message: "cancelled before it started".into(),
        usage: Usage::default(),
        tokens: TokenUsage::default(),
    };
    finished(outbox, attempt_id, &outcome).await;
}

async fn started(outbox: &Outbox, attempt_id: i64) {
    let msg = Kind::Update(pb::AttemptUpdate {
        attempt_id,
        epoch: 0,
        seq: 0,
        kind: Some(pb::attempt_update::Kind::Started(pb::Started {})),
    });
    outbox.push(attempt_id, msg, 64).await;
}

async fn finished(outbox: &Outbox, attempt_id: i64, o: &Outcome) {
    let msg = Kind::Update(pb::AttemptUpdate {
        attempt_id,
        epoch: 0,
        seq: 0,
        kind: Some(pb::attempt_update::Kind::Finished(pb::Finished {
            exit_code: o.exit_code,
            signal: o.signal,
            failure: pb::FailureClass::encode(o.failure),
            message: o.message.clone(),
            cpu_seconds: o.usage.cpu_seconds,
            peak_memory_bytes: o.usage.peak_memory_bytes,
            input_tokens: o.tokens.input_tokens,
            output_tokens: o.tokens.output_tokens,
        })),
    });
    outbox.push(attempt_id, msg, 128 + o.message.len()).await;
}

/// Batches output into `AttemptOutput` reports until every sender is gone, masking secrets
/// per stream of each step (see [`crate::mask`]) before the log limit applies. A resumed
/// attempt's shipper starts from what the earlier run shipped of its step (`shipped_before`),
/// and fills the log limit on from what that run kept within it.
///
/// A report's reach never passes the end of the output kept within the limit: output held
/// back for the tail is read again from the step's files after an agent restart.
async fn ship_output(
    outbox: Arc<Outbox>,
    attempt_id: i64,
    mut rx: mpsc::Receiver<Shipped>,
    masker: Arc<Masker>,
    max_log: u64,
    shipped_before: Option<OutputReach>,
) {
    let mut cap = match shipped_before {
        Some(before) => LogCap::resume(max_log, before.kept),
        None => LogCap::new(max_log),
    };
    let mut streams: Streams<'_> = Streams::new(&masker, shipped_before);
    let mut batch = Batch::default();
    // Where the output kept within the limit ended, once the limit began holding output back.
    let mut head_end: Option<OutputReach> = None;
    loop {
        let first = match rx.recv().await {
            Some(c) => c,
            None => break,
        };
        let flush_at = Instant::now() + BATCH_DELAY;
        let mut next = Some(first);
        while let Some(shipped) = next.take() {
            let before = streams.reach();
            let mut admitted = 0u64;
            for piece in streams.take(shipped) {
                let (step, stderr, was_full) = (piece.step, piece.stderr, cap.kept().full);
                if let Some(p) = cap.admit(piece) {
                    admitted += p.data.len() as u64;
                    batch.add(p);
                }
                if !was_full && cap.kept().full && streams.reach().is_some() {
                    head_end = Some(reach_within(before, step, stderr, admitted));
                }
            }
            if batch.full() {
                break;
            }
            next = match tokio::time::timeout_at(flush_at, rx.recv()).await {
                Ok(Some(c)) => Some(c),
                Ok(None) | Err(_) => None,
            };
        }
        let reach = head_end.or_else(|| streams.reach()).map(|r| OutputReach { kept: cap.kept(), ..r });
        batch.flush(&outbox, attempt_id, reach).await;
    }
    // Each step's end arrives before the channel closes (its forwarder sends it before letting
    // go of its sender), so this finds nothing held; it is here so a tail can never be lost.
    for piece in streams.finish_all() {
        if let Some(p) = cap.admit(piece) {
            batch.add(p);
        }
        if batch.full() {
            batch.flush(&outbox, attempt_id, None).await;
        }
    }
    for p in cap.finish() {
        batch.add(p);
        if batch.full() {
            batch.flush(&outbox, attempt_id, None).await;
        }
    }
    batch.flush(&outbox, attempt_id, None).await;
}

/// The reach `admitted` bytes of masked output past `before` into one stream of `step`, all
/// of them released from one chunk of that stream (so `before` is that stream's last clean
/// point, or the step's start for its first chunk).
fn reach_within(before: Option<OutputReach>, step: u32, stderr: bool, admitted: u64) -> OutputReach {
    let mut reach = match before {
        Some(r) if r.step == step => r,
        _ => OutputReach { step, ..OutputReach::default() },
    };
    let stream = if stderr { &mut reach.stderr } else { &mut reach.stdout };
    stream.past_clean += admitted;
    reach
}

/// One output stream of one step, as the shipper follows it.
struct StreamState<'m> {
    lines: LineMasker<'m>,
    /// How far what left the masker reaches (see [`crate::reach`]); kept only for output whose
    /// chunks say where they end.
    reach: StreamReach,
    /// Where the last chunk read ended in the stream's file.
    read_to: Option<u64>,
    /// Bytes of masked output still to drop: an earlier agent run shipped them.
    skip: u64,
}

impl StreamState<'_> {
    /// Takes what the masker gives for a chunk that ends at `end` in its file (`None` for
    /// the stream's end): notes how far it reaches, and drops what was shipped already.
    fn released(&mut self, pieces: Vec<Vec<u8>>, end: Option<u64>, ended: bool) -> Vec<Vec<u8>> {
        if let Some(end) = end {
            self.read_to = Some(end);
        }
        if let Some(read_to) = self.read_to {
            self.reach.past_clean += pieces.iter().map(|p| p.len() as u64).sum::<u64>();
            if ended || self.lines.is_clean() {
                self.reach = StreamReach { clean: read_to, past_clean: 0 };
            }
        }
        if self.skip == 0 {
            return pieces;
        }
        let mut kept = Vec::with_capacity(pieces.len());
        for mut piece in pieces {
            let shipped = self.skip.min(piece.len() as u64);
            self.skip -= shipped;
            piece.drain(..shipped as usize);
            if !piece.is_empty() {
                kept.push(piece);
            }
        }
        kept
    }
}

/// The maskers of an attempt's output streams, by step and stream (`true` for stderr), and
/// how far the output they gave reaches.
struct Streams<'m> {
    masker: &'m Masker,
    open: std::collections::BTreeMap<(usize, bool), StreamState<'m>>,
    /// The latest step whose output says where it ends, and its streams' reach.
    reach: Option<OutputReach>,
}

impl<'m> Streams<'m> {
    fn new(masker: &'m Masker, shipped_before: Option<OutputReach>) -> Self {
        let mut streams = Streams { masker, open: Default::default(), reach: shipped_before };
        if let Some(before) = shipped_before {
            for stderr in [false, true] {
                let was = before.stream(stderr);
                let state = streams.open_stream(before.step as usize, stderr);
                state.reach = was;
                state.read_to = Some(was.clean);
                state.skip = was.past_clean;
            }
        }
        streams
    }

    fn open_stream(&mut self, step: usize, stderr: bool) -> &mut StreamState<'m> {
        let masker = self.masker;
        self.open.entry((step, stderr)).or_insert_with(|| StreamState {
            lines: masker.lines(),
            reach: StreamReach::default(),
            read_to: None,
            skip: 0,
        })
    }

    /// The pieces to ship for what arrived.
    fn take(&mut self, shipped: Shipped) -> Vec<Piece> {
        match shipped {
            Shipped::Chunk(c) => {
                let stderr = c.stream == Stream::Stderr;
                let state = self.open_stream(c.step, stderr);
                let released = state.lines.push(c.data);
                let out = state.released(released, c.end, false);
                let tracked = state.read_to.map(|_| state.reach);
                if let Some(reach) = tracked {
                    self.note_reach(c.step, stderr, reach);
                }
                pieces(c.step, stderr, out)
            }
            Shipped::End(step) => {
                let mut out = Vec::new();
                for stderr in [false, true] {
                    let Some(mut state) = self.open.remove(&(step, stderr)) else { continue };
                    let released = state.lines.finish();
                    let data = state.released(released, None, true);
                    if state.read_to.is_some() {
                        self.note_reach(step, stderr, state.reach);
                    }
                    out.extend(pieces(step, stderr, data));
                }
                out
            }
        }
    }

    /// Notes how far a stream of `step` reaches, if `step` is the latest step seen.
    fn note_reach(&mut self, step: usize, stderr: bool, reach: StreamReach) {
        let step = step as u32;
        let current = match &mut self.reach {
            Some(r) if r.step > step => return,
            Some(r) if r.step == step => r,
            _ => self.reach.insert(OutputReach { step, ..OutputReach::default() }),
        };
        if stderr {
            current.stderr = reach;
        } else {
            current.stdout = reach;
        }
    }

    /// How far the output given so far reaches, for output that says where it ends.
    fn reach(&self) -> Option<OutputReach> {
        self.reach
    }

    /// The pieces still held back by any stream.
    fn finish_all(&mut self) -> Vec<Piece> {
        std::mem::take(&mut self.open)
            .into_iter()
            .flat_map(|((step, stderr), mut s)| {
                let released = s.lines.finish();
                pieces(step, stderr, s.released(released, None, true))
            })
            .collect()
    }
}

fn pieces(step: usize, stderr: bool, data: Vec<Vec<u8>>) -> Vec<Piece> {
    data.into_iter().map(|data| Piece { step: step as u32, stderr, data }).collect()
}

/// Output waiting to go out as one report: runs of lines of one step and stream each.
#[derive(Default)]
struct Batch {
    chunks: Vec<pb::OutputChunk>,
    bytes: usize,
}

impl Batch {
    fn add(&mut self, p: Piece) {
        if p.data.is_empty() {
            return;
        }
        self.bytes += p.data.len();
        match self.chunks.last_mut() {
            Some(c) if c.step == p.step && c.stderr == p.stderr => {
                line_lens(&p.data, &mut c.lens);
                c.data.extend_from_slice(&p.data);
            }
            _ => {
                let mut lens = Vec::new();
                line_lens(&p.data, &mut lens);
                self.chunks.push(pb::OutputChunk { step: p.step, stderr: p.stderr, lens, data: p.data });
            }
        }
    }

    fn full(&self) -> bool {
        self.bytes >= BATCH_BYTES || self.chunks.len() >= pb::MAX_OUTPUT_CHUNKS
    }

    /// Queues the batch as one report; `reach` is how far the output shipped with it reaches,
    /// for output whose chunks say where they end.
    async fn flush(&mut self, outbox: &Outbox, attempt_id: i64, reach: Option<OutputReach>) {
        if self.chunks.is_empty() {
            return;
        }
        let chunks = std::mem::take(&mut self.chunks);
        let msg = Kind::Output(pb::AttemptOutput { attempt_id, epoch: 0, seq: 0, lines: Vec::new(), chunks });
        match reach {
            Some(reach) => outbox.push_output(attempt_id, msg, self.bytes + 64, reach).await,
            None => outbox.push(attempt_id, msg, self.bytes + 64).await,
        }
        self.bytes = 0;
    }
}

/// Appends the lengths of the lines of a piece to `lens`: one per newline, and one for a last
/// line without newline (see [`Piece`]).
fn line_lens(data: &[u8], lens: &mut Vec<u32>) {
    let mut start = 0;
    for newline in memchr::memchr_iter(b'\n', data) {
        lens.push((newline + 1 - start) as u32);
        start = newline + 1;
    }
    if start < data.len() {
        lens.push((data.len() - start) as u32);
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use drover_proto::agent_message::Msg;
    use futures::{FutureExt, StreamExt};

    use super::*;
    use crate::runtime::process::ProcessRuntime;

    const SECRET: &str = "first-line-Zq7\nsecond line/with+chars\nthird-Kx9";

    struct Ran {
        outcome: Outcome,
        /// Shipped output pieces, as (stderr, text).
        pieces: Vec<(bool, String)>,
        /// The message of the attempt's end, as reported.
        message: String,
    }

    async fn run_attempt(spec: TaskSpec, runtime: Arc<dyn Runtime>, resume: Option<Resume>) -> Ran {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Arc::new(Outbox::default());
        let mut sent = Box::pin(outbox.reports());
        outbox.connect(1);
        let gone = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let runner = Runner {
            runtime,
            outbox,
            journal: {
                let (log, _) = crate::state_log::StateLog::open(&dir.path().join("state")).unwrap();
                Journal::new(log, Vec::new())
            },
            grace: Duration::from_secs(1),
            io: None,
            max_log: 0,
            ai: None,
            ai_resume: None,
            image: None,
            sandbox_gone: Some(Box::new({
                let gone = gone.clone();
                move || {
                    gone.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            })),
        };
        let (_stop_tx, stop) = watch::channel(StopReason::None);
        let outcome = run(runner, spec, Some(Duration::from_secs(30)), stop, resume).await;
        // However the attempt ended, the node's room was given back once.
        assert_eq!(gone.load(std::sync::atomic::Ordering::SeqCst), 1, "sandbox_gone called once");
        let mut pieces = Vec::new();
        let mut message = None;
        let reports = std::iter::from_fn(|| sent.next().now_or_never().flatten()).flat_map(|m| match m.msg {
            Some(Msg::Reports(r)) => r.reports,
            _ => Vec::new(),
        });
        for report in reports {
            match report.kind {
                Some(Kind::Output(o)) => {
                    assert!(o.lines.is_empty(), "output goes as chunks");
                    for c in o.chunks {
                        assert_eq!(c.lens.iter().map(|&l| l as usize).sum::<usize>(), c.data.len());
                        let mut at = 0;
                        for &len in &c.lens {
                            let line = &c.data[at..at + len as usize];
                            pieces.push((c.stderr, String::from_utf8_lossy(line).into_owned()));
                            at += len as usize;
                        }
                    }
                }
                Some(Kind::Update(pb::AttemptUpdate {
                    kind: Some(pb::attempt_update::Kind::Finished(f)),
                    ..
                })) => message = Some(f.message),
                _ => {}
            }
        }
        Ran { outcome, pieces, message: message.expect("the end was reported") }
    }

    fn spec(dir: &std::path::Path, attempt_id: i64, steps: &[&str]) -> TaskSpec {
        TaskSpec {
            attempt_id,
            steps: steps.iter().map(|s| vec!["sh".into(), "-c".into(), (*s).into()]).collect(),
            workspace: dir.join("ws"),
            secrets: [("S".to_owned(), SECRET.to_owned())].into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn secrets_are_masked_in_every_stream_across_lines_and_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let steps = [
            // Whole, and to stderr too.
            r#"printf 'whole %s end\n' "$S"; printf 'err %s\n' "$S" >&2"#,
            // Line by line, and in two halves with a pause between.
            r#"printf '%s\n' "$S" | while IFS= read -r l; do echo "line: $l"; done
               head="${S%???}"; printf 'halves %s' "$head"; sleep 0.2; printf '%s tail\n' "${S#"$head"}""#,
            // Encoded, and a last line without newline whose end could begin the secret.
            r#"printf 'b64 %s\n' "$(printf '%s' "$S" | base64 -w0)"; printf 'last first-line'"#,
        ];
        let ran = run_attempt(spec(dir.path(), 9101, &steps), Arc::new(ProcessRuntime::new()), None).await;
        assert_eq!((ran.outcome.exit_code, ran.outcome.failure), (Some(0), None), "{}", ran.outcome.message);
        let stdout: String = ran.pieces.iter().filter(|(e, _)| !e).map(|(_, t)| t.as_str()).collect();
        let stderr: String = ran.pieces.iter().filter(|(e, _)| *e).map(|(_, t)| t.as_str()).collect();
        assert_eq!(
            stdout,
            "whole *** end\nline: ***\nline: ***\nline: ***\nhalves *** tail\nb64 ***\nlast first-line"
        );
        assert_eq!(stderr, "err ***\n");
        // Lines as the runtime cut them: only the last lacks a newline.
        let shipped: Vec<&str> = ran.pieces.iter().map(|(_, t)| t.as_str()).collect();
        assert!(
            shipped.iter().rev().skip(1).all(|t| t.ends_with('\n') && t.matches('\n').count() == 1),
            "{shipped:?}"
        );
        assert!(!stdout.contains(&STANDARD.encode(SECRET)[4..]));
    }

    /// Feeds `source[from..]` to `streams` as stdout of step 0 in pieces of `piece` bytes, each
    /// saying where it ends in the file, then the step's end when `end`; what is shipped.
    fn feed(
        streams: &mut Streams<'_>,
        source: &[u8],
        from: usize,
        to: usize,
        piece: usize,
        end: bool,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = from;
        while at < to {
            let next = (at + piece).min(to);
            let chunk = OutputChunk {
                stream: Stream::Stdout,
                step: 0,
                data: source[at..next].to_vec(),
                end: Some(next as u64),
            };
            out.extend(streams.take(Shipped::Chunk(chunk)).into_iter().flat_map(|p| p.data));
            at = next;
        }
        if end {
            out.extend(streams.take(Shipped::End(0)).into_iter().flat_map(|p| p.data));
        }
        out
    }

    #[test]
    fn output_read_again_from_its_reach_is_shipped_once_whatever_the_masker_held() {
        let secret = "tok-0123456789";
        let source = format!("a {secret} b\nc tok-01 d\n{secret}{secret}\ntail tok-0123").into_bytes();
        for masker in [Masker::new([secret]).unwrap(), Masker::default()] {
            let whole = feed(&mut Streams::new(&masker, None), &source, 0, source.len(), 5, true);
            assert_eq!(String::from_utf8_lossy(&whole).contains(secret), masker.is_empty());
            // The agent dies after any piece; the next run reads on from the reach.
            for cut in (5..source.len()).step_by(5) {
                let mut first = Streams::new(&masker, None);
                let before = feed(&mut first, &source, 0, cut, 5, false);
                let reach = first.reach().expect("output that says where it ends has a reach");
                let mut again = Streams::new(&masker, Some(reach));
                let clean = reach.stdout.clean as usize;
                assert!(clean <= cut);
                let after = feed(&mut again, &source, clean, source.len(), 7, true);
                assert_eq!(
                    [before, after].concat(),
                    whole,
                    "cut at {cut}, reach {reach:?}: {}",
                    String::from_utf8_lossy(&whole)
                );
            }
        }
    }

    #[test]
    fn output_that_says_nothing_of_offsets_has_no_reach() {
        let masker = Masker::default();
        let mut streams = Streams::new(&masker, None);
        let chunk = OutputChunk { stream: Stream::Stderr, step: 1, data: b"x\n".to_vec(), end: None };
        assert_eq!(streams.take(Shipped::Chunk(chunk)).len(), 1);
        assert_eq!(streams.reach(), None);
        // A later step's reach replaces an earlier one's; the other stream starts at nothing.
        let chunk = OutputChunk { stream: Stream::Stdout, step: 2, data: b"y\n".to_vec(), end: Some(2) };
        streams.take(Shipped::Chunk(chunk));
        let reach = streams.reach().unwrap();
        assert_eq!((reach.step, reach.stdout.clean, reach.stderr), (2, 2, StreamReach::default()));
    }

    #[tokio::test]
    async fn the_message_of_the_end_is_masked() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(dir.path(), 9102, &[]);
        spec.secrets.insert("T".into(), "tok-0123456789".into());
        spec.steps = vec![vec!["/no/such/dir/tok-0123456789".into()]];
        let ran = run_attempt(spec, Arc::new(ProcessRuntime::new()), None).await;
        assert_eq!(ran.outcome.failure, Some(FailureClass::Start));
        assert!(ran.message.contains("***") && !ran.message.contains("tok-0123456789"), "{}", ran.message);
    }

    #[tokio::test]
    async fn a_resumed_attempt_does_not_start_a_step_without_its_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new());
        let mut spec = spec(dir.path(), 9103, &["sleep 0.2", "touch started"]);
        runtime.prepare(&spec).await.unwrap();
        let (tx, _rx) = mpsc::channel(16);
        let handle = runtime.start(&spec, 0, tx).await.unwrap();
        // As the journal gives it back after a restart: names only.
        spec.secrets.values_mut().for_each(String::clear);
        let ran = run_attempt(
            spec.clone(),
            runtime,
            Some(Resume { step: 0, handle, output: None, reach: None, earlier: None, keys: None }),
        )
        .await;
        assert_eq!(ran.outcome.failure, Some(FailureClass::Lost));
        assert_eq!(ran.outcome.exit_code, Some(0), "the resumed step ran to its end");
        assert_eq!(ran.message, format!("{SECRETS_GONE}; step 2 was not started"));
        assert!(!spec.workspace.join("started").exists());
    }
}
