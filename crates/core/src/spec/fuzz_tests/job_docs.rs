//! Job documents that look valid. [`clean_job`] writes well-formed jobs (unique task names,
//! dependencies on earlier tasks, values of the right type) whose values include edge cases
//! that must either compile into a sound plan or be refused with a located error. [`job`]
//! writes every field of the schema with values of the right type most of the time, so that
//! documents reach the schema checks, templating and expansion with a few things wrong.

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

use super::doc::{Doc, awkward_text, replacement, template};

/// Task names the documents use, so that `depends_on` and `from` often name a real task.
const NAMES: &[&str] = &["prep", "render", "report", "a", "b"];

fn pick(words: &'static [&'static str]) -> impl Strategy<Value = Doc> + Clone {
    proptest::sample::select(words).prop_map(Doc::str)
}

/// Mostly `good`, sometimes a value of any type.
fn usually(good: impl Strategy<Value = Doc> + 'static) -> BoxedStrategy<Doc> {
    prop_oneof![6 => good, 1 => replacement()].boxed()
}

fn name() -> impl Strategy<Value = Doc> {
    prop_oneof![6 => pick(NAMES), 1 => awkward_text().prop_map(Doc::Str)]
}

fn text() -> impl Strategy<Value = Doc> {
    prop_oneof![
        4 => "[a-z0-9 ]{1,12}".prop_map(Doc::Str),
        1 => template().prop_map(Doc::Str),
        1 => awkward_text().prop_map(Doc::Str),
    ]
}

fn duration() -> BoxedStrategy<Doc> {
    usually(pick(&[
        "30s",
        "5m",
        "1h 30m",
        "1ms",
        "1ns",
        "1500us",
        "0s",
        "600000000years",
        "18446744073709551615s",
        "soon",
        "",
    ]))
}

fn command() -> BoxedStrategy<Doc> {
    usually(prop_oneof![
        3 => text(),
        2 => vec(text(), 1..4).prop_map(Doc::Seq),
        1 => Just(Doc::Seq(vec![Doc::str("")])),
    ])
}

fn string_map() -> BoxedStrategy<Doc> {
    let key = prop_oneof![pick(&["HOME", "A_B", "p", "x"]).prop_map(doc_text), "[A-Za-z_=]{0,6}"];
    usually(vec((key, text()), 0..4).prop_map(|entries| Doc::Map(entries.into_iter().collect())))
}

fn doc_text(doc: Doc) -> String {
    match doc {
        Doc::Str(s) => s,
        other => other.to_flow(),
    }
}

fn resources() -> BoxedStrategy<Doc> {
    let cores = prop_oneof![
        Just(Doc::Int(1)),
        Just(Doc::Int(0)),
        (1i64..64).prop_map(Doc::Int),
        Just(Doc::Int(1 << 40))
    ];
    let memory = prop_oneof![
        pick(&["512MiB", "1.5GiB", "0", "16777216TiB", "1e400G", "-1G", "NaNG", "lots"]),
        any::<i64>().prop_map(Doc::Int),
    ];
    let pids = prop_oneof![(1i64..100).prop_map(Doc::Int), Just(Doc::Int(0)), Just(Doc::Int(1 << 23))];
    usually(
        (option::of(cores), option::of(memory), option::of(pids))
            .prop_map(|(c, m, p)| Doc::Map(fields([("cores", c), ("memory", m), ("pids", p)]))),
    )
}

fn retries() -> BoxedStrategy<Doc> {
    let policy = (
        option::of(prop_oneof![(0i64..5).prop_map(Doc::Int), Just(Doc::Int(i64::from(u32::MAX) + 1))]),
        option::of(duration()),
        option::of(vec(pick(&["exit", "timeout", "lost", "oom", "exti"]), 0..4).prop_map(Doc::Seq)),
    )
        .prop_map(|(c, b, o)| Doc::Map(fields([("count", c), ("backoff", b), ("on", o)])));
    usually(prop_oneof![(0i64..4).prop_map(Doc::Int), policy])
}

fn array() -> BoxedStrategy<Doc> {
    usually(prop_oneof![
        pick(&["1-5", "0-9x2", "1,3,5", "1-3,10-12", "5-1", "1-3,2", "", "x", "0-9223372036854775806"]),
        (0i64..20).prop_map(Doc::Int),
        Just(Doc::Int(-1)),
    ])
}

fn names_list() -> BoxedStrategy<Doc> {
    usually(vec(name(), 0..4).prop_map(Doc::Seq))
}

