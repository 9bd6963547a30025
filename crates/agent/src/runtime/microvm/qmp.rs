//! A minimal client of QEMU's control socket (QMP): one command at a time, events skipped.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// How long one command may take.
const PATIENCE: Duration = Duration::from_secs(5);

/// A negotiated QMP connection.
pub(crate) struct Qmp {
    lines: Lines<BufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
}

fn timed_out(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, format!("qmp {what}"))
}

impl Qmp {
    /// Connects and leaves capabilities negotiation mode.
    pub(crate) async fn connect(socket: &Path) -> std::io::Result<Qmp> {
        let stream = tokio::time::timeout(Duration::from_secs(1), UnixStream::connect(socket))
            .await
            .map_err(|_| timed_out("connect"))??;
        let (read, write) = stream.into_split();
        let mut qmp = Qmp { lines: BufReader::new(read).lines(), write };
        tokio::time::timeout(PATIENCE, qmp.lines.next_line()).await.map_err(|_| timed_out("greeting"))??;
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs a command; returns its `return` value, or its `error` as an I/O error.
    pub(crate) async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> std::io::Result<Value> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.write.write_all(line.as_bytes()).await?;
        let answer = async {
            loop {
                let Some(line) = self.lines.next_line().await? else {
                    return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "qmp closed"));
                };
                let Ok(message) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if let Some(value) = message.get("return") {
                    return Ok(value.clone());
                }
                if let Some(error) = message.get("error") {
                    return Err(std::io::Error::other(format!("qmp {command}: {error}")));
                }
            }
        };
        tokio::time::timeout(PATIENCE, answer).await.map_err(|_| timed_out(command))?
    }

    /// Waits until the migration in progress (outgoing or incoming) completes.
    pub(crate) async fn await_migration(&mut self, patience: Duration) -> std::io::Result<()> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let state = self.execute("query-migrate", None).await?;
            match state.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some("failed" | "cancelled") => {
                    let reason = state.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given");
                    return Err(std::io::Error::other(format!("migration failed: {reason}")));
                }
                _ if tokio::time::Instant::now() > deadline => return Err(timed_out("migration")),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

/// Asks QEMU to quit.
pub(crate) async fn quit(socket: &Path) -> std::io::Result<()> {
    let mut qmp = Qmp::connect(socket).await?;
    qmp.execute("quit", None).await.map(|_| ())
}

/// `path` quoted for the shell that runs QEMU's `exec:` migration commands.
pub(crate) fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}
