//! Outputs: the files matching the task's globs, found after it ends, uploaded as blobs. Each
//! is opened through [`crate::beneath`] (links followed only while they stay inside), so a
//! link swapped in after the files were listed cannot make the agent upload a file from
//! elsewhere.

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use drover_proto as pb;
use tokio::io::AsyncReadExt;

use super::{OutputError, ServerLink};
use crate::beneath::{BeneathError, Dir, RelPath};

/// Bytes per upload message.
const CHUNK: usize = 1 << 20;

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
    let Ok(dir) = Dir::open(&root) else { return (Vec::new(), refused) };
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(&root).follow_links(false).into_iter().flatten() {
        let Ok(rel) = entry.path().strip_prefix(&root) else { continue };
        let rel_text = rel.to_string_lossy().to_string();
        if rel_text.is_empty() || !set.is_match(rel) {
            continue;
        }
        let file_type = entry.file_type();
        if file_type.is_symlink() {
            // Judged the way the upload will open it, so a link kept here can be read there.
            let opened = RelPath::new(rel).and_then(|rel| dir.open_file(&rel));
            match (opened, entry.path().canonicalize()) {
                (Ok(_), _) => files.push(rel_text),
                (Err(BeneathError::Escapes { .. }), Ok(target)) if target.starts_with(&root) => refused.push(
                    format!("`{rel_text}` is an absolute link; only relative links inside the workspace are followed"),
                ),
                (Err(BeneathError::Escapes { .. }), Ok(target)) => refused
                    .push(format!("`{rel_text}` is a link to {} outside the workspace", target.display())),
                (Err(BeneathError::Escapes { .. }), Err(_)) => {
                    refused.push(format!("`{rel_text}` is a link that leads outside the workspace"))
                }
                (Err(BeneathError::NotFound { .. }), _) => refused.push(format!("`{rel_text}` is a dangling link")),
                // A link to a directory, or to something that is not a regular file.
                (Err(_), _) => {}
            }
        } else if file_type.is_file() {
            files.push(rel_text);
        }
    }
    files.sort();
    (files, refused)
}

/// Splits outputs into those that fit `limit` bytes in total (in order) and notes about the
/// ones that do not. A file that cannot be opened counts as empty here; its upload fails
/// with the reason.
pub fn within_limit(workspace: &Path, files: Vec<String>, limit: u64) -> (Vec<String>, Vec<String>) {
    let root = Dir::open(workspace).ok();
    let size_of = |rel: &str| -> u64 {
        let file = root.as_ref().and_then(|root| root.open_file(&RelPath::new(rel).ok()?).ok());
        file.and_then(|f| f.metadata().ok()).map_or(0, |m| m.len())
    };
    let mut total = 0u64;
    let mut kept = Vec::new();
    let mut over = Vec::new();
    for rel in files {
        let size = size_of(&rel);
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

/// How long an output's upload keeps being tried while no server can take it (a replica
/// restarting, its database restarting, the link down). The task has ended by then: its
/// outputs are its result, worth a wait.
const UPLOAD_PATIENCE: Duration = Duration::from_secs(120);
/// The first pause between tries; it doubles up to [`MAX_UPLOAD_PAUSE`].
const FIRST_UPLOAD_PAUSE: Duration = Duration::from_millis(250);
/// The longest pause between tries.
const MAX_UPLOAD_PAUSE: Duration = Duration::from_secs(5);

/// Uploads outputs as blobs; returns what to report. An upload that fails for a reason that
/// passes (see [`OutputError::is_transient`]) is tried again for up to two minutes.
pub async fn upload_outputs(
    link: &ServerLink,
    workspace: &Path,
    files: &[String],
) -> Result<Vec<pb::OutputFile>, OutputError> {
    upload_outputs_within(link, workspace, files, UPLOAD_PATIENCE).await
}

async fn upload_outputs_within(
    link: &ServerLink,
    workspace: &Path,
    files: &[String],
    patience: Duration,
) -> Result<Vec<pb::OutputFile>, OutputError> {
    let root = Dir::open(workspace).map_err(OutputError::Workspace)?;
    let give_up = Instant::now() + patience;
    let mut out = Vec::new();
    for rel in files {
        let mut pause = FIRST_UPLOAD_PAUSE;
        loop {
            match upload_one(link, &root, rel).await {
                Ok(file) => {
                    out.push(file);
                    break;
                }
                Err(e) if e.is_transient() && Instant::now() + pause < give_up => {
                    tracing::warn!(path = %rel, error = %e, retry_in_ms = pause.as_millis() as u64, "output upload failed; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_UPLOAD_PAUSE);
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(out)
}

/// Uploads one output, read from its start.
async fn upload_one(link: &ServerLink, root: &Dir, rel: &str) -> Result<pb::OutputFile, OutputError> {
    let path = RelPath::new(rel).map_err(OutputError::Open)?;
    let file = root.open_file(&path).map_err(OutputError::Open)?;
    let mut file = tokio::fs::File::from_std(file);
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
    let read_failed = |source| OutputError::Read { path: rel.to_owned(), source };
    sender.await.map_err(|e| read_failed(std::io::Error::other(e)))?.map_err(read_failed)?;
    let stored = stored
        .map_err(|e| OutputError::Upload {
            path: rel.to_owned(),
            code: e.code(),
            message: e.message().to_owned(),
        })?
        .into_inner();
    Ok(pb::OutputFile { path: rel.to_owned(), size: stored.size, digest: stored.digest })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_upload_no_server_takes_is_tried_again_then_given_up_as_transient() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        std::fs::create_dir_all(ws.join("out")).unwrap();
        std::fs::write(ws.join("out/a.txt"), "a").unwrap();
        // A loopback port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let link =
            crate::link::Link::new(vec![format!("http://127.0.0.1:{port}")], None, dir.path().join("state"));
        let link = ServerLink::new(std::sync::Arc::new(link));
        let err = upload_outputs_within(&link, &ws, &["out/a.txt".into()], Duration::from_millis(600))
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(err.to_string().contains("cannot reach a server"), "{err}");
        // What a server refuses for good is not tried again.
        let refused = OutputError::Upload {
            path: "out/a.txt".into(),
            code: tonic::Code::ResourceExhausted,
            message: "too large".into(),
        };
        assert!(!refused.is_transient());
        let away = OutputError::Upload {
            path: "out/a.txt".into(),
            code: tonic::Code::Unavailable,
            message: "database restarting".into(),
        };
        assert!(away.is_transient());
    }

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
        std::os::unix::fs::symlink(ws.join("out/a.txt"), ws.join("out/absolute.txt")).unwrap();
        std::os::unix::fs::symlink("../../secret.txt", ws.join("out/up.txt")).unwrap();
        std::os::unix::fs::symlink("gone.txt", ws.join("out/dangling.txt")).unwrap();
        let (files, mut refused) = collect_outputs(&ws, &["out/*.txt".into(), "out/**/*.txt".into()]);
        assert_eq!(files, vec!["out/a.txt", "out/inside-link.txt", "out/sub/b.txt"]);
        refused.sort();
        let expected = [
            ("out/absolute.txt", "is an absolute link"),
            ("out/dangling.txt", "is a dangling link"),
            ("out/escape.txt", "outside the workspace"),
            ("out/up.txt", "outside the workspace"),
        ];
        assert_eq!(refused.len(), expected.len(), "{refused:?}");
        for (note, (path, why)) in refused.iter().zip(expected) {
            assert!(note.contains(path) && note.contains(why), "{note}");
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
}
