//! Tests of [`compile`] as a whole: the schema, templating, arrays and error positions.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::*;
use crate::job::{
    AgentSpec, BuildSpec, Command, ExitCodes, HealthCheck, InputSource, InputSpec, LlmProvider,
    NetworkPolicy, PushSpec, RetryPolicy, RuntimeKind, ServiceSpec, TaskPlan,
};
use crate::resources::Resources;
use crate::state::FailureClass;

fn ctx() -> TemplateContext {
    TemplateContext::default()
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn ok(source: &str) -> JobPlan {
    match compile(source, "job.yaml", &ctx()) {
        Ok(plan) => plan,
        Err(e) => panic!("{e}"),
    }
}

/// The errors of a file that must not compile.
fn errors(source: &str, file: &str) -> Vec<SpecError> {
    match compile(source, file, &ctx()) {
        Ok(plan) => panic!("compiled but should not: {plan:?}"),
        Err(e) => e.0,
    }
}

/// The single error of a bad file, checked for position, field and part of the message.
#[track_caller]
fn assert_error(source: &str, line: usize, column: usize, field: &str, message: &str) -> SpecError {
    assert_error_in(source, "job.yaml", line, column, field, message)
}

#[track_caller]
fn assert_error_in(
    source: &str,
    file: &str,
    line: usize,
    column: usize,
    field: &str,
    message: &str,
) -> SpecError {
    let errs = errors(source, file);
    assert_eq!(errs.len(), 1, "expected one error, got: {}", SpecErrors(errs.clone()));
    let e = errs.into_iter().next().unwrap();
    assert_eq!((e.line, e.column, e.field.as_str()), (line, column, field), "{e}");
    assert!(e.message.contains(message), "message {:?} lacks {message:?}", e.message);
    assert_eq!(e.file, file);
    e
}

const FULL: &str = r#"version: 1
name: render-shots
project: vfx
priority: 5
labels: { team: fx, tier: 2 }
params: { greeting: hello, count: 3, loud: true }
env: { QUALITY: high, SHARED: job }
tasks:
  - name: prepare
    command: ["/bin/sh", "-c", "echo {{ params.greeting }}"]
    env: { SHARED: task, A: b }
    resources: { cores: 2, memory: 256MiB }
    timeout: 30m
    retries: { count: 2, backoff: 5s, on: [exit, timeout, lost] }
    exit_codes: { warning: [1, 2], skip: [3] }
    constraints: { gpu: "true", slots: 4 }
  - name: render
    array: "1-3x2"
    depends_on: [prepare]
    steps: ["make frame={{ frame }}", ["ls", "-l", 7]]
    resources: { memory: 1024 }
    retries: 4
  - name: one
    array: 7
    depends_on: [prepare, render]
    command: echo {{ params.count }} {{ params.loud }}
"#;

fn base_task(name: &str) -> TaskPlan {
    TaskPlan {
        name: name.into(),
        frame: None,
        steps: vec![],
        env: map(&[("QUALITY", "high"), ("SHARED", "job")]),
        resources: Resources::default(),
        timeout: None,
        retries: RetryPolicy::default(),
        depends_on: vec![],
        exit_codes: ExitCodes::default(),
        constraints: BTreeMap::new(),
        ..TaskPlan::default()
    }
}

fn full_plan() -> JobPlan {
    let prepare = TaskPlan {
        steps: vec![Command::Argv(vec!["/bin/sh".into(), "-c".into(), "echo hello".into()])],
        env: map(&[("QUALITY", "high"), ("SHARED", "task"), ("A", "b")]),
        resources: Resources { cores: 2, memory: 256 << 20, pids: 0 },
        timeout: Some(Duration::from_secs(30 * 60)),
        retries: RetryPolicy {
            count: 2,
            backoff: Duration::from_secs(5),
            on: BTreeSet::from([FailureClass::Exit, FailureClass::Timeout, FailureClass::Lost]),
        },
        exit_codes: ExitCodes { warning: vec![1, 2], skip: vec![3] },
        constraints: map(&[("gpu", "true"), ("slots", "4")]),
        ..base_task("prepare")
    };
    let render = |frame: i64| TaskPlan {
        frame: Some(frame),
        steps: vec![
            Command::Shell(format!("make frame={frame}")),
            Command::Argv(vec!["ls".into(), "-l".into(), "7".into()]),
        ],
        resources: Resources { cores: 1, memory: 1024, pids: 0 },
        retries: RetryPolicy { count: 4, ..RetryPolicy::default() },
        depends_on: vec!["prepare".into()],
        ..base_task("render")
    };
    let one = TaskPlan {
        frame: Some(7),
        steps: vec![Command::Shell("echo 3 true".into())],
        depends_on: vec!["prepare".into(), "render".into()],
        ..base_task("one")
    };
    JobPlan {
        name: "render-shots".into(),
        project: "vfx".into(),
        priority: 5,
        labels: map(&[("team", "fx"), ("tier", "2")]),
        tasks: vec![prepare, render(1), render(3), one],
    }
}

#[test]
fn every_field_parses_into_the_plan() {
    assert_eq!(ok(FULL), full_plan());
}

#[test]
fn defaults_fill_optional_fields() {
    let plan = ok("version: 1\nname: j\ntasks:\n  - name: a\n    command: 'true'\n");
    let mut task = base_task("a");
    task.env = BTreeMap::new();
    task.steps = vec![Command::Shell("true".into())];
    assert_eq!(
        plan,
        JobPlan {
            name: "j".into(),
            project: "default".into(),
            priority: 0,
            labels: BTreeMap::new(),
            tasks: vec![task]
        }
    );
}

#[test]
fn json_compiles_to_the_same_plan_as_yaml() {
    let json = r#"{
  "version": 1, "name": "render-shots", "project": "vfx", "priority": 5,
  "labels": {"team": "fx", "tier": 2},
  "params": {"greeting": "hello", "count": 3, "loud": true},
  "env": {"QUALITY": "high", "SHARED": "job"},
  "tasks": [
    {"name": "prepare", "command": ["/bin/sh", "-c", "echo {{ params.greeting }}"],
     "env": {"SHARED": "task", "A": "b"}, "resources": {"cores": 2, "memory": "256MiB"},
     "timeout": "30m", "retries": {"count": 2, "backoff": "5s", "on": ["exit", "timeout", "lost"]},
     "exit_codes": {"warning": [1, 2], "skip": [3]}, "constraints": {"gpu": "true", "slots": 4}},
    {"name": "render", "array": "1-3x2", "depends_on": ["prepare"],
     "steps": ["make frame={{ frame }}", ["ls", "-l", 7]], "resources": {"memory": 1024}, "retries": 4},
    {"name": "one", "array": 7, "depends_on": ["prepare", "render"],
     "command": "echo {{ params.count }} {{ params.loud }}"}
  ]
}"#;
    assert_eq!(compile(json, "job.json", &ctx()).unwrap(), ok(FULL));
    // A leading `{` is enough to read the text as JSON.
    assert_eq!(compile(json, "job", &ctx()).unwrap(), full_plan());
}

#[test]
fn arrays_expand_to_one_task_per_frame() {
    let plan =
        ok("version: 1\nname: j\ntasks:\n  - name: r\n    array: '1-100'\n    command: echo {{ frame }}\n");
    assert_eq!(plan.tasks.len(), 100);
    assert_eq!(plan.tasks[99].frame, Some(100));
    assert_eq!(plan.tasks[99].steps, vec![Command::Shell("echo 100".into())]);
    let plan = ok("version: 1\nname: j\ntasks:\n  - name: r\n    array: 1,5,7\n    command: x\n");
    assert_eq!(plan.tasks.iter().map(|t| t.frame).collect::<Vec<_>>(), vec![Some(1), Some(5), Some(7)]);
}

