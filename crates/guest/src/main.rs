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

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use drover_guest::protocol::{
    FrameDecoder, GuestMessage, HostMessage, OutputStream, PROTOCOL_VERSION, encode,
};

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
    let mut connected_flags = Vec::new();
    let held = Arc::new(Mutex::new(Held::default()));
    for (index, fd) in ports.into_iter().enumerate() {
        let fd = Arc::new(fd);
        let connected = Arc::new(AtomicBool::new(false));
        connected_flags.push(connected.clone());
        let (tx, rx) = sync_channel::<Arc<Vec<u8>>>(PORT_QUEUE);
        writers.push(tx.clone());
        let port =
            Port { index, fd: fd.clone(), connected: connected.clone(), own_writer: tx, held: held.clone() };
        let events = events_tx.clone();
        std::thread::spawn(move || read_port(&port, &events));
        std::thread::spawn(move || write_port(&fd, &connected, &rx));
    }
    let outbox = Outbox { ports: writers, connected: connected_flags, held };
    let steps = steps::Steps::start(outbox.clone());
    main_loop(&events_rx, &outbox, &steps);
    Ok(())
}

/// Most bytes of step output kept while no host listens (an agent restarting); beyond it the
/// oldest goes, and the host is told how much.
const HELD_BYTES: usize = 8 << 20;

/// Step output sent while no host was connected, for the next host that connects.
#[derive(Default)]
struct Held {
    /// Encoded `Output` frames, oldest first, with their step.
    frames: VecDeque<(usize, Arc<Vec<u8>>)>,
    bytes: usize,
    /// Bytes of output dropped per step because the queue was full.
    dropped: BTreeMap<usize, u64>,
}

impl Held {
    fn push(&mut self, step: usize, frame: Arc<Vec<u8>>) {
        self.bytes += frame.len();
        self.frames.push_back((step, frame));
        while self.bytes > HELD_BYTES {
            let Some((step, old)) = self.frames.pop_front() else { break };
            self.bytes -= old.len();
            *self.dropped.entry(step).or_default() += old.len() as u64;
        }
    }

    /// Everything held, in order, after a note for each step that lost output.
    fn take(&mut self) -> Vec<Arc<Vec<u8>>> {
        let notes = std::mem::take(&mut self.dropped).into_iter().map(|(step, bytes)| {
            let data = format!(
                "drover: about {bytes} bytes of this step's output were lost while no agent listened\n"
            );
            Arc::new(encode(&GuestMessage::Output {
                step,
                stream: OutputStream::Stderr,
                data: data.into_bytes(),
            }))
        });
        let frames: Vec<Arc<Vec<u8>>> = notes.chain(self.frames.drain(..).map(|(_, f)| f)).collect();
        self.bytes = 0;
        frames
    }
}

/// Sends frames to the host sessions.
#[derive(Clone)]
pub(crate) struct Outbox {
    ports: Vec<SyncSender<Arc<Vec<u8>>>>,
    /// Whether a host is connected, per port.
    connected: Vec<Arc<AtomicBool>>,
    held: Arc<Mutex<Held>>,
}

impl Outbox {
    /// Sends a message to every port; ports without a host drop it. Step output sent while no
    /// port has a host is held for the next host instead (see [`Held`]).
    pub(crate) fn broadcast(&self, message: &GuestMessage) {
        let frame = Arc::new(encode(message));
        // Under the lock a connecting port takes to say hello and hand the held output on, so
        // that a host gets hello first, then what was held, then what came after.
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let GuestMessage::Output { step, .. } = message
            && !self.connected.iter().any(|c| c.load(Ordering::SeqCst))
        {
            held.push(*step, frame);
            return;
        }
        for port in &self.ports {
            let _ = port.send(frame.clone());
        }
    }

