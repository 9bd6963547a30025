//! Output is stored in chunks, not one row per line, and travels as chunks end to end: an agent
//! ships runs of lines of one step and stream ([`OutputChunk`]: the bytes back to back and one
//! length per line), the store keeps each shipped run as one row (or a few, past
//! [`MAX_CHUNK_BYTES`]) with its lines' heads, and readers get runs of lines back
//! ([`LogChunk`]) rather than one record per line.
//!
//! A row's heads are text, one head per run of lines of the same step, stream and length:
//! `{step}{o|e}{len}`, followed by `*{count}` when more than one line has it (`0o128*512` is
//! 512 lines of 128 bytes of step 0's stdout). Rows written before runs were counted have one
//! head per line, which reads the same. A line keeps an id of its own, `chunk id << LINE_BITS |
//! index in the chunk`, so cursors (`logs_after`) and archives work as they did with one row
//! per line.

use std::borrow::Cow;
use std::fmt::Write as _;
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

/// Bytes of output a reader of lines ([`crate::Store::logs_after`]) asks for per round.
pub(crate) const READ_BYTES: usize = 1 << 20;

/// Lines of one step and stream of an attempt, back to back, as an agent ships them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputChunk {
    /// Step index.
    pub step: u32,
    /// From stderr rather than stdout.
    pub stderr: bool,
    /// One length per line; they add up to `data.len()`.
    pub lens: Vec<u32>,
    /// The lines' bytes.
    pub data: Vec<u8>,
}

/// Why a chunk of output is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadChunk {
    /// The line lengths do not add up to the bytes carried.
    #[error("the line lengths of an output chunk add up to {heads} bytes, but it carries {data}")]
    Mismatch {
        /// Sum of the line lengths.
        heads: u64,
        /// Bytes carried.
        data: usize,
    },
    /// A line is longer than the limit.
    #[error("an output line of {len} bytes is longer than the limit of {max}")]
    LineTooLong {
        /// The line's length.
        len: u32,
        /// The limit.
        max: usize,
    },
}

impl OutputChunk {
    /// Checks that the lengths describe the bytes and that no line is longer than `max_line`.
    pub fn check(&self, max_line: usize) -> std::result::Result<(), BadChunk> {
        let mut sum = 0u64;
        for &len in &self.lens {
            if len as usize > max_line {
                return Err(BadChunk::LineTooLong { len, max: max_line });
            }
            sum += u64::from(len);
        }
        if sum != self.data.len() as u64 {
            return Err(BadChunk::Mismatch { heads: sum, data: self.data.len() });
        }
        Ok(())
    }

    /// Lines in order, grouped into chunks of consecutive lines of the same step and stream.
    pub fn from_lines(lines: &[OutputLine]) -> Vec<OutputChunk> {
        let mut chunks: Vec<OutputChunk> = Vec::new();
        for line in lines {
            let len = u32::try_from(line.data.len()).unwrap_or(u32::MAX);
            match chunks.last_mut() {
                Some(c) if c.step == line.step && c.stderr == line.stderr => {
                    c.lens.push(len);
                    c.data.extend_from_slice(&line.data);
                }
                _ => chunks.push(OutputChunk {
                    step: line.step,
                    stderr: line.stderr,
                    lens: vec![len],
                    data: line.data.clone(),
                }),
            }
        }
        chunks
    }
}

/// Consecutive stored lines of one step and stream of one task attempt: line `i` has the id
/// `first_id + i` and the next `lens[i]` bytes of `data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    /// Id of the first line.
    pub first_id: i64,
    /// Task id.
    pub task_id: i64,
    /// Task name.
    pub task_name: String,
    /// Frame.
    pub frame: Option<i64>,
    /// Attempt number.
    pub attempt: u32,
    /// Step.
    pub step: u32,
    /// From stderr.
    pub stderr: bool,
    /// One length per line.
    pub lens: Vec<u32>,
    /// The lines' bytes, back to back.
    pub data: Vec<u8>,
}

impl LogChunk {
    /// Id of the last line.
    pub fn last_id(&self) -> i64 {
        self.first_id + self.lens.len() as i64 - 1
    }

    /// This chunk without its lines up to `after_id`; `None` when none is left.
    pub fn after(mut self, after_id: i64) -> Option<LogChunk> {
        if self.lens.is_empty() || self.last_id() <= after_id {
            return None;
        }
        if self.first_id <= after_id {
            let skip = (after_id - self.first_id + 1) as usize;
            let bytes: usize = self.lens[..skip].iter().map(|&l| l as usize).sum();
            self.lens.drain(..skip);
            self.data.drain(..bytes.min(self.data.len()));
            self.first_id = after_id + 1;
        }
        Some(self)
    }