#[test]
fn params_come_from_defaults_and_are_overridden_by_the_context() {
    let source = "version: 1\nname: '{{ params.greeting }}-job'\nparams: { greeting: hello }\n\
                  tasks:\n  - name: a\n    command: echo {{ params.greeting }} {{ params.extra }}\n";
    let mut ctx = TemplateContext { params: map(&[("extra", "x")]), ..TemplateContext::default() };
    let plan = compile(source, "job.yaml", &ctx).unwrap();
    assert_eq!(plan.name, "hello-job");
    assert_eq!(plan.tasks[0].steps, vec![Command::Shell("echo hello x".into())]);
    ctx.params.insert("greeting".into(), "bonjour".into());
    let plan = compile(source, "job.yaml", &ctx).unwrap();
    assert_eq!(plan.name, "bonjour-job");
    assert_eq!(plan.tasks[0].steps, vec![Command::Shell("echo bonjour x".into())]);
}

#[test]
fn env_templates_read_the_submitting_environment() {
    let source = "version: 1\nname: j\nenv: { OWNER: '{{ env.USER_X }}' }\n\
                  tasks:\n  - name: a\n    command: [echo, '{{ env.USER_X }}']\n";
    let ctx = TemplateContext { env: map(&[("USER_X", "ada")]), ..TemplateContext::default() };
    let plan = compile(source, "job.yaml", &ctx).unwrap();
    assert_eq!(plan.tasks[0].steps, vec![Command::Argv(vec!["echo".into(), "ada".into()])]);
    assert_eq!(plan.tasks[0].env, map(&[("OWNER", "ada")]));
}

#[test]
fn frame_templates_give_each_frame_its_own_command() {
    let plan = ok("version: 1\nname: j\ntasks:\n  - name: r\n    array: 1-20\n    \
                   env: { F: 'f{{ frame }}' }\n    command: render --frame {{ frame }}\n");
    assert_eq!(plan.tasks.len(), 20);
    let commands: BTreeSet<_> = plan.tasks.iter().map(|t| format!("{:?}", t.steps)).collect();
    assert_eq!(commands.len(), 20);
    assert_eq!(plan.tasks[4].steps, vec![Command::Shell("render --frame 5".into())]);
    assert_eq!(plan.tasks[4].env, map(&[("F", "f5")]));
}

#[test]
fn literal_blocks_keep_their_trailing_newline() {
    let plan = ok(
        "version: 1\nname: j\nparams: {x: 1}\ntasks:\n  - name: a\n    command: |\n      echo {{ params.x }}\n",
    );
    assert_eq!(plan.tasks[0].steps, vec![Command::Shell("echo 1\n".into())]);
}

// ---- bad job files: each names the exact position, field and problem ----

#[test]
fn missing_version() {
    let e =
        assert_error("name: j\ntasks:\n  - name: a\n    command: x\n", 1, 1, "version", "missing `version`");
    assert!(e.hint.unwrap().contains("version: 1"));
}

#[test]
fn unsupported_version() {
    let e = assert_error(
        "version: 2\nname: j\ntasks:\n  - name: a\n    command: x\n",
        1,
        10,
        "version",
        "unsupported version 2",
    );
    assert!(e.hint.unwrap().contains("version: 1"));
    assert_error(
        "version: '1'\nname: j\ntasks:\n  - name: a\n    command: x\n",
        1,
        10,
        "version",
        "expected the integer 1, found a string",
    );
}

#[test]
fn unknown_top_level_field() {
    let e = assert_error(
        "version: 1\nname: j\nprority: 3\ntasks:\n  - name: a\n    command: x\n",
        3,
        1,
        "prority",
        "unknown field `prority`",
    );
    assert_eq!(e.hint.as_deref(), Some("did you mean `priority`?"));
    let e = assert_error(
        "version: 1\nname: j\nwhatever: 3\ntasks:\n  - name: a\n    command: x\n",
        3,
        1,
        "whatever",
        "unknown field `whatever`",
    );
    assert!(e.hint.unwrap().starts_with("known fields here: `version`"));
}

#[test]
fn unknown_task_field() {
    let e = assert_error(
        "version: 1\nname: j\ntasks:\n  - name: a\n    command: x\n  - name: b\n    command: x\n    dependson: [a]\n",
        8,
        5,
        "tasks[1].dependson",
        "unknown field `dependson`",
    );
    assert_eq!(e.hint.as_deref(), Some("did you mean `depends_on`?"));
}

#[test]
fn wrong_type() {
    assert_error(
        "version: 1\nname: j\ntasks:\n  - name: a\n    command: x\n    depends_on: 5\n",
        6,
        17,
        "tasks[0].depends_on",
        "expected a list of task names, found a number",
    );
    assert_error(
        "version: 1\nname: j\npriority: high\ntasks:\n  - name: a\n    command: x\n",
        3,
        11,
        "priority",
        "expected an integer priority, found a string",
    );
}

#[test]
fn duplicate_task() {
    let e = assert_error(
        "version: 1\nname: j\ntasks:\n  - name: a\n    command: x\n  - name: a\n    command: y\n",
        6,
        11,
        "tasks[1].name",
        "duplicate task name `a`",
    );
    assert!(e.hint.unwrap().contains("line 4"));
}

#[test]
fn unknown_dependency() {
    let e = assert_error(
        "version: 1\nname: j\ntasks:\n  - name: prepare\n    command: x\n  - name: b\n    command: x\n    depends_on: [prepare, prepere]\n",
        8,
        27,
        "tasks[1].depends_on[1]",
        "unknown task `prepere`",
    );
    assert_eq!(e.hint.as_deref(), Some("did you mean `prepare`?"));
}

#[test]
fn self_dependency() {
    assert_error(
        "version: 1\nname: j\ntasks:\n  - name: a\n    command: x\n    depends_on: [a]\n",
        6,
        18,
        "tasks[0].depends_on[0]",
        "task `a` depends on itself",
    );
}

#[test]
fn dependency_cycle() {
    let source = "version: 1\nname: j\ntasks:\n\
                  - name: a\n  command: x\n  depends_on: [c]\n\
                  - name: b\n  array: 1-3\n  command: x\n  depends_on: [a]\n\
                  - name: c\n  command: x\n  depends_on: [b]\n";
    let e = assert_error(source, 6, 16, "tasks[0].depends_on[0]", "dependency cycle: a -> c -> b -> a");
    assert!(e.hint.is_some());
}

#[test]
fn bad_frame_range() {
    let e = assert_error(
        "version: 1\nname: j\ntasks:\n  - name: r\n    array: 5-1\n    command: echo {{ frame }}\n",
        5,
        12,
        "tasks[0].array",
        "bad frame range: `5-1` counts down",
    );
    assert!(e.hint.unwrap().contains("1-9x2"));
    assert_error(
        "version: 1\nname: j\ntasks:\n  - name: r\n    array: '1-x'\n    command: x\n",
        5,
        12,
        "tasks[0].array",
        "`1-x` is missing the last frame",
    );
    assert_error(
        "version: 1\nname: j\ntasks:\n  - name: r\n    array: 1-9x0\n    command: x\n",
        5,
        12,
        "tasks[0].array",
        "step 0",
    );
}

