//! `drover-guest`: PID 1 of a Drover microVM.
//!
//! It mounts `/proc`, `/sys`, `/dev`, `/tmp`, loads the virtio modules the host shipped in
//! `/.drover/modules`, brings `lo` up (the only network interface a VM has by default), and
//! then serves the host over the virtio-serial ports named in `protocol::PORT_NAMES` with the frames of
//! [`drover_guest::protocol`].
//!
//! On the host, QEMU starts `drover-guest relay SOCKET` for each connection the guest opens to
//! one of its network forwards (see [`drover_guest::net`]), with the connection as stdin and
//! stdout; the relay joins it to the Unix socket the host serves for that forward.
//!
//! Threads, not async: one reader and one writer per port, one main loop that owns the
//! workspace, one reaper (PID 1 must reap every orphan), and per step a supervisor plus one
//! reader per output stream. Everything the guest says goes through [`Outbox::broadcast`], so
//! the order of messages of one step (output, workspace changes, then `Exited`) is the order in
//! which the host receives them.

mod init;
mod relay;
mod steps;
mod sync;

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, sync_channel};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use drover_guest::protocol::{FrameDecoder, GuestMessage, HostMessage, PROTOCOL_VERSION, encode};

/// Writes a line to the VM console (the host keeps it as `console.log`).
macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("drover-guest: {}", format_args!($($arg)*))
    };
}
pub(crate) use log;

/// Frames queued per port before a sender blocks: the backpressure that keeps a slow host from
/// growing guest memory.
const PORT_QUEUE: usize = 256;

/// How long a port waits for data or a state change before checking again.
const PORT_POLL_MS: i32 = 200;

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let [_, mode, socket] = args.as_slice()
        && mode == "relay"
    {
        std::process::exit(relay::run(std::path::Path::new(socket)));
    }
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        eprintln!(
            "drover-guest runs as PID 1 inside a Drover microVM; it is not meant to be started by hand"
        );
        std::process::exit(2);
    }
    if let Err(error) = run() {
        log!("fatal: {error}");
    }
    init::power_off();
}

fn run() -> std::io::Result<()> {
    init::setup_system()?;
    let ports = init::open_ports(Duration::from_secs(10))?;
    log!("serving {} port(s)", ports.len());

    let (events_tx, events_rx) = mpsc::channel();
    let mut writers = Vec::new();
    for (index, fd) in ports.into_iter().enumerate() {
        let fd = Arc::new(fd);
        let connected = Arc::new(AtomicBool::new(false));
        let (tx, rx) = sync_channel::<Arc<Vec<u8>>>(PORT_QUEUE);
        writers.push(tx.clone());
        let (read_fd, read_connected, events) = (fd.clone(), connected.clone(), events_tx.clone());
        std::thread::spawn(move || read_port(index, &read_fd, &read_connected, &tx, &events));
        std::thread::spawn(move || write_port(&fd, &connected, &rx));
    }
    let outbox = Outbox { ports: writers };
    let steps = steps::Steps::start(outbox.clone());
    main_loop(&events_rx, &outbox, &steps);
    Ok(())
}

/// Sends frames to the host sessions.
#[derive(Clone)]
pub(crate) struct Outbox {
    ports: Vec<SyncSender<Arc<Vec<u8>>>>,
}

impl Outbox {
    /// Sends a message to every port; ports without a host drop it.
    pub(crate) fn broadcast(&self, message: &GuestMessage) {
        let frame = Arc::new(encode(message));
        for port in &self.ports {
            let _ = port.send(frame.clone());
        }
    }

    /// Sends a message to one port.
    fn send_to(&self, port: usize, message: &GuestMessage) {
        if let Some(port) = self.ports.get(port) {
            let _ = port.send(Arc::new(encode(message)));
        }
    }
}

/// A message from a host session, tagged with its port.
struct Event {
    port: usize,
    message: HostMessage,
}

