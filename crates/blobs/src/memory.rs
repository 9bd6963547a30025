//! In-memory blob store, for tests.

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::AsyncRead;

use crate::digest::Hashing;
use crate::verify::{READ_CHUNK, VerifyingReader, read_chunk};
use crate::{BlobError, BlobInfo, BlobReader, BlobStore, Digest};

/// A blob store that keeps everything in a map in memory; contents are lost when it is dropped.
///
/// Meant for tests. Behaves like the other backends, including digest verification on `get`,
/// which [`MemoryBlobStore::overwrite_raw`] lets a test exercise.
#[derive(Debug, Default)]
pub struct MemoryBlobStore {
    blobs: Mutex<HashMap<Digest, Bytes>>,
}

impl MemoryBlobStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Test hook: replaces the bytes stored under `digest` without checking them, as bit rot or
    /// tampering would. A later `get` of that digest fails with [`BlobError::Corrupt`].
    pub fn overwrite_raw(&self, digest: &Digest, content: impl Into<Bytes>) {
        self.blobs().insert(*digest, content.into());
    }

    fn blobs(&self) -> MutexGuard<'_, HashMap<Digest, Bytes>> {
        // A panic while holding the lock cannot leave the map half-updated (every critical
        // section is a single map operation), so a poisoned lock is safe to keep using.
        self.blobs.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl BlobStore for MemoryBlobStore {
    async fn put(
        &self,
        reader: &mut (dyn AsyncRead + Send + Unpin),
        expected: Option<&Digest>,
        max_size: Option<u64>,
    ) -> Result<BlobInfo, BlobError> {
        let mut hashing = Hashing::new(max_size);
        let mut content = Vec::new();
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let n = read_chunk(reader, &mut buf).await?;
            if n == 0 {
                break;
            }
            hashing.update(&buf[..n])?;
            content.extend_from_slice(&buf[..n]);
        }
        let info = hashing.finish(expected)?;
        self.blobs().entry(info.digest).or_insert_with(|| Bytes::from(content));
        Ok(info)
    }

    async fn get(&self, digest: &Digest) -> Result<BlobReader, BlobError> {
        let content = self.blobs().get(digest).cloned().ok_or(BlobError::NotFound { digest: *digest })?;
        Ok(Box::pin(VerifyingReader::new(Cursor::new(content), *digest)))
    }

    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, BlobError> {
        Ok(self.blobs().get(digest).map(|content| content.len() as u64))
    }

    async fn delete(&self, digest: &Digest) -> Result<(), BlobError> {
        self.blobs().remove(digest);
        Ok(())
    }

    async fn list(&self) -> Result<Vec<BlobInfo>, BlobError> {
        Ok(self
            .blobs()
            .iter()
            .map(|(digest, content)| BlobInfo { digest: *digest, size: content.len() as u64 })
            .collect())
    }
}