    /// The lines with their ids. A length past the data (which a stored chunk never has: it is
    /// checked as it is read) ends the lines early rather than panicking.
    pub fn lines(&self) -> impl Iterator<Item = (i64, &[u8])> {
        let mut offset = 0usize;
        self.lens.iter().enumerate().map_while(move |(i, &len)| {
            let end = offset.checked_add(len as usize)?;
            let line = self.data.get(offset..end)?;
            offset = end;
            Some((self.first_id + i as i64, line))
        })
    }

    /// One record per line.
    pub fn into_records(self) -> Vec<LogRecord> {
        self.lines()
            .map(|(id, data)| LogRecord {
                id,
                task_id: self.task_id,
                task_name: self.task_name.clone(),
                frame: self.frame,
                attempt: self.attempt,
                step: self.step,
                stderr: self.stderr,
                data: data.to_vec(),
            })
            .collect()
    }
}

/// A chunk about to be stored.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct NewChunk<'a> {
    /// The heads of its runs of lines (see the module's documentation).
    pub heads: String,
    /// The lines' bytes, back to back: borrowed from the shipped chunk when the row holds
    /// lines of one shipped chunk only (the usual case), so storing does not copy them.
    pub data: Cow<'a, [u8]>,
}

/// A run of lines of one step, stream and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    step: u32,
    stderr: bool,
    len: u32,
    count: u32,
}

impl Run {
    fn write(&self, heads: &mut String) {
        if !heads.is_empty() {
            heads.push(' ');
        }
        let stream = if self.stderr { 'e' } else { 'o' };
        // Writing to a String cannot fail.
        let _ = write!(heads, "{}{stream}{}", self.step, self.len);
        if self.count > 1 {
            let _ = write!(heads, "*{}", self.count);
        }
    }
}

/// The row being filled by [`pack`].
#[derive(Default)]
struct Filling<'a> {
    heads: String,
    run: Option<Run>,
    lines: usize,
    /// Pieces of shipped chunks' data, in order.
    parts: Vec<&'a [u8]>,
    bytes: usize,
}

impl<'a> Filling<'a> {
    fn add(&mut self, step: u32, stderr: bool, len: u32) {
        match &mut self.run {
            Some(r) if r.step == step && r.stderr == stderr && r.len == len => r.count += 1,
            run => {
                if let Some(done) = run.replace(Run { step, stderr, len, count: 1 }) {
                    done.write(&mut self.heads);
                }
            }
        }
        self.lines += 1;
        self.bytes += len as usize;
    }

    fn close(&mut self, out: &mut Vec<NewChunk<'a>>) {
        if self.lines == 0 {
            return;
        }
        let mut heads = std::mem::take(&mut self.heads);
        if let Some(run) = self.run.take() {
            run.write(&mut heads);
        }
        let data = match self.parts.as_slice() {
            [one] => Cow::Borrowed(*one),
            parts => Cow::Owned(parts.concat()),
        };
        out.push(NewChunk { heads, data });
        self.parts.clear();
        self.lines = 0;
        self.bytes = 0;
    }
}

/// The number of an output report as the database keeps it (a signed 64-bit integer); 0 is
/// no number (agents number from 1), so the report is always stored.
pub(crate) fn report_seq(seq: Option<u64>) -> Result<Option<i64>> {
    match seq {
        None | Some(0) => Ok(None),
        Some(n) => i64::try_from(n).map(Some).map_err(|_| crate::StoreError::Invalid {
            what: "output report",
            detail: format!("number {n} is out of range"),
        }),
    }
}

/// Packs shipped chunks into rows, in order, after checking that each chunk's lengths add up
/// to its bytes.
pub(crate) fn pack(chunks: &[OutputChunk]) -> std::result::Result<Vec<NewChunk<'_>>, BadChunk> {
    let mut rows = Vec::new();
    let mut row = Filling::default();
    for chunk in chunks {
        chunk.check(usize::MAX)?;
        // Start of the part of this chunk's data not yet handed to a row.
        let mut start = 0usize;
        let mut offset = 0usize;
        for &len in &chunk.lens {
            let len_bytes = len as usize;
            if row.lines > 0 && (row.bytes + len_bytes > MAX_CHUNK_BYTES || row.lines == MAX_CHUNK_LINES) {
                if offset > start {
                    row.parts.push(&chunk.data[start..offset]);
                    start = offset;
                }
                row.close(&mut rows);
            }
            row.add(chunk.step, chunk.stderr, len);
            offset += len_bytes;
        }
        if offset > start {
            row.parts.push(&chunk.data[start..offset]);
        }
    }
    row.close(&mut rows);
    Ok(rows)
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

