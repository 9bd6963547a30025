//! Writing log batches out with few system calls: a batch's lines are gathered into one buffer
//! per run of the same stream, and each buffer goes out in one write. A run of lines that all
//! end in a newline and need no task prefix is copied as it came, without looking at each line.

use std::io::{self, Write};

use drover_proto as pb;

/// Writes the lines of log batches to `out` (stdout lines) and `err` (stderr lines).
pub(crate) struct LogWriter<O: Write, E: Write> {
    out: O,
    err: E,
    /// Put `task | ` (or `task[frame] | `) before each line.
    prefix: bool,
    /// Lines not written yet, all of one stream.
    buf: Vec<u8>,
    /// Whether `buf` holds stderr lines.
    buf_stderr: bool,
}

impl<O: Write, E: Write> LogWriter<O, E> {
    /// A writer to `out` and `err`, prefixing each line with its task when `prefix`.
    pub(crate) fn new(out: O, err: E, prefix: bool) -> Self {
        LogWriter { out, err, prefix, buf: Vec::new(), buf_stderr: false }
    }

    /// Writes every line of `batch`, in order, and flushes, so a follower sees each batch as
    /// it arrives.
    pub(crate) fn batch(&mut self, batch: &pb::LogBatch) -> io::Result<()> {
        for line in &batch.lines {
            self.switch(line.stream == "stderr")?;
            let name = self.prefix.then(|| task_name(&line.task_name, line.frame));
            self.push_line(name.as_deref(), &line.data);
        }
        for chunk in &batch.chunks {
            self.switch(chunk.stderr)?;
            self.push_chunk(chunk);
        }
        self.flush()
    }

    fn push_chunk(&mut self, chunk: &pb::LogChunk) {
        if !self.prefix && every_line_ends(chunk) {
            self.buf.extend_from_slice(&chunk.data);
            return;
        }
        let name = self.prefix.then(|| task_name(&chunk.task_name, chunk.frame));
        let mut at = 0usize;
        for &len in &chunk.lens {
            // The server checked the lengths; a chunk that lies about them ends early.
            let Some(line) = at.checked_add(len as usize).and_then(|end| chunk.data.get(at..end)) else {
                break;
            };
            at += line.len();
            self.push_line(name.as_deref(), line);
        }
    }

    fn push_line(&mut self, name: Option<&str>, line: &[u8]) {
        if let Some(name) = name {
            self.buf.extend_from_slice(name.as_bytes());
            self.buf.extend_from_slice(b" | ");
        }
        self.buf.extend_from_slice(line);
        if !line.ends_with(b"\n") {
            self.buf.push(b'\n');
        }
    }

    /// Writes what waits when the next lines are of the other stream.
    fn switch(&mut self, stderr: bool) -> io::Result<()> {
        if stderr != self.buf_stderr {
            self.write_buf()?;
            self.buf_stderr = stderr;
        }
        Ok(())
    }

    fn write_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let w: &mut dyn Write = if self.buf_stderr { &mut self.err } else { &mut self.out };
        w.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    /// Writes and flushes everything that waits.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        self.write_buf()?;
        self.out.flush()?;
        self.err.flush()
    }
}

fn task_name(name: &str, frame: Option<i64>) -> String {
    match frame {
        Some(f) => format!("{name}[{f}]"),
        None => name.to_owned(),
    }
}

/// Whether every line of `chunk` ends in a newline, so its data can be written as it is.
fn every_line_ends(chunk: &pb::LogChunk) -> bool {
    let mut end = 0usize;
    for &len in &chunk.lens {
        if len == 0 {
            return false;
        }
        end += len as usize;
        if chunk.data.get(end - 1) != Some(&b'\n') {
            return false;
        }
    }
    end == chunk.data.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(stderr: bool, frame: Option<i64>, lines: &[&[u8]]) -> pb::LogChunk {
        pb::LogChunk {
            first_id: 1,
            task_name: "t".into(),
            frame,
            stderr,
            lens: lines.iter().map(|l| l.len() as u32).collect(),
            data: lines.concat(),
            ..Default::default()
        }
    }

    /// A writer that counts its writes.
    #[derive(Default)]
    struct Counted {
        bytes: Vec<u8>,
        writes: usize,
    }

    impl Write for Counted {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.writes += 1;
            self.bytes.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn written(prefix: bool, batch: &pb::LogBatch) -> (String, String, usize) {
        let mut w = LogWriter::new(Counted::default(), Counted::default(), prefix);
        w.batch(batch).unwrap();
        let text = |c: &Counted| String::from_utf8_lossy(&c.bytes).into_owned();
        (text(&w.out), text(&w.err), w.out.writes + w.err.writes)
    }

    #[test]
    fn chunks_go_out_in_one_write_per_run_of_a_stream() {
        let batch = pb::LogBatch {
            lines: Vec::new(),
            chunks: vec![
                chunk(false, None, &[b"a\n", b"b\n"]),
                chunk(false, Some(3), &[b"c\n"]),
                chunk(true, None, &[b"oops\n", b"no newline"]),
                chunk(false, None, &[b"", b"d\n"]),
            ],
        };
        let (out, err, writes) = written(false, &batch);
        assert_eq!(out, "a\nb\nc\n\nd\n");
        assert_eq!(err, "oops\nno newline\n");
        assert_eq!(writes, 3);
        let (out, err, _) = written(true, &batch);
        assert_eq!(out, "t | a\nt | b\nt[3] | c\nt | \nt | d\n");
        assert_eq!(err, "t | oops\nt | no newline\n");
    }

    #[test]
    fn lines_of_older_servers_and_lying_chunks_are_written_as_far_as_they_go() {
        let line = pb::LogLine {
            task_name: "t".into(),
            stream: "stdout".into(),
            data: b"x".to_vec(),
            ..Default::default()
        };
        let lying = pb::LogChunk { lens: vec![2, 50], ..chunk(false, None, &[b"ok\n"]) };
        let batch = pb::LogBatch { lines: vec![line], chunks: vec![lying] };
        assert_eq!(written(false, &batch).0, "x\nok\n");
    }
}