fn network() -> BoxedStrategy<Doc> {
    let egress = vec(pick(&["api.example.com", "10.0.0.1:443", "[::1]:80", "x:0", "http://a", ""]), 0..3)
        .prop_map(|allow| Doc::map([("egress", Doc::Seq(allow))]));
    usually(prop_oneof![pick(&["none", "bridge", "full", "host"]), egress])
}

fn service() -> BoxedStrategy<Doc> {
    let healthcheck = (
        command(),
        option::of(duration()),
        option::of(duration()),
        option::of((0i64..50).prop_map(Doc::Int)),
    )
        .prop_map(|(c, i, t, r)| {
            Doc::Map(fields([("command", Some(c)), ("interval", i), ("timeout", t), ("retries", r)]))
        });
    (
        prop_oneof![pick(&["db", "web", "Bad_Name", "-x"]), awkward_text().prop_map(Doc::Str)],
        text(),
        option::of(command()),
        option::of(string_map()),
        option::of(vec(pick(&["/tmp", "relative", ""]), 0..2).prop_map(Doc::Seq)),
        option::of(pick(&["root", "1000:1000", "nobody"])),
        option::of(healthcheck),
    )
        .prop_map(|(n, i, c, e, t, u, h)| {
            Doc::Map(fields([
                ("name", Some(n)),
                ("image", Some(i)),
                ("command", c),
                ("env", e),
                ("tmpfs", t),
                ("user", u),
                ("healthcheck", h),
            ]))
        })
        .boxed()
}

fn input() -> BoxedStrategy<Doc> {
    let source = prop_oneof![
        text().prop_map(|p| ("path", p)),
        prop_oneof![pick(&["https://example.com/a.tar", "http://h/", "ftp://x/y", "nonsense"]), text()]
            .prop_map(|u| ("url", u)),
        (name(), prop_oneof![pick(&["out/x.bin", "../x", "/abs", ""]), text()])
            .prop_map(|(t, p)| ("from", Doc::Str(format!("{}:{}", doc_text(t), doc_text(p))))),
    ];
    usually(
        (source, option::of(text()))
            .prop_map(|((key, value), to)| Doc::Map(fields([(key, Some(value)), ("to", to)]))),
    )
}

fn agent() -> BoxedStrategy<Doc> {
    let push = (text(), pick(&["drover/fix", "a..b", "-x", "ok/branch", ""]))
        .prop_map(|(r, b)| Doc::map([("remote", r), ("branch", b)]));
    let budget = prop_oneof![
        (0i64..1_000_000).prop_map(|t| Doc::map([("tokens", Doc::Int(t))])),
        any::<i64>().prop_map(Doc::Int)
    ];
    (
        command(),
        option::of(text()),
        option::of(text()),
        option::of(text()),
        option::of(budget),
        option::of(push),
        option::of(pick(&["anthropic", "openai", "other"])),
        option::of(pick(&["https://api.example.com", "http://", "file:///x"])),
        option::of(pick(&["ANTHROPIC_KEY", "lower", "1X"])),
    )
        .prop_map(|(c, p, pf, r, b, push, prov, up, key)| {
            Doc::Map(fields([
                ("command", Some(c)),
                ("prompt", p),
                ("prompt_file", pf),
                ("repo", r),
                ("budget", b),
                ("push", push),
                ("provider", prov),
                ("upstream", up),
                ("key_secret", key),
            ]))
        })
        .boxed()
}

