//! The guest side of Drover's microVM runtime.
//!
//! The `drover-guest` binary is PID 1 of every microVM: it mounts the basic filesystems, loads
//! the virtio modules, and serves the host over virtio-serial ports. This library holds the wire
//! [`protocol`] both sides speak and the guest's [`net`]work layout and the [`procs`] reading both sides share, so the agent (host) and the
//! guest cannot drift apart.
#![warn(missing_docs)]

pub mod net;
pub mod procs;
pub mod protocol;
