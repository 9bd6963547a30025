//! A process task's limits hold only where the node's agent can enforce them: such a task is
//! placed only on a node that says so at registration, and waits with the reason otherwise.

mod common;

use std::time::Duration;

use common::Server;
use drover_core::TaskState;
use drover_proto as pb;
use drover_store::Store;
use drover_store::conformance::{job, task};

const WAIT: Duration = Duration::from_secs(10);

async fn wait_task(
    server: &Server,
    job: i64,
    check: impl Fn(&drover_store::TaskRecord) -> bool,
) -> drover_store::TaskRecord {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let tasks = server.store.tasks(job).await.unwrap();
        if check(&tasks[0]) {
            return tasks[0].clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "the task never got there: {tasks:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn register(name: &str, labels: &[(&str, &str)]) -> pb::Register {
    pb::Register {
        name: name.into(),
        cores: 4,
        memory: 8 << 30,
        runtimes: vec!["process".into()],
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        protocol: pb::PROTOCOL_VERSION,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_limit_no_node_enforces_keeps_the_task_waiting_with_the_reason() {
    let server = Server::start().await;
    // A node that enforces memory limits but not pids limits.
    let credential = server.enroll("lax").await;
    let _lax = server
        .session_registering(Some(&credential), register("lax", &[("drover.enforces.memory", "yes")]))
        .await
        .unwrap();
    let mut plan = job(vec![task("bounded", &[])]);
    plan.tasks[0].resources.pids = 64;
    let mut op = server.operator().await;
    let request = pb::SubmitRequest {
        plan_json: serde_json::to_string(&plan).unwrap(),
        filename: "t.yaml".into(),
        ..Default::default()
    };
    let job_id = op.submit(request).await.unwrap().into_inner().job_id;
    let waiting = wait_task(&server, job_id, |t| !t.reason.is_empty()).await;
    assert_eq!(waiting.state, TaskState::Queued);
    assert!(waiting.reason.contains("enforce a pids limit"), "{}", waiting.reason);

    // A node that enforces it takes the task, and the reason goes.
    let credential = server.enroll("strict").await;
    let strict = server
        .session_registering(Some(&credential), register("strict", &[("drover.enforces.pids", "yes")]))
        .await
        .unwrap();
    let placed = wait_task(&server, job_id, |t| t.state == TaskState::Assigned).await;
    assert_eq!(placed.node.as_deref(), Some("strict"), "{placed:#?}");
    drop(strict);
    assert!(placed.reason.is_empty(), "{placed:#?}");
}
