//! The agent's state log: one append-only file that keeps what must outlive the agent process,
//! so that a restarted agent (after a crash or a `kill -9`) loses nothing it had not handed on.
//!
//! It holds the journal's entries (which step of which attempt runs where) and every report
//! the outbox queued for the server until the server acknowledged it. Appends go to one writer
//! thread, which writes them in arrival order and syncs the file to disk in batches: at once
//! after a quiet spell, then at most every [`SYNC_EVERY`]. A caller that waits for its append
//! knows the record is in the file (and so survives the agent process); the disk sync follows.
//!
//! Output is not synced on its own account: it is in the file (so it survives the agent
//! process) as soon as its append returns, reaches the disk with the next sync an update or
//! a journal entry asks for, and mostly never does, because the rewrite drops it once
//! acknowledged. After a crash of the whole machine the tasks that wrote it are gone too.
//!
//! One file instead of a file per attempt: creating and removing files costs a busy node more
//! than writing a few hundred bytes (every new file is an inode to find and free). The log is
//! rewritten with only what still matters when it is opened and whenever it has grown past
//! [`COMPACT_AT`] with less than half of it live.

mod frame;
mod live;
mod rewrite;

pub use frame::{FrameError, LoggedReport, Record};

use live::{Live, Span};

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::journal::Entry;

/// Mode of the log's directory: the agent's user only.
const DIR_MODE: u32 = 0o700;
/// Mode of the log: it names tasks' secrets (never their values) and holds their output.
const FILE_MODE: u32 = 0o600;
/// The log's file name inside its directory.
const FILE_NAME: &str = "log";
/// Size past which the log is rewritten, if less than half of it is still live.
pub const COMPACT_AT: u64 = 64 << 20;
/// Longest time written records wait for their disk sync while appends keep coming.
pub const SYNC_EVERY: Duration = Duration::from_millis(50);

/// Why the state log cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateLogError {
    /// A file operation failed.
    #[error("state log {context}: {source}")]
    Io {
        /// What was being done, and on which path.
        context: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A record could not be framed (too large to be one).
    #[error("state log record: {0}")]
    Frame(#[from] FrameError),
    /// The writer thread is gone (the agent is shutting down).
    #[error("the state log's writer has stopped")]
    Closed,
}

impl StateLogError {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StateLogError::Io { context: context.into(), source }
    }
}

/// An append on its way to the file (see [`StateLog::append_in_order`]).
#[derive(Debug)]
pub struct Appending(oneshot::Receiver<Result<(), String>>);

impl Appending {
    /// Waits until the record is in the file.
    pub async fn written(self) -> Result<(), StateLogError> {
        match self.0.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(StateLogError::io("append", std::io::Error::other(why))),
            Err(_) => Err(StateLogError::Closed),
        }
    }
}

/// What an earlier agent run left in the log.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Journal entries of attempts that had not ended, in the order they were recorded.
    pub entries: Vec<Entry>,
    /// Reports the server had not acknowledged, by sequence number.
    pub reports: Vec<LoggedReport>,
    /// How far the output in the outbox (acknowledged or not) reaches, per attempt whose
    /// entry is live (see [`crate::reach`]).
    pub reach: std::collections::HashMap<i64, crate::reach::OutputReach>,
    /// The highest sequence number the log has seen, acknowledged or not: new reports
    /// continue after it.
    pub last_seq: u64,
    /// Why the log's end was not read, when it ended in a damaged frame (the remains of a
    /// write a crash cut short).
    pub damaged_tail: Option<String>,
}

/// What one append carries to the writer thread.
struct Job {
    /// Framed by the writer thread, off the caller's path: a report of output is a checksum
    /// over a MiB.
    record: Record,
    done: Option<oneshot::Sender<Result<(), String>>>,
}

/// The log, shared by the journal and the outbox. Dropping it waits until everything
/// appended is written and synced.
#[derive(Debug)]
pub struct StateLog {
    /// `None` only while dropping.
    jobs: Option<mpsc::Sender<Job>>,
    writer: Option<std::thread::JoinHandle<()>>,
    path: PathBuf,
}

impl Drop for StateLog {
    fn drop(&mut self) {
        // The writer ends once it has written what waits and sees no sender left.
        self.jobs.take();
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::warn!("the state log's writer panicked");
        }
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("key", &self.record.key()).finish()
    }
}

impl StateLog {
    /// Opens the log in `dir` (made if missing, with the agent's user as its only reader),
    /// reads what an earlier run left, rewrites the file with only that, and starts the
    /// writer.
    pub fn open(dir: &Path) -> Result<(Arc<StateLog>, Recovered), StateLogError> {
        make_private_dir(dir)?;
        let path = dir.join(FILE_NAME);
        let (recovered, live, file) = rewrite::rewrite(&path)?;
        let (jobs, rx) = mpsc::channel();
        let len = live.bytes();
        let writer =
            Writer { file, path: path.clone(), len, live, last_sync: Instant::now(), compact_at: COMPACT_AT };
        let writer = std::thread::Builder::new()
            .name("drover-state-log".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StateLogError::io("start the writer thread", e))?;
        Ok((Arc::new(StateLog { jobs: Some(jobs), writer: Some(writer), path }), recovered))
    }

    /// Where the log is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `record` and waits until it is in the file (its disk sync follows in a batch).
    pub async fn append(&self, record: Record) -> Result<(), StateLogError> {
        self.append_in_order(record)?.written().await
    }

