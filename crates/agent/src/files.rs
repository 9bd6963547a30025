//! Moving files in and out of a task's workspace. The agent does this, never the sandbox:
//! inputs are placed before the task starts (blobs from the server, http(s) URLs), and outputs
//! matching the task's globs are uploaded after it ends. Nothing outside the workspace is ever
//! read: a path that resolves outside it is refused.

use std::path::{Component, Path, PathBuf};

use drover_core::{InputSource, InputSpec};
use drover_proto as pb;
use drover_proto::drover_client::DroverClient;
use tokio::io::AsyncReadExt;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// Bytes per upload message.
const CHUNK: usize = 1 << 20;

/// How the agent reaches a server for file transfers.
#[derive(Debug, Clone)]
pub struct ServerLink {
    servers: Vec<String>,
}

impl ServerLink {
    /// A link that tries `servers` in order.
    pub fn new(servers: Vec<String>) -> ServerLink {
        ServerLink { servers }
    }

    /// A client of the first server that answers.
    pub async fn client(&self) -> Result<DroverClient<Channel>, String> {
        let mut last = "no server address".to_string();
        for s in &self.servers {
            match DroverClient::connect(s.clone()).await {
                Ok(c) => return Ok(c.max_decoding_message_size(64 << 20)),
                Err(e) => last = format!("{s}: {e}"),
            }
        }
        Err(last)
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
        .get_blob(pb::BlobRef { digest: digest.to_string(), size: 0 })
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
            loop {
                let n = file.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<(), std::io::Error>(());
                }
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

    #[test]
    fn input_destinations_stay_inside() {
        let ws = Path::new("/ws");
        assert!(inside(ws, "data/x").is_ok());
        assert!(inside(ws, "../x").is_err());
        assert!(inside(ws, "/etc/passwd").is_err());
        assert!(inside(ws, "a/../../x").is_err());
    }
}
