//! The version 1 job-file schema: reads the positioned tree into a [`JobSpec`], checking every
//! field's name, type and value and recording where each one is, for later errors.
//!
//! This file reads the job and the basic task fields; the submodules read the task fields of
//! one concern each: `sandbox` (runtime, image, build, user, network, services, secrets),
//! `files` (inputs and outputs) and `agent` (AI-agent tasks).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use super::error::{Pos, Problems, closest};
use super::frames::{FrameError, frames};
use super::tree::{Entry, Node, Value};
use crate::job::{
    DurationProblem, ExitCodes, NetworkPolicy, RetryPolicy, RuntimeKind, task_name_suggestion,
    valid_task_name,
};
use crate::limits::{MAX_NAME_LEN, MAX_TASKS};
use crate::resources::{Resources, parse_memory};
use crate::state::FailureClass;

mod agent;
mod files;
mod sandbox;

const JOB_FIELDS: &[&str] = &["version", "name", "project", "priority", "labels", "params", "env", "tasks"];
const TASK_FIELDS: &[&str] = &[
    "name",
    "command",
    "steps",
    "env",
    "resources",
    "timeout",
    "setup_timeout",
    "retries",
    "array",
    "depends_on",
    "exit_codes",
    "constraints",
    "runtime",
    "image",
    "build",
    "user",
    "network",
    "services",
    "secrets",
    "outputs",
    "outputs_on_failure",
    "inputs",
    "agent",
];
const RESOURCE_FIELDS: &[&str] = &["cores", "memory", "pids"];
/// Most processes a task may ask for: the kernel's own ceiling (`pid_max` is at most 2^22).
const MAX_PIDS: i64 = 1 << 22;
const RETRY_FIELDS: &[&str] = &["count", "backoff", "on"];
const EXIT_CODE_FIELDS: &[&str] = &["warning", "skip"];
const FAILURE_CLASSES: &[&str] = &["exit", "timeout", "lost", "oom", "start", "budget", "cancelled"];

/// A value with where it was written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct At<T> {
    pub value: T,
    pub pos: Pos,
    /// Dotted path of the field, like `tasks[0].command[1]`.
    pub field: String,
}

/// A job file after schema checks, before templating and array expansion.
#[derive(Debug, Default)]
pub(crate) struct JobSpec {
    pub name: Option<At<String>>,
    pub project: String,
    pub priority: i32,
    pub labels: BTreeMap<String, String>,
    pub params: BTreeMap<String, String>,
    pub env: BTreeMap<String, At<String>>,
    pub tasks: Vec<TaskSpec>,
    /// How many entries `tasks` has, including ones too broken to read.
    pub task_count: usize,
    /// Position of every field's value by dotted path, to place errors found later.
    pub positions: HashMap<String, Pos>,
}

/// One entry of `tasks`.
#[derive(Debug)]
pub(crate) struct TaskSpec {
    pub name: Option<At<String>>,
    /// `command` as one step, or the `steps` list; empty for an agent task without either.
    pub steps: Vec<StepSpec>,
    /// Which field the planned steps come from.
    pub steps_from: StepsFrom,
    pub env: BTreeMap<String, At<String>>,
    pub resources: Resources,
    pub timeout: Option<Duration>,
    pub setup_timeout: Option<Duration>,
    pub retries: RetryPolicy,
    pub frames: Option<Vec<i64>>,
    pub depends_on: Vec<At<String>>,
    pub exit_codes: ExitCodes,
    pub constraints: BTreeMap<String, String>,
    /// `None` when `runtime` was unreadable: the checks that depend on it are skipped then.
    pub runtime: Option<RuntimeKind>,
    pub image: Option<At<String>>,
    pub build: Option<RawBuild>,
    pub user: Option<At<String>>,
    pub network: NetworkPolicy,
    pub services: Vec<RawService>,
    pub secrets: Vec<At<String>>,
    /// `None` when the task has no `outputs` field (an artifact input cannot come from it).
    pub outputs: Option<Vec<At<String>>>,
    pub outputs_on_failure: bool,
    pub inputs: Vec<RawInput>,
    pub agent: Option<RawAgent>,
}