#[test]
fn bad_duration() {
    let e = assert_error(
        "version: 1\nname: j\ntasks:\n  - name: a\n    command: x\n    retries: { backoff: 5 parsecs }\n",
        6,
        25,
        "tasks[0].retries.backoff",
        "`5 parsecs` is not a duration",
    );
    assert!(e.hint.unwrap().contains("1h 30m"));
    assert_error(
        "version: 1\nname: j\ntasks:\n  - name: a\n    command: x\n    timeout: 30\n",
        6,
        14,
        "tasks[0].timeout",
        "expected a duration like `30m`, found a number",
    );
}

#[test]
fn bad_memory_and_cores() {
    let source = "version: 1\nname: j\ntasks:\n  - name: a\n    command: x\n    resources:\n      cores: 0\n      memory: lots\n";
    let errs = errors(source, "job.yaml");
    assert_eq!(errs.len(), 2, "{}", SpecErrors(errs.clone()));
    assert_eq!((errs[0].line, errs[0].column, errs[0].field.as_str()), (7, 14, "tasks[0].resources.cores"));
    assert!(errs[0].message.contains("cores must be at least 1"));
    assert_eq!((errs[1].line, errs[1].column, errs[1].field.as_str()), (8, 15, "tasks[0].resources.memory"));
    assert_eq!(errs[1].message, "`lots` is not a memory size");
}

#[test]
fn unknown_retry_class() {
    let e = assert_error(
        "version: 1\nname: j\ntasks:\n  - name: a\n    command: x\n    retries: { on: [exit, timout] }\n",
        6,
        27,
        "tasks[0].retries.on[1]",
        "unknown failure class `timout`",
    );
    assert_eq!(e.hint.as_deref(), Some("did you mean `timeout`?"));
}

#[test]
fn undefined_template_variable() {
    let e = assert_error(
        "version: 1\nname: j\nparams: { greeting: hi }\ntasks:\n  - name: a\n    command: [echo, '{{ params.nope }}']\n",
        6,
        21,
        "tasks[0].command[1]",
        "undefined `params.nope`",
    );
    assert!(e.hint.unwrap().contains("defined params: greeting"));
    let e = assert_error(
        "version: 1\nname: j\ntasks:\n  - name: a\n    command: echo {{ frame }}\n",
        5,
        14,
        "tasks[0].command",
        "undefined `frame`",
    );
    assert_eq!(e.hint.as_deref(), Some("`frame` only exists in tasks with `array`"));
}

#[test]
fn template_syntax_error() {
    assert_error(
        "version: 1\nname: j\ntasks:\n  - name: a\n    steps:\n      - ok\n      - echo {{ oops\n",
        7,
        9,
        "tasks[0].steps[1]",
        "template syntax error",
    );
}

#[test]
fn both_command_and_steps() {
    assert_error(
        "version: 1\nname: j\ntasks:\n  - name: a\n    command: x\n    steps: [y]\n",
        6,
        5,
        "tasks[0].steps",
        "both `command` and `steps` are set",
    );
}

#[test]
fn neither_command_nor_steps() {
    let e = assert_error(
        "version: 1\nname: j\ntasks:\n  - name: a\n    timeout: 5s\n",
        4,
        5,
        "tasks[0]",
        "task has no command",
    );
    assert!(e.hint.unwrap().contains("steps"));
}

#[test]
fn empty_command() {
    assert_error(
        "version: 1\nname: j\ntasks:\n  - name: a\n    command: []\n",
        5,
        14,
        "tasks[0].command",
        "command is empty",
    );
    assert_error(
        "version: 1\nname: j\ntasks:\n  - name: a\n    command: '  '\n",
        5,
        14,
        "tasks[0].command",
        "command is empty",
    );
}

#[test]
fn bad_task_name() {
    assert_error(
        "version: 1\nname: j\ntasks:\n  - name: my task\n    command: x\n",
        4,
        11,
        "tasks[0].name",
        "may only use letters, digits",
    );
    assert_error("version: 1\nname: j\ntasks:\n  - command: x\n", 4, 5, "tasks[0].name", "missing `name`");
}

#[test]
fn missing_and_empty_tasks() {
    assert_error("version: 1\nname: j\n", 1, 1, "tasks", "missing `tasks`");
    assert_error("version: 1\nname: j\ntasks: []\n", 3, 8, "tasks", "at least one task");
}

#[test]
fn yaml_syntax_error() {
    let e = assert_error("version: 1\nname: j\ntasks: [a, b\n", 3, 8, "", "invalid YAML");
    assert!(e.to_string().starts_with("job.yaml:3:8: invalid YAML"), "{e}");
    assert_error("version: 1\nname: j\nname: k\ntasks: []\n", 3, 1, "", "duplicate key `name`");
}

#[test]
fn bad_json() {
    assert_error_in(
        "{\n  \"version\": 1,\n  \"name\": \"j\",\n}\n",
        "job.json",
        4,
        1,
        "",
        "invalid JSON: trailing comma",
    );
    let e = assert_error_in("{version: 1}", "job.yaml", 1, 2, "", "invalid JSON: key must be a string");
    assert!(e.hint.unwrap().contains("starts with `{`"));
}

#[test]
fn not_a_mapping_and_empty_files() {
    assert_error("- a\n- b\n", 1, 1, "", "expected a mapping of job fields");
    assert_error("# nothing here\n", 1, 1, "", "the job file is empty");
}

#[test]
fn all_problems_are_reported_at_once_in_file_order() {
    let source = "version: 3\nname: j\ntasks:\n  - name: a\n    comand: x\n  - name: b\n    command: x\n    timeout: soon\n";
    let errs = errors(source, "job.yaml");
    let fields: Vec<_> = errs.iter().map(|e| (e.line, e.field.as_str())).collect();
    assert_eq!(
        fields,
        vec![(1, "version"), (4, "tasks[0]"), (5, "tasks[0].comand"), (8, "tasks[1].timeout")],
        "{}",
        SpecErrors(errs.clone())
    );
    let text = SpecErrors(errs).to_string();
    assert!(
        text.contains(
            "job.yaml:5:5: tasks[0].comand: unknown field `comand`\n  hint: did you mean `command`?"
        ),
        "{text}"
    );
}

#[test]
fn examples_compile() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let Some(ext) = path.extension().and_then(|e| e.to_str()) else {
            continue;
        };
        if !matches!(ext, "yaml" | "yml" | "json") {
            continue;
        }
        let source = std::fs::read_to_string(&path).unwrap();
        let name = path.display().to_string();
        if let Err(e) = compile(&source, &name, &ctx()) {
            panic!("{e}");
        }
        count += 1;
    }
    assert!(count >= 4, "found only {count} example job files in {}", dir.display());
    let hello = std::fs::read_to_string(dir.join("hello.yaml")).unwrap();
    let plan = compile(&hello, "hello.yaml", &ctx()).unwrap();
    let names: Vec<_> = plan.tasks.iter().map(TaskPlan::display_name).collect();
    assert_eq!(
        names,
        ["prepare", "render[1]", "render[2]", "render[3]", "render[4]", "render[5]"]
            .into_iter()
            .chain(["report"])
            .collect::<Vec<_>>()
    );
}

#[test]
fn plan_checks_after_rendering_point_back_into_the_file() {
    let e = assert_error(
        "version: 1\nname: '{{ params.n }}'\nparams: { n: '' }\ntasks:\n  - name: a\n    command: x\n",
        2,
        7,
        "name",
        "job name is empty",
    );
    assert_eq!(e.hint.as_deref(), Some("give the job a name"));
    // `b` is the fourth planned task (after three frames of `a`) but the second in the file.
    assert_error(
        "version: 1\nname: j\nparams: { c: ' ' }\ntasks:\n  - name: a\n    array: 1-3\n    command: x\n\
         \x20 - name: b\n    command: '{{ params.c }}'\n",
        9,
        14,
        "tasks[1].command",
        "command is empty",
    );
    assert_error(
        "version: 1\nname: j\nparams: { c: '' }\ntasks:\n  - name: a\n    steps: [x, ['{{ params.c }}']]\n",
        6,
        16,
        "tasks[0].steps[1]",
        "command is empty",
    );
}

