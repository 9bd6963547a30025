//! Identity administration: API keys, projects, join tokens, node revocation, and the agent's
//! `Join`. Every call here checks its caller and bounds its input before touching the store.

use std::collections::BTreeMap;
use std::time::Duration;

use drover_core::Role;
use drover_core::access::{Credential, CredentialKind, valid_project_name};
use drover_proto as pb;
use drover_store::{KeyRecord, NodeCredentialRecord, Redeemed, Signal};
use tonic::Status;

use std::net::SocketAddr;

use crate::audit::{self, Change};
use crate::auth::{self, Caller, mint};
use crate::convert::status;
use crate::{Shared, now_ms};

/// Most characters in a key's note.
const MAX_KEY_NAME: usize = 200;
/// Longest lifetime a key or token may be given.
const MAX_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// A join token's lifetime when the request names none.
pub(crate) const DEFAULT_JOIN_TTL: Duration = Duration::from_secs(3600);
/// Longest a join token may live: it is a bearer secret that enrolls a machine.
const MAX_JOIN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Most labels a join token may force onto a node, and their sizes.
const MAX_LABELS: usize = 64;
const MAX_LABEL_KEY: usize = 63;
const MAX_LABEL_VALUE: usize = 255;

/// The answer for a project the caller cannot see (or that does not exist).
pub(crate) fn no_project(name: &str) -> Status {
    Status::not_found(format!("project `{name}` not found; `drover projects ls` lists yours"))
}

fn no_key(id: &str) -> Status {
    Status::not_found(format!("key {id} not found; `drover keys ls` lists keys"))
}

/// Requires `need` in `project`, and that the project exists: a missing project and one the
/// caller cannot see get the same answer. Returns the project's settings (one lookup serves
/// both).
pub(crate) async fn require_project(
    shared: &Shared,
    caller: &Caller,
    project: &str,
    need: Role,
) -> Result<drover_core::tenancy::ProjectSettings, Status> {
    caller.require(project, need, || no_project(project))?;
    shared.tenants.project_settings(project).await.map_err(status)?.ok_or_else(|| no_project(project))
}

fn lifetime(ms: u64, what: &str) -> Result<Option<i64>, Status> {
    if ms == 0 {
        return Ok(None);
    }
    if Duration::from_millis(ms) > MAX_LIFETIME {
        return Err(Status::invalid_argument(format!("{what} may live at most 10 years")));
    }
    Ok(Some(now_ms().saturating_add(ms as i64)))
}

fn key_message(k: KeyRecord) -> pb::ApiKey {
    pb::ApiKey {
        id: k.id,
        project: k.project.unwrap_or_default(),
        role: k.role.to_string(),
        name: k.name,
        created_ms: k.created_ms,
        expires_ms: k.expires_ms.unwrap_or(0),
        revoked_ms: k.revoked_ms.unwrap_or(0),
        created_by: k.created_by,
    }
}

/// `WhoAmI`.
pub(crate) fn who_am_i(caller: &Caller) -> pb::WhoAmIResponse {
    match caller {
        Caller::Open => {
            pb::WhoAmIResponse { kind: "anonymous".into(), role: "operator".into(), ..Default::default() }
        }
        Caller::Person { id, grants } => {
            // The single-valued fields show the strongest grant (a key holds only one).
            let (role, project) = if grants.operator {
                (Role::Operator.to_string(), String::new())
            } else {
                let strongest = grants.projects.iter().max_by_key(|(_, r)| **r);
                strongest.map(|(p, r)| (r.to_string(), p.clone())).unwrap_or_default()
            };
            // `id` is `key <id>` or `oidc <subject>`: the kind, then who.
            let (kind, id) = id.split_once(' ').unwrap_or(("key", id));
            pb::WhoAmIResponse { kind: kind.into(), id: id.to_owned(), role, project, node: String::new() }
        }
        Caller::Node { credential_id, name, .. } => pb::WhoAmIResponse {
            kind: "node".into(),
            id: credential_id.clone(),
            node: name.clone(),
            ..Default::default()
        },
    }
}

