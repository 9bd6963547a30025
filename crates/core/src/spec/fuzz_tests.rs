//! Fuzz tests of the job-file compiler ([`compile`]): whatever text it is given, it returns a
//! plan or located errors, in bounded time and memory, without panicking or overflowing the
//! stack. A plan it returns must pass [`JobPlan::validate`] and read back from its JSON (the
//! form the server receives) as the same plan.
//!
//! The inputs are arbitrary bytes and text, the seed documents of `fuzz/corpus/job_file/` (in
//! this crate) mutated as trees and as text, and job documents built field by field from
//! pools of good and awkward values. Each compile runs in its own thread under a generous
//! wall-clock guard, so that a hang fails the test instead of stalling it.
//!
//! As ordinary tests they run a modest number of cases. For a long run, raise the count
//! and build optimised:
//!
//! ```text
//! PROPTEST_CASES=100000 cargo test -p drover-core --release spec::fuzz_tests
//! ```
//!
//! A failure proptest finds is written to `fuzz_tests.proptest-regressions` beside this file
//! and replayed first on every run; keep that file in the repository. Once the bug is fixed,
//! also add the input to the corpus as `regression-<what>.yaml` (or `.json`), so that it is
//! replayed by name, and mutated, from then on.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::FileFailurePersistence;

use super::{SpecErrors, TemplateContext, compile, tree};
use crate::job::JobPlan;
use crate::limits::{MAX_PLAN_BYTES, MAX_TASKS};

mod doc;
mod job_docs;

use doc::Doc;

/// Cases per property in an ordinary test run, unless `PROPTEST_CASES` says otherwise.
const DEFAULT_CASES: u32 = 48;

/// Longest one compile may take before it counts as a hang: far above the milliseconds a
/// fuzz document takes even unoptimised, so that a slow machine does not fail the test.
const HANG_GUARD: Duration = Duration::from_secs(10);

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_CASES);
    ProptestConfig {
        cases,
        // Beside this file, where the brief of each failure is easy to find and commit.
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        // A hanging case costs the guard's time on every shrink step.
        max_shrink_time: 120_000,
        ..ProptestConfig::default()
    }
}

/// Templates see one param and one environment variable.
fn context() -> TemplateContext {
    TemplateContext {
        env: [("HOME".to_string(), "/home/ada".to_string())].into(),
        params: [("p".to_string(), "v".to_string())].into(),
    }
}

/// Compiles in a thread of its own with a thread's default stack (smaller than the 8 MiB of
/// the CLI's main thread), failing the test if that takes longer than [`HANG_GUARD`].
fn compile_guarded(source: &str, file: &'static str) -> Result<JobPlan, SpecErrors> {
    let (tx, rx) = mpsc::channel();
    let owned = source.to_string();
    std::thread::Builder::new()
        .name("compile".into())
        .stack_size(2 << 20)
        .spawn(move || {
            let _ = tx.send(compile(&owned, file, &context()));
        })
        .expect("spawn the compile thread");
    match rx.recv_timeout(HANG_GUARD) {
        Ok(result) => result,
        Err(RecvTimeoutError::Timeout) => {
            panic!("compiling took more than {HANG_GUARD:?}: {}", excerpt(source))
        }
        Err(RecvTimeoutError::Disconnected) => {
            panic!("the compiler panicked (its message is above): {}", excerpt(source))
        }
    }
}

/// The start of a document, for failure messages about documents that may be megabytes long.
fn excerpt(source: &str) -> String {
    let head: String = source.chars().take(300).collect();
    format!("{head:?} ({} bytes)", source.len())
}

/// Line breaks as YAML counts them: `\n`, `\r\n` and a lone `\r`.
fn lines(source: &str) -> usize {
    1 + source.matches('\n').count() + source.matches('\r').count() - source.matches("\r\n").count()
}

/// Compiles `source` and checks what came out; the plan, if there is one.
fn check(source: &str, file: &'static str) -> Option<JobPlan> {
    match compile_guarded(source, file) {
        Ok(plan) => {
            check_plan(&plan);
            Some(plan)
        }
        Err(errors) => {
            check_errors(source, &errors);
            None
        }
    }
}

