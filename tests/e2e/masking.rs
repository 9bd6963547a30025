//! Secrets stay out of logs in the forms a task prints them in by accident: a multi-line value
//! whole, line by line, across a pause, base64-encoded and URL-encoded.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::harness::{Cluster, task};

const T: Duration = Duration::from_secs(60);

/// Long enough that `base64` wraps it; with characters that base64 and URL encoding change.
const VALUE: &str = "e2e-first-Qx7/line\nsecond line+with=chars &more\nthird-Zz9-last";

/// Prints the secret whole, line by line, in two halves with a pause between (so the value
/// arrives in separate output chunks), base64-encoded (wrapped by `base64`), and URL-encoded.
const JOB: &str = r#"
version: 1
name: masking
tasks:
  - name: leaky
    secrets: [MULTI]
    command: |
      printf 'whole: %s :end\n' "$MULTI"
      printf '%s\n' "$MULTI" | while IFS= read -r l; do printf 'line: %s\n' "$l"; done
      head="${MULTI%???}"
      printf 'halves: %s' "$head"; sleep 0.3; printf '%s :end\n' "${MULTI#"$head"}"
      printf 'b64: '; printf '%s' "$MULTI" | base64
      s="$MULTI"; url=""
      while [ -n "$s" ]; do
        rest="${s#?}"; c="${s%"$rest"}"; s="$rest"
        case "$c" in
          [A-Za-z0-9._~-]) url="$url$c" ;;
          *) url="$url$(printf '%%%02X' "'$c")" ;;
        esac
      done
      printf 'url: %s\n' "$url"
      echo done
"#;

#[test]
fn a_multi_line_secret_is_masked_whole_by_line_split_and_encoded() {
    let c = Cluster::start(1, 1);
    c.set_secret("MULTI", VALUE);
    let job = c.submit(JOB);
    let status = c.wait_done(job, T);
    assert_eq!(task(&status, "leaky")["state"], "succeeded", "{status:#}");
    let logs = c.ok(&["logs", &job.to_string(), "leaky"]);
    assert_eq!(
        logs,
        "whole: *** :end\nline: ***\nline: ***\nline: ***\nhalves: *** :end\nb64: ***\nurl: ***\ndone\n"
    );
    let encoded = STANDARD.encode(VALUE);
    assert!(encoded.len() > 76, "the base64 form is wrapped");
    for leak in VALUE.lines().chain([&encoded[..40], &encoded[76..], "Qx7%2Fline%0Asecond"]) {
        assert!(!logs.contains(leak), "{leak} in {logs}");
    }
}

#[test]
fn a_secret_stays_masked_after_an_agent_restart_and_the_next_step_still_gets_it() {
    const SECRET: &str = "e2e-restart-Zq42-secret";
    let mut c = Cluster::start(1, 1);
    c.set_secret("TOKEN", SECRET);
    let job = c.submit(
        r#"
version: 1
name: restarted-secret
tasks:
  - name: work
    secrets: [TOKEN]
    steps:
      - |
        echo "before: $TOKEN"
        while [ ! -e {{ params.dir }}/go ]; do sleep 0.05; done
        echo "after: $TOKEN"
      - 'echo "next: $TOKEN"'
"#,
    );
    let start = std::time::Instant::now();
    while !c.ok(&["logs", &job.to_string()]).contains("before: ***") {
        assert!(start.elapsed() < T, "the first line never arrived");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The restarted agent's journal holds the secret's name only: its value comes again from
    // the server, before the step's output flows on.
    c.kill_and_reattach(0, 1, 1);
    std::fs::write(c.path("go"), "").unwrap();
    let status = c.wait_done(job, T);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    assert_eq!(task(&status, "work")["attempts"], 1, "re-attached, not retried: {status:#}");
    let logs = c.ok(&["logs", &job.to_string(), "work"]);
    assert_eq!(logs, "before: ***\nafter: ***\nnext: ***\n");
    let agent_log = std::fs::read_to_string(c.path("agent-0.log")).unwrap();
    assert!(!agent_log.contains(SECRET), "the agent's log holds the secret");
}
