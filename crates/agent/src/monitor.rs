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
}
