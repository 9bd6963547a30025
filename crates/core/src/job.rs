//! The compiled job: what a job file becomes after parsing, templating and array expansion.
//!
//! The client compiles a job file into a [`JobPlan`] (so template errors point at the user's file
//! before anything is sent) and submits the plan as zstd-compressed JSON; the server checks it
//! again with [`JobPlan::validate`] because API clients can send plans directly. `validate` is
//! where the rules live: the job-file compiler runs it on every plan it makes, and shares the
//! rules on single values (names, paths, URLs) defined at the end of this file.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::access::valid_project_name;
use crate::limits::{
    MAX_ARG_BYTES, MAX_DEPENDS_ON, MAX_DURATION, MAX_ENV_ENTRY_BYTES, MAX_ENV_VARS, MAX_FRAMES, MAX_MEMORY,
    MAX_NAME_LEN, MAX_STEPS, MAX_TASKS,
};
use crate::resources::Resources;
use crate::state::FailureClass;

/// A job ready to be queued: every template rendered, every array expanded into one task per frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobPlan {
    /// Human name of the job (not unique).
    pub name: String,
    /// Project the job belongs to.
    pub project: String,
    /// Higher runs first; ties run in submit order.
    #[serde(default)]
    pub priority: i32,
    /// Free-form labels for filtering.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Concrete tasks, one per frame for array tasks.
    pub tasks: Vec<TaskPlan>,
}

/// One concrete unit of work: a task, or one frame of an array task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskPlan {
    /// Name of the task in the job file; frames of one array task share it.
    pub name: String,
    /// The frame number for array tasks.
    #[serde(default)]
    pub frame: Option<i64>,
    /// Commands run in order; the first that fails stops the task.
    pub steps: Vec<Command>,
    /// Environment: the job's, overridden by the task's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// What the task reserves on a node.
    #[serde(default)]
    pub resources: Resources,
    /// Wall-clock limit for the whole task, all steps together.
    #[serde(default, with = "opt_duration_ms")]
    pub timeout: Option<Duration>,
    /// Limit of each setup phase (placing inputs, loading the image, setting up an AI agent,
    /// starting the sandbox and its services); `None` is the node's (15 minutes). Setup counts
    /// inside `timeout` too.
    #[serde(default, with = "opt_duration_ms", skip_serializing_if = "Option::is_none")]
    pub setup_timeout: Option<Duration>,
    /// What to do when an attempt fails.
    #[serde(default)]
    pub retries: RetryPolicy,
    /// Names of tasks (all their frames) that must succeed first.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Exit codes with a meaning other than failure.
    #[serde(default)]
    pub exit_codes: ExitCodes,
    /// Node labels the task requires (`key: value` must match exactly).
    #[serde(default)]
    pub constraints: BTreeMap<String, String>,
    /// The sandbox the task runs in.
    #[serde(default)]
    pub runtime: RuntimeKind,
    /// Image for `docker` and `microvm` tasks: a local image name, or (after the client built
    /// and uploaded it) the content digest `sha256:...` of the uploaded image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The image as the job file names it, or `build:DOCKERFILE` for one built at submit:
    /// kept when the client ships the image and `image` becomes its id, so that project
    /// settings can check what was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_name: Option<String>,
    /// Digest (`sha256:...`) of the image archive the client uploaded (a zstd-compressed
    /// `docker save` of `image`); agents that lack the image fetch and load it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_blob: Option<String>,
    /// An image the client builds from a Dockerfile before submitting; replaced by `image`
    /// once built and uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildSpec>,
    /// User to run as inside the sandbox (`uid`, `uid:gid` or a name); containers default to
    /// an unprivileged user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// What the sandbox may reach over the network.
    #[serde(default)]
    pub network: NetworkPolicy,
    /// Side containers started before the steps and stopped after them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceSpec>,
    /// Names of project secrets to expose as environment variables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// Globs, relative to the workspace, of files kept as artifacts when the task ends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
    /// Whether outputs are kept when the task fails too.
    #[serde(default = "yes")]
    pub outputs_on_failure: bool,
    /// Files placed in the workspace before the task starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<InputSpec>,
    /// For AI-agent tasks: the coding agent to run, its prompt, repository and budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentSpec>,
}

fn yes() -> bool {
    true
}

impl Default for TaskPlan {
    /// An unnamed task with no steps and every setting at its default; fill in at least `name`
    /// and `steps`.
    fn default() -> Self {
        TaskPlan {
            name: String::new(),
            frame: None,
            steps: Vec::new(),
            env: BTreeMap::new(),
            resources: Resources::default(),
            timeout: None,
            setup_timeout: None,
            retries: RetryPolicy::default(),
            depends_on: Vec::new(),
            exit_codes: ExitCodes::default(),
            constraints: BTreeMap::new(),
            runtime: RuntimeKind::Process,
            image: None,
            image_name: None,
            image_blob: None,
            build: None,
            user: None,
            network: NetworkPolicy::None,
            services: Vec::new(),
            secrets: Vec::new(),
            outputs: Vec::new(),
            outputs_on_failure: true,
            inputs: Vec::new(),
            agent: None,
        }
    }
}

/// Which sandbox runs a task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// A plain process group on the node.
    #[default]
    Process,
    /// A Docker container.
    Docker,
    /// A microVM.
    Microvm,
}

/// Whether `user` (`name`, `uid` or `uid:gid`) is root.
pub fn is_root_user(user: &str) -> bool {
    let name = user.split(':').next().unwrap_or(user).trim();
    name == "root" || name == "0"
}

impl TaskPlan {
    /// Whether a container of this task (its own or a service) asks to run as root.
    pub fn wants_root_container(&self) -> bool {
        let root = |user: &Option<String>| user.as_deref().is_some_and(is_root_user);
        (self.runtime == RuntimeKind::Docker && root(&self.user))
            || self.services.iter().any(|s| root(&s.user))
    }
}

impl RuntimeKind {
    /// The lowercase name agents advertise.
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Process => "process",
            RuntimeKind::Docker => "docker",
            RuntimeKind::Microvm => "microvm",
        }
    }
}

/// A Dockerfile build done by the client at submit time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildSpec {
    /// Dockerfile path, relative to the job file.
    pub dockerfile: String,
    /// Build context directory, relative to the job file.
    pub context: String,
    /// Build arguments.
    #[serde(default)]
    pub args: BTreeMap<String, String>,
}

/// Network access of a sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "mode")]
pub enum NetworkPolicy {
    /// Loopback only (the default).
    #[default]
    None,
    /// A network of the task's own, shared with its services; removed afterwards.
    Bridge,
    /// Only the listed hosts (`host` or `host:port`) are reachable.
    Egress {
        /// Allowed destinations.
        allow: Vec<String>,
    },
    /// Unrestricted.
    Full,
}

/// A side container of a task, such as a database for integration tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Host name the steps reach it by.
    pub name: String,
    /// Image to run.
    pub image: String,
    /// Command; the image's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Command>,
    /// Environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Paths mounted as tmpfs inside the service.
    #[serde(default)]
    pub tmpfs: Vec<String>,
    /// User the service runs as (`uid`, `uid:gid` or a name); an unprivileged default when
    /// absent, and root only where the project allows containers as root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// How to tell that the service is ready; without one it counts as ready once started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<HealthCheck>,
}

/// A readiness probe run inside a service container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Command that exits 0 when the service is healthy.
    pub command: Command,
    /// Time between probes.
    #[serde(with = "duration_ms")]
    pub interval: Duration,
    /// Longest a probe may take.
    #[serde(with = "duration_ms")]
    pub timeout: Duration,
    /// Failed probes before the service counts as unhealthy and the task fails.
    pub retries: u32,
}

/// A file or directory placed in the workspace before a task starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Where it comes from.
    pub source: InputSource,
    /// Path relative to the workspace.
    pub to: String,
}

