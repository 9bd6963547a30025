//! The process runtime: runs each step as a plain child process of the agent.
//!
//! Each step gets its own session and process group (`setsid` before exec), so one `killpg`
//! reaches everything the step started, and live stats can find its processes by process
//! group in `/proc`. The agent reaps the leader itself with `wait4`, which also yields the
//! rusage (CPU time and peak RSS, descendants included) that `tokio::process` would discard.
//! Memory limits use a per-attempt cgroup when a writable memory controller exists.

mod cgroup;
mod confine;
mod pidfd;
mod supervisor;
mod tail;

pub use confine::Isolation;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use drover_guest::procs;

use super::lines;
use super::steps::{self, Finished, LiveMax, StepTable, larger, lock};

use self::cgroup::{AttemptCgroup, Cgroups, CreateError, Limits, Pool, StepCgroup};
use super::{ExitStatus, OutputSink, RunHandle, Runtime, RuntimeError, StopSignal, Stream, TaskSpec, Usage};

/// Bound on how long `wait` may take after a step's end in the test below: output a background
/// process writes after the end is not the step's, so it never holds `wait` up.
#[cfg(test)]
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(3);

/// How often an attached (not our child) process is checked for exit.
const ATTACH_POLL: Duration = Duration::from_millis(100);

/// PATH used when neither the task nor the agent has one.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Limits every process task gets, whatever it asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessConfig {
    /// Most processes and threads of a task that sets no `resources.pids` (a fork bomb stops
    /// there); 0 = no default. Applied where the pids controller is usable.
    pub default_pids: u64,
    /// Open files per process (soft and hard `RLIMIT_NOFILE`), capped at the agent's own hard
    /// limit.
    pub open_files: u64,
    /// Names this agent's cgroups apart from other agents' on the same host; stable across
    /// restarts (the CLI derives it from the work dir), so a restarted agent finds its own.
    pub scope: String,
    /// How tasks are confined when the agent runs as root; `None` runs them as the agent's
    /// own user, as an unprivileged agent has to.
    pub isolation: Option<Isolation>,
    /// Where steps' supervisors keep their output and exit status (kept across agent
    /// restarts, out of the tasks' reach); default a directory of the scope in the system's temp
    /// dir.
    pub steps_dir: Option<PathBuf>,
    /// Most emptied attempt cgroups kept for later attempts instead of being removed and made
    /// again (0: none).
    pub cgroup_pool: usize,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        ProcessConfig {
            default_pids: 8192,
            open_files: 65536,
            // Per process: runtimes of different processes (tests, embedders) reuse attempt
            // ids, and must not share cgroups or step files. The agent passes a stable scope.
            scope: format!("local{}", std::process::id()),
            isolation: None,
            steps_dir: None,
            // About as many as attempts run at once on a node, with room for their turnover.
            cgroup_pool: std::thread::available_parallelism().map_or(4, |n| 2 * n.get()),
        }
    }
}

/// Runs steps as child processes of the agent, each in its own process group.
#[derive(Debug)]
pub struct ProcessRuntime {
    state: Arc<Mutex<State>>,
    steps: StepTable<StepState>,
    config: ProcessConfig,
    cgroups: Cgroups,
    /// Emptied attempt cgroups for later attempts.
    pool: Pool,
    /// Task uids, when tasks are confined.
    uids: Option<Arc<super::uids::UidPool>>,
    /// Whether mount namespaces work here (tried at start).
    namespaces: bool,
    /// See [`ProcessConfig::steps_dir`].
    steps_dir: PathBuf,
    /// Forks each step's supervisor.
    launcher: Arc<supervisor::Launcher>,
}

impl Default for ProcessRuntime {
    fn default() -> Self {
        Self::with_config(ProcessConfig::default())
    }
}

#[derive(Debug, Default)]
struct State {
    /// `None` records that cgroup creation was tried and failed, so later steps of the same
    /// attempt do not probe again.
    cgroups: HashMap<i64, Option<Arc<AttemptCgroup>>>,
    /// Who each confined attempt runs as.
    identities: HashMap<i64, confine::Identity>,
}

/// What the runtime knows about one step, started here or attached after a restart.
#[derive(Debug)]
struct StepState {
    pid: i32,
    /// Equal to `pid`: `setsid` made the leader the group leader.
    pgid: i32,
    /// Set once the leader has been reaped (or, when attached, has disappeared) and the output
    /// pipes are drained.
    finished: watch::Receiver<Option<Finished>>,
    /// Highest live usage seen by `stats`, so the final usage is never below a live reading
    /// (rusage misses descendants that were never waited for).
    live: LiveMax,
    cgroup: Option<Arc<StepCgroup>>,
}

