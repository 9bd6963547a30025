//! Rewriting the log with only its live records: on open (also reading them back for the
//! agent) and when it has grown mostly dead.
//!
//! Two passes over the old file: the first checks every frame and finds which are live (each
//! unfinished attempt's latest journal entry, every unacknowledged report), the second copies
//! those into a new file, which is synced and then renamed over the old one. A crash at any
//! point leaves the old file or the new one, both whole.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::frame::{self, Key, Record};
use super::live::{Live, Span};
use super::{FILE_MODE, Recovered, StateLogError};
use crate::reach::OutputReach;

/// Where a frame is in the old file, and what it is about.
struct Found {
    offset: u64,
    len: usize,
    key: Key,
    /// The output reach the frame carries, and whose it is.
    reach: Option<(i64, OutputReach)>,
}

/// Every whole frame of `file` in order, and why reading stopped before its end, if it did.
fn scan(file: &File) -> Result<(Vec<Found>, Option<String>), StateLogError> {
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut found = Vec::new();
    let mut offset = 0u64;
    let mut buf = vec![0; frame::HEADER];
    loop {
        buf.truncate(frame::HEADER);
        match read_full(&mut reader, &mut buf) {
            Ok(0) => return Ok((found, None)),
            Ok(n) if n < frame::HEADER => return Ok((found, Some(frame::FrameError::Truncated.to_string()))),
            Ok(_) => {}
            Err(e) => return Err(StateLogError::io("read", e)),
        }
        let len = match frame::header(&buf) {
            Ok((len, _)) => len,
            Err(e) => return Ok((found, Some(e.to_string()))),
        };
        buf.resize(frame::HEADER + len, 0);
        match read_full(&mut reader, &mut buf[frame::HEADER..]) {
            Ok(n) if n < len => return Ok((found, Some(frame::FrameError::Truncated.to_string()))),
            Ok(_) => {}
            Err(e) => return Err(StateLogError::io("read", e)),
        }
        match frame::read_key(&buf) {
            Ok((key, reach, size)) => {
                found.push(Found { offset, len: size, key, reach });
                offset += size as u64;
            }
            Err(e) => return Ok((found, Some(e.to_string()))),
        }
    }
}

/// Reads until `buf` is full or the file ends; how many bytes were read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The old file, its frames, which of them are live (in file order), and the sequence
/// numbers they carry.
struct Scanned {
    old: Option<File>,
    found: Vec<Found>,
    keep: Vec<usize>,
    /// The latest output reach of each attempt whose entry is live, by attempt.
    reach: Vec<(i64, OutputReach)>,
    acked: u64,
    last_seq: u64,
    damaged_tail: Option<String>,
}

fn scan_live(path: &Path) -> Result<Scanned, StateLogError> {
    let old = match File::open(path) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(StateLogError::io(format!("open {}", path.display()), e)),
    };
    let (found, damaged_tail) = match &old {
        Some(f) => scan(f)?,
        None => (Vec::new(), None),
    };
    // Which frames are live: each attempt's latest entry unless it was forgotten, and every
    // report after the last acknowledgement.
    let mut steps: HashMap<i64, usize> = HashMap::new();
    let mut reports = Vec::new();
    let (mut acked, mut last_seq) = (0u64, 0u64);
    let mut reach: HashMap<i64, OutputReach> = HashMap::new();
    for (i, f) in found.iter().enumerate() {
        if let Some((attempt_id, r)) = f.reach {
            reach.insert(attempt_id, r);
        }
        match f.key {
            Key::Step(id) => {
                steps.insert(id, i);
            }
            Key::Forget(id) => {
                steps.remove(&id);
            }
            Key::Report(seq) => {
                reports.push((seq, i));
                last_seq = last_seq.max(seq);
            }
            Key::Acked(seq) => acked = acked.max(seq),
            Key::Reach(_) => {}
        }
    }
    let mut reach: Vec<(i64, OutputReach)> =
        reach.into_iter().filter(|(id, _)| steps.contains_key(id)).collect();
    reach.sort_by_key(|(id, _)| *id);
    let mut keep: Vec<usize> = steps.into_values().collect();
    keep.extend(reports.iter().filter(|(seq, _)| *seq > acked).map(|(_, i)| *i));
    keep.sort_unstable();
    Ok(Scanned { old, found, keep, reach, acked, last_seq: last_seq.max(acked), damaged_tail })
}

/// Reads frame `f` of `old` into `buf`.
fn read_frame(old: Option<&File>, f: &Found, buf: &mut Vec<u8>) -> Result<(), StateLogError> {
    buf.resize(f.len, 0);
    match old {
        Some(old) => old.read_exact_at(buf, f.offset).map_err(|e| StateLogError::io("read", e)),
        None => Ok(()),
    }
}

