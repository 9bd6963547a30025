//! Attempt logs in the blob store: when an attempt has ended, its output moves from live rows
//! into one blob, which is what `logs` serves from then on; after the retention period the
//! archive is dropped.
//!
//! An archive is a header followed by frames. Version 2 (written now) has one frame per run of
//! lines as the store keeps them: the first line's `id` (i64), `step` (u32), `stderr` (u8), the
//! number of length runs (u32) and of data bytes (u32), then each run as a line length and a
//! count (u32 each), then the data; the lines' ids follow on from the first. Version 1 (still
//! read) had one frame per line: `id` (i64), `step` (u32), `stderr` (u8), data length (u32),
//! then the data. All integers are little-endian. Keeping the line ids lets a reader resume
//! where it stopped and merge archives with live rows without duplicates.

use std::sync::Arc;
use std::time::Duration;

use drover_blobs::{BlobReader, BlobStore};
use drover_store::{LogArchiveRecord, LogChunk, UnarchivedAttempt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Shared, now_ms};

/// The first bytes of an archive of one frame per line.
const MAGIC_V1: &[u8] = b"drover-log-v1\n";
/// The first bytes of an archive of one frame per run of lines (same length as version 1's).
const MAGIC: &[u8] = b"drover-log-v2\n";
/// Bytes of live output read per query while archiving.
const PAGE_BYTES: usize = 1 << 20;
/// Attempts archived per round.
const BATCH: u32 = 100;
/// Archives expired per round.
const EXPIRE_BATCH: u32 = 1000;
/// The most data one frame may hold; a bigger frame means the archive is damaged.
const MAX_FRAME: u32 = 64 << 20;
/// The most length runs one frame may hold (a stored chunk has at most 65,536 lines).
const MAX_RUNS: u32 = 1 << 16;
/// Lines of a version 1 archive are gathered into runs of about this many bytes.
const V1_RUN_BYTES: usize = 256 << 10;

