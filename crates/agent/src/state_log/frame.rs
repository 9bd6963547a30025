//! The records of the state log and how each is framed on disk.
//!
//! A frame is `[payload length: u32 LE][CRC-32C of the payload: u32 LE][payload]`, and a
//! payload is a one-byte tag followed by the record's body. A frame cut short by a crash, or
//! whose checksum does not match, ends the readable log: everything before it is kept.

use drover_proto as pb;
use prost::Message;

use crate::journal::Entry;
use crate::reach::{self, OutputReach};

/// Bytes before a frame's payload.
pub const HEADER: usize = 8;

/// Largest payload a frame may carry: far above any report (a report is at most a few MiB)
/// or journal entry, so that a corrupt length is recognised as one instead of read as data.
pub const MAX_PAYLOAD: usize = 256 << 20;

// Sixteen tables: every byte of output goes through this, at several GB/s instead of a few
// hundred MB/s with one table.
const CRC: crc::Crc<u32, crc::Table<16>> = crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISCSI);

const TAG_STEP: u8 = 1;
const TAG_FORGET: u8 = 2;
const TAG_REPORT: u8 = 3;
const TAG_ACKED: u8 = 4;
/// A report of output with the reach of its step's streams, as agents wrote it before the
/// reach said how much went out within the log limit (read, never written).
const TAG_REPORT_REACH_BEFORE_KEPT: u8 = 5;
const TAG_REACH_BEFORE_KEPT: u8 = 6;
/// A report of output with the reach of its step's streams (see [`crate::reach`]).
const TAG_REPORT_REACH: u8 = 7;
const TAG_REACH: u8 = 8;

/// An attempt and how far its output reaches (see [`crate::reach`]).
pub type AttemptReach = (i64, OutputReach);

/// One record of the log.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// An attempt's step started (or a later step of it did): the journal entry that lets a
    /// restarted agent find it. Secret values are already cleared.
    Step(Box<Entry>),
    /// The attempt ended: its journal entry is no longer needed.
    Forget(i64),
    /// A report queued for the server, not yet acknowledged.
    Report(LoggedReport),
    /// The server acknowledged every report up to and including this sequence number.
    Acked(u64),
    /// How far an attempt's output reached when the reports that said so were dropped from
    /// the log as acknowledged (see [`crate::reach`]).
    Reach(i64, OutputReach),
}

/// What the log's writer and its rewrite need to know of a record: which attempt or report it
/// is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// [`Record::Step`] of an attempt.
    Step(i64),
    /// [`Record::Forget`] of an attempt.
    Forget(i64),
    /// [`Record::Report`] with its sequence number.
    Report(u64),
    /// [`Record::Acked`] up to a sequence number.
    Acked(u64),
    /// [`Record::Reach`] of an attempt.
    Reach(i64),
}

/// A report as the outbox queued it.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedReport {
    /// The outbox's sequence number; increasing across agent runs.
    pub seq: u64,
    /// The attempt it is about.
    pub attempt_id: i64,
    /// The size the outbox counts it as (for its limits on pending bytes and message size).
    pub bytes: u64,
    /// The report, without sequence number or epoch (both are stamped when it is sent).
    pub report: pb::Report,
    /// For output of a step whose files a restarted agent reads on: how far the output of
    /// this report and those before it reaches.
    pub reach: Option<OutputReach>,
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FrameError {
    /// The bytes end inside a frame (a write cut short by a crash).
    #[error("the log ends inside a frame")]
    Truncated,
    /// The length field is beyond any frame's size.
    #[error("a frame claims {0} bytes")]
    Oversized(usize),
    /// The payload does not match its checksum.
    #[error("a frame's checksum does not match")]
    Checksum,
    /// The payload passed its checksum but is not a record this agent knows.
    #[error("a frame holds no readable record: {0}")]
    Unreadable(String),
}

impl Record {
    /// What the record is about.
    pub fn key(&self) -> Key {
        match self {
            Record::Step(e) => Key::Step(e.spec.attempt_id),
            Record::Forget(id) => Key::Forget(*id),
            Record::Report(r) => Key::Report(r.seq),
            Record::Acked(seq) => Key::Acked(*seq),
            Record::Reach(id, _) => Key::Reach(*id),
        }
    }

