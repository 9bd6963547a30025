//! How jobs, tasks, events and nodes look in the terminal and in `-o json`.

use comfy_table::presets::UTF8_BORDERS_ONLY;
use comfy_table::{ContentArrangement, Table};
use drover_core::resources::format_memory;
use drover_proto as pb;
use serde_json::{Value, json};

/// `HH:MM:SS` (UTC) of a Unix time in milliseconds.
pub fn clock(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let secs = ms / 1000;
    format!("{:02}:{:02}:{:02}", (secs / 3600) % 24, (secs / 60) % 60, secs % 60)
}

/// A Unix time in milliseconds as an RFC 3339 UTC timestamp, `-` for none.
pub fn time(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64);
    humantime::format_rfc3339_seconds(at).to_string()
}

fn task_name(name: &str, frame: Option<i64>) -> String {
    match frame {
        Some(f) => format!("{name}[{f}]"),
        None => name.to_string(),
    }
}

/// A table with Drover's look and the given header.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_content_arrangement(ContentArrangement::Dynamic).set_header(header);
    t
}

/// One line per event for `watch`.
pub fn event_line(e: &pb::Event) -> String {
    let mut line = if e.kind == "job" {
        format!("{}  job {} {}", clock(e.time_ms), e.job_id, e.state)
    } else {
        format!("{}  {:<16} {}", clock(e.time_ms), task_name(&e.task_name, e.frame), e.state)
    };
    if !e.node.is_empty() {
        line.push_str(&format!(" on {}", e.node));
    }
    if e.attempt > 1 {
        line.push_str(&format!(" (attempt {})", e.attempt));
    }
    if let Some(code) = e.exit_code {
        line.push_str(&format!(" exit {code}"));
    }
    if !e.message.is_empty() {
        line.push_str(&format!(": {}", e.message));
    }
    line
}

/// The `ps` table.
pub fn jobs_table(jobs: &[pb::JobSummary]) -> Table {
    let mut t = table(&["ID", "NAME", "PROJECT", "STATE", "DONE", "RUNNING", "FAILED", "SUBMITTED"]);
    for j in jobs {
        t.add_row(vec![
            j.id.to_string(),
            j.name.clone(),
            j.project.clone(),
            j.state.clone(),
            format!("{}/{}", j.done, j.total),
            j.running.to_string(),
            j.failed.to_string(),
            clock(j.created_ms),
        ]);
    }
    t
}

/// `ps -o json`.
pub fn jobs_json(jobs: &[pb::JobSummary]) -> Value {
    Value::Array(
        jobs.iter()
            .map(|j| {
                json!({"id": j.id, "name": j.name, "project": j.project, "state": j.state, "created_ms": j.created_ms,
                       "tasks": j.total, "done": j.done, "running": j.running, "failed": j.failed})
            })
            .collect(),
    )
}

/// `status` for people: a header and a task table.
pub fn job_detail(job: &pb::Job, all: bool) -> String {
    let mut t = table(&["TASK", "STATE", "EXIT", "ATTEMPTS", "NODE", "CPU s", "PEAK MEM", "REASON"]);
    let (shown, left_out) = tasks_to_show(&job.tasks, all);
    for task in shown {
        t.add_row(vec![
            task_name(&task.name, task.frame),
            task.state.clone(),
            task.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
            task.attempts.to_string(),
            if task.node.is_empty() { "-".into() } else { task.node.clone() },
            if task.attempts > 0 { format!("{:.2}", task.cpu_seconds) } else { "-".into() },
            if task.peak_memory_bytes > 0 { format_memory(task.peak_memory_bytes) } else { "-".into() },
            task.reason.clone(),
        ]);
    }
    let mut out = format!(
        "job {} `{}` (project {}, priority {}): {}\n{}\n{}",
        job.id,
        job.name,
        job.project,
        job.priority,
        job.state,
        state_counts(&job.tasks),
        t
    );
    if left_out > 0 {
        out.push_str(&format!("\n… and {left_out} more succeeded tasks (`--all` lists every task)"));
    }
    out
}

/// Tasks listed at most in a job's table unless every task is asked for.
const TASKS_SHOWN: usize = 50;

/// The tasks a job's table lists, in order, and how many it leaves out: every task of a small
/// job; of a large one, those that did not succeed first (what needs a look), then succeeded
/// ones up to [`TASKS_SHOWN`].
fn tasks_to_show(tasks: &[pb::Task], all: bool) -> (Vec<&pb::Task>, usize) {
    if all || tasks.len() <= TASKS_SHOWN {
        return (tasks.iter().collect(), 0);
    }
    let mut shown: Vec<&pb::Task> = tasks.iter().filter(|t| t.state != "succeeded").collect();
    let room = TASKS_SHOWN.saturating_sub(shown.len());
    shown.extend(tasks.iter().filter(|t| t.state == "succeeded").take(room));
    let left_out = tasks.len() - shown.len();
    // In the job's own order, however they were picked.
    shown.sort_by_key(|t| t.id);
    (shown, left_out)
}