/// Errors of archiving one attempt.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ArchiveError {
    #[error(transparent)]
    Store(#[from] drover_store::StoreError),
    #[error(transparent)]
    Blob(#[from] drover_blobs::BlobError),
    #[error("cannot encode the archive: {0}")]
    Encode(#[from] std::io::Error),
    #[error(transparent)]
    Claim(#[from] crate::retention::ClaimError),
}

/// Appends `chunk` as one version 2 frame.
fn encode(out: &mut Vec<u8>, chunk: &LogChunk) {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for &len in &chunk.lens {
        match runs.last_mut() {
            Some((l, count)) if *l == len => *count += 1,
            _ => runs.push((len, 1)),
        }
    }
    out.extend_from_slice(&chunk.first_id.to_le_bytes());
    out.extend_from_slice(&chunk.step.to_le_bytes());
    out.push(u8::from(chunk.stderr));
    out.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    out.extend_from_slice(&(chunk.data.len() as u32).to_le_bytes());
    for (len, count) in runs {
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
    }
    out.extend_from_slice(&chunk.data);
}

fn damaged(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("damaged log archive: {what}"))
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_i64(b: &[u8]) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    i64::from_le_bytes(a)
}

/// A line of a version 1 archive.
struct V1Line {
    id: i64,
    step: u32,
    stderr: bool,
    data: Vec<u8>,
}

/// Reads an archive as runs of lines, so serving a large archive holds one run in memory.
pub(crate) struct ArchiveReader {
    reader: BlobReader,
    record: LogArchiveRecord,
    /// The format, once the header was read.
    version: Option<u8>,
    /// A version 1 line read ahead that did not continue the run before it.
    ahead: Option<V1Line>,
}

impl ArchiveReader {
    /// Opens the archive of `record`.
    pub(crate) async fn open(
        blobs: &Arc<dyn BlobStore>,
        record: &LogArchiveRecord,
    ) -> Result<ArchiveReader, std::io::Error> {
        let digest: drover_blobs::Digest = record.digest.parse().map_err(std::io::Error::other)?;
        let reader = blobs.get(&digest).await.map_err(std::io::Error::other)?;
        Ok(ArchiveReader { reader, record: record.clone(), version: None, ahead: None })
    }

    /// The next run of lines, `None` at the end. The blob store verifies the content as it is
    /// read, so a damaged archive ends with an error rather than with wrong lines.
    pub(crate) async fn next(&mut self) -> Result<Option<LogChunk>, std::io::Error> {
        let version = match self.version {
            Some(v) => v,
            None => {
                let mut magic = [0u8; MAGIC.len()];
                self.reader.read_exact(&mut magic).await?;
                let v = match &magic[..] {
                    m if m == MAGIC => 2,
                    m if m == MAGIC_V1 => 1,
                    _ => return Err(damaged("not a drover log archive")),
                };
                self.version = Some(v);
                v
            }
        };
        if version == 1 { self.next_v1().await } else { self.next_v2().await }
    }

    fn chunk(&self, first_id: i64, step: u32, stderr: bool) -> LogChunk {
        LogChunk {
            first_id,
            task_id: self.record.task_id,
            task_name: self.record.task_name.clone(),
            frame: self.record.frame,
            attempt: self.record.attempt,
            step,
            stderr,
            lens: Vec::new(),
            data: Vec::new(),
        }
    }

    /// Reads the first byte of a frame; `false` at the end of the archive.
    async fn frame_starts(&mut self, first: &mut [u8]) -> Result<bool, std::io::Error> {
        match self.reader.read_exact(first).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                // Read once more so the verifying reader checks the digest at the end.
                let mut rest = Vec::new();
                self.reader.read_to_end(&mut rest).await?;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    async fn next_v2(&mut self) -> Result<Option<LogChunk>, std::io::Error> {
        let mut head = [0u8; 21];
        if !self.frame_starts(&mut head[..1]).await? {
            return Ok(None);
        }
        self.reader.read_exact(&mut head[1..]).await?;
        let (runs, len) = (le_u32(&head[13..17]), le_u32(&head[17..21]));
        if runs > MAX_RUNS || len > MAX_FRAME {
            return Err(damaged("frame too large"));
        }
        let mut chunk = self.chunk(le_i64(&head[0..8]), le_u32(&head[8..12]), head[12] != 0);
        let mut table = vec![0u8; runs as usize * 8];
        self.reader.read_exact(&mut table).await?;
        let mut total = 0u64;
        for run in table.chunks_exact(8) {
            let (line, count) = (le_u32(&run[0..4]), le_u32(&run[4..8]));
            total += u64::from(line) * u64::from(count);
            if total > u64::from(len) || chunk.lens.len() + count as usize > MAX_RUNS as usize {
                return Err(damaged("line lengths past the frame"));
            }
            chunk.lens.extend(std::iter::repeat_n(line, count as usize));
        }
        if total != u64::from(len) || chunk.lens.is_empty() {
            return Err(damaged("line lengths do not add up to the frame"));
        }
        chunk.data = vec![0u8; len as usize];
        self.reader.read_exact(&mut chunk.data).await?;
        Ok(Some(chunk))
    }

    async fn v1_line(&mut self) -> Result<Option<V1Line>, std::io::Error> {
        if let Some(line) = self.ahead.take() {
            return Ok(Some(line));
        }
        let mut head = [0u8; 17];
        if !self.frame_starts(&mut head[..1]).await? {
            return Ok(None);
        }
        self.reader.read_exact(&mut head[1..]).await?;
        let len = le_u32(&head[13..17]);
        if len > MAX_FRAME {
            return Err(damaged("frame too large"));
        }
        let mut data = vec![0u8; len as usize];
        self.reader.read_exact(&mut data).await?;
        Ok(Some(V1Line { id: le_i64(&head[0..8]), step: le_u32(&head[8..12]), stderr: head[12] != 0, data }))
    }

    /// Lines of a version 1 archive gathered into a run while their ids follow on and their
    /// step and stream stay the same.
    async fn next_v1(&mut self) -> Result<Option<LogChunk>, std::io::Error> {
        let Some(first) = self.v1_line().await? else { return Ok(None) };
        let mut chunk = self.chunk(first.id, first.step, first.stderr);
        chunk.lens.push(first.data.len() as u32);
        chunk.data = first.data;
        while chunk.data.len() < V1_RUN_BYTES {
            let Some(line) = self.v1_line().await? else { break };
            if line.id != chunk.last_id() + 1 || line.step != chunk.step || line.stderr != chunk.stderr {
                self.ahead = Some(line);
                break;
            }
            chunk.lens.push(line.data.len() as u32);
            chunk.data.extend_from_slice(&line.data);
        }
        Ok(Some(chunk))
    }
}

/// Archives ended attempts' logs and drops archives past retention. Only the server holding
/// the `log-archiver` leadership runs it.
pub(crate) async fn archiver(shared: Arc<Shared>) {
    let period = shared.config.archive_tick;
    loop {
        let lead = match shared.store.try_lead("log-archiver").await {
            Ok(Some(lead)) => lead,
            Ok(None) => {
                tokio::time::sleep(period).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot try to lead the log archiver");
                tokio::time::sleep(period).await;
                continue;
            }
        };
        tracing::info!("leading the log archiver");
        while lead.is_held() {
            archive_round(&shared).await;
            expire_round(&shared).await;
            tokio::time::sleep(period).await;
        }
        tracing::warn!("lost the log archiver leadership");
    }
}

async fn archive_round(shared: &Shared) {
    let pending = match shared.artifacts.unarchived_attempts(BATCH).await {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "cannot list attempts to archive");
            return;
        }
    };
    for attempt in pending {
        if let Err(e) = archive_one(shared, attempt).await {
            // The live rows stay until an archive is recorded, so nothing is lost: the next
            // round tries again.
            tracing::error!(
                job_id = attempt.job_id,
                task_id = attempt.task_id,
                attempt_id = attempt.attempt_id,
                error = %e,
                "cannot archive an attempt's log"
            );
            return;
        }
    }
}

pub(crate) async fn archive_one(shared: &Shared, attempt: UnarchivedAttempt) -> Result<(), ArchiveError> {
    // The encoder writes into a pipe the blob store reads from, so an archive never sits
    // whole in memory.
    let (mut writer, mut reader) = tokio::io::duplex(256 * 1024);
    let artifacts = shared.artifacts.clone();
    let attempt_id = attempt.attempt_id;
    let encoder = async move {
        writer.write_all(MAGIC).await?;
        let mut after = 0;
        let mut lines = 0u64;
        loop {
            let page = artifacts.attempt_log_chunks(attempt_id, after, PAGE_BYTES).await?;
            let Some(last) = page.last() else { break };
            after = last.last_id();
            let mut buf = Vec::with_capacity(page.iter().map(|c| c.data.len() + 64).sum());
            for chunk in &page {
                lines += chunk.lens.len() as u64;
                encode(&mut buf, chunk);
            }
            writer.write_all(&buf).await?;
        }
        writer.shutdown().await?;
        Ok::<u64, ArchiveError>(lines)
    };
    let store = shared.blobs.put(&mut reader, None, None);
    let (lines, stored) = tokio::join!(encoder, store);
    let lines = lines?;
    let info = stored?;
    // Identical bytes may be an unreferenced blob under deletion; the live rows stay until a
    // claimed archive is recorded, so a refused claim is tried again next round.
    crate::retention::claim(shared, &info.digest).await?;
    shared.artifacts.record_log_archive(attempt_id, &info.digest.to_string(), info.size, now_ms()).await?;
    tracing::info!(
        job_id = attempt.job_id,
        task_id = attempt.task_id,
        attempt_id,
        lines,
        size = info.size,
        digest = %info.digest,
        "attempt log archived"
    );
    Ok(())
}

async fn expire_round(shared: &Shared) {
    let retention = shared.config.log_retention;
    let now = now_ms();
    let before = now.saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
    // Blob collection deletes the archives nothing else uses, once its grace has passed (see
    // `crate::retention`): deleting them here could race a new reference to the same bytes.
    match shared.artifacts.expire_log_archives(before, now, EXPIRE_BATCH).await {
        Ok(unused) if !unused.is_empty() => {
            tracing::info!(digests = unused.len(), "expired log archives now unreferenced")
        }
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "cannot expire log archives"),
    }
}