/// The origin of an input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputSource {
    /// A local file or directory, uploaded by the client at submit (then rewritten to `blob`).
    Path(String),
    /// Uploaded content, by sha256 digest; a directory is a tar archive.
    Blob {
        /// `sha256:...`
        digest: String,
        /// Whether the blob is a tar archive of a directory, to unpack at `to`.
        directory: bool,
    },
    /// An http(s) URL fetched by the agent.
    Url(String),
    /// An output of another task of the job (which becomes a dependency).
    Artifact {
        /// The producing task.
        task: String,
        /// The output's path in that task's workspace.
        path: String,
    },
}

/// An AI coding agent run inside the task's sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    /// The coding agent's command.
    pub command: Command,
    /// The prompt, given on stdin and in `$DROVER_WORKSPACE/prompt.txt`; empty when
    /// `prompt_file` names it.
    pub prompt: String,
    /// A file in the workspace (from the repository or an input) holding the prompt, read by
    /// the node once the workspace is in place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_file: Option<String>,
    /// Git URL (or input path) of the repository to check out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// Token budget across input and output tokens; calls beyond it are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<u64>,
    /// Where to push the agent's changes as a branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<PushSpec>,
    /// Which LLM API the agent speaks, so the metering proxy puts the real key where that API
    /// expects it.
    #[serde(default)]
    pub provider: LlmProvider,
    /// Base URL of the LLM API; `None` means the node's configured default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Name of the project secret holding the real API key. It goes to the node's metering
    /// proxy only, never into the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_secret: Option<String>,
}

/// The LLM HTTP API an agent task talks to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum LlmProvider {
    /// The Anthropic Messages API.
    #[default]
    #[serde(rename = "anthropic")]
    Anthropic,
    /// The OpenAI Chat Completions API.
    #[serde(rename = "openai")]
    OpenAi,
}

impl LlmProvider {
    /// The word used in job files.
    pub fn as_str(self) -> &'static str {
        match self {
            LlmProvider::Anthropic => "anthropic",
            LlmProvider::OpenAi => "openai",
        }
    }
}

/// A git remote and branch to push an agent's changes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushSpec {
    /// Remote URL.
    pub remote: String,
    /// Branch name.
    pub branch: String,
}

impl TaskPlan {
    /// The name shown to users: `render[7]` for frame 7 of `render`, else the plain name.
    pub fn display_name(&self) -> String {
        match self.frame {
            Some(f) => format!("{}[{}]", self.name, f),
            None => self.name.clone(),
        }
    }

    /// The image as asked for: [`TaskPlan::image_name`] once shipped, `build:DOCKERFILE`
    /// before a build, else the image as written (a `dir:` image of a microVM, say).
    pub fn image_ref(&self) -> Option<String> {
        self.image_name
            .clone()
            .or_else(|| self.build.as_ref().map(|b| format!("build:{}", b.dockerfile)))
            .or_else(|| self.image.clone())
    }
}

/// A command to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Executed directly, without a shell.
    Argv(Vec<String>),
    /// Run by `/bin/sh -c`.
    Shell(String),
}

impl Command {
    /// The argv that executes this command.
    pub fn to_argv(&self) -> Vec<String> {
        match self {
            Command::Argv(v) => v.clone(),
            Command::Shell(s) => vec!["/bin/sh".into(), "-c".into(), s.clone()],
        }
    }
}

/// Retry policy of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// How many times a failed attempt is retried (0 = run once).
    pub count: u32,
    /// Delay before the first retry; doubles on each further retry.
    #[serde(with = "duration_ms")]
    pub backoff: Duration,
    /// Which failure classes are retried.
    pub on: BTreeSet<FailureClass>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            count: 0,
            backoff: Duration::from_secs(1),
            on: [FailureClass::Exit, FailureClass::Timeout, FailureClass::Lost].into_iter().collect(),
        }
    }
}

impl RetryPolicy {
    /// Delay before retry number `retry` (1-based): `backoff * 2^(retry-1)`, capped at one hour.
    pub fn delay(&self, retry: u32) -> Duration {
        let factor = 1u32 << retry.saturating_sub(1).min(16);
        self.backoff.saturating_mul(factor).min(Duration::from_secs(3600))
    }

    /// Whether a failure of `class` on attempt number `attempt` (1-based) is retried.
    pub fn retries(&self, class: FailureClass, attempt: u32) -> bool {
        attempt <= self.count && self.on.contains(&class)
    }
}

/// Exit codes with a meaning other than plain success (0) or failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitCodes {
    /// Exit codes that end the task as `warning` (it counts as done for dependents).
    pub warning: Vec<i32>,
    /// Exit codes that end the task as `skipped`.
    pub skip: Vec<i32>,
}

impl Default for ExitCodes {
    fn default() -> Self {
        ExitCodes { warning: vec![42], skip: vec![43] }
    }
}

/// Problems with a plan that passed parsing (or came straight from an API client).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PlanError {
    /// Dotted path of the offending field, like `tasks[2].depends_on`.
    pub field: String,
    /// What is wrong and how to fix it: `what; how`. The job-file compiler shows the part
    /// after the first `; ` as the hint.
    pub message: String,
}

/// `Err` with a [`PlanError`] for `field`.
fn fail<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, PlanError> {
    Err(PlanError { field: field.into(), message: message.into() })
}

impl JobPlan {
    /// Checks everything the server relies on before it stores a job, with the rules the
    /// job-file compiler applies (so an API client that builds plans itself gets the errors
    /// `drover validate` would give) and the limits of [`crate::limits`]: names, unique task
    /// identities, known dependencies and artifact producers, no dependency cycle, sane
    /// resources, commands a node can start, paths that stay in the workspace, and the
    /// sandbox fields that fit the runtime.
    ///
    /// Returns the first problem found. Takes time about linear in the size of the plan and
    /// stack space independent of it.
    pub fn validate(&self) -> Result<(), PlanError> {
        check_name("name", "job name is empty; give the job a name", &self.name)?;
        if self.project.trim().is_empty() {
            return fail("project", "project is empty; omit it to use `default`");
        }
        if !valid_project_name(&self.project) {
            return fail(
                "project",
                format!(
                    "project `{}` may only use lowercase letters, digits and `-`, start with a letter \
                     or digit, and be at most 63 characters; rename it, like `{}`",
                    self.project,
                    project_suggestion(&self.project)
                ),
            );
        }
        if self.tasks.is_empty() {
            return fail("tasks", "a job needs at least one task");
        }
        if self.tasks.len() > MAX_TASKS {
            return fail(
                "tasks",
                format!(
                    "the job has {} tasks, more than the limit of {MAX_TASKS}; split it into several jobs",
                    self.tasks.len()
                ),
            );
        }
        // Per task name: whether any task of that name keeps outputs (artifact producers).
        let mut producers: HashMap<&str, bool> = HashMap::with_capacity(self.tasks.len());
        for t in &self.tasks {
            *producers.entry(t.name.as_str()).or_default() |= !t.outputs.is_empty();
        }
        let mut identities = Identities::default();
        for (i, t) in self.tasks.iter().enumerate() {
            let at = format!("tasks[{i}]");
            identities.check(&at, t)?;
            check_task(&at, t, &producers)?;
        }
        if let Some(cycle) = self.find_cycle() {
            return fail("tasks", format!("dependency cycle: {}", cycle.join(" -> ")));
        }
        Ok(())
    }

