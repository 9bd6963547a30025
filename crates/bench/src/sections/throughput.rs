//! Throughput: N trivial process tasks as one array job, from submit to all recorded done.
//! Peers: Slurm (`sbatch --array` of the same N on this machine), HyperQueue (one job of the same
//! N programs on a private server with one worker of this machine's cores) and a raw baseline
//! that spawns the same N processes directly with one worker per core.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use drover_core::JobState;

use super::{measure, slurm_version};
use crate::Ctx;
use crate::cluster::{AgentOptions, Cluster, plan_json, submit, watch};
use crate::hyperqueue::{self, Outcome, ThroughputOptions};
use crate::report::{Better, Measure, Row};
use crate::slurm::{Slurm, SlurmOptions};

/// Runs the section.
pub async fn run(ctx: &Ctx) -> Vec<Row> {
    let n = ctx.tasks;
    let drover = measure("drover throughput", drover_runs(ctx).await);
    let (slurm_name, slurm) = match ctx.slurm_unavailable() {
        Some(why) => ("Slurm (sbatch --array)".to_string(), Measure::Unavailable(why)),
        None => match slurm_runs(ctx) {
            Ok((name, v)) => (name, Measure::Runs(v)),
            Err(e) => ("Slurm (sbatch --array)".to_string(), measure("slurm throughput", Err(e))),
        },
    };
    let (hyperqueue_name, hyperqueue) = hyperqueue_peer(ctx).await;
    let cores = ctx.cores;
    let runs = ctx.runs;
    let raw = tokio::task::spawn_blocking(move || raw_runs(n, cores, runs))
        .await
        .map_err(|e| anyhow!("raw baseline panicked: {e}"))
        .and_then(|r| r);
    let figure = format!("{n} × `true` as one array job, submit → all done");
    vec![
        Row {
            section: "throughput",
            figure: figure.clone(),
            unit: "tasks/s",
            better: Better::Higher,
            drover: drover.clone(),
            peer: slurm_name,
            peer_value: slurm,
        },
        Row {
            section: "throughput",
            figure: figure.clone(),
            unit: "tasks/s",
            better: Better::Higher,
            drover: drover.clone(),
            peer: hyperqueue_name,
            peer_value: hyperqueue,
        },
        Row {
            section: "throughput",
            figure,
            unit: "tasks/s",
            better: Better::Higher,
            drover,
            peer: format!("raw fork+exec, {cores} at a time"),
            peer_value: measure("raw throughput", raw),
        },
    ]
}

async fn drover_runs(ctx: &Ctx) -> Result<Vec<f64>> {
    let n = ctx.tasks;
    let dir = ctx.dir("throughput-drover")?;
    let cluster = Cluster::start(
        &ctx.drover,
        &dir,
        AgentOptions { cores: ctx.cores as u32, program: ctx.agent.clone() },
    )
    .await?;
    let mut client = cluster.client().await?;
    let plan = plan_json(&format!(
        "version: 1\nname: bench-throughput\ntasks:\n  - name: t\n    array: \"1-{n}\"\n    command: [\"true\"]\n"
    ))?;
    let timeout = Duration::from_secs(60) + Duration::from_millis(50 * n as u64);
    let mut rates = Vec::new();
    for run in 0..ctx.runs {
        let start = Instant::now();
        let job = submit(&mut client, &plan).await?;
        let watched = watch(&mut client, job, timeout).await?;
        if watched.state != JobState::Succeeded {
            bail!("job {job} ended {} (see {})", watched.state, dir.display());
        }
        let secs = watched.done.duration_since(start).as_secs_f64();
        eprintln!("  drover run {}: {n} tasks in {secs:.2}s", run + 1);
        rates.push(n as f64 / secs);
    }
    Ok(rates)
}

