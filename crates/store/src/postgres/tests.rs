//! The conformance suite on PostgreSQL, and what only a shared database can get wrong:
//! concurrent replicas, signals between them, leadership, and broken connections.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use drover_core::placement::place;
use sqlx::{Connection, Executor};
use tokio::sync::broadcast::error::RecvError;

use super::PostgresStore;
use crate::conformance::{job, task};
use crate::pg_test::TempPostgres;
use crate::*;
use drover_core::placement::Placement;
use drover_core::{JobState, Resources, TaskPlan, TaskState};

/// A store on a fresh database of the shared test server.
async fn fresh() -> Box<PostgresStore> {
    let url = TempPostgres::shared().url_for_new_database().await;
    Box::new(PostgresStore::connect(&url).await.unwrap())
}

crate::store_conformance!(fresh().await);

/// Shorter than on SQLite: every step is three transactions over a socket.
#[tokio::test]
async fn long_chain_runs_to_the_end() {
    crate::conformance::long_chain_runs_to_the_end(&*fresh().await, 2_000).await;
}

#[tokio::test]
async fn large_job_records_every_task_once() {
    crate::conformance::large_job_records_every_task_once(&*fresh().await, 5_000).await;
}

fn node(name: &str, cores: u32) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        labels: BTreeMap::new(),
        cores,
        memory: 1 << 40,
        runtimes: vec!["process".into()],
        lease_until_ms: i64::MAX / 2,
    }
}

fn done(a: &Assignment) -> AttemptReport {
    AttemptReport {
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
    }
}

/// Places and assigns until a round finds nothing to place; returns every assignment made.
async fn schedule_until_idle(store: PostgresStore, limit: u32) -> Vec<Assignment> {
    let mut all = Vec::new();
    loop {
        let (nodes, mut queue) = crate::conformance::snapshot(&store, 10, &[]).await;
        queue.truncate(limit as usize);
        let plan = place(&nodes, &queue);
        if plan.is_empty() {
            return all;
        }
        all.extend(store.assign(&plan, 10).await.unwrap());
    }
}

async fn assert_events_consecutive(store: &PostgresStore, job_id: i64) {
    let events = store.events_after(job_id, 0, 100_000).await.unwrap();
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as i64).collect::<Vec<_>>(), "job {job_id}");
    assert_eq!(store.job(job_id).await.unwrap().unwrap().last_seq, events.len() as i64);
}

/// Two replicas scheduling the same queue at once: every task is placed exactly once, no node
/// gets more than it has, and events stay consecutive per job while both settle attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_replicas_place_each_task_once() {
    let url = TempPostgres::shared().url_for_new_database().await;
    let (a, b) = (PostgresStore::connect(&url).await.unwrap(), PostgresStore::connect(&url).await.unwrap());
    let mut jobs = Vec::new();
    for (i, n) in [300, 100, 100].into_iter().enumerate() {
        let tasks = (0..n).map(|t| task(&format!("j{i}t{t}"), &[])).collect();
        jobs.push(a.submit(&job(tasks), "", "f", 1).await.unwrap());
    }
    // 6 x 80 = 480 cores for 500 one-core tasks: 20 must stay queued.
    for n in 0..6 {
        b.register_node(&node(&format!("n{n}"), 80), &[], 1).await.unwrap();
    }
    let started = Instant::now();
    let rounds: Vec<_> = [(a.clone(), 100), (b.clone(), 64), (a.clone(), 37), (b.clone(), 150)]
        .into_iter()
        .map(|(store, limit)| tokio::spawn(schedule_until_idle(store, limit)))
        .collect();
    let mut assigned = Vec::new();
    for r in rounds {
        assigned.extend(r.await.unwrap());
    }
    eprintln!("500 tasks, 4 concurrent schedulers: {} assigned in {:?}", assigned.len(), started.elapsed());
    let unique: HashSet<i64> = assigned.iter().map(|x| x.task_id).collect();
    assert_eq!(unique.len(), assigned.len(), "a task was assigned twice");
    assert_eq!(assigned.len(), 480, "capacity is 480 cores");
    for n in a.nodes().await.unwrap() {
        assert_eq!((n.running, n.cores_used), (80, 80), "node {}", n.name);
    }
    for j in &jobs {
        for t in a.tasks(*j).await.unwrap() {
            assert!(t.attempts <= 1, "{t:?}");
            assert_eq!(t.attempts == 1, unique.contains(&t.id));
        }
    }

    // Both replicas settle attempts concurrently, interleaving events of the same jobs.
    let settle = |store: PostgresStore, part: Vec<Assignment>| {
        tokio::spawn(async move {
            for x in part {
                assert_eq!(store.attempt_started(x.attempt_id, x.epoch, 20).await.unwrap(), Applied::Applied);
                assert_eq!(store.attempt_finished(&done(&x), 30).await.unwrap(), Applied::Applied);
            }
        })
    };
    let (even, odd): (Vec<_>, Vec<_>) = assigned.into_iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let even: Vec<Assignment> = even.into_iter().map(|(_, x)| x).collect();
    let odd: Vec<Assignment> = odd.into_iter().map(|(_, x)| x).collect();
    let again: Vec<Assignment> = even.clone();
    let workers = [settle(a.clone(), even), settle(b.clone(), odd)];
    for w in workers {
        w.await.unwrap();
    }
    // Reports sent again are stale.
    for x in again.iter().take(5) {
        assert_eq!(b.attempt_finished(&done(x), 40).await.unwrap(), Applied::Stale);
    }
    let rest = schedule_until_idle(b.clone(), 1000).await;
    assert_eq!(rest.len(), 20);
    for x in &rest {
        a.attempt_finished(&done(x), 50).await.unwrap();
    }
    for j in &jobs {
        assert_eq!(a.job(*j).await.unwrap().unwrap().state, JobState::Succeeded);
        assert_events_consecutive(&a, *j).await;
    }
}

