//! [`ArtifactStore`] on PostgreSQL.

use super::*;
use crate::pages::{self, List};

/// Where a page of artifacts ends: task id, path, attempt number, row id.
type ArtifactKey = (i64, String, u32, i64);

#[async_trait]
impl ArtifactStore for PostgresStore {
    async fn record_outputs(
        &self,
        attempt_id: i64,
        epoch: i64,
        files: &[OutputFile],
        now_ms: i64,
    ) -> Result<Applied> {
        // Each blob once, by digest (the order its ownership rows are written in).
        let blobs: BTreeMap<&str, i64> =
            files.iter().map(|f| (f.digest.as_str(), i64::try_from(f.size).unwrap_or(i64::MAX))).collect();
        transaction!(self.pool, "record_outputs", |tx| {
            let Some(a) = open_attempt(&mut tx, attempt_id, Some(epoch), AttemptLock::Share).await? else {
                return Ok(Applied::Stale);
            };
            for f in files {
                sqlx::query(
                    "INSERT INTO artifacts (job_id, task_id, attempt_id, attempt, path, size, digest, created_ms) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(a.job_id)
                .bind(a.task_id)
                .bind(a.id)
                .bind(i64::from(a.number))
                .bind(&f.path)
                .bind(f.size as i64)
                .bind(&f.digest)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
            }
            if !blobs.is_empty() {
                // The job's project now holds the blobs (what lets its keys download them).
                // Rows in digest order: two transactions adding overlapping sets wait for each
                // other in one order instead of deadlocking.
                sqlx::query(
                    "INSERT INTO project_blobs (project, digest, size, created_ms) \
                     SELECT j.project, u.digest, u.size, $4 FROM jobs j, \
                         UNNEST($2::TEXT[], $3::BIGINT[]) AS u(digest, size) \
                     WHERE j.id = $1 ORDER BY u.digest \
                     ON CONFLICT (project, digest) DO NOTHING",
                )
                .bind(a.job_id)
                .bind(blobs.keys().collect::<Vec<_>>())
                .bind(blobs.values().copied().collect::<Vec<i64>>())
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
            }
            Ok(Applied::Applied)
        })
    }

    async fn artifacts(&self, job_id: i64, filter: &TaskFilter) -> Result<Vec<ArtifactRecord>> {
        let rows = sqlx::query(
            "SELECT a.task_id, t.name, t.frame, a.attempt, a.path, a.size, a.digest, a.created_ms \
             FROM artifacts a JOIN tasks t ON t.id = a.task_id WHERE a.job_id = $1 \
             ORDER BY t.id, a.path, a.attempt DESC, a.id DESC",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| ArtifactRecord {
                task_id: r.get(0),
                task_name: r.get(1),
                frame: r.get(2),
                attempt: r.get::<i32, _>(3) as u32,
                path: r.get(4),
                size: r.get::<i64, _>(5) as u64,
                digest: r.get(6),
                created_ms: r.get(7),
            })
            .filter(|a| filter.matches(&a.task_name, a.frame))
            .collect())
    }

    async fn list_artifacts(
        &self,
        job_id: i64,
        filter: &TaskFilter,
        page: &PageRequest,
    ) -> Result<Page<ArtifactRecord>> {
        let at = pages::open::<ArtifactKey>(List::Artifacts, page)?;
        let mut q = QueryBuilder::<Postgres>::new(
            "SELECT a.task_id, t.name, t.frame, a.attempt, a.path, a.size, a.digest, a.created_ms, a.id \
             FROM artifacts a JOIN tasks t ON t.id = a.task_id WHERE a.job_id = ",
        );
        q.push_bind(job_id);
        if let Some(name) = &filter.name {
            q.push(" AND t.name = ").push_bind(name);
        }
        if let Some(frame) = filter.frame {
            q.push(" AND t.frame = ").push_bind(frame);
        }
        if let Some((task_id, path, attempt, id)) = &at.after {
            // After the key in the list's order: task and path ascending, attempt (then row)
            // descending.
            q.push(" AND (a.task_id > ").push_bind(*task_id);
            q.push(" OR (a.task_id = ").push_bind(*task_id).push(" AND (a.path > ").push_bind(path);
            q.push(" OR (a.path = ")
                .push_bind(path)
                .push(" AND (a.attempt < ")
                .push_bind(i64::from(*attempt));
            q.push(" OR (a.attempt = ").push_bind(i64::from(*attempt)).push(" AND a.id < ").push_bind(*id);
            q.push("))))))");
        }
        q.push(" ORDER BY a.task_id, a.path, a.attempt DESC, a.id DESC LIMIT ").push_bind(at.limit());
        let rows = q.build().fetch_all(&self.pool).await?;
        let mut keyed = Vec::with_capacity(rows.len());
        for r in &rows {
            let record = ArtifactRecord {
                task_id: r.try_get(0)?,
                task_name: r.try_get(1)?,
                frame: r.try_get(2)?,
                attempt: r.try_get::<i32, _>(3)? as u32,
                path: r.try_get(4)?,
                size: r.try_get::<i64, _>(5)? as u64,
                digest: r.try_get(6)?,
                created_ms: r.try_get(7)?,
            };
            keyed.push((record, r.try_get::<i64, _>(8)?));
        }
        let page =
            pages::close(List::Artifacts, &at, keyed, |(a, id)| (a.task_id, a.path.clone(), a.attempt, *id))?;
        Ok(Page { items: page.items.into_iter().map(|(a, _)| a).collect(), next_token: page.next_token })
    }
}