// ---- sandboxes, services, secrets, files and agents ----

const SANDBOXES: &str = r#"version: 1
name: sandboxes
params: { tag: "1", who: ada }
env: { SHARED: job }
tasks:
  - name: prepare
    runtime: docker
    image: "drover-test/busybox:{{ params.tag }}"
    user: 1000
    network: { egress: [api.example.com, "10.0.0.1:443"] }
    steps: [echo prepare, ["mkdir", "-p", "out"]]
    services:
      - name: db
        image: postgres:15
        command: ["postgres", "-c", "fsync=off"]
        env: { POSTGRES_PASSWORD: "{{ params.who }}" }
        tmpfs: [/var/lib/postgresql/data]
        healthcheck: { command: "pg_isready", interval: 2s, timeout: 3s, retries: 10 }
      - name: cache-1
        image: redis:7
        healthcheck: { command: [redis-cli, ping] }
    secrets: [DB_PASSWORD, API_KEY, DB_PASSWORD]
    outputs: ["out/*.png", out/model.bin, "report-{{ params.tag }}.txt"]
    outputs_on_failure: false
  - name: train
    runtime: microvm
    build: { dockerfile: docker/Dockerfile, context: docker, args: { VERSION: "{{ params.tag }}", N: 2 } }
    user: "1000:1000"
    network: full
    command: train
    inputs:
      - { path: ./data/, to: data }
      - { url: "https://example.com/x.tar?sig=1" }
      - { from: "prepare:out/model.bin" }
      - { path: "./configs/{{ params.who }}.toml", to: "conf/{{ params.who }}.toml" }
  - name: fix
    runtime: microvm
    build: {}
    depends_on: [train]
    outputs_on_failure: true
    agent:
      command: ["my-agent", "--yes"]
      prompt: "Fix the failing test for {{ params.who }}"
      repo: "https://git.example.com/x.git"
      budget: 200000
      push: { remote: "https://git.example.com/x.git", branch: "drover/fix" }
"#;

fn sandboxes_plan() -> JobPlan {
    let env = map(&[("SHARED", "job")]);
    let prepare = TaskPlan {
        name: "prepare".into(),
        steps: vec![
            Command::Shell("echo prepare".into()),
            Command::Argv(vec!["mkdir".into(), "-p".into(), "out".into()]),
        ],
        env: env.clone(),
        runtime: RuntimeKind::Docker,
        image: Some("drover-test/busybox:1".into()),
        user: Some("1000".into()),
        network: NetworkPolicy::Egress { allow: vec!["api.example.com".into(), "10.0.0.1:443".into()] },
        services: vec![
            ServiceSpec {
                name: "db".into(),
                image: "postgres:15".into(),
                command: Some(Command::Argv(vec!["postgres".into(), "-c".into(), "fsync=off".into()])),
                env: map(&[("POSTGRES_PASSWORD", "ada")]),
                tmpfs: vec!["/var/lib/postgresql/data".into()],
                user: None,
                healthcheck: Some(HealthCheck {
                    command: Command::Shell("pg_isready".into()),
                    interval: Duration::from_secs(2),
                    timeout: Duration::from_secs(3),
                    retries: 10,
                }),
            },
            ServiceSpec {
                name: "cache-1".into(),
                image: "redis:7".into(),
                command: None,
                env: BTreeMap::new(),
                tmpfs: vec![],
                user: None,
                healthcheck: Some(HealthCheck {
                    command: Command::Argv(vec!["redis-cli".into(), "ping".into()]),
                    interval: Duration::from_secs(1),
                    timeout: Duration::from_secs(5),
                    retries: 30,
                }),
            },
        ],
        secrets: vec!["DB_PASSWORD".into(), "API_KEY".into()],
        outputs: vec!["out/*.png".into(), "out/model.bin".into(), "report-1.txt".into()],
        outputs_on_failure: false,
        ..TaskPlan::default()
    };
    let input = |source: InputSource, to: &str| InputSpec { source, to: to.into() };
    let train = TaskPlan {
        name: "train".into(),
        steps: vec![Command::Shell("train".into())],
        env: env.clone(),
        depends_on: vec!["prepare".into()],
        runtime: RuntimeKind::Microvm,
        build: Some(BuildSpec {
            dockerfile: "docker/Dockerfile".into(),
            context: "docker".into(),
            args: map(&[("VERSION", "1"), ("N", "2")]),
        }),
        user: Some("1000:1000".into()),
        network: NetworkPolicy::Full,
        inputs: vec![
            input(InputSource::Path("./data/".into()), "data"),
            input(InputSource::Url("https://example.com/x.tar?sig=1".into()), "x.tar"),
            input(
                InputSource::Artifact { task: "prepare".into(), path: "out/model.bin".into() },
                "model.bin",
            ),
            input(InputSource::Path("./configs/ada.toml".into()), "conf/ada.toml"),
        ],
        ..TaskPlan::default()
    };
    let agent_command = Command::Argv(vec!["my-agent".into(), "--yes".into()]);
    let fix = TaskPlan {
        name: "fix".into(),
        // An agent task without `command` or `steps` runs the agent's command.
        steps: vec![agent_command.clone()],
        env,
        depends_on: vec!["train".into()],
        runtime: RuntimeKind::Microvm,
        build: Some(BuildSpec {
            dockerfile: "Dockerfile".into(),
            context: ".".into(),
            args: BTreeMap::new(),
        }),
        network: NetworkPolicy::default(),
        agent: Some(AgentSpec {
            command: agent_command,
            prompt: "Fix the failing test for ada".into(),
            prompt_file: None,
            repo: Some("https://git.example.com/x.git".into()),
            budget: Some(200_000),
            push: Some(PushSpec {
                remote: "https://git.example.com/x.git".into(),
                branch: "drover/fix".into(),
            }),
            provider: LlmProvider::Anthropic,
            upstream: None,
            key_secret: None,
        }),
        ..TaskPlan::default()
    };
    JobPlan {
        name: "sandboxes".into(),
        project: "default".into(),
        priority: 0,
        labels: BTreeMap::new(),
        tasks: vec![prepare, train, fix],
    }
}

#[test]
fn sandbox_file_and_agent_fields_parse_into_the_plan() {
    assert_eq!(ok(SANDBOXES), sandboxes_plan());
}

