//! The egress proxy of a VM with `network: { egress: [...] }`: an HTTP proxy that connects only
//! to destinations on the task's allow-list.
//!
//! It speaks `CONNECT host:port` (HTTPS and any other TCP protocol) and absolute-URI requests
//! (`GET http://host:port/path`, plain HTTP). The destination is checked by the name the client
//! asked for, before any lookup, and the proxy itself connects to it, so a client cannot reach
//! anything else: the guest has no other way out (restricted user-mode network).

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};

/// Longest request head the proxy reads.
const MAX_HEAD: usize = 16 * 1024;

/// Destinations a task may reach: `host` (any port) or `host:port`, hosts compared without
/// regard to case.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct AllowList {
    entries: Vec<(String, Option<u16>)>,
}

impl AllowList {
    /// Parses allow-list entries as the job spec writes them (`api.example.com`, `10.0.0.1:443`,
    /// `[::1]:8080`); entries that do not parse allow nothing.
    pub(crate) fn new(entries: &[String]) -> AllowList {
        let entries = entries
            .iter()
            .filter_map(|entry| match split_host_port(entry) {
                Some((host, port)) => Some((host.to_ascii_lowercase(), Some(port))),
                None if !entry.contains(':') || entry.starts_with('[') => {
                    Some((entry.trim_matches(['[', ']']).to_ascii_lowercase(), None))
                }
                None => None,
            })
            .collect();
        AllowList { entries }
    }

    /// Whether `host:port` is on the list.
    pub(crate) fn allows(&self, host: &str, port: u16) -> bool {
        let host = host.trim_matches(['[', ']']).to_ascii_lowercase();
        self.entries.iter().any(|(h, p)| *h == host && p.is_none_or(|p| p == port))
    }
}

/// `host:port` or `[v6]:port`, the host without brackets.
fn split_host_port(text: &str) -> Option<(&str, u16)> {
    let (host, port) = match text.strip_prefix('[') {
        Some(rest) => {
            let (host, tail) = rest.split_once(']')?;
            (host, tail.strip_prefix(':')?)
        }
        None => {
            let (host, port) = text.rsplit_once(':')?;
            if host.contains(':') {
                return None;
            }
            (host, port)
        }
    };
    let port = port.parse().ok().filter(|p| *p > 0)?;
    (!host.is_empty()).then_some((host, port))
}

/// Serves proxy connections arriving on `listener` until the task is aborted.
pub(crate) async fn serve(listener: UnixListener, allow: Arc<AllowList>, attempt_id: i64) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let allow = allow.clone();
        tokio::spawn(async move {
            if let Err(error) = handle(stream, &allow, attempt_id).await {
                tracing::debug!(attempt_id, %error, "egress proxy connection ended");
            }
        });
    }
}

/// What a request asks the proxy to do.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    connect: bool,
    host: String,
    port: u16,
}

/// Parses the request line: `CONNECT host:port HTTP/1.1` or `METHOD http://host[:port]/... HTTP/1.1`.
fn parse_request(head: &str) -> Option<Request> {
    let line = head.lines().next()?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next()?, parts.next()?);
    if method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = split_host_port(target)?;
        return Some(Request { connect: true, host: host.to_owned(), port });
    }
    let rest = target.strip_prefix("http://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = match split_host_port(authority) {
        Some((host, port)) => (host.to_owned(), port),
        None => (authority.trim_matches(['[', ']']).to_owned(), 80),
    };
    (!host.is_empty()).then_some(Request { connect: false, host, port })
}

async fn handle(mut client: UnixStream, allow: &AllowList, attempt_id: i64) -> std::io::Result<()> {
    let mut head = Vec::new();
    let end = loop {
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if head.len() > MAX_HEAD {
            return reply(&mut client, "431 Request Header Fields Too Large", "request head too long").await;
        }
        let mut buffer = [0u8; 4096];
        let n = client.read(&mut buffer).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buffer[..n]);
    };
    let Some(request) = parse_request(&String::from_utf8_lossy(&head[..end])) else {
        return reply(&mut client, "400 Bad Request", "expected CONNECT host:port or an http:// URL").await;
    };
    if !allow.allows(&request.host, request.port) {
        tracing::info!(attempt_id, host = %request.host, port = request.port, "egress refused: not on the allow-list");
        let message = format!("{}:{} is not on the task's egress allow-list", request.host, request.port);
        return reply(&mut client, "403 Forbidden", &message).await;
    }
    let mut upstream = match TcpStream::connect((request.host.as_str(), request.port)).await {
        Ok(upstream) => upstream,
        Err(error) => {
            let message = format!("cannot connect to {}:{}: {error}", request.host, request.port);
            return reply(&mut client, "502 Bad Gateway", &message).await;
        }
    };
    let _ = upstream.set_nodelay(true);
    tracing::debug!(attempt_id, host = %request.host, port = request.port, "egress allowed");
    if request.connect {
        client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await?;
        upstream.write_all(&head[end..]).await?;
    } else {
        // The absolute-form request goes on as it is: HTTP/1.1 servers accept it.
        upstream.write_all(&head).await?;
    }
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await.map(|_| ())
}

async fn reply(client: &mut UnixStream, status: &str, message: &str) -> std::io::Result<()> {
    let body = format!("drover: {message}\n");
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    client.write_all(response.as_bytes()).await?;
    client.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_matches_hosts_and_ports() {
        let allow = AllowList::new(&["API.example.com".into(), "10.0.0.1:443".into(), "[::1]:8080".into()]);
        assert!(allow.allows("api.example.com", 443));
        assert!(allow.allows("api.EXAMPLE.com", 8443));
        assert!(allow.allows("10.0.0.1", 443));
        assert!(!allow.allows("10.0.0.1", 80));
        assert!(allow.allows("[::1]", 8080));
        assert!(!allow.allows("::1", 8081));
        assert!(!allow.allows("example.com", 443));
        assert!(!AllowList::default().allows("localhost", 80));
    }

    #[test]
    fn requests_name_their_destination() {
        let request = |head: &str| parse_request(head);
        assert_eq!(
            request("CONNECT api.example.com:443 HTTP/1.1\r\n\r\n"),
            Some(Request { connect: true, host: "api.example.com".into(), port: 443 })
        );
        assert_eq!(
            request("GET http://127.0.0.1:8080/x?y HTTP/1.1\r\n\r\n"),
            Some(Request { connect: false, host: "127.0.0.1".into(), port: 8080 })
        );
        assert_eq!(
            request("GET http://user@example.com/ HTTP/1.1\r\n\r\n"),
            Some(Request { connect: false, host: "example.com".into(), port: 80 })
        );
        assert_eq!(request("GET /relative HTTP/1.1\r\n\r\n"), None);
        assert_eq!(request("CONNECT example.com HTTP/1.1\r\n\r\n"), None);
    }
}
