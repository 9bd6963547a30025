//! Path resolution that cannot leave a directory: `openat2(RESOLVE_BENEATH)`, or, on kernels
//! without it (before 5.6), a walk one component at a time with `O_NOFOLLOW`.
//!
//! Both give the same answers: a symbolic link is refused (`ELOOP`) when links are refused,
//! and one that leads above the directory or is absolute is refused (`EXDEV`) when links
//! inside are followed.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use super::RelPath;

/// Whether symbolic links on the way are followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Links {
    /// Any link on the way, the last component included, fails the open with `ELOOP`.
    Refuse,
    /// Links are followed while they stay beneath the directory.
    Inside,
}

/// Set once `openat2` answered `ENOSYS`, so later opens go straight to the walk.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// How often an open is retried when the kernel reports that a rename raced the lookup.
const RACE_RETRIES: usize = 8;

/// Links followed in one walk before it gives up, as the kernel does (`MAXSYMLINKS`).
const MAX_HOPS: usize = 40;

/// Opens `rel` beneath `dir`. `flags` gets `O_CLOEXEC`, and `O_NOFOLLOW` when links are
/// refused.
pub(super) fn open(
    dir: BorrowedFd<'_>,
    rel: &RelPath,
    flags: OFlags,
    mode: Mode,
    links: Links,
) -> Result<OwnedFd, Errno> {
    let mut flags = flags | OFlags::CLOEXEC;
    let mut resolve = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
    if links == Links::Refuse {
        flags |= OFlags::NOFOLLOW;
        resolve |= ResolveFlags::NO_SYMLINKS;
    }
    if !NO_OPENAT2.load(Ordering::Relaxed) && !seam::walking() {
        let path = rel.to_path();
        for _ in 0..RACE_RETRIES {
            match rustix::fs::openat2(dir, &path, flags, mode, resolve) {
                Err(Errno::AGAIN) => continue,
                Err(Errno::NOSYS) => {
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                    break;
                }
                done => return done,
            }
        }
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            return Err(Errno::AGAIN);
        }
    }
    walk(dir, rel, flags, mode, links)
}

/// The fallback: one `openat(O_NOFOLLOW)` per component, links resolved here (or refused).
pub(super) fn walk(
    root: BorrowedFd<'_>,
    rel: &RelPath,
    flags: OFlags,
    mode: Mode,
    links: Links,
) -> Result<OwnedFd, Errno> {
    // Directories entered below `root`; `..` from a link target pops one, and popping past
    // `root` is an escape.
    let mut entered: Vec<OwnedFd> = Vec::new();
    let mut todo: VecDeque<OsString> = rel.parts().iter().cloned().collect();
    let mut hops = 0;
    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    while let Some(name) = todo.pop_front() {
        let here = entered.last().map_or(root, |fd| fd.as_fd());
        match name.as_bytes() {
            b"." => continue,
            b".." => {
                entered.pop().ok_or(Errno::XDEV)?;
                continue;
            }
            _ => {}
        }
        let is_link = rustix::fs::statat(here, &name, AtFlags::SYMLINK_NOFOLLOW)
            .is_ok_and(|stat| FileType::from_raw_mode(stat.st_mode) == FileType::Symlink);
        if is_link {
            if links == Links::Refuse {
                return Err(Errno::LOOP);
            }
            hops += 1;
            if hops > MAX_HOPS {
                return Err(Errno::LOOP);
            }
            let target = rustix::fs::readlinkat(here, &name, Vec::new())?;
            let target = target.as_bytes();
            if target.starts_with(b"/") {
                return Err(Errno::XDEV);
            }
            for part in target.split(|b| *b == b'/').filter(|p| !p.is_empty()).rev() {
                todo.push_front(std::ffi::OsStr::from_bytes(part).to_owned());
            }
            continue;
        }
        if todo.is_empty() {
            // O_NOFOLLOW: a link swapped in since the check fails here instead of being followed.
            return rustix::fs::openat(here, &name, flags | OFlags::NOFOLLOW, mode);
        }
        entered.push(rustix::fs::openat(here, &name, dir_flags, Mode::empty())?);
    }
    // The path (or a link's target) ended in `.` or `..`, or named the directory itself.
    let here = entered.last().map_or(root, |fd| fd.as_fd());
    rustix::fs::openat(here, ".", flags, mode)
}

/// Test seam: tests make a thread take the fallback walk on a kernel that has `openat2`.
mod seam {
    #[cfg(test)]
    thread_local! {
        static WALK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Whether this thread's opens take the fallback walk.
    #[cfg(test)]
    pub(super) fn walking() -> bool {
        WALK.with(std::cell::Cell::get)
    }

    /// Production opens take the walk only when the kernel lacks `openat2`.
    #[cfg(not(test))]
    pub(super) fn walking() -> bool {
        false
    }

    /// Runs `f` with this thread's opens taking the fallback walk.
    #[cfg(test)]
    pub(crate) fn with_walk<T>(f: impl FnOnce() -> T) -> T {
        WALK.with(|w| w.set(true));
        let out = f();
        WALK.with(|w| w.set(false));
        out
    }
}

#[cfg(test)]
pub(crate) use seam::with_walk;
