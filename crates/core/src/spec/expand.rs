//! From a checked [`JobSpec`] to a [`JobPlan`]: cross-task checks (unique names, known
//! dependencies and artifact producers, no cycles), template rendering with the checks on
//! rendered paths and URLs, and one task per frame of array tasks.
//!
//! Everything here is linear in the size of the job (a dependency chain of 20,000 tasks or an
//! array of 100,000 frames compiles in a second or two even unoptimised), and expansion stops
//! once the plan passes [`MAX_PLAN_BYTES`], so a small file cannot make the compiler hold
//! gigabytes.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::TemplateContext;
use super::error::{Pos, Problems, closest};
use super::schema::{At, JobSpec, RawAgent, RawInput, RawService, RawSource, StepSpec, StepsFrom, TaskSpec};
use super::template::Renderer;
use crate::job::{
    AgentSpec, BuildSpec, Command, HealthCheck, InputSource, InputSpec, JobPlan, PlanError, PushSpec,
    ServiceSpec, TaskPlan, outside_workspace, url_problem,
};
use crate::limits::MAX_PLAN_BYTES;

/// At most this many task names are listed in the hint for an unknown name.
const NAMES_IN_HINT: usize = 10;

/// Builds the plan, recording problems; the plan is only meaningful if none were recorded.
pub(crate) fn build(spec: &JobSpec, ctx: &TemplateContext, problems: &mut Problems) -> JobPlan {
    build_within(spec, ctx, problems, MAX_PLAN_BYTES)
}

/// [`build`], stopping once the plan's JSON passes `max_bytes` (a parameter so that tests need
/// not build hundreds of megabytes).
pub(crate) fn build_within(
    spec: &JobSpec,
    ctx: &TemplateContext,
    problems: &mut Problems,
    max_bytes: usize,
) -> JobPlan {
    let mut params = spec.params.clone();
    params.extend(ctx.params.iter().map(|(k, v)| (k.clone(), v.clone())));
    let renderer = Renderer::new(&ctx.env, &params);

    let name = match &spec.name {
        Some(n) => render(&renderer, n, None, problems).unwrap_or_default(),
        None => String::new(),
    };
    check_names(spec, problems);

    let mut tasks = Vec::new();
    // For each planned task, the index of the file task it came from.
    let mut origin = Vec::new();
    // Bytes of the plan's JSON so far, against what the server accepts.
    let mut plan_bytes = 0;
    // A job with problems already is refused, its plan thrown away: the first frame of each
    // array is enough to check the templates, and spares expanding a job that is refused
    // for having too many tasks.
    let frames_wanted = if problems.is_empty() { usize::MAX } else { 1 };
    'tasks: for (i, task) in spec.tasks.iter().enumerate() {
        let Some(task_name) = &task.name else { continue };
        let frames: Vec<Option<i64>> = match &task.frames {
            Some(frames) => frames.iter().take(frames_wanted).copied().map(Some).collect(),
            None => vec![None],
        };
        for frame in frames {
            // Stop at the first frame that fails: the others would fail the same way.
            let Some(plan) = plan_task(spec, task, &task_name.value, frame, &renderer, problems) else {
                break;
            };
            plan_bytes += json_len(&plan);
            if plan_bytes > max_bytes {
                let field = task_name.field.strip_suffix(".name").unwrap_or(&task_name.field);
                problems.add(
                    task_name.pos,
                    field,
                    format!(
                        "the job's plan is larger than {} MiB, the most the server accepts",
                        max_bytes >> 20
                    ),
                    Some("use fewer frames, or move long scripts and values into input files".into()),
                );
                break 'tasks;
            }
            tasks.push(plan);
            origin.push(i);
        }
    }
    let plan = JobPlan {
        name,
        project: spec.project.clone(),
        priority: spec.priority,
        labels: spec.labels.clone(),
        tasks,
    };
    if problems.is_empty() {
        check_plan(spec, &plan, &origin, problems);
    }
    plan
}

/// Bytes of `plan` as JSON, counted without keeping them.
fn json_len(plan: &TaskPlan) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Cannot fail: every map in a plan has string keys, and counting does no I/O.
    let _ = serde_json::to_writer(&mut count, plan);
    count.0
}

