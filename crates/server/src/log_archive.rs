//! Attempt logs in the blob store: when an attempt has ended, its output moves from live rows
//! into one blob, which is what `logs` serves from then on; after the retention period the
//! archive is dropped.
//!
//! An archive is a header followed by one frame per output line, keeping what the live rows
//! had: `id` (i64), `step` (u32), `stderr` (u8), data length (u32), all little-endian, then the
//! data. Keeping the line ids lets a reader resume where it stopped and merge archives with
//! live rows without duplicates.

use std::sync::Arc;
use std::time::Duration;

use drover_blobs::{BlobReader, BlobStore};
use drover_store::{LogArchiveRecord, LogRecord, UnarchivedAttempt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Shared, now_ms};

/// The first bytes of every archive.
const MAGIC: &[u8] = b"drover-log-v1\n";
/// Live rows read per query while archiving.
const PAGE: u32 = 2000;
/// Attempts archived per round.
const BATCH: u32 = 100;
/// Archives expired per round.
const EXPIRE_BATCH: u32 = 1000;
/// The largest line an archive may hold; a bigger frame means the archive is damaged.
const MAX_LINE: u32 = 64 << 20;

/// One line read back from an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ArchivedLine {
    pub(crate) id: i64,
    pub(crate) step: u32,
    pub(crate) stderr: bool,
    pub(crate) data: Vec<u8>,
}

/// Errors of archiving one attempt.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ArchiveError {
    #[error(transparent)]
    Store(#[from] drover_store::StoreError),
    #[error(transparent)]
    Blob(#[from] drover_blobs::BlobError),
    #[error("cannot encode the archive: {0}")]
    Encode(#[from] std::io::Error),
}

fn encode(out: &mut Vec<u8>, line: &LogRecord) {
    out.extend_from_slice(&line.id.to_le_bytes());
    out.extend_from_slice(&line.step.to_le_bytes());
    out.push(u8::from(line.stderr));
    out.extend_from_slice(&(line.data.len() as u32).to_le_bytes());
    out.extend_from_slice(&line.data);
}

/// Reads archived lines one at a time, so serving a large archive holds one line in memory.
pub(crate) struct ArchiveReader {
    reader: BlobReader,
    started: bool,
}

impl ArchiveReader {
    /// Opens the archive of `record`.
    pub(crate) async fn open(
        blobs: &Arc<dyn BlobStore>,
        record: &LogArchiveRecord,
    ) -> Result<ArchiveReader, std::io::Error> {
        let digest: drover_blobs::Digest = record.digest.parse().map_err(std::io::Error::other)?;
        let reader = blobs.get(&digest).await.map_err(std::io::Error::other)?;
        Ok(ArchiveReader { reader, started: false })
    }

    /// The next line, `None` at the end. The blob store verifies the content as it is read, so
    /// a damaged archive ends with an error rather than with wrong lines.
    pub(crate) async fn next(&mut self) -> Result<Option<ArchivedLine>, std::io::Error> {
        if !self.started {
            let mut magic = [0u8; MAGIC.len()];
            self.reader.read_exact(&mut magic).await?;
            if magic != MAGIC {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not a drover log archive"));
            }
            self.started = true;
        }
        let mut head = [0u8; 17];
        match self.reader.read_exact(&mut head[..1]).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                // Read once more so the verifying reader checks the digest at the end.
                let mut rest = Vec::new();
                self.reader.read_to_end(&mut rest).await?;
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        self.reader.read_exact(&mut head[1..]).await?;
        let id = i64::from_le_bytes(head[0..8].try_into().map_err(std::io::Error::other)?);
        let step = u32::from_le_bytes(head[8..12].try_into().map_err(std::io::Error::other)?);
        let stderr = head[12] != 0;
        let len = u32::from_le_bytes(head[13..17].try_into().map_err(std::io::Error::other)?);
        if len > MAX_LINE {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "log archive frame too large"));
        }
        let mut data = vec![0u8; len as usize];
        self.reader.read_exact(&mut data).await?;
        Ok(Some(ArchivedLine { id, step, stderr, data }))
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
            let page = artifacts.attempt_log(attempt_id, after, PAGE).await?;
            let Some(last) = page.last() else { break };
            after = last.id;
            lines += page.len() as u64;
            let mut buf = Vec::new();
            for line in &page {
                encode(&mut buf, line);
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
    let before = now_ms().saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
    let unused = match shared.artifacts.expire_log_archives(before, EXPIRE_BATCH).await {
        Ok(u) => u,
        Err(e) => {
            tracing::error!(error = %e, "cannot expire log archives");
            return;
        }
    };
    for digest in unused {
        let Ok(parsed) = digest.parse::<drover_blobs::Digest>() else {
            tracing::warn!(%digest, "expired log archive has no valid digest");
            continue;
        };
        match shared.blobs.delete(&parsed).await {
            Ok(()) => tracing::info!(%digest, "expired log archive deleted"),
            Err(e) => tracing::warn!(%digest, error = %e, "cannot delete an expired log archive"),
        }
    }
}

/// How long archives are kept by default.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn archives_read_back_line_by_line_and_detect_damage() {
        let blobs: Arc<dyn BlobStore> = Arc::new(drover_blobs::MemoryBlobStore::new());
        let lines = [
            (7i64, 0u32, false, b"out\n".to_vec()),
            (9, 1, true, Vec::new()),
            (12, 1, true, vec![0xff; 70_000]),
        ];
        let mut buf = MAGIC.to_vec();
        for (id, step, stderr, data) in &lines {
            let rec = LogRecord {
                id: *id,
                task_id: 1,
                task_name: "t".into(),
                frame: None,
                attempt: 1,
                step: *step,
                stderr: *stderr,
                data: data.clone(),
            };
            encode(&mut buf, &rec);
        }
        let info = blobs.put_bytes(&buf).await.unwrap();
        let record = LogArchiveRecord {
            attempt_id: 1,
            task_id: 1,
            task_name: "t".into(),
            frame: None,
            attempt: 1,
            digest: info.digest.to_string(),
            size: info.size,
            archived_ms: 0,
        };
        let mut reader = ArchiveReader::open(&blobs, &record).await.unwrap();
        let mut read = Vec::new();
        while let Some(line) = reader.next().await.unwrap() {
            read.push((line.id, line.step, line.stderr, line.data));
        }
        assert_eq!(read, lines.to_vec());

        let not_archive = blobs.put_bytes(b"something else entirely").await.unwrap();
        let record = LogArchiveRecord { digest: not_archive.digest.to_string(), ..record };
        let mut reader = ArchiveReader::open(&blobs, &record).await.unwrap();
        assert!(reader.next().await.is_err());
    }
}
