//! The group-commit writer against a real SQLite store.

use std::sync::Arc;

use drover_core::{JobState, TaskState};
use drover_store::conformance::{job, schedule, task};
use drover_store::sqlite::SqliteStore;
use drover_store::{Applied, Assignment, AttemptReport, AttemptUpdate, NodeSpec, Store, StoreError};
use tokio::sync::{mpsc, oneshot};

use super::{Queued, Reply, commit, write};

/// A store in a temporary directory with one job of `n` tasks, all assigned to one node.
async fn assigned(n: usize) -> (Arc<SqliteStore>, tempfile::TempDir, i64, Vec<Assignment>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("drover.db")).await.unwrap());
    let tasks = (0..n).map(|i| task(&format!("t{i}"), &[])).collect();
    let job_id = store.submit(&job(tasks), "", "f", 1).await.unwrap();
    let node = NodeSpec {
        name: "n".into(),
        labels: Default::default(),
        cores: n as u32,
        memory: 1 << 30,
        runtimes: vec!["process".into()],
        lease_until_ms: i64::MAX / 2,
    };
    store.register_node(&node, &[], 1).await.unwrap();
    let assigned = schedule(store.as_ref(), 2).await;
    assert_eq!(assigned.len(), n);
    (store, dir, job_id, assigned)
}

fn finished(a: &Assignment) -> AttemptUpdate {
    AttemptUpdate::Finished(AttemptReport {
        attempt_id: a.attempt_id,
        epoch: a.epoch,
        exit_code: Some(0),
        signal: None,
        failure: None,
        message: String::new(),
        cpu_seconds: 0.0,
        peak_memory: 0,
        input_tokens: 0,
        output_tokens: 0,
    })
}

fn queued(update: AttemptUpdate) -> (Queued, oneshot::Receiver<Reply>) {
    let (reply, outcome) = oneshot::channel();
    (Queued { update, reply }, outcome)
}

async fn outcomes(receivers: Vec<oneshot::Receiver<Reply>>) -> Vec<Reply> {
    let mut out = Vec::new();
    for r in receivers {
        out.push(r.await.unwrap());
    }
    out
}

/// Whatever queued up is committed in batches of at most the limit, and every update gets
/// its own outcome, in order; a repeated finish is stale.
#[tokio::test]
async fn queued_updates_commit_in_bounded_batches() {
    let (store, _dir, job_id, assigned) = assigned(10).await;
    let (tx, rx) = mpsc::channel(64);
    let mut receivers = Vec::new();
    let mut updates: Vec<AttemptUpdate> = Vec::new();
    for a in &assigned {
        updates.push(AttemptUpdate::Started { attempt_id: a.attempt_id, epoch: a.epoch });
        updates.push(finished(a));
    }
    updates.push(finished(&assigned[0]));
    for u in updates {
        let (q, r) = queued(u);
        tx.send(q).await.unwrap();
        receivers.push(r);
    }
    drop(tx);
    let batches = write(store.clone(), Default::default(), rx, 4).await;
    assert_eq!(batches, 6, "21 updates in batches of at most 4");
    let got: Vec<Applied> = outcomes(receivers).await.into_iter().map(Result::unwrap).collect();
    let mut want = vec![Applied::Applied; 20];
    want.push(Applied::Stale);
    assert_eq!(got, want);
    assert_eq!(store.job(job_id).await.unwrap().unwrap().state, JobState::Succeeded);
}