/// A placement whose task another replica claimed first is filled by a queued frame of the
/// same job and task (it stands in), never by another job's frame or a task of another
/// size; and only as many as are queued.
#[tokio::test]
async fn a_frame_stands_in_for_one_another_replica_took() {
    let url = TempPostgres::shared().url_for_new_database().await;
    let (a, b) = (PostgresStore::connect(&url).await.unwrap(), PostgresStore::connect(&url).await.unwrap());
    let frames = |n: i64| -> Vec<TaskPlan> {
        (1..=n).map(|f| TaskPlan { frame: Some(f), ..task("render", &[]) }).collect()
    };
    let mut first = frames(4);
    first.push(TaskPlan { resources: Resources { cores: 2, memory: 0, pids: 0 }, ..task("big", &[]) });
    let job1 = a.submit(&job(first), "", "f", 1).await.unwrap();
    let job2 = a.submit(&job(frames(3)), "", "f", 1).await.unwrap();
    let n0 = a.register_node(&node("n0", 8), &[], 1).await.unwrap().node_id;
    let n1 = b.register_node(&node("n1", 8), &[], 1).await.unwrap().node_id;
    let tasks = a.tasks(job1).await.unwrap();
    let id = |name: &str, frame: Option<i64>| {
        tasks.iter().find(|t| t.name == name && t.frame == frame).map(|t| t.id).expect("task")
    };
    let on = |node_id: i64, ids: &[i64]| -> Vec<Placement> {
        ids.iter().map(|&task_id| Placement { task_id, node_id, ahead: false }).collect()
    };
    let (f1, f2, f3, f4, big) = (
        id("render", Some(1)),
        id("render", Some(2)),
        id("render", Some(3)),
        id("render", Some(4)),
        id("big", None),
    );
    // Replica a claims frames 1-3 and the big task first.
    let took = a.assign(&on(n0, &[f1, f2, f3, big]), 10).await.unwrap();
    assert_eq!(
        took.iter().map(|x| (x.task_id, x.instead_of)).collect::<Vec<_>>(),
        [(f1, None), (f2, None), (f3, None), (big, None)]
    );
    // Replica b placed the same tasks from its own snapshot: frame 4 is all that can stand in.
    let stood = b.assign(&on(n1, &[f1, f2, f3, big]), 11).await.unwrap();
    assert_eq!(stood.len(), 1, "{stood:?}");
    assert_eq!((stood[0].task_id, stood[0].instead_of, stood[0].node_id), (f4, Some(f1), n1));
    assert_eq!(stood[0].plan.frame, Some(4));
    let state = |t: &TaskRecord| (t.state, t.attempts);
    for t in a.tasks(job2).await.unwrap() {
        assert_eq!(state(&t), (TaskState::Queued, 0), "another job's frame never stands in: {t:?}");
    }
    for t in a.tasks(job1).await.unwrap() {
        assert_eq!(state(&t), (TaskState::Assigned, 1), "{t:?}");
    }
    let nodes = a.nodes().await.unwrap();
    let used = |id: i64| nodes.iter().find(|n| n.id == id).map(|n| (n.running, n.cores_used));
    assert_eq!((used(n0), used(n1)), (Some((4, 5)), Some((1, 1))));
    assert_events_consecutive(&a, job1).await;
}

