//! The host–guest wire protocol: length-prefixed JSON frames over a byte stream (a
//! virtio-serial port in the guest, a Unix socket on the host).
//!
//! Each frame is a 4-byte big-endian length followed by that many bytes of JSON encoding one
//! [`HostMessage`] or [`GuestMessage`]. Binary payloads (output, file contents) are base64
//! strings. Output travels as raw chunks of at most [`MAX_CHUNK`] bytes; the host splits them
//! into lines, which keeps the frame count low for chatty steps.
//!
//! Sessions: the VM has [`PORT_NAMES`]`.len()` ports. The guest sends every message to every
//! connected port (a port nobody listens on drops them), and answers requests from any port.
//! The host that booted the VM uses the first port; an agent that restarted attaches on the
//! second while the first may still be held by the previous agent process.

use serde::{Deserialize, Serialize};

/// Protocol version; the guest announces it in [`GuestMessage::Hello`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Names of the virtio-serial ports the guest serves, in order: the boot session, then the
/// attach session.
pub const PORT_NAMES: [&str; 2] = ["drover.0", "drover.1"];

/// Largest frame either side accepts (the JSON of one message).
pub const MAX_FRAME: usize = 4 * 1024 * 1024;

/// Largest piece of output or file content carried by one message.
pub const MAX_CHUNK: usize = 64 * 1024;

/// Where steps run inside the VM; the host workspace is copied here and back.
pub const GUEST_WORKSPACE: &str = "/workspace";

/// A message from the host to the guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HostMessage {
    /// Run a step. The guest answers with [`GuestMessage::Started`] or
    /// [`GuestMessage::StartFailed`].
    Run {
        /// Step index; unique within the VM.
        step: usize,
        /// Program and arguments; the program is looked up in the step's `PATH`.
        argv: Vec<String>,
        /// The complete environment of the step.
        env: Vec<(String, String)>,
        /// Working directory inside the VM.
        cwd: String,
        /// Numeric user and group to run as; `None` runs as root (the VM is the sandbox).
        user: Option<(u32, u32)>,
    },
    /// Send a signal to the step's whole process group.
    Signal {
        /// Step index.
        step: usize,
        /// Signal number (15 = SIGTERM, 9 = SIGKILL).
        signal: i32,
    },
    /// Ask for a step's state and usage; answered by [`GuestMessage::Status`].
    Status {
        /// Request id, echoed in the answer.
        id: u64,
        /// Step index.
        step: usize,
    },
    /// Create a directory in the guest workspace (path relative to it).
    MakeDir {
        /// Relative path.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// Write a piece of a file in the guest workspace; `offset` 0 creates or truncates it.
    PutFile {
        /// Relative path.
        path: String,
        /// Permission bits.
        mode: u32,
        /// Where the piece goes.
        offset: u64,
        /// The bytes.
        #[serde(with = "base64_bytes")]
        data: Vec<u8>,
    },
    /// Create a symbolic link in the guest workspace.
    Symlink {
        /// Relative path of the link.
        path: String,
        /// Its target, as is.
        target: String,
    },
    /// Set the guest's wall clock and reseed its random number generator: a VM restored from a
    /// snapshot would otherwise run with the time of its snapshot, and every VM restored from
    /// the same snapshot would draw the same "random" numbers. Answered with
    /// [`GuestMessage::Hello`] on the same port.
    SetClock {
        /// Milliseconds since the Unix epoch.
        unix_ms: u64,
        /// Fresh random bytes from the host, mixed into the guest's pool before a forced
        /// reseed. Empty from hosts that send none.
        #[serde(default, with = "base64_bytes")]
        seed: Vec<u8>,
    },
    /// Stop everything and power the VM off.
    Shutdown,
}

/// Which output stream a chunk comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Why a step could not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartErrorKind {
    /// The program does not exist.
    NotFound,
    /// The program is not executable, or the user may not run it.
    PermissionDenied,
    /// The request was malformed (empty argv, step already running).
    Invalid,
    /// Anything else.
    Other,
}

/// CPU time and peak memory of a step, as the guest kernel sees them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StepUsage {
    /// User plus system CPU time, in seconds.
    pub cpu_seconds: f64,
    /// Peak resident memory, in bytes.
    pub peak_memory_bytes: u64,
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepExit {
    /// Exit code, when the step exited normally.
    pub code: Option<i32>,
    /// Signal number, when the step was killed by a signal.
    pub signal: Option<i32>,
    /// Whether the guest kernel's OOM killer fired while the step ran.
    pub oom: bool,
}

/// A step's state in the answer to [`HostMessage::Status`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum StepState {
    /// The guest never ran this step.
    Unknown,
    /// Still running; usage so far.
    Running {
        /// Usage so far.
        usage: StepUsage,
    },
    /// Ended.
    Exited {
        /// How.
        exit: StepExit,
        /// Total usage.
        usage: StepUsage,
    },
}

