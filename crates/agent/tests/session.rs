//! A real agent against a scripted server: a gRPC server on loopback that registers the agent
//! as a server of another release would, or hands it assignments a real server never sends,
//! and records every message the agent sends back.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use drover_agent::runtime::process::ProcessRuntime;
use drover_agent::{Agent, AgentConfig, AgentError};
use drover_core::{Command, TaskPlan};
use drover_proto as pb;
use drover_proto::agent_message::Msg;
use drover_proto::agent_session_server::{AgentSession, AgentSessionServer};
use drover_proto::server_message::Msg as Out;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

const WAIT: Duration = Duration::from_secs(30);

/// What the scripted server does with a session.
#[derive(Clone)]
struct Script {
    /// Refuses the registration with this status instead of answering it.
    refuse: Option<Status>,
    /// Answers the registration with this.
    registered: pb::Registered,
    /// Sent once registered, in order.
    assign: Vec<pb::Assignments>,
}

impl Script {
    /// A server of this release that sends `assign`.
    fn assigning(assign: Vec<pb::Assignments>) -> Script {
        let registered = pb::Registered {
            node_id: 1,
            epoch: 1,
            heartbeat_ms: 1000,
            lease_ms: 10_000,
            protocol: pb::PROTOCOL_VERSION,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        };
        Script { refuse: None, registered, assign }
    }
}

struct Scripted {
    script: Script,
    /// Sessions the agent opened.
    sessions: Arc<AtomicUsize>,
    /// Every report the agent sent.
    reports: mpsc::UnboundedSender<pb::Report>,
}

#[tonic::async_trait]
impl AgentSession for Scripted {
    type SessionStream = ReceiverStream<Result<pb::ServerMessage, Status>>;

