//! [`TenantStore`] on PostgreSQL.
//!
//! Three things here are shared between replicas and settled by the database:
//!
//! - **Price versions.** `record_prices` reads the latest table and adds the next version under
//!   a transaction advisory lock, so replicas recording at once take turns: the second sees
//!   the first's table and adds nothing when it is the same. Readers (and `assign`, which
//!   stamps new attempts with the latest version) take no lock.
//! - **Audit ids** are drawn under another advisory lock held to commit, so they become
//!   visible in increasing order and paging with `after_id` never skips a record (the same
//!   reasoning as log line ids in [`super`]).
//! - **Queue reasons** change only task rows, never under the job's lock: a reason is not a
//!   state change and appends no event. The rows are locked in id order with `SKIP LOCKED`,
//!   as `assign` claims them, so a task that another transaction is assigning, cancelling or
//!   settling right now is passed over instead of waited for (the next round sets its reason
//!   if it is still queued), and taking only task locks, last in the lock order, cannot
//!   deadlock with anything.

use std::collections::BTreeMap;

use async_trait::async_trait;
use drover_core::tenancy::{Metered, MeteredByVersion, PriceTable, ProjectSettings};
use sqlx::postgres::PgRow;
use sqlx::{Postgres, QueryBuilder, Row};

use super::{MAX_TRIES, PostgresStore, get_u64, retryable};
use crate::tenancy::{
    AuditFilter, AuditRecord, HOLD_PREFIXES, Holding, JobMetered, MeteredRow, TenantStore, add_spend,
    audit_limit, decode_prices, decode_settings, encode_prices, encode_settings, group_metered,
    group_retired, metered, same_prices,
};
use crate::{Result, RetiredUsage, UsageFilter};

/// First key of the advisory lock that serialises `record_prices` (`prce` in ASCII).
const PRICES_LOCK_CLASS: i32 = 0x7072_6365;

/// First key of the advisory lock that orders audit ids (`audt` in ASCII).
const AUDIT_LOCK_CLASS: i32 = 0x6175_6474;

/// Milliseconds an attempt `a` held its reservation, with `$1` now: from its start to its end,
/// or to now while it runs; 0 for an attempt that never started.
const HELD_MS: &str =
    "(CASE WHEN a.started_ms IS NULL THEN 0 ELSE GREATEST(COALESCE(a.ended_ms, $1) - a.started_ms, 0) END)";

/// The sums [`metered`] takes, over attempts `a` (see [`HELD_MS`]).
fn metered_sums() -> String {
    format!(
        "SUM(a.cores::FLOAT8 * {HELD_MS}), SUM(a.memory::FLOAT8 * {HELD_MS}), \
         COALESCE(SUM(a.input_tokens), 0)::BIGINT, COALESCE(SUM(a.output_tokens), 0)::BIGINT"
    )
}

/// Reads the sums of [`metered_sums`] starting at column `at`.
fn metered_at(r: &PgRow, at: usize) -> Result<Metered> {
    Ok(metered(
        r.try_get::<Option<f64>, _>(at)?.unwrap_or(0.0),
        r.try_get::<Option<f64>, _>(at + 1)?.unwrap_or(0.0),
        get_u64(r, at + 2)?,
        get_u64(r, at + 3)?,
    ))
}

/// A row of `retired_usage`, with one price version's spend from column 8 on when the project
/// has any.
fn retired_row(r: &PgRow) -> Result<(RetiredUsage, Option<(i64, Metered)>)> {
    let count = |i: usize| get_u64(r, i);
    let usage = RetiredUsage {
        project: r.try_get(0)?,
        jobs: count(1)?,
        tasks: count(2)?,
        attempts: count(3)?,
        cpu_seconds: r.try_get(4)?,
        wall_seconds: r.try_get::<i64, _>(5)? as f64 / 1000.0,
        input_tokens: count(6)?,
        output_tokens: count(7)?,
        spend: Default::default(),
    };
    let spend = match r.try_get::<Option<i64>, _>(8)? {
        Some(version) => Some((version, metered_at(r, 9)?)),
        None => None,
    };
    Ok((usage, spend))
}