/// A run of [`LogChunk`] being cut out of a stored chunk: its lines and where its bytes are.
struct Cut {
    first_id: i64,
    step: u32,
    stderr: bool,
    lens: Vec<u32>,
    start: usize,
    end: usize,
}

/// Appends the lines of `chunk` with an id above `after_id` to `out`, as runs of one step and
/// stream; returns the bytes added.
fn unpack(chunk: StoredChunk, after_id: i64, out: &mut Vec<LogChunk>) -> Result<usize> {
    let mut cuts: Vec<Cut> = Vec::new();
    let mut offset = 0usize;
    let mut index = 0i64;
    let base = chunk.id << LINE_BITS;
    for head in chunk.heads.split(' ') {
        let run = parse_head(head).ok_or_else(|| corrupt("log chunk head", head))?;
        if index + i64::from(run.count) > MAX_CHUNK_LINES as i64 {
            return Err(corrupt(
                "log chunk",
                format!("chunk {} has more than {MAX_CHUNK_LINES} lines", chunk.id),
            ));
        }
        let len = run.len as usize;
        let short = || corrupt("log chunk", format!("chunk {} is shorter than its heads", chunk.id));
        let run_bytes = len.checked_mul(run.count as usize).ok_or_else(short)?;
        let end = offset.checked_add(run_bytes).filter(|end| *end <= chunk.data.len()).ok_or_else(short)?;
        let first = base | index;
        // Lines of the run at or below the cursor are skipped whole.
        let skip = if first > after_id { 0 } else { (after_id - first + 1).min(i64::from(run.count)) };
        let kept = i64::from(run.count) - skip;
        if kept > 0 {
            let from = offset + skip as usize * len;
            let first_kept = first + skip;
            match cuts.last_mut() {
                Some(c) if c.step == run.step && c.stderr == run.stderr && c.end == from => {
                    c.lens.extend(std::iter::repeat_n(run.len, kept as usize));
                    c.end = end;
                }
                _ => cuts.push(Cut {
                    first_id: first_kept,
                    step: run.step,
                    stderr: run.stderr,
                    lens: vec![run.len; kept as usize],
                    start: from,
                    end,
                }),
            }
        }
        offset = end;
        index += i64::from(run.count);
    }
    if offset != chunk.data.len() {
        return Err(corrupt("log chunk", format!("chunk {} is longer than its heads", chunk.id)));
    }
    let mut added = 0;
    let whole = matches!(cuts.as_slice(), [c] if c.start == 0 && c.end == chunk.data.len());
    let mut data = chunk.data;
    for cut in cuts {
        added += cut.end - cut.start;
        let bytes = if whole { std::mem::take(&mut data) } else { data[cut.start..cut.end].to_vec() };
        out.push(LogChunk {
            first_id: cut.first_id,
            task_id: chunk.task_id,
            task_name: chunk.task_name.clone(),
            frame: chunk.frame,
            attempt: chunk.attempt,
            step: cut.step,
            stderr: cut.stderr,
            lens: cut.lens,
            data: bytes,
        });
    }
    Ok(added)
}

/// `7o128` → 7, stdout, 128 bytes, once; `0e5*3` → 0, stderr, 5 bytes, three times.
fn parse_head(head: &str) -> Option<Run> {
    let at = head.find(['o', 'e'])?;
    let step = head[..at].parse().ok()?;
    let rest = &head[at + 1..];
    let (len, count) = match rest.split_once('*') {
        Some((len, count)) => (len.parse().ok()?, count.parse().ok().filter(|c| *c > 0)?),
        None => (rest.parse().ok()?, 1),
    };
    Some(Run { step, stderr: head.as_bytes()[at] == b'e', len, count })
}

