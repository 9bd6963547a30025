//! Job and task records as both dialects select and decode them: one column list and one
//! decoder each, so SQLite and PostgreSQL cannot drift apart in what a record holds.

use sqlx::{ColumnIndex, Decode, Row, Type};

use crate::decode::{corrupt, parse_word};
use crate::{JobRecord, Result, TaskRecord};

/// The columns of `jobs` that [`job_record`] decodes, in its order.
pub(crate) const JOB_COLUMNS: &str = "id, name, project, priority, state, cancelled, created_ms, last_seq";

/// The columns of `tasks t LEFT JOIN nodes n ON n.id = t.node_id` that [`task_record`]
/// decodes, in its order.
pub(crate) const TASK_COLUMNS: &str = "t.id, t.job_id, t.name, t.frame, t.state, t.exit_code, t.attempts, n.name, \
     t.reason, t.failure, t.cpu_seconds, t.peak_memory, t.started_ms, t.ended_ms";

/// A job from a row selected with [`JOB_COLUMNS`].
pub(crate) fn job_record<'r, R>(r: &'r R) -> Result<JobRecord>
where
    R: Row,
    usize: ColumnIndex<R>,
    &'r str: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    i32: Decode<'r, R::Database> + Type<R::Database>,
    bool: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(JobRecord {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        project: r.try_get(2)?,
        priority: r.try_get(3)?,
        state: parse_word("job state", r.try_get::<&str, _>(4)?)?,
        cancelled: r.try_get(5)?,
        created_ms: r.try_get(6)?,
        last_seq: r.try_get(7)?,
    })
}

/// A task from a row selected with [`TASK_COLUMNS`].
pub(crate) fn task_record<'r, R>(r: &'r R) -> Result<TaskRecord>
where
    R: Row,
    usize: ColumnIndex<R>,
    &'r str: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    i32: Decode<'r, R::Database> + Type<R::Database>,
    f64: Decode<'r, R::Database> + Type<R::Database>,
{
    let count = |index: usize| -> Result<i64> { Ok(r.try_get::<i64, _>(index)?) };
    Ok(TaskRecord {
        id: r.try_get(0)?,
        job_id: r.try_get(1)?,
        name: r.try_get(2)?,
        frame: r.try_get(3)?,
        state: parse_word("task state", r.try_get::<&str, _>(4)?)?,
        exit_code: r.try_get(5)?,
        attempts: u32::try_from(count(6)?).map_err(|e| corrupt("attempts", e))?,
        node: r.try_get(7)?,
        reason: r.try_get(8)?,
        failure: r.try_get::<Option<&str>, _>(9)?.map(|f| parse_word("failure", f)).transpose()?,
        cpu_seconds: r.try_get(10)?,
        peak_memory: u64::try_from(count(11)?).map_err(|e| corrupt("peak memory", e))?,
        started_ms: r.try_get(12)?,
        ended_ms: r.try_get(13)?,
    })
}

#[cfg(test)]
mod tests {
    use sqlx::{Connection, SqliteConnection};

    use super::*;
    use crate::StoreError;

    #[tokio::test]
    async fn rows_decode_to_records_and_stored_nonsense_is_corrupt() {
        let mut db = SqliteConnection::connect("sqlite::memory:").await.expect("db");
        let job = |state: &str| format!("SELECT 7, 'render', 'default', 5, '{state}', 0, 100, 3");
        let row = sqlx::query(&job("running")).fetch_one(&mut db).await.expect("row");
        let record = job_record(&row).expect("a job");
        assert_eq!((record.id, record.priority, record.last_seq), (7, 5, 3));
        let row = sqlx::query(&job("sideways")).fetch_one(&mut db).await.expect("row");
        assert!(matches!(job_record(&row), Err(StoreError::Corrupt { what: "job state", .. })));
        let task = |attempts: i64| {
            format!(
                "SELECT 1, 7, 't', NULL, 'failed', 2, {attempts}, 'n1', 'exit 2', 'exit', 0.5, 1024, 10, 20"
            )
        };
        let row = sqlx::query(&task(2)).fetch_one(&mut db).await.expect("row");
        let record = task_record(&row).expect("a task");
        assert_eq!((record.attempts, record.peak_memory, record.node.as_deref()), (2, 1024, Some("n1")));
        let row = sqlx::query(&task(-1)).fetch_one(&mut db).await.expect("row");
        assert!(matches!(task_record(&row), Err(StoreError::Corrupt { what: "attempts", .. })));
    }
}
