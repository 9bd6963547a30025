//! Limits, accounting and clean kills of process tasks through cgroups, feature-detected.
//!
//! Layout: `<agent's own cgroup>/drover-<scope>-<attempt>/step-<n>` in every hierarchy that holds
//! a controller we use. The attempt cgroup carries the limits (memory, pids, CPU quota), so they
//! cover every step and any survivor of an earlier step; each step of an attempt of several
//! steps runs in its own leaf so that its peak memory, CPU time and OOM kills can be read
//! separately. An attempt of one step runs in the attempt cgroup itself: its figures are the
//! attempt's.
//!
//! Making and removing cgroups is a large part of what a short task costs the agent, so emptied
//! attempt cgroups go back to a [`Pool`] and serve later attempts (keeping the name of the
//! attempt that made them); see [`pool`] for what makes that safe.
//!
//! Nodes mount either a unified (v2) hierarchy or a hybrid where some controllers live on v1
//! (on many hosts memory, pids and cpu are v1 controllers), and containers often see cgroupfs
//! read-only. [`Cgroups::probe`] finds, at start, each controller the agent can really use
//! (it creates a probe cgroup and writes its limit file); the agent reports the resulting
//! [`Cgroups::enforces`] so that tasks needing a limit are only placed where it holds.
//!
//! Cleanup kills the whole attempt cgroup, which reaches processes that left the step's process
//! group: `cgroup.kill` on v2, or the freezer (freeze, SIGKILL everything, thaw) so that nothing
//! forks between the listing and the kill.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_core::enforce::Limit;

use crate::runtime::cgroup_read::{self, Version, read_trimmed};

mod pool;

pub(crate) use pool::Pool;

/// A cgroup controller the process runtime uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Controller {
    /// Memory limit, peak and OOM kills.
    Memory,
    /// Most processes.
    Pids,
    /// CPU quota (and, on v2, CPU time).
    Cpu,
    /// CPU time on v1.
    Cpuacct,
    /// Freezing for a race-free kill on v1.
    Freezer,
}

impl Controller {
    const ALL: [Controller; 5] =
        [Controller::Memory, Controller::Pids, Controller::Cpu, Controller::Cpuacct, Controller::Freezer];

    fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
            Controller::Cpuacct => "cpuacct",
            Controller::Freezer => "freezer",
        }
    }
}

/// One hierarchy directory under which attempt cgroups are made, with the controllers used in it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hierarchy {
    version: Version,
    /// The agent's own cgroup in this hierarchy.
    parent: PathBuf,
    controllers: Vec<Controller>,
}

/// The controllers this agent can use, found once at start.
#[derive(Debug, Clone, Default)]
pub(crate) struct Cgroups {
    hierarchies: Vec<Hierarchy>,
    /// Part of every attempt cgroup's name, so that agents sharing a host (whose attempt ids
    /// come from different servers) never share a cgroup.
    scope: String,
}

/// The limits of one attempt; 0 means none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Memory in bytes.
    pub memory: u64,
    /// Most processes and threads.
    pub pids: u64,
    /// Cores' worth of CPU time per period.
    pub cores: u32,
}

/// The cgroups of one attempt, one directory per hierarchy.
#[derive(Debug)]
pub(crate) struct AttemptCgroup {
    /// The directories' name (the same in every hierarchy): `drover-<scope>-<attempt>` of the
    /// attempt that made them, which a later attempt keeps when it reuses them.
    name: String,
    dirs: Vec<(Hierarchy, PathBuf)>,
    /// The limits written in its files; `None` when unknown (found after a restart), which
    /// keeps it out of the pool.
    limits: Option<Limits>,
    /// Whether steps run in leaves of their own (attempts of several steps) rather than in the
    /// attempt cgroup itself. On v2, leaves need the controllers delegated, and a cgroup that
    /// delegates them cannot hold processes.
    leaves: bool,
    /// The attempt cgroup's counters when this attempt got it: zero for a new cgroup, the
    /// previous attempts' totals for a reused one. Reads of a step without a leaf subtract it.
    baseline: Baseline,
}