/// Renders one templated value, recording a problem at its position if it fails.
fn render(
    renderer: &Renderer,
    value: &At<String>,
    frame: Option<i64>,
    problems: &mut Problems,
) -> Option<String> {
    match renderer.render(&value.value, frame) {
        Ok(text) => Some(text),
        Err(e) => {
            problems.add(value.pos, &value.field, e.message, e.hint);
            None
        }
    }
}

/// One concrete task (one frame of an array task), or `None` if a template failed or a
/// rendered value was rejected.
fn plan_task(
    spec: &JobSpec,
    task: &TaskSpec,
    name: &str,
    frame: Option<i64>,
    renderer: &Renderer,
    problems: &mut Problems,
) -> Option<TaskPlan> {
    let mut r = TaskRender { renderer, frame, problems, ok: true };
    let merged = spec.env.iter().filter(|(k, _)| !task.env.contains_key(*k)).chain(&task.env);
    let env: BTreeMap<String, String> = merged.map(|(key, value)| (key.clone(), r.text(value))).collect();
    for secret in &task.secrets {
        if env.contains_key(&secret.value) {
            r.reject(
                secret,
                format!("secret `{}` is also set in `env`", secret.value),
                "a secret becomes an environment variable of the same name; remove it from `env`",
            );
        }
    }
    if let Some(key) = task.agent.as_ref().and_then(|a| a.key_secret.as_ref())
        && task.secrets.iter().any(|s| s.value == key.value)
    {
        r.reject(
            key,
            format!("secret `{}` is both the agent's key and in `secrets`", key.value),
            "the key must stay outside the sandbox; remove it from `secrets`",
        );
    }
    let mut steps: Vec<Command> = task.steps.iter().map(|s| r.command(s)).collect();
    let agent = task.agent.as_ref().map(|a| r.agent(a));
    if task.steps_from == StepsFrom::Agent
        && let Some(agent) = &agent
    {
        // An agent task without `command` or `steps`: the runtime runs the agent's command as
        // the only step (the agent reads its prompt from stdin and `prompt.txt`).
        steps.push(agent.command.clone());
    }
    let image = task.image.as_ref().map(|i| r.text(i));
    let build = task.build.as_ref().map(|b| BuildSpec {
        dockerfile: r.text(&b.dockerfile),
        context: r.text(&b.context),
        args: r.map(&b.args),
    });
    let user = task.user.as_ref().map(|u| r.text(u));
    let services = task.services.iter().map(|s| r.service(s)).collect();
    let outputs = task.outputs.iter().flatten().map(|o| r.output(o)).collect();
    let inputs = r.inputs(&task.inputs);
    let mut seen = HashSet::new();
    let depends_on: Vec<String> =
        task.dependencies().filter(|d| seen.insert(d.value.as_str())).map(|d| d.value.clone()).collect();
    r.ok.then(|| TaskPlan {
        name: name.to_string(),
        frame,
        steps,
        env,
        resources: task.resources,
        timeout: task.timeout,
        setup_timeout: task.setup_timeout,
        retries: task.retries.clone(),
        depends_on,
        exit_codes: task.exit_codes.clone(),
        constraints: task.constraints.clone(),
        runtime: task.runtime.unwrap_or_default(),
        image,
        // Set by the client when it ships the image and `image` becomes its id.
        image_name: None,
        // Set by the client once it has uploaded the image; a job file never names a blob.
        image_blob: None,
        build,
        user,
        network: task.network.clone(),
        services,
        secrets: task.secrets.iter().map(|s| s.value.clone()).collect(),
        outputs,
        outputs_on_failure: task.outputs_on_failure,
        inputs,
        agent,
    })
}

/// Renders the values of one concrete task and checks the rendered paths and URLs, recording
/// problems; `ok` tells whether the task came out whole.
struct TaskRender<'a> {
    renderer: &'a Renderer,
    frame: Option<i64>,
    problems: &'a mut Problems,
    ok: bool,
}