/// Columns of [`audit_record`], in its order.
const AUDIT_COLUMNS: &str = "id, time_ms, actor, address, project, action, target, detail";

/// An audit record read with [`AUDIT_COLUMNS`].
fn audit_record(r: &PgRow) -> Result<AuditRecord> {
    Ok(AuditRecord {
        id: r.try_get(0)?,
        time_ms: r.try_get(1)?,
        actor: r.try_get(2)?,
        address: r.try_get(3)?,
        project: r.try_get(4)?,
        action: r.try_get(5)?,
        target: r.try_get(6)?,
        detail: r.try_get(7)?,
    })
}

#[async_trait]
impl TenantStore for PostgresStore {
    async fn project_settings(&self, project: &str) -> Result<Option<ProjectSettings>> {
        let text: Option<String> = sqlx::query_scalar("SELECT settings FROM projects WHERE name = $1")
            .bind(project)
            .fetch_optional(&self.pool)
            .await?;
        text.as_deref().map(decode_settings).transpose()
    }

    async fn all_project_settings(&self) -> Result<BTreeMap<String, ProjectSettings>> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT name, settings FROM projects ORDER BY name").fetch_all(&self.pool).await?;
        rows.into_iter().map(|(name, text)| Ok((name, decode_settings(&text)?))).collect()
    }

    async fn set_project_settings(&self, project: &str, settings: &ProjectSettings) -> Result<bool> {
        let n = sqlx::query("UPDATE projects SET settings = $1 WHERE name = $2")
            .bind(encode_settings(settings)?)
            .bind(project)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    async fn holdings(&self) -> Result<BTreeMap<String, Holding>> {
        let rows = sqlx::query(
            "SELECT j.project, SUM(a.cores)::BIGINT, SUM(a.memory)::BIGINT, COUNT(*)::BIGINT FROM attempts a \
             JOIN jobs j ON j.id = a.job_id WHERE a.state <> 'ended' GROUP BY j.project",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let holding =
                    Holding { cores: get_u64(r, 1)?, memory: get_u64(r, 2)?, tasks: get_u64(r, 3)? };
                Ok((r.try_get(0)?, holding))
            })
            .collect()
    }

    async fn stored_bytes(&self, project: &str) -> Result<u64> {
        let row = sqlx::query("SELECT COALESCE(SUM(size), 0)::BIGINT FROM project_blobs WHERE project = $1")
            .bind(project)
            .fetch_one(&self.pool)
            .await?;
        get_u64(&row, 0)
    }

    async fn attempt_project(&self, attempt_id: i64) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT j.project FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE a.id = $1",
        )
        .bind(attempt_id)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn set_queue_reasons(&self, reasons: &[(i64, String)]) -> Result<()> {
        if reasons.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = reasons.iter().map(|(id, _)| *id).collect();
        let texts: Vec<&str> = reasons.iter().map(|(_, r)| r.as_str()).collect();
        // The `reason <>` test keeps a reason set every round from being written (and its row
        // locked) every round.
        sqlx::query(
            "WITH wanted AS (SELECT * FROM UNNEST($1::BIGINT[], $2::TEXT[]) AS u(id, reason)), \
             locked AS (SELECT t.id, w.reason FROM tasks t JOIN wanted w ON w.id = t.id \
                        WHERE t.state = 'queued' AND t.reason <> w.reason \
                        ORDER BY t.id FOR UPDATE OF t SKIP LOCKED) \
             UPDATE tasks t SET reason = locked.reason FROM locked WHERE t.id = locked.id",
        )
        .bind(&ids)
        .bind(&texts)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn set_project_queue_reason(&self, project: &str, reason: &str) -> Result<()> {
        // Clearing runs every round for every project that has limits: written with the literal
        // `reason <> ''`, it can read the small partial index of queued tasks that have a reason
        // even under a generic plan, and it touches only a hold's reasons. Setting overwrites any.
        let candidates = if reason.is_empty() {
            "t.reason <> '' AND EXISTS (SELECT 1 FROM UNNEST($3::TEXT[]) AS h(prefix) \
             WHERE strpos(t.reason, h.prefix) = 1)"
        } else {
            "t.reason <> $2"
        };
        let sql = format!(
            "WITH locked AS (SELECT t.id FROM tasks t JOIN jobs j ON j.id = t.job_id \
                             WHERE t.state = 'queued' AND {candidates} AND j.project = $1 \
                             ORDER BY t.id FOR UPDATE OF t SKIP LOCKED) \
             UPDATE tasks t SET reason = $2 FROM locked WHERE t.id = locked.id"
        );
        let mut query = sqlx::query(&sql).bind(project).bind(reason);
        if reason.is_empty() {
            query = query.bind(HOLD_PREFIXES.as_slice());
        }
        query.execute(&self.pool).await?;
        Ok(())
    }

    async fn record_prices(&self, prices: &PriceTable, now_ms: i64) -> Result<i64> {
        let text = encode_prices(prices)?;
        let (version, added) = transaction!(self.pool, "record_prices", |tx| {
            sqlx::query("SELECT pg_advisory_xact_lock($1, 0)")
                .bind(PRICES_LOCK_CLASS)
                .execute(&mut *tx)
                .await?;
            // Read after the lock was granted, so a table another replica just recorded is seen.
            let latest: Option<(i64, String)> =
                sqlx::query_as("SELECT version, prices FROM prices ORDER BY version DESC LIMIT 1")
                    .fetch_optional(&mut *tx)
                    .await?;
            match &latest {
                Some((version, stored)) if same_prices(stored, prices)? => return Ok((*version, false)),
                // Version 0, "before any table", already prices everything at zero.
                None if !prices.is_set() => return Ok((0, false)),
                _ => {}
            }
            let version = latest.map_or(0, |(v, _)| v) + 1;
            sqlx::query("INSERT INTO prices (version, effective_ms, prices) VALUES ($1, $2, $3)")
                .bind(version)
                .bind(now_ms)
                .bind(&text)
                .execute(&mut *tx)
                .await?;
            Ok((version, true))
        })?;
        if added {
            tracing::info!(version, "recorded a new price table");
        }
        Ok(version)
    }

    async fn price_versions(&self) -> Result<BTreeMap<i64, PriceTable>> {
        let rows: Vec<(i64, String)> = sqlx::query_as("SELECT version, prices FROM prices ORDER BY version")
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(|(version, text)| Ok((version, decode_prices(&text)?))).collect()
    }

    async fn metered(&self, filter: &UsageFilter, now_ms: i64) -> Result<Vec<JobMetered>> {
        // Jobs without attempts are listed too (with no tasks), as `usage` lists them.
        let sql = format!(
            "SELECT j.project, j.id, a.task_id, COALESCE(a.price_version, 0), {} \
             FROM jobs j LEFT JOIN attempts a ON a.job_id = j.id \
             WHERE ($2::TEXT IS NULL OR j.project = $2) AND ($3::BIGINT IS NULL OR j.id = $3) \
             GROUP BY j.project, j.id, a.task_id, a.price_version \
             ORDER BY j.project, j.id, a.task_id, a.price_version",
            metered_sums()
        );
        let rows = sqlx::query(&sql)
            .bind(now_ms)
            .bind(&filter.project)
            .bind(filter.job_id)
            .fetch_all(&self.pool)
            .await?;
        let rows = rows
            .iter()
            .map(|r| {
                Ok(MeteredRow {
                    project: r.try_get(0)?,
                    job_id: r.try_get(1)?,
                    task_id: r.try_get(2)?,
                    version: r.try_get(3)?,
                    used: metered_at(r, 4)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(group_metered(rows))
    }

    async fn metered_since(&self, since_ms: i64, now_ms: i64) -> Result<BTreeMap<String, MeteredByVersion>> {
        let sql = format!(
            "SELECT j.project, a.price_version, {} FROM attempts a JOIN jobs j ON j.id = a.job_id \
             WHERE a.assigned_ms >= $2 GROUP BY j.project, a.price_version",
            metered_sums()
        );
        let rows = sqlx::query(&sql).bind(now_ms).bind(since_ms).fetch_all(&self.pool).await?;
        let mut out: BTreeMap<String, MeteredByVersion> = BTreeMap::new();
        for r in &rows {
            out.entry(r.try_get(0)?).or_default().insert(r.try_get(1)?, metered_at(r, 2)?);
        }
        // Deleted jobs' attempts, by the day they were assigned (a period starts at a day).
        let retired = sqlx::query(
            "SELECT project, price_version, SUM(core_ms), SUM(byte_ms), \
                 SUM(input_tokens)::BIGINT, SUM(output_tokens)::BIGINT \
             FROM retired_metering WHERE day_ms >= $1 GROUP BY project, price_version",
        )
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        for r in &retired {
            add_spend(&mut out, r.try_get(0)?, r.try_get(1)?, metered_at(r, 2)?);
        }
        Ok(out)
    }

    async fn retired_usage(&self, project: Option<&str>) -> Result<Vec<RetiredUsage>> {
        // One statement, so the counts and the spend are of the same deletions.
        let mut q = QueryBuilder::<Postgres>::new(
            "SELECT u.project, u.jobs, u.tasks, u.attempts, u.cpu_seconds, u.wall_ms, u.input_tokens, \
                 u.output_tokens, m.price_version, m.core_ms, m.byte_ms, m.input_tokens, m.output_tokens \
             FROM retired_usage u LEFT JOIN (SELECT project, price_version, SUM(core_ms) AS core_ms, \
                 SUM(byte_ms) AS byte_ms, SUM(input_tokens)::BIGINT AS input_tokens, \
                 SUM(output_tokens)::BIGINT AS output_tokens \
                 FROM retired_metering GROUP BY project, price_version) m ON m.project = u.project \
             WHERE 1 = 1",
        );
        if let Some(project) = project {
            q.push(" AND u.project = ").push_bind(project);
        }
        q.push(" ORDER BY u.project, m.price_version");
        let rows = q.build().fetch_all(&self.pool).await?;
        let rows = rows.iter().map(retired_row).collect::<Result<Vec<_>>>()?;
        Ok(group_retired(rows))
    }

    async fn append_audit(&self, record: &AuditRecord) -> Result<i64> {
        transaction!(self.pool, "append_audit", |tx| {
            sqlx::query("SELECT pg_advisory_xact_lock($1, 0)")
                .bind(AUDIT_LOCK_CLASS)
                .execute(&mut *tx)
                .await?;
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO audit (time_ms, actor, address, project, action, target, detail) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            )
            .bind(record.time_ms)
            .bind(&record.actor)
            .bind(&record.address)
            .bind(&record.project)
            .bind(&record.action)
            .bind(&record.target)
            .bind(&record.detail)
            .fetch_one(&mut *tx)
            .await?;
            Ok(id)
        })
    }

    async fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>> {
        if filter.projects.as_ref().is_some_and(Vec::is_empty) {
            return Ok(Vec::new());
        }
        let mut q = QueryBuilder::<Postgres>::new(format!("SELECT {AUDIT_COLUMNS} FROM audit WHERE id > "));
        q.push_bind(filter.after_id);
        if let Some(since_ms) = filter.since_ms {
            q.push(" AND time_ms >= ").push_bind(since_ms);
        }
        if let Some(projects) = &filter.projects {
            // `= ANY` is never true for NULL: cluster-wide records stay out.
            q.push(" AND project = ANY(").push_bind(projects.as_slice()).push(")");
        }
        q.push(" ORDER BY id LIMIT ").push_bind(audit_limit(filter.limit));
        q.build().fetch_all(&self.pool).await?.iter().map(audit_record).collect()
    }
}