/// Counters of a reused cgroup as they stood before the attempt, so that reads are per attempt.
/// Peak memory cannot be subtracted; it is reset when the cgroup is reused instead.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Baseline {
    /// CPU time in nanoseconds.
    cpu_ns: u64,
    /// Processes the OOM killer killed.
    oom_kills: u64,
}

/// The cgroups one step runs in: leaves of the attempt cgroup, or the attempt cgroup itself.
#[derive(Debug)]
pub(crate) struct StepCgroup {
    dirs: Vec<(Hierarchy, PathBuf)>,
    /// Each directory's `cgroup.procs` as a C string, built before fork so that the child can
    /// join without allocating.
    procs: Vec<CString>,
    /// Subtracted from the counters read (see [`AttemptCgroup::baseline`]).
    baseline: Baseline,
}

/// A limit a task asked for that this node cannot enforce.
#[derive(Debug, thiserror::Error)]
#[error("this node cannot enforce a {} limit (no usable {} cgroup controller)", .0.name(), .0.name())]
pub(crate) struct Unenforceable(pub Limit);

const CPU_PERIOD_US: u64 = 100_000;

impl Cgroups {
    /// Finds the controllers this process can create cgroups in and set limits of.
    pub fn probe(scope: &str) -> Cgroups {
        let (Ok(membership), Ok(mountinfo)) =
            (std::fs::read_to_string("/proc/self/cgroup"), std::fs::read_to_string("/proc/self/mountinfo"))
        else {
            return Cgroups { hierarchies: Vec::new(), scope: scope.to_owned() };
        };
        let mut found: BTreeMap<(Version, PathBuf), Vec<Controller>> = BTreeMap::new();
        for controller in Controller::ALL {
            if let Some((version, parent)) = locate(&membership, &mountinfo, controller)
                && usable(version, &parent, controller)
            {
                found.entry((version, parent)).or_default().push(controller);
            }
        }
        let hierarchies = found
            .into_iter()
            .map(|((version, parent), controllers)| Hierarchy { version, parent, controllers })
            .collect();
        Cgroups { hierarchies, scope: scope.to_owned() }
    }

    /// The name of the cgroup made for `attempt_id`.
    pub fn dir_name(&self, attempt_id: i64) -> String {
        format!("drover-{}-{attempt_id}", self.scope)
    }

    fn has(&self, controller: Controller) -> bool {
        self.hierarchies.iter().any(|h| h.controllers.contains(&controller))
    }

    /// The limits tasks can count on here.
    pub fn enforces(&self) -> Vec<Limit> {
        Limit::ALL
            .into_iter()
            .filter(|l| match l {
                Limit::Memory => self.has(Controller::Memory),
                Limit::Pids => self.has(Controller::Pids),
            })
            .collect()
    }

    /// What the node's process sandbox does with cgroups, in words for the start-up line.
    pub fn describe(&self) -> String {
        if self.hierarchies.is_empty() {
            return "no usable cgroup controller".into();
        }
        self.hierarchies
            .iter()
            .map(|h| {
                let names: Vec<&str> = h.controllers.iter().map(|c| c.name()).collect();
                format!("{} ({:?})", names.join(","), h.version)
            })
            .collect::<Vec<_>>()
            .join(" + ")
    }

    /// Whether there is any controller at all, so that a cgroup is worth creating.
    pub fn any(&self) -> bool {
        !self.hierarchies.is_empty()
    }

    /// Fails with [`Unenforceable`] when a limit asked for has no controller here.
    pub fn check(&self, limits: Limits) -> Result<(), Unenforceable> {
        if limits.memory > 0 && !self.has(Controller::Memory) {
            return Err(Unenforceable(Limit::Memory));
        }
        if limits.pids > 0 && !self.has(Controller::Pids) {
            return Err(Unenforceable(Limit::Pids));
        }
        Ok(())
    }

