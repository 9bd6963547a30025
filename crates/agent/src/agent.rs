//! The agent's session with the server: connect (rotating through server addresses with
//! exponential backoff and jitter), register, heartbeat, take assignments and cancellations,
//! and hand acknowledgements to the outbox.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_core::TaskPlan;
use drover_proto as pb;
use drover_proto::agent_message::Msg;
use drover_proto::server_message::Msg as In;
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tracing::Instrument;

use crate::ai_task::AiTask;
use crate::attempt::{self, StopReason};
use crate::files::ServerLink;
use crate::images::ImageFetcher;
use crate::journal::{self, Journal};
use crate::lease::LeaseClock;
use crate::link::{Link, LinkError};
use crate::outbox::Outbox;
use crate::reservation::{Admission, Capacity, Reserved};
use crate::runtime::{Runtime, TaskSpec};
use crate::state_log::{Record, StateLog};

/// How an agent is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Server URLs (`http://host:port`), tried in turn.
    pub servers: Vec<String>,
    /// Node name; stable across restarts.
    pub name: String,
    /// Labels that task constraints match.
    pub labels: BTreeMap<String, String>,
    /// Cores offered.
    pub cores: u32,
    /// Memory offered, bytes.
    pub memory: u64,
    /// Where task workspaces live.
    pub work_dir: PathBuf,
    /// Time between SIGTERM and SIGKILL when a task is stopped.
    pub kill_grace: Duration,
    /// A single-use join token to enroll with, when the agent holds no credential yet.
    pub join: Option<String>,
    /// How to check the servers' certificates (`--ca`); without it the CA the agent enrolled
    /// with, or the fingerprint its join token pins.
    pub trust: Option<drover_tls::Trust>,
    /// Whether URL inputs may reach this node's loopback and link-local addresses.
    pub allow_local_urls: bool,
    /// Bytes kept free in the work dir: below it, the node takes no new work until space
    /// returns (0: no check).
    pub min_free: u64,
}

/// Default of [`AgentConfig::min_free`]: 512 MiB.
pub const DEFAULT_MIN_FREE: u64 = 512 << 20;

/// How long a server may take to answer `Register` on a connection that opened.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(20);

/// Where an agent keeps its state log (journal and outbox), inside its work directory.
pub const STATE_DIR: &str = ".state";

/// Where an agent keeps its node credential, inside its work directory.
pub const CREDENTIAL_FILE: &str = ".node-credential.json";

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration cannot work.
    #[error("invalid agent configuration: {0}")]
    Config(String),
    /// The server refused the agent (no credential, a revoked one, a bad join token), or the
    /// agent's enrollment cannot be used.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The agent and the server speak different protocols: one of them must be upgraded.
    #[error("{0}")]
    Incompatible(String),
    /// The agent's state log (its journal and outbox) cannot be opened.
    #[error(transparent)]
    State(#[from] crate::state_log::StateLogError),
}

/// How a session ended.
#[derive(Debug)]
enum SessionEnd {
    /// The connection broke or the server went away: connect again.
    Broken(String),
    /// The server refused this agent's credential: connecting again cannot help.
    Refused(String),
    /// The agent and the server speak different protocols: connecting again cannot help
    /// until one of them is replaced.
    Incompatible(String),
}

impl SessionEnd {
    fn from_status(s: &tonic::Status) -> SessionEnd {
        match s.code() {
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                SessionEnd::Refused(s.message().to_owned())
            }
            _ => SessionEnd::Broken(s.message().to_owned()),
        }
    }

    /// How a session ends that the server refused before registering it. A server refuses
    /// an agent of another protocol as a failed precondition; later in a session the same
    /// code means a stale session, which a reconnect fixes.
    fn at_registration(s: &tonic::Status) -> SessionEnd {
        match s.code() {
            tonic::Code::FailedPrecondition => SessionEnd::Incompatible(s.message().to_owned()),
            _ => SessionEnd::from_status(s),
        }
    }
}