    /// Returns once a host is connected on some port (at once when one is).
    pub(crate) fn wait_for_host(&self) {
        let mut waited = false;
        while !self.connected.iter().any(|c| c.load(Ordering::SeqCst)) {
            if !waited {
                log!("no host listens: a step's end waits for one");
                waited = true;
            }
            std::thread::sleep(Duration::from_millis(50));
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

/// One port as its reader sees it.
struct Port {
    index: usize,
    fd: Arc<OwnedFd>,
    connected: Arc<AtomicBool>,
    own_writer: SyncSender<Arc<Vec<u8>>>,
    held: Arc<Mutex<Held>>,
}

/// Reads frames from one port. The driver reports `POLLHUP` while no host is connected; the
/// transition to connected is when the guest says hello on that port, followed by the output
/// held while no host listened.
fn read_port(port: &Port, events: &Sender<Event>) {
    let Port { index, fd, connected, own_writer, held } = port;
    let index = *index;
    let mut decoder = FrameDecoder::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let revents = poll_one(fd, libc::POLLIN, PORT_POLL_MS);
        // No host: the driver sets `POLLHUP`, and `POLLIN` with it (a read would not block:
        // it returns end of input), so the hang-up alone decides.
        let hung_up = revents & libc::POLLHUP != 0;
        if hung_up {
            if connected.swap(false, Ordering::SeqCst) {
                decoder.reset();
            }
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        if !connected.load(Ordering::SeqCst) {
            let mut held = held.lock().unwrap_or_else(|e| e.into_inner());
            connected.store(true, Ordering::SeqCst);
            decoder.reset();
            let hello = GuestMessage::Hello { version: PROTOCOL_VERSION, uptime_ms: init::uptime_ms() };
            let _ = own_writer.send(Arc::new(encode(&hello)));
            let frames = held.take();
            if !frames.is_empty() {
                log!("port {index}: {} frame(s) of output held for a host", frames.len());
            }
            for frame in frames {
                let _ = own_writer.send(frame);
            }
        }
        if revents & libc::POLLIN == 0 {
            continue;
        }
        // SAFETY: the buffer is valid for writes of its length and the fd is open.
        let read = unsafe { libc::read(fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
        if read == 0 {
            // End of input: the host went away (the port can read as ready with nothing in it
            // rather than report a hang-up alone). Until one connects again, output is held.
            if connected.swap(false, Ordering::SeqCst) {
                decoder.reset();
            }
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        if read < 0 {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn output(step: usize, text: &str) -> Arc<Vec<u8>> {
        Arc::new(encode(&GuestMessage::Output {
            step,
            stream: OutputStream::Stdout,
            data: text.as_bytes().to_vec(),
        }))
    }

    fn decode_all(frames: Vec<Arc<Vec<u8>>>) -> Vec<GuestMessage> {
        let mut decoder = FrameDecoder::new();
        frames.iter().for_each(|f| decoder.push(f));
        std::iter::from_fn(|| decoder.next_message::<GuestMessage>().unwrap()).collect()
    }

    #[test]
    fn output_held_for_the_next_host_keeps_its_order_and_says_what_it_dropped() {
        let mut held = Held::default();
        held.push(0, output(0, "first\n"));
        held.push(1, output(1, "second\n"));
        let messages = decode_all(held.take());
        let texts: Vec<String> = messages
            .iter()
            .map(|m| match m {
                GuestMessage::Output { data, .. } => String::from_utf8_lossy(data).into_owned(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(texts, ["first\n", "second\n"]);
        assert!(held.take().is_empty(), "handed on once");

        // Past the limit the oldest goes, and the step's output says so first.
        let big = "x".repeat(1 << 20);
        for _ in 0..10 {
            held.push(3, output(3, &big));
        }
        assert!(held.bytes <= HELD_BYTES);
        let messages = decode_all(held.take());
        let GuestMessage::Output { step: 3, stream: OutputStream::Stderr, data } = &messages[0] else {
            panic!("{:?}", messages[0]);
        };
        assert!(String::from_utf8_lossy(data).contains("were lost while no agent listened"));
        let kept = &messages[1..];
        assert!(!kept.is_empty() && kept.len() < 10, "{} kept", kept.len());
        assert!(
            kept.iter()
                .all(|m| matches!(m, GuestMessage::Output { step: 3, stream: OutputStream::Stdout, .. }))
        );
    }
}