    /// The output reach the record carries, and whose it is.
    pub fn reach(&self) -> Option<AttemptReach> {
        match self {
            Record::Report(r) => r.reach.map(|reach| (r.attempt_id, reach)),
            Record::Reach(id, reach) => Some((*id, *reach)),
            Record::Step(_) | Record::Forget(_) | Record::Acked(_) => None,
        }
    }

    /// Whether the record is worth syncing to disk soon: journal entries, and reports of an
    /// attempt's start, end or outputs. Output and acknowledgements ride along with those
    /// (their loss in a crash of the whole machine only repeats or drops what died with it).
    pub fn wants_sync(&self) -> bool {
        match self {
            Record::Step(_) => true,
            Record::Report(r) => matches!(r.report.kind, Some(pb::report::Kind::Update(_))),
            Record::Forget(_) | Record::Acked(_) | Record::Reach(..) => false,
        }
    }

    /// The record as one frame.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let mut out = vec![0u8; HEADER];
        match self {
            Record::Step(entry) => {
                out.push(TAG_STEP);
                serde_json::to_writer(&mut out, entry.as_ref())
                    .map_err(|e| FrameError::Unreadable(e.to_string()))?;
            }
            Record::Forget(attempt_id) => {
                out.push(TAG_FORGET);
                out.extend_from_slice(&attempt_id.to_le_bytes());
            }
            Record::Report(r) => {
                out.push(if r.reach.is_some() { TAG_REPORT_REACH } else { TAG_REPORT });
                out.extend_from_slice(&r.seq.to_le_bytes());
                out.extend_from_slice(&r.attempt_id.to_le_bytes());
                out.extend_from_slice(&r.bytes.to_le_bytes());
                if let Some(reach) = &r.reach {
                    reach.encode(&mut out);
                }
                out.reserve(r.report.encoded_len());
                r.report.encode(&mut out).map_err(|e| FrameError::Unreadable(e.to_string()))?;
            }
            Record::Acked(seq) => {
                out.push(TAG_ACKED);
                out.extend_from_slice(&seq.to_le_bytes());
            }
            Record::Reach(attempt_id, reach) => {
                out.push(TAG_REACH);
                out.extend_from_slice(&attempt_id.to_le_bytes());
                reach.encode(&mut out);
            }
        }
        let len = out.len() - HEADER;
        if len > MAX_PAYLOAD {
            return Err(FrameError::Oversized(len));
        }
        let crc = CRC.checksum(&out[HEADER..]);
        out[..4].copy_from_slice(&(len as u32).to_le_bytes());
        out[4..HEADER].copy_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Decodes a checked payload.
    fn decode(payload: &[u8]) -> Result<Record, FrameError> {
        let bad = |what: &str| FrameError::Unreadable(what.to_string());
        let (&tag, body) = payload.split_first().ok_or_else(|| bad("empty payload"))?;
        let word = |at: usize| -> Result<[u8; 8], FrameError> {
            body.get(at..at + 8).and_then(|b| b.try_into().ok()).ok_or_else(|| bad("short body"))
        };
        match tag {
            TAG_STEP => serde_json::from_slice(body)
                .map(|e| Record::Step(Box::new(e)))
                .map_err(|e| FrameError::Unreadable(format!("journal entry: {e}"))),
            TAG_FORGET => Ok(Record::Forget(i64::from_le_bytes(word(0)?))),
            TAG_REPORT | TAG_REPORT_REACH | TAG_REPORT_REACH_BEFORE_KEPT => {
                let (reach, at) = match reach_layout(tag) {
                    Some((with_kept, len)) => {
                        let reach = body
                            .get(24..)
                            .and_then(|b| OutputReach::decode(b, with_kept))
                            .ok_or_else(|| bad("short reach"))?;
                        (Some(reach), 24 + len)
                    }
                    None => (None, 24),
                };
                let report = pb::Report::decode(body.get(at..).unwrap_or_default())
                    .map_err(|e| FrameError::Unreadable(format!("report: {e}")))?;
                Ok(Record::Report(LoggedReport {
                    seq: u64::from_le_bytes(word(0)?),
                    attempt_id: i64::from_le_bytes(word(8)?),
                    bytes: u64::from_le_bytes(word(16)?),
                    report,
                    reach,
                }))
            }
            TAG_ACKED => Ok(Record::Acked(u64::from_le_bytes(word(0)?))),
            TAG_REACH | TAG_REACH_BEFORE_KEPT => {
                let with_kept = tag == TAG_REACH;
                let reach = body
                    .get(8..)
                    .and_then(|b| OutputReach::decode(b, with_kept))
                    .ok_or_else(|| bad("short reach"))?;
                Ok(Record::Reach(i64::from_le_bytes(word(0)?), reach))
            }
            other => Err(FrameError::Unreadable(format!("unknown tag {other}"))),
        }
    }
}