impl TaskSpec {
    /// The tasks this one needs first: its `depends_on`, then the producers of its artifact
    /// inputs (each placed at its `from` value).
    pub fn dependencies(&self) -> impl Iterator<Item = &At<String>> {
        let producers = self.inputs.iter().filter_map(|input| match &input.source {
            RawSource::Artifact { task, .. } => Some(task),
            RawSource::Path(_) | RawSource::Url(_) => None,
        });
        self.depends_on.iter().chain(producers)
    }
}

/// Where a task's planned steps come from, to map plan errors back to the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StepsFrom {
    /// `command`: one step.
    Command,
    /// `steps`: a list.
    Steps,
    /// Neither: the agent's `command` is the only step.
    Agent,
}

/// `build`, its strings not yet rendered.
#[derive(Debug)]
pub(crate) struct RawBuild {
    /// Dockerfile path; `Dockerfile` when not given (placed at the `build` value then).
    pub dockerfile: At<String>,
    /// Context directory; `.` when not given.
    pub context: At<String>,
    pub args: BTreeMap<String, At<String>>,
}

/// One entry of `services`, its strings not yet rendered.
#[derive(Debug)]
pub(crate) struct RawService {
    /// Checked to be a DNS label, unique within the task; not templated.
    pub name: At<String>,
    pub image: At<String>,
    pub command: Option<StepSpec>,
    pub env: BTreeMap<String, At<String>>,
    /// Absolute paths inside the service container; not templated.
    pub tmpfs: Vec<String>,
    pub user: Option<At<String>>,
    pub healthcheck: Option<RawHealthCheck>,
}

/// A service's `healthcheck`, with the defaults filled in.
#[derive(Debug)]
pub(crate) struct RawHealthCheck {
    pub command: StepSpec,
    pub interval: Duration,
    pub timeout: Duration,
    pub retries: u32,
}

/// One entry of `inputs`, its strings not yet rendered.
#[derive(Debug)]
pub(crate) struct RawInput {
    pub source: RawSource,
    /// `None` to use the base name of the source's path.
    pub to: Option<At<String>>,
}

/// Where an input comes from.
#[derive(Debug)]
pub(crate) enum RawSource {
    /// `path`: a local file or directory, relative to the job file.
    Path(At<String>),
    /// `url`: checked to be http(s) once rendered.
    Url(At<String>),
    /// `from: TASK:PATH`; both parts are placed at the `from` value. The task name is not
    /// templated, because the dependency graph is checked before any template is rendered.
    Artifact { task: At<String>, path: At<String> },
}

/// `agent`, its strings not yet rendered.
#[derive(Debug)]
pub(crate) struct RawAgent {
    pub command: StepSpec,
    /// Exactly one of `prompt` and `prompt_file` is set.
    pub prompt: Option<At<String>>,
    pub prompt_file: Option<At<String>>,
    pub repo: Option<At<String>>,
    pub budget: Option<u64>,
    /// Remote and branch.
    pub push: Option<(At<String>, At<String>)>,
    pub provider: Option<crate::job::LlmProvider>,
    pub upstream: Option<At<String>>,
    pub key_secret: Option<At<String>>,
}

/// One command, its strings not yet rendered.
#[derive(Debug)]
pub(crate) enum StepSpec {
    Argv(Vec<At<String>>),
    Shell(At<String>),
}

