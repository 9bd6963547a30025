//! Conversions between store records and protocol messages, and store errors to gRPC status.

use drover_proto as pb;
use drover_store::{
    Assignment, EventRecord, JobRecord, JobSummary, LogChunk, LogRecord, NodeRecord, StoreError, TaskRecord,
};

pub(crate) fn status(e: StoreError) -> tonic::Status {
    match e {
        StoreError::NotFound { .. } => tonic::Status::not_found(e.to_string()),
        StoreError::Invalid { .. } => tonic::Status::invalid_argument(e.to_string()),
        other => {
            tracing::error!(error = %other, "store error");
            tonic::Status::unavailable(other.to_string())
        }
    }
}

pub(crate) fn job(j: JobRecord, tasks: Vec<TaskRecord>) -> pb::Job {
    pb::Job {
        id: j.id,
        name: j.name,
        project: j.project,
        priority: j.priority,
        state: j.state.to_string(),
        created_ms: j.created_ms,
        tasks: tasks.into_iter().map(task).collect(),
        last_seq: j.last_seq,
        cancelled: j.cancelled,
    }
}

fn task(t: TaskRecord) -> pb::Task {
    pb::Task {
        id: t.id,
        name: t.name,
        frame: t.frame,
        state: t.state.to_string(),
        exit_code: t.exit_code,
        attempts: t.attempts,
        node: t.node.unwrap_or_default(),
        reason: t.reason,
        cpu_seconds: t.cpu_seconds,
        peak_memory_bytes: t.peak_memory,
        started_ms: t.started_ms.unwrap_or(0),
        ended_ms: t.ended_ms.unwrap_or(0),
        failure: pb::FailureClass::encode(t.failure),
    }
}

pub(crate) fn summary(j: JobSummary) -> pb::JobSummary {
    pb::JobSummary {
        id: j.id,
        name: j.name,
        project: j.project,
        state: j.state.to_string(),
        created_ms: j.created_ms,
        total: j.total,
        done: j.done,
        running: j.running,
        failed: j.failed,
    }
}

pub(crate) fn event(e: EventRecord) -> pb::Event {
    pb::Event {
        job_id: e.job_id,
        seq: e.seq,
        time_ms: e.time_ms,
        kind: e.kind,
        task_id: e.task_id,
        task_name: e.task_name,
        frame: e.frame,
        state: e.state,
        message: e.message,
        exit_code: e.exit_code,
        attempt: e.attempt,
        node: e.node,
    }
}

pub(crate) fn log_line(l: LogRecord) -> pb::LogLine {
    pb::LogLine {
        id: l.id,
        task_id: l.task_id,
        task_name: l.task_name,
        frame: l.frame,
        attempt: l.attempt,
        step: l.step,
        stream: if l.stderr { "stderr" } else { "stdout" }.to_string(),
        data: l.data,
    }
}

pub(crate) fn log_chunk(c: LogChunk) -> pb::LogChunk {
    pb::LogChunk {
        first_id: c.first_id,
        task_id: c.task_id,
        task_name: c.task_name,
        frame: c.frame,
        attempt: c.attempt,
        step: c.step,
        stderr: c.stderr,
        lens: c.lens,
        data: c.data,
    }
}

pub(crate) fn artifact(a: drover_store::ArtifactRecord) -> pb::Artifact {
    pb::Artifact {
        task_id: a.task_id,
        task_name: a.task_name,
        frame: a.frame,
        attempt: a.attempt,
        path: a.path,
        size: a.size,
        digest: a.digest,
        created_ms: a.created_ms,
    }
}

pub(crate) fn node(n: NodeRecord) -> pb::Node {
    pb::Node {
        id: n.id,
        name: n.name,
        state: n.state.to_string(),
        labels: n.labels.into_iter().collect(),
        cores: n.cores,
        cores_free: n.cores.saturating_sub(n.cores_used),
        memory: n.memory,
        memory_free: n.memory.saturating_sub(n.memory_used),
        running: n.running,
        last_seen_ms: n.last_seen_ms,
        runtimes: n.runtimes,
        // Filled in from the agent's session by the replica that holds it.
        warm: Default::default(),
    }
}

/// The message that hands one attempt to its agent, its plan encoded once. The secrets, the
/// LLM key and `allow_root` are left for the dispatcher, which looks them up.
pub(crate) fn assign_message(a: &Assignment) -> Result<pb::Assign, serde_json::Error> {
    Ok(pb::Assign {
        job_id: a.job_id,
        task_id: a.task_id,
        attempt_id: a.attempt_id,
        epoch: a.epoch,
        attempt: a.number,
        plan_json: serde_json::to_string(&a.plan)?,
        secrets: Default::default(),
        llm_key: String::new(),
        allow_root: false,
    })
}
