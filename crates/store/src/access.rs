//! Identity and access: projects, API keys, join tokens, node credentials, and which projects
//! hold which blobs.
//!
//! Secrets of keys, tokens and credentials are never stored: only the SHA-256 of the secret
//! part, which the server compares in constant time. Ids are the public part of each
//! credential and look records up.

use std::collections::BTreeMap;

use async_trait::async_trait;
use drover_core::Role;

use crate::{Page, PageRequest, Result};

/// A project: the unit that owns jobs, secrets and keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectRecord {
    /// Its name.
    pub name: String,
    /// When it was created (0 for the `default` project the first migration makes).
    pub created_ms: i64,
}

/// An API key as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// The public id (the `<id>` of `drv_<id>_<secret>`).
    pub id: String,
    /// SHA-256 of the secret part.
    pub secret_sha256: Vec<u8>,
    /// The key's project; `None` exactly when the role is [`Role::Operator`].
    pub project: Option<String>,
    /// What the key may do.
    pub role: Role,
    /// A note for people.
    pub name: String,
    /// When it was created.
    pub created_ms: i64,
    /// When it stops working, if ever.
    pub expires_ms: Option<i64>,
    /// When it was revoked, if it was.
    pub revoked_ms: Option<i64>,
    /// Who created it: a key id, or `bootstrap` for the server's first operator key.
    pub created_by: String,
}

/// A single-use join token as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenRecord {
    /// The public id.
    pub id: String,
    /// SHA-256 of the secret part.
    pub secret_sha256: Vec<u8>,
    /// Labels the enrolled node carries, whatever its agent says.
    pub labels: BTreeMap<String, String>,
    /// When it was created.
    pub created_ms: i64,
    /// When it stops working.
    pub expires_ms: i64,
    /// When it was used, if it was.
    pub used_ms: Option<i64>,
    /// The node name it enrolled, once used.
    pub used_by: Option<String>,
    /// Who created it (a key id).
    pub created_by: String,
}

/// A node credential as stored: what an enrolled agent presents on every session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCredentialRecord {
    /// The public id (the `<id>` of `drn_<id>_<secret>`).
    pub id: String,
    /// SHA-256 of the secret part.
    pub secret_sha256: Vec<u8>,
    /// The one node name this credential may register.
    pub node_name: String,
    /// Labels from the join token, forced onto the node.
    pub labels: BTreeMap<String, String>,
    /// When it was created.
    pub created_ms: i64,
    /// When it was revoked, if it was.
    pub revoked_ms: Option<i64>,
}

/// What became of a join token's redemption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redeemed {
    /// The token is spent and the credential stored.
    Enrolled,
    /// No such token.
    Unknown,
    /// The token was used before.
    AlreadyUsed,
    /// The token expired.
    Expired,
    /// Another credential, not revoked, already holds this node name.
    NameTaken,
}

/// What revoking a node did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RevokedNode {
    /// The node's id, if it ever registered.
    pub node_id: Option<i64>,
    /// Credentials revoked (0 when the node had none in force).
    pub credentials: u32,
    /// Open attempts settled as lost.
    pub lost: Vec<i64>,
}

