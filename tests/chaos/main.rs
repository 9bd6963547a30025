//! The chaos suite: a fleet of server replicas over PostgreSQL and agents runs a mixed
//! workload (short and long tasks, retries, a DAG, outputs, a cancelled job, log floods)
//! while a driver kills agents and servers, restarts PostgreSQL and cuts agents off past
//! their lease. Afterwards it checks what Drover promises, from evidence outside its
//! database where it can: every acknowledged job ended; every task has exactly one final
//! outcome; no attempt ran after it was handed on or cancelled (each task appends to a ledger
//! file the test owns); every kept artifact downloads and matches its digest; no task process
//! is left. It prints a table of the faults injected and the invariants held.
//!
//! `bounded_run` is the run CI makes: a little over 300 tasks, every fault kind at least
//! once. `soak` is for a benchmark machine: over 2,000 tasks and some 40 more faults:
//!
//! ```text
//! cargo test --release -p drover --test chaos -- --ignored --nocapture soak
//! ```
//!
//! Each run prints its random seed; `DROVER_CHAOS_SEED=N` replays a run's choices (the
//! timing of the machine is not replayed).

#[allow(dead_code)]
#[path = "../e2e/harness.rs"]
mod harness;
#[allow(dead_code)]
#[path = "../e2e/proxy.rs"]
mod proxy;

mod faults;
mod fleet;
mod invariants;
mod workload;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::faults::Kind;
use crate::fleet::Fleet;
use crate::invariants::Verdict;
use crate::workload::{JobFile, Scale};

/// Replicas, agents and cores per agent.
const SERVERS: usize = 2;
const AGENTS: usize = 3;
const CORES: u32 = 2;

#[test]
fn bounded_run() {
    run(Scale::bounded(), Duration::from_secs(150));
}

#[test]
#[ignore = "the soak run is for a benchmark machine: over 2,000 tasks, some 40 faults"]
fn soak() {
    run(Scale::soak(), Duration::from_secs(3600));
}

