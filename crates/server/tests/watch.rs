//! `Watch` through the real API of an in-process server, on a job whose history is longer
//! than one page of events.

mod common;

use std::time::Duration;

use common::Server;
use drover_proto as pb;
use drover_store::Store;
use drover_store::conformance::{job, task};
use futures::StreamExt;

/// A watch whose last page of events is full, ending with the job's final event, ends once it
/// finds nothing after it, instead of waiting for changes that never come (a job with a
/// multiple of a page of events left its watchers hanging).
#[tokio::test]
async fn a_watch_ends_when_the_jobs_final_event_closes_a_full_page() {
    let server = Server::start().await;
    let store = &*server.store;
    let plan = job((0..700).map(|i| task(&format!("t{i}"), &[])).collect());
    let job_id = store.submit(&plan, "", "t.yaml", 1).await.unwrap();
    let mut op = server.operator().await;
    op.cancel(pb::CancelRequest { job_id }).await.unwrap();
    let ended = store.job(job_id).await.unwrap().expect("the job");
    assert!(ended.state.is_final(), "nothing ran: cancelled at once, {:?}", ended.state);
    assert!(ended.last_seq > 1_000, "{} events: more than a page", ended.last_seq);

    for page_from in [ended.last_seq - 1_000, ended.last_seq - 1_001, ended.last_seq - 999] {
        let req = pb::WatchRequest { job_id, after_seq: page_from };
        let mut stream = op.watch(req).await.unwrap().into_inner();
        let mut seqs = Vec::new();
        let done = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(event) = stream.next().await {
                seqs.push(event.expect("an event").seq);
            }
        })
        .await;
        assert!(done.is_ok(), "the watch from {page_from} did not end after {} events", seqs.len());
        assert_eq!(seqs.first(), Some(&(page_from + 1)));
        assert_eq!(seqs.last(), Some(&ended.last_seq), "from {page_from}");
    }
}
