//! The faults the driver injects, and the schedule it injects them on.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::fleet::{Fleet, LEASE};

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// An agent killed with SIGKILL, started again shortly after.
    KillAgent,
    /// A server replica killed with SIGKILL, started again shortly after.
    KillServer,
    /// PostgreSQL restarted under the replicas.
    RestartPostgres,
    /// An agent cut off from every replica for longer than its lease, on connections that
    /// stay open and carry nothing.
    PartitionAgent,
    /// A job whose tasks write output as fast as they can.
    FloodLogs,
    /// A job cancelled while its tasks run.
    Cancel,
    /// The replicas' blob disk filled past the space they keep free, then emptied again.
    FillDisk,
}

impl Kind {
    /// Every kind, each injected at least once per run.
    pub const ALL: [Kind; 7] = [
        Kind::KillAgent,
        Kind::KillServer,
        Kind::RestartPostgres,
        Kind::PartitionAgent,
        Kind::FloodLogs,
        Kind::Cancel,
        Kind::FillDisk,
    ];

    /// For the table.
    pub fn describe(self) -> &'static str {
        match self {
            Kind::KillAgent => "agent killed (SIGKILL) and restarted",
            Kind::KillServer => "server replica killed (SIGKILL) and restarted",
            Kind::RestartPostgres => "PostgreSQL restarted",
            Kind::PartitionAgent => "agent partitioned past its lease (half-open links)",
            Kind::FloodLogs => "log flood (2 tasks x 5 MB)",
            Kind::Cancel => "job cancelled mid-run",
            Kind::FillDisk => "server disk filled (a small tmpfs of blobs)",
        }
    }
}

/// The order faults strike in: every kind once, then `extra` drawn at random, shuffled; the
/// cancel comes once, after the first third, so the cancelled job's tasks are running.
pub fn schedule(rng: &mut StdRng, extra: usize) -> Vec<Kind> {
    let repeatable = [
        Kind::KillAgent,
        Kind::KillServer,
        Kind::RestartPostgres,
        Kind::PartitionAgent,
        Kind::FloodLogs,
        Kind::FillDisk,
    ];
    let mut kinds: Vec<Kind> = repeatable.to_vec();
    for _ in 0..extra {
        kinds.push(repeatable[rng.random_range(0..repeatable.len())]);
    }
    kinds.shuffle(rng);
    let at = (kinds.len() / 3).max(1).min(kinds.len());
    kinds.insert(at, Kind::Cancel);
    kinds
}

/// What the driver did, for the table and the invariants.
#[derive(Debug, Default)]
pub struct Record {
    /// How often each kind was injected.
    pub injected: BTreeMap<Kind, usize>,
    /// When the cancel was acknowledged, in ns since the Unix epoch (the ledger's clock).
    pub cancelled_at_ns: Option<u128>,
    /// Submits tried while the disk was full.
    pub full_disk_submits: usize,
    /// What went wrong with them: a submit taken, or refused without saying why.
    pub full_disk_misses: Vec<String>,
}

/// Nanoseconds since the Unix epoch, the clock the ledger's `date +%s%N` reads.
pub fn now_ns() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// Injects one fault of `kind`. `act` does what needs the run's jobs: it submits a flood,
/// or cancels the cancelled job and returns when the cancel was acknowledged.
pub fn inject(
    kind: Kind,
    fleet: &mut Fleet,
    rng: &mut StdRng,
    cores: u32,
    record: &mut Record,
    act: &mut dyn FnMut(&mut Fleet, Kind) -> Option<u128>,
) {
    let (servers, agents) = fleet.size();
    let began = Instant::now();
    let what = match kind {
        Kind::KillAgent => {
            let i = rng.random_range(0..agents);
            fleet.kill_agent(i);
            std::thread::sleep(Duration::from_millis(rng.random_range(200..1500)));
            fleet.restart_agent(i, cores);
            format!("agent-{i}")
        }
        Kind::KillServer => {
            let i = rng.random_range(0..servers);
            fleet.kill_server(i);
            std::thread::sleep(Duration::from_millis(rng.random_range(200..1000)));
            fleet.restart_server(i);
            format!("server-{i}")
        }
        Kind::RestartPostgres => {
            fleet.restart_postgres();
            "postgresql".into()
        }
        Kind::PartitionAgent => {
            let i = rng.random_range(0..agents);
            fleet.partition(i);
            std::thread::sleep(LEASE + Duration::from_millis(rng.random_range(1000..2500)));
            fleet.heal(i);
            format!("agent-{i}")
        }
        Kind::FillDisk => {
            let filler = crate::harness::fill(&fleet.blobs_dir(), fleet.min_free() / 2);
            let probe = fleet.dir.path().join("probe.yaml");
            let _ = std::fs::write(
                &probe,
                "version: 1\nname: probe\ntasks:\n  - name: t\n    command: \"true\"\n",
            );
            let out = fleet.drover(&["submit", &probe.display().to_string()]);
            record.full_disk_submits += 1;
            let stderr = String::from_utf8_lossy(&out.stderr);
            if out.status.success() {
                record.full_disk_misses.push("a submit was taken while the disk was full".into());
            } else if !stderr.contains("disk is full") {
                record
                    .full_disk_misses
                    .push(format!("a submit was refused without the reason: {}", stderr.trim()));
            }
            std::thread::sleep(Duration::from_millis(rng.random_range(500..1500)));
            let _ = std::fs::remove_file(filler);
            "blobs".into()
        }
        Kind::FloodLogs | Kind::Cancel => {
            if let Some(at) = act(fleet, kind)
                && kind == Kind::Cancel
            {
                record.cancelled_at_ns = Some(at);
            }
            String::new()
        }
    };
    eprintln!("chaos: {} {what} ({} ms)", kind.describe(), began.elapsed().as_millis());
    *record.injected.entry(kind).or_default() += 1;
}
