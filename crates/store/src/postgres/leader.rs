//! Leadership of singleton loops: a PostgreSQL session advisory lock.
//!
//! The lock lives as long as the session that took it, so each leadership owns a dedicated
//! connection (never one of the pool, which would hand the session to other work and keep the
//! lock after the guard is gone). A background task pings that connection; when a ping fails
//! or hangs, the session (and with it the lock) must be presumed gone, and
//! [`Leadership::is_held`] turns false. Dropping the guard closes the connection, which
//! releases the lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{Connection, Executor};
use tokio::sync::oneshot;

use crate::{Leadership, Result};

/// How often the lock's connection is checked. `is_held` may report a lost lock as held for
/// up to this long plus [`PING_TIMEOUT`].
const PING_EVERY: Duration = Duration::from_secs(1);

/// How long a ping may take before the connection counts as broken.
const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// The advisory lock key of a loop name: 64-bit FNV-1a of `drover.lead.<name>`, the same on
/// every server and every PostgreSQL version.
pub(super) fn lock_key(name: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in b"drover.lead.".iter().chain(name.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

/// Held leadership; see the module documentation.
pub(super) struct PgLeadership {
    held: Arc<AtomicBool>,
    /// Dropping it tells the keeper task to close the connection.
    _stop: oneshot::Sender<()>,
}

impl Leadership for PgLeadership {
    fn is_held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }
}

/// Takes the lock of `name` on a new connection, or returns `None` while another session holds it.
pub(super) async fn try_lead(options: &PgConnectOptions, name: &str) -> Result<Option<PgLeadership>> {
    let key = lock_key(name);
    let options = options.clone().application_name(&format!("drover-lead-{name}"));
    let mut conn = PgConnection::connect_with(&options).await?;
    let got: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(key).fetch_one(&mut conn).await?;
    if !got {
        let _ = conn.close().await;
        return Ok(None);
    }
    tracing::info!(lock = name, key, "leading");
    let held = Arc::new(AtomicBool::new(true));
    let (stop, stopped) = oneshot::channel();
    tokio::spawn(keep(conn, name.to_string(), held.clone(), stopped));
    Ok(Some(PgLeadership { held, _stop: stop }))
}

/// Pings the lock's connection until it fails (then reports the lock lost) or the guard is
/// dropped (then closes the connection, releasing the lock).
async fn keep(
    mut conn: PgConnection,
    name: String,
    held: Arc<AtomicBool>,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut every = tokio::time::interval(PING_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stopped => {
                let _ = conn.close().await;
                tracing::info!(lock = %name, "leadership released");
                return;
            }
            _ = every.tick() => {
                let ping = tokio::time::timeout(PING_TIMEOUT, conn.execute("SELECT 1")).await;
                let error = match ping {
                    Ok(Ok(_)) => continue,
                    Ok(Err(error)) => error.to_string(),
                    Err(_) => format!("no answer within {PING_TIMEOUT:?}"),
                };
                held.store(false, Ordering::Release);
                tracing::warn!(lock = %name, %error, "leadership lost: its connection broke");
                // Dropping the connection closes it; the server drops the lock with the session.
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn lock_keys_are_stable_and_distinct() {
        assert_eq!(super::lock_key("reaper"), super::lock_key("reaper"));
        assert_ne!(super::lock_key("reaper"), super::lock_key("autoscaler"));
    }
}