    /// Creates the attempt's cgroups with `limits`, with leaves for its steps when `leaves`.
    /// Fails with [`Unenforceable`] when a limit asked for has no controller here, and with the
    /// I/O error when a cgroup cannot be made.
    pub fn create(
        &self,
        attempt_id: i64,
        limits: Limits,
        leaves: bool,
    ) -> Result<AttemptCgroup, CreateError> {
        self.check(limits)?;
        let name = self.dir_name(attempt_id);
        let mut attempt = AttemptCgroup {
            dirs: Vec::with_capacity(self.hierarchies.len()),
            name,
            limits: Some(limits),
            leaves,
            baseline: Baseline::default(),
        };
        for h in &self.hierarchies {
            let dir = h.parent.join(&attempt.name);
            make_dir(&dir)?;
            // Pushed before configuring, so that a failure below still removes the directory.
            attempt.dirs.push((h.clone(), dir.clone()));
            configure(h, &dir, (Limits::default(), false), (limits, leaves))?;
        }
        Ok(attempt)
    }

    /// Hands `cgroup`, emptied by an earlier attempt, to a new one: rewrites the limits and the
    /// delegation that differ, resets the peak memory and records the baseline of the other
    /// counters. On an error the cgroup must be removed, not used.
    fn reuse(&self, cgroup: &mut AttemptCgroup, limits: Limits, leaves: bool) -> io::Result<()> {
        let old = cgroup.limits.ok_or_else(|| io::Error::other("a cgroup of unknown limits"))?;
        // Unknown from here on until all is written: a failure leaves the files in between.
        cgroup.limits = None;
        for (h, dir) in &cgroup.dirs {
            configure(h, dir, (old, cgroup.leaves), (limits, leaves))?;
            if h.version == Version::V1 && h.controllers.contains(&Controller::Memory) {
                // Writing 0 resets the highest use to the current one (v1 only).
                std::fs::write(dir.join("memory.max_usage_in_bytes"), "0")?;
            }
        }
        cgroup.limits = Some(limits);
        cgroup.leaves = leaves;
        let whole = cgroup.whole();
        cgroup.baseline =
            Baseline { cpu_ns: whole.cpu_ns().unwrap_or(0), oom_kills: whole.oom_kills().unwrap_or(0) };
        Ok(())
    }

    /// Whether an emptied attempt cgroup can serve another attempt with figures of its own:
    /// v2's `memory.peak` cannot be reset for every reader, so a v2 memory controller rules
    /// reuse out.
    pub fn reusable(&self) -> bool {
        !self
            .hierarchies
            .iter()
            .any(|h| h.version == Version::V2 && h.controllers.contains(&Controller::Memory))
    }

    /// Finds the cgroups an earlier agent process created for `attempt_id`, so that cleanup
    /// after a restart removes them too.
    pub fn existing(&self, attempt_id: i64) -> Option<AttemptCgroup> {
        self.named(&self.dir_name(attempt_id))
    }

    /// The cgroups called `name` in every hierarchy where they exist, as an attempt cgroup of
    /// unknown limits and layout (so that removing it looks for leaves, and it is never reused).
    pub fn named(&self, name: &str) -> Option<AttemptCgroup> {
        let dirs: Vec<_> = self
            .hierarchies
            .iter()
            .map(|h| (h.clone(), h.parent.join(name)))
            .filter(|(_, dir)| dir.is_dir())
            .collect();
        (!dirs.is_empty()).then(|| AttemptCgroup {
            name: name.to_owned(),
            dirs,
            limits: None,
            leaves: true,
            baseline: Baseline::default(),
        })
    }
}

