//! Blob store in a local directory.
//!
//! Layout under the root:
//!
//! ```text
//! sha256/ab/cdef…   one read-only file per blob: the first two hex digits name a shard
//!                   directory, the other 62 the file
//! tmp/put-…         uploads in progress; renamed into sha256/ once complete and verified
//! ```
//!
//! An upload is written to `tmp/`, fsynced, and renamed into place only after its digest is known
//! (and matched `expected`). `rename` is atomic on one filesystem, so a blob path either does not
//! exist or holds the complete content, and two concurrent uploads of the same content both
//! succeed (the second rename replaces identical bytes). Paths are built only from parsed
//! [`Digest`]s, and the store refuses to follow symlinks below its root (files are opened with
//! `O_NOFOLLOW`, shard directories must be real directories).

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::fs;
use tokio::io::{AsyncRead, AsyncWriteExt, BufReader};

use crate::digest::Hashing;
use crate::verify::{READ_CHUNK, VerifyingReader, hash_stream, read_chunk};
use crate::{BlobError, BlobInfo, BlobReader, BlobStore, Digest};

const BLOBS_DIR: &str = "sha256";
const TMP_DIR: &str = "tmp";
const TMP_PREFIX: &str = "put-";
/// Temp files older than this are leftovers of a crashed upload and are removed on `open`.
/// Generous, because another process may share the directory and still be uploading.
const STALE_TMP_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// A blob store in a local directory (see the module docs for the layout).
#[derive(Debug, Clone)]
pub struct LocalBlobStore {
    /// Canonical (symlink-free) absolute path of the store's directory.
    root: PathBuf,
}

impl LocalBlobStore {
    /// Opens (creating if needed) a blob store in `dir`, and removes temp files left behind by
    /// uploads that crashed more than a day ago.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, BlobError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|err| BlobError::io("create the blob directory", dir, err))?;
        // The root itself may be reached through a symlink (e.g. /var/lib/drover -> /data);
        // resolve it once so that everything below is checked against the real directory.
        let root = std::fs::canonicalize(dir)
            .map_err(|err| BlobError::io("resolve the blob directory", dir, err))?;
        for sub in [BLOBS_DIR, TMP_DIR] {
            let path = root.join(sub);
            match std::fs::create_dir(&path) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
                Err(err) => return Err(BlobError::io("create the blob directory", path, err)),
            }
            let meta = std::fs::symlink_metadata(&path)
                .map_err(|err| BlobError::io("inspect the blob directory", &path, err))?;
            if !meta.is_dir() {
                return Err(BlobError::config(format!(
                    "{} is not a directory (a symlink or file?); the blob store does not follow links out of its root, replace it with a plain directory",
                    path.display()
                )));
            }
        }
        let store = LocalBlobStore { root };
        store.remove_stale_temp_files();
        tracing::info!(root = %store.root.display(), "opened local blob store");
        Ok(store)
    }

    /// The store's directory (canonical path).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file a blob is (or would be) stored in: `<root>/sha256/<2 hex>/<62 hex>`.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root.join(BLOBS_DIR).join(&hex[..2]).join(&hex[2..])
    }

    fn remove_stale_temp_files(&self) {
        let tmp = self.root.join(TMP_DIR);
        let Ok(entries) = std::fs::read_dir(&tmp) else { return };
        let now = SystemTime::now();
        for entry in entries.flatten() {
            let is_old = entry
                .metadata()
                .and_then(|meta| meta.modified())
                .ok()
                .and_then(|modified| now.duration_since(modified).ok())
                .is_some_and(|age| age > STALE_TMP_AGE);
            let is_ours = entry.file_name().to_string_lossy().starts_with(TMP_PREFIX);
            if is_old && is_ours {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => {
                        tracing::info!(path = %entry.path().display(), "removed stale upload temp file")
                    }
                    Err(err) => {
                        tracing::warn!(path = %entry.path().display(), error = %err, "cannot remove stale upload temp file")
                    }
                }
            }
        }
    }

    /// Checks that `sha256/` and the blob's shard directory are real directories, not symlinks.
    /// Returns `false` if the shard directory does not exist (so the blob does not either).
    async fn check_shard(&self, digest: &Digest) -> Result<bool, BlobError> {
        let shard = shard_dir(&self.blob_path(digest));
        Ok(check_real_dir(&self.root.join(BLOBS_DIR)).await? && check_real_dir(&shard).await?)
    }
}

