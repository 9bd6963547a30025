//! Clients: how to trust a server ([`Trust`]), and tonic channels over TLS ([`channel`]).

use std::error::Error as StdError;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use http::uri::Scheme;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tonic::transport::{Channel, Endpoint};
use tower::ServiceExt;

use crate::identity::parse_certs;
use crate::{TlsError, fingerprint, provider};

/// What hyper-rustls and tower connectors fail with.
type BoxError = Box<dyn StdError + Send + Sync>;

/// HTTP/2 PING interval on idle and busy connections alike: finds a dead server (or a NAT that
/// dropped the mapping) long before TCP would.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// A connection whose PING is not answered within this is closed.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// How a client decides to trust a server.
#[derive(Clone, Debug)]
pub enum Trust {
    /// Certificates of a CA (PEM, one or more certs) that must have issued the server's
    /// certificate.
    CaPem(Vec<u8>),
    /// The SHA-256 fingerprint (64 hex chars) of the CA certificate, as pinned in a join token:
    /// the server must send that CA in its chain, and the leaf must verify against it (hostname
    /// included).
    Fingerprint(String),
}

impl Trust {
    /// Reads `--ca`: a PEM file path, or `sha256:<64 hex>` (a pinned fingerprint). Errors say
    /// which is wrong.
    ///
    /// The fingerprint may be upper or lower case, and colon-separated as OpenSSL prints it.
    pub fn parse(arg: &str) -> Result<Trust, TlsError> {
        let arg = arg.trim();
        if arg.is_empty() {
            return Err(TlsError::BadFingerprint(String::new()));
        }
        if let Some(hex) = strip_prefix_ignore_case(arg, "sha256:") {
            return normalize_fingerprint(hex)
                .map(Trust::Fingerprint)
                .ok_or_else(|| TlsError::BadFingerprint(arg.to_owned()));
        }
        let path = Path::new(arg);
        match std::fs::read(path) {
            Ok(pem) => {
                parse_certs(&pem, &format!("CA file {}", path.display()))?;
                Ok(Trust::CaPem(pem))
            }
            // A bare fingerprint is a likelier meaning than a missing file of that name.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && normalize_fingerprint(arg).is_some() => {
                Err(TlsError::BadFingerprint(arg.to_owned()))
            }
            Err(source) => Err(TlsError::Io { path: path.to_path_buf(), source }),
        }
    }
}

