//! Moving files in and out of a task's workspace. The agent does this, never the sandbox:
//! inputs are placed before the task starts (blobs from the server, http(s) URLs), and outputs
//! matching the task's globs are uploaded after it ends, and files are read live for
//! downloads while it runs. Nothing outside the workspace is ever read: a path that resolves
//! outside it is refused.

use std::path::{Component, Path, PathBuf};

use drover_core::{InputSource, InputSpec};
use drover_proto as pb;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_stream::StreamExt;

use crate::link::Link;

/// Bytes per upload message.
const CHUNK: usize = 1 << 20;
/// Bytes per live read message.
const LIVE_CHUNK: usize = 256 * 1024;

/// How the agent reaches a server for file transfers.
#[derive(Clone)]
pub struct ServerLink {
    link: Arc<Link>,
}

impl std::fmt::Debug for ServerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerLink").field("servers", &self.link.servers()).finish()
    }
}

impl ServerLink {
    /// File transfers through `link`.
    pub fn new(link: Arc<Link>) -> ServerLink {
        ServerLink { link }
    }

    /// A client of the first server that answers, carrying the node's credential.
    pub async fn client(&self) -> Result<crate::link::Client, String> {
        self.link.client().await.map_err(|e| e.to_string())
    }
}

/// A destination inside the workspace, refusing absolute paths and `..`.
fn inside(workspace: &Path, rel: &str) -> Result<PathBuf, String> {
    let p = Path::new(rel);
    if p.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err(format!("`{rel}` is not a path inside the workspace"));
    }
    Ok(workspace.join(p))
}

/// Places every input in the workspace.
pub async fn fetch_inputs(link: &ServerLink, workspace: &Path, inputs: &[InputSpec]) -> Result<(), String> {
    tokio::fs::create_dir_all(workspace).await.map_err(|e| format!("cannot create the workspace: {e}"))?;
    for input in inputs {
        let dest = inside(workspace, &input.to)?;
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        match &input.source {
            InputSource::Blob { digest, directory } => {
                let bytes =
                    download_blob(link, digest).await.map_err(|e| format!("input `{}`: {e}", input.to))?;
                if *directory {
                    unpack(&bytes, &dest).map_err(|e| format!("input `{}`: cannot unpack: {e}", input.to))?;
                } else {
                    tokio::fs::write(&dest, bytes).await.map_err(|e| format!("input `{}`: {e}", input.to))?;
                }
            }
            InputSource::Url(url) => {
                let bytes =
                    fetch_url(url).await.map_err(|e| format!("input `{}` from {url}: {e}", input.to))?;
                tokio::fs::write(&dest, bytes).await.map_err(|e| format!("input `{}`: {e}", input.to))?;
            }
            InputSource::Artifact { task, path } => {
                return Err(format!("input `{}`: task `{task}` kept no output `{path}`", input.to));
            }
            InputSource::Path(p) => {
                return Err(format!("input `{}`: local path {p} was not uploaded by the client", input.to));
            }
        }
        tracing::debug!(to = %input.to, "input placed");
    }
    Ok(())
}

async fn download_blob(link: &ServerLink, digest: &str) -> Result<Vec<u8>, String> {
    let mut client = link.client().await?;
    let mut stream = client
        .get_blob(pb::BlobRef { digest: digest.to_string(), ..Default::default() })
        .await
        .map_err(|e| e.message().to_string())?
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.map_err(|e| e.message().to_string())?.data);
    }
    Ok(out)
}

async fn fetch_url(url: &str) -> Result<Vec<u8>, String> {
    let resp = reqwest::get(url).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("http status {}", resp.status()));
    }
    Ok(resp.bytes().await.map_err(|e| e.to_string())?.to_vec())
}

fn unpack(tar_bytes: &[u8], dest: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dest)?;
    let mut archive = tar::Archive::new(tar_bytes);
    // `unpack` refuses entries that would land outside `dest`.
    archive.unpack(dest)
}

