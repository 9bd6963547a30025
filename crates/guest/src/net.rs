//! The guest's network layout, shared by host and guest.
//!
//! A VM either has no network device at all, or one virtio-net device on QEMU user-mode
//! networking in restricted mode: the guest reaches nothing but the forwards the host set up at
//! boot. Every forward leads, through `drover-guest relay`, to a Unix socket in the VM's
//! directory, and only what the host serves on that socket is reachable. The forwards are fixed
//! at boot so that a VM booted ahead of time (a warm VM) can serve any task: the host binds the
//! sockets when a task claims the VM.

use std::net::{Ipv4Addr, SocketAddrV4};

/// The guest's address on the user-mode network.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

/// Prefix length of the user-mode network (`10.0.2.0/24`).
pub const PREFIX_LEN: u8 = 24;

/// Name of the guest's network interface when it has one.
pub const INTERFACE: &str = "eth0";

/// The address on which the guest reaches the host's forwards.
pub const FORWARD_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 100);

/// Guest-side port of the egress proxy (HTTP, `CONNECT` and absolute-URI requests).
pub const EGRESS_PROXY_PORT: u16 = 3128;

/// Guest-side port of the first host-port slot; slot `i` is at `FIRST_HOST_PORT + i`.
pub const FIRST_HOST_PORT: u16 = 4001;

/// How many host endpoints a VM can reach besides the egress proxy.
pub const HOST_PORT_SLOTS: usize = 4;

/// Host-side socket (in the VM directory) behind the egress proxy forward.
pub const EGRESS_SOCKET: &str = "egress.sock";

/// Where the guest reaches the egress proxy.
pub fn egress_proxy() -> SocketAddrV4 {
    SocketAddrV4::new(FORWARD_ADDR, EGRESS_PROXY_PORT)
}

/// Where the guest reaches host-port slot `slot`.
pub fn host_port(slot: usize) -> SocketAddrV4 {
    SocketAddrV4::new(FORWARD_ADDR, FIRST_HOST_PORT + slot as u16)
}

/// Host-side socket (in the VM directory) behind host-port slot `slot`.
pub fn host_port_socket(slot: usize) -> String {
    format!("hp{slot}.sock")
}
