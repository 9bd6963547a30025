//! A project's settings and what it uses: `GetProject` for its members, `SetProjectSettings` for
//! its admins (who may only tighten) and operators (who may change anything).

use std::net::SocketAddr;

use drover_core::Role;
use drover_core::tenancy::{ProjectSettings, SETTING_KEYS};
use drover_proto as pb;
use tonic::Status;

use crate::access_api::{no_project, require_project};
use crate::audit::{self, Change};
use crate::auth::Caller;
use crate::convert::status;
use crate::{Shared, tenancy};

/// Most settings one call may change.
const MAX_SETTINGS: usize = 64;
/// Most bytes of one setting's value.
const MAX_VALUE: usize = 4096;

/// What `GetProject` and `SetProjectSettings` answer.
async fn info(shared: &Shared, name: &str) -> Result<pb::ProjectInfo, Status> {
    let settings =
        shared.tenants.project_settings(name).await.map_err(status)?.ok_or_else(|| no_project(name))?;
    let holding = shared.tenants.holdings().await.map_err(status)?.remove(name).unwrap_or_default();
    let stored = shared.tenants.stored_bytes(name).await.map_err(status)?;
    let (spent, start) = match settings.budget {
        Some(b) => tenancy::period_spend(shared, name, b.period).await?,
        None => (0.0, 0),
    };
    Ok(pb::ProjectInfo {
        name: name.to_owned(),
        settings_json: serde_json::to_string(&settings).map_err(|e| Status::internal(e.to_string()))?,
        cores_used: holding.cores,
        memory_used: holding.memory,
        tasks_running: holding.tasks,
        stored_bytes: stored,
        budget_spent: spent,
        budget_period_start_ms: start,
    })
}

/// `GetProject`.
pub(crate) async fn get(
    shared: &Shared,
    caller: &Caller,
    req: pb::GetProjectRequest,
) -> Result<pb::ProjectInfo, Status> {
    caller.require_person()?;
    require_project(shared, caller, &req.name, Role::Viewer).await?;
    info(shared, &req.name).await
}

/// `SetProjectSettings`: applies `KEY=VALUE` settings in order; nothing is stored unless all
/// of them are valid, and a project admin's change that loosens any setting is refused.
pub(crate) async fn set(
    shared: &Shared,
    caller: &Caller,
    from: Option<SocketAddr>,
    req: pb::SetProjectSettingsRequest,
) -> Result<pb::ProjectInfo, Status> {
    caller.require_person()?;
    require_project(shared, caller, &req.project, Role::Admin).await?;
    if req.settings.is_empty() || req.settings.len() > MAX_SETTINGS {
        return Err(Status::invalid_argument(format!(
            "give 1 to {MAX_SETTINGS} settings as KEY=VALUE; keys are {}",
            SETTING_KEYS.join(", ")
        )));
    }
    let before: ProjectSettings = shared
        .tenants
        .project_settings(&req.project)
        .await
        .map_err(status)?
        .ok_or_else(|| no_project(&req.project))?;
    let mut after = before.clone();
    for s in &req.settings {
        if s.value.len() > MAX_VALUE {
            return Err(Status::invalid_argument(format!(
                "the value of `{}` is longer than {MAX_VALUE} bytes",
                s.key
            )));
        }
        after.set(&s.key, &s.value).map_err(|e| Status::invalid_argument(e.to_string()))?;
    }
    if !caller.is_operator()
        && let Some(key) = after.loosens(&before)
    {
        return Err(Status::permission_denied(format!(
            "`{key}` would allow more than before; a project's admins may tighten its settings, an operator loosens them"
        )));
    }
    if !shared.tenants.set_project_settings(&req.project, &after).await.map_err(status)? {
        return Err(no_project(&req.project));
    }
    shared.policy.invalidate();
    // Loosened limits may let held tasks run; every server's scheduler takes a look.
    shared.publish(drover_store::Signal::Schedule).await;
    let changes: Vec<String> = req.settings.iter().map(|s| format!("{}={}", s.key, s.value)).collect();
    tracing::info!(project = %req.project, changes = ?changes, by = %caller.who(), "project settings changed");
    audit::record(
        shared,
        caller,
        from,
        Change::of(&req.project, "project.set", &req.project).detail(changes.join(" ")),
    )
    .await;
    info(shared, &req.project).await
}
