//! Conversions between store records and protocol messages, and store errors to gRPC status.

use drover_proto as pb;
use drover_store::{
    Assignment, EventRecord, JobRecord, JobSummary, LogRecord, NodeRecord, StoreError, TaskRecord,
};

pub(crate) fn status(e: StoreError) -> tonic::Status {
    match e {
        StoreError::NotFound { .. } => tonic::Status::not_found(e.to_string()),
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
        failure: t.failure.map(|f| f.to_string()).unwrap_or_default(),
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

pub(crate) fn assign_message(a: &Assignment) -> pb::Assign {
    pb::Assign {
        job_id: a.job_id,
        task_id: a.task_id,
        attempt_id: a.attempt_id,
        epoch: a.epoch,
        task_name: a.plan.name.clone(),
        frame: a.plan.frame,
        steps: a.plan.steps.iter().map(|s| pb::Command { argv: s.to_argv() }).collect(),
        env: a.plan.env.clone().into_iter().collect(),
        cores: a.plan.resources.cores,
        memory: a.plan.resources.memory,
        timeout_ms: a.plan.timeout.map(|t| t.as_millis() as u64).unwrap_or(0),
        attempt: a.number,
        runtime: a.plan.runtime.as_str().to_string(),
        plan_json: serde_json::to_string(&a.plan).unwrap_or_default(),
        secrets: Default::default(),
        llm_key: String::new(),
        // Set by the dispatcher from the project's settings when the plan asks for root.
        allow_root: false,
    }
}