/// Files matching the globs, relative to the workspace, and the refusals (paths that resolve
/// outside the workspace, with the reason).
pub fn collect_outputs(workspace: &Path, globs: &[String]) -> (Vec<String>, Vec<String>) {
    let mut builder = globset::GlobSetBuilder::new();
    let mut refused = Vec::new();
    for g in globs {
        match globset::GlobBuilder::new(g).literal_separator(true).build() {
            Ok(glob) => {
                builder.add(glob);
            }
            Err(e) => refused.push(format!("`{g}` is not a glob: {e}")),
        }
    }
    let Ok(set) = builder.build() else { return (Vec::new(), refused) };
    let Ok(root) = workspace.canonicalize() else { return (Vec::new(), refused) };
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(&root).follow_links(false).into_iter().flatten() {
        let Ok(rel) = entry.path().strip_prefix(&root) else { continue };
        let rel_text = rel.to_string_lossy().to_string();
        if rel_text.is_empty() || !set.is_match(rel) {
            continue;
        }
        let file_type = entry.file_type();
        if file_type.is_symlink() {
            match entry.path().canonicalize() {
                Ok(target) if target.starts_with(&root) && target.is_file() => files.push(rel_text),
                Ok(target) if !target.starts_with(&root) => refused
                    .push(format!("`{rel_text}` is a link to {} outside the workspace", target.display())),
                Ok(_) => {}
                Err(_) => refused.push(format!("`{rel_text}` is a dangling link")),
            }
        } else if file_type.is_file() {
            files.push(rel_text);
        }
    }
    files.sort();
    (files, refused)
}

/// Splits outputs into those that fit `limit` bytes in total (in order) and notes about the
/// ones that do not.
pub fn within_limit(workspace: &Path, files: Vec<String>, limit: u64) -> (Vec<String>, Vec<String>) {
    let mut total = 0u64;
    let mut kept = Vec::new();
    let mut over = Vec::new();
    for rel in files {
        let size = std::fs::metadata(workspace.join(&rel)).map(|m| m.len()).unwrap_or(0);
        if total.saturating_add(size) > limit {
            over.push(format!("`{rel}` ({size} bytes)"));
        } else {
            total += size;
            kept.push(rel);
        }
    }
    let notes = if over.is_empty() {
        Vec::new()
    } else {
        vec![format!(
            "outputs over the limit of {limit} bytes per task not kept: {} (the server's --max-outputs-size)",
            over.join(", ")
        )]
    };
    (kept, notes)
}

/// Opens a file of a running attempt's workspace for a live read, refusing anything that is
/// not a regular file inside the workspace (after following links). Returns it with its size.
pub async fn open_inside(workspace: &Path, rel: &str) -> Result<(tokio::fs::File, u64), String> {
    let path = inside(workspace, rel)?;
    let root = tokio::fs::canonicalize(workspace)
        .await
        .map_err(|_| "the task's workspace does not exist (yet)".to_string())?;
    let target =
        tokio::fs::canonicalize(&path).await.map_err(|_| format!("no file `{rel}` in the workspace"))?;
    if !target.starts_with(&root) {
        return Err(format!("`{rel}` leads outside the workspace"));
    }
    let meta = tokio::fs::metadata(&target).await.map_err(|e| format!("cannot read `{rel}`: {e}"))?;
    if !meta.is_file() {
        return Err(format!("`{rel}` is not a regular file"));
    }
    // The resolved path has no links; refusing one at open time closes the gap of a link
    // swapped in since.
    let file = tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&target)
        .await
        .map_err(|e| format!("cannot open `{rel}`: {e}"))?;
    Ok((file, meta.len()))
}

/// Reads up to `length` bytes of `rel` from `offset` on, handing each chunk to `emit` (which
/// returns false once nobody listens). The last chunk has `last` set, and `eof` when the
/// file ended (as far as it was written when read); a refusal is one chunk with `error`.
pub async fn read_window(workspace: &Path, read: &pb::ReadFile, mut emit: impl FnMut(pb::FileChunk) -> bool) {
    let request_id = read.request_id;
    let fail = |error: String| pb::FileChunk { request_id, last: true, error, ..Default::default() };
    let (mut file, size) = match open_inside(workspace, &read.path).await {
        Ok(f) => f,
        Err(e) => {
            emit(fail(e));
            return;
        }
    };
    if let Err(e) = file.seek(std::io::SeekFrom::Start(read.offset)).await {
        emit(fail(format!("cannot read `{}`: {e}", read.path)));
        return;
    }
    let mut left = read.length.max(1);
    let mut buf = vec![0u8; LIVE_CHUNK];
    loop {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = match file.read(&mut buf[..want]).await {
            Ok(n) => n,
            Err(e) => {
                emit(fail(format!("cannot read `{}`: {e}", read.path)));
                return;
            }
        };
        left -= n as u64;
        let eof = n == 0;
        let last = eof || left == 0;
        let chunk =
            pb::FileChunk { request_id, data: buf[..n].to_vec(), last, eof, error: String::new(), size };
        if !emit(chunk) || last {
            return;
        }
    }
}

