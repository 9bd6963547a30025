//! [`TenantStore`] on SQLite.
//!
//! Writes run on the single writer connection (see the module header of [`crate::sqlite`]):
//! reading the latest price table and adding the next version is one step without further
//! locking. Queue reasons are written without events: a reason explains a wait, it is not a
//! change of state.

use std::collections::BTreeMap;

use async_trait::async_trait;
use drover_core::tenancy::{Metered, MeteredByVersion, PriceTable, ProjectSettings};
use sqlx::sqlite::SqliteRow;
use sqlx::{Connection, QueryBuilder, Row, Sqlite};

use super::SqliteStore;
use crate::tenancy::{
    AuditFilter, AuditRecord, HOLD_PREFIXES, Holding, JobMetered, MeteredRow, TenantStore, add_spend,
    audit_limit, decode_prices, decode_settings, encode_prices, encode_settings, group_metered,
    group_retired, metered, same_prices,
};
use crate::{Result, RetiredUsage, UsageFilter};

/// Milliseconds an attempt `a` held its reservation: from its start to its end, or to
/// `clock.ms` (now, a one-row subquery the query joins) while it runs; 0 if it never started.
const HELD_MS: &str =
    "(CASE WHEN a.started_ms IS NULL THEN 0 ELSE MAX(COALESCE(a.ended_ms, clock.ms) - a.started_ms, 0) END)";

/// The sums [`metered`] takes, over attempts `a` (see [`HELD_MS`]).
fn metered_sums() -> String {
    format!(
        "SUM(CAST(a.cores AS REAL) * {HELD_MS}), SUM(CAST(a.memory AS REAL) * {HELD_MS}), \
         SUM(a.input_tokens), SUM(a.output_tokens)"
    )
}

/// Reads the sums of [`metered_sums`] starting at column `at`.
fn metered_at(r: &SqliteRow, at: usize) -> Result<drover_core::tenancy::Metered> {
    let tokens = |i: usize| -> Result<u64> { Ok(r.try_get::<Option<i64>, _>(i)?.unwrap_or(0).max(0) as u64) };
    Ok(metered(
        r.try_get::<Option<f64>, _>(at)?.unwrap_or(0.0),
        r.try_get::<Option<f64>, _>(at + 1)?.unwrap_or(0.0),
        tokens(at + 2)?,
        tokens(at + 3)?,
    ))
}

