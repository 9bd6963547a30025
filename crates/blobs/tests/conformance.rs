//! One conformance suite for every [`BlobStore`] backend.
//!
//! Each check in `suite` takes a `&dyn BlobStore` (the corruption check also takes a way to
//! overwrite stored bytes behind the store's back); `blob_store_suite!` instantiates all of them
//! for one backend. Every test gets a fresh, empty store (a temp dir, a new map, a unique S3
//! prefix), so "stores nothing" can be checked with `list`.

mod support;

use std::any::Any;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use drover_blobs::{BlobError, BlobStore, Digest, LocalBlobStore, MemoryBlobStore, S3BlobStore};
use futures::future::BoxFuture;
use object_store::ObjectStoreExt;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

const MIB: usize = 1024 * 1024;

/// Overwrites the bytes stored under a digest through the backend's raw storage.
type Tamper = Box<dyn Fn(Digest, Vec<u8>) -> BoxFuture<'static, ()> + Send + Sync>;

struct Fixture {
    store: Arc<dyn BlobStore>,
    tamper: Tamper,
    /// Whatever must live as long as the store (a temp dir).
    _keep: Box<dyn Any + Send>,
}

async fn local_fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalBlobStore::open(dir.path()).unwrap());
    let raw = Arc::clone(&store);
    let tamper: Tamper = Box::new(move |digest, content| {
        let path = raw.blob_path(&digest);
        Box::pin(async move {
            use std::os::unix::fs::PermissionsExt;
            // Blob files are read-only; a disk error or an intruder does not care.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            std::fs::write(&path, content).unwrap();
        })
    });
    Fixture { store, tamper, _keep: Box::new(dir) }
}

async fn memory_fixture() -> Fixture {
    let store = Arc::new(MemoryBlobStore::new());
    let raw = Arc::clone(&store);
    let tamper: Tamper = Box::new(move |digest, content| {
        raw.overwrite_raw(&digest, content);
        Box::pin(async {})
    });
    Fixture { store, tamper, _keep: Box::new(()) }
}

