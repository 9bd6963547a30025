//! Directory inputs: a tar archive unpacked entry by entry as it streams in, every entry
//! written through [`crate::beneath`]. `tar::Archive::unpack` is not used: it follows links
//! already in the destination and keeps setuid bits.
//!
//! Refused: absolute paths and `..` (the whole input fails, nothing is skipped silently), any
//! write through a symbolic link (one from an earlier entry or input included), hard links,
//! devices and fifos, more than the policy's entries or bytes. Symbolic links are created as
//! entries, whatever they point at: nothing the agent writes follows them, and a read follows
//! them only while they stay inside.

use std::io::Read;
use std::time::{Duration, UNIX_EPOCH};

use futures::TryStreamExt;
use tar::EntryType;

use crate::beneath::{BeneathError, Dir, RelPath};

use super::transfer::{Chunks, TransferError};
use super::{InputFailure, InputPolicy};

/// Why an archive cannot be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// An entry's path is refused, or a link is in its way.
    #[error("entry `{entry}`: {reason}")]
    Entry {
        /// The entry's path in the archive.
        entry: String,
        /// Why.
        reason: BeneathError,
    },
    /// An entry of a kind directory inputs do not carry.
    #[error("entry `{entry}` is a {kind}; directory inputs hold files, directories and symbolic links only")]
    Unsupported {
        /// The entry's path in the archive.
        entry: String,
        /// What it is.
        kind: &'static str,
    },
    /// Too many entries.
    #[error("the archive has more than {limit} entries")]
    TooManyEntries {
        /// The limit.
        limit: u64,
    },
    /// Its files hold too many bytes.
    #[error("the archive unpacks to more than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// The transfer feeding the archive failed.
    #[error(transparent)]
    Transfer(TransferError),
    /// The archive is not a readable tar archive.
    #[error("the archive cannot be read: {0}")]
    Read(std::io::Error),
    /// Writing an entry failed.
    #[error("cannot write entry `{entry}`: {reason}")]
    Write {
        /// The entry's path in the archive.
        entry: String,
        /// The error.
        reason: std::io::Error,
    },
}

/// The limits an archive is held to.
#[derive(Debug, Clone, Copy)]
pub(super) struct ArchiveLimits {
    /// Most entries.
    pub entries: u64,
    /// Most bytes of file content.
    pub bytes: u64,
}

impl ArchiveLimits {
    /// The policy's limits.
    pub fn of(policy: &InputPolicy) -> ArchiveLimits {
        ArchiveLimits { entries: policy.max_entries, bytes: policy.max_bytes }
    }
}

/// Unpacks the archive arriving as `chunks` into `dest`, on a blocking thread.
pub(super) async fn extract(dest: Dir, chunks: Chunks, limits: ArchiveLimits) -> Result<(), InputFailure> {
    let reader = tokio_util::io::StreamReader::new(chunks.map_err(std::io::Error::other));
    let reader = tokio_util::io::SyncIoBridge::new(reader);
    tokio::task::spawn_blocking(move || unpack(reader, &dest, limits))
        .await
        .map_err(|e| InputFailure::Write(std::io::Error::other(e)))??;
    Ok(())
}

/// Unpacks the tar archive read from `archive` into `dest`.
pub(super) fn unpack(archive: impl Read, dest: &Dir, limits: ArchiveLimits) -> Result<(), ArchiveError> {
    let mut archive = tar::Archive::new(archive);
    let mut entries = 0u64;
    let mut bytes = 0u64;
    for entry in archive.entries().map_err(read_error)? {
        let mut entry = entry.map_err(read_error)?;
        entries += 1;
        if entries > limits.entries {
            return Err(ArchiveError::TooManyEntries { limit: limits.entries });
        }
        let path = entry.path().map_err(read_error)?.into_owned();
        let shown = path.display().to_string();
        let refused = |reason| ArchiveError::Entry { entry: shown.clone(), reason };
        let rel = RelPath::new(&path).map_err(refused)?;
        let header = entry.header();
        let mode = header.mode().unwrap_or(0o644);
        let mtime = header.mtime().ok();
        let kind = header.entry_type();
        match kind {
            EntryType::Directory if rel.is_empty() => {}
            EntryType::Directory => {
                dest.create_dir_all(&rel, Some(mode)).map_err(refused)?;
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let mut file = dest.create_file(&rel, mode).map_err(refused)?;
                bytes = copy(&mut entry, &mut file, bytes, limits.bytes, &shown)?;
                if let Some(mtime) = mtime {
                    // Build tools compare times; a time that cannot be set is not worth failing for.
                    let _ = file.set_modified(UNIX_EPOCH + Duration::from_secs(mtime));
                }
            }
            EntryType::Symlink => {
                let target = entry.link_name().map_err(read_error)?.unwrap_or_default().into_owned();
                dest.symlink(&rel, &target).map_err(refused)?;
            }
            // Metadata the tar reader already applied to the entries it describes.
            EntryType::XGlobalHeader
            | EntryType::XHeader
            | EntryType::GNULongName
            | EntryType::GNULongLink => {}
            other => return Err(ArchiveError::Unsupported { entry: shown, kind: kind_name(&other) }),
        }
    }
    Ok(())
}