fn shard_dir(blob_path: &Path) -> PathBuf {
    // Blob paths always have a parent: they are built as root/sha256/ab/cdef….
    blob_path.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// `Ok(true)` if `path` is a directory, `Ok(false)` if it does not exist, an error if it is a
/// symlink or anything else.
async fn check_real_dir(path: &Path) -> Result<bool, BlobError> {
    match fs::symlink_metadata(path).await {
        Ok(meta) if meta.is_dir() => Ok(true),
        Ok(_) => Err(refuse_link(path)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(BlobError::io("inspect a blob directory", path, err)),
    }
}

fn refuse_link(path: &Path) -> BlobError {
    BlobError::io(
        "use a blob path",
        path,
        io::Error::other(
            "expected a plain file or directory but found a symlink or special file; the blob store never follows links, remove it",
        ),
    )
}

/// Deletes the temp file of an upload that did not complete, on every early return.
struct TempFile {
    path: Option<PathBuf>,
}

impl TempFile {
    fn disarm(&mut self) {
        self.path = None;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.path.take()
            && let Err(err) = std::fs::remove_file(&path)
            && err.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %err, "cannot remove upload temp file");
        }
    }
}

#[async_trait]
impl BlobStore for LocalBlobStore {
    async fn put(
        &self,
        reader: &mut (dyn AsyncRead + Send + Unpin),
        expected: Option<&Digest>,
        max_size: Option<u64>,
    ) -> Result<BlobInfo, BlobError> {
        // Already stored: verify the stream but write nothing.
        if let Some(expected) = expected
            && self.stat(expected).await?.is_some()
        {
            let info = hash_stream(reader, Some(expected), max_size).await?;
            tracing::debug!(digest = %info.digest, "blob already stored");
            return Ok(info);
        }

        let tmp_path = self.root.join(TMP_DIR).join(format!("{TMP_PREFIX}{:016x}", rand::random::<u64>()));
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o644)
            .open(&tmp_path)
            .await
            .map_err(|err| BlobError::io("create an upload temp file", &tmp_path, err))?;
        let mut temp = TempFile { path: Some(tmp_path.clone()) };

