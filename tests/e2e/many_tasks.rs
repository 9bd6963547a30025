//! Many short tasks through real processes: a 20,000-task array and a 20,000-task dependency
//! chain run on a real agent, and every task is recorded exactly once: one attempt each, every
//! task succeeded, and the chain's tasks ran strictly one after the other. The tasks are
//! `true`, so what is exercised is Drover's own path (queue, placement, assignment, start,
//! finish, release of the next task), not the work.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::Cluster;

/// Tasks in each job.
const N: usize = 20_000;

/// Long enough for the chain in a debug build on a 2-core machine that runs the rest of the
/// suite beside it (about 520 s there, 16 ms a link; 7 ms in a release build when idle); a
/// hang still ends.
const T: Duration = Duration::from_secs(1200);

/// `drover watch` until the job ends; panics with its output if it did not succeed in time.
fn watch(c: &Cluster, job: i64) {
    let mut cmd = c.command(&["watch", &job.to_string()]);
    cmd.stdout(std::process::Stdio::null());
    let mut child = cmd.spawn().expect("start drover watch");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for drover watch") {
            assert!(status.success(), "job {job} did not succeed: {}", c.ok(&["status", &job.to_string()]));
            return;
        }
        if start.elapsed() > T {
            let _ = child.kill();
            panic!("job {job} did not end within {T:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Checks that each of the job's `N` tasks succeeded on its one and only attempt, and returns
/// the tasks.
fn every_task_once(c: &Cluster, job: i64) -> Vec<Value> {
    let status = c.status(job);
    assert_eq!(status["state"], "succeeded");
    let tasks = status["tasks"].as_array().expect("tasks").clone();
    assert_eq!(tasks.len(), N);
    let mut ids: Vec<i64> = tasks.iter().map(|t| t["id"].as_i64().expect("task id")).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), N, "task ids repeat");
    for t in &tasks {
        assert_eq!(
            (t["state"].as_str(), t["attempts"].as_i64(), t["exit_code"].as_i64()),
            (Some("succeeded"), Some(1), Some(0)),
            "{t}"
        );
    }
    tasks
}

#[test]
fn an_array_of_20000_tasks_runs_and_records_every_task_once() {
    let c = Cluster::start(1, 4);
    let start = Instant::now();
    let job = c.submit(&format!(
        "version: 1\nname: many\ntasks:\n  - name: t\n    array: 1-{N}\n    command: [\"true\"]\n"
    ));
    watch(&c, job);
    eprintln!("{N} tasks in {:?}", start.elapsed());
    let tasks = every_task_once(&c, job);
    let mut frames: Vec<i64> = tasks.iter().map(|t| t["frame"].as_i64().expect("frame")).collect();
    frames.sort_unstable();
    assert_eq!(frames, (1..=N as i64).collect::<Vec<_>>());
}

#[test]
fn a_chain_of_20000_tasks_runs_to_the_end_one_after_the_other() {
    let c = Cluster::start(1, 4);
    let tasks: Vec<String> = (0..N)
        .map(|i| match i {
            0 => r#"{"name": "t0", "command": ["true"]}"#.to_string(),
            _ => format!(r#"{{"name": "t{i}", "command": ["true"], "depends_on": ["t{}"]}}"#, i - 1),
        })
        .collect();
    let file = c.job_file(
        "chain.json",
        &format!("{{\"version\": 1, \"name\": \"chain\", \"tasks\": [\n{}\n]}}\n", tasks.join(",\n")),
    );
    let start = Instant::now();
    let out = c.ok(&["submit", "-o", "json", &file.display().to_string()]);
    let job = serde_json::from_str::<Value>(&out).expect("submit -o json")["id"].as_i64().expect("job id");
    watch(&c, job);
    eprintln!("a chain of {N} tasks in {:?}", start.elapsed());
    every_task_once(&c, job);
    // One after the other: replayed from the start, the job's events assign t0, see it
    // succeed, assign t1, and so on; never two at once.
    let events = c.ok(&["watch", &job.to_string()]);
    let steps: Vec<(&str, &str)> = events
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace().skip(1);
            let (name, state) = (words.next()?, words.next()?);
            (name != "job" && matches!(state, "assigned" | "succeeded")).then_some((name, state))
        })
        .collect();
    assert_eq!(steps.len(), 2 * N, "{} assignments and successes", steps.len());
    for (i, pair) in steps.chunks(2).enumerate() {
        let name = format!("t{i}");
        assert_eq!(pair, [(name.as_str(), "assigned"), (name.as_str(), "succeeded")], "step {i}");
    }
}
