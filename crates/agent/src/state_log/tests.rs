use std::os::unix::fs::PermissionsExt;

use drover_proto as pb;

use super::*;
use crate::runtime::TaskSpec;

fn entry(attempt_id: i64, step: usize) -> Entry {
    Entry {
        runtime: "process".into(),
        spec: TaskSpec { attempt_id, steps: vec![vec!["true".into()]; step + 1], ..Default::default() },
        handle: None,
        timeout_ms: None,
        metered: false,
        ai: None,
        outputs: None,
        limits: None,
    }
}

fn report(seq: u64, attempt_id: i64, data: Vec<u8>) -> Record {
    Record::Report(LoggedReport {
        seq,
        attempt_id,
        bytes: data.len() as u64,
        report: pb::Report {
            kind: Some(pb::report::Kind::Output(pb::AttemptOutput {
                attempt_id,
                chunks: vec![pb::OutputChunk { step: 0, stderr: false, lens: vec![data.len() as u32], data }],
                ..Default::default()
            })),
        },
        reach: None,
    })
}

fn reaching(seq: u64, attempt_id: i64, clean: u64) -> Record {
    let mut record = report(seq, attempt_id, b"x\n".to_vec());
    if let Record::Report(r) = &mut record {
        r.reach = Some(reach(clean));
    }
    record
}

fn reach(clean: u64) -> crate::reach::OutputReach {
    crate::reach::OutputReach {
        step: 0,
        stdout: crate::reach::StreamReach { clean, past_clean: 1 },
        stderr: crate::reach::StreamReach::default(),
        kept: crate::log_cap::Kept { bytes: clean, full: false },
    }
}

/// Appends reports of a MiB of `attempt_id`'s output until the log has seen twice the
/// compaction size, acknowledging all but the last `pending`; each reaches as far as its
/// sequence number when `reaching`. Returns the last sequence number.
async fn grow_past_compaction(log: &StateLog, attempt_id: i64, pending: u64, reaching: bool) -> u64 {
    let chunk = vec![b'x'; 1 << 20];
    let last = 2 * (COMPACT_AT >> 20);
    for seq in 1..=last {
        let mut record = report(seq, attempt_id, chunk.clone());
        if let Record::Report(r) = &mut record {
            r.reach = reaching.then(|| reach(seq));
        }
        log.append(record).await.unwrap();
        if seq + pending <= last {
            log.append(Record::Acked(seq)).await.unwrap();
        }
    }
    last
}

#[tokio::test]
async fn a_reopened_log_holds_what_was_not_finished_or_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    {
        let (log, recovered) = StateLog::open(&state).unwrap();
        assert!(recovered.entries.is_empty() && recovered.reports.is_empty());
        assert_eq!(recovered.last_seq, 0);
        log.append(Record::Step(Box::new(entry(1, 0)))).await.unwrap();
        log.append(Record::Step(Box::new(entry(2, 0)))).await.unwrap();
        // A later entry of the same attempt replaces the earlier one.
        log.append(Record::Step(Box::new(entry(1, 1)))).await.unwrap();
        for seq in 1..=4 {
            log.append(report(seq, 2, format!("line {seq}\n").into_bytes())).await.unwrap();
        }
        log.append_later(Record::Forget(2));
        log.append(Record::Acked(2)).await.unwrap();
    }
    let (log, recovered) = StateLog::open(&state).unwrap();
    assert_eq!(recovered.entries, vec![entry(1, 1)]);
    let seqs: Vec<u64> = recovered.reports.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![3, 4]);
    assert_eq!(
        recovered.reports[0],
        match report(3, 2, b"line 3\n".to_vec()) {
            Record::Report(r) => r,
            _ => unreachable!(),
        }
    );
    assert_eq!(recovered.last_seq, 4);
    assert!(recovered.damaged_tail.is_none());

    // Once everything is acknowledged and forgotten, the sequence still goes on.
    log.append(Record::Acked(4)).await.unwrap();
    log.append(Record::Forget(1)).await.unwrap();
    drop(log);
    let (_log, recovered) = StateLog::open(&state).unwrap();
    assert!(recovered.entries.is_empty() && recovered.reports.is_empty());
    assert_eq!(recovered.last_seq, 4);
}

