//! Blob store in an S3-compatible bucket, through `object_store`.
//!
//! Keys under the configured prefix:
//!
//! ```text
//! <prefix>/sha256/<64 hex>      one object per blob
//! <prefix>/staging/<random>     large uploads whose digest was not known in advance
//! ```
//!
//! How a `put` stays all-or-nothing without holding the blob in memory:
//!
//! - Blobs up to one part (`part_size`, 8 MiB by default) are buffered, hashed, and written with
//!   one PUT to their final key once the digest is known (and matched `expected`).
//! - Larger blobs use a multipart upload. S3 makes a multipart object visible only when the
//!   upload is completed, so with `expected` given the parts go straight to the final key and the
//!   upload is completed only if the digest matched, and aborted otherwise. Without `expected`
//!   the final key is unknown until the end: the parts go to a staging key that is copied to the
//!   final key server-side and then deleted. (S3's single CopyObject stops at 5 GiB: upload blobs
//!   beyond that with `expected`, as [`crate::BlobStore::put_file`] does.)
//!
//! A crash mid-upload can leave an incomplete multipart upload or a staging object behind: give
//! the bucket a lifecycle rule that aborts incomplete multipart uploads and expires
//! `<prefix>/staging/` after a day.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::BytesMut;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncRead;
use tokio_util::io::StreamReader;

use crate::digest::Hashing;
use crate::verify::{READ_CHUNK, VerifyingReader, hash_stream, read_chunk};
use crate::{BlobError, BlobInfo, BlobReader, BlobStore, Digest};

const BLOBS_DIR: &str = "sha256";
const STAGING_DIR: &str = "staging";
/// Default multipart part size, and the largest blob uploaded with a single PUT.
pub const DEFAULT_S3_PART_SIZE: usize = 8 * 1024 * 1024;
/// S3 rejects parts (other than the last) smaller than this.
const MIN_PART_SIZE: usize = 5 * 1024 * 1024;
/// Parts uploaded in parallel; bounds the memory of one upload to about this many parts.
const PARALLEL_PARTS: usize = 4;
const BACKEND: &str = "s3";
/// Downloads are split into ranged GETs of this many parts' size. `object_store` bounds every
/// request (body included) by its 30 s timeout, so one GET for a multi-GiB blob, or for a reader
/// that consumes slowly, would time out; per 16 MiB range it only needs about 0.5 MiB/s.
const PARTS_PER_DOWNLOAD_RANGE: u64 = 2;

/// Connection settings for an S3-compatible service. Fill it from config, or from the standard
/// AWS environment variables with [`S3Options::from_env`].
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Options {
    /// Service URL for S3-compatible services (MinIO, moto, R2...), e.g. `http://127.0.0.1:9000`.
    /// `None` means AWS itself.
    pub endpoint: Option<String>,
    /// Region; `us-east-1` when unset.
    pub region: Option<String>,
    /// Access key id; with `secret_access_key`. When both are unset, the AWS SDK's other sources
    /// apply (web identity token, ECS task role, EC2 instance metadata).
    pub access_key_id: Option<String>,
    /// Secret access key; with `access_key_id`.
    pub secret_access_key: Option<String>,
    /// Session token for temporary credentials.
    pub session_token: Option<String>,
    /// Allow a plain-HTTP `endpoint` (test servers on loopback); refused otherwise.
    pub allow_http: bool,
    /// Address buckets as `bucket.endpoint` instead of `endpoint/bucket`.
    pub virtual_hosted_style: bool,
    /// Multipart part size in bytes (at least 5 MiB); also the largest blob sent in one PUT.
    /// Downloads use ranged GETs of twice this size. Defaults to [`DEFAULT_S3_PART_SIZE`].
    pub part_size: Option<usize>,
}

impl fmt::Debug for S3Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |secret: &Option<String>| secret.as_ref().map(|_| "<redacted>");
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &redacted(&self.secret_access_key))
            .field("session_token", &redacted(&self.session_token))
            .field("allow_http", &self.allow_http)
            .field("virtual_hosted_style", &self.virtual_hosted_style)
            .field("part_size", &self.part_size)
            .finish()
    }
}