    /// Finds a dependency cycle among task names, returned as the path that closes it (the
    /// first name again at the end), like `a -> c -> b -> a`.
    ///
    /// A depth-first search with an explicit stack, so that a long dependency chain costs heap,
    /// not call stack. Names are visited in sorted order, each one's dependencies too, so the
    /// cycle reported for a plan is always the same. Dependencies on unknown names are ignored
    /// ([`JobPlan::validate`] reports them).
    pub fn find_cycle(&self) -> Option<Vec<String>> {
        // Task names (frames of one array share theirs) in sorted order; a node is an index.
        let names: Vec<&str> =
            self.tasks.iter().map(|t| t.name.as_str()).collect::<BTreeSet<_>>().into_iter().collect();
        let id: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let mut deps: Vec<Vec<usize>> = vec![Vec::new(); names.len()];
        for t in &self.tasks {
            let from = &mut deps[id[t.name.as_str()]];
            from.extend(t.depends_on.iter().filter_map(|d| id.get(d.as_str()).copied()));
        }
        for d in &mut deps {
            // Sorted ids are sorted names; frames of one array repeat the same list.
            d.sort_unstable();
            d.dedup();
        }
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            Unvisited,
            OnPath,
            Done,
        }
        let mut mark = vec![Mark::Unvisited; names.len()];
        // The current path: each node with the index of the next dependency to follow.
        let mut path: Vec<(usize, usize)> = Vec::new();
        for root in 0..names.len() {
            if mark[root] != Mark::Unvisited {
                continue;
            }
            mark[root] = Mark::OnPath;
            path.push((root, 0));
            while let Some((node, next)) = path.last_mut() {
                let Some(&dep) = deps[*node].get(*next) else {
                    mark[*node] = Mark::Done;
                    path.pop();
                    continue;
                };
                *next += 1;
                match mark[dep] {
                    Mark::Done => {}
                    Mark::Unvisited => {
                        mark[dep] = Mark::OnPath;
                        path.push((dep, 0));
                    }
                    Mark::OnPath => {
                        let start = path.iter().position(|(n, _)| *n == dep).unwrap_or(0);
                        let mut cycle: Vec<String> =
                            path[start..].iter().map(|(n, _)| names[*n].to_string()).collect();
                        cycle.push(names[dep].to_string());
                        return Some(cycle);
                    }
                }
            }
        }
        None
    }
}

/// A job or task name: not blank (else `empty`), not longer than [`MAX_NAME_LEN`].
fn check_name(field: &str, empty: &str, name: &str) -> Result<(), PlanError> {
    if name.trim().is_empty() {
        return fail(field, empty);
    }
    if name.len() > MAX_NAME_LEN {
        return fail(
            field,
            format!("the name is {} bytes long, more than the limit of {MAX_NAME_LEN}", name.len()),
        );
    }
    Ok(())
}

/// Tasks are told apart by name and frame: a name is one plain task, or the frames of one
/// array task, each frame once and at most [`MAX_FRAMES`] of them.
#[derive(Default)]
struct Identities<'a> {
    seen: HashSet<(&'a str, Option<i64>)>,
    /// Per name: whether a plain task has it, and how many frames do.
    kinds: HashMap<&'a str, (bool, usize)>,
}

impl<'a> Identities<'a> {
    fn check(&mut self, at: &str, t: &'a TaskPlan) -> Result<(), PlanError> {
        let field = || format!("{at}.name");
        check_name(&field(), "task name is empty", &t.name)?;
        if !valid_task_name(&t.name) {
            return fail(
                field(),
                format!(
                    "task name `{}` may only use letters, digits, `_`, `.` and `-`; rename it, like `{}`",
                    t.name,
                    task_name_suggestion(&t.name)
                ),
            );
        }
        if let Some(f) = t.frame
            && f < 0
        {
            return fail(format!("{at}.frame"), format!("frame {f} is negative; frames are 0 or more"));
        }
        if !self.seen.insert((t.name.as_str(), t.frame)) {
            return fail(
                field(),
                format!("task `{}` appears twice; task names must be unique", t.display_name()),
            );
        }
        let (plain, frames) = self.kinds.entry(t.name.as_str()).or_default();
        match t.frame {
            None => *plain = true,
            Some(_) => *frames += 1,
        }
        if *plain && *frames > 0 {
            return fail(
                field(),
                format!(
                    "task `{}` is both a plain task and an array task; give one of them another name",
                    t.name
                ),
            );
        }
        if *frames > MAX_FRAMES {
            return fail(
                at,
                format!(
                    "array task `{}` has more than {MAX_FRAMES} frames; split it into several array tasks",
                    t.name
                ),
            );
        }
        Ok(())
    }
}

/// Everything about one task but its identity; `producers` tells, per task name, whether it
/// keeps outputs.
fn check_task(at: &str, t: &TaskPlan, producers: &HashMap<&str, bool>) -> Result<(), PlanError> {
    let f = |key: &str| format!("{at}.{key}");
    if t.steps.is_empty() {
        return fail(at, "task has no command; set `command` or `steps`");
    }
    if t.steps.len() > MAX_STEPS {
        return fail(
            f("steps"),
            format!(
                "the task has {} steps, more than the limit of {MAX_STEPS}; run a script that does several",
                t.steps.len()
            ),
        );
    }
    for (s, step) in t.steps.iter().enumerate() {
        check_command(&format!("{at}.steps[{s}]"), step)?;
    }
    check_env(&f("env"), &t.env)?;
    if t.resources.cores == 0 {
        return fail(f("resources.cores"), "cores must be at least 1");
    }
    if t.resources.memory > MAX_MEMORY {
        return fail(
            f("resources.memory"),
            format!(
                "memory {} is more than the limit of {} a task may ask for",
                crate::resources::format_memory(t.resources.memory),
                crate::resources::format_memory(MAX_MEMORY)
            ),
        );
    }
    if t.timeout == Some(Duration::ZERO) {
        return fail(f("timeout"), "timeout is zero; omit `timeout` for no limit");
    }
    if let Some(timeout) = t.timeout {
        check_duration(&f("timeout"), timeout)?;
    }
    if t.setup_timeout == Some(Duration::ZERO) {
        return fail(f("setup_timeout"), "setup_timeout is zero; omit it for the node's limit");
    }
    if let Some(limit) = t.setup_timeout {
        check_duration(&f("setup_timeout"), limit)?;
    }
    check_duration(&f("retries.backoff"), t.retries.backoff)?;
    check_depends_on(at, t, producers)?;
    for (key, codes) in [("warning", &t.exit_codes.warning), ("skip", &t.exit_codes.skip)] {
        for (k, code) in codes.iter().enumerate() {
            if !(0..=255).contains(code) {
                return fail(
                    format!("{at}.exit_codes.{key}[{k}]"),
                    format!("exit code {code} is out of range: expected 0 to 255"),
                );
            }
        }
    }
    check_sandbox(at, t)?;
    check_secrets(at, t)?;
    check_files(at, t, producers)?;
    if let Some(agent) = &t.agent {
        check_agent(&f("agent"), agent, &t.secrets)?;
    }
    Ok(())
}

/// A duration a plan carries unchanged: whole milliseconds (its unit in JSON), at most
/// [`MAX_DURATION`].
fn check_duration(field: &str, d: Duration) -> Result<(), PlanError> {
    match DurationProblem::of(d) {
        Some(problem) => {
            let (message, hint) = problem.explain(&humantime::format_duration(d).to_string());
            fail(field, format!("{message}; {hint}"))
        }
        None => Ok(()),
    }
}

/// Why a duration cannot travel in a plan unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DurationProblem {
    /// Longer than [`MAX_DURATION`].
    TooLong,
    /// Not a whole number of milliseconds.
    Fractional,
}

impl DurationProblem {
    pub(crate) fn of(d: Duration) -> Option<DurationProblem> {
        if d > MAX_DURATION {
            Some(DurationProblem::TooLong)
        } else if !d.subsec_nanos().is_multiple_of(1_000_000) {
            Some(DurationProblem::Fractional)
        } else {
            None
        }
    }

    /// The message about `written` (the duration as given) and a hint.
    pub(crate) fn explain(self, written: &str) -> (String, &'static str) {
        match self {
            DurationProblem::TooLong => (
                format!("`{written}` is longer than the limit of {} days", MAX_DURATION.as_secs() / 86_400),
                "give a shorter duration",
            ),
            DurationProblem::Fractional => (
                format!("`{written}` is not a whole number of milliseconds"),
                "durations are kept in milliseconds; write it like `2ms` or `1s`",
            ),
        }
    }
}

