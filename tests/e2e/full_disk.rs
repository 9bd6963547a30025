//! A full disk, on small tmpfs filesystems of the test's own: the server refuses new submits
//! and uploads with a clear error and keeps running what it accepted; an agent whose work dir
//! fills up takes no new work until space returns.

use std::time::{Duration, Instant};

use crate::harness::{Cluster, Tmpfs, fill, task};

const T: Duration = Duration::from_secs(90);

fn stderr_of(c: &Cluster, args: &[&str]) -> String {
    let out = c.drover(args);
    assert!(!out.status.success(), "drover {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_full_server_disk_refuses_submits_and_uploads_and_keeps_what_it_accepted() {
    let mut data = None;
    let c = Cluster::start_prepared(1, 2, &["--min-free", "24MiB"], |dir| {
        data = Some(Tmpfs::mount(&dir.join("server-data"), 64, "0700"));
    });
    let accepted = c.submit(
        r#"
version: 1
name: accepted
tasks:
  - name: wait
    command: "while [ ! -e {{ params.dir }}/go ]; do sleep 0.05; done; echo done"
"#,
    );
    c.wait_until(accepted, T, "the accepted task to run", |v| task(v, "wait")["state"] == "running");

    let filler = fill(&c.path("server-data"), 12 << 20);
    let job = c.job_file(
        "later.yaml",
        "version: 1\nname: later\ntasks:\n  - name: t\n    command: \"echo later\"\n",
    );
    let refused = stderr_of(&c, &["submit", &job.display().to_string()]);
    assert!(refused.contains("disk is full") && refused.contains("a submit is refused"), "{refused}");
    // A job with a local input uploads it first: refused too, with the same reason.
    std::fs::write(c.path("input.txt"), "some input").unwrap();
    let with_input = c.job_file(
        "input.yaml",
        "version: 1\nname: input\ntasks:\n  - name: t\n    inputs:\n      - { path: input.txt, to: input.txt }\n    command: \"cat input.txt\"\n",
    );
    let refused = stderr_of(&c, &["submit", &with_input.display().to_string()]);
    assert!(refused.contains("disk is full"), "{refused}");

    // What the server accepted runs to its end, its output kept.
    std::fs::write(c.path("go"), "").unwrap();
    let status = c.wait_done(accepted, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    assert!(c.ok(&["logs", &accepted.to_string()]).ends_with("done\n"));

    // Space returns: submits are taken again.
    std::fs::remove_file(filler).unwrap();
    let later = c.submit("version: 1\nname: later\ntasks:\n  - name: t\n    command: \"echo later\"\n");
    assert_eq!(c.wait_done(later, T)["state"], "succeeded");
    drop(data);
}

#[test]
fn an_agent_whose_work_dir_fills_up_takes_no_new_work_until_space_returns() {
    let mut c = Cluster::start_with(0, 1, &[], &[]);
    let work = c.path("agent-0-work");
    let _disk = Tmpfs::mount(&work, 64, "0755");
    c.add_agent_with(1, &["--work-dir-min-free", "24MiB"], &[]);
    c.wait_for_nodes(1);

    let filler = fill(&work, 12 << 20);
    let start = Instant::now();
    while !c.server_log().contains("node takes no new work") {
        assert!(start.elapsed() < T, "the server never heard that the node is full");
        std::thread::sleep(Duration::from_millis(50));
    }
    let agent_log = std::fs::read_to_string(c.path("agent-0.log")).unwrap();
    assert!(agent_log.contains("taking no new work") && agent_log.contains("disk is full"), "{agent_log}");
    let job = c.submit("version: 1\nname: waits\ntasks:\n  - name: t\n    command: \"echo ran\"\n");
    // Several heartbeats and scheduling rounds go by: nothing is placed on the full node.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(task(&c.status(job), "t")["state"], "queued");

    std::fs::remove_file(filler).unwrap();
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    assert!(c.server_log().contains("node takes work again"));
}