impl ProcessRuntime {
    /// Creates a runtime with no steps running and the default limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates a runtime with `config`; finds which cgroup controllers it can use.
    pub fn with_config(config: ProcessConfig) -> Self {
        let cgroups = Cgroups::probe(&config.scope);
        // Confinement needs root: only root can hand out uids and make mount namespaces.
        let root = nix::unistd::geteuid().is_root();
        let config = ProcessConfig { isolation: config.isolation.filter(|_| root), ..config };
        let uids = config.isolation.as_ref().map(|i| Arc::new(super::uids::UidPool::new(i.uids.clone())));
        let namespaces = config.isolation.is_some() && confine::namespaces_work();
        let steps_dir = config
            .steps_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("drover-steps-{}", config.scope)));
        // Created lazily would race between steps; a failure shows at the first step's start.
        {
            use std::os::unix::fs::DirBuilderExt;
            let _ = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&steps_dir);
        }
        sweep_idle_cgroups(&cgroups, &steps_dir);
        ProcessRuntime {
            state: Arc::default(),
            steps: StepTable::default(),
            pool: Pool::new(config.cgroup_pool),
            config,
            cgroups,
            uids,
            namespaces,
            steps_dir,
            launcher: Arc::default(),
        }
    }

    /// The limits this node enforces on process tasks (reported at start and turned into node
    /// labels, so that tasks needing one are placed only where it holds).
    pub fn enforces(&self) -> Vec<drover_core::enforce::Limit> {
        self.cgroups.enforces()
    }

    /// The pool task uids come from when tasks are confined; other sandboxes of the node (a
    /// microVM's QEMU) take theirs from it too.
    pub fn uid_pool(&self) -> Option<Arc<super::uids::UidPool>> {
        self.uids.clone()
    }

    /// The cgroup controllers in use, in words for the agent's start-up line.
    pub fn describe_cgroups(&self) -> String {
        self.cgroups.describe()
    }

    /// How tasks are confined, in words for the agent's start-up line.
    pub fn describe_confinement(&self) -> String {
        match (&self.config.isolation, self.namespaces) {
            (None, _) => "tasks run as the agent's own user (it is not root)".into(),
            (Some(i), true) => format!(
                "each task runs as its own uid ({}-{}) in a mount namespace that hides the agent's state",
                i.uids.start,
                i.uids.end.saturating_sub(1)
            ),
            (Some(i), false) => format!(
                "each task runs as its own uid ({}-{}); no mount namespaces here, so file permissions \
                 alone keep the agent's state from tasks",
                i.uids.start,
                i.uids.end.saturating_sub(1)
            ),
        }
    }

    /// The identity an attempt's steps run as, chosen on its first step: the account its job
    /// names, or a fresh uid. `None` when tasks are not confined.
    fn identity(&self, task: &TaskSpec) -> Result<Option<confine::Identity>, RuntimeError> {
        let start_error = |message: String| RuntimeError::Start {
            command: task.steps.first().and_then(|s| s.first()).cloned().unwrap_or_default(),
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, message),
        };
        let (Some(isolation), Some(uids)) = (&self.config.isolation, &self.uids) else {
            return match &task.user {
                Some(user) => Err(start_error(format!(
                    "cannot run as `{user}`: this node's agent does not run as root"
                ))),
                None => Ok(None),
            };
        };
        if let Some(known) = self.lock().identities.get(&task.attempt_id) {
            return Ok(Some(*known));
        }
        let identity = match &task.user {
            Some(user) => confine::named_identity(user, &isolation.run_as).map_err(start_error)?,
            None => {
                let uid = uids.take(task.attempt_id).ok_or_else(|| {
                    start_error("every task uid of this node is in use; widen --task-uids".into())
                })?;
                confine::Identity { uid, gid: uid }
            }
        };
        // The workspace (inputs included) and the private /tmp become the task's own.
        let tmp = self.tmp_dir(task.attempt_id);
        let owned = std::fs::create_dir_all(&tmp)
            .and_then(|()| confine::give_tree(&tmp, identity))
            .and_then(|()| confine::give_tree(&task.workspace, identity))
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o700))?;
                std::fs::set_permissions(&task.workspace, std::fs::Permissions::from_mode(0o700))
            });
        if let Err(source) = owned {
            if task.user.is_none() {
                uids.give_back(identity.uid);
            }
            return Err(RuntimeError::Io {
                context: format!("give the workspace to uid {}", identity.uid),
                source,
            });
        }
        self.lock().identities.insert(task.attempt_id, identity);
        Ok(Some(identity))
    }

    /// The private `/tmp` of an attempt, inside the agent's (hidden) state.
    fn tmp_dir(&self, attempt_id: i64) -> PathBuf {
        let base =
            self.config.isolation.as_ref().map_or_else(std::env::temp_dir, |i| i.state_dir.join(".tmp"));
        base.join(format!("attempt-{attempt_id}"))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn step_state(&self, handle: &RunHandle) -> Result<Arc<StepState>, RuntimeError> {
        self.steps.get(handle)
    }

    /// The attempt's cgroup, made on its first step. A limit the task asked for that cannot
    /// be set is an error: the task never runs without it. Without any limit asked for, a
    /// failure only costs accounting and the default pids limit, so the step runs anyway.
    fn attempt_cgroup(&self, task: &TaskSpec) -> Result<Option<Arc<AttemptCgroup>>, RuntimeError> {
        if let Some(known) = self.lock().cgroups.get(&task.attempt_id) {
            return Ok(known.clone());
        }
        let asked = task.memory_limit > 0 || task.pids_limit > 0;
        if !asked && !self.cgroups.any() {
            return Ok(None);
        }
        let limits = Limits {
            memory: task.memory_limit,
            pids: if task.pids_limit > 0 { task.pids_limit } else { self.config.default_pids },
            cores: task.cpus.len() as u32,
        };
        // Steps of a one-step attempt run in the attempt cgroup itself: a leaf would only repeat
        // its figures.
        let leaves = task.steps.len() > 1;
        let made = self.cgroups.check(limits).map_err(CreateError::from).and_then(|()| {
            match self.reuse_cgroup(task.attempt_id, limits, leaves) {
                Some(cgroup) => Ok(cgroup),
                None => self.cgroups.create(task.attempt_id, limits, leaves),
            }
        });
        let created = match made {
            Ok(cgroup) => Some(Arc::new(cgroup)),
            Err(error) => {
                if let Some(partial) = self.cgroups.existing(task.attempt_id) {
                    let attempt_id = task.attempt_id;
                    tokio::spawn(async move { partial.remove().await });
                    tracing::debug!(attempt_id, "removing a half-made cgroup");
                }
                if asked {
                    return Err(RuntimeError::Limit(error.to_string()));
                }
                tracing::warn!(attempt_id = task.attempt_id, %error, "running without a cgroup");
                None
            }
        };
        Ok(self.lock().cgroups.entry(task.attempt_id).or_insert(created).clone())
    }

    /// An idle cgroup of the pool for an attempt, once it is recorded as the attempt's claim.
    fn reuse_cgroup(&self, attempt_id: i64, limits: Limits, leaves: bool) -> Option<AttemptCgroup> {
        let cgroup = self.pool.take(&self.cgroups, limits, leaves)?;
        // The claim goes down before any process joins, so cleanup after a restart finds it.
        // Renamed from the idle cgroup's marker: a rename makes no new file, which on a busy
        // node costs more than the rename (finding a free inode).
        let claim = self.claim_path(attempt_id);
        let claimed = std::fs::rename(self.idle_marker(cgroup.name()), &claim)
            .or_else(|_| std::fs::write(&claim, cgroup.name()));
        match claimed {
            Ok(()) => Some(cgroup),
            Err(error) => {
                tracing::warn!(attempt_id, %error, "cannot record the attempt's cgroup; making a new one");
                tokio::spawn(async move { cgroup.remove().await });
                None
            }
        }
    }

    /// The file that names the reused cgroup an attempt runs in. A cgroup made for the attempt
    /// needs none: it carries the attempt's id.
    fn claim_path(&self, attempt_id: i64) -> PathBuf {
        self.steps_dir.join(format!("attempt-{attempt_id}.cgroup"))
    }

    /// The file that names an idle cgroup of the pool, renamed to a claim when an attempt
    /// gets the cgroup and back when it returns.
    fn idle_marker(&self, cgroup: &str) -> PathBuf {
        self.steps_dir.join(format!("{cgroup}.idle"))
    }

    /// Gives the stopped attempt's cgroup to the pool, or removes it, and drops its claim.
    async fn return_cgroup(&self, attempt_id: i64, cgroup: AttemptCgroup) {
        let claim = self.claim_path(attempt_id);
        let claimed = cgroup.name() != self.cgroups.dir_name(attempt_id);
        let Some(ready) = self.pool.ready_for_reuse(&self.cgroups, cgroup).await else {
            if claimed {
                let _ = std::fs::remove_file(&claim);
            }
            return;
        };
        let marker = self.idle_marker(ready.name());
        // The claim becomes the marker (a cgroup new to the pool gets one, once).
        let marked =
            if claimed { std::fs::rename(&claim, &marker) } else { std::fs::write(&marker, ready.name()) };
        if let Err(error) = marked {
            tracing::debug!(attempt_id, %error, "cannot mark an idle cgroup; it is claimed afresh");
        }
        if let Some(full) = self.pool.put(ready) {
            full.remove().await;
            let _ = std::fs::remove_file(&marker);
        }
    }

    /// The cgroup an attempt unknown to this runtime ran in (an earlier agent process started
    /// it): the one its claim names, or the one named after it, unless this runtime uses that
    /// one for another attempt.
    fn leftover_cgroup(&self, attempt_id: i64) -> Option<AttemptCgroup> {
        let cgroup = match std::fs::read_to_string(self.claim_path(attempt_id)) {
            Ok(name) => self.cgroups.named(name.trim()),
            Err(_) => self.cgroups.existing(attempt_id),
        }?;
        let used_here = self.pool.holds(cgroup.name())
            || self.lock().cgroups.values().flatten().any(|c| c.name() == cgroup.name());
        (!used_here).then_some(cgroup)
    }
}