/// Several replicas starting at once on an empty database migrate it once, without errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_starts_migrate_once() {
    let url = TempPostgres::shared().url_for_new_database().await;
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PostgresStore::connect(&url).await })
        })
        .collect();
    for s in starts {
        s.await.unwrap().unwrap();
    }
}

/// Many concurrent writers on one job: sequence numbers stay consecutive and unique, and log
/// line ids are committed in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_keep_one_jobs_history_in_order() {
    let store = *fresh().await;
    let tasks = (0..40).map(|t| task(&format!("t{t}"), &[])).collect();
    let job_id = store.submit(&job(tasks), "", "f", 1).await.unwrap();
    store.register_node(&node("n", 64), &[], 1).await.unwrap();
    let assigned = schedule_until_idle(store.clone(), 1000).await;
    assert_eq!(assigned.len(), 40);
    let writers: Vec<_> = assigned
        .into_iter()
        .map(|x| {
            let store = store.clone();
            tokio::spawn(async move {
                store.attempt_started(x.attempt_id, x.epoch, 2).await.unwrap();
                for i in 0..5u8 {
                    let line = OutputLine { step: 0, stderr: false, data: vec![i] };
                    store.append_output(x.attempt_id, x.epoch, &[line.clone(), line]).await.unwrap();
                }
                store.attempt_finished(&done(&x), 3).await.unwrap();
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    assert_events_consecutive(&store, job_id).await;
    assert_eq!(store.job(job_id).await.unwrap().unwrap().state, JobState::Succeeded);
    let logs = store.logs_after(job_id, &TaskFilter::default(), 0, 10_000).await.unwrap();
    assert_eq!(logs.len(), 400);
    assert!(logs.windows(2).all(|w| w[0].id < w[1].id));
}

/// Two replicas applying batches of the same attempts' reports in opposite orders at once (an
/// agent re-sent its outbox to a second replica while the first was still committing): no
/// batch fails, every attempt is settled exactly once, and each job's events stay consecutive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_batches_settle_each_attempt_once() {
    let url = TempPostgres::shared().url_for_new_database().await;
    let (a, b) = (PostgresStore::connect(&url).await.unwrap(), PostgresStore::connect(&url).await.unwrap());
    let mut jobs = Vec::new();
    for j in 0..4 {
        let tasks = (0..50).map(|t| task(&format!("j{j}t{t}"), &[])).collect();
        jobs.push(a.submit(&job(tasks), "", "f", 1).await.unwrap());
    }
    a.register_node(&node("batches", 200), &[], 1).await.unwrap();
    let assigned = schedule_until_idle(a.clone(), 1000).await;
    assert_eq!(assigned.len(), 200);
    let mut reports: Vec<AttemptUpdate> = Vec::new();
    for x in &assigned {
        reports.push(AttemptUpdate::Started { attempt_id: x.attempt_id, epoch: x.epoch });
        reports.push(AttemptUpdate::Finished(done(x)));
    }
    let mut backwards = reports.clone();
    backwards.reverse();
    let apply = |store: PostgresStore, updates: Vec<AttemptUpdate>| {
        tokio::spawn(async move {
            let mut finished = 0;
            for batch in updates.chunks(37) {
                let applied = store.apply_updates(batch, 5).await.unwrap();
                finished += batch
                    .iter()
                    .zip(applied)
                    .filter(|(u, r)| u.is_finished() && *r == Applied::Applied)
                    .count();
            }
            finished
        })
    };
    let (fa, fb) = (apply(a.clone(), reports), apply(b.clone(), backwards));
    let finished = fa.await.unwrap() + fb.await.unwrap();
    assert_eq!(finished, 200, "each attempt's finish applied by exactly one replica");
    for job_id in jobs {
        assert_events_consecutive(&a, job_id).await;
        assert_eq!(a.job(job_id).await.unwrap().unwrap().state, JobState::Succeeded);
        let events = a.events_after(job_id, 0, 10_000).await.unwrap();
        let mut settled = HashSet::new();
        for e in events.iter().filter(|e| e.kind == "task" && e.state == "succeeded") {
            assert!(settled.insert(e.task_id), "task {} settled twice", e.task_id);
        }
        assert_eq!(settled.len(), 50);
    }
}

async fn recv_within(rx: &mut tokio::sync::broadcast::Receiver<Signal>, wanted: Signal) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(s)) if s == wanted => return,
            Ok(Ok(_)) | Ok(Err(RecvError::Lagged(_))) => continue,
            Ok(Err(RecvError::Closed)) => panic!("signal channel closed"),
            Err(_) => panic!("no {wanted:?} within 10s"),
        }
    }
}