/// `CreateKey`: operators make any key; a project's admins make keys of their project.
pub(crate) async fn create_key(
    shared: &Shared,
    caller: &Caller,
    from: Option<SocketAddr>,
    req: pb::CreateKeyRequest,
) -> Result<pb::CreateKeyResponse, Status> {
    caller.require_person()?;
    let role: Role = req
        .role
        .parse()
        .map_err(|e: drover_core::access::UnknownRole| Status::invalid_argument(e.to_string()))?;
    if req.name.chars().count() > MAX_KEY_NAME {
        return Err(Status::invalid_argument(format!(
            "a key's name may have at most {MAX_KEY_NAME} characters"
        )));
    }
    let project = match (role, req.project.as_str()) {
        (Role::Operator, "") => {
            caller.require_operator("creating an operator key")?;
            None
        }
        (Role::Operator, _) => {
            return Err(Status::invalid_argument(
                "an operator key belongs to no project; leave out --project",
            ));
        }
        (_, "") => {
            return Err(Status::invalid_argument(format!(
                "a {role} key needs a project: pass --project NAME"
            )));
        }
        (_, p) => {
            require_project(shared, caller, p, Role::Admin).await?;
            Some(p.to_owned())
        }
    };
    let expires_ms = lifetime(req.expires_in_ms, "a key")?;
    let credential = mint::credential(CredentialKind::ApiKey, None);
    let record = KeyRecord {
        id: credential.id.clone(),
        secret_sha256: mint::hash_secret(&credential.secret),
        project,
        role,
        name: req.name,
        created_ms: now_ms(),
        expires_ms,
        revoked_ms: None,
        created_by: caller.who(),
    };
    shared.access.create_key(&record).await.map_err(status)?;
    tracing::info!(key_id = %record.id, role = %role, project = ?record.project, by = %caller.who(), "api key created");
    let change = Change {
        project: record.project.clone(),
        action: "key.create",
        target: record.id.clone(),
        detail: format!("{role} {}", record.name),
    };
    audit::record(shared, caller, from, change).await;
    Ok(pb::CreateKeyResponse { key: Some(key_message(record)), secret: credential.to_text() })
}

/// `ListKeys`: an operator sees every key; an admin the keys of its project.
pub(crate) async fn list_keys(
    shared: &Shared,
    caller: &Caller,
    req: pb::ListKeysRequest,
) -> Result<pb::ListKeysResponse, Status> {
    caller.require_person()?;
    let only_project = match caller.visible() {
        auth::Visible::Some(projects) if projects.len() == 1 => projects.into_iter().next(),
        _ => None,
    };
    let project = match (caller.is_operator(), req.project.as_str(), only_project) {
        (true, "", _) => None,
        (_, "", Some(p)) => Some(p),
        (_, "", None) => {
            return Err(Status::permission_denied(
                "listing keys needs an operator key, or --project naming a project you administer",
            ));
        }
        (_, p, _) => Some(p.to_owned()),
    };
    if let Some(p) = &project {
        require_project(shared, caller, p, Role::Admin).await?;
    }
    let page = crate::paging::page(req.page_size, req.page_token);
    let keys = shared.access.list_keys(project.as_deref(), &page).await.map_err(status)?;
    Ok(pb::ListKeysResponse {
        keys: keys.items.into_iter().map(key_message).collect(),
        next_page_token: keys.next_token,
    })
}

/// `RevokeKey`: an operator revokes any key; an admin the keys of its project.
pub(crate) async fn revoke_key(
    shared: &Shared,
    caller: &Caller,
    from: Option<SocketAddr>,
    req: pb::RevokeKeyRequest,
) -> Result<pb::RevokeKeyResponse, Status> {
    caller.require_person()?;
    // Accept the whole key as well as its id: people paste what they have.
    let id = Credential::parse(&req.id).map(|c| c.id).unwrap_or(req.id);
    let key = shared.access.key(&id).await.map_err(status)?.ok_or_else(|| no_key(&id))?;
    match &key.project {
        Some(p) => caller.require(p, Role::Admin, || no_key(&id))?,
        None if caller.is_operator() => {}
        None => return Err(no_key(&id)),
    }
    let revoked = shared.access.revoke_key(&id, now_ms()).await.map_err(status)?;
    tracing::info!(key_id = %id, revoked, by = %caller.who(), "api key revoked");
    if revoked {
        let change = Change {
            project: key.project.clone(),
            action: "key.revoke",
            target: id.clone(),
            detail: String::new(),
        };
        audit::record(shared, caller, from, change).await;
    }
    Ok(pb::RevokeKeyResponse { revoked })
}

