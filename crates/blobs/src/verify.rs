//! Streaming helpers shared by the backends: the verifying download reader and the upload loop.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use crate::digest::Hashing;
use crate::{BlobError, BlobInfo, Digest};

/// Size of the buffer the backends read uploads with.
pub(crate) const READ_CHUNK: usize = 256 * 1024;

/// Wraps a blob's raw byte stream and hashes it as it is read. At the end of the stream it
/// compares the hash with the digest the blob is stored under and, on a mismatch, returns
/// [`BlobError::Corrupt`] (inside an `io::Error`, see [`BlobError::from_io`]) instead of EOF. So
/// a reader that reads to the end never accepts corrupt content; a reader that stops early has
/// read only a prefix and has not been told anything about the rest.
pub(crate) struct VerifyingReader<R> {
    inner: R,
    expected: Digest,
    /// `None` once EOF was reached and checked.
    hasher: Option<Sha256>,
    /// Set when the check failed, so every later read fails too instead of reporting EOF.
    corrupt: bool,
}

impl<R> VerifyingReader<R> {
    pub(crate) fn new(inner: R, expected: Digest) -> Self {
        VerifyingReader { inner, expected, hasher: Some(Sha256::new()), corrupt: false }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for VerifyingReader<R> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.corrupt {
            return Poll::Ready(Err(BlobError::Corrupt { digest: this.expected }.into_io()));
        }
        // With no room in `buf` an empty read says nothing about EOF: pass it through unchecked.
        if buf.remaining() == 0 {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let new = &buf.filled()[before..];
        if !new.is_empty() {
            if let Some(hasher) = this.hasher.as_mut() {
                hasher.update(new);
            } else {
                // Data after EOF: the underlying stream is misbehaving; treat it as corruption.
                this.corrupt = true;
            }
            if this.corrupt {
                buf.set_filled(before);
                return Poll::Ready(Err(BlobError::Corrupt { digest: this.expected }.into_io()));
            }
            return Poll::Ready(Ok(()));
        }
        if let Some(hasher) = this.hasher.take() {
            let actual = Digest::from_bytes(hasher.finalize().into());
            if actual != this.expected {
                this.corrupt = true;
                tracing::warn!(digest = %this.expected, %actual, "stored blob is corrupt");
                return Poll::Ready(Err(BlobError::Corrupt { digest: this.expected }.into_io()));
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Reads the next chunk of an upload into `buf`; 0 means EOF.
pub(crate) async fn read_chunk(
    reader: &mut (dyn AsyncRead + Send + Unpin),
    buf: &mut [u8],
) -> Result<usize, BlobError> {
    reader.read(buf).await.map_err(|err| BlobError::from_io(err, "read the upload stream"))
}

/// Reads `reader` to its end, hashing it under the `max_size` cap, without storing anything;
/// then checks the result against `expected`.
pub(crate) async fn hash_stream(
    reader: &mut (dyn AsyncRead + Send + Unpin),
    expected: Option<&Digest>,
    max_size: Option<u64>,
) -> Result<BlobInfo, BlobError> {
    let mut hashing = Hashing::new(max_size);
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let n = read_chunk(reader, &mut buf).await?;
        if n == 0 {
            break;
        }
        hashing.update(&buf[..n])?;
    }
    hashing.finish(expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(data: &'static [u8], digest: Digest) -> Result<Vec<u8>, BlobError> {
        let mut reader = VerifyingReader::new(data, digest);
        let mut out = Vec::new();
        reader.read_to_end(&mut out).await.map_err(|e| BlobError::from_io(e, "read"))?;
        Ok(out)
    }

    #[tokio::test]
    async fn passes_good_content_and_fails_bad_content_at_the_end() {
        assert_eq!(read_all(b"hello", Digest::of(b"hello")).await.unwrap(), b"hello");
        assert_eq!(read_all(b"", Digest::of(b"")).await.unwrap(), b"");
        let err = read_all(b"hellO", Digest::of(b"hello")).await.unwrap_err();
        assert!(matches!(err, BlobError::Corrupt { .. }), "{err:?}");
        let err = read_all(b"hell", Digest::of(b"hello")).await.unwrap_err();
        assert!(matches!(err, BlobError::Corrupt { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn keeps_failing_after_corruption() {
        let mut reader = VerifyingReader::new(&b"bad"[..], Digest::of(b"good"));
        let mut out = Vec::new();
        assert!(reader.read_to_end(&mut out).await.is_err());
        let mut buf = [0u8; 8];
        assert!(reader.read(&mut buf).await.is_err());
    }
}
