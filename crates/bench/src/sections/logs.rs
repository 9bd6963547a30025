//! Logs: how fast a task's stdout reaches durable storage, and how soon a live reader sees a
//! line.
//!
//! Throughput: one task writes `--log-bytes` (1 GiB) of 128-byte lines (`yes … | head -c`) to
//! stdout; the clock runs from submit until the job is recorded done, and the run only counts if
//! the stored output (read back through the `Logs` API afterwards) has every byte. Peer: `dd`
//! writing the same number of bytes to a file in the same directory tree, with `conv=fsync`.
//!
//! Read back: `drover logs JOB TASK` (a child process, the task named so lines carry no prefix)
//! writes the stored output to a pipe the benchmark drains and counts; MB/s from its start
//! until its end, and every byte must arrive. Peer: `cat` of the `dd` file into the same kind
//! of pipe.
//!
//! Live delay: a task prints `date +%s%N` every 50 ms; a `drover logs JOB -f` child process
//! reads them and compares each line's timestamp with its arrival time. Peer: the same script
//! writing to a file, read by `tail -F`.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use drover_core::JobState;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use super::measure;
use crate::Ctx;
use crate::cluster::{AgentOptions, Client, Cluster, plan_json, stored_output_bytes, submit, watch};
use crate::report::{Better, Row};
use crate::stats::quantile;

/// Bytes per output line, newline included.
const LINE: usize = 128;

/// Runs the section.
pub async fn run(ctx: &Ctx) -> Vec<Row> {
    let bytes = ctx.log_bytes;
    let (drover_rate, drover_read, drover_delay) = match drover_runs(ctx).await {
        Ok(r) => (Ok(r.stored), Ok(r.read), Ok(r.p99)),
        Err(e) => {
            let msg = format!("{e:#}");
            (Err(anyhow!(msg.clone())), Err(anyhow!(msg.clone())), Err(anyhow!(msg)))
        }
    };
    let (dd, cat) = match dd_runs(ctx).await {
        Ok((w, r)) => (Ok(w), Ok(r)),
        Err(e) => {
            let msg = format!("{e:#}");
            (Err(anyhow!(msg.clone())), Err(anyhow!(msg)))
        }
    };
    let tail = tail_runs(ctx).await;
    let (lines, interval) = live_shape(ctx);
    vec![
        Row {
            section: "logs",
            figure: format!("{} to stdout in {LINE}-byte lines → stored, until recorded done", size(bytes)),
            unit: "MB/s",
            better: Better::Higher,
            drover: measure("drover log throughput", drover_rate),
            peer: "dd conv=fsync, same bytes to a file on the same disk".into(),
            peer_value: measure("dd", dd),
        },
        Row {
            section: "logs",
            figure: format!("{} read back: `drover logs` → pipe", size(bytes)),
            unit: "MB/s",
            better: Better::Higher,
            drover: measure("drover log read-back", drover_read),
            peer: "cat of the dd file → pipe".into(),
            peer_value: measure("cat", cat),
        },
        Row {
            section: "logs",
            figure: format!("live reader sees a line, p99 ({lines} lines, one per {interval} s)"),
            unit: "ms",
            better: Better::Lower,
            drover: measure("drover live log delay", drover_delay),
            peer: "same script → file, `tail -F` reader".into(),
            peer_value: measure("tail -F", tail),
        },
    ]
}

fn size(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{} GiB", bytes >> 30)
    } else if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

/// Lines printed by the live-delay task, and the seconds between them.
fn live_shape(ctx: &Ctx) -> (usize, &'static str) {
    if ctx.quick { (10, "0.02") } else { (200, "0.05") }
}

/// The live-delay script: a pause so the reader can attach, then timestamped lines.
fn live_script(ctx: &Ctx) -> String {
    let (lines, interval) = live_shape(ctx);
    let pause = if ctx.quick { "0.5" } else { "1" };
    format!("sleep {pause}; i=0; while [ $i -lt {lines} ]; do date +%s%N; sleep {interval}; i=$((i+1)); done")
}

fn now_ns() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)
}

