//! Server certificates: a CA the server makes and keeps itself, or a chain the operator gives.
//!
//! The server-made CA lives in one directory:
//!
//! | file         | mode | what                                             |
//! | ------------ | ---- | ------------------------------------------------ |
//! | `ca.pem`     | 0644 | the CA certificate (what clients trust or pin)   |
//! | `ca.key`     | 0600 | the CA's private key                             |
//! | `server.pem` | 0644 | the server's leaf certificate, then the CA       |
//! | `server.key` | 0600 | the leaf's private key                           |
//!
//! The CA is made once and never replaced by this code: join tokens pin its fingerprint, so a
//! new CA would cut off every agent. The leaf is cheap and is reissued whenever it no longer
//! covers the names clients use (the listen address changed) or is close to expiring.
//!
//! Each file is written to a temporary name and renamed into place, keys before certificates,
//! so a crash leaves either the old file or the new one. `ca.pem` is the mark that a CA exists:
//! a `ca.key` without it is a leftover of an interrupted first run and is replaced.

use std::fs::{self, DirBuilder};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::{TlsError, fingerprint, provider};

/// The CA certificate's common name. Leaves name their issuer by it, and a leaf is issued from
/// `ca.key` plus these parameters rather than from a parsed `ca.pem`: changing it would make
/// new leaves fail to chain to CAs made before (which [`issue_leaf`] checks and reports).
const CA_COMMON_NAME: &str = "drover server CA";
/// The leaf's common name; clients check the subject alternative names, not this.
const LEAF_COMMON_NAME: &str = "drover server";
/// How long the CA is valid. Long, because replacing it means re-enrolling every agent.
const CA_VALIDITY: time::Duration = time::Duration::days(3650);
/// How long a leaf is valid.
const LEAF_VALIDITY: time::Duration = time::Duration::days(365);
/// Certificates start this far in the past, so a client whose clock is a little behind the
/// server's does not see a not-yet-valid certificate.
const BACKDATE: time::Duration = time::Duration::hours(1);
/// A leaf that expires within this is reissued at the next start.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// A server's certificate chain and key (PEM), and its CA.
#[derive(Clone)]
pub struct ServerIdentity {
    /// The certificate chain, leaf first, then the CA (or the chain as the operator gave it).
    pub cert_chain_pem: String,
    /// The leaf's private key.
    pub key_pem: String,
    /// The CA certificate clients should trust: the server-made CA, or the last certificate of
    /// an operator-given chain of two or more (None for a lone certificate).
    pub ca_pem: Option<String>,
    /// [`fingerprint`] of `ca_pem`'s certificate, as pinned in join tokens.
    pub ca_fingerprint: Option<String>,
}

impl std::fmt::Debug for ServerIdentity {
    // By hand, so that logging an identity never prints its private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("cert_chain_pem", &self.cert_chain_pem)
            .field("key_pem", &"<redacted>")
            .field("ca_pem", &self.ca_pem)
            .field("ca_fingerprint", &self.ca_fingerprint)
            .finish()
    }
}

/// The server-made CA and certificate in `dir` (created 0700 if missing): on first call creates
/// `ca.pem`, `ca.key` (0600), `server.pem` (leaf + CA chain), `server.key` (0600); later calls
/// reuse them.
///
/// When the existing leaf does not cover every name in `names` (DNS names or IP literals; e.g.
/// the listen address changed), or expires within 30 days, a new leaf is issued by the same CA
/// (the CA and its fingerprint never change). Returns the identity and whether the CA was
/// created now.
pub fn ensure_server_identity(dir: &Path, names: &[String]) -> Result<(ServerIdentity, bool), TlsError> {
    let names = normalize_names(names)?;
    DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(TlsError::io(dir))?;

    let (ca, created) = ensure_ca(dir)?;
    let ca_der = CertificateDer::from_pem_slice(ca.pem.as_bytes())
        .map_err(|e| pem_error(&dir.join("ca.pem"), "certificate", e))?;

    let (leaf_pem, leaf_key_pem) = match existing_leaf(dir, &ca_der, &names)? {
        Some(leaf) => leaf,
        None => {
            let (leaf_pem, leaf_key_pem) = issue_leaf(&ca, &ca_der, &names)?;
            write_file(&dir.join("server.key"), leaf_key_pem.as_bytes(), 0o600)?;
            write_file(&dir.join("server.pem"), format!("{leaf_pem}{}", ca.pem).as_bytes(), 0o644)?;
            tracing::info!(dir = %dir.display(), ?names, "issued a new server certificate");
            (leaf_pem, leaf_key_pem)
        }
    };

    let identity = ServerIdentity {
        cert_chain_pem: format!("{leaf_pem}{}", ca.pem),
        key_pem: leaf_key_pem,
        ca_fingerprint: Some(fingerprint(&ca_der)),
        ca_pem: Some(ca.pem),
    };
    Ok((identity, created))
}

