//! Large jobs: a generated chain of 20,000 listed tasks and an array of 100,000 frames are
//! accepted whole (the plan travels compressed, past gRPC's default 4 MiB message limit), and
//! a job over a limit is refused with the limit in the message. No agents run, so every task
//! stays where the submit put it.

use std::time::Instant;

use serde_json::Value;

use crate::harness::Cluster;

/// A JSON job file of `n` listed tasks, each depending on the one before: `t0 <- t1 <- ...`.
fn chain(n: usize) -> String {
    let tasks: Vec<String> = (0..n)
        .map(|i| match i {
            0 => r#"{"name": "t0", "command": "echo 0"}"#.to_string(),
            _ => format!(r#"{{"name": "t{i}", "command": "echo {i}", "depends_on": ["t{}"]}}"#, i - 1),
        })
        .collect();
    format!("{{\"version\": 1, \"name\": \"chain\", \"tasks\": [\n{}\n]}}\n", tasks.join(",\n"))
}

/// `submit -o json` of a job file; returns the job id and the task count the CLI reports.
fn submit(c: &Cluster, file: &std::path::Path) -> (i64, u64) {
    let out = c.ok(&["submit", "-o", "json", &file.display().to_string()]);
    let v: Value = serde_json::from_str(&out).expect("submit -o json");
    (v["id"].as_i64().expect("job id"), v["tasks"].as_u64().expect("task count"))
}

/// How many of the job's tasks are in `state`.
fn count(status: &Value, state: &str) -> usize {
    status["tasks"].as_array().expect("tasks").iter().filter(|t| t["state"] == state).count()
}

#[test]
fn a_chain_of_20000_listed_tasks_is_accepted() {
    let c = Cluster::start(0, 1);
    let file = c.job_file("chain.json", &chain(20_000));
    let start = Instant::now();
    let (job, tasks) = submit(&c, &file);
    let submitted = start.elapsed();
    assert_eq!(tasks, 20_000);
    let status = c.status(job);
    eprintln!("20,000-task chain: submit {submitted:?}, submit and status {:?}", start.elapsed());
    assert_eq!(status["tasks"].as_array().map(Vec::len), Some(20_000));
    let first = status["tasks"].as_array().unwrap().iter().find(|t| t["name"] == "t0").expect("t0");
    assert_eq!(first["state"], "queued", "{first}");
    assert_eq!(count(&status, "waiting"), 19_999);
}

#[test]
fn an_array_of_100000_frames_is_accepted() {
    let c = Cluster::start(0, 1);
    let start = Instant::now();
    let job = c.submit(
        "version: 1\nname: frames\ntasks:\n  - name: render\n    array: 1-100000\n    command: echo {{ frame }}\n",
    );
    let submitted = start.elapsed();
    let status = c.status(job);
    eprintln!("100,000-frame array: submit {submitted:?}, submit and status {:?}", start.elapsed());
    assert_eq!(status["tasks"].as_array().map(Vec::len), Some(100_000));
    assert_eq!(count(&status, "queued"), 100_000);
    let last = &status["tasks"][99_999];
    assert_eq!((&last["name"], &last["frame"]), (&Value::from("render"), &Value::from(100_000)));
}

#[test]
fn a_job_over_a_limit_is_refused_with_the_limit() {
    let c = Cluster::start(0, 1);
    let cases = [
        (
            "frames.yaml",
            "version: 1\nname: big\ntasks:\n  - name: r\n    array: 1-1000000\n    command: \"true\"\n"
                .to_string(),
            "frame range `1-1000000` has more than 100000 frames",
        ),
        (
            "tasks.yaml",
            format!(
                "version: 1\nname: big\ntasks:\n{}",
                ["a", "b", "c"]
                    .map(|n| format!("  - name: {n}\n    array: 0-99999\n    command: \"true\"\n"))
                    .concat()
            ),
            "the job expands to more than 200000 tasks",
        ),
    ];
    for (name, text, message) in cases {
        let file = c.job_file(name, &text);
        let start = Instant::now();
        let out = c.drover(&["submit", &file.display().to_string()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("{name}: refused in {:?}", start.elapsed());
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(message), "{stderr}");
        assert!(stderr.contains("nothing was submitted"), "{stderr}");
    }
    let jobs: Value = serde_json::from_str(&c.ok(&["ps", "-a", "-o", "json"])).expect("ps -o json");
    assert_eq!(jobs.as_array().map(Vec::len), Some(0), "{jobs}");
}
