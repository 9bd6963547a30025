//! Agents as the server sees them: enrollment with single-use tokens, credentials bound to one
//! node name, reports accepted only from the node an attempt was assigned to, and revocation.
//! The agents here are raw gRPC sessions, so they can forge what a real agent never sends.

mod common;

use std::time::Duration;

use common::{Server, Session};
use drover_core::TaskState;
use drover_proto as pb;
use drover_proto::agent_message::Msg;
use drover_store::{AccessStore, Store, TaskFilter};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(10);

async fn node_names(server: &Server) -> Vec<String> {
    server.store.nodes().await.unwrap().into_iter().map(|n| n.name).collect()
}

#[tokio::test]
async fn an_agent_without_a_credential_or_with_another_nodes_is_refused_and_nothing_is_stored() {
    let server = Server::start().await;
    let err = server.session(None, "ghost").await.err().expect("a session without a credential");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let garbage = format!("drn_{}_{}", "0".repeat(16), "0".repeat(64));
    let err = server.session(Some(&garbage), "ghost").await.err().expect("a made-up credential");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    // An API key is not a node credential, not even the operator's.
    let err = server.session(Some(&server.operator), "ghost").await.err().expect("an api key");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    let credential = server.enroll("n1").await;
    let err = server.session(Some(&credential), "n2").await.err().expect("another node's name");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("belongs to node `n1`"), "{}", err.message());
    assert!(node_names(&server).await.is_empty(), "a refused agent registered a node");
    // The credential works for its own name.
    server.session(Some(&credential), "n1").await.unwrap();
    assert_eq!(node_names(&server).await, vec!["n1"]);
}

#[tokio::test]
async fn a_join_token_enrolls_once_and_not_after_it_expired() {
    let server = Server::start().await;
    let token = server.join_token().await;
    server.join(&token, "first").await.unwrap();
    let again = server.join(&token, "second").await.unwrap_err();
    assert_eq!(again.code(), Code::PermissionDenied);
    assert!(again.message().contains("used already"), "{}", again.message());

    let mut op = server.operator().await;
    let short = pb::CreateJoinTokenRequest { expires_in_ms: 1, ..Default::default() };
    let token = op.create_join_token(short).await.unwrap().into_inner().token;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let late = server.join(&token, "late").await.unwrap_err();
    assert!(late.message().contains("expired"), "{}", late.message());

    // A name already enrolled cannot be taken over with a new token.
    let token = server.join_token().await;
    let taken = server.join(&token, "first").await.unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists, "{taken:?}");
    assert!(server.join(&token, "bad/name").await.is_err(), "a name that is not a node name");
    // The failed attempts left the token unused.
    server.join(&token, "third").await.unwrap();
    let enrolled = ["first", "third"];
    for name in ["second", "late"] {
        assert!(!enrolled.contains(&name));
    }
    let labels = pb::CreateJoinTokenRequest {
        labels: [("bad key!".to_string(), "v".to_string())].into(),
        ..Default::default()
    };
    assert_eq!(op.create_join_token(labels).await.unwrap_err().code(), Code::InvalidArgument);
}

/// Waits for an assignment on either session; returns (owner index, the assignment).
async fn assignment(sessions: &mut [Session; 2]) -> (usize, pb::Assign) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        for (i, s) in sessions.iter_mut().enumerate() {
            if let Some(Ok(pb::server_message::Msg::Assign(a))) = s.next(Duration::from_millis(50)).await {
                return (i, a);
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "nothing was assigned");
    }
}

fn finished(attempt_id: i64, epoch: i64, seq: u64) -> Msg {
    Msg::Update(pb::AttemptUpdate {
        attempt_id,
        epoch,
        seq,
        kind: Some(pb::attempt_update::Kind::Finished(pb::Finished {
            exit_code: Some(0),
            ..Default::default()
        })),
    })
}

fn started(attempt_id: i64, epoch: i64, seq: u64) -> Msg {
    Msg::Update(pb::AttemptUpdate {
        attempt_id,
        epoch,
        seq,
        kind: Some(pb::attempt_update::Kind::Started(pb::Started {})),
    })
}

