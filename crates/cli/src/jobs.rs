//! Client commands: validate, submit, ps, status, watch, logs, cancel, nodes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use drover_core::spec::{TemplateContext, compile};
use drover_core::{JobPlan, JobState};
use drover_proto as pb;
use tokio_stream::StreamExt;

use crate::client::{ServerOpt, connect, rpc_error};
use crate::log_out::LogWriter;
use crate::render;

/// Exit code for a job file with errors.
const EXIT_INVALID: u8 = 2;

/// Output format.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Format {
    /// Tables for people.
    #[default]
    Human,
    /// JSON for scripts.
    Json,
}

/// `K=V` for `--param`.
pub fn parse_param(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("`{s}` is not a parameter; write NAME=VALUE"))
}

/// Arguments of `validate`.
#[derive(clap::Args)]
pub struct ValidateArgs {
    /// The job file (YAML or JSON).
    pub file: PathBuf,
    /// Template parameter NAME=VALUE (repeatable); overrides the file's `params`.
    #[arg(long = "param", short = 'p', value_parser = parse_param)]
    pub params: Vec<(String, String)>,
}

/// Arguments of `submit`.
#[derive(clap::Args)]
pub struct SubmitArgs {
    /// The job file (YAML or JSON).
    pub file: PathBuf,
    /// Template parameter NAME=VALUE (repeatable); overrides the file's `params`.
    #[arg(long = "param", short = 'p', value_parser = parse_param)]
    pub params: Vec<(String, String)>,
    /// Follow the job until it ends, like `drover watch`.
    #[arg(long, short = 'w')]
    pub watch: bool,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t)]
    pub output: Format,
    #[command(flatten)]
    pub server: ServerOpt,
}

/// Arguments of `ps`.
#[derive(clap::Args)]
pub struct PsArgs {
    /// Include finished jobs.
    #[arg(long, short = 'a')]
    pub all: bool,
    /// How many jobs at most (the newest); 0 lists every one.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t)]
    pub output: Format,
    #[command(flatten)]
    pub server: ServerOpt,
}

/// Arguments of `status`.
#[derive(clap::Args)]
pub struct StatusArgs {
    /// Job id.
    pub job: i64,
    /// List every task; by default a job of more than 50 tasks lists those that did not
    /// succeed and enough succeeded ones to fill 50 rows, with counts by state.
    #[arg(long)]
    pub all: bool,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t)]
    pub output: Format,
    #[command(flatten)]
    pub server: ServerOpt,
}

/// Arguments of `watch`.
#[derive(clap::Args)]
pub struct WatchArgs {
    /// Job id.
    pub job: i64,
    /// Start after this event sequence number (to resume an earlier watch).
    #[arg(long, default_value_t = 0)]
    pub after: i64,
    #[command(flatten)]
    pub server: ServerOpt,
}

/// Arguments of `logs`.
#[derive(clap::Args)]
pub struct LogsArgs {
    /// Job id.
    pub job: i64,
    /// Only this task: NAME (all frames) or NAME[FRAME].
    pub task: Option<String>,
    /// Keep following new output until the tasks end.
    #[arg(long, short = 'f')]
    pub follow: bool,
    #[command(flatten)]
    pub server: ServerOpt,
}

/// Arguments of `cancel`.
#[derive(clap::Args)]
pub struct CancelArgs {
    /// Job id.
    pub job: i64,
    #[command(flatten)]
    pub server: ServerOpt,
}

/// Arguments of `nodes`.
#[derive(clap::Args)]
pub struct NodesArgs {
    #[command(subcommand)]
    pub command: Option<crate::access::NodesCommand>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t, global = true)]
    pub output: Format,
    #[command(flatten)]
    pub server: ServerOpt,
}

/// Reads and compiles a job file. The inner `Err` is the exit code after the file's errors
/// were printed.
pub fn compile_file(
    path: &Path,
    params: &[(String, String)],
) -> Result<std::result::Result<(JobPlan, String, String), ExitCode>> {
    let source = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let filename = path.display().to_string();
    let ctx = TemplateContext {
        env: std::env::vars().collect(),
        params: params.iter().cloned().collect::<BTreeMap<_, _>>(),
    };
    match compile(&source, &filename, &ctx) {
        Ok(job) => Ok(Ok((job, source, filename))),
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{} has {} error(s); nothing was submitted", filename, errors.0.len());
            Ok(Err(ExitCode::from(EXIT_INVALID)))
        }
    }
}

/// `drover validate`.
pub fn validate(args: ValidateArgs) -> Result<ExitCode> {
    match compile_file(&args.file, &args.params)? {
        Ok((job, _, filename)) => {
            let frames = job.tasks.iter().filter(|t| t.frame.is_some()).count();
            let tasks = job.tasks.len();
            let plural =
                |n: usize, word: &str| if n == 1 { format!("1 {word}") } else { format!("{n} {word}s") };
            let frames = if frames == 0 {
                String::new()
            } else {
                format!(", {} among them", plural(frames, "array frame"))
            };
            println!("{filename}: ok, job `{}` with {}{frames}", job.name, plural(tasks, "task"));
            Ok(ExitCode::SUCCESS)
        }
        Err(code) => Ok(code),
    }
}

