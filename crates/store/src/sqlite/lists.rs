//! The paged lists of [`crate::Store`] on SQLite: jobs and nodes (see [`crate::pages`]).

use drover_core::NodeState;
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};

use super::{json, parse_word};
use crate::pages::{self, List};
use crate::{JobSummary, NodeRecord, Page, PageRequest, Result};

/// A page of jobs, newest first (see [`crate::Store::list_jobs`]).
pub(super) async fn jobs(
    db: &SqlitePool,
    include_final: bool,
    projects: Option<&[String]>,
    page: &PageRequest,
) -> Result<Page<JobSummary>> {
    let at = pages::open::<i64>(List::Jobs, page)?;
    if projects.is_some_and(|p| p.is_empty()) {
        return Ok(Page { items: Vec::new(), next_token: String::new() });
    }
    let mut q = QueryBuilder::<Sqlite>::new(
        "SELECT j.id, j.name, j.project, j.state, j.created_ms, COUNT(t.id), \
         SUM(t.state IN ('succeeded','warning','failed','skipped','cancelled')), \
         SUM(t.state IN ('assigned','running')), SUM(t.state = 'failed') \
         FROM jobs j LEFT JOIN tasks t ON t.job_id = j.id WHERE TRUE",
    );
    if !include_final {
        q.push(" AND j.state IN ('queued', 'running')");
    }
    if let Some(projects) = projects {
        q.push(" AND j.project IN (");
        let mut list = q.separated(", ");
        for p in projects {
            list.push_bind(p);
        }
        q.push(")");
    }
    if let Some(after) = at.after {
        q.push(" AND j.id < ").push_bind(after);
    }
    q.push(" GROUP BY j.id ORDER BY j.id DESC LIMIT ").push_bind(at.limit());
    let rows = q.build().fetch_all(db).await?;
    let jobs = rows.iter().map(job_summary).collect::<Result<Vec<_>>>()?;
    pages::close(List::Jobs, &at, jobs, |j| j.id)
}

fn job_summary(r: &SqliteRow) -> Result<JobSummary> {
    Ok(JobSummary {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        project: r.try_get(2)?,
        state: parse_word("job state", r.try_get::<&str, _>(3)?)?,
        created_ms: r.try_get(4)?,
        total: r.try_get::<i64, _>(5)? as u32,
        done: r.try_get::<Option<i64>, _>(6)?.unwrap_or(0) as u32,
        running: r.try_get::<Option<i64>, _>(7)?.unwrap_or(0) as u32,
        failed: r.try_get::<Option<i64>, _>(8)?.unwrap_or(0) as u32,
    })
}

/// Columns of [`node_record`], in its order, over `nodes n` joined with the node's open
/// attempts `a`, grouped by node.
pub(super) const NODE_COLUMNS: &str = "n.id, n.name, n.state, n.labels, n.cores, n.memory, \
     COALESCE(SUM(a.cores), 0), COALESCE(SUM(a.memory), 0), COUNT(a.id), n.last_seen_ms, n.runtimes";

/// A node read with [`NODE_COLUMNS`].
pub(super) fn node_record(r: &SqliteRow) -> Result<NodeRecord> {
    Ok(NodeRecord {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        state: parse_word::<NodeState>("node state", r.try_get::<&str, _>(2)?)?,
        labels: json("labels", r.try_get::<&str, _>(3)?)?,
        cores: r.try_get::<i64, _>(4)? as u32,
        memory: r.try_get::<i64, _>(5)? as u64,
        cores_used: r.try_get::<i64, _>(6)? as u32,
        memory_used: r.try_get::<i64, _>(7)? as u64,
        running: r.try_get::<i64, _>(8)? as u32,
        last_seen_ms: r.try_get(9)?,
        runtimes: json("runtimes", r.try_get::<&str, _>(10)?)?,
    })
}

/// A page of nodes by name (see [`crate::Store::list_nodes`]).
pub(super) async fn nodes(db: &SqlitePool, page: &PageRequest) -> Result<Page<NodeRecord>> {
    let at = pages::open::<String>(List::Nodes, page)?;
    let mut q = QueryBuilder::<Sqlite>::new(format!(
        "SELECT {NODE_COLUMNS} FROM nodes n LEFT JOIN attempts a ON a.node_id = n.id AND a.state != 'ended'"
    ));
    if let Some(after) = &at.after {
        q.push(" WHERE n.name > ").push_bind(after);
    }
    q.push(" GROUP BY n.id ORDER BY n.name LIMIT ").push_bind(at.limit());
    let rows = q.build().fetch_all(db).await?;
    let nodes = rows.iter().map(node_record).collect::<Result<Vec<_>>>()?;
    pages::close(List::Nodes, &at, nodes, |n| n.name.clone())
}
