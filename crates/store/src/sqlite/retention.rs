//! [`RetentionStore`] on SQLite. The one writer connection serialises every write, so a
//! digest's check and its mark happen with no other write between them.

use async_trait::async_trait;
use sqlx::{Connection, SqliteConnection};

use super::SqliteStore;
use crate::Result;
use crate::retention::{JOB_TABLES, RetentionStore, referenced_sql};

/// Whether anything points to `digest`, read through the writer (inside its transaction).
pub(super) async fn referenced(conn: &mut SqliteConnection, digest: &str) -> Result<bool> {
    Ok(sqlx::query_scalar(&referenced_sql("?1")).bind(digest).fetch_one(conn).await?)
}

/// Records each digest of `digests` nothing points to any more as unreferenced since `now_ms`,
/// and returns those digests. An earlier mark is moved to `now_ms` (unless its deletion has
/// begun): it was left by an upload that a job then named, and the grace counts from the
/// reference's end.
pub(super) async fn mark_unreferenced(
    conn: &mut SqliteConnection,
    mut digests: Vec<String>,
    now_ms: i64,
) -> Result<Vec<String>> {
    digests.sort();
    digests.dedup();
    let mut unused = Vec::new();
    for d in digests {
        if !referenced(&mut *conn, &d).await? {
            sqlx::query(
                "INSERT INTO unreferenced_blobs (digest, since_ms) VALUES (?, ?) \
                 ON CONFLICT (digest) DO UPDATE SET since_ms = excluded.since_ms WHERE unreferenced_blobs.deleting = 0",
            )
            .bind(&d)
            .bind(now_ms)
            .execute(&mut *conn)
            .await?;
            unused.push(d);
        }
    }
    Ok(unused)
}