/// A signal published by one server reaches every server, itself included.
#[tokio::test]
async fn publish_reaches_every_replica() {
    let url = TempPostgres::shared().url_for_new_database().await;
    let (a, b) = (PostgresStore::connect(&url).await.unwrap(), PostgresStore::connect(&url).await.unwrap());
    let (mut at_a, mut at_b) = (a.subscribe(), b.subscribe());
    for s in [
        Signal::Changed { job_id: 7 },
        Signal::Schedule,
        Signal::Cancel { attempt_id: 3, node_id: 9 },
        Signal::NodeRevoked { node_id: 4 },
    ] {
        a.publish(s).await.unwrap();
        recv_within(&mut at_b, s).await;
        recv_within(&mut at_a, s).await;
    }
}

/// Pids of the sessions on `url`'s database whose application name starts with `app`.
async fn sessions(admin: &mut sqlx::PgConnection, database: &str, app: &str) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name LIKE $2 || '%' \
         AND pid <> pg_backend_pid()",
    )
    .bind(database)
    .bind(app)
    .fetch_all(&mut *admin)
    .await
    .unwrap()
}

async fn terminate(admin: &mut sqlx::PgConnection, pids: &[i32]) {
    for pid in pids {
        sqlx::query("SELECT pg_terminate_backend($1)").bind(pid).execute(&mut *admin).await.unwrap();
    }
}

fn database_of(url: &str) -> String {
    url.rsplit('/').next().unwrap_or_default().split('?').next().unwrap_or_default().to_string()
}

