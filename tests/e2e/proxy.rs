//! A TCP proxy on loopback that a test puts between an agent and its server, to cut the
//! agent off (connections closed, new ones refused) or to freeze it (connections stay open
//! and carry nothing: a half-open link, as a dead router or a hung peer leaves it).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

const FORWARD: u8 = 0;
const CUT: u8 = 1;
const FREEZE: u8 = 2;

/// How often idle pumps look at the proxy's mode.
const TICK: Duration = Duration::from_millis(20);

/// A proxy forwarding one loopback port to another until dropped.
pub struct Proxy {
    /// Where clients connect: `http://127.0.0.1:PORT`.
    pub url: String,
    mode: Arc<AtomicU8>,
    closed: Arc<AtomicBool>,
}

impl Proxy {
    /// A proxy to `target` (`127.0.0.1:PORT`), forwarding from the start.
    pub fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener.set_nonblocking(true).expect("nonblocking listener");
        let url = format!("http://{}", listener.local_addr().expect("proxy address"));
        let mode = Arc::new(AtomicU8::new(FORWARD));
        let closed = Arc::new(AtomicBool::new(false));
        let target = target.to_owned();
        let (m, c) = (mode.clone(), closed.clone());
        std::thread::spawn(move || accept(listener, target, m, c));
        Proxy { url, mode, closed }
    }

    /// Closes every connection and refuses new ones until [`Proxy::heal`].
    pub fn cut(&self) {
        self.mode.store(CUT, Ordering::SeqCst);
    }

    /// Stops carrying bytes, leaving connections open, until [`Proxy::heal`].
    pub fn freeze(&self) {
        self.mode.store(FREEZE, Ordering::SeqCst);
    }

    /// Forwards again.
    pub fn heal(&self) {
        self.mode.store(FORWARD, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
    }
}

fn accept(listener: TcpListener, target: String, mode: Arc<AtomicU8>, closed: Arc<AtomicBool>) {
    while !closed.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(TICK);
                continue;
            }
            Err(_) => return,
        };
        if mode.load(Ordering::SeqCst) == CUT {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(server) = TcpStream::connect(&target) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nonblocking(false);
        for (from, to) in [(&client, &server), (&server, &client)] {
            let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else { continue };
            let (m, c) = (mode.clone(), closed.clone());
            std::thread::spawn(move || pump(from, to, m, c));
        }
    }
}

/// Copies `from` to `to` while the proxy forwards; holds still while frozen; closes both on
/// a cut, at the end of either side, or when the proxy is dropped.
fn pump(mut from: TcpStream, mut to: TcpStream, mode: Arc<AtomicU8>, closed: Arc<AtomicBool>) {
    let _ = from.set_read_timeout(Some(TICK));
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if closed.load(Ordering::SeqCst) {
            break;
        }
        match mode.load(Ordering::SeqCst) {
            CUT => break,
            FREEZE => {
                std::thread::sleep(TICK);
                continue;
            }
            _ => {}
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