    async fn session(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        self.sessions.fetch_add(1, Ordering::SeqCst);
        let mut inbound = req.into_inner();
        match inbound.next().await {
            Some(Ok(pb::AgentMessage { msg: Some(Msg::Register(r)) })) => {
                assert_eq!(r.protocol, pb::PROTOCOL_VERSION, "the agent did not say its protocol");
            }
            other => panic!("the session did not begin with Register: {other:?}"),
        }
        if let Some(refusal) = &self.script.refuse {
            return Err(refusal.clone());
        }
        let (tx, rx) = mpsc::channel(64);
        let out =
            |msg: Out| -> Result<pb::ServerMessage, Status> { Ok(pb::ServerMessage { msg: Some(msg) }) };
        let _ = tx.send(out(Out::Registered(self.script.registered.clone()))).await;
        for batch in &self.script.assign {
            let _ = tx.send(out(Out::Assign(batch.clone()))).await;
        }
        let reports = self.reports.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = inbound.next().await {
                let Some(Msg::Reports(batch)) = msg.msg else { continue };
                for report in batch.reports {
                    let seq = match &report.kind {
                        Some(pb::report::Kind::Update(u)) => u.seq,
                        Some(pb::report::Kind::Output(o)) => o.seq,
                        None => panic!("a report without a kind"),
                    };
                    let _ = reports.send(report);
                    let _ = tx.send(out(Out::Ack(pb::Ack { seq }))).await;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn join(&self, _: Request<pb::JoinRequest>) -> Result<Response<pb::JoinResponse>, Status> {
        Err(Status::unimplemented("not in this script"))
    }

    async fn attempt_key(
        &self,
        _: Request<pb::AttemptKeyRequest>,
    ) -> Result<Response<pb::AttemptKeyResponse>, Status> {
        Err(Status::unimplemented("not in this script"))
    }
}

/// A running scripted server and an agent connected to it.
struct Run {
    work: tempfile::TempDir,
    sessions: Arc<AtomicUsize>,
    reports: mpsc::UnboundedReceiver<pb::Report>,
    agent: tokio::task::JoinHandle<Result<(), AgentError>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

async fn start(script: Script) -> Run {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let sessions = Arc::new(AtomicUsize::new(0));
    let (reports_tx, reports) = mpsc::unbounded_channel();
    let service = Scripted { script, sessions: sessions.clone(), reports: reports_tx };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentSessionServer::new(service))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let work = tempfile::tempdir().unwrap();
    let config = AgentConfig {
        servers: vec![url],
        name: "scripted".into(),
        labels: Default::default(),
        cores: 2,
        memory: 1 << 30,
        work_dir: work.path().to_path_buf(),
        kill_grace: Duration::from_secs(1),
        join: None,
        trust: None,
        allow_local_urls: false,
        min_free: 0,
    };
    let agent = Agent::new(config, vec![Arc::new(ProcessRuntime::new())]).unwrap();
    agent.enroll().await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(agent.run(async {
        let _ = stopped.await;
    }));
    Run { work, sessions, reports, agent, stop: Some(stop) }
}

impl Run {
    /// Reports until every attempt in `attempts` reported its end: the updates, and the
    /// output as (attempt id, text).
    async fn until_finished(&mut self, attempts: &[i64]) -> (Vec<pb::AttemptUpdate>, Vec<(i64, String)>) {
        let mut updates = Vec::new();
        let mut output = Vec::new();
        let ended = |updates: &[pb::AttemptUpdate], id: i64| {
            updates
                .iter()
                .any(|u| u.attempt_id == id && matches!(u.kind, Some(pb::attempt_update::Kind::Finished(_))))
        };
        while !attempts.iter().all(|id| ended(&updates, *id)) {
            match tokio::time::timeout(WAIT, self.reports.recv()).await {
                Ok(Some(pb::Report { kind: Some(pb::report::Kind::Update(u)) })) => updates.push(u),
                Ok(Some(pb::Report { kind: Some(pb::report::Kind::Output(o)) })) => {
                    // Output goes as runs of lines: one blob and a length per line.
                    for c in o.chunks {
                        let mut at = 0;
                        for len in c.lens {
                            let line = &c.data[at..at + len as usize];
                            output.push((o.attempt_id, String::from_utf8_lossy(line).into_owned()));
                            at += len as usize;
                        }
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => panic!("not every attempt of {attempts:?} ended: {updates:#?}"),
            }
        }
        (updates, output)
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(WAIT, &mut self.agent).await;
    }
}

fn finished(updates: &[pb::AttemptUpdate], attempt_id: i64) -> Option<&pb::Finished> {
    updates.iter().find_map(|u| match &u.kind {
        Some(pb::attempt_update::Kind::Finished(f)) if u.attempt_id == attempt_id => Some(f),
        _ => None,
    })
}

fn started(updates: &[pb::AttemptUpdate], attempt_id: i64) -> bool {
    updates
        .iter()
        .any(|u| u.attempt_id == attempt_id && matches!(u.kind, Some(pb::attempt_update::Kind::Started(_))))
}

fn assign(job_id: i64, attempt_id: i64, plan_json: String) -> pb::Assign {
    pb::Assign {
        job_id,
        task_id: attempt_id,
        attempt_id,
        epoch: 1,
        attempt: 1,
        plan_json,
        ..Default::default()
    }
}

/// A plan whose one step prints `ran`.
fn runnable() -> String {
    let plan =
        TaskPlan { name: "ok".into(), steps: vec![Command::Shell("echo ran".into())], ..TaskPlan::default() };
    serde_json::to_string(&plan).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_plan_is_refused_as_failed_to_start_and_nothing_of_it_runs() {
    // Readable JSON of the wrong shape, a runtime this release does not know, and no plan at
    // all; beside them in the same message, a plan that runs.
    let mut unknown_runtime: serde_json::Value = serde_json::from_str(&runnable()).unwrap();
    unknown_runtime["runtime"] = "wasm".into();
    let batch = pb::Assignments {
        attempts: vec![
            assign(1, 11, r#"{"name": 5, "steps": "rm -rf /"}"#.into()),
            assign(2, 12, unknown_runtime.to_string()),
            assign(3, 13, String::new()),
            assign(4, 14, runnable()),
        ],
    };
    let mut run = start(Script::assigning(vec![batch])).await;
    let (updates, output) = run.until_finished(&[11, 12, 13, 14]).await;
    for (attempt_id, job_id) in [(11, 1), (12, 2), (13, 3)] {
        let f = finished(&updates, attempt_id).unwrap();
        assert_eq!(
            pb::FailureClass::decode(f.failure),
            Ok(Some(drover_core::FailureClass::Start)),
            "attempt {attempt_id}: {f:?}"
        );
        assert!(
            f.message.starts_with("cannot read the task's plan: "),
            "attempt {attempt_id}: {}",
            f.message
        );
        assert!(!started(&updates, attempt_id), "attempt {attempt_id} was reported started");
        assert!(
            !run.work.path().join(format!("job-{job_id}")).exists(),
            "attempt {attempt_id} got a workspace"
        );
    }
    assert!(finished(&updates, 12).unwrap().message.contains("wasm"), "{:?}", finished(&updates, 12));
    // The readable one in the same message ran.
    let ok = finished(&updates, 14).unwrap();
    assert_eq!((ok.exit_code, ok.failure, ok.message.as_str()), (Some(0), 0, ""), "{ok:?}");
    assert!(started(&updates, 14));
    assert_eq!(output, vec![(14, "ran\n".to_owned())], "only the readable plan ran");
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assignment_message_beyond_the_limit_is_refused_whole() {
    let n = pb::MAX_ASSIGNS_PER_MESSAGE as i64 + 1;
    let attempts: Vec<_> = (1..=n).map(|i| assign(1, i, runnable())).collect();
    let mut run = start(Script::assigning(vec![pb::Assignments { attempts }])).await;
    let ids: Vec<i64> = (1..=n).collect();
    let (updates, output) = run.until_finished(&ids).await;
    let why = format!(
        "the server sent {n} assignments in one message; an agent takes at most {}",
        pb::MAX_ASSIGNS_PER_MESSAGE
    );
    for id in ids {
        let f = finished(&updates, id).unwrap();
        assert_eq!((f.failure, f.message.as_str()), (pb::FailureClass::Start as i32, why.as_str()));
        assert!(!started(&updates, id), "attempt {id} of the refused message started");
    }
    assert!(output.is_empty(), "an attempt of the refused message ran: {output:?}");
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_stops_for_good_when_the_server_speaks_another_protocol() {
    let ours = env!("CARGO_PKG_VERSION");
    let refusal = format!(
        "agent {ours} speaks protocol {}, server 9.9.9 speaks protocol 99: run the same Drover version on both",
        pb::PROTOCOL_VERSION
    );
    // A server of protocol 1 answers without checking (and without saying its release); a
    // newer one refuses the registration itself.
    let mut old = Script::assigning(Vec::new());
    old.registered.protocol = 0;
    old.registered.version = String::new();
    let mut new = Script::assigning(Vec::new());
    new.refuse = Some(Status::failed_precondition(refusal.clone()));
    let cases = [
        (
            old,
            format!(
                "agent {ours} speaks protocol {}, server (version unknown) speaks protocol 1: run the same Drover version on both",
                pb::PROTOCOL_VERSION
            ),
        ),
        (new, refusal),
    ];
    for (script, want) in cases {
        let mut run = start(script).await;
        let ended = tokio::time::timeout(WAIT, &mut run.agent).await.expect("the agent kept reconnecting");
        let err = ended.unwrap().expect_err("the agent took the server");
        assert!(matches!(err, AgentError::Incompatible(_)), "{err:?}");
        assert_eq!(err.to_string(), want);
        assert_eq!(run.sessions.load(Ordering::SeqCst), 1, "the agent connected again");
    }
}
