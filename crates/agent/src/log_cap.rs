//! The per-attempt output limit. An attempt may ship up to a limit of output; past it, the
//! first half of the limit has gone out as it came, the last half is held back (only the most
//! recent bytes), and at the end a marker line says how much was cut before the held tail is
//! shipped. So a runaway task's log keeps how it started and how it ended.

use std::collections::VecDeque;

/// One piece of output, as shipped: whole lines of one step and stream back to back, of which
/// only the last may lack a newline (a line the runtime cut, or the last of a stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Step index.
    pub step: u32,
    /// From stderr.
    pub stderr: bool,
    /// Bytes.
    pub data: Vec<u8>,
}

/// How much of an attempt's output went out within its limit: what a restarted agent's
/// [`LogCap`] goes on from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Kept {
    /// Bytes shipped within the limit.
    pub bytes: u64,
    /// Whether the head is closed: everything after it goes to the held tail.
    pub full: bool,
}

impl Kept {
    /// One word: the byte count, with the top bit for `full`.
    pub(crate) fn encode(self) -> u64 {
        (self.bytes & !(1 << 63)) | (u64::from(self.full) << 63)
    }

    /// Reads [`Kept::encode`]'s word.
    pub(crate) fn decode(word: u64) -> Kept {
        Kept { bytes: word & !(1 << 63), full: word >> 63 == 1 }
    }
}

/// Applies the limit to an attempt's output.
#[derive(Debug)]
pub struct LogCap {
    head_limit: u64,
    tail_limit: u64,
    shipped: u64,
    tail: VecDeque<Piece>,
    tail_bytes: u64,
    cut: u64,
    full: bool,
}

impl LogCap {
    /// A cap of `limit` bytes per attempt (0 = no limit).
    pub fn new(limit: u64) -> LogCap {
        let limit = if limit == 0 { u64::MAX } else { limit };
        LogCap {
            head_limit: limit / 2,
            tail_limit: limit - limit / 2,
            shipped: 0,
            tail: VecDeque::new(),
            tail_bytes: 0,
            cut: 0,
            full: false,
        }
    }

    /// A cap of `limit` bytes for an attempt of which `kept` went out already (an agent
    /// restarted mid-attempt): the head goes on from there; the tail is read again.
    pub fn resume(limit: u64, kept: Kept) -> LogCap {
        let mut cap = LogCap::new(limit);
        cap.shipped = kept.bytes;
        cap.full = kept.full;
        cap
    }

    /// How much went out within the limit so far.
    pub fn kept(&self) -> Kept {
        Kept { bytes: self.shipped, full: self.full }
    }

    /// What of the piece to ship now: its lines that still fit the head, or `None` when all of
    /// it is held back (or cut). The head ends at a line end, as it did when lines came one by
    /// one: the first line that does not fit, and all after it, go to the tail.
    pub fn admit(&mut self, mut piece: Piece) -> Option<Piece> {
        let len = piece.data.len() as u64;
        if !self.full && self.shipped.saturating_add(len) <= self.head_limit {
            self.shipped += len;
            return Some(piece);
        }
        let mut head = None;
        if !self.full {
            let room = usize::try_from(self.head_limit - self.shipped).unwrap_or(usize::MAX);
            if let Some(newline) = memchr::memrchr(b'\n', &piece.data[..room.min(piece.data.len())]) {
                let rest = piece.data.split_off(newline + 1);
                let fits = std::mem::replace(&mut piece.data, rest);
                self.shipped += fits.len() as u64;
                head = Some(Piece { step: piece.step, stderr: piece.stderr, data: fits });
            }
        }
        self.full = true;
        self.hold(piece);
        head
    }

    /// Adds `piece` to the held tail, cutting the oldest bytes past the tail's limit.
    fn hold(&mut self, piece: Piece) {
        let len = piece.data.len() as u64;
        self.tail_bytes += len;
        self.tail.push_back(piece);
        while self.tail_bytes > self.tail_limit {
            let over = self.tail_bytes - self.tail_limit;
            let Some(front) = self.tail.front_mut() else { break };
            let front_len = front.data.len() as u64;
            if front_len <= over {
                self.tail.pop_front();
                self.tail_bytes -= front_len;
                self.cut += front_len;
            } else {
                front.data.drain(..over as usize);
                self.tail_bytes -= over;
                self.cut += over;
            }
        }
    }

