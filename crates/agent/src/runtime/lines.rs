//! The one line splitter of all runtimes: output becomes [`OutputChunk`]s of whole lines
//! back to back (newline kept), lines longer than [`MAX_LINE`] cut into pieces, and a last line
//! without newline still sent. Only the last piece of a chunk may lack a newline (a piece the
//! splitter cut there), so a receiver finds the lines of a chunk by its newlines alone.
//! Runtimes get output in pieces of any size (pipes, files, Docker's frames, the guest's
//! chunks), so the splitter is fed pieces and keeps the unfinished line between them; a fast
//! writer's output leaves in chunks of many lines, so its cost is per chunk, not per line.

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::runtime::{MAX_LINE, OutputChunk, OutputSink, Stream};

/// A chunk is closed at the first line end past this many bytes: large enough that a chatty
/// step costs little per byte, small enough that the shipper's batches fill evenly.
const CHUNK_BYTES: usize = 64 * 1024;

/// The unfinished line of one stream.
#[derive(Debug, Default)]
pub(crate) struct LineSplitter {
    line: Vec<u8>,
}

impl LineSplitter {
    /// Adds `data` and returns the chunks it completed: whole lines (or [`MAX_LINE`] pieces,
    /// each ending its chunk).
    pub(crate) fn push(&mut self, mut data: &[u8]) -> Vec<Vec<u8>> {
        let mut done = Vec::new();
        while !data.is_empty() {
            // The line begun earlier first: it ends at a newline within its room, or is cut.
            let room = MAX_LINE - self.line.len();
            let window = &data[..data.len().min(room)];
            let Some(newline) = memchr::memchr(b'\n', window) else {
                self.line.extend_from_slice(window);
                data = &data[window.len()..];
                if self.line.len() == MAX_LINE {
                    done.push(std::mem::take(&mut self.line));
                }
                continue;
            };
            // Then as many whole lines as follow, up to the chunk size.
            let mut end = newline + 1;
            while self.line.len() + end < CHUNK_BYTES {
                let rest = &data[end..];
                match memchr::memchr(b'\n', &rest[..rest.len().min(MAX_LINE)]) {
                    Some(at) => end += at + 1,
                    None => break,
                }
            }
            let mut chunk = std::mem::take(&mut self.line);
            chunk.extend_from_slice(&data[..end]);
            done.push(chunk);
            data = &data[end..];
        }
        done
    }

    /// The last line when the stream ended without a newline.
    pub(crate) fn finish(&mut self) -> Option<Vec<u8>> {
        (!self.line.is_empty()).then(|| std::mem::take(&mut self.line))
    }
}

