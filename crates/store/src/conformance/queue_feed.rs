//! The queue feed: a scheduler's in-memory mirror, fed only with changes, matches the queue.

use drover_core::schedule_state::ScheduleState;

use super::*;

/// A scheduler's memory of the queue and where its feed resumes.
struct Mirror {
    state: ScheduleState,
    cursor: i64,
}

impl Mirror {
    async fn new(store: &dyn Store) -> Mirror {
        let mut mirror = Mirror { state: ScheduleState::new(), cursor: 0 };
        let all = store.queue_changes(None).await.unwrap();
        mirror.apply(all);
        mirror
    }

    fn apply(&mut self, changes: QueueChanges) {
        for id in changes.left {
            self.state.left_queue(id);
        }
        for entry in changes.queued {
            self.state.queued(entry);
        }
        self.cursor = changes.cursor;
    }

    /// Reads what changed and checks the mirror against the whole queue.
    async fn sync_and_check(&mut self, store: &dyn Store, when: &str) {
        let changes = store.queue_changes(Some(self.cursor)).await.unwrap();
        assert!(changes.cursor >= self.cursor, "{when}: the cursor went back");
        self.apply(changes);
        let rebuilt = Mirror::new(store).await;
        assert_eq!(self.state.queue_snapshot(), rebuilt.state.queue_snapshot(), "{when}");
    }

    fn queued(&self) -> Vec<i64> {
        self.state.queue_snapshot().into_keys().collect()
    }
}

/// Submits, assignments, retries with backoff, released and skipped dependents, a lost node
/// and a cancel each reach a mirror fed only with [`Store::queue_changes`]; node books carry
/// what each open attempt reserves.
pub async fn queue_feed_mirrors_the_queue(store: &dyn Store) {
    let mut mirror = Mirror::new(store).await;
    assert!(mirror.queued().is_empty());
    let mut retried = task("r", &[]);
    retried.retries = RetryPolicy { count: 2, backoff: Duration::from_millis(1000), ..Default::default() };
    let id = store
        .submit(&job(vec![task("a", &[]), task("b", &["a"]), retried, task("c", &["b"])]), "", "f", 1)
        .await
        .unwrap();
    mirror.sync_and_check(store, "after a submit").await;
    assert_eq!(mirror.queued().len(), 2, "`a` and `r` are queued; `b` and `c` wait");

    let n = store.register_node(&node("feed", 1, 100_000), &[], 1).await.unwrap();
    let first = schedule(store, 2).await;
    assert_eq!(first.len(), 1);
    mirror.sync_and_check(store, "after an assignment").await;
    assert_eq!(mirror.queued().len(), 1);
    let books = store.node_books(&[n.node_id, 999_999]).await.unwrap();
    assert_eq!(books.len(), 1, "an unknown node is left out");
    assert_eq!(books[0].capacity.cores, 1);
    assert_eq!(books[0].attempts.keys().copied().collect::<Vec<_>>(), vec![first[0].attempt_id]);
    assert_eq!(books[0].free().cores, 0);

    // A failure with retries left queues the task again, behind its backoff.
    let code = if first[0].plan.name == "r" { 1 } else { 0 };
    store.attempt_finished(&done(&first[0], code), 10).await.unwrap();
    mirror.sync_and_check(store, "after a finish").await;
    assert!(store.node_books(&[n.node_id]).await.unwrap()[0].attempts.is_empty());

    // Run everything that becomes placeable, failing `b`: `c` is skipped and never queued.
    let mut now = 20;
    while !store.job(id).await.unwrap().unwrap().state.is_final() {
        now += 2_000;
        let placed = schedule(store, now).await;
        mirror.sync_and_check(store, "after a round").await;
        if placed.is_empty() {
            assert!(now < 100_000, "the job never ended");
            continue;
        }
        for a in &placed {
            let code = if a.plan.name == "b" { 1 } else { 0 };
            store.attempt_finished(&done(a, code), now + 1).await.unwrap();
            mirror.sync_and_check(store, "after a finish").await;
        }
    }
    assert!(mirror.queued().is_empty());

    // A lost node's task is queued again; a cancel takes it out.
    let mut lost = task("l", &[]);
    lost.retries = RetryPolicy { count: 1, backoff: Duration::ZERO, ..Default::default() };
    let second = store.submit(&job(vec![lost, task("m", &[])]), "", "f", now).await.unwrap();
    let short = store.register_node(&node("feed-short", 1, now + 100), &[], now).await.unwrap();
    store.expire_nodes(now).await.unwrap();
    let placed = schedule(store, now + 1).await;
    assert!(!placed.is_empty());
    mirror.sync_and_check(store, "after assigning to a short lease").await;
    assert!(store.expire_nodes(now + 10_000).await.unwrap().contains(&short.node_id));
    mirror.sync_and_check(store, "after a node was lost").await;
    assert!(store.node_books(&[short.node_id]).await.unwrap().is_empty(), "a node that is down is left out");
    store.cancel_job(second, now + 10_001).await.unwrap();
    mirror.sync_and_check(store, "after a cancel").await;
    assert!(mirror.queued().is_empty());
}