fn main_loop(events: &Receiver<Event>, outbox: &Outbox, steps: &steps::Steps) {
    while let Ok(Event { port, message }) = events.recv() {
        match message {
            HostMessage::Run { step, argv, env, cwd, user } => {
                steps.run(step, &argv, env, &cwd, user);
            }
            HostMessage::Signal { step, signal } => steps.signal(step, signal),
            HostMessage::Status { id, step } => {
                outbox.send_to(port, &GuestMessage::Status { id, state: steps.status(step) });
            }
            HostMessage::MakeDir { .. } | HostMessage::PutFile { .. } | HostMessage::Symlink { .. } => {
                if let Err(error) = steps.workspace().apply(&message) {
                    log!("workspace write failed: {error}");
                    outbox.broadcast(&GuestMessage::Error {
                        message: format!("workspace write failed: {error}"),
                    });
                }
            }
            HostMessage::SetClock { unix_ms, seed } => {
                init::set_clock(unix_ms);
                if !seed.is_empty() {
                    init::reseed_random(&seed);
                }
                // A restored guest may have missed the host's connection; this tells it.
                let hello = GuestMessage::Hello { version: PROTOCOL_VERSION, uptime_ms: init::uptime_ms() };
                outbox.send_to(port, &hello);
            }
            HostMessage::Shutdown => {
                log!("shutdown requested");
                return;
            }
        }
    }
}

/// Reads frames from one port. The driver reports `POLLHUP` while no host is connected; the
/// transition to connected is when the guest says hello on that port.
fn read_port(
    index: usize,
    fd: &OwnedFd,
    connected: &AtomicBool,
    own_writer: &SyncSender<Arc<Vec<u8>>>,
    events: &Sender<Event>,
) {
    let mut decoder = FrameDecoder::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let revents = poll_one(fd, libc::POLLIN, PORT_POLL_MS);
        let hung_up = revents & libc::POLLHUP != 0 && revents & libc::POLLIN == 0;
        if hung_up {
            if connected.swap(false, Ordering::SeqCst) {
                decoder.reset();
            }
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        if !connected.swap(true, Ordering::SeqCst) {
            decoder.reset();
            let hello = GuestMessage::Hello { version: PROTOCOL_VERSION, uptime_ms: init::uptime_ms() };
            let _ = own_writer.send(Arc::new(encode(&hello)));
        }
        if revents & libc::POLLIN == 0 {
            continue;
        }
        // SAFETY: the buffer is valid for writes of its length and the fd is open.
        let read = unsafe { libc::read(fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
        if read <= 0 {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        decoder.push(&buffer[..read as usize]);
        loop {
            match decoder.next_message::<HostMessage>() {
                Ok(Some(message)) => {
                    if events.send(Event { port: index, message }).is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    log!("port {index}: {error}; dropping buffered input");
                    decoder.reset();
                    break;
                }
            }
        }
    }
}

/// Writes queued frames to one port, whole frames only, dropping those queued while no host
/// is connected.
fn write_port(fd: &OwnedFd, connected: &AtomicBool, frames: &Receiver<Arc<Vec<u8>>>) {
    while let Ok(frame) = frames.recv() {
        let mut written = 0;
        while written < frame.len() && connected.load(Ordering::SeqCst) {
            let revents = poll_one(fd, libc::POLLOUT, PORT_POLL_MS);
            if revents & libc::POLLHUP != 0 {
                connected.store(false, Ordering::SeqCst);
                break;
            }
            if revents & libc::POLLOUT == 0 {
                continue;
            }
            let rest = &frame[written..];
            // SAFETY: `rest` is valid for reads of its length and the fd is open.
            let n = unsafe { libc::write(fd.as_raw_fd(), rest.as_ptr().cast(), rest.len()) };
            if n > 0 {
                written += n as usize;
            }
        }
    }
}

/// `poll` on one descriptor; returns its `revents` (0 on timeout or error).
pub(crate) fn poll_one(fd: &impl AsRawFd, events: libc::c_short, timeout_ms: i32) -> libc::c_short {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 };
    // SAFETY: pfd is a valid pollfd and the count is 1.
    let ready = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    if ready > 0 { pfd.revents } else { 0 }
}
