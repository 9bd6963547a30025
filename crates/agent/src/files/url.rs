//! URL inputs: http(s) downloads with a connect timeout, a total timeout, a size cap, and no
//! way to the node's own loopback, link-local or unspecified addresses (unless allowed).
//!
//! The address check sits in the HTTP client's resolver, so it judges the very addresses the
//! client then connects to: a name that resolves to a public address when checked and to
//! 127.0.0.1 when connected (DNS rebinding) cannot slip through, and every redirect is
//! resolved, and checked, the same way. Literal IP hosts skip the resolver and are checked
//! before the request and on each redirect. Proxies from the environment are not used: the
//! proxy, not the agent, would pick the address.

use std::error::Error as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use futures::StreamExt;

use super::InputPolicy;
use super::transfer::{Chunks, Guard, TransferError, guarded};

/// Redirects followed before a download is refused.
const MAX_REDIRECTS: usize = 10;

/// Why a URL input cannot be fetched.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// Not an http(s) URL.
    #[error("`{url}` is not an http(s) URL")]
    NotHttp {
        /// The URL.
        url: String,
    },
    /// The host is (or resolves to) an address of this node.
    #[error(transparent)]
    Forbidden(#[from] ForbiddenAddress),
    /// The server answered with an error status.
    #[error("http status {0}")]
    Status(u16),
    /// Too many redirects.
    #[error("more than {MAX_REDIRECTS} redirects")]
    Redirects,
    /// The response announced more than allowed.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// The request failed (connection, timeout, TLS).
    #[error("{0}")]
    Http(String),
}

/// A host that is, or resolves to, a loopback, link-local or unspecified address.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ForbiddenAddress {
    /// The host as named in the URL.
    pub host: String,
    /// The address it is or resolved to.
    pub addr: IpAddr,
}

impl std::fmt::Display for ForbiddenAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().is_ok() {
            write!(f, "{} is", self.host)?;
        } else {
            write!(f, "{} resolves to {},", self.host, self.addr)?;
        }
        write!(
            f,
            " a loopback, link-local or unspecified address of this node, which URL inputs may not reach \
             (the agent's --allow-local-urls allows it)"
        )
    }
}

/// Whether `ip` reaches this node itself: loopback (127/8, ::1), link-local (169.254/16,
/// fe80::/10, where cloud metadata services live), or unspecified (0/8, ::), IPv4 inside IPv6
/// included.
pub(super) fn is_local(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local() || v4.octets()[0] == 0,
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// Refuses a URL whose host is a literal local address (names go through the resolver).
fn check_literal(url: &reqwest::Url) -> Result<(), ForbiddenAddress> {
    let Some(host) = url.host_str() else { return Ok(()) };
    match host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        Ok(addr) if is_local(addr) => Err(ForbiddenAddress { host: host.to_owned(), addr }),
        _ => Ok(()),
    }
}

/// The system resolver, refusing names with any local address among their answers.
struct Resolver;

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if let Some(bad) = addrs.iter().find(|a| is_local(a.ip())) {
                return Err(Box::new(ForbiddenAddress { host, addr: bad.ip() }) as _);
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Starts downloading `url`: its guarded chunks, once the server answered with success.
pub(super) async fn fetch(url: &str, policy: &InputPolicy) -> Result<Chunks, UrlError> {
    let parsed = reqwest::Url::parse(url).map_err(|_| UrlError::NotHttp { url: url.to_owned() })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(UrlError::NotHttp { url: url.to_owned() });
    }
    let allow_local = policy.allow_local_urls;
    if !allow_local {
        check_literal(&parsed)?;
    }
    let redirects = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= MAX_REDIRECTS {
            return attempt.error(UrlError::Redirects);
        }
        match check_literal(attempt.url()) {
            Err(forbidden) if !allow_local => attempt.error(forbidden),
            _ => attempt.follow(),
        }
    });
    let mut client = reqwest::Client::builder()
        .connect_timeout(policy.connect_timeout)
        .timeout(policy.url_timeout)
        .redirect(redirects)
        .no_proxy();
    if !allow_local {
        client = client.dns_resolver(Arc::new(Resolver));
    }
    let client = client.build().map_err(|e| UrlError::Http(describe(&e)))?;
    let response = client.get(parsed).send().await.map_err(failure)?;
    if !response.status().is_success() {
        return Err(UrlError::Status(response.status().as_u16()));
    }
    let guard = Guard::new(policy, response.content_length())?;
    let chunks = response.bytes_stream().map(|chunk| chunk.map_err(|e| TransferError::Source(describe(&e))));
    Ok(guarded(Box::pin(chunks), guard))
}

/// The typed reason inside a failed request (a refused address, too many redirects), or the
/// request's error chain as text.
fn failure(e: reqwest::Error) -> UrlError {
    let mut cause = e.source();
    while let Some(inner) = cause {
        if let Some(forbidden) = inner.downcast_ref::<ForbiddenAddress>() {
            return UrlError::Forbidden(forbidden.clone());
        }
        if let Some(UrlError::Redirects) = inner.downcast_ref::<UrlError>() {
            return UrlError::Redirects;
        }
        cause = inner.source();
    }
    UrlError::Http(describe(&e))
}

/// An error with its causes, `: `-separated (reqwest's own message names only the URL).
fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

#[cfg(test)]
mod tests;
