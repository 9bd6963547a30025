//! What a shared farm asks of a project: `drover projects set|show` (settings, quotas, budget,
//! what it uses now) and `drover audit` (who changed what).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, anyhow};
use drover_core::resources::format_memory;
use drover_proto as pb;
use serde_json::{Value, json};

use crate::client::{Client, ServerOpt, connect, rpc_error};
use crate::jobs::Format;
use crate::render;

/// `KEY=VALUE` for `projects set`.
pub fn parse_setting(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| {
            format!("`{s}` is not KEY=VALUE; keys are {}", drover_core::tenancy::SETTING_KEYS.join(", "))
        })
}

fn show(info: &pb::ProjectInfo, output: Format) -> Result<()> {
    let settings: Value = serde_json::from_str(&info.settings_json).unwrap_or(Value::Null);
    if output == Format::Json {
        let v = json!({"name": info.name, "settings": settings, "cores_used": info.cores_used,
            "memory_used": info.memory_used, "tasks_running": info.tasks_running, "stored_bytes": info.stored_bytes,
            "budget_spent": info.budget_spent, "budget_period_start_ms": info.budget_period_start_ms});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let settings: drover_core::tenancy::ProjectSettings = serde_json::from_str(&info.settings_json)
        .map_err(|e| anyhow!("the server sent settings this drover cannot read: {e}"))?;
    let or_all = |items: Vec<String>| if items.is_empty() { "all".to_owned() } else { items.join(", ") };
    let limit = |v: Option<String>| v.unwrap_or_else(|| "none".into());
    let q = &settings.quota;
    let mut t = render::table(&["SETTING", "VALUE", "IN USE"]);
    t.add_row([
        "runtimes".into(),
        or_all(settings.runtimes.iter().map(|r| r.as_str().to_owned()).collect()),
        String::new(),
    ]);
    t.add_row(["images".into(), or_all(settings.images.clone()), String::new()]);
    t.add_row([
        "networks".into(),
        or_all(settings.networks.iter().map(|n| n.to_string()).collect()),
        String::new(),
    ]);
    t.add_row(["llm_upstreams".into(), settings.llm_upstreams.join(", "), String::new()]);
    t.add_row(["containers_as_root".into(), settings.containers_as_root.to_string(), String::new()]);
    let run_as = if settings.run_as.is_empty() { "(none)".to_owned() } else { settings.run_as.join(", ") };
    t.add_row(["run_as".into(), run_as, String::new()]);
    t.add_row(["max_priority".into(), limit(settings.max_priority.map(|p| p.to_string())), String::new()]);
    t.add_row(["quota.cores".into(), limit(q.cores.map(|c| c.to_string())), info.cores_used.to_string()]);
    t.add_row(["quota.memory".into(), limit(q.memory.map(format_memory)), format_memory(info.memory_used)]);
    t.add_row(["quota.tasks".into(), limit(q.tasks.map(|c| c.to_string())), info.tasks_running.to_string()]);
    t.add_row(["quota.gpus".into(), limit(q.gpus.map(|c| c.to_string())), String::new()]);
    t.add_row([
        "quota.stored_bytes".into(),
        limit(q.stored_bytes.map(format_memory)),
        format_memory(info.stored_bytes),
    ]);
    let retention = settings.retention.map_or_else(
        || "(server's --log-retention)".to_owned(),
        |d| humantime::format_duration(d).to_string(),
    );
    t.add_row(["retention".into(), retention, String::new()]);
    let budget = settings.budget.map(|b| {
        format!(
            "{:.2} per {}",
            b.amount,
            serde_json::to_value(b.period)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        )
    });
    let spent = if settings.budget.is_some() {
        format!("{:.2} since {}", info.budget_spent, render::time(info.budget_period_start_ms))
    } else {
        String::new()
    };
    t.add_row(["budget".into(), limit(budget), spent]);
    println!("project {}\n{t}", info.name);
    Ok(())
}

/// `drover projects show NAME`.
pub async fn project_show(client: &mut Client, name: String, output: Format) -> Result<ExitCode> {
    let info = client.get_project(pb::GetProjectRequest { name }).await.map_err(rpc_error)?.into_inner();
    show(&info, output)?;
    Ok(ExitCode::SUCCESS)
}

/// `drover projects set NAME KEY=VALUE...`.
pub async fn project_set(
    client: &mut Client,
    name: String,
    settings: Vec<(String, String)>,
    output: Format,
) -> Result<ExitCode> {
    let req = pb::SetProjectSettingsRequest {
        project: name,
        settings: settings.into_iter().map(|(key, value)| pb::SettingValue { key, value }).collect(),
    };
    let info = client.set_project_settings(req).await.map_err(rpc_error)?.into_inner();
    show(&info, output)?;
    Ok(ExitCode::SUCCESS)
}

fn parse_since(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}` is not a duration like 1h or 7days: {e}"))
}

/// Arguments of `audit`.
#[derive(clap::Args)]
pub struct AuditArgs {
    /// Only this project's records (a project's admins see only their projects' records).
    #[arg(long)]
    project: Option<String>,
    /// Only records from this long ago on, like 1h or 7days.
    #[arg(long, value_parser = parse_since)]
    since: Option<Duration>,
    /// Most records to show (the oldest); 0 shows every one.
    #[arg(long, default_value_t = 1000)]
    limit: u32,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t)]
    output: Format,
    #[command(flatten)]
    server: ServerOpt,
}

/// `drover audit`: who changed what, oldest first.
pub async fn audit(args: AuditArgs) -> Result<ExitCode> {
    let mut client = connect(&args.server).await?;
    let since_ms = match args.since {
        Some(d) => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            now.saturating_sub(d).as_millis() as i64
        }
        None => 0,
    };
    let project = args.project.unwrap_or_default();
    let entries = crate::pages::collect(Some(args.limit), async |page_size, page_token| {
        let req = pb::AuditRequest {
            project: project.clone(),
            since_ms,
            page_size,
            page_token,
            ..Default::default()
        };
        let page = client.audit(req).await.map_err(rpc_error)?.into_inner();
        Ok((page.entries, page.next_page_token))
    })
    .await?;
    match args.output {
        Format::Json => {
            let rows: Vec<Value> = entries
                .iter()
                .map(|e| {
                    json!({"id": e.id, "time_ms": e.time_ms, "actor": e.actor, "address": e.address,
                    "project": e.project, "action": e.action, "target": e.target, "detail": e.detail})
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        }
        Format::Human if entries.is_empty() => println!("no audit records match"),
        Format::Human => {
            let mut t = render::table(&["TIME", "WHO", "FROM", "PROJECT", "ACTION", "TARGET", "DETAIL"]);
            for e in &entries {
                t.add_row([
                    render::time(e.time_ms),
                    e.actor.clone(),
                    e.address.clone(),
                    if e.project.is_empty() { "*".into() } else { e.project.clone() },
                    e.action.clone(),
                    e.target.clone(),
                    e.detail.clone(),
                ]);
            }
            println!("{t}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