/// Adds a live record to what a reader gets back.
fn recover_into(recovered: &mut Recovered, frame: &[u8]) -> Result<(), StateLogError> {
    match frame::read(frame)?.0 {
        Record::Step(entry) => recovered.entries.push(*entry),
        Record::Report(report) => recovered.reports.push(report),
        Record::Forget(_) | Record::Acked(_) | Record::Reach(..) => {}
    }
    Ok(())
}

/// What the log at `path` holds, read without changing it (while an agent may be appending
/// to it: a frame it is writing reads as a damaged tail).
pub(crate) fn peek(path: &Path) -> Result<Recovered, StateLogError> {
    let scanned = scan_live(path)?;
    let mut recovered = Recovered {
        last_seq: scanned.last_seq,
        damaged_tail: scanned.damaged_tail,
        reach: scanned.reach.iter().copied().collect(),
        ..Recovered::default()
    };
    let mut buf = Vec::new();
    for &i in &scanned.keep {
        read_frame(scanned.old.as_ref(), &scanned.found[i], &mut buf)?;
        recover_into(&mut recovered, &buf)?;
    }
    recovered.reports.sort_by_key(|r| r.seq);
    Ok(recovered)
}

/// Rewrites the log at `path` with its live records, read back for the agent; returns them,
/// what the new file holds, and the new file open for appending.
pub(crate) fn rewrite(path: &Path) -> Result<(Recovered, Live, File), StateLogError> {
    let Scanned { old, found, keep, reach, acked, last_seq, damaged_tail } = scan_live(path)?;
    if let Some(why) = &damaged_tail {
        tracing::warn!(path = %path.display(), kept = found.len(), error = %why, "the state log ends in a damaged frame; it is cut off there");
    }
    let mut recovered =
        Recovered { last_seq, damaged_tail, reach: reach.iter().copied().collect(), ..Recovered::default() };
    let frames: Vec<(Key, Span)> = keep
        .iter()
        .map(|&i| (found[i].key, Span { offset: found[i].offset, len: found[i].len as u64 }))
        .collect();
    let (live, file) = copy_live(old.as_ref(), &frames, &reach, acked, path, Some(&mut recovered))?;
    recovered.reports.sort_by_key(|r| r.seq);
    Ok((recovered, live, file))
}

/// Writes `frames` of `old` (live, in file order; none without an old file) after an
/// acknowledgement up to `acked`, then a `Reach` record for each of `reach`, into a new file
/// that then replaces the log at `path`; with `recovered`, also decodes the frames into it. Returns what the new file holds, and the new file
/// open for appending (opened before it replaces the old one, so that appends never go to a
/// file that was replaced).
pub(crate) fn copy_live(
    old: Option<&File>,
    frames: &[(Key, Span)],
    reach: &[(i64, OutputReach)],
    acked: u64,
    path: &Path,
    mut recovered: Option<&mut Recovered>,
) -> Result<(Live, File), StateLogError> {
    let new_path = path.with_extension("new");
    let mut new = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(&new_path)
        .map_err(|e| StateLogError::io(format!("create {}", new_path.display()), e))?;
    let write_err = |e| StateLogError::io(format!("write {}", new_path.display()), e);
    let mut live = Live::default();
    // The sequence goes on even when every report was acknowledged (and so none is kept).
    let head = Record::Acked(acked).encode()?;
    new.write_all(&head).map_err(write_err)?;
    let mut len = head.len() as u64;
    live.note(Key::Acked(acked), Span { offset: 0, len });
    let mut buf = Vec::new();
    for &(key, span) in frames {
        let Some(old) = old else { break };
        buf.resize(usize::try_from(span.len).unwrap_or(usize::MAX), 0);
        old.read_exact_at(&mut buf, span.offset).map_err(|e| StateLogError::io("read", e))?;
        new.write_all(&buf).map_err(write_err)?;
        live.note(key, Span { offset: len, len: span.len });
        len += span.len;
        if let Some(recovered) = recovered.as_deref_mut() {
            recover_into(recovered, &buf)?;
        }
    }
    // After the reports: a reach is the latest of its attempt, so a later rewrite finds it
    // last of all that attempt's.
    for &(attempt_id, r) in reach {
        let frame = Record::Reach(attempt_id, r).encode()?;
        new.write_all(&frame).map_err(write_err)?;
        let span = Span { offset: len, len: frame.len() as u64 };
        live.note(Key::Reach(attempt_id), span);
        live.note_reach(attempt_id, r);
        len += span.len;
    }
    new.sync_all().map_err(|e| StateLogError::io(format!("sync {}", new_path.display()), e))?;
    let appending = super::open_append(&new_path)?;
    std::fs::rename(&new_path, path)
        .map_err(|e| StateLogError::io(format!("replace {}", path.display()), e))?;
    // The rename is durable only once the directory is.
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| StateLogError::io(format!("sync {}", dir.display()), e))?;
    }
    Ok((live, appending))
}
