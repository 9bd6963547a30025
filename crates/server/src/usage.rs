//! `Usage`: compute and LLM tokens per job, and the same summed per project.

use std::collections::BTreeMap;

use drover_core::tenancy::MeteredByVersion;
use drover_proto as pb;
use drover_store::{JobUsage, RetiredUsage, UsageFilter};
use tonic::Status;

use crate::convert::status;
use crate::{Shared, now_ms, tenancy};

/// Answers a `Usage` request from the store's per-job sums, priced per attempt at the prices
/// in force when it was assigned; asked about one job, also per task.
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
    let metered = shared.tenants.metered(&filter, now_ms()).await.map_err(status)?;
    let prices = shared.tenants.price_versions().await.map_err(status)?;
    let mut job_cost: BTreeMap<i64, f64> = BTreeMap::new();
    let mut task_cost: BTreeMap<i64, f64> = BTreeMap::new();
    for job in &metered {
        for (task_id, used) in &job.tasks {
            let cost = tenancy::cost(used, &prices);
            *job_cost.entry(job.job_id).or_default() += cost;
            task_cost.insert(*task_id, cost);
        }
    }
    let rows: Vec<pb::UsageRow> =
        jobs.iter().map(|u| job_row(u, job_cost.get(&u.job_id).copied().unwrap_or(0.0))).collect();
    let tasks = match filter.job_id {
        Some(job_id) => shared
            .store
            .tasks(job_id)
            .await
            .map_err(status)?
            .into_iter()
            .map(|t| pb::UsageRow {
                job_id,
                task_id: t.id,
                task_name: match t.frame {
                    Some(f) => format!("{}[{f}]", t.name),
                    None => t.name.clone(),
                },
                attempts: t.attempts,
                cpu_seconds: t.cpu_seconds,
                cost: task_cost.get(&t.id).copied().unwrap_or(0.0),
                ..Default::default()
            })
            .collect(),
        None => Vec::new(),
    };
    let mut projects = per_project(&rows);
    if filter.job_id.is_none() {
        let retired = shared.tenants.retired_usage(filter.project.as_deref()).await.map_err(status)?;
        add_retired(&mut projects, &retired, |spend| tenancy::cost(spend, &prices));
    }
    let current = prices.last_key_value().map(|(_, p)| *p).unwrap_or_default();
    for row in &mut projects {
        row.stored_bytes = shared.tenants.stored_bytes(&row.project).await.map_err(status)?;
        row.storage_cost_month =
            current.storage_cost(row.stored_bytes, std::time::Duration::from_secs(30 * 86_400));
    }
    Ok(pb::UsageResponse { projects, jobs: rows, tasks })
}

fn job_row(u: &JobUsage, cost: f64) -> pb::UsageRow {
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
        cost,
        ..Default::default()
    }
}

/// Sums job rows by project, in project order.
fn per_project(jobs: &[pb::UsageRow]) -> Vec<pb::UsageRow> {
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
        row.cost += u.cost;
    }
    projects.into_values().collect()
}

/// Adds what each project's deleted jobs used to its row (a row of its own when none of its
/// jobs is left), keeping project order.
fn add_retired(
    projects: &mut Vec<pb::UsageRow>,
    retired: &[RetiredUsage],
    cost: impl Fn(&MeteredByVersion) -> f64,
) {
    let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    for r in retired {
        let at = match projects.binary_search_by(|p| p.project.as_str().cmp(&r.project)) {
            Ok(at) => at,
            Err(at) => {
                projects.insert(at, pb::UsageRow { project: r.project.clone(), ..Default::default() });
                at
            }
        };
        let row = &mut projects[at];
        row.deleted_jobs = clamp(r.jobs);
        row.jobs = row.jobs.saturating_add(clamp(r.jobs));
        row.tasks = row.tasks.saturating_add(clamp(r.tasks));
        row.attempts = row.attempts.saturating_add(clamp(r.attempts));
        row.cpu_seconds += r.cpu_seconds;
        row.wall_seconds += r.wall_seconds;
        row.input_tokens = row.input_tokens.saturating_add(r.input_tokens);
        row.output_tokens = row.output_tokens.saturating_add(r.output_tokens);
        row.cost += cost(&r.spend);
    }
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
        let jobs =
            [job_row(&job("a", 1, 10), 1.0), job_row(&job("a", 2, 100), 0.5), job_row(&job("b", 3, 4), 0.0)];
        let rows = per_project(&jobs);
        let got: Vec<_> = rows
            .iter()
            .map(|r| (r.project.as_str(), r.jobs, r.tasks, r.input_tokens, r.output_tokens))
            .collect();
        assert_eq!(got, vec![("a", 2, 4, 110, 55), ("b", 1, 2, 4, 2)]);
        assert_eq!(rows[0].cpu_seconds, 3.0);
        assert_eq!(rows[0].wall_seconds, 4.0);
        assert_eq!(rows[0].cost, 1.5);
    }

    #[test]
    fn deleted_jobs_add_to_their_project_or_make_its_row() {
        let jobs = [job_row(&job("b", 3, 4), 1.0)];
        let mut rows = per_project(&jobs);
        let retired = |project: &str| RetiredUsage {
            project: project.into(),
            jobs: 2,
            tasks: 5,
            attempts: 6,
            cpu_seconds: 1.0,
            wall_seconds: 2.0,
            input_tokens: 10,
            output_tokens: 20,
            spend: MeteredByVersion::new(),
        };
        add_retired(&mut rows, &[retired("a"), retired("b"), retired("c")], |_| 0.25);
        let got: Vec<_> = rows
            .iter()
            .map(|r| (r.project.as_str(), r.jobs, r.deleted_jobs, r.tasks, r.input_tokens))
            .collect();
        assert_eq!(got, vec![("a", 2, 2, 5, 10), ("b", 3, 2, 7, 14), ("c", 2, 2, 5, 10)]);
        assert_eq!(rows[1].cost, 1.25);
        assert_eq!(rows[1].attempts, 9);
        assert_eq!(rows[1].cpu_seconds, 2.5);
    }
}
