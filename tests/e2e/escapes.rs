//! Inputs that try to write outside the workspace through a symbolic link an earlier input
//! placed there: the attempt fails with a reason that names the link, and nothing appears
//! outside.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::harness::{Cluster, task};

const T: Duration = Duration::from_secs(90);

/// A directory outside the cluster's scratch space (where a followed link would write),
/// removed when dropped.
struct Outside(PathBuf);

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn an_input_written_through_a_link_from_an_earlier_input_is_refused() {
    let c = Cluster::start(1, 2);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    let outside = Outside(std::env::temp_dir().join(format!("drover-escape-{}-{nanos}", std::process::id())));
    std::fs::create_dir_all(&outside.0).unwrap();
    // A directory input whose archive carries `link -> <outside>`, then a file input placed at
    // (or below) that link.
    std::fs::create_dir_all(c.path("dir")).unwrap();
    std::fs::write(c.path("dir/readme.txt"), "fine\n").unwrap();
    std::os::unix::fs::symlink(&outside.0, c.path("dir/link")).unwrap();
    std::fs::write(c.path("payload.txt"), "written through the link\n").unwrap();
    let job = c.submit(
        r#"
version: 1
name: escapes
tasks:
  - name: through
    inputs:
      - { path: dir, to: data }
      - { path: payload.txt, to: data/link/x }
    command: "echo ran"
  - name: onto
    inputs:
      - { path: dir, to: data }
      - { path: payload.txt, to: data/link }
    command: "echo ran"
"#,
    );
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "failed", "{status:#}");
    for (name, to) in [("through", "data/link/x"), ("onto", "data/link")] {
        let t = task(&status, name);
        assert_eq!(t["state"], "failed", "{status:#}");
        let reason = t["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains(&format!("input `{to}`")) && reason.contains("symbolic link"),
            "{name}: {reason}"
        );
        let logs = c.drover(&["logs", &job.to_string(), name]);
        let logs = String::from_utf8_lossy(&logs.stdout);
        assert!(!logs.contains("ran"), "{name} ran: {logs}");
    }
    let leaked: Vec<_> = std::fs::read_dir(&outside.0).unwrap().flatten().map(|e| e.path()).collect();
    assert!(leaked.is_empty(), "written outside the workspace: {leaked:?}");
}
