//! Drover's content-addressed blob store.
//!
//! Task inputs, outputs, build contexts and logs are stored as blobs named by the sha256 of their
//! content ([`Digest`], written `sha256:<64 hex>`). Every backend implements [`BlobStore`]:
//!
//! - [`LocalBlobStore`]: a directory on local disk (the default of `drover up`),
//! - [`MemoryBlobStore`]: a map in memory, for tests,
//! - [`S3BlobStore`]: an S3-compatible bucket, for multi-server deployments.
//!
//! [`open_blob_store`] picks one from a URL (`file:///var/lib/drover/blobs`, `memory://`,
//! `s3://bucket/prefix`).
//!
//! Two guarantees hold for every backend and are checked by one conformance suite
//! (`tests/conformance.rs`):
//!
//! - **Uploads are verified and all-or-nothing.** [`BlobStore::put`] hashes while streaming; a
//!   blob becomes visible under its digest only after all of its bytes arrived and, when the
//!   caller announced a digest, matched it. A failed, oversized or mismatching upload leaves
//!   nothing behind.
//! - **Downloads are verified.** [`BlobStore::get`] returns a reader that hashes as it goes and
//!   ends with [`BlobError::Corrupt`] instead of EOF when the stored bytes no longer match.
#![warn(missing_docs)]

mod digest;
mod error;
mod local;
mod memory;
mod open;
mod s3;
mod verify;

use std::path::Path;
use std::pin::Pin;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

pub use digest::Digest;
pub use error::{BlobError, BlobErrorKind, BoxError};
pub use local::LocalBlobStore;
pub use memory::MemoryBlobStore;
pub use open::open_blob_store;
pub use s3::{DEFAULT_S3_PART_SIZE, S3BlobStore, S3Options};

/// A stored blob's digest and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlobInfo {
    /// The sha256 of the content.
    pub digest: Digest,
    /// The content length in bytes.
    pub size: u64,
}

/// A blob's content as returned by [`BlobStore::get`].
///
/// It verifies the digest while it is read: reading to the end either reaches EOF (the content
/// matched) or fails with an `io::Error` carrying [`BlobError::Corrupt`]; use
/// [`BlobError::from_io`] to get it back.
pub type BlobReader = Pin<Box<dyn AsyncRead + Send>>;

/// A content-addressed blob store.
///
/// Blobs are immutable and named by their [`Digest`]. Implementations must be safe to share
/// between tasks and processes: concurrent `put`s of the same content are fine.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Stores the bytes read from `reader`, computing the digest while streaming (never holding
    /// the whole blob in memory) and returns its digest and size.
    ///
    /// Storing content that is already present is idempotent and cheap (nothing is rewritten;
    /// with `expected` given and present, nothing is uploaded, the stream is only hashed). If
    /// `expected` is given and the content hashes to something else, nothing is stored and
    /// [`BlobError::DigestMismatch`] is returned. If `max_size` is given, the upload is refused
    /// with [`BlobError::TooLarge`] as soon as it passes that many bytes, and nothing is stored.
    async fn put(
        &self,
        reader: &mut (dyn AsyncRead + Send + Unpin),
        expected: Option<&Digest>,
        max_size: Option<u64>,
    ) -> Result<BlobInfo, BlobError>;

    /// Opens a blob for streaming; [`BlobError::NotFound`] if it is not stored.
    ///
    /// The returned reader verifies the content against `digest` as it goes (see
    /// [`BlobReader`]), so a corrupted blob is detected by whoever reads it to the end.
    async fn get(&self, digest: &Digest) -> Result<BlobReader, BlobError>;

    /// The size of a stored blob, or `None` if it is not stored.
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, BlobError>;

    /// Deletes a blob. Deleting a blob that is not stored succeeds (so concurrent garbage
    /// collectors do not trip over each other).
    async fn delete(&self, digest: &Digest) -> Result<(), BlobError>;

    /// Lists every stored blob, in no particular order (for retention and garbage collection).
    async fn list(&self) -> Result<Vec<BlobInfo>, BlobError>;

    /// Stores an in-memory buffer; see [`BlobStore::put`].
    async fn put_bytes(&self, data: &[u8]) -> Result<BlobInfo, BlobError> {
        let mut reader = data;
        self.put(&mut reader, None, None).await
    }

    /// Reads a whole blob into memory, verified. Meant for small blobs (specs, manifests); stream
    /// big ones with [`BlobStore::get`].
    async fn get_bytes(&self, digest: &Digest) -> Result<Vec<u8>, BlobError> {
        let mut reader = self.get(digest).await?;
        let mut out = Vec::new();
        reader.read_to_end(&mut out).await.map_err(|err| BlobError::from_io(err, "read a blob"))?;
        Ok(out)
    }

    /// Stores a file's content.
    ///
    /// The file is read twice: once to compute its digest and once to upload it with that digest
    /// as `expected`. That makes re-uploading a file that is already stored cost no upload, and
    /// lets the S3 backend stream large files straight to their final key. A file that changes
    /// between the two passes fails with [`BlobError::DigestMismatch`] and stores nothing.
    async fn put_file(&self, path: &Path) -> Result<BlobInfo, BlobError> {
        let open = || async {
            tokio::fs::File::open(path).await.map_err(|err| BlobError::io("open a file to upload", path, err))
        };
        let first = digest_reader(&mut open().await?).await?;
        let info = self.put(&mut open().await?, Some(&first.digest), None).await?;
        tracing::debug!(path = %path.display(), digest = %info.digest, size = info.size, "file stored as blob");
        Ok(info)
    }
}

/// Computes the digest and size of everything `reader` yields, storing nothing.
pub async fn digest_reader(reader: &mut (dyn AsyncRead + Send + Unpin)) -> Result<BlobInfo, BlobError> {
    verify::hash_stream(reader, None, None).await
}
