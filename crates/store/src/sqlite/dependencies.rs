//! A job's dependency rows in SQLite, read and written for
//! [`drover_core::dag::release_after`], which makes every decision.

use drover_core::TaskState;
use drover_core::dag::{DependencyGroup, DependencyRows, Dependent, DependentStep};
use sqlx::{Row, SqliteConnection};

use super::{corrupt, parse_word};
use crate::{Result, StoreError};

/// The dependency rows of one job, inside the caller's transaction.
pub(super) struct JobDependencies<'c> {
    pub conn: &'c mut SqliteConnection,
    pub job_id: i64,
    pub now_ms: i64,
}

impl DependencyRows for JobDependencies<'_> {
    type Error = StoreError;

    async fn group(&mut self, name: &str) -> Result<DependencyGroup> {
        let row =
            sqlx::query("SELECT frames, ended, blocked_by FROM task_groups WHERE job_id = ? AND name = ?")
                .bind(self.job_id)
                .bind(name)
                .fetch_optional(&mut *self.conn)
                .await?
                .ok_or_else(|| {
                    corrupt("dependency group", format!("job {} has no group `{name}`", self.job_id))
                })?;
        let blocked_by = match row.get::<Option<&str>, _>(2) {
            Some(word) => Some(parse_word::<TaskState>("task state", word)?),
            None => None,
        };
        Ok(DependencyGroup {
            frames: row.get::<i64, _>(0).try_into().unwrap_or(u32::MAX),
            ended: row.get::<i64, _>(1).try_into().unwrap_or(u32::MAX),
            blocked_by,
        })
    }

    async fn save_group(&mut self, name: &str, group: &DependencyGroup) -> Result<()> {
        sqlx::query("UPDATE task_groups SET ended = ?, blocked_by = ? WHERE job_id = ? AND name = ?")
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
             WHERE d.job_id = ? AND d.on_name = ? AND t.state = 'waiting' ORDER BY t.id",
        )
        .bind(self.job_id)
        .bind(name)
        .fetch_all(&mut *self.conn)
        .await?;
        Ok(rows
            .iter()
            .map(|r| Dependent {
                id: r.get(0),
                name: r.get(1),
                frame: r.get(2),
                deps_left: r.get::<i64, _>(3).try_into().unwrap_or(0),
            })
            .collect())
    }

    async fn save_dependent(&mut self, task: &Dependent, step: &DependentStep) -> Result<()> {
        match step {
            DependentStep::Wait { deps_left } => {
                sqlx::query("UPDATE tasks SET deps_left = ? WHERE id = ?")
                    .bind(i64::from(*deps_left))
                    .bind(task.id)
                    .execute(&mut *self.conn)
                    .await?;
            }
            DependentStep::Release { state, reason } => {
                sqlx::query(
                    "UPDATE tasks SET state = ?, reason = ?, ended_ms = ?, deps_left = 0 WHERE id = ?",
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

/// Stores the dependency rows of a new job, inside the caller's transaction on the direct
/// connection (see [`super::direct`]): a group per task name and, for each task that waits,
/// its edges and how many names it waits for. `tasks` are (id, name, depends_on).
pub(super) fn record_graph(
    conn: &rusqlite::Connection,
    job_id: i64,
    tasks: &[(i64, &str, &[String])],
) -> Result<()> {
    let mut frames: std::collections::BTreeMap<&str, i64> = Default::default();
    for (_, name, _) in tasks {
        *frames.entry(name).or_default() += 1;
    }
    let mut group = conn.prepare_cached("INSERT INTO task_groups (job_id, name, frames) VALUES (?, ?, ?)")?;
    for (name, n) in frames {
        group.execute(rusqlite::params![job_id, name, n])?;
    }
    let mut edge =
        conn.prepare_cached("INSERT INTO task_deps (job_id, on_name, task_id) VALUES (?, ?, ?)")?;
    for (id, _, deps) in tasks {
        for on in deps.iter() {
            edge.execute(rusqlite::params![job_id, on, id])?;
        }
    }
    Ok(())
}
