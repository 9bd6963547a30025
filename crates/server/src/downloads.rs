//! What the gRPC and HTTP APIs both serve: artifact downloads (kept in the blob store, or read
//! live from a running task) and log streams (archived attempts from the blob store, the rest
//! from live rows).

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;

use drover_proto as pb;
use drover_store::{LogArchiveRecord, LogChunk, TaskFilter};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::convert::{self, status};
use crate::log_archive::ArchiveReader;
use crate::streams::{self, StreamKind};
use crate::{Shared, live_files, transfer};

/// Bytes of output per batch sent to a client (about: whole stored chunks).
const BATCH_BYTES: usize = 1 << 20;

/// A stream of API messages.
pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// An artifact on its way to a client.
pub(crate) struct Download {
    /// The size, when it is known up front (kept artifacts; a live file may still grow).
    pub(crate) size: Option<u64>,
    /// The content.
    pub(crate) chunks: BoxStream<pb::BlobChunk>,
}

/// Parses `NAME` or `NAME[FRAME]`.
pub(crate) fn task_filter(text: &str) -> Result<TaskFilter, Status> {
    TaskFilter::parse(text)
        .ok_or_else(|| Status::invalid_argument(format!("`{text}` is not a task; write NAME or NAME[FRAME]")))
}

/// The error for a job that does not exist.
pub(crate) fn no_job(id: i64) -> Status {
    Status::not_found(format!("job {id} not found; `drover ps --all` lists jobs"))
}

/// One file of a task: the artifact it kept, or, while the task runs and has not kept it yet,
/// the file as it is now in the task's workspace.
pub(crate) async fn artifact(
    shared: &Arc<Shared>,
    job_id: i64,
    task: &str,
    path: &str,
) -> Result<Download, Status> {
    let filter = task_filter(task)?;
    shared.store.job(job_id).await.map_err(status)?.ok_or_else(|| no_job(job_id))?;
    let found = shared.artifacts.artifacts(job_id, &filter).await.map_err(status)?;
    let matching: Vec<_> = found.iter().filter(|a| a.path == path).collect();
    if let Some(first) = matching.first() {
        if matching.iter().any(|a| a.task_id != first.task_id) {
            return Err(Status::invalid_argument(format!(
                "several frames of `{task}` kept `{path}`; name one as NAME[FRAME]"
            )));
        }
        let digest = transfer::digest(&first.digest)?;
        let chunks = transfer::get(&shared.blobs, &digest).await?;
        return Ok(Download { size: Some(first.size), chunks });
    }
    let live = shared.artifacts.live_attempts(job_id, &filter).await.map_err(status)?;
    match live.as_slice() {
        [] => Err(Status::not_found(format!(
            "job {job_id} has no artifact `{path}` from `{task}` and no such task is running; \
             `drover artifacts ls {job_id}` lists them"
        ))),
        [attempt] => {
            tracing::info!(
                job_id,
                task_id = attempt.task_id,
                attempt_id = attempt.attempt_id,
                node_id = attempt.node_id,
                path,
                "reading a file of a running task"
            );
            let chunks = live_files::read(shared.clone(), attempt, path).await?;
            Ok(Download { size: None, chunks })
        }
        _ => Err(Status::invalid_argument(format!(
            "several frames of `{task}` are running; name one as NAME[FRAME]"
        ))),
    }
}

