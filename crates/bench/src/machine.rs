//! What the benchmark ran on: printed above the table so figures can be compared.

use std::process::Command;

/// The machine's description.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Logical cores usable by this process.
    pub cores: usize,
    /// CPU model name.
    pub cpu: String,
    /// Total memory, GiB.
    pub memory_gib: f64,
    /// Kernel release.
    pub kernel: String,
    /// When the run started (UTC).
    pub date: String,
    /// 1-minute load average when the run started: other work competing for the cores.
    pub load: String,
}

/// The number of cores this process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Reads the machine's description from /proc.
pub fn describe() -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let memory_kib: f64 = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    Machine {
        cores: cores(),
        cpu,
        memory_gib: memory_kib / (1024.0 * 1024.0),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        date,
        load: read("/proc/loadavg").split_whitespace().next().unwrap_or("?").to_string(),
    }
}

impl std::fmt::Display for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} cores ({}), {:.1} GiB memory, Linux {}, {}, load average {} at start",
            self.cores, self.cpu, self.memory_gib, self.kernel, self.date, self.load
        )
    }
}

/// Peak resident memory (VmHWM) of a process, in MiB.
pub fn peak_rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| anyhow::anyhow!("cannot read /proc/{pid}/status: {e}"))?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmHWM in /proc/{pid}/status"))?;
    Ok(kib / 1024.0)
}

/// Clock ticks per second of the CPU times in `/proc/<pid>/stat` (`USER_HZ`, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// Fields of `/proc/<pid>/stat` after the command name: (state, parent pid, CPU seconds of the
/// process itself, CPU seconds of its children that it waited for).
fn proc_stat(pid: u32) -> anyhow::Result<(u32, f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| anyhow::anyhow!("cannot read /proc/{pid}/stat: {e}"))?;
    // The command name may hold spaces and parentheses: the fields start after the last `)`.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<f64> {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| anyhow::anyhow!("/proc/{pid}/stat has no field {i}"))
    };
    // After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    let ppid = field(1)? as u32;
    Ok((ppid, (field(11)? + field(12)?) / USER_HZ, (field(13)? + field(14)?) / USER_HZ))
}

/// CPU seconds a process used so far, its own and those of the children it waited for.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let (_, own, children) = proc_stat(pid)?;
    Ok(own + children)
}

/// CPU seconds a process tree used so far: the process (with the children it waited for) and
/// its live direct children (a database's backends, say).
pub fn tree_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let mut total = cpu_seconds(pid)?;
    let entries = std::fs::read_dir("/proc").map_err(|e| anyhow::anyhow!("cannot list /proc: {e}"))?;
    for entry in entries.flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        // A process that exited meanwhile is simply not counted.
        if let Ok((ppid, own, _)) = proc_stat(child)
            && ppid == pid
        {
            total += own;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_used_some_cpu_and_its_tree_at_least_as_much() {
        let pid = std::process::id();
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(50) {}
        let own = cpu_seconds(pid).unwrap();
        assert!(own > 0.0, "{own}");
        assert!(tree_cpu_seconds(pid).unwrap() >= own);
        assert!(cpu_seconds(u32::MAX).is_err());
    }
}