#[async_trait]
impl RetentionStore for SqliteStore {
    async fn expired_jobs(&self, project: &str, ended_before_ms: i64, limit: u32) -> Result<Vec<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT j.id FROM jobs j WHERE j.project = ? AND j.ended_ms IS NOT NULL AND j.ended_ms < ? \
             AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.job_id = j.id \
                             AND (a.state <> 'ended' OR a.log_digest IS NULL)) \
             ORDER BY j.ended_ms, j.id LIMIT ?",
        )
        .bind(project)
        .bind(ended_before_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?)
    }

    async fn delete_job(&self, job_id: i64, now_ms: i64) -> Result<Option<Vec<String>>> {
        let mut writer = self.writer.lock().await;
        let mut tx = writer.begin().await?;
        // An attempt still open could report after its rows are gone, and an ended attempt
        // whose log is not archived yet would lose it (or leave its archive unrecorded): only a
        // job whose every attempt ended and was archived is deleted.
        let ended: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM jobs j WHERE j.id = ?1 AND j.ended_ms IS NOT NULL \
             AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.job_id = ?1 \
                             AND (a.state <> 'ended' OR a.log_digest IS NULL))",
        )
        .bind(job_id)
        .fetch_optional(&mut *tx)
        .await?;
        if ended.is_none() {
            return Ok(None);
        }
        let held: Vec<String> = sqlx::query_scalar(
            "SELECT digest FROM artifacts WHERE job_id = ?1 \
             UNION SELECT log_digest FROM attempts WHERE job_id = ?1 AND log_digest <> '' \
             UNION SELECT digest FROM job_blobs WHERE job_id = ?1",
        )
        .bind(job_id)
        .fetch_all(&mut *tx)
        .await?;
        // What its attempts used stays counted (see `retired_metering`). All of them ended.
        sqlx::query(
            "INSERT INTO retired_metering \
                 (project, price_version, day_ms, core_ms, byte_ms, input_tokens, output_tokens) \
             SELECT j.project, a.price_version, (a.assigned_ms / 86400000) * 86400000, \
                 SUM(CAST(a.cores AS REAL) * (CASE WHEN a.started_ms IS NULL THEN 0 \
                     ELSE MAX(COALESCE(a.ended_ms, a.started_ms) - a.started_ms, 0) END)), \
                 SUM(CAST(a.memory AS REAL) * (CASE WHEN a.started_ms IS NULL THEN 0 \
                     ELSE MAX(COALESCE(a.ended_ms, a.started_ms) - a.started_ms, 0) END)), \
                 COALESCE(SUM(a.input_tokens), 0), COALESCE(SUM(a.output_tokens), 0) \
             FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE a.job_id = ?1 \
             GROUP BY j.project, a.price_version, a.assigned_ms / 86400000 \
             ON CONFLICT (project, price_version, day_ms) DO UPDATE SET \
                 core_ms = core_ms + excluded.core_ms, byte_ms = byte_ms + excluded.byte_ms, \
                 input_tokens = input_tokens + excluded.input_tokens, \
                 output_tokens = output_tokens + excluded.output_tokens",
        )
        .bind(job_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO retired_usage \
                 (project, jobs, tasks, attempts, cpu_seconds, wall_ms, input_tokens, output_tokens) \
             SELECT j.project, 1, (SELECT COUNT(*) FROM tasks t WHERE t.job_id = j.id), COUNT(a.id), \
                 COALESCE(SUM(a.cpu_seconds), 0.0), \
                 COALESCE(SUM(CASE WHEN a.ended_ms IS NOT NULL AND a.started_ms IS NOT NULL \
                     THEN a.ended_ms - a.started_ms ELSE 0 END), 0), \
                 COALESCE(SUM(a.input_tokens), 0), COALESCE(SUM(a.output_tokens), 0) \
             FROM jobs j LEFT JOIN attempts a ON a.job_id = j.id WHERE j.id = ?1 GROUP BY j.id \
             ON CONFLICT (project) DO UPDATE SET \
                 jobs = jobs + excluded.jobs, tasks = tasks + excluded.tasks, \
                 attempts = attempts + excluded.attempts, cpu_seconds = cpu_seconds + excluded.cpu_seconds, \
                 wall_ms = wall_ms + excluded.wall_ms, input_tokens = input_tokens + excluded.input_tokens, \
                 output_tokens = output_tokens + excluded.output_tokens",
        )
        .bind(job_id)
        .execute(&mut *tx)
        .await?;
        for table in JOB_TABLES {
            sqlx::query(&format!("DELETE FROM {table} WHERE job_id = ?"))
                .bind(job_id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("DELETE FROM jobs WHERE id = ?").bind(job_id).execute(&mut *tx).await?;
        let unused = mark_unreferenced(&mut tx, held, now_ms).await?;
        tx.commit().await?;
        Ok(Some(unused))
    }

    async fn doom_blobs(&self, unreferenced_before_ms: i64, limit: u32) -> Result<Vec<String>> {
        let mut writer = self.writer.lock().await;
        let mut tx = writer.begin().await?;
        // Digests already being deleted are returned again: a server that stopped between
        // deleting files and `blobs_deleted` left them so, and deleting a file twice is harmless.
        let rows: Vec<(String, bool)> = sqlx::query_as(
            "SELECT digest, deleting FROM unreferenced_blobs WHERE since_ms < ? ORDER BY since_ms LIMIT ?",
        )
        .bind(unreferenced_before_ms)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        let mut doomed = Vec::new();
        for (digest, deleting) in rows {
            if !deleting && referenced(&mut tx, &digest).await? {
                sqlx::query("DELETE FROM unreferenced_blobs WHERE digest = ?")
                    .bind(&digest)
                    .execute(&mut *tx)
                    .await?;
                continue;
            }
            sqlx::query("UPDATE unreferenced_blobs SET deleting = 1 WHERE digest = ?")
                .bind(&digest)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM project_blobs WHERE digest = ?").bind(&digest).execute(&mut *tx).await?;
            doomed.push(digest);
        }
        tx.commit().await?;
        Ok(doomed)
    }

    async fn blobs_deleted(&self, digests: &[String]) -> Result<()> {
        let mut writer = self.writer.lock().await;
        let mut tx = writer.begin().await?;
        for d in digests {
            sqlx::query("DELETE FROM unreferenced_blobs WHERE digest = ? AND deleting = 1")
                .bind(d)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn claim_blob(&self, digest: &str, now_ms: i64) -> Result<bool> {
        let mut writer = self.writer.lock().await;
        let mut tx = writer.begin().await?;
        let deleting: Option<bool> =
            sqlx::query_scalar("SELECT deleting FROM unreferenced_blobs WHERE digest = ?")
                .bind(digest)
                .fetch_optional(&mut *tx)
                .await?;
        if deleting == Some(true) {
            return Ok(false);
        }
        let referenced: bool =
            sqlx::query_scalar(&referenced_sql("?1")).bind(digest).fetch_one(&mut *tx).await?;
        if referenced {
            sqlx::query("DELETE FROM unreferenced_blobs WHERE digest = ?")
                .bind(digest)
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query(
                "INSERT INTO unreferenced_blobs (digest, since_ms) VALUES (?1, ?2) \
                 ON CONFLICT (digest) DO UPDATE SET since_ms = excluded.since_ms",
            )
            .bind(digest)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn blob_referenced(&self, digest: &str) -> Result<bool> {
        Ok(sqlx::query_scalar(&referenced_sql("?1")).bind(digest).fetch_one(&self.reader).await?)
    }
}

#[cfg(test)]
mod tests {
    use sqlx::migrate::Migrator;
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};

    use super::SqliteStore;

    /// The migration that records jobs' blobs, backfilling them from stored plans.
    const RETENTION_MIGRATION: i64 = 14;

    #[tokio::test]
    async fn upgraded_jobs_keep_their_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("drover.db");
        crate::conformance::copy_migrations_before("sqlite", RETENTION_MIGRATION, &dir.path().join("old"));
        let pool =
            SqlitePool::connect_with(SqliteConnectOptions::new().filename(&db).create_if_missing(true))
                .await
                .unwrap();
        Migrator::new(dir.path().join("old")).await.unwrap().run(&pool).await.unwrap();
        sqlx::raw_sql(crate::conformance::RETENTION_LEGACY_ROWS).execute(&pool).await.unwrap();
        pool.close().await;
        let store = SqliteStore::open(&db).await.unwrap();
        crate::conformance::upgraded_jobs_keep_their_blobs(&store).await;
    }
}