    /// Appends `record` after everything appended before it, as [`StateLog::append_later`]
    /// does, and returns what tells when it is in the file.
    pub fn append_in_order(&self, record: Record) -> Result<Appending, StateLogError> {
        let (tx, rx) = oneshot::channel();
        self.send(record, Some(tx))?;
        Ok(Appending(rx))
    }

    /// Appends `record` after everything appended before it, without waiting; a failure is
    /// logged by the writer. Records reach the file in the order they are appended, so one
    /// appended later (an acknowledgement, an attempt's end in the journal) is never in the
    /// file without those before it.
    pub fn append_later(&self, record: Record) {
        if let Err(e) = self.send(record, None) {
            tracing::warn!(error = %e, "cannot append to the state log");
        }
    }

    fn send(
        &self,
        record: Record,
        done: Option<oneshot::Sender<Result<(), String>>>,
    ) -> Result<(), StateLogError> {
        let jobs = self.jobs.as_ref().ok_or(StateLogError::Closed)?;
        jobs.send(Job { record, done }).map_err(|_| StateLogError::Closed)
    }
}

/// What the log in `dir` holds, read without changing it: for looking into the state of an
/// agent, which may be running (a frame it is writing then reads as a damaged tail).
pub fn peek(dir: &Path) -> Result<Recovered, StateLogError> {
    rewrite::peek(&dir.join(FILE_NAME))
}

/// Makes `dir` (and its parents) and narrows it to the agent's user, also when an older
/// agent made it wider.
fn make_private_dir(dir: &Path) -> Result<(), StateLogError> {
    use std::os::unix::fs::DirBuilderExt;
    let context = || format!("directory {}", dir.display());
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|e| StateLogError::io(context(), e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))
        .map_err(|e| StateLogError::io(context(), e))
}

fn open_append(path: &Path) -> Result<File, StateLogError> {
    use std::os::unix::fs::OpenOptionsExt;
    // Read too: compaction copies live frames out of it.
    std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(|e| StateLogError::io(format!("open {}", path.display()), e))
}

/// The writer thread's state.
struct Writer {
    file: File,
    path: PathBuf,
    /// Bytes in the file.
    len: u64,
    live: Live,
    last_sync: Instant,
    /// No compaction before the file is this long (moved on when one fails).
    compact_at: u64,
}

impl Writer {
    fn run(mut self, jobs: mpsc::Receiver<Job>) {
        // Written since the last sync.
        let mut dirty = false;
        loop {
            let job = if dirty {
                let wait = SYNC_EVERY.saturating_sub(self.last_sync.elapsed());
                match jobs.recv_timeout(wait) {
                    Ok(job) => job,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.sync();
                        dirty = false;
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match jobs.recv() {
                    Ok(job) => job,
                    Err(_) => break,
                }
            };
            // After a quiet spell the first such write is synced at once; those that follow it
            // within `SYNC_EVERY` share the next sync.
            let sync = job.record.wants_sync();
            dirty |= self.write(job) && sync;
            if dirty && self.last_sync.elapsed() >= SYNC_EVERY {
                self.sync();
                dirty = false;
            }
            if self.len >= self.compact_at && self.live.bytes() < self.len / 2 {
                self.compact();
                dirty = false;
            }
        }
        if dirty {
            self.sync();
        }
    }

    /// Writes one frame; whether the file changed.
    fn write(&mut self, job: Job) -> bool {
        let result = match job.record.encode() {
            Ok(frame) => self.append_frame(&frame).map(|span| {
                self.live.note(job.record.key(), span);
                if let Some((attempt_id, reach)) = job.record.reach() {
                    self.live.note_reach(attempt_id, reach);
                }
            }),
            Err(e) => {
                tracing::warn!(error = %e, "a record too large for the state log was not kept");
                Err(e.to_string())
            }
        };
        let wrote = result.is_ok();
        if let Some(done) = job.done {
            let _ = done.send(result);
        }
        wrote
    }

    /// Appends one frame; where it went.
    fn append_frame(&mut self, frame: &[u8]) -> Result<Span, String> {
        match self.file.write_all(frame) {
            Ok(()) => {
                let span = Span { offset: self.len, len: frame.len() as u64 };
                self.len += span.len;
                Ok(span)
            }
            Err(e) => {
                // A frame cut short would end every later read of the log at it: cut it off.
                tracing::warn!(error = %e, path = %self.path.display(), "cannot append to the state log");
                if let Err(e) = self.file.set_len(self.len) {
                    tracing::warn!(error = %e, "cannot cut a failed append off the state log");
                }
                Err(e.to_string())
            }
        }
    }

    fn sync(&mut self) {
        if let Err(e) = self.file.sync_data() {
            tracing::warn!(error = %e, "cannot sync the state log to disk");
        }
        self.last_sync = Instant::now();
    }

    /// Rewrites the file with only its live records, copied from where the writer noted
    /// them (the rest is never read). The old file is not synced first: the new one, synced
    /// before it replaces the old, holds everything that still matters.
    fn compact(&mut self) {
        let frames = self.live.frames();
        let reach = self.live.reaches();
        match rewrite::copy_live(Some(&self.file), &frames, &reach, self.live.acked(), &self.path, None) {
            Ok((live, file)) => {
                tracing::debug!(before = self.len, after = live.bytes(), "state log compacted");
                self.len = live.bytes();
                self.live = live;
                self.file = file;
                self.compact_at = COMPACT_AT;
            }
            Err(e) => {
                // The log stays whole, only longer; a later append tries again.
                tracing::warn!(error = %e, "cannot compact the state log");
                self.compact_at = self.len + COMPACT_AT / 4;
            }
        }
    }
}

#[cfg(test)]
mod tests;
