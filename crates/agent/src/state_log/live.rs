//! Which frames of the log still matter, and where they are: what the writer keeps up to date
//! with every append, so that a compaction copies those frames without reading the rest.

use std::collections::{HashMap, VecDeque};

use super::frame::{HEADER, Key};
use crate::reach::{self, OutputReach};

/// Where a frame is in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub offset: u64,
    pub len: u64,
}

/// The live frames of a log.
#[derive(Debug, Default)]
pub(crate) struct Live {
    /// Each unfinished attempt's latest journal entry.
    steps: HashMap<i64, Span>,
    /// Each unacknowledged report, by sequence number, in order.
    reports: VecDeque<(u64, Span)>,
    /// Highest acknowledged sequence number.
    acked: u64,
    /// Each unfinished attempt's latest output reach: a rewrite writes it anew, since the
    /// reports that carried it may be gone.
    reach: HashMap<i64, OutputReach>,
    /// Bytes of the frames above.
    bytes: u64,
}

/// Size of the `Acked` frame a rewrite always writes first (it carries the sequence on).
pub(crate) const ACKED_FRAME: u64 = (HEADER + 9) as u64;
/// Size of a `Reach` frame.
pub(crate) const REACH_FRAME: u64 = (HEADER + 9 + reach::ENCODED) as u64;

impl Live {
    /// Takes note of one record, written at `span`.
    pub fn note(&mut self, key: Key, span: Span) {
        match key {
            Key::Step(id) => {
                self.bytes += span.len;
                if let Some(old) = self.steps.insert(id, span) {
                    self.bytes -= old.len;
                }
            }
            Key::Forget(id) => {
                if let Some(old) = self.steps.remove(&id) {
                    self.bytes -= old.len;
                }
                self.reach.remove(&id);
            }
            // Kept by `note_reach`, written anew by a rewrite.
            Key::Reach(_) => {}
            Key::Report(seq) => {
                self.bytes += span.len;
                self.reports.push_back((seq, span));
            }
            Key::Acked(seq) => {
                self.acked = self.acked.max(seq);
                while let Some(&(s, old)) = self.reports.front() {
                    if s > seq {
                        break;
                    }
                    self.bytes -= old.len;
                    self.reports.pop_front();
                }
            }
        }
    }

    /// Takes note of the output reach a record carries.
    pub fn note_reach(&mut self, attempt_id: i64, reach: OutputReach) {
        self.reach.insert(attempt_id, reach);
    }

    /// The latest output reach of each unfinished attempt, by attempt.
    pub fn reaches(&self) -> Vec<(i64, OutputReach)> {
        let mut all: Vec<(i64, OutputReach)> = self
            .reach
            .iter()
            .filter(|(id, _)| self.steps.contains_key(id))
            .map(|(id, r)| (*id, *r))
            .collect();
        all.sort_by_key(|(id, _)| *id);
        all
    }

    /// Bytes a rewrite would keep.
    pub fn bytes(&self) -> u64 {
        self.bytes + ACKED_FRAME + REACH_FRAME * self.reach.len() as u64
    }

    /// Highest acknowledged sequence number.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The live frames, in the order they are in the file.
    pub fn frames(&self) -> Vec<(Key, Span)> {
        let mut frames: Vec<(Key, Span)> = self
            .steps
            .iter()
            .map(|(id, span)| (Key::Step(*id), *span))
            .chain(self.reports.iter().map(|(seq, span)| (Key::Report(*seq), *span)))
            .collect();
        frames.sort_by_key(|(_, span)| span.offset);
        frames
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(offset: u64, len: u64) -> Span {
        Span { offset, len }
    }

    #[test]
    fn only_latest_entries_and_unacknowledged_reports_stay_live() {
        let mut live = Live::default();
        live.note(Key::Step(1), at(0, 10));
        live.note(Key::Report(1), at(10, 5));
        live.note(Key::Step(1), at(15, 12));
        live.note(Key::Report(2), at(27, 7));
        live.note(Key::Step(2), at(34, 3));
        live.note(Key::Acked(1), at(37, 17));
        live.note(Key::Forget(2), at(54, 17));
        assert_eq!(live.frames(), vec![(Key::Step(1), at(15, 12)), (Key::Report(2), at(27, 7))]);
        assert_eq!(live.bytes(), 12 + 7 + ACKED_FRAME);
        assert_eq!(live.acked(), 1);
    }

    #[test]
    fn the_latest_reach_of_an_unfinished_attempt_is_kept_and_a_forgotten_one_goes() {
        let mut live = Live::default();
        let reach = |step| OutputReach { step, ..OutputReach::default() };
        live.note(Key::Step(1), at(0, 10));
        live.note(Key::Step(2), at(10, 10));
        live.note_reach(1, reach(0));
        live.note_reach(1, reach(1));
        live.note_reach(2, reach(0));
        // An attempt whose entry was never seen has nothing to resume.
        live.note_reach(3, reach(0));
        assert_eq!(live.reaches(), vec![(1, reach(1)), (2, reach(0)), (3, reach(0))][..2].to_vec());
        live.note(Key::Forget(2), at(20, 17));
        assert_eq!(live.reaches(), vec![(1, reach(1))]);
    }
}
