//! Files beneath a directory. The agent writes into task workspaces on behalf of others
//! (inputs, directory archives, a microVM guest's changes) and reads outputs out of them; any
//! of those may leave symbolic links there, and none may make the agent touch a file outside.
//!
//! Every path is resolved by the kernel beneath an open directory (`openat2` with
//! `RESOLVE_BENEATH`; on kernels without it, `resolve.rs` walks one component at a time), so
//! nothing can be swapped in between a check and the use. Writes follow no symbolic link at
//! all, not even one that stays inside: refusing every link keeps the rule one line long, and
//! the fallback walk gives the same answer without resolving links itself. Reads follow links while they stay beneath the directory,
//! so an output that links to another file of the workspace is still read.
//!
//! What is created here is never setuid, setgid or sticky, nor writable by group or others
//! ([`FILE_MODE_MASK`]), whatever mode the archive or the guest asked for.

mod rel;
mod resolve;
mod tree;

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

pub use rel::RelPath;
use resolve::Links;

/// Permission bits kept on created files: rwx for the owner, r-x for the rest.
pub const FILE_MODE_MASK: u32 = 0o755;

/// Permission bits of directories created on the way to a path.
const PARENT_MODE: u32 = 0o755;

/// Why a path beneath a directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BeneathError {
    /// An absolute path, or one with `..`.
    #[error("`{path}` is not a path inside the workspace")]
    NotRelative {
        /// The path as given.
        path: String,
    },
    /// A symbolic link on the way, or at the end, where none may be followed.
    #[error("`{path}` is or goes through a symbolic link, which is not followed here")]
    Link {
        /// The path as given.
        path: String,
    },
    /// A symbolic link on the way leads out of the directory.
    #[error("`{path}` leads outside the workspace")]
    Escapes {
        /// The path as given.
        path: String,
    },
    /// Something on the way is not a directory.
    #[error("`{path}` goes through a file that is not a directory")]
    NotDir {
        /// The path as given.
        path: String,
    },
    /// Nothing is there.
    #[error("no `{path}` in the workspace")]
    NotFound {
        /// The path as given.
        path: String,
    },
    /// A file was expected, and something else (a directory, a fifo, a device, a file with
    /// other hard links) is there.
    #[error("`{path}` is not a regular file")]
    NotFile {
        /// The path as given.
        path: String,
    },
    /// Any other failure of the file system.
    #[error("cannot {action} `{path}`: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path as given.
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl BeneathError {
    /// The error for `errno` from an operation on `path`.
    fn from_errno(errno: Errno, path: &RelPath, action: &'static str) -> BeneathError {
        let path = path.to_string();
        match errno {
            Errno::LOOP => BeneathError::Link { path },
            Errno::XDEV => BeneathError::Escapes { path },
            Errno::NOTDIR => BeneathError::NotDir { path },
            Errno::NOENT => BeneathError::NotFound { path },
            _ => BeneathError::Io { action, path, source: errno.into() },
        }
    }

    fn io(source: io::Error, path: &RelPath, action: &'static str) -> BeneathError {
        BeneathError::Io { action, path: path.to_string(), source }
    }
}

/// An open directory; every path given to it is resolved beneath it.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
}

