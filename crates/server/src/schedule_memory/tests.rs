//! The memory kept by changes equals a rebuild from the store, whatever happens between rounds.

use std::time::Duration;

use drover_core::RetryPolicy;
use drover_store::conformance::{job, task};
use drover_store::sqlite::SqliteStore;
use drover_store::{AttemptReport, AttemptUpdate, NodeSpec};
use proptest::prelude::*;

use super::*;

/// Nodes in a run; node `i` has a session on replica `i % REPLICAS`.
const NODES: usize = 4;
/// Servers sharing the store.
const REPLICAS: usize = 2;

#[derive(Debug, Clone)]
enum Op {
    /// A job of `tasks` tasks, chained one after the other or independent.
    Submit { tasks: usize, chain: bool, retries: u32, cores: u32, project: usize },
    /// A placement round on one replica, assigning ahead onto busy nodes or not.
    Round { replica: usize, ahead: bool },
    /// Rounds on every replica at once, interleaved at every store call: one may plan a task
    /// another claims first.
    RoundsTogether,
    /// One of a replica's open attempts ends, failing or not.
    Finish { replica: usize, pick: usize, fail: bool },
    /// A node's lease runs out: it is marked down and its attempts are lost.
    LoseNode { node: usize },
    /// A node that was lost registers again.
    Rejoin { node: usize },
    /// A job is cancelled.
    Cancel { pick: usize },
    /// Time passes (backoffs end).
    Wait { ms: i64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1..6usize, any::<bool>(), 0..3u32, 1..3u32, 0..2usize)
            .prop_map(|(tasks, chain, retries, cores, project)| Op::Submit { tasks, chain, retries, cores, project }),
        4 => (0..REPLICAS, any::<bool>()).prop_map(|(replica, ahead)| Op::Round { replica, ahead }),
        2 => Just(Op::RoundsTogether),
        4 => (0..REPLICAS, any::<usize>(), any::<bool>()).prop_map(|(replica, pick, fail)| Op::Finish { replica, pick, fail }),
        1 => (0..NODES).prop_map(|node| Op::LoseNode { node }),
        1 => (0..NODES).prop_map(|node| Op::Rejoin { node }),
        1 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
        1 => (1..3_000i64).prop_map(|ms| Op::Wait { ms }),
    ]
}

/// One replica: its memory and the sessions it holds (node id → epoch).
#[derive(Default)]
struct Replica {
    memory: ScheduleMemory,
    sessions: HashMap<i64, i64>,
    /// Attempts it assigned that have not ended.
    open: Vec<Assignment>,
}

fn spec(node: usize) -> NodeSpec {
    NodeSpec {
        name: format!("node-{node}"),
        labels: BTreeMap::new(),
        cores: 2 + node as u32,
        memory: 1 << 30,
        runtimes: vec!["process".into()],
        lease_until_ms: i64::MAX / 2,
    }
}

/// Rules of a round without held projects.
fn rules(rooms: &BTreeMap<String, Room>, ahead: bool) -> Rules<'_> {
    Rules { held: &[], rooms, ahead }
}

/// What the memory holds, compared with a memory rebuilt from the store for the same sessions.
async fn check(store: &dyn Store, replica: &Replica, when: &str) {
    replica.memory.sync(store, &replica.sessions).await.unwrap();
    let kept = replica.memory.state();
    let rebuilt = ScheduleMemory::default();
    rebuilt.sync(store, &replica.sessions).await.unwrap();
    let rebuilt = rebuilt.state();
    assert_eq!(kept.queue_snapshot(), rebuilt.queue_snapshot(), "queue differs {when}");
    assert_eq!(kept.nodes(), rebuilt.nodes(), "nodes differ {when}");
    for book in rebuilt.nodes().values() {
        // Attempts assigned ahead wait beyond capacity, never beyond one node's worth more.
        let load = book.load();
        assert!(load.capacity.plus(&load.capacity).fits(&load.reserved), "{book:?} overbooked {when}");
    }
}

async fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("drover.db")).await.unwrap();
    let store: &dyn Store = &store;
    let mut replicas: Vec<Replica> = (0..REPLICAS).map(|_| Replica::default()).collect();
    let mut ids = [0i64; NODES];
    let mut now = 1_000;
    for node in 0..NODES {
        let reg = store.register_node(&spec(node), &[], now).await.unwrap();
        ids[node] = reg.node_id;
        replicas[node % REPLICAS].sessions.insert(reg.node_id, reg.epoch);
    }
    let mut jobs = Vec::new();
    for (step, op) in ops.into_iter().enumerate() {
        now += 10;
        match op.clone() {
            Op::Submit { tasks, chain, retries, cores, project } => {
                let plans = (0..tasks)
                    .map(|i| {
                        let name = format!("t{i}");
                        let before = format!("t{}", i.wrapping_sub(1));
                        let deps = [before.as_str()];
                        let mut t = task(&name, if chain && i > 0 { &deps[..] } else { &[] });
                        t.resources.cores = cores;
                        t.retries = RetryPolicy {
                            count: retries,
                            backoff: Duration::from_millis(1_000),
                            ..Default::default()
                        };
                        t
                    })
                    .collect();
                let mut plan = job(plans);
                plan.project = format!("p{project}");
                jobs.push(store.submit(&plan, "", "f", now).await.unwrap());
            }
            Op::Round { replica, ahead } => {
                let r = &mut replicas[replica];
                let round = r
                    .memory
                    .place(store, &r.sessions, &HashMap::new(), now, rules(&BTreeMap::new(), ahead))
                    .await
                    .unwrap();
                r.open.extend(round.assignments);
            }
            Op::RoundsTogether => {
                let [a, b] = &mut replicas[..] else { unreachable!("two replicas") };
                let (none, rooms) = (HashMap::new(), BTreeMap::new());
                let (ra, rb) = tokio::join!(
                    a.memory.place(store, &a.sessions, &none, now, rules(&rooms, true)),
                    b.memory.place(store, &b.sessions, &none, now, rules(&rooms, false)),
                );
                a.open.extend(ra.unwrap().assignments);
                b.open.extend(rb.unwrap().assignments);
            }
            Op::Finish { replica, pick, fail } => {
                let r = &mut replicas[replica];
                if r.open.is_empty() {
                    continue;
                }
                let a = r.open.remove(pick % r.open.len());
                let report = AttemptReport {
                    attempt_id: a.attempt_id,
                    epoch: a.epoch,
                    exit_code: Some(i32::from(fail)),
                    ..Default::default()
                };
                let applied = store.apply_updates(&[AttemptUpdate::Finished(report)], now).await.unwrap();
                assert_eq!(applied.len(), 1);
                // What the group-commit writer does after the commit.
                r.memory.released(&[a.attempt_id]);
            }
            Op::LoseNode { node } => {
                let owner = &mut replicas[node % REPLICAS];
                let Some(epoch) = owner.sessions.remove(&ids[node]) else { continue };
                assert!(store.renew_lease(ids[node], epoch, now - 1, now).await.unwrap());
                assert_eq!(store.expire_nodes(now).await.unwrap(), vec![ids[node]]);
                owner.open.retain(|a| a.node_id != ids[node]);
            }
            Op::Rejoin { node } => {
                let owner = &mut replicas[node % REPLICAS];
                if owner.sessions.contains_key(&ids[node]) {
                    continue;
                }
                let reg = store.register_node(&spec(node), &[], now).await.unwrap();
                owner.sessions.insert(reg.node_id, reg.epoch);
            }
            Op::Cancel { pick } => {
                if let Some(job_id) = jobs.get(pick % jobs.len().max(1)) {
                    store.cancel_job(*job_id, now).await.unwrap();
                }
            }
            Op::Wait { ms } => now += ms,
        }
        for r in &replicas {
            check(store, r, &format!("after step {step}: {op:?}")).await;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random submits, rounds on two replicas, finishes, node losses, re-registrations,
    /// cancels and waits: after each, every replica's memory (kept by the feed, its own
    /// assignments and its committed finishes) equals a memory rebuilt from the store.
    #[test]
    fn memory_kept_by_changes_equals_a_rebuild(ops in proptest::collection::vec(op(), 1..40)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(run(ops));
    }
}

/// After a resync, a node whose session ended before the next round is forgotten, not kept
/// with its old reservations.
#[tokio::test]
async fn a_node_gone_after_a_resync_is_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("drover.db")).await.unwrap();
    let reg = store.register_node(&spec(0), &[], 1).await.unwrap();
    let memory = ScheduleMemory::default();
    memory.sync(&store, &HashMap::from([(reg.node_id, reg.epoch)])).await.unwrap();
    assert_eq!(memory.state().node_ids(), vec![reg.node_id]);
    memory.resync();
    memory.sync(&store, &HashMap::new()).await.unwrap();
    assert!(memory.state().node_ids().is_empty());
}
