//! The warm pool: booted, idle VMs per image, so that a task claims one instead of booting.
//!
//! Warm VMs have the pool shape ([`Booter::pool_shape`]): the default memory and vCPUs and no
//! network device, like the default `network: none`. A task claims a warm VM when its image and
//! size match and it needs no network (egress or host ports); the VM is then pinned to the
//! task's CPUs and is the task's alone (never returned to the pool). Tasks that need the network
//! are restored from a snapshot that has the device, or booted. Every claim starts a background refill;
//! refills restore from the image's snapshot when snapshots are on, and boot cold otherwise.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;

use tokio::task::JoinHandle;

use super::boot::{Booted, Booter, Shape};
use super::vm::{self, VmRecord};

/// Names of warm VMs (and their directories): `w`, the agent's pid, `-` and a number.
pub(crate) const WARM_PREFIX: &str = "w";

/// An idle VM in the pool.
pub(crate) struct WarmVm {
    /// The VM.
    pub booted: Booted,
    /// Its name, which is also its directory under the run dir.
    pub sandbox: String,
    /// When it became ready to claim.
    pub ready_at: Instant,
}

/// Warm VMs per image, and their fillers.
pub(crate) struct Pool {
    booter: Arc<Booter>,
    targets: BTreeMap<String, usize>,
    snapshots: bool,
    idle: Mutex<HashMap<String, Vec<WarmVm>>>,
    fillers: Mutex<HashMap<String, JoinHandle<()>>>,
    closed: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is a single insert, push or pop, so a poisoned lock is still usable.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Pool {
    /// A pool keeping `targets` VMs per image; nothing boots until [`Pool::refill`].
    pub fn new(booter: Arc<Booter>, targets: BTreeMap<String, usize>, snapshots: bool) -> Arc<Pool> {
        Arc::new(Pool {
            booter,
            targets: targets.into_iter().filter(|(_, n)| *n > 0).collect(),
            snapshots,
            idle: Mutex::default(),
            fillers: Mutex::default(),
            closed: AtomicBool::new(false),
        })
    }

    /// Starts filling every image's pool up to its target, in the background.
    pub fn refill(self: &Arc<Self>) {
        for image in self.targets.keys() {
            self.refill_image(image);
        }
    }

    fn refill_image(self: &Arc<Self>, image: &str) {
        if !self.targets.contains_key(image) || self.closed.load(Ordering::SeqCst) {
            return;
        }
        let mut fillers = lock(&self.fillers);
        if fillers.get(image).is_some_and(|filler| !filler.is_finished()) {
            return;
        }
        let filler = tokio::spawn(fill(Arc::downgrade(self), image.to_owned()));
        fillers.insert(image.to_owned(), filler);
    }

    /// Idle VMs per image.
    pub fn counts(&self) -> BTreeMap<String, u32> {
        let idle = lock(&self.idle);
        self.targets
            .keys()
            .map(|image| (image.clone(), idle.get(image).map_or(0, |vms| vms.len() as u32)))
            .collect()
    }

    /// Takes an idle VM of `image` if one fits `shape`, and starts a refill.
    pub fn claim(self: &Arc<Self>, image: &str, shape: &Shape) -> Option<WarmVm> {
        let pool = self.booter.pool_shape(false);
        if shape.memory_mib != pool.memory_mib || shape.vcpus != pool.vcpus || shape.network != pool.network {
            return None;
        }
        let claimed = lock(&self.idle).get_mut(image).and_then(Vec::pop);
        if claimed.is_some() {
            self.refill_image(image);
        }
        claimed
    }

    /// Stops filling and powers every idle VM off.
    pub async fn shutdown(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let fillers: Vec<_> = lock(&self.fillers).drain().map(|(_, f)| f).collect();
        for filler in fillers {
            let _ = filler.await;
        }
        let idle: Vec<WarmVm> = lock(&self.idle).drain().flat_map(|(_, vms)| vms).collect();
        for warm in idle {
            warm.booted.vm.shutdown(self.booter.config.shutdown_grace).await;
            let _ = tokio::fs::remove_dir_all(warm.booted.vm.dir()).await;
        }
    }
}

/// Boots VMs for `image` until the pool holds its target. Holds the pool only weakly between
/// boots, so a dropped runtime stops its fillers.
async fn fill(pool: Weak<Pool>, image: String) {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    loop {
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let target = pool.targets.get(&image).copied().unwrap_or(0);
        let idle = lock(&pool.idle).get(&image).map_or(0, Vec::len);
        if pool.closed.load(Ordering::SeqCst) || idle >= target {
            return;
        }
        // The pid keeps names apart from those of an earlier agent, whose claimed VMs may still
        // run tasks.
        let sandbox = format!("{WARM_PREFIX}{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
        let dir: PathBuf = pool.booter.config.run_dir.join(&sandbox);
        let _ = tokio::fs::remove_dir_all(&dir).await;
        let booted = if pool.snapshots {
            pool.booter.restore(&image, false, &dir).await
        } else {
            pool.booter.cold(&image, &dir, &pool.booter.pool_shape(false)).await
        };
        let booted = match booted {
            Ok(booted) => booted,
            Err(error) => {
                // The next claim tries again; retrying here would boot in a loop.
                tracing::warn!(image, %error, "cannot boot a warm microvm");
                let _ = tokio::fs::remove_dir_all(&dir).await;
                return;
            }
        };
        let record = VmRecord {
            attempt_id: 0,
            workspace: PathBuf::new(),
            qemu_pid: booted.vm.pid(),
            image_env: Vec::new(),
            network: Default::default(),
            host_ports: Vec::new(),
        };
        let _ = vm::write_record(&dir, &record).await;
        if pool.closed.load(Ordering::SeqCst) {
            booted.vm.shutdown(pool.booter.config.shutdown_grace).await;
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return;
        }
        tracing::info!(
            image,
            sandbox,
            origin = ?booted.origin,
            boot_ms = booted.vm.boot_time().as_millis() as u64,
            "warm microvm ready"
        );
        lock(&pool.idle).entry(image.clone()).or_default().push(WarmVm {
            booted,
            sandbox,
            ready_at: Instant::now(),
        });
    }
}