impl S3Options {
    /// Reads `AWS_ENDPOINT_URL`, `AWS_REGION` (or `AWS_DEFAULT_REGION`), `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`; empty variables count as unset. A plain
    /// `http://` endpoint sets `allow_http`, since naming one is the explicit choice.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
        let endpoint = var("AWS_ENDPOINT_URL");
        S3Options {
            allow_http: endpoint.as_deref().is_some_and(|e| e.starts_with("http://")),
            endpoint,
            region: var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")),
            access_key_id: var("AWS_ACCESS_KEY_ID"),
            secret_access_key: var("AWS_SECRET_ACCESS_KEY"),
            session_token: var("AWS_SESSION_TOKEN"),
            virtual_hosted_style: false,
            part_size: None,
        }
    }
}

/// A blob store in an S3 bucket under a key prefix (see the module docs for the layout and how
/// uploads stay atomic).
#[derive(Debug, Clone)]
pub struct S3BlobStore {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    part_size: usize,
}

impl S3BlobStore {
    /// Connects to `bucket`, storing blobs under `prefix` (may be empty). Does no network I/O:
    /// a wrong endpoint or bad credentials show up on the first operation.
    pub fn new(bucket: &str, prefix: &str, options: &S3Options) -> Result<Self, BlobError> {
        if bucket.is_empty() {
            return Err(BlobError::config("the s3 bucket name is empty; use s3://<bucket>/<prefix>"));
        }
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(options.region.as_deref().unwrap_or("us-east-1"))
            .with_allow_http(options.allow_http)
            .with_virtual_hosted_style_request(options.virtual_hosted_style);
        if let Some(endpoint) = &options.endpoint {
            if endpoint.starts_with("http://") && !options.allow_http {
                return Err(BlobError::config(format!(
                    "s3 endpoint {endpoint} is plain http; set allow_http to use it, or use https"
                )));
            }
            builder = builder.with_endpoint(endpoint);
        }
        match (&options.access_key_id, &options.secret_access_key) {
            (Some(id), Some(secret)) => {
                builder = builder.with_access_key_id(id).with_secret_access_key(secret);
            }
            (None, None) => {}
            _ => {
                return Err(BlobError::config(
                    "s3 credentials need both an access key id and a secret access key; set both or neither",
                ));
            }
        }
        if let Some(token) = &options.session_token {
            builder = builder.with_token(token);
        }
        let store = builder.build().map_err(|err| {
            BlobError::config(format!("cannot set up the s3 client for bucket {bucket}: {err}"))
        })?;
        let part_size = options.part_size.unwrap_or(DEFAULT_S3_PART_SIZE);
        if part_size < MIN_PART_SIZE {
            return Err(BlobError::config(format!(
                "s3 part_size {part_size} is below the 5 MiB minimum that S3 accepts; raise it"
            )));
        }
        let store = Self::from_object_store(Arc::new(store), prefix)?;
        tracing::info!(bucket, prefix = %store.prefix, endpoint = ?options.endpoint, "opened s3 blob store");
        Ok(S3BlobStore { part_size, ..store })
    }

    /// Uses an already built `object_store` client (any backend `object_store` supports), storing
    /// blobs under `prefix`.
    pub fn from_object_store(store: Arc<dyn ObjectStore>, prefix: &str) -> Result<Self, BlobError> {
        let prefix = ObjectPath::parse(prefix.trim_matches('/')).map_err(|err| {
            BlobError::config(format!(
                "invalid s3 key prefix {prefix:?}: {err}; use plain path segments like drover/blobs"
            ))
        })?;
        Ok(S3BlobStore { store, prefix, part_size: DEFAULT_S3_PART_SIZE })
    }

    /// The underlying `object_store` client, for tooling and tests that need raw access.
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The object key a blob is (or would be) stored under: `<prefix>/sha256/<64 hex>`.
    pub fn object_key(&self, digest: &Digest) -> ObjectPath {
        self.prefix.clone().join(BLOBS_DIR).join(digest.hex())
    }

    fn staging_key(&self) -> ObjectPath {
        self.prefix.clone().join(STAGING_DIR).join(format!("{:032x}", rand::random::<u128>()))
    }