/// Copies one entry's content, counting it against the archive's byte limit.
fn copy(
    entry: &mut impl Read,
    file: &mut std::fs::File,
    mut total: u64,
    limit: u64,
    shown: &str,
) -> Result<u64, ArchiveError> {
    use std::io::Write;
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let n = entry.read(&mut buffer).map_err(read_error)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
        if total > limit {
            return Err(ArchiveError::TooLarge { limit });
        }
        file.write_all(&buffer[..n])
            .map_err(|reason| ArchiveError::Write { entry: shown.to_owned(), reason })?;
    }
}

/// A read error, unwrapped to the transfer's error when the transfer failed.
fn read_error(e: std::io::Error) -> ArchiveError {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<TransferError>()) {
        Some(transfer) => ArchiveError::Transfer(transfer.clone()),
        None => ArchiveError::Read(e),
    }
}

fn kind_name(kind: &EntryType) -> &'static str {
    match kind {
        EntryType::Link => "hard link",
        EntryType::Char | EntryType::Block => "device",
        EntryType::Fifo => "fifo",
        _ => "entry of an unknown kind",
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use bytes::Bytes;
    use futures::StreamExt;

    use super::*;

    /// An archive builder that writes names as given, `..` and `/` included (the tar crate's
    /// own `set_path` refuses those).
    struct Archive(tar::Builder<Vec<u8>>);

    impl Default for Archive {
        fn default() -> Self {
            Archive(tar::Builder::new(Vec::new()))
        }
    }

    impl Archive {
        fn entry(mut self, kind: EntryType, name: &str, mode: u32, link: Option<&str>, data: &[u8]) -> Self {
            let mut header = tar::Header::new_gnu();
            header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(link) = link {
                header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            }
            header.set_entry_type(kind);
            header.set_mode(mode);
            header.set_size(data.len() as u64);
            header.set_cksum();
            self.0.append(&header, data).unwrap();
            self
        }
        fn file(self, name: &str, data: &str) -> Self {
            self.entry(EntryType::Regular, name, 0o644, None, data.as_bytes())
        }
        fn bytes(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    struct Scene {
        _tmp: tempfile::TempDir,
        ws: std::path::PathBuf,
        outside: std::path::PathBuf,
    }

    fn scene() -> Scene {
        let tmp = tempfile::tempdir().unwrap();
        let ws = tmp.path().join("ws");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&ws).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        Scene { _tmp: tmp, ws, outside }
    }

    impl Scene {
        fn unpack(&self, archive: Vec<u8>, limits: ArchiveLimits) -> Result<(), ArchiveError> {
            unpack(archive.as_slice(), &Dir::open(&self.ws).unwrap(), limits)
        }
        fn outside_is_empty(&self) {
            assert_eq!(std::fs::read_dir(&self.outside).unwrap().count(), 0, "something was written outside");
        }
    }

    const ROOMY: ArchiveLimits = ArchiveLimits { entries: 100, bytes: 1 << 20 };

    #[test]
    fn dotdot_and_absolute_entries_are_refused() {
        let s = scene();
        let outside = s.outside.display().to_string();
        for name in ["../outside/x", "a/../../outside/x", &format!("{outside}/x"), "/etc/drover-x"] {
            let archive = Archive::default().file("ok.txt", "fine").file(name, "evil").bytes();
            let err = s.unpack(archive, ROOMY).unwrap_err();
            assert!(
                matches!(&err, ArchiveError::Entry { reason: BeneathError::NotRelative { .. }, .. }),
                "{name}: {err}"
            );
        }
        s.outside_is_empty();
        assert!(!Path::new("/etc/drover-x").exists());
    }

    #[test]
    fn writes_through_a_link_entry_are_refused() {
        let s = scene();
        let outside = s.outside.display().to_string();
        for (second, why) in [("link/x", "a link as a parent"), ("link", "the link itself")] {
            let archive = Archive::default()
                .entry(EntryType::Symlink, "link", 0o777, Some(&outside), b"")
                .file(second, "evil")
                .bytes();
            let err = s.unpack(archive, ROOMY).unwrap_err();
            assert!(
                matches!(&err, ArchiveError::Entry { reason: BeneathError::Link { .. }, .. }),
                "{why}: {err}"
            );
        }
        // The link stays, as an entry: it is only never written through.
        assert_eq!(std::fs::read_link(s.ws.join("link")).unwrap(), s.outside);
        s.outside_is_empty();
    }

    #[test]
    fn a_link_already_in_the_workspace_is_not_followed() {
        let s = scene();
        std::os::unix::fs::symlink(&s.outside, s.ws.join("data")).unwrap();
        let err = s.unpack(Archive::default().file("data/x", "evil").bytes(), ROOMY).unwrap_err();
        assert!(matches!(&err, ArchiveError::Entry { reason: BeneathError::Link { .. }, .. }), "{err}");
        s.outside_is_empty();
    }

    #[test]
    fn entries_lose_special_bits_and_odd_kinds_are_refused() {
        let s = scene();
        let archive = Archive::default()
            .entry(EntryType::Directory, "./", 0o755, None, b"")
            .entry(EntryType::Directory, "bin", 0o7777, None, b"")
            .entry(EntryType::Regular, "bin/tool", 0o6755, None, b"#!/bin/sh\n")
            .entry(EntryType::Symlink, "bin/alias", 0o777, Some("tool"), b"")
            .bytes();
        s.unpack(archive, ROOMY).unwrap();
        let mode = |p: &str| std::fs::metadata(s.ws.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!((mode("bin"), mode("bin/tool")), (0o755, 0o755));
        assert_eq!(std::fs::read_to_string(s.ws.join("bin/alias")).unwrap(), "#!/bin/sh\n");
        for (kind, what) in
            [(EntryType::Link, "hard link"), (EntryType::Fifo, "fifo"), (EntryType::Char, "device")]
        {
            let archive = Archive::default().entry(kind, "odd", 0o644, Some("bin/tool"), b"").bytes();
            let err = s.unpack(archive, ROOMY).unwrap_err();
            assert!(err.to_string().contains(what), "{err}");
        }
        assert!(!s.ws.join("odd").exists());
    }

    #[test]
    fn archives_are_held_to_their_limits() {
        let s = scene();
        let archive = || Archive::default().file("a", "12345").file("b", "67890").bytes();
        s.unpack(archive(), ArchiveLimits { entries: 2, bytes: 10 }).unwrap();
        let err = s.unpack(archive(), ArchiveLimits { entries: 1, bytes: 10 }).unwrap_err();
        assert!(matches!(err, ArchiveError::TooManyEntries { limit: 1 }), "{err}");
        let err = s.unpack(archive(), ArchiveLimits { entries: 2, bytes: 9 }).unwrap_err();
        assert!(matches!(err, ArchiveError::TooLarge { limit: 9 }), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_stalled_archive_fails_with_the_transfers_reason() {
        let s = scene();
        let archive = Archive::default().file("a", &"x".repeat(4000)).bytes();
        let head = Bytes::copy_from_slice(&archive[..1024]);
        let chunks: Chunks = Box::pin(futures::stream::iter([Ok(head)]).chain(futures::stream::pending()));
        let quick = InputPolicy { stall: Duration::from_millis(100), ..InputPolicy::default() };
        let guard = super::super::transfer::Guard::new(&quick, None).unwrap();
        let chunks = super::super::transfer::guarded(chunks, guard);
        let err = extract(Dir::open(&s.ws).unwrap(), chunks, ROOMY).await.unwrap_err();
        assert!(
            matches!(err, InputFailure::Archive(ArchiveError::Transfer(TransferError::Stalled(_)))),
            "{err}"
        );
    }
}