/// Aborts a background task when the session that owns it ends (or is dropped mid-way).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Everything needed to run an attempt in the background.
struct Launch {
    spec: TaskSpec,
    /// Runtime kind.
    kind: String,
    /// Image archive to load first, if the image is missing.
    image_blob: Option<String>,
    timeout: Option<Duration>,
    /// The node's room the attempt holds or waits for.
    room: Room,
    /// Set when re-attaching to a step an earlier agent run started.
    resume: Option<attempt::Resume>,
    io: Option<attempt::TaskIo>,
    ai: Option<AiTask>,
    /// An AI-agent task to take over (with `resume`).
    ai_resume: Option<attempt::AiResume>,
    /// The log limit it ran under before an agent restart (with `resume`); else the server's.
    max_log: Option<u64>,
}

/// What of the node an attempt holds when it is launched.
enum Room {
    /// Its cores and memory, given back when it ends.
    Held(Reserved),
    /// Its turn in line: it was assigned ahead and starts when running attempts give room.
    Waiting(tokio::sync::oneshot::Receiver<Reserved>),
}

/// A running (or waiting) attempt as the session sees it.
struct Running {
    stop: watch::Sender<StopReason>,
    /// Where live reads of its files are served from.
    workspace: PathBuf,
}

/// Limits the server sets for every attempt (0 until the first registration: no limit).
#[derive(Debug, Default)]
struct Limits {
    max_outputs: std::sync::atomic::AtomicU64,
    max_log: std::sync::atomic::AtomicU64,
}

impl Limits {
    fn set(&self, r: &pb::Registered) {
        use std::sync::atomic::Ordering::Relaxed;
        self.max_outputs.store(r.max_outputs_bytes, Relaxed);
        self.max_log.store(r.max_log_bytes, Relaxed);
    }

    fn max_outputs(&self) -> u64 {
        match self.max_outputs.load(std::sync::atomic::Ordering::Relaxed) {
            0 => u64::MAX,
            n => n,
        }
    }