/// How long archives are kept by default.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

#[cfg(test)]
mod tests {
    use super::*;

    fn record(digest: String, size: u64) -> LogArchiveRecord {
        LogArchiveRecord {
            attempt_id: 1,
            task_id: 1,
            task_name: "t".into(),
            frame: None,
            attempt: 1,
            digest,
            size,
            archived_ms: 0,
        }
    }

    async fn read_all(blobs: &Arc<dyn BlobStore>, bytes: &[u8]) -> Result<Vec<LogChunk>, std::io::Error> {
        let info = blobs.put_bytes(bytes).await.unwrap();
        let mut reader = ArchiveReader::open(blobs, &record(info.digest.to_string(), info.size)).await?;
        let mut out = Vec::new();
        while let Some(chunk) = reader.next().await? {
            out.push(chunk);
        }
        Ok(out)
    }

    /// (id, step, stderr, data) of every line.
    fn lines(chunks: &[LogChunk]) -> Vec<(i64, u32, bool, Vec<u8>)> {
        chunks.iter().flat_map(|c| c.lines().map(|(id, d)| (id, c.step, c.stderr, d.to_vec()))).collect()
    }

    fn chunk(first_id: i64, step: u32, stderr: bool, lines: &[&[u8]]) -> LogChunk {
        LogChunk {
            first_id,
            task_id: 1,
            task_name: "t".into(),
            frame: None,
            attempt: 1,
            step,
            stderr,
            lens: lines.iter().map(|l| l.len() as u32).collect(),
            data: lines.concat(),
        }
    }