impl Dir {
    /// Opens the directory at `path`, which the agent trusts (its own workspace directory).
    pub fn open(path: &Path) -> Result<Dir, BeneathError> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        rustix::fs::open(path, flags, Mode::empty()).map(|fd| Dir { fd }).map_err(|errno| BeneathError::Io {
            action: "open the directory",
            path: path.display().to_string(),
            source: errno.into(),
        })
    }

    /// Creates the directory at `path` (and its parents) unless it exists, and opens it.
    pub fn create(path: &Path) -> Result<Dir, BeneathError> {
        std::fs::create_dir_all(path).map_err(|source| BeneathError::Io {
            action: "create the directory",
            path: path.display().to_string(),
            source,
        })?;
        Dir::open(path)
    }

    /// Another handle on the same directory (for a blocking task).
    pub fn try_clone(&self) -> Result<Dir, BeneathError> {
        let fd = self.fd.try_clone().map_err(|e| BeneathError::io(e, &RelPath::default(), "open"))?;
        Ok(Dir { fd })
    }

    /// Opens the directory `rel`, following no link.
    pub fn open_dir(&self, rel: &RelPath) -> Result<Dir, BeneathError> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY;
        resolve::open(self.fd.as_fd(), rel, flags, Mode::empty(), Links::Refuse).map(|fd| Dir { fd }).map_err(
            |errno| match errno {
                // `openat2` answers a link at the end of the path with ENOTDIR (O_DIRECTORY).
                Errno::NOTDIR if self.is_link(rel) => BeneathError::Link { path: rel.to_string() },
                _ => BeneathError::from_errno(errno, rel, "open the directory"),
            },
        )
    }

    /// Whether `rel` is a symbolic link (reached without following one).
    fn is_link(&self, rel: &RelPath) -> bool {
        // O_PATH with O_NOFOLLOW opens a link at the end of the path instead of refusing it.
        match resolve::open(self.fd.as_fd(), rel, OFlags::PATH, Mode::empty(), Links::Refuse) {
            Ok(fd) => rustix::fs::fstat(&fd)
                .is_ok_and(|stat| rustix::fs::FileType::from_raw_mode(stat.st_mode).is_symlink()),
            Err(errno) => errno == Errno::LOOP,
        }
    }

    /// Creates the missing directories of `rel` (0755) and opens the last, following no link;
    /// `mode` (masked, and always rwx for the owner so the agent can fill it) is set on the
    /// last one when given.
    pub fn create_dir_all(&self, rel: &RelPath, mode: Option<u32>) -> Result<Dir, BeneathError> {
        let dir = match self.open_dir(rel) {
            Ok(dir) => dir,
            Err(BeneathError::NotFound { .. }) => self.make_dirs(rel)?,
            Err(e) => return Err(e),
        };
        if let Some(mode) = mode {
            let perms = std::fs::Permissions::from_mode(dir_mode(mode));
            File::from(dir.fd.try_clone().map_err(|e| BeneathError::io(e, rel, "set the mode of"))?)
                .set_permissions(perms)
                .map_err(|e| BeneathError::io(e, rel, "set the mode of"))?;
        }
        Ok(dir)
    }

    /// One `mkdirat` and one no-link open per component.
    fn make_dirs(&self, rel: &RelPath) -> Result<Dir, BeneathError> {
        let mut dir = self.try_clone()?;
        let mut walked = RelPath::default();
        for part in rel.parts() {
            let step = RelPath::new(part)?;
            walked = walked.join(&step);
            match rustix::fs::mkdirat(dir.fd.as_fd(), part, Mode::from_raw_mode(PARENT_MODE)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(errno) => return Err(BeneathError::from_errno(errno, &walked, "create the directory")),
            }
            dir = dir.open_dir(&step).map_err(|e| rename(e, &walked))?;
        }
        Ok(dir)
    }

    /// Creates (or truncates) the regular file `rel` for writing, with its parents; `mode` is
    /// masked. A link, or anything else than a regular file with a single name, at `rel` is
    /// refused before anything is truncated.
    pub fn create_file(&self, rel: &RelPath, mode: u32) -> Result<File, BeneathError> {
        let file = self.write_file(rel, mode)?;
        file.set_len(0).map_err(|e| BeneathError::io(e, rel, "truncate"))?;
        Ok(file)
    }

    /// [`Dir::create_file`] without truncating a file that exists: for writes at an offset.
    pub fn open_for_write(&self, rel: &RelPath, mode: u32) -> Result<File, BeneathError> {
        self.write_file(rel, mode)
    }

    fn write_file(&self, rel: &RelPath, mode: u32) -> Result<File, BeneathError> {
        let (parent, name) =
            rel.split_last().ok_or_else(|| BeneathError::NotFile { path: rel.to_string() })?;
        let dir = self.create_dir_all(&parent, None)?;
        let mode = mode & FILE_MODE_MASK;
        // O_NONBLOCK: opening a fifo for writing would otherwise wait for a reader.
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::NONBLOCK;
        let name = RelPath::new(name)?;
        let fd = resolve::open(dir.fd.as_fd(), &name, flags, Mode::from_raw_mode(mode), Links::Refuse)
            .map_err(|errno| BeneathError::from_errno(errno, rel, "create"))?;
        let file = File::from(fd);
        let meta = file.metadata().map_err(|e| BeneathError::io(e, rel, "inspect"))?;
        // A second hard link would make this write land in a file elsewhere too.
        if !meta.is_file() || std::os::unix::fs::MetadataExt::nlink(&meta) > 1 {
            return Err(BeneathError::NotFile { path: rel.to_string() });
        }
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| BeneathError::io(e, rel, "set the mode of"))?;
        Ok(file)
    }

    /// Makes `rel` a symbolic link to `target`, with its parents, replacing a file or link
    /// there (not a directory). The target is not checked: nothing here follows links when
    /// writing, and reads follow them only while they stay inside.
    pub fn symlink(&self, rel: &RelPath, target: &Path) -> Result<(), BeneathError> {
        let (parent, name) =
            rel.split_last().ok_or_else(|| BeneathError::NotFile { path: rel.to_string() })?;
        let dir = self.create_dir_all(&parent, None)?;
        let fd = dir.fd.as_fd();
        match rustix::fs::symlinkat(target, fd, name) {
            Err(Errno::EXIST) => {
                rustix::fs::unlinkat(fd, name, AtFlags::empty())
                    .map_err(|errno| BeneathError::from_errno(errno, rel, "replace"))?;
                rustix::fs::symlinkat(target, fd, name)
            }
            done => done,
        }
        .map_err(|errno| BeneathError::from_errno(errno, rel, "create the link"))
    }

    /// Removes whatever is at `rel` (a directory with everything in it), following no link;
    /// nothing there is fine.
    pub fn remove(&self, rel: &RelPath) -> Result<(), BeneathError> {
        let (parent, name) =
            rel.split_last().ok_or_else(|| BeneathError::NotFile { path: rel.to_string() })?;
        let dir = match self.open_dir(&parent) {
            Ok(dir) => dir,
            Err(BeneathError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        match rustix::fs::unlinkat(dir.fd.as_fd(), name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(Errno::ISDIR) => tree::remove(dir.fd.as_fd(), name)
                .map_err(|errno| BeneathError::from_errno(errno, rel, "remove")),
            Err(errno) => Err(BeneathError::from_errno(errno, rel, "remove")),
        }
    }

    /// Opens the regular file `rel` for reading, following links while they stay beneath.
    pub fn open_file(&self, rel: &RelPath) -> Result<File, BeneathError> {
        // O_NONBLOCK: opening a fifo must not wait for a writer (it is refused below).
        let flags = OFlags::RDONLY | OFlags::NONBLOCK;
        let fd = resolve::open(self.fd.as_fd(), rel, flags, Mode::empty(), Links::Inside)
            .map_err(|errno| BeneathError::from_errno(errno, rel, "open"))?;
        let file = File::from(fd);
        let meta = file.metadata().map_err(|e| BeneathError::io(e, rel, "inspect"))?;
        if !meta.is_file() {
            return Err(BeneathError::NotFile { path: rel.to_string() });
        }
        Ok(file)
    }
}

/// The mode given to a directory: masked, and rwx for the owner so it can be filled.
fn dir_mode(mode: u32) -> u32 {
    (mode & FILE_MODE_MASK) | 0o700
}

/// `e` about `path` instead of the single component it was reported for.
fn rename(e: BeneathError, path: &RelPath) -> BeneathError {
    let path = path.to_string();
    match e {
        BeneathError::Link { .. } => BeneathError::Link { path },
        BeneathError::Escapes { .. } => BeneathError::Escapes { path },
        BeneathError::NotDir { .. } => BeneathError::NotDir { path },
        BeneathError::NotFound { .. } => BeneathError::NotFound { path },
        BeneathError::Io { action, source, .. } => BeneathError::Io { action, path, source },
        other => other,
    }
}

#[cfg(test)]
mod tests;