/// Ships the job's images, then sends the compiled job to the server; returns its id once the
/// server committed it.
pub async fn send_job(opt: &ServerOpt, mut job: JobPlan, source: String, filename: String) -> Result<i64> {
    let job_dir = Path::new(&filename).parent().map(Path::to_path_buf).unwrap_or_default();
    let job_dir = if job_dir.as_os_str().is_empty() { PathBuf::from(".") } else { job_dir };
    crate::images::ship(opt, &mut job, &job_dir).await?;
    crate::artifacts::upload_inputs(opt, &mut job, &job_dir).await?;
    let request = submit_request(&job, source, filename)?;
    let mut client = connect(opt).await?;
    let resp = client.submit(request).await.map_err(rpc_error)?;
    Ok(resp.into_inner().job_id)
}

/// zstd level for plans: fast, and within the 8 MiB window the server's decoder allows.
const PLAN_ZSTD_LEVEL: i32 = 3;

/// The submit request for a compiled job. The plan goes as zstd-compressed JSON in
/// `plan_zstd` (`plan_json` stays empty): plans repeat themselves from task to task, so even
/// 100,000 tasks compress to a few megabytes, well within the server's message limit. The
/// JSON is streamed into the compressor, never held whole.
fn submit_request(job: &JobPlan, source: String, filename: String) -> Result<pb::SubmitRequest> {
    let mut encoder = zstd::Encoder::new(Vec::new(), PLAN_ZSTD_LEVEL).context("cannot compress the plan")?;
    serde_json::to_writer(&mut encoder, job).context("cannot encode the plan")?;
    let plan_zstd = encoder.finish().context("cannot compress the plan")?;
    Ok(pb::SubmitRequest { plan_json: String::new(), source, filename, plan_zstd })
}

/// Prints a finished job's task table and output, for `up --submit`.
pub async fn print_summary(opt: &ServerOpt, job_id: i64) -> Result<()> {
    let job = get_job(opt, job_id).await?;
    println!("\n{}", render::job_detail(&job, false));
    println!("\noutput:");
    let mut client = connect(opt).await?;
    let mut stream = client
        .logs(pb::LogsRequest { job_id, task: String::new(), follow: false, after_id: 0, chunks: true })
        .await
        .map_err(rpc_error)?
        .into_inner();
    let mut out = LogWriter::new(std::io::stdout().lock(), std::io::stderr(), true);
    while let Some(batch) = stream.next().await {
        out.batch(&batch.map_err(rpc_error)?).context("cannot write the output")?;
    }
    Ok(())
}

/// `drover submit`.
pub async fn submit(args: SubmitArgs) -> Result<ExitCode> {
    let (job, source, filename) = match compile_file(&args.file, &args.params)? {
        Ok(j) => j,
        Err(code) => return Ok(code),
    };
    let tasks = job.tasks.len();
    let job_id = send_job(&args.server, job, source, filename).await?;
    match args.output {
        Format::Json => println!("{}", serde_json::json!({ "id": job_id, "tasks": tasks })),
        Format::Human => println!("{}", job_id),
    }
    if args.watch {
        return follow_job(&args.server, job_id, 0).await;
    }
    Ok(ExitCode::SUCCESS)
}

/// `drover ps`.
pub async fn ps(args: PsArgs) -> Result<ExitCode> {
    let mut client = connect(&args.server).await?;
    let jobs = crate::pages::collect(Some(args.limit), async |page_size, page_token| {
        let req = pb::ListJobsRequest { all: args.all, page_size, page_token, ..Default::default() };
        let page = client.list_jobs(req).await.map_err(rpc_error)?.into_inner();
        Ok((page.jobs, page.next_page_token))
    })
    .await?;
    match args.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&render::jobs_json(&jobs))?),
        Format::Human if jobs.is_empty() && !args.all => {
            println!("no unfinished jobs (`drover ps --all` shows every job)")
        }
        Format::Human => println!("{}", render::jobs_table(&jobs)),
    }
    Ok(ExitCode::SUCCESS)
}

async fn get_job(opt: &ServerOpt, id: i64) -> Result<pb::Job> {
    let mut client = connect(opt).await?;
    Ok(client.get_job(pb::GetJobRequest { job_id: id }).await.map_err(rpc_error)?.into_inner())
}

/// `drover status`.
pub async fn status(args: StatusArgs) -> Result<ExitCode> {
    let job = get_job(&args.server, args.job).await?;
    match args.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&render::job_json(&job))?),
        Format::Human => println!("{}", render::job_detail(&job, args.all)),
    }
    Ok(ExitCode::SUCCESS)
}

/// `drover watch`.
pub async fn watch(args: WatchArgs) -> Result<ExitCode> {
    follow_job(&args.server, args.job, args.after).await
}

