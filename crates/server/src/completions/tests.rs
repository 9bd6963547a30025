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
    let batches = write(store.clone(), rx, 4).await;
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
    commit(store.as_ref(), batch).await;
    let got = outcomes(receivers).await;
    assert!(matches!(got[0], Ok(Applied::Applied)), "{:?}", got[0]);
    assert!(matches!(got[1], Err(StoreError::Corrupt { .. })), "{:?}", got[1]);
    assert!(matches!(got[2], Ok(Applied::Applied)), "{:?}", got[2]);
    let states: Vec<TaskState> = store.tasks(job_id).await.unwrap().iter().map(|t| t.state).collect();
    assert_eq!(states, vec![TaskState::Succeeded, TaskState::Assigned, TaskState::Succeeded]);
}