/// `tasks: 3 succeeded, 1 running`: how many tasks are in each state.
fn state_counts(tasks: &[pb::Task]) -> String {
    let mut counts: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for t in tasks {
        *counts.entry(t.state.as_str()).or_default() += 1;
    }
    let parts: Vec<String> = counts.iter().map(|(state, n)| format!("{n} {state}")).collect();
    format!("tasks: {}", if parts.is_empty() { "none".into() } else { parts.join(", ") })
}

/// A task's failure class as the word scripts match, `None` while none failed. A class this
/// client does not know (a newer server's) shows as `unknown`, never as no failure.
fn failure_word(field: i32) -> Option<&'static str> {
    match pb::FailureClass::decode(field) {
        Ok(class) => class.map(|c| c.as_str()),
        Err(_) => Some("unknown"),
    }
}

/// `status -o json`.
pub fn job_json(job: &pb::Job) -> Value {
    let tasks: Vec<Value> = job
        .tasks
        .iter()
        .map(|t| {
            json!({"id": t.id, "name": t.name, "frame": t.frame, "state": t.state, "exit_code": t.exit_code,
                   "attempts": t.attempts, "node": (!t.node.is_empty()).then_some(&t.node), "reason": t.reason,
                   "failure": failure_word(t.failure), "cpu_seconds": t.cpu_seconds,
                   "peak_memory_bytes": t.peak_memory_bytes})
        })
        .collect();
    json!({"id": job.id, "name": job.name, "project": job.project, "priority": job.priority, "state": job.state,
           "cancelled": job.cancelled, "created_ms": job.created_ms, "last_seq": job.last_seq, "tasks": tasks})
}

/// The `nodes` table.
pub fn nodes_table(nodes: &[pb::Node]) -> Table {
    let mut t = table(&[
        "ID",
        "NAME",
        "STATE",
        "CORES FREE",
        "MEMORY FREE",
        "RUNNING",
        "LABELS",
        "WARM VMS",
        "LAST SEEN",
    ]);
    for n in nodes {
        let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut warm: Vec<String> =
            n.warm.iter().map(|(image, count)| format!("{}={count}", short_image(image))).collect();
        warm.sort();
        t.add_row(vec![
            n.id.to_string(),
            n.name.clone(),
            n.state.clone(),
            format!("{}/{}", n.cores_free, n.cores),
            format!("{}/{}", format_memory(n.memory_free), format_memory(n.memory)),
            n.running.to_string(),
            labels.join(","),
            warm.join(","),
            clock(n.last_seen_ms),
        ]);
    }
    t
}

/// An image id shortened the way Docker shows it (`sha256:` and 12 hex digits); names as is.
fn short_image(image: &str) -> &str {
    match image.strip_prefix("sha256:") {
        Some(hex) => &hex[..hex.len().min(12)],
        None => image,
    }
}

/// `nodes -o json`.
pub fn nodes_json(nodes: &[pb::Node]) -> Value {
    Value::Array(
        nodes
            .iter()
            .map(|n| {
                json!({"id": n.id, "name": n.name, "state": n.state, "labels": n.labels, "cores": n.cores,
                       "cores_free": n.cores_free, "memory": n.memory, "memory_free": n.memory_free,
                       "running": n.running, "last_seen_ms": n.last_seen_ms, "runtimes": n.runtimes,
                       "warm": n.warm})
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use drover_core::FailureClass;

    use super::*;

    fn tasks(states: &[&str]) -> Vec<pb::Task> {
        states
            .iter()
            .enumerate()
            .map(|(i, s)| pb::Task {
                id: i as i64,
                name: "t".into(),
                frame: Some(i as i64),
                state: (*s).into(),
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn a_large_jobs_table_lists_what_did_not_succeed_and_says_what_it_left_out() {
        let mut states = vec!["succeeded"; 1000];
        states[500] = "failed";
        states[900] = "running";
        let job = pb::Job {
            id: 7,
            name: "big".into(),
            state: "running".into(),
            tasks: tasks(&states),
            ..Default::default()
        };
        let text = job_detail(&job, false);
        assert!(text.contains("tasks: 1 failed, 1 running, 998 succeeded"), "{text}");
        assert!(text.contains("t[500]") && text.contains("t[900]"), "{text}");
        assert!(text.contains("… and 950 more succeeded tasks (`--all` lists every task)"), "{text}");
        assert_eq!(text.matches("succeeded").count(), 48 + 2, "{text}");
        let every = job_detail(&job, true);
        assert!(every.contains("t[999]") && !every.contains("more succeeded"), "{every}");
        let small = pb::Job { tasks: tasks(&["succeeded", "queued"]), ..Default::default() };
        assert!(!job_detail(&small, false).contains("more succeeded"));
    }

    #[test]
    fn failure_classes_show_as_their_words() {
        assert_eq!(failure_word(pb::FailureClass::encode(None)), None);
        assert_eq!(failure_word(pb::FailureClass::encode(Some(FailureClass::Oom))), Some("oom"));
        assert_eq!(failure_word(42), Some("unknown"));
    }
}
