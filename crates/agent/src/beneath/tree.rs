//! Removing a directory tree through directory fds, following no link.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

/// Removes the directory `name` of `parent` with everything in it. Iterative, with one open
/// directory per level: a deep tree (a guest can make one) cannot exhaust the thread's stack.
pub(super) fn remove(parent: BorrowedFd<'_>, name: &OsStr) -> Result<(), Errno> {
    let mut open: Vec<(OwnedFd, OsString)> = vec![(open_dir(parent, name)?, name.to_owned())];
    while let Some((dir, _)) = open.last() {
        match clear_files(dir.as_fd())? {
            Some(sub) => {
                let fd = open_dir(dir.as_fd(), &sub)?;
                open.push((fd, sub));
            }
            None => {
                let (_, done) = open.pop().ok_or(Errno::INVAL)?;
                let above = open.last().map_or(parent, |(fd, _)| fd.as_fd());
                match rustix::fs::unlinkat(above, &done, AtFlags::REMOVEDIR) {
                    Ok(()) | Err(Errno::NOENT) => {}
                    Err(errno) => return Err(errno),
                }
            }
        }
    }
    Ok(())
}

/// Unlinks the entries of `dir` that are not directories, up to the first directory, whose
/// name it returns.
fn clear_files(dir: BorrowedFd<'_>) -> Result<Option<OsString>, Errno> {
    let entries = rustix::fs::Dir::read_from(dir)?;
    for entry in entries {
        let entry = entry?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes());
        if name == "." || name == ".." {
            continue;
        }
        if entry.file_type() == FileType::Directory {
            return Ok(Some(name.to_owned()));
        }
        match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            // The entry's type was unknown to the directory listing.
            Err(Errno::ISDIR) => return Ok(Some(name.to_owned())),
            Err(errno) => return Err(errno),
        }
    }
    Ok(None)
}

fn open_dir(parent: BorrowedFd<'_>, name: &OsStr) -> Result<OwnedFd, Errno> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    rustix::fs::openat(parent, name, flags, Mode::empty())
}