/// For a report's tag: whether its reach says what was kept within the log limit, and the
/// reach's length; `None` for a report without a reach.
fn reach_layout(tag: u8) -> Option<(bool, usize)> {
    match tag {
        TAG_REPORT_REACH => Some((true, reach::ENCODED)),
        TAG_REPORT_REACH_BEFORE_KEPT => Some((false, reach::ENCODED_BEFORE_KEPT)),
        _ => None,
    }
}

/// Reads the frame at the start of `bytes`: its record and its whole length (header included).
pub fn read(bytes: &[u8]) -> Result<(Record, usize), FrameError> {
    let (len, crc) = header(bytes)?;
    let payload = bytes.get(HEADER..HEADER + len).ok_or(FrameError::Truncated)?;
    if CRC.checksum(payload) != crc {
        return Err(FrameError::Checksum);
    }
    Ok((Record::decode(payload)?, HEADER + len))
}

/// Checks the frame at the start of `bytes` and reads only what it is about (and the output
/// reach it carries), without decoding a report's contents; returns that and the frame's
/// whole length.
pub fn read_key(bytes: &[u8]) -> Result<(Key, Option<AttemptReach>, usize), FrameError> {
    let (len, crc) = header(bytes)?;
    let payload = bytes.get(HEADER..HEADER + len).ok_or(FrameError::Truncated)?;
    if CRC.checksum(payload) != crc {
        return Err(FrameError::Checksum);
    }
    let word = |at: usize| -> Result<[u8; 8], FrameError> {
        payload
            .get(1 + at..1 + at + 8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| FrameError::Unreadable("short body".into()))
    };
    let (key, reach) = match payload.first() {
        Some(&TAG_FORGET) => (Key::Forget(i64::from_le_bytes(word(0)?)), None),
        Some(&TAG_REPORT) => (Key::Report(u64::from_le_bytes(word(0)?)), None),
        Some(&tag @ (TAG_REPORT_REACH | TAG_REPORT_REACH_BEFORE_KEPT)) => {
            let attempt_id = i64::from_le_bytes(word(8)?);
            let reach = payload.get(25..).and_then(|b| OutputReach::decode(b, tag == TAG_REPORT_REACH));
            (Key::Report(u64::from_le_bytes(word(0)?)), reach.map(|r| (attempt_id, r)))
        }
        Some(&TAG_ACKED) => (Key::Acked(u64::from_le_bytes(word(0)?)), None),
        _ => {
            let record = Record::decode(payload)?;
            (record.key(), record.reach())
        }
    };
    Ok((key, reach, HEADER + len))
}

