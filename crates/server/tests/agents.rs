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
            if let Some(a) = s.assign(Duration::from_millis(50)).await {
                return (i, a);
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "nothing was assigned");
    }
}

fn finished(attempt_id: i64, epoch: i64, seq: u64) -> Msg {
    common::update(pb::AttemptUpdate {
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
    common::update(pb::AttemptUpdate {
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
        .send(common::reports(vec![pb::report::Kind::Output(pb::AttemptOutput {
            attempt_id: assign.attempt_id,
            epoch: assign.epoch,
            seq: 2,
            lines: Vec::new(),
            chunks: vec![pb::OutputChunk {
                step: 0,
                stderr: false,
                lens: vec![7],
                data: b"forged\n".to_vec(),
            }],
        })]))
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
    let assign = session.assign(WAIT).await.expect("no assignment");
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

fn register(name: &str, cores: u32, protocol: u32, version: &str) -> pb::Register {
    pb::Register {
        name: name.into(),
        cores,
        memory: 1 << 30,
        runtimes: vec!["process".into()],
        protocol,
        version: version.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn an_agent_of_another_protocol_is_refused_at_registration_naming_both_versions() {
    let server = Server::start().await;
    let credential = server.enroll("old").await;
    let ours = env!("CARGO_PKG_VERSION");
    // An agent from before the field (0 reads as protocol 1), and one from the future.
    for (protocol, speaks) in [(0, 1), (1, 1), (pb::PROTOCOL_VERSION + 1, pb::PROTOCOL_VERSION + 1)] {
        let reg = register("old", 1, protocol, "0.0.9");
        let err = server.session_registering(Some(&credential), reg).await.err().expect("a refusal");
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert_eq!(
            err.message(),
            format!(
                "agent 0.0.9 speaks protocol {speaks}, server {ours} speaks protocol {}: run the same Drover version on both",
                pb::PROTOCOL_VERSION
            )
        );
    }
    assert!(node_names(&server).await.is_empty(), "a refused agent registered a node");

    // The same credential with the server's protocol registers, and learns the server's.
    let reg = register("old", 1, pb::PROTOCOL_VERSION, ours);
    let channel =
        tonic::transport::Channel::from_shared(server.url.clone()).unwrap().connect().await.unwrap();
    let mut agents = pb::agent_session_client::AgentSessionClient::with_interceptor(
        channel,
        pb::Bearer::new(Some(&credential)).unwrap(),
    );
    let first = pb::AgentMessage { msg: Some(Msg::Register(reg)) };
    let mut inbound = agents.session(tokio_stream::iter([first])).await.unwrap().into_inner();
    match tokio_stream::StreamExt::next(&mut inbound).await {
        Some(Ok(pb::ServerMessage { msg: Some(pb::server_message::Msg::Registered(r)) })) => {
            assert_eq!((r.protocol, r.version.as_str()), (pb::PROTOCOL_VERSION, ours));
        }
        other => panic!("not registered: {other:?}"),
    }
    assert_eq!(node_names(&server).await, vec!["old"]);
}

#[tokio::test]
async fn a_registration_with_an_overlong_version_is_refused() {
    let server = Server::start().await;
    let credential = server.enroll("n").await;
    let reg = register("n", 1, pb::PROTOCOL_VERSION, &"9".repeat(65));
    let err = server.session_registering(Some(&credential), reg).await.err().expect("a refusal");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("version"), "{}", err.message());
}

/// Submits a job of `n` one-core tasks named `t0`, `t1`, ...
async fn submit_tasks(server: &Server, n: usize) -> i64 {
    let tasks = (0..n).map(|i| drover_store::conformance::task(&format!("t{i}"), &[])).collect();
    let plan = drover_store::conformance::job(tasks);
    let req = pb::SubmitRequest { plan_json: serde_json::to_string(&plan).unwrap(), ..Default::default() };
    server.operator().await.submit(req).await.unwrap().into_inner().job_id
}

async fn wait_all(server: &Server, job_id: i64, state: TaskState) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let tasks = server.store.tasks(job_id).await.unwrap();
        if tasks.iter().all(|t| t.state == state) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "tasks never all {state}: {tasks:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_round_placing_several_tasks_on_one_node_sends_them_in_one_message() {
    let server = Server::start().await;
    let credential = server.enroll("big").await;
    let reg = register("big", 4, pb::PROTOCOL_VERSION, env!("CARGO_PKG_VERSION"));
    let mut session = server.session_registering(Some(&credential), reg).await.unwrap();
    let job_id = submit_tasks(&server, 4).await;
    // The submit commits its four tasks at once, and the node has room for all of them: the
    // round that places them sends one message.
    let batch = loop {
        match session.next(WAIT).await {
            Some(Ok(pb::server_message::Msg::Assign(batch))) => break batch,
            Some(Ok(_)) => continue,
            other => panic!("no assignment: {other:?}"),
        }
    };
    assert_eq!(batch.attempts.len(), 4, "{batch:#?}");
    let mut tasks: Vec<i64> = batch.attempts.iter().map(|a| a.task_id).collect();
    tasks.sort_unstable();
    tasks.dedup();
    assert_eq!(tasks.len(), 4, "one attempt per task");
    // Each carries its plan, and only the plan says what to run.
    for a in &batch.attempts {
        let plan: drover_core::TaskPlan = serde_json::from_str(&a.plan_json).unwrap();
        assert_eq!((a.job_id, a.epoch, a.attempt, plan.steps.len()), (job_id, session.epoch, 1, 1));
    }
    wait_all(&server, job_id, TaskState::Assigned).await;
}

#[tokio::test]
async fn reports_batched_in_one_message_are_applied_in_order_and_acknowledged() {
    let server = Server::start().await;
    let credential = server.enroll("n").await;
    let reg = register("n", 2, pb::PROTOCOL_VERSION, env!("CARGO_PKG_VERSION"));
    let mut session = server.session_registering(Some(&credential), reg).await.unwrap();
    let job_id = submit_tasks(&server, 2).await;
    let a = session.assign(WAIT).await.expect("an assignment");
    let b = session.assign(WAIT).await.expect("a second assignment");
    let update = |x: &pb::Assign, seq: u64, kind| {
        pb::report::Kind::Update(pb::AttemptUpdate {
            attempt_id: x.attempt_id,
            epoch: x.epoch,
            seq,
            kind: Some(kind),
        })
    };
    let done = |code| {
        pb::attempt_update::Kind::Finished(pb::Finished { exit_code: Some(code), ..Default::default() })
    };
    let failed = pb::attempt_update::Kind::Finished(pb::Finished {
        exit_code: None,
        failure: pb::FailureClass::Oom as i32,
        message: "out of memory".into(),
        ..Default::default()
    });
    let output = pb::report::Kind::Output(pb::AttemptOutput {
        attempt_id: a.attempt_id,
        epoch: a.epoch,
        seq: 3,
        // Lines one by one (as protocol 2 sent them) and as a chunk, stored in that order.
        lines: vec![pb::OutputLine { step: 0, stderr: false, data: b"batched\n".to_vec() }],
        chunks: vec![pb::OutputChunk { step: 0, stderr: true, lens: vec![3, 2], data: b"ab\nc\n".to_vec() }],
    });
    let batch = vec![
        update(&a, 1, pb::attempt_update::Kind::Started(pb::Started {})),
        update(&b, 2, pb::attempt_update::Kind::Started(pb::Started {})),
        output,
        update(&a, 4, done(0)),
        update(&b, 5, failed),
    ];
    session.send(common::reports(batch)).await;
    session.wait_ack(5, WAIT).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let tasks = loop {
        let tasks = server.store.tasks(job_id).await.unwrap();
        if tasks.iter().all(|t| t.state.is_final()) {
            break tasks;
        }
        assert!(tokio::time::Instant::now() < deadline, "the batch was not applied: {tasks:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let by_id = |id| tasks.iter().find(|t| t.id == id).unwrap();
    assert_eq!(by_id(a.task_id).state, TaskState::Succeeded);
    assert_eq!(
        (by_id(b.task_id).state, by_id(b.task_id).failure),
        (TaskState::Failed, Some(drover_core::FailureClass::Oom))
    );
    let logs = server.store.logs_after(job_id, &TaskFilter::default(), 0, 10).await.unwrap();
    assert_eq!(
        logs.iter().map(|l| (l.stderr, l.data.as_slice())).collect::<Vec<_>>(),
        vec![(false, b"batched\n".as_slice()), (true, b"ab\n"), (true, b"c\n")]
    );
}

#[tokio::test]
async fn every_output_sent_ahead_of_a_finish_is_stored_before_it() {
    let server = Server::start().await;
    let credential = server.enroll("n").await;
    let reg = register("n", 1, pb::PROTOCOL_VERSION, env!("CARGO_PKG_VERSION"));
    let mut session = server.session_registering(Some(&credential), reg).await.unwrap();
    let job_id = submit_tasks(&server, 1).await;
    let a = session.assign(WAIT).await.expect("an assignment");
    let update = |seq: u64, kind| {
        pb::report::Kind::Update(pb::AttemptUpdate {
            attempt_id: a.attempt_id,
            epoch: a.epoch,
            seq,
            kind: Some(kind),
        })
    };
    // More reports of output than the server queues for storing, then the finish at once.
    let reports = 40u64;
    let line = |i: u64| format!("{i:0>1023}\n").into_bytes();
    let mut batch = vec![update(1, pb::attempt_update::Kind::Started(pb::Started {}))];
    for i in 0..reports {
        let data: Vec<u8> = (0..32).flat_map(|_| line(i)).collect();
        batch.push(pb::report::Kind::Output(pb::AttemptOutput {
            attempt_id: a.attempt_id,
            epoch: a.epoch,
            seq: 2 + i,
            lines: Vec::new(),
            chunks: vec![pb::OutputChunk { step: 0, stderr: false, lens: vec![1024; 32], data }],
        }));
    }
    let finish = pb::Finished { exit_code: Some(0), ..Default::default() };
    batch.push(update(2 + reports, pb::attempt_update::Kind::Finished(finish)));
    session.send(common::reports(batch)).await;
    session.wait_ack(2 + reports, WAIT).await;
    wait_all(&server, job_id, TaskState::Succeeded).await;
    let mut stored = Vec::new();
    let mut after = 0;
    loop {
        let logs = server.store.logs_after(job_id, &TaskFilter::default(), after, 10_000).await.unwrap();
        let Some(last) = logs.last() else { break };
        after = last.id;
        stored.extend(logs.into_iter().map(|l| l.data));
    }
    assert_eq!(stored.len() as u64, reports * 32, "every line, none after the finish lost");
    let expected: Vec<Vec<u8>> = (0..reports).flat_map(|i| (0..32).map(move |_| line(i))).collect();
    assert!(stored == expected, "lines stored out of order");
}

/// Sends `msg` on a fresh session of a fresh node and returns how the server ended it.
async fn refused(msg: Msg) -> tonic::Status {
    let server = Server::start().await;
    let credential = server.enroll("n").await;
    let mut session = server.session(Some(&credential), "n").await.unwrap();
    session.send(msg).await;
    loop {
        match session.next(WAIT).await {
            Some(Ok(_)) => continue,
            Some(Err(s)) => return s,
            None => panic!("the server kept the session"),
        }
    }
}

#[tokio::test]
async fn a_batch_of_reports_beyond_the_limits_ends_the_session() {
    let started = |seq| {
        pb::report::Kind::Update(pb::AttemptUpdate {
            attempt_id: 1,
            epoch: 1,
            seq,
            kind: Some(pb::attempt_update::Kind::Started(pb::Started {})),
        })
    };
    let too_many = (1..=pb::MAX_REPORTS_PER_MESSAGE as u64 + 1).map(started).collect();
    let s = refused(common::reports(too_many)).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains(&format!("at most {} reports", pb::MAX_REPORTS_PER_MESSAGE)), "{s:?}");

    let empty = Msg::Reports(pb::Reports { reports: vec![pb::Report { kind: None }] });
    let s = refused(empty).await;
    assert_eq!((s.code(), s.message()), (Code::InvalidArgument, "report without a kind"));

    let unknown_class = common::update(pb::AttemptUpdate {
        attempt_id: 1,
        epoch: 1,
        seq: 1,
        kind: Some(pb::attempt_update::Kind::Finished(pb::Finished { failure: 99, ..Default::default() })),
    });
    let s = refused(unknown_class).await;
    assert_eq!((s.code(), s.message()), (Code::InvalidArgument, "unknown failure class 99"));

    let lying = common::reports(vec![pb::report::Kind::Output(pb::AttemptOutput {
        attempt_id: 1,
        epoch: 1,
        seq: 1,
        lines: Vec::new(),
        chunks: vec![pb::OutputChunk { step: 0, stderr: false, lens: vec![9], data: b"short\n".to_vec() }],
    })]);
    let s = refused(lying).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("add up to 9 bytes"), "{s:?}");
}

/// Asks for an attempt's LLM key and secrets again, as a restarted agent does.
async fn attempt_key(
    server: &Server,
    credential: Option<&str>,
    node: &str,
    attempt_id: i64,
) -> Result<pb::AttemptKeyResponse, tonic::Status> {
    let channel =
        tonic::transport::Channel::from_shared(server.url.clone()).unwrap().connect().await.unwrap();
    let mut agents = drover_proto::agent_session_client::AgentSessionClient::with_interceptor(
        channel,
        drover_proto::Bearer::new(credential).unwrap(),
    );
    let req = pb::AttemptKeyRequest { node: node.into(), attempt_id };
    Ok(agents.attempt_key(req).await?.into_inner())
}

#[tokio::test]
async fn an_llm_key_and_secrets_are_given_again_only_to_the_node_running_the_attempt_while_it_runs() {
    let server = Server::start().await;
    let a = server.enroll("a").await;
    let b = server.enroll("b").await;
    let mut sessions =
        [server.session(Some(&a), "a").await.unwrap(), server.session(Some(&b), "b").await.unwrap()];
    let credentials = [a, b];
    let names = ["a", "b"];
    let mut op = server.operator().await;
    let secret =
        pb::SetSecretRequest { project: "default".into(), name: "LLM_KEY".into(), value: "sk-real".into() };
    op.set_secret(secret).await.unwrap();
    for (name, value) in [("DB_PASS", "hunter2"), ("OTHER", "not theirs"), ("GONE", "soon")] {
        let secret =
            pb::SetSecretRequest { project: "default".into(), name: name.into(), value: value.into() };
        op.set_secret(secret).await.unwrap();
    }
    let mut plan = drover_store::conformance::job(vec![
        drover_store::conformance::task("agent", &[]),
        drover_store::conformance::task("plain", &["agent"]),
    ]);
    plan.tasks[0].agent = Some(common::agent_block("https://llm.invalid", Some("LLM_KEY")));
    plan.tasks[0].secrets = vec!["DB_PASS".into(), "GONE".into()];
    let req = pb::SubmitRequest { plan_json: serde_json::to_string(&plan).unwrap(), ..Default::default() };
    op.submit(req).await.unwrap();
    let (owner, assign) = assignment(&mut sessions).await;
    let (other, id) = (1 - owner, assign.attempt_id);
    op.delete_secret(pb::DeleteSecretRequest { project: "default".into(), name: "GONE".into() })
        .await
        .unwrap();

    let keys = attempt_key(&server, Some(&credentials[owner]), names[owner], id).await.unwrap();
    assert_eq!(keys.llm_key, "sk-real");
    // Only the secrets the task names (one deleted since is absent), the key apart.
    assert_eq!(
        keys.secrets,
        std::collections::HashMap::from([("DB_PASS".to_string(), "hunter2".to_string())])
    );
    // Another node's credential cannot ask in the owner's name, nor get it in its own.
    let err = attempt_key(&server, Some(&credentials[other]), names[owner], id).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = attempt_key(&server, Some(&credentials[other]), names[other], id).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // Neither can a person's key, nor a caller without a credential.
    let err = attempt_key(&server, Some(&server.operator), names[owner], id).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = attempt_key(&server, None, names[owner], id).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = attempt_key(&server, Some(&credentials[owner]), names[owner], i64::MAX).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // Once the attempt ended, nobody gets it; a task without a key never had one to give.
    sessions[owner].send(started(id, assign.epoch, 1)).await;
    sessions[owner].send(finished(id, assign.epoch, 2)).await;
    sessions[owner].wait_ack(2, WAIT).await;
    let err = attempt_key(&server, Some(&credentials[owner]), names[owner], id).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let (plain_owner, plain) = assignment(&mut sessions).await;
    let err = attempt_key(&server, Some(&credentials[plain_owner]), names[plain_owner], plain.attempt_id)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
}
