//! What must hold after a run, judged from evidence outside Drover's database where it can be:
//! the ledger the tasks wrote, the processes on this machine, the artifacts' bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::fleet::{Fleet, LEASE};

/// One invariant's verdict.
pub struct Verdict {
    /// What was checked.
    pub what: &'static str,
    /// What was found wrong; empty when it held.
    pub violations: Vec<String>,
    /// How much evidence it looked at.
    pub looked_at: String,
}

/// One ledger line: a task's attempt noting an event at a time.
#[derive(Debug, Clone)]
pub struct Note {
    task: i64,
    attempt: i64,
    event: String,
    ns: u128,
    pid: i32,
}

/// Reads the ledger; lines cut short (a task killed mid-write) are skipped.
pub fn read_ledger(text: &str) -> Vec<Note> {
    text.lines()
        .filter_map(|line| {
            let w: Vec<&str> = line.split_whitespace().collect();
            if w.len() != 5 {
                return None;
            }
            Some(Note {
                task: w[0].parse().ok()?,
                attempt: w[1].parse().ok()?,
                event: w[2].to_string(),
                ns: w[3].parse().ok()?,
                pid: w[4].parse().ok()?,
            })
        })
        .collect()
}

/// Every acknowledged job ended.
pub fn every_job_ended(statuses: &BTreeMap<i64, serde_json::Value>) -> Verdict {
    let violations = statuses
        .iter()
        .filter(|(_, s)| {
            !matches!(s["state"].as_str(), Some("succeeded" | "failed" | "cancelled" | "warning"))
        })
        .map(|(job, s)| format!("job {job} is {}", s["state"]))
        .collect();
    Verdict {
        what: "every acknowledged job ended",
        violations,
        looked_at: format!("{} jobs", statuses.len()),
    }
}

/// Each task has exactly one final outcome: its job's event stream ends it once.
pub fn one_final_outcome_per_task(fleet: &Fleet, statuses: &BTreeMap<i64, serde_json::Value>) -> Verdict {
    let mut violations = Vec::new();
    let mut tasks = 0;
    for (job, status) in statuses {
        // `watch` exits with the job's outcome: a failed job's events come with a failure.
        let events = String::from_utf8_lossy(&fleet.drover(&["watch", &job.to_string()]).stdout).into_owned();
        let mut finals: BTreeMap<String, usize> = BTreeMap::new();
        for line in events.lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            // `TIME NAME STATE[: message]`, with more after the state at times.
            if w.len() >= 3
                && w[1] != "job"
                && matches!(
                    w[2].trim_end_matches(':'),
                    "succeeded" | "failed" | "cancelled" | "skipped" | "warning"
                )
            {
                *finals.entry(w[1].to_string()).or_default() += 1;
            }
        }
        for t in status["tasks"].as_array().into_iter().flatten() {
            tasks += 1;
            let name = match t["frame"].as_i64() {
                Some(f) => format!("{}[{f}]", t["name"].as_str().unwrap_or_default()),
                None => t["name"].as_str().unwrap_or_default().to_string(),
            };
            match finals.get(&name).copied().unwrap_or(0) {
                1 => {}
                n => violations.push(format!("job {job} task {name}: {n} final outcomes")),
            }
        }
    }
    Verdict {
        what: "every task has exactly one final outcome",
        violations,
        looked_at: format!("{tasks} tasks"),
    }
}

