//! What PID 1 does before serving: filesystems, kernel modules, loopback and the user-mode
//! network interface if there is one, ports; and at the end,
//! powering off.

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use drover_guest::net;
use drover_guest::protocol::{GUEST_WORKSPACE, PORT_NAMES};

use crate::log;

/// Where the host puts the guest's kernel modules, loaded in file-name order.
const MODULE_DIR: &str = "/.drover/modules";

/// Mounts the basic filesystems, loads the shipped modules and brings the interfaces up.
pub(crate) fn setup_system() -> std::io::Result<()> {
    for (source, target, fstype, options) in [
        ("proc", "/proc", "proc", ""),
        ("sysfs", "/sys", "sysfs", ""),
        ("devtmpfs", "/dev", "devtmpfs", "mode=0755"),
        ("tmpfs", "/tmp", "tmpfs", "mode=1777"),
        ("devpts", "/dev/pts", "devpts", "mode=0620,ptmxmode=0666"),
        ("tmpfs", "/dev/shm", "tmpfs", "mode=1777"),
        ("tmpfs", "/run", "tmpfs", "mode=0755"),
    ] {
        std::fs::create_dir_all(target)?;
        if let Err(error) = mount(source, target, fstype, options) {
            log!("mount {target}: {error}");
        }
    }
    std::fs::create_dir_all(GUEST_WORKSPACE)?;
    load_modules(Path::new(MODULE_DIR));
    if let Err(error) = inet_socket().and_then(|socket| interface_up(&socket, "lo")) {
        log!("cannot bring lo up: {error}");
    }
    if Path::new("/sys/class/net").join(net::INTERFACE).exists()
        && let Err(error) = network_up()
    {
        log!("cannot configure {}: {error}", net::INTERFACE);
    }
    Ok(())
}

fn mount(source: &str, target: &str, fstype: &str, options: &str) -> std::io::Result<()> {
    let cstr = |s: &str| CString::new(s).map_err(std::io::Error::other);
    let (source, target, fstype, options) = (cstr(source)?, cstr(target)?, cstr(fstype)?, cstr(options)?);
    // SAFETY: all four pointers are valid NUL-terminated strings that outlive the call.
    let rc =
        unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, options.as_ptr().cast()) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

fn load_modules(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut modules: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
    modules.sort();
    for module in modules {
        let Ok(file) = std::fs::File::open(&module) else {
            continue;
        };
        let params = c"";
        // SAFETY: finit_module takes an open module file descriptor, a NUL-terminated parameter
        // string and flags; both stay valid for the call.
        let rc = unsafe {
            libc::syscall(libc::SYS_finit_module, std::os::fd::AsRawFd::as_raw_fd(&file), params.as_ptr(), 0)
        };
        let error = std::io::Error::last_os_error();
        if rc != 0 && error.raw_os_error() != Some(libc::EEXIST) {
            log!("cannot load {}: {error}", module.display());
        }
    }
}

/// Configures the user-mode network interface when the VM has one (see [`drover_guest::net`]):
/// its address on the connected /24, where the forwards live; no default route, since the
/// forwards are the only destinations there are.
fn network_up() -> std::io::Result<()> {
    let socket = inet_socket()?;
    let mask = u32::MAX << (32 - u32::from(net::PREFIX_LEN));
    set_address(&socket, net::INTERFACE, libc::SIOCSIFADDR, u32::from(net::GUEST_ADDR))?;
    set_address(&socket, net::INTERFACE, libc::SIOCSIFNETMASK, mask)?;
    interface_up(&socket, net::INTERFACE)
}

fn inet_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket creation; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn interface_request(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is a plain C struct (name array and a union of integers) for which all-zero
    // bytes are valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().take(libc::IFNAMSIZ - 1).zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    request
}

