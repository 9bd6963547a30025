//! `drover-guest relay SOCKET`: the host side of a guest network connection.
//!
//! QEMU's user-mode network starts one relay per connection the guest opens to a forward, with
//! the connection on stdin, stdout and stderr. The relay copies bytes both ways between it and
//! the Unix socket the host serves for that forward, so the host decides, per VM and per task,
//! what a forward leads to. Nothing may be written to stderr: it is the guest's connection.

use std::fs::File;
use std::io::{Read, Write};
use std::mem::ManuallyDrop;
use std::net::Shutdown;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Relays until both directions ended; returns the process exit code.
pub(crate) fn run(socket: &Path) -> i32 {
    let Ok(host) = UnixStream::connect(socket) else {
        // Nobody serves this forward (no task claimed the VM, or the task has no such
        // endpoint): the guest sees its connection closed.
        return 1;
    };
    let Ok(mut upstream) = host.try_clone() else {
        return 1;
    };
    // SAFETY: QEMU hands the connection over as fds 0 and 1, open for the life of the process;
    // ManuallyDrop keeps the Files from closing them.
    let mut guest_in = ManuallyDrop::new(unsafe { File::from_raw_fd(0) });
    let mut guest_out = ManuallyDrop::new(unsafe { File::from_raw_fd(1) });
    let inbound = std::thread::spawn(move || {
        let _ = copy(&mut *guest_in, &mut upstream);
        let _ = upstream.shutdown(Shutdown::Write);
    });
    let mut downstream = host;
    let _ = copy(&mut downstream, &mut *guest_out);
    // SAFETY: fd 1 is the connection socket; shutting down its write side tells the guest that
    // the host side ended. A failure (not a socket) only means nothing to tell.
    unsafe {
        libc::shutdown(1, libc::SHUT_WR);
    }
    let _ = inbound.join();
    0
}

fn copy(from: &mut impl Read, to: &mut impl Write) -> std::io::Result<()> {
    let mut buffer = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        to.write_all(&buffer[..n])?;
    }
}
