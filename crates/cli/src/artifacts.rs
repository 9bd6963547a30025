//! `drover artifacts`: list and download what tasks kept; and uploading local inputs at submit.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use drover_core::{InputSource, JobPlan};
use drover_proto as pb;
use sha2::{Digest as _, Sha256};
use tokio_stream::StreamExt;

use crate::client::{Client, ServerOpt, connect, rpc_error};
use crate::images::{progress, upload};
use crate::jobs::Format;

/// Arguments of `artifacts`.
#[derive(clap::Args)]
pub struct ArtifactsArgs {
    #[command(subcommand)]
    command: ArtifactsCommand,
    #[command(flatten)]
    server: ServerOpt,
}

#[derive(clap::Subcommand)]
enum ArtifactsCommand {
    /// List the outputs a job's tasks kept.
    Ls {
        /// Job id.
        job: i64,
        /// Only this task: NAME or NAME[FRAME].
        task: Option<String>,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Format,
    },
    /// Download one output: to stdout with `-o -`, into a directory, or to a file.
    Get {
        /// Job id.
        job: i64,
        /// Task: NAME or NAME[FRAME].
        task: String,
        /// Path of the output in the task's workspace.
        path: String,
        /// Where to write it: `-` for stdout, an existing directory, or a file name
        /// (default: the output's file name in the current directory).
        #[arg(long, short = 'o')]
        out: Option<String>,
    },
}

/// `drover artifacts ...`.
pub async fn artifacts(args: ArtifactsArgs) -> Result<ExitCode> {
    let mut client = connect(&args.server).await?;
    match args.command {
        ArtifactsCommand::Ls { job, task, output } => {
            let task = task.unwrap_or_default();
            let list = crate::pages::collect(None, async |page_size, page_token| {
                let req = pb::ListArtifactsRequest { job_id: job, task: task.clone(), page_size, page_token };
                let page = client.list_artifacts(req).await.map_err(rpc_error)?.into_inner();
                Ok((page.artifacts, page.next_page_token))
            })
            .await?;
            match output {
                Format::Json => {
                    let v: Vec<serde_json::Value> = list
                        .iter()
                        .map(|a| {
                            serde_json::json!({"task": a.task_name, "frame": a.frame, "attempt": a.attempt,
                                "path": a.path, "size": a.size, "digest": a.digest})
                        })
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&v)?);
                }
                Format::Human if list.is_empty() => eprintln!("job {job} kept no artifacts"),
                Format::Human => {
                    for a in list {
                        let name = match a.frame {
                            Some(f) => format!("{}[{f}]", a.task_name),
                            None => a.task_name.clone(),
                        };
                        println!("{name:<16} {:<40} {:>12}  {}", a.path, a.size, a.digest);
                    }
                }
            }
        }
        ArtifactsCommand::Get { job, task, path, out } => {
            let req = pb::GetArtifactRequest { job_id: job, task: task.clone(), path: path.clone() };
            let mut stream = open_download(&args.server, &mut client, req).await?;
            let file_name =
                Path::new(&path).file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "artifact".into());
            let mut sink: Box<dyn Write> = match out.as_deref() {
                Some("-") => Box::new(std::io::stdout().lock()),
                Some(dest) if Path::new(dest).is_dir() => {
                    Box::new(create(&Path::new(dest).join(&file_name))?)
                }
                Some(dest) => Box::new(create(Path::new(dest))?),
                None => Box::new(create(Path::new(&file_name))?),
            };
            let mut bar = None;
            let mut written = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(rpc_error)?;
                if bar.is_none() && chunk.size > 0 {
                    bar = Some(progress(chunk.size, &format!("downloading {path}")));
                }
                sink.write_all(&chunk.data)?;
                written += chunk.data.len() as u64;
                if let Some(b) = &bar {
                    b.set_position(written);
                }
            }
            sink.flush()?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn create(path: &Path) -> Result<std::fs::File> {
    std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))
}

/// Uploads every local input (`path:`) of the job, content-addressed, and rewrites it to the
/// uploaded blob. Directories travel as tar archives.
pub async fn upload_inputs(opt: &ServerOpt, job: &mut JobPlan, job_dir: &Path) -> Result<()> {
    let mut done: BTreeMap<String, (String, bool)> = BTreeMap::new();
    let project = job.project.clone();
    for task in &mut job.tasks {
        for input in &mut task.inputs {
            let InputSource::Path(p) = &input.source else { continue };
            if !done.contains_key(p) {
                let local = job_dir.join(p);
                let uploaded = upload_path(opt, &project, &local)
                    .await
                    .with_context(|| format!("input {}", local.display()))?;
                done.insert(p.clone(), uploaded);
            }
            let (digest, directory) = done[p].clone();
            input.source = InputSource::Blob { digest, directory };
        }
    }
    Ok(())
}

async fn upload_path(opt: &ServerOpt, project: &str, local: &Path) -> Result<(String, bool)> {
    let meta = std::fs::metadata(local).map_err(|e| anyhow!("cannot read {}: {e}", local.display()))?;
    let directory = meta.is_dir();
    let (file, _keep): (PathBuf, Option<tempfile::NamedTempFile>) = if directory {
        let tmp = tempfile::NamedTempFile::new()?;
        let mut builder = tar::Builder::new(tmp.reopen()?);
        builder.follow_symlinks(false);
        builder.append_dir_all(".", local)?;
        builder.into_inner()?.flush()?;
        (tmp.path().to_path_buf(), Some(tmp))
    } else {
        (local.to_path_buf(), None)
    };
    let (digest, size) = digest_file(&file)?;
    let mut client = connect(opt).await?;
    let blob = pb::BlobRef { digest: digest.clone(), size, project: project.to_owned() };
    let stat = client.stat_blob(blob).await.map_err(rpc_error)?.into_inner();
    if stat.exists {
        eprintln!("input {} is already on the server", local.display());
    } else {
        upload(opt, project, &file, &digest, size, &format!("input {}", local.display())).await?;
    }
    if size == 0 && !directory {
        bail!("{} is empty", local.display());
    }
    Ok((digest, directory))
}

fn digest_file(path: &Path) -> Result<(String, u64)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hash = Sha256::new();
    let size = std::io::copy(&mut f, &mut hash)?;
    Ok((format!("sha256:{}", hex::encode(hash.finalize())), size))
}

/// Opens a download. A file of a running task can only be read by the replica its agent is
/// connected to; a replica that says so sends the client on to the other addresses it knows.
async fn open_download(
    opt: &ServerOpt,
    client: &mut Client,
    req: pb::GetArtifactRequest,
) -> Result<tonic::Streaming<pb::BlobChunk>> {
    let elsewhere = |s: &tonic::Status| {
        s.code() == tonic::Code::Unavailable && s.message().contains("not connected to this server")
    };
    let mut last = match client.get_artifact(req.clone()).await {
        Ok(response) => return Ok(response.into_inner()),
        Err(status) if elsewhere(&status) => status,
        Err(status) => return Err(rpc_error(status)),
    };
    for target in opt.targets()? {
        let Ok(mut other) = crate::client::connect_target(&target).await else { continue };
        match other.get_artifact(req.clone()).await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) if elsewhere(&status) => last = status,
            Err(status) => return Err(rpc_error(status)),
        }
    }
    Err(rpc_error(last))
}