/// An update the store cannot apply fails alone: the rest of its batch is still committed.
#[tokio::test]
async fn a_failing_update_does_not_fail_its_batch() {
    let (store, dir, job_id, assigned) = assigned(3).await;
    // A task plan the store cannot decode makes settling that one attempt fail.
    let raw = sqlx::SqlitePool::connect(&format!("sqlite://{}", dir.path().join("drover.db").display()))
        .await
        .unwrap();
    sqlx::query("UPDATE tasks SET plan = 'not json' WHERE id = ?")
        .bind(assigned[1].task_id)
        .execute(&raw)
        .await
        .unwrap();
    raw.close().await;
    let (batch, receivers): (Vec<_>, Vec<_>) = assigned.iter().map(|a| queued(finished(a))).unzip();
    commit(store.as_ref(), &Default::default(), batch).await;
    let got = outcomes(receivers).await;
    assert!(matches!(got[0], Ok(Applied::Applied)), "{:?}", got[0]);
    assert!(matches!(got[1], Err(StoreError::Corrupt { .. })), "{:?}", got[1]);
    assert!(matches!(got[2], Ok(Applied::Applied)), "{:?}", got[2]);
    let states: Vec<TaskState> = store.tasks(job_id).await.unwrap().iter().map(|t| t.state).collect();
    assert_eq!(states, vec![TaskState::Succeeded, TaskState::Assigned, TaskState::Succeeded]);
}

type Outbound = mpsc::Receiver<Result<drover_proto::ServerMessage, tonic::Status>>;

/// An acknowledger over a real store, with the receiving end of its session's stream.
async fn acks() -> (super::Acks, Outbound, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("drover.db")).await.unwrap());
    let (out, rx) = mpsc::channel(16);
    (super::Acks::spawn(store, out), rx, dir)
}

fn ack_seq(msg: Option<Result<drover_proto::ServerMessage, tonic::Status>>) -> Option<u64> {
    match msg?.ok()?.msg? {
        drover_proto::server_message::Msg::Ack(a) => Some(a.seq),
        _ => None,
    }
}

/// Acknowledgements are cumulative on the agent's side, so a report applied at once waits for
/// an earlier one still being committed, and nothing is acknowledged before its commit.
#[tokio::test]
async fn reports_are_acknowledged_in_arrival_order_after_their_commit() {
    let (acks, mut out, _dir) = acks().await;
    let (commit_first, first) = oneshot::channel();
    acks.queued(7, 1, first).await.unwrap();
    acks.done(8, 2, Applied::Applied).await.unwrap();
    let early = tokio::time::timeout(std::time::Duration::from_millis(200), out.recv()).await;
    assert!(early.is_err(), "acknowledged before the commit: {early:?}");
    commit_first.send(Ok(Applied::Applied)).unwrap();
    assert_eq!(ack_seq(out.recv().await), Some(1));
    assert_eq!(ack_seq(out.recv().await), Some(2));
}

/// A stale report is acknowledged (it will never apply) after telling the agent to stop the
/// attempt; a failed commit is not acknowledged and ends the session's acknowledgements.
#[tokio::test]
async fn stale_reports_cancel_and_failed_commits_are_never_acknowledged() {
    let (acks, mut out, _dir) = acks().await;
    let (stale, outcome) = oneshot::channel();
    acks.queued(5, 1, outcome).await.unwrap();
    stale.send(Ok(Applied::Stale)).unwrap();
    match out.recv().await.unwrap().unwrap().msg {
        Some(drover_proto::server_message::Msg::Cancel(c)) => assert_eq!(c.attempt_id, 5),
        other => panic!("expected a cancel, got {other:?}"),
    }
    assert_eq!(ack_seq(out.recv().await), Some(1));
    let (failed, outcome) = oneshot::channel();
    acks.queued(6, 2, outcome).await.unwrap();
    failed.send(Err(StoreError::NotFound { what: "attempt", id: 6 })).unwrap();
    assert!(out.recv().await.unwrap().is_err(), "a failed commit ends the stream with an error");
    // The acknowledger has stopped: the session learns it must end.
    let mut stopped = false;
    for seq in 3..10 {
        if acks.done(9, seq, Applied::Applied).await.is_err() {
            stopped = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(stopped, "reports are still accepted after a failed commit");
    assert!(out.recv().await.is_none(), "no acknowledgement follows a failed commit");
}
