//! Signals between servers over `LISTEN/NOTIFY`.
//!
//! Each store keeps one connection listening on [`CHANNEL`] in a background task that feeds a
//! `broadcast` channel; `publish` is a `pg_notify`, which PostgreSQL delivers after commit to
//! every listener, this server's own included. Notifications sent while the listening
//! connection is down are lost, so after every reconnect the task sends
//! `Changed { job_id: 0 }` and `Schedule`: consumers treat them as "everything may have
//! changed" and look again.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use tokio::sync::broadcast;

use crate::{Result, Signal};

/// The NOTIFY channel every server listens on.
pub(super) const CHANNEL: &str = "drover_signals";

/// Longest pause between attempts to reconnect the listener.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Encodes a signal as a short NOTIFY payload: `c:<job>`, `s`, `x:<attempt>:<node>`, `r:<node>`.
pub(super) fn encode(signal: Signal) -> String {
    match signal {
        Signal::Changed { job_id } => format!("c:{job_id}"),
        Signal::Schedule => "s".to_string(),
        Signal::Cancel { attempt_id, node_id } => format!("x:{attempt_id}:{node_id}"),
        Signal::NodeRevoked { node_id } => format!("r:{node_id}"),
    }
}

/// Decodes a payload of [`encode`]; `None` for anything else (e.g. from a newer server).
pub(super) fn decode(payload: &str) -> Option<Signal> {
    let mut parts = payload.split(':');
    let signal = match (parts.next()?, parts.next(), parts.next()) {
        ("c", Some(job), None) => Signal::Changed { job_id: job.parse().ok()? },
        ("s", None, None) => Signal::Schedule,
        ("r", Some(node), None) => Signal::NodeRevoked { node_id: node.parse().ok()? },
        ("x", Some(attempt), Some(node)) => {
            Signal::Cancel { attempt_id: attempt.parse().ok()?, node_id: node.parse().ok()? }
        }
        _ => return None,
    };
    parts.next().is_none().then_some(signal)
}

/// The background task listening for signals; aborted when dropped.
pub(super) struct ListenerTask(tokio::task::AbortHandle);

impl Drop for ListenerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl ListenerTask {
    /// Starts listening before returning, so a signal published right after is heard.
    pub(super) async fn start(options: PgConnectOptions, sender: broadcast::Sender<Signal>) -> Result<Self> {
        // A pool of its own (one connection, held for good) so the listener never takes a
        // connection from the store's pool; PgListener reconnects through it.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .max_lifetime(None)
            .idle_timeout(None)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options.application_name("drover-listener"));
        let listener = listen(&pool).await?;
        let task = tokio::spawn(run(pool, listener, sender));
        Ok(ListenerTask(task.abort_handle()))
    }
}

async fn listen(pool: &PgPool) -> std::result::Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.ignore_pool_close_event(true);
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// Tells subscribers that signals may have been missed.
fn resync(sender: &broadcast::Sender<Signal>) {
    let _ = sender.send(Signal::Changed { job_id: 0 });
    let _ = sender.send(Signal::Schedule);
}

async fn run(pool: PgPool, mut listener: PgListener, sender: broadcast::Sender<Signal>) {
    loop {
        match listener.try_recv().await {
            Ok(Some(notification)) => match decode(notification.payload()) {
                // No subscriber yet is fine: nobody needs to hear it.
                Some(signal) => {
                    let _ = sender.send(signal);
                }
                None => tracing::debug!(payload = notification.payload(), "ignoring unknown signal"),
            },
            // The connection broke and PgListener already reconnected and listens again.
            Ok(None) => {
                tracing::warn!(
                    channel = CHANNEL,
                    "signal listener reconnected; signals may have been missed"
                );
                resync(&sender);
            }
            // The connection broke and could not be re-established yet (e.g. PostgreSQL is
            // restarting): start over with a fresh listener, backing off.
            Err(error) => {
                tracing::warn!(channel = CHANNEL, %error, "signal listener lost its connection; reconnecting");
                drop(listener);
                listener = reconnect(&pool).await;
                tracing::info!(
                    channel = CHANNEL,
                    "signal listener reconnected; signals may have been missed"
                );
                resync(&sender);
            }
        }
    }
}

async fn reconnect(pool: &PgPool) -> PgListener {
    let mut backoff = Duration::from_millis(100);
    loop {
        tokio::time::sleep(backoff).await;
        match listen(pool).await {
            Ok(listener) => return listener,
            Err(error) => {
                tracing::debug!(channel = CHANNEL, %error, ?backoff, "signal listener cannot reconnect yet");
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        for s in [
            Signal::Changed { job_id: 42 },
            Signal::Changed { job_id: 0 },
            Signal::Schedule,
            Signal::Cancel { attempt_id: 7, node_id: 3 },
            Signal::NodeRevoked { node_id: 5 },
        ] {
            assert_eq!(decode(&encode(s)), Some(s));
        }
        for bad in ["", "c", "c:", "c:x", "s:1", "x:1", "x:1:2:3", "q:1", "r", "r:", "r:x", "r:1:2"] {
            assert_eq!(decode(bad), None, "{bad}");
        }
    }
}
