//! TLS for Drover's listeners and clients.
//!
//! The server either makes its own CA ([`ensure_server_identity`], certificates kept in a
//! directory and reused across restarts) or uses a certificate chain the operator gives
//! ([`load_server_identity`]). [`server_config`] turns either into a rustls config, which
//! [`incoming`] (gRPC, for tonic) and [`Listener`] (HTTP, for axum) use to accept connections.
//!
//! Clients trust a server through a [`Trust`]: a CA certificate file, or the SHA-256 fingerprint
//! of the server-made CA as carried by a join token. [`channel`] opens a tonic channel with it.
//!
//! Only rustls' `ring` crypto provider is compiled in, and every config here names it
//! explicitly, so nothing in this crate depends on a process-wide default. Call
//! [`install_crypto_provider`] at the start of `main` anyway: other rustls users in the process
//! (or a future dependency) may look the default up, and rustls panics when it cannot pick one.

#![warn(missing_docs)]

mod client;
mod error;
mod identity;
mod server;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, LazyLock};

use sha2::{Digest, Sha256};

pub use client::{Trust, channel, client_config};
pub use error::TlsError;
pub use identity::{ServerIdentity, ensure_server_identity, load_server_identity};
pub use server::{Listener, ServerIo, incoming, server_config};

/// Writes a secret (a key, a credential) to `path`, readable by its owner only from the moment
/// it exists, replacing an old file whole; creates missing parent directories (mode 0700).
pub fn write_private_file(path: &std::path::Path, contents: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(dir)?;
    }
    write_atomic(path, contents, 0o600).map_err(|(_, e)| e)
}

/// Writes `contents` to `path` with `mode`, atomically: through a fresh temporary file (so the
/// mode applies from creation; a leftover from a crash is removed first, since `mode` does not
/// apply to a file that already exists) that is synced and renamed over `path`. An error names
/// the file it is about.
pub(crate) fn write_atomic(
    path: &std::path::Path,
    contents: &[u8],
    mode: u32,
) -> Result<(), (std::path::PathBuf, std::io::Error)> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp_name);
    let at = |p: &std::path::Path| {
        let p = p.to_path_buf();
        move |e| (p, e)
    };
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err((tmp, e)),
    }
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(at(&tmp))?;
    file.write_all(contents).map_err(at(&tmp))?;
    file.sync_all().map_err(at(&tmp))?;
    std::fs::rename(&tmp, path).map_err(at(path))
}

/// Installs ring as rustls' process-wide crypto provider; idempotent, safe to call many times.
pub fn install_crypto_provider() {
    // `install_default` fails when a provider is already installed: by an earlier call (fine),
    // or by someone else, in which case theirs stays and ours still works, since every config
    // made here names the ring provider explicitly.
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// The ring provider every config in this crate is built with.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: LazyLock<Arc<rustls::crypto::CryptoProvider>> =
        LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));
    PROVIDER.clone()
}

/// Hex SHA-256 (64 lowercase hex chars) of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Whether a socket address is loopback (127.0.0.0/8, ::1).
pub fn is_loopback(addr: &SocketAddr) -> bool {
    // `to_canonical` maps ::ffff:127.0.0.1 (a v4 client on a dual-stack socket) to 127.0.0.1.
    addr.ip().to_canonical().is_loopback()
}

/// Whether a URL's host is loopback (127.x, ::1, localhost).
pub fn url_is_loopback(url: &str) -> bool {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return false;
    };
    let Some(host) = uri.host() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<IpAddr>() {
        Ok(ip) => ip.to_canonical().is_loopback(),
        Err(_) => {
            let host = host.strip_suffix('.').unwrap_or(host);
            host.eq_ignore_ascii_case("localhost")
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn private_files_are_private_and_replaced_whole() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/secret");
        super::write_private_file(&path, b"one").unwrap();
        super::write_private_file(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1, "no temporary file left");
    }

    use super::*;

    #[test]
    fn fingerprint_is_lowercase_hex_sha256() {
        let fp = fingerprint(b"abc");
        assert_eq!(fp, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn loopback_addresses() {
        assert!(is_loopback(&"127.0.0.1:1".parse().unwrap()));
        assert!(is_loopback(&"127.3.2.1:1".parse().unwrap()));
        assert!(is_loopback(&"[::1]:1".parse().unwrap()));
        assert!(is_loopback(&"[::ffff:127.0.0.1]:1".parse().unwrap()));
        assert!(!is_loopback(&"10.0.0.1:1".parse().unwrap()));
        assert!(!is_loopback(&"[::]:1".parse().unwrap()));
    }

    #[test]
    fn loopback_urls() {
        assert!(url_is_loopback("http://127.0.0.1:7070"));
        assert!(url_is_loopback("https://127.9.9.9"));
        assert!(url_is_loopback("https://[::1]:7070/x"));
        assert!(url_is_loopback("http://localhost:1"));
        assert!(url_is_loopback("http://LOCALHOST."));
        assert!(!url_is_loopback("https://drover.example:7070"));
        assert!(!url_is_loopback("https://localhost.example"));
        assert!(!url_is_loopback("https://10.1.2.3"));
        assert!(!url_is_loopback("not a url"));
    }

    #[test]
    fn installing_the_provider_twice_is_fine() {
        install_crypto_provider();
        install_crypto_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }
}