/// The compiler's promises about a plan: it validates, it is within the job limits, and its
/// JSON reads back as the same plan, which validates too.
fn check_plan(plan: &JobPlan) {
    if let Err(e) = plan.validate() {
        panic!("a compiled plan does not validate: {e}\n{plan:?}");
    }
    assert!(plan.tasks.len() <= MAX_TASKS, "{} tasks", plan.tasks.len());
    let json = serde_json::to_string(plan).expect("a plan serialises");
    assert!(json.len() <= MAX_PLAN_BYTES, "a plan of {} bytes", json.len());
    let back: JobPlan = serde_json::from_str(&json).expect("a plan's JSON reads back");
    assert_eq!(&back, plan, "the plan changed through its JSON: {json}");
    if let Err(e) = back.validate() {
        panic!("a compiled plan read back from JSON does not validate: {e}\n{json}");
    }
}

/// Errors say something and point into the document.
fn check_errors(source: &str, errors: &SpecErrors) {
    assert!(!errors.0.is_empty(), "an error without problems");
    let last_line = lines(source);
    for e in &errors.0 {
        assert!(!e.message.trim().is_empty(), "an empty message: {e:?}");
        assert!(e.line >= 1 && e.column >= 1, "a position before the start: {e:?}");
        assert!(e.line <= last_line, "line {} of {last_line}: {e:?}", e.line);
        assert!(!e.to_string().is_empty());
    }
}

/// The corpus directory of this crate.
fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/job_file")
}

/// Every seed document: file name and text, in name order.
fn seeds() -> &'static [(String, String)] {
    static SEEDS: OnceLock<Vec<(String, String)>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let dir = corpus_dir();
        let mut seeds: Vec<(String, String)> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .map(|entry| entry.expect("a corpus entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "json"))
            .map(|p| {
                let name = p.file_name().expect("a file name").to_string_lossy().into_owned();
                let text =
                    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
                (name, text)
            })
            .collect();
        seeds.sort();
        assert!(seeds.len() >= 5, "the corpus at {} lost its seeds", dir.display());
        seeds
    })
}

/// The file name `compile` is given: it picks the format.
fn file_name(seed: &str) -> &'static str {
    if seed.ends_with(".json") { "job.json" } else { "job.yaml" }
}

#[test]
fn corpus_seeds_compile_or_fail_cleanly() {
    for (name, text) in seeds() {
        let plan = check(text, file_name(name));
        // A `regression-` seed once crashed, hung or slipped through the compiler, and is
        // refused now; the other seeds are good job files.
        if name.starts_with("regression-") {
            assert!(plan.is_none(), "regression seed {name} compiled");
        } else {
            assert!(
                plan.is_some(),
                "seed {name} no longer compiles: {:?}",
                compile(text, file_name(name), &context())
            );
        }
    }
}

/// How a mutated tree is written out.
#[derive(Debug, Clone, Copy)]
enum Style {
    Block,
    Flow,
    Json,
}

fn write(doc: &Doc, style: Style) -> (String, &'static str) {
    match style {
        Style::Block => (doc.to_block(), "job.yaml"),
        Style::Flow => (doc.to_flow(), "job.yaml"),
        Style::Json => (doc.to_flow(), "job.json"),
    }
}

fn style() -> impl Strategy<Value = Style> {
    prop_oneof![Just(Style::Block), Just(Style::Flow), Just(Style::Json)]
}

