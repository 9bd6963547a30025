//! Output is stored in chunks, not one row per line: each batch of lines an agent ships becomes
//! one row (or a few, past [`MAX_CHUNK_BYTES`]) holding the lines' bytes back to back and one
//! head per line (its step, stream and length). A line keeps an id of its own, `chunk id <<
//! LINE_BITS | index in the chunk`, so cursors (`logs_after`) and archives work as they did
//! with one row per line.

use std::future::Future;

use crate::decode::corrupt;
use crate::{LogRecord, OutputLine, Result};

/// Bits of a line id that number the line within its chunk.
const LINE_BITS: u32 = 16;

/// Most lines in one chunk (the index must fit [`LINE_BITS`]).
const MAX_CHUNK_LINES: usize = 1 << LINE_BITS;

/// A chunk is closed once it holds this many bytes: big enough that a fast writer's output is
/// a few rows per megabyte, small enough that a follower's read of one chunk stays cheap.
const MAX_CHUNK_BYTES: usize = 64 * 1024;

/// Chunks read per query when reading lines back.
pub(crate) const CHUNKS_PER_READ: u32 = 16;

/// A chunk about to be stored.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct NewChunk {
    /// One head per line, space-separated: the step, `o` (stdout) or `e` (stderr), the length.
    pub heads: String,
    /// The lines' bytes, back to back.
    pub data: Vec<u8>,
}

/// Packs lines into chunks, in order.
pub(crate) fn pack(lines: &[OutputLine]) -> Vec<NewChunk> {
    let mut chunks = Vec::new();
    let mut chunk = NewChunk::default();
    let mut count = 0;
    for line in lines {
        if count > 0 && (chunk.data.len() + line.data.len() > MAX_CHUNK_BYTES || count == MAX_CHUNK_LINES) {
            chunks.push(std::mem::take(&mut chunk));
            count = 0;
        }
        if count > 0 {
            chunk.heads.push(' ');
        }
        let stream = if line.stderr { 'e' } else { 'o' };
        chunk.heads.push_str(&format!("{}{stream}{}", line.step, line.data.len()));
        chunk.data.extend_from_slice(&line.data);
        count += 1;
    }
    if count > 0 {
        chunks.push(chunk);
    }
    chunks
}

/// A chunk as read back, with the task it belongs to.
#[derive(Debug, Clone)]
pub(crate) struct StoredChunk {
    pub id: i64,
    pub task_id: i64,
    pub task_name: String,
    pub frame: Option<i64>,
    pub attempt: u32,
    pub heads: String,
    pub data: Vec<u8>,
}

/// The first chunk that can hold a line after `after_id`.
pub(crate) fn first_chunk(after_id: i64) -> i64 {
    after_id.max(0) >> LINE_BITS
}

/// Appends the lines of `chunk` with an id above `after_id` to `out`, until it holds `limit`.
fn unpack(chunk: StoredChunk, after_id: i64, limit: usize, out: &mut Vec<LogRecord>) -> Result<()> {
    let mut offset = 0usize;
    for (index, head) in chunk.heads.split(' ').enumerate() {
        let (step, stderr, len) = parse_head(head).ok_or_else(|| corrupt("log chunk head", head))?;
        let end = offset.checked_add(len).filter(|end| *end <= chunk.data.len());
        let end =
            end.ok_or_else(|| corrupt("log chunk", format!("chunk {} is shorter than its heads", chunk.id)))?;
        let id = (chunk.id << LINE_BITS) | index as i64;
        if id > after_id {
            if out.len() >= limit {
                return Ok(());
            }
            out.push(LogRecord {
                id,
                task_id: chunk.task_id,
                task_name: chunk.task_name.clone(),
                frame: chunk.frame,
                attempt: chunk.attempt,
                step,
                stderr,
                data: chunk.data[offset..end].to_vec(),
            });
        }
        offset = end;
    }
    Ok(())
}

/// `7o128` → (7, false, 128).
fn parse_head(head: &str) -> Option<(u32, bool, usize)> {
    let at = head.find(['o', 'e'])?;
    let step = head[..at].parse().ok()?;
    let len = head[at + 1..].parse().ok()?;
    Some((step, head.as_bytes()[at] == b'e', len))
}

/// Reads up to `limit` lines with an id above `after_id`, in id order, from the chunks that
/// `fetch(first, n)` returns (at most `n` chunks with an id from `first` on, in id order).
pub(crate) async fn read_lines<F, Fut>(after_id: i64, limit: u32, mut fetch: F) -> Result<Vec<LogRecord>>
where
    F: FnMut(i64, u32) -> Fut,
    Fut: Future<Output = Result<Vec<StoredChunk>>>,
{
    let limit = limit as usize;
    let mut out = Vec::new();
    let mut from = first_chunk(after_id);
    while out.len() < limit {
        let chunks = fetch(from, CHUNKS_PER_READ).await?;
        let full = chunks.len() as u32 == CHUNKS_PER_READ;
        let Some(last) = chunks.last().map(|c| c.id) else { break };
        for chunk in chunks {
            unpack(chunk, after_id, limit, &mut out)?;
        }
        if !full {
            break;
        }
        from = last + 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(step: u32, stderr: bool, data: &[u8]) -> OutputLine {
        OutputLine { step, stderr, data: data.to_vec() }
    }

    fn stored(id: i64, c: NewChunk) -> StoredChunk {
        StoredChunk {
            id,
            task_id: 1,
            task_name: "t".into(),
            frame: None,
            attempt: 1,
            heads: c.heads,
            data: c.data,
        }
    }

    #[tokio::test]
    async fn lines_round_trip_through_chunks_with_increasing_ids() {
        let big = vec![b'x'; MAX_CHUNK_BYTES - 1];
        let lines =
            vec![line(0, false, b"a\n"), line(1, true, b""), line(0, false, &big), line(2, false, b"z\n")];
        let chunks = pack(&lines);
        assert_eq!(chunks.len(), 3, "the big line fits neither its neighbours' chunks");
        let stored: Vec<StoredChunk> =
            chunks.into_iter().enumerate().map(|(i, c)| stored(i as i64 + 5, c)).collect();
        let read = |after: i64, limit: u32| {
            let stored = stored.clone();
            async move {
                read_lines(after, limit, |from, n| {
                    let page: Vec<StoredChunk> =
                        stored.iter().filter(|c| c.id >= from).take(n as usize).cloned().collect();
                    async move { Ok(page) }
                })
                .await
            }
        };
        let all = read(0, 100).await.unwrap();
        assert_eq!(
            all.iter().map(|l| (l.step, l.stderr, l.data.clone())).collect::<Vec<_>>(),
            lines.iter().map(|l| (l.step, l.stderr, l.data.clone())).collect::<Vec<_>>()
        );
        assert!(all.windows(2).all(|w| w[0].id < w[1].id));
        let rest = read(all[1].id, 1).await.unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].id, all[2].id, "a cursor inside a chunk resumes at the next line");
        assert!(read(all[3].id, 10).await.unwrap().is_empty());
    }

    #[test]
    fn a_corrupt_chunk_is_an_error_not_a_panic() {
        let short =
            StoredChunk { heads: "0o10".into(), data: b"abc".to_vec(), ..stored(1, NewChunk::default()) };
        assert!(unpack(short, 0, 10, &mut Vec::new()).is_err());
        let bad = StoredChunk { heads: "zz".into(), data: Vec::new(), ..stored(1, NewChunk::default()) };
        assert!(unpack(bad, 0, 10, &mut Vec::new()).is_err());
    }
}
