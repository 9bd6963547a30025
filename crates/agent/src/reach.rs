//! How far the output of a running step that the outbox holds reaches into the files the step
//! writes its output to, so that an agent restarted mid-step ships every line exactly once.
//!
//! A report of a process step's output carries the reach of that step's streams as of the
//! last line in it, in the same state-log frame (see [`crate::state_log`]). A report is sent
//! only once its frame is in the log, so whatever a server stored is within the reach the log
//! knows; and what the log knows is in the outbox (sent again after a restart if not yet
//! acknowledged). The restarted agent reads each stream on from its reach.
//!
//! Secrets are masked between the file and the outbox, and the masker holds back input that
//! may begin a secret. So a reach is the last offset at which the masker held nothing back
//! ([`StreamReach::clean`]) and the bytes of masked output shipped past it
//! ([`StreamReach::past_clean`]): a restarted agent reads from the clean offset, masks again
//! (the same input gives the same output), and drops the bytes shipped already.
//!
//! Output past the log limit is held in memory until the attempt ends, and a reach does not
//! move while the limit holds output back: the reach also says how much of the attempt's
//! output went out within the limit ([`OutputReach::kept`]), so a restarted agent goes on
//! filling the limit where the earlier run stopped and rebuilds the held tail from the step's
//! files. A reach in an earlier step than the one in flight (the limit froze it there, or the
//! later steps' output had not reached the outbox) has the restarted agent read every step's
//! files again from it, step by step, before the step in flight's: they stay until the
//! attempt is cleaned up.

/// Where one stream's output in the outbox ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamReach {
    /// Offset in the stream's file up to which everything read is in the outbox, the last
    /// point at which the masker held nothing back.
    pub clean: u64,
    /// Bytes of masked output read past `clean` that are in the outbox too.
    pub past_clean: u64,
}

/// The reach of both output streams of one step of an attempt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutputReach {
    /// The step (0-based).
    pub step: u32,
    /// Standard output.
    pub stdout: StreamReach,
    /// Standard error.
    pub stderr: StreamReach,
    /// How much of the attempt's output went out within its log limit (see
    /// [`crate::log_cap`]), all steps together.
    pub kept: crate::log_cap::Kept,
}

/// Bytes of an encoded [`OutputReach`].
pub(crate) const ENCODED: usize = 4 + 5 * 8;

/// Bytes of the encoding agents wrote before [`OutputReach::kept`] (nothing kept known).
pub(crate) const ENCODED_BEFORE_KEPT: usize = 4 + 4 * 8;

impl OutputReach {
    /// The reach of one stream.
    pub fn stream(&self, stderr: bool) -> StreamReach {
        if stderr { self.stderr } else { self.stdout }
    }

    /// The offsets to read the step's files on from: (stdout, stderr).
    pub fn read_from(&self) -> (u64, u64) {
        (self.stdout.clean, self.stderr.clean)
    }

    /// Appends the fixed-size encoding to `out`.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.step.to_le_bytes());
        let kept = self.kept.encode();
        for n in [self.stdout.clean, self.stdout.past_clean, self.stderr.clean, self.stderr.past_clean, kept]
        {
            out.extend_from_slice(&n.to_le_bytes());
        }
    }

    /// Reads the encoding at the start of `bytes`; an encoding from before [`Self::kept`]
    /// when `with_kept` is false.
    pub(crate) fn decode(bytes: &[u8], with_kept: bool) -> Option<OutputReach> {
        let step = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?);
        let word = |i: usize| -> Option<u64> {
            let at = 4 + 8 * i;
            Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
        };
        let kept = if with_kept { crate::log_cap::Kept::decode(word(4)?) } else { Default::default() };
        Some(OutputReach {
            step,
            stdout: StreamReach { clean: word(0)?, past_clean: word(1)? },
            stderr: StreamReach { clean: word(2)?, past_clean: word(3)? },
            kept,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reach_reads_back_as_written_and_a_short_one_is_none() {
        let reach = OutputReach {
            step: 3,
            stdout: StreamReach { clean: 1 << 40, past_clean: 7 },
            stderr: StreamReach { clean: 12, past_clean: 0 },
            kept: crate::log_cap::Kept { bytes: 99, full: true },
        };
        let mut bytes = Vec::new();
        reach.encode(&mut bytes);
        assert_eq!(bytes.len(), ENCODED);
        assert_eq!(OutputReach::decode(&bytes, true), Some(reach));
        assert_eq!(OutputReach::decode(&bytes[..ENCODED - 1], true), None);
        assert_eq!(reach.read_from(), (1 << 40, 12));
        // An older agent's encoding: nothing known kept.
        let older = OutputReach::decode(&bytes[..ENCODED_BEFORE_KEPT], false);
        assert_eq!(older, Some(OutputReach { kept: Default::default(), ..reach }));
    }
}
