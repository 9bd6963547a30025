//! Reading a container's cgroup directly from the host's cgroup filesystem.
//!
//! Docker's stats endpoint answers only once per second per container (its collector ticks at
//! 1 Hz), which is too slow to take a CPU baseline at every step start. When the engine runs on
//! this host (the normal case: the agent talks to the local socket) the container's cgroup is
//! found through `/proc/<init pid>/cgroup` and read in microseconds. It also gives an exact OOM
//! kill counter, which docker's API only reports once the whole container has died. When the
//! cgroup cannot be found (remote engine, agent in its own cgroup namespace) the runtime falls
//! back to the stats API and to docker's `oom` events.

use std::path::{Path, PathBuf};

use crate::runtime::cgroup_read::{self, Version};

/// Where one container's accounting files live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ContainerCgroup {
    /// cgroup v1: separate `memory` and `cpuacct` hierarchies.
    V1 { memory: PathBuf, cpuacct: PathBuf },
    /// cgroup v2: one unified directory.
    V2 { dir: PathBuf },
}

/// One reading of a container's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Reading {
    /// CPU time of every process the container ever ran, in nanoseconds.
    pub cpu_ns: u64,
    /// Highest memory use so far, in bytes (v2 without `memory.peak`: the current use).
    pub peak_bytes: u64,
    /// How many processes the OOM killer killed in the container so far.
    pub oom_kills: u64,
}

impl ContainerCgroup {
    /// Finds the cgroup of the process `pid` (the container's init, seen from the host) under
    /// `/sys/fs/cgroup`, or `None` when its accounting files are not readable here.
    pub(super) fn of_pid(pid: i64) -> Option<ContainerCgroup> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        Self::locate(&text, Path::new("/sys/fs/cgroup"))
    }

    fn locate(proc_cgroup: &str, root: &Path) -> Option<ContainerCgroup> {
        let mut memory = None;
        let mut cpuacct = None;
        let mut unified = None;
        for line in proc_cgroup.lines() {
            let mut fields = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let relative = path.trim_start_matches('/');
            if controllers.is_empty() {
                unified = Some(root.join(relative));
            }
            for controller in controllers.split(',') {
                match controller {
                    "memory" => memory = Some(root.join(controllers).join(relative)),
                    "cpuacct" => cpuacct = Some(root.join(controllers).join(relative)),
                    _ => {}
                }
            }
        }
        if let (Some(memory), Some(cpuacct)) = (memory, cpuacct) {
            let found = ContainerCgroup::V1 { memory, cpuacct };
            if found.read().is_some() {
                return Some(found);
            }
        }
        let found = ContainerCgroup::V2 { dir: unified? };
        found.read().map(|_| found)
    }

    /// Reads the counters; `None` once the cgroup is gone (the container was removed or died).
    pub(super) fn read(&self) -> Option<Reading> {
        let (cpu, memory) = match self {
            ContainerCgroup::V1 { memory, cpuacct } => ((Version::V1, cpuacct), (Version::V1, memory)),
            ContainerCgroup::V2 { dir } => ((Version::V2, dir), (Version::V2, dir)),
        };
        Some(Reading {
            cpu_ns: cgroup_read::cpu_ns(cpu.0, cpu.1)?,
            peak_bytes: cgroup_read::peak_bytes(memory.0, memory.1)?,
            oom_kills: cgroup_read::oom_kills(memory.0, memory.1).unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_v1_and_v2_layouts() {
        let root = tempfile::tempdir().expect("tempdir");
        let memory = root.path().join("memory/docker/abc");
        let cpuacct = root.path().join("cpu,cpuacct/docker/abc");
        std::fs::create_dir_all(&memory).expect("mkdir");
        std::fs::create_dir_all(&cpuacct).expect("mkdir");
        std::fs::write(memory.join("memory.max_usage_in_bytes"), "4096\n").expect("write");
        std::fs::write(memory.join("memory.oom_control"), "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
            .expect("write");
        std::fs::write(cpuacct.join("cpuacct.usage"), "123\n").expect("write");
        let v1 = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/system.slice/x\n";
        let found = ContainerCgroup::locate(v1, root.path()).expect("v1 cgroup");
        assert_eq!(found, ContainerCgroup::V1 { memory: memory.clone(), cpuacct });
        assert_eq!(found.read(), Some(Reading { cpu_ns: 123, peak_bytes: 4096, oom_kills: 2 }));

        let dir = root.path().join("system.slice/docker-abc.scope");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("cpu.stat"), "usage_usec 7\nuser_usec 5\n").expect("write");
        std::fs::write(dir.join("memory.current"), "100\n").expect("write");
        let v2 = "0::/system.slice/docker-abc.scope\n";
        let found = ContainerCgroup::locate(v2, root.path()).expect("v2 cgroup");
        assert_eq!(found.read(), Some(Reading { cpu_ns: 7000, peak_bytes: 100, oom_kills: 0 }));
        assert_eq!(ContainerCgroup::locate("0::/gone\n", root.path()), None);
    }
}
