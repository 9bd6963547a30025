//! Reading a step's output file while the step still writes it, as an [`AsyncRead`] that the
//! line splitter consumes like a pipe: data as it arrives, end of file once the step has ended
//! and everything it wrote was read.

use std::future::Future;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::sync::CancellationToken;

/// Shortest and longest pause between reads that found nothing new; the pause doubles while
/// the file stays quiet, so an idle step costs little and a chatty one is read at once.
const FIRST_PAUSE: Duration = Duration::from_millis(2);
const LONGEST_PAUSE: Duration = Duration::from_millis(20);

/// Tells a [`Tail`] that its step ended (no more data will come). Level-triggered: every
/// reader of the step (standard output and standard error) sees it, whenever it looks.
#[derive(Debug, Clone, Default)]
pub(crate) struct Ended {
    token: CancellationToken,
}

impl Ended {
    /// Marks the step as ended and wakes its readers.
    pub fn set(&self) {
        self.token.cancel();
    }

    fn is_set(&self) -> bool {
        self.token.is_cancelled()
    }
}

/// A growing file read from `offset` on.
pub(crate) struct Tail {
    file: std::fs::File,
    ended: Ended,
    pause: Duration,
    waiting: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// Set once a read after the end found nothing: the file is complete.
    drained: bool,
    /// Where the file ended when the step ended: what a background process left behind still
    /// writes after that is not the step's output, and must not keep the reader going.
    end: Option<u64>,
}

impl Tail {
    /// Opens `path` for reading from `offset`.
    pub fn open(path: &Path, offset: u64, ended: Ended) -> io::Result<Tail> {
        let mut file = std::fs::File::open(path)?;
        file.seek(SeekFrom::Start(offset))?;
        Ok(Tail { file, ended, pause: FIRST_PAUSE, waiting: None, drained: false, end: None })
    }
}

impl AsyncRead for Tail {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.drained {
                return Poll::Ready(Ok(()));
            }
            if let Some(waiting) = &mut this.waiting {
                match waiting.as_mut().poll(cx) {
                    Poll::Ready(()) => this.waiting = None,
                    Poll::Pending => return Poll::Pending,
                }
            }
            // Read the flag before reading the file: data written before the step ended is in
            // the file by then, so an empty read after it means the file is complete.
            let ended = this.ended.is_set();
            if ended && this.end.is_none() {
                this.end = Some(this.file.metadata()?.len());
            }
            let position = this.file.stream_position()?;
            let room = match this.end {
                Some(end) if position >= end => {
                    this.drained = true;
                    continue;
                }
                Some(end) => usize::try_from(end - position).unwrap_or(usize::MAX).min(buf.remaining()),
                None => buf.remaining(),
            };
            // A read of a regular file from the page cache does not block for long.
            match this.file.read(&mut buf.initialize_unfilled()[..room]) {
                Ok(0) if ended => this.drained = true,
                Ok(0) => {
                    let (pause, ended) = (this.pause, this.ended.token.clone());
                    this.pause = (this.pause * 2).min(LONGEST_PAUSE);
                    this.waiting = Some(Box::pin(async move {
                        tokio::select! {
                            () = tokio::time::sleep(pause) => {}
                            () = ended.cancelled() => {}
                        }
                    }));
                }
                Ok(n) => {
                    buf.advance(n);
                    this.pause = FIRST_PAUSE;
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use tokio::io::AsyncReadExt;

    use super::*;

    #[tokio::test]
    async fn reads_what_arrives_and_ends_once_the_writer_ended() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out");
        let mut writer = std::fs::File::create(&path).expect("create");
        writer.write_all(b"skip:").expect("write");
        let ended = Ended::default();
        let mut tail = Tail::open(&path, 5, ended.clone()).expect("open");
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            tail.read_to_end(&mut all).await.map(|_| all)
        });
        for part in [&b"one\n"[..], b"two\n", b"three"] {
            tokio::time::sleep(Duration::from_millis(20)).await;
            writer.write_all(part).expect("write");
        }
        ended.set();
        let all = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("ends")
            .expect("task")
            .expect("read");
        assert_eq!(all, b"one\ntwo\nthree");
    }

    #[tokio::test(start_paused = true)]
    async fn every_reader_of_a_step_ends_at_once_when_it_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ended = Ended::default();
        let mut readers = Vec::new();
        for name in ["out", "err"] {
            let path = dir.path().join(name);
            std::fs::write(&path, b"").expect("create");
            let mut tail = Tail::open(&path, 0, ended.clone()).expect("open");
            readers.push(tokio::spawn(async move {
                let mut all = Vec::new();
                tail.read_to_end(&mut all).await.map(|_| all)
            }));
        }
        // Both readers are deep in their pauses when the step ends...
        tokio::time::sleep(Duration::from_millis(25)).await;
        let set_at = tokio::time::Instant::now();
        ended.set();
        for reader in readers {
            reader.await.expect("task").expect("read");
        }
        // ...and neither sleeps its pause out: the clock (paused) did not move.
        assert_eq!(tokio::time::Instant::now(), set_at);
    }
}
