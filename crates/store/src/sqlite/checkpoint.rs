//! Checkpoints of the write-ahead log, off the writer's path.
//!
//! SQLite copies the WAL back into the database file (a checkpoint, with its `fsync`s) from
//! inside a commit once the WAL passes 1,000 pages. Under a stream of output that is a
//! commit every 4 MiB stalled on disk writes while everything behind the single writer
//! waits. Here a connection of its own checkpoints every [`EVERY`] in the background
//! (`PASSIVE`: it never blocks the writer or readers), and the writer checkpoints itself only
//! past [`WRITER_BACKSTOP`] pages, which it reaches only if the background falls behind;
//! by then most pages are copied already, so its checkpoint is short.

use std::sync::Weak;

use super::*;

/// How often the background checkpoints.
const EVERY: Duration = Duration::from_millis(100);

/// WAL pages past which the writer checkpoints inside its commit (SQLite's default is 1,000).
pub(super) const WRITER_BACKSTOP: u32 = 16_384;

/// Checkpoints the database of `options` every [`EVERY`] until the store that `alive`
/// belongs to is dropped.
pub(super) async fn spawn<T: Send + Sync + 'static>(
    options: &SqliteConnectOptions,
    alive: Weak<T>,
) -> Result<()> {
    let mut conn = SqliteConnection::connect_with(options).await?;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if alive.strong_count() == 0 {
                break;
            }
            // A failed checkpoint only leaves the WAL longer; the writer's own catches up.
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&mut conn).await {
                tracing::debug!(error = %e, "background checkpoint failed");
            }
        }
        let _ = conn.close().await;
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn committed_pages_reach_the_database_file_without_a_commit_checkpointing() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("db");
        let store = SqliteStore::open(&path).await.expect("store");
        let size = || std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let before = size();
        // 2 MiB: far below the writer's own threshold, so only the background copies it.
        let blob = vec![7u8; 2 << 20];
        {
            let mut writer = store.writer.lock().await;
            sqlx::query("CREATE TABLE scratch (b BLOB)").execute(&mut *writer).await.expect("table");
            sqlx::query("INSERT INTO scratch (b) VALUES (?)")
                .bind(&blob)
                .execute(&mut *writer)
                .await
                .expect("row");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while size() < before + (2 << 20) {
            assert!(std::time::Instant::now() < deadline, "the WAL was not checkpointed: {} bytes", size());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Readers see it as before.
        let n: i64 =
            sqlx::query_scalar("SELECT length(b) FROM scratch").fetch_one(&store.reader).await.expect("read");
        assert_eq!(n, 2 << 20);
    }
}