    /// What is left to ship at the end: the marker (if anything was cut) and the held tail.
    pub fn finish(self) -> Vec<Piece> {
        let mut out = Vec::with_capacity(self.tail.len() + 1);
        if self.cut > 0 {
            let step = self.tail.front().map(|p| p.step).unwrap_or(0);
            let marker = format!("... {} bytes cut (over the limit of output per attempt) ...\n", self.cut);
            out.push(Piece { step, stderr: true, data: marker.into_bytes() });
        }
        out.extend(self.tail);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(text: &str) -> Piece {
        Piece { step: 0, stderr: false, data: text.as_bytes().to_vec() }
    }

    fn text(pieces: &[Piece]) -> String {
        pieces.iter().map(|p| String::from_utf8_lossy(&p.data).to_string()).collect()
    }

    #[test]
    fn keeps_the_beginning_and_the_end_and_says_how_much_was_cut() {
        let mut cap = LogCap::new(20);
        let mut shipped = Vec::new();
        for i in 0..10 {
            if let Some(p) = cap.admit(piece(&format!("line{i}\n"))) {
                shipped.push(p);
            }
        }
        assert_eq!(text(&shipped), "line0\n");
        shipped.extend(cap.finish());
        let all = text(&shipped);
        // 60 bytes written, 6 shipped at once, the last 10 held back: 44 cut.
        assert!(all.starts_with("line0\n... 44 bytes cut"), "{all}");
        assert!(all.ends_with("\nne8\nline9\n"), "{all}");
    }

    #[test]
    fn a_piece_of_many_lines_is_capped_as_its_lines_would_be() {
        let lines: Vec<String> = (0..10).map(|i| format!("line{i}\n")).collect();
        let mut one_by_one = LogCap::new(20);
        let mut expected: Vec<Piece> = lines.iter().filter_map(|l| one_by_one.admit(piece(l))).collect();
        expected.extend(one_by_one.finish());
        for split in [1, 3, 10] {
            let mut cap = LogCap::new(20);
            let mut shipped: Vec<Piece> =
                lines.chunks(split).filter_map(|group| cap.admit(piece(&group.concat()))).collect();
            shipped.extend(cap.finish());
            assert_eq!(text(&shipped), text(&expected), "pieces of {split} lines");
        }
    }

    /// An agent restarted anywhere in the output resumes the cap from what it kept and reads
    /// again whatever came after the end of what it kept: the log is the same as without the
    /// restart.
    #[test]
    fn a_cap_resumed_from_what_was_kept_gives_the_same_log() {
        let lines: Vec<String> = (0..50).map(|i| format!("line{i}\n")).collect();
        let mut whole = LogCap::new(100);
        let mut expected: Vec<Piece> = lines.iter().filter_map(|l| whole.admit(piece(l))).collect();
        expected.extend(whole.finish());
        for restart_at in 0..=lines.len() {
            let mut before = LogCap::new(100);
            let mut shipped = Vec::new();
            // Lines wholly within what was kept: the reach ends after them.
            let mut read_again_from = 0;
            for (i, l) in lines[..restart_at].iter().enumerate() {
                if let Some(p) = before.admit(piece(l)) {
                    shipped.push(p);
                    read_again_from = i + 1;
                }
            }
            let kept = before.kept();
            assert_eq!(Kept::decode(kept.encode()), kept);
            let mut after = LogCap::resume(100, kept);
            shipped.extend(lines[read_again_from..].iter().filter_map(|l| after.admit(piece(l))));
            shipped.extend(after.finish());
            assert_eq!(text(&shipped), text(&expected), "restarted after {restart_at} lines");
        }
    }

    #[test]
    fn output_under_the_limit_is_untouched() {
        let mut cap = LogCap::new(100);
        let mut shipped: Vec<Piece> = (0..3).filter_map(|i| cap.admit(piece(&format!("l{i}\n")))).collect();
        shipped.extend(cap.finish());
        assert_eq!(text(&shipped), "l0\nl1\nl2\n");
        let mut unlimited = LogCap::new(0);
        assert!(unlimited.admit(piece(&"x".repeat(1 << 20))).is_some());
        assert!(unlimited.finish().is_empty());
    }
}
