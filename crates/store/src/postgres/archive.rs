//! [`ArchiveStore`] on PostgreSQL.

use async_trait::async_trait;
use sqlx::Row;

use super::{MAX_TRIES, PostgresStore, get_u32, retryable};
use crate::archive::{ArchiveStore, LiveAttempt, LogArchiveRecord, UnarchivedAttempt};
use crate::{LogChunk, Result, TaskFilter};

#[async_trait]
impl ArchiveStore for PostgresStore {
    async fn live_attempts(&self, job_id: i64, filter: &TaskFilter) -> Result<Vec<LiveAttempt>> {
        let rows = sqlx::query(
            "SELECT a.id, a.node_id, a.task_id, t.name, t.frame FROM attempts a \
             JOIN tasks t ON t.id = a.task_id WHERE a.job_id = $1 AND a.state <> 'ended' ORDER BY a.id DESC",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        let attempts = rows
            .iter()
            .map(|r| {
                Ok(LiveAttempt {
                    attempt_id: r.try_get(0)?,
                    node_id: r.try_get(1)?,
                    task_id: r.try_get(2)?,
                    task_name: r.try_get(3)?,
                    frame: r.try_get(4)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(attempts.into_iter().filter(|a| filter.matches(&a.task_name, a.frame)).collect())
    }

    async fn unarchived_attempts(&self, limit: u32) -> Result<Vec<UnarchivedAttempt>> {
        let rows = sqlx::query(
            "SELECT id, job_id, task_id FROM attempts WHERE state = 'ended' AND log_digest IS NULL \
             ORDER BY id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(UnarchivedAttempt {
                    attempt_id: r.try_get(0)?,
                    job_id: r.try_get(1)?,
                    task_id: r.try_get(2)?,
                })
            })
            .collect()
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
                 FROM log_chunks c JOIN tasks t ON t.id = c.task_id WHERE c.attempt_id = $1 AND c.id >= $2 \
                 ORDER BY c.id LIMIT $3",
            )
            .bind(attempt_id)
            .bind(from)
            .bind(i64::from(n))
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(super::stored_chunk).collect()
        })
        .await
    }

    async fn record_log_archive(&self, attempt_id: i64, digest: &str, size: u64, now_ms: i64) -> Result<()> {
        transaction!(self.pool, "record_log_archive", |tx| {
            let updated = sqlx::query(
                "UPDATE attempts SET log_digest = $1, log_size = $2, log_archived_ms = $3 \
                 WHERE id = $4 AND state = 'ended' AND log_digest IS NULL",
            )
            .bind(digest)
            .bind(size as i64)
            .bind(now_ms)
            .bind(attempt_id)
            .execute(&mut *tx)
            .await?;
            if updated.rows_affected() == 1 {
                sqlx::query("DELETE FROM log_chunks WHERE attempt_id = $1")
                    .bind(attempt_id)
                    .execute(&mut *tx)
                    .await?;
                // The archive belongs to the job's project, like the job's artifacts.
                sqlx::query(
                    "INSERT INTO project_blobs (project, digest, size, created_ms) \
                     SELECT j.project, $1, $2, $3 FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE a.id = $4 \
                     ON CONFLICT (project, digest) DO NOTHING",
                )
                .bind(digest)
                .bind(size as i64)
                .bind(now_ms)
                .bind(attempt_id)
                .execute(&mut *tx)
                .await?;
            }
            Ok(())
        })
    }

    async fn log_archives(&self, job_id: i64, filter: &TaskFilter) -> Result<Vec<LogArchiveRecord>> {
        let rows = sqlx::query(
            "SELECT a.id, a.task_id, t.name, t.frame, a.number, a.log_digest, a.log_size, a.log_archived_ms \
             FROM attempts a JOIN tasks t ON t.id = a.task_id \
             WHERE a.job_id = $1 AND a.log_digest <> '' ORDER BY a.id",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        let archives = rows
            .iter()
            .map(|r| {
                Ok(LogArchiveRecord {
                    attempt_id: r.try_get(0)?,
                    task_id: r.try_get(1)?,
                    task_name: r.try_get(2)?,
                    frame: r.try_get(3)?,
                    attempt: get_u32(r, 4)?,
                    digest: r.try_get(5)?,
                    size: r.try_get::<i64, _>(6)? as u64,
                    archived_ms: r.try_get(7)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(archives.into_iter().filter(|a| filter.matches(&a.task_name, a.frame)).collect())
    }

    async fn expire_log_archives(&self, before_ms: i64, now_ms: i64, limit: u32) -> Result<Vec<String>> {
        transaction!(self.pool, "expire_log_archives", |tx| {
            let rows = sqlx::query(
                "SELECT id, log_digest FROM attempts WHERE log_digest <> '' AND log_archived_ms < $1 \
                 ORDER BY log_archived_ms LIMIT $2 FOR UPDATE SKIP LOCKED",
            )
            .bind(before_ms)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?;
            let ids = rows
                .iter()
                .map(|r| r.try_get::<i64, _>(0))
                .collect::<std::result::Result<Vec<_>, sqlx::Error>>()?;
            let digests = rows
                .iter()
                .map(|r| r.try_get::<String, _>(1))
                .collect::<std::result::Result<Vec<_>, sqlx::Error>>()?;
            sqlx::query("UPDATE attempts SET log_digest = '' WHERE id = ANY($1)")
                .bind(&ids)
                .execute(&mut *tx)
                .await?;
            super::retention::mark_unreferenced(&mut tx, digests, now_ms).await
        })
    }
}