/// Leadership is exclusive; when the leader's lock connection dies, it learns so within a
/// few seconds and another server can lead.
#[tokio::test]
async fn leadership_is_exclusive_and_lost_with_its_connection() {
    let server = TempPostgres::shared();
    let url = server.url_for_new_database().await;
    let (a, b) = (PostgresStore::connect(&url).await.unwrap(), PostgresStore::connect(&url).await.unwrap());
    let lead = a.try_lead("reaper").await.unwrap().expect("nobody leads yet");
    assert!(lead.is_held());
    assert!(b.try_lead("reaper").await.unwrap().is_none(), "two leaders");
    assert!(a.try_lead("reaper").await.unwrap().is_none(), "not reentrant: one guard per loop");
    let other = b.try_lead("autoscaler").await.unwrap().expect("another loop is free");

    let mut admin = sqlx::PgConnection::connect(server.admin_url()).await.unwrap();
    let pids = sessions(&mut admin, &database_of(&url), "drover-lead-reaper").await;
    assert_eq!(pids.len(), 1);
    terminate(&mut admin, &pids).await;
    let since = Instant::now();
    while lead.is_held() {
        assert!(since.elapsed() < Duration::from_secs(6), "still held {:?} after the kill", since.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("leadership loss noticed after {:?}", since.elapsed());
    let lead_b = b.try_lead("reaper").await.unwrap().expect("the lock went with the session");
    assert!(lead_b.is_held() && other.is_held());

    // Dropping the guard releases the lock.
    drop(lead_b);
    let since = Instant::now();
    loop {
        if let Some(l) = a.try_lead("reaper").await.unwrap() {
            assert!(l.is_held());
            break;
        }
        assert!(since.elapsed() < Duration::from_secs(5), "dropped guard kept the lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A store keeps working after every one of its sessions was terminated: the pool opens new
/// connections, and the listener reconnects and tells subscribers to look again.
#[tokio::test]
async fn store_survives_terminated_connections() {
    let server = TempPostgres::shared();
    let url = server.url_for_new_database().await;
    let store = PostgresStore::connect(&url).await.unwrap();
    let job_id = store.submit(&job(vec![task("a", &[])]), "", "f", 1).await.unwrap();
    let mut rx = store.subscribe();
    let mut admin = sqlx::PgConnection::connect(server.admin_url()).await.unwrap();
    let pids = sessions(&mut admin, &database_of(&url), "drover").await;
    assert!(pids.len() >= 2, "pool and listener: {pids:?}");
    terminate(&mut admin, &pids).await;
    recv_within(&mut rx, Signal::Changed { job_id: 0 }).await;
    recv_within(&mut rx, Signal::Schedule).await;
    assert!(store.job(job_id).await.unwrap().is_some());
    store.submit(&job(vec![task("b", &[])]), "", "f", 2).await.unwrap();
    store.publish(Signal::Changed { job_id }).await.unwrap();
    recv_within(&mut rx, Signal::Changed { job_id }).await;
}

/// PostgreSQL restarting under a running store: queries work again once it is back, the
/// listener resynchronises, and leadership is reported lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_survives_a_postgres_restart() {
    let server = TempPostgres::start().unwrap();
    let url = server.url_for_new_database().await;
    let store = PostgresStore::connect(&url).await.unwrap();
    let job_id = store.submit(&job(vec![task("a", &[])]), "", "f", 1).await.unwrap();
    let lead = store.try_lead("reaper").await.unwrap().unwrap();
    let mut rx = store.subscribe();
    let since = Instant::now();
    server.restart().await.unwrap();
    eprintln!("postgres restarted in {:?}", since.elapsed());
    recv_within(&mut rx, Signal::Schedule).await;
    let since = Instant::now();
    while lead.is_held() {
        assert!(since.elapsed() < Duration::from_secs(6));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(store.job(job_id).await.unwrap().is_some());
    store.publish(Signal::Changed { job_id }).await.unwrap();
    recv_within(&mut rx, Signal::Changed { job_id }).await;
    assert!(store.try_lead("reaper").await.unwrap().is_some());
    drop(store);
    drop(server);
}

/// The admin URL works with plain sqlx, and each new database is empty and separate.
#[tokio::test]
async fn temp_postgres_gives_separate_databases() {
    let server = TempPostgres::shared();
    let (one, two) = (server.url_for_new_database().await, server.url_for_new_database().await);
    assert_ne!(one, two);
    let mut conn = sqlx::PgConnection::connect(&one).await.unwrap();
    conn.execute("CREATE TABLE only_here (x INT)").await.unwrap();
    let mut conn = sqlx::PgConnection::connect(&two).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pg_tables WHERE tablename = 'only_here'")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

/// Every writer at once, from two replicas (schedulers, agents reporting, a user cancelling,
/// nodes re-registering and expiring): no transaction fails, and the state stays consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_concurrent_writers_keep_state_consistent() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let url = TempPostgres::shared().url_for_new_database().await;
    let (a, b) = (PostgresStore::connect(&url).await.unwrap(), PostgresStore::connect(&url).await.unwrap());
    let mut jobs = Vec::new();
    for j in 0..12 {
        let mut tasks: Vec<_> = (0..20).map(|t| task(&format!("t{t}"), &[])).collect();
        tasks.push(task("after", &["t0", "t1"]));
        for t in &mut tasks {
            t.retries = drover_core::RetryPolicy { count: 1, backoff: Duration::ZERO, ..Default::default() };
        }
        jobs.push(a.submit(&job(tasks), "", &format!("j{j}"), 1).await.unwrap());
    }
    for n in 0..4 {
        a.register_node(&node(&format!("n{n}"), 8), &[], 1).await.unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Assignment>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut workers = Vec::new();
    for store in [a.clone(), b.clone()] {
        let (stop, tx) = (stop.clone(), tx.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (nodes, mut queue) = crate::conformance::snapshot(&store, 10, &[]).await;
                queue.truncate(50);
                for x in store.assign(&place(&nodes, &queue), 10).await.unwrap() {
                    let _ = tx.send(x);
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    for (i, store) in [a.clone(), b.clone(), a.clone(), b.clone()].into_iter().enumerate() {
        let (stop, rx) = (stop.clone(), rx.clone());
        workers.push(tokio::spawn(async move {
            let mut n = i;
            while !stop.load(Ordering::Relaxed) {
                let next =
                    tokio::time::timeout(Duration::from_millis(50), async { rx.lock().await.recv().await });
                let Ok(Some(x)) = next.await else { continue };
                n += 1;
                store.attempt_started(x.attempt_id, x.epoch, 20).await.unwrap();
                let line = OutputLine { step: 0, stderr: false, data: b"x".to_vec() };
                store.append_output(x.attempt_id, x.epoch, &[line]).await.unwrap();
                let mut report = done(&x);
                report.exit_code = Some(if n % 5 == 0 { 1 } else { 0 });
                store.attempt_finished(&report, 30).await.unwrap();
            }
        }));
    }
    {
        let (stop, store, jobs) = (stop.clone(), b.clone(), jobs.clone());
        workers.push(tokio::spawn(async move {
            for job_id in jobs.iter().step_by(3) {
                tokio::time::sleep(Duration::from_millis(150)).await;
                store.cancel_job(*job_id, 40).await.unwrap();
            }
            while !stop.load(Ordering::Relaxed) {
                // A node restarting without its attempts, and one going silent.
                store.register_node(&node("n0", 8), &[], 50).await.unwrap();
                let mut silent = node("n3", 8);
                silent.lease_until_ms = 55;
                store.register_node(&silent, &[], 50).await.unwrap();
                tokio::time::sleep(Duration::from_millis(40)).await;
                store.expire_nodes(60).await.unwrap();
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }

    // Every open attempt is its task's current one and the task is placed; no node is
    // over-committed; job states match their tasks; histories are consecutive.
    let bad: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM attempts a JOIN tasks t ON t.id = a.task_id WHERE a.state <> 'ended' \
         AND (t.current_attempt IS DISTINCT FROM a.id OR t.state NOT IN ('assigned', 'running'))",
    )
    .fetch_one(a.pool())
    .await
    .unwrap();
    assert_eq!(bad, 0, "open attempts that are not current");
    let orphaned: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM tasks t LEFT JOIN attempts a ON a.id = t.current_attempt \
         WHERE t.state IN ('assigned', 'running') AND (a.id IS NULL OR a.state = 'ended')",
    )
    .fetch_one(a.pool())
    .await
    .unwrap();
    assert_eq!(orphaned, 0, "placed tasks without an open attempt");
    for n in a.nodes().await.unwrap() {
        assert!(n.cores_used <= n.cores, "{n:?}");
    }
    let mut ended = 0;
    for j in &jobs {
        let tasks = a.tasks(*j).await.unwrap();
        let record = a.job(*j).await.unwrap().unwrap();
        assert_eq!(
            record.state,
            JobState::derive(tasks.iter().map(|t| t.state), record.cancelled),
            "job {j}"
        );
        ended += tasks.iter().filter(|t| t.state.is_final()).count();
        assert_events_consecutive(&a, *j).await;
    }
    eprintln!("mixed writers: {ended} of {} tasks ended", jobs.len() * 21);
    assert!(ended > 0);
}

/// Rough throughput of the task life cycle on one store (run with `--ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn throughput_smoke() {
    let store = *fresh().await;
    let n = 5000;
    let since = Instant::now();
    let job_id =
        store.submit(&job((0..n).map(|t| task(&format!("t{t}"), &[])).collect()), "", "f", 1).await.unwrap();
    eprintln!("submit {n} tasks: {:?}", since.elapsed());
    for i in 0..10 {
        store.register_node(&node(&format!("n{i}"), 1000), &[], 1).await.unwrap();
    }
    let since = Instant::now();
    let assigned = schedule_until_idle(store.clone(), 1000).await;
    assert_eq!(assigned.len(), n);
    eprintln!("place+assign {n} tasks (rounds of 1000): {:?}", since.elapsed());
    let since = Instant::now();
    let chunks: Vec<Vec<Assignment>> = assigned.chunks(n / 8).map(|c| c.to_vec()).collect();
    let workers: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let store = store.clone();
            tokio::spawn(async move {
                for x in chunk {
                    store.attempt_started(x.attempt_id, x.epoch, 2).await.unwrap();
                    store.attempt_finished(&done(&x), 3).await.unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let took = since.elapsed();
    eprintln!(
        "start+finish {n} tasks, 8 concurrent: {took:?} ({:.0} tasks/s)",
        n as f64 / took.as_secs_f64()
    );
    assert_eq!(store.job(job_id).await.unwrap().unwrap().state, JobState::Succeeded);
}
