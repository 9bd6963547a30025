//! Replicas: end-to-end throughput of server replicas sharing one PostgreSQL. The same fleet
//! of agents and the same work (three array jobs of `true`, submitted to the replicas in
//! turn) run against 1 and against 3 `drover server` replicas, each with batched attempt
//! updates (the default) and with `--completion-batch 1` (every start and finish committed on
//! its own). tasks/s = tasks / (first submit → every job's final event).
//!
//! Every run starts on a fresh database (with `synchronous_commit = on`, as in the store
//! section) with fresh servers and agents, and the configurations take turns run by run: a
//! database that grew over earlier runs, or a machine that slowed down, would otherwise weigh
//! on whichever configuration ran last. Agent `i` prefers replica `i mod K` and knows
//! them all, so with three replicas each one holds the session of one agent. Authorization is on:
//! the first replica to start writes the operator key (the others find it in the store), every
//! client carries it, and each agent enrolls with its own join token.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use drover_core::JobState;
use drover_proto as pb;
use tokio::process::{Child, Command};

use super::measure;
use super::store::durable_database;
use crate::Ctx;
use crate::cluster::{
    AgentProgram, STOP_GRACE, banner, connect, join_token, operator_key, plan_json, stop_gracefully, submit,
    watch,
};
use crate::report::{Better, Measure, Row};

/// Agents in every configuration.
const AGENTS: usize = 3;

/// Cores each agent offers: enough that agents are never what limits the rate (`true` uses
/// next to no CPU, so offering more than the machine has only lets more run at once).
const AGENT_CORES: u32 = 16;

/// Array jobs the tasks are split into, submitted to the replicas in turn.
const JOBS: usize = 3;

/// One server/batching configuration.
#[derive(Clone, Copy)]
struct Config {
    replicas: usize,
    batch: Option<usize>,
}

impl Config {
    fn label(self) -> String {
        let servers =
            if self.replicas == 1 { "1 replica".to_string() } else { format!("{} replicas", self.replicas) };
        match self.batch {
            Some(1) => format!("{servers}, --completion-batch 1"),
            Some(n) => format!("{servers}, --completion-batch {n}"),
            None => servers,
        }
    }
}

/// Runs the section.
pub async fn run(ctx: &Ctx) -> Vec<Row> {
    let n = if ctx.quick { 24 } else { ctx.tasks };
    let server = match ctx.postgres().await {
        Ok(server) => server,
        Err(e) => {
            let why = format!("no throwaway PostgreSQL: {e:#}").replace('\n', " ");
            return rows(n, [(); 4].map(|_| Measure::Unavailable(why.clone())));
        }
    };
    let configs = [
        Config { replicas: 1, batch: None },
        Config { replicas: 3, batch: None },
        Config { replicas: 1, batch: Some(1) },
        Config { replicas: 3, batch: Some(1) },
    ];
    // The configurations take turns, run by run; one that fails is not run again.
    let mut results: Vec<Result<Runs>> = configs.iter().map(|_| Ok(Runs::default())).collect();
    for run in 0..ctx.runs {
        for (config, result) in configs.iter().zip(results.iter_mut()) {
            let Ok(runs) = result else { continue };
            match one_run(ctx, server, *config, n, run).await {
                Ok((rate, cpu)) => {
                    runs.rates.push(rate);
                    runs.cpu.push(cpu);
                }
                Err(e) => *result = Err(e),
            }
        }
    }
    let mut measures = Vec::new();
    let mut cpu_rows = Vec::new();
    for (config, result) in configs.into_iter().zip(results) {
        let label = config.label();
        if config.batch.is_none() {
            let cpu = result.as_ref().map(|r| r.cpu.clone()).map_err(|e| anyhow!("{e:#}"));
            cpu_rows.push(cpu_row(n, &label, cpu));
        }
        measures.push(measure(&format!("replicas ({label})"), result.map(|r| r.rates)));
    }
    let [one, three, one_single, three_single]: [Measure; 4] =
        measures.try_into().unwrap_or_else(|_| [(); 4].map(|_| Measure::Failed("missing runs".into())));
    let mut rows = rows(n, [one, three, one_single, three_single]);
    rows.extend(cpu_rows);
    rows
}

