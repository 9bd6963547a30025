//! Scale: one array job of `--scale-tasks` trivial tasks (100,000 by default), to show that
//! tasks/s does not fall as the job grows: the rate over the job's last tenth against the rate
//! over its first tenth, in the same run. The clock of each tenth runs from its first task's
//! success (the submit, for the first tenth) to its last one's, as the `Watch` stream reports
//! them. One run (it takes minutes); the agent offers four slots per core, since `true` uses next
//! to no CPU and more at once hides the time between a task's end and the next start.

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use drover_core::JobState;
use drover_proto as pb;
use std::str::FromStr;
use tokio_stream::StreamExt;

use super::measure;
use crate::Ctx;
use crate::cluster::{AgentOptions, Cluster, plan_json, submit};
use crate::report::{Better, Row};

/// Runs the section.
pub async fn run(ctx: &Ctx) -> Vec<Row> {
    let n = ctx.scale_tasks;
    let (last, first) = match scale_run(ctx, n).await {
        Ok((first, last)) => (Ok(vec![last]), Ok(vec![first])),
        Err(e) => {
            let msg = format!("{e:#}");
            (Err(anyhow!(msg.clone())), Err(anyhow!(msg)))
        }
    };
    vec![Row {
        section: "scale",
        figure: format!("{n} × `true` as one array job: tasks/s over its last tenth"),
        unit: "tasks/s",
        better: Better::Higher,
        drover: measure("scale (last tenth)", last),
        peer: "the same job's first tenth, same run".into(),
        peer_value: measure("scale (first tenth)", first),
    }]
}

/// Runs the job once; returns the rates of its first and last tenth.
async fn scale_run(ctx: &Ctx, n: usize) -> Result<(f64, f64)> {
    if n < 10 {
        bail!("--scale-tasks must be at least 10");
    }
    let dir = ctx.dir("scale")?;
    let cluster = Cluster::start(
        &ctx.drover,
        &dir,
        AgentOptions { cores: 4 * ctx.cores as u32, program: ctx.agent.clone() },
    )
    .await?;
    let mut client = cluster.client().await?;
    let plan = plan_json(&format!(
        "version: 1\nname: bench-scale\ntasks:\n  - name: t\n    array: \"1-{n}\"\n    command: [\"true\"]\n"
    ))?;
    let timeout = Duration::from_secs(120) + Duration::from_millis(50 * n as u64);
    let start = Instant::now();
    let job = submit(&mut client, &plan).await?;
    let tenth = n / 10;
    let follow = async {
        let mut stream = client.watch(pb::WatchRequest { job_id: job, after_seq: 0 }).await?.into_inner();
        // When the k-th task succeeded, for the marks that delimit the tenths.
        let mut done = 0usize;
        let mut marks = Vec::new();
        while let Some(ev) = stream.next().await {
            let ev = ev?;
            if ev.kind == "task" && ev.state == "succeeded" {
                done += 1;
                if done == tenth || done == n - tenth + 1 || done == n {
                    marks.push(Instant::now());
                }
            }
            if ev.kind == "job" && JobState::from_str(&ev.state).is_ok_and(|s| s.is_final()) {
                if ev.state != "succeeded" {
                    bail!("job {job} ended {} (see {})", ev.state, dir.display());
                }
                return Ok(marks);
            }
        }
        bail!("the watch stream of job {job} ended before the job did")
    };
    let marks = tokio::time::timeout(timeout, follow)
        .await
        .map_err(|_| anyhow!("job {job} did not end within {timeout:?}"))??;
    let [first_done, last_start, last_done] = marks[..] else {
        bail!("saw {} of the 3 marks of job {job}: not every task was reported succeeded", marks.len());
    };
    let first = tenth as f64 / first_done.duration_since(start).as_secs_f64();
    let last = (tenth - 1) as f64 / last_done.duration_since(last_start).as_secs_f64().max(1e-6);
    eprintln!(
        "  drover: {n} tasks in {:.1}s; first tenth {first:.0} tasks/s, last tenth {last:.0} tasks/s",
        last_done.duration_since(start).as_secs_f64()
    );
    Ok((first, last))
}
