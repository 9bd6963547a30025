//! TLS end to end over real sockets on 127.0.0.1: the server-made CA on disk, servers through
//! `Listener` (axum) and `incoming` (tonic), clients through `channel`.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::routing::get;
use axum::serve::ListenerExt;
use drover_tls::{
    Listener, ServerIdentity, TlsError, Trust, channel, client_config, ensure_server_identity, fingerprint,
    incoming, load_server_identity, server_config,
};
use futures::StreamExt;
use http_body_util::BodyExt;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::Channel;
use tonic::transport::server::TcpConnectInfo;
use tower::ServiceExt;

const TIMEOUT: Duration = Duration::from_secs(5);

fn names(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A server identity for 127.0.0.1 in a fresh directory (kept alive by the returned guard).
fn identity_for(names_: &[&str]) -> (tempfile::TempDir, ServerIdentity) {
    let dir = tempfile::tempdir().unwrap();
    let (identity, created) = ensure_server_identity(&dir.path().join("tls"), &names(names_)).unwrap();
    assert!(created);
    (dir, identity)
}

/// Serves a small router on 127.0.0.1 through `Listener`, with TLS when `identity` is given.
async fn serve_http(identity: Option<&ServerIdentity>) -> SocketAddr {
    let tls = identity.map(|id| server_config(id).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = Router::new()
        .route("/hello", get(|| async { "hello" }))
        .route("/peer", get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }));
    // tap_io: so that axum provides ConnectInfo<SocketAddr> (see `Listener`'s docs).
    let listener = Listener::new(listener, tls).tap_io(|_| ());
    tokio::spawn(async move {
        axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>()).await
    });
    addr
}

/// GETs `path` over `channel` (a generic HTTP/2 client): status and body.
async fn get_path(channel: &Channel, path: &str) -> (http::StatusCode, String) {
    let request = http::Request::builder().uri(path).body(tonic::body::Body::empty()).unwrap();
    let response = tokio::time::timeout(TIMEOUT, channel.clone().oneshot(request))
        .await
        .expect("response in time")
        .expect("response");
    let status = response.status();
    let body = response.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn ca_trust(identity: &ServerIdentity) -> Trust {
    Trust::CaPem(identity.ca_pem.clone().unwrap().into_bytes())
}

fn pin_trust(identity: &ServerIdentity) -> Trust {
    Trust::Fingerprint(identity.ca_fingerprint.clone().unwrap())
}

#[test]
fn server_identity_is_made_once_and_reissued_for_new_names() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nested").join("tls");
    let first_names = names(&["localhost", "127.0.0.1"]);

    let (first, created) = ensure_server_identity(&dir, &first_names).unwrap();
    assert!(created);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_eq!(mode(&dir.join("server.key")), 0o600);
    assert!(dir.join("ca.pem").is_file());
    assert!(dir.join("server.pem").is_file());
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    // The identity hangs together: the chain is leaf then CA, the fingerprint is the CA's.
    let ca_pem = first.ca_pem.clone().unwrap();
    let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap();
    let fp = first.ca_fingerprint.clone().unwrap();
    assert_eq!(fp, fingerprint(&ca_der));
    assert_eq!(fp.len(), 64);
    assert!(fp.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    let chain: Vec<_> =
        CertificateDer::pem_slice_iter(first.cert_chain_pem.as_bytes()).collect::<Result<_, _>>().unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1], ca_der);
    assert_eq!(std::fs::read_to_string(dir.join("ca.pem")).unwrap(), ca_pem);
    assert_eq!(std::fs::read_to_string(dir.join("server.pem")).unwrap(), first.cert_chain_pem);

    // Same names, or fewer: everything is reused.
    let (again, created) = ensure_server_identity(&dir, &first_names).unwrap();
    assert!(!created);
    assert_eq!(again.ca_fingerprint.as_deref(), Some(fp.as_str()));
    assert_eq!(again.cert_chain_pem, first.cert_chain_pem);
    assert_eq!(again.key_pem, first.key_pem);
    let (subset, _) = ensure_server_identity(&dir, &names(&["127.0.0.1"])).unwrap();
    assert_eq!(subset.cert_chain_pem, first.cert_chain_pem);

    // A new name: a new leaf from the same CA.
    let more = names(&["localhost", "127.0.0.1", "drover.example", "[::1]"]);
    let (reissued, created) = ensure_server_identity(&dir, &more).unwrap();
    assert!(!created);
    assert_eq!(reissued.ca_fingerprint.as_deref(), Some(fp.as_str()));
    assert_eq!(reissued.ca_pem.as_deref(), Some(ca_pem.as_str()));
    assert_ne!(reissued.cert_chain_pem, first.cert_chain_pem);
    assert_ne!(reissued.key_pem, first.key_pem);
    assert_eq!(mode(&dir.join("server.key")), 0o600);
    // ... which is then kept.
    let (kept, _) = ensure_server_identity(&dir, &more).unwrap();
    assert_eq!(kept.cert_chain_pem, reissued.cert_chain_pem);

    // Debug output never shows the key.
    assert!(!format!("{kept:?}").contains("PRIVATE KEY"));
}

