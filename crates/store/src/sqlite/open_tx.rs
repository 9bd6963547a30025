//! A write transaction whose `BEGIN` and `COMMIT` ride with other statements.
//!
//! Every statement is a round trip to the connection's worker thread, and on the hot path
//! those trips cost more than the statements; so the busiest transactions (a placement
//! round's claim, a batch of starts and finishes) send `BEGIN` with their first read and
//! `COMMIT` with their last write. sqlx then knows nothing of the transaction and cannot roll
//! it back on its own: [`OpenTx`] does, when the work fails or its caller goes away halfway.

use sqlx::SqliteConnection;
use tokio::sync::OwnedMutexGuard;

use crate::Result;

/// The writer while a transaction begun by hand may be open. Dropped still holding it (the
/// caller went away mid-transaction), it hands the writer to a task that rolls back; the next
/// writer waits for that task, as it holds the writer's lock.
pub(super) struct OpenTx(Option<OwnedMutexGuard<SqliteConnection>>);

impl OpenTx {
    /// Takes the writer for one transaction.
    pub(super) fn new(writer: OwnedMutexGuard<SqliteConnection>) -> OpenTx {
        OpenTx(Some(writer))
    }

    /// The connection to run the transaction's statements on.
    pub(super) fn conn(&mut self) -> Option<&mut SqliteConnection> {
        self.0.as_deref_mut()
    }

    /// Ends the transaction's use of the writer with the work's `result`: a failure rolls
    /// back what the work began (a failure before its `BEGIN` ran, or in its `COMMIT`, leaves
    /// no transaction open, and the rollback then fails harmlessly).
    pub(super) async fn close<T>(mut self, result: Result<T>) -> Result<T> {
        if let (Err(error), Some(conn)) = (&result, self.0.as_deref_mut())
            && let Err(rollback) = sqlx::query("ROLLBACK").execute(&mut *conn).await
        {
            tracing::debug!(%error, %rollback, "nothing to roll back after a failed transaction");
        }
        self.0 = None;
        result
    }
}

impl Drop for OpenTx {
    fn drop(&mut self) {
        let Some(mut conn) = self.0.take() else { return };
        // Without a runtime the store is being torn down, and the connection with it.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(async move {
            if let Err(error) = sqlx::query("ROLLBACK").execute(&mut *conn).await {
                tracing::debug!(%error, "nothing to roll back after an abandoned transaction");
            }
        });
    }
}
