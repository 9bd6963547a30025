//! [`ArchiveStore`] on SQLite.

use async_trait::async_trait;
use sqlx::{Connection, Row};

use super::SqliteStore;
use crate::archive::{ArchiveStore, LiveAttempt, LogArchiveRecord, UnarchivedAttempt};
use crate::{LogChunk, Result, TaskFilter};

#[async_trait]
impl ArchiveStore for SqliteStore {
    async fn live_attempts(&self, job_id: i64, filter: &TaskFilter) -> Result<Vec<LiveAttempt>> {
        let rows = sqlx::query(
            "SELECT a.id, a.node_id, a.task_id, t.name, t.frame FROM attempts a \
             JOIN tasks t ON t.id = a.task_id WHERE a.job_id = ? AND a.state <> 'ended' ORDER BY a.id DESC",
        )
        .bind(job_id)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows
            .iter()
            .map(|r| LiveAttempt {
                attempt_id: r.get(0),
                node_id: r.get(1),
                task_id: r.get(2),
                task_name: r.get(3),
                frame: r.get(4),
            })
            .filter(|a| filter.matches(&a.task_name, a.frame))
            .collect())
    }

    async fn unarchived_attempts(&self, limit: u32) -> Result<Vec<UnarchivedAttempt>> {
        let rows = sqlx::query(
            "SELECT id, job_id, task_id FROM attempts WHERE state = 'ended' AND log_digest IS NULL \
             ORDER BY id LIMIT ?",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        Ok(rows
            .iter()
            .map(|r| UnarchivedAttempt { attempt_id: r.get(0), job_id: r.get(1), task_id: r.get(2) })
            .collect())
    }

    async fn attempt_log_chunks(
        &self,
        attempt_id: i64,
        after_id: i64,
        max_bytes: usize,
    ) -> Result<Vec<LogChunk>> {
        crate::log_chunks::read_chunks(after_id, max_bytes, |from, n| async move {
            let rows = sqlx::query(
                "SELECT c.id, c.task_id, t.name, t.frame, c.attempt, c.heads, c.data \
                 FROM log_chunks c JOIN tasks t ON t.id = c.task_id WHERE c.attempt_id = ? AND c.id >= ? \
                 ORDER BY c.id LIMIT ?",
            )
            .bind(attempt_id)
            .bind(from)
            .bind(i64::from(n))
            .fetch_all(&self.reader)
            .await?;
            Ok(rows.iter().map(super::stored_chunk).collect())
        })
        .await
    }

    async fn record_log_archive(&self, attempt_id: i64, digest: &str, size: u64, now_ms: i64) -> Result<()> {
        let mut writer = self.writer.lock().await;
        let mut tx = writer.begin().await?;
        let updated = sqlx::query(
            "UPDATE attempts SET log_digest = ?, log_size = ?, log_archived_ms = ? \
             WHERE id = ? AND state = 'ended' AND log_digest IS NULL",
        )
        .bind(digest)
        .bind(size as i64)
        .bind(now_ms)
        .bind(attempt_id)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 1 {
            sqlx::query("DELETE FROM log_chunks WHERE attempt_id = ?")
                .bind(attempt_id)
                .execute(&mut *tx)
                .await?;
            // The archive belongs to the job's project, like the job's artifacts.
            sqlx::query(
                "INSERT INTO project_blobs (project, digest, size, created_ms) \
                 SELECT j.project, ?, ?, ? FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE a.id = ? \
                 ON CONFLICT (project, digest) DO NOTHING",
            )
            .bind(digest)
            .bind(size as i64)
            .bind(now_ms)
            .bind(attempt_id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn log_archives(&self, job_id: i64, filter: &TaskFilter) -> Result<Vec<LogArchiveRecord>> {
        let rows = sqlx::query(
            "SELECT a.id, a.task_id, t.name, t.frame, a.number, a.log_digest, a.log_size, a.log_archived_ms \
             FROM attempts a JOIN tasks t ON t.id = a.task_id \
             WHERE a.job_id = ? AND a.log_digest <> '' ORDER BY a.id",
        )
        .bind(job_id)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows
            .iter()
            .map(|r| LogArchiveRecord {
                attempt_id: r.get(0),
                task_id: r.get(1),
                task_name: r.get(2),
                frame: r.get(3),
                attempt: r.get::<i64, _>(4) as u32,
                digest: r.get(5),
                size: r.get::<i64, _>(6) as u64,
                archived_ms: r.get(7),
            })
            .filter(|a| filter.matches(&a.task_name, a.frame))
            .collect())
    }

    async fn expire_log_archives(&self, before_ms: i64, now_ms: i64, limit: u32) -> Result<Vec<String>> {
        let mut writer = self.writer.lock().await;
        let mut tx = writer.begin().await?;
        let rows = sqlx::query(
            "SELECT id, log_digest FROM attempts WHERE log_digest <> '' AND log_archived_ms < ? \
             ORDER BY log_archived_ms LIMIT ?",
        )
        .bind(before_ms)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        let mut digests: Vec<String> = Vec::new();
        for r in &rows {
            sqlx::query("UPDATE attempts SET log_digest = '' WHERE id = ?")
                .bind(r.get::<i64, _>(0))
                .execute(&mut *tx)
                .await?;
            digests.push(r.get(1));
        }
        let unused = super::retention::mark_unreferenced(&mut tx, digests, now_ms).await?;
        tx.commit().await?;
        Ok(unused)
    }
}
