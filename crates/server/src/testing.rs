//! What the crate's unit tests share: a server's state over a SQLite store, with no loops
//! running.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use drover_store::sqlite::SqliteStore;
use tokio::sync::{Notify, watch};

use crate::{ServerConfig, Shared};

/// A server's shared state over `store` with the default configuration, nothing running.
pub(crate) fn shared_over(store: Arc<SqliteStore>) -> Arc<Shared> {
    shared_with(store, ServerConfig::default())
}

/// [`shared_over`] with `config`.
pub(crate) fn shared_with(store: Arc<SqliteStore>, config: ServerConfig) -> Arc<Shared> {
    Arc::new(Shared {
        store: store.clone(),
        secrets: store.clone(),
        artifacts: store.clone(),
        access: store.clone(),
        tenants: store.clone(),
        retention: store.clone(),
        policy: Default::default(),
        blobs: Arc::new(drover_blobs::MemoryBlobStore::new()),
        config,
        changes: watch::channel(0).0,
        streams: Default::default(),
        schedule: Notify::new(),
        sessions: Mutex::new(HashMap::new()),
        reads: Default::default(),
        completions: crate::completions::Completions::spawn(store.clone(), Default::default(), 16).0,
        memory: Default::default(),
        oidc: None,
        disk: Default::default(),
    })
}
