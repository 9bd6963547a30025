//! Accepting connections, with or without TLS, for tonic ([`incoming`]) and axum ([`Listener`]).
//!
//! Both run one accept loop, [`Acceptor`]. With TLS, each accepted socket's handshake runs in
//! its own task (in a `JoinSet` the acceptor owns), and the acceptor hands out whichever
//! handshake finishes first. So a client that connects and then says nothing, or says it
//! slowly, delays nobody: it only holds a task until [`HANDSHAKE_TIMEOUT`]. Dropping the
//! stream or listener (server shutdown) closes the socket and aborts the handshakes in flight.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::identity::parse_certs;
use crate::{ServerIdentity, TlsError, provider};

/// How long a client has to complete the TLS handshake after connecting.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in flight at most; past this, new connections wait in the kernel's backlog. Bounds
/// the sockets and tasks a flood of silent clients can hold.
const MAX_PENDING_HANDSHAKES: usize = 1024;
/// Pause after an accept error that is not about one connection (e.g. out of file
/// descriptors), so the loop does not spin while the condition lasts.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_secs(1);

/// rustls server config with ALPN h2 and http/1.1.
pub fn server_config(identity: &ServerIdentity) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = parse_certs(identity.cert_chain_pem.as_bytes(), "server certificate chain")?;
    let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
        .map_err(|e| TlsError::Pem { what: "server private key".into(), detail: e.to_string() })?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Certificate(format!("the server certificate and key cannot be used: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Accepted connections for `tonic::transport::Server::serve_with_incoming_shutdown`.
///
/// TCP connections are accepted with TCP_NODELAY (the agent protocol is many small messages,
/// and Nagle plus delayed ACKs adds tens of milliseconds to each). When `tls` is Some, the TLS
/// handshakes run concurrently in spawned tasks with a 10 s timeout each; failed handshakes are
/// logged at debug with the peer address and skipped. The stream never yields an error and
/// never ends.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
) -> impl futures::Stream<Item = io::Result<ServerIo>> + Send + 'static {
    futures::stream::unfold(Acceptor::new(listener, tls), |mut acceptor| async move {
        let io = acceptor.next().await;
        Some((Ok(io), acceptor))
    })
}

/// The same accept loop as [`incoming`], as an [`axum::serve::Listener`], so the HTTP API
/// serves TLS too.
///
/// For `ConnectInfo<SocketAddr>` in handlers, serve `listener.tap_io(|_| ())` (from
/// [`axum::serve::ListenerExt`]): axum implements `Connected` for the address of a tapped
/// listener, and the orphan rule keeps this crate from doing it for `Listener` itself.
pub struct Listener {
    acceptor: Acceptor,
}

impl Listener {
    /// Accepts on `listener`; with TLS when `tls` is Some.
    pub fn new(listener: TcpListener, tls: Option<Arc<ServerConfig>>) -> Listener {
        Listener { acceptor: Acceptor::new(listener, tls) }
    }
}

impl axum::serve::Listener for Listener {
    type Io = ServerIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (ServerIo, SocketAddr) {
        let io = self.acceptor.next().await;
        let peer = io.peer;
        (io, peer)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.acceptor.listener.local_addr()
    }
}

/// One accepted connection, plain or TLS.
///
/// Implements tonic's `Connected` with [`TcpConnectInfo`], so tonic handlers read the peer
/// address with `request.remote_addr()`.
pub struct ServerIo {
    stream: Stream,
    peer: SocketAddr,
    local: Option<SocketAddr>,
}

/// The transport under a [`ServerIo`].
enum Stream {
    Plain(TcpStream),
    // Boxed: a rustls connection is over a kilobyte, a TcpStream a few words.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl ServerIo {
    /// The client's address.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        Some(self.peer)
    }

    /// The local address the connection was accepted on.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    /// Whether the connection is TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.stream, Stream::Tls(_))
    }
}

impl std::fmt::Debug for ServerIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerIo")
            .field("peer", &self.peer)
            .field("local", &self.local)
            .field("tls", &self.is_tls())
            .finish()
    }
}

impl Connected for ServerIo {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        TcpConnectInfo { local_addr: self.local, remote_addr: Some(self.peer) }
    }
}

impl AsyncRead for ServerIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The accept loop shared by [`incoming`] and [`Listener`].
struct Acceptor {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    /// Handshakes in flight; each yields the connection, or None when it failed or timed out.
    handshakes: JoinSet<Option<ServerIo>>,
    /// Set after an accept error that may persist: accepting resumes at this instant.
    paused_until: Option<Instant>,
}

impl Acceptor {
    fn new(listener: TcpListener, tls: Option<Arc<ServerConfig>>) -> Acceptor {
        Acceptor { listener, tls: tls.map(TlsAcceptor::from), handshakes: JoinSet::new(), paused_until: None }
    }

    /// The next connection ready for use. Cancel-safe: a connection accepted or handshaken
    /// while the caller was away stays in the acceptor (the listener's backlog or the JoinSet).
    async fn next(&mut self) -> ServerIo {
        loop {
            let may_accept = self.paused_until.is_none() && self.handshakes.len() < MAX_PENDING_HANDSHAKES;
            // The sleep below is only polled while paused; its deadline is a placeholder otherwise.
            let resume_at = self.paused_until.unwrap_or_else(Instant::now);
            tokio::select! {
                accepted = self.listener.accept(), if may_accept => {
                    match accepted {
                        Ok((stream, peer)) => {
                            if let Some(io) = self.start(stream, peer) {
                                return io;
                            }
                        }
                        Err(e) => self.accept_failed(e),
                    }
                }
                () = tokio::time::sleep_until(resume_at), if self.paused_until.is_some() => {
                    self.paused_until = None;
                }
                Some(done) = self.handshakes.join_next() => {
                    match done {
                        Ok(Some(io)) => return io,
                        Ok(None) => {}
                        // Only a panic in the handshake task (a bug) lands here.
                        Err(e) => tracing::warn!(error = %e, "TLS handshake task failed"),
                    }
                }
            }
        }
    }

    /// Sets up a freshly accepted socket: returns it when plain, or starts its handshake.
    fn start(&mut self, stream: TcpStream, peer: SocketAddr) -> Option<ServerIo> {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "cannot disable Nagle on a connection");
        }
        let local = stream.local_addr().ok();
        match &self.tls {
            None => Some(ServerIo { stream: Stream::Plain(stream), peer, local }),
            Some(acceptor) => {
                let accept = acceptor.accept(stream);
                self.handshakes.spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
                        Ok(Ok(tls)) => Some(ServerIo { stream: Stream::Tls(Box::new(tls)), peer, local }),
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            None
                        }
                        Err(_) => {
                            tracing::debug!(%peer, timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake timed out");
                            None
                        }
                    }
                });
                None
            }
        }
    }

    /// Handles an accept error: errors about one connection are skipped; others (e.g. out of
    /// file descriptors) pause accepting for a moment, as they would recur at once.
    fn accept_failed(&mut self, e: io::Error) {
        use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
        if matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset) {
            tracing::debug!(error = %e, "connection failed while being accepted");
        } else {
            tracing::error!(error = %e, backoff = ?ACCEPT_ERROR_BACKOFF, "cannot accept connections");
            self.paused_until = Some(Instant::now() + ACCEPT_ERROR_BACKOFF);
        }
    }
}