#[test]
fn sandbox_fields_in_json_compile_to_the_same_plan() {
    let json = r#"{
  "version": 1, "name": "sandboxes", "params": {"tag": "1", "who": "ada"}, "env": {"SHARED": "job"},
  "tasks": [
    {"name": "prepare", "runtime": "docker", "image": "drover-test/busybox:{{ params.tag }}", "user": 1000,
     "network": {"egress": ["api.example.com", "10.0.0.1:443"]},
     "steps": ["echo prepare", ["mkdir", "-p", "out"]],
     "services": [
       {"name": "db", "image": "postgres:15", "command": ["postgres", "-c", "fsync=off"],
        "env": {"POSTGRES_PASSWORD": "{{ params.who }}"}, "tmpfs": ["/var/lib/postgresql/data"],
        "healthcheck": {"command": "pg_isready", "interval": "2s", "timeout": "3s", "retries": 10}},
       {"name": "cache-1", "image": "redis:7", "healthcheck": {"command": ["redis-cli", "ping"]}}
     ],
     "secrets": ["DB_PASSWORD", "API_KEY", "DB_PASSWORD"],
     "outputs": ["out/*.png", "out/model.bin", "report-{{ params.tag }}.txt"], "outputs_on_failure": false},
    {"name": "train", "runtime": "microvm",
     "build": {"dockerfile": "docker/Dockerfile", "context": "docker", "args": {"VERSION": "{{ params.tag }}", "N": 2}},
     "user": "1000:1000", "network": "full", "command": "train",
     "inputs": [
       {"path": "./data/", "to": "data"}, {"url": "https://example.com/x.tar?sig=1"},
       {"from": "prepare:out/model.bin"},
       {"path": "./configs/{{ params.who }}.toml", "to": "conf/{{ params.who }}.toml"}
     ]},
    {"name": "fix", "runtime": "microvm", "build": {}, "depends_on": ["train"],
     "outputs_on_failure": true,
     "agent": {"command": ["my-agent", "--yes"], "prompt": "Fix the failing test for {{ params.who }}",
               "repo": "https://git.example.com/x.git", "budget": 200000,
               "push": {"remote": "https://git.example.com/x.git", "branch": "drover/fix"}}}
  ]
}"#;
    assert_eq!(compile(json, "job.json", &ctx()).unwrap(), sandboxes_plan());
}

#[test]
fn artifact_inputs_make_the_producer_a_dependency() {
    let plan = ok("version: 1\nname: j\ntasks:\n\
                   - name: a\n  command: x\n  outputs: [out/result.txt]\n\
                   - name: c\n  command: x\n  outputs: [y]\n\
                   - name: b\n  command: x\n  depends_on: [c]\n  \
                   inputs: [{ from: 'a:out/result.txt' }, { from: 'c:y', to: y2 }, { from: 'a:z' }]\n");
    let b = &plan.tasks[2];
    assert_eq!(b.depends_on, vec!["c".to_string(), "a".to_string()]);
    assert_eq!(b.inputs[0].source, InputSource::Artifact { task: "a".into(), path: "out/result.txt".into() });
    assert_eq!(b.inputs[0].to, "result.txt");
    assert!(plan.validate().is_ok());
}

#[test]
fn a_cycle_through_an_artifact_input_is_a_cycle() {
    let source = "version: 1\nname: j\ntasks:\n\
                  - name: a\n  command: x\n  outputs: [o]\n  inputs: [{ from: 'b:o' }]\n\
                  - name: b\n  command: x\n  outputs: [o]\n  depends_on: [a]\n";
    let e = assert_error(source, 7, 20, "tasks[0].inputs[0].from", "dependency cycle: a -> b -> a");
    assert!(e.hint.is_some());
}

#[test]
fn an_agent_task_needs_no_command_but_some_work() {
    let e = assert_error(
        "version: 1\nname: j\ntasks:\n  - name: a\n    runtime: docker\n    image: x\n",
        4,
        5,
        "tasks[0]",
        "task has no command",
    );
    assert!(e.hint.unwrap().contains("`agent:`"));
}

#[test]
fn a_secret_may_not_shadow_env() {
    let e = assert_error(
        "version: 1\nname: j\nenv: { TOKEN: x }\ntasks:\n  - name: a\n    command: x\n    secrets: [TOKEN]\n",
        7,
        15,
        "tasks[0].secrets[0]",
        "secret `TOKEN` is also set in `env`",
    );
    assert!(e.hint.unwrap().contains("remove it from `env`"));
}

#[test]
fn inputs_need_a_place_of_their_own() {
    assert_error(
        &format!("{TASK}    command: x\n    inputs: [{{ path: . }}]\n"),
        6,
        22,
        "tasks[0].inputs[0].path",
        "cannot tell where to place this input",
    );
    let e = assert_error(
        &format!("{TASK}    command: x\n    inputs: [{{ path: a/x }}, {{ url: 'http://h/b/x' }}]\n"),
        6,
        36,
        "tasks[0].inputs[1].url",
        "two inputs are placed at `x`",
    );
    assert_eq!(e.hint.as_deref(), Some("give one of them another `to`"));
    assert_error(
        &format!("{TASK}    command: x\n    inputs: [{{ path: a, to: ../a }}]\n"),
        6,
        29,
        "tasks[0].inputs[0].to",
        "input destination `../a` leaves the workspace",
    );
}

#[test]
fn rendered_values_are_checked_too() {
    let source = "version: 1\nname: j\nparams: { scheme: ftp, dir: /etc }\ntasks:\n  - name: a\n    array: 1-3\n    \
                  command: x\n    inputs: [{ url: '{{ params.scheme }}://h/{{ frame }}' }]\n    \
                  outputs: ['{{ params.dir }}/{{ frame }}']\n";
    let errs = errors(source, "job.yaml");
    let found: Vec<_> =
        errs.iter().map(|e| (e.line, e.column, e.field.as_str(), e.message.as_str())).collect();
    assert_eq!(
        found,
        vec![
            (8, 21, "tasks[0].inputs[0].url", "unsupported URL scheme `ftp`"),
            (9, 15, "tasks[0].outputs[0]", "output `/etc/1` is an absolute path"),
        ],
        "{}",
        SpecErrors(errs.clone())
    );
}

#[test]
fn a_failed_template_is_one_problem_not_two() {
    // No second problem about the empty text left by the failed template.
    let source = format!(
        "{TASK}    command: x\n    outputs: ['{{{{ params.nope }}}}']\n    inputs: [{{ url: '{{{{ params.nope }}}}' }}]\n"
    );
    let errs = errors(&source, "job.yaml");
    let found: Vec<_> = errs.iter().map(|e| (e.line, e.field.as_str(), e.message.as_str())).collect();
    assert_eq!(
        found,
        [
            (6, "tasks[0].outputs[0]", "template uses undefined `params.nope`"),
            (7, "tasks[0].inputs[0].url", "template uses undefined `params.nope`")
        ]
    );
}

// ---- bad sandbox, file and agent fields ----

/// A job file's first lines up to a task's name; the task's next field is on line 5, column 5.
const TASK: &str = "version: 1\nname: j\ntasks:\n  - name: a\n";

#[test]
fn unknown_runtime() {
    let e = assert_error(
        &format!("{TASK}    runtime: dokcer\n    command: x\n"),
        5,
        14,
        "tasks[0].runtime",
        "unknown runtime `dokcer`",
    );
    assert_eq!(e.hint.as_deref(), Some("did you mean `docker`?"));
    let e = assert_error(
        &format!("{TASK}    runtime: vm\n    command: x\n"),
        5,
        14,
        "tasks[0].runtime",
        "unknown runtime",
    );
    assert_eq!(e.hint.as_deref(), Some("runtimes are `process`, `docker`, `microvm`"));
}

#[test]
fn image_needs_a_container_runtime() {
    let e = assert_error(
        &format!("{TASK}    command: x\n    image: alpine:3\n"),
        6,
        5,
        "tasks[0].image",
        "`image` needs runtime `docker` or `microvm`",
    );
    assert!(e.hint.unwrap().contains("unless they set `runtime: docker`"));
    assert_error(
        &format!("{TASK}    runtime: process\n    command: x\n    build: {{}}\n"),
        7,
        5,
        "tasks[0].build",
        "`build` needs runtime `docker` or `microvm`",
    );
}

