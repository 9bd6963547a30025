//! Turning a byte stream into [`OutputChunk`]s: one per line, newline kept, lines longer than
//! [`MAX_LINE`] cut into pieces, and a last line without newline still sent.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, BufReader};

use crate::runtime::{MAX_LINE, OutputChunk, OutputSink, Stream};

/// Reads `reader` to the end and sends its lines to `sink`. Returns the number of bytes read.
///
/// When the sink is closed the rest is still read and dropped: the child must never block on a
/// full pipe just because nobody listens any more.
#[cfg(test)]
pub(crate) async fn pump<R: AsyncRead + Unpin>(
    reader: R,
    stream: Stream,
    step: usize,
    sink: OutputSink,
) -> std::io::Result<u64> {
    pump_tracked(reader, stream, step, sink, &Shipped::default()).await
}

/// How far into a stream the lines handed on reach: the offset after the last one sent.
#[derive(Debug, Default, Clone)]
pub(crate) struct Shipped(Arc<AtomicU64>);

impl Shipped {
    /// Starts counting at `offset` (a stream read from there on).
    pub fn from(offset: u64) -> Shipped {
        Shipped(Arc::new(AtomicU64::new(offset)))
    }

    /// The offset after the last line handed on.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// [`pump`] that also records in `shipped` how far the lines handed to `sink` reach.
pub(crate) async fn pump_tracked<R: AsyncRead + Unpin>(
    reader: R,
    stream: Stream,
    step: usize,
    sink: OutputSink,
    shipped: &Shipped,
) -> std::io::Result<u64> {
    let mut reader = BufReader::with_capacity(MAX_LINE, reader);
    split(&mut reader, |data| {
        let tx = sink.clone();
        let (counter, len) = (shipped.0.clone(), data.len() as u64);
        async move {
            let sent = tx.send(OutputChunk { stream, step, data }).await.is_ok();
            if sent {
                counter.fetch_add(len, Ordering::Relaxed);
            }
            sent
        }
    })
    .await
}

/// The splitting itself, separated from the sink so it can be tested on its own. `emit` returns
/// `false` once the receiver is gone; from then on data is read but not emitted.
async fn split<R, F, Fut>(reader: &mut R, mut emit: F) -> std::io::Result<u64>
where
    R: AsyncBufRead + Unpin,
    F: FnMut(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut line = Vec::new();
    let mut listening = true;
    let mut total = 0u64;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            if !line.is_empty() && listening {
                emit(line).await;
            }
            return Ok(total);
        }
        let room = MAX_LINE - line.len();
        let window = &available[..available.len().min(room)];
        let (taken, complete) = match window.iter().position(|&b| b == b'\n') {
            Some(newline) => (newline + 1, true),
            None => (window.len(), line.len() + window.len() == MAX_LINE),
        };
        if listening {
            line.extend_from_slice(&window[..taken]);
        }
        reader.consume(taken);
        total += taken as u64;
        if complete && listening {
            listening = emit(std::mem::take(&mut line)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn chunks(input: &[u8], reader_capacity: usize) -> Vec<Vec<u8>> {
        let mut reader = BufReader::with_capacity(reader_capacity, input);
        let mut out = Vec::new();
        let read = split(&mut reader, |data| {
            out.push(data);
            async { true }
        })
        .await
        .expect("in-memory read");
        assert_eq!(read, input.len() as u64);
        out
    }

    #[tokio::test]
    async fn keeps_newlines_and_last_partial_line() {
        for capacity in [1, 3, MAX_LINE] {
            let out = chunks(b"a\n\nbc\nlast", capacity).await;
            assert_eq!(out, vec![b"a\n".to_vec(), b"\n".to_vec(), b"bc\n".to_vec(), b"last".to_vec()]);
        }
    }

    #[tokio::test]
    async fn cuts_long_lines_at_max_line() {
        let mut input = vec![b'x'; 2 * MAX_LINE + 10];
        input.push(b'\n');
        input.extend_from_slice(&vec![b'y'; MAX_LINE]);
        input.push(b'\n');
        for capacity in [1000, MAX_LINE] {
            let out = chunks(&input, capacity).await;
            assert!(out.iter().all(|c| c.len() <= MAX_LINE));
            assert_eq!(out.concat(), input);
            let lens: Vec<usize> = out.iter().map(Vec::len).collect();
            // A line of exactly MAX_LINE bytes plus newline needs a second, one-byte chunk.
            assert_eq!(lens, vec![MAX_LINE, MAX_LINE, 11, MAX_LINE, 1]);
        }
    }

    #[tokio::test]
    async fn closed_sink_still_drains() {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        drop(rx);
        let input = vec![b'z'; 5 * MAX_LINE];
        let read = pump(&input[..], Stream::Stdout, 0, tx).await.expect("drains");
        assert_eq!(read, input.len() as u64);
    }

    #[tokio::test]
    async fn pump_labels_stream_and_step() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        pump(&b"one\ntwo"[..], Stream::Stderr, 3, tx).await.expect("reads");
        let first = rx.recv().await.expect("first");
        assert_eq!((first.stream, first.step, first.data), (Stream::Stderr, 3, b"one\n".to_vec()));
        assert_eq!(rx.recv().await.expect("second").data, b"two".to_vec());
        assert!(rx.recv().await.is_none());
    }
}