fn slurm_runs(ctx: &Ctx) -> Result<(String, Vec<f64>)> {
    let n = ctx.tasks;
    let dir = ctx.dir("throughput-slurm")?;
    let slurm = Slurm::start(&dir, &SlurmOptions { cpus: ctx.cores, max_array: n })?;
    let mut rates = Vec::new();
    let mut cut = false;
    for run in 0..ctx.runs {
        let start = Instant::now();
        let out = slurm.run(
            "sbatch",
            &[
                "--parsable",
                &format!("--array=1-{n}"),
                "-o",
                "/dev/null",
                "-e",
                "/dev/null",
                "--wrap",
                "true",
            ],
        )?;
        let job = out.trim().split(';').next().unwrap_or_default().to_string();
        let mut remaining = n;
        while remaining > 0 {
            std::thread::sleep(Duration::from_millis(100));
            remaining = slurm.unfinished(&job)?;
            if start.elapsed() > ctx.slurm_deadline {
                break;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        let done = n - remaining.min(n);
        if remaining > 0 {
            cut = true;
            let _ = slurm.run("scancel", &[&job]);
            while slurm.unfinished(&job).unwrap_or(0) > 0 {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        if done == 0 {
            bail!("no Slurm task finished within {:?}", ctx.slurm_deadline);
        }
        eprintln!("  slurm run {}: {done} of {n} tasks in {secs:.2}s", run + 1);
        rates.push(done as f64 / secs);
    }
    let mut name = format!("{} sbatch --array", slurm_version(&slurm));
    if cut {
        name.push_str(&format!(
            " (runs cut at {}s; rate of the tasks done by then)",
            ctx.slurm_deadline.as_secs()
        ));
    }
    Ok((name, rates))
}

/// The HyperQueue peer's name and its tasks/s per run.
async fn hyperqueue_peer(ctx: &Ctx) -> (String, Measure) {
    let unnamed = || "HyperQueue".to_string();
    let dir = match ctx.dir("throughput-hyperqueue") {
        Ok(dir) => dir,
        Err(e) => return (unnamed(), measure("hyperqueue throughput", Err(e))),
    };
    let options = ThroughputOptions {
        tasks: ctx.tasks,
        cores: ctx.cores,
        runs: ctx.runs,
        deadline: ctx.hyperqueue_deadline,
    };
    let outcome = tokio::task::spawn_blocking(move || hyperqueue::throughput(&dir, &options))
        .await
        .map_err(|e| anyhow!("the HyperQueue measurement panicked: {e}"))
        .and_then(|r| r);
    let (version, runs) = match outcome {
        Ok(Outcome::Measured { version, runs }) => (version, runs),
        Ok(Outcome::Unavailable(why)) => return (unnamed(), Measure::Unavailable(why)),
        Err(e) => return (unnamed(), measure("hyperqueue throughput", Err(e))),
    };
    if runs.iter().any(|r| r.done == 0) {
        let e = anyhow!("no HyperQueue task finished within {:?}", ctx.hyperqueue_deadline);
        return (unnamed(), measure("hyperqueue throughput", Err(e)));
    }
    let mut name =
        format!("HyperQueue {version}, one job of {} tasks, one worker with {} cores", ctx.tasks, ctx.cores);
    if runs.iter().any(|r| r.done < ctx.tasks) {
        name.push_str(&format!(
            " (runs cut at {}s; rate of the tasks done by then)",
            ctx.hyperqueue_deadline.as_secs()
        ));
    }
    (name, Measure::Runs(runs.iter().map(|r| r.done as f64 / r.secs).collect()))
}

/// Spawns `n` `true` processes, `parallel` at a time, `runs` times; tasks/s per run.
fn raw_runs(n: usize, parallel: usize, runs: usize) -> Result<Vec<f64>> {
    let mut rates = Vec::new();
    for _ in 0..runs {
        let next = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let workers: Vec<_> = (0..parallel.max(1))
            .map(|_| {
                let next = next.clone();
                std::thread::spawn(move || -> std::io::Result<()> {
                    while next.fetch_add(1, Ordering::Relaxed) < n {
                        let status = std::process::Command::new("true").status()?;
                        if !status.success() {
                            return Err(std::io::Error::other(format!("`true` exited {status}")));
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| anyhow!("a spawning thread panicked"))??;
        }
        rates.push(n as f64 / start.elapsed().as_secs_f64());
    }
    Ok(rates)
}