/// A user-given certificate chain and key (PEM files).
///
/// The chain is the leaf first, then any intermediates and CA; its last certificate becomes
/// [`ServerIdentity::ca_pem`] when there are two or more. Fails when the key does not belong to
/// the leaf.
pub fn load_server_identity(cert: &Path, key: &Path) -> Result<ServerIdentity, TlsError> {
    let cert_pem = fs::read_to_string(cert).map_err(TlsError::io(cert))?;
    let key_pem = fs::read_to_string(key).map_err(TlsError::io(key))?;
    let chain = parse_certs(cert_pem.as_bytes(), &format!("certificate file {}", cert.display()))?;
    PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| pem_error(key, "private key", e))?;

    let ca = match chain.as_slice() {
        [_, .., last] => Some(last),
        _ => None,
    };
    let identity = ServerIdentity {
        ca_pem: ca.map(|der| der_to_pem(der)),
        ca_fingerprint: ca.map(|der| fingerprint(der)),
        cert_chain_pem: cert_pem,
        key_pem,
    };
    // Building the config checks that the key matches the leaf, so a mismatch is reported
    // here, naming the files, rather than as failed handshakes later.
    crate::server_config(&identity).map_err(|e| {
        TlsError::Certificate(format!("cannot use {} with {}: {e}", cert.display(), key.display()))
    })?;
    Ok(identity)
}

/// The CA's certificate (PEM) and key pair.
struct Ca {
    pem: String,
    key: KeyPair,
}

/// Loads the CA from `dir`, or makes one. Returns it and whether it was made now.
fn ensure_ca(dir: &Path) -> Result<(Ca, bool), TlsError> {
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca.key");
    match fs::read_to_string(&cert_path) {
        Ok(pem) => {
            let key_pem = fs::read_to_string(&key_path).map_err(|source| {
                if source.kind() == std::io::ErrorKind::NotFound {
                    TlsError::Certificate(format!(
                        "{} exists but {} does not: restore the CA key from a backup, or remove \
                         the directory to make a new CA (agents then need new join tokens)",
                        cert_path.display(),
                        key_path.display()
                    ))
                } else {
                    TlsError::Io { path: key_path.clone(), source }
                }
            })?;
            warn_if_readable_by_others(&key_path);
            let key = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::Pem {
                what: format!("CA key {}", key_path.display()),
                detail: e.to_string(),
            })?;
            Ok((Ca { pem, key }, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = KeyPair::generate().map_err(cert_error("generate the CA key"))?;
            let mut params = ca_params();
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - BACKDATE;
            params.not_after = now + CA_VALIDITY;
            let cert = params.self_signed(&key).map_err(cert_error("make the CA certificate"))?;
            let pem = cert.pem();
            write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
            write_file(&cert_path, pem.as_bytes(), 0o644)?;
            tracing::info!(
                dir = %dir.display(),
                fingerprint = %fingerprint(cert.der()),
                "made a new server CA"
            );
            Ok((Ca { pem, key }, true))
        }
        Err(source) => Err(TlsError::Io { path: cert_path, source }),
    }
}

/// The CA's parameters, apart from validity. Used to make the CA and, with its key, as the
/// issuer of leaves (see [`CA_COMMON_NAME`]).
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, CA_COMMON_NAME);
    // Path length 0: this CA signs server certificates directly, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params
}