/// The payload length and checksum of the frame at the start of `bytes`.
pub fn header(bytes: &[u8]) -> Result<(usize, u32), FrameError> {
    let head: [u8; HEADER] =
        bytes.get(..HEADER).and_then(|h| h.try_into().ok()).ok_or(FrameError::Truncated)?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(FrameError::Oversized(len));
    }
    Ok((len, u32::from_le_bytes([head[4], head[5], head[6], head[7]])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::TaskSpec;

    fn report(seq: u64) -> Record {
        Record::Report(LoggedReport {
            seq,
            attempt_id: 7,
            bytes: 99,
            report: pb::Report {
                kind: Some(pb::report::Kind::Output(pb::AttemptOutput {
                    attempt_id: 7,
                    chunks: vec![pb::OutputChunk {
                        step: 0,
                        stderr: false,
                        data: b"hello\n".to_vec(),
                        lens: vec![6],
                    }],
                    ..Default::default()
                })),
            },
            reach: None,
        })
    }

    #[test]
    fn every_record_reads_back_as_written() {
        let entry = Entry {
            runtime: "process".into(),
            spec: TaskSpec { attempt_id: 3, ..Default::default() },
            handle: None,
            timeout_ms: Some(5),
            metered: true,
            ai: None,
            outputs: Some(crate::journal::KeptOutputs { globs: vec!["out/*".into()], on_failure: true }),
            limits: Some(crate::journal::AttemptLimits { max_log: 4096, max_outputs: 1 << 20 }),
        };
        let reach = OutputReach {
            step: 2,
            stdout: crate::reach::StreamReach { clean: 100, past_clean: 3 },
            stderr: crate::reach::StreamReach { clean: 9, past_clean: 0 },
            kept: crate::log_cap::Kept { bytes: 4096, full: true },
        };
        let mut reaching = report(13);
        if let Record::Report(r) = &mut reaching {
            r.reach = Some(reach);
        }
        for record in [
            Record::Step(Box::new(entry)),
            Record::Forget(-4),
            report(12),
            Record::Acked(11),
            reaching,
            Record::Reach(7, reach),
        ] {
            let frame = record.encode().unwrap();
            assert_eq!(read(&frame).unwrap(), (record.clone(), frame.len()));
            // What a rewrite reads without decoding reports agrees.
            assert_eq!(read_key(&frame).unwrap(), (record.key(), record.reach(), frame.len()));
        }
    }

    /// Frames an agent wrote before reaches said what was kept within the log limit are read
    /// with nothing known kept.
    #[test]
    fn an_older_agents_reach_frames_are_read() {
        let reach = OutputReach {
            step: 1,
            stdout: crate::reach::StreamReach { clean: 50, past_clean: 2 },
            stderr: crate::reach::StreamReach::default(),
            kept: crate::log_cap::Kept { bytes: 7, full: true },
        };
        let older = OutputReach { kept: Default::default(), ..reach };
        let mut reaching = report(3);
        if let Record::Report(r) = &mut reaching {
            r.reach = Some(reach);
        }
        for (record, tag, reach_at) in [
            (reaching, TAG_REPORT_REACH_BEFORE_KEPT, 25),
            (Record::Reach(4, reach), TAG_REACH_BEFORE_KEPT, 9),
        ] {
            // The same frame as the older agent wrote it: its tag, and no word for what was kept.
            let new = record.encode().unwrap();
            let mut payload = new[HEADER..].to_vec();
            payload[0] = tag;
            let kept_at = reach_at + reach::ENCODED_BEFORE_KEPT;
            payload.drain(kept_at..kept_at + 8);
            let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
            frame.extend_from_slice(&CRC.checksum(&payload).to_le_bytes());
            frame.extend_from_slice(&payload);
            let (got, len) = read(&frame).unwrap();
            assert_eq!(len, frame.len());
            assert_eq!(got.reach().map(|(_, r)| r), Some(older), "{got:?}");
            let (_, key_reach, _) = read_key(&frame).unwrap();
            assert_eq!(key_reach.map(|(_, r)| r), Some(older));
            if let (Record::Report(g), Record::Report(w)) = (&got, &record) {
                assert_eq!(g.report, w.report, "the report after the shorter reach is read whole");
            }
        }
    }

    #[test]
    fn a_cut_or_damaged_frame_is_recognised() {
        let frame = report(1).encode().unwrap();
        for cut in [0, 3, HEADER, frame.len() - 1] {
            assert_eq!(read(&frame[..cut]).unwrap_err(), FrameError::Truncated, "cut at {cut}");
        }
        let mut flipped = frame.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(read(&flipped).unwrap_err(), FrameError::Checksum);
        let mut huge = frame;
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(read(&huge).unwrap_err(), FrameError::Oversized(_)));
    }

    #[test]
    fn a_checked_frame_of_an_unknown_kind_is_unreadable_not_a_panic() {
        let payload = [9u8, 1, 2];
        let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&CRC.checksum(&payload).to_le_bytes());
        frame.extend_from_slice(&payload);
        assert!(matches!(read(&frame).unwrap_err(), FrameError::Unreadable(_)));
        for short in [&[TAG_FORGET, 1][..], &[TAG_REPORT, 0, 0][..], &[TAG_REACH, 0, 0][..], &[][..]] {
            let mut frame = (short.len() as u32).to_le_bytes().to_vec();
            frame.extend_from_slice(&CRC.checksum(short).to_le_bytes());
            frame.extend_from_slice(short);
            assert!(matches!(read(&frame).unwrap_err(), FrameError::Unreadable(_)), "{short:?}");
        }
    }
}
