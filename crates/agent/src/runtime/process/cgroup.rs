//! Memory limits and accounting through cgroups, feature-detected.
//!
//! Layout: `<agent's own cgroup>/drover-<attempt>/step-<n>`. The attempt cgroup carries the
//! memory limit, so it covers every step and any survivor of an earlier step; each step runs in
//! its own leaf so that its peak memory, CPU time and OOM kills can be read separately.
//!
//! Nodes mount either a unified (v2) hierarchy or a hybrid where the memory controller lives
//! on v1, and containers often see cgroupfs read-only. Every probe failure means "no cgroup":
//! the step then runs without a limit (logged at debug level), never fails because of it.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Which cgroup interface a directory belongs to; the file names differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    /// Legacy per-controller hierarchy (`memory.limit_in_bytes`, ...).
    V1,
    /// Unified hierarchy (`memory.max`, ...).
    V2,
}

/// The cgroup of one attempt.
#[derive(Debug)]
pub(crate) struct AttemptCgroup {
    dir: PathBuf,
    version: Version,
}

/// The leaf cgroup one step runs in.
#[derive(Debug)]
pub(crate) struct StepCgroup {
    dir: PathBuf,
    version: Version,
    /// `cgroup.procs` as a C string, built before fork so that the child can join without
    /// allocating.
    procs: CString,
}

impl AttemptCgroup {
    /// Creates the attempt's cgroup with memory limit `limit` (bytes). `None` when no writable
    /// memory controller is available.
    pub fn create(attempt_id: i64, limit: u64) -> Option<Self> {
        let name = attempt_dir_name(attempt_id);
        let mut last_error = None;
        for version in [Version::V2, Version::V1] {
            let Some(parent) = own_cgroup_dir(version) else {
                continue;
            };
            match Self::create_in(&parent.join(&name), version, limit) {
                Ok(cgroup) => return Some(cgroup),
                Err(error) => last_error = Some((version, error)),
            }
        }
        match last_error {
            Some((version, error)) => tracing::debug!(
                attempt_id,
                ?version,
                %error,
                "cannot create a memory cgroup; memory limit not enforced"
            ),
            None => tracing::debug!(attempt_id, "no memory cgroup controller; memory limit not enforced"),
        }
        None
    }

    fn create_in(dir: &Path, version: Version, limit: u64) -> io::Result<Self> {
        if version == Version::V2 {
            // Children only get memory.* files if the parent delegates the controller.
            let parent = dir.parent().ok_or_else(|| io::Error::other("cgroup at root"))?;
            enable_memory_controller(parent)?;
        }
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let cgroup = AttemptCgroup { dir: dir.to_path_buf(), version };
        let configured = match version {
            Version::V2 => std::fs::write(dir.join("memory.max"), limit.to_string())
                .and_then(|()| enable_memory_controller(dir)),
            Version::V1 => std::fs::write(dir.join("memory.limit_in_bytes"), limit.to_string()).map(|()| {
                // Also cap memory+swap so swapping cannot stretch the limit. The file only
                // exists with swap accounting; its absence is fine.
                let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), limit.to_string());
            }),
        };
        match configured {
            Ok(()) => Ok(cgroup),
            Err(e) => {
                let _ = std::fs::remove_dir(dir);
                Err(e)
            }
        }
    }

    /// Finds the cgroup an earlier agent process created for `attempt_id`, so that cleanup
    /// after a restart removes it too.
    pub fn existing(attempt_id: i64) -> Option<Self> {
        let name = attempt_dir_name(attempt_id);
        [Version::V2, Version::V1].into_iter().find_map(|version| {
            let dir = own_cgroup_dir(version)?.join(&name);
            dir.is_dir().then_some(AttemptCgroup { dir, version })
        })
    }

    /// Creates (or reuses) the leaf cgroup for step `step`.
    pub fn step(&self, step: usize) -> io::Result<StepCgroup> {
        let dir = self.dir.join(format!("step-{step}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cgroup path contains NUL"))?;
        Ok(StepCgroup { dir, version: self.version, procs })
    }

    /// SIGKILLs every process still in the attempt's cgroups (including ones that left the
    /// step's process group with `setsid`), then removes the cgroups. A cgroup can only be
    /// removed once its processes have fully exited, which takes a moment after SIGKILL.
    pub async fn remove(&self) {
        let leaves: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        for dir in leaves.iter().chain(std::iter::once(&self.dir)) {
            for pid in procs_of(dir) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        for dir in leaves.iter().chain(std::iter::once(&self.dir)) {
            remove_with_retry(dir).await;
        }
    }
}

impl StepCgroup {
    /// Path of `cgroup.procs`; writing `0` to it moves the writer into the cgroup.
    pub fn procs_path(&self) -> &std::ffi::CStr {
        &self.procs
    }

    /// Peak memory of the step's processes, in bytes.
    pub fn peak_memory(&self) -> Option<u64> {
        let file = match self.version {
            Version::V2 => "memory.peak",
            Version::V1 => "memory.max_usage_in_bytes",
        };
        read_trimmed(&self.dir.join(file))?.parse().ok()
    }