/// The leaf in `dir` (certificate PEM, key PEM) when it can be kept: it parses, its key
/// matches, it was issued by `ca_der`, it covers every name and does not expire soon.
/// Anything else means "issue a new one", so problems are logged, not returned.
fn existing_leaf(
    dir: &Path,
    ca_der: &CertificateDer<'static>,
    names: &[String],
) -> Result<Option<(String, String)>, TlsError> {
    let chain_path = dir.join("server.pem");
    let key_path = dir.join("server.key");
    let (chain_pem, key_pem) = match (fs::read_to_string(&chain_path), fs::read_to_string(&key_path)) {
        (Ok(chain), Ok(key)) => (chain, key),
        (Err(e), _) | (_, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        (Err(source), _) => return Err(TlsError::Io { path: chain_path, source }),
        (_, Err(source)) => return Err(TlsError::Io { path: key_path, source }),
    };
    warn_if_readable_by_others(&key_path);

    let Some(Ok(leaf)) = CertificateDer::pem_slice_iter(chain_pem.as_bytes()).next() else {
        tracing::warn!(path = %chain_path.display(), "unreadable server certificate; issuing a new one");
        return Ok(None);
    };
    let leaf_pem = der_to_pem(&leaf);
    let identity = ServerIdentity {
        cert_chain_pem: chain_pem,
        key_pem: key_pem.clone(),
        ca_pem: None,
        ca_fingerprint: None,
    };
    if let Err(e) = crate::server_config(&identity) {
        tracing::warn!(path = %chain_path.display(), error = %e, "unusable server certificate; issuing a new one");
        return Ok(None);
    }
    let renew_at = UnixTime::since_unix_epoch(unix_now() + RENEW_BEFORE);
    match verify_leaf(&leaf, ca_der, names, renew_at) {
        Ok(()) => Ok(Some((leaf_pem, key_pem))),
        Err(reason) => {
            tracing::info!(path = %chain_path.display(), %reason, "server certificate needs reissuing");
            Ok(None)
        }
    }
}

/// A new leaf for `names`, signed by the CA: (certificate PEM, key PEM).
fn issue_leaf(
    ca: &Ca,
    ca_der: &CertificateDer<'static>,
    names: &[String],
) -> Result<(String, String), TlsError> {
    let key = KeyPair::generate().map_err(cert_error("generate the server key"))?;
    let mut params = CertificateParams::new(names.to_vec()).map_err(cert_error("use the server names"))?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, LEAF_COMMON_NAME);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + LEAF_VALIDITY;

    let ca_params = ca_params();
    let issuer = Issuer::from_params(&ca_params, &ca.key);
    let cert = params.signed_by(&key, &issuer).map_err(cert_error("sign the server certificate"))?;

    // The issuer is rebuilt from parameters, not parsed from ca.pem; make sure the result
    // really chains to the CA on disk before anyone is handed it.
    let now = UnixTime::since_unix_epoch(unix_now());
    verify_leaf(cert.der(), ca_der, names, now).map_err(|reason| {
        TlsError::Certificate(format!(
            "a newly issued server certificate does not verify against the CA ({reason}): \
             ca.key does not belong to ca.pem, or the CA was made by an incompatible version; \
             restore the pair, or remove the directory to make a new CA (agents then need new \
             join tokens)"
        ))
    })?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Checks that `leaf` chains to `ca_der` and is valid for every name at `at`.
fn verify_leaf(
    leaf: &CertificateDer<'_>,
    ca_der: &CertificateDer<'static>,
    names: &[String],
    at: UnixTime,
) -> Result<(), String> {
    let mut roots = RootCertStore::empty();
    roots.add(ca_der.clone()).map_err(|e| format!("unusable CA certificate: {e}"))?;
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| e.to_string())?;
    for name in names {
        let server_name = probe_name(name).map_err(|e| format!("{name}: {e}"))?;
        verifier.verify_server_cert(leaf, &[], &server_name, &[], at).map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(())
}

/// The name to check a certificate against for `name`. A wildcard (`*.example.com`) is not a
/// name a client can connect to, so it is checked through a host it covers.
fn probe_name(name: &str) -> Result<ServerName<'static>, String> {
    let probe = match name.strip_prefix("*.") {
        Some(rest) => format!("wildcard-probe.{rest}"),
        None => name.to_owned(),
    };
    ServerName::try_from(probe).map_err(|e| e.to_string())
}

/// Trims names, drops duplicates, unwraps bracketed IPv6 literals, and checks there is one.
fn normalize_names(names: &[String]) -> Result<Vec<String>, TlsError> {
    let mut out: Vec<String> = Vec::new();
    for name in names {
        let name = name.trim();
        let name = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')).unwrap_or(name);
        if name.is_empty() {
            continue;
        }
        probe_name(name)
            .map_err(|e| TlsError::Certificate(format!("cannot put {name:?} in a certificate: {e}")))?;
        if !out.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            out.push(name.to_owned());
        }
    }
    if out.is_empty() {
        return Err(TlsError::Certificate(
            "no names for the server certificate: give the host names or IP addresses clients \
             connect to"
                .into(),
        ));
    }
    Ok(out)
}

/// Writes `contents` to `path` with `mode`, atomically (see [`crate::write_atomic`]).
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    crate::write_atomic(path, contents, mode).map_err(|(p, source)| TlsError::Io { path: p, source })
}

/// Logs a warning when a key file can be read by others than its owner.
fn warn_if_readable_by_others(path: &Path) {
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "private key is accessible to other users; chmod 600 it"
        );
    }
}

/// All certificates in PEM `bytes`; at least one.
pub(crate) fn parse_certs(bytes: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { what: what.to_owned(), detail: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { what: what.to_owned(), detail: "no CERTIFICATE block found".into() });
    }
    Ok(certs)
}

/// A DER certificate as PEM (64-column base64, as OpenSSL writes it).
fn der_to_pem(der: &CertificateDer<'_>) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    let mut rest = b64.as_str();
    while !rest.is_empty() {
        // base64 is ASCII, so any byte offset is a char boundary.
        let (line, tail) = rest.split_at(rest.len().min(64));
        out.push_str(line);
        out.push('\n');
        rest = tail;
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// A [`TlsError::Pem`] for a file.
fn pem_error(path: &Path, kind: &str, e: rustls_pki_types::pem::Error) -> TlsError {
    TlsError::Pem { what: format!("{kind} file {}", path.display()), detail: e.to_string() }
}

/// Maps an rcgen error to [`TlsError::Certificate`], saying what was being done.
fn cert_error(doing: &'static str) -> impl Fn(rcgen::Error) -> TlsError {
    move |e| TlsError::Certificate(format!("cannot {doing}: {e}"))
}

/// Time since the Unix epoch; zero if the clock is before it.
fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}
