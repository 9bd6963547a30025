//! Footprint: peak resident memory (VmHWM from /proc/PID/status) of an idle `drover server` and
//! agent (`drover-agent`, the executable worker nodes run), and of both after 100 tasks (`sleep 5` each) ran at once on an agent that
//! offers 100 cores. Every run starts fresh daemons, since VmHWM is a peak since process start.
//! Peer: `slurmctld` and `slurmd` measured the same way (a node declaring 100 CPUs; the per-job
//! `slurmstepd` processes are not counted, as Drover's tasks are not).

use std::time::Duration;

use anyhow::{Result, bail};
use drover_core::JobState;

use super::{measure, slurm_version};
use crate::Ctx;
use crate::cluster::{AgentOptions, Cluster, plan_json, submit, watch};
use crate::machine::peak_rss_mib;
use crate::report::{Better, Measure, Row};
use crate::slurm::{Slurm, SlurmOptions};

/// Tasks running at once in the busy measurement.
const BUSY_TASKS: usize = 100;

/// Peak RSS per run, MiB: server idle, agent idle, server busy, agent busy.
#[derive(Default)]
struct Peaks([Vec<f64>; 4]);

/// Runs the section.
pub async fn run(ctx: &Ctx) -> Vec<Row> {
    let sleep = if ctx.quick { 1 } else { 5 };
    let drover = drover_runs(ctx, sleep).await.map_err(|e| measure("drover footprint", Err(e)));
    let mut peer = "Slurm".to_string();
    let slurm = match ctx.slurm_unavailable() {
        Some(why) => Err(Measure::Unavailable(why)),
        None => match slurm_runs(ctx, sleep) {
            Ok((name, p)) => {
                peer = name;
                Ok(p)
            }
            Err(e) => Err(measure("slurm footprint", Err(e))),
        },
    };
    let pick = |r: &std::result::Result<Peaks, Measure>, i: usize| match r {
        Ok(p) => Measure::Runs(p.0[i].clone()),
        Err(m) => m.clone(),
    };
    let agent = ctx.agent.name();
    let figures = [
        ("`drover server`, idle".to_owned(), "slurmctld, idle"),
        (format!("`{agent}`, idle"), "slurmd, idle"),
        ("`drover server`, peak with 100 tasks running".to_owned(), "slurmctld, peak with 100 jobs running"),
        (format!("`{agent}`, peak with 100 tasks running"), "slurmd, peak with 100 jobs running"),
    ];
    figures
        .into_iter()
        .enumerate()
        .map(|(i, (figure, theirs))| Row {
            section: "footprint",
            figure: format!("{figure}, peak RSS"),
            unit: "MiB",
            better: Better::Lower,
            drover: pick(&drover, i),
            peer: format!("{peer}: {theirs}"),
            peer_value: pick(&slurm, i),
        })
        .collect()
}

fn idle_wait(ctx: &Ctx) -> Duration {
    if ctx.quick { Duration::from_millis(500) } else { Duration::from_secs(3) }
}

async fn drover_runs(ctx: &Ctx, sleep: u32) -> Result<Peaks> {
    let mut peaks = Peaks::default();
    let plan = plan_json(&format!(
        "version: 1\nname: bench-footprint\ntasks:\n  - name: t\n    array: \"1-{BUSY_TASKS}\"\n    command: [\"sleep\", \"{sleep}\"]\n"
    ))?;
    for run in 0..ctx.runs {
        let dir = ctx.dir(&format!("footprint-drover-{run}"))?;
        let cluster = Cluster::start(
            &ctx.drover,
            &dir,
            AgentOptions { cores: BUSY_TASKS as u32, program: ctx.agent.clone() },
        )
        .await?;
        let (server, agent) = (cluster.server_pid()?, cluster.agent_pid()?);
        tokio::time::sleep(idle_wait(ctx)).await;
        peaks.0[0].push(peak_rss_mib(server)?);
        peaks.0[1].push(peak_rss_mib(agent)?);
        let mut client = cluster.client().await?;
        let job = submit(&mut client, &plan).await?;
        let w = watch(&mut client, job, Duration::from_secs(120)).await?;
        if w.state != JobState::Succeeded {
            bail!("footprint job {job} ended {}", w.state);
        }
        peaks.0[2].push(peak_rss_mib(server)?);
        peaks.0[3].push(peak_rss_mib(agent)?);
        eprintln!(
            "  drover run {}: server {:.1}/{:.1} MiB, agent {:.1}/{:.1} MiB (idle/busy)",
            run + 1,
            peaks.0[0][run],
            peaks.0[2][run],
            peaks.0[1][run],
            peaks.0[3][run]
        );
    }
    Ok(peaks)
}

fn slurm_runs(ctx: &Ctx, sleep: u32) -> Result<(String, Peaks)> {
    let mut peaks = Peaks::default();
    let mut name = "Slurm".to_string();
    for run in 0..ctx.runs {
        let dir = ctx.dir(&format!("footprint-slurm-{run}"))?;
        let slurm = Slurm::start(&dir, &SlurmOptions { cpus: BUSY_TASKS, max_array: BUSY_TASKS })?;
        name = slurm_version(&slurm);
        let (ctld, slurmd) = (slurm.ctld_pid(), slurm.slurmd_pid());
        std::thread::sleep(idle_wait(ctx));
        peaks.0[0].push(peak_rss_mib(ctld)?);
        peaks.0[1].push(peak_rss_mib(slurmd)?);
        let out = slurm.run(
            "sbatch",
            &[
                "--parsable",
                &format!("--array=1-{BUSY_TASKS}"),
                "-o",
                "/dev/null",
                "-e",
                "/dev/null",
                "--wrap",
                &format!("sleep {sleep}"),
            ],
        )?;
        let job = out.trim().split(';').next().unwrap_or_default().to_string();
        let start = std::time::Instant::now();
        while slurm.unfinished(&job)? > 0 {
            if start.elapsed() > Duration::from_secs(300) {
                bail!("Slurm array {job} did not finish within 300s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        peaks.0[2].push(peak_rss_mib(ctld)?);
        peaks.0[3].push(peak_rss_mib(slurmd)?);
    }
    Ok((name, peaks))
}