#[test]
fn server_identity_needs_names_and_its_ca_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tls");
    let err = ensure_server_identity(&dir, &[]).unwrap_err();
    assert!(matches!(err, TlsError::Certificate(_)), "{err}");
    let err = ensure_server_identity(&dir, &names(&["bad name!"])).unwrap_err();
    assert!(matches!(err, TlsError::Certificate(_)), "{err}");

    ensure_server_identity(&dir, &names(&["127.0.0.1"])).unwrap();
    std::fs::remove_file(dir.join("ca.key")).unwrap();
    let err = ensure_server_identity(&dir, &names(&["127.0.0.1"])).unwrap_err();
    assert!(err.to_string().contains("ca.key"), "{err}");
}

#[test]
fn operator_given_identity_loads_and_checks_its_key() {
    let (tmp, made) = identity_for(&["127.0.0.1"]);
    let cert = tmp.path().join("chain.pem");
    let key = tmp.path().join("key.pem");
    std::fs::write(&cert, &made.cert_chain_pem).unwrap();
    std::fs::write(&key, &made.key_pem).unwrap();

    let loaded = load_server_identity(&cert, &key).unwrap();
    assert_eq!(loaded.ca_fingerprint, made.ca_fingerprint);
    assert_eq!(
        CertificateDer::from_pem_slice(loaded.ca_pem.unwrap().as_bytes()).unwrap(),
        CertificateDer::from_pem_slice(made.ca_pem.unwrap().as_bytes()).unwrap()
    );

    // A key that is not the leaf's.
    let (_other_tmp, other) = identity_for(&["127.0.0.1"]);
    std::fs::write(&key, &other.key_pem).unwrap();
    let err = load_server_identity(&cert, &key).unwrap_err();
    assert!(matches!(err, TlsError::Certificate(_)), "{err}");

    let err = load_server_identity(&tmp.path().join("missing.pem"), &key).unwrap_err();
    assert!(matches!(err, TlsError::Io { .. }), "{err}");
    std::fs::write(&cert, "not pem").unwrap();
    let err = load_server_identity(&cert, &key).unwrap_err();
    assert!(matches!(err, TlsError::Pem { .. }), "{err}");
}

#[tokio::test]
async fn clients_trust_by_ca_file_or_by_pinned_fingerprint() {
    let (_tmp, identity) = identity_for(&["localhost", "127.0.0.1"]);
    let addr = serve_http(Some(&identity)).await;
    let url = format!("https://{addr}");

    for trust in [ca_trust(&identity), pin_trust(&identity)] {
        let channel = channel(&url, Some(&trust), TIMEOUT).await.unwrap();
        assert_eq!(get_path(&channel, "/hello").await, (http::StatusCode::OK, "hello".into()));
        // The handler sees the client's address through the TLS listener.
        let (status, peer) = get_path(&channel, "/peer").await;
        assert_eq!(status, http::StatusCode::OK);
        let peer: SocketAddr = peer.parse().unwrap();
        assert_eq!(peer.ip(), addr.ip());
        assert_ne!(peer.port(), addr.port());
    }
}

