//! A shared farm through the CLI: project settings and quotas from the config file and from
//! `drover projects set`, a quota holding and releasing tasks, cost in `drover usage`, and the
//! audit trail.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{Cluster, drover_bin, task};

const T: Duration = Duration::from_secs(60);

fn config(dir: &std::path::Path, text: &str) -> String {
    let path = dir.join("drover.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn settings_quotas_cost_and_audit_through_the_cli() {
    let scratch = tempfile::tempdir().unwrap();
    let file = config(
        scratch.path(),
        "version = 1\n[prices]\ncore_hour = 3600.0\n[projects.fx]\nimages = [\"registry.example.com/*\"]\n[projects.fx.quota]\ncores = 1\n",
    );
    let c = Cluster::start_with(1, 2, &["--config", &file], &[]);
    let show: Value = serde_json::from_str(&c.ok(&["projects", "show", "fx", "-o", "json"])).unwrap();
    assert_eq!(show["settings"]["quota"]["cores"], 1, "{show}");
    assert_eq!(show["settings"]["images"][0], "registry.example.com/*");

    let set = c.drover(&["projects", "set", "fx", "max_priority=5"]);
    assert!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
    let job_file = |priority: i32| {
        format!(
            "version: 1\nname: shot\nproject: fx\npriority: {priority}\ntasks:\n  - name: frame\n    array: \"1-2\"\n    command: \"sleep 1\"\n"
        )
    };
    let path = c.job_file("high.yaml", &job_file(6));
    let out = c.drover(&["submit", &path.display().to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("project setting `max_priority`"), "{err}");

    // Two frames, a quota of one core: one runs while the other waits, saying why.
    let job = c.submit(&job_file(1));
    c.wait_until(job, T, "one frame running and one held by the quota", |v| {
        let tasks = v["tasks"].as_array().unwrap();
        tasks.iter().any(|t| t["reason"] == "project quota: cores 1/1" && t["state"] == "queued")
            && tasks.iter().any(|t| t["state"] == "running" || t["state"] == "assigned")
    });
    let done = c.wait_done(job, T);
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(task(&done, "frame[2]")["state"], "succeeded");

    // Each frame ran about a second on one core at 1 per core-second.
    let usage: Value =
        serde_json::from_str(&c.ok(&["usage", "--job", &job.to_string(), "-o", "json"])).unwrap();
    let cost = usage["jobs"][0]["cost"].as_f64().unwrap();
    assert!((1.5..10.0).contains(&cost), "{usage}");
    assert_eq!(usage["tasks"].as_array().unwrap().len(), 2, "{usage}");

    let audit: Value = serde_json::from_str(&c.ok(&["audit", "-o", "json"])).unwrap();
    let actions: Vec<&str> = audit.as_array().unwrap().iter().filter_map(|e| e["action"].as_str()).collect();
    assert!(actions.contains(&"project.set") && actions.contains(&"job.submit"), "{actions:?}");

    // A bad setting in the config file names its key.
    let bad = config(scratch.path(), "[projects.fx.quota]\ncores = \"lots\"\n");
    let out = Command::new(drover_bin()).args(["config", "print", "--config", &bad]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("projects.fx.quota.cores"), "{err}");
}
