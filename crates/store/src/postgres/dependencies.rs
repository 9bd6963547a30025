//! A job's dependency rows in PostgreSQL, read and written for
//! [`drover_core::dag::release_after`], which makes every decision. The caller holds the
//! job's row lock, which serialises every writer of these rows.

use std::collections::BTreeMap;

use drover_core::TaskState;
use drover_core::dag::{DependencyGroup, DependencyRows, Dependent, DependentStep};
use sqlx::{PgConnection, Row};

use super::{corrupt, get_u32, parse_word};
use crate::{Result, StoreError};

/// The dependency rows of one job, inside the caller's transaction.
pub(super) struct JobDependencies<'c> {
    pub conn: &'c mut PgConnection,
    pub job_id: i64,
    pub now_ms: i64,
}

impl DependencyRows for JobDependencies<'_> {
    type Error = StoreError;

    async fn group(&mut self, name: &str) -> Result<DependencyGroup> {
        let row =
            sqlx::query("SELECT frames, ended, blocked_by FROM task_groups WHERE job_id = $1 AND name = $2")
                .bind(self.job_id)
                .bind(name)
                .fetch_optional(&mut *self.conn)
                .await?
                .ok_or_else(|| {
                    corrupt("dependency group", format!("job {} has no group `{name}`", self.job_id))
                })?;
        let blocked_by = match row.try_get::<Option<&str>, _>(2)? {
            Some(word) => Some(parse_word::<TaskState>("task state", word)?),
            None => None,
        };
        Ok(DependencyGroup { frames: get_u32(&row, 0)?, ended: get_u32(&row, 1)?, blocked_by })
    }

    async fn save_group(&mut self, name: &str, group: &DependencyGroup) -> Result<()> {
        sqlx::query("UPDATE task_groups SET ended = $1, blocked_by = $2 WHERE job_id = $3 AND name = $4")
            .bind(i64::from(group.ended))
            .bind(group.blocked_by.map(|s| s.as_str()))
            .bind(self.job_id)
            .bind(name)
            .execute(&mut *self.conn)
            .await?;
        Ok(())
    }

    async fn waiting_on(&mut self, name: &str) -> Result<Vec<Dependent>> {
        let rows = sqlx::query(
            "SELECT t.id, t.name, t.frame, t.deps_left FROM task_deps d JOIN tasks t ON t.id = d.task_id \
             WHERE d.job_id = $1 AND d.on_name = $2 AND t.state = 'waiting' ORDER BY t.id",
        )
        .bind(self.job_id)
        .bind(name)
        .fetch_all(&mut *self.conn)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Dependent {
                    id: r.try_get(0)?,
                    name: r.try_get(1)?,
                    frame: r.try_get(2)?,
                    deps_left: get_u32(r, 3)?,
                })
            })
            .collect()
    }

    async fn save_dependent(&mut self, task: &Dependent, step: &DependentStep) -> Result<()> {
        match step {
            DependentStep::Wait { deps_left } => {
                sqlx::query("UPDATE tasks SET deps_left = $1 WHERE id = $2")
                    .bind(i64::from(*deps_left))
                    .bind(task.id)
                    .execute(&mut *self.conn)
                    .await?;
            }
            DependentStep::Release { state, reason } => {
                sqlx::query(
                    "UPDATE tasks SET state = $1, reason = $2, ended_ms = $3, deps_left = 0 WHERE id = $4",
                )
                .bind(state.as_str())
                .bind(reason)
                .bind(state.is_final().then_some(self.now_ms))
                .bind(task.id)
                .execute(&mut *self.conn)
                .await?;
            }
        }
        Ok(())
    }
}

/// Stores the dependency rows of a new job: a group per task name and, for each task that
/// waits, its edges. `tasks` are (id, name, depends_on).
pub(super) async fn record_graph(
    conn: &mut PgConnection,
    job_id: i64,
    tasks: &[(i64, &str, &[String])],
) -> Result<()> {
    let mut frames: BTreeMap<&str, i64> = BTreeMap::new();
    for (_, name, _) in tasks {
        *frames.entry(name).or_default() += 1;
    }
    sqlx::query(
        "INSERT INTO task_groups (job_id, name, frames) SELECT $1, u.name, u.frames \
         FROM UNNEST($2::TEXT[], $3::BIGINT[]) AS u(name, frames)",
    )
    .bind(job_id)
    .bind(frames.keys().copied().collect::<Vec<_>>())
    .bind(frames.values().copied().collect::<Vec<_>>())
    .execute(&mut *conn)
    .await?;
    let (ids, names): (Vec<i64>, Vec<&str>) =
        tasks.iter().flat_map(|(id, _, deps)| deps.iter().map(move |d| (*id, d.as_str()))).unzip();
    sqlx::query(
        "INSERT INTO task_deps (job_id, on_name, task_id) SELECT $1, u.on_name, u.task_id \
         FROM UNNEST($2::TEXT[], $3::BIGINT[]) AS u(on_name, task_id)",
    )
    .bind(job_id)
    .bind(names)
    .bind(ids)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