/// rustls client config (ALPN h2) for a trust.
pub fn client_config(trust: &Trust) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = match trust {
        Trust::CaPem(pem) => {
            let mut roots = RootCertStore::empty();
            for cert in parse_certs(pem, "CA certificates")? {
                roots.add(cert).map_err(|e| TlsError::Pem {
                    what: "CA certificates".into(),
                    detail: format!("not a usable CA certificate: {e}"),
                })?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Fingerprint(pin) => {
            let pin = normalize_fingerprint(pin).ok_or_else(|| TlsError::BadFingerprint(pin.clone()))?;
            let verifier = PinnedCaVerifier { pin, provider: provider() };
            builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A tonic Channel to `url`.
///
/// `http://` connects in plain text, to loopback addresses only; `https://` needs `trust` (else [`TlsError::NoTrust`]) and
/// connects through a hyper-rustls connector built from [`client_config`], HTTP/2 only.
/// `connect_timeout` bounds TCP connect plus TLS handshake. TCP_NODELAY is on, and HTTP/2
/// keepalive PINGs every 10 s (even while idle) close a connection unanswered for 20 s.
/// Connects eagerly, so an unreachable server or a CA mismatch fails here, with a clear error.
/// (An `http://` URL to a TLS server shows only at the first request: plain HTTP/2 needs no
/// answer from the server to connect.)
pub async fn channel(
    url: &str,
    trust: Option<&Trust>,
    connect_timeout: Duration,
) -> Result<Channel, TlsError> {
    let invalid = |detail: &str| TlsError::InvalidUrl { url: url.to_owned(), detail: detail.into() };
    let uri: Uri = url.parse().map_err(|e: http::uri::InvalidUri| invalid(&e.to_string()))?;
    let authority = uri.authority().cloned().ok_or_else(|| invalid("no host in it"))?;
    let endpoint = |uri: Uri| {
        Endpoint::from(uri)
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
    };
    let connected = match uri.scheme_str() {
        // Credentials never cross a network in plain text: a server off this machine always
        // has TLS (it refuses to listen otherwise), so `http://` to one is a mistake.
        Some("http") if !crate::url_is_loopback(url) => {
            return Err(invalid("plain text is for loopback addresses only; use https:// and --ca"));
        }
        Some("http") => endpoint(uri).connect().await,
        Some("https") => {
            let trust = trust.ok_or_else(|| TlsError::NoTrust { url: url.to_owned() })?;
            let mut config = client_config(trust)?;
            // hyper-rustls sets ALPN itself (h2, from `enable_http2`) and panics if it is set.
            config.alpn_protocols.clear();
            let mut http = HttpConnector::new();
            // The URIs it sees say https; hyper-rustls does the TLS on top.
            http.enforce_http(false);
            http.set_nodelay(true);
            http.set_connect_timeout(Some(connect_timeout));
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(config)
                .https_only()
                .enable_http2()
                .wrap_connector(http);
            // tonic is given an http:// endpoint (with an https:// origin, which is what
            // requests carry) and a connector that puts https back for hyper-rustls. Handing
            // tonic the https:// URI would work only while tonic's own TLS features are off:
            // with any of them on (a feature another crate in the build may enable), tonic
            // insists on doing TLS itself and refuses an https endpoint without its config.
            let connector = tower::service_fn(move |uri: Uri| {
                let https = https.clone();
                async move { https.oneshot(with_scheme(uri, Scheme::HTTPS)?).await }
            });
            let transport = with_scheme(uri, Scheme::HTTP).map_err(|e| invalid(&e.to_string()))?;
            let origin = Uri::builder()
                .scheme(Scheme::HTTPS)
                .authority(authority)
                .path_and_query("/")
                .build()
                .map_err(|e| invalid(&e.to_string()))?;
            endpoint(transport).origin(origin).connect_with_connector(connector).await
        }
        _ => return Err(invalid("use http:// or https://")),
    };
    connected.map_err(|e| TlsError::Connect {
        url: url.to_owned(),
        detail: describe_connect_error(&e, connect_timeout),
    })
}

/// `uri` with its scheme replaced.
fn with_scheme(uri: Uri, scheme: Scheme) -> Result<Uri, BoxError> {
    let mut parts = uri.into_parts();
    parts.scheme = Some(scheme);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    Ok(Uri::from_parts(parts)?)
}

/// Verifies a server against a pinned CA fingerprint.
///
/// The pin names a CA, not a server certificate, so the server's leaf can be reissued (new
/// names, renewal) without touching join tokens. The server sends its CA after the leaf; the
/// verifier picks the sent certificate with the pinned fingerprint and verifies the leaf
/// against it as the only trust anchor, with the usual checks (signature, validity, host name).
/// A certificate that merely claims to be the CA cannot pass: its fingerprint would differ.
#[derive(Debug)]
struct PinnedCaVerifier {
    /// Lowercase hex SHA-256 of the CA certificate.
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|cert| fingerprint(cert) == self.pin) else {
            return Err(rustls::Error::General(format!(
                "the server did not present the pinned CA sha256:{}: it is not the server the \
                 join token or --ca was made for, or it uses another CA",
                self.pin
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned()).map_err(|e| match e {
            rustls::Error::InvalidCertificate(_) => e,
            other => rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(other),
            ))),
        })?;
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(format!("cannot verify against the pinned CA: {e}")))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The fingerprint as 64 lowercase hex characters, if `s` is one (any case, colons allowed).
fn normalize_fingerprint(s: &str) -> Option<String> {
    let hex: String = s.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &s[prefix.len()..])
}

/// One line saying why a connection failed, with a hint when the cause is a known one.
///
/// tonic's error says only "transport error"; the cause is down its source chain, partly inside
/// `io::Error`s (whose `source()` skips the error they wrap, so those are opened by hand).
fn describe_connect_error(err: &tonic::transport::Error, timeout: Duration) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut hint = None;
    visit_chain(err, &mut |e| {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            hint = hint.take().or_else(|| tls_hint(tls));
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            hint = hint.take().or_else(|| {
                Some(format!("no connection within {timeout:?}: is the server up and reachable?"))
            });
        }
        // rustls prefixes errors from custom verifiers with this; the message says it all.
        let msg = e.to_string().replace("unexpected error: ", "");
        if msg != "transport error" && !msg.is_empty() {
            parts.push(msg);
        }
    });
    // Wrappers often repeat the error they wrap; keep only messages not contained in another.
    let mut kept: Vec<&String> = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let repeated = parts
            .iter()
            .enumerate()
            .any(|(j, other)| j != i && other.contains(part.as_str()) && (other != part || j < i));
        if !repeated {
            kept.push(part);
        }
    }
    let mut detail = kept.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(": ");
    if detail.is_empty() {
        detail = err.to_string();
    }
    match hint {
        Some(hint) => format!("{detail} ({hint})"),
        None => detail,
    }
}

/// Calls `f` on `err` and every error under it, including those inside `io::Error`s.
fn visit_chain<'a>(err: &'a (dyn StdError + 'static), f: &mut dyn FnMut(&'a (dyn StdError + 'static))) {
    f(err);
    if let Some(io) = err.downcast_ref::<std::io::Error>()
        && let Some(inner) = io.get_ref()
    {
        visit_chain(inner, f);
        return;
    }
    if let Some(source) = err.source() {
        visit_chain(source, f);
    }
}

/// What to do about a TLS failure, for the ones with a likely cause.
fn tls_hint(err: &rustls::Error) -> Option<String> {
    use rustls::Error::{InvalidCertificate, InvalidMessage};
    let hint = match err {
        InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature) => {
            "the server's certificate was not issued by the CA given with --ca; give this \
             server's CA"
        }
        InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => {
            "the server's certificate does not cover the host in the URL; connect by a name or \
             address it was issued for, or have the server issue one for this name"
        }
        InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => "the server's certificate is out of its validity period, or this machine's clock is wrong",
        InvalidMessage(_) => "the server may not be serving TLS; try http://",
        _ => return None,
    };
    Some(hint.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_normalize() {
        let lower = "ab".repeat(32);
        assert_eq!(normalize_fingerprint(&lower), Some(lower.clone()));
        assert_eq!(normalize_fingerprint(&"AB".repeat(32)), Some(lower.clone()));
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(normalize_fingerprint(&colons), Some(lower));
        assert_eq!(normalize_fingerprint(&"ab".repeat(31)), None);
        assert_eq!(normalize_fingerprint(&"zz".repeat(32)), None);
    }
}