#[tokio::test]
async fn clients_refuse_servers_they_do_not_trust() {
    let (_tmp, identity) = identity_for(&["127.0.0.1"]);
    let addr = serve_http(Some(&identity)).await;
    let url = format!("https://{addr}");

    // Another server's CA, as a file.
    let (_other_tmp, other) = identity_for(&["127.0.0.1"]);
    let err = channel(&url, Some(&ca_trust(&other)), TIMEOUT).await.unwrap_err();
    assert!(matches!(err, TlsError::Connect { .. }), "{err}");
    assert!(err.to_string().contains("not issued by the CA"), "{err}");

    // Another server's CA, pinned: the error names the fingerprint expected.
    let wrong = other.ca_fingerprint.clone().unwrap();
    let err = channel(&url, Some(&Trust::Fingerprint(wrong.clone())), TIMEOUT).await.unwrap_err();
    assert!(matches!(err, TlsError::Connect { .. }), "{err}");
    assert!(err.to_string().contains(&wrong), "{err}");

    // https without any trust.
    let err = channel(&url, None, TIMEOUT).await.unwrap_err();
    assert!(matches!(err, TlsError::NoTrust { .. }), "{err}");
    assert!(err.to_string().contains("--ca"), "{err}");

    // Plain text off loopback is refused before any connection is made (a documentation
    // address: nothing is dialed).
    let err = channel("http://192.0.2.1:7370", None, TIMEOUT).await.unwrap_err();
    assert!(err.to_string().contains("loopback"), "{err}");

    // The refused handshakes did not disturb the server.
    let channel = channel(&url, Some(&pin_trust(&identity)), TIMEOUT).await.unwrap();
    assert_eq!(get_path(&channel, "/hello").await.0, http::StatusCode::OK);
}

#[tokio::test]
async fn a_pinned_ca_still_checks_the_host_name() {
    let (_tmp, identity) = identity_for(&["drover.invalid"]);
    let addr = serve_http(Some(&identity)).await;
    let err = channel(&format!("https://{addr}"), Some(&pin_trust(&identity)), TIMEOUT).await.unwrap_err();
    assert!(matches!(err, TlsError::Connect { .. }), "{err}");
    assert!(err.to_string().contains("does not cover"), "{err}");
}

#[tokio::test]
async fn plain_http_still_works() {
    let addr = serve_http(None).await;
    let channel = channel(&format!("http://{addr}"), None, TIMEOUT).await.unwrap();
    assert_eq!(get_path(&channel, "/hello").await, (http::StatusCode::OK, "hello".into()));
}

#[tokio::test]
async fn https_to_a_plain_server_fails_clearly() {
    let addr = serve_http(None).await;
    let (_tmp, identity) = identity_for(&["127.0.0.1"]);
    let err = channel(&format!("https://{addr}"), Some(&ca_trust(&identity)), TIMEOUT).await.unwrap_err();
    assert!(matches!(err, TlsError::Connect { .. }), "{err}");
}

#[tokio::test]
async fn bad_urls_are_rejected() {
    let err = channel("ftp://127.0.0.1:1", None, TIMEOUT).await.unwrap_err();
    assert!(matches!(err, TlsError::InvalidUrl { .. }), "{err}");
    let err = channel("/just/a/path", None, TIMEOUT).await.unwrap_err();
    assert!(matches!(err, TlsError::InvalidUrl { .. }), "{err}");
}

#[tokio::test]
async fn a_silent_client_does_not_block_the_listener() {
    let (_tmp, identity) = identity_for(&["127.0.0.1"]);
    let addr = serve_http(Some(&identity)).await;
    // Connects and never sends a ClientHello.
    let _silent = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;

    let channel = tokio::time::timeout(
        TIMEOUT,
        channel(&format!("https://{addr}"), Some(&ca_trust(&identity)), TIMEOUT),
    )
    .await
    .expect("second client served while the first is silent")
    .unwrap();
    assert_eq!(get_path(&channel, "/hello").await.0, http::StatusCode::OK);
}