/// Reads the lines with an id above `after_id`, in id order and as runs, from the chunks that
/// `fetch(first, n)` returns (at most `n` chunks with an id from `first` on, in id order),
/// until about `max_bytes` are read (whole stored chunks, so a little more).
pub(crate) async fn read_chunks<F, Fut>(
    after_id: i64,
    max_bytes: usize,
    mut fetch: F,
) -> Result<Vec<LogChunk>>
where
    F: FnMut(i64, u32) -> Fut,
    Fut: Future<Output = Result<Vec<StoredChunk>>>,
{
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut from = first_chunk(after_id);
    loop {
        let chunks = fetch(from, CHUNKS_PER_READ).await?;
        let full = chunks.len() as u32 == CHUNKS_PER_READ;
        let Some(last) = chunks.last().map(|c| c.id) else { break };
        for chunk in chunks {
            bytes += unpack(chunk, after_id, &mut out)?;
            if bytes >= max_bytes {
                return Ok(out);
            }
        }
        if !full {
            break;
        }
        from = last + 1;
    }
    Ok(out)
}

/// Up to `limit` lines with an id above `after_id`, one record each, read as chunks by `read`
/// (called with a cursor and a byte budget, like [`read_chunks`]).
pub(crate) async fn read_lines<F, Fut>(after_id: i64, limit: u32, mut read: F) -> Result<Vec<LogRecord>>
where
    F: FnMut(i64, usize) -> Fut,
    Fut: Future<Output = Result<Vec<LogChunk>>>,
{
    let limit = limit as usize;
    let mut out = Vec::new();
    let mut after = after_id;
    while out.len() < limit {
        let chunks = read(after, READ_BYTES).await?;
        if chunks.is_empty() {
            break;
        }
        for chunk in chunks {
            for record in chunk.into_records() {
                if out.len() == limit {
                    return Ok(out);
                }
                after = record.id;
                out.push(record);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(step: u32, stderr: bool, data: &[u8]) -> OutputLine {
        OutputLine { step, stderr, data: data.to_vec() }
    }

    fn stored(id: i64, c: NewChunk<'_>) -> StoredChunk {
        StoredChunk {
            id,
            task_id: 1,
            task_name: "t".into(),
            frame: None,
            attempt: 1,
            heads: c.heads,
            data: c.data.into_owned(),
        }
    }

    fn empty() -> NewChunk<'static> {
        NewChunk::default()
    }

    async fn read_all(stored: &[StoredChunk], after: i64, max_bytes: usize) -> Vec<LogChunk> {
        read_chunks(after, max_bytes, |from, n| {
            let page: Vec<StoredChunk> =
                stored.iter().filter(|c| c.id >= from).take(n as usize).cloned().collect();
            async move { Ok(page) }
        })
        .await
        .unwrap()
    }

    async fn read_records(stored: &[StoredChunk], after: i64, limit: u32) -> Vec<LogRecord> {
        read_lines(after, limit, |after, max| async move { Ok(read_all(stored, after, max).await) })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn lines_round_trip_through_chunks_with_increasing_ids() {
        let big = vec![b'x'; MAX_CHUNK_BYTES - 1];
        let lines =
            vec![line(0, false, b"a\n"), line(1, true, b""), line(0, false, &big), line(2, false, b"z\n")];
        let shipped = OutputChunk::from_lines(&lines);
        assert_eq!(shipped.len(), 4, "each change of step or stream starts a chunk");
        let chunks = pack(&shipped).unwrap();
        assert_eq!(chunks.len(), 3, "the big line fits neither its neighbours' chunks");
        let stored: Vec<StoredChunk> =
            chunks.into_iter().enumerate().map(|(i, c)| stored(i as i64 + 5, c)).collect();
        let all = read_records(&stored, 0, 100).await;
        assert_eq!(
            all.iter().map(|l| (l.step, l.stderr, l.data.clone())).collect::<Vec<_>>(),
            lines.iter().map(|l| (l.step, l.stderr, l.data.clone())).collect::<Vec<_>>()
        );
        assert!(all.windows(2).all(|w| w[0].id < w[1].id));
        let rest = read_records(&stored, all[1].id, 1).await;
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].id, all[2].id, "a cursor inside a chunk resumes at the next line");
        assert!(read_records(&stored, all[3].id, 10).await.is_empty());
    }

    #[tokio::test]
    async fn equal_lines_make_one_head_and_read_back_as_one_run_without_copies() {
        let data = b"0123456\n".repeat(1000);
        let shipped = OutputChunk { step: 3, stderr: false, lens: vec![8; 1000], data: data.clone() };
        let rows = pack(std::slice::from_ref(&shipped)).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].heads, "3o8*1000");
        assert!(matches!(rows[0].data, Cow::Borrowed(_)), "one shipped chunk is stored as it came");
        let stored = vec![stored(2, rows.into_iter().next().unwrap())];
        let runs = read_all(&stored, 0, usize::MAX).await;
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].first_id, runs[0].last_id()), (2 << LINE_BITS, (2 << LINE_BITS) + 999));
        assert_eq!(runs[0].data, data);
        // A cursor in the middle of the run keeps the rest of it.
        let rest = read_all(&stored, (2 << LINE_BITS) + 499, usize::MAX).await;
        assert_eq!(
            (rest[0].first_id, rest[0].lens.len(), rest[0].data.len()),
            ((2 << LINE_BITS) + 500, 500, 4000)
        );
    }

    #[tokio::test]
    async fn mixed_streams_split_into_runs_and_big_chunks_into_rows() {
        let shipped = vec![
            OutputChunk { step: 0, stderr: false, lens: vec![2, 3], data: b"a\nbb\n".to_vec() },
            OutputChunk { step: 0, stderr: true, lens: vec![4], data: b"err\n".to_vec() },
            OutputChunk {
                step: 0,
                stderr: false,
                lens: vec![1; 3 * MAX_CHUNK_BYTES / 2],
                data: vec![b'\n'; 3 * MAX_CHUNK_BYTES / 2],
            },
        ];
        let rows = pack(&shipped).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].heads, format!("0o2 0o3 0e4 0o1*{}", MAX_CHUNK_BYTES - 9));
        let stored: Vec<StoredChunk> =
            rows.into_iter().enumerate().map(|(i, c)| stored(i as i64 + 1, c)).collect();
        let runs = read_all(&stored, 0, usize::MAX).await;
        let shape: Vec<(bool, usize)> = runs.iter().map(|r| (r.stderr, r.lens.len())).collect();
        assert_eq!(
            shape,
            vec![(false, 2), (true, 1), (false, MAX_CHUNK_BYTES - 9), (false, MAX_CHUNK_BYTES / 2 + 9)]
        );
        let total: usize = runs.iter().map(|r| r.data.len()).sum();
        assert_eq!(total, 9 + 3 * MAX_CHUNK_BYTES / 2);
        // A small budget still returns whole stored chunks, at least one.
        assert_eq!(read_all(&stored, 0, 1).await.len(), 3);
    }

    #[test]
    fn a_chunk_whose_lengths_do_not_match_its_bytes_is_refused() {
        let short = OutputChunk { step: 0, stderr: false, lens: vec![3, 3], data: b"ab\n".to_vec() };
        assert_eq!(short.check(100), Err(BadChunk::Mismatch { heads: 6, data: 3 }));
        assert!(pack(std::slice::from_ref(&short)).is_err());
        let long = OutputChunk { step: 0, stderr: false, lens: vec![3], data: b"ab\nx".to_vec() };
        assert!(long.check(100).is_err());
        let over = OutputChunk { step: 0, stderr: false, lens: vec![4], data: b"abc\n".to_vec() };
        assert_eq!(over.check(3), Err(BadChunk::LineTooLong { len: 4, max: 3 }));
        // Output is bytes: invalid UTF-8 and empty lines are fine.
        let odd = OutputChunk { step: 0, stderr: true, lens: vec![2, 0], data: vec![0xff, 0xfe] };
        assert_eq!(odd.check(100), Ok(()));
        let overflow = OutputChunk { step: 0, stderr: false, lens: vec![u32::MAX; 4], data: Vec::new() };
        assert!(overflow.check(usize::MAX).is_err());
    }

    #[test]
    fn a_corrupt_chunk_is_an_error_not_a_panic() {
        let cases = [
            ("0o10", b"abc".to_vec()),
            ("zz", Vec::new()),
            ("0o1", b"ab".to_vec()),
            ("0o1*0", Vec::new()),
            ("0o1*4294967295", b"a".to_vec()),
            ("0o4294967295*4294967295", b"a".to_vec()),
            ("0o0*70000", Vec::new()),
        ];
        for (heads, data) in cases {
            let chunk = StoredChunk { heads: heads.into(), data, ..stored(1, empty()) };
            assert!(unpack(chunk, 0, &mut Vec::new()).is_err(), "{heads}");
        }
        // Rows of one head per line, as older servers wrote them, still read.
        let old =
            StoredChunk { heads: "0o2 0o2 1e1".into(), data: b"a\nb\nc".to_vec(), ..stored(1, empty()) };
        let mut out = Vec::new();
        unpack(old, 0, &mut out).unwrap();
        assert_eq!(out.iter().map(|c| c.lens.clone()).collect::<Vec<_>>(), vec![vec![2, 2], vec![1]]);
    }
}
