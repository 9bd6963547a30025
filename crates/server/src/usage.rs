//! `Usage`: compute and LLM tokens per job, and the same summed per project.

use std::collections::BTreeMap;

use drover_proto as pb;
use drover_store::{JobUsage, UsageFilter};
use tonic::Status;

use crate::Shared;
use crate::convert::status;

/// Answers a `Usage` request from the store's per-job sums.
pub(crate) async fn usage(shared: &Shared, req: pb::UsageRequest) -> Result<pb::UsageResponse, Status> {
    let filter = UsageFilter {
        project: (!req.project.is_empty()).then_some(req.project),
        job_id: (req.job_id != 0).then_some(req.job_id),
    };
    let jobs = shared.store.usage(&filter).await.map_err(status)?;
    if let Some(job_id) = filter.job_id
        && jobs.is_empty()
        && shared.store.job(job_id).await.map_err(status)?.is_none()
    {
        return Err(Status::not_found(format!("no job {job_id}")));
    }
    Ok(pb::UsageResponse { projects: per_project(&jobs), jobs: jobs.iter().map(job_row).collect() })
}

fn job_row(u: &JobUsage) -> pb::UsageRow {
    pb::UsageRow {
        project: u.project.clone(),
        job_id: u.job_id,
        job_name: u.job_name.clone(),
        tasks: u.tasks,
        attempts: u.attempts,
        cpu_seconds: u.cpu_seconds,
        wall_seconds: u.wall_seconds,
        input_tokens: u.input_tokens,
        output_tokens: u.output_tokens,
        jobs: 1,
    }
}

/// Sums job rows by project, in project order.
fn per_project(jobs: &[JobUsage]) -> Vec<pb::UsageRow> {
    let mut projects: BTreeMap<&str, pb::UsageRow> = BTreeMap::new();
    for u in jobs {
        let row = projects
            .entry(&u.project)
            .or_insert_with(|| pb::UsageRow { project: u.project.clone(), ..Default::default() });
        row.jobs += 1;
        row.tasks += u.tasks;
        row.attempts += u.attempts;
        row.cpu_seconds += u.cpu_seconds;
        row.wall_seconds += u.wall_seconds;
        row.input_tokens = row.input_tokens.saturating_add(u.input_tokens);
        row.output_tokens = row.output_tokens.saturating_add(u.output_tokens);
    }
    projects.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(project: &str, job_id: i64, tokens: u64) -> JobUsage {
        JobUsage {
            project: project.into(),
            job_id,
            job_name: format!("j{job_id}"),
            tasks: 2,
            attempts: 3,
            cpu_seconds: 1.5,
            wall_seconds: 2.0,
            input_tokens: tokens,
            output_tokens: tokens / 2,
        }
    }

    #[test]
    fn projects_sum_their_jobs() {
        let rows = per_project(&[job("a", 1, 10), job("a", 2, 100), job("b", 3, 4)]);
        let got: Vec<_> = rows
            .iter()
            .map(|r| (r.project.as_str(), r.jobs, r.tasks, r.input_tokens, r.output_tokens))
            .collect();
        assert_eq!(got, vec![("a", 2, 4, 110, 55), ("b", 1, 2, 4, 2)]);
        assert_eq!(rows[0].cpu_seconds, 3.0);
        assert_eq!(rows[0].wall_seconds, 4.0);
    }
}
