//! The audit trail: every call that changes something appends who did it, when, what, and from
//! which address. Records are written after the change committed; a record that cannot be
//! written is logged as an error (the change itself is not undone).

use std::net::SocketAddr;

use drover_core::Role;
use drover_proto as pb;
use drover_store::{AuditFilter, AuditRecord};
use tonic::Status;

use crate::auth::{Caller, Visible};
use crate::convert::status;
use crate::{Shared, now_ms};

/// One change to record.
pub(crate) struct Change {
    /// The project it touched; `None` for cluster-wide changes.
    pub(crate) project: Option<String>,
    /// What was done, like `job.submit`.
    pub(crate) action: &'static str,
    /// What it was done to.
    pub(crate) target: String,
    /// More, for people (never a secret's value).
    pub(crate) detail: String,
}

impl Change {
    /// A change of `project`.
    pub(crate) fn of(project: &str, action: &'static str, target: impl ToString) -> Change {
        Change {
            project: Some(project.to_owned()),
            action,
            target: target.to_string(),
            detail: String::new(),
        }
    }

    /// A cluster-wide change.
    pub(crate) fn cluster(action: &'static str, target: impl ToString) -> Change {
        Change { project: None, action, target: target.to_string(), detail: String::new() }
    }

    /// The same change with a detail.
    pub(crate) fn detail(mut self, detail: impl ToString) -> Change {
        self.detail = detail.to_string();
        self
    }
}

/// Appends a record of `change` made by `caller` from `from`.
pub(crate) async fn record(shared: &Shared, caller: &Caller, from: Option<SocketAddr>, change: Change) {
    let record = AuditRecord {
        id: 0,
        time_ms: now_ms(),
        actor: caller.who(),
        address: from.map(|a| a.to_string()).unwrap_or_default(),
        project: change.project,
        action: change.action.to_owned(),
        target: change.target,
        detail: change.detail,
    };
    if let Err(e) = shared.tenants.append_audit(&record).await {
        tracing::error!(error = %e, action = %record.action, actor = %record.actor, target = %record.target,
            "cannot write an audit record");
    }
}

/// `Audit`: an operator reads every record; a project's admins read that project's records.
pub(crate) async fn list(
    shared: &Shared,
    caller: &Caller,
    req: pb::AuditRequest,
) -> Result<pb::AuditResponse, Status> {
    caller.require_person()?;
    let projects = if !req.project.is_empty() {
        crate::access_api::require_project(shared, caller, &req.project, Role::Admin).await?;
        Some(vec![req.project.clone()])
    } else {
        match caller.visible() {
            Visible::All => None,
            Visible::Some(projects) => {
                let admin: Vec<String> = projects
                    .into_iter()
                    .filter(|p| caller.role_in(p).is_some_and(|r| r >= Role::Admin))
                    .collect();
                if admin.is_empty() {
                    return Err(Status::permission_denied(
                        "the audit trail is for a project's admins and operators",
                    ));
                }
                Some(admin)
            }
        }
    };
    let filter = AuditFilter {
        projects,
        since_ms: (req.since_ms > 0).then_some(req.since_ms),
        after_id: req.after_id,
        limit: 0,
    };
    let page = crate::paging::page_or_limit(req.page_size, req.limit, req.page_token);
    let records = shared.tenants.list_audit(&filter, &page).await.map_err(status)?;
    Ok(pb::AuditResponse {
        next_page_token: records.next_token,
        entries: records
            .items
            .into_iter()
            .map(|r| pb::AuditEntry {
                id: r.id,
                time_ms: r.time_ms,
                actor: r.actor,
                address: r.address,
                project: r.project.unwrap_or_default(),
                action: r.action,
                target: r.target,
                detail: r.detail,
            })
            .collect(),
    })
}
