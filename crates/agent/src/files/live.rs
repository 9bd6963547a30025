//! Live reads: windows of a running task's files, for downloads while it runs. Only regular
//! files beneath the workspace are read; links are followed while they stay inside.

use std::path::Path;

use drover_proto as pb;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::LiveReadError;
use crate::beneath::{Dir, RelPath};

/// Bytes per live read message.
const LIVE_CHUNK: usize = 256 * 1024;

/// Opens a file of a running attempt's workspace for a live read, refusing anything that is
/// not a regular file inside the workspace (after following links). Returns it with its size.
pub async fn open_inside(workspace: &Path, rel: &str) -> Result<(tokio::fs::File, u64), LiveReadError> {
    let path = RelPath::new(rel)?;
    let root = Dir::open(workspace).map_err(|_| LiveReadError::NoWorkspace)?;
    let file = root.open_file(&path)?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    Ok((tokio::fs::File::from_std(file), size))
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
            emit(fail(e.to_string()));
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

#[cfg(test)]
mod tests {
    use super::*;

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
            ("missing.txt", "no `missing.txt`"),
        ] {
            let got = window(read(path, 0, 100)).await;
            assert_eq!(got.len(), 1, "{path}");
            assert!(got[0].error.contains(why) && got[0].data.is_empty(), "{path}: {}", got[0].error);
        }
    }
}