/// `CreateProject` (operator).
pub(crate) async fn create_project(
    shared: &Shared,
    caller: &Caller,
    from: Option<SocketAddr>,
    req: pb::CreateProjectRequest,
) -> Result<pb::CreateProjectResponse, Status> {
    caller.require_operator("creating a project")?;
    if !valid_project_name(&req.name) {
        return Err(Status::invalid_argument(format!(
            "`{}` is not a project name; use 1 to 63 lowercase letters, digits and `-`",
            req.name
        )));
    }
    let created = shared.access.create_project(&req.name, now_ms()).await.map_err(status)?;
    tracing::info!(project = %req.name, created, by = %caller.who(), "project created");
    if created {
        audit::record(shared, caller, from, Change::of(&req.name, "project.create", &req.name)).await;
    }
    Ok(pb::CreateProjectResponse { created })
}

/// `ListProjects`: the projects the caller has a role in.
pub(crate) async fn list_projects(
    shared: &Shared,
    caller: &Caller,
    req: pb::ListProjectsRequest,
) -> Result<pb::ListProjectsResponse, Status> {
    caller.require_person()?;
    // Only the caller's projects are read, so that pages are full and a token leads nowhere
    // else; the role check below still drops anything it has no role in.
    let only = caller.visible().filter();
    let page = crate::paging::page(req.page_size, req.page_token);
    let projects = shared.access.list_projects(only.as_deref(), &page).await.map_err(status)?;
    Ok(pb::ListProjectsResponse {
        next_page_token: projects.next_token,
        projects: projects
            .items
            .into_iter()
            .filter_map(|p| {
                let role = caller.role_in(&p.name)?;
                Some(pb::Project { name: p.name, created_ms: p.created_ms, role: role.to_string() })
            })
            .collect(),
    })
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), Status> {
    if labels.len() > MAX_LABELS {
        return Err(Status::invalid_argument(format!("a join token carries at most {MAX_LABELS} labels")));
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= MAX_LABEL_KEY
            && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'));
        if !key_ok || v.len() > MAX_LABEL_VALUE || v.chars().any(char::is_control) {
            return Err(Status::invalid_argument(format!(
                "label `{k}={v}` is not valid; keys are up to {MAX_LABEL_KEY} letters, digits and . - _ /, values up to {MAX_LABEL_VALUE} characters"
            )));
        }
    }
    Ok(())
}

/// `CreateJoinToken` (operator): a single-use token that carries the CA fingerprint.
pub(crate) async fn create_join_token(
    shared: &Shared,
    caller: &Caller,
    from: Option<SocketAddr>,
    req: pb::CreateJoinTokenRequest,
) -> Result<pb::CreateJoinTokenResponse, Status> {
    caller.require_operator("creating a join token")?;
    let labels: BTreeMap<String, String> = req.labels.into_iter().collect();
    check_labels(&labels)?;
    let ttl = match req.expires_in_ms {
        0 => DEFAULT_JOIN_TTL,
        ms if Duration::from_millis(ms) > MAX_JOIN_TTL => {
            return Err(Status::invalid_argument("a join token may live at most 30 days"));
        }
        ms => Duration::from_millis(ms),
    };
    let labels_text: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let fingerprint = shared.config.tls.as_ref().map(|t| t.ca_fingerprint.clone());
    let (token, expires_ms) =
        auth::issue_join_token(&*shared.access, fingerprint.clone(), labels, ttl, &caller.who())
            .await
            .map_err(status)?;
    let token_id = drover_core::access::Credential::parse(&token).map(|c| c.id).unwrap_or_default();
    let change = Change::cluster("token.create", token_id)
        .detail(format!("labels [{}], expires {expires_ms}", labels_text.join(",")));
    audit::record(shared, caller, from, change).await;
    Ok(pb::CreateJoinTokenResponse { token, expires_ms, ca_fingerprint: fingerprint.unwrap_or_default() })
}

