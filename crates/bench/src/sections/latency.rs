//! Latency of one trivial task: submit → running and submit → done, p50 and p99 over many
//! single-task jobs run one after another.
//!
//! Drover: the clock starts before `Submit` is sent; "running" is when the client's `Watch`
//! stream delivers the task's `running` event (the agent started the process and the server
//! committed the state change), "done" is when it delivers the job's final event.
//!
//! Slurm: "running" is `sbatch --wrap 'date +%s%N > marker'` — the clock starts before
//! `sbatch` is spawned and stops at the timestamp the job's script wrote when it started
//! (polled every 0.2 ms); "done" is the wall time of `srun true`, which returns once the step
//! ended and the allocation was released.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Result, anyhow, bail};
use drover_core::JobState;

use super::{measure, slurm_version};
use crate::Ctx;
use crate::cluster::{AgentOptions, Cluster, plan_json, submit, watch};
use crate::report::{Better, Measure, Row};
use crate::slurm::{Slurm, SlurmOptions};
use crate::stats::quantile;

/// Per-run p50 and p99 of both latencies, milliseconds.
#[derive(Default)]
struct Quantiles {
    running_p50: Vec<f64>,
    running_p99: Vec<f64>,
    done_p50: Vec<f64>,
    done_p99: Vec<f64>,
}

impl Quantiles {
    fn add_run(&mut self, running: &[f64], done: &[f64]) -> Result<()> {
        let q = |s: &[f64], p| quantile(s, p).ok_or_else(|| anyhow!("no samples"));
        self.running_p50.push(q(running, 0.5)?);
        self.running_p99.push(q(running, 0.99)?);
        self.done_p50.push(q(done, 0.5)?);
        self.done_p99.push(q(done, 0.99)?);
        Ok(())
    }
}

/// Selects one figure's per-run values.
type Pick = fn(&Quantiles) -> &Vec<f64>;

/// Runs the section.
pub async fn run(ctx: &Ctx) -> Vec<Row> {
    let drover = drover_runs(ctx).await.map_err(|e| measure("drover latency", Err(e)));
    let mut peer = "Slurm".to_string();
    let slurm = match ctx.slurm_unavailable() {
        Some(why) => Err(Measure::Unavailable(why)),
        None => match slurm_runs(ctx) {
            Ok((name, q)) => {
                peer = name;
                Ok(q)
            }
            Err(e) => Err(measure("slurm latency", Err(e))),
        },
    };
    let pick = |r: &std::result::Result<Quantiles, Measure>, f: Pick| match r {
        Ok(q) => Measure::Runs(f(q).clone()),
        Err(m) => m.clone(),
    };
    let n = ctx.latency_samples;
    let rows: [(&str, &str, Pick); 4] = [
        ("submit → running, p50", "sbatch → job script starts, p50", |q| &q.running_p50),
        ("submit → running, p99", "sbatch → job script starts, p99", |q| &q.running_p99),
        ("submit → done, p50", "srun true, p50", |q| &q.done_p50),
        ("submit → done, p99", "srun true, p99", |q| &q.done_p99),
    ];
    rows.into_iter()
        .map(|(figure, how, f)| Row {
            section: "latency",
            figure: format!("1 × `true`, {figure} ({n} jobs per run)"),
            unit: "ms",
            better: Better::Lower,
            drover: pick(&drover, f),
            peer: format!("{peer}: {how}"),
            peer_value: pick(&slurm, f),
        })
        .collect()
}

async fn drover_runs(ctx: &Ctx) -> Result<Quantiles> {
    let dir = ctx.dir("latency-drover")?;
    let cluster = Cluster::start(
        &ctx.drover,
        &dir,
        AgentOptions { cores: ctx.cores as u32, program: ctx.agent.clone() },
    )
    .await?;
    let mut client = cluster.client().await?;
    let plan = plan_json("version: 1\nname: bench-latency\ntasks:\n  - name: t\n    command: [\"true\"]\n")?;
    let mut out = Quantiles::default();
    for run in 0..ctx.runs {
        let (mut running, mut done) = (Vec::new(), Vec::new());
        for _ in 0..ctx.latency_samples {
            let start = Instant::now();
            let job = submit(&mut client, &plan).await?;
            let w = watch(&mut client, job, Duration::from_secs(30)).await?;
            if w.state != JobState::Succeeded {
                bail!("job {job} ended {}", w.state);
            }
            let ran = w.first_running.ok_or_else(|| anyhow!("job {job} ended without a running event"))?;
            running.push(ran.duration_since(start).as_secs_f64() * 1e3);
            done.push(w.done.duration_since(start).as_secs_f64() * 1e3);
        }
        eprintln!(
            "  drover run {}: running p50 {:.2} ms, done p50 {:.2} ms",
            run + 1,
            quantile(&running, 0.5).unwrap_or(f64::NAN),
            quantile(&done, 0.5).unwrap_or(f64::NAN)
        );
        out.add_run(&running, &done)?;
    }
    Ok(out)
}

fn now_ns() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)
}

fn slurm_runs(ctx: &Ctx) -> Result<(String, Quantiles)> {
    let dir = ctx.dir("latency-slurm")?;
    let slurm = Slurm::start(&dir.join("slurm"), &SlurmOptions { cpus: ctx.cores, max_array: 1 })?;
    let mut out = Quantiles::default();
    // Slurm takes about a second per sample: one run of all samples keeps the section to minutes.
    let (mut running, mut done) = (Vec::new(), Vec::new());
    for i in 0..ctx.latency_samples {
        let marker = dir.join(format!("marker-{i}"));
        let script = format!("date +%s%N > {}", marker.display());
        let start = now_ns();
        let job =
            slurm.run("sbatch", &["--parsable", "-o", "/dev/null", "-e", "/dev/null", "--wrap", &script])?;
        let job = job.trim().split(';').next().unwrap_or_default().to_string();
        let deadline = Instant::now() + Duration::from_secs(60);
        let started: i128 = loop {
            if let Some(ts) = std::fs::read_to_string(&marker).ok().and_then(|t| t.trim().parse().ok()) {
                break ts;
            }
            if Instant::now() > deadline {
                bail!("Slurm job {job} did not start within 60s");
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        running.push((started - start) as f64 / 1e6);
        while slurm.unfinished(&job)? > 0 {
            if Instant::now() > deadline {
                bail!("Slurm job {job} did not end within 60s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let t = Instant::now();
        let status = slurm.command("srun").args(["-Q", "true"]).status()?;
        if !status.success() {
            bail!("srun true failed: {status}");
        }
        done.push(t.elapsed().as_secs_f64() * 1e3);
    }
    eprintln!(
        "  slurm: running p50 {:.2} ms, done p50 {:.2} ms",
        quantile(&running, 0.5).unwrap_or(f64::NAN),
        quantile(&done, 0.5).unwrap_or(f64::NAN)
    );
    out.add_run(&running, &done)?;
    Ok((format!("{} (1 run)", slurm_version(&slurm)), out))
}