/// Why an attempt's cgroup could not be made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CreateError {
    /// A limit has no controller here.
    #[error(transparent)]
    Unenforceable(#[from] Unenforceable),
    /// The cgroup filesystem refused.
    #[error("cannot set up the task's cgroup: {0}")]
    Io(#[from] io::Error),
}

/// Brings the files of an attempt's directory of hierarchy `h` from `old` limits and leaves
/// (a new cgroup's are `(Limits::default(), false)`) to `new`, writing only what differs.
fn configure(h: &Hierarchy, dir: &Path, old: (Limits, bool), new: (Limits, bool)) -> io::Result<()> {
    let ((old, old_leaves), (limits, leaves)) = (old, new);
    let v2 = h.version == Version::V2;
    if v2 && leaves != old_leaves {
        // Leaves only get the controllers' files if the attempt delegates them; a cgroup that
        // delegates them cannot hold processes of its own.
        let sign = if leaves { '+' } else { '-' };
        let wanted: Vec<String> = h
            .controllers
            .iter()
            .filter(|c| matches!(c, Controller::Memory | Controller::Pids | Controller::Cpu))
            .map(|c| format!("{sign}{}", c.name()))
            .collect();
        if !wanted.is_empty() {
            std::fs::write(dir.join("cgroup.subtree_control"), wanted.join(" "))?;
        }
    }
    for controller in &h.controllers {
        match controller {
            Controller::Memory if limits.memory != old.memory => {
                if v2 {
                    let (max, swap) = if limits.memory > 0 {
                        (limits.memory.to_string(), "0")
                    } else {
                        ("max".into(), "max")
                    };
                    std::fs::write(dir.join("memory.max"), max)?;
                    // No swap, so swapping cannot stretch the limit.
                    let _ = std::fs::write(dir.join("memory.swap.max"), swap);
                } else {
                    let bytes = if limits.memory > 0 { limits.memory.to_string() } else { "-1".into() };
                    // The memory+swap limit (only there with swap accounting; its absence is
                    // fine) may never be below the memory limit: raise it first, lower it last.
                    let unlimited = |b: u64| if b == 0 { u64::MAX } else { b };
                    let raising = unlimited(limits.memory) > unlimited(old.memory);
                    if raising {
                        let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), &bytes);
                    }
                    std::fs::write(dir.join("memory.limit_in_bytes"), &bytes)?;
                    if !raising {
                        let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), &bytes);
                    }
                }
            }
            Controller::Pids if limits.pids != old.pids => {
                let max = if limits.pids > 0 { limits.pids.to_string() } else { "max".into() };
                std::fs::write(dir.join("pids.max"), max)?
            }
            Controller::Cpu if limits.cores != old.cores => {
                let quota = u64::from(limits.cores) * CPU_PERIOD_US;
                if v2 {
                    let max = if quota > 0 { quota.to_string() } else { "max".into() };
                    std::fs::write(dir.join("cpu.max"), format!("{max} {CPU_PERIOD_US}"))?;
                } else {
                    if old.cores == 0 {
                        std::fs::write(dir.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
                    }
                    let quota = if quota > 0 { quota.to_string() } else { "-1".into() };
                    std::fs::write(dir.join("cpu.cfs_quota_us"), quota)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

impl AttemptCgroup {
    /// The cgroups step `step` runs in: its leaves (made unless they exist), or the attempt
    /// cgroup itself when steps have no leaves.
    pub fn step(&self, step: usize) -> io::Result<StepCgroup> {
        if !self.leaves {
            return StepCgroup::new(self.dirs.clone(), self.baseline);
        }
        let mut dirs = Vec::with_capacity(self.dirs.len());
        for (h, attempt_dir) in &self.dirs {
            let dir = attempt_dir.join(format!("step-{step}"));
            make_dir(&dir)?;
            dirs.push((h.clone(), dir));
        }
        StepCgroup::new(dirs, Baseline::default())
    }

    /// The directories' name, the same in every hierarchy.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Memory still charged to the attempt cgroup, in bytes.
    fn charged_bytes(&self) -> Option<u64> {
        let (version, dir) = self.whole_dir_of(Controller::Memory)?;
        let file = if version == Version::V1 { "memory.usage_in_bytes" } else { "memory.current" };
        cgroup_read::read_u64(&dir.join(file))
    }

    /// Memory still charged to the emptied attempt cgroup once the kernel was asked to reclaim
    /// the `charged` bytes it had (page cache its steps left), so that residue alone does not
    /// keep it from being reused. Best effort: a refused reclaim leaves the charge as it was.
    fn charged_after_reclaim(&self, charged: u64) -> Option<u64> {
        let (version, dir) = self.whole_dir_of(Controller::Memory)?;
        let (file, value) = if version == Version::V1 {
            ("memory.force_empty", "0".to_owned())
        } else {
            ("memory.reclaim", charged.to_string())
        };
        if let Err(error) = std::fs::write(dir.join(file), value) {
            tracing::debug!(cgroup = %self.name, %error, "cannot reclaim an emptied cgroup's memory");
        }
        self.charged_bytes()
    }

    fn whole_dir_of(&self, controller: Controller) -> Option<(Version, &Path)> {
        self.dirs
            .iter()
            .find(|(h, _)| h.controllers.contains(&controller))
            .map(|(h, d)| (h.version, d.as_path()))
    }

    /// The attempt cgroup itself as one group to read figures from (with no baseline).
    fn whole(&self) -> StepCgroup {
        StepCgroup { dirs: self.dirs.clone(), procs: Vec::new(), baseline: Baseline::default() }
    }

    /// The cgroups beneath the attempt's: its steps' leaves, when it has them.
    fn leaves_of(&self, dir: &Path) -> Vec<PathBuf> {
        if self.leaves { subdirs(dir) } else { Vec::new() }
    }

    /// Kills every process still in the attempt's cgroups (including ones that left the step's
    /// process group with `setsid`), then removes the cgroups. A cgroup can only be removed once
    /// its processes have fully exited, which takes a moment after SIGKILL.
    pub async fn remove(&self) {
        self.kill_all().await;
        for (_, dir) in &self.dirs {
            for leaf in self.leaves_of(dir) {
                remove_with_retry(&leaf).await;
            }
            remove_with_retry(dir).await;
        }
    }

    /// SIGKILLs everything in the attempt's cgroups without a race against forks.
    async fn kill_all(&self) {
        // Most attempts leave nothing behind: an empty cgroup needs no freezing.
        if self.members().is_empty() {
            return;
        }
        // v2's cgroup.kill does it in one write (Linux 5.14+).
        if let Some((_, dir)) = self.dirs.iter().find(|(h, _)| h.version == Version::V2)
            && std::fs::write(dir.join("cgroup.kill"), "1").is_ok()
        {
            return;
        }
        if let Some((dir, f)) = self.dirs.iter().find_map(|(h, dir)| Freezer::of(h).map(|f| (dir, f)))
            && std::fs::write(dir.join(f.control), f.frozen).is_ok()
        {
            // Frozen processes cannot fork; a frozen process still dies of SIGKILL once thawed.
            f.wait_frozen(dir).await;
            self.signal_members();
            let _ = std::fs::write(dir.join(f.control), f.thawed);
            return;
        }
        // No freezer: kill until empty; a fork between listing and killing is caught next round.
        for _ in 0..50 {
            if self.signal_members() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// How many forks the pids limit refused so far.
    #[cfg(test)]
    pub fn pids_refused(&self) -> u64 {
        // Kernels differ in which cgroup counts the refusal: the one whose limit was hit, or
        // the one of the process that forked.
        let Some((_, dir)) = self.dirs.iter().find(|(h, _)| h.controllers.contains(&Controller::Pids)) else {
            return 0;
        };
        self.leaves_of(dir)
            .iter()
            .chain(std::iter::once(dir))
            .filter_map(|d| cgroup_read::read_key(&d.join("pids.events"), "max"))
            .sum()
    }

    /// Each directory with the controllers of its hierarchy, in words.
    #[cfg(test)]
    pub fn dirs_for_tests(&self) -> Vec<(String, PathBuf)> {
        self.dirs
            .iter()
            .map(|(h, d)| (h.controllers.iter().map(|c| c.name()).collect::<Vec<_>>().join(","), d.clone()))
            .collect()
    }

    /// Every process in the attempt's cgroups.
    fn members(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = Vec::new();
        for (_, dir) in &self.dirs {
            for d in self.leaves_of(dir).iter().chain(std::iter::once(dir)) {
                pids.extend(procs_of(d));
            }
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Sends SIGKILL to every member of every cgroup of the attempt; returns how many there were.
    fn signal_members(&self) -> usize {
        let pids = self.members();
        for &pid in &pids {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        pids.len()
    }
}

/// How a hierarchy freezes a cgroup: v1's freezer controller or v2's `cgroup.freeze`.
struct Freezer {
    control: &'static str,
    frozen: &'static str,
    thawed: &'static str,
    /// The file that says when freezing finished, and what it then contains.
    state: &'static str,
    done: &'static str,
}

impl Freezer {
    fn of(h: &Hierarchy) -> Option<Freezer> {
        match h.version {
            Version::V1 if h.controllers.contains(&Controller::Freezer) => Some(Freezer {
                control: "freezer.state",
                frozen: "FROZEN",
                thawed: "THAWED",
                state: "freezer.state",
                done: "FROZEN",
            }),
            Version::V2 => Some(Freezer {
                control: "cgroup.freeze",
                frozen: "1",
                thawed: "0",
                state: "cgroup.events",
                done: "frozen 1",
            }),
            Version::V1 => None,
        }
    }

    async fn wait_frozen(&self, dir: &Path) {
        let file = dir.join(self.state);
        for _ in 0..100 {
            if std::fs::read_to_string(&file).is_ok_and(|s| s.contains(self.done)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tracing::debug!(file = %file.display(), "cgroup did not report frozen; killing anyway");
    }
}

impl StepCgroup {
    fn new(dirs: Vec<(Hierarchy, PathBuf)>, baseline: Baseline) -> io::Result<StepCgroup> {
        let procs = dirs
            .iter()
            .map(|(_, dir)| {
                CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cgroup path contains NUL"))
            })
            .collect::<io::Result<_>>()?;
        Ok(StepCgroup { dirs, procs, baseline })
    }

    /// Paths of the directories' `cgroup.procs`; writing `0` to one moves the writer into it.
    pub fn procs_paths(&self) -> &[CString] {
        &self.procs
    }

    fn dir_of(&self, controller: Controller) -> Option<(Version, &Path)> {
        self.dirs
            .iter()
            .find(|(h, _)| h.controllers.contains(&controller))
            .map(|(h, d)| (h.version, d.as_path()))
    }

    /// Peak memory of the step's processes, in bytes (a reused cgroup's was reset when the
    /// attempt got it).
    pub fn peak_memory(&self) -> Option<u64> {
        let (version, dir) = self.dir_of(Controller::Memory)?;
        cgroup_read::peak_bytes(version, dir)
    }

    /// CPU time of the step's processes in nanoseconds, since the baseline.
    fn cpu_ns(&self) -> Option<u64> {
        let ns = match self.dir_of(Controller::Cpu) {
            Some((Version::V2, dir)) => cgroup_read::cpu_ns(Version::V2, dir),
            _ => self.dir_of(Controller::Cpuacct).and_then(|(v, dir)| cgroup_read::cpu_ns(v, dir)),
        }?;
        Some(ns.saturating_sub(self.baseline.cpu_ns))
    }

    /// CPU time of the step's processes, in seconds.
    pub fn cpu_seconds(&self) -> Option<f64> {
        Some(self.cpu_ns()? as f64 / 1e9)
    }

    /// Processes of the step the OOM killer killed, since the baseline.
    fn oom_kills(&self) -> Option<u64> {
        let (version, dir) = self.dir_of(Controller::Memory)?;
        Some(cgroup_read::oom_kills(version, dir)?.saturating_sub(self.baseline.oom_kills))
    }

    /// Whether the kernel OOM-killed a process of the step.
    pub fn oom_killed(&self) -> bool {
        self.oom_kills().is_some_and(|n| n > 0)
    }
}

fn make_dir(dir: &Path) -> io::Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether a cgroup with a limit of `controller` can be made under `parent` (tried for real).
fn usable(version: Version, parent: &Path, controller: Controller) -> bool {
    if version == Version::V2 && enable_controller(parent, controller).is_err() {
        return false;
    }
    let probe = parent.join(format!("drover-probe-{}", std::process::id()));
    if make_dir(&probe).is_err() {
        return false;
    }
    let file = match (controller, version) {
        (Controller::Memory, Version::V2) => Some("memory.max"),
        (Controller::Memory, Version::V1) => Some("memory.limit_in_bytes"),
        (Controller::Pids, _) => Some("pids.max"),
        (Controller::Cpu, Version::V2) => Some("cpu.max"),
        (Controller::Cpu, Version::V1) => Some("cpu.cfs_quota_us"),
        (Controller::Cpuacct, _) => None,
        (Controller::Freezer, _) => None,
    };
    let value = match controller {
        Controller::Memory => "1073741824",
        Controller::Pids => "100",
        _ if version == Version::V2 => "max 100000",
        _ => "-1",
    };
    let ok = match file {
        Some(file) => std::fs::write(probe.join(file), value).is_ok(),
        None => probe.join("cgroup.procs").exists(),
    };
    let _ = std::fs::remove_dir(&probe);
    ok
}

fn enable_controller(dir: &Path, controller: Controller) -> io::Result<()> {
    let enabled = read_trimmed(&dir.join("cgroup.subtree_control")).unwrap_or_default();
    if enabled.split_whitespace().any(|c| c == controller.name()) {
        return Ok(());
    }
    // Fails with EBUSY when `dir` has processes of its own (the "no internal processes" rule),
    // which is the usual case for the agent's own cgroup unless it was delegated one.
    std::fs::write(dir.join("cgroup.subtree_control"), format!("+{}", controller.name()))
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
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

/// Where `controller` lives for this process: the unified hierarchy when it offers the
/// controller, else the v1 hierarchy mounted with it. `membership` is `/proc/self/cgroup`,
/// `mountinfo` is `/proc/self/mountinfo`.
fn locate(membership: &str, mountinfo: &str, controller: Controller) -> Option<(Version, PathBuf)> {
    if let Some(dir) = own_dir_from(membership, mountinfo, Version::V2, controller.name())
        && read_trimmed(&dir.join("cgroup.controllers"))
            .is_some_and(|c| c.split_whitespace().any(|c| c == controller.name()))
    {
        // v2 has no cpuacct or freezer controllers: CPU time and freezing come with the cgroup.
        return Some((Version::V2, dir));
    }
    own_dir_from(membership, mountinfo, Version::V1, controller.name()).map(|dir| (Version::V1, dir))
}

/// The agent's own cgroup directory in the unified hierarchy (`V2`) or in the v1 hierarchy
/// that carries `controller`, if such a hierarchy is mounted here.
fn own_dir_from(membership: &str, mountinfo: &str, version: Version, controller: &str) -> Option<PathBuf> {
    let own_path = membership.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let wanted = match version {
            Version::V2 => id == "0" && controllers.is_empty(),
            Version::V1 => controllers.split(',').any(|c| c == controller),
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
            Version::V1 => fs_type == "cgroup" && options.split(',').any(|o| o == controller),
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

    const HYBRID_CGROUP: &str = "8:pids:/\n4:memory:/process_api/abc\n1:cpu:/\n0::/\n";
    const HYBRID_MOUNTS: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_v1_controllers_and_the_v2_dir_in_a_hybrid_mount() {
        assert_eq!(
            own_dir_from(HYBRID_CGROUP, HYBRID_MOUNTS, Version::V1, "memory"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/process_api/abc"))
        );
        assert_eq!(
            own_dir_from(HYBRID_CGROUP, HYBRID_MOUNTS, Version::V1, "pids"),
            Some(PathBuf::from("/sys/fs/cgroup/pids/"))
        );
        assert_eq!(own_dir_from(HYBRID_CGROUP, HYBRID_MOUNTS, Version::V1, "freezer"), None);
        assert_eq!(
            own_dir_from(HYBRID_CGROUP, HYBRID_MOUNTS, Version::V2, "memory"),
            Some(PathBuf::from("/sys/fs/cgroup/unified/"))
        );
    }

    #[test]
    fn strips_the_mount_root_of_namespaced_mounts() {
        let cgroup = "0::/kubepods/pod1/ctr\n";
        let mounts = "50 40 0:40 /kubepods/pod1 /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(
            own_dir_from(cgroup, mounts, Version::V2, "memory"),
            Some(PathBuf::from("/sys/fs/cgroup/ctr"))
        );
        assert_eq!(own_dir_from(cgroup, mounts, Version::V1, "memory"), None);
    }

    #[test]
    fn unescapes_mountinfo_fields() {
        assert_eq!(unescape(r"/mnt/with\040space"), "/mnt/with space");
        assert_eq!(unescape(r"/plain"), "/plain");
    }

    #[test]
    fn a_limit_without_its_controller_is_refused_not_dropped() {
        let none = Cgroups::default();
        assert!(none.enforces().is_empty());
        let err =
            none.create(1, Limits { memory: 1 << 20, ..Limits::default() }, false).expect_err("refused");
        assert!(err.to_string().contains("cannot enforce a memory limit"), "{err}");
        assert!(none.create(1, Limits { cores: 1, ..Limits::default() }, false).is_ok());
    }
}
