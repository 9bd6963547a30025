//! Blob uploads and downloads over gRPC streams.

use std::pin::Pin;
use std::sync::Arc;

use drover_blobs::{BlobError, BlobStore, Digest};
use drover_proto as pb;
use futures::{Stream, StreamExt};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

/// Bytes per download message.
const CHUNK: usize = 1 << 20;

/// Maps blob errors onto gRPC codes.
pub(crate) fn blob_status(e: BlobError) -> Status {
    match e {
        BlobError::NotFound { .. } => Status::not_found(e.to_string()),
        BlobError::DigestMismatch { .. } | BlobError::InvalidDigest { .. } => {
            Status::invalid_argument(e.to_string())
        }
        BlobError::TooLarge { .. } => Status::resource_exhausted(e.to_string()),
        BlobError::Corrupt { .. } => Status::data_loss(e.to_string()),
        other => {
            tracing::error!(error = %other, "blob store error");
            Status::unavailable(other.to_string())
        }
    }
}

/// Parses a digest from a request.
pub(crate) fn digest(text: &str) -> Result<Digest, Status> {
    text.parse().map_err(|e: BlobError| Status::invalid_argument(e.to_string()))
}

/// Stores an upload: its `first` message (read by the caller, which authorizes the upload by
/// it; it may carry the expected digest) and the rest of the stream.
pub(crate) async fn put(
    blobs: &Arc<dyn BlobStore>,
    first: pb::BlobChunk,
    mut stream: Streaming<pb::BlobChunk>,
    max_size: u64,
) -> Result<pb::BlobRef, Status> {
    let expected = if first.digest.is_empty() { None } else { Some(digest(&first.digest)?) };
    if first.size > max_size {
        return Err(Status::resource_exhausted(format!(
            "upload of {} bytes is larger than the server's limit of {max_size} bytes",
            first.size
        )));
    }
    // Feed the gRPC stream into the blob store as an AsyncRead.
    let (tx, rx) = mpsc::channel::<std::io::Result<bytes::Bytes>>(8);
    let first_data = first.data;
    let pump = tokio::spawn(async move {
        if !first_data.is_empty() && tx.send(Ok(bytes::Bytes::from(first_data))).await.is_err() {
            return;
        }
        while let Some(chunk) = stream.next().await {
            let item = chunk.map(|c| bytes::Bytes::from(c.data)).map_err(std::io::Error::other);
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                return;
            }
        }
    });
    let mut reader = tokio_util::io::StreamReader::new(ReceiverStream::new(rx));
    let stored = blobs.put(&mut reader, expected.as_ref(), Some(max_size)).await.map_err(blob_status);
    pump.abort();
    let info = stored?;
    tracing::info!(digest = %info.digest, size = info.size, "blob stored");
    Ok(pb::BlobRef { digest: info.digest.to_string(), size: info.size, project: String::new() })
}

/// A download stream of a stored blob, verified as it is read.
pub(crate) async fn get(
    blobs: &Arc<dyn BlobStore>,
    digest: &Digest,
) -> Result<Pin<Box<dyn Stream<Item = Result<pb::BlobChunk, Status>> + Send>>, Status> {
    let size = blobs.stat(digest).await.map_err(blob_status)?;
    let mut reader = blobs.get(digest).await.map_err(blob_status)?;
    let (tx, rx) = mpsc::channel(4);
    let name = digest.to_string();
    tokio::spawn(async move {
        let mut first = true;
        let mut buf = vec![0u8; CHUNK];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => {
                    let msg = pb::BlobChunk {
                        digest: if first { name.clone() } else { String::new() },
                        size: if first { size.unwrap_or(0) } else { 0 },
                        data: buf[..n].to_vec(),
                        project: String::new(),
                    };
                    first = false;
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!(digest = %name, error = %e, "blob download failed");
                    let _ = tx.send(Err(Status::data_loss(format!("blob {name} cannot be read: {e}")))).await;
                    return;
                }
            }
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}
