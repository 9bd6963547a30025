//! A host session with a VM's guest agent: one Unix-socket connection to one virtio-serial port.
//!
//! One reader task owns the read half and routes every guest message: output is split into
//! lines and sent to the step's sink (awaiting it, so a slow consumer slows the guest instead
//! of growing memory), workspace changes are written to the host workspace, and `Exited`
//! completes the step. Requests are written under an async mutex on the write half.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use drover_guest::protocol::{
    FrameDecoder, GuestMessage, HostMessage, MAX_CHUNK, OutputStream, StartErrorKind, StepState, encode,
    is_safe_relative_path,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{oneshot, watch};

use crate::beneath::{BeneathError, Dir, RelPath};
use crate::runtime::lines::LineSplitter;
use crate::runtime::{ExitStatus, OutputChunk, OutputSink, RuntimeError, Stream, Usage};

/// How long a request waits for the guest's answer.
const ANSWER_PATIENCE: Duration = Duration::from_secs(30);

/// Most bytes of file content one step may copy back into the host workspace. Beyond it the
/// step's further files are not copied (and removed from the host workspace, so no partial
/// or stale copy passes for an output), and the step's stderr says so.
const MAX_SYNC_BYTES: u64 = 10 << 30;

/// How a step ended, with what it used.
pub(crate) type Finished = (ExitStatus, Usage);

/// A connected session.
pub(crate) struct Session {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    shared: Arc<Mutex<Shared>>,
    /// Flips to true when the connection ends (VM gone or powered off).
    closed: watch::Receiver<bool>,
    reader: tokio::task::JoinHandle<()>,
    /// Guest uptime when it greeted this session.
    pub(crate) guest_uptime: Duration,
}

/// Most bytes of output kept for steps nobody follows yet (see [`Shared::unclaimed`]).
const MAX_UNCLAIMED_BYTES: usize = 16 << 20;

#[derive(Default)]
struct Shared {
    /// Host directory that mirrors the guest workspace; `None` ignores workspace changes.
    workspace: Option<PathBuf>,
    steps: HashMap<usize, Slot>,
    /// Output lines of steps this session does not follow yet: what the guest held while no
    /// agent listened arrives right after its hello, before the restarted agent follows the
    /// step (see [`Session::follow`]).
    unclaimed: HashMap<usize, Vec<OutputChunk>>,
    unclaimed_bytes: usize,
    waiters: HashMap<u64, oneshot::Sender<StepState>>,
    next_id: u64,
    /// Bytes of file content the guest sent back since the last step ended.
    synced: u64,
    /// The cap on `synced`: `None` is [`MAX_SYNC_BYTES`] (tests set less).
    sync_cap: Option<u64>,
    /// Whether files were left out since the last step ended.
    sync_over: bool,
}

struct Slot {
    started: Option<oneshot::Sender<Result<i32, (StartErrorKind, String)>>>,
    sink: Option<OutputSink>,
    finished: watch::Sender<Option<Finished>>,
}