impl TaskRender<'_> {
    /// The rendered text, or `None` (and `ok` cleared) if the template failed; checks on the
    /// rendered value are made only when there is one.
    fn rendered(&mut self, value: &At<String>) -> Option<String> {
        let text = render(self.renderer, value, self.frame, self.problems);
        self.ok &= text.is_some();
        text
    }

    /// The rendered text, or an empty string if the template failed.
    fn text(&mut self, value: &At<String>) -> String {
        self.rendered(value).unwrap_or_default()
    }

    fn map(&mut self, map: &BTreeMap<String, At<String>>) -> BTreeMap<String, String> {
        map.iter().map(|(k, v)| (k.clone(), self.text(v))).collect()
    }

    fn command(&mut self, step: &StepSpec) -> Command {
        match step {
            StepSpec::Shell(s) => Command::Shell(self.text(s)),
            StepSpec::Argv(args) => Command::Argv(args.iter().map(|a| self.text(a)).collect()),
        }
    }

    /// Records a problem with a rendered value.
    fn reject(&mut self, at: &At<String>, message: String, hint: &str) {
        self.problems.add(at.pos, &at.field, message, Some(hint.to_string()));
        self.ok = false;
    }

    fn service(&mut self, s: &RawService) -> ServiceSpec {
        ServiceSpec {
            name: s.name.value.clone(),
            image: self.text(&s.image),
            command: s.command.as_ref().map(|c| self.command(c)),
            env: self.map(&s.env),
            tmpfs: s.tmpfs.clone(),
            user: s.user.as_ref().map(|u| self.text(u)),
            healthcheck: s.healthcheck.as_ref().map(|h| HealthCheck {
                command: self.command(&h.command),
                interval: h.interval,
                timeout: h.timeout,
                retries: h.retries,
            }),
        }
    }

    fn agent(&mut self, a: &RawAgent) -> AgentSpec {
        let prompt = a.prompt.as_ref().and_then(|at| {
            let prompt = self.rendered(at);
            if prompt.as_ref().is_some_and(|p| p.trim().is_empty()) {
                self.reject(at, "prompt is empty".into(), "say what the agent should do");
            }
            prompt
        });
        let prompt_file = a.prompt_file.as_ref().map(|at| {
            let path = self.rendered(at).unwrap_or_default();
            if let Some(problem) = outside_workspace(&path) {
                self.reject(
                    at,
                    format!("prompt_file `{path}` {problem}"),
                    "name a file in the workspace (from the repository or an input), like `TASK.md`",
                );
            }
            path
        });
        AgentSpec {
            command: self.command(&a.command),
            prompt: prompt.unwrap_or_default(),
            prompt_file,
            repo: a.repo.as_ref().map(|r| self.text(r)),
            budget: a.budget,
            push: a
                .push
                .as_ref()
                .map(|(remote, branch)| PushSpec { remote: self.text(remote), branch: self.text(branch) }),
            provider: a.provider.unwrap_or_default(),
            upstream: a.upstream.as_ref().map(|u| self.text(u)),
            key_secret: a.key_secret.as_ref().map(|k| k.value.clone()),
        }
    }

    /// An output glob, which must stay inside the workspace.
    fn output(&mut self, glob: &At<String>) -> String {
        let text = self.rendered(glob);
        if let Some(text) = &text
            && let Some(problem) = outside_workspace(text)
        {
            self.reject(
                glob,
                format!("output `{text}` {problem}"),
                "outputs are globs relative to the task workspace, like `out/*.png`",
            );
        }
        text.unwrap_or_default()
    }

    /// The inputs, each with its destination (given, or the base name of its source), checked
    /// to stay inside the workspace and not to collide.
    fn inputs(&mut self, inputs: &[RawInput]) -> Vec<InputSpec> {
        let mut planned: Vec<InputSpec> = Vec::with_capacity(inputs.len());
        let mut places: HashSet<String> = HashSet::with_capacity(inputs.len());
        for input in inputs {
            // `base` is `None` when the source did not render, `Some(None)` when it has no
            // usable base name.
            let (source, origin, base) = match &input.source {
                RawSource::Path(p) => {
                    let path = self.rendered(p);
                    let base = path.as_deref().map(base_name);
                    (InputSource::Path(path.unwrap_or_default()), p, base)
                }
                RawSource::Url(u) => {
                    let url = self.rendered(u);
                    if let Some((message, hint)) = url.as_deref().and_then(url_problem) {
                        self.reject(u, message, hint);
                    }
                    let base = url.as_deref().map(url_base_name);
                    (InputSource::Url(url.unwrap_or_default()), u, base)
                }
                RawSource::Artifact { task, path } => {
                    let file = self.rendered(path);
                    if let Some(file) = &file
                        && let Some(problem) = outside_workspace(file)
                    {
                        self.reject(
                            path,
                            format!("artifact path `{file}` {problem}"),
                            "name the file as the producing task's `outputs` keep it, like `prepare:out/model.bin`",
                        );
                    }
                    let base = file.as_deref().map(base_name);
                    let source =
                        InputSource::Artifact { task: task.value.clone(), path: file.unwrap_or_default() };
                    (source, path, base)
                }
            };
            let (to, at) = match &input.to {
                Some(at) => {
                    let to = self.rendered(at);
                    if let Some(to) = &to
                        && let Some(problem) = outside_workspace(to)
                    {
                        self.reject(
                            at,
                            format!("input destination `{to}` {problem}"),
                            "`to` is a path relative to the task workspace, like `data/model.bin`",
                        );
                    }
                    (to, at)
                }
                None => {
                    if let Some(None) = base {
                        self.reject(
                            origin,
                            "cannot tell where to place this input".into(),
                            "add `to:` with a path relative to the task workspace",
                        );
                    }
                    (base.flatten(), origin)
                }
            };
            if let Some(to) = &to
                && !places.insert(to.clone())
            {
                self.reject(at, format!("two inputs are placed at `{to}`"), "give one of them another `to`");
            }
            planned.push(InputSpec { source, to: to.unwrap_or_default() });
        }
        planned
    }
}