/// No attempt ran after it was handed on: for each task, every line of an attempt comes
/// before the first line of the task's next attempt. And nothing of the cancelled job ran
/// longer after the cancel than a lease and a kill grace (a cancel that found its node cut
/// off waits for the lease to stop the attempt).
pub fn no_attempt_ran_after_fencing_or_cancel(
    notes: &[Note],
    cancelled_tasks: &BTreeSet<i64>,
    cancelled_at_ns: Option<u128>,
) -> Verdict {
    let mut by_task: BTreeMap<i64, BTreeMap<i64, (u128, u128)>> = BTreeMap::new();
    for n in notes {
        let span = by_task.entry(n.task).or_default().entry(n.attempt).or_insert((n.ns, n.ns));
        span.0 = span.0.min(n.ns);
        span.1 = span.1.max(n.ns);
    }
    let mut violations = Vec::new();
    for (task, attempts) in &by_task {
        let spans: Vec<(&i64, &(u128, u128))> = attempts.iter().collect();
        for pair in spans.windows(2) {
            let ((earlier, (_, last)), (later, (first, _))) = (pair[0], pair[1]);
            if last > first {
                violations.push(format!(
                    "task {task}: attempt {earlier} ran {} ms after attempt {later} began",
                    (last - first) / 1_000_000
                ));
            }
        }
    }
    let bound = (LEASE + Duration::from_secs(1) + SLACK).as_nanos();
    if let Some(at) = cancelled_at_ns {
        for n in notes.iter().filter(|n| cancelled_tasks.contains(&n.task)) {
            if n.ns > at + bound {
                violations.push(format!(
                    "task {} attempt {} noted `{}` {} ms after the cancel",
                    n.task,
                    n.attempt,
                    n.event,
                    (n.ns - at) / 1_000_000
                ));
            }
        }
    }
    Verdict {
        what: "no attempt ran after its fencing or its cancel",
        violations,
        looked_at: format!("{} ledger lines of {} tasks", notes.len(), by_task.len()),
    }
}

/// Delivery and scheduling slack on top of the lease and the kill grace.
const SLACK: Duration = Duration::from_secs(3);

/// Every task of `job` that succeeded kept its output in its last attempt, and every kept
/// output downloads and matches its digest.
pub fn artifacts_match_their_digests(fleet: &Fleet, job: i64, status: &serde_json::Value) -> Verdict {
    let listing = fleet.ok(&["artifacts", "ls", &job.to_string(), "-o", "json"]);
    let listing: serde_json::Value = serde_json::from_str(&listing).unwrap_or_default();
    let mut violations = Vec::new();
    let entries = listing.as_array().cloned().unwrap_or_default();
    // By task and attempt: an attempt that kept its outputs and was then lost keeps them too.
    let mut kept: BTreeMap<(String, i64), usize> = BTreeMap::new();
    for a in &entries {
        let task = match a["frame"].as_i64() {
            Some(f) => format!("{}[{f}]", a["task"].as_str().unwrap_or_default()),
            None => a["task"].as_str().unwrap_or_default().to_string(),
        };
        *kept.entry((task.clone(), a["attempt"].as_i64().unwrap_or(0))).or_default() += 1;
        let path = a["path"].as_str().unwrap_or_default();
        let digest = a["digest"].as_str().unwrap_or_default().trim_start_matches("sha256:").to_string();
        let got = fleet.drover(&["artifacts", "get", &job.to_string(), &task, path, "-o", "-"]);
        if !got.status.success() {
            violations.push(format!("{task} {path}: {}", String::from_utf8_lossy(&got.stderr).trim()));
            continue;
        }
        let actual = hex::encode(Sha256::digest(&got.stdout));
        if actual != digest {
            violations.push(format!("{task} {path}: digest {digest}, bytes {actual}"));
        }
        if !String::from_utf8_lossy(&got.stdout).starts_with("kept by task ") {
            violations.push(format!("{task} {path}: unexpected content"));
        }
    }
    for t in status["tasks"].as_array().into_iter().flatten().filter(|t| t["state"] == "succeeded") {
        let name = format!("{}[{}]", t["name"].as_str().unwrap_or_default(), t["frame"]);
        let last = t["attempts"].as_i64().unwrap_or(0);
        let n = kept.get(&(name.clone(), last)).copied().unwrap_or(0);
        if n != 1 {
            let reason = t["reason"].as_str().unwrap_or_default();
            violations.push(format!(
                "{name} succeeded and its attempt {last} kept {n} outputs, not 1 ({reason:?})"
            ));
        }
    }
    Verdict {
        what: "every succeeded task kept its output; every output downloads and matches its digest",
        violations,
        looked_at: format!("{} artifacts", entries.len()),
    }
}

/// No task process is left once the agents stopped.
pub fn nothing_left_running(notes: &[Note]) -> Verdict {
    let pids: BTreeSet<i32> = notes.iter().map(|n| n.pid).collect();
    let violations = pids
        .iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.contains("note"))
                || std::fs::read_to_string(format!("/proc/{pid}/environ"))
                    .is_ok_and(|e| e.contains("DROVER_ATTEMPT_ID"))
        })
        .map(|pid| format!("task process {pid} still runs"))
        .collect();
    Verdict {
        what: "no task process is left",
        violations,
        looked_at: format!("{} task processes", pids.len()),
    }
}