/// Removes the idle cgroups an earlier agent process of this scope left when it was killed
/// (their markers are in `steps_dir`).
fn sweep_idle_cgroups(cgroups: &Cgroups, steps_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(steps_dir) else { return };
    for marker in entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "idle")) {
        let Some(name) = std::fs::read_to_string(&marker).ok() else { continue };
        if Pool::remove_left_idle(cgroups, name.trim()) {
            let _ = std::fs::remove_file(&marker);
        } else {
            tracing::warn!(cgroup = name.trim(), "an idle cgroup left by an earlier agent run is not empty");
        }
    }
}

impl Drop for ProcessRuntime {
    fn drop(&mut self) {
        for name in self.pool.clear() {
            let _ = std::fs::remove_file(self.idle_marker(&name));
        }
    }
}

#[async_trait]
impl Runtime for ProcessRuntime {
    fn kind(&self) -> &'static str {
        "process"
    }

    async fn prepare(&self, task: &TaskSpec) -> Result<(), RuntimeError> {
        tokio::fs::create_dir_all(&task.workspace).await.map_err(|source| RuntimeError::Io {
            context: format!("create workspace {}", task.workspace.display()),
            source,
        })
    }

    async fn start(&self, task: &TaskSpec, step: usize, out: OutputSink) -> Result<RunHandle, RuntimeError> {
        let argv = super::steps::argv_of(task, step)?;
        let start_error = |source| RuntimeError::Start { command: argv[0].clone(), source };

        let env = step_env(task);
        let search_path = env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.clone());
        let program =
            resolve_program(&argv[0], search_path.as_deref(), &task.workspace).map_err(start_error)?;
        let cgroup = match self.attempt_cgroup(task)? {
            Some(attempt) => match attempt.step(step) {
                Ok(leaf) => Some(Arc::new(leaf)),
                Err(error) => {
                    tracing::debug!(attempt_id = task.attempt_id, step, %error, "cannot create step cgroup");
                    None
                }
            },
            None => None,
        };

        let confinement = match self.identity(task)? {
            Some(identity) => {
                let isolation = self.config.isolation.as_ref().ok_or_else(|| RuntimeError::Io {
                    context: "confine the step".into(),
                    source: std::io::Error::other("an identity without isolation settings"),
                })?;
                let tmp = self.tmp_dir(task.attempt_id);
                Some(
                    confine::Confinement::prepare(
                        identity,
                        &task.workspace,
                        &tmp,
                        isolation,
                        self.namespaces,
                    )
                    .map_err(|source| RuntimeError::Io {
                        context: "prepare the step's confinement".into(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        let files = supervisor::StepFiles::new(&self.steps_dir, task.attempt_id, step);
        files.remove();
        let request = supervisor::StepRequest {
            program: program.clone(),
            argv: argv.to_vec(),
            env,
            cwd: task.workspace.clone(),
            files: files.clone(),
            cpus: task.cpus.clone(),
            open_files: open_files(&self.config),
            cgroup_procs: cgroup
                .as_ref()
                .map(|c| c.procs_paths().iter().map(path_of).collect())
                .unwrap_or_default(),
            confinement,
        };
        let launcher = self.launcher.clone();
        // The supervisor is watched at once: its pidfd names it even if its pid is used again.
        let (launched, watch) = tokio::task::spawn_blocking(move || {
            launcher.launch(&request).map(|launched| (launched, pidfd::watch(launched.supervisor)))
        })
        .await
        .map_err(|e| start_error(std::io::Error::other(e)))?
        .map_err(start_error)?;
        let pid = launched.step;
        let start_ticks = procs::read(pid).map(|s| s.start_ticks);
        tracing::info!(attempt_id = task.attempt_id, step, pid, supervisor = launched.supervisor, program = %program.display(), "step started");
        let ended = tail::Ended::default();
        let readers =
            follow_output(&files, (0, 0), &ended, step, out, task.attempt_id, pid).map_err(|source| {
                let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
                RuntimeError::Io { context: "follow the step's output".into(), source }
            })?;
        let (tx, rx) = watch::channel(None);
        let state = Arc::new(StepState { pid, pgid: pid, finished: rx, live: LiveMax::default(), cgroup });
        let supervisor = Some(watch);
        tokio::spawn(supervise_step(
            state.clone(),
            supervisor,
            files,
            readers,
            ended,
            tx,
            task.attempt_id,
            step,
        ));
        self.steps.insert(task.attempt_id, step, state);
        Ok(RunHandle {
            attempt_id: task.attempt_id,
            step,
            pid: Some(pid),
            pid_start_ticks: start_ticks,
            sandbox_id: None,
        })
    }

    fn output_has_offsets(&self) -> bool {
        true
    }

    async fn replay(
        &self,
        attempt_id: i64,
        step: usize,
        from: (u64, u64),
        out: OutputSink,
    ) -> Result<bool, RuntimeError> {
        // An earlier step's files stay until the attempt is cleaned up.
        let files = supervisor::StepFiles::new(&self.steps_dir, attempt_id, step);
        if supervisor::read_status(&files.status()).is_none() {
            return Ok(false);
        }
        let ended = tail::Ended::default();
        ended.set();
        for (path, offset, stream) in
            [(files.stdout(), from.0, Stream::Stdout), (files.stderr(), from.1, Stream::Stderr)]
        {
            let io = |source| RuntimeError::Io { context: format!("read {} again", path.display()), source };
            let reader = tail::Tail::open(&path, offset, ended.clone()).map_err(io)?;
            lines::pump(reader, stream, step, out.clone(), Some(offset)).await.map_err(io)?;
        }
        Ok(true)
    }

    async fn attach(
        &self,
        handle: &RunHandle,
        out: OutputSink,
        from: (u64, u64),
    ) -> Result<bool, RuntimeError> {
        let Some(pid) = handle.pid else {
            return Ok(false);
        };
        if let Ok(known) = self.step_state(handle)
            && known.pid == pid
        {
            return Ok(known.finished.borrow().is_none());
        }
        // The step's supervisor outlived the previous agent process: the status file says how
        // the step ended (once it did), and the output files hold what it wrote, shipped on from
        // where the previous process got to (`from`, see `crate::reach`).
        let files = supervisor::StepFiles::new(&self.steps_dir, handle.attempt_id, handle.step);
        let recorded = supervisor::read_status(&files.status()).is_some();
        // A step that ended at once may have been reaped before its start time was read.
        let running = handle.pid_start_ticks.is_some_and(|ticks| is_same_process(pid, ticks));
        if pid <= 0 || !(recorded || running) {
            return Ok(false);
        }
        let ended = tail::Ended::default();
        let readers = follow_output(&files, from, &ended, handle.step, out, handle.attempt_id, pid)
            .map_err(|source| RuntimeError::Io { context: "follow the step's output".into(), source })?;
        let (tx, rx) = watch::channel(None);
        let state =
            Arc::new(StepState { pid, pgid: pid, finished: rx, live: LiveMax::default(), cgroup: None });
        tokio::spawn(supervise_step(
            state.clone(),
            None,
            files,
            readers,
            ended,
            tx,
            handle.attempt_id,
            handle.step,
        ));
        self.steps.insert(handle.attempt_id, handle.step, state);
        // A confined step keeps its uid: no new task may get it while this one runs.
        if let (Some(uids), Some(uid)) = (&self.uids, procs::uid_of(pid)) {
            uids.claim(uid);
        }
        tracing::info!(attempt_id = handle.attempt_id, step = handle.step, pid, "attached to running step");
        Ok(true)
    }

    async fn signal(&self, handle: &RunHandle, signal: StopSignal) -> Result<(), RuntimeError> {
        let state = self.step_state(handle)?;
        let signal = match signal {
            StopSignal::Terminate => Signal::SIGTERM,
            StopSignal::Kill => Signal::SIGKILL,
        };
        tracing::debug!(attempt_id = handle.attempt_id, pid = state.pid, ?signal, "signalling process group");
        signal_group(state.pgid, signal).map_err(|source| RuntimeError::Io {
            context: format!("send {signal} to process group {}", state.pgid),
            source,
        })
    }

    async fn wait(&self, handle: &RunHandle) -> Result<ExitStatus, RuntimeError> {
        let state = self.step_state(handle)?;
        Ok(wait_finished(&state).await?.status)
    }

    async fn stats(&self, handle: &RunHandle) -> Result<Usage, RuntimeError> {
        let state = self.step_state(handle)?;
        if let Some(finished) = *state.finished.borrow() {
            return Ok(finished.usage);
        }
        let pgid = state.pgid;
        let group = tokio::task::spawn_blocking(move || procs::group_usage(pgid)).await.map_err(|e| {
            RuntimeError::Io { context: "scan /proc".into(), source: std::io::Error::other(e) }
        })?;
        let mut usage = Usage { cpu_seconds: group.cpu_seconds, peak_memory_bytes: group.rss_bytes };
        if let Some(cgroup) = &state.cgroup {
            usage = larger(usage, cgroup_usage(cgroup));
        }
        Ok(state.live.record(usage))
    }

    async fn cleanup(&self, task: &TaskSpec) -> Result<(), RuntimeError> {
        let steps = self.steps.take_attempt(task.attempt_id);
        let cgroup = self.lock().cgroups.remove(&task.attempt_id).flatten();
        for step in steps {
            let running = step.finished.borrow().is_none();
            // Once the leader is reaped, its pid is only safe to use as a group id while some
            // member still holds it; an empty group's id may have been reused.
            // A step in a cgroup needs no search: removing or emptying the attempt's cgroup
            // below kills whatever of it is left.
            let survivors = running
                || step.cgroup.is_none() && {
                    let pgid = step.pgid;
                    tokio::task::spawn_blocking(move || !procs::alive_members(pgid).is_empty())
                        .await
                        .unwrap_or(false)
                };
            if survivors {
                tracing::debug!(attempt_id = task.attempt_id, pid = step.pid, "killing survivors of step");
                if let Err(error) = signal_group(step.pgid, Signal::SIGKILL) {
                    tracing::warn!(attempt_id = task.attempt_id, pid = step.pid, %error, "cannot kill survivors");
                }
            }
        }
        match cgroup {
            Some(cgroup) => match Arc::try_unwrap(cgroup) {
                Ok(cgroup) => self.return_cgroup(task.attempt_id, cgroup).await,
                Err(shared) => {
                    shared.remove().await;
                    let _ = std::fs::remove_file(self.claim_path(task.attempt_id));
                }
            },
            None => {
                if let Some(cgroup) = self.leftover_cgroup(task.attempt_id) {
                    cgroup.remove().await;
                    let _ = std::fs::remove_file(self.claim_path(task.attempt_id));
                }
            }
        }
        for step in 0..task.steps.len().max(1) {
            supervisor::StepFiles::new(&self.steps_dir, task.attempt_id, step).remove();
        }
        // Only now, with every process of the attempt gone, may its uid go to another task.
        let identity = self.lock().identities.remove(&task.attempt_id);
        if let (Some(uids), Some(identity), None) = (&self.uids, identity, &task.user) {
            uids.give_back(identity.uid);
        }
        if self.config.isolation.is_some() {
            let tmp = self.tmp_dir(task.attempt_id);
            if let Err(e) = tokio::fs::remove_dir_all(&tmp).await
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(attempt_id = task.attempt_id, error = %e, "cannot remove the task's /tmp");
            }
        }
        Ok(())
    }
}

fn cgroup_usage(cgroup: &StepCgroup) -> Usage {
    Usage {
        cpu_seconds: cgroup.cpu_seconds().unwrap_or(0.0),
        peak_memory_bytes: cgroup.peak_memory().unwrap_or(0),
    }
}

async fn wait_finished(state: &StepState) -> Result<Finished, RuntimeError> {
    steps::wait_finished(&state.finished, &format!("supervisor of pid {}", state.pid)).await
}

fn unknown_status() -> ExitStatus {
    ExitStatus { code: None, signal: None, oom: false }
}

/// Follows a step's output files from `from` (stdout, stderr offsets): one reader per stream.
fn follow_output(
    files: &supervisor::StepFiles,
    from: (u64, u64),
    ended: &tail::Ended,
    step: usize,
    out: OutputSink,
    attempt_id: i64,
    pid: i32,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    let mut readers = Vec::with_capacity(2);
    for (path, offset, stream) in
        [(files.stdout(), from.0, Stream::Stdout), (files.stderr(), from.1, Stream::Stderr)]
    {
        let reader = tail::Tail::open(&path, offset, ended.clone())?;
        let sink = out.clone();
        readers.push(tokio::spawn(async move {
            if let Err(error) = lines::pump(reader, stream, step, sink, Some(offset)).await {
                tracing::warn!(attempt_id, pid, ?stream, %error, "reading step output failed");
            }
        }));
    }
    Ok(readers)
}

/// Waits for a step's end (through its supervisor's pidfd when it was started here, else by
/// watching for the status file), lets its output drain, and publishes how it ended.
#[allow(clippy::too_many_arguments)]
async fn supervise_step(
    state: Arc<StepState>,
    supervisor: Option<pidfd::Watch>,
    files: supervisor::StepFiles,
    readers: Vec<JoinHandle<()>>,
    ended: tail::Ended,
    tx: watch::Sender<Option<Finished>>,
    attempt_id: i64,
    step: usize,
) {
    let pid = state.pid;
    let status_file = files.status();
    match supervisor {
        // A status written already means the supervisor is gone (or going) whatever the
        // pidfd refers to.
        Some(pidfd::Watch::Pidfd(fd)) if !status_file.exists() => pidfd::exited(fd).await,
        Some(pidfd::Watch::Pidfd(_) | pidfd::Watch::Gone) => {}
        Some(pidfd::Watch::Poll) | None => loop {
            // Not our child: the status file appears when the step ends; a step gone
            // without one lost its supervisor too.
            tokio::time::sleep(ATTACH_POLL).await;
            if status_file.exists() || !procs::read(pid).is_some_and(|s| s.alive()) {
                break;
            }
        },
    }
    let recorded = supervisor::read_status(&files.status());
    ended.set();
    // The files are complete up to where they stood at the step's end, so the readers end;
    // all of it is shipped, however far the step ran ahead of the sink.
    futures::future::join_all(readers).await;
    let (mut status, rusage) = match recorded {
        Some(ended) => (decode_status(ended.raw), ended.usage),
        None => {
            tracing::warn!(attempt_id, pid, "the step's supervisor left no status; exit status unknown");
            (unknown_status(), Usage::default())
        }
    };
    let mut usage = larger(rusage, state.live.get());
    if let Some(cgroup) = &state.cgroup {
        usage = larger(usage, cgroup_usage(cgroup));
        status.oom = cgroup.oom_killed();
    }
    steps::publish_end(&tx, Finished { status, usage }, attempt_id, step, &format!("pid {pid}"));
}

fn is_same_process(pid: i32, ticks: u64) -> bool {
    procs::read(pid).is_some_and(|s| s.alive() && s.start_ticks == ticks)
}

fn signal_group(pgid: i32, signal: Signal) -> std::io::Result<()> {
    match nix::sys::signal::killpg(Pid::from_raw(pgid), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(errno) => Err(errno.into()),
    }
}

fn decode_status(raw: libc::c_int) -> ExitStatus {
    let status = procs::decode_wait(raw);
    ExitStatus { code: status.code, signal: status.signal, oom: false }
}

/// The open files every step may have: the configured number within the agent's own hard
/// limit.
fn open_files(config: &ProcessConfig) -> u64 {
    use nix::sys::resource::{Resource, getrlimit};
    let hard = getrlimit(Resource::RLIMIT_NOFILE).map(|(_, hard)| hard).unwrap_or(config.open_files);
    config.open_files.min(hard)
}

/// The environment of a step: a minimal base, then the task's variables and secrets (see
/// [`super::layered_env`]).
fn step_env(task: &TaskSpec) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.into())),
        ("HOME".into(), task.workspace.display().to_string()),
        ("DROVER_JOB_ID".into(), task.job_id.to_string()),
        ("DROVER_TASK_ID".into(), task.task_id.to_string()),
        ("DROVER_ATTEMPT_ID".into(), task.attempt_id.to_string()),
        ("DROVER_WORKSPACE".into(), task.workspace.display().to_string()),
    ];
    // A process shares the host's network: each endpoint is reachable where it listens.
    env.extend(task.host_ports.iter().map(|port| (port.env_var(), port.addr.to_string())));
    super::layered_env(env, task)
}