    /// CPU time of the step's processes, in seconds. Only v2 keeps it next to the memory
    /// controller; v1's cpuacct is a separate hierarchy that we do not manage.
    pub fn cpu_seconds(&self) -> Option<f64> {
        match self.version {
            Version::V2 => {
                let usec: u64 = keyed_value(&self.dir.join("cpu.stat"), "usage_usec")?;
                Some(usec as f64 / 1e6)
            }
            Version::V1 => None,
        }
    }

    /// Whether the kernel OOM-killed a process of the step.
    pub fn oom_killed(&self) -> bool {
        let file = match self.version {
            Version::V2 => "memory.events",
            Version::V1 => "memory.oom_control",
        };
        keyed_value(&self.dir.join(file), "oom_kill").is_some_and(|n: u64| n > 0)
    }
}

fn attempt_dir_name(attempt_id: i64) -> String {
    format!("drover-{attempt_id}")
}

fn enable_memory_controller(dir: &Path) -> io::Result<()> {
    let enabled = read_trimmed(&dir.join("cgroup.subtree_control")).unwrap_or_default();
    if enabled.split_whitespace().any(|c| c == "memory") {
        return Ok(());
    }
    // Fails with EBUSY when `dir` has processes of its own (the "no internal processes" rule),
    // which is the usual case for the agent's own cgroup unless it was delegated one.
    std::fs::write(dir.join("cgroup.subtree_control"), "+memory")
}

fn procs_of(dir: &Path) -> Vec<i32> {
    read_trimmed(&dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

async fn remove_with_retry(dir: &Path) {
    let mut last_error = None;
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => last_error = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(error) = last_error {
        tracing::warn!(dir = %dir.display(), %error, "cannot remove cgroup");
    }
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

/// Reads `key value` lines (`memory.events`, `cpu.stat`, `memory.oom_control`).
fn keyed_value<T: std::str::FromStr>(path: &Path, key: &str) -> Option<T> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(char::is_whitespace)?;
        if k == key { v.trim().parse().ok() } else { None }
    })
}

/// Directory of the agent's own cgroup in the hierarchy that has the memory controller
/// (`V1`) or in the unified hierarchy (`V2`), if such a hierarchy is mounted here.
fn own_cgroup_dir(version: Version) -> Option<PathBuf> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let dir = own_dir_from(&membership, &mountinfo, version)?;
    if version == Version::V2 {
        // A unified hierarchy without the memory controller (hybrid setups bind it to v1).
        let available = read_trimmed(&dir.join("cgroup.controllers"))?;
        if !available.split_whitespace().any(|c| c == "memory") {
            return None;
        }
    }
    Some(dir)
}

/// The pure part of [`own_cgroup_dir`]: `membership` is `/proc/self/cgroup`, `mountinfo` is
/// `/proc/self/mountinfo`.
fn own_dir_from(membership: &str, mountinfo: &str, version: Version) -> Option<PathBuf> {
    let own_path = membership.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let wanted = match version {
            Version::V2 => id == "0" && controllers.is_empty(),
            Version::V1 => controllers.split(',').any(|c| c == "memory"),
        };
        wanted.then_some(path)
    })?;
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let fields: Vec<&str> = before.split(' ').collect();
        let (root, mount_point) = (unescape(fields.get(3)?), unescape(fields.get(4)?));
        let mut after = after.split(' ');
        let (fs_type, _source, options) = (after.next()?, after.next()?, after.next()?);
        let matches = match version {
            Version::V2 => fs_type == "cgroup2",
            Version::V1 => fs_type == "cgroup" && options.split(',').any(|o| o == "memory"),
        };
        if !matches {
            return None;
        }
        // The mount may show only a subtree (cgroup namespaces, bind mounts into containers).
        let relative = Path::new(own_path).strip_prefix(&root).ok()?;
        Some(Path::new(&mount_point).join(relative))
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(code) = field.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(code);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_CGROUP: &str = "4:memory:/process_api/abc\n1:cpu:/\n0::/\n";
    const HYBRID_MOUNTS: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_v1_memory_and_v2_dirs_in_a_hybrid_mount() {
        assert_eq!(
            own_dir_from(HYBRID_CGROUP, HYBRID_MOUNTS, Version::V1),
            Some(PathBuf::from("/sys/fs/cgroup/memory/process_api/abc"))
        );
        assert_eq!(
            own_dir_from(HYBRID_CGROUP, HYBRID_MOUNTS, Version::V2),
            Some(PathBuf::from("/sys/fs/cgroup/unified/"))
        );
    }

    #[test]
    fn strips_the_mount_root_of_namespaced_mounts() {
        let cgroup = "0::/kubepods/pod1/ctr\n";
        let mounts = "50 40 0:40 /kubepods/pod1 /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(own_dir_from(cgroup, mounts, Version::V2), Some(PathBuf::from("/sys/fs/cgroup/ctr")));
        assert_eq!(own_dir_from(cgroup, mounts, Version::V1), None);
    }

    #[test]
    fn unescapes_mountinfo_fields() {
        assert_eq!(unescape(r"/mnt/with\040space"), "/mnt/with space");
        assert_eq!(unescape(r"/plain"), "/plain");
    }
}
