//! `drover-bench`: starts everything it needs (Drover's real binary, a private Slurm, a private
//! HyperQueue, raw baselines) and prints, for each figure, Drover's median, the peer's median and
//! their ratio.
//! See docs/BENCHMARKS.md for what each figure measures.

mod cluster;
mod hyperqueue;
mod machine;
mod report;
mod sections;
mod slurm;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, anyhow};
use clap::{Parser, ValueEnum};
use drover_store::pg_test::TempPostgres;

use crate::report::Row;

/// Benchmarks Drover end to end against Slurm, HyperQueue, raw baselines and published figures.
#[derive(Parser, Debug, Clone)]
#[command(name = "drover-bench")]
pub struct Opts {
    /// CI smoke mode: tiny sizes, seconds in total; every section still runs end to end.
    #[arg(long)]
    pub quick: bool,
    /// Runs per figure; the table shows medians (default 3, 1 with --quick).
    #[arg(long)]
    pub runs: Option<usize>,
    /// Tasks in the throughput array job (default 2000, 20 with --quick).
    #[arg(long)]
    pub tasks: Option<usize>,
    /// Only these sections (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Section>,
    /// Skip Slurm even if it is installed (its rows say so).
    #[arg(long)]
    pub no_slurm: bool,
    /// The `drover` binary to benchmark (default: next to this executable).
    #[arg(long)]
    pub drover: Option<PathBuf>,
    /// The agent executable worker nodes run (default: `drover-agent` next to the drover
    /// binary, else `drover agent`); e.g. the node build, `target/node/drover-agent`.
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// Single-task jobs per latency run (default 200, 5 with --quick).
    #[arg(long)]
    pub latency_samples: Option<usize>,
    /// Tasks in the scale section's array job (default 100,000, 200 with --quick).
    #[arg(long)]
    pub scale_tasks: Option<usize>,
    /// Bytes the log task writes (default 1 GiB, 1 MiB with --quick).
    #[arg(long)]
    pub log_bytes: Option<u64>,
    /// Longest a Slurm throughput run may take before its rate is taken from the tasks done so
    /// far (seconds).
    #[arg(long, default_value_t = 60)]
    pub slurm_deadline: u64,
    /// Longest a HyperQueue throughput run may take before its rate is taken from the tasks done
    /// so far (seconds).
    #[arg(long, default_value_t = 60)]
    pub hyperqueue_deadline: u64,
    /// Directory for scratch data (default: a fresh temp dir, removed at the end).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

/// The parts of the benchmark.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// N trivial tasks as one array job, submit to all done.
    Throughput,
    /// One trivial task: submit to running, submit to done.
    Latency,
    /// The pure placement function over a simulated fleet.
    Placement,
    /// Output throughput to storage, and live-follow delay.
    Logs,
    /// Peak RSS of idle and busy daemons.
    Footprint,
    /// Durable dispatch rate of the store.
    Store,
    /// 1 vs 3 server replicas on one PostgreSQL, batched vs unbatched completions.
    Replicas,
    /// MicroVM start: cold boot, snapshot restore, warm-pool claim.
    Microvm,
    /// A 100,000-task array: tasks/s over its last tenth against its first.
    Scale,
}

impl Section {
    const ALL: [Section; 9] = [
        Section::Throughput,
        Section::Latency,
        Section::Placement,
        Section::Logs,
        Section::Footprint,
        Section::Store,
        Section::Replicas,
        Section::Microvm,
        Section::Scale,
    ];
}

/// Everything a section needs: the resolved options and where to put scratch data.
pub struct Ctx {
    /// Options after applying --quick defaults.
    pub quick: bool,
    /// Runs per figure.
    pub runs: usize,
    /// Throughput tasks.
    pub tasks: usize,
    /// Latency samples per run.
    pub latency_samples: usize,
    /// Tasks in the scale section's job.
    pub scale_tasks: usize,
    /// Log bytes.
    pub log_bytes: u64,
    /// Whether to try Slurm.
    pub slurm: bool,
    /// Slurm throughput deadline.
    pub slurm_deadline: std::time::Duration,
    /// HyperQueue throughput deadline.
    pub hyperqueue_deadline: std::time::Duration,
    /// The drover binary.
    pub drover: PathBuf,
    /// How agents are started.
    pub agent: crate::cluster::AgentProgram,
    /// Scratch root.
    pub scratch: PathBuf,
    /// Cores of this machine.
    pub cores: usize,
    /// The throwaway PostgreSQL server, started on first use and shared by the sections.
    postgres: tokio::sync::OnceCell<std::result::Result<TempPostgres, String>>,
}