/// The last component of a slash-separated path, unless it is `.`, `..` or empty.
fn base_name(path: &str) -> Option<String> {
    let last = path.trim_end_matches('/').rsplit('/').next()?;
    (!matches!(last, "" | "." | "..")).then(|| last.to_string())
}

/// The base name of a URL's path, without its query or fragment.
fn url_base_name(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let (_, path) = rest.split_once('/')?;
    base_name(path)
}

/// Unique task names, and dependencies that name another existing task.
fn check_names(spec: &JobSpec, problems: &mut Problems) {
    // The first task of each name.
    let mut by_name: HashMap<&str, &TaskSpec> = HashMap::with_capacity(spec.tasks.len());
    for task in &spec.tasks {
        let Some(name) = &task.name else { continue };
        match by_name.get(name.value.as_str()).and_then(|t| t.name.as_ref()) {
            Some(first) => problems.add(
                name.pos,
                &name.field,
                format!("duplicate task name `{}`", name.value),
                Some(format!(
                    "task names must be unique; the first `{}` is on line {}",
                    name.value, first.pos.line
                )),
            ),
            None => {
                by_name.insert(&name.value, task);
            }
        }
    }
    // With a task unreadable or unnamed, an unknown name may just be that task's.
    let complete = spec.tasks.len() == spec.task_count && spec.tasks.iter().all(|t| t.name.is_some());
    let mut unknown = Unknown { spec, suggested: 0 };
    for task in &spec.tasks {
        for dep in &task.depends_on {
            if task.name.as_ref().is_some_and(|n| n.value == dep.value) {
                problems.add(
                    dep.pos,
                    &dep.field,
                    format!("task `{}` depends on itself", dep.value),
                    Some("remove it from its own `depends_on`".into()),
                );
            } else if complete && !by_name.contains_key(dep.value.as_str()) {
                let hint = unknown.hint(&dep.value, "tasks of this job");
                problems.add(dep.pos, &dep.field, format!("unknown task `{}`", dep.value), Some(hint));
            }
        }
        for input in &task.inputs {
            let RawSource::Artifact { task: producer, .. } = &input.source else { continue };
            if task.name.as_ref().is_some_and(|n| n.value == producer.value) {
                problems.add(
                    producer.pos,
                    &producer.field,
                    format!("task `{}` takes an input from itself", producer.value),
                    Some(
                        "`from` names another task of the job, like `from: \"prepare:out/model.bin\"`".into(),
                    ),
                );
                continue;
            }
            match by_name.get(producer.value.as_str()) {
                Some(t) if t.outputs.is_none() => problems.add(
                    producer.pos,
                    &producer.field,
                    format!("task `{}` keeps no outputs", producer.value),
                    Some(format!(
                        "list the file in the `outputs` of `{}`, so that it is kept",
                        producer.value
                    )),
                ),
                Some(_) => {}
                None if complete => {
                    let hint = unknown.hint(&producer.value, "`from` names a task of this job");
                    problems.add(
                        producer.pos,
                        &producer.field,
                        format!("unknown task `{}`", producer.value),
                        Some(hint),
                    );
                }
                None => {}
            }
        }
    }
}