/// A command a node can start: a program (or shell script) and arguments the kernel accepts.
fn check_command(field: &str, command: &Command) -> Result<(), PlanError> {
    let (empty, args) = match command {
        Command::Argv(v) => (v.first().is_none_or(|a| a.is_empty()), v.as_slice()),
        Command::Shell(s) => (s.trim().is_empty(), std::slice::from_ref(s)),
    };
    if empty {
        return fail(field, "command is empty");
    }
    for arg in args {
        if arg.len() > MAX_ARG_BYTES {
            return fail(
                field,
                format!(
                    "an argument is {} bytes long, more than the limit of {MAX_ARG_BYTES}; put long \
                     scripts in a file (an input) and run that",
                    arg.len()
                ),
            );
        }
        if arg.contains('\0') {
            return fail(field, "an argument contains a NUL byte, which no program can be given");
        }
    }
    Ok(())
}

/// Environment variables a node can set: at most [`MAX_ENV_VARS`], names without `=`, and no
/// `NAME=value` longer than [`MAX_ENV_ENTRY_BYTES`].
fn check_env(field: &str, env: &BTreeMap<String, String>) -> Result<(), PlanError> {
    if env.len() > MAX_ENV_VARS {
        return fail(
            field,
            format!(
                "{} environment variables, more than the limit of {MAX_ENV_VARS}; pass large \
                 configuration as an input file",
                env.len()
            ),
        );
    }
    for (name, value) in env {
        let at = format!("{field}.{name}");
        if name.is_empty() {
            return fail(at, "environment variable name is empty");
        }
        if name.contains(['=', '\0']) {
            return fail(at, format!("environment variable name `{name}` contains `=` or a NUL byte"));
        }
        if value.contains('\0') {
            return fail(at, format!("the value of `{name}` contains a NUL byte"));
        }
        let entry = name.len() + 1 + value.len();
        if entry > MAX_ENV_ENTRY_BYTES {
            return fail(
                at,
                format!(
                    "`{name}` is {entry} bytes long with its value, more than the limit of \
                     {MAX_ENV_ENTRY_BYTES}; pass large values as an input file"
                ),
            );
        }
    }
    Ok(())
}

/// At most [`MAX_DEPENDS_ON`] names, each another task of the job, each once.
fn check_depends_on(at: &str, t: &TaskPlan, producers: &HashMap<&str, bool>) -> Result<(), PlanError> {
    let field = || format!("{at}.depends_on");
    if t.depends_on.len() > MAX_DEPENDS_ON {
        return fail(
            field(),
            format!(
                "the task depends on {} tasks, more than the limit of {MAX_DEPENDS_ON}; a dependency on \
                 an array task covers all its frames",
                t.depends_on.len()
            ),
        );
    }
    for d in &t.depends_on {
        if !producers.contains_key(d.as_str()) {
            return fail(field(), format!("unknown task `{d}`; depends_on names other tasks of this job"));
        }
        if d == &t.name {
            return fail(field(), "a task cannot depend on itself");
        }
    }
    if let Some(k) = first_duplicate(t.depends_on.iter().map(String::as_str)) {
        return fail(field(), format!("task `{}` is listed twice", t.depends_on[k]));
    }
    Ok(())
}

/// The fields that need a container or VM, against the runtime; the image, the build, the
/// user, the network and the services.
fn check_sandbox(at: &str, t: &TaskPlan) -> Result<(), PlanError> {
    let f = |key: &str| format!("{at}.{key}");
    match t.runtime {
        RuntimeKind::Process => {
            for (key, set) in [("image", t.image.is_some()), ("build", t.build.is_some())] {
                if set {
                    return fail(
                        f(key),
                        format!(
                            "`{key}` needs runtime `docker` or `microvm`; set `runtime: docker` or \
                             `runtime: microvm`, or remove `{key}`"
                        ),
                    );
                }
            }
        }
        RuntimeKind::Docker | RuntimeKind::Microvm => match (&t.image, &t.build) {
            (Some(_), Some(_)) => {
                return fail(
                    f("build"),
                    "both `image` and `build` are set; use `image` for an existing image or `build` \
                     to build one, not both",
                );
            }
            (None, None) => {
                return fail(
                    f("runtime"),
                    format!(
                        "runtime `{}` needs an `image` or a `build`; add `image: NAME` (like `image: \
                         alpine:3`) or `build: {{ dockerfile: Dockerfile }}`",
                        t.runtime.as_str()
                    ),
                );
            }
            _ => {}
        },
    }
    if t.agent.is_some() && t.runtime == RuntimeKind::Docker {
        return fail(
            f("agent"),
            "an agent task cannot run with `runtime: docker` because containers cannot reach the \
             node's LLM proxy; set `runtime: microvm` (or `runtime: process` for a trusted agent)",
        );
    }
    if !t.services.is_empty() && t.runtime != RuntimeKind::Docker {
        return fail(
            f("services"),
            "services need runtime `docker`; services are containers beside the task's container",
        );
    }
    if t.image.as_ref().is_some_and(|i| i.trim().is_empty()) {
        return fail(f("image"), "image is empty");
    }
    if let Some(blob) = &t.image_blob {
        if t.image.is_none() {
            return fail(f("image_blob"), "an image archive without an `image`; set `image` too");
        }
        if !valid_digest(blob) {
            return fail(
                f("image_blob"),
                format!("`{blob}` is not a blob digest; write `sha256:` and 64 lowercase hex digits"),
            );
        }
    }
    if let Some(b) = &t.build {
        if b.dockerfile.trim().is_empty() {
            return fail(f("build.dockerfile"), "dockerfile path is empty");
        }
        if b.context.trim().is_empty() {
            return fail(f("build.context"), "build context is empty");
        }
    }
    if t.user.as_ref().is_some_and(|u| u.trim().is_empty()) {
        return fail(
            f("user"),
            "user is empty; omit `user` to run as the runtime's unprivileged default user",
        );
    }
    if let NetworkPolicy::Egress { allow } = &t.network {
        if allow.is_empty() {
            return fail(
                f("network.allow"),
                "the egress list is empty; use `network: none` for no network access",
            );
        }
        for (k, host) in allow.iter().enumerate() {
            if let Some((message, hint)) = egress_problem(host) {
                return fail(format!("{at}.network.allow[{k}]"), format!("{message}; {hint}"));
            }
        }
    }
    let mut names = HashSet::new();
    for (k, s) in t.services.iter().enumerate() {
        check_service(&format!("{at}.services[{k}]"), s)?;
        if !names.insert(s.name.as_str()) {
            return fail(
                format!("{at}.services[{k}].name"),
                format!("duplicate service name `{}`; service names must be unique within a task", s.name),
            );
        }
    }
    Ok(())
}

fn check_service(at: &str, s: &ServiceSpec) -> Result<(), PlanError> {
    let f = |key: &str| format!("{at}.{key}");
    if !valid_service_name(&s.name) {
        return fail(
            f("name"),
            format!(
                "service name `{}` must be a DNS label: lowercase letters, digits and `-`, at most \
                 {MAX_DNS_LABEL} characters",
                s.name
            ),
        );
    }
    if s.image.trim().is_empty() {
        return fail(f("image"), "image is empty");
    }
    if let Some(command) = &s.command {
        check_command(&f("command"), command)?;
    }
    check_env(&f("env"), &s.env)?;
    for (k, path) in s.tmpfs.iter().enumerate() {
        if !path.starts_with('/') {
            return fail(
                format!("{at}.tmpfs[{k}]"),
                format!("tmpfs path `{path}` is not absolute; write a path inside the service container"),
            );
        }
    }
    if let Some(h) = &s.healthcheck {
        check_command(&f("healthcheck.command"), &h.command)?;
        for (key, d) in [("interval", h.interval), ("timeout", h.timeout)] {
            let field = f(&format!("healthcheck.{key}"));
            if d.is_zero() {
                return fail(field, format!("{key} is zero; give it a length, like `1s`"));
            }
            check_duration(&field, d)?;
        }
        if h.retries == 0 {
            return fail(f("healthcheck.retries"), "retries is 0; give at least 1 probe");
        }
    }
    Ok(())
}