    #[tokio::test]
    async fn archives_read_back_as_runs_and_detect_damage() {
        let blobs: Arc<dyn BlobStore> = Arc::new(drover_blobs::MemoryBlobStore::new());
        let big = vec![0xff; 70_000];
        let written =
            vec![chunk(7, 0, false, &[b"out\n", b"two\n", b"3\n"]), chunk(12, 1, true, &[b"", &big])];
        let mut buf = MAGIC.to_vec();
        for c in &written {
            encode(&mut buf, c);
        }
        let read = read_all(&blobs, &buf).await.unwrap();
        assert_eq!(read, written);

        assert!(read_all(&blobs, b"something else entirely").await.is_err());
        // Cut short, or with lengths that do not describe the data.
        assert!(read_all(&blobs, &buf[..buf.len() - 1]).await.is_err());
        let mut bad = MAGIC.to_vec();
        encode(&mut bad, &LogChunk { lens: vec![1, 1], ..chunk(1, 0, false, &[b"abc"]) });
        assert!(read_all(&blobs, &bad).await.is_err());
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&1i64.to_le_bytes());
        huge.extend_from_slice(&[0; 5]);
        huge.extend_from_slice(&(MAX_RUNS + 1).to_le_bytes());
        huge.extend_from_slice(&0u32.to_le_bytes());
        assert!(read_all(&blobs, &huge).await.is_err());
        let mut many = huge[..MAGIC.len() + 13].to_vec();
        for n in [1, 0, 0, u32::MAX] {
            many.extend_from_slice(&n.to_le_bytes());
        }
        assert!(read_all(&blobs, &many).await.is_err(), "a run of more lines than a frame holds");
    }

    #[tokio::test]
    async fn archives_of_one_frame_per_line_still_read() {
        let blobs: Arc<dyn BlobStore> = Arc::new(drover_blobs::MemoryBlobStore::new());
        let old = [
            (7i64, 0u32, false, b"out\n".to_vec()),
            (8, 0, false, b"more\n".to_vec()),
            (9, 1, true, Vec::new()),
            (12, 1, true, vec![0xff; 70_000]),
        ];
        let mut buf = MAGIC_V1.to_vec();
        for (id, step, stderr, data) in &old {
            buf.extend_from_slice(&id.to_le_bytes());
            buf.extend_from_slice(&step.to_le_bytes());
            buf.push(u8::from(*stderr));
            buf.extend_from_slice(&(data.len() as u32).to_le_bytes());
            buf.extend_from_slice(data);
        }
        let read = read_all(&blobs, &buf).await.unwrap();
        assert_eq!(lines(&read), old.to_vec());
        assert_eq!(read.len(), 3, "lines that follow on make one run");
    }
}