/// The row of CPU per task of one configuration: the server replicas together against the
/// database, the figures a model of N replicas on N machines rests on (see BENCHMARKS.md).
fn cpu_row(n: usize, label: &str, cpu: Result<Vec<CpuUse>>) -> Row {
    let (servers, postgres) = match cpu {
        Ok(cpu) => (
            measure("server CPU", Ok(cpu.iter().map(|c| c.servers).collect())),
            measure("PostgreSQL CPU", Ok(cpu.iter().map(|c| c.postgres).collect())),
        ),
        Err(e) => (Measure::failed("server CPU", &e), Measure::failed("PostgreSQL CPU", &e)),
    };
    Row {
        section: "replicas",
        figure: format!("{label}: CPU per task of the server replicas together, {n} × `true`"),
        unit: "ms",
        better: Better::Lower,
        drover: servers,
        peer: "PostgreSQL's CPU per task in the same runs".into(),
        peer_value: postgres,
    }
}

/// The section's rows from the measures of the four configurations.
fn rows(n: usize, [one, three, one_single, three_single]: [Measure; 4]) -> Vec<Row> {
    let work =
        format!("{n} × `true` in {JOBS} array jobs, {AGENTS} agents, one PostgreSQL, submit → all done");
    vec![
        Row {
            section: "replicas",
            figure: format!("3 replicas: {work}"),
            unit: "tasks/s",
            better: Better::Higher,
            drover: three.clone(),
            peer: "1 replica, same database, agents and work".into(),
            peer_value: one.clone(),
        },
        Row {
            section: "replicas",
            figure: format!("3 replicas, batched completions: {work}"),
            unit: "tasks/s",
            better: Better::Higher,
            drover: three,
            peer: "3 replicas, `--completion-batch 1` (one commit per start and per finish)".into(),
            peer_value: three_single,
        },
        Row {
            section: "replicas",
            figure: format!("1 replica, batched completions: {work}"),
            unit: "tasks/s",
            better: Better::Higher,
            drover: one,
            peer: "1 replica, `--completion-batch 1`".into(),
            peer_value: one_single,
        },
    ]
}

/// Run `run` of one configuration, on a fresh database and fleet: tasks/s and CPU per task.
async fn one_run(
    ctx: &Ctx,
    server: &drover_store::pg_test::TempPostgres,
    config: Config,
    n: usize,
    run: usize,
) -> Result<(f64, CpuUse)> {
    let database = durable_database(server).await?;
    let dir = ctx.dir(&format!(
        "replicas-{}-{}-run{}",
        config.replicas,
        config.batch.map(|b| b.to_string()).unwrap_or_else(|| "default".into()),
        run + 1
    ))?;
    let fleet = Fleet::start(&ctx.drover, &ctx.agent, &dir, &database, config).await?;
    let mut clients = Vec::new();
    for url in &fleet.urls {
        clients.push(connect(url, &fleet.key).await?);
    }
    let sizes: Vec<usize> = (0..JOBS).map(|j| (n / JOBS + usize::from(j < n % JOBS)).max(1)).collect();
    let plans: Vec<String> = sizes
        .iter()
        .enumerate()
        .map(|(j, size)| {
            plan_json(&format!(
                "version: 1\nname: bench-replicas-{j}\ntasks:\n  - name: t\n    array: \"1-{size}\"\n    command: [\"true\"]\n"
            ))
        })
        .collect::<Result<_>>()?;
    let total: usize = sizes.iter().sum();
    let timeout = Duration::from_secs(60) + Duration::from_millis(50 * total as u64);
    let before = CpuUse::now(&fleet, server)?;
    let start = Instant::now();
    let mut watchers = Vec::new();
    for (j, plan) in plans.iter().enumerate() {
        let mut client = clients[j % clients.len()].clone();
        let job = submit(&mut client, plan).await?;
        watchers.push(tokio::spawn(async move { (job, watch(&mut client, job, timeout).await) }));
    }
    let mut done = start;
    for w in watchers {
        let (job, watched) = w.await.map_err(|e| anyhow!("a watcher panicked: {e}"))?;
        let watched = watched?;
        if watched.state != JobState::Succeeded {
            bail!("job {job} ended {} (see {})", watched.state, dir.display());
        }
        done = done.max(watched.done);
    }
    let secs = done.duration_since(start).as_secs_f64();
    let used = CpuUse::now(&fleet, server)?.since(before, total);
    eprintln!(
        "  {} run {}: {total} tasks in {secs:.2}s; CPU per task: servers {:.2} ms, PostgreSQL {:.2} ms",
        config.label(),
        run + 1,
        used.servers,
        used.postgres
    );
    Ok((total as f64 / secs, used))
}