/// A message from the guest to the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GuestMessage {
    /// Sent on every port when a host connects to it.
    Hello {
        /// [`PROTOCOL_VERSION`] of the guest.
        version: u32,
        /// Guest uptime in milliseconds (how long the kernel and agent took to get here).
        uptime_ms: u64,
    },
    /// A step started.
    Started {
        /// Step index.
        step: usize,
        /// Guest process id of the step's leader (also its process group id).
        pid: i32,
    },
    /// A step could not start.
    StartFailed {
        /// Step index.
        step: usize,
        /// Error class.
        kind: StartErrorKind,
        /// Human-readable reason.
        message: String,
    },
    /// A chunk of a step's output, at most [`MAX_CHUNK`] bytes, not aligned to lines.
    Output {
        /// Step index.
        step: usize,
        /// Which stream.
        stream: OutputStream,
        /// The bytes.
        #[serde(with = "base64_bytes")]
        data: Vec<u8>,
    },
    /// A directory exists in the guest workspace (sent back after each step).
    DirChanged {
        /// Relative path.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// A piece of a file the step created or changed; `offset` 0 creates or truncates it.
    FileChanged {
        /// Relative path.
        path: String,
        /// Permission bits.
        mode: u32,
        /// Where the piece goes.
        offset: u64,
        /// The bytes.
        #[serde(with = "base64_bytes")]
        data: Vec<u8>,
    },
    /// A symbolic link the step created or changed.
    SymlinkChanged {
        /// Relative path.
        path: String,
        /// Its target.
        target: String,
    },
    /// A path the step removed.
    Removed {
        /// Relative path.
        path: String,
    },
    /// A step ended. All its output and workspace changes were sent before this message.
    Exited {
        /// Step index.
        step: usize,
        /// How it ended.
        exit: StepExit,
        /// What it used.
        usage: StepUsage,
    },
    /// Answer to [`HostMessage::Status`].
    Status {
        /// The request id.
        id: u64,
        /// The step's state.
        state: StepState,
    },
    /// Something went wrong outside any step (bad frame, workspace write failed).
    Error {
        /// What.
        message: String,
    },
}

/// Errors decoding frames.
#[derive(Debug)]
pub enum FrameError {
    /// A frame announced more than [`MAX_FRAME`] bytes.
    TooLarge(usize),
    /// A frame did not hold a valid message.
    Json(serde_json::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLarge(len) => write!(f, "frame of {len} bytes exceeds the limit of {MAX_FRAME}"),
            FrameError::Json(error) => write!(f, "invalid frame: {error}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Encodes a message as one frame (length prefix included).
pub fn encode<M: Serialize>(message: &M) -> Vec<u8> {
    // Serialising these plain enums cannot fail: every field is a string, number or list.
    let json = serde_json::to_vec(message).unwrap_or_default();
    let mut frame = Vec::with_capacity(json.len() + 4);
    frame.extend_from_slice(&(json.len() as u32).to_be_bytes());
    frame.extend_from_slice(&json);
    frame
}

/// Accumulates bytes from a stream and yields complete frames.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// Forgets a partial frame, e.g. after the peer disconnected mid-frame.
    pub fn reset(&mut self) {
        self.buffer.clear();
    }

    /// The next complete message, if one is buffered.
    pub fn next_message<M: for<'de> Deserialize<'de>>(&mut self) -> Result<Option<M>, FrameError> {
        let Some(prefix) = self.buffer.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix) as usize;
        if len > MAX_FRAME {
            self.buffer.clear();
            return Err(FrameError::TooLarge(len));
        }
        if self.buffer.len() < 4 + len {
            return Ok(None);
        }
        let parsed = serde_json::from_slice(&self.buffer[4..4 + len]);
        self.buffer.drain(..4 + len);
        parsed.map(Some).map_err(FrameError::Json)
    }
}

/// Checks that a workspace path from the peer is relative and stays inside the workspace:
/// no root, no `..`, no empty or `.` components.
pub fn is_safe_relative_path(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && path.split('/').all(|part| !part.is_empty() && part != "." && part != ".." && !part.contains('\0'))
}

mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        STANDARD.decode(text.as_bytes()).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_across_arbitrary_splits() {
        let messages = vec![
            GuestMessage::Hello { version: PROTOCOL_VERSION, uptime_ms: 1234 },
            GuestMessage::Output { step: 1, stream: OutputStream::Stderr, data: vec![0, 255, b'\n'] },
            GuestMessage::Exited {
                step: 1,
                exit: StepExit { code: None, signal: Some(9), oom: false },
                usage: StepUsage { cpu_seconds: 0.5, peak_memory_bytes: 42 },
            },
        ];
        let bytes: Vec<u8> = messages.iter().flat_map(encode).collect();
        for piece in [1, 3, 7, bytes.len()] {
            let mut decoder = FrameDecoder::new();
            let mut decoded = Vec::new();
            for chunk in bytes.chunks(piece) {
                decoder.push(chunk);
                while let Some(message) = decoder.next_message::<GuestMessage>().expect("valid") {
                    decoded.push(message);
                }
            }
            assert_eq!(decoded, messages);
        }
    }

    #[test]
    fn host_messages_use_tagged_json() {
        let frame = encode(&HostMessage::Signal { step: 2, signal: 15 });
        assert_eq!(&frame[4..], br#"{"type":"signal","step":2,"signal":15}"#);
    }

    #[test]
    fn oversized_and_garbage_frames_are_errors() {
        let mut decoder = FrameDecoder::new();
        decoder.push(&(MAX_FRAME as u32 + 1).to_be_bytes());
        assert!(matches!(decoder.next_message::<HostMessage>(), Err(FrameError::TooLarge(_))));
        decoder.push(&3u32.to_be_bytes());
        decoder.push(b"{x}");
        assert!(matches!(decoder.next_message::<HostMessage>(), Err(FrameError::Json(_))));
        assert!(decoder.next_message::<HostMessage>().expect("empty").is_none());
    }

    #[test]
    fn relative_paths_must_stay_inside() {
        for good in ["a", "a/b.txt", ".hidden/x"] {
            assert!(is_safe_relative_path(good), "{good}");
        }
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/"] {
            assert!(!is_safe_relative_path(bad), "{bad}");
        }
    }
}
