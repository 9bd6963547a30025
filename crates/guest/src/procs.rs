//! Processes as `/proc` and `wait4` describe them, for both sides of Drover's sandboxes: the
//! agent's process runtime and the microVM's guest agent read the same files and decode the
//! same statuses, so this is the one place that knows how.
//!
//! `/proc/PID/stat` gives the start time that tells a live pid from a reused one, and the CPU
//! time and resident memory of every process in a step's process group (live stats).

use std::sync::OnceLock;

/// The fields of `/proc/PID/stat` the runtime uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// One-letter state (`R`, `S`, `Z`, ...).
    pub state: char,
    /// Process group id.
    pub pgrp: i32,
    /// User plus system time of the process itself, in clock ticks.
    pub own_ticks: u64,
    /// User plus system time of its waited-for children, in clock ticks.
    pub children_ticks: u64,
    /// Start time in clock ticks since boot.
    pub start_ticks: u64,
    /// Resident set size in pages.
    pub rss_pages: u64,
}

impl ProcStat {
    /// Whether the process is still running (not a zombie waiting to be reaped, not dead).
    pub fn alive(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// The real uid of process `pid`, from `/proc/PID/status`.
pub fn uid_of(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Parses the text of `/proc/PID/stat`. The comm field (2) is free text in parentheses that may
/// itself contain spaces and parentheses, so the fixed fields are counted from the *last* `)`.
pub fn parse(text: &str) -> Option<ProcStat> {
    let close = text.rfind(')')?;
    let fields: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // `fields[0]` is field 3 of proc(5), so field n is `fields[n - 3]`.
    let field = |n: usize| fields.get(n - 3).copied();
    let num = |n: usize| field(n).and_then(|f| f.parse::<u64>().ok());
    // cutime, cstime and rss are signed in the kernel; negative values are nonsense for us.
    let signed = |n: usize| field(n).and_then(|f| f.parse::<i64>().ok()).map(|v| v.max(0) as u64);
    Some(ProcStat {
        state: field(3)?.chars().next()?,
        pgrp: field(5)?.parse().ok()?,
        own_ticks: num(14)? + num(15)?,
        children_ticks: signed(16)? + signed(17)?,
        start_ticks: num(22)?,
        rss_pages: signed(24)?,
    })
}

/// Reads and parses `/proc/PID/stat`; `None` when the process is gone.
pub fn read(pid: i32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse(&text)
}

/// What the processes of one process group use right now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GroupUsage {
    /// CPU seconds of the members plus their waited-for children.
    pub cpu_seconds: f64,
    /// Sum of the members' resident memory.
    pub rss_bytes: u64,
    /// Members that are still running (zombies excluded).
    pub alive: usize,
}

/// Scans `/proc` for the members of process group `pgid`. Blocking (reads many small files).
pub fn group_usage(pgid: i32) -> GroupUsage {
    let mut usage = GroupUsage::default();
    let mut ticks = 0u64;
    for stat in all_processes().filter(|s| s.pgrp == pgid) {
        // A child's time moves into its parent's children_ticks when it is reaped, so adding
        // both never counts a process twice.
        ticks += stat.own_ticks + stat.children_ticks;
        usage.rss_bytes += stat.rss_pages * page_size();
        usage.alive += usize::from(stat.alive());
    }
    usage.cpu_seconds = ticks as f64 / clock_ticks_per_second() as f64;
    usage
}

/// Pids of the running (non-zombie) members of process group `pgid`. Blocking.
pub fn alive_members(pgid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| read(pid).is_some_and(|s| s.pgrp == pgid && s.alive()))
        .collect()
}

fn all_processes() -> impl Iterator<Item = ProcStat> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(read)
}

/// `sysconf(_SC_CLK_TCK)`, the unit of the tick fields.
pub fn clock_ticks_per_second() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| sysconf(libc::_SC_CLK_TCK, 100))
}

fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| sysconf(libc::_SC_PAGESIZE, 4096))
}

fn sysconf(name: libc::c_int, fallback: u64) -> u64 {
    // SAFETY: sysconf only reads a configuration value; it has no memory-safety preconditions.
    let value = unsafe { libc::sysconf(name) };
    if value > 0 { value as u64 } else { fallback }
}

/// How a process ended, from its raw wait status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WaitStatus {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal, when a signal ended it.
    pub signal: Option<i32>,
}

/// Decodes a raw status from `wait4`/`waitpid`.
pub fn decode_wait(raw: libc::c_int) -> WaitStatus {
    if libc::WIFEXITED(raw) {
        WaitStatus { code: Some(libc::WEXITSTATUS(raw)), signal: None }
    } else if libc::WIFSIGNALED(raw) {
        WaitStatus { code: None, signal: Some(libc::WTERMSIG(raw)) }
    } else {
        WaitStatus::default()
    }
}

/// CPU seconds (user plus system) and peak resident bytes of an rusage.
pub fn rusage_totals(rusage: &libc::rusage) -> (f64, u64) {
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    // ru_maxrss is in KiB on Linux.
    (seconds(rusage.ru_utime) + seconds(rusage.ru_stime), (rusage.ru_maxrss.max(0) as u64) * 1024)
}

/// Finds the program of argv[0] before forking, so that a missing binary is a clean start
/// error and the search uses the step's PATH rather than the caller's. Names with a `/` are
/// relative to `cwd`, the step's working directory.
pub fn resolve_program(
    name: &str,
    search_path: &str,
    cwd: &std::path::Path,
) -> std::io::Result<std::path::PathBuf> {
    if name.contains('/') {
        let path = cwd.join(name);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} is not an executable file", path.display()),
            ))
        };
    }
    search_path
        .split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| cwd.join(dir).join(name))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{name} not found in PATH")))
}

/// Whether `path` is a file someone may execute.
pub fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_comm_with_spaces_and_parentheses() {
        let text = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 3 2 1 20 0 1 0 \
                    98765 1000000 250 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0";
        let stat = parse(text).expect("parses");
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.pgrp, 4242);
        assert_eq!(stat.own_ticks, 10);
        assert_eq!(stat.children_ticks, 3);
        assert_eq!(stat.start_ticks, 98765);
        assert_eq!(stat.rss_pages, 250);
    }

    #[test]
    fn rejects_truncated_text() {
        assert_eq!(parse("12 (x) S 1 2"), None);
        assert_eq!(parse("garbage"), None);
    }

    #[test]
    fn decodes_wait_statuses() {
        assert_eq!(decode_wait(7 << 8), WaitStatus { code: Some(7), signal: None });
        assert_eq!(decode_wait(9), WaitStatus { code: None, signal: Some(9) });
    }

    #[test]
    fn resolves_programs_in_path_and_relative_to_the_working_directory() {
        let sh = resolve_program("sh", "/usr/bin:/bin", std::path::Path::new("/")).expect("sh in PATH");
        assert!(sh.ends_with("sh"));
        let missing =
            resolve_program("drover-no-such-binary", "/usr/bin:/bin", std::path::Path::new("/")).unwrap_err();
        assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);
        assert!(resolve_program("./missing", "", std::path::Path::new("/tmp")).is_err());
    }

    #[test]
    fn reads_own_process() {
        let stat = read(std::process::id() as i32).expect("own stat");
        assert!(stat.alive());
        assert!(stat.start_ticks > 0);
    }
}