/// A C string path as a path.
fn path_of(path: &std::ffi::CString) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    PathBuf::from(std::ffi::OsStr::from_bytes(path.as_bytes()))
}

/// Finds the program of argv[0] in the step's PATH (or the default), relative to the workspace.
fn resolve_program(name: &str, search_path: Option<&str>, workspace: &Path) -> std::io::Result<PathBuf> {
    procs::resolve_program(name, search_path.unwrap_or(DEFAULT_PATH), workspace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::HostPort;
    use crate::runtime::conformance;

    conformance::runtime_conformance_tests!(ProcessRuntime::new());

    /// The same contract holds for confined tasks (when the tests run as root, as in CI).
    mod confined {
        use super::*;

        pub(super) fn runtime() -> ProcessRuntime {
            ProcessRuntime::with_config(ProcessConfig {
                isolation: Some(Isolation {
                    uids: Isolation::DEFAULT_UIDS,
                    run_as: Vec::new(),
                    state_dir: conformance::scratch_base(),
                    hide: Vec::new(),
                }),
                ..ProcessConfig::default()
            })
        }

        conformance::runtime_conformance_tests!(runtime());
    }

    #[tokio::test]
    async fn a_confined_task_cannot_reach_the_agent_state_other_workspaces_or_hidden_paths() {
        if !nix::unistd::geteuid().is_root() {
            assert!(std::env::var_os("CI").is_none(), "CI runs as root, so confinement must be tested");
            eprintln!("not root: tasks cannot be confined here; skipping");
            return;
        }
        // The agent's state under /tmp (as a work dir in a scratch checkout would be), which
        // the task's private /tmp covers; the confined conformance suite covers the other case.
        let state = tempfile::tempdir().expect("state dir");
        let hidden = conformance::scratch();
        std::fs::write(state.path().join(".journal"), "journal-secret\n").expect("journal");
        std::fs::create_dir_all(state.path().join("job-1/attempt-1")).expect("other workspace");
        std::fs::write(state.path().join("job-1/attempt-1/theirs.txt"), "other-task\n").expect("theirs");
        std::fs::write(hidden.path().join("drover.db"), "database-rows\n").expect("db");
        let runtime = ProcessRuntime::with_config(ProcessConfig {
            isolation: Some(Isolation {
                uids: Isolation::DEFAULT_UIDS,
                run_as: Vec::new(),
                state_dir: state.path().to_path_buf(),
                hide: vec![hidden.path().to_path_buf()],
            }),
            ..ProcessConfig::default()
        });
        let workspace = state.path().join("job-2/attempt-2");
        let marker = format!("drover-confined-{}", std::process::id());
        let script = format!(
            "id -u; cat {state}/.journal && echo LEAK-journal; \
             cat {state}/job-1/attempt-1/theirs.txt && echo LEAK-other; \
             cat {hidden}/drover.db && echo LEAK-db; \
             echo planted > {state}/planted && echo LEAK-write; \
             echo mine > mine.txt && echo wrote-workspace; \
             echo private > /tmp/{marker} && cat /tmp/{marker}",
            state = state.path().display(),
            hidden = hidden.path().display(),
        );
        let mut task = conformance::task(&workspace, vec![conformance::sh(&script)]);
        task.attempt_id = conformance::unique_attempt_id();
        runtime.prepare(&task).await.expect("prepare");
        let (status, chunks) = conformance::run_step(&runtime, &task, 0).await;
        let out: String = chunks.iter().map(|c| String::from_utf8_lossy(&c.data)).collect();
        assert_eq!(status.code, Some(0), "{out}");
        let uid: u32 = out.lines().next().and_then(|l| l.trim().parse().ok()).expect("uid line");
        assert!(Isolation::DEFAULT_UIDS.contains(&uid), "{out}");
        assert!(!out.contains("LEAK"), "{out}");
        assert!(out.contains("wrote-workspace") && out.contains("private"), "{out}");
        assert!(!state.path().join("planted").exists());
        assert!(!Path::new("/tmp").join(&marker).exists(), "/tmp of the task is private");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(workspace.join("mine.txt")).expect("mine").uid(), uid);
        runtime.cleanup(&task).await.expect("cleanup");
        assert!(!runtime.tmp_dir(task.attempt_id).exists(), "the private /tmp is removed");
    }

    #[test]
    fn task_env_wins_over_the_base() {
        let task = TaskSpec {
            job_id: 1,
            task_id: 2,
            attempt_id: 3,
            steps: vec![],
            env: [("HOME".to_owned(), "/elsewhere".to_owned())].into(),
            workspace: PathBuf::from("/ws"),
            cpus: vec![],
            memory_limit: 0,
            ..Default::default()
        };
        let env = step_env(&task);
        let homes: Vec<_> = env.iter().filter(|(k, _)| k == "HOME").collect();
        assert_eq!(homes, vec![&("HOME".to_owned(), "/elsewhere".to_owned())]);
        assert!(env.contains(&("DROVER_WORKSPACE".to_owned(), "/ws".to_owned())));
    }

    #[test]
    fn host_ports_are_named_in_the_environment() {
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], 4100).into();
        let task = TaskSpec {
            workspace: PathBuf::from("/ws"),
            host_ports: vec![crate::runtime::HostPort { name: "llm".into(), addr }],
            ..Default::default()
        };
        assert!(step_env(&task).contains(&("DROVER_HOST_LLM".to_owned(), "127.0.0.1:4100".to_owned())));
    }

    #[test]
    fn host_ports_are_reachable_where_they_listen() {
        let task = TaskSpec {
            host_ports: vec![HostPort {
                name: "llm-proxy".into(),
                addr: "127.0.0.1:4567".parse().expect("addr"),
            }],
            ..Default::default()
        };
        let env = step_env(&task);
        assert!(env.contains(&("DROVER_HOST_LLM_PROXY".to_owned(), "127.0.0.1:4567".to_owned())), "{env:?}");
    }

    #[test]
    fn resolves_programs_in_path_and_relative_to_the_workspace() {
        let sh = resolve_program("sh", None, Path::new("/")).expect("sh in default PATH");
        assert!(sh.ends_with("sh"));
        let err =
            resolve_program("drover-no-such-binary", Some("/usr/bin:/bin"), Path::new("/")).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        assert!(resolve_program("./missing", None, Path::new("/tmp")).is_err());
    }

    #[test]
    fn decodes_wait_statuses() {
        assert_eq!(decode_status(7 << 8).code, Some(7));
        assert_eq!(decode_status(9).signal, Some(9));
    }

    #[tokio::test]
    async fn memory_limit_kills_with_oom_when_cgroups_are_available() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut task = conformance::task(
            dir.path(),
            vec![conformance::sh("dd if=/dev/zero of=/dev/null bs=100000000 count=1")],
        );
        task.attempt_id = conformance::unique_attempt_id();
        task.memory_limit = 20 * 1024 * 1024;
        let runtime = ProcessRuntime::new();
        runtime.prepare(&task).await.expect("prepare");
        if !cgroups_required(&runtime, drover_core::enforce::Limit::Memory) {
            return;
        }
        let (status, _) = conformance::run_step(&runtime, &task, 0).await;
        assert!(!status.success(), "{status:?}");
        assert!(status.oom, "{status:?}");
        runtime.cleanup(&task).await.expect("cleanup");
        // Emptied, the cgroup may wait in the pool for another attempt; it goes with the runtime.
        let cgroups = runtime.cgroups.clone();
        drop(runtime);
        assert!(cgroups.existing(task.attempt_id).is_none());
    }

    /// Whether this host can enforce `limit`. In CI it must (the test then runs, never skips);
    /// elsewhere a host without the controller skips with a line saying so.
    fn cgroups_required(runtime: &ProcessRuntime, limit: drover_core::enforce::Limit) -> bool {
        if runtime.enforces().contains(&limit) {
            return true;
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must be able to enforce {} limits; cgroups here: {}",
            limit.name(),
            runtime.describe_cgroups()
        );
        eprintln!("no usable {} cgroup controller here; skipping", limit.name());
        false
    }

    #[tokio::test]
    async fn a_fork_bomb_stops_at_the_pids_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Each shell forks itself twice in the background, forever; the limit stops the growth,
        // the step ends on its own, and cleanup kills whatever still lives.
        let bomb = "b() { b & b & }; b; sleep 2; exit 3";
        let mut task = conformance::task(dir.path(), vec![conformance::sh(bomb)]);
        task.attempt_id = conformance::unique_attempt_id();
        task.pids_limit = 32;
        let runtime = ProcessRuntime::new();
        runtime.prepare(&task).await.expect("prepare");
        if !cgroups_required(&runtime, drover_core::enforce::Limit::Pids) {
            return;
        }
        let (status, chunks) = conformance::run_step(&runtime, &task, 0).await;
        let text: String = chunks.iter().map(|c| String::from_utf8_lossy(&c.data)).collect();
        assert_eq!(status.code, Some(3), "{status:?} {text}");
        assert!(text.to_lowercase().contains("fork"), "{text}");
        let cgroup = runtime.lock().cgroups.get(&task.attempt_id).cloned().flatten().expect("cgroup");
        assert!(cgroup.pids_refused() > 0, "the pids limit refused forks");
        runtime.cleanup(&task).await.expect("cleanup");
        assert!(
            runtime.cgroups.existing(task.attempt_id).is_none(),
            "cgroup removed, so nothing is left in it"
        );
    }

    /// Runs every step of `task` in order; returns the last status and the usage of each step.
    async fn run_attempt(runtime: &ProcessRuntime, task: &TaskSpec) -> (ExitStatus, Vec<Usage>) {
        runtime.prepare(task).await.expect("prepare");
        let mut usage = Vec::new();
        let mut status = unknown_status();
        for step in 0..task.steps.len() {
            let (tx, mut rx) = tokio::sync::mpsc::channel(64);
            let handle = runtime.start(task, step, tx).await.expect("start");
            let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
            status = runtime.wait(&handle).await.expect("wait");
            usage.push(runtime.stats(&handle).await.expect("stats"));
            let _ = drain.await;
        }
        (status, usage)
    }

    fn cgroup_name(runtime: &ProcessRuntime, attempt_id: i64) -> String {
        let cgroup = runtime.lock().cgroups.get(&attempt_id).cloned().flatten().expect("cgroup");
        cgroup.name().to_owned()
    }

    #[tokio::test]
    async fn a_reused_cgroup_gets_new_limits_and_counts_only_its_new_attempt() {
        let runtime =
            ProcessRuntime::with_config(ProcessConfig { cgroup_pool: 1, ..ProcessConfig::default() });
        if !cgroups_required(&runtime, drover_core::enforce::Limit::Memory) || !runtime.cgroups.reusable() {
            return;
        }
        let dir = conformance::scratch();
        // The first attempt burns CPU, peaks at 30 MB and is OOM-killed at its limit.
        let burn = "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; \
                    dd if=/dev/zero of=/dev/null bs=30000000 count=1 2>/dev/null; \
                    dd if=/dev/zero of=/dev/null bs=100000000 count=1";
        let mut first = conformance::task(&dir.path().join("a"), vec![conformance::sh(burn)]);
        first.memory_limit = 64 * 1024 * 1024;
        let (status, usage) = run_attempt(&runtime, &first).await;
        assert!(status.oom, "{status:?}");
        let (cpu, peak) = (usage[0].cpu_seconds, usage[0].peak_memory_bytes);
        assert!(peak > 30_000_000 && cpu > 0.05, "{usage:?}");
        let name = cgroup_name(&runtime, first.attempt_id);
        runtime.cleanup(&first).await.expect("cleanup");
        assert!(runtime.pool.holds(&name), "the emptied cgroup is kept");

        // The next attempt gets it, with its own limits, figures and no OOM kill of its own.
        let mut second =
            conformance::task(&dir.path().join("b"), vec![conformance::sh("cat /proc/self/cgroup")]);
        second.pids_limit = 50;
        let (status, usage) = run_attempt(&runtime, &second).await;
        assert_eq!((status.code, status.oom), (Some(0), false), "{status:?}");
        assert_eq!(cgroup_name(&runtime, second.attempt_id), name, "the cgroup is reused");
        assert_eq!(
            std::fs::read_to_string(runtime.claim_path(second.attempt_id)).ok().as_deref(),
            Some(name.as_str()),
            "the claim names the reused cgroup"
        );
        assert!(!runtime.idle_marker(&name).exists(), "it is no longer idle");
        let cgroup = runtime.lock().cgroups.get(&second.attempt_id).cloned().flatten().expect("cgroup");
        for (h, dir) in &cgroup.dirs_for_tests() {
            if h.contains("pids") {
                assert_eq!(std::fs::read_to_string(dir.join("pids.max")).expect("pids.max").trim(), "50");
            }
            if h.contains("memory") {
                let limit = std::fs::read_to_string(dir.join("memory.limit_in_bytes")).expect("limit");
                assert!(limit.trim().parse::<u64>().expect("number") > 1 << 40, "no memory limit: {limit}");
            }
        }
        drop(cgroup);
        assert!(usage[0].cpu_seconds < cpu / 2.0, "cpu of its own: {usage:?} after {cpu}");
        assert!(usage[0].peak_memory_bytes < 20_000_000, "peak of its own: {usage:?}");
        runtime.cleanup(&second).await.expect("cleanup");
        assert!(!runtime.claim_path(second.attempt_id).exists(), "the claim goes with the attempt");
        assert!(runtime.idle_marker(&name).exists(), "and marks the idle cgroup");

        // An attempt of several steps gets leaves in it, removed when it goes back; the page
        // cache of what it wrote is reclaimed rather than keeping the cgroup from reuse.
        let third = conformance::task(
            &dir.path().join("c"),
            vec![
                conformance::sh("dd if=/dev/zero of=residue bs=1M count=4 conv=fsync 2>/dev/null"),
                conformance::sh("exit 4"),
            ],
        );
        let (status, _) = run_attempt(&runtime, &third).await;
        assert_eq!(status.code, Some(4));
        assert_eq!(cgroup_name(&runtime, third.attempt_id), name);
        runtime.cleanup(&third).await.expect("cleanup");
        assert!(runtime.pool.holds(&name));
        let dirs: Vec<PathBuf> = runtime
            .cgroups
            .named(&name)
            .expect("idle cgroup")
            .dirs_for_tests()
            .into_iter()
            .map(|(_, d)| d)
            .collect();
        assert!(dirs.iter().all(|d| !d.join("step-0").exists()), "leaves removed");
        let marker = runtime.idle_marker(&name);
        drop(runtime);
        assert!(dirs.iter().all(|d| !d.exists()), "the pool is emptied when the runtime goes");
        assert!(!marker.exists());
    }

    #[tokio::test]
    async fn idle_cgroups_of_a_killed_agent_are_removed_by_the_next() {
        let steps = conformance::scratch();
        let config = ProcessConfig {
            cgroup_pool: 2,
            steps_dir: Some(steps.path().to_path_buf()),
            scope: format!("sweep{}", std::process::id()),
            ..ProcessConfig::default()
        };
        let runtime = ProcessRuntime::with_config(config.clone());
        if !cgroups_required(&runtime, drover_core::enforce::Limit::Pids) || !runtime.cgroups.reusable() {
            return;
        }
        let dir = conformance::scratch();
        let task = conformance::task(dir.path(), vec![conformance::sh("true")]);
        run_attempt(&runtime, &task).await;
        let name = cgroup_name(&runtime, task.attempt_id);
        runtime.cleanup(&task).await.expect("cleanup");
        assert!(runtime.pool.holds(&name));
        // Killed: nothing of it runs on, its pool is never emptied.
        let cgroups = runtime.cgroups.clone();
        std::mem::forget(runtime);
        assert!(cgroups.named(&name).is_some());
        let next = ProcessRuntime::with_config(config);
        assert!(next.cgroups.named(&name).is_none(), "the idle cgroup is removed");
        assert!(!next.idle_marker(&name).exists(), "with its marker");
    }

    #[tokio::test]
    async fn a_cgroup_with_processes_left_is_not_reused() {
        let runtime =
            ProcessRuntime::with_config(ProcessConfig { cgroup_pool: 4, ..ProcessConfig::default() });
        if !cgroups_required(&runtime, drover_core::enforce::Limit::Pids) {
            return;
        }
        let dir = conformance::scratch();
        // The step ends while a process it left behind runs on in its cgroup.
        let task = conformance::task(dir.path(), vec![conformance::sh("setsid sleep 60 >/dev/null 2>&1 &")]);
        let (status, _) = run_attempt(&runtime, &task).await;
        assert_eq!(status.code, Some(0));
        let name = cgroup_name(&runtime, task.attempt_id);
        let cgroup = runtime.cgroups.named(&name).expect("cgroup");
        runtime.cleanup(&task).await.expect("cleanup");
        assert!(!runtime.pool.holds(&name), "a cgroup that had to be emptied by force is removed");
        assert!(cgroup.dirs_for_tests().iter().all(|(_, d)| !d.exists()), "and is gone");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_agent_restart_loses_neither_output_nor_exit_status() {
        let dir = conformance::scratch();
        let mut task = conformance::task(
            dir.path(),
            vec![conformance::sh("echo before; sleep 1; echo after; echo oops >&2; exit 7")],
        );
        task.attempt_id = conformance::unique_attempt_id();
        let first = ProcessRuntime::new();
        first.prepare(&task).await.expect("prepare");
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let handle = first.start(&task, 0, tx).await.expect("start");
        let before = rx.recv().await.expect("first line");
        assert_eq!((before.data.as_slice(), before.end), (&b"before\n"[..], Some(7)));
        // The agent "dies": its sink goes away and a new runtime, knowing only the persisted
        // handle and how far the output got, takes over.
        drop(rx);
        let second = ProcessRuntime::new();
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        assert!(second.attach(&handle, tx, (7, 0)).await.expect("attach"), "the step is found again");
        let status = second.wait(&handle).await.expect("wait");
        assert_eq!((status.code, status.signal), (Some(7), None), "the exit status survived");
        let mut after = Vec::new();
        while let Ok(chunk) = rx.try_recv() {
            after.push(String::from_utf8_lossy(&chunk.data).into_owned());
        }
        after.sort();
        assert_eq!(after, ["after\n", "oops\n"], "output goes on where it stopped, none twice");
        // Even once it ended, a newcomer still gets the status from the supervisor's record.
        let third = ProcessRuntime::new();
        let (tx, _rx) = tokio::sync::mpsc::channel(16);
        assert!(third.attach(&handle, tx, (0, 0)).await.expect("attach after the end"));
        assert_eq!(third.wait(&handle).await.expect("wait").code, Some(7));
        third.cleanup(&task).await.expect("cleanup");
        drop(first);
    }

    /// An ended step's output is sent again from where the outbox's reach was, standard
    /// output first, until the attempt is cleaned up; a step not run replays nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ended_steps_output_is_sent_again_from_an_offset() {
        let dir = conformance::scratch();
        let mut task =
            conformance::task(dir.path(), vec![conformance::sh("echo one; echo two; echo err >&2")]);
        task.attempt_id = conformance::unique_attempt_id();
        let runtime = ProcessRuntime::new();
        runtime.prepare(&task).await.expect("prepare");
        let (tx, _rx) = tokio::sync::mpsc::channel(16);
        let handle = runtime.start(&task, 0, tx).await.expect("start");
        assert_eq!(runtime.wait(&handle).await.expect("wait").code, Some(0));
        // A new runtime, as after an agent restart.
        let again = ProcessRuntime::new();
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        assert!(again.replay(task.attempt_id, 0, (4, 0), tx).await.expect("replay"));
        let mut sent = Vec::new();
        while let Some(chunk) = rx.recv().await {
            sent.push((String::from_utf8_lossy(&chunk.data).into_owned(), chunk.end));
        }
        assert_eq!(sent, [("two\n".to_string(), Some(8)), ("err\n".to_string(), Some(4))]);
        let (tx, _rx) = tokio::sync::mpsc::channel(16);
        assert!(!again.replay(task.attempt_id, 1, (0, 0), tx).await.expect("replay"), "no step 1");
        runtime.cleanup(&task).await.expect("cleanup");
        let (tx, _rx) = tokio::sync::mpsc::channel(16);
        assert!(!again.replay(task.attempt_id, 0, (0, 0), tx).await.expect("replay"), "cleaned up");
    }

    #[tokio::test]
    async fn a_step_gets_sigpipe_like_any_program() {
        let dir = conformance::scratch();
        let task = conformance::task(dir.path(), vec![conformance::sh("yes | head -c 3")]);
        let runtime = ProcessRuntime::new();
        let (status, chunks) = conformance::run_step(&runtime, &task, 0).await;
        runtime.cleanup(&task).await.expect("cleanup");
        let text: String = chunks.iter().map(|c| String::from_utf8_lossy(&c.data)).collect();
        assert_eq!((status.code, text.as_str()), (Some(0), "y\ny"), "no broken-pipe complaint from yes");
    }

    #[tokio::test]
    async fn a_steps_supervisor_is_forked_by_the_launcher_not_by_the_agent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let task = conformance::task(dir.path(), vec![conformance::sh("sleep 30")]);
        let runtime = ProcessRuntime::new();
        runtime.prepare(&task).await.expect("prepare");
        let (tx, _rx) = tokio::sync::mpsc::channel(16);
        let handle = runtime.start(&task, 0, tx).await.expect("start");
        let step = handle.pid.expect("pid");
        let status = std::fs::read_to_string(format!("/proc/{step}/status")).expect("step status");
        let supervisor: i32 = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|p| p.trim().parse().ok())
            .expect("PPid");
        let cmdline = std::fs::read(format!("/proc/{supervisor}/cmdline")).expect("cmdline");
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).collect();
        assert_eq!(args, [&b"drover-step-launcher"[..], supervisor::LAUNCHER_ARG.as_bytes()]);
        // A fork of the agent would share its address space copy-on-write; the launcher's child
        // maps only what the launcher touched.
        let agent_pages = procs::read(std::process::id() as i32).expect("agent").rss_pages;
        let supervisor_pages = procs::read(supervisor).expect("supervisor").rss_pages;
        assert!(supervisor_pages < agent_pages, "supervisor {supervisor_pages} pages, agent {agent_pages}");
        runtime.signal(&handle, StopSignal::Kill).await.expect("kill");
        assert!(runtime.wait(&handle).await.expect("wait").signal.is_some());
        runtime.cleanup(&task).await.expect("cleanup");
    }

    #[test]
    fn the_supervisors_answer_is_read_strictly() {
        let started = supervisor::parse_answer("started 41 42\n").expect("pids");
        assert_eq!((started.supervisor, started.step), (41, 42));
        let enoent = supervisor::parse_answer("exec-error 2\n").expect_err("exec error");
        assert_eq!(enoent.raw_os_error(), Some(libc::ENOENT));
        let failed = supervisor::parse_answer("error cannot prepare the step: bad\n").expect_err("error");
        assert!(failed.to_string().contains("cannot prepare the step: bad"), "{failed}");
        let silent = supervisor::parse_answer("").expect_err("nothing");
        assert!(silent.to_string().contains("without an answer"), "{silent}");
        assert!(supervisor::parse_answer("started lots").is_err());
        assert!(supervisor::parse_answer("started 42").is_err());
        assert!(supervisor::parse_answer("running 0 tests").is_err());
    }

    #[tokio::test]
    async fn cleanup_kills_survivors_of_a_finished_step() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The background sleep closes its output, so the step finishes while it keeps running.
        let task = conformance::task(dir.path(), vec![conformance::sh("sleep 60 >/dev/null 2>&1 &")]);
        let runtime = ProcessRuntime::new();
        runtime.prepare(&task).await.expect("prepare");
        let (tx, _rx) = tokio::sync::mpsc::channel(16);
        let handle = runtime.start(&task, 0, tx).await.expect("start");
        assert_eq!(runtime.wait(&handle).await.expect("wait").code, Some(0));
        let pgid = handle.pid.expect("pid");
        assert!(!procs::alive_members(pgid).is_empty(), "the background sleep should still run");
        runtime.cleanup(&task).await.expect("cleanup");
        conformance::assert_group_gone(pgid).await;
        assert!(matches!(runtime.wait(&handle).await, Err(RuntimeError::UnknownHandle { .. })));
    }

    #[tokio::test]
    async fn wait_does_not_hang_on_a_background_process_holding_the_pipes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let task = conformance::task(dir.path(), vec![conformance::sh("echo before; sleep 30 &")]);
        let runtime = ProcessRuntime::new();
        let began = std::time::Instant::now();
        let (status, chunks) = conformance::run_step(&runtime, &task, 0).await;
        assert_eq!(status.code, Some(0));
        assert!(began.elapsed() < DRAIN_AFTER_EXIT + Duration::from_secs(5), "{:?}", began.elapsed());
        assert_eq!(chunks.first().map(|c| c.data.as_slice()), Some(&b"before\n"[..]));
        runtime.cleanup(&task).await.expect("cleanup");
    }
}
