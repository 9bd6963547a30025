//! Shipping container images with a job. For every docker or microvm task the client builds the
//! image (when the task says `build`), archives it with `docker save`, compresses it with zstd
//! and uploads it to the server, content-addressed: an image the server already has is not sent
//! again. Agents that lack the image fetch the archive from the server and load it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, anyhow, bail};
use drover_core::{BuildSpec, JobPlan, RuntimeKind};
use drover_proto as pb;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt;

use crate::client::{ServerOpt, connect, rpc_error};

/// Bytes per upload message.
const CHUNK: usize = 1 << 20;
/// zstd level: fast enough to keep up with `docker save`, and deterministic for equal input,
/// which makes the archive's digest stable across submits.
const ZSTD_LEVEL: i32 = 3;

/// Where an image comes from, as written in the job file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    Named(String),
    Built { dockerfile: String, context: String, args: Vec<(String, String)> },
}

/// A shipped image: what agents run, and the archive they load it from.
#[derive(Debug, Clone)]
struct Shipped {
    image_id: String,
    blob: String,
}

/// Builds, archives and uploads the images of every container and VM task of `job`, then
/// rewrites those tasks to run the shipped image by id.
pub async fn ship(opt: &ServerOpt, job: &mut JobPlan, job_dir: &Path) -> Result<()> {
    let mut shipped: BTreeMap<Source, Shipped> = BTreeMap::new();
    let project = job.project.clone();
    for task in &mut job.tasks {
        if task.runtime == RuntimeKind::Process {
            continue;
        }
        let source = match (&task.build, &task.image) {
            (Some(b), _) => built(b),
            (None, Some(name)) => Source::Named(name.clone()),
            (None, None) => {
                bail!("task `{}` runs in {} but names no image", task.name, task.runtime.as_str())
            }
        };
        if !shipped.contains_key(&source) {
            let s = ship_one(opt, &project, &source, job_dir).await?;
            shipped.insert(source.clone(), s);
        }
        let s = &shipped[&source];
        // The name as written stays with the plan, for the project's image settings.
        task.image_name = task.image_ref();
        task.image = Some(s.image_id.clone());
        task.image_blob = Some(s.blob.clone());
        task.build = None;
    }
    Ok(())
}