/// Reads `reader` to the end and sends its lines to `sink` in chunks. Returns the number of
/// bytes read.
///
/// `from` is where in its file the reader starts, for a reader that follows a file: each chunk
/// then says where in the file it ends (see [`OutputChunk::end`]).
///
/// When the sink is closed the rest is still read and dropped: a writer must never block just
/// because nobody listens any more.
pub(crate) async fn pump<R: AsyncRead + Unpin>(
    mut reader: R,
    stream: Stream,
    step: usize,
    sink: OutputSink,
    from: Option<u64>,
) -> std::io::Result<u64> {
    let mut splitter = LineSplitter::default();
    let mut buffer = vec![0u8; MAX_LINE];
    let mut listening = true;
    let mut total = 0u64;
    // Where the bytes handed on so far end in the file.
    let mut handed = from;
    let mut send = |data: Vec<u8>| {
        let end = handed.map(|h| h + data.len() as u64);
        handed = end;
        let tx = sink.clone();
        async move { tx.send(OutputChunk { stream, step, data, end }).await.is_ok() }
    };
    loop {
        let n = reader.read(&mut buffer).await?;
        if n == 0 {
            if let Some(rest) = splitter.finish()
                && listening
            {
                send(rest).await;
            }
            return Ok(total);
        }
        total += n as u64;
        for chunk in splitter.push(&buffer[..n]) {
            if listening {
                listening = send(chunk).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chunks of `input` fed in pieces of `piece` bytes.
    fn chunks(input: &[u8], piece: usize) -> Vec<Vec<u8>> {
        let mut splitter = LineSplitter::default();
        let mut out: Vec<Vec<u8>> = input.chunks(piece).flat_map(|p| splitter.push(p)).collect();
        out.extend(splitter.finish());
        out
    }

    /// The lines of `input` as a receiver finds them: by newlines, plus each chunk's last
    /// piece without one.
    fn split(input: &[u8], piece: usize) -> Vec<Vec<u8>> {
        let chunks = chunks(input, piece);
        assert!(chunks.iter().all(|c| !c.is_empty()));
        chunks.iter().flat_map(|c| c.split_inclusive(|&b| b == b'\n').map(<[u8]>::to_vec)).collect()
    }

    #[test]
    fn keeps_newlines_and_the_last_partial_line() {
        for piece in [1, 3, 1000] {
            let out = split(b"a\n\nbc\nlast", piece);
            assert_eq!(out, vec![b"a\n".to_vec(), b"\n".to_vec(), b"bc\n".to_vec(), b"last".to_vec()]);
        }
        // Fed at once, the whole lines leave as one chunk.
        assert_eq!(chunks(b"a\n\nbc\nlast", 1000), vec![b"a\n\nbc\n".to_vec(), b"last".to_vec()]);
    }

    #[test]
    fn a_chunk_ends_at_a_line_end_past_the_chunk_size_and_only_a_cut_lacks_a_newline() {
        let input = b"0123456789abcde\n".repeat(3 * CHUNK_BYTES / 16 + 5);
        let out = chunks(&input, input.len());
        assert_eq!(out.concat(), input);
        assert!(out.len() >= 3, "{}", out.len());
        assert!(out.iter().all(|c| c.ends_with(b"\n") && c.len() <= CHUNK_BYTES + 16));
        // A long line in the middle is cut into pieces that each end their chunk.
        let mut mixed = b"a\n".to_vec();
        mixed.extend(vec![b'x'; MAX_LINE + 3]);
        mixed.extend_from_slice(b"\nb\n");
        let out = chunks(&mixed, mixed.len());
        assert_eq!(out, vec![b"a\n".to_vec(), vec![b'x'; MAX_LINE], b"xxx\nb\n".to_vec()]);
    }

    #[test]
    fn cuts_long_lines_at_max_line() {
        let mut input = vec![b'x'; 2 * MAX_LINE + 10];
        input.push(b'\n');
        input.extend_from_slice(&vec![b'y'; MAX_LINE]);
        input.push(b'\n');
        for piece in [1000, MAX_LINE, 3 * MAX_LINE] {
            let out = split(&input, piece);
            assert_eq!(out.concat(), input);
            let lens: Vec<usize> = out.iter().map(Vec::len).collect();
            // A line of exactly MAX_LINE bytes plus newline needs a second, one-byte chunk.
            assert_eq!(lens, vec![MAX_LINE, MAX_LINE, 11, MAX_LINE, 1]);
        }
    }

    #[tokio::test]
    async fn a_closed_sink_still_drains() {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        drop(rx);
        let input = vec![b'z'; 5 * MAX_LINE];
        let read = pump(&input[..], Stream::Stdout, 0, tx, Some(0)).await.expect("drains");
        assert_eq!(read, input.len() as u64);
    }

    #[tokio::test]
    async fn pump_labels_stream_and_step_and_says_where_each_chunk_ends_in_its_file() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        pump(&b"one\ntwo"[..], Stream::Stderr, 3, tx, Some(10)).await.expect("reads");
        let first = rx.recv().await.expect("first");
        assert_eq!(
            (first.stream, first.step, first.data, first.end),
            (Stream::Stderr, 3, b"one\n".to_vec(), Some(14))
        );
        let second = rx.recv().await.expect("second");
        assert_eq!(
            (second.data, second.end),
            (b"two".to_vec(), Some(17)),
            "the last line ends a chunk of its own"
        );
        assert!(rx.recv().await.is_none());
        // A reader that follows no file says nothing of offsets.
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        pump(&b"x\n"[..], Stream::Stdout, 0, tx, None).await.expect("reads");
        assert_eq!(rx.recv().await.expect("chunk").end, None);
    }
}
