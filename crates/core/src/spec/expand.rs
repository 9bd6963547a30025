//! From a checked [`JobSpec`] to a [`JobPlan`]: cross-task checks (unique names, known
//! dependencies, no cycles), template rendering and one task per frame of array tasks.

use std::collections::{BTreeMap, HashMap};

use super::TemplateContext;
use super::error::{Pos, Problems, closest};
use super::schema::{At, JobSpec, StepSpec, TaskSpec};
use super::template::Renderer;
use crate::job::{Command, JobPlan, PlanError, TaskPlan};

/// Builds the plan, recording problems; the plan is only meaningful if none were recorded.
pub(crate) fn build(spec: &JobSpec, ctx: &TemplateContext, problems: &mut Problems) -> JobPlan {
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
    for (i, task) in spec.tasks.iter().enumerate() {
        let Some(task_name) = &task.name else { continue };
        let frames: Vec<Option<i64>> = match &task.frames {
            Some(frames) => frames.iter().copied().map(Some).collect(),
            None => vec![None],
        };
        for frame in frames {
            // Stop at the first frame that fails: the others would fail the same way.
            let Some(plan) = plan_task(spec, task, &task_name.value, frame, &renderer, problems) else {
                break;
            };
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

/// One concrete task (one frame of an array task), or `None` if a template failed.
fn plan_task(
    spec: &JobSpec,
    task: &TaskSpec,
    name: &str,
    frame: Option<i64>,
    renderer: &Renderer,
    problems: &mut Problems,
) -> Option<TaskPlan> {
    let mut ok = true;
    let mut env = BTreeMap::new();
    let merged = spec.env.iter().filter(|(k, _)| !task.env.contains_key(*k)).chain(&task.env);
    for (key, value) in merged {
        match render(renderer, value, frame, problems) {
            Some(v) => {
                env.insert(key.clone(), v);
            }
            None => ok = false,
        }
    }
    let mut steps = Vec::with_capacity(task.steps.len());
    for step in &task.steps {
        let command = match step {
            StepSpec::Shell(s) => render(renderer, s, frame, problems).map(Command::Shell),
            StepSpec::Argv(args) => {
                let rendered: Vec<Option<String>> =
                    args.iter().map(|a| render(renderer, a, frame, problems)).collect();
                rendered.into_iter().collect::<Option<Vec<_>>>().map(Command::Argv)
            }
        };
        match command {
            Some(c) => steps.push(c),
            None => ok = false,
        }
    }
    ok.then(|| TaskPlan {
        name: name.to_string(),
        frame,
        steps,
        env,
        resources: task.resources,
        timeout: task.timeout,
        retries: task.retries.clone(),
        depends_on: task.depends_on.iter().map(|d| d.value.clone()).collect(),
        exit_codes: task.exit_codes.clone(),
        constraints: task.constraints.clone(),
        ..TaskPlan::default()
    })
}

/// Unique task names, and dependencies that name another existing task.
fn check_names(spec: &JobSpec, problems: &mut Problems) {
    let mut first: HashMap<&str, Pos> = HashMap::new();
    for task in &spec.tasks {
        let Some(name) = &task.name else { continue };
        if let Some(pos) = first.get(name.value.as_str()) {
            problems.add(
                name.pos,
                &name.field,
                format!("duplicate task name `{}`", name.value),
                Some(format!(
                    "task names must be unique; the first `{}` is on line {}",
                    name.value, pos.line
                )),
            );
        } else {
            first.insert(&name.value, name.pos);
        }
    }
    // With a task unreadable or unnamed, an unknown name may just be that task's.
    let complete = spec.tasks.len() == spec.task_count && spec.tasks.iter().all(|t| t.name.is_some());
    for task in &spec.tasks {
        for dep in &task.depends_on {
            if task.name.as_ref().is_some_and(|n| n.value == dep.value) {
                problems.add(
                    dep.pos,
                    &dep.field,
                    format!("task `{}` depends on itself", dep.value),
                    Some("remove it from its own `depends_on`".into()),
                );
            } else if complete && !first.contains_key(dep.value.as_str()) {
                let names: Vec<&str> =
                    spec.tasks.iter().filter_map(|t| t.name.as_ref()).map(|n| n.value.as_str()).collect();
                let hint = match closest(&dep.value, names.iter().copied()) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("tasks of this job: {}", names.join(", ")),
                };
                problems.add(dep.pos, &dep.field, format!("unknown task `{}`", dep.value), Some(hint));
            }
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
                .flat_map(|t| &t.depends_on)
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
        let uses_steps = spec.tasks.get(i).is_some_and(|t| t.uses_steps);
        let rest = match rest.strip_prefix(".steps[") {
            Some(_) if !uses_steps => ".command".to_string(),
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