/// Sets an IPv4 address-valued setting (`SIOCSIFADDR`, `SIOCSIFNETMASK`) of an interface.
fn set_address(socket: &OwnedFd, name: &str, request_code: libc::Ioctl, address: u32) -> std::io::Result<()> {
    let mut request = interface_request(name);
    let sockaddr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: address.to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in fits in the sockaddr of the union and is plain data.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (&raw const sockaddr).cast::<u8>(),
            (&raw mut request.ifr_ifru.ifru_addr).cast::<u8>(),
            std::mem::size_of::<libc::sockaddr_in>(),
        );
    }
    // SAFETY: the ioctl reads the ifreq we pass, which is valid.
    if unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(socket), request_code, &request) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn interface_up(socket: &OwnedFd, name: &str) -> std::io::Result<()> {
    let mut request = interface_request(name);
    let fd = std::os::fd::AsRawFd::as_raw_fd(socket);
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we pass, which is valid.
    unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut request) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        request.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(fd, libc::SIOCSIFFLAGS, &request) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Opens the host ports, in [`PORT_NAMES`] order, waiting for the driver to create them.
pub(crate) fn open_ports(patience: Duration) -> std::io::Result<Vec<OwnedFd>> {
    let deadline = Instant::now() + patience;
    loop {
        let found = find_ports();
        if found.iter().all(Option::is_some) || (Instant::now() > deadline && found[0].is_some()) {
            return found.into_iter().flatten().map(|dev| open_port(&dev)).collect();
        }
        if Instant::now() > deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no virtio-serial port named {} appeared", PORT_NAMES[0]),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `/dev/vportNpM` of each named port, from `/sys/class/virtio-ports/*/name`.
fn find_ports() -> Vec<Option<PathBuf>> {
    let mut found = vec![None; PORT_NAMES.len()];
    let Ok(entries) = std::fs::read_dir("/sys/class/virtio-ports") else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(name) = std::fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if let Some(index) = PORT_NAMES.iter().position(|p| *p == name.trim()) {
            found[index] = Some(Path::new("/dev").join(entry.file_name()));
        }
    }
    found
}

fn open_port(device: &Path) -> std::io::Result<OwnedFd> {
    let path = CString::new(device.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: path is a valid NUL-terminated string; the result is checked.
    let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Sets the wall clock to `unix_ms`.
pub(crate) fn set_clock(unix_ms: u64) {
    let time = libc::timespec {
        tv_sec: (unix_ms / 1000) as libc::time_t,
        tv_nsec: ((unix_ms % 1000) * 1_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads the timespec we pass, which is valid.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &time) } != 0 {
        log!("cannot set the clock: {}", std::io::Error::last_os_error());
    }
}

/// Credits `seed` to the kernel's entropy pool and forces the CRNG to reseed from it at once,
/// so that VMs restored from one snapshot stop sharing their random state. A plain write to
/// `/dev/urandom` would only mix the bytes in, and the CRNG would keep its old key until its
/// next scheduled reseed.
pub(crate) fn reseed_random(seed: &[u8]) {
    // `struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }`
    let mut info = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
    info.extend_from_slice(seed);
    // RNDADDENTROPY = _IOW('R', 0x03, int[2]); RNDRESEEDCRNG = _IO('R', 0x07).
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    let Ok(random) = std::fs::OpenOptions::new().write(true).open("/dev/urandom") else {
        log!("cannot open /dev/urandom to reseed: {}", std::io::Error::last_os_error());
        return;
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&random);
    // SAFETY: `info` is a valid rand_pool_info of `seed.len()` bytes and outlives the call;
    // RNDRESEEDCRNG takes no argument. Both need CAP_SYS_ADMIN, which PID 1 has.
    let added = unsafe { libc::ioctl(fd, RNDADDENTROPY as _, info.as_ptr()) };
    let reseeded = unsafe { libc::ioctl(fd, RNDRESEEDCRNG as _) };
    if added != 0 || reseeded != 0 {
        log!("reseeding the random number generator failed: {}", std::io::Error::last_os_error());
    }
}

/// Milliseconds since the guest kernel booted.
pub(crate) fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0, |seconds| (seconds * 1000.0) as u64)
}

/// Kills every process, flushes filesystems and powers the VM off. Never returns.
pub(crate) fn power_off() -> ! {
    // SAFETY: kill(-1) signals every process but PID 1; sync and reboot have no memory
    // arguments. If reboot fails, exiting PID 1 panics the kernel, which (with `panic=-1` and
    // QEMU's `-no-reboot`) also ends the VM.
    unsafe {
        libc::kill(-1, libc::SIGKILL);
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    std::process::exit(1)
}