impl Slot {
    fn new(sink: Option<OutputSink>) -> Slot {
        Slot { started: None, sink, finished: watch::channel(None).0 }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Session {
    /// Connects to a port's socket and waits for the guest's hello. `nudge` is sent first: a
    /// guest restored from a snapshot may not notice the new connection, but it answers a
    /// [`HostMessage::SetClock`] with a hello.
    pub(crate) async fn connect(
        socket: &Path,
        workspace: Option<PathBuf>,
        patience: Duration,
        nudge: Option<&HostMessage>,
    ) -> Result<Session, RuntimeError> {
        let io = |context: &str, source| RuntimeError::Io {
            context: format!("{context} {}", socket.display()),
            source,
        };
        // QEMU creates the socket file before it listens on it: retry a refused connection.
        let began = std::time::Instant::now();
        let stream = loop {
            match UnixStream::connect(socket).await {
                Ok(stream) => break stream,
                Err(error)
                    if error.kind() == std::io::ErrorKind::ConnectionRefused
                        && began.elapsed() < patience =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(error) => return Err(io("connect to guest port", error)),
            }
        };
        let (mut read, mut write) = stream.into_split();
        if let Some(nudge) = nudge {
            write.write_all(&encode(nudge)).await.map_err(|error| io("nudge guest on", error))?;
        }
        let mut decoder = FrameDecoder::new();
        let mut buffer = vec![0u8; 64 * 1024];
        let hello = tokio::time::timeout(patience, async {
            loop {
                if let Some(message) =
                    decoder.next_message::<GuestMessage>().map_err(std::io::Error::other)?
                {
                    if let GuestMessage::Hello { uptime_ms, .. } = message {
                        return Ok(Duration::from_millis(uptime_ms));
                    }
                    continue;
                }
                let n = read.read(&mut buffer).await?;
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "guest closed the port",
                    ));
                }
                decoder.push(&buffer[..n]);
            }
        })
        .await;
        let guest_uptime = match hello {
            Ok(Ok(uptime)) => uptime,
            Ok(Err(error)) => return Err(io("greeting from guest on", error)),
            Err(_) => {
                return Err(io(
                    "greeting from guest on",
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no hello within {patience:?}"),
                    ),
                ));
            }
        };
        let shared = Arc::new(Mutex::new(Shared { workspace, ..Default::default() }));
        let (closed_tx, closed) = watch::channel(false);
        let reader = tokio::spawn(read_loop(read, decoder, buffer, shared.clone(), closed_tx));
        Ok(Session { writer: tokio::sync::Mutex::new(write), shared, closed, reader, guest_uptime })
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        lock(&self.shared)
    }

    /// Sends one message.
    pub(crate) async fn send(&self, message: &HostMessage) -> Result<(), RuntimeError> {
        let frame = encode(message);
        let mut writer = self.writer.lock().await;
        writer
            .write_all(&frame)
            .await
            .map_err(|source| RuntimeError::Io { context: "write to guest".into(), source })
    }

    /// Sets the host directory that mirrors the guest workspace.
    pub(crate) fn set_workspace(&self, workspace: PathBuf) {
        self.lock().workspace = Some(workspace);
    }

    /// Whether the connection has ended.
    pub(crate) fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Runs a step and waits until the guest started it.
    pub(crate) async fn run(
        &self,
        step: usize,
        run: HostMessage,
        sink: OutputSink,
    ) -> Result<i32, StartFailure> {
        let (tx, rx) = oneshot::channel();
        {
            let mut shared = self.lock();
            let mut slot = Slot::new(Some(sink));
            slot.started = Some(tx);
            shared.steps.insert(step, slot);
        }
        self.send(&run).await.map_err(StartFailure::Runtime)?;
        match tokio::time::timeout(ANSWER_PATIENCE, rx).await {
            Ok(Ok(Ok(pid))) => Ok(pid),
            Ok(Ok(Err((kind, message)))) => {
                self.lock().steps.remove(&step);
                Err(StartFailure::Guest(kind, message))
            }
            Ok(Err(_)) | Err(_) => {
                self.lock().steps.remove(&step);
                Err(StartFailure::Runtime(RuntimeError::Io {
                    context: format!("start step {step}"),
                    source: std::io::Error::new(std::io::ErrorKind::TimedOut, "the guest did not answer"),
                }))
            }
        }
    }

    /// Follows a step this session did not start (after an agent restart): its output goes
    /// to `sink`, beginning with what arrived before (the output the guest held while no
    /// agent listened), in order. A step this session follows already keeps its own sink.
    pub(crate) async fn follow(&self, step: usize, sink: OutputSink) {
        loop {
            // Output that arrives meanwhile is kept as unclaimed until the sink is in place,
            // which happens only once nothing unclaimed is left: nothing overtakes.
            let earlier = {
                let mut shared = self.lock();
                match shared.unclaimed.remove(&step) {
                    Some(chunks) => {
                        shared.unclaimed_bytes -= chunks.iter().map(|c| c.data.len()).sum::<usize>();
                        chunks
                    }
                    None => {
                        let slot = shared.steps.entry(step).or_insert_with(|| Slot::new(None));
                        // A step that ended already has no more output: its follower has all
                        // of it once the sink goes.
                        if slot.sink.is_none() && slot.finished.borrow().is_none() {
                            slot.sink = Some(sink);
                        }
                        return;
                    }
                }
            };
            for chunk in earlier {
                if sink.send(chunk).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Whether this session knows the step.
    pub(crate) fn knows(&self, step: usize) -> bool {
        self.lock().steps.contains_key(&step)
    }

    /// Asks the guest for a step's state.
    pub(crate) async fn status(&self, step: usize) -> Result<StepState, RuntimeError> {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut shared = self.lock();
            shared.next_id += 1;
            let id = shared.next_id;
            shared.waiters.insert(id, tx);
            id
        };
        self.send(&HostMessage::Status { id, step }).await?;
        match tokio::time::timeout(ANSWER_PATIENCE, rx).await {
            Ok(Ok(state)) => Ok(state),
            _ => {
                self.lock().waiters.remove(&id);
                Err(RuntimeError::Io {
                    context: format!("status of step {step}"),
                    source: std::io::Error::new(std::io::ErrorKind::TimedOut, "the guest did not answer"),
                })
            }
        }
    }

    /// How the step ended, once it has.
    pub(crate) fn finished(&self, step: usize) -> Option<Finished> {
        self.lock().steps.get(&step).and_then(|slot| *slot.finished.borrow())
    }

    /// Waits until the step ends (or the VM goes away).
    pub(crate) async fn wait(&self, step: usize) -> Option<Finished> {
        let mut rx = self.lock().steps.get(&step)?.finished.subscribe();
        let finished = rx.wait_for(Option::is_some).await.ok()?;
        *finished
    }

    /// Copies the host workspace into the guest.
    pub(crate) async fn upload_workspace(&self, root: &Path) -> Result<(), RuntimeError> {
        let root = root.to_path_buf();
        let entries = tokio::task::spawn_blocking(move || list_tree(&root))
            .await
            .map_err(|e| RuntimeError::Io {
                context: "list workspace".into(),
                source: std::io::Error::other(e),
            })?
            .map_err(|source| RuntimeError::Io { context: "list workspace".into(), source })?;
        for entry in entries {
            match entry {
                TreeEntry::Dir { rel, mode } => self.send(&HostMessage::MakeDir { path: rel, mode }).await?,
                TreeEntry::Symlink { rel, target } => {
                    self.send(&HostMessage::Symlink { path: rel, target }).await?
                }
                TreeEntry::File { rel, mode, full } => {
                    let mut file = tokio::fs::File::open(&full).await.map_err(|source| RuntimeError::Io {
                        context: format!("read {}", full.display()),
                        source,
                    })?;
                    let mut offset = 0u64;
                    let mut buffer = vec![0u8; MAX_CHUNK];
                    loop {
                        let n = file.read(&mut buffer).await.map_err(|source| RuntimeError::Io {
                            context: format!("read {}", full.display()),
                            source,
                        })?;
                        if n == 0 && offset > 0 {
                            break;
                        }
                        let data = buffer[..n].to_vec();
                        self.send(&HostMessage::PutFile { path: rel.clone(), mode, offset, data }).await?;
                        offset += n as u64;
                        if n == 0 {
                            break;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Why a step did not start.
pub(crate) enum StartFailure {
    /// The guest refused (missing program, bad request).
    Guest(StartErrorKind, String),
    /// The session failed.
    Runtime(RuntimeError),
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // Every update is a single insert, remove or send, so a poisoned lock is still usable.
    shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn read_loop(
    mut read: tokio::net::unix::OwnedReadHalf,
    mut decoder: FrameDecoder,
    mut buffer: Vec<u8>,
    shared: Arc<Mutex<Shared>>,
    closed: watch::Sender<bool>,
) {
    let mut splitters: HashMap<(usize, OutputStream), LineSplitter> = HashMap::new();
    'read: loop {
        loop {
            match decoder.next_message::<GuestMessage>() {
                Ok(Some(message)) => handle(message, &shared, &mut splitters).await,
                Ok(None) => break,
                Err(error) => {
                    tracing::warn!(%error, "bad frame from guest; closing the session");
                    break 'read;
                }
            }
        }
        match read.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => decoder.push(&buffer[..n]),
        }
    }
    // The VM is gone: steps that did not report an end never will.
    let unknown = ExitStatus { code: None, signal: None, oom: false };
    for slot in lock(&shared).steps.values_mut() {
        slot.sink = None;
        slot.started = None;
        slot.finished.send_if_modified(|finished| {
            let unset = finished.is_none();
            if unset {
                *finished = Some((unknown, Usage::default()));
            }
            unset
        });
    }
    let _ = closed.send(true);
}

async fn handle(
    message: GuestMessage,
    shared: &Mutex<Shared>,
    splitters: &mut HashMap<(usize, OutputStream), LineSplitter>,
) {
    match message {
        GuestMessage::Hello { .. } => {}
        GuestMessage::Started { step, pid } => {
            if let Some(tx) = lock(shared).steps.get_mut(&step).and_then(|s| s.started.take()) {
                let _ = tx.send(Ok(pid));
            }
        }
        GuestMessage::StartFailed { step, kind, message } => {
            if let Some(tx) = lock(shared).steps.get_mut(&step).and_then(|s| s.started.take()) {
                let _ = tx.send(Err((kind, message)));
            }
        }
        GuestMessage::Output { step, stream, data } => {
            let lines = splitters.entry((step, stream)).or_default().push(&data);
            let sink = {
                let mut shared = lock(shared);
                let sink = shared.steps.get(&step).and_then(|s| s.sink.clone());
                if sink.is_none() {
                    keep_unclaimed(&mut shared, step, stream, lines);
                    return;
                }
                sink
            };
            if let Some(sink) = sink {
                send_lines(&sink, step, stream, lines).await;
            }
        }
        GuestMessage::Exited { step, exit, usage } => {
            let (sink, sync_over) = {
                let mut shared = lock(shared);
                let over = std::mem::take(&mut shared.sync_over);
                shared.synced = 0;
                (shared.steps.get_mut(&step).and_then(|s| s.sink.take()), over)
            };
            // What ends the step's output goes to its follower, or, for a step that ended
            // while no agent listened, waits with the rest of its output for the next one.
            let mut last = Vec::new();
            if sync_over {
                let cap = lock(shared).sync_cap.unwrap_or(MAX_SYNC_BYTES);
                let note = format!(
                    "drover: this step changed more than {cap} bytes of files; the rest were not copied back from the microVM\n"
                );
                last.push((OutputStream::Stderr, note.into_bytes()));
            }
            for stream in [OutputStream::Stdout, OutputStream::Stderr] {
                if let Some(rest) = splitters.remove(&(step, stream)).and_then(|mut s| s.finish()) {
                    last.push((stream, rest));
                }
            }
            for (stream, data) in last {
                match &sink {
                    Some(sink) => send_lines(sink, step, stream, vec![data]).await,
                    None => keep_unclaimed(&mut lock(shared), step, stream, vec![data]),
                }
            }
            let status = ExitStatus { code: exit.code, signal: exit.signal, oom: exit.oom };
            let usage = Usage { cpu_seconds: usage.cpu_seconds, peak_memory_bytes: usage.peak_memory_bytes };
            let mut shared = lock(shared);
            let slot = shared.steps.entry(step).or_insert_with(|| Slot::new(None));
            slot.finished.send_replace(Some((status, usage)));
            tracing::debug!(step, code = ?status.code, signal = ?status.signal, "guest step ended");
        }
        GuestMessage::Status { id, state } => {
            if let Some(tx) = lock(shared).waiters.remove(&id) {
                let _ = tx.send(state);
            }
        }
        GuestMessage::DirChanged { .. }
        | GuestMessage::FileChanged { .. }
        | GuestMessage::SymlinkChanged { .. }
        | GuestMessage::Removed { .. } => {
            let (workspace, message) = count_sync(shared, message);
            if let Some(workspace) = workspace
                && let Err(error) = apply_change(&workspace, message).await
            {
                tracing::warn!(workspace = %workspace.display(), %error, "cannot apply workspace change from guest");
            }
        }
        GuestMessage::Error { message } => tracing::warn!(message, "guest reported an error"),
    }
}

/// Keeps lines of a step nobody follows, up to [`MAX_UNCLAIMED_BYTES`] in all; a step that
/// ended is followed by nobody any more, and its late output has nowhere to go.
fn keep_unclaimed(shared: &mut Shared, step: usize, stream: OutputStream, lines: Vec<Vec<u8>>) {
    if shared.steps.get(&step).is_some_and(|s| s.finished.borrow().is_some()) {
        return;
    }
    let stream = match stream {
        OutputStream::Stdout => Stream::Stdout,
        OutputStream::Stderr => Stream::Stderr,
    };
    for data in lines {
        if shared.unclaimed_bytes + data.len() > MAX_UNCLAIMED_BYTES {
            return;
        }
        shared.unclaimed_bytes += data.len();
        shared.unclaimed.entry(step).or_default().push(OutputChunk { stream, step, data, end: None });
    }
}

async fn send_lines(sink: &OutputSink, step: usize, stream: OutputStream, lines: Vec<Vec<u8>>) {
    let stream = match stream {
        OutputStream::Stdout => Stream::Stdout,
        OutputStream::Stderr => Stream::Stderr,
    };
    for data in lines {
        // A closed sink means nobody listens any more; the rest is dropped.
        if sink.send(OutputChunk { stream, step, data, end: None }).await.is_err() {
            return;
        }
    }
}

/// Counts a file piece against the step's sync cap: over it, the piece becomes the removal of
/// its file. Returns the workspace to apply the change to, if any.
fn count_sync(shared: &Mutex<Shared>, message: GuestMessage) -> (Option<PathBuf>, GuestMessage) {
    let mut shared = lock(shared);
    let GuestMessage::FileChanged { path, data, .. } = &message else {
        return (shared.workspace.clone(), message);
    };
    let cap = shared.sync_cap.unwrap_or(MAX_SYNC_BYTES);
    shared.synced = shared.synced.saturating_add(data.len() as u64);
    if shared.synced <= cap {
        return (shared.workspace.clone(), message);
    }
    if !shared.sync_over {
        tracing::warn!(
            cap,
            path,
            "the guest sent back more than the cap of bytes per step; dropping the rest"
        );
    }
    shared.sync_over = true;
    (shared.workspace.clone(), GuestMessage::Removed { path: path.clone() })
}

/// Applies a change the guest reported to the host workspace. The guest is not trusted:
/// paths must be relative without `..`, no link on the way or at the end is followed (one the
/// guest created could otherwise point anywhere on the host; see [`crate::beneath`]), and
/// modes lose their setuid, setgid and sticky bits.
async fn apply_change(workspace: &Path, message: GuestMessage) -> Result<(), BeneathError> {
    let workspace = workspace.to_path_buf();
    tokio::task::spawn_blocking(move || apply_change_now(&workspace, message)).await.map_err(|e| {
        BeneathError::Io {
            action: "apply a guest change to",
            path: ".".into(),
            source: std::io::Error::other(e),
        }
    })?
}

fn apply_change_now(workspace: &Path, message: GuestMessage) -> Result<(), BeneathError> {
    let path = match &message {
        GuestMessage::DirChanged { path, .. }
        | GuestMessage::FileChanged { path, .. }
        | GuestMessage::SymlinkChanged { path, .. }
        | GuestMessage::Removed { path } => path.clone(),
        _ => return Ok(()),
    };
    if !is_safe_relative_path(&path) {
        return Err(BeneathError::NotRelative { path });
    }
    let rel = RelPath::new(&path)?;
    let root = Dir::open(workspace)?;
    match message {
        GuestMessage::Removed { .. } => root.remove(&rel),
        GuestMessage::DirChanged { mode, .. } => {
            if !matches!(root.open_dir(&rel), Ok(_) | Err(BeneathError::NotFound { .. })) {
                root.remove(&rel)?;
            }
            root.create_dir_all(&rel, Some(mode)).map(drop)
        }
        GuestMessage::SymlinkChanged { target, .. } => {
            root.remove(&rel)?;
            root.symlink(&rel, Path::new(&target))
        }
        GuestMessage::FileChanged { mode, offset, data, .. } => {
            use std::os::unix::fs::FileExt;
            let file = if offset == 0 {
                root.remove(&rel)?;
                root.create_file(&rel, mode)?
            } else {
                root.open_for_write(&rel, mode)?
            };
            file.write_all_at(&data, offset).map_err(|source| BeneathError::Io {
                action: "write",
                path: path.clone(),
                source,
            })
        }
        _ => Ok(()),
    }
}

enum TreeEntry {
    Dir { rel: String, mode: u32 },
    File { rel: String, mode: u32, full: PathBuf },
    Symlink { rel: String, target: String },
}

/// The workspace tree, parents before children.
fn list_tree(root: &Path) -> std::io::Result<Vec<TreeEntry>> {
    use std::os::unix::fs::PermissionsExt;
    fn walk(dir: &Path, prefix: &str, out: &mut Vec<TreeEntry>) -> std::io::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                tracing::warn!(path = %entry.path().display(), "skipping a workspace path that is not UTF-8");
                continue;
            };
            let rel = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
            let meta = std::fs::symlink_metadata(entry.path())?;
            let mode = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(entry.path())?.to_string_lossy().into_owned();
                out.push(TreeEntry::Symlink { rel, target });
            } else if meta.is_dir() {
                out.push(TreeEntry::Dir { rel: rel.clone(), mode });
                walk(&entry.path(), &rel, out)?;
            } else if meta.is_file() {
                out.push(TreeEntry::File { rel, mode, full: entry.path() });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    if root.exists() {
        walk(root, "", &mut out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn guest_changes_cannot_escape_the_workspace() {
        let root = tempfile::tempdir().expect("tempdir");
        let workspace = root.path().join("ws");
        std::fs::create_dir(&workspace).expect("mkdir");
        let outside = root.path().join("outside.txt");
        std::fs::write(&outside, "precious").expect("write");

        let link =
            GuestMessage::SymlinkChanged { path: "evil".into(), target: outside.display().to_string() };
        apply_change(&workspace, link).await.expect("a symlink inside is fine");
        let through_link =
            GuestMessage::FileChanged { path: "evil".into(), mode: 0o644, offset: 3, data: b"XX".to_vec() };
        assert!(apply_change(&workspace, through_link).await.is_err());
        let below_link =
            GuestMessage::FileChanged { path: "evil/x".into(), mode: 0o644, offset: 0, data: b"XX".to_vec() };
        assert!(apply_change(&workspace, below_link).await.is_err());
        let dotdot =
            GuestMessage::FileChanged { path: "../outside.txt".into(), mode: 0o644, offset: 0, data: vec![] };
        assert!(apply_change(&workspace, dotdot).await.is_err());
        assert_eq!(std::fs::read_to_string(&outside).expect("read"), "precious");

        let file =
            GuestMessage::FileChanged { path: "ok.txt".into(), mode: 0o600, offset: 0, data: b"hi".to_vec() };
        apply_change(&workspace, file).await.expect("plain file");
        assert_eq!(std::fs::read_to_string(workspace.join("ok.txt")).expect("read"), "hi");
        apply_change(&workspace, GuestMessage::Removed { path: "ok.txt".into() }).await.expect("remove");
        assert!(!workspace.join("ok.txt").exists());
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::symlink_metadata(path).expect("stat").permissions().mode() & 0o7777
    }

    #[tokio::test]
    async fn a_setuid_file_from_the_guest_arrives_without_the_bit() {
        let root = tempfile::tempdir().expect("tempdir");
        let workspace = root.path().to_path_buf();
        let dir = GuestMessage::DirChanged { path: "bin".into(), mode: 0o7777 };
        apply_change(&workspace, dir).await.expect("dir");
        // The bytes a guest sends for `chmod 6755 bin/tool` (two pieces).
        let first = GuestMessage::FileChanged {
            path: "bin/tool".into(),
            mode: 0o6755,
            offset: 0,
            data: b"#!".to_vec(),
        };
        let second = GuestMessage::FileChanged {
            path: "bin/tool".into(),
            mode: 0o6755,
            offset: 2,
            data: b"/bin/sh".to_vec(),
        };
        apply_change(&workspace, first).await.expect("first piece");
        apply_change(&workspace, second).await.expect("second piece");
        assert_eq!(std::fs::read_to_string(workspace.join("bin/tool")).expect("read"), "#!/bin/sh");
        assert_eq!((mode(&workspace.join("bin")), mode(&workspace.join("bin/tool"))), (0o755, 0o755));
    }

    #[tokio::test]
    async fn a_step_syncing_more_than_the_cap_is_cut_off_and_told() {
        let root = tempfile::tempdir().expect("tempdir");
        let workspace = root.path().to_path_buf();
        let shared = Mutex::new(Shared {
            workspace: Some(workspace.clone()),
            sync_cap: Some(10),
            ..Default::default()
        });
        let (sink, mut output) = tokio::sync::mpsc::channel(16);
        lock(&shared).steps.insert(0, Slot::new(Some(sink)));
        let mut splitters = HashMap::new();
        let piece = |path: &str, offset: u64| GuestMessage::FileChanged {
            path: path.into(),
            mode: 0o644,
            offset,
            data: b"123456".to_vec(),
        };
        handle(piece("a", 0), &shared, &mut splitters).await;
        handle(piece("b", 0), &shared, &mut splitters).await;
        handle(piece("b", 6), &shared, &mut splitters).await;
        assert_eq!(std::fs::read_to_string(workspace.join("a")).expect("a"), "123456");
        assert!(!workspace.join("b").exists(), "a file over the cap is not kept in part");
        let exit = drover_guest::protocol::StepExit { code: Some(0), signal: None, oom: false };
        let usage = drover_guest::protocol::StepUsage::default();
        handle(GuestMessage::Exited { step: 0, exit, usage }, &shared, &mut splitters).await;
        let note = output.recv().await.expect("a note on stderr");
        assert_eq!(note.stream, Stream::Stderr);
        assert!(String::from_utf8_lossy(&note.data).contains("more than 10 bytes"), "{:?}", note.data);
        // The next step starts afresh.
        handle(piece("c", 0), &shared, &mut splitters).await;
        assert!(workspace.join("c").exists());
    }
}
