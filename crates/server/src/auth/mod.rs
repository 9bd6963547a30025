//! Who is asking, and may they: the one authorization function the gRPC and HTTP layers call.
//!
//! Every call carries a bearer credential: an API key (`drv_<id>_<secret>`) or a node
//! credential (`drn_<id>_<secret>`). [`authenticate`] turns it into a [`Caller`]; handlers then
//! ask the caller for the role they need in the project of the object they touch. A caller
//! without any role in a project is answered exactly as if the object did not exist, so ids
//! and names of other projects' objects leak nothing; a caller with too weak a role gets
//! `permission denied`, because it can see the object anyway.
//!
//! With `--no-auth` (loopback only) every call is [`Caller::Open`], which may do everything.

mod bootstrap;
pub(crate) mod mint;
pub mod oidc;

pub use bootstrap::{BootstrapError, first_operator_key, issue_join_token};

use drover_core::Role;
use drover_core::access::{Credential, CredentialKind};
use drover_store::AccessStore;
use tonic::Status;

use crate::convert::status;
use crate::now_ms;

/// Most bytes of an `authorization` header: a bearer credential is well under this.
const MAX_AUTHORIZATION: usize = 512;

/// What a person (or script) may do: the operator role, and roles in projects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Grants {
    /// The cluster operator: every role everywhere.
    pub(crate) operator: bool,
    /// Roles by project.
    pub(crate) projects: std::collections::BTreeMap<String, Role>,
}

impl Grants {
    /// The grants of one API key.
    pub(crate) fn of_key(role: Role, project: Option<String>) -> Grants {
        match (role, project) {
            (Role::Operator, _) => Grants { operator: true, ..Grants::default() },
            (role, Some(p)) => Grants { operator: false, projects: [(p, role)].into() },
            // A project role without a project grants nothing (the store never holds one).
            (_, None) => Grants::default(),
        }
    }
}

/// The identity behind a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Caller {
    /// Authorization is off (`--no-auth`): the caller may do everything.
    Open,
    /// A person or script: an API key (`id` is `key <id>`) or, later, a signed-in person.
    Person {
        /// Who, for logs and records.
        id: String,
        /// What they may do.
        grants: Grants,
    },
    /// An enrolled agent.
    Node {
        /// The credential's id.
        credential_id: String,
        /// The only node name it may register.
        name: String,
        /// Labels its join token forces onto the node.
        labels: std::collections::BTreeMap<String, String>,
    },
}

/// Which projects a caller can see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Visible {
    /// Every project.
    All,
    /// These projects (possibly none).
    Some(Vec<String>),
}

impl Visible {
    /// The store's project filter: `None` for every project.
    pub(crate) fn filter(&self) -> Option<Vec<String>> {
        match self {
            Visible::All => None,
            Visible::Some(p) => Some(p.clone()),
        }
    }
}

impl Caller {
    /// The caller's role in `project`: operators (and `Open`) have every role everywhere.
    pub(crate) fn role_in(&self, project: &str) -> Option<Role> {
        match self {
            Caller::Open => Some(Role::Operator),
            Caller::Person { grants, .. } if grants.operator => Some(Role::Operator),
            Caller::Person { grants, .. } => grants.projects.get(project).copied(),
            Caller::Node { .. } => None,
        }
    }

    /// Whether the caller is the cluster's operator.
    pub(crate) fn is_operator(&self) -> bool {
        match self {
            Caller::Open => true,
            Caller::Person { grants, .. } => grants.operator,
            Caller::Node { .. } => false,
        }
    }

    /// The projects the caller can see.
    pub(crate) fn visible(&self) -> Visible {
        match self {
            _ if self.is_operator() => Visible::All,
            Caller::Person { grants, .. } => Visible::Some(grants.projects.keys().cloned().collect()),
            _ => Visible::Some(Vec::new()),
        }
    }

    /// Requires role `need` in `project`. A caller with no role there gets `hidden()`: the
    /// answer a missing object gets.
    pub(crate) fn require(
        &self,
        project: &str,
        need: Role,
        hidden: impl FnOnce() -> Status,
    ) -> Result<(), Status> {
        match self.role_in(project) {
            None => Err(hidden()),
            Some(role) if role >= need => Ok(()),
            Some(role) => Err(Status::permission_denied(format!(
                "this needs the {need} role in project `{project}`; you are a {role} there"
            ))),
        }
    }

    /// Requires the operator role.
    pub(crate) fn require_operator(&self, what: &str) -> Result<(), Status> {
        if self.is_operator() {
            Ok(())
        } else {
            Err(Status::permission_denied(format!("{what} needs an operator key")))
        }
    }

    /// Refuses node credentials: the client API's calls are for people and scripts.
    pub(crate) fn require_person(&self) -> Result<(), Status> {
        match self {
            Caller::Node { .. } => Err(Status::permission_denied("a node credential cannot make this call")),
            _ => Ok(()),
        }
    }

    /// A short name for logs and records: the key or credential id.
    pub(crate) fn who(&self) -> String {
        match self {
            Caller::Open => "anonymous".into(),
            Caller::Person { id, .. } => id.clone(),
            Caller::Node { name, .. } => format!("node {name}"),
        }
    }
}