#[test]
fn container_runtime_needs_an_image() {
    let e = assert_error(
        &format!("{TASK}    runtime: docker\n    command: x\n"),
        5,
        14,
        "tasks[0].runtime",
        "runtime `docker` needs an `image` or a `build`",
    );
    assert!(e.hint.unwrap().contains("image: alpine:3"));
}

#[test]
fn image_and_build_together() {
    assert_error(
        &format!("{TASK}    runtime: microvm\n    build: {{ context: . }}\n    image: x\n    command: x\n"),
        7,
        5,
        "tasks[0].image",
        "both `image` and `build` are set",
    );
}

/// A docker task with `services:` at line 8; the first service starts on line 9, column 9.
fn with_services(services: &str) -> String {
    format!("{TASK}    runtime: docker\n    image: x\n    command: x\n    services:\n{services}")
}

#[test]
fn bad_service_name() {
    let e = assert_error(
        &with_services("      - name: My_DB\n        image: postgres:15\n"),
        9,
        15,
        "tasks[0].services[0].name",
        "service name `My_DB` must be a DNS label",
    );
    assert_eq!(e.hint.as_deref(), Some("rename it, like `my-db`"));
}

#[test]
fn service_without_image() {
    let e = assert_error(
        &with_services("      - name: db\n        command: postgres\n"),
        9,
        9,
        "tasks[0].services[0].image",
        "missing `image`",
    );
    assert!(e.hint.unwrap().contains("postgres:15"));
}

#[test]
fn duplicate_service_names() {
    let e = assert_error(
        &with_services("      - { name: db, image: a }\n      - { name: db, image: b }\n"),
        10,
        17,
        "tasks[0].services[1].name",
        "duplicate service name `db`",
    );
    assert!(e.hint.unwrap().contains("line 9"));
}

#[test]
fn services_need_docker() {
    assert_error(
        &format!("{TASK}    runtime: microvm\n    image: x\n    command: x\n    services: []\n"),
        8,
        5,
        "tasks[0].services",
        "services need runtime `docker`",
    );
}

#[test]
fn healthcheck_without_command() {
    assert_error(
        &with_services("      - name: db\n        image: x\n        healthcheck: { interval: 1s }\n"),
        11,
        22,
        "tasks[0].services[0].healthcheck.command",
        "missing `command`",
    );
}

#[test]
fn bad_healthcheck_duration() {
    let e = assert_error(
        &with_services(
            "      - name: db\n        image: x\n        healthcheck: { command: x, timeout: soon }\n",
        ),
        11,
        45,
        "tasks[0].services[0].healthcheck.timeout",
        "`soon` is not a duration",
    );
    assert!(e.hint.unwrap().contains("30s"));
    assert_error(
        &with_services(
            "      - name: db\n        image: x\n        healthcheck: { command: x, interval: 0s }\n",
        ),
        11,
        46,
        "tasks[0].services[0].healthcheck.interval",
        "interval is zero",
    );
}

#[test]
fn bad_secret_name() {
    let e = assert_error(
        &format!("{TASK}    command: x\n    secrets: [API_KEY, db-password]\n"),
        6,
        24,
        "tasks[0].secrets[1]",
        "secret name `db-password` may only use uppercase letters",
    );
    assert!(e.hint.unwrap().contains("`DB_PASSWORD`"));
}

#[test]
fn absolute_output_path() {
    let e = assert_error(
        &format!("{TASK}    command: x\n    outputs: [ok/*.txt, /etc/passwd]\n"),
        6,
        25,
        "tasks[0].outputs[1]",
        "output `/etc/passwd` is an absolute path",
    );
    assert!(e.hint.unwrap().contains("relative to the task workspace"));
}

#[test]
fn output_leaving_the_workspace() {
    assert_error(
        &format!("{TASK}    command: x\n    outputs: ['out/../../x']\n"),
        6,
        15,
        "tasks[0].outputs[0]",
        "output `out/../../x` leaves the workspace with `..`",
    );
}

#[test]
fn input_with_two_sources() {
    let e = assert_error(
        &format!("{TASK}    command: x\n    inputs:\n      - path: ./a\n        url: https://h/a\n"),
        8,
        9,
        "tasks[0].inputs[0].url",
        "input has both `path` and `url`",
    );
    assert!(e.hint.unwrap().contains("one of `path`, `url` or `from`"));
    assert_error(
        &format!("{TASK}    command: x\n    inputs: [{{ to: x }}]\n"),
        6,
        14,
        "tasks[0].inputs[0]",
        "input has no source",
    );
}

#[test]
fn input_url_with_ftp_scheme() {
    let e = assert_error(
        &format!("{TASK}    command: x\n    inputs: [{{ url: 'ftp://example.com/x.tar' }}]\n"),
        6,
        21,
        "tasks[0].inputs[0].url",
        "unsupported URL scheme `ftp`",
    );
    assert!(e.hint.unwrap().contains("`https`"));
}

#[test]
fn input_from_an_unknown_task() {
    let e = assert_error(
        "version: 1\nname: j\ntasks:\n  - name: prepare\n    command: x\n    outputs: [o]\n\
         \x20 - name: b\n    command: x\n    inputs: [{ from: 'prepere:o' }]\n",
        9,
        22,
        "tasks[1].inputs[0].from",
        "unknown task `prepere`",
    );
    assert_eq!(e.hint.as_deref(), Some("did you mean `prepare`?"));
    assert_error(
        "version: 1\nname: j\ntasks:\n  - name: p\n    command: x\n\
         \x20 - name: b\n    command: x\n    inputs: [{ from: 'p:o' }]\n",
        8,
        22,
        "tasks[1].inputs[0].from",
        "task `p` keeps no outputs",
    );
    assert_error(
        &format!("{TASK}    command: x\n    outputs: [o]\n    inputs: [{{ from: 'a:o' }}]\n"),
        7,
        22,
        "tasks[0].inputs[0].from",
        "task `a` takes an input from itself",
    );
}

#[test]
fn input_from_without_colon() {
    let e = assert_error(
        &format!("{TASK}    command: x\n    inputs: [{{ from: prepare/out/model.bin }}]\n"),
        6,
        22,
        "tasks[0].inputs[0].from",
        "expected `TASK:PATH`, found `prepare/out/model.bin`",
    );
    assert!(e.hint.unwrap().contains("prepare:out/model.bin"));
}

#[test]
fn agent_with_runtime_process() {
    let e = assert_error(
        &format!("{TASK}    agent: {{ command: a, prompt: p }}\n"),
        5,
        5,
        "tasks[0].agent",
        "an agent task needs runtime `microvm`",
    );
    assert!(e.hint.unwrap().contains("runtime: microvm"));
}

#[test]
fn agent_in_a_container_is_refused() {
    let e = assert_error(
        &format!("{TASK}    runtime: docker\n    image: x\n    agent: {{ command: a, prompt: p }}\n"),
        7,
        5,
        "tasks[0].agent",
        "an agent task cannot run with `runtime: docker`: containers cannot reach the node's LLM proxy",
    );
    assert!(e.hint.unwrap().contains("runtime: microvm"));
}

#[test]
fn agent_with_explicit_runtime_process_and_llm_fields() {
    let plan = ok(&format!(
        "{TASK}    runtime: process\n    agent:\n      command: [./fake-agent]\n      prompt: p\n      \
         budget: {{ tokens: 500 }}\n      provider: openai\n      upstream: http://127.0.0.1:9/v1\n      \
         key_secret: LLM_KEY\n"
    ));
    let agent = plan.tasks[0].agent.as_ref().unwrap();
    assert_eq!(plan.tasks[0].runtime, RuntimeKind::Process);
    assert_eq!(agent.budget, Some(500));
    assert_eq!(agent.provider, LlmProvider::OpenAi);
    assert_eq!(agent.upstream.as_deref(), Some("http://127.0.0.1:9/v1"));
    assert_eq!(agent.key_secret.as_deref(), Some("LLM_KEY"));
}