/// Reads lines ending in a nanosecond timestamp from a child's stdout; returns each line's
/// delay in milliseconds. Stops after `lines` lines or `timeout`.
async fn read_delays(child: &mut tokio::process::Child, lines: usize, timeout: Duration) -> Result<Vec<f64>> {
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("reader has no stdout"))?;
    let mut reader = BufReader::new(stdout).lines();
    let mut delays = Vec::new();
    let read = async {
        while delays.len() < lines {
            let Some(line) = reader.next_line().await? else { break };
            let arrived = now_ns();
            if let Some(ts) = line.split_whitespace().last().and_then(|t| t.parse::<i128>().ok()) {
                delays.push((arrived - ts) as f64 / 1e6);
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| anyhow!("the reader saw no line for {timeout:?}"))??;
    if delays.len() < lines {
        bail!("the reader saw {} of {lines} lines", delays.len());
    }
    Ok(delays)
}

/// The rates and delays of the Drover runs.
struct DroverRuns {
    /// MB/s to storage, per run.
    stored: Vec<f64>,
    /// MB/s read back by `drover logs`, per run.
    read: Vec<f64>,
    /// Live delay p99 in ms, per run.
    p99: Vec<f64>,
}

/// Runs `command` with its stdout drained into a counter; returns the bytes and the seconds
/// from start to exit.
async fn count_stdout(command: &mut Command) -> Result<(u64, f64)> {
    use tokio::io::AsyncReadExt;
    let start = Instant::now();
    let mut child = command.stdin(Stdio::null()).stdout(Stdio::piped()).kill_on_drop(true).spawn()?;
    let mut stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = stdout.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let status = child.wait().await?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok((total, start.elapsed().as_secs_f64()))
}

async fn drover_runs(ctx: &Ctx) -> Result<DroverRuns> {
    let bytes = ctx.log_bytes;
    let dir = ctx.dir("logs-drover")?;
    // The whole output is the measure: the per-attempt log cap (64 MiB by default) must not
    // cut its middle.
    let cap = vec!["--max-log-size".to_string(), (bytes * 2).max(64 << 20).to_string()];
    let agent = AgentOptions { cores: ctx.cores as u32, program: ctx.agent.clone() };
    let cluster = Cluster::start_with(&ctx.drover, &dir, agent, &cap).await?;
    let mut client = cluster.client().await?;
    let text = "x".repeat(LINE - 1);
    let plan = plan_json(&format!(
        "version: 1\nname: bench-logs\ntasks:\n  - name: t\n    command: [\"/bin/sh\", \"-c\", \"yes {text} | head -c {bytes}\"]\n"
    ))?;
    // Generous: even at 1 MB/s the run ends.
    let timeout = Duration::from_secs(60 + bytes / 1_000_000);
    let (mut rates, mut reads) = (Vec::new(), Vec::new());
    for run in 0..ctx.runs {
        let start = Instant::now();
        let job = submit(&mut client, &plan).await?;
        let w = watch(&mut client, job, timeout).await?;
        if w.state != JobState::Succeeded {
            bail!("log job {job} ended {}", w.state);
        }
        let end = complete_output(&mut client, job, bytes, w.done).await?;
        let secs = end.duration_since(start).as_secs_f64();
        eprintln!("  drover run {}: {} stored in {secs:.2}s", run + 1, size(bytes));
        rates.push(bytes as f64 / secs / 1e6);
        let (read, secs) = count_stdout(
            Command::new(&ctx.drover)
                .args(["logs", &job.to_string(), "t", "--server", &cluster.url])
                .env("DROVER_KEY", cluster.key())
                .env("DROVER_CREDENTIALS", cluster.dir.join("credentials"))
                .stderr(Stdio::null()),
        )
        .await
        .context("cannot read the output back with `drover logs`")?;
        if read != bytes {
            bail!("`drover logs {job}` wrote {read} bytes, expected {bytes}");
        }
        eprintln!("  drover run {}: {} read back in {secs:.2}s", run + 1, size(bytes));
        reads.push(bytes as f64 / secs / 1e6);
    }
    let (lines, _) = live_shape(ctx);
    let plan = plan_json(&format!(
        "version: 1\nname: bench-live\ntasks:\n  - name: t\n    command: [\"/bin/sh\", \"-c\", \"{}\"]\n",
        live_script(ctx)
    ))?;
    let mut p99s = Vec::new();
    for run in 0..ctx.runs {
        let job = submit(&mut client, &plan).await?;
        let mut reader = Command::new(&ctx.drover)
            .args(["logs", &job.to_string(), "-f", "--server", &cluster.url])
            // The key through the environment, not argv, where `ps` would show it; and no
            // credentials file of the user's, so the command uses exactly this key.
            .env("DROVER_KEY", cluster.key())
            .env("DROVER_CREDENTIALS", cluster.dir.join("credentials"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start `drover logs -f`")?;
        let delays = read_delays(&mut reader, lines, Duration::from_secs(60)).await?;
        let p99 = quantile(&delays, 0.99).ok_or_else(|| anyhow!("no lines"))?;
        eprintln!(
            "  drover live run {}: p50 {:.1} ms, p99 {p99:.1} ms",
            run + 1,
            quantile(&delays, 0.5).unwrap_or(0.0)
        );
        p99s.push(p99);
        watch(&mut client, job, Duration::from_secs(60)).await?;
    }
    Ok(DroverRuns { stored: rates, read: reads, p99: p99s })
}

/// When the job's output was confirmed complete: the job's end if every byte was already
/// stored then, otherwise when a later check found them all.
async fn complete_output(client: &mut Client, job: i64, bytes: u64, done: Instant) -> Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut first = true;
    loop {
        let stored = stored_output_bytes(client, job).await?;
        if stored == bytes {
            return Ok(if first { done } else { Instant::now() });
        }
        if stored > bytes || Instant::now() > deadline {
            bail!("job {job} stored {stored} bytes of output, expected {bytes}");
        }
        first = false;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `dd`'s write rates, and `cat`'s rates reading the file back, per run.
async fn dd_runs(ctx: &Ctx) -> Result<(Vec<f64>, Vec<f64>)> {
    let bytes = ctx.log_bytes;
    let dir = ctx.dir("logs-dd")?;
    let file = dir.join("dd.out");
    let (mut rates, mut reads) = (Vec::new(), Vec::new());
    for _ in 0..ctx.runs {
        let start = Instant::now();
        let out = Command::new("dd")
            .args(["if=/dev/zero", "bs=1M", "iflag=count_bytes", "conv=fsync"])
            .arg(format!("of={}", file.display()))
            .arg(format!("count={bytes}"))
            .output()
            .await
            .context("cannot run dd")?;
        let secs = start.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!("dd failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        check_len(&file, bytes)?;
        rates.push(bytes as f64 / secs / 1e6);
        let (read, secs) = count_stdout(Command::new("cat").arg(&file)).await.context("cannot run cat")?;
        if read != bytes {
            bail!("cat read {read} bytes, expected {bytes}");
        }
        reads.push(bytes as f64 / secs / 1e6);
        std::fs::remove_file(&file)?;
    }
    Ok((rates, reads))
}

fn check_len(file: &Path, bytes: u64) -> Result<()> {
    let len = std::fs::metadata(file)?.len();
    if len != bytes {
        bail!("{} has {len} bytes, expected {bytes}", file.display());
    }
    Ok(())
}

async fn tail_runs(ctx: &Ctx) -> Result<Vec<f64>> {
    let dir = ctx.dir("logs-tail")?;
    let (lines, _) = live_shape(ctx);
    let mut p99s = Vec::new();
    for run in 0..ctx.runs {
        let file = dir.join(format!("live-{run}.log"));
        std::fs::write(&file, b"")?;
        let mut reader = Command::new("tail")
            .args(["-F", "-n", "+1"])
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start tail")?;
        let writer_file = std::fs::File::create(&file)?;
        let mut writer = Command::new("/bin/sh")
            .args(["-c", &live_script(ctx)])
            .stdout(writer_file)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the writer script")?;
        let delays = read_delays(&mut reader, lines, Duration::from_secs(60)).await?;
        writer.wait().await?;
        p99s.push(quantile(&delays, 0.99).ok_or_else(|| anyhow!("no lines"))?);
    }
    Ok(p99s)
}