#[tokio::test]
async fn reports_about_an_attempt_count_only_from_the_node_it_was_assigned_to() {
    let server = Server::start().await;
    let a = server.enroll("a").await;
    let b = server.enroll("b").await;
    let mut sessions =
        [server.session(Some(&a), "a").await.unwrap(), server.session(Some(&b), "b").await.unwrap()];
    let mut op = server.operator().await;
    let plan = drover_store::conformance::job(vec![drover_store::conformance::task("t", &[])]);
    let req = pb::SubmitRequest { plan_json: serde_json::to_string(&plan).unwrap(), ..Default::default() };
    let job_id = op.submit(req).await.unwrap().into_inner().job_id;
    let (owner, assign) = assignment(&mut sessions).await;
    let forger = &mut sessions[1 - owner];

    // The other node forges a start, output and a finish, even naming the owner's epoch.
    forger.send(started(assign.attempt_id, assign.epoch, 1)).await;
    forger
        .send(Msg::Output(pb::AttemptOutput {
            attempt_id: assign.attempt_id,
            epoch: assign.epoch,
            seq: 2,
            lines: vec![pb::OutputLine { step: 0, stderr: false, data: b"forged\n".to_vec() }],
        }))
        .await;
    forger.send(finished(assign.attempt_id, assign.epoch, 3)).await;
    // Each is acknowledged (as stale, like a late report), so the forger learns nothing, and
    // nothing changed.
    forger.wait_ack(3, WAIT).await;
    let task = server.store.tasks(job_id).await.unwrap().remove(0);
    assert_eq!(task.state, TaskState::Assigned, "a forged report changed the task");
    assert!(server.store.logs_after(job_id, &TaskFilter::default(), 0, 10).await.unwrap().is_empty());

    // The owner's own reports count.
    let owner = &sessions[owner];
    owner.send(started(assign.attempt_id, assign.epoch, 1)).await;
    owner.send(finished(assign.attempt_id, assign.epoch, 2)).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.store.tasks(job_id).await.unwrap()[0].state != TaskState::Succeeded {
        assert!(tokio::time::Instant::now() < deadline, "the owner's finish was not recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_revoked_node_loses_its_session_at_once_and_its_tasks_move_on() {
    let server = Server::start().await;
    let credential = server.enroll("doomed").await;
    let mut session = server.session(Some(&credential), "doomed").await.unwrap();
    let mut op = server.operator().await;
    let mut plan = drover_store::conformance::job(vec![drover_store::conformance::task("t", &[])]);
    plan.tasks[0].retries.count = 1;
    let req = pb::SubmitRequest { plan_json: serde_json::to_string(&plan).unwrap(), ..Default::default() };
    let job_id = op.submit(req).await.unwrap().into_inner().job_id;
    let assign = loop {
        match session.next(WAIT).await {
            Some(Ok(pb::server_message::Msg::Assign(a))) => break a,
            Some(Ok(_)) => continue,
            other => panic!("no assignment: {other:?}"),
        }
    };
    session.send(started(assign.attempt_id, assign.epoch, 1)).await;

    let revoked = op.revoke_node(pb::RevokeNodeRequest { name: "doomed".into() }).await.unwrap().into_inner();
    assert_eq!((revoked.credentials, revoked.lost), (1, 1));
    // The session ends at once with the reason.
    let end = loop {
        match session.next(WAIT).await {
            Some(Ok(_)) => continue,
            other => break other,
        }
    };
    match end {
        Some(Err(s)) => assert_eq!(s.code(), Code::Unauthenticated, "{s:?}"),
        other => panic!("the session did not end with an error: {other:?}"),
    }
    // The attempt was handed on: the task waits for another node, with its retry spent.
    let task = server.store.tasks(job_id).await.unwrap().remove(0);
    assert_eq!((task.state, task.attempts), (TaskState::Queued, 1), "{task:?}");
    // The credential no longer opens a session, and a late report changes nothing.
    let err = server.session(Some(&credential), "doomed").await.err().expect("a revoked credential");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("revoked"), "{}", err.message());
    assert!(server.store.node_credential(&credential[4..20]).await.unwrap().unwrap().revoked_ms.is_some());
    // Revoking an unknown node says so.
    let unknown = op.revoke_node(pb::RevokeNodeRequest { name: "nobody".into() }).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}