#[tokio::test]
async fn a_silent_client_does_not_block_incoming() {
    let (_tmp, identity) = identity_for(&["127.0.0.1"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut connections = Box::pin(incoming(listener, Some(server_config(&identity).unwrap())));

    let _silent = TcpStream::connect(addr).await.unwrap();
    let config = Arc::new(client_config(&ca_trust(&identity)).unwrap());
    let client = tokio::spawn(async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let local = tcp.local_addr().unwrap();
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.unwrap();
        (local, tls)
    });

    let io = tokio::time::timeout(TIMEOUT, connections.next())
        .await
        .expect("a connection in time")
        .expect("the stream does not end")
        .expect("no error");
    let (client_addr, _tls) = client.await.unwrap();
    assert!(io.is_tls());
    assert_eq!(io.peer_addr(), Some(client_addr));
    assert_eq!(io.local_addr(), Some(addr));
}

#[tokio::test]
async fn tonic_serves_tls_through_incoming_and_sees_the_peer() {
    let (_tmp, identity) = identity_for(&["127.0.0.1"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = server_config(&identity).unwrap();
    // tonic's ConnectInfo reaches handlers as a request extension (what `remote_addr()` reads).
    let router = Router::new().route(
        "/peer",
        get(|axum::Extension(info): axum::Extension<TcpConnectInfo>| async move {
            format!("{:?}", info.remote_addr())
        }),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(tonic::service::Routes::from(router))
            .serve_with_incoming_shutdown(incoming(listener, Some(tls)), async {
                let _ = stopped.await;
            }),
    );

    let channel = channel(&format!("https://{addr}"), Some(&pin_trust(&identity)), TIMEOUT).await.unwrap();
    let (status, peer) = get_path(&channel, "/peer").await;
    assert_eq!(status, http::StatusCode::OK);
    assert!(peer.starts_with("Some(127.0.0.1:"), "{peer}");

    drop(channel);
    let _ = stop.send(());
    tokio::time::timeout(TIMEOUT, server).await.expect("server stops").unwrap().unwrap();
}

#[test]
fn trust_parses_files_and_fingerprints() {
    let (tmp, identity) = identity_for(&["127.0.0.1"]);
    let ca_file = tmp.path().join("tls").join("ca.pem");

    match Trust::parse(ca_file.to_str().unwrap()).unwrap() {
        Trust::CaPem(pem) => assert_eq!(pem, identity.ca_pem.clone().unwrap().into_bytes()),
        other => panic!("expected a CA file, got {other:?}"),
    }
    let fp = identity.ca_fingerprint.clone().unwrap();
    for arg in [format!("sha256:{fp}"), format!("SHA256:{}", fp.to_uppercase())] {
        match Trust::parse(&arg).unwrap() {
            Trust::Fingerprint(parsed) => assert_eq!(parsed, fp),
            other => panic!("expected a fingerprint, got {other:?}"),
        }
    }

    for bad in ["sha256:", "sha256:abc", &format!("sha256:{}", "g".repeat(64)), &fp, ""] {
        let err = Trust::parse(bad).unwrap_err();
        assert!(matches!(err, TlsError::BadFingerprint(_)), "{bad:?}: {err}");
        assert!(err.to_string().contains("sha256:"), "{err}");
    }
    let err = Trust::parse(tmp.path().join("missing.pem").to_str().unwrap()).unwrap_err();
    assert!(matches!(err, TlsError::Io { .. }), "{err}");
    let not_pem = tmp.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let err = Trust::parse(not_pem.to_str().unwrap()).unwrap_err();
    assert!(matches!(err, TlsError::Pem { .. }), "{err}");

    // A fingerprint built by hand is checked too.
    let err = client_config(&Trust::Fingerprint("nope".into())).unwrap_err();
    assert!(matches!(err, TlsError::BadFingerprint(_)), "{err}");
}