/// `RevokeNode` (operator): revokes the node's credentials, hands its attempts on as lost, and
/// ends its session on whichever server holds it.
pub(crate) async fn revoke_node(
    shared: &Shared,
    caller: &Caller,
    from: Option<SocketAddr>,
    req: pb::RevokeNodeRequest,
) -> Result<pb::RevokeNodeResponse, Status> {
    caller.require_operator("revoking a node")?;
    let revoked = shared.access.revoke_node(&req.name, now_ms()).await.map_err(status)?.ok_or_else(|| {
        Status::not_found(format!("node `{}` not found; `drover nodes` lists nodes", req.name))
    })?;
    tracing::warn!(node = %req.name, node_id = ?revoked.node_id, credentials = revoked.credentials,
        lost = revoked.lost.len(), by = %caller.who(), "node revoked");
    if let Some(node_id) = revoked.node_id {
        shared.publish(Signal::NodeRevoked { node_id }).await;
    }
    let detail = format!("{} credential(s), {} attempt(s) lost", revoked.credentials, revoked.lost.len());
    audit::record(shared, caller, from, Change::cluster("node.revoke", &req.name).detail(detail)).await;
    shared.publish(Signal::Changed { job_id: 0 }).await;
    shared.publish(Signal::Schedule).await;
    Ok(pb::RevokeNodeResponse { credentials: revoked.credentials, lost: revoked.lost.len() as u32 })
}

/// Whether `name` can be a node's name (it appears in logs, labels and file names).
pub(crate) fn valid_node_name(name: &str) -> bool {
    (1..=253).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// `Join`: spends a join token and returns a credential bound to the node name.
pub(crate) async fn join(
    shared: &Shared,
    from: Option<SocketAddr>,
    req: pb::JoinRequest,
) -> Result<pb::JoinResponse, Status> {
    let refused = |why: &str| {
        Status::permission_denied(format!(
            "join token refused: {why}; ask an operator for a new one (`drover nodes token create`)"
        ))
    };
    if !valid_node_name(&req.name) {
        return Err(Status::invalid_argument(format!(
            "`{}` is not a node name; use letters, digits, `.`, `-` and `_`",
            req.name
        )));
    }
    let token = Credential::parse(&req.token)
        .filter(|c| c.kind == CredentialKind::JoinToken)
        .ok_or_else(|| refused("it is not a join token"))?;
    let record = shared.access.join_token(&token.id).await.map_err(status)?;
    let Some(record) = record.filter(|r| mint::secret_matches(&token.secret, &r.secret_sha256)) else {
        return Err(refused("it is not valid"));
    };
    let node_credential = mint::credential(CredentialKind::Node, None);
    let credential = NodeCredentialRecord {
        id: node_credential.id.clone(),
        secret_sha256: mint::hash_secret(&node_credential.secret),
        node_name: req.name.clone(),
        labels: record.labels.clone(),
        created_ms: now_ms(),
        revoked_ms: None,
    };
    match shared.access.redeem_join_token(&record.id, &credential, now_ms()).await.map_err(status)? {
        Redeemed::Enrolled => {}
        Redeemed::Unknown => return Err(refused("it is not valid")),
        Redeemed::AlreadyUsed => return Err(refused("it was used already")),
        Redeemed::Expired => return Err(refused("it expired")),
        Redeemed::NameTaken => {
            return Err(Status::already_exists(format!(
                "node `{}` is enrolled already; pick another --name, or revoke it first with `drover nodes revoke {}`",
                req.name, req.name
            )));
        }
    }
    tracing::info!(node = %req.name, token_id = %record.id, credential_id = %credential.id, "node enrolled");
    let joined = Caller::Node {
        credential_id: credential.id.clone(),
        name: req.name.clone(),
        labels: record.labels.clone(),
    };
    audit::record(
        shared,
        &joined,
        from,
        Change::cluster("node.join", &req.name).detail(format!("token {}", record.id)),
    )
    .await;
    Ok(pb::JoinResponse {
        credential: node_credential.to_text(),
        name: req.name,
        ca_pem: shared.config.tls.as_ref().map(|t| t.ca_pem.clone()).unwrap_or_default(),
    })
}
