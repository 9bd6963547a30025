//! Emptied attempt cgroups kept for later attempts, so that a short task does not pay for
//! making and removing a cgroup in every hierarchy.
//!
//! A cgroup goes back to the pool only when reusing it weakens neither isolation nor
//! accounting:
//! - it holds no process (its `cgroup.procs` are empty in every hierarchy, leaves included;
//!   leaves are removed), so nothing of the old attempt can run on in the new one;
//! - its limits are known, so a new attempt rewrites exactly the files whose values differ;
//! - its figures can be made the new attempt's: peak memory is reset (v1's
//!   `memory.max_usage_in_bytes` takes a write; v2's `memory.peak` resets only for one open
//!   file, so a v2 memory controller keeps cgroups out of the pool), and CPU time and OOM kills
//!   are read against a baseline taken when the attempt gets the cgroup;
//! - little memory is still charged to it (page cache of the files the old attempt touched),
//!   so the new attempt's peak and limit are not stretched by the old one's leftovers.
//!
//! A reused cgroup keeps the name of the attempt that made it, so the process runtime records
//! which cgroup an attempt got (see `ProcessRuntime`'s claims) for cleanup after a restart. The
//! pool is bounded, and emptied when the runtime is dropped.
//!
//! The pool itself does not reuse a cgroup whose attempt may still hold it: the runtime hands
//! one back only after cleanup stopped the attempt, and only this runtime's attempts get one.

use std::sync::{Mutex, MutexGuard};

use super::{AttemptCgroup, Cgroups, Limits, remove_with_retry, subdirs};

/// Most memory an emptied cgroup may still have charged and be reused.
const MAX_RESIDUAL_BYTES: u64 = 1 << 20;

/// Idle attempt cgroups, at most `capacity` of them.
#[derive(Debug, Default)]
pub(crate) struct Pool {
    idle: Mutex<Vec<AttemptCgroup>>,
    capacity: usize,
}

impl Pool {
    /// A pool that keeps at most `capacity` idle cgroups (0: none, every cgroup is removed).
    pub fn new(capacity: usize) -> Pool {
        Pool { idle: Mutex::default(), capacity }
    }

    fn idle(&self) -> MutexGuard<'_, Vec<AttemptCgroup>> {
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// An idle cgroup set up for an attempt with `limits` (and leaves for its steps when
    /// `leaves`), or `None` when there is none. A cgroup that cannot be set up is removed.
    pub fn take(&self, cgroups: &Cgroups, limits: Limits, leaves: bool) -> Option<AttemptCgroup> {
        let mut cgroup = self.idle().pop()?;
        match cgroups.reuse(&mut cgroup, limits, leaves) {
            Ok(()) => Some(cgroup),
            Err(error) => {
                tracing::debug!(cgroup = %cgroup.name, %error, "cannot reuse a cgroup; removing it");
                tokio::spawn(async move { cgroup.remove().await });
                None
            }
        }
    }

    /// Whether a cgroup called `name` is idle here.
    pub fn holds(&self, name: &str) -> bool {
        self.idle().iter().any(|c| c.name == name)
    }

    /// Readies the cgroup of an attempt that ended and was stopped for a later attempt: returns
    /// it when it is empty and fit for reuse (see the module documentation; its leaves are
    /// removed), else kills what is left in it, removes it and returns `None`.
    pub async fn ready_for_reuse(&self, cgroups: &Cgroups, cgroup: AttemptCgroup) -> Option<AttemptCgroup> {
        match self.fit_for_reuse(cgroups, &cgroup).await {
            Ok(()) if self.idle().len() < self.capacity => return Some(cgroup),
            Ok(()) => tracing::debug!(cgroup = %cgroup.name, "cgroup pool full"),
            Err(why) => tracing::debug!(cgroup = %cgroup.name, why, "cgroup not kept for reuse"),
        }
        cgroup.remove().await;
        None
    }

    /// Keeps a cgroup [`Pool::ready_for_reuse`] returned; hands it back when the pool filled
    /// up in the meantime (remove it then).
    pub fn put(&self, cgroup: AttemptCgroup) -> Option<AttemptCgroup> {
        let mut idle = self.idle();
        if idle.len() < self.capacity {
            idle.push(cgroup);
            return None;
        }
        Some(cgroup)
    }

    async fn fit_for_reuse(&self, cgroups: &Cgroups, cgroup: &AttemptCgroup) -> Result<(), &'static str> {
        if self.capacity == 0 || !cgroups.reusable() || cgroup.limits.is_none() {
            return Err("not reusable");
        }
        if !cgroup.members().is_empty() {
            return Err("processes left");
        }
        if cgroup.leaves {
            for (_, dir) in &cgroup.dirs {
                for leaf in subdirs(dir) {
                    remove_with_retry(&leaf).await;
                    if leaf.exists() {
                        return Err("a leaf cannot be removed");
                    }
                }
            }
        }
        let charged = cgroup.charged_bytes().unwrap_or(0);
        if charged > MAX_RESIDUAL_BYTES
            && cgroup.charged_after_reclaim(charged).unwrap_or(0) > MAX_RESIDUAL_BYTES
        {
            return Err("memory still charged");
        }
        Ok(())
    }

    /// Removes the cgroup called `name` that an earlier agent process kept idle (it was killed
    /// before it could empty its pool), if it is still empty; returns whether it is gone.
    pub fn remove_left_idle(cgroups: &Cgroups, name: &str) -> bool {
        let Some(cgroup) = cgroups.named(name) else {
            return true;
        };
        if !cgroup.members().is_empty() {
            return false;
        }
        cgroup.dirs.iter().all(|(_, dir)| subdirs(dir).is_empty() && std::fs::remove_dir(dir).is_ok())
    }

    /// Removes every idle cgroup (they are empty, so this does not wait); returns their names.
    pub fn clear(&self) -> Vec<String> {
        let idle: Vec<AttemptCgroup> = self.idle().drain(..).collect();
        let mut names = Vec::with_capacity(idle.len());
        for cgroup in idle {
            for (_, dir) in &cgroup.dirs {
                if let Err(error) = std::fs::remove_dir(dir) {
                    tracing::warn!(dir = %dir.display(), %error, "cannot remove an idle cgroup");
                }
            }
            names.push(cgroup.name);
        }
        names
    }
}