/// The entries that are present, in order.
fn fields<const N: usize>(entries: [(&'static str, Option<Doc>); N]) -> Vec<(String, Doc)> {
    entries.into_iter().filter_map(|(k, v)| v.map(|v| (k.to_string(), v))).collect()
}

/// One entry of `tasks`.
fn task() -> BoxedStrategy<Doc> {
    let basics = (
        option::weighted(0.95, name()),
        prop_oneof![
            3 => command().prop_map(|c| Some(("command", c))),
            2 => vec(command(), 0..4).prop_map(|s| Some(("steps", Doc::Seq(s)))),
            1 => Just(None),
        ],
        option::of(string_map()),
        option::of(resources()),
        option::of(duration()),
        option::of(retries()),
        option::of(array()),
        option::of(names_list()),
    );
    let more = (
        option::of(usually(
            (
                option::of(vec((0i64..300).prop_map(Doc::Int), 0..3)),
                option::of(vec(any::<i64>().prop_map(Doc::Int), 0..2)),
            )
                .prop_map(|(w, s)| {
                    Doc::Map(fields([("warning", w.map(Doc::Seq)), ("skip", s.map(Doc::Seq))]))
                }),
        )),
        option::of(string_map()),
        option::of(pick(&["process", "docker", "microvm", "vm"])),
        option::of(prop_oneof![pick(&["busybox:1", "dir:/images/x", ""]), text()]),
        option::of(usually(
            (option::of(text()), option::of(text()), option::of(string_map()))
                .prop_map(|(d, c, a)| Doc::Map(fields([("dockerfile", d), ("context", c), ("args", a)]))),
        )),
        option::of(pick(&["root", "0", "1000:1000", "nobody", ""])),
        option::of(network()),
        option::of(vec(service(), 0..3).prop_map(Doc::Seq)),
    );
    let files = (
        option::of(vec(pick(&["API_KEY", "ANTHROPIC_KEY", "lower", "HOME", "A_B"]), 0..3).prop_map(Doc::Seq)),
        option::of(
            vec(prop_oneof![pick(&["out/*.png", "../x", "/abs", ""]), text()], 0..3).prop_map(Doc::Seq),
        ),
        option::of(any::<bool>().prop_map(Doc::Bool)),
        option::of(vec(input(), 0..3).prop_map(Doc::Seq)),
        option::of(agent()),
    );
    (basics, more, files)
        .prop_map(|((n, work, env, res, timeout, retries, array, deps), more, files)| {
            let (codes, constraints, runtime, image, build, user, network, services) = more;
            let (secrets, outputs, on_failure, inputs, agent) = files;
            let mut entries = fields([
                ("name", n),
                ("env", env),
                ("resources", res),
                ("timeout", timeout),
                ("retries", retries),
                ("array", array),
                ("depends_on", deps),
                ("exit_codes", codes),
                ("constraints", constraints),
                ("runtime", runtime),
                ("image", image),
                ("build", build),
                ("user", user),
                ("network", network),
                ("services", services),
                ("secrets", secrets),
                ("outputs", outputs),
                ("outputs_on_failure", on_failure),
                ("inputs", inputs),
                ("agent", agent),
            ]);
            if let Some((key, value)) = work {
                entries.insert(1.min(entries.len()), (key.to_string(), value));
            }
            Doc::Map(entries)
        })
        .boxed()
}

/// A whole job document with a few things wrong.
pub(super) fn job() -> impl Strategy<Value = Doc> {
    let version = prop_oneof![8 => Just(Doc::Int(1)), 1 => Just(Doc::Int(2)), 1 => Just(Doc::str("1"))];
    (
        option::weighted(0.95, version),
        option::weighted(0.95, text()),
        option::of(usually(pick(&["default", "team-a", "Bad Project", ""]))),
        option::of(usually(prop_oneof![
            (-10i64..10).prop_map(Doc::Int),
            Just(Doc::Int(i64::from(i32::MAX) + 1))
        ])),
        option::of(string_map()),
        option::of(string_map()),
        option::of(string_map()),
        option::weighted(0.95, usually(vec(task(), 0..5).prop_map(Doc::Seq))),
    )
        .prop_map(|(v, n, p, prio, labels, params, env, tasks)| {
            Doc::Map(fields([
                ("version", v),
                ("name", n),
                ("project", p),
                ("priority", prio),
                ("labels", labels),
                ("params", params),
                ("env", env),
                ("tasks", tasks),
            ]))
        })
}

/// A duration a job file may well hold, including ones finer than a millisecond and ones
/// longer than any clock.
fn clean_duration() -> impl Strategy<Value = Doc> + Clone {
    prop_oneof![
        6 => pick(&["30s", "5m", "1h 30m", "1ms", "250ms", "36500days"]),
        1 => pick(&["1ns", "1500us", "36500days 1ms", "600000000years", "2562047788015216h"]),
    ]
}

/// Text that renders: plain words, and templates of names that exist.
fn clean_text(array: bool) -> impl Strategy<Value = Doc> + Clone {
    let frame = if array { "{{ frame }}" } else { "{{ params.p }}" };
    prop_oneof![
        4 => "[a-z0-9][a-z0-9 ]{0,11}".prop_map(Doc::Str),
        1 => pick(&["{{ params.p }}", "{{ env.HOME }}", "x{{ env.NOPE | default('') }}"]),
        1 => Just(Doc::str(frame)),
    ]
}

fn clean_map(value: impl Strategy<Value = Doc> + Clone + 'static) -> impl Strategy<Value = Doc> {
    proptest::collection::btree_map("[A-Z][A-Z0-9_]{0,5}", value, 0..4)
        .prop_map(|m| Doc::Map(m.into_iter().collect()))
}

fn clean_resources() -> impl Strategy<Value = Doc> {
    let memory = prop_oneof![
        pick(&["512MiB", "1.5GiB", "0", "16777216TiB", "1e3M", "0.5K"]),
        (0i64..1 << 40).prop_map(Doc::Int),
        Just(Doc::Int(i64::MAX)),
    ];
    (
        option::of((1i64..64).prop_map(Doc::Int)),
        option::of(memory),
        option::of((1i64..4096).prop_map(Doc::Int)),
    )
        .prop_map(|(c, m, p)| Doc::Map(fields([("cores", c), ("memory", m), ("pids", p)])))
}

fn clean_retries() -> impl Strategy<Value = Doc> {
    let classes =
        proptest::sample::subsequence(vec!["exit", "timeout", "lost", "oom", "start", "budget"], 0..4)
            .prop_map(|on| Doc::Seq(on.into_iter().map(Doc::str).collect()));
    prop_oneof![
        (0i64..5).prop_map(Doc::Int),
        (option::of((0i64..5).prop_map(Doc::Int)), option::of(clean_duration()), option::of(classes))
            .prop_map(|(c, b, o)| Doc::Map(fields([("count", c), ("backoff", b), ("on", o)]))),
    ]
}

/// The `index`th task of a clean job: its name is unique, and it depends only on earlier
/// tasks, so the job has no cycle.
fn clean_task(index: usize) -> impl Strategy<Value = Doc> {
    let earlier: Vec<&'static str> = NAMES[..index].to_vec();
    (any::<bool>(), proptest::sample::subsequence(earlier.clone(), 0..=earlier.len())).prop_flat_map(
        move |(array, deps)| {
            let codes = vec((0i64..256).prop_map(Doc::Int), 0..3).prop_map(Doc::Seq);
            let work = prop_oneof![
                2 => clean_text(array).prop_map(|c| ("command", c)),
                1 => vec(clean_text(array), 1..3).prop_map(|a| ("command", Doc::Seq(a))),
                1 => vec(clean_text(array), 1..3).prop_map(|s| ("steps", Doc::Seq(s))),
            ];
            let frames = pick(&["1-5", "0-9x2", "1,3,5", "1-3,10-12", "7"]);
            let url = pick(&["https://example.com/a.tar", "http://h/b/c.bin?x=1"]);
            (
                work,
                option::of(clean_map(clean_text(array))),
                option::of(clean_resources()),
                option::of(clean_duration()),
                option::of(clean_retries()),
                option::of((codes.clone(), codes).prop_map(|(w, s)| Doc::map([("warning", w), ("skip", s)]))),
                option::of(clean_map(clean_text(false))),
                option::of(vec(pick(&["out/*.png", "report.txt"]), 1..3).prop_map(Doc::Seq)),
                option::of(vec(url.prop_map(|u| Doc::map([("url", u)])), 1..2).prop_map(Doc::Seq)),
                option::of(any::<bool>().prop_map(Doc::Bool)),
                frames,
            )
                .prop_map(
                    move |(
                        work,
                        env,
                        res,
                        timeout,
                        retries,
                        codes,
                        constraints,
                        outputs,
                        inputs,
                        on_failure,
                        frames,
                    )| {
                        let deps = (!deps.is_empty())
                            .then(|| Doc::Seq(deps.iter().copied().map(Doc::str).collect()));
                        let mut entries = fields([
                            ("name", Some(Doc::str(NAMES[index]))),
                            ("env", env),
                            ("resources", res),
                            ("timeout", timeout),
                            ("retries", retries),
                            ("depends_on", deps),
                            ("exit_codes", codes),
                            ("constraints", constraints),
                            ("outputs", outputs),
                            ("outputs_on_failure", on_failure),
                            ("inputs", inputs),
                        ]);
                        entries.push((work.0.to_string(), work.1));
                        if array {
                            entries.push(("array".to_string(), frames));
                        }
                        Doc::Map(entries)
                    },
                )
        },
    )
}

/// A well-formed job document.
pub(super) fn clean_job() -> impl Strategy<Value = Doc> {
    (1..=NAMES.len())
        .prop_flat_map(|count| {
            let tasks: Vec<_> = (0..count).map(clean_task).collect();
            (
                tasks,
                option::of(pick(&["default", "team-a"])),
                option::of((-10i64..10).prop_map(Doc::Int)),
                option::of(clean_map(clean_text(false))),
                option::of(clean_map(clean_text(false))),
            )
        })
        .prop_map(|(tasks, project, priority, labels, env)| {
            Doc::Map(fields([
                ("version", Some(Doc::Int(1))),
                ("name", Some(Doc::str("job-{{ params.p }}"))),
                ("project", project),
                ("priority", priority),
                ("labels", labels),
                ("env", env),
                ("tasks", Some(Doc::Seq(tasks))),
            ]))
        })
}