/// Secret names that can be environment variables, each once and not also in `env`.
fn check_secrets(at: &str, t: &TaskPlan) -> Result<(), PlanError> {
    for (k, name) in t.secrets.iter().enumerate() {
        let field = format!("{at}.secrets[{k}]");
        if !valid_secret_name(name) {
            return fail(
                field,
                format!(
                    "secret name `{name}` may only use uppercase letters, digits and `_`, and not start \
                     with a digit; secrets become environment variables"
                ),
            );
        }
        if t.env.contains_key(name) {
            return fail(
                field,
                format!(
                    "secret `{name}` is also set in `env`; a secret becomes an environment variable of \
                     the same name, remove it from `env`"
                ),
            );
        }
    }
    if let Some(k) = first_duplicate(t.secrets.iter().map(String::as_str)) {
        return fail(format!("{at}.secrets[{k}]"), format!("secret `{}` is listed twice", t.secrets[k]));
    }
    Ok(())
}

/// Outputs and inputs stay inside the workspace; inputs come from http(s) URLs, uploads or
/// the outputs of tasks this one depends on, and do not collide.
fn check_files(at: &str, t: &TaskPlan, producers: &HashMap<&str, bool>) -> Result<(), PlanError> {
    for (k, glob) in t.outputs.iter().enumerate() {
        if let Some(problem) = outside_workspace(glob) {
            return fail(
                format!("{at}.outputs[{k}]"),
                format!(
                    "output `{glob}` {problem}; outputs are globs relative to the task workspace, like \
                     `out/*.png`"
                ),
            );
        }
    }
    let mut places = HashSet::new();
    for (k, input) in t.inputs.iter().enumerate() {
        let f = |key: &str| format!("{at}.inputs[{k}].{key}");
        match &input.source {
            InputSource::Path(p) if p.trim().is_empty() => return fail(f("source"), "input path is empty"),
            InputSource::Path(_) => {}
            InputSource::Url(url) => {
                if let Some((message, hint)) = url_problem(url) {
                    return fail(f("source"), format!("{message}; {hint}"));
                }
            }
            InputSource::Blob { digest, .. } => {
                if !valid_digest(digest) {
                    return fail(
                        f("source"),
                        format!(
                            "`{digest}` is not a blob digest; write `sha256:` and 64 lowercase hex digits"
                        ),
                    );
                }
            }
            InputSource::Artifact { task, path } => check_artifact(&f("source"), t, task, path, producers)?,
        }
        if let Some(problem) = outside_workspace(&input.to) {
            return fail(
                f("to"),
                format!(
                    "input destination `{}` {problem}; `to` is a path relative to the task workspace, \
                     like `data/model.bin`",
                    input.to
                ),
            );
        }
        if !places.insert(input.to.as_str()) {
            return fail(
                f("to"),
                format!("two inputs are placed at `{}`; give one of them another `to`", input.to),
            );
        }
    }
    Ok(())
}

/// An artifact input: an output of another task of the job that keeps outputs and that this
/// task depends on (so it has ended, and kept the file, before this one starts).
fn check_artifact(
    field: &str,
    t: &TaskPlan,
    producer: &str,
    path: &str,
    producers: &HashMap<&str, bool>,
) -> Result<(), PlanError> {
    if producer == t.name {
        return fail(
            field,
            format!("task `{producer}` takes an input from itself; `from` names another task of the job"),
        );
    }
    match producers.get(producer) {
        None => return fail(field, format!("unknown task `{producer}`; `from` names a task of this job")),
        Some(false) => {
            return fail(
                field,
                format!(
                    "task `{producer}` keeps no outputs; list the file in the `outputs` of `{producer}`, \
                     so that it is kept"
                ),
            );
        }
        Some(true) => {}
    }
    if !t.depends_on.iter().any(|d| d == producer) {
        return fail(
            field,
            format!("the input comes from `{producer}`, which is not in `depends_on`; add it there"),
        );
    }
    if let Some(problem) = outside_workspace(path) {
        return fail(
            field,
            format!(
                "artifact path `{path}` {problem}; name the file as the producing task's `outputs` keep \
                 it, like `prepare:out/model.bin`"
            ),
        );
    }
    Ok(())
}

/// The agent block: a command, exactly one of an inline prompt and a prompt file in the
/// workspace, and well-formed repository, budget, push target, upstream and key.
fn check_agent(at: &str, a: &AgentSpec, secrets: &[String]) -> Result<(), PlanError> {
    let f = |key: &str| format!("{at}.{key}");
    check_command(&f("command"), &a.command)?;
    match &a.prompt_file {
        Some(_) if !a.prompt.is_empty() => {
            return fail(
                f("prompt_file"),
                "both `prompt` and `prompt_file` are set; give the prompt inline or as a file in the \
                 workspace, not both",
            );
        }
        Some(file) => {
            if let Some(problem) = outside_workspace(file) {
                return fail(
                    f("prompt_file"),
                    format!(
                        "prompt_file `{file}` {problem}; name a file in the workspace (from the repository \
                         or an input), like `TASK.md`"
                    ),
                );
            }
        }
        None if a.prompt.trim().is_empty() => {
            return fail(f("prompt"), "prompt is empty; say what the agent should do");
        }
        None => {}
    }
    if a.repo.as_ref().is_some_and(|r| r.trim().is_empty()) {
        return fail(f("repo"), "repo is empty");
    }
    if a.budget == Some(0) {
        return fail(f("budget"), "budget must be at least 1 token; omit `budget` for no token limit");
    }
    if let Some(push) = &a.push {
        if push.remote.trim().is_empty() {
            return fail(f("push.remote"), "remote is empty");
        }
        if !valid_branch(&push.branch) {
            return fail(
                f("push.branch"),
                format!(
                    "`{}` is not a valid git branch name; use letters, digits, `-`, `_`, `.` and `/`, \
                     like `drover/fix-tests`",
                    push.branch
                ),
            );
        }
    }
    if let Some(url) = &a.upstream
        && !valid_upstream(url)
    {
        return fail(
            f("upstream"),
            format!(
                "upstream `{url}` is not an http or https URL; give the API's base URL, like \
                 `upstream: https://api.anthropic.com`"
            ),
        );
    }
    if let Some(key) = &a.key_secret {
        if !valid_secret_name(key) {
            return fail(
                f("key_secret"),
                format!(
                    "`{key}` is not a secret name; name a project secret, like `key_secret: ANTHROPIC_KEY`"
                ),
            );
        }
        if secrets.contains(key) {
            // Listed secrets become the sandbox's environment: the key would enter it.
            return fail(
                f("key_secret"),
                format!("secret `{key}` is both the agent's key and in `secrets`; remove it from `secrets`"),
            );
        }
    }
    Ok(())
}

/// The index of the first item that appeared before, if any.
fn first_duplicate<'a>(items: impl ExactSizeIterator<Item = &'a str> + Clone) -> Option<usize> {
    // Short lists, by far the most common, are checked without allocating.
    if items.len() <= 16 {
        return items.clone().enumerate().position(|(k, a)| items.clone().take(k).any(|b| a == b));
    }
    let mut seen = HashSet::with_capacity(items.len());
    items.enumerate().find(|(_, a)| !seen.insert(*a)).map(|(k, _)| k)
}

// The rules on single values, shared with the job-file checks in `crate::spec` so that both
// say the same thing.

/// Longest DNS label, the longest service name.
pub(crate) const MAX_DNS_LABEL: usize = 63;

/// Whether `name` can name a task: letters, digits, `_`, `.` and `-` (it appears in log
/// prefixes, artifact paths and `NAME[FRAME]` selectors).
pub(crate) fn valid_task_name(name: &str) -> bool {
    name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// `name` with every character a task name cannot have replaced by `-`.
pub(crate) fn task_name_suggestion(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '.') { c } else { '-' }).collect()
}

/// A project name close to `name` that [`valid_project_name`] accepts.
fn project_suggestion(name: &str) -> String {
    let s: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { '-' })
        .collect();
    let s: String = s.trim_start_matches('-').chars().take(63).collect();
    if s.is_empty() { "default".to_string() } else { s }
}

