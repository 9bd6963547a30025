//! Waiting for the end of a process that is not our child (a step's supervisor is the
//! launcher's): a pidfd becomes readable when its process exits (Linux 5.3+).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// How the end of a process can be awaited.
#[derive(Debug)]
pub(super) enum Watch {
    /// Through its pidfd.
    Pidfd(OwnedFd),
    /// It has ended already.
    Gone,
    /// This kernel has no pidfds: only by polling.
    Poll,
}

/// A watch on `pid`, taken as soon as it is known: a pidfd names the process itself, so a pid
/// used again later cannot confuse it.
pub(super) fn watch(pid: i32) -> Watch {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd >= 0 {
        let Ok(fd) = i32::try_from(fd) else { return Watch::Poll };
        // SAFETY: a descriptor just returned by the kernel, owned by nothing else.
        return Watch::Pidfd(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::ESRCH) => Watch::Gone,
        _ => Watch::Poll,
    }
}

/// Waits until the pidfd's process has exited. Returns at once if the pidfd cannot be watched.
pub(super) async fn exited(fd: OwnedFd) {
    // SAFETY: the AsyncFd owns the OwnedFd, which stays open and the same until it is dropped.
    if let Ok(fd) = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
        let _ = fd.readable().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pidfd_wakes_when_its_process_ends() {
        let mut child = std::process::Command::new("sleep").arg("0.2").spawn().expect("sleep");
        let pid = i32::try_from(child.id()).expect("pid");
        let Watch::Pidfd(fd) = watch(pid) else { panic!("no pidfd for a live child") };
        let start = std::time::Instant::now();
        tokio::time::timeout(std::time::Duration::from_secs(10), exited(fd)).await.expect("woke");
        assert!(start.elapsed() >= std::time::Duration::from_millis(100), "woke before the end");
        child.wait().expect("reap");
        assert!(matches!(watch(pid), Watch::Gone | Watch::Poll));
    }
}