/// A row of `retired_usage`, with one price version's spend from column 8 on when the project
/// has any.
fn retired_row(r: &SqliteRow) -> Result<(RetiredUsage, Option<(i64, Metered)>)> {
    let count = |i: usize| -> Result<u64> { Ok(r.try_get::<i64, _>(i)?.max(0) as u64) };
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
fn audit_record(r: &SqliteRow) -> Result<AuditRecord> {
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
impl TenantStore for SqliteStore {
    async fn project_settings(&self, project: &str) -> Result<Option<ProjectSettings>> {
        let text: Option<String> = sqlx::query_scalar("SELECT settings FROM projects WHERE name = ?")
            .bind(project)
            .fetch_optional(&self.reader)
            .await?;
        text.as_deref().map(decode_settings).transpose()
    }

    async fn all_project_settings(&self) -> Result<BTreeMap<String, ProjectSettings>> {
        let rows: Vec<(String, String)> = sqlx::query_as("SELECT name, settings FROM projects ORDER BY name")
            .fetch_all(&self.reader)
            .await?;
        rows.into_iter().map(|(name, text)| Ok((name, decode_settings(&text)?))).collect()
    }

    async fn set_project_settings(&self, project: &str, settings: &ProjectSettings) -> Result<bool> {
        let n = sqlx::query("UPDATE projects SET settings = ? WHERE name = ?")
            .bind(encode_settings(settings)?)
            .bind(project)
            .execute(&mut *self.writer.lock().await)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    async fn holdings(&self) -> Result<BTreeMap<String, Holding>> {
        let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT j.project, SUM(a.cores), SUM(a.memory), COUNT(*) FROM attempts a \
             JOIN jobs j ON j.id = a.job_id WHERE a.state <> 'ended' GROUP BY j.project",
        )
        .fetch_all(&self.reader)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(project, cores, memory, tasks)| {
                let holding = Holding {
                    cores: cores.max(0) as u64,
                    memory: memory.max(0) as u64,
                    tasks: tasks.max(0) as u64,
                };
                (project, holding)
            })
            .collect())
    }

    async fn stored_bytes(&self, project: &str) -> Result<u64> {
        let bytes: i64 =
            sqlx::query_scalar("SELECT COALESCE(SUM(size), 0) FROM project_blobs WHERE project = ?")
                .bind(project)
                .fetch_one(&self.reader)
                .await?;
        Ok(bytes.max(0) as u64)
    }

    async fn attempt_project(&self, attempt_id: i64) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT j.project FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE a.id = ?",
        )
        .bind(attempt_id)
        .fetch_optional(&self.reader)
        .await?)
    }

    async fn set_queue_reasons(&self, reasons: &[(i64, String)]) -> Result<()> {
        if reasons.is_empty() {
            return Ok(());
        }
        let mut writer = self.writer.lock().await;
        let mut tx = writer.begin().await?;
        for (task_id, reason) in reasons {
            // The `reason <> ?` keeps a reason set every round from being written every round.
            sqlx::query("UPDATE tasks SET reason = ? WHERE id = ? AND state = 'queued' AND reason <> ?")
                .bind(reason)
                .bind(task_id)
                .bind(reason)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn set_project_queue_reason(&self, project: &str, reason: &str) -> Result<()> {
        // The job's project is looked up per candidate task (by primary key): scanning the
        // candidates is cheap, reading every job of the project (history included) is not.
        let mut q = if reason.is_empty() {
            // Clearing runs every round for every project that has limits: it reads only the
            // small index of queued tasks that have a reason (`INDEXED BY` fails loudly should
            // the index ever stop matching), and touches only a hold's reasons. `instr(..) = 1`
            // is a case-sensitive "starts with" (LIKE ignores ASCII case).
            let mut q = QueryBuilder::<Sqlite>::new(
                "UPDATE tasks INDEXED BY tasks_queued_with_reason SET reason = '' \
                 WHERE state = 'queued' AND reason <> '' AND (",
            );
            let mut any = q.separated(" OR ");
            for prefix in HOLD_PREFIXES {
                any.push("instr(reason, ").push_bind_unseparated(prefix).push_unseparated(") = 1");
            }
            q.push(")");
            q
        } else {
            let mut q = QueryBuilder::<Sqlite>::new("UPDATE tasks SET reason = ");
            q.push_bind(reason).push(" WHERE state = 'queued' AND reason <> ").push_bind(reason);
            q
        };
        q.push(" AND (SELECT project FROM jobs WHERE id = tasks.job_id) = ").push_bind(project);
        q.build().execute(&mut *self.writer.lock().await).await?;
        Ok(())
    }

    async fn record_prices(&self, prices: &PriceTable, now_ms: i64) -> Result<i64> {
        let mut writer = self.writer.lock().await;
        let mut tx = writer.begin().await?;
        let latest: Option<(i64, String)> =
            sqlx::query_as("SELECT version, prices FROM prices ORDER BY version DESC LIMIT 1")
                .fetch_optional(&mut *tx)
                .await?;
        match &latest {
            Some((version, text)) if same_prices(text, prices)? => return Ok(*version),
            // Version 0, "before any table", already prices everything at zero.
            None if !prices.is_set() => return Ok(0),
            _ => {}
        }
        let version = latest.map_or(0, |(v, _)| v) + 1;
        sqlx::query("INSERT INTO prices (version, effective_ms, prices) VALUES (?, ?, ?)")
            .bind(version)
            .bind(now_ms)
            .bind(encode_prices(prices)?)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(version, "recorded a new price table");
        Ok(version)
    }

    async fn price_versions(&self) -> Result<BTreeMap<i64, PriceTable>> {
        let rows: Vec<(i64, String)> = sqlx::query_as("SELECT version, prices FROM prices ORDER BY version")
            .fetch_all(&self.reader)
            .await?;
        rows.into_iter().map(|(version, text)| Ok((version, decode_prices(&text)?))).collect()
    }

    async fn metered(&self, filter: &UsageFilter, now_ms: i64) -> Result<Vec<JobMetered>> {
        let mut q = QueryBuilder::<Sqlite>::new(format!(
            "SELECT j.project, j.id, a.task_id, a.price_version, {} FROM (SELECT ",
            metered_sums()
        ));
        q.push_bind(now_ms);
        // Jobs without attempts are listed too (with no tasks), as `usage` lists them.
        q.push(" AS ms) AS clock CROSS JOIN jobs j LEFT JOIN attempts a ON a.job_id = j.id WHERE 1 = 1");
        if let Some(project) = &filter.project {
            q.push(" AND j.project = ").push_bind(project);
        }
        if let Some(job_id) = filter.job_id {
            q.push(" AND j.id = ").push_bind(job_id);
        }
        q.push(
            " GROUP BY j.id, a.task_id, a.price_version ORDER BY j.project, j.id, a.task_id, a.price_version",
        );
        let rows = q.build().fetch_all(&self.reader).await?;
        let rows = rows
            .iter()
            .map(|r| {
                Ok(MeteredRow {
                    project: r.try_get(0)?,
                    job_id: r.try_get(1)?,
                    task_id: r.try_get(2)?,
                    version: r.try_get::<Option<i64>, _>(3)?.unwrap_or(0),
                    used: metered_at(r, 4)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(group_metered(rows))
    }

    async fn metered_since(&self, since_ms: i64, now_ms: i64) -> Result<BTreeMap<String, MeteredByVersion>> {
        let sql = format!(
            "SELECT j.project, a.price_version, {} FROM (SELECT ? AS ms) AS clock CROSS JOIN attempts a \
             JOIN jobs j ON j.id = a.job_id WHERE a.assigned_ms >= ? GROUP BY j.project, a.price_version",
            metered_sums()
        );
        let rows = sqlx::query(&sql).bind(now_ms).bind(since_ms).fetch_all(&self.reader).await?;
        let mut out: BTreeMap<String, MeteredByVersion> = BTreeMap::new();
        for r in &rows {
            out.entry(r.try_get(0)?).or_default().insert(r.try_get(1)?, metered_at(r, 2)?);
        }
        // Deleted jobs' attempts, by the day they were assigned (a period starts at a day).
        let retired = sqlx::query(
            "SELECT project, price_version, SUM(core_ms), SUM(byte_ms), SUM(input_tokens), SUM(output_tokens) \
             FROM retired_metering WHERE day_ms >= ? GROUP BY project, price_version",
        )
        .bind(since_ms)
        .fetch_all(&self.reader)
        .await?;
        for r in &retired {
            add_spend(&mut out, r.try_get(0)?, r.try_get(1)?, metered_at(r, 2)?);
        }
        Ok(out)
    }

    async fn retired_usage(&self, project: Option<&str>) -> Result<Vec<RetiredUsage>> {
        // One statement, so the counts and the spend are of the same deletions.
        let mut q = QueryBuilder::<Sqlite>::new(
            "SELECT u.project, u.jobs, u.tasks, u.attempts, u.cpu_seconds, u.wall_ms, u.input_tokens, \
                 u.output_tokens, m.price_version, m.core_ms, m.byte_ms, m.input_tokens, m.output_tokens \
             FROM retired_usage u LEFT JOIN (SELECT project, price_version, SUM(core_ms) AS core_ms, \
                 SUM(byte_ms) AS byte_ms, SUM(input_tokens) AS input_tokens, \
                 SUM(output_tokens) AS output_tokens \
                 FROM retired_metering GROUP BY project, price_version) m ON m.project = u.project \
             WHERE 1 = 1",
        );
        if let Some(project) = project {
            q.push(" AND u.project = ").push_bind(project);
        }
        q.push(" ORDER BY u.project, m.price_version");
        let rows = q.build().fetch_all(&self.reader).await?;
        let rows = rows.iter().map(retired_row).collect::<Result<Vec<_>>>()?;
        Ok(group_retired(rows))
    }

    async fn append_audit(&self, record: &AuditRecord) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "INSERT INTO audit (time_ms, actor, address, project, action, target, detail) \
             VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(record.time_ms)
        .bind(&record.actor)
        .bind(&record.address)
        .bind(&record.project)
        .bind(&record.action)
        .bind(&record.target)
        .bind(&record.detail)
        .fetch_one(&mut *self.writer.lock().await)
        .await?)
    }

    async fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>> {
        if filter.projects.as_ref().is_some_and(Vec::is_empty) {
            return Ok(Vec::new());
        }
        let mut q = QueryBuilder::<Sqlite>::new(format!("SELECT {AUDIT_COLUMNS} FROM audit WHERE id > "));
        q.push_bind(filter.after_id);
        if let Some(since_ms) = filter.since_ms {
            q.push(" AND time_ms >= ").push_bind(since_ms);
        }
        if let Some(projects) = &filter.projects {
            // `project IN (..)` is never true for NULL: cluster-wide records stay out.
            q.push(" AND project IN (");
            let mut list = q.separated(", ");
            for p in projects {
                list.push_bind(p);
            }
            q.push(")");
        }
        q.push(" ORDER BY id LIMIT ").push_bind(audit_limit(filter.limit));
        q.build().fetch_all(&self.reader).await?.iter().map(audit_record).collect()
    }
}
