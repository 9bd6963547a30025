//! The server's background loops: placement and lease expiry.

use std::sync::Arc;
use std::time::Duration;

use drover_core::placement::place_within;
use tracing::Instrument;

use drover_store::Signal;
use tokio::sync::broadcast;

use crate::{Shared, now_ms};

/// Most queued tasks considered in one placement round.
const PLACEMENT_BATCH: u32 = 512;

/// Places queued tasks whenever something may have changed (a submit, a finished attempt, a
/// node joining) and on a short tick so retry backoffs expire on time.
pub(crate) async fn scheduler(shared: Arc<Shared>) {
    loop {
        let _ = tokio::time::timeout(shared.config.schedule_tick, shared.schedule.notified()).await;
        loop {
            match schedule_once(&shared).await {
                // A full batch means more may fit right away.
                Ok(n) if n > 0 => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::error!(error = %e, "placement round failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
            }
        }
    }
}

async fn schedule_once(shared: &Shared) -> Result<usize, drover_store::StoreError> {
    // A replica without agent sessions could place nothing: leave the queue to the others
    // rather than read it on every signal.
    if shared.sessions.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
        return Ok(0);
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
    let (mut nodes, queue) = shared.store.placement_snapshot(now, PLACEMENT_BATCH, &skip).await?;
    // Only nodes with a live session here can receive work; after a server restart, nodes keep
    // their leases in the store until their agents reconnect.
    {
        let sessions = shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
        nodes.retain(|n| sessions.contains_key(&n.id));
        for node in &mut nodes {
            if let Some(session) = sessions.get(&node.id) {
                node.warm = session.warm.clone();
            }
        }
    }
    if queue.is_empty() {
        return Ok(0);
    }
    let placed = place_within(&nodes, &queue, &limits.rooms);
    if !placed.held.is_empty() {
        shared.tenants.set_queue_reasons(&placed.held).await?;
    }
    let plan = placed.placements;
    if plan.is_empty() {
        return Ok(0);
    }
    let span = tracing::debug_span!("assign", tasks = plan.len());
    let assignments = shared.store.assign(&plan, now).instrument(span).await?;
    let n = assignments.len();
    for job_id in assignments.iter().map(|a| a.job_id).collect::<std::collections::BTreeSet<_>>() {
        shared.publish(Signal::Changed { job_id }).await;
    }
    crate::dispatch::dispatch(shared, assignments).await;
    Ok(n)
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
        tracing::info!("leading the lease reaper");
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