/// An edit of a document's text.
#[derive(Debug, Clone)]
enum Edit {
    Insert(Index, String),
    Delete(Index, usize),
    DuplicateLine(Index),
    Indent(Index, usize),
    Dedent(Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    let insertion = prop_oneof![
        "[-:{}\\[\\],&*!|>'\"#%@` \n\ta-z0-9.]{1,8}",
        Just(": ".to_string()),
        Just("\n- ".to_string()),
        Just("&a ".to_string()),
        Just("*a".to_string()),
        Just("<<: *a\n".to_string()),
        Just("!!binary ".to_string()),
        Just("---\n".to_string()),
        Just("\u{feff}".to_string()),
    ];
    prop_oneof![
        3 => (any::<Index>(), insertion).prop_map(|(i, s)| Edit::Insert(i, s)),
        2 => (any::<Index>(), 1usize..20).prop_map(|(i, n)| Edit::Delete(i, n)),
        1 => any::<Index>().prop_map(Edit::DuplicateLine),
        1 => (any::<Index>(), 1usize..4).prop_map(|(i, n)| Edit::Indent(i, n)),
        1 => any::<Index>().prop_map(Edit::Dedent),
    ]
}

impl Edit {
    fn apply(&self, text: &str) -> String {
        let chars: Vec<char> = text.chars().collect();
        let mut lines: Vec<&str> = text.split('\n').collect();
        let line_count = lines.len();
        match self {
            Edit::Insert(i, s) => {
                let at = i.index(chars.len() + 1);
                chars[..at].iter().copied().chain(s.chars()).chain(chars[at..].iter().copied()).collect()
            }
            Edit::Delete(i, n) => {
                let at = i.index(chars.len() + 1);
                let end = (at + n).min(chars.len());
                chars[..at].iter().chain(&chars[end..]).collect()
            }
            Edit::DuplicateLine(i) => {
                let at = i.index(line_count);
                lines.insert(at, lines[at]);
                lines.join("\n")
            }
            Edit::Indent(i, n) => {
                let at = i.index(line_count);
                let indented = format!("{}{}", " ".repeat(*n), lines[at]);
                lines[at] = &indented;
                lines.join("\n")
            }
            Edit::Dedent(i) => {
                let at = i.index(line_count);
                lines[at] = lines[at].trim_start();
                lines.join("\n")
            }
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_fail_cleanly(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        json in any::<bool>(),
    ) {
        let text = String::from_utf8_lossy(&bytes);
        check(&text, if json { "job.json" } else { "job.yaml" });
    }

    #[test]
    fn arbitrary_text_fails_cleanly(
        text in prop_oneof![
            any::<String>(),
            "[-:{}\\[\\],&*!|>'\"#%@` \n\ta-z0-9.]{0,400}",
            "(version: 1\n|name: x\n|tasks:\n|  - |    |name: |command: |[ab]|\\{\\{ frame \\}\\}|\n){0,40}",
        ],
        json in any::<bool>(),
    ) {
        check(&text, if json { "job.json" } else { "job.yaml" });
    }

    #[test]
    fn mutated_seed_trees_compile_or_fail_cleanly(
        seed in any::<Index>(),
        mutations in proptest::collection::vec((any::<Index>(), doc::mutation()), 1..5),
        style in style(),
    ) {
        let (_, text) = seed.get(seeds());
        let root = tree::parse_yaml(text).expect("seeds parse");
        let mut doc = Doc::from_node(&root);
        for (at, mutation) in &mutations {
            doc.mutate(*at, mutation);
        }
        let (text, file) = write(&doc, style);
        check(&text, file);
    }

    #[test]
    fn edited_seed_texts_compile_or_fail_cleanly(
        seed in any::<Index>(),
        edits in proptest::collection::vec(edit(), 1..6),
    ) {
        let (name, text) = seed.get(seeds());
        let edited = edits.iter().fold(text.clone(), |text, e| e.apply(&text));
        check(&edited, file_name(name));
    }

    #[test]
    fn generated_jobs_compile_or_fail_cleanly(
        doc in prop_oneof![job_docs::clean_job(), job_docs::job()],
        style in style(),
    ) {
        let (text, file) = write(&doc, style);
        check(&text, file);
    }
}

/// A valid job whose only task's command is `command`.
fn job_with_command(command: &str) -> String {
    format!("version: 1\nname: j\ntasks:\n  - name: t\n    command: {}\n", serde_json::Value::from(command))
}

#[test]
fn pathological_nesting_is_refused() {
    let deep = 100_000;
    let documents = [
        format!("{}1{}", "[".repeat(deep), "]".repeat(deep)),
        format!("{}1{}", "{a: ".repeat(deep), "}".repeat(deep)),
        format!("{}1", "- ".repeat(deep)),
        "[".repeat(deep),
        "{".repeat(deep),
        format!("version: 1\nname: j\ntasks: {}", "[".repeat(deep)),
        (0..3_000).map(|d| format!("{}a:\n", " ".repeat(d))).collect(),
    ];
    for text in &documents {
        for file in ["job.yaml", "job.json"] {
            assert!(check(text, file).is_none(), "a document nested {deep} deep compiled");
        }
    }
}

#[test]
fn costly_templates_are_refused() {
    for template in [
        "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
        "{{ 'x' * 100000000 }}",
        "{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}",
    ] {
        assert!(check(&job_with_command(template), "job.yaml").is_none(), "{template} compiled");
    }
}