/// Uploads outputs as blobs; returns what to report.
pub async fn upload_outputs(
    link: &ServerLink,
    workspace: &Path,
    files: &[String],
) -> Result<Vec<pb::OutputFile>, String> {
    let mut out = Vec::new();
    for rel in files {
        let path = workspace.join(rel);
        let mut file =
            tokio::fs::File::open(&path).await.map_err(|e| format!("cannot read output `{rel}`: {e}"))?;
        let mut client = link.client().await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let sender = tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            let mut first = true;
            loop {
                let n = file.read(&mut buf).await?;
                // An empty file is still one (empty) message: an upload needs a first message.
                if n == 0 && !first {
                    return Ok::<(), std::io::Error>(());
                }
                first = false;
                if tx.send(pb::BlobChunk { data: buf[..n].to_vec(), ..Default::default() }).await.is_err() {
                    return Ok(());
                }
            }
        });
        let stored = client.put_blob(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
        sender.await.map_err(|e| e.to_string())?.map_err(|e| format!("cannot read output `{rel}`: {e}"))?;
        let stored =
            stored.map_err(|e| format!("cannot upload output `{rel}`: {}", e.message()))?.into_inner();
        out.push(pb::OutputFile { path: rel.clone(), size: stored.size, digest: stored.digest });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_never_leave_the_workspace() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        std::fs::create_dir_all(ws.join("out/sub")).unwrap();
        std::fs::write(ws.join("out/a.txt"), "a").unwrap();
        std::fs::write(ws.join("out/sub/b.txt"), "b").unwrap();
        std::fs::write(dir.path().join("secret.txt"), "outside").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret.txt"), ws.join("out/escape.txt")).unwrap();
        std::os::unix::fs::symlink("a.txt", ws.join("out/inside-link.txt")).unwrap();
        let (files, refused) = collect_outputs(&ws, &["out/*.txt".into(), "out/**/*.txt".into()]);
        assert_eq!(files, vec!["out/a.txt", "out/inside-link.txt", "out/sub/b.txt"]);
        assert_eq!(refused.len(), 1);
        assert!(
            refused[0].contains("out/escape.txt") && refused[0].contains("outside the workspace"),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn live_reads_stay_inside_the_workspace() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        std::fs::create_dir_all(ws.join("sub")).unwrap();
        std::fs::write(ws.join("sub/data.txt"), "0123456789").unwrap();
        std::fs::write(dir.path().join("secret.txt"), "outside").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret.txt"), ws.join("escape.txt")).unwrap();
        std::os::unix::fs::symlink("sub/data.txt", ws.join("inside.txt")).unwrap();
        let read = |path: &str, offset, length| pb::ReadFile {
            request_id: 7,
            attempt_id: 1,
            path: path.into(),
            offset,
            length,
        };
        let window = |req: pb::ReadFile| {
            let ws = ws.clone();
            async move {
                let mut got = Vec::new();
                read_window(&ws, &req, |c| {
                    got.push(c);
                    true
                })
                .await;
                got
            }
        };
        let got = window(read("sub/data.txt", 2, 4)).await;
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].data.as_slice(), got[0].last, got[0].eof, got[0].size),
            (&b"2345"[..], true, false, 10)
        );
        let got = window(read("inside.txt", 8, 100)).await;
        let data: Vec<u8> = got.iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(data, b"89");
        assert!(got.last().is_some_and(|c| c.last && c.eof));
        for (path, why) in [
            ("escape.txt", "outside the workspace"),
            ("../secret.txt", "not a path inside"),
            ("/etc/passwd", "not a path inside"),
            ("sub", "not a regular file"),
            ("missing.txt", "no file"),
        ] {
            let got = window(read(path, 0, 100)).await;
            assert_eq!(got.len(), 1, "{path}");
            assert!(got[0].error.contains(why) && got[0].data.is_empty(), "{path}: {}", got[0].error);
        }
    }

    #[test]
    fn outputs_over_the_limit_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![0u8; 600]).unwrap();
        std::fs::write(dir.path().join("b"), vec![0u8; 600]).unwrap();
        std::fs::write(dir.path().join("c"), vec![0u8; 300]).unwrap();
        let (kept, notes) = within_limit(dir.path(), vec!["a".into(), "b".into(), "c".into()], 1000);
        assert_eq!(kept, vec!["a", "c"]);
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("`b` (600 bytes)") && notes[0].contains("1000 bytes"), "{notes:?}");
        let (kept, notes) = within_limit(dir.path(), vec!["a".into(), "c".into()], 1000);
        assert_eq!((kept.len(), notes.len()), (2, 0));
    }

    #[test]
    fn input_destinations_stay_inside() {
        let ws = Path::new("/ws");
        assert!(inside(ws, "data/x").is_ok());
        assert!(inside(ws, "../x").is_err());
        assert!(inside(ws, "/etc/passwd").is_err());
        assert!(inside(ws, "a/../../x").is_err());
    }
}