#[test]
fn agent_llm_fields_are_checked() {
    const AGENT: &str = "    runtime: process\n    agent:\n      command: a\n      prompt: p\n";
    let e = assert_error(
        &format!("{TASK}{AGENT}      provider: opnai\n"),
        9,
        17,
        "tasks[0].agent.provider",
        "unknown provider `opnai`",
    );
    assert_eq!(e.hint.as_deref(), Some("did you mean `openai`?"));
    assert_error(
        &format!("{TASK}{AGENT}      upstream: ftp://x\n"),
        9,
        17,
        "tasks[0].agent.upstream",
        "upstream `ftp://x` is not an http or https URL",
    );
    assert_error(
        &format!("{TASK}{AGENT}      key_secret: llm-key\n"),
        9,
        19,
        "tasks[0].agent.key_secret",
        "`llm-key` is not a secret name",
    );
    assert_error(
        &format!("{TASK}{AGENT}      budget: {{ tokens: 0 }}\n"),
        9,
        25,
        "tasks[0].agent.budget.tokens",
        "budget must be at least 1 token, found 0",
    );
    let e = assert_error(
        &format!("{TASK}{AGENT}      key_secret: LLM_KEY\n    secrets: [LLM_KEY]\n"),
        9,
        19,
        "tasks[0].agent.key_secret",
        "secret `LLM_KEY` is both the agent's key and in `secrets`",
    );
    assert!(e.hint.unwrap().contains("outside the sandbox"));
}

#[test]
fn agent_prompt_from_a_workspace_file() {
    let plan = ok(&format!(
        "{TASK}    runtime: process\n    agent: {{ command: a, prompt_file: \"docs/{{{{ params.f }}}}.md\" }}\n"
    ).replace("name: j\n", "name: j\nparams: { f: TASK }\n"));
    let agent = plan.tasks[0].agent.as_ref().unwrap();
    assert_eq!((agent.prompt.as_str(), agent.prompt_file.as_deref()), ("", Some("docs/TASK.md")));
    const AGENT: &str = "    runtime: process\n    agent:\n      command: a\n";
    assert_error(
        &format!("{TASK}{AGENT}      prompt: p\n      prompt_file: x.md\n"),
        9,
        7,
        "tasks[0].agent.prompt_file",
        "both `prompt` and `prompt_file` are set",
    );
    assert_error(
        &format!("{TASK}{AGENT}      prompt_file: ../x.md\n"),
        8,
        20,
        "tasks[0].agent.prompt_file",
        "prompt_file `../x.md` leaves the workspace with `..`",
    );
}

#[test]
fn agent_without_prompt() {
    let e = assert_error(
        &format!(
            "{TASK}    runtime: microvm\n    image: x\n    agent:\n      command: [my-agent]\n      budget: 10\n"
        ),
        8,
        7,
        "tasks[0].agent.prompt",
        "missing `prompt`",
    );
    assert!(e.hint.unwrap().contains("Fix the failing test"));
    assert_error(
        &format!("{TASK}    runtime: microvm\n    image: x\n    agent: {{ command: a, prompt: ' ' }}\n"),
        7,
        34,
        "tasks[0].agent.prompt",
        "prompt is empty",
    );
}

#[test]
fn agent_budget_zero() {
    let e = assert_error(
        &format!(
            "{TASK}    runtime: microvm\n    image: x\n    agent: {{ command: a, prompt: p, budget: 0 }}\n"
        ),
        7,
        45,
        "tasks[0].agent.budget",
        "budget must be at least 1 token, found 0",
    );
    assert_eq!(e.hint.as_deref(), Some("omit `budget` for no token limit"));
}

#[test]
fn bad_network_value() {
    let e = assert_error(
        &format!("{TASK}    command: x\n    network: bridged\n"),
        6,
        14,
        "tasks[0].network",
        "unknown network mode `bridged`",
    );
    assert_eq!(e.hint.as_deref(), Some("did you mean `bridge`?"));
    assert_error(
        &format!("{TASK}    command: x\n    network: {{ egress: ['https://api.example.com'] }}\n"),
        6,
        25,
        "tasks[0].network.egress[0]",
        "egress destination `https://api.example.com` has a scheme",
    );
    let errs = errors(&format!("{TASK}    command: x\n    network: {{ allow: [x] }}\n"), "job.yaml");
    let found: Vec<_> =
        errs.iter().map(|e| (e.line, e.column, e.field.as_str(), e.message.as_str())).collect();
    assert_eq!(
        found,
        [
            (6, 14, "tasks[0].network.egress", "missing `egress`"),
            (6, 16, "tasks[0].network.allow", "unknown field `allow`")
        ]
    );
}

#[test]
fn every_new_problem_is_reported_in_one_run() {
    let source = format!(
        "{TASK}    runtime: dokcer\n    command: x\n    secrets: [bad-name]\n    outputs: [/abs]\n    \
         inputs: [{{ url: 'ftp://h/x' }}]\n    network: bridged\n"
    );
    let errs = errors(&source, "job.yaml");
    let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "tasks[0].runtime",
            "tasks[0].secrets[0]",
            "tasks[0].outputs[0]",
            "tasks[0].inputs[0].url",
            "tasks[0].network"
        ],
        "{}",
        SpecErrors(errs.clone())
    );
}

#[test]
fn sandbox_examples_compile_to_what_their_comments_say() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let load = |name: &str| {
        let source = std::fs::read_to_string(dir.join(name)).unwrap();
        compile(&source, name, &ctx()).unwrap_or_else(|e| panic!("{e}"))
    };
    let docker = load("docker.yaml");
    let check = &docker.tasks[0];
    assert_eq!((check.runtime, check.image.as_deref()), (RuntimeKind::Docker, Some("drover-test/busybox:1")));
    assert_eq!(check.steps.len(), 2);
    assert!(check.services[0].healthcheck.is_some());
    let artifacts = load("artifacts.yaml");
    assert_eq!(artifacts.tasks[1].depends_on, vec!["A".to_string()]);
    assert_eq!(
        artifacts.tasks[1].inputs,
        vec![InputSpec {
            source: InputSource::Artifact { task: "A".into(), path: "out/result.txt".into() },
            to: "result.txt".into()
        }]
    );
    let agent = load("agent.yaml");
    let fix = &agent.tasks[0];
    let spec = fix.agent.as_ref().unwrap();
    assert_eq!(fix.runtime, RuntimeKind::Microvm);
    assert_eq!(fix.steps, vec![spec.command.clone()]);
    assert_eq!(
        (spec.budget, spec.repo.as_deref()),
        (Some(200_000), Some("https://git.example.com/team/app.git"))
    );
    assert!(spec.prompt.starts_with("Issue 1: "), "{}", spec.prompt);
}

/// Runs `f` on a thread with a small stack, to show that nothing recurses per task.
fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new().stack_size(512 << 10).spawn(f).unwrap().join().unwrap()
}