        let mut hashing = Hashing::new(max_size);
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let n = read_chunk(reader, &mut buf).await?;
            if n == 0 {
                break;
            }
            hashing.update(&buf[..n])?;
            file.write_all(&buf[..n]).await.map_err(|err| BlobError::io("write a blob", &tmp_path, err))?;
        }
        // Durable before it becomes visible: a crash after the rename must not leave a short file.
        file.flush().await.map_err(|err| BlobError::io("write a blob", &tmp_path, err))?;
        file.sync_all().await.map_err(|err| BlobError::io("sync a blob", &tmp_path, err))?;
        drop(file);
        let info = hashing.finish(expected)?;

        let final_path = self.blob_path(&info.digest);
        let shard = shard_dir(&final_path);
        match fs::create_dir(&shard).await {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(BlobError::io("create a blob shard directory", &shard, err)),
        }
        self.check_shard(&info.digest).await?;
        match fs::symlink_metadata(&final_path).await {
            Ok(meta) if meta.is_file() => {
                tracing::debug!(digest = %info.digest, "blob already stored");
                return Ok(info);
            }
            // Anything else in the way (a planted symlink) is replaced by the rename, which acts on
            // the link itself and never follows it.
            _ => {}
        }
        fs::set_permissions(&tmp_path, std::fs::Permissions::from_mode(0o444))
            .await
            .map_err(|err| BlobError::io("make a blob read-only", &tmp_path, err))?;
        fs::rename(&tmp_path, &final_path)
            .await
            .map_err(|err| BlobError::io("store a blob", &final_path, err))?;
        temp.disarm();
        // Persist the new directory entry too.
        if let Ok(dir) = fs::File::open(&shard).await
            && let Err(err) = dir.sync_all().await
        {
            tracing::warn!(dir = %shard.display(), error = %err, "cannot sync blob shard directory");
        }
        tracing::debug!(digest = %info.digest, size = info.size, "blob stored");
        Ok(info)
    }

    async fn get(&self, digest: &Digest) -> Result<BlobReader, BlobError> {
        if !self.check_shard(digest).await? {
            return Err(BlobError::NotFound { digest: *digest });
        }
        let path = self.blob_path(digest);
        // O_NONBLOCK keeps a planted FIFO from blocking the open; it changes nothing for files.
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .await
            .map_err(|err| match err.kind() {
                io::ErrorKind::NotFound => BlobError::NotFound { digest: *digest },
                _ if err.raw_os_error() == Some(libc::ELOOP) => refuse_link(&path),
                _ => BlobError::io("open a blob", &path, err),
            })?;
        let meta = file.metadata().await.map_err(|err| BlobError::io("open a blob", &path, err))?;
        if !meta.is_file() {
            return Err(refuse_link(&path));
        }
        Ok(Box::pin(VerifyingReader::new(BufReader::with_capacity(READ_CHUNK, file), *digest)))
    }

    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, BlobError> {
        if !self.check_shard(digest).await? {
            return Ok(None);
        }
        let path = self.blob_path(digest);
        match fs::symlink_metadata(&path).await {
            Ok(meta) if meta.is_file() => Ok(Some(meta.len())),
            Ok(_) => Err(refuse_link(&path)),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(BlobError::io("inspect a blob", &path, err)),
        }
    }

    async fn delete(&self, digest: &Digest) -> Result<(), BlobError> {
        if !self.check_shard(digest).await? {
            return Ok(());
        }
        let path = self.blob_path(digest);
        // `remove_file` removes a symlink itself, never its target.
        match fs::remove_file(&path).await {
            Ok(()) => {
                tracing::debug!(%digest, "blob deleted");
                Ok(())
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(BlobError::io("delete a blob", &path, err)),
        }
    }

    async fn list(&self) -> Result<Vec<BlobInfo>, BlobError> {
        let blobs_dir = self.root.join(BLOBS_DIR);
        check_real_dir(&blobs_dir).await?;
        let mut out = Vec::new();
        let mut shards =
            fs::read_dir(&blobs_dir).await.map_err(|err| BlobError::io("list blobs", &blobs_dir, err))?;
        while let Some(shard) =
            shards.next_entry().await.map_err(|err| BlobError::io("list blobs", &blobs_dir, err))?
        {
            let shard_path = shard.path();
            // `DirEntry::file_type` does not follow symlinks: a linked shard is skipped.
            let file_type =
                shard.file_type().await.map_err(|err| BlobError::io("list blobs", &shard_path, err))?;
            let shard_name = shard.file_name().to_string_lossy().into_owned();
            if !file_type.is_dir() || shard_name.len() != 2 {
                tracing::warn!(path = %shard_path.display(), "ignoring unexpected entry in blob store");
                continue;
            }
            let mut files = fs::read_dir(&shard_path)
                .await
                .map_err(|err| BlobError::io("list blobs", &shard_path, err))?;
            while let Some(file) =
                files.next_entry().await.map_err(|err| BlobError::io("list blobs", &shard_path, err))?
            {
                let file_path = file.path();
                let meta =
                    file.metadata().await.map_err(|err| BlobError::io("list blobs", &file_path, err))?;
                let name = file.file_name().to_string_lossy().into_owned();
                match Digest::from_hex(&format!("{shard_name}{name}")) {
                    Ok(digest) if meta.is_file() => out.push(BlobInfo { digest, size: meta.len() }),
                    _ => {
                        tracing::warn!(path = %file_path.display(), "ignoring unexpected entry in blob store")
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn layout_is_sha256_shard_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path()).unwrap();
        let info = store.put_bytes(b"hello").await.unwrap();
        let hex = info.digest.hex();
        let expected = dir.path().canonicalize().unwrap().join("sha256").join(&hex[..2]).join(&hex[2..]);
        assert_eq!(store.blob_path(&info.digest), expected);
        assert_eq!(std::fs::read(&expected).unwrap(), b"hello");
        // Nothing is left in tmp/.
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn refuses_symlinks_out_of_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret");
        std::fs::write(&secret, b"secret").unwrap();
        let store = LocalBlobStore::open(dir.path()).unwrap();

        // A blob file that is a symlink to a file outside the root.
        let digest = Digest::of(b"secret");
        let path = store.blob_path(&digest);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&secret, &path).unwrap();
        assert!(store.get(&digest).await.is_err());
        assert!(store.stat(&digest).await.is_err());
        assert!(store.list().await.unwrap().is_empty());
        // Storing the real content replaces the link, not the target.
        store.put_bytes(b"secret").await.unwrap();
        assert!(!std::fs::symlink_metadata(&path).unwrap().file_type().is_symlink());
        assert_eq!(store.get_bytes(&digest).await.unwrap(), b"secret");

        // A shard directory that is a symlink to a directory outside the root.
        let other = Digest::of(b"other");
        let shard = shard_dir(&store.blob_path(&other));
        if shard.exists() {
            return; // the two digests share a shard; nothing more to check
        }
        std::fs::write(outside.path().join(&other.hex()[2..]), b"other").unwrap();
        std::os::unix::fs::symlink(outside.path(), &shard).unwrap();
        assert!(store.get(&other).await.is_err());
        assert!(store.stat(&other).await.is_err());
        store.delete(&other).await.unwrap_err();
        assert!(outside.path().join(&other.hex()[2..]).exists());
    }

    #[tokio::test]
    async fn refuses_a_linked_blobs_dir() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("sha256")).unwrap();
        let err = LocalBlobStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, BlobError::Config { .. }), "{err}");
    }

    #[tokio::test]
    async fn failed_uploads_leave_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path()).unwrap();
        let mut reader = &b"too large"[..];
        store.put(&mut reader, None, Some(3)).await.unwrap_err();
        let mut reader = &b"content"[..];
        store.put(&mut reader, Some(&Digest::of(b"other")), None).await.unwrap_err();
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert!(store.list().await.unwrap().is_empty());
    }
}
