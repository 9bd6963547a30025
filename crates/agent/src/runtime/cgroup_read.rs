//! The one place that knows which cgroup files hold a sandbox's CPU time, peak memory and OOM
//! kills, in either cgroup version: the process runtime reads its own steps' cgroups with it,
//! the Docker runtime its containers'.

use std::path::Path;

/// Which cgroup interface a directory belongs to; the file names differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Version {
    /// Legacy per-controller hierarchies (`memory.max_usage_in_bytes`, `cpuacct.usage`, ...).
    V1,
    /// Unified hierarchy (`memory.peak`, `cpu.stat`, ...).
    V2,
}

/// CPU time in nanoseconds: `cpuacct.usage` of a v1 cpuacct directory, or `usage_usec` of a v2
/// directory's `cpu.stat`.
pub(crate) fn cpu_ns(version: Version, dir: &Path) -> Option<u64> {
    match version {
        Version::V1 => read_u64(&dir.join("cpuacct.usage")),
        Version::V2 => read_key(&dir.join("cpu.stat"), "usage_usec").map(|us| us.saturating_mul(1000)),
    }
}

/// Highest memory use so far in bytes (v2 kernels without `memory.peak`: the current use).
pub(crate) fn peak_bytes(version: Version, dir: &Path) -> Option<u64> {
    match version {
        Version::V1 => read_u64(&dir.join("memory.max_usage_in_bytes")),
        Version::V2 => read_u64(&dir.join("memory.peak")).or_else(|| read_u64(&dir.join("memory.current"))),
    }
}

/// How many processes the OOM killer killed in the cgroup so far.
pub(crate) fn oom_kills(version: Version, dir: &Path) -> Option<u64> {
    match version {
        Version::V1 => read_key(&dir.join("memory.oom_control"), "oom_kill"),
        Version::V2 => read_key(&dir.join("memory.events"), "oom_kill"),
    }
}

/// A file's text without surrounding whitespace.
pub(crate) fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

/// [`read_key`] parsed as any number type.
pub(crate) fn keyed_value<T: std::str::FromStr>(path: &Path, key: &str) -> Option<T> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(char::is_whitespace)?;
        if k == key { v.trim().parse().ok() } else { None }
    })
}

/// A file holding one number.
pub(crate) fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The value of `key` in a flat-keyed file (`key value` per line: `cpu.stat`, `memory.events`,
/// `memory.oom_control`, `pids.events`).
pub(crate) fn read_key(path: &Path, key: &str) -> Option<u64> {
    keyed_value(path, key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_versions_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::write(d.join("cpuacct.usage"), "123\n").expect("write");
        std::fs::write(d.join("memory.max_usage_in_bytes"), "4096\n").expect("write");
        std::fs::write(d.join("memory.oom_control"), "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
            .expect("write");
        assert_eq!(
            (cpu_ns(Version::V1, d), peak_bytes(Version::V1, d), oom_kills(Version::V1, d)),
            (Some(123), Some(4096), Some(2))
        );
        std::fs::write(d.join("cpu.stat"), "usage_usec 7\nuser_usec 5\n").expect("write");
        std::fs::write(d.join("memory.current"), "100\n").expect("write");
        assert_eq!(
            (cpu_ns(Version::V2, d), peak_bytes(Version::V2, d), oom_kills(Version::V2, d)),
            (Some(7000), Some(100), None)
        );
        std::fs::write(d.join("memory.peak"), "150\n").expect("write");
        assert_eq!(peak_bytes(Version::V2, d), Some(150));
    }
}