/// A JSON job file of `n` listed tasks, each depending on the one before.
fn json_chain(n: usize) -> String {
    let tasks: Vec<String> = (0..n)
        .map(|i| match i {
            0 => r#"{"name": "t0", "command": "true"}"#.to_string(),
            _ => format!(r#"{{"name": "t{i}", "command": "true", "depends_on": ["t{}"]}}"#, i - 1),
        })
        .collect();
    format!("{{\"version\": 1, \"name\": \"chain\", \"tasks\": [\n{}\n]}}\n", tasks.join(",\n"))
}

#[test]
fn a_generated_chain_of_20000_tasks_compiles_on_a_small_stack() {
    let source = json_chain(20_000);
    let (plan, elapsed) = on_small_stack(move || {
        let start = std::time::Instant::now();
        (compile(&source, "chain.json", &ctx()), start.elapsed())
    });
    let plan = plan.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(plan.tasks.len(), 20_000);
    assert_eq!(plan.tasks[19_999].depends_on, vec!["t19998".to_string()]);
    assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");
}

#[test]
fn a_cycle_closing_a_long_chain_is_placed_in_the_file() {
    let source = json_chain(20_000).replacen(
        r#"{"name": "t0", "command": "true"}"#,
        r#"{"name": "t0", "command": "true", "depends_on": ["t19999"]}"#,
        1,
    );
    let errs = on_small_stack(move || errors(&source, "chain.json"));
    assert_eq!(errs.len(), 1, "{}", SpecErrors(errs.clone()));
    assert_eq!((errs[0].line, errs[0].field.as_str()), (2, "tasks[0].depends_on[0]"));
    assert!(errs[0].message.starts_with("dependency cycle: t0 -> t19999 -> t19998"), "{}", errs[0]);
}

#[test]
fn an_array_of_100000_frames_compiles() {
    let source =
        "version: 1\nname: j\ntasks:\n  - name: r\n    array: 1-100000\n    command: render {{ frame }}\n";
    let start = std::time::Instant::now();
    let plan = ok(source);
    assert_eq!(plan.tasks.len(), 100_000);
    assert_eq!(plan.tasks[99_999].steps, vec![Command::Shell("render 100000".into())]);
    assert!(start.elapsed() < Duration::from_secs(30), "{:?}", start.elapsed());
}

#[test]
fn a_range_over_the_frame_limit_is_refused_before_any_frame_is_made() {
    let start = std::time::Instant::now();
    let e = assert_error(
        "version: 1\nname: j\ntasks:\n  - name: r\n    array: 1-1000000\n    command: echo {{ frame }}\n",
        5,
        12,
        "tasks[0].array",
        "frame range `1-1000000` has more than 100000 frames, the most one array task may have",
    );
    assert_eq!(e.hint.as_deref(), Some("split it into several array tasks, or the job into several jobs"));
    assert!(start.elapsed() < Duration::from_secs(1), "{:?}", start.elapsed());
}

#[test]
fn arrays_past_the_task_limit_are_refused() {
    let array =
        |name: &str| format!("  - name: {name}\n    array: 0-99999\n    command: echo {{{{ frame }}}}\n");
    let source = format!("version: 1\nname: j\ntasks:\n{}{}{}", array("a"), array("b"), array("c"));
    let start = std::time::Instant::now();
    let e = assert_error(&source, 11, 12, "tasks[2].array", "the job expands to more than 200000 tasks");
    assert_eq!(e.hint.as_deref(), Some("split it into several jobs"));
    // Refused without expanding the arrays that fit.
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
}

#[test]
fn a_negative_frame_number_is_refused() {
    assert_error(
        "version: 1\nname: j\ntasks:\n  - name: r\n    array: -3\n    command: x\n",
        5,
        12,
        "tasks[0].array",
        "frame -3 is negative",
    );
}

#[test]
fn expansion_stops_at_the_plan_size_limit() {
    let source =
        "version: 1\nname: j\ntasks:\n  - name: r\n    array: 1-100000\n    command: render {{ frame }}\n";
    let mut problems = super::error::Problems::new("job.yaml");
    let root = super::tree::parse_yaml(source).unwrap();
    let spec = super::schema::read_job(&root, &mut problems);
    let plan = super::expand::build_within(&spec, &ctx(), &mut problems, 1 << 20);
    assert!(plan.tasks.len() < 10_000, "{}", plan.tasks.len());
    let errs = problems.into_errors().0;
    assert_eq!(errs.len(), 1, "{}", SpecErrors(errs.clone()));
    assert_eq!((errs[0].line, errs[0].field.as_str()), (4, "tasks[0]"));
    assert_eq!(errs[0].message, "the job's plan is larger than 1 MiB, the most the server accepts");
}

#[test]
fn a_job_file_over_the_source_limit_is_refused_unread() {
    let source = format!("version: 1\n#{}\n", "x".repeat(crate::limits::MAX_SOURCE_BYTES));
    let e = assert_error(&source, 1, 1, "", "the job file is 16777229 bytes, more than the limit of 16 MiB");
    assert!(e.hint.unwrap().contains("arrays and templates"));
}

#[test]
fn the_project_name_rule_of_the_server_applies() {
    let e = assert_error(
        "version: 1\nname: j\nproject: Team FX\ntasks:\n  - name: a\n    command: x\n",
        3,
        10,
        "project",
        "project `Team FX` may only use lowercase letters, digits and `-`",
    );
    assert_eq!(e.hint.as_deref(), Some("rename it, like `team-fx`"));
}

#[test]
fn long_name_lists_in_hints_are_cut() {
    let mut source = String::from("version: 1\nname: j\ntasks:\n");
    for i in 0..30 {
        source.push_str(&format!("  - name: task-{i}\n    command: x\n"));
    }
    source.push_str("  - name: last\n    command: x\n    depends_on: [zzzzzzzzzzzz]\n");
    let e = assert_error(&source, 66, 18, "tasks[30].depends_on[0]", "unknown task `zzzzzzzzzzzz`");
    assert_eq!(
        e.hint.as_deref(),
        Some(
            "tasks of this job: task-0, task-1, task-2, task-3, task-4, task-5, task-6, task-7, task-8, task-9 and 21 more"
        )
    );
}

#[test]
fn durations_must_travel_unchanged_in_milliseconds() {
    let job = |timeout: &str| format!("{TASK}    command: x\n    timeout: {timeout}\n");
    assert_error(&job("1500us"), 6, 14, "tasks[0].timeout", "`1500us` is not a whole number of milliseconds");
    assert_error(&job("1ns"), 6, 14, "tasks[0].timeout", "`1ns` is not a whole number of milliseconds");
    assert_error(
        &job("600000000years"),
        6,
        14,
        "tasks[0].timeout",
        "`600000000years` is longer than the limit of 36500 days",
    );
    assert_eq!(ok(&job("36500days")).tasks[0].timeout, Some(crate::limits::MAX_DURATION));
}

#[test]
fn task_names_are_limited_in_length() {
    let name = "x".repeat(crate::limits::MAX_NAME_LEN + 1);
    let source = format!("version: 1\nname: j\ntasks:\n  - name: {name}\n    command: x\n");
    assert_error(&source, 4, 11, "tasks[0].name", "the name is 201 bytes long, more than the limit of 200");
}

#[test]
fn a_setup_timeout_limits_each_setup_phase_and_must_be_a_real_limit() {
    let job = |limit: &str| format!("{TASK}    command: x\n    setup_timeout: {limit}\n");
    assert_eq!(ok(&job("90s")).tasks[0].setup_timeout, Some(Duration::from_secs(90)));
    assert_eq!(ok(&format!("{TASK}    command: x\n")).tasks[0].setup_timeout, None);
    let e = assert_error(&job("0s"), 6, 20, "tasks[0].setup_timeout", "setup_timeout is zero");
    assert!(e.hint.unwrap().contains("15 minutes"));
    assert_error(&job("1ns"), 6, 20, "tasks[0].setup_timeout", "`1ns` is not a whole number of milliseconds");
}