/// Whether `name` can name a secret: it becomes an environment variable, so uppercase
/// letters, digits and `_`, not starting with a digit.
pub(crate) fn valid_secret_name(name: &str) -> bool {
    name.bytes().next().is_some_and(|b| b.is_ascii_uppercase() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// Whether `name` is a DNS label, which a service's host name must be.
pub(crate) fn valid_service_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_DNS_LABEL
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Whether `branch` is a git branch name, roughly as `git check-ref-format --branch` accepts it.
pub(crate) fn valid_branch(branch: &str) -> bool {
    !(branch.trim().is_empty()
        || branch.starts_with('-')
        || branch.starts_with('/')
        || branch.ends_with('/')
        || branch.ends_with(".lock")
        || branch.contains("..")
        || branch.contains("//")
        || branch.contains("@{")
        || branch.chars().any(|c| c.is_whitespace() || c.is_control() || "~^:?*[\\".contains(c)))
}

/// Whether `url` is the base URL of an LLM API: http or https, with a host.
pub(crate) fn valid_upstream(url: &str) -> bool {
    let v = url.to_ascii_lowercase();
    (v.starts_with("http://") || v.starts_with("https://"))
        && !url.chars().any(char::is_whitespace)
        && v.split_once("://").is_some_and(|(_, rest)| !rest.is_empty() && !rest.starts_with('/'))
}

/// Whether `text` is a blob digest: `sha256:` and 64 lowercase hex digits.
fn valid_digest(text: &str) -> bool {
    text.strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// Why `path` does not name a place inside the task workspace, if it does not.
pub(crate) fn outside_workspace(path: &str) -> Option<&'static str> {
    if path.trim().is_empty() {
        Some("is empty")
    } else if path.starts_with('/') {
        Some("is an absolute path")
    } else if path.split('/').any(|part| part == "..") {
        Some("leaves the workspace with `..`")
    } else {
        None
    }
}

/// What is wrong with an input URL, if anything: agents fetch http and https only.
pub(crate) fn url_problem(url: &str) -> Option<(String, &'static str)> {
    let example = "write an http or https URL, like `https://example.com/data.tar`";
    let Some((scheme, rest)) = url.split_once("://") else {
        return Some((format!("`{url}` is not a URL"), example));
    };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Some((
            format!("unsupported URL scheme `{scheme}`"),
            "inputs are fetched over `http` or `https`; fetch other sources in a step",
        ));
    }
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    if host.is_empty() || url.chars().any(char::is_whitespace) {
        return Some((format!("`{url}` is not a URL"), example));
    }
    None
}

/// What is wrong with an egress destination (`host` or `host:port`, IPv6 in brackets), if
/// anything: the message and a hint.
pub(crate) fn egress_problem(text: &str) -> Option<(String, &'static str)> {
    let bare =
        "write a host name or address, optionally with a port, like `api.example.com` or `10.0.0.1:443`";
    if text.trim().is_empty() {
        return Some(("egress destination is empty".to_string(), bare));
    }
    if text.contains("://") {
        return Some((format!("egress destination `{text}` has a scheme"), bare));
    }
    if text.contains('/') || text.chars().any(char::is_whitespace) {
        return Some((format!("egress destination `{text}` is not a host"), bare));
    }
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        match rest.split_once(']') {
            Some((host, "")) => (host, None),
            Some((host, tail)) => match tail.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Some((format!("egress destination `{text}` is not a host"), bare)),
            },
            None => return Some((format!("egress destination `{text}` lacks its closing `]`"), bare)),
        }
    } else if text.matches(':').count() == 1 {
        text.split_once(':').map_or((text, None), |(h, p)| (h, Some(p)))
    } else {
        // No colon, or a bare IPv6 address.
        (text, None)
    };
    if host.is_empty() {
        return Some((format!("egress destination `{text}` has no host"), bare));
    }
    if let Some(port) = port
        && !matches!(port.parse::<u16>(), Ok(p) if p > 0)
    {
        return Some((
            format!("`{port}` in egress destination `{text}` is not a port from 1 to 65535"),
            bare,
        ));
    }
    None
}

mod duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