    /// Streams the rest of an upload (after the first part) into `writer`.
    async fn stream_parts(
        reader: &mut (dyn AsyncRead + Send + Unpin),
        writer: &mut WriteMultipart,
        hashing: &mut Hashing,
    ) -> Result<(), BlobError> {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let n = read_chunk(reader, &mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            hashing.update(&buf[..n])?;
            // Back pressure: at most PARALLEL_PARTS parts in flight, plus the one being filled.
            writer.wait_for_capacity(PARALLEL_PARTS).await.map_err(backend("upload a blob part"))?;
            writer.write(&buf[..n]);
        }
    }

    /// Moves a completed staging upload to the blob's final key (unless it is already there).
    async fn promote(&self, staging: &ObjectPath, info: &BlobInfo) -> Result<(), BlobError> {
        let key = self.object_key(&info.digest);
        let result = async {
            if self.stat(&info.digest).await?.is_none() {
                self.store.copy(staging, &key).await.map_err(backend("copy a staged upload"))?;
            }
            Ok(())
        }
        .await;
        if let Err(err) = self.store.delete(staging).await {
            tracing::warn!(key = %staging, error = %err, "cannot delete staged upload; a lifecycle rule will");
        }
        result
    }
}

fn backend(operation: &'static str) -> impl FnOnce(object_store::Error) -> BlobError {
    move |err| BlobError::Backend { backend: BACKEND, operation, source: Box::new(err) }
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn put(
        &self,
        reader: &mut (dyn AsyncRead + Send + Unpin),
        expected: Option<&Digest>,
        max_size: Option<u64>,
    ) -> Result<BlobInfo, BlobError> {
        // Already stored: verify the stream but upload nothing.
        if let Some(expected) = expected
            && self.stat(expected).await?.is_some()
        {
            let info = hash_stream(reader, Some(expected), max_size).await?;
            tracing::debug!(digest = %info.digest, "blob already stored");
            return Ok(info);
        }

        // Buffer up to one part: small blobs go up in one PUT.
        let mut hashing = Hashing::new(max_size);
        let mut first = BytesMut::new();
        let mut buf = vec![0u8; READ_CHUNK];
        let mut eof = false;
        while first.len() < self.part_size {
            let want = (self.part_size - first.len()).min(buf.len());
            let n = read_chunk(reader, &mut buf[..want]).await?;
            if n == 0 {
                eof = true;
                break;
            }
            hashing.update(&buf[..n])?;
            first.extend_from_slice(&buf[..n]);
        }
        drop(buf);
        if eof {
            let info = hashing.finish(expected)?;
            if self.stat(&info.digest).await?.is_some() {
                tracing::debug!(digest = %info.digest, "blob already stored");
                return Ok(info);
            }
            let key = self.object_key(&info.digest);
            self.store.put(&key, PutPayload::from(first.freeze())).await.map_err(backend("upload a blob"))?;
            tracing::debug!(digest = %info.digest, size = info.size, "blob stored");
            return Ok(info);
        }

        // Multipart: straight to the final key when it is known, else to a staging key.
        let target = match expected {
            Some(expected) => self.object_key(expected),
            None => self.staging_key(),
        };
        let upload = self.store.put_multipart(&target).await.map_err(backend("start a multipart upload"))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, self.part_size);
        writer.put(first.freeze());
        let streamed = Self::stream_parts(reader, &mut writer, &mut hashing).await;
        let info = match streamed.and_then(|()| hashing.finish(expected)) {
            Ok(info) => info,
            Err(err) => {
                // Nothing becomes visible: the upload is never completed.
                if let Err(abort_err) = writer.abort().await {
                    tracing::warn!(key = %target, error = %abort_err, "cannot abort multipart upload");
                }
                return Err(err);
            }
        };
        writer.finish().await.map_err(backend("complete a multipart upload"))?;
        if expected.is_none() {
            self.promote(&target, &info).await?;
        }
        tracing::debug!(digest = %info.digest, size = info.size, "blob stored");
        Ok(info)
    }

    async fn get(&self, digest: &Digest) -> Result<BlobReader, BlobError> {
        let key = self.object_key(digest);
        let size = match self.store.head(&key).await {
            Ok(meta) => meta.size,
            Err(object_store::Error::NotFound { .. }) => return Err(BlobError::NotFound { digest: *digest }),
            Err(err) => return Err(backend("look up a blob")(err)),
        };
        // One GET per range, issued lazily as the reader gets there (see PARTS_PER_DOWNLOAD_RANGE
        // for why). An empty blob needs no request at all.
        let range_len = self.part_size as u64 * PARTS_PER_DOWNLOAD_RANGE;
        let store = Arc::clone(&self.store);
        let ranges =
            (0..size).step_by(range_len as usize).map(move |start| start..size.min(start + range_len));
        let stream = futures::stream::iter(ranges)
            .then(move |range| {
                let (store, key) = (Arc::clone(&store), key.clone());
                async move {
                    let options = GetOptions::default().with_range(Some(range));
                    store.get_opts(&key, options).await.map(|result| result.into_stream())
                }
            })
            .try_flatten()
            .map_err(|err| {
                BlobError::Backend { backend: BACKEND, operation: "download a blob", source: Box::new(err) }
                    .into_io()
            });
        Ok(Box::pin(VerifyingReader::new(StreamReader::new(Box::pin(stream)), *digest)))
    }

    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, BlobError> {
        match self.store.head(&self.object_key(digest)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(err) => Err(backend("look up a blob")(err)),
        }
    }

    async fn delete(&self, digest: &Digest) -> Result<(), BlobError> {
        match self.store.delete(&self.object_key(digest)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                tracing::debug!(%digest, "blob deleted");
                Ok(())
            }
            Err(err) => Err(backend("delete a blob")(err)),
        }
    }

    async fn list(&self) -> Result<Vec<BlobInfo>, BlobError> {
        let blobs_prefix = self.prefix.clone().join(BLOBS_DIR);
        let mut listing = self.store.list(Some(&blobs_prefix));
        let mut out = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(backend("list blobs"))?;
            match meta.location.filename().map(Digest::from_hex) {
                Some(Ok(digest)) if meta.location == self.object_key(&digest) => {
                    out.push(BlobInfo { digest, size: meta.size })
                }
                _ => tracing::warn!(key = %meta.location, "ignoring unexpected object in blob store"),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_debug_redacts_secrets() {
        let options = S3Options {
            access_key_id: Some("AKIDEXAMPLE".into()),
            secret_access_key: Some("very-secret".into()),
            session_token: Some("token-secret".into()),
            ..S3Options::default()
        };
        let debug = format!("{options:?}");
        assert!(!debug.contains("very-secret") && !debug.contains("token-secret"), "{debug}");
        assert!(debug.contains("AKIDEXAMPLE"));
    }

    #[test]
    fn rejects_bad_settings() {
        let half = S3Options { access_key_id: Some("id".into()), ..S3Options::default() };
        assert!(matches!(S3BlobStore::new("b", "", &half), Err(BlobError::Config { .. })));
        let http = S3Options { endpoint: Some("http://127.0.0.1:1".into()), ..S3Options::default() };
        assert!(matches!(S3BlobStore::new("b", "", &http), Err(BlobError::Config { .. })));
        let tiny = S3Options { part_size: Some(1024), ..S3Options::default() };
        assert!(matches!(S3BlobStore::new("b", "", &tiny), Err(BlobError::Config { .. })));
        assert!(matches!(S3BlobStore::new("", "", &S3Options::default()), Err(BlobError::Config { .. })));
    }

    #[test]
    fn keys_live_under_the_prefix() {
        let options = S3Options {
            endpoint: Some("http://127.0.0.1:1".into()),
            allow_http: true,
            access_key_id: Some("id".into()),
            secret_access_key: Some("secret".into()),
            ..S3Options::default()
        };
        let store = S3BlobStore::new("bucket", "/drover/blobs/", &options).unwrap();
        let digest = Digest::of(b"");
        assert_eq!(store.object_key(&digest).as_ref(), format!("drover/blobs/sha256/{}", digest.hex()));
        let bare = S3BlobStore::new("bucket", "", &options).unwrap();
        assert_eq!(bare.object_key(&digest).as_ref(), format!("sha256/{}", digest.hex()));
    }
}