async fn s3_fixture() -> Fixture {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let server = support::moto::server();
    let prefix = format!(
        "conformance/{}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        rand_suffix()
    );
    let store = Arc::new(S3BlobStore::new(&server.bucket, &prefix, &server.options).unwrap());
    let raw = Arc::clone(&store);
    let tamper: Tamper = Box::new(move |digest, content| {
        let raw = Arc::clone(&raw);
        Box::pin(async move {
            raw.object_store().put(&raw.object_key(&digest), content.into()).await.unwrap();
        })
    });
    Fixture { store, tamper, _keep: Box::new(()) }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Deterministic pseudo-random bytes (xorshift), so large blobs do not compress or repeat.
fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Hands out its data in uneven slices (like a network stream), then optionally fails.
struct TrickleReader {
    data: Vec<u8>,
    pos: usize,
    step: usize,
    fail_at_end: bool,
}

impl TrickleReader {
    fn new(data: Vec<u8>) -> Self {
        TrickleReader { data, pos: 0, step: 1, fail_at_end: false }
    }

    fn failing(data: Vec<u8>) -> Self {
        TrickleReader { fail_at_end: true, ..Self::new(data) }
    }
}

impl AsyncRead for TrickleReader {
    fn poll_read(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos == this.data.len() {
            if this.fail_at_end {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "client went away")));
            }
            return Poll::Ready(Ok(()));
        }
        // Cycle through chunk sizes from 1 byte to ~300 KiB, none aligned to anything.
        this.step = (this.step * 7 + 13) % 300_007 + 1;
        let n = this.step.min(buf.remaining()).min(this.data.len() - this.pos);
        buf.put_slice(&this.data[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// Reads a blob to the end through `get`, in small reads.
async fn read_blob(store: &dyn BlobStore, digest: &Digest) -> Result<Vec<u8>, BlobError> {
    let mut reader = store.get(digest).await?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024 + 7];
    loop {
        let n = reader.read(&mut buf).await.map_err(|err| BlobError::from_io(err, "read a blob"))?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

async fn assert_empty(store: &dyn BlobStore) {
    let listed = store.list().await.unwrap();
    assert!(listed.is_empty(), "expected an empty store, found {listed:?}");
}

mod suite {
    use super::*;

    async fn round_trip(store: &dyn BlobStore, data: Vec<u8>) {
        let digest = Digest::of(&data);
        let info = store.put(&mut TrickleReader::new(data.clone()), None, None).await.unwrap();
        assert_eq!(info.digest, digest);
        assert_eq!(info.size, data.len() as u64);
        assert_eq!(store.stat(&digest).await.unwrap(), Some(data.len() as u64));
        let back = read_blob(store, &digest).await.unwrap();
        assert!(back == data, "content differs after a round trip of {} bytes", data.len());
        assert_eq!(store.list().await.unwrap(), vec![info]);
    }

    pub async fn round_trip_empty(store: &dyn BlobStore) {
        round_trip(store, Vec::new()).await;
        assert_eq!(store.get_bytes(&Digest::of(b"")).await.unwrap(), b"");
    }

    pub async fn round_trip_small(store: &dyn BlobStore) {
        round_trip(store, b"hello, drover".to_vec()).await;
    }

    /// Larger than the S3 part size, without an expected digest (staging upload path).
    pub async fn round_trip_large(store: &dyn BlobStore) {
        round_trip(store, content(12 * MIB + 12_345, 1)).await;
    }

    /// Larger than the S3 part size with the digest announced (direct multipart path).
    pub async fn round_trip_large_with_expected_digest(store: &dyn BlobStore) {
        let data = content(12 * MIB, 2);
        let digest = Digest::of(&data);
        let info = store.put(&mut TrickleReader::new(data.clone()), Some(&digest), None).await.unwrap();
        assert_eq!(info.digest, digest);
        assert!(read_blob(store, &digest).await.unwrap() == data);
        assert_eq!(store.list().await.unwrap(), vec![info]);
    }

    pub async fn reput_is_idempotent(store: &dyn BlobStore) {
        let data = content(100_000, 3);
        let first = store.put_bytes(&data).await.unwrap();
        let second = store.put_bytes(&data).await.unwrap();
        assert_eq!(first, second);
        // With the digest announced and the blob present, the stream is still verified.
        let third = store.put(&mut &data[..], Some(&first.digest), None).await.unwrap();
        assert_eq!(third, first);
        let wrong = store.put(&mut &b"not it"[..], Some(&first.digest), None).await.unwrap_err();
        assert!(matches!(wrong, BlobError::DigestMismatch { .. }), "{wrong:?}");
        assert_eq!(store.list().await.unwrap(), vec![first]);
        assert!(store.get_bytes(&first.digest).await.unwrap() == data);
    }

    pub async fn expected_mismatch_stores_nothing(store: &dyn BlobStore) {
        for (len, seed) in [(1000, 4), (12 * MIB, 5)] {
            let data = content(len, seed);
            let claimed = Digest::of(b"something else");
            let err =
                store.put(&mut TrickleReader::new(data.clone()), Some(&claimed), None).await.unwrap_err();
            match err {
                BlobError::DigestMismatch { expected, actual } => {
                    assert_eq!(expected, claimed);
                    assert_eq!(actual, Digest::of(&data));
                }
                other => panic!("expected a digest mismatch, got {other:?}"),
            }
            assert_eq!(store.stat(&claimed).await.unwrap(), None);
            assert_eq!(store.stat(&Digest::of(&data)).await.unwrap(), None);
            assert_empty(store).await;
        }
    }

    pub async fn size_limit_refuses_and_stores_nothing(store: &dyn BlobStore) {
        for (len, limit) in [(1001, 1000), (12 * MIB, 9 * MIB as u64)] {
            let data = content(len, 6);
            let err = store.put(&mut TrickleReader::new(data.clone()), None, Some(limit)).await.unwrap_err();
            assert!(matches!(err, BlobError::TooLarge { limit: l } if l == limit), "{err:?}");
            // Also when the digest is announced (the direct multipart path on S3).
            let digest = Digest::of(&data);
            let err = store.put(&mut TrickleReader::new(data), Some(&digest), Some(limit)).await.unwrap_err();
            assert!(matches!(err, BlobError::TooLarge { .. }), "{err:?}");
            assert_empty(store).await;
        }
        // Exactly at the limit is allowed.
        let info = store.put(&mut &[7u8; 1000][..], None, Some(1000)).await.unwrap();
        assert_eq!(info.size, 1000);
    }

    pub async fn failed_upload_stores_nothing(store: &dyn BlobStore) {
        for len in [1000, 12 * MIB] {
            let err = store.put(&mut TrickleReader::failing(content(len, 7)), None, None).await.unwrap_err();
            assert!(matches!(err, BlobError::Io { .. }), "{err:?}");
            assert_empty(store).await;
        }
    }

    pub async fn stat_delete_list(store: &dyn BlobStore) {
        let mut infos = Vec::new();
        for (i, len) in [0usize, 1, 4096].into_iter().enumerate() {
            infos.push(store.put_bytes(&content(len, 10 + i as u64)).await.unwrap());
        }
        let mut listed = store.list().await.unwrap();
        listed.sort_by_key(|info| info.digest);
        let mut expected = infos.clone();
        expected.sort_by_key(|info| info.digest);
        assert_eq!(listed, expected);
        for info in &infos {
            assert_eq!(store.stat(&info.digest).await.unwrap(), Some(info.size));
        }

        store.delete(&infos[1].digest).await.unwrap();
        assert_eq!(store.stat(&infos[1].digest).await.unwrap(), None);
        assert!(matches!(store.get(&infos[1].digest).await, Err(BlobError::NotFound { .. })));
        // Deleting again is fine.
        store.delete(&infos[1].digest).await.unwrap();
        let mut listed = store.list().await.unwrap();
        listed.sort_by_key(|info| info.digest);
        expected.retain(|info| info.digest != infos[1].digest);
        assert_eq!(listed, expected);
        // The others are untouched.
        assert_eq!(store.get_bytes(&infos[2].digest).await.unwrap(), content(4096, 12));
    }

    pub async fn missing_blob_is_not_found(store: &dyn BlobStore) {
        let digest = Digest::of(b"never stored");
        match store.get(&digest).await {
            Err(BlobError::NotFound { digest: d }) => assert_eq!(d, digest),
            Err(other) => panic!("expected not found, got {other:?}"),
            Ok(_) => panic!("expected not found, got a reader"),
        }
        assert!(matches!(store.get_bytes(&digest).await, Err(BlobError::NotFound { .. })));
        assert_eq!(store.stat(&digest).await.unwrap(), None);
        store.delete(&digest).await.unwrap();
        assert_empty(store).await;
    }

    pub async fn concurrent_puts_of_same_content(store: &dyn BlobStore) {
        for (len, copies) in [(64 * 1024, 8), (9 * MIB, 3)] {
            let data = content(len, 20 + len as u64);
            let digest = Digest::of(&data);
            let puts = (0..copies).map(|i| {
                let data = data.clone();
                async move {
                    // Half announce the digest, half do not: both paths race each other.
                    let expected = (i % 2 == 0).then_some(digest);
                    store.put(&mut TrickleReader::new(data), expected.as_ref(), None).await
                }
            });
            for result in futures::future::join_all(puts).await {
                assert_eq!(result.unwrap().digest, digest);
            }
            assert!(read_blob(store, &digest).await.unwrap() == data);
        }
        assert_eq!(store.list().await.unwrap().len(), 2);
    }

    pub async fn put_file_round_trip(store: &dyn BlobStore) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output.bin");
        let data = content(300_000, 30);
        std::fs::write(&path, &data).unwrap();
        let info = store.put_file(&path).await.unwrap();
        assert_eq!(info.digest, Digest::of(&data));
        assert_eq!(store.put_file(&path).await.unwrap(), info);
        assert!(store.get_bytes(&info.digest).await.unwrap() == data);
        let missing = store.put_file(&dir.path().join("missing")).await.unwrap_err();
        assert!(matches!(missing, BlobError::Io { .. }), "{missing:?}");
    }

    pub async fn corruption_is_detected(store: &dyn BlobStore, tamper: &Tamper) {
        let data = content(200_000, 40);
        let info = store.put_bytes(&data).await.unwrap();

        // Same length, one bit flipped in the middle.
        let mut flipped = data.clone();
        flipped[100_000] ^= 0x01;
        tamper(info.digest, flipped).await;
        let err = read_blob(store, &info.digest).await.unwrap_err();
        assert!(matches!(err, BlobError::Corrupt { digest } if digest == info.digest), "{err:?}");
        assert!(matches!(store.get_bytes(&info.digest).await, Err(BlobError::Corrupt { .. })));

        // Truncated.
        tamper(info.digest, data[..1000].to_vec()).await;
        let err = read_blob(store, &info.digest).await.unwrap_err();
        assert!(matches!(err, BlobError::Corrupt { .. }), "{err:?}");

        // Restored content reads fine again.
        tamper(info.digest, data.clone()).await;
        assert!(read_blob(store, &info.digest).await.unwrap() == data);
    }
}

/// Instantiates the whole suite for one backend: `blob_store_suite!(module, fixture_fn)`.
macro_rules! blob_store_suite {
    ($backend:ident, $fixture:path) => {
        mod $backend {
            use super::*;

            blob_store_suite!(@store_checks $fixture;
                round_trip_empty,
                round_trip_small,
                round_trip_large,
                round_trip_large_with_expected_digest,
                reput_is_idempotent,
                expected_mismatch_stores_nothing,
                size_limit_refuses_and_stores_nothing,
                failed_upload_stores_nothing,
                stat_delete_list,
                missing_blob_is_not_found,
                concurrent_puts_of_same_content,
                put_file_round_trip,
            );

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn corruption_is_detected() {
                let fixture = $fixture().await;
                suite::corruption_is_detected(&*fixture.store, &fixture.tamper).await;
            }
        }
    };
    (@store_checks $fixture:path; $($check:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let fixture = $fixture().await;
                suite::$check(&*fixture.store).await;
            }
        )*
    };
}

blob_store_suite!(local, local_fixture);
blob_store_suite!(memory, memory_fixture);
blob_store_suite!(s3, s3_fixture);

/// S3 specifics the shared suite cannot see: what is left in the bucket.
mod s3_layout {
    use super::*;
    use futures::TryStreamExt;
    use object_store::ObjectStore;
    use object_store::path::Path as ObjectPath;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uploads_leave_only_blob_objects() {
        let server = support::moto::server();
        let prefix = format!("layout/{}-{}", std::process::id(), rand_suffix());
        let store = S3BlobStore::new(&server.bucket, &prefix, &server.options).unwrap();

        let large = content(12 * MIB, 50);
        let staged = store.put(&mut TrickleReader::new(large.clone()), None, None).await.unwrap();
        let direct_data = content(12 * MIB, 51);
        let direct_digest = Digest::of(&direct_data);
        store.put(&mut TrickleReader::new(direct_data), Some(&direct_digest), None).await.unwrap();
        let small = store.put_bytes(b"small").await.unwrap();
        // Failed uploads of every kind.
        store.put(&mut TrickleReader::failing(content(12 * MIB, 52)), None, None).await.unwrap_err();
        store.put(&mut TrickleReader::new(large.clone()), Some(&small.digest), None).await.unwrap_err();
        store.put(&mut TrickleReader::new(large), None, Some(MIB as u64)).await.unwrap_err();

        let raw: &Arc<dyn ObjectStore> = store.object_store();
        let mut keys: Vec<String> = raw
            .list(Some(&ObjectPath::from(prefix.as_str())))
            .map_ok(|meta| meta.location.to_string())
            .try_collect()
            .await
            .unwrap();
        keys.sort();
        let mut expected: Vec<String> = [staged.digest, direct_digest, small.digest]
            .iter()
            .map(|digest| store.object_key(digest).to_string())
            .collect();
        expected.sort();
        assert_eq!(keys, expected);
    }
}
