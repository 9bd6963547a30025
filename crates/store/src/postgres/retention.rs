//! [`RetentionStore`] on PostgreSQL. Replicas write at once, so every check of a digest and the
//! change it decides happen under the lock of the digest's `unreferenced_blobs` row: a claim
//! and a doom of the same digest take that lock in turn, never both on a stale view.

use async_trait::async_trait;
use sqlx::PgConnection;

use super::{MAX_TRIES, PostgresStore, retryable};
use crate::Result;
use crate::retention::{JOB_TABLES, RetentionStore, referenced_sql};

/// Whether anything points to `digest`, read inside the caller's transaction.
pub(super) async fn referenced(conn: &mut PgConnection, digest: &str) -> Result<bool> {
    Ok(sqlx::query_scalar(&referenced_sql("$1")).bind(digest).fetch_one(conn).await?)
}

/// Records each digest of `digests` nothing points to any more as unreferenced since `now_ms`,
/// and returns those digests. An earlier mark is moved to `now_ms` (unless its deletion has
/// begun): it was left by an upload that a job then named, and the grace counts from the
/// reference's end.
pub(super) async fn mark_unreferenced(
    conn: &mut PgConnection,
    mut digests: Vec<String>,
    now_ms: i64,
) -> Result<Vec<String>> {
    digests.sort();
    digests.dedup();
    let mut unused = Vec::new();
    for d in digests {
        if !referenced(&mut *conn, &d).await? {
            sqlx::query(
                "INSERT INTO unreferenced_blobs (digest, since_ms) VALUES ($1, $2) \
                 ON CONFLICT (digest) DO UPDATE SET since_ms = EXCLUDED.since_ms WHERE NOT unreferenced_blobs.deleting",
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
impl RetentionStore for PostgresStore {
    async fn expired_jobs(&self, project: &str, ended_before_ms: i64, limit: u32) -> Result<Vec<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT j.id FROM jobs j WHERE j.project = $1 AND j.ended_ms IS NOT NULL AND j.ended_ms < $2 \
             AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.job_id = j.id \
                             AND (a.state <> 'ended' OR a.log_digest IS NULL)) \
             ORDER BY j.ended_ms, j.id LIMIT $3",
        )
        .bind(project)
        .bind(ended_before_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn delete_job(&self, job_id: i64, now_ms: i64) -> Result<Option<Vec<String>>> {
        transaction!(self.pool, "delete_job", |tx| {
            // The job's row lock keeps a cancel or a settle of the same job out until this
            // commits. An attempt still open could report after its rows are gone,
            // and an ended attempt whose log is not archived yet would lose it (or leave its
            // archive unrecorded): only a job whose every attempt ended and was archived is
            // deleted.
            let ended: Option<i64> = sqlx::query_scalar(
                "SELECT j.id FROM jobs j WHERE j.id = $1 AND j.ended_ms IS NOT NULL \
                 AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.job_id = $1 \
                                 AND (a.state <> 'ended' OR a.log_digest IS NULL)) \
                 FOR UPDATE",
            )
            .bind(job_id)
            .fetch_optional(&mut *tx)
            .await?;
            if ended.is_none() {
                return Ok(None);
            }
            let held: Vec<String> = sqlx::query_scalar(
                "SELECT digest FROM artifacts WHERE job_id = $1 \
                 UNION SELECT log_digest FROM attempts WHERE job_id = $1 AND log_digest <> '' \
                 UNION SELECT digest FROM job_blobs WHERE job_id = $1",
            )
            .bind(job_id)
            .fetch_all(&mut *tx)
            .await?;
            // What its attempts used stays counted (see `retired_metering`). All of them ended.
            sqlx::query(
                "INSERT INTO retired_metering \
                     (project, price_version, day_ms, core_ms, byte_ms, input_tokens, output_tokens) \
                 SELECT j.project, a.price_version, (a.assigned_ms / 86400000) * 86400000, \
                     SUM(a.cores::FLOAT8 * (CASE WHEN a.started_ms IS NULL THEN 0 \
                         ELSE GREATEST(COALESCE(a.ended_ms, a.started_ms) - a.started_ms, 0) END)), \
                     SUM(a.memory::FLOAT8 * (CASE WHEN a.started_ms IS NULL THEN 0 \
                         ELSE GREATEST(COALESCE(a.ended_ms, a.started_ms) - a.started_ms, 0) END)), \
                     COALESCE(SUM(a.input_tokens), 0)::BIGINT, COALESCE(SUM(a.output_tokens), 0)::BIGINT \
                 FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE a.job_id = $1 \
                 GROUP BY j.project, a.price_version, a.assigned_ms / 86400000 \
                 ON CONFLICT (project, price_version, day_ms) DO UPDATE SET \
                     core_ms = retired_metering.core_ms + excluded.core_ms, \
                     byte_ms = retired_metering.byte_ms + excluded.byte_ms, \
                     input_tokens = retired_metering.input_tokens + excluded.input_tokens, \
                     output_tokens = retired_metering.output_tokens + excluded.output_tokens",
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
                 FROM jobs j LEFT JOIN attempts a ON a.job_id = j.id WHERE j.id = $1 GROUP BY j.id \
                 ON CONFLICT (project) DO UPDATE SET \
                     jobs = retired_usage.jobs + excluded.jobs, tasks = retired_usage.tasks + excluded.tasks, \
                     attempts = retired_usage.attempts + excluded.attempts, \
                     cpu_seconds = retired_usage.cpu_seconds + excluded.cpu_seconds, \
                     wall_ms = retired_usage.wall_ms + excluded.wall_ms, \
                     input_tokens = retired_usage.input_tokens + excluded.input_tokens, \
                     output_tokens = retired_usage.output_tokens + excluded.output_tokens",
            )
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
            for table in JOB_TABLES {
                sqlx::query(&format!("DELETE FROM {table} WHERE job_id = $1"))
                    .bind(job_id)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query("DELETE FROM jobs WHERE id = $1").bind(job_id).execute(&mut *tx).await?;
            Ok(Some(mark_unreferenced(&mut tx, held, now_ms).await?))
        })
    }

    async fn doom_blobs(&self, unreferenced_before_ms: i64, limit: u32) -> Result<Vec<String>> {
        transaction!(self.pool, "doom_blobs", |tx| {
            // Digests already being deleted are returned again: a server that stopped between
            // deleting files and `blobs_deleted` left them so, and deleting a file twice is
            // harmless.
            let rows: Vec<(String, bool)> = sqlx::query_as(
                "SELECT digest, deleting FROM unreferenced_blobs WHERE since_ms < $1 \
                 ORDER BY since_ms LIMIT $2 FOR UPDATE SKIP LOCKED",
            )
            .bind(unreferenced_before_ms)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?;
            let mut doomed = Vec::new();
            for (digest, deleting) in rows {
                if !deleting && referenced(&mut tx, &digest).await? {
                    sqlx::query("DELETE FROM unreferenced_blobs WHERE digest = $1")
                        .bind(&digest)
                        .execute(&mut *tx)
                        .await?;
                    continue;
                }
                sqlx::query("UPDATE unreferenced_blobs SET deleting = TRUE WHERE digest = $1")
                    .bind(&digest)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM project_blobs WHERE digest = $1")
                    .bind(&digest)
                    .execute(&mut *tx)
                    .await?;
                doomed.push(digest);
            }
            Ok(doomed)
        })
    }

    async fn blobs_deleted(&self, digests: &[String]) -> Result<()> {
        sqlx::query("DELETE FROM unreferenced_blobs WHERE digest = ANY($1) AND deleting")
            .bind(digests)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn claim_blob(&self, digest: &str, now_ms: i64) -> Result<bool> {
        transaction!(self.pool, "claim_blob", |tx| {
            // The row lock waits for a doom of the digest under way, whose commit then shows.
            let deleting: Option<bool> =
                sqlx::query_scalar("SELECT deleting FROM unreferenced_blobs WHERE digest = $1 FOR UPDATE")
                    .bind(digest)
                    .fetch_optional(&mut *tx)
                    .await?;
            if deleting == Some(true) {
                return Ok(false);
            }
            if referenced(&mut tx, digest).await? {
                sqlx::query("DELETE FROM unreferenced_blobs WHERE digest = $1")
                    .bind(digest)
                    .execute(&mut *tx)
                    .await?;
            } else {
                sqlx::query(
                    "INSERT INTO unreferenced_blobs (digest, since_ms) VALUES ($1, $2) \
                     ON CONFLICT (digest) DO UPDATE SET since_ms = EXCLUDED.since_ms",
                )
                .bind(digest)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
            }
            Ok(true)
        })
    }

    async fn blob_referenced(&self, digest: &str) -> Result<bool> {
        Ok(sqlx::query_scalar(&referenced_sql("$1")).bind(digest).fetch_one(&self.pool).await?)
    }
}

#[cfg(test)]
mod tests {
    use sqlx::migrate::Migrator;
    use sqlx::postgres::PgPool;

    use super::PostgresStore;
    use crate::pg_test::TempPostgres;

    /// The migration that records jobs' blobs, backfilling them from stored plans.
    const RETENTION_MIGRATION: i64 = 12;

    #[tokio::test]
    async fn upgraded_jobs_keep_their_blobs() {
        let url = TempPostgres::shared().url_for_new_database().await;
        let dir = tempfile::tempdir().unwrap();
        crate::conformance::copy_migrations_before("postgres", RETENTION_MIGRATION, &dir.path().join("old"));
        let pool = PgPool::connect(&url).await.unwrap();
        Migrator::new(dir.path().join("old")).await.unwrap().run(&pool).await.unwrap();
        sqlx::raw_sql(crate::conformance::RETENTION_LEGACY_ROWS).execute(&pool).await.unwrap();
        pool.close().await;
        let store = PostgresStore::connect(&url).await.unwrap();
        crate::conformance::upgraded_jobs_keep_their_blobs(&store).await;
    }
}
