//! Fuzz tests of the server's intake of submitted plans ([`decode_within`], which `submit`
//! runs before anything is stored): whatever a client sends, the answer is a plan that holds
//! the server's invariants or an `InvalidArgument` that says what is wrong, in bounded time,
//! without a panic.
//!
//! The inputs are arbitrary bytes as JSON and as zstd data, the plans of
//! `fuzz/corpus/submit/` (in this crate), and plans built field by field from pools of good
//! and awkward values, sent as they are or with their JSON mutated (values replaced by other
//! types, huge and negative numbers, long strings and deep nesting; keys dropped or unknown).
//! A plan that passes [`JobPlan::validate`] in memory, as the CLI checks it, must be accepted
//! as the same plan when it arrives as JSON.
//!
//! As ordinary tests they run a modest number of cases. For a long run, raise the count
//! and build optimised:
//!
//! ```text
//! PROPTEST_CASES=100000 cargo test -p drover-server --release intake::fuzz_tests
//! ```
//!
//! A failure proptest finds is written to `fuzz_tests.proptest-regressions` beside this file
//! and replayed first on every run; keep that file in the repository. Once the bug is fixed,
//! also add the plan to the corpus as `regression-<what>.json`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use drover_core::tenancy::ProjectSettings;
use drover_core::{
    AgentSpec, BuildSpec, Command, HealthCheck, InputSource, InputSpec, LlmProvider, NetworkPolicy, PushSpec,
    Resources, RetryPolicy, RuntimeKind, ServiceSpec, TaskPlan,
};
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::FileFailurePersistence;
use serde_json::Value;
use tonic::Code;

use super::*;

/// Cases per property in an ordinary test run, unless `PROPTEST_CASES` says otherwise.
const DEFAULT_CASES: u32 = 48;

/// Longest one decode may take before it counts as a hang: far above what a fuzz plan takes
/// even unoptimised.
const HANG_GUARD: Duration = Duration::from_secs(10);

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_CASES);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        max_shrink_time: 120_000,
        ..ProptestConfig::default()
    }
}

/// Decodes in a thread of its own, failing the test if that takes longer than [`HANG_GUARD`].
fn decode_guarded(req: pb::SubmitRequest, max_bytes: usize) -> Result<JobPlan, Status> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("decode".into())
        .spawn(move || {
            let _ = tx.send(decode_within(&req, max_bytes));
        })
        .expect("spawn the decode thread");
    match rx.recv_timeout(HANG_GUARD) {
        Ok(result) => result,
        Err(RecvTimeoutError::Timeout) => panic!("decoding took more than {HANG_GUARD:?}"),
        Err(RecvTimeoutError::Disconnected) => panic!("decoding panicked (its message is above)"),
    }
}

/// Decodes `req` and checks the answer; the plan, if accepted.
fn check(req: pb::SubmitRequest, max_bytes: usize) -> Option<JobPlan> {
    match decode_guarded(req, max_bytes) {
        Ok(plan) => {
            check_accepted(&plan);
            Some(plan)
        }
        Err(status) => {
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert!(!status.message().trim().is_empty(), "a refusal without a message");
            None
        }
    }
}