/// Where identities and their grants live. Every method commits before it returns.
#[async_trait]
pub trait AccessStore: Send + Sync + 'static {
    /// Creates a project; `false` when it already existed.
    async fn create_project(&self, name: &str, now_ms: i64) -> Result<bool>;

    /// Every project, by name.
    async fn projects(&self) -> Result<Vec<ProjectRecord>>;

    /// A page of [`projects`](Self::projects), by name; with `only`, of those projects alone.
    async fn list_projects(&self, only: Option<&[String]>, page: &PageRequest)
    -> Result<Page<ProjectRecord>>;

    /// Stores a new key. A key whose id exists already is a [`StoreError::Database`] error
    /// (ids are unique); the store does not check that the key's project exists.
    ///
    /// [`StoreError::Database`]: crate::StoreError::Database
    async fn create_key(&self, key: &KeyRecord) -> Result<()>;

    /// Stores the server's first operator key (`created_by` is `bootstrap`) unless such a key
    /// exists already; `false` when another server, starting at the same moment on the same
    /// database, made it first. At most one bootstrap key ever exists.
    async fn create_first_key(&self, key: &KeyRecord) -> Result<bool>;

    /// One key by id, revoked and expired ones included: the caller decides whether
    /// `revoked_ms` and `expires_ms` still let it work.
    async fn key(&self, id: &str) -> Result<Option<KeyRecord>>;

    /// Keys of one project (`Some`), or every key (`None`), oldest first (by `created_ms`, then
    /// id), revoked and expired ones included. Operator keys have no project, so only `None`
    /// lists them.
    async fn keys(&self, project: Option<&str>) -> Result<Vec<KeyRecord>>;

    /// A page of [`keys`](Self::keys), in the same order.
    async fn list_keys(&self, project: Option<&str>, page: &PageRequest) -> Result<Page<KeyRecord>>;

    /// Revokes a key; `false` when there is no such key or it was revoked already.
    async fn revoke_key(&self, id: &str, now_ms: i64) -> Result<bool>;

    /// Stores a new join token.
    async fn create_join_token(&self, token: &JoinTokenRecord) -> Result<()>;

    /// One join token by id.
    async fn join_token(&self, id: &str) -> Result<Option<JoinTokenRecord>>;

    /// Spends join token `token_id` and stores `credential`, atomically: the token must be
    /// unused and unexpired at `now_ms`, and no credential that is not revoked may hold the
    /// credential's node name. Anything else changes nothing and says why. Expired means
    /// `expires_ms <= now_ms`; a token both used and expired is [`Redeemed::AlreadyUsed`].
    /// The credential is stored as given (the caller copies the token's labels into it).
    /// Of concurrent redemptions of one token exactly one enrols; the others are
    /// [`Redeemed::AlreadyUsed`].
    async fn redeem_join_token(
        &self,
        token_id: &str,
        credential: &NodeCredentialRecord,
        now_ms: i64,
    ) -> Result<Redeemed>;

    /// One node credential by id, revoked ones included.
    async fn node_credential(&self, id: &str) -> Result<Option<NodeCredentialRecord>>;

    /// Revokes every credential of node `name`, marks the node down and settles its open
    /// attempts as lost (with the usual retry policy), in one transaction. `None` when no node
    /// and no credential (revoked or not) has that name. Lost attempts end like those of a node
    /// whose lease ran out, with the message "node NAME was revoked by an operator"; the node's
    /// epoch is over ([`crate::Store::renew_lease`] returns false) until it registers again.
    /// Nothing is published: the caller sends [`crate::Signal::NodeRevoked`] (and the usual
    /// `Changed`/`Schedule` for the settled attempts' jobs).
    async fn revoke_node(&self, name: &str, now_ms: i64) -> Result<Option<RevokedNode>>;

    /// Records that `project` holds blob `digest` (an upload for it). Idempotent.
    async fn add_project_blob(&self, project: &str, digest: &str, size: u64, now_ms: i64) -> Result<()>;

    /// The projects that hold blob `digest` (uploads, artifacts, log archives), by name, each
    /// once. [`crate::ArtifactStore::record_outputs`] and [`crate::ArchiveStore::record_log_archive`]
    /// add the job's project themselves; a blob that blob collection deletes as unreferenced
    /// (see [`crate::RetentionStore::doom_blobs`]) is held by no project any more.
    async fn blob_projects(&self, digest: &str) -> Result<Vec<String>>;

    /// Whether node `node_id` runs an open attempt of a project that holds blob `digest`:
    /// what lets an agent fetch images and inputs. An attempt counts from its assignment until it
    /// ends, whatever the node's state.
    async fn node_may_read_blob(&self, node_id: i64, digest: &str) -> Result<bool>;
}
