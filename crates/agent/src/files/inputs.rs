//! Placing inputs: each one streams from its source (a blob on a server, a URL) straight into
//! the workspace, through [`crate::beneath`]. A file is created (or truncated) only once its
//! source answered.

use std::path::Path;

use drover_core::{InputSource, InputSpec};

use super::transfer::{self, Chunks};
use super::untar::{self, ArchiveLimits};
use super::{InputError, InputFailure, InputPolicy, ServerLink, url};
use crate::beneath::{Dir, RelPath};

/// Mode of a file input.
const INPUT_MODE: u32 = 0o644;

/// Places every input in the workspace (made when missing), in order; the first failure
/// stops the rest.
pub async fn place_inputs(
    link: &ServerLink,
    workspace: &Path,
    inputs: &[InputSpec],
    policy: &InputPolicy,
) -> Result<(), InputError> {
    let root = Dir::create(workspace).map_err(InputError::Workspace)?;
    for input in inputs {
        place(link, &root, input, policy)
            .await
            .map_err(|reason| InputError::Input { to: input.to.clone(), reason })?;
        tracing::debug!(to = %input.to, "input placed");
    }
    Ok(())
}

async fn place(
    link: &ServerLink,
    root: &Dir,
    input: &InputSpec,
    policy: &InputPolicy,
) -> Result<(), InputFailure> {
    let to = RelPath::new(&input.to)?;
    match &input.source {
        InputSource::Blob { digest, directory: true } => {
            let chunks = transfer::blob(link, digest, policy).await?;
            let dest = root.create_dir_all(&to, None)?;
            untar::extract(dest, chunks, ArchiveLimits::of(policy)).await
        }
        InputSource::Blob { digest, directory: false } => {
            let chunks = transfer::blob(link, digest, policy).await?;
            write_file(root, &to, chunks).await
        }
        InputSource::Url(address) => {
            let chunks = url::fetch(address, policy).await?;
            write_file(root, &to, chunks).await
        }
        InputSource::Artifact { task, path } => {
            Err(InputFailure::NoArtifact { task: task.clone(), path: path.clone() })
        }
        InputSource::Path(path) => Err(InputFailure::NotUploaded { path: path.clone() }),
    }
}

async fn write_file(root: &Dir, to: &RelPath, chunks: Chunks) -> Result<(), InputFailure> {
    // A few metadata calls on the node's own disk: not worth a blocking thread.
    let file = root.create_file(to, INPUT_MODE)?;
    transfer::write_to(file, chunks).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::link::Link;

    fn link(dir: &Path) -> ServerLink {
        ServerLink::new(Arc::new(Link::new(Vec::new(), None, dir.join("state.json"))))
    }

    #[tokio::test]
    async fn a_url_input_to_the_nodes_loopback_is_refused_and_nothing_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = tmp.path().join("ws");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let input = InputSpec {
            source: InputSource::Url(format!("http://127.0.0.1:{port}/secret")),
            to: "web.txt".into(),
        };
        let err = place_inputs(&link(tmp.path()), &ws, &[input], &InputPolicy::default()).await.unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("input `web.txt`: 127.0.0.1 is a loopback"), "{text}");
        assert!(!ws.join("web.txt").exists());
    }

    #[tokio::test]
    async fn a_url_input_through_a_link_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = tmp.path().join("ws");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&ws).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, ws.join("link")).unwrap();
        // The server answers: the refusal comes from the path, after the source answered.
        let port = {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                while let Ok((mut s, _)) = listener.accept().await {
                    let _ = s.read(&mut [0u8; 4096]).await;
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nevil")
                        .await;
                }
            });
            port
        };
        let policy = InputPolicy { allow_local_urls: true, ..InputPolicy::default() };
        for to in ["link/x", "link"] {
            let input =
                InputSpec { source: InputSource::Url(format!("http://127.0.0.1:{port}/")), to: to.into() };
            let err = place_inputs(&link(tmp.path()), &ws, &[input], &policy).await.unwrap_err();
            assert!(err.to_string().contains("symbolic link"), "{to}: {err}");
        }
        for to in ["../outside/x", "/tmp/x"] {
            let input =
                InputSpec { source: InputSource::Url(format!("http://127.0.0.1:{port}/")), to: to.into() };
            let err = place_inputs(&link(tmp.path()), &ws, &[input], &policy).await.unwrap_err();
            assert!(err.to_string().contains("not a path inside the workspace"), "{to}: {err}");
        }
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    }
}