/// A job's output from line `after_id` on; with `follow`, until the selected tasks end. With
/// `chunks`, batches carry runs of lines ([`pb::LogChunk`]) as they are stored; without, one
/// [`pb::LogLine`] per line, for clients that predate chunks.
///
/// Attempts whose log is archived are read from the blob store (each once, whole), the others
/// from live rows. An attempt archived while it is being followed continues from its archive
/// after the last line already sent, so no line is lost or repeated.
pub(crate) async fn logs(
    shared: Arc<Shared>,
    job_id: i64,
    task: &str,
    follow: bool,
    after_id: i64,
    chunks: bool,
) -> Result<BoxStream<pb::LogBatch>, Status> {
    let filter = task_filter(task)?;
    shared.store.job(job_id).await.map_err(status)?.ok_or_else(|| no_job(job_id))?;
    let tasks = shared.store.tasks(job_id).await.map_err(status)?;
    if !tasks.iter().any(|t| filter.matches(&t.name, t.frame)) {
        return Err(Status::not_found(format!("job {job_id} has no task `{task}`")));
    }
    let (tx, rx) = mpsc::channel(16);
    let open = shared.streams.open(StreamKind::Logs);
    tokio::spawn(async move {
        let _open = open;
        let mut follower =
            Follower { shared, job_id, filter, tx, chunks, sent: HashMap::new(), archived: HashSet::new() };
        if let Err(e) = follower.run(follow, after_id).await {
            let _ = follower.tx.send(Err(e)).await;
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}

/// The state of one log stream.
struct Follower {
    shared: Arc<Shared>,
    job_id: i64,
    filter: TaskFilter,
    tx: mpsc::Sender<Result<pb::LogBatch, Status>>,
    /// Whether the client takes runs of lines rather than lines.
    chunks: bool,
    /// The last live line id sent per attempt, by (task id, attempt number).
    sent: HashMap<(i64, u32), i64>,
    /// Attempts (by id) already sent from their archive. Not by task and attempt number: an
    /// attempt that never reached its agent gives its number back, so two attempts (an empty
    /// archived one and a live one) can share it.
    archived: HashSet<i64>,
}

/// Why a stream stopped early: the client went away (not an error), or a real error.
enum Stop {
    Gone,
    Failed(Status),
}

impl From<Status> for Stop {
    fn from(s: Status) -> Stop {
        Stop::Failed(s)
    }
}

impl Follower {
    async fn run(&mut self, follow: bool, after_id: i64) -> Result<(), Status> {
        match self.stream(follow, after_id).await {
            Ok(()) | Err(Stop::Gone) => Ok(()),
            Err(Stop::Failed(s)) => Err(s),
        }
    }

    async fn stream(&mut self, follow: bool, after_id: i64) -> Result<(), Stop> {
        let mut changes = self.shared.changes.subscribe();
        let mut after = after_id;
        let mut finished = false;
        loop {
            changes.mark_unchanged();
            self.send_new_archives(after_id).await?;
            let chunks = self
                .shared
                .store
                .log_chunks_after(self.job_id, &self.filter, after, BATCH_BYTES)
                .await
                .map_err(status)?;
            if let Some(last) = chunks.last() {
                after = last.last_id();
                let mut batch = Vec::with_capacity(chunks.len());
                // No live row belongs to an attempt already sent from its archive: archiving
                // deletes the attempt's rows in the same transaction.
                for chunk in chunks {
                    self.sent.insert((chunk.task_id, chunk.attempt), chunk.last_id());
                    batch.push(chunk);
                }
                self.send(batch).await?;
                continue;
            }
            // Output is stored before the attempt's end, so once every selected task is
            // final, one more empty read proves nothing is left.
            if !follow || finished {
                // An attempt archived since the pass above had its live rows deleted in the
                // same transaction, so this pass finds whatever the empty read missed.
                return self.send_new_archives(after_id).await;
            }
            let tasks = self.shared.store.tasks(self.job_id).await.map_err(status)?;
            finished =
                tasks.iter().filter(|t| self.filter.matches(&t.name, t.frame)).all(|t| t.state.is_final());
            if !finished && !streams::wait_for_change(&mut changes, &self.tx).await {
                tracing::debug!(job_id = self.job_id, after_id = after, "log follower left");
                return Err(Stop::Gone);
            }
        }
    }

    /// Sends every archive not sent yet, each after the last of its lines sent live.
    async fn send_new_archives(&mut self, after_id: i64) -> Result<(), Stop> {
        let archives = self.shared.artifacts.log_archives(self.job_id, &self.filter).await.map_err(status)?;
        for archive in archives {
            if self.archived.insert(archive.attempt_id) {
                let key = (archive.task_id, archive.attempt);
                let floor = self.sent.get(&key).copied().unwrap_or(after_id).max(after_id);
                self.send_archive(&archive, floor).await?;
            }
        }
        Ok(())
    }

    async fn send_archive(&mut self, archive: &LogArchiveRecord, floor: i64) -> Result<(), Stop> {
        let damaged = |e: std::io::Error| {
            tracing::error!(job_id = self.job_id, task_id = archive.task_id, attempt_id = archive.attempt_id,
                digest = %archive.digest, error = %e, "cannot read a log archive");
            Status::data_loss(format!(
                "the log of `{}` attempt {} cannot be read from the blob store: {e}",
                archive.task_name, archive.attempt
            ))
        };
        let mut reader = ArchiveReader::open(&self.shared.blobs, archive).await.map_err(damaged)?;
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(chunk) = reader.next().await.map_err(damaged)? {
            let Some(chunk) = chunk.after(floor) else { continue };
            bytes += chunk.data.len();
            batch.push(chunk);
            if bytes >= BATCH_BYTES {
                self.send(std::mem::take(&mut batch)).await?;
                bytes = 0;
            }
        }
        self.send(batch).await
    }

    async fn send(&self, chunks: Vec<LogChunk>) -> Result<(), Stop> {
        if chunks.is_empty() {
            return Ok(());
        }
        let batch = if self.chunks {
            pb::LogBatch { lines: Vec::new(), chunks: chunks.into_iter().map(convert::log_chunk).collect() }
        } else {
            let lines = chunks.into_iter().flat_map(LogChunk::into_records).map(convert::log_line).collect();
            pb::LogBatch { lines, chunks: Vec::new() }
        };
        self.tx.send(Ok(batch)).await.map_err(|_| Stop::Gone)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use drover_store::conformance::{job, schedule, task};
    use drover_store::sqlite::SqliteStore;
    use drover_store::{ArchiveStore, AttemptReport, NodeSpec, OutputLine, Store};
    use futures::StreamExt;

    use super::*;
    use crate::log_archive;
    use crate::testing::shared_over;

    fn line(text: &str) -> OutputLine {
        OutputLine { step: 0, stderr: false, data: text.as_bytes().to_vec() }
    }

    fn node() -> NodeSpec {
        NodeSpec {
            name: "n".into(),
            labels: BTreeMap::new(),
            cores: 1,
            memory: 1 << 30,
            runtimes: vec!["process".into()],
            lease_until_ms: i64::MAX / 2,
        }
    }

    /// An attempt that never reached its agent gives its number back; its empty archive must
    /// not hide the live output of the attempt that reuses the number.
    #[tokio::test]
    async fn an_undelivered_attempts_archive_does_not_hide_its_retry() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("drover.db")).await.unwrap());
        let shared = shared_over(store.clone());
        let job_id = store.submit(&job(vec![task("t", &[])]), "", "f", 1).await.unwrap();
        store.register_node(&node(), &[], 1).await.unwrap();
        let undelivered = schedule(&*store, 2).await.remove(0);
        // The agent registers again without it: handed back, its number given back.
        store.register_node(&node(), &[], 3).await.unwrap();
        let pending = store.unarchived_attempts(10).await.unwrap();
        assert_eq!(pending.len(), 1);
        log_archive::archive_one(&shared, pending[0]).await.unwrap();
        let retry = schedule(&*store, 4).await.remove(0);
        assert_eq!((retry.number, retry.task_id), (undelivered.number, undelivered.task_id));
        store.append_output(retry.attempt_id, retry.epoch, &[line("hi\n")]).await.unwrap();

        let mut stream = logs(shared, job_id, "", false, 0, true).await.unwrap();
        let mut bytes = Vec::new();
        while let Some(batch) = stream.next().await {
            for c in batch.unwrap().chunks {
                bytes.extend(c.data);
            }
        }
        assert_eq!(bytes, b"hi\n");
    }

    /// A follower that sent part of an attempt live continues from the archive after the last
    /// line it sent when the attempt is archived (and its live rows deleted) in between.
    #[tokio::test]
    async fn a_follower_continues_from_the_archive_without_repeating_lines() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("drover.db")).await.unwrap());
        let shared = shared_over(store.clone());
        let job_id = store.submit(&job(vec![task("t", &[])]), "", "f", 1).await.unwrap();
        store.register_node(&node(), &[], 1).await.unwrap();
        let a = schedule(&*store, 2).await.remove(0);
        store.append_output(a.attempt_id, a.epoch, &[line("1\n"), line("2\n")]).await.unwrap();

        // A client of lines follows; a client of chunks reads the archive afterwards.
        let mut stream = logs(shared.clone(), job_id, "", true, 0, false).await.unwrap();
        let first = stream.next().await.unwrap().unwrap();
        let texts = |b: &pb::LogBatch| {
            let mut texts: Vec<String> =
                b.lines.iter().map(|l| String::from_utf8_lossy(&l.data).to_string()).collect();
            for c in &b.chunks {
                let mut at = 0;
                for &len in &c.lens {
                    texts.push(String::from_utf8_lossy(&c.data[at..at + len as usize]).to_string());
                    at += len as usize;
                }
            }
            texts
        };
        assert_eq!(texts(&first), vec!["1\n", "2\n"]);

        store.append_output(a.attempt_id, a.epoch, &[line("3\n")]).await.unwrap();
        let report = AttemptReport {
            attempt_id: a.attempt_id,
            epoch: a.epoch,
            exit_code: Some(0),
            signal: None,
            failure: None,
            message: String::new(),
            cpu_seconds: 0.0,
            peak_memory: 0,
            input_tokens: 0,
            output_tokens: 0,
        };
        store.attempt_finished(&report, 3).await.unwrap();
        let pending = store.unarchived_attempts(10).await.unwrap();
        log_archive::archive_one(&shared, pending[0]).await.unwrap();
        assert!(store.logs_after(job_id, &TaskFilter::default(), 0, 10).await.unwrap().is_empty());
        shared.changes.send_modify(|v| *v += 1);

        let mut rest = Vec::new();
        while let Some(batch) = stream.next().await {
            rest.extend(texts(&batch.unwrap()));
        }
        assert_eq!(rest, vec!["3\n"]);
        // A new reader gets the whole attempt from the archive.
        let mut again = Vec::new();
        let mut stream = logs(shared, job_id, "t", false, 0, true).await.unwrap();
        while let Some(batch) = stream.next().await {
            again.extend(texts(&batch.unwrap()));
        }
        assert_eq!(again, vec!["1\n", "2\n", "3\n"]);
    }
}