/// Reads the whole job, recording every problem in `problems`.
pub(crate) fn read_job(root: &Node, problems: &mut Problems) -> JobSpec {
    let mut r = Reader { problems, positions: HashMap::new(), planned: 0 };
    let mut job = JobSpec { project: "default".into(), ..JobSpec::default() };
    let Some(top) = r.mapping(root, "", JOB_FIELDS) else {
        return job;
    };
    match top.get("version") {
        None => r.problems.add(
            Pos::START,
            "version",
            "missing `version`",
            Some("add `version: 1` as the first line".into()),
        ),
        Some(Node { value: Value::Int(1), .. }) => {}
        Some(n @ Node { value: Value::Int(v), .. }) => r.problems.add(
            n.pos,
            "version",
            format!("unsupported version {v}"),
            Some("this Drover reads version 1 job files; write `version: 1`".into()),
        ),
        Some(n) => r.problems.add(
            n.pos,
            "version",
            format!("expected the integer 1, found {}", n.kind()),
            Some("write `version: 1`, without quotes".into()),
        ),
    }
    match top.get("name") {
        None => r.problems.add(
            Pos::START,
            "name",
            "missing `name`",
            Some("give the job a name, like `name: render-shots`".into()),
        ),
        Some(n) => job.name = r.non_empty_string(n, "name", "job name"),
    }
    if let Some(n) = top.get("project")
        && let Some(p) = r.non_empty_string(n, "project", "project")
    {
        job.project = p.value;
    }
    if let Some(n) = top.get("priority")
        && let Some(p) =
            r.int_in(n, "priority", "an integer priority", i64::from(i32::MIN), i64::from(i32::MAX))
    {
        job.priority = p as i32;
    }
    if let Some(n) = top.get("labels") {
        job.labels = plain(r.string_map(n, "labels"));
    }
    if let Some(n) = top.get("params") {
        job.params = plain(r.string_map(n, "params"));
    }
    if let Some(n) = top.get("env") {
        job.env = r.string_map(n, "env");
    }
    match top.get("tasks") {
        None => r.problems.add(
            Pos::START,
            "tasks",
            "missing `tasks`",
            Some("add a `tasks:` list with at least one task".into()),
        ),
        Some(n) => match &n.value {
            Value::Seq(items) if items.is_empty() => r.problems.add(
                n.pos,
                "tasks",
                "a job needs at least one task",
                Some("add a task with a `name` and a `command`".into()),
            ),
            Value::Seq(items) => {
                job.task_count = items.len();
                job.tasks = items.iter().enumerate().filter_map(|(i, t)| r.task(t, i)).collect();
            }
            _ => r.wrong_type(n, "tasks", "a list of tasks"),
        },
    }
    job.positions = r.positions;
    job
}

/// The values of a string map without their positions.
fn plain(map: BTreeMap<String, At<String>>) -> BTreeMap<String, String> {
    map.into_iter().map(|(k, v)| (k, v.value)).collect()
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() { key.to_string() } else { format!("{parent}.{key}") }
}

/// The checked entries of one mapping.
struct Fields<'n> {
    pos: Pos,
    entries: &'n [Entry],
}

impl<'n> Fields<'n> {
    fn entry(&self, key: &str) -> Option<&'n Entry> {
        self.entries.iter().find(|e| e.key == key)
    }

    fn get(&self, key: &str) -> Option<&'n Node> {
        self.entry(key).map(|e| &e.value)
    }
}

struct Reader<'p> {
    problems: &'p mut Problems,
    positions: HashMap<String, Pos>,
    /// Tasks the job expands to so far (one per frame of an array task), against
    /// [`MAX_TASKS`].
    planned: usize,
}

