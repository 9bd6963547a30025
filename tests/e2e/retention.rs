//! Retention end to end: a job past its project's retention disappears with the blobs only it
//! used, while a blob a job of another project still points to stays downloadable.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::Cluster;

const T: Duration = Duration::from_secs(90);

/// A job of `project` keeping two outputs: one only it writes, one `kept` shares.
fn job(project: &str, own: &str) -> String {
    format!(
        r#"
version: 1
name: keep-{project}
project: {project}
tasks:
  - name: make
    outputs: ["out/*.txt"]
    command: "mkdir -p out && echo '{own}' > out/own.txt && echo 'written by both jobs' > out/shared.txt"
"#
    )
}

/// The digest of each output of `job`, by path.
fn digests(c: &Cluster, job: i64) -> Vec<(String, String)> {
    let ls: Value =
        serde_json::from_str(&c.ok(&["artifacts", "ls", &job.to_string(), "-o", "json"])).unwrap();
    ls.as_array()
        .unwrap()
        .iter()
        .map(|a| (a["path"].as_str().unwrap().to_owned(), a["digest"].as_str().unwrap().to_owned()))
        .collect()
}

fn digest_of<'a>(list: &'a [(String, String)], path: &str) -> &'a str {
    &list.iter().find(|(p, _)| p == path).unwrap_or_else(|| panic!("no output {path}: {list:?}")).1
}

#[test]
fn a_job_past_retention_goes_with_the_blobs_only_it_used() {
    let c = Cluster::start_with(1, 2, &["--blob-grace", "1s"], &[]);
    c.ok(&["projects", "create", "keep"]);
    let bad = c.drover(&["projects", "set", "default", "retention=thirty days"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("write a duration like 30days"), "{err}");
    c.ok(&["projects", "set", "default", "retention=3s"]);

    // The job of `keep` (30 days, the server's default) ends first, so the shared output is
    // referenced by it all along.
    let kept = c.submit(&job("keep", "output of the kept job"));
    let done = c.wait_done(kept, T);
    assert_eq!(done["state"], "succeeded", "{done:#}");
    let old = c.submit(&job("default", "output of the old job"));
    assert_eq!(c.wait_done(old, T)["state"], "succeeded");
    let old_outputs = digests(&c, old);
    let own = digest_of(&old_outputs, "out/own.txt").to_owned();
    let shared = digest_of(&old_outputs, "out/shared.txt").to_owned();
    assert_eq!(shared, digest_of(&digests(&c, kept), "out/shared.txt"), "identical bytes, one blob");
    let blob = |digest: &str| {
        let hex = digest.trim_start_matches("sha256:");
        c.path(&format!("server-data/blobs/sha256/{}/{}", &hex[..2], &hex[2..]))
    };
    assert!(blob(&own).exists() && blob(&shared).exists());

    let start = Instant::now();
    loop {
        let out = c.drover(&["status", &old.to_string()]);
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("not found"), "{err}");
            break;
        }
        assert!(start.elapsed() < T, "the old job was never deleted");
        std::thread::sleep(Duration::from_millis(250));
    }
    let start = Instant::now();
    while blob(&own).exists() {
        assert!(start.elapsed() < T, "the old job's own output was never deleted");
        std::thread::sleep(Duration::from_millis(250));
    }

    assert!(blob(&shared).exists(), "still an output of the kept job");
    assert_eq!(c.status(kept)["state"], "succeeded");
    let got = c.ok(&["artifacts", "get", &kept.to_string(), "make", "out/shared.txt", "-o", "-"]);
    assert_eq!(got, "written by both jobs\n");
}
