//! What this machine offers: cores and memory, detected unless the operator overrides them.

/// Logical CPUs the agent may use (respects the process's affinity mask and cgroup quota).
pub fn detect_cores() -> u32 {
    std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)
}

/// Total memory in bytes from `/proc/meminfo`, or 0 when it cannot be read.
pub fn detect_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| parse_meminfo_total(&text)).unwrap_or(0)
}

fn parse_meminfo_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes an unprivileged writer may still use on the filesystem of `path`.
pub fn available_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    let stat = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(stat.blocks_available().saturating_mul(stat.fragment_size()))
}

/// Why the node should take no new work, when the filesystem of `work_dir` has less than
/// `min_free` bytes available (0: never); `None` while it has room.
pub fn disk_pause(work_dir: &std::path::Path, min_free: u64) -> Option<String> {
    let free = available_bytes(work_dir).ok()?;
    (free < min_free).then(|| {
        format!(
            "its work dir's disk is full: {:.1} MiB free under {}, it keeps {:.1} MiB free",
            free as f64 / (1u64 << 20) as f64,
            work_dir.display(),
            min_free as f64 / (1u64 << 20) as f64
        )
    })
}

/// The machine's host name, used as the default node name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_meminfo() {
        let text = "MemTotal:       24576000 kB\nMemFree:  1 kB\n";
        assert_eq!(parse_meminfo_total(text), Some(24_576_000 * 1024));
        assert_eq!(parse_meminfo_total("nothing"), None);
        assert!(detect_cores() >= 1);
    }

    #[test]
    fn a_floor_above_the_free_space_pauses_the_node() {
        let dir = tempfile::tempdir().unwrap();
        assert!(available_bytes(dir.path()).unwrap() > 0);
        assert_eq!(disk_pause(dir.path(), 0), None);
        assert_eq!(disk_pause(dir.path(), 1), None);
        let why = disk_pause(dir.path(), u64::MAX).expect("paused");
        assert!(why.contains("disk is full") && why.contains(&dir.path().display().to_string()), "{why}");
    }
}