    fn max_log(&self) -> u64 {
        self.max_log.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The agent: session loop plus the attempts it runs.
pub struct Agent {
    config: AgentConfig,
    /// Runtimes by kind (`process`, `docker`, `microvm`); only available ones are listed.
    runtimes: BTreeMap<String, Arc<dyn Runtime>>,
    outbox: Arc<Outbox>,
    journal: Journal,
    /// Loads images shipped with jobs; absent without a Docker engine.
    images: Option<Arc<ImageFetcher>>,
    /// Cores and memory, and the attempts waiting for them.
    capacity: Arc<Mutex<Capacity>>,
    running: Arc<Mutex<HashMap<i64, Running>>>,
    limits: Limits,
    /// Where agent tasks' LLM calls go when their job names no upstream.
    llm_upstream: Option<String>,
    /// The way to the servers, with the node's credential.
    link: Arc<Link>,
    /// The protocol the agent says it speaks at registration.
    protocol: u32,
    /// When the server last renewed the node's lease.
    lease: LeaseClock,
    /// Ends the current session when the lease lapsed under it (a connection that looks up
    /// but carries nothing).
    lease_lapsed: tokio::sync::Notify,
    /// Why the node took no new work at the last heartbeat; empty while it took work.
    paused: Mutex<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Backoff before reconnect attempt `n` (from 0): 100 ms doubling to 5 s, with up to 50% jitter
/// so a fleet does not reconnect in lockstep after a server restart.
fn backoff(n: u32) -> Duration {
    let base = Duration::from_millis(100).saturating_mul(1 << n.min(6)).min(Duration::from_secs(5));
    let jitter = rand::rng().random_range(0.0..0.5);
    base.mul_f64(1.0 + jitter)
}

impl Agent {
    /// An agent that runs tasks with the given runtimes (at most one per kind).
    pub fn new(config: AgentConfig, runtimes: Vec<Arc<dyn Runtime>>) -> Result<Agent, AgentError> {
        if runtimes.is_empty() {
            return Err(AgentError::Config("no runtime is available".into()));
        }
        if config.servers.is_empty() {
            return Err(AgentError::Config("no server address given".into()));
        }
        if config.cores == 0 {
            return Err(AgentError::Config("a node needs at least one core".into()));
        }
        let physical = crate::monitor::detect_cores();
        let link = Arc::new(Link::new(
            config.servers.clone(),
            config.trust.clone(),
            config.work_dir.join(CREDENTIAL_FILE),
        ));
        let (log, mut recovered) = StateLog::open(&config.work_dir.join(STATE_DIR))?;
        // An agent of an earlier release kept its journal as one file per attempt.
        for entry in journal::take_legacy_entries(&config.work_dir.join(".journal")) {
            log.append_later(Record::Step(Box::new(entry.clone())));
            recovered.entries.push(entry);
        }
        if let Some(why) = &recovered.damaged_tail {
            tracing::warn!(error = %why, "the state log's last record was cut short; what came before it is kept");
        }
        if !recovered.reports.is_empty() {
            tracing::info!(
                reports = recovered.reports.len(),
                "reports of an earlier run wait for the server"
            );
        }
        Ok(Agent {
            link,
            journal: Journal::new(log.clone(), recovered.entries).with_output_reach(recovered.reach),
            images: None,
            capacity: Arc::new(Mutex::new(Capacity::new(config.cores, physical, config.memory))),
            config,
            runtimes: runtimes.into_iter().map(|r| (r.kind().to_string(), r)).collect(),
            outbox: Arc::new(Outbox::durable(log, recovered.reports, recovered.last_seq)),
            running: Arc::new(Mutex::new(HashMap::new())),
            limits: Limits::default(),
            llm_upstream: None,
            protocol: pb::PROTOCOL_VERSION,
            lease: LeaseClock::default(),
            lease_lapsed: tokio::sync::Notify::new(),
            paused: Mutex::new(String::new()),
        })
    }

    /// Sets the LLM API that agent tasks' metering proxies forward to when their job names
    /// no `upstream`.
    pub fn with_llm_upstream(mut self, upstream: Option<String>) -> Agent {
        self.llm_upstream = upstream;
        self
    }

    /// Makes the agent claim `protocol` at registration, to test how servers meet agents of
    /// other releases; everything it sends stays this build's.
    #[cfg(any(test, feature = "test-support"))]
    pub fn speaking_protocol(mut self, protocol: u32) -> Agent {
        self.protocol = protocol;
        self
    }

    /// Lets the agent load images shipped with jobs into this Docker engine.
    pub fn with_images(mut self, docker: Arc<crate::runtime::docker::DockerRuntime>) -> Agent {
        self.images = Some(Arc::new(ImageFetcher::new(docker, self.link.clone())));
        self
    }

    /// Makes sure the agent holds its node credential, exchanging the join token for one if
    /// it has none yet; retries while no server answers, gives up when one refuses.
    pub async fn enroll(&self) -> Result<(), AgentError> {
        let mut failures = 0u32;
        loop {
            match self.link.enroll(&self.config.name, self.config.join.as_deref()).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, "cannot enroll yet; trying again");
                    failures += 1;
                    tokio::time::sleep(backoff(failures)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Runs sessions until `shutdown` resolves, reconnecting whenever a session breaks. Ends
    /// with an error when a server refuses the agent's credential (never enrolled, or
    /// revoked): its tasks are stopped, since the server handed them on.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> Result<(), AgentError> {
        let this = Arc::new(self);
        let recovery = this.journal.recover(&this.runtimes, &this.outbox.finished_attempts()).await;
        let resumable = recovery.resumable;
        let leftovers = recovery.stopped.len();
        for attempt_id in recovery.stopped {
            attempt::lost_in_restart(&this.outbox, attempt_id).await;
        }
        // Containers of this agent that no journal entry explains (a crash between creating a
        // container and recording its step) are orphans: remove them, keeping resumed ones.
        if let Some(images) = &this.images {
            let keep: Vec<i64> = resumable.iter().map(|r| r.entry.spec.attempt_id).collect();
            match images.docker().remove_orphans(&keep).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::warn!(removed = n, "removed orphaned containers and networks of this agent")
                }
                Err(e) => tracing::warn!(error = %e, "cannot look for orphaned containers"),
            }
        }
        for journal::Reattached { entry, handle, output, reach, earlier } in resumable {
            let timeout = entry.timeout_ms.map(Duration::from_millis);
            let step = handle.step;
            let keys = attempt::KeySource { link: this.link.clone(), node: this.config.name.clone() };
            let resume =
                attempt::Resume { step, handle, output: Some(output), reach, earlier, keys: Some(keys) };
            let kind = entry.runtime.clone();
            let held = lock(&this.capacity).hold(&entry.spec.cpus, entry.spec.memory_limit);
            // Its inputs are in place; its outputs are still to keep.
            let io = entry.outputs.clone().map(|kept| attempt::TaskIo {
                inputs: Vec::new(),
                outputs: kept.globs,
                outputs_on_failure: kept.on_failure,
                link: ServerLink::new(this.link.clone()),
                max_outputs: entry.limits.map_or_else(|| this.limits.max_outputs(), |l| l.max_outputs),
                policy: crate::files::InputPolicy::default(),
            });
            // An AI-agent task's proxy starts again, with its key asked of the server.
            let ai_resume = entry.ai.map(|state| attempt::AiResume {
                state,
                link: this.link.clone(),
                node: this.config.name.clone(),
            });
            let launch = Launch {
                spec: entry.spec,
                kind,
                image_blob: None,
                timeout,
                room: Room::Held(held),
                resume: Some(resume),
                io,
                ai: None,
                ai_resume,
                max_log: entry.limits.map(|l| l.max_log),
            };
            this.launch(launch);
        }
        if leftovers > 0 {
            tracing::warn!(
                leftovers,
                "stopped attempts left running by an earlier agent run; they are reported lost"
            );
        }
        let _lease_watch = AbortOnDrop(tokio::spawn(this.clone().watch_lease()));
        tokio::pin!(shutdown);
        let mut failures = 0u32;
        let mut server_index = 0usize;
        let mut outcome = Ok(());
        // How running attempts are stopped when the loop ends: left for the next start's
        // recovery, unless the server handed them on.
        let mut stop_running = StopReason::Shutdown;
        loop {
            let url = this.config.servers[server_index % this.config.servers.len()].clone();
            let session = this.clone().session(url.clone());
            tokio::select! {
                _ = &mut shutdown => break,
                result = session => {
                    this.outbox.disconnect();
                    this.lease.disconnected();
                    match result {
                        Ok(()) => failures = 0,
                        Err(SessionEnd::Refused(why)) => {
                            tracing::error!(server = %url, error = %why, "the server refused this agent");
                            outcome = Err(AgentError::Link(LinkError::Refused(format!(
                                "{why} (enroll this node with `drover agent --join TOKEN`; an operator makes one with `drover nodes token create`)"
                            ))));
                            stop_running = StopReason::Cancel;
                            break;
                        }
                        Err(SessionEnd::Incompatible(why)) => {
                            // The server never took this agent on, so its attempts are its
                            // own still: an agent of the right version resumes them.
                            tracing::error!(server = %url, error = %why, "the server speaks another protocol");
                            outcome = Err(AgentError::Incompatible(why));
                            break;
                        }
                        Err(SessionEnd::Broken(e)) => {
                            tracing::warn!(server = %url, error = %e, "session with server failed");
                            failures += 1;
                            server_index += 1;
                        }
                    }
                }
            }
            let pause = backoff(failures).min(this.lease.longest_reconnect_pause());
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        this.outbox.disconnect();
        // A refused agent's tasks were handed on by the server: stop them for good and wait
        // until they are gone. A shutdown leaves that to the next start's recovery.
        let stops: Vec<_> = lock(&this.running).values().map(|r| r.stop.clone()).collect();
        for s in stops {
            let _ = s.send(stop_running);
        }
        if stop_running == StopReason::Cancel {
            let deadline = tokio::time::Instant::now() + this.config.kill_grace + Duration::from_secs(5);
            while !lock(&this.running).is_empty() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        outcome
    }

    /// One session: register, then serve until the stream breaks. `Ok` when the server ended
    /// it cleanly (and a fresh session should start at once).
    async fn session(self: Arc<Self>, url: String) -> Result<(), SessionEnd> {
        let mut client =
            self.link.session_client(&url).await.map_err(|e| SessionEnd::Broken(e.to_string()))?;
        let (tx, rx) = mpsc::unbounded_channel();
        // Reports leave through the outbox's stream, in batches; everything else through `tx`.
        let reports = self.outbox.reports();
        let mut known: Vec<i64> = lock(&self.running).keys().copied().collect();
        known.extend(self.outbox.attempts());
        known.sort_unstable();
        known.dedup();
        let register = pb::Register {
            name: self.config.name.clone(),
            labels: self.config.labels.clone().into_iter().collect(),
            cores: self.config.cores,
            memory: self.config.memory,
            runtimes: self.runtimes.keys().cloned().collect(),
            attempts: known,
            version: env!("CARGO_PKG_VERSION").to_string(),
            protocol: self.protocol,
        };
        let register_sent = std::time::Instant::now();
        tx.send(pb::AgentMessage { msg: Some(Msg::Register(register)) })
            .map_err(|e| SessionEnd::Broken(e.to_string()))?;
        let outbound = futures::stream::select(UnboundedReceiverStream::new(rx), reports);
        let registering = async {
            let mut inbound =
                client.session(outbound).await.map_err(|e| SessionEnd::at_registration(&e))?.into_inner();
            match inbound.next().await {
                Some(Ok(pb::ServerMessage { msg: Some(In::Registered(r)) })) => Ok((inbound, r)),
                Some(Ok(_)) => Err(SessionEnd::Broken("server did not answer Register".into())),
                Some(Err(e)) => Err(SessionEnd::at_registration(&e)),
                None => Err(SessionEnd::Broken("server closed the session".into())),
            }
        };
        // A connection that opened but carries nothing (a peer that accepts and never
        // answers) must not hold the agent forever: the next server gets its turn.
        let (mut inbound, registered) =
            tokio::time::timeout(REGISTER_TIMEOUT, registering).await.map_err(|_| {
                SessionEnd::Broken(format!("no answer to Register within {REGISTER_TIMEOUT:?}"))
            })??;
        // A server of protocol 1 does not check the agent's: the agent checks the server's.
        pb::ProtocolMismatch::check_server(&registered.version, registered.protocol)
            .map_err(|m| SessionEnd::Incompatible(m.to_string()))?;
        let epoch = registered.epoch;
        self.limits.set(&registered);
        tracing::info!(server = %url, node_id = registered.node_id, epoch, "registered with server");
        if registered.lease_ms > 0 {
            self.lease.registered(register_sent, Duration::from_millis(registered.lease_ms));
        }
        self.outbox.connect(epoch);
        let heartbeat = Duration::from_millis(registered.heartbeat_ms.max(100));
        let beat_tx = tx.clone();
        let beats = self.clone();
        let _beats = AbortOnDrop(tokio::spawn(async move {
            let mut tick = tokio::time::interval(heartbeat);
            loop {
                tick.tick().await;
                let warm = beats.runtimes.values().flat_map(|r| r.warm_counts()).collect();
                let paused = beats.disk_pause();
                let seq = beats.lease.beat();
                if beat_tx
                    .send(pb::AgentMessage { msg: Some(Msg::Heartbeat(pb::Heartbeat { warm, seq, paused })) })
                    .is_err()
                {
                    return;
                }
            }
        }));
        // Made once: a lapse told while a message is being handled still ends the session.
        let lapsed = self.lease_lapsed.notified();
        tokio::pin!(lapsed);
        loop {
            let next = tokio::select! {
                next = inbound.next() => next,
                _ = &mut lapsed => {
                    break Err(SessionEnd::Broken("the server renewed no lease for a whole lease; connecting afresh".into()));
                }
            };
            match next {
                Some(Ok(pb::ServerMessage { msg: Some(m) })) => self.handle(m, &tx),
                Some(Ok(_)) => {}
                Some(Err(e)) => break Err(SessionEnd::from_status(&e)),
                None => break Err(SessionEnd::Broken("server closed the session".into())),
            }
        }
    }

    fn handle(self: &Arc<Self>, msg: In, tx: &mpsc::UnboundedSender<pb::AgentMessage>) {
        match msg {
            In::ReadFile(r) => self.read_file(r, tx.clone()),
            In::Assign(batch) => self.start_attempts(batch),
            In::Cancel(c) => {
                let running = lock(&self.running);
                match running.get(&c.attempt_id) {
                    Some(r) => {
                        tracing::info!(attempt_id = c.attempt_id, reason = %c.reason, "stopping attempt");
                        let _ = r.stop.send(StopReason::Cancel);
                    }
                    None => {
                        tracing::debug!(attempt_id = c.attempt_id, "cancel for an attempt not running here")
                    }
                }
            }
            In::Ack(a) => self.outbox.ack(a.seq),
            In::LeaseRenewed(r) => self.lease.renewed(r.heartbeat_seq),
            In::Registered(_) => tracing::warn!("unexpected second Registered"),
        }
    }

    /// Why the node takes no new work now (its work dir's disk is full), logged when that
    /// changes; empty while it takes work.
    fn disk_pause(&self) -> String {
        let why = crate::monitor::disk_pause(&self.config.work_dir, self.config.min_free).unwrap_or_default();
        let mut last = lock(&self.paused);
        if *last != why {
            match why.as_str() {
                "" => tracing::info!("disk space returned; taking work again"),
                _ => tracing::warn!(why = %why, "taking no new work"),
            }
            last.clone_from(&why);
        }
        why
    }

    /// Stops every attempt once the node's lease ran out unrenewed: by then the server hands
    /// them to other nodes (its reaper fences this node off), so running them on would run
    /// them twice. A session that still looks up is ended too: it carries nothing.
    async fn watch_lease(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.lease.check_period()).await;
            let Some(lease) = self.lease.lapsed(std::time::Instant::now()) else { continue };
            let stops: Vec<_> = lock(&self.running).values().map(|r| r.stop.clone()).collect();
            tracing::warn!(
                lease_ms = lease.as_millis() as u64,
                attempts = stops.len(),
                "the node's lease ran out without renewal; stopping its attempts, which the server hands on"
            );
            for stop in stops {
                let _ = stop.send(StopReason::LeaseLost);
            }
            self.lease_lapsed.notify_waiters();
        }
    }

    /// Serves one window of a live download from a running attempt's workspace.
    fn read_file(&self, read: pb::ReadFile, tx: mpsc::UnboundedSender<pb::AgentMessage>) {
        let workspace = lock(&self.running).get(&read.attempt_id).map(|r| r.workspace.clone());
        tokio::spawn(async move {
            let emit =
                |chunk: pb::FileChunk| tx.send(pb::AgentMessage { msg: Some(Msg::FileChunk(chunk)) }).is_ok();
            match workspace {
                Some(ws) => crate::files::read_window(&ws, &read, emit).await,
                None => {
                    emit(pb::FileChunk {
                        request_id: read.request_id,
                        last: true,
                        error: "the attempt is no longer running on this node".into(),
                        ..Default::default()
                    });
                }
            }
        });
    }

    /// Starts the attempts of one assignment message. A message beyond the protocol's limit
    /// comes from a server that does not keep it: every attempt in it is refused rather than
    /// some run and some not.
    fn start_attempts(self: &Arc<Self>, batch: pb::Assignments) {
        if batch.attempts.len() > pb::MAX_ASSIGNS_PER_MESSAGE {
            let why = format!(
                "the server sent {} assignments in one message; an agent takes at most {}",
                batch.attempts.len(),
                pb::MAX_ASSIGNS_PER_MESSAGE
            );
            for a in &batch.attempts {
                self.refuse(a, why.clone());
            }
            return;
        }
        for a in batch.attempts {
            self.start_attempt(a);
        }
    }

    /// Reports an attempt as failed to start without running anything of it.
    fn refuse(self: &Arc<Self>, a: &pb::Assign, why: String) {
        if lock(&self.running).contains_key(&a.attempt_id) {
            return;
        }
        let outbox = self.outbox.clone();
        let attempt_id = a.attempt_id;
        let span = tracing::info_span!("task", job_id = a.job_id, task_id = a.task_id, attempt_id);
        tokio::spawn(async move { attempt::refuse(&outbox, attempt_id, &why).await }.instrument(span));
    }

    fn start_attempt(self: &Arc<Self>, a: pb::Assign) {
        let attempt_id = a.attempt_id;
        if lock(&self.running).contains_key(&attempt_id) {
            return;
        }
        // The plan is the task's one description: an attempt whose plan this agent cannot
        // read in full is refused, never run with guessed defaults.
        let plan: TaskPlan = match serde_json::from_str(&a.plan_json) {
            Ok(plan) => plan,
            Err(e) => return self.refuse(&a, format!("cannot read the task's plan: {e}")),
        };
        // Beyond the room free now, an attempt waits its turn: the server assigns ahead onto
        // busy nodes, and its view may lag ours (an attempt it settled may still be stopping).
        let admission = lock(&self.capacity).admit(attempt_id, plan.resources.cores, plan.resources.memory);
        let (room, pin) = match admission {
            Admission::Now(reserved) => {
                let pin = reserved.pin_to();
                (Room::Held(reserved), pin)
            }
            Admission::Later(turn) => {
                tracing::debug!(job_id = a.job_id, task_id = a.task_id, attempt_id, "waiting for room");
                (Room::Waiting(turn), Vec::new())
            }
            Admission::Never(why) => return self.refuse(&a, why),
        };
        let io = (!plan.inputs.is_empty() || !plan.outputs.is_empty() || plan.agent.is_some()).then(|| {
            let mut outputs = plan.outputs.clone();
            if plan.agent.is_some() {
                outputs.push(crate::ai_task::PATCH_FILE.to_owned());
            }
            attempt::TaskIo {
                inputs: plan.inputs.clone(),
                outputs,
                outputs_on_failure: plan.outputs_on_failure,
                link: ServerLink::new(self.link.clone()),
                max_outputs: self.limits.max_outputs(),
                policy: crate::files::InputPolicy {
                    allow_local_urls: self.config.allow_local_urls,
                    ..Default::default()
                },
            }
        });
        let ai = plan.agent.map(|spec| AiTask {
            spec,
            inputs: plan.inputs,
            llm_key: a.llm_key,
            default_upstream: self.llm_upstream.clone(),
        });
        let spec = TaskSpec {
            job_id: a.job_id,
            task_id: a.task_id,
            attempt_id,
            steps: plan.steps.iter().map(|c| c.to_argv()).collect(),
            env: plan.env,
            workspace: self
                .config
                .work_dir
                .join(format!("job-{}", a.job_id))
                .join(format!("attempt-{attempt_id}")),
            cpus: pin,
            memory_limit: plan.resources.memory,
            pids_limit: u64::from(plan.resources.pids),
            allow_root: a.allow_root,
            image: plan.image,
            user: plan.user,
            network: plan.network,
            services: plan.services,
            secrets: a.secrets.into_iter().collect(),
            host_ports: Vec::new(),
            setup_timeout: plan.setup_timeout.filter(|t| !t.is_zero()),
        };
        // A zero timeout is no timeout, as the job file reads.
        let timeout = plan.timeout.filter(|t| !t.is_zero());
        let kind = plan.runtime.as_str().to_owned();
        let image_blob = plan.image_blob;
        self.launch(Launch {
            spec,
            kind,
            image_blob,
            timeout,
            room,
            resume: None,
            io,
            ai,
            ai_resume: None,
            max_log: None,
        });
    }

    /// Runs an attempt in the background: a new one, or (with `resume`) one an earlier agent
    /// run started.
    fn launch(self: &Arc<Self>, launch: Launch) {
        let Launch { mut spec, kind, image_blob, timeout, room, resume, io, ai, ai_resume, max_log } = launch;
        let attempt_id = spec.attempt_id;
        let runtime = self.runtimes.get(&kind).cloned();
        let (stop_tx, mut stop_rx) = watch::channel(StopReason::None);
        let workspace = spec.workspace.clone();
        lock(&self.running).insert(attempt_id, Running { stop: stop_tx, workspace });
        let this = self.clone();
        let span = tracing::info_span!("task", job_id = spec.job_id, task_id = spec.task_id, attempt_id);
        tokio::spawn(
            async move {
                let reserved = match room {
                    Room::Held(reserved) => reserved,
                    Room::Waiting(turn) => match this.wait_for_room(attempt_id, turn, &mut stop_rx).await {
                        Some(reserved) => {
                            spec.cpus = reserved.pin_to();
                            reserved
                        }
                        None => {
                            lock(&this.running).remove(&attempt_id);
                            return;
                        }
                    },
                };
                let workspace = spec.workspace.clone();
                match runtime {
                    Some(runtime) => {
                        let image = image_blob
                            .map(|blob| attempt::ImageToLoad { blob, fetcher: this.images.clone() });
                        let capacity = this.capacity.clone();
                        let runner = attempt::Runner {
                            runtime,
                            outbox: this.outbox.clone(),
                            journal: this.journal.clone(),
                            grace: this.config.kill_grace,
                            io,
                            max_log: max_log.unwrap_or_else(|| this.limits.max_log()),
                            ai,
                            ai_resume,
                            image,
                            // The next attempt in line starts while this one keeps its outputs
                            // and reports its end.
                            sandbox_gone: Some(Box::new(move || lock(&capacity).release(reserved))),
                        };
                        attempt::run(runner, spec, timeout, stop_rx, resume).await;
                    }
                    None => {
                        lock(&this.capacity).release(reserved);
                        attempt::refuse(&this.outbox, attempt_id, &format!("this node has no {kind} runtime"))
                            .await
                    }
                }
                lock(&this.running).remove(&attempt_id);
                if let Err(e) = tokio::fs::remove_dir_all(&workspace).await {
                    tracing::debug!(error = %e, "workspace not removed");
                }
            }
            .instrument(span),
        );
    }

    /// Waits for an attempt's turn to start, or for it to be stopped first. A cancel reports
    /// the attempt as cancelled before it started; a shutdown leaves it unreported, like the
    /// attempts it stops for the next start's recovery (the server settles it when this node
    /// registers again without it). `None` when the attempt is not to run.
    async fn wait_for_room(
        &self,
        attempt_id: i64,
        mut turn: tokio::sync::oneshot::Receiver<Reserved>,
        stop: &mut watch::Receiver<StopReason>,
    ) -> Option<Reserved> {
        let reason = tokio::select! {
            given = &mut turn => return given.ok(),
            reason = stopped(stop) => reason,
        };
        let withdrawn = lock(&self.capacity).withdraw(attempt_id);
        if !withdrawn && let Ok(given) = turn.try_recv() {
            // The turn came as the stop did: the room goes on to the next in line.
            lock(&self.capacity).release(given);
        }
        tracing::info!(attempt_id, ?reason, "stopped while waiting for room");
        if reason == StopReason::Cancel {
            attempt::cancelled_before_start(&self.outbox, attempt_id).await;
        }
        None
    }
}

/// Resolves once `stop` asks the attempt to stop, with why; a dropped sender counts as a
/// shutdown.
async fn stopped(stop: &mut watch::Receiver<StopReason>) -> StopReason {
    loop {
        let reason = *stop.borrow_and_update();
        if reason != StopReason::None {
            return reason;
        }
        if stop.changed().await.is_err() {
            return StopReason::Shutdown;
        }
    }
}