/// The error for a missing or unusable credential. One wording for unknown ids and wrong
/// secrets, so a guess learns nothing.
fn unauthenticated(detail: &str) -> Status {
    Status::unauthenticated(format!(
        "{detail}; pass an API key with --key or DROVER_KEY, or run `drover login`"
    ))
}

/// The bearer credential of a call, from its `authorization` header.
pub(crate) fn bearer(header: Option<&str>) -> Result<Credential, Status> {
    let header = header.ok_or_else(|| unauthenticated("this server needs a credential"))?;
    if header.len() > MAX_AUTHORIZATION {
        return Err(unauthenticated("the authorization header is too long"));
    }
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .ok_or_else(|| unauthenticated("the authorization header is not `Bearer <key>`"))?;
    Credential::parse(token).ok_or_else(|| unauthenticated("the credential is not a drover key"))
}

/// Who is calling, from the `authorization` header's value (`None` when absent). With `oidc`,
/// a bearer that is a JWT rather than a Drover credential is an identity provider's token.
pub(crate) async fn authenticate(
    access: &dyn AccessStore,
    enabled: bool,
    oidc: Option<&oidc::Oidc>,
    header: Option<&str>,
) -> Result<Caller, Status> {
    if !enabled {
        return Ok(Caller::Open);
    }
    if let Some(oidc) = oidc
        && let Some(token) = oidc::bearer_jwt(header)
    {
        return oidc.verify(token).await;
    }
    let credential = bearer(header)?;
    match credential.kind {
        CredentialKind::ApiKey => {
            let key = access.key(&credential.id).await.map_err(status)?;
            let Some(key) = key.filter(|k| mint::secret_matches(&credential.secret, &k.secret_sha256)) else {
                return Err(unauthenticated("the key is not valid"));
            };
            if key.revoked_ms.is_some() {
                return Err(unauthenticated(&format!("key {} was revoked", key.id)));
            }
            if key.expires_ms.is_some_and(|e| e <= now_ms()) {
                return Err(unauthenticated(&format!("key {} expired", key.id)));
            }
            Ok(Caller::Person {
                id: format!("key {}", key.id),
                grants: Grants::of_key(key.role, key.project),
            })
        }
        CredentialKind::Node => {
            let cred = access.node_credential(&credential.id).await.map_err(status)?;
            let Some(cred) = cred.filter(|c| mint::secret_matches(&credential.secret, &c.secret_sha256))
            else {
                return Err(unauthenticated("the node credential is not valid"));
            };
            if cred.revoked_ms.is_some() {
                return Err(Status::unauthenticated(format!(
                    "the credential of node {} was revoked; enroll the node again with a new join token",
                    cred.node_name
                )));
            }
            Ok(Caller::Node { credential_id: cred.id, name: cred.node_name, labels: cred.labels })
        }
        CredentialKind::JoinToken => Err(Status::unauthenticated(
            "a join token is not a credential; start the agent with `drover agent --join TOKEN`",
        )),
    }
}

/// The caller of a gRPC request.
pub(crate) async fn caller<T>(shared: &crate::Shared, req: &tonic::Request<T>) -> Result<Caller, Status> {
    let header = match req.metadata().get("authorization") {
        Some(v) => Some(v.to_str().map_err(|_| unauthenticated("the authorization header is not text"))?),
        None => None,
    };
    authenticate(&*shared.access, shared.config.auth, shared.oidc.as_ref(), header).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(role: Role, project: Option<&str>) -> Caller {
        Caller::Person { id: "key k".into(), grants: Grants::of_key(role, project.map(str::to_owned)) }
    }

    #[test]
    fn roles_grant_what_they_should() {
        let hidden = || Status::not_found("job 1 not found");
        let viewer = key(Role::Viewer, Some("a"));
        assert!(viewer.require("a", Role::Viewer, hidden).is_ok());
        assert_eq!(
            viewer.require("a", Role::Submitter, hidden).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        // Another project's object answers as a missing one.
        let err = viewer.require("b", Role::Viewer, hidden).unwrap_err();
        assert_eq!((err.code(), err.message()), (tonic::Code::NotFound, "job 1 not found"));
        let admin = key(Role::Admin, Some("a"));
        assert!(admin.require("a", Role::Submitter, hidden).is_ok());
        assert!(!admin.is_operator());
        let operator = key(Role::Operator, None);
        assert!(operator.require("b", Role::Admin, hidden).is_ok());
        assert_eq!(operator.visible(), Visible::All);
        let node = Caller::Node { credential_id: "c".into(), name: "n".into(), labels: Default::default() };
        assert_eq!(node.require("a", Role::Viewer, hidden).unwrap_err().code(), tonic::Code::NotFound);
        assert!(node.require_person().is_err());
        assert_eq!(node.visible(), Visible::Some(Vec::new()));
        assert!(Caller::Open.require("x", Role::Admin, hidden).is_ok());
    }

    #[test]
    fn bearer_headers() {
        let good = format!("Bearer drv_{}_{}", "0".repeat(16), "a".repeat(64));
        assert_eq!(bearer(Some(&good)).unwrap().kind, CredentialKind::ApiKey);
        for bad in [None, Some("Basic abc"), Some("Bearer nope"), Some(&*"Bearer x".repeat(100))] {
            assert_eq!(bearer(bad).unwrap_err().code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
    }
}
