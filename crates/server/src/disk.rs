//! Free space under what the server keeps. Below a floor the server refuses new submits and
//! uploads, with a clear error, and keeps the space left for what it acknowledged already:
//! its agents' reports, outputs and logs of the jobs that run.

use std::path::{Path, PathBuf};

use tonic::Status;

/// The filesystems the server writes to, and the space it keeps free on each.
#[derive(Debug, Clone, Default)]
pub(crate) struct DiskGuard {
    dirs: Vec<PathBuf>,
    min_free: u64,
}

impl DiskGuard {
    /// Watches the filesystems of `dirs`, keeping `min_free` bytes free on each (0: no check).
    pub(crate) fn new(dirs: Vec<PathBuf>, min_free: u64) -> DiskGuard {
        DiskGuard { dirs, min_free }
    }

    /// Refuses `what` ("a submit", "an upload") while a watched filesystem has less than the
    /// floor available. A filesystem that cannot be read is let be: the write itself will say.
    pub(crate) fn check(&self, what: &str) -> Result<(), Status> {
        if self.min_free == 0 {
            return Ok(());
        }
        for dir in &self.dirs {
            match available_bytes(dir) {
                Ok(free) if free < self.min_free => {
                    tracing::warn!(dir = %dir.display(), free, min_free = self.min_free, what, "disk full; refused");
                    return Err(Status::resource_exhausted(format!(
                        "the server's disk is full: {} free under {} (it keeps {} free for the work it accepted); {what} is refused until space returns",
                        mib(free),
                        dir.display(),
                        mib(self.min_free)
                    )));
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(dir = %dir.display(), error = %e, "cannot read free space"),
            }
        }
        Ok(())
    }
}

/// Bytes an unprivileged writer may still use on the filesystem of `path`.
pub(crate) fn available_bytes(path: &Path) -> std::io::Result<u64> {
    let stat = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(stat.blocks_available().saturating_mul(stat.fragment_size()))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_floor_above_the_free_space_refuses_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let free = available_bytes(dir.path()).unwrap();
        assert!(free > 0);
        assert!(DiskGuard::new(vec![dir.path().into()], 1).check("a submit").is_ok());
        assert!(DiskGuard::new(vec![dir.path().into()], 0).check("a submit").is_ok(), "0 checks nothing");
        let refused = DiskGuard::new(vec![dir.path().into()], u64::MAX).check("an upload").unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("disk is full") && refused.message().contains("an upload is refused")
        );
        // A directory that does not exist is not a full disk.
        assert!(DiskGuard::new(vec![dir.path().join("gone")], u64::MAX).check("a submit").is_ok());
    }
}
