//! `drover usage`: compute time, LLM tokens and cost per project and per job (and per task
//! with `--job`).

use std::process::ExitCode;

use anyhow::Result;
use comfy_table::presets::UTF8_BORDERS_ONLY;
use comfy_table::{ContentArrangement, Table};
use drover_proto as pb;
use serde_json::{Value, json};

use crate::client::{ServerOpt, connect, rpc_error};
use crate::jobs::Format;

/// Arguments of `usage`.
#[derive(clap::Args)]
pub struct UsageArgs {
    /// Only jobs of this project.
    #[arg(long)]
    project: Option<String>,
    /// Only this job.
    #[arg(long)]
    job: Option<i64>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t)]
    output: Format,
    /// Short for `-o json`.
    #[arg(long, conflicts_with = "output")]
    json: bool,
    #[command(flatten)]
    server: ServerOpt,
}

/// `drover usage`.
pub async fn usage(args: UsageArgs) -> Result<ExitCode> {
    let mut client = connect(&args.server).await?;
    let req =
        pb::UsageRequest { project: args.project.clone().unwrap_or_default(), job_id: args.job.unwrap_or(0) };
    let resp = client.usage(req).await.map_err(rpc_error)?.into_inner();
    if args.json || args.output == Format::Json {
        println!("{}", serde_json::to_string_pretty(&usage_json(&resp))?);
    } else if resp.jobs.is_empty() && resp.projects.is_empty() {
        println!("no jobs match");
    } else {
        println!("{}", rows_table(&resp.projects, false));
        if !resp.jobs.is_empty() {
            println!("{}", rows_table(&resp.jobs, true));
        }
        for p in resp.projects.iter().filter(|p| p.deleted_jobs > 0) {
            println!(
                "project {}: its totals include {} job(s) deleted by retention, not listed",
                p.project, p.deleted_jobs
            );
        }
        for p in resp.projects.iter().filter(|p| p.stored_bytes > 0) {
            println!(
                "project {} stores {} ({:.2} per month at current prices)",
                p.project,
                drover_core::resources::format_memory(p.stored_bytes),
                p.storage_cost_month
            );
        }
        if !resp.tasks.is_empty() {
            println!("{}", tasks_table(&resp.tasks));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Per-project rows, or per-job rows with `jobs`.
fn rows_table(rows: &[pb::UsageRow], jobs: bool) -> Table {
    let mut t = Table::new();
    let mut header = vec!["PROJECT"];
    header.extend(if jobs { ["JOB", "NAME"].as_slice() } else { ["JOBS"].as_slice() });
    header.extend(["TASKS", "ATTEMPTS", "CPU s", "WALL s", "INPUT TOKENS", "OUTPUT TOKENS", "COST"]);
    t.load_preset(UTF8_BORDERS_ONLY).set_content_arrangement(ContentArrangement::Dynamic).set_header(header);
    for r in rows {
        let mut row = vec![r.project.clone()];
        if jobs {
            row.extend([r.job_id.to_string(), r.job_name.clone()]);
        } else {
            row.push(r.jobs.to_string());
        }
        row.extend([
            r.tasks.to_string(),
            r.attempts.to_string(),
            format!("{:.2}", r.cpu_seconds),
            format!("{:.2}", r.wall_seconds),
            r.input_tokens.to_string(),
            r.output_tokens.to_string(),
            format!("{:.2}", r.cost),
        ]);
        t.add_row(row);
    }
    t
}

/// Per-task rows of one job.
fn tasks_table(rows: &[pb::UsageRow]) -> Table {
    let mut t = crate::render::table(&["TASK", "ATTEMPTS", "CPU s (latest)", "COST"]);
    for r in rows {
        t.add_row([
            r.task_name.clone(),
            r.attempts.to_string(),
            format!("{:.2}", r.cpu_seconds),
            format!("{:.2}", r.cost),
        ]);
    }
    t
}

fn row_json(r: &pb::UsageRow) -> Value {
    json!({"project": r.project, "tasks": r.tasks, "attempts": r.attempts, "cpu_seconds": r.cpu_seconds,
           "wall_seconds": r.wall_seconds, "input_tokens": r.input_tokens, "output_tokens": r.output_tokens,
           "cost": r.cost})
}

/// `usage --json`: `{"projects": [...], "jobs": [...]}`.
fn usage_json(resp: &pb::UsageResponse) -> Value {
    let projects: Vec<Value> = resp
        .projects
        .iter()
        .map(|r| {
            let mut v = row_json(r);
            v["jobs"] = json!(r.jobs);
            v["deleted_jobs"] = json!(r.deleted_jobs);
            v["stored_bytes"] = json!(r.stored_bytes);
            v["storage_cost_month"] = json!(r.storage_cost_month);
            v
        })
        .collect();
    let jobs: Vec<Value> = resp
        .jobs
        .iter()
        .map(|r| {
            let mut v = row_json(r);
            v["job_id"] = json!(r.job_id);
            v["name"] = json!(r.job_name);
            v
        })
        .collect();
    let tasks: Vec<Value> = resp
        .tasks
        .iter()
        .map(|r| json!({"task_id": r.task_id, "task": r.task_name, "attempts": r.attempts, "cost": r.cost}))
        .collect();
    json!({"projects": projects, "jobs": jobs, "tasks": tasks})
}
