//! Choosing a backend from a URL.

use std::path::Path;
use std::sync::Arc;

use crate::{BlobError, BlobStore, LocalBlobStore, MemoryBlobStore, S3BlobStore, S3Options};

/// Opens the blob store a URL names:
///
/// - `file:///var/lib/drover/blobs` or a plain path (`./.drover/blobs`): [`LocalBlobStore`]
///   (the path is taken literally, without percent-decoding);
/// - `memory://`: a new, empty [`MemoryBlobStore`] (every call gets its own);
/// - `s3://bucket` or `s3://bucket/prefix/path`: [`S3BlobStore`] with the endpoint, region and
///   credentials from `s3` (fill it from config, or with [`S3Options::from_env`]).
///
/// Anything else is a [`BlobError::Config`] that lists the supported forms.
pub fn open_blob_store(url: &str, s3: &S3Options) -> Result<Arc<dyn BlobStore>, BlobError> {
    const FORMS: &str = "use file:///path, a plain path, memory:// or s3://bucket/prefix";
    let url = url.trim();
    if url.is_empty() {
        return Err(BlobError::config(format!("the blob store url is empty; {FORMS}")));
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return Ok(Arc::new(LocalBlobStore::open(Path::new(url))?));
    };
    match scheme {
        "file" => {
            if !rest.starts_with('/') {
                return Err(BlobError::config(format!(
                    "blob store url {url:?} must name an absolute path after file://, like file:///var/lib/drover/blobs"
                )));
            }
            Ok(Arc::new(LocalBlobStore::open(Path::new(rest))?))
        }
        "memory" => {
            if !rest.is_empty() {
                return Err(BlobError::config(format!(
                    "blob store url {url:?} has text after memory://; write just memory://"
                )));
            }
            Ok(Arc::new(MemoryBlobStore::new()))
        }
        "s3" => {
            if rest.contains(['?', '#']) {
                return Err(BlobError::config(format!(
                    "blob store url {url:?} has a query or fragment; put endpoint, region and credentials in the s3 options"
                )));
            }
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(BlobError::config(format!(
                    "blob store url {url:?} names no bucket; write s3://<bucket>/<prefix>"
                )));
            }
            Ok(Arc::new(S3BlobStore::new(bucket, prefix, s3)?))
        }
        other => {
            Err(BlobError::config(format!("unsupported blob store url scheme {other:?} in {url:?}; {FORMS}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_error(url: &str) -> String {
        match open_blob_store(url, &S3Options::default()) {
            Err(err @ BlobError::Config { .. }) => err.to_string(),
            Err(other) => panic!("{url}: expected a config error, got {other:?}"),
            Ok(_) => panic!("{url}: expected a config error, got a store"),
        }
    }

    #[tokio::test]
    async fn opens_local_from_file_url_and_plain_path() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().join("a").display());
        let store = open_blob_store(&url, &S3Options::default()).unwrap();
        let info = store.put_bytes(b"x").await.unwrap();
        assert!(dir.path().join("a/sha256").is_dir());

        let plain = dir.path().join("a").display().to_string();
        let again = open_blob_store(&plain, &S3Options::default()).unwrap();
        assert_eq!(again.get_bytes(&info.digest).await.unwrap(), b"x");
    }

    #[tokio::test]
    async fn opens_memory() {
        let store = open_blob_store("memory://", &S3Options::default()).unwrap();
        let info = store.put_bytes(b"x").await.unwrap();
        assert_eq!(store.stat(&info.digest).await.unwrap(), Some(1));
    }

    #[test]
    fn opens_s3_without_network() {
        let options = S3Options {
            endpoint: Some("http://127.0.0.1:1".into()),
            allow_http: true,
            access_key_id: Some("id".into()),
            secret_access_key: Some("secret".into()),
            ..S3Options::default()
        };
        assert!(open_blob_store("s3://bucket", &options).is_ok());
        assert!(open_blob_store("s3://bucket/some/prefix", &options).is_ok());
    }

    #[test]
    fn rejects_bad_urls_clearly() {
        assert!(config_error("gs://bucket/x").contains("\"gs\""));
        assert!(config_error("gs://bucket/x").contains("s3://"));
        assert!(config_error("").contains("empty"));
        assert!(config_error("file://relative/path").contains("absolute"));
        assert!(config_error("memory://x").contains("memory://"));
        assert!(config_error("s3://").contains("bucket"));
        assert!(config_error("s3:///prefix").contains("bucket"));
        assert!(config_error("s3://bucket/p?region=x").contains("query"));
    }
}