/// What the rest of `submit` and the store rely on in an accepted plan.
fn check_accepted(plan: &JobPlan) {
    if let Err(e) = plan.validate() {
        panic!("an accepted plan does not validate: {e}\n{plan:?}");
    }
    for t in &plan.tasks {
        assert!(t.build.is_none(), "an accepted plan asks for a build");
        assert!(!t.inputs.iter().any(|i| matches!(i.source, InputSource::Path(_))), "an accepted local path");
        for limit in drover_core::enforce::needed(t) {
            assert_eq!(
                t.constraints.get(&limit.label()).map(String::as_str),
                Some(drover_core::enforce::ENFORCED)
            );
        }
        // The digests `submit` looks up: a bad one is refused there, never a panic.
        let inputs = t.inputs.iter().filter_map(|i| match &i.source {
            InputSource::Blob { digest, .. } => Some(digest.as_str()),
            _ => None,
        });
        for digest in t.image_blob.iter().map(String::as_str).chain(inputs) {
            let _ = crate::transfer::digest(digest);
        }
    }
    // Project settings are checked next; any answer will do, but not a panic.
    let _ = ProjectSettings::default().check(plan);
    let mut strict = ProjectSettings::default();
    for (key, value) in
        [("runtimes", "process"), ("images", "busybox*"), ("max_priority", "0"), ("run_as", "x*")]
    {
        strict.set(key, value).expect("a valid setting");
    }
    let _ = strict.check(plan);
    // Stored as JSON and read back by the scheduler and agents: the same plan, accepted again.
    let json = serde_json::to_string(plan).expect("a plan serialises");
    let back: JobPlan = serde_json::from_str(&json).expect("a plan's JSON reads back");
    assert_eq!(&back, plan, "the plan changed through its JSON: {json}");
    let again =
        decode_within(&json_request(json), MAX_PLAN_BYTES).expect("an accepted plan is accepted again");
    assert_eq!(&again, plan, "decoding an accepted plan again changed it");
}

fn json_request(json: String) -> pb::SubmitRequest {
    pb::SubmitRequest { plan_json: json, ..Default::default() }
}

fn zstd_request(bytes: &[u8]) -> pb::SubmitRequest {
    pb::SubmitRequest { plan_zstd: zstd::encode_all(bytes, 3).expect("zstd in memory"), ..Default::default() }
}

/// Every seed plan: file name and JSON, in name order.
fn seeds() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/submit");
    let mut seeds: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let name = p.file_name().expect("a file name").to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display())))
        })
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 3, "the corpus at {} lost its seeds", dir.display());
    seeds
}

#[test]
fn corpus_plans_are_accepted_or_refused_cleanly() {
    for (name, json) in seeds() {
        let accepted = check(json_request(json.clone()), MAX_PLAN_BYTES);
        // A `regression-` seed once crashed the server or slipped through; it is refused now.
        if name.starts_with("regression-") {
            assert!(accepted.is_none(), "regression seed {name} was accepted");
        } else {
            assert!(
                accepted.is_some(),
                "seed {name} is refused: {:?}",
                decode_plan(&json_request(json.clone()))
            );
            assert_eq!(check(zstd_request(json.as_bytes()), MAX_PLAN_BYTES), accepted, "{name} as zstd");
        }
    }
}

#[test]
fn pathological_nesting_is_refused() {
    let deep = 100_000;
    let documents = [
        format!("{}1{}", "[".repeat(deep), "]".repeat(deep)),
        format!("{}1{}", "{\"a\":".repeat(deep), "}".repeat(deep)),
        format!("{{\"name\": \"j\", \"project\": \"default\", \"tasks\": {}", "[".repeat(deep)),
    ];
    for json in documents {
        assert!(check(zstd_request(json.as_bytes()), MAX_PLAN_BYTES).is_none());
        assert!(check(json_request(json), MAX_PLAN_BYTES).is_none());
    }
}

const NAMES: &[&str] = &["prep", "render", "report", "a"];

fn text() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        40 => "[a-z0-9][a-z0-9 ._/-]{0,11}",
        1 => Just(String::new()),
        1 => Just(" \t".to_string()),
        1 => Just("../x".to_string()),
        1 => Just("/abs".to_string()),
        1 => Just("a\0b".to_string()),
        1 => any::<String>(),
        1 => (1usize..140_000).prop_map(|n| "x".repeat(n)),
    ]
}

fn name() -> impl Strategy<Value = String> + Clone {
    prop_oneof![8 => proptest::sample::select(NAMES).prop_map(str::to_string), 1 => text()]
}

