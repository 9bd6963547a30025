//! The paged lists of [`crate::Store`] on PostgreSQL: jobs and nodes (see [`crate::pages`]).

use sqlx::postgres::{PgPool, PgRow};
use sqlx::{Postgres, QueryBuilder, Row};

use super::{NODE_COLUMNS, get_u32, node_record, parse_word};
use crate::pages::{self, List};
use crate::{JobSummary, NodeRecord, Page, PageRequest, Result};

/// A page of jobs, newest first (see [`crate::Store::list_jobs`]).
pub(super) async fn jobs(
    pool: &PgPool,
    include_final: bool,
    projects: Option<&[String]>,
    page: &PageRequest,
) -> Result<Page<JobSummary>> {
    let at = pages::open::<i64>(List::Jobs, page)?;
    // The page's jobs first, then their task counts: aggregates only over one page of jobs.
    let mut q = QueryBuilder::<Postgres>::new(
        "SELECT j.id, j.name, j.project, j.state, j.created_ms, COUNT(t.id), \
         COUNT(*) FILTER (WHERE t.state IN ('succeeded', 'warning', 'failed', 'skipped', 'cancelled')), \
         COUNT(*) FILTER (WHERE t.state IN ('assigned', 'running')), \
         COUNT(*) FILTER (WHERE t.state = 'failed') \
         FROM (SELECT id, name, project, state, created_ms FROM jobs WHERE TRUE",
    );
    if !include_final {
        q.push(" AND state IN ('queued', 'running')");
    }
    if let Some(projects) = projects {
        q.push(" AND project = ANY(").push_bind(projects.to_vec()).push(")");
    }
    if let Some(after) = at.after {
        q.push(" AND id < ").push_bind(after);
    }
    q.push(" ORDER BY id DESC LIMIT ").push_bind(at.limit());
    q.push(
        ") j LEFT JOIN tasks t ON t.job_id = j.id \
         GROUP BY j.id, j.name, j.project, j.state, j.created_ms ORDER BY j.id DESC",
    );
    let rows = q.build().fetch_all(pool).await?;
    let jobs = rows.iter().map(job_summary).collect::<Result<Vec<_>>>()?;
    pages::close(List::Jobs, &at, jobs, |j| j.id)
}

fn job_summary(r: &PgRow) -> Result<JobSummary> {
    Ok(JobSummary {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        project: r.try_get(2)?,
        state: parse_word("job state", r.try_get::<&str, _>(3)?)?,
        created_ms: r.try_get(4)?,
        total: get_u32(r, 5)?,
        done: get_u32(r, 6)?,
        running: get_u32(r, 7)?,
        failed: get_u32(r, 8)?,
    })
}

/// A page of nodes by name (see [`crate::Store::list_nodes`]).
pub(super) async fn nodes(pool: &PgPool, page: &PageRequest) -> Result<Page<NodeRecord>> {
    let at = pages::open::<String>(List::Nodes, page)?;
    let mut q = QueryBuilder::<Postgres>::new(format!(
        "SELECT {NODE_COLUMNS} FROM nodes n LEFT JOIN attempts a ON a.node_id = n.id AND a.state <> 'ended'"
    ));
    if let Some(after) = &at.after {
        q.push(" WHERE n.name > ").push_bind(after);
    }
    q.push(" GROUP BY n.id ORDER BY n.name LIMIT ").push_bind(at.limit());
    let rows = q.build().fetch_all(pool).await?;
    let nodes = rows.iter().map(node_record).collect::<Result<Vec<_>>>()?;
    pages::close(List::Nodes, &at, nodes, |n| n.name.clone())
}