/// How long `watch` keeps trying to reach a server that went away.
const RECONNECT_FOR: Duration = Duration::from_secs(120);

/// Prints a job's events until it ends, reconnecting (and resuming after the last event seen)
/// when the server goes away. Exit 0 when the job succeeded or ended with warnings.
pub async fn follow_job(opt: &ServerOpt, job_id: i64, after: i64) -> Result<ExitCode> {
    let mut after = after;
    let mut broken_since: Option<tokio::time::Instant> = None;
    let mut delay = Duration::from_millis(100);
    loop {
        match watch_once(opt, job_id, &mut after).await {
            Ok(Some(state)) => {
                return Ok(if state.is_success() { ExitCode::SUCCESS } else { ExitCode::FAILURE });
            }
            Ok(None) => {}
            Err(WatchError::Fatal(e)) => return Err(e),
            Err(WatchError::Broken(e)) => {
                let since = *broken_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() > RECONNECT_FOR {
                    return Err(e.context("gave up reconnecting to the server"));
                }
                eprintln!("connection to the server lost ({e:#}); reconnecting after event {after}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
                continue;
            }
        }
        broken_since = None;
        delay = Duration::from_millis(100);
    }
}

enum WatchError {
    /// Worth retrying: the server is unreachable or the stream broke.
    Broken(anyhow::Error),
    /// Not worth retrying: no such job, bad request.
    Fatal(anyhow::Error),
}

fn classify(status: tonic::Status) -> WatchError {
    match status.code() {
        tonic::Code::NotFound | tonic::Code::InvalidArgument => WatchError::Fatal(rpc_error(status)),
        _ => WatchError::Broken(rpc_error(status)),
    }
}

/// One watch stream. `Ok(Some(state))` when the job reached a final state.
async fn watch_once(opt: &ServerOpt, job_id: i64, after: &mut i64) -> Result<Option<JobState>, WatchError> {
    let mut client = connect(opt).await.map_err(WatchError::Broken)?;
    let mut stream =
        client.watch(pb::WatchRequest { job_id, after_seq: *after }).await.map_err(classify)?.into_inner();
    let mut last_state = None;
    let mut out = std::io::stdout();
    while let Some(ev) = stream.next().await {
        let ev = ev.map_err(classify)?;
        *after = ev.seq;
        let _ = writeln!(out, "{}", render::event_line(&ev));
        let _ = out.flush();
        if ev.kind == "job" {
            last_state = ev.state.parse::<JobState>().ok().filter(|s| s.is_final());
        }
    }
    match last_state {
        Some(s) => Ok(Some(s)),
        None => Err(WatchError::Broken(anyhow!("the watch stream ended before the job did"))),
    }
}

/// `drover logs`.
pub async fn logs(args: LogsArgs) -> Result<ExitCode> {
    let mut client = connect(&args.server).await?;
    let prefix = args.task.is_none();
    let mut stream = client
        .logs(pb::LogsRequest {
            job_id: args.job,
            task: args.task.clone().unwrap_or_default(),
            follow: args.follow,
            after_id: 0,
            chunks: true,
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
    let mut out = LogWriter::new(std::io::stdout().lock(), std::io::stderr(), prefix);
    while let Some(batch) = stream.next().await {
        match out.batch(&batch.map_err(rpc_error)?) {
            Ok(()) => {}
            // A reader that stopped reading (`drover logs 7 | head`) is no failure.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break,
            Err(e) => return Err(e).context("cannot write the output"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `drover cancel`.
pub async fn cancel(args: CancelArgs) -> Result<ExitCode> {
    let mut client = connect(&args.server).await?;
    let resp = client.cancel(pb::CancelRequest { job_id: args.job }).await.map_err(rpc_error)?.into_inner();
    println!(
        "job {} cancelled ({} running tasks are being stopped); state: {}",
        args.job, resp.cancelled, resp.state
    );
    Ok(ExitCode::SUCCESS)
}

/// `drover nodes`: the list, or one of its subcommands.
pub async fn nodes(args: NodesArgs) -> Result<ExitCode> {
    match args.command {
        None => list_nodes(&mut connect(&args.server).await?, args.output).await,
        Some(command) => crate::access::nodes(command, args.output, &args.server).await,
    }
}

/// `drover nodes ls`.
pub async fn list_nodes(client: &mut crate::client::Client, output: Format) -> Result<ExitCode> {
    let nodes = crate::pages::collect(None, async |page_size, page_token| {
        let page =
            client.list_nodes(pb::ListNodesRequest { page_size, page_token }).await.map_err(rpc_error)?;
        let page = page.into_inner();
        Ok((page.nodes, page.next_page_token))
    })
    .await?;
    match output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&render::nodes_json(&nodes))?),
        Format::Human if nodes.is_empty() => {
            println!(
                "no nodes have registered; enroll one with `drover nodes token create` and \
                 `drover agent --server URL --join TOKEN`"
            )
        }
        Format::Human => println!("{}", render::nodes_table(&nodes)),
    }
    Ok(ExitCode::SUCCESS)
}