#[tokio::test]
async fn a_write_cut_short_by_a_crash_loses_only_itself() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    {
        let (log, _) = StateLog::open(&state).unwrap();
        log.append(Record::Step(Box::new(entry(5, 0)))).await.unwrap();
        log.append(report(1, 5, b"kept\n".to_vec())).await.unwrap();
    }
    // Half of a further frame, as a crash in the middle of a write leaves it.
    let frame = report(2, 5, b"lost\n".to_vec()).encode().unwrap();
    let mut file = std::fs::OpenOptions::new().append(true).open(state.join(FILE_NAME)).unwrap();
    file.write_all(&frame[..frame.len() / 2]).unwrap();
    drop(file);

    let (log, recovered) = StateLog::open(&state).unwrap();
    assert_eq!(recovered.entries, vec![entry(5, 0)]);
    assert_eq!(recovered.reports.len(), 1);
    assert!(recovered.damaged_tail.is_some());
    // The rewrite cut the damage off: what is appended next reads back.
    log.append(report(2, 5, b"again\n".to_vec())).await.unwrap();
    drop(log);
    let (_log, recovered) = StateLog::open(&state).unwrap();
    assert_eq!(recovered.reports.len(), 2);
    assert!(recovered.damaged_tail.is_none());
}

#[tokio::test]
async fn a_log_of_mostly_acknowledged_reports_is_compacted_as_it_grows() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (log, _) = StateLog::open(&state).unwrap();
    log.append(Record::Step(Box::new(entry(9, 0)))).await.unwrap();
    let seq = grow_past_compaction(&log, 9, 3, false).await;
    let size = std::fs::metadata(log.path()).unwrap().len();
    assert!(size < COMPACT_AT, "the log grew to {size} bytes");
    drop(log);
    let (_log, recovered) = StateLog::open(&state).unwrap();
    assert_eq!(recovered.entries, vec![entry(9, 0)]);
    let seqs: Vec<u64> = recovered.reports.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![seq - 2, seq - 1, seq]);
}

#[tokio::test]
async fn only_the_agents_user_reads_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (log, _) = StateLog::open(&state).unwrap();
    log.append(Record::Forget(1)).await.unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(log.path()), 0o600);
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 1, "nothing but the log is left");
}

#[tokio::test]
async fn the_reach_of_acknowledged_output_outlives_its_reports_while_the_attempt_runs() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    {
        let (log, _) = StateLog::open(&state).unwrap();
        log.append(Record::Step(Box::new(entry(1, 0)))).await.unwrap();
        log.append(Record::Step(Box::new(entry(2, 0)))).await.unwrap();
        log.append(reaching(1, 1, 10)).await.unwrap();
        log.append(reaching(2, 2, 5)).await.unwrap();
        log.append(reaching(3, 1, 20)).await.unwrap();
        log.append(Record::Acked(3)).await.unwrap();
    }
    // Every report was acknowledged and is gone; the reach of each attempt stays.
    let (log, recovered) = StateLog::open(&state).unwrap();
    assert!(recovered.reports.is_empty());
    assert_eq!(recovered.reach.get(&1), Some(&reach(20)));
    assert_eq!(recovered.reach.get(&2), Some(&reach(5)));
    // And through a second rewrite, and a later pending report is the latest.
    log.append(reaching(4, 2, 7)).await.unwrap();
    log.append(Record::Forget(1)).await.unwrap();
    drop(log);
    let (_log, recovered) = StateLog::open(&state).unwrap();
    assert_eq!(recovered.reports.len(), 1);
    assert_eq!(recovered.reach.get(&2), Some(&reach(7)));
    assert_eq!(recovered.reach.get(&1), None, "an attempt that ended has none");
}

#[tokio::test]
async fn the_reach_survives_a_compaction_that_drops_the_reports_carrying_it() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (log, _) = StateLog::open(&state).unwrap();
    log.append(Record::Step(Box::new(entry(9, 0)))).await.unwrap();
    let seq = grow_past_compaction(&log, 9, 0, true).await;
    let size = std::fs::metadata(log.path()).unwrap().len();
    assert!(size < COMPACT_AT, "the log grew to {size} bytes");
    drop(log);
    let (_log, recovered) = StateLog::open(&state).unwrap();
    assert!(recovered.reports.is_empty());
    assert_eq!(recovered.reach.get(&9), Some(&reach(seq)));
}