/// Durations as a plan holds them in memory: most in whole milliseconds, some finer, some
/// beyond any clock.
fn duration() -> impl Strategy<Value = Duration> + Clone {
    prop_oneof![
        6 => (0u64..10_000_000).prop_map(Duration::from_millis),
        1 => any::<u64>().prop_map(Duration::from_millis),
        1 => (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        1 => (0u64..10, 1u32..1_000_000).prop_map(|(s, n)| Duration::new(s, n)),
    ]
}

fn command() -> impl Strategy<Value = Command> + Clone {
    prop_oneof![
        5 => text().prop_map(Command::Shell),
        5 => vec(text(), 1..3).prop_map(Command::Argv),
        1 => Just(Command::Argv(Vec::new())),
    ]
}

fn string_map() -> impl Strategy<Value = BTreeMap<String, String>> + Clone {
    btree_map(prop_oneof![4 => "[A-Z_]{1,5}", 1 => text()], text(), 0..3)
}

fn digest() -> impl Strategy<Value = String> + Clone {
    prop_oneof!["sha256:[0-9a-f]{64}", Just("sha256:".to_string()), text(), "sha256:[0-9A-F]{64}",]
}

fn input() -> impl Strategy<Value = InputSpec> {
    let source = prop_oneof![
        text().prop_map(InputSource::Path),
        prop_oneof![Just("https://example.com/a.tar".to_string()), text()].prop_map(InputSource::Url),
        (digest(), any::<bool>()).prop_map(|(digest, directory)| InputSource::Blob { digest, directory }),
        (name(), text()).prop_map(|(task, path)| InputSource::Artifact { task, path }),
    ];
    (source, text()).prop_map(|(source, to)| InputSpec { source, to })
}

fn service() -> BoxedStrategy<ServiceSpec> {
    let healthcheck =
        (command(), duration(), duration(), 0u32..5).prop_map(|(command, interval, timeout, retries)| {
            HealthCheck { command, interval, timeout, retries }
        });
    (
        prop_oneof![Just("db".to_string()), text()],
        text(),
        option::of(command()),
        string_map(),
        vec(prop_oneof![Just("/tmp".to_string()), text()], 0..2),
        option::of(text()),
        option::of(healthcheck),
    )
        .prop_map(|(name, image, command, env, tmpfs, user, healthcheck)| ServiceSpec {
            name,
            image,
            command,
            env,
            tmpfs,
            user,
            healthcheck,
        })
        .boxed()
}

fn agent() -> BoxedStrategy<AgentSpec> {
    (
        command(),
        text(),
        option::of(text()),
        option::of(text()),
        option::of(any::<u64>()),
        option::of((text(), prop_oneof![Just("drover/x".to_string()), text()])),
        prop_oneof![Just(LlmProvider::Anthropic), Just(LlmProvider::OpenAi)],
        option::of(prop_oneof![Just("https://api.example.com".to_string()), text()]),
        option::of(prop_oneof![Just("KEY".to_string()), text()]),
    )
        .prop_map(|(command, prompt, prompt_file, repo, budget, push, provider, upstream, key_secret)| {
            AgentSpec {
                command,
                prompt,
                prompt_file,
                repo,
                budget,
                push: push.map(|(remote, branch)| PushSpec { remote, branch }),
                provider,
                upstream,
                key_secret,
            }
        })
        .boxed()
}

/// A task whose every field may be set; `rare` fields are set less often, so that many tasks
/// stay valid.
fn task() -> BoxedStrategy<TaskPlan> {
    let runtime =
        prop_oneof![Just(RuntimeKind::Process), Just(RuntimeKind::Docker), Just(RuntimeKind::Microvm)];
    let network = prop_oneof![
        Just(NetworkPolicy::None),
        Just(NetworkPolicy::Bridge),
        Just(NetworkPolicy::Full),
        vec(prop_oneof![Just("api.example.com:443".to_string()), text()], 0..3)
            .prop_map(|allow| NetworkPolicy::Egress { allow }),
    ];
    let retries = (0u32..4, duration()).prop_map(|(count, backoff)| RetryPolicy {
        count,
        backoff,
        ..Default::default()
    });
    let rare = |p| option::weighted(p, Just(()));
    let basics = (
        name(),
        prop_oneof![4 => Just(None), 1 => any::<i64>().prop_map(Some), 2 => (0i64..5).prop_map(Some)],
        prop_oneof![9 => vec(command(), 1..3), 1 => Just(Vec::new())],
        string_map(),
        (
            prop_oneof![4 => Just(1u32), 1 => any::<u32>()],
            any::<u64>(),
            prop_oneof![Just(0u32), any::<u32>()],
        ),
        option::of(duration()),
        retries,
        prop_oneof![2 => Just(Vec::new()), 1 => vec(name(), 1..3)],
    )
        .boxed();
    let sandbox = (
        (prop_oneof![4 => Just(vec![42]), 1 => vec(any::<i32>(), 0..2)], vec(0i32..256, 0..2)),
        string_map(),
        runtime,
        option::weighted(0.2, text()),
        (rare(0.1), option::weighted(0.1, digest()), option::of(text())),
        option::weighted(0.1, (text(), text(), string_map())),
        option::of(text()),
        network,
    )
        .boxed();
    let files = (
        option::weighted(0.2, vec(service(), 0..2)),
        vec(prop_oneof![Just("KEY".to_string()), text()], 0..2),
        vec(prop_oneof![Just("out/*".to_string()), text()], 0..2),
        any::<bool>(),
        option::weighted(0.3, vec(input(), 0..3)),
        option::weighted(0.2, agent()),
        option::weighted(0.2, duration()),
    )
        .boxed();
    (basics, sandbox, files)
        .prop_map(|(basics, sandbox, files)| {
            let (name, frame, steps, env, (cores, memory, pids), timeout, retries, depends_on) = basics;
            let (
                (warning, skip),
                constraints,
                runtime,
                image,
                (named, image_blob, image_name),
                build,
                user,
                network,
            ) = sandbox;
            let (services, secrets, outputs, outputs_on_failure, inputs, agent, setup_timeout) = files;
            TaskPlan {
                name,
                frame,
                steps,
                env,
                resources: Resources { cores, memory, pids },
                timeout,
                setup_timeout,
                retries,
                depends_on,
                exit_codes: drover_core::ExitCodes { warning, skip },
                constraints,
                runtime,
                image,
                image_name: named.and(image_name),
                image_blob,
                build: build.map(|(dockerfile, context, args)| BuildSpec { dockerfile, context, args }),
                user,
                network,
                services: services.unwrap_or_default(),
                secrets,
                outputs,
                outputs_on_failure,
                inputs: inputs.unwrap_or_default(),
                agent,
            }
        })
        .boxed()
}

fn plan() -> impl Strategy<Value = JobPlan> {
    (
        prop_oneof![9 => Just("job".to_string()), 1 => text()],
        prop_oneof![9 => Just("default".to_string()), 1 => text()],
        any::<i32>(),
        string_map(),
        prop_oneof![9 => vec(task(), 1..5), 1 => Just(Vec::new())],
    )
        .prop_map(|(name, project, priority, labels, tasks)| JobPlan {
            name,
            project,
            priority,
            labels,
            tasks,
        })
}

/// A change to a plan's JSON.
#[derive(Debug, Clone)]
enum Mutation {
    Replace(Value),
    DropKey(Index),
    UnknownKey(String),
    Nest(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let value = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        Just(Value::from(u64::MAX)),
        Just(Value::from(-1)),
        any::<f64>().prop_map(Value::from),
        text().prop_map(Value::from),
        Just(Value::Array(Vec::new())),
        Just(Value::Object(serde_json::Map::new())),
        Just(serde_json::json!({"mode": "egress", "allow": ["x"]})),
        Just(serde_json::json!({"blob": {"digest": "sha256:00", "directory": true}})),
    ];
    prop_oneof![
        4 => value.prop_map(Mutation::Replace),
        2 => any::<Index>().prop_map(Mutation::DropKey),
        1 => "[a-z_]{1,8}".prop_map(Mutation::UnknownKey),
        1 => (1usize..200).prop_map(Mutation::Nest),
    ]
}

/// Every node's path in `value`, as object keys and array indices from the root.
fn paths(value: &Value) -> Vec<Vec<PathStep>> {
    let mut all = Vec::new();
    let mut stack = vec![(value, Vec::new())];
    while let Some((v, path)) = stack.pop() {
        match v {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let mut p = path.clone();
                    p.push(PathStep::Index(i));
                    stack.push((item, p));
                }
            }
            Value::Object(map) => {
                for (k, item) in map {
                    let mut p = path.clone();
                    p.push(PathStep::Key(k.clone()));
                    stack.push((item, p));
                }
            }
            _ => {}
        }
        all.push(path);
    }
    all
}