fn built(b: &BuildSpec) -> Source {
    Source::Built {
        dockerfile: b.dockerfile.clone(),
        context: b.context.clone(),
        args: b.args.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

fn docker(args: &[&str]) -> Result<String> {
    let out =
        Command::new("docker").args(args).stdin(Stdio::null()).output().map_err(|e| {
            anyhow!("cannot run `docker` ({e}); shipping a container image needs a local Docker")
        })?;
    if !out.status.success() {
        bail!("docker {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

async fn ship_one(opt: &ServerOpt, project: &str, source: &Source, job_dir: &Path) -> Result<Shipped> {
    let image_id = match source {
        Source::Named(name) => docker(&["image", "inspect", "--format", "{{.Id}}", name]).map_err(|e| {
            anyhow!("{e}\n  hint: the image must exist locally (build it, or use `build:` in the job file)")
        })?,
        Source::Built { dockerfile, context, args } => build(job_dir, dockerfile, context, args)?,
    };
    let (archive, digest, size) = archive(&image_id)?;
    let mut client = connect(opt).await?;
    let blob = pb::BlobRef { digest: digest.clone(), size, project: project.to_owned() };
    let stat = client.stat_blob(blob).await.map_err(rpc_error)?.into_inner();
    if stat.exists {
        eprintln!("image {} is already on the server ({digest})", short(&image_id));
    } else {
        upload(opt, project, &archive, &digest, size, &format!("image {}", short(&image_id))).await?;
    }
    Ok(Shipped { image_id, blob: digest })
}

fn short(id: &str) -> &str {
    let id = id.strip_prefix("sha256:").unwrap_or(id);
    &id[..id.len().min(12)]
}

fn build(job_dir: &Path, dockerfile: &str, context: &str, args: &[(String, String)]) -> Result<String> {
    let context = job_dir.join(context);
    let dockerfile = job_dir.join(dockerfile);
    eprintln!("building {} (context {})", dockerfile.display(), context.display());
    let iidfile = tempfile::NamedTempFile::new()?;
    let mut cmd = Command::new("docker");
    cmd.arg("build").arg("-f").arg(&dockerfile).arg("--iidfile").arg(iidfile.path());
    for (k, v) in args {
        cmd.arg("--build-arg").arg(format!("{k}={v}"));
    }
    cmd.arg(&context).stdin(Stdio::null()).stdout(Stdio::null());
    let status = cmd
        .status()
        .map_err(|e| anyhow!("cannot run `docker build` ({e}); `build:` needs a local Docker"))?;
    if !status.success() {
        bail!("docker build of {} failed (see its output above)", dockerfile.display());
    }
    let id = std::fs::read_to_string(iidfile.path())?.trim().to_string();
    if id.is_empty() {
        bail!("docker build did not report an image id");
    }
    Ok(id)
}

/// The compressed archive of an image, cached by image id so a resubmit does not compress the
/// same image again. Returns its path, digest and size.
fn archive(image_id: &str) -> Result<(PathBuf, String, u64)> {
    let cache = cache_dir()?;
    let name = image_id.replace(':', "-");
    let path = cache.join(format!("{name}.tar.zst"));
    let digest_path = cache.join(format!("{name}.digest"));
    if let (Ok(meta), Ok(digest)) = (std::fs::metadata(&path), std::fs::read_to_string(&digest_path)) {
        return Ok((path, digest.trim().to_string(), meta.len()));
    }
    eprintln!("archiving image {}", short(image_id));
    let mut child = Command::new("docker")
        .args(["save", image_id])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run `docker save`")?;
    let mut stdout = child.stdout.take().ok_or_else(|| anyhow!("docker save has no output"))?;
    let tmp = tempfile::NamedTempFile::new_in(&cache)?;
    let hashing =
        HashingWriter { inner: std::io::BufWriter::new(tmp.as_file()), hash: Sha256::new(), size: 0 };
    let mut encoder = zstd::Encoder::new(hashing, ZSTD_LEVEL)?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = stdout.read(&mut buf)?;
        if n == 0 {
            break;
        }
        encoder.write_all(&buf[..n])?;
    }
    let HashingWriter { mut inner, hash, size } = encoder.finish()?;
    inner.flush()?;
    drop(inner);
    if !child.wait()?.success() {
        bail!("docker save {image_id} failed");
    }
    let digest = format!("sha256:{}", hex::encode(hash.finalize()));
    tmp.persist(&path).map_err(|e| anyhow!("cannot keep the image archive: {e}"))?;
    std::fs::write(&digest_path, &digest)?;
    Ok((path, digest, size))
}

fn cache_dir() -> Result<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join("drover").join("images");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// Counts and hashes what passes through to the file.
struct HashingWriter<W: Write> {
    inner: W,
    hash: Sha256,
    size: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(data)?;
        self.hash.update(&data[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A progress bar for a transfer of `size` bytes; draws only on a terminal.
pub fn progress(size: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(size);
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

/// Uploads a file as a blob of `project` with the given digest, showing progress.
pub async fn upload(
    opt: &ServerOpt,
    project: &str,
    path: &Path,
    digest: &str,
    size: u64,
    what: &str,
) -> Result<()> {
    let mut client = connect(opt).await?;
    let bar = progress(size, &format!("uploading {what}"));
    let mut file =
        tokio::fs::File::open(path).await.with_context(|| format!("cannot open {}", path.display()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let first =
        pb::BlobChunk { digest: digest.to_string(), size, data: Vec::new(), project: project.to_owned() };
    let reader_bar = bar.clone();
    let reader = tokio::spawn(async move {
        if tx.send(first).await.is_err() {
            return Ok(());
        }
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            reader_bar.inc(n as u64);
            if tx.send(pb::BlobChunk { data: buf[..n].to_vec(), ..Default::default() }).await.is_err() {
                return Ok(());
            }
        }
    });
    let result = client.put_blob(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
    reader.await.map_err(|e| anyhow!("upload reader failed: {e}"))??;
    let stored = result.map_err(rpc_error)?.into_inner();
    bar.finish_and_clear();
    if stored.digest != digest {
        bail!("the server stored {} but {digest} was sent", stored.digest);
    }
    eprintln!("uploaded {what} ({} bytes, {digest})", stored.size);
    Ok(())
}
