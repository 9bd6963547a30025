//! The compiled job: what a job file becomes after parsing, templating and array expansion.
//!
//! The client compiles a job file into a [`JobPlan`] (so template errors point at the user's file
//! before anything is sent) and submits the plan as JSON; the server checks it again with
//! [`JobPlan::validate`] because API clients can send plans directly.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

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
            retries: RetryPolicy::default(),
            depends_on: Vec::new(),
            exit_codes: ExitCodes::default(),
            constraints: BTreeMap::new(),
            runtime: RuntimeKind::Process,
            image: None,
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
    /// What is wrong and how to fix it.
    pub message: String,
}

impl JobPlan {
    /// Checks what the server relies on: non-empty names, unique task identities, known
    /// dependencies, no dependency cycle, sane resources.
    pub fn validate(&self) -> Result<(), PlanError> {
        let err = |field: String, message: String| Err(PlanError { field, message });
        if self.name.trim().is_empty() {
            return err("name".into(), "job name is empty; give the job a name".into());
        }
        if self.project.trim().is_empty() {
            return err("project".into(), "project is empty; omit it to use `default`".into());
        }
        if self.tasks.is_empty() {
            return err("tasks".into(), "a job needs at least one task".into());
        }
        let names: BTreeSet<&str> = self.tasks.iter().map(|t| t.name.as_str()).collect();
        let mut seen = BTreeSet::new();
        for (i, t) in self.tasks.iter().enumerate() {
            if t.name.trim().is_empty() {
                return err(format!("tasks[{i}].name"), "task name is empty".into());
            }
            if !seen.insert((t.name.as_str(), t.frame)) {
                return err(
                    format!("tasks[{i}].name"),
                    format!("task `{}` appears twice; task names must be unique", t.display_name()),
                );
            }
            if t.steps.is_empty() {
                return err(format!("tasks[{i}]"), "task has no command; set `command` or `steps`".into());
            }
            for (s, step) in t.steps.iter().enumerate() {
                let empty = match step {
                    Command::Argv(v) => v.first().is_none_or(|a| a.is_empty()),
                    Command::Shell(s) => s.trim().is_empty(),
                };
                if empty {
                    return err(format!("tasks[{i}].steps[{s}]"), "command is empty".into());
                }
            }
            if t.resources.cores == 0 {
                return err(format!("tasks[{i}].resources.cores"), "cores must be at least 1".into());
            }
            if let Some(key) = t.agent.as_ref().and_then(|a| a.key_secret.as_ref())
                && t.secrets.contains(key)
            {
                // Listed secrets become the sandbox's environment: the key would enter it.
                return err(
                    format!("tasks[{i}].agent.key_secret"),
                    format!(
                        "secret `{key}` is both the agent's key and in `secrets`; remove it from `secrets`"
                    ),
                );
            }
            for d in &t.depends_on {
                if !names.contains(d.as_str()) {
                    return err(
                        format!("tasks[{i}].depends_on"),
                        format!("unknown task `{d}`; depends_on names other tasks of this job"),
                    );
                }
                if d == &t.name {
                    return err(format!("tasks[{i}].depends_on"), "a task cannot depend on itself".into());
                }
            }
        }
        if let Some(cycle) = self.find_cycle() {
            return err("tasks".into(), format!("dependency cycle: {}", cycle.join(" -> ")));
        }
        Ok(())
    }

    /// Finds a dependency cycle among task names, returned as the path that closes it.
    pub fn find_cycle(&self) -> Option<Vec<String>> {
        let mut deps: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for t in &self.tasks {
            deps.entry(&t.name).or_default().extend(t.depends_on.iter().map(String::as_str));
        }
        // 0 = unvisited, 1 = on the current path, 2 = done.
        let mut mark: BTreeMap<&str, u8> = BTreeMap::new();
        fn visit<'a>(
            n: &'a str,
            deps: &BTreeMap<&'a str, BTreeSet<&'a str>>,
            mark: &mut BTreeMap<&'a str, u8>,
            path: &mut Vec<&'a str>,
        ) -> Option<Vec<String>> {
            match mark.get(n) {
                Some(2) => return None,
                Some(1) => {
                    let start = path.iter().position(|p| *p == n).unwrap_or(0);
                    let mut cycle: Vec<String> = path[start..].iter().map(|s| s.to_string()).collect();
                    cycle.push(n.to_string());
                    return Some(cycle);
                }
                _ => {}
            }
            mark.insert(n, 1);
            path.push(n);
            for d in deps.get(n).into_iter().flatten() {
                if let Some(c) = visit(d, deps, mark, path) {
                    return Some(c);
                }
            }
            path.pop();
            mark.insert(n, 2);
            None
        }
        let keys: Vec<&str> = deps.keys().copied().collect();
        for n in keys {
            let mut path = Vec::new();
            if let Some(c) = visit(n, &deps, &mut mark, &mut path) {
                return Some(c);
            }
        }
        None
    }
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
}