#[derive(Debug, Clone)]
enum PathStep {
    Index(usize),
    Key(String),
}

fn mutate(value: &mut Value, at: Index, mutation: &Mutation) {
    let all = paths(value);
    let path = &all[at.index(all.len())];
    let node = path.iter().fold(value, |v, step| match (v, step) {
        (Value::Array(items), PathStep::Index(i)) => &mut items[*i],
        (Value::Object(map), PathStep::Key(k)) => map.get_mut(k).expect("the path was just taken"),
        _ => unreachable!("paths lead through collections"),
    });
    match (mutation, node) {
        (Mutation::Replace(with), node) => *node = with.clone(),
        (Mutation::DropKey(i), Value::Object(map)) if !map.is_empty() => {
            let key = map.keys().nth(i.index(map.len())).cloned().expect("an index within the map");
            map.remove(&key);
        }
        (Mutation::UnknownKey(key), Value::Object(map)) => {
            map.insert(key.clone(), Value::from(1));
        }
        (Mutation::Nest(depth), node) => {
            let inner = node.take();
            *node = (0..*depth).fold(inner, |v, _| Value::Array(vec![v]));
        }
        _ => {}
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_are_refused_cleanly(
        bytes in vec(any::<u8>(), 0..2048),
        how in 0u8..3,
    ) {
        let req = match how {
            0 => json_request(String::from_utf8_lossy(&bytes).into_owned()),
            1 => pb::SubmitRequest { plan_zstd: bytes, ..Default::default() },
            _ => zstd_request(&bytes),
        };
        check(req, MAX_PLAN_BYTES);
    }

    #[test]
    fn generated_plans_are_accepted_or_refused_cleanly(plan in plan(), zstd in any::<bool>(), small_cap in any::<bool>()) {
        let json = serde_json::to_string(&plan).expect("a plan serialises");
        let req = if zstd { zstd_request(json.as_bytes()) } else { json_request(json) };
        let cap = if small_cap { 4096 } else { MAX_PLAN_BYTES };
        let accepted = check(req, cap);
        // What the CLI validates the server accepts, unchanged but for the constraints it adds.
        let uploaded = plan.tasks.iter().all(|t| {
            t.build.is_none() && !t.inputs.iter().any(|i| matches!(i.source, InputSource::Path(_)))
        });
        if plan.validate().is_ok() && uploaded && !small_cap {
            let mut expected = plan.clone();
            drover_core::enforce::require(&mut expected);
            prop_assert_eq!(accepted, Some(expected));
        }
    }

    #[test]
    fn mutated_plans_are_accepted_or_refused_cleanly(
        plan in plan(),
        mutations in vec((any::<Index>(), mutation()), 1..5),
        zstd in any::<bool>(),
    ) {
        let mut value = serde_json::to_value(&plan).expect("a plan serialises");
        for (at, mutation) in &mutations {
            mutate(&mut value, *at, mutation);
        }
        let json = value.to_string();
        let req = if zstd { zstd_request(json.as_bytes()) } else { json_request(json) };
        check(req, MAX_PLAN_BYTES);
    }

    #[test]
    fn mutated_corpus_plans_are_accepted_or_refused_cleanly(
        seed in any::<Index>(),
        mutations in vec((any::<Index>(), mutation()), 1..5),
    ) {
        let seeds = seeds();
        let (_, json) = seed.get(&seeds);
        let mut value: Value = serde_json::from_str(json).expect("seeds are JSON");
        for (at, mutation) in &mutations {
            mutate(&mut value, *at, mutation);
        }
        check(json_request(value.to_string()), MAX_PLAN_BYTES);
    }
}