impl Reader<'_> {
    fn wrong_type(&mut self, node: &Node, field: &str, expected: &str) {
        self.problems.add(node.pos, field, format!("expected {expected}, found {}", node.kind()), None);
    }

    /// A mapping whose keys must all be in `known`; unknown keys are reported with a suggestion.
    fn mapping<'n>(&mut self, node: &'n Node, field: &str, known: &[&str]) -> Option<Fields<'n>> {
        let Value::Map(entries) = &node.value else {
            let what = if field.is_empty() {
                "a mapping of job fields (`version`, `name`, `tasks`, ...)".to_string()
            } else {
                format!("a mapping with fields {}", quoted(known))
            };
            self.wrong_type(node, field, &what);
            return None;
        };
        for e in entries {
            let path = join(field, &e.key);
            self.positions.insert(path.clone(), e.value.pos);
            if !known.contains(&e.key.as_str()) {
                let hint = match closest(&e.key, known.iter().copied()) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("known fields here: {}", quoted(known)),
                };
                self.problems.add(e.key_pos, &path, format!("unknown field `{}`", e.key), Some(hint));
            }
        }
        Some(Fields { pos: node.pos, entries })
    }

    /// A string value (not a number or boolean).
    fn string(&mut self, node: &Node, field: &str) -> Option<At<String>> {
        match &node.value {
            Value::Str(s) => Some(At { value: s.clone(), pos: node.pos, field: field.to_string() }),
            _ => {
                self.wrong_type(node, field, "a string");
                None
            }
        }
    }

    fn non_empty_string(&mut self, node: &Node, field: &str, what: &str) -> Option<At<String>> {
        let s = self.string(node, field)?;
        if s.value.trim().is_empty() {
            self.problems.add(node.pos, field, format!("{what} is empty"), None);
            return None;
        }
        Some(s)
    }

    /// A string, number or boolean, as text.
    fn text(&mut self, node: &Node, field: &str) -> Option<At<String>> {
        match node.scalar_text() {
            Some(value) => Some(At { value, pos: node.pos, field: field.to_string() }),
            None => {
                self.wrong_type(node, field, "a string, number or boolean");
                None
            }
        }
    }

    /// An integer within `min..=max`.
    fn int_in(&mut self, node: &Node, field: &str, expected: &str, min: i64, max: i64) -> Option<i64> {
        let Value::Int(i) = node.value else {
            self.wrong_type(node, field, expected);
            return None;
        };
        if i < min || i > max {
            self.problems.add(
                node.pos,
                field,
                format!("{i} is out of range: expected {expected} from {min} to {max}"),
                None,
            );
            return None;
        }
        Some(i)
    }

    /// A mapping from names to text values (numbers and booleans become text).
    fn string_map(&mut self, node: &Node, field: &str) -> BTreeMap<String, At<String>> {
        let Value::Map(entries) = &node.value else {
            self.wrong_type(node, field, "a mapping of names to values");
            return BTreeMap::new();
        };
        let mut map = BTreeMap::new();
        for e in entries {
            let path = join(field, &e.key);
            self.positions.insert(path.clone(), e.value.pos);
            if let Some(v) = self.text(&e.value, &path) {
                map.insert(e.key.clone(), v);
            }
        }
        map
    }

    fn duration(&mut self, node: &Node, field: &str) -> Option<Duration> {
        let Value::Str(text) = &node.value else {
            self.problems.add(
                node.pos,
                field,
                format!("expected a duration like `30m`, found {}", node.kind()),
                Some("write a number with a unit, like `30s`, `5m` or `1h 30m`".into()),
            );
            return None;
        };
        match humantime::parse_duration(text.trim()) {
            Ok(d) => match DurationProblem::of(d) {
                None => Some(d),
                Some(problem) => {
                    let (message, hint) = problem.explain(text.trim());
                    self.problems.add(node.pos, field, message, Some(hint.to_string()));
                    None
                }
            },
            Err(e) => {
                self.problems.add(
                    node.pos,
                    field,
                    format!("`{text}` is not a duration: {e}"),
                    Some("write a number with a unit, like `30s`, `5m` or `1h 30m`".into()),
                );
                None
            }
        }
    }

    /// A duration that is more than zero.
    fn nonzero_duration(&mut self, node: &Node, field: &str, what: &str) -> Option<Duration> {
        let d = self.duration(node, field)?;
        if d.is_zero() {
            self.problems.add(
                node.pos,
                field,
                format!("{what} is zero"),
                Some("give it a length, like `1s`".into()),
            );
            return None;
        }
        Some(d)
    }

    /// A list read item by item with `item` (each item's position recorded under
    /// `field[k]`). Anything else is reported as `expected a list of {what}`, with `example`
    /// as a hint.
    fn list<T>(
        &mut self,
        node: &Node,
        field: &str,
        what: &str,
        example: &str,
        mut item: impl FnMut(&mut Self, &Node, &str) -> Option<T>,
    ) -> Vec<T> {
        let Value::Seq(items) = &node.value else {
            self.problems.add(
                node.pos,
                field,
                format!("expected a list of {what}, found {}", node.kind()),
                Some(format!("write a list, like `{example}`")),
            );
            return Vec::new();
        };
        let mut out = Vec::with_capacity(items.len());
        for (k, node) in items.iter().enumerate() {
            let path = format!("{field}[{k}]");
            self.positions.insert(path.clone(), node.pos);
            out.extend(item(self, node, &path));
        }
        out
    }

    /// A required field of a nested mapping, reported as missing at the mapping when absent.
    fn required<'n>(&mut self, m: &Fields<'n>, field: &str, key: &str, hint: &str) -> Option<&'n Node> {
        let node = m.get(key);
        if node.is_none() {
            self.problems.add(m.pos, &join(field, key), format!("missing `{key}`"), Some(hint.to_string()));
        }
        node
    }

    fn task(&mut self, node: &Node, index: usize) -> Option<TaskSpec> {
        let field = format!("tasks[{index}]");
        self.positions.insert(field.clone(), node.pos);
        let t = self.mapping(node, &field, TASK_FIELDS)?;
        let f = |key: &str| join(&field, key);
        let mut task = TaskSpec {
            name: None,
            steps: Vec::new(),
            steps_from: StepsFrom::Command,
            env: BTreeMap::new(),
            resources: Resources::default(),
            timeout: None,
            setup_timeout: None,
            retries: RetryPolicy::default(),
            frames: None,
            depends_on: Vec::new(),
            exit_codes: ExitCodes::default(),
            constraints: BTreeMap::new(),
            runtime: Some(RuntimeKind::Process),
            image: None,
            build: None,
            user: None,
            network: NetworkPolicy::None,
            services: Vec::new(),
            secrets: Vec::new(),
            outputs: None,
            outputs_on_failure: true,
            inputs: Vec::new(),
            agent: None,
        };
        match t.get("name") {
            None => self.problems.add(
                t.pos,
                &f("name"),
                "missing `name`",
                Some("give the task a name, like `name: render`".into()),
            ),
            Some(n) => task.name = self.task_name(n, &f("name")),
        }
        match (t.entry("command"), t.entry("steps")) {
            (Some(a), Some(b)) => {
                let later = if (a.key_pos.line, a.key_pos.column) > (b.key_pos.line, b.key_pos.column) {
                    a
                } else {
                    b
                };
                self.problems.add(
                    later.key_pos,
                    &f(&later.key),
                    "both `command` and `steps` are set",
                    Some("use `command` for one command or `steps` for several, not both".into()),
                );
            }
            // The agent block is the work of an agent task: its command becomes the only step.
            (None, None) if t.entry("agent").is_some() => task.steps_from = StepsFrom::Agent,
            (None, None) => self.problems.add(
                t.pos,
                &field,
                "task has no command",
                Some(
                    "add `command:` (or `steps:` for several commands in order, or an `agent:` block \
                     for an AI-agent task)"
                        .into(),
                ),
            ),
            (Some(c), None) => task.steps.extend(self.command(&c.value, &f("command"))),
            (None, Some(s)) => {
                task.steps_from = StepsFrom::Steps;
                self.steps(&s.value, &f("steps"), &mut task.steps);
            }
        }
        if let Some(n) = t.get("env") {
            task.env = self.string_map(n, &f("env"));
        }
        if let Some(n) = t.get("resources") {
            task.resources = self.resources(n, &f("resources"));
        }
        if let Some(n) = t.get("timeout") {
            task.timeout = self.duration(n, &f("timeout"));
            if task.timeout == Some(Duration::ZERO) {
                self.problems.add(
                    n.pos,
                    &f("timeout"),
                    "timeout is zero",
                    Some("omit `timeout` for no limit".into()),
                );
            }
        }
        if let Some(n) = t.get("setup_timeout") {
            task.setup_timeout = self.duration(n, &f("setup_timeout"));
            if task.setup_timeout == Some(Duration::ZERO) {
                self.problems.add(
                    n.pos,
                    &f("setup_timeout"),
                    "setup_timeout is zero",
                    Some("omit `setup_timeout` for the node's limit (15 minutes)".into()),
                );
            }
        }
        if let Some(n) = t.get("retries") {
            task.retries = self.retries(n, &f("retries"));
        }
        if let Some(n) = t.get("array") {
            // A bad range expands to no frames, so its templates are not checked against a
            // frame-less context. Past the job's limit no more frames are made: the job is
            // refused anyway, and they would only cost memory.
            let frames = if self.planned > MAX_TASKS { None } else { self.frames(n, &f("array")) };
            task.frames = Some(frames.unwrap_or_default());
        }
        self.count_planned(&t, &field, task.frames.as_ref().map_or(1, Vec::len));
        if let Some(n) = t.get("depends_on") {
            task.depends_on = self.depends_on(n, &f("depends_on"));
        }
        if let Some(n) = t.get("exit_codes") {
            task.exit_codes = self.exit_codes(n, &f("exit_codes"));
        }
        if let Some(n) = t.get("constraints") {
            task.constraints = plain(self.string_map(n, &f("constraints")));
        }
        self.sandbox(&t, &field, &mut task);
        self.files(&t, &field, &mut task);
        if let Some(n) = t.get("agent") {
            task.agent = self.agent(n, &f("agent"));
        }
        self.check_runtime(&t, &field, task.runtime);
        Some(task)
    }

    fn steps(&mut self, node: &Node, field: &str, steps: &mut Vec<StepSpec>) {
        match &node.value {
            Value::Seq(items) if items.is_empty() => {
                self.problems.add(node.pos, field, "steps is empty", Some("list at least one command".into()))
            }
            Value::Seq(items) => {
                for (j, item) in items.iter().enumerate() {
                    let path = format!("{field}[{j}]");
                    self.positions.insert(path.clone(), item.pos);
                    steps.extend(self.command(item, &path));
                }
            }
            _ => self.wrong_type(node, field, "a list of commands"),
        }
    }

    fn task_name(&mut self, node: &Node, field: &str) -> Option<At<String>> {
        let name = self.non_empty_string(node, field, "task name")?;
        if !valid_task_name(&name.value) {
            let suggestion = task_name_suggestion(&name.value);
            self.problems.add(
                node.pos,
                field,
                format!("task name `{}` may only use letters, digits, `_`, `.` and `-`", name.value),
                Some(format!("rename it, like `{suggestion}`")),
            );
            return None;
        }
        if name.value.len() > MAX_NAME_LEN {
            self.problems.add(
                node.pos,
                field,
                format!("the name is {} bytes long, more than the limit of {MAX_NAME_LEN}", name.value.len()),
                Some("shorten it".into()),
            );
            return None;
        }
        Some(name)
    }

    /// A string (run by the shell) or an argv list.
    fn command(&mut self, node: &Node, field: &str) -> Option<StepSpec> {
        let empty_hint =
            || Some("write a shell command like `echo hi`, or an argv list like `[\"echo\", \"hi\"]`".into());
        match &node.value {
            Value::Str(s) if s.trim().is_empty() => {
                self.problems.add(node.pos, field, "command is empty", empty_hint());
                None
            }
            Value::Str(s) => {
                Some(StepSpec::Shell(At { value: s.clone(), pos: node.pos, field: field.to_string() }))
            }
            Value::Seq(items) if items.is_empty() => {
                self.problems.add(node.pos, field, "command is empty", empty_hint());
                None
            }
            Value::Seq(items) => {
                let mut argv = Vec::with_capacity(items.len());
                for (k, item) in items.iter().enumerate() {
                    let path = format!("{field}[{k}]");
                    self.positions.insert(path.clone(), item.pos);
                    argv.extend(self.text(item, &path));
                }
                if argv.len() != items.len() {
                    return None;
                }
                if let Some(program) = argv.first().filter(|a| a.value.is_empty()) {
                    self.problems.add(program.pos, &program.field, "program name is empty", empty_hint());
                    return None;
                }
                Some(StepSpec::Argv(argv))
            }
            _ => {
                self.wrong_type(node, field, "a command (a string, or a list of program and arguments)");
                None
            }
        }
    }

    fn resources(&mut self, node: &Node, field: &str) -> Resources {
        let mut res = Resources::default();
        let Some(r) = self.mapping(node, field, RESOURCE_FIELDS) else {
            return res;
        };
        if let Some(n) = r.get("cores") {
            let path = join(field, "cores");
            match n.value {
                Value::Int(i) if i < 1 => self.problems.add(
                    n.pos,
                    &path,
                    format!("cores must be at least 1, found {i}"),
                    Some("omit `cores` to reserve one core".into()),
                ),
                Value::Int(i) => match u32::try_from(i) {
                    Ok(c) => res.cores = c,
                    Err(_) => self.problems.add(n.pos, &path, format!("{i} cores is too many"), None),
                },
                _ => self.wrong_type(n, &path, "a whole number of cores"),
            }
        }
        if let Some(n) = r.get("memory") {
            let path = join(field, "memory");
            match &n.value {
                Value::Str(s) => match parse_memory(s) {
                    Ok(bytes) => res.memory = bytes,
                    Err(_) => self.problems.add(
                        n.pos,
                        &path,
                        format!("`{s}` is not a memory size"),
                        Some("write a number with a unit, like 512MiB, 2GiB or 1G".into()),
                    ),
                },
                Value::Int(i) => match u64::try_from(*i) {
                    Ok(bytes) => res.memory = bytes,
                    Err(_) => self.problems.add(n.pos, &path, "memory cannot be negative", None),
                },
                _ => self.wrong_type(n, &path, "a memory size like `512MiB`"),
            }
        }
        if let Some(n) = r.get("pids") {
            let path = join(field, "pids");
            if let Some(p) = self.int_in(n, &path, "a whole number of processes", 1, MAX_PIDS) {
                res.pids = p as u32;
            }
        }
        res
    }

    fn retries(&mut self, node: &Node, field: &str) -> RetryPolicy {
        let mut policy = RetryPolicy::default();
        if let Value::Int(_) = node.value {
            if let Some(c) = self.int_in(node, field, "a retry count", 0, i64::from(u32::MAX)) {
                policy.count = c as u32;
            }
            return policy;
        }
        if !matches!(node.value, Value::Map(_)) {
            self.wrong_type(node, field, "a retry count or a mapping with `count`, `backoff` and `on`");
            return policy;
        }
        let Some(r) = self.mapping(node, field, RETRY_FIELDS) else {
            return policy;
        };
        if let Some(n) = r.get("count")
            && let Some(c) = self.int_in(n, &join(field, "count"), "a retry count", 0, i64::from(u32::MAX))
        {
            policy.count = c as u32;
        }
        if let Some(n) = r.get("backoff")
            && let Some(d) = self.duration(n, &join(field, "backoff"))
        {
            policy.backoff = d;
        }
        if let Some(n) = r.get("on") {
            let path = join(field, "on");
            let Value::Seq(items) = &n.value else {
                self.wrong_type(n, &path, "a list of failure classes");
                return policy;
            };
            let mut on = BTreeSet::new();
            for (k, item) in items.iter().enumerate() {
                let item_path = format!("{path}[{k}]");
                let Some(word) = self.string(item, &item_path) else {
                    continue;
                };
                match FailureClass::from_str(&word.value) {
                    Ok(class) => {
                        on.insert(class);
                    }
                    Err(_) => {
                        let hint = match closest(&word.value, FAILURE_CLASSES.iter().copied()) {
                            Some(s) => format!("did you mean `{s}`?"),
                            None => format!("failure classes are {}", quoted(FAILURE_CLASSES)),
                        };
                        self.problems.add(
                            item.pos,
                            &item_path,
                            format!("unknown failure class `{}`", word.value),
                            Some(hint),
                        );
                    }
                }
            }
            policy.on = on;
        }
        policy
    }

    /// Counts a task's `planned` tasks (its frames, or 1) towards the job's [`MAX_TASKS`],
    /// reporting the task that goes past it.
    fn count_planned(&mut self, t: &Fields<'_>, field: &str, planned: usize) {
        let before = self.planned;
        self.planned = before.saturating_add(planned);
        if before <= MAX_TASKS && self.planned > MAX_TASKS {
            let (pos, at) = match t.get("array") {
                Some(n) => (n.pos, join(field, "array")),
                None => (t.pos, field.to_string()),
            };
            self.problems.add(
                pos,
                &at,
                format!("the job expands to more than {MAX_TASKS} tasks, the most one job may have"),
                Some("split it into several jobs".into()),
            );
        }
    }

    fn frames(&mut self, node: &Node, field: &str) -> Option<Vec<i64>> {
        match &node.value {
            Value::Str(s) => match frames(s) {
                Ok(frames) => Some(frames),
                Err(FrameError::TooMany(e)) => {
                    self.problems.add(
                        node.pos,
                        field,
                        e,
                        Some("split it into several array tasks, or the job into several jobs".into()),
                    );
                    None
                }
                Err(FrameError::Syntax(e)) => {
                    self.problems.add(
                        node.pos,
                        field,
                        format!("bad frame range: {e}"),
                        Some(
                            "write frames like `1-100`, `1-9x2` (every 2nd), `1,5,7` or `1-3,10-20x5`".into(),
                        ),
                    );
                    None
                }
            },
            Value::Int(i) if *i < 0 => {
                self.problems.add(
                    node.pos,
                    field,
                    format!("frame {i} is negative"),
                    Some("frames are 0 or more".into()),
                );
                None
            }
            Value::Int(i) => Some(vec![*i]),
            _ => {
                self.wrong_type(node, field, "a frame range like `1-100` or a frame number");
                None
            }
        }
    }

    fn depends_on(&mut self, node: &Node, field: &str) -> Vec<At<String>> {
        let Value::Seq(items) = &node.value else {
            let hint = matches!(node.value, Value::Str(_))
                .then(|| "write a list, like `depends_on: [prepare]`".into());
            self.problems.add(
                node.pos,
                field,
                format!("expected a list of task names, found {}", node.kind()),
                hint,
            );
            return Vec::new();
        };
        let mut names: Vec<At<String>> = Vec::new();
        let mut seen = HashSet::new();
        for (k, item) in items.iter().enumerate() {
            let path = format!("{field}[{k}]");
            self.positions.insert(path.clone(), item.pos);
            if let Some(name) = self.string(item, &path)
                && seen.insert(name.value.clone())
            {
                names.push(name);
            }
        }
        names
    }

    fn exit_codes(&mut self, node: &Node, field: &str) -> ExitCodes {
        let mut codes = ExitCodes::default();
        let Some(e) = self.mapping(node, field, EXIT_CODE_FIELDS) else {
            return codes;
        };
        if let Some(n) = e.get("warning") {
            codes.warning = self.code_list(n, &join(field, "warning"));
        }
        if let Some(n) = e.get("skip") {
            codes.skip = self.code_list(n, &join(field, "skip"));
        }
        codes
    }

    fn code_list(&mut self, node: &Node, field: &str) -> Vec<i32> {
        let Value::Seq(items) = &node.value else {
            self.wrong_type(node, field, "a list of exit codes");
            return Vec::new();
        };
        let mut codes = Vec::new();
        for (k, item) in items.iter().enumerate() {
            let path = format!("{field}[{k}]");
            if let Some(c) = self.int_in(item, &path, "an exit code", 0, 255) {
                codes.push(c as i32);
            }
        }
        codes
    }
}

/// `a`, `b` and `c` as "`a`, `b`, `c`".
fn quoted(words: &[&str]) -> String {
    words.iter().map(|w| format!("`{w}`")).collect::<Vec<_>>().join(", ")
}
