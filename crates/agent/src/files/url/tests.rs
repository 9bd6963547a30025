use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// Serves `reply` (a whole HTTP response) to every connection on a loopback port.
async fn serve(reply: &'static str) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let _ = stream.write_all(reply.as_bytes()).await;
        }
    });
    port
}

const HELLO: &str = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";

fn allowing() -> InputPolicy {
    InputPolicy { allow_local_urls: true, ..InputPolicy::default() }
}

async fn body(chunks: Chunks) -> Vec<u8> {
    let parts: Vec<_> = chunks.collect().await;
    parts.into_iter().flat_map(|c| c.unwrap().to_vec()).collect()
}

#[test]
fn local_addresses_are_recognised() {
    for local in
        ["127.0.0.1", "127.8.9.10", "::1", "169.254.169.254", "fe80::1", "0.0.0.0", "::", "::ffff:127.0.0.1"]
    {
        assert!(is_local(local.parse().unwrap()), "{local}");
    }
    for remote in ["8.8.8.8", "10.0.0.1", "2001:db8::1", "fec0::1", "::ffff:8.8.8.8"] {
        assert!(!is_local(remote.parse().unwrap()), "{remote}");
    }
}

#[tokio::test]
async fn a_url_aimed_at_the_nodes_loopback_is_refused_unless_allowed() {
    let port = serve(HELLO).await;
    for url in [
        format!("http://127.0.0.1:{port}/x"),
        format!("http://localhost:{port}/x"),
        format!("http://[::1]:{port}/x"),
        format!("http://[::ffff:127.0.0.1]:{port}/x"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
    ] {
        match fetch(&url, &InputPolicy::default()).await {
            Err(UrlError::Forbidden(f)) => {
                assert!(is_local(f.addr), "{url}: {f}");
                assert!(f.to_string().contains("--allow-local-urls"), "{f}");
            }
            Err(other) => panic!("{url}: refused for another reason: {other}"),
            Ok(_) => panic!("{url}: fetched"),
        }
    }
    let got = body(fetch(&format!("http://127.0.0.1:{port}/x"), &allowing()).await.unwrap()).await;
    assert_eq!(got, b"hello");
    let got = body(fetch(&format!("http://localhost:{port}/x"), &allowing()).await.unwrap()).await;
    assert_eq!(got, b"hello");
}

#[tokio::test]
async fn downloads_are_capped_and_timed() {
    let port = serve(HELLO).await;
    let small = InputPolicy { max_bytes: 4, ..allowing() };
    let err = fetch(&format!("http://127.0.0.1:{port}/x"), &small).await.err();
    assert!(matches!(err, Some(UrlError::Transfer(TransferError::TooLarge { limit: 4 }))), "{err:?}");
    // Headers that never come: the total timeout ends the request.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let _held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            open.push(stream);
        }
    });
    let quick = InputPolicy { url_timeout: Duration::from_millis(300), ..allowing() };
    let err = fetch(&format!("http://127.0.0.1:{port}/x"), &quick).await.err();
    assert!(matches!(&err, Some(UrlError::Http(m)) if m.contains("timed out")), "{err:?}");
    let err = fetch("ftp://example.com/x", &allowing()).await.err();
    assert!(matches!(err, Some(UrlError::NotHttp { .. })), "{err:?}");
}

#[tokio::test]
async fn error_statuses_fail() {
    let port = serve("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
    let err = fetch(&format!("http://127.0.0.1:{port}/x"), &allowing()).await.err();
    assert!(matches!(err, Some(UrlError::Status(404))), "{err:?}");
}