fn seed() -> u64 {
    std::env::var("DROVER_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random())
}

/// Submits `job`, with the ledger as a parameter; returns its id.
fn submit(fleet: &Fleet, job: &JobFile) -> i64 {
    let file = fleet.dir.path().join(format!("{}.yaml", job.name));
    std::fs::write(&file, &job.text).expect("write job file");
    let ledger = format!("ledger={}", fleet.dir.path().join("ledger").display());
    let out = fleet.ok(&["submit", "-o", "json", "--param", &ledger, &file.display().to_string()]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("submit json");
    v["id"].as_i64().expect("job id")
}

fn run(scale: Scale, patience: Duration) {
    let seed = seed();
    eprintln!("chaos: seed {seed} (replay with DROVER_CHAOS_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut fleet = Fleet::start(SERVERS, AGENTS, CORES);
    // Tasks run as users of their own: every one of them appends to the ledger.
    let ledger = fleet.dir.path().join("ledger");
    std::fs::write(&ledger, "").expect("ledger");
    std::fs::set_permissions(&ledger, std::fs::Permissions::from_mode(0o666)).expect("chmod ledger");

    let mut jobs: BTreeMap<i64, JobFile> = BTreeMap::new();
    for job in workload::jobs(scale, &mut rng) {
        jobs.insert(submit(&fleet, &job), job);
    }
    let doomed = *jobs
        .iter()
        .find(|(_, j)| j.name == workload::CANCELLED)
        .map(|(id, _)| id)
        .expect("the cancelled job");
    let began = Instant::now();
    let mut record = faults::Record::default();
    let mut floods = 0;
    let mut submitted = Vec::new();
    let mut act = |fleet: &mut Fleet, kind: Kind| -> Option<u128> {
        match kind {
            Kind::FloodLogs => {
                floods += 1;
                let job = workload::flood(floods);
                submitted.push((submit(fleet, &job), job));
                None
            }
            Kind::Cancel => {
                fleet.ok(&["cancel", &doomed.to_string()]);
                Some(faults::now_ns())
            }
            _ => None,
        }
    };
    for kind in faults::schedule(&mut rng, scale.extra_faults) {
        std::thread::sleep(Duration::from_millis(rng.random_range(300..1500)));
        faults::inject(kind, &mut fleet, &mut rng, CORES, &mut record, &mut act);
    }
    jobs.extend(submitted);

    let statuses = wait_all(&fleet, jobs.keys().copied().collect(), patience);
    let ran_for = began.elapsed();
    let notes = invariants::read_ledger(&std::fs::read_to_string(&ledger).unwrap_or_default());
    let doomed_tasks: BTreeSet<i64> = statuses[&doomed]["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["id"].as_i64())
        .collect();
    let outputs_job =
        *jobs.iter().find(|(_, j)| j.name == "outputs").map(|(id, _)| id).expect("the outputs job");
    let mut verdicts = vec![
        invariants::every_job_ended(&statuses),
        invariants::one_final_outcome_per_task(&fleet, &statuses),
        invariants::no_attempt_ran_after_fencing_or_cancel(&notes, &doomed_tasks, record.cancelled_at_ns),
        invariants::artifacts_match_their_digests(&fleet, outputs_job, &statuses[&outputs_job]),
    ];
    verdicts.push(Verdict {
        what: "a full disk refused submits, saying why",
        violations: record.full_disk_misses.clone(),
        looked_at: format!("{} submits while full", record.full_disk_submits),
    });
    fleet.stop_agents();
    verdicts.push(invariants::nothing_left_running(&notes));

    let tasks: usize = jobs.values().map(|j| j.tasks).sum();
    print_table(seed, tasks, ran_for, &record, &statuses, &verdicts);
    let missing: Vec<&Kind> = Kind::ALL.iter().filter(|k| !record.injected.contains_key(k)).collect();
    assert!(missing.is_empty(), "fault kinds never injected: {missing:?}");
    let broken: Vec<String> =
        verdicts.iter().flat_map(|v| v.violations.iter().map(move |x| format!("{}: {x}", v.what))).collect();
    assert!(broken.is_empty(), "invariants broken (seed {seed}):\n{}", broken.join("\n"));
    assert!(
        tasks >= scale.min_tasks,
        "a run of this scale has at least {} tasks, not {tasks}",
        scale.min_tasks
    );
}

/// Waits until every job ended (or `patience` ran out); returns their last statuses.
fn wait_all(fleet: &Fleet, jobs: Vec<i64>, patience: Duration) -> BTreeMap<i64, serde_json::Value> {
    let start = Instant::now();
    let mut statuses = BTreeMap::new();
    loop {
        for job in &jobs {
            let out = fleet.drover(&["status", "-o", "json", &job.to_string()]);
            if out.status.success()
                && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            {
                statuses.insert(*job, v);
            }
        }
        let open = statuses
            .values()
            .filter(|s| {
                !matches!(s["state"].as_str(), Some("succeeded" | "failed" | "cancelled" | "warning"))
            })
            .count();
        if (open == 0 && statuses.len() == jobs.len()) || start.elapsed() > patience {
            return statuses;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn print_table(
    seed: u64,
    tasks: usize,
    ran_for: Duration,
    record: &faults::Record,
    statuses: &BTreeMap<i64, serde_json::Value>,
    verdicts: &[Verdict],
) {
    let mut states: BTreeMap<String, usize> = BTreeMap::new();
    for s in statuses.values() {
        for t in s["tasks"].as_array().into_iter().flatten() {
            *states.entry(t["state"].as_str().unwrap_or("?").to_string()).or_default() += 1;
        }
    }
    let mut out = format!(
        "\nchaos run: seed {seed}, {tasks} tasks in {} jobs on {SERVERS} servers and {AGENTS} agents, {:.0} s\n\n",
        statuses.len(),
        ran_for.as_secs_f64()
    );
    out.push_str("| fault | injected |\n|---|---|\n");
    for kind in Kind::ALL {
        out.push_str(&format!(
            "| {} | {} |\n",
            kind.describe(),
            record.injected.get(&kind).copied().unwrap_or(0)
        ));
    }
    out.push_str("\n| invariant | held | evidence |\n|---|---|---|\n");
    for v in verdicts {
        let held =
            if v.violations.is_empty() { "yes".to_string() } else { format!("NO ({})", v.violations.len()) };
        out.push_str(&format!("| {} | {held} | {} |\n", v.what, v.looked_at));
    }
    out.push_str(&format!("\ntask outcomes: {states:?}\n"));
    eprintln!("{out}");
}
