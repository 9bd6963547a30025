//! The crate's error type.

use std::path::PathBuf;

/// What can go wrong setting up or using TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate, key or directory could not be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("invalid PEM in {what}: {detail}")]
    Pem {
        /// Which input, e.g. "certificate file /etc/drover/server.pem".
        what: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A certificate could not be made, or a certificate and key cannot be used together.
    #[error("certificate error: {0}")]
    Certificate(String),
    /// A pinned CA fingerprint is not `sha256:` followed by 64 hex characters.
    #[error(
        "bad CA fingerprint {0:?}: give sha256: followed by the 64 hex characters of the CA \
         certificate's SHA-256 (as printed by the server), or the path of a PEM file"
    )]
    BadFingerprint(String),
    /// An `https://` URL was given without a way to trust the server.
    #[error(
        "{url} uses TLS but no CA to trust was given: pass --ca FILE (the server's ca.pem) or \
         --ca sha256:<fingerprint> (the CA fingerprint the server prints and join tokens carry)"
    )]
    NoTrust {
        /// The server URL.
        url: String,
    },
    /// A server URL cannot be used.
    #[error("invalid server URL {url:?}: {detail}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        detail: String,
    },
    /// Connecting to a server failed (TCP, the TLS handshake, or HTTP/2 setup).
    #[error("cannot connect to {url}: {detail}")]
    Connect {
        /// The server URL.
        url: String,
        /// The cause, with a hint when one is known.
        detail: String,
    },
    /// rustls refused a configuration (e.g. no protocol version shared with the crypto provider).
    #[error("TLS configuration error: {0}")]
    Config(String),
}

impl TlsError {
    /// An [`TlsError::Io`] for `path`, for use with `map_err`.
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TlsError {
        let path = path.into();
        move |source| TlsError::Io { path, source }
    }
}
