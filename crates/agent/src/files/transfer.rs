//! Bytes on their way into the workspace, guarded: a transfer fails when nothing arrives for
//! too long, when more arrives than allowed (or than was announced), and when less arrives
//! than was announced. Nothing is held in memory beyond the chunk in hand.

use std::time::Duration;

use bytes::Bytes;
use drover_proto as pb;
use futures::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;

use super::{InputFailure, InputPolicy, ServerLink};

/// Why a transfer failed part way.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransferError {
    /// Nothing arrived for too long.
    #[error("nothing arrived for {}s; the transfer stalled", .0.as_secs())]
    Stalled(Duration),
    /// More bytes than allowed (or than announced).
    #[error("larger than the limit of {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// Fewer bytes than announced.
    #[error("the transfer ended after {got} of {announced} bytes")]
    Short {
        /// Bytes received.
        got: u64,
        /// Bytes announced.
        announced: u64,
    },
    /// The sender failed part way.
    #[error("{0}")]
    Source(String),
}

/// The limits a transfer is held to.
#[derive(Debug, Clone, Copy)]
pub(super) struct Guard {
    /// Longest wait for the next chunk.
    pub stall: Duration,
    /// Most bytes.
    pub max: u64,
    /// The size the sender announced, which must be met exactly.
    pub announced: Option<u64>,
}

impl Guard {
    /// The guard for a transfer announcing `announced` bytes (`None`: unknown), refusing
    /// one that announces more than the policy allows before anything is read.
    pub fn new(policy: &InputPolicy, announced: Option<u64>) -> Result<Guard, TransferError> {
        let max = match announced {
            Some(size) if size > policy.max_bytes => {
                return Err(TransferError::TooLarge { limit: policy.max_bytes });
            }
            Some(size) => size,
            None => policy.max_bytes,
        };
        Ok(Guard { stall: policy.stall, max, announced })
    }
}

/// A stream of chunks in transit.
pub(super) type Chunks = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, TransferError>> + Send>>;

/// `chunks` held to `guard`; the stream ends after its first error.
pub(super) fn guarded(chunks: Chunks, guard: Guard) -> Chunks {
    let state = (chunks, 0u64, false);
    Box::pin(futures::stream::unfold(state, move |(mut chunks, got, failed)| async move {
        if failed {
            return None;
        }
        let (item, got) = match tokio::time::timeout(guard.stall, chunks.next()).await {
            Err(_) => (Err(TransferError::Stalled(guard.stall)), got),
            Ok(None) => match guard.announced {
                Some(announced) if got < announced => (Err(TransferError::Short { got, announced }), got),
                _ => return None,
            },
            Ok(Some(Err(e))) => (Err(e), got),
            Ok(Some(Ok(chunk))) => {
                let got = got.saturating_add(chunk.len() as u64);
                if got > guard.max {
                    (Err(TransferError::TooLarge { limit: guard.max }), got)
                } else {
                    (Ok(chunk), got)
                }
            }
        };
        let failed = item.is_err();
        Some((item, (chunks, got, failed)))
    }))
}

/// Opens blob `digest` on a server: its chunks, guarded by the size it announces.
pub(super) async fn blob(
    link: &ServerLink,
    digest: &str,
    policy: &InputPolicy,
) -> Result<Chunks, InputFailure> {
    let stall = TransferError::Stalled(policy.stall);
    let refused = |status: tonic::Status| InputFailure::Blob {
        digest: digest.to_owned(),
        message: status.message().to_owned(),
    };
    let mut stream = tokio::time::timeout(policy.stall, async {
        let mut client = link.client().await?;
        let request = pb::BlobRef { digest: digest.to_owned(), ..Default::default() };
        client.get_blob(request).await.map(tonic::Response::into_inner).map_err(refused)
    })
    .await
    .map_err(|_| stall.clone())??;
    // The first chunk announces the size (0: unknown; an empty blob sends no chunk at all).
    let first =
        tokio::time::timeout(policy.stall, stream.message()).await.map_err(|_| stall)?.map_err(refused)?;
    let announced = first.as_ref().map(|c| c.size).filter(|size| *size > 0);
    let guard = Guard::new(policy, announced)?;
    let first = futures::stream::iter(first.map(|c| Ok(Bytes::from(c.data))));
    let rest = stream.map(|chunk| {
        chunk
            .map(|c| Bytes::from(c.data))
            .map_err(|status| TransferError::Source(status.message().to_owned()))
    });
    Ok(guarded(Box::pin(first.chain(rest)), guard))
}

/// Writes `chunks` to `file` as they come; returns the bytes written.
pub(super) async fn write_to(file: std::fs::File, mut chunks: Chunks) -> Result<u64, InputFailure> {
    let mut file = tokio::fs::File::from_std(file);
    let mut written = 0u64;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        file.write_all(&chunk).await.map_err(InputFailure::Write)?;
        written += chunk.len() as u64;
    }
    // A tokio file finishes its last write in the background unless flushed.
    file.flush().await.map_err(InputFailure::Write)?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: Vec<Result<&'static [u8], TransferError>>) -> Chunks {
        Box::pin(futures::stream::iter(parts.into_iter().map(|p| p.map(Bytes::from_static))))
    }

    async fn drain(mut chunks: Chunks) -> Result<Vec<u8>, TransferError> {
        let mut out = Vec::new();
        while let Some(chunk) = chunks.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    fn policy(max_bytes: u64) -> InputPolicy {
        InputPolicy { max_bytes, stall: Duration::from_secs(60), ..InputPolicy::default() }
    }

    #[tokio::test]
    async fn sizes_are_held_to_the_cap_and_the_announcement() {
        let guard = Guard::new(&policy(5), None).unwrap();
        assert_eq!(drain(guarded(chunks(vec![Ok(b"ab"), Ok(b"cde")]), guard)).await.unwrap(), b"abcde");
        let over = drain(guarded(chunks(vec![Ok(b"abc"), Ok(b"def")]), guard)).await;
        assert!(matches!(over, Err(TransferError::TooLarge { limit: 5 })), "{over:?}");
        assert!(matches!(Guard::new(&policy(5), Some(6)), Err(TransferError::TooLarge { limit: 5 })));
        let announced = Guard::new(&policy(100), Some(4)).unwrap();
        let short = drain(guarded(chunks(vec![Ok(b"abc")]), announced)).await;
        assert!(matches!(short, Err(TransferError::Short { got: 3, announced: 4 })), "{short:?}");
        let long = drain(guarded(chunks(vec![Ok(b"abcde")]), announced)).await;
        assert!(matches!(long, Err(TransferError::TooLarge { limit: 4 })), "{long:?}");
    }

    #[tokio::test]
    async fn a_silent_sender_fails_the_transfer() {
        let silent: Chunks =
            Box::pin(futures::stream::iter([Ok(Bytes::from_static(b"a"))]).chain(futures::stream::pending()));
        let quick = InputPolicy { stall: Duration::from_millis(100), ..policy(100) };
        let got = drain(guarded(silent, Guard::new(&quick, None).unwrap())).await;
        assert!(matches!(got, Err(TransferError::Stalled(_))), "{got:?}");
    }
}