impl Ctx {
    /// A fresh scratch directory for one part of a section.
    pub fn dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.scratch.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// The throwaway PostgreSQL server (`DROVER_TEST_POSTGRES`, or a private one started on
    /// first use); the error says why there is none.
    pub async fn postgres(&self) -> Result<&TempPostgres> {
        let server = self
            .postgres
            .get_or_init(|| async {
                match tokio::task::spawn_blocking(TempPostgres::from_env_or_start).await {
                    Ok(Ok(server)) => Ok(server),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(e) => Err(format!("starting PostgreSQL panicked: {e}")),
                }
            })
            .await;
        server.as_ref().map_err(|e| anyhow!("{e}"))
    }

    /// Why the Slurm peer is not measured, if it is not.
    pub fn slurm_unavailable(&self) -> Option<String> {
        if !self.slurm {
            return Some("skipped (--no-slurm)".into());
        }
        slurm::unavailable_reason()
    }
}

fn default_drover() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().ok_or_else(|| anyhow!("cannot tell where drover-bench lives"))?;
    let candidate = dir.join("drover");
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(anyhow!(
            "no drover binary at {}\n  hint: build it first (cargo build --release -p drover) or pass --drover PATH",
            candidate.display()
        ))
    }
}

async fn run(opts: Opts) -> Result<bool> {
    let drover = match &opts.drover {
        Some(p) => p.clone(),
        None => default_drover()?,
    };
    if !drover.is_file() {
        return Err(anyhow!("{} is not a file; pass the drover binary with --drover", drover.display()));
    }
    // Daemons run in their own directories: a relative path would not resolve there.
    let drover = std::fs::canonicalize(&drover)?;
    let given_agent = match &opts.agent {
        Some(p) if !p.is_file() => {
            return Err(anyhow!("{} is not a file; pass the agent executable with --agent", p.display()));
        }
        Some(p) => Some(std::fs::canonicalize(p)?),
        None => None,
    };
    let agent = crate::cluster::AgentProgram::find(&drover, given_agent.as_deref());
    let temp;
    let scratch = match &opts.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new().prefix("drover-bench-").tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let q = opts.quick;
    let ctx = Ctx {
        quick: q,
        runs: opts.runs.unwrap_or(if q { 1 } else { 3 }).max(1),
        tasks: opts.tasks.unwrap_or(if q { 20 } else { 2000 }).max(1),
        latency_samples: opts.latency_samples.unwrap_or(if q { 5 } else { 200 }).max(1),
        scale_tasks: opts.scale_tasks.unwrap_or(if q { 200 } else { 100_000 }),
        log_bytes: opts.log_bytes.unwrap_or(if q { 1 << 20 } else { 1 << 30 }).max(1),
        slurm: !opts.no_slurm,
        slurm_deadline: std::time::Duration::from_secs(opts.slurm_deadline.max(1)),
        hyperqueue_deadline: std::time::Duration::from_secs(opts.hyperqueue_deadline.max(1)),
        agent,
        drover,
        scratch,
        cores: machine::cores(),
        postgres: tokio::sync::OnceCell::new(),
    };
    let machine = machine::describe();
    eprintln!("drover-bench: {machine}");
    eprintln!(
        "drover-bench: binary {}, agent {} ({}), scratch {}",
        ctx.drover.display(),
        ctx.agent.path().display(),
        ctx.agent.name(),
        ctx.scratch.display()
    );
    let sections: Vec<Section> =
        Section::ALL.into_iter().filter(|s| opts.only.is_empty() || opts.only.contains(s)).collect();
    let mut rows: Vec<Row> = Vec::new();
    for section in sections {
        eprintln!("drover-bench: {section:?} ...");
        let started = std::time::Instant::now();
        let new_rows = match section {
            Section::Throughput => sections::throughput::run(&ctx).await,
            Section::Latency => sections::latency::run(&ctx).await,
            Section::Placement => sections::placement::run(&ctx).await,
            Section::Logs => sections::logs::run(&ctx).await,
            Section::Footprint => sections::footprint::run(&ctx).await,
            Section::Store => sections::store::run(&ctx).await,
            Section::Replicas => sections::replicas::run(&ctx).await,
            Section::Microvm => sections::microvm::run(&ctx).await,
            Section::Scale => sections::scale::run(&ctx).await,
        };
        eprintln!("drover-bench: {section:?} took {:.1}s", started.elapsed().as_secs_f64());
        for r in &new_rows {
            eprint!("{}", report::table(std::slice::from_ref(r)).lines().nth(2).unwrap_or_default());
            eprintln!();
        }
        rows.extend(new_rows);
    }
    println!("Machine: {machine}\n");
    print!("{}", report::table(&rows));
    Ok(rows.iter().all(|r| !r.drover_failed()))
}

fn main() -> ExitCode {
    let opts = Opts::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(opts)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("error: some Drover measurements failed (see the table)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