/// Hints for unknown task names: the likely typo, or the names there are.
struct Unknown<'a> {
    spec: &'a JobSpec,
    /// Names a suggestion was looked for so far.
    suggested: usize,
}

impl Unknown<'_> {
    /// Looking for a typo compares with every task name; in a generated job of thousands of
    /// tasks with a wrong name everywhere, the first few suggestions are enough.
    const MAX_SUGGESTIONS: usize = 20;

    fn hint(&mut self, name: &str, listing: &str) -> String {
        let names = self.spec.tasks.iter().filter_map(|t| t.name.as_ref()).map(|n| n.value.as_str());
        self.suggested += 1;
        if self.suggested <= Self::MAX_SUGGESTIONS
            && let Some(s) = closest(name, names.clone())
        {
            return format!("did you mean `{s}`?");
        }
        let count = names.clone().count();
        let shown: Vec<&str> = names.take(NAMES_IN_HINT).collect();
        match count - shown.len() {
            0 => format!("{listing}: {}", shown.join(", ")),
            more => format!("{listing}: {} and {more} more", shown.join(", ")),
        }
    }
}

/// Dependency cycles and the plan invariants of [`JobPlan::validate`], placed in the file.
fn check_plan(spec: &JobSpec, plan: &JobPlan, origin: &[usize], problems: &mut Problems) {
    if let Some(cycle) = plan.find_cycle() {
        // Point at the first edge of the cycle: `cycle[0]`'s dependency on `cycle[1]`.
        let edge = match (cycle.first(), cycle.get(1)) {
            (Some(from), Some(to)) => spec
                .tasks
                .iter()
                .filter(|t| t.name.as_ref().is_some_and(|n| &n.value == from))
                .flat_map(|t| t.dependencies())
                .find(|d| &d.value == to),
            _ => None,
        };
        let (pos, field) = edge.map_or((Pos::START, "tasks".to_string()), |d| (d.pos, d.field.clone()));
        problems.add(
            pos,
            &field,
            format!("dependency cycle: {}", cycle.join(" -> ")),
            Some("remove one of these dependencies".into()),
        );
        return;
    }
    if let Err(e) = plan.validate() {
        let (pos, field) = locate(spec, origin, &e);
        let (message, hint) = match e.message.split_once("; ") {
            Some((m, h)) => (m.to_string(), Some(h.to_string())),
            None => (e.message.clone(), None),
        };
        problems.add(pos, &field, message, hint);
    }
}

/// Maps a [`PlanError`] field (indices of planned tasks, `steps`) back to the file's field and
/// position (indices of file tasks, `command` or `steps`).
fn locate(spec: &JobSpec, origin: &[usize], e: &PlanError) -> (Pos, String) {
    let mut field = e.field.clone();
    if let Some(rest) = e.field.strip_prefix("tasks[")
        && let Some((index, rest)) = rest.split_once(']')
        && let Some(&i) = index.parse::<usize>().ok().and_then(|k| origin.get(k))
    {
        let steps_from = spec.tasks.get(i).map_or(StepsFrom::Steps, |t| t.steps_from);
        let rest = match (rest.strip_prefix(".steps["), steps_from) {
            (Some(_), StepsFrom::Command) => ".command".to_string(),
            (Some(_), StepsFrom::Agent) => ".agent.command".to_string(),
            _ => rest.to_string(),
        };
        field = format!("tasks[{i}]{rest}");
    }
    // The most specific recorded position: the field itself, else its nearest parent.
    let mut path = field.as_str();
    loop {
        if let Some(pos) = spec.positions.get(path) {
            return (*pos, field.clone());
        }
        match path.rfind(['.', '[']) {
            Some(cut) => path = &path[..cut],
            None => return (Pos::START, field.clone()),
        }
    }
}
