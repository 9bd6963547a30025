//! Placement: the pure function `drover_core::placement::place` over a simulated fleet
//! (5,000 nodes, 1,000,000 queued tasks), in placements per second. The peer is a published
//! anchor, not a measurement: HashiCorp's "C1M" run placed 1,000,000 containers on 5,000
//! Nomad nodes at 3,750 placements/s.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Result, bail};
use drover_core::placement::{NodeView, QueuedTask, place};
use drover_core::{Resources, RuntimeKind};

use super::measure;
use crate::Ctx;
use crate::report::{Better, Measure, Row};

/// Nomad C1M's published placement rate.
const NOMAD_C1M: f64 = 3_750.0;

/// A small deterministic generator (SplitMix64), so every run sees the same fleet and queue.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// True with probability `percent`/100.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// The simulated fleet: every node offers 256 cores and 1 TiB, spread over 10 zones; one in
/// ten has a GPU label, half also run Docker.
pub fn fleet(nodes: usize) -> Vec<NodeView> {
    let mut rng = Rng(1);
    (0..nodes)
        .map(|i| {
            let mut labels = BTreeMap::new();
            labels.insert("zone".to_string(), format!("z{}", i % 10));
            if rng.chance(10) {
                labels.insert("gpu".to_string(), "true".to_string());
            }
            let mut runtimes = vec![RuntimeKind::Process];
            if rng.chance(50) {
                runtimes.push(RuntimeKind::Docker);
            }
            NodeView {
                id: i as i64 + 1,
                labels,
                free: Resources { cores: 256, memory: 1 << 40, pids: 0 },
                ahead: Resources::NONE,
                runtimes,
                warm: BTreeMap::new(),
            }
        })
        .collect()
}

/// The simulated queue: three priorities; mostly 1-core 1 GiB process tasks, one in ten with
/// 2 cores, 10% Docker, 5% needing a GPU node and 5% pinned to a zone.
pub fn queue(tasks: usize) -> Vec<QueuedTask> {
    let mut rng = Rng(2);
    (0..tasks)
        .map(|i| {
            let mut constraints = BTreeMap::new();
            if rng.chance(5) {
                constraints.insert("gpu".to_string(), "true".to_string());
            } else if rng.chance(5) {
                constraints.insert("zone".to_string(), format!("z{}", rng.next() % 10));
            }
            QueuedTask {
                id: i as i64 + 1,
                priority: (rng.next() % 3) as i32,
                resources: Resources { cores: if rng.chance(10) { 2 } else { 1 }, memory: 1 << 30, pids: 0 },
                constraints,
                runtime: if rng.chance(10) { RuntimeKind::Docker } else { RuntimeKind::Process },
                image: None,
                project: String::new(),
            }
        })
        .collect()
}

/// Runs the section.
pub async fn run(ctx: &Ctx) -> Vec<Row> {
    let (nodes, tasks) = if ctx.quick { (200, 20_000) } else { (5_000, 1_000_000) };
    let runs = ctx.runs;
    let result = tokio::task::spawn_blocking(move || measure_place(nodes, tasks, runs))
        .await
        .unwrap_or_else(|e| Err(anyhow::anyhow!("placement panicked: {e}")));
    vec![Row {
        section: "placement",
        figure: format!("`place` over {nodes} nodes × {tasks} queued tasks"),
        unit: "placements/s",
        better: Better::Higher,
        drover: measure("placement", result),
        peer: "Nomad C1M: 1M containers on 5,000 nodes (published anchor, not measured here)".into(),
        peer_value: Measure::Published(NOMAD_C1M),
    }]
}

fn measure_place(nodes: usize, tasks: usize, runs: usize) -> Result<Vec<f64>> {
    let fleet = fleet(nodes);
    let queue = queue(tasks);
    let mut rates = Vec::new();
    for run in 0..runs {
        let start = Instant::now();
        let plan = place(&fleet, &queue);
        let secs = start.elapsed().as_secs_f64();
        if plan.is_empty() {
            bail!("nothing was placed");
        }
        eprintln!("  run {}: {} of {tasks} tasks placed in {secs:.3}s", run + 1, plan.len());
        rates.push(plan.len() as f64 / secs);
    }
    Ok(rates)
}
