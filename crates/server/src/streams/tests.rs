//! Streams over a real gRPC connection: they end when their client leaves, even while they
//! have nothing to send, and when their job ends.

use std::sync::Arc;
use std::time::Duration;

use drover_proto as pb;
use drover_proto::drover_client::DroverClient;
use drover_proto::drover_server::DroverServer;
use drover_store::conformance::{job, schedule, task};
use drover_store::sqlite::SqliteStore;
use drover_store::{AttemptReport, NodeSpec, OutputLine, Store};
use tokio::time::Instant;
use tonic::transport::Channel;

use super::StreamKind;
use crate::client_api::ClientApi;
use crate::testing::shared_with;
use crate::{ServerConfig, Shared};

/// How long a test waits for what should happen at once before it fails: many poll periods,
/// so that only a stream that never notices fails it.
const PATIENCE: Duration = Duration::from_secs(20);

/// A client API over a fresh SQLite store on a loopback port, with authorization off.
async fn serve() -> (Arc<Shared>, Arc<SqliteStore>, DroverClient<Channel>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("drover.db")).await.unwrap());
    let shared = shared_with(store.clone(), ServerConfig { auth: false, ..ServerConfig::default() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let api = DroverServer::new(ClientApi(shared.clone()));
    tokio::spawn(tonic::transport::Server::builder().add_service(api).serve_with_incoming(incoming));
    let client = DroverClient::connect(url).await.unwrap();
    (shared, store, client, dir)
}

/// Waits until no stream of `kind` is open; fails after [`PATIENCE`].
async fn until_none_open(shared: &Shared, kind: StreamKind) {
    let deadline = Instant::now() + PATIENCE;
    while shared.streams.count(kind) > 0 {
        assert!(Instant::now() < deadline, "a {kind:?} stream is still open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn follow(job_id: i64) -> pb::LogsRequest {
    pb::LogsRequest { job_id, follow: true, chunks: true, ..Default::default() }
}

/// A job that never ends (nothing can run it) gives its streams nothing new to send; they
/// still end once their client is gone.
#[tokio::test]
async fn streams_end_when_their_client_leaves() {
    let (shared, store, mut client, _dir) = serve().await;
    let job_id = store.submit(&job(vec![task("t", &[])]), "", "f", 1).await.unwrap();

    let mut watch = client.watch(pb::WatchRequest { job_id, after_seq: 0 }).await.unwrap().into_inner();
    assert!(watch.message().await.unwrap().is_some(), "the job's first events");
    let logs = client.logs(follow(job_id)).await.unwrap().into_inner();
    assert_eq!(shared.streams.count(StreamKind::Watch), 1);
    assert_eq!(shared.streams.count(StreamKind::Logs), 1);

    drop(watch);
    drop(logs);
    drop(client);
    until_none_open(&shared, StreamKind::Watch).await;
    until_none_open(&shared, StreamKind::Logs).await;
}

/// Streams of a job that ends send everything, then end by themselves.
#[tokio::test]
async fn streams_of_a_job_that_ends_close_normally() {
    let (shared, store, mut client, _dir) = serve().await;
    let job_id = store.submit(&job(vec![task("t", &[])]), "", "f", 1).await.unwrap();
    let node = NodeSpec {
        name: "n".into(),
        labels: Default::default(),
        cores: 1,
        memory: 1 << 30,
        runtimes: vec!["process".into()],
        lease_until_ms: i64::MAX / 2,
    };
    store.register_node(&node, &[], 1).await.unwrap();
    let a = schedule(&*store, 2).await.remove(0);

    let mut watch = client.watch(pb::WatchRequest { job_id, after_seq: 0 }).await.unwrap().into_inner();
    let mut logs = client.logs(follow(job_id)).await.unwrap().into_inner();
    store.attempt_started(a.attempt_id, a.epoch, 3).await.unwrap();
    let line = OutputLine { step: 0, stderr: false, data: b"hi\n".to_vec() };
    store.append_output(a.attempt_id, a.epoch, &[line]).await.unwrap();
    let report =
        AttemptReport { attempt_id: a.attempt_id, epoch: a.epoch, exit_code: Some(0), ..Default::default() };
    store.attempt_finished(&report, 4).await.unwrap();
    shared.changes.send_modify(|v| *v += 1);

    let mut last = None;
    let events = async {
        while let Some(event) = watch.message().await.unwrap() {
            last = Some(event);
        }
    };
    tokio::time::timeout(PATIENCE, events).await.expect("the watch stream ends with its job");
    let last = last.unwrap();
    assert_eq!((last.kind.as_str(), last.state.as_str()), ("job", "succeeded"));
    let mut output = Vec::new();
    let read = async {
        while let Some(batch) = logs.message().await.unwrap() {
            output.extend(batch.chunks.into_iter().flat_map(|c| c.data));
        }
    };
    tokio::time::timeout(PATIENCE, read).await.expect("the log stream ends with its job");
    assert_eq!(output, b"hi\n");
    until_none_open(&shared, StreamKind::Watch).await;
    until_none_open(&shared, StreamKind::Logs).await;
}
