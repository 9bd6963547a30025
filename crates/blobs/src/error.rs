//! The blob store's error type and its kinds.

use std::io;
use std::path::PathBuf;

use crate::Digest;

/// Boxed error from a storage backend library.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything a blob store operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// No blob with this digest is stored.
    #[error("blob {digest} not found; upload it first or check the digest")]
    NotFound {
        /// The digest that was asked for.
        digest: Digest,
    },
    /// The uploaded content does not hash to the digest the caller announced; nothing was stored.
    #[error(
        "uploaded content has digest {actual} but {expected} was expected; nothing was stored, upload the right content or fix the expected digest"
    )]
    DigestMismatch {
        /// The digest the caller announced.
        expected: Digest,
        /// The digest of the bytes actually received.
        actual: Digest,
    },
    /// The stored bytes no longer hash to their digest (bit rot, tampering, a truncated write).
    #[error(
        "stored blob {digest} is corrupt: its content no longer matches its digest; delete it and upload it again"
    )]
    Corrupt {
        /// The digest the blob is stored under.
        digest: Digest,
    },
    /// The content is larger than the allowed maximum; nothing was stored.
    #[error(
        "blob is larger than the limit of {limit} bytes; nothing was stored, upload a smaller blob or raise the limit"
    )]
    TooLarge {
        /// The limit in bytes that was exceeded.
        limit: u64,
    },
    /// A digest string is malformed.
    #[error("invalid digest {input:?}: {reason}; write it as `sha256:` followed by 64 lowercase hex digits")]
    InvalidDigest {
        /// The rejected text (shortened if long).
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The storage backend (S3, ...) failed.
    #[error(
        "blob backend {backend} failed to {operation}; check the backend is reachable and the credentials are valid"
    )]
    Backend {
        /// Which backend: `s3`, `local`, `memory`.
        backend: &'static str,
        /// What was being done, e.g. `upload a part`.
        operation: &'static str,
        /// The backend library's error.
        #[source]
        source: BoxError,
    },
    /// A filesystem or stream read/write failed.
    #[error("blob i/o failed to {operation}{}; check the path, permissions and free space", path_suffix(.path))]
    Io {
        /// What was being done, e.g. `read the upload`.
        operation: &'static str,
        /// The file involved, if any.
        path: Option<PathBuf>,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The blob store URL or options are invalid.
    #[error("invalid blob store configuration: {message}")]
    Config {
        /// What is wrong and how to fix it.
        message: String,
    },
}

fn path_suffix(path: &Option<PathBuf>) -> String {
    match path {
        Some(path) => format!(" at {}", path.display()),
        None => String::new(),
    }
}

/// A small taxonomy of [`BlobError`]s, for mapping onto HTTP status and gRPC codes in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlobErrorKind {
    /// The blob does not exist (HTTP 404, gRPC `NOT_FOUND`).
    NotFound,
    /// The request was bad: wrong digest, malformed digest, too large (HTTP 400/413, gRPC
    /// `INVALID_ARGUMENT`).
    InvalidInput,
    /// Stored data is damaged (HTTP 500, gRPC `DATA_LOSS`).
    DataLoss,
    /// The backend or the disk failed; retrying may help (HTTP 503, gRPC `UNAVAILABLE`).
    Unavailable,
    /// The store is misconfigured (HTTP 500, gRPC `FAILED_PRECONDITION`).
    Config,
}

impl BlobError {
    /// The kind of this error.
    pub fn kind(&self) -> BlobErrorKind {
        match self {
            BlobError::NotFound { .. } => BlobErrorKind::NotFound,
            BlobError::DigestMismatch { .. }
            | BlobError::TooLarge { .. }
            | BlobError::InvalidDigest { .. } => BlobErrorKind::InvalidInput,
            BlobError::Corrupt { .. } => BlobErrorKind::DataLoss,
            BlobError::Backend { .. } | BlobError::Io { .. } => BlobErrorKind::Unavailable,
            BlobError::Config { .. } => BlobErrorKind::Config,
        }
    }

    /// Converts an error from reading a [`crate::BlobReader`] (or an upload stream) back into a
    /// `BlobError`: a `Corrupt` (or any other `BlobError`) carried inside the `io::Error` is
    /// returned as is, anything else becomes [`BlobError::Io`] with `operation`.
    pub fn from_io(err: io::Error, operation: &'static str) -> BlobError {
        if err.get_ref().is_some_and(|inner| inner.is::<BlobError>()) {
            match err.into_inner().map(|inner| inner.downcast::<BlobError>()) {
                Some(Ok(blob_err)) => return *blob_err,
                // Unreachable after the `is` check, but stay total rather than panic.
                Some(Err(other)) => {
                    return BlobError::Io { operation, path: None, source: io::Error::other(other) };
                }
                None => return BlobError::Io { operation, path: None, source: io::Error::other("unknown") },
            }
        }
        BlobError::Io { operation, path: None, source: err }
    }

    /// Wraps this error into an `io::Error` (kind `InvalidData` for `Corrupt`), so it can travel
    /// through `AsyncRead` and be recovered with [`BlobError::from_io`].
    pub fn into_io(self) -> io::Error {
        let kind = match self {
            BlobError::Corrupt { .. } | BlobError::DigestMismatch { .. } => io::ErrorKind::InvalidData,
            BlobError::NotFound { .. } => io::ErrorKind::NotFound,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }

    pub(crate) fn io(operation: &'static str, path: impl Into<PathBuf>, source: io::Error) -> BlobError {
        BlobError::Io { operation, path: Some(path.into()), source }
    }

    pub(crate) fn config(message: impl Into<String>) -> BlobError {
        BlobError::Config { message: message.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_survives_an_io_round_trip() {
        let digest = Digest::of(b"x");
        let err = BlobError::Corrupt { digest }.into_io();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        match BlobError::from_io(err, "read") {
            BlobError::Corrupt { digest: d } => assert_eq!(d, digest),
            other => panic!("expected corrupt, got {other:?}"),
        }
        let plain = BlobError::from_io(io::Error::other("boom"), "read the upload");
        assert!(matches!(plain, BlobError::Io { operation: "read the upload", .. }));
        assert_eq!(plain.kind(), BlobErrorKind::Unavailable);
    }

    #[test]
    fn messages_are_lowercase_without_trailing_period() {
        let digest = Digest::of(b"x");
        let errors = [
            BlobError::NotFound { digest },
            BlobError::DigestMismatch { expected: digest, actual: Digest::of(b"y") },
            BlobError::Corrupt { digest },
            BlobError::TooLarge { limit: 3 },
            BlobError::io("write a blob", "/tmp/x", io::Error::other("disk full")),
            BlobError::config("unknown scheme"),
        ];
        for err in errors {
            let msg = err.to_string();
            assert!(msg.starts_with(|c: char| c.is_lowercase()), "{msg}");
            assert!(!msg.ends_with('.'), "{msg}");
        }
    }
}