mod opt_duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(name: &str, deps: &[&str]) -> TaskPlan {
        TaskPlan {
            name: name.into(),
            frame: None,
            steps: vec![Command::Shell("true".into())],
            env: BTreeMap::new(),
            resources: Resources::default(),
            timeout: None,
            retries: RetryPolicy::default(),
            depends_on: deps.iter().map(|s| s.to_string()).collect(),
            exit_codes: ExitCodes::default(),
            constraints: BTreeMap::new(),
            ..TaskPlan::default()
        }
    }

    fn job(tasks: Vec<TaskPlan>) -> JobPlan {
        JobPlan { name: "j".into(), project: "default".into(), priority: 0, labels: BTreeMap::new(), tasks }
    }

    #[test]
    fn cycle_is_reported_with_its_path() {
        let j = job(vec![task("a", &["c"]), task("b", &["a"]), task("c", &["b"])]);
        let e = j.validate().unwrap_err();
        assert!(e.message.contains("dependency cycle"), "{e}");
        assert!(e.message.contains("a -> c -> b -> a"), "{e}");
    }

    #[test]
    fn unknown_dependency_is_named() {
        let e = job(vec![task("a", &["nope"])]).validate().unwrap_err();
        assert_eq!(e.field, "tasks[0].depends_on");
        assert!(e.message.contains("`nope`"));
    }

    #[test]
    fn durations_are_whole_milliseconds_within_the_limit() {
        let with = |f: fn(&mut TaskPlan)| {
            let mut t = task("a", &[]);
            f(&mut t);
            job(vec![t]).validate().map_err(|e| (e.field, e.message))
        };
        assert_eq!(with(|t| t.timeout = Some(MAX_DURATION)), Ok(()));
        let (field, message) = with(|t| t.timeout = Some(Duration::from_nanos(1))).unwrap_err();
        assert_eq!(field, "tasks[0].timeout");
        assert!(message.starts_with("`1ns` is not a whole number of milliseconds; "), "{message}");
        let (field, message) = with(|t| t.retries.backoff = Duration::from_millis(u64::MAX)).unwrap_err();
        assert_eq!(field, "tasks[0].retries.backoff");
        assert!(message.contains("is longer than the limit of 36500 days"), "{message}");
        let (field, message) = with(|t| t.setup_timeout = Some(Duration::ZERO)).unwrap_err();
        assert_eq!(field, "tasks[0].setup_timeout");
        assert!(message.contains("setup_timeout is zero"), "{message}");
        let (field, _) = with(|t| t.setup_timeout = Some(Duration::from_micros(1500))).unwrap_err();
        assert_eq!(field, "tasks[0].setup_timeout");
    }

    /// Memory is kept as a signed 64-bit count: a size past it would be stored negative.
    #[test]
    fn memory_is_within_the_limit() {
        let with = |memory: u64| {
            let mut t = task("a", &[]);
            t.resources.memory = memory;
            job(vec![t]).validate().map_err(|e| (e.field, e.message))
        };
        assert_eq!(with(MAX_MEMORY), Ok(()));
        for too_much in [MAX_MEMORY + 1, i64::MAX as u64 + 1, u64::MAX] {
            let (field, message) = with(too_much).unwrap_err();
            assert_eq!(field, "tasks[0].resources.memory");
            assert!(message.contains("more than the limit of 1024TiB"), "{message}");
        }
    }

    #[test]
    fn plan_round_trips_through_json() {
        let j = job(vec![task("a", &[]), task("b", &["a"])]);
        let text = serde_json::to_string(&j).unwrap();
        assert_eq!(serde_json::from_str::<JobPlan>(&text).unwrap(), j);
        assert!(j.validate().is_ok());
    }

    #[test]
    fn an_agent_key_listed_as_a_secret_is_refused() {
        let mut t = task("a", &[]);
        t.agent = Some(AgentSpec {
            command: Command::Shell("agent".into()),
            prompt: "p".into(),
            prompt_file: None,
            repo: None,
            budget: None,
            push: None,
            provider: LlmProvider::OpenAi,
            upstream: None,
            key_secret: Some("LLM_KEY".into()),
        });
        let mut j = job(vec![t]);
        assert!(j.validate().is_ok());
        let text = serde_json::to_string(&j).unwrap();
        assert!(text.contains(r#""provider":"openai""#), "{text}");
        assert_eq!(serde_json::from_str::<JobPlan>(&text).unwrap(), j);
        j.tasks[0].secrets.push("LLM_KEY".into());
        let e = j.validate().unwrap_err();
        assert_eq!(e.field, "tasks[0].agent.key_secret");
    }

    #[test]
    fn backoff_doubles() {
        let p = RetryPolicy { count: 3, backoff: Duration::from_secs(2), ..Default::default() };
        assert_eq!(p.delay(1), Duration::from_secs(2));
        assert_eq!(p.delay(3), Duration::from_secs(8));
        assert!(p.retries(FailureClass::Exit, 3));
        assert!(!p.retries(FailureClass::Exit, 4));
        assert!(!p.retries(FailureClass::Cancelled, 1));
    }

    /// A chain `c00000 -> c00001 -> ... -> c{n-1}`: each task depends on the next, so that a
    /// depth-first search from the first name walks all of it.
    fn chain(n: usize) -> JobPlan {
        let name = |i: usize| format!("c{i:05}");
        job((0..n)
            .map(|i| TaskPlan {
                name: name(i),
                steps: vec![Command::Shell("true".into())],
                depends_on: if i + 1 < n { vec![name(i + 1)] } else { Vec::new() },
                ..TaskPlan::default()
            })
            .collect())
    }

    /// Runs `f` on a thread with a 256 KiB stack, far too small for recursion over 20,000 tasks.
    fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new().stack_size(256 << 10).spawn(f).unwrap().join().unwrap()
    }

    #[test]
    fn a_long_chain_validates_fast_on_a_small_stack() {
        let plan = chain(20_000);
        let (result, elapsed) = on_small_stack(move || {
            let start = std::time::Instant::now();
            (plan.validate(), start.elapsed())
        });
        assert_eq!(result, Ok(()));
        // Linear work: milliseconds even unoptimised; a quadratic check would take minutes.
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    }

    #[test]
    fn a_cycle_at_the_end_of_a_long_chain_is_found() {
        let mut plan = chain(20_000);
        plan.tasks[19_999].depends_on.push("c19997".into());
        let (cycle, e) = on_small_stack(move || (plan.find_cycle(), plan.validate().unwrap_err()));
        assert_eq!(cycle.unwrap(), ["c19997", "c19998", "c19999", "c19997"]);
        assert_eq!(e.field, "tasks");
        assert_eq!(e.message, "dependency cycle: c19997 -> c19998 -> c19999 -> c19997");
    }

    #[test]
    fn cycles_are_found_among_frames_and_self_loops() {
        let mut a = task("a", &["b"]);
        a.frame = Some(1);
        let mut a2 = task("a", &["b"]);
        a2.frame = Some(2);
        assert_eq!(job(vec![a, a2, task("b", &["a"])]).find_cycle().unwrap(), ["a", "b", "a"]);
        assert_eq!(job(vec![task("a", &["a"])]).find_cycle().unwrap(), ["a", "a"]);
        assert_eq!(job(vec![task("a", &["b"]), task("b", &[])]).find_cycle(), None);
    }

    /// The error of a plan that must not validate.
    #[track_caller]
    fn refused(plan: &JobPlan) -> PlanError {
        match plan.validate() {
            Ok(()) => panic!("validated but should not"),
            Err(e) => e,
        }
    }

    #[track_caller]
    fn assert_refused(plan: &JobPlan, field: &str, message: &str) {
        let e = refused(plan);
        assert_eq!(e.field, field, "{e}");
        assert!(e.message.contains(message), "{e}");
    }

    #[test]
    fn limits_are_enforced_with_the_limit_in_the_message() {
        let one = task("t", &[]);
        let too_many = job(vec![one.clone(); MAX_TASKS + 1]);
        assert_refused(&too_many, "tasks", "200001 tasks, more than the limit of 200000");

        let frames = (0..=MAX_FRAMES as i64).map(|f| TaskPlan { frame: Some(f), ..one.clone() }).collect();
        assert_refused(&job(frames), "tasks[100000]", "array task `t` has more than 100000 frames");
        let frames = (0..MAX_FRAMES as i64).map(|f| TaskPlan { frame: Some(f), ..one.clone() }).collect();
        assert_eq!(job(frames).validate(), Ok(()));

        let mut fan_in = vec![task("all", &[])];
        fan_in[0].depends_on = (0..=MAX_DEPENDS_ON).map(|i| format!("t{i}")).collect();
        fan_in.extend((0..=MAX_DEPENDS_ON).map(|i| task(&format!("t{i}"), &[])));
        assert_refused(
            &job(fan_in.clone()),
            "tasks[0].depends_on",
            "50001 tasks, more than the limit of 50000",
        );
        fan_in[0].depends_on.pop();
        assert_eq!(job(fan_in).validate(), Ok(()));

        let mut t = one.clone();
        t.steps = vec![Command::Shell("true".into()); MAX_STEPS + 1];
        assert_refused(&job(vec![t]), "tasks[0].steps", "1001 steps, more than the limit of 1000");

        let mut t = one.clone();
        t.steps = vec![Command::Argv(vec!["echo".into(), "x".repeat(MAX_ARG_BYTES + 1)])];
        assert_refused(
            &job(vec![t]),
            "tasks[0].steps[0]",
            "131072 bytes long, more than the limit of 131071",
        );
        let mut t = one.clone();
        t.steps = vec![Command::Shell("x".repeat(MAX_ARG_BYTES))];
        assert_eq!(job(vec![t]).validate(), Ok(()));

        let mut t = one.clone();
        t.env = (0..=MAX_ENV_VARS).map(|i| (format!("V{i}"), String::new())).collect();
        assert_refused(
            &job(vec![t]),
            "tasks[0].env",
            "1001 environment variables, more than the limit of 1000",
        );
        let mut t = one.clone();
        t.env.insert("BIG".into(), "x".repeat(MAX_ENV_ENTRY_BYTES));
        assert_refused(&job(vec![t]), "tasks[0].env.BIG", "is 131075 bytes long with its value");

        let long = "n".repeat(MAX_NAME_LEN + 1);
        assert_refused(
            &job(vec![task(&long, &[])]),
            "tasks[0].name",
            "201 bytes long, more than the limit of 200",
        );
        let mut j = job(vec![one.clone()]);
        j.name = long;
        assert_refused(&j, "name", "the name is 201 bytes long");
    }

    #[test]
    fn the_project_name_rule_applies() {
        let mut j = job(vec![task("a", &[])]);
        j.project = "Team FX".into();
        assert_refused(&j, "project", "project `Team FX` may only use lowercase letters");
        assert!(refused(&j).message.ends_with("rename it, like `team-fx`"));
        j.project = "fx-2".into();
        assert_eq!(j.validate(), Ok(()));
    }

    /// Every rule the job-file compiler applies, on a plan made by hand: each mutation of a
    /// valid plan must be refused with the field and a message naming the problem.
    #[test]
    fn plans_made_by_hand_get_the_compilers_rules() {
        type Mutation = fn(&mut JobPlan);
        let cases: Vec<(&str, Mutation, &str, &str)> = vec![
            (
                "task name charset",
                |j| j.tasks[0].name = "a b".into(),
                "tasks[0].name",
                "may only use letters",
            ),
            ("negative frame", |j| j.tasks[0].frame = Some(-1), "tasks[0].frame", "frame -1 is negative"),
            (
                "plain and array task of one name",
                |j| {
                    let mut frame = j.tasks[0].clone();
                    frame.frame = Some(1);
                    j.tasks.push(frame);
                },
                "tasks[2].name",
                "both a plain task and an array task",
            ),
            (
                "zero timeout",
                |j| j.tasks[0].timeout = Some(Duration::ZERO),
                "tasks[0].timeout",
                "timeout is zero",
            ),
            (
                "exit code out of range",
                |j| j.tasks[0].exit_codes.skip = vec![300],
                "tasks[0].exit_codes.skip[0]",
                "exit code 300 is out of range",
            ),
            (
                "duplicate dependency",
                |j| j.tasks[1].depends_on.push("a".into()),
                "tasks[1].depends_on",
                "task `a` is listed twice",
            ),
            (
                "image on a process",
                |j| j.tasks[0].image = Some("alpine".into()),
                "tasks[0].image",
                "needs runtime",
            ),
            (
                "container without image",
                |j| j.tasks[0].runtime = RuntimeKind::Docker,
                "tasks[0].runtime",
                "runtime `docker` needs an `image` or a `build`",
            ),
            (
                "image and build",
                |j| {
                    j.tasks[0].runtime = RuntimeKind::Microvm;
                    j.tasks[0].image = Some("alpine".into());
                    j.tasks[0].build = Some(BuildSpec {
                        dockerfile: "Dockerfile".into(),
                        context: ".".into(),
                        args: BTreeMap::new(),
                    });
                },
                "tasks[0].build",
                "both `image` and `build` are set",
            ),
            (
                "services outside docker",
                |j| j.tasks[0].services = vec![service("db")],
                "tasks[0].services",
                "services need runtime `docker`",
            ),
            (
                "service name not a DNS label",
                |j| docker(&mut j.tasks[0]).services = vec![service("Db_1")],
                "tasks[0].services[0].name",
                "must be a DNS label",
            ),
            (
                "duplicate service",
                |j| docker(&mut j.tasks[0]).services = vec![service("db"), service("db")],
                "tasks[0].services[1].name",
                "duplicate service name `db`",
            ),
            (
                "relative tmpfs",
                |j| {
                    let mut s = service("db");
                    s.tmpfs = vec!["data".into()];
                    docker(&mut j.tasks[0]).services = vec![s];
                },
                "tasks[0].services[0].tmpfs[0]",
                "is not absolute",
            ),
            (
                "agent in docker",
                |j| docker(&mut j.tasks[0]).agent = Some(agent()),
                "tasks[0].agent",
                "cannot run with `runtime: docker`",
            ),
            ("empty user", |j| j.tasks[0].user = Some(" ".into()), "tasks[0].user", "user is empty"),
            (
                "empty egress list",
                |j| j.tasks[0].network = NetworkPolicy::Egress { allow: vec![] },
                "tasks[0].network.allow",
                "the egress list is empty",
            ),
            (
                "egress with a scheme",
                |j| j.tasks[0].network = NetworkPolicy::Egress { allow: vec!["https://x.com".into()] },
                "tasks[0].network.allow[0]",
                "has a scheme",
            ),
            (
                "secret name",
                |j| j.tasks[0].secrets = vec!["db-pass".into()],
                "tasks[0].secrets[0]",
                "secret name",
            ),
            (
                "secret also in env",
                |j| {
                    j.tasks[0].secrets = vec!["TOKEN".into()];
                    j.tasks[0].env.insert("TOKEN".into(), "x".into());
                },
                "tasks[0].secrets[0]",
                "secret `TOKEN` is also set in `env`",
            ),
            (
                "env name with =",
                |j| drop(j.tasks[0].env.insert("A=B".into(), "x".into())),
                "tasks[0].env.A=B",
                "contains `=`",
            ),
            (
                "output outside the workspace",
                |j| j.tasks[0].outputs = vec!["../x".into()],
                "tasks[0].outputs[0]",
                "output `../x` leaves the workspace",
            ),
            (
                "input over ftp",
                |j| j.tasks[0].inputs = vec![input(InputSource::Url("ftp://h/x".into()), "x")],
                "tasks[0].inputs[0].source",
                "unsupported URL scheme `ftp`",
            ),
            (
                "input placed outside the workspace",
                |j| j.tasks[0].inputs = vec![input(InputSource::Url("https://h/x".into()), "/etc/x")],
                "tasks[0].inputs[0].to",
                "is an absolute path",
            ),
            (
                "two inputs in one place",
                |j| {
                    let url = InputSource::Url("https://h/x".into());
                    j.tasks[0].inputs = vec![input(url.clone(), "x"), input(url, "x")];
                },
                "tasks[0].inputs[1].to",
                "two inputs are placed at `x`",
            ),
            (
                "blob that is not a digest",
                |j| {
                    let blob = InputSource::Blob { digest: "sha256:XYZ".into(), directory: false };
                    j.tasks[0].inputs = vec![input(blob, "x")];
                },
                "tasks[0].inputs[0].source",
                "is not a blob digest",
            ),
            (
                "artifact of an unknown task",
                |j| j.tasks[1].inputs = vec![artifact("nope")],
                "tasks[1].inputs[0].source",
                "unknown task `nope`",
            ),
            (
                "artifact of a task without outputs",
                |j| j.tasks[1].inputs = vec![artifact("a")],
                "tasks[1].inputs[0].source",
                "task `a` keeps no outputs",
            ),
            (
                "artifact without the dependency",
                |j| {
                    j.tasks[0].outputs = vec!["out.bin".into()];
                    j.tasks[1].depends_on.clear();
                    j.tasks[1].inputs = vec![artifact("a")];
                },
                "tasks[1].inputs[0].source",
                "which is not in `depends_on`",
            ),
            (
                "empty prompt",
                |j| {
                    let mut a = agent();
                    a.prompt = " ".into();
                    j.tasks[0].agent = Some(a);
                },
                "tasks[0].agent.prompt",
                "prompt is empty",
            ),
            (
                "bad branch",
                |j| {
                    let mut a = agent();
                    a.push = Some(PushSpec { remote: "https://git/x.git".into(), branch: "a..b".into() });
                    j.tasks[0].agent = Some(a);
                },
                "tasks[0].agent.push.branch",
                "not a valid git branch name",
            ),
            (
                "bad upstream",
                |j| {
                    let mut a = agent();
                    a.upstream = Some("api.example.com".into());
                    j.tasks[0].agent = Some(a);
                },
                "tasks[0].agent.upstream",
                "is not an http or https URL",
            ),
            (
                "bad key secret",
                |j| {
                    let mut a = agent();
                    a.key_secret = Some("key".into());
                    j.tasks[0].agent = Some(a);
                },
                "tasks[0].agent.key_secret",
                "`key` is not a secret name",
            ),
            (
                "zero budget",
                |j| {
                    let mut a = agent();
                    a.budget = Some(0);
                    j.tasks[0].agent = Some(a);
                },
                "tasks[0].agent.budget",
                "budget must be at least 1 token",
            ),
        ];
        for (what, mutate, field, message) in cases {
            let mut j = job(vec![task("a", &[]), task("b", &["a"])]);
            assert_eq!(j.validate(), Ok(()), "{what}: the base plan must be valid");
            mutate(&mut j);
            let e = j.validate().expect_err(what);
            assert_eq!(e.field, field, "{what}: {e}");
            assert!(e.message.contains(message), "{what}: {e}");
        }
    }

    fn docker(t: &mut TaskPlan) -> &mut TaskPlan {
        t.runtime = RuntimeKind::Docker;
        t.image = Some("alpine:3".into());
        t
    }

    fn service(name: &str) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            image: "postgres:15".into(),
            command: None,
            env: BTreeMap::new(),
            tmpfs: Vec::new(),
            user: None,
            healthcheck: None,
        }
    }

    fn agent() -> AgentSpec {
        AgentSpec {
            command: Command::Shell("agent".into()),
            prompt: "fix it".into(),
            prompt_file: None,
            repo: None,
            budget: None,
            push: None,
            provider: LlmProvider::Anthropic,
            upstream: None,
            key_secret: None,
        }
    }

    fn input(source: InputSource, to: &str) -> InputSpec {
        InputSpec { source, to: to.into() }
    }

    fn artifact(task: &str) -> InputSpec {
        input(InputSource::Artifact { task: task.into(), path: "out.bin".into() }, "in.bin")
    }

    #[test]
    fn egress_destinations() {
        for ok in ["api.example.com", "10.0.0.1:443", "[::1]:8080", "::1", "[fe80::1]", "*.example.com"] {
            assert_eq!(egress_problem(ok), None, "{ok}");
        }
        for bad in
            ["https://x.com", "x.com/path", ":443", "x.com:0", "x.com:http", "[::1", "[::1]x", "a b", ""]
        {
            assert!(egress_problem(bad).is_some(), "{bad}");
        }
    }
}
