//! The server's background loops: placement and lease expiry.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use drover_store::Signal;
use tokio::sync::broadcast;

use crate::schedule_memory::{Round, Rules};
use crate::{Shared, now_ms};

/// Places queued tasks whenever something may have changed (a submit, a finished attempt, a
/// node joining) and on a short tick so retry backoffs expire on time.
pub(crate) async fn scheduler(shared: Arc<Shared>) {
    loop {
        let _ = tokio::time::timeout(shared.config.schedule_tick, shared.schedule.notified()).await;
        // Rounds in a row that assigned nothing although they placed something: the memory
        // was behind the store (another replica took the tasks, a node filled); the next
        // round's read catches up, but not forever without a pause.
        let mut missed = 0;
        loop {
            match schedule_once(&shared).await {
                // Another round only when this one left room and tasks: most rounds fill what
                // a finish freed, and a round that finds nothing still reads the queue.
                Ok(round) if round.assigned > 0 && round.more => missed = 0,
                Ok(round) if round.assigned > 0 => break,
                Ok(round) if round.refused > 0 && missed < 3 => missed += 1,
                Ok(_) => break,
                Err(e) => {
                    tracing::error!(error = %e, "placement round failed");
                    shared.memory.resync();
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
            }
        }
    }
}

async fn schedule_once(shared: &Shared) -> Result<Round, drover_store::StoreError> {
    // Only nodes with a live session here can receive work; after a server restart, nodes keep
    // their leases in the store until their agents reconnect. A replica without sessions
    // leaves the queue to the others rather than read it on every signal.
    let (sessions, warm): (HashMap<i64, i64>, HashMap<i64, BTreeMap<String, u32>>) = {
        let sessions = shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
        // A node whose agent paused (its disk is full) gets nothing new.
        let epochs =
            sessions.iter().filter(|(_, s)| s.paused.is_empty()).map(|(id, s)| (*id, s.epoch)).collect();
        let warm = sessions
            .iter()
            .filter(|(_, s)| !s.warm.is_empty())
            .map(|(id, s)| (*id, s.warm.clone()))
            .collect();
        (epochs, warm)
    };
    if sessions.is_empty() {
        return Ok(Round::default());
    }
    let now = now_ms();
    let limits = shared.policy.round(shared).await?;
    // Projects held whole (a spent budget, a full quota) stay out of the round, and their
    // queued tasks say why; projects no longer held lose the reason.
    for (project, reason) in &limits.held {
        shared.tenants.set_project_queue_reason(project, reason).await?;
    }
    for project in &limits.free {
        shared.tenants.set_project_queue_reason(project, "").await?;
    }
    let skip: Vec<String> = limits.held.keys().cloned().collect();
    let rules = Rules { held: &skip, rooms: &limits.rooms, ahead: shared.config.assign_ahead };
    let mut round = shared.memory.place(shared.store.as_ref(), &sessions, &warm, now, rules).await?;
    if !round.held.is_empty() {
        shared.tenants.set_queue_reasons(&round.held).await?;
    }
    let assignments = std::mem::take(&mut round.assignments);
    for job_id in assignments.iter().map(|a| a.job_id).collect::<BTreeSet<_>>() {
        shared.publish(Signal::Changed { job_id }).await;
    }
    crate::dispatch::dispatch(shared, assignments).await;
    Ok(round)
}

/// Relays signals from every server sharing the store to this server's streams, scheduler and
/// agent sessions.
pub(crate) async fn signals(shared: Arc<Shared>, mut rx: broadcast::Receiver<Signal>) {
    loop {
        match rx.recv().await {
            Ok(signal) => shared.on_signal(signal).await,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::debug!(missed, "signals lagged; waking everything");
                shared.on_signal(Signal::Changed { job_id: 0 }).await;
                shared.on_signal(Signal::Schedule).await;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Marks nodes silent past their lease as down; their tasks are settled as lost (and retried
/// per policy). Only the server holding the `lease-reaper` leadership runs it.
///
/// A server that just started, or just took the leadership over, first waits one lease: while
/// no server renewed leases (all were down, or the leader died), every agent kept running its
/// tasks, and a lease that ran out in that time says nothing about its node. Agents reconnect
/// within the grace and renew their leases; the rest are reaped after it.
pub(crate) async fn lease_reaper(shared: Arc<Shared>) {
    let period = (shared.config.lease / 4).max(Duration::from_millis(100));
    loop {
        let lead = match shared.store.try_lead("lease-reaper").await {
            Ok(Some(lead)) => lead,
            Ok(None) => {
                tokio::time::sleep(period).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot try to lead the lease reaper");
                tokio::time::sleep(period).await;
                continue;
            }
        };
        let grace = shared.config.lease;
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            "leading the lease reaper; agents have one lease to reconnect"
        );
        let reap_from = tokio::time::Instant::now() + grace;
        while lead.is_held() && tokio::time::Instant::now() < reap_from {
            tokio::time::sleep(period.min(reap_from - tokio::time::Instant::now())).await;
        }
        while lead.is_held() {
            tokio::time::sleep(period).await;
            reap_once(&shared).await;
        }
        tracing::warn!("lost the lease reaper leadership");
    }
}

async fn reap_once(shared: &Shared) {
    match shared.store.expire_nodes(now_ms()).await {
        Ok(down) if !down.is_empty() => {
            for node_id in &down {
                tracing::warn!(node_id, "node lease expired; node marked down and its tasks handed back");
                shared.sessions.lock().unwrap_or_else(|e| e.into_inner()).remove(node_id);
            }
            shared.publish(Signal::Changed { job_id: 0 }).await;
            shared.publish(Signal::Schedule).await;
        }
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "lease reaper failed"),
    }
}