/// What the runs of one configuration measured.
#[derive(Default)]
struct Runs {
    /// tasks/s per run.
    rates: Vec<f64>,
    /// CPU per task per run.
    cpu: Vec<CpuUse>,
}

/// CPU seconds used so far (or, after [`CpuUse::since`], milliseconds per task) by every server
/// replica together and by the database's processes.
#[derive(Clone, Copy, Debug)]
struct CpuUse {
    servers: f64,
    postgres: f64,
}

impl CpuUse {
    fn now(fleet: &Fleet, database: &drover_store::pg_test::TempPostgres) -> Result<CpuUse> {
        let mut servers = 0.0;
        for pid in &fleet.servers {
            servers += crate::machine::cpu_seconds(*pid)?;
        }
        let postmaster =
            database.postmaster_pid().ok_or_else(|| anyhow!("the database's postmaster is not known"))?;
        Ok(CpuUse { servers, postgres: crate::machine::tree_cpu_seconds(postmaster)? })
    }

    /// Milliseconds per task between `before` and this reading, over `tasks` tasks.
    fn since(self, before: CpuUse, tasks: usize) -> CpuUse {
        let per_task = |now: f64, then: f64| (now - then).max(0.0) * 1000.0 / tasks.max(1) as f64;
        CpuUse {
            servers: per_task(self.servers, before.servers),
            postgres: per_task(self.postgres, before.postgres),
        }
    }
}

/// Server replicas and agents as child processes, killed when dropped.
struct Fleet {
    urls: Vec<String>,
    /// Process ids of the server replicas.
    servers: Vec<u32>,
    /// The operator key, written by whichever replica started first.
    key: String,
    /// The server replicas, then the agents.
    children: Vec<Child>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Agents first, so that each stops while its servers still answer.
        self.children.reverse();
        stop_gracefully(&mut self.children, STOP_GRACE);
    }
}

impl Fleet {
    async fn start(
        drover: &Path,
        agent: &AgentProgram,
        dir: &Path,
        database: &str,
        config: Config,
    ) -> Result<Fleet> {
        let log = |name: &str| -> Result<std::fs::File> {
            let path = dir.join(format!("{name}.log"));
            std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))
        };
        let mut children = Vec::new();
        let mut urls = Vec::new();
        let data_dirs: Vec<_> = (0..config.replicas).map(|i| dir.join(format!("server-{i}"))).collect();
        for (i, data_dir) in data_dirs.iter().enumerate() {
            let mut cmd = Command::new(drover);
            cmd.args(["server", "--listen", "127.0.0.1:0", "--database", database, "--data-dir"])
                .arg(data_dir)
                .arg("--blobs")
                .arg(dir.join("blobs"));
            if let Some(batch) = config.batch {
                cmd.args(["--completion-batch", &batch.to_string()]);
            }
            let server = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(log(&format!("server-{i}"))?)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start {} server", drover.display()))?;
            children.push(server);
        }
        // Started together, the replicas migrate the fresh database once between them.
        let mut servers = Vec::new();
        for server in &mut children {
            urls.push(banner(server, dir).await?);
            servers.push(server.id().ok_or_else(|| anyhow!("a server replica exited at start"))?);
        }
        let key = operator_key(&data_dirs).await?;
        let mut client = connect(&urls[0], &key).await?;
        for i in 0..AGENTS {
            let mut list = urls.clone();
            list.rotate_left(i % urls.len());
            let token = join_token(&mut client).await?;
            let agent = agent
                .command()
                .args(["--server", &list.join(","), "--join", &token, "--name", &format!("bench-agent-{i}")])
                .args(["--cores", &AGENT_CORES.to_string(), "--no-docker", "--work-dir"])
                .arg(dir.join(format!("agent-{i}")))
                .current_dir(dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log(&format!("agent-{i}"))?)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start {} agent", drover.display()))?;
            children.push(agent);
        }
        let fleet = Fleet { urls, servers, key, children };
        fleet.wait_ready(dir, Duration::from_secs(30)).await?;
        Ok(fleet)
    }

    /// Waits until every agent's node is ready (any replica sees them all: one database).
    async fn wait_ready(&self, dir: &Path, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let mut client = connect(&self.urls[0], &self.key).await?;
        loop {
            let nodes = client.list_nodes(pb::ListNodesRequest::default()).await?.into_inner().nodes;
            if nodes.iter().filter(|n| n.state == "ready").count() >= AGENTS {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!("{AGENTS} agents did not register within {timeout:?} (see {})", dir.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
