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
pub fn job_detail(job: &pb::Job) -> String {
    let mut t = table(&["TASK", "STATE", "EXIT", "ATTEMPTS", "NODE", "CPU s", "PEAK MEM", "REASON"]);
    for task in &job.tasks {
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
    format!(
        "job {} `{}` (project {}, priority {}): {}\n{}",
        job.id, job.name, job.project, job.priority, job.state, t
    )
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

    #[test]
    fn failure_classes_show_as_their_words() {
        assert_eq!(failure_word(pb::FailureClass::encode(None)), None);
        assert_eq!(failure_word(pb::FailureClass::encode(Some(FailureClass::Oom))), Some("oom"));
        assert_eq!(failure_word(42), Some("unknown"));
    }
}
