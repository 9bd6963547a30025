//! Credentials made outside any call: the first operator key, written once, on a server's
//! first start, to a 0600 file in its data directory (so whoever can read that directory can
//! administer the cluster and nobody else ever sees the key), and the join tokens `drover up`
//! makes for its local agent and prints for remote ones.

use std::path::{Path, PathBuf};

use std::collections::BTreeMap;
use std::time::Duration;

use drover_core::Role;
use drover_core::access::CredentialKind;
use drover_store::{AccessStore, JoinTokenRecord, KeyRecord, StoreError};

use super::mint;
use crate::now_ms;

/// Why the first operator key could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The key file could not be written.
    #[error("cannot write the operator key to {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Makes the first operator key when the store has no key at all, and writes it to `path`
/// (mode 0600, replacing any old file). Returns `Some(path)` when it did; `None` when keys
/// already exist (a later start, or another replica made them).
pub async fn first_operator_key(
    access: &dyn AccessStore,
    path: &Path,
) -> Result<Option<PathBuf>, BootstrapError> {
    if !access.keys(None).await?.is_empty() {
        return Ok(None);
    }
    let credential = mint::credential(CredentialKind::ApiKey, None);
    let record = KeyRecord {
        id: credential.id.clone(),
        secret_sha256: mint::hash_secret(&credential.secret),
        project: None,
        role: Role::Operator,
        name: "first operator key".into(),
        created_ms: now_ms(),
        expires_ms: None,
        revoked_ms: None,
        created_by: "bootstrap".into(),
    };
    // The key is on disk (beside its final name) before the store has it, so a key in the
    // store that nobody can read never exists; the store then decides which of several
    // servers starting together makes it.
    let pending = path.with_extension("new");
    let write = |source| BootstrapError::Write { path: path.to_owned(), source };
    drover_tls::write_private_file(&pending, format!("{}\n", credential.to_text()).as_bytes())
        .map_err(write)?;
    if !access.create_first_key(&record).await? {
        let _ = std::fs::remove_file(&pending);
        return Ok(None);
    }
    std::fs::rename(&pending, path).map_err(write)?;
    tracing::info!(key_id = %credential.id, path = %path.display(), "wrote the first operator key");
    Ok(Some(path.to_owned()))
}

/// Makes a single-use join token that enrolls one node with `labels`, valid for `ttl`,
/// carrying the CA fingerprint when the server has TLS. Returns the token and its expiry.
pub async fn issue_join_token(
    access: &dyn AccessStore,
    ca_fingerprint: Option<String>,
    labels: BTreeMap<String, String>,
    ttl: Duration,
    created_by: &str,
) -> Result<(String, i64), StoreError> {
    let credential = mint::credential(CredentialKind::JoinToken, ca_fingerprint);
    let now = now_ms();
    let record = JoinTokenRecord {
        id: credential.id.clone(),
        secret_sha256: mint::hash_secret(&credential.secret),
        labels,
        created_ms: now,
        expires_ms: now.saturating_add(ttl.as_millis() as i64),
        used_ms: None,
        used_by: None,
        created_by: created_by.to_owned(),
    };
    access.create_join_token(&record).await?;
    tracing::info!(token_id = %record.id, expires_ms = record.expires_ms, by = created_by, "join token created");
    Ok((credential.to_text(), record.expires_ms))
}
