//! Splits the guest's raw output chunks into [`OutputChunk`](crate::runtime::OutputChunk)
//! lines: newline kept, lines longer than [`MAX_LINE`] cut into pieces, the same shape the
//! process runtime produces.

use crate::runtime::MAX_LINE;

/// Line state of one output stream of one step.
#[derive(Debug, Default)]
pub(crate) struct LineSplitter {
    line: Vec<u8>,
}

impl LineSplitter {
    /// Adds bytes; returns the lines (or `MAX_LINE` pieces) they complete.
    pub(crate) fn push(&mut self, mut data: &[u8]) -> Vec<Vec<u8>> {
        let mut done = Vec::new();
        while !data.is_empty() {
            let room = MAX_LINE - self.line.len();
            let window = &data[..data.len().min(room)];
            let (taken, complete) = match window.iter().position(|&b| b == b'\n') {
                Some(newline) => (newline + 1, true),
                None => (window.len(), self.line.len() + window.len() == MAX_LINE),
            };
            self.line.extend_from_slice(&window[..taken]);
            data = &data[taken..];
            if complete {
                done.push(std::mem::take(&mut self.line));
            }
        }
        done
    }

    /// The last line, if it had no newline.
    pub(crate) fn finish(self) -> Option<Vec<u8>> {
        (!self.line.is_empty()).then_some(self.line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_across_chunks_and_keeps_the_tail() {
        let mut splitter = LineSplitter::default();
        assert_eq!(splitter.push(b"a\nb"), vec![b"a\n".to_vec()]);
        assert_eq!(splitter.push(b"c\n\nd"), vec![b"bc\n".to_vec(), b"\n".to_vec()]);
        assert_eq!(splitter.finish(), Some(b"d".to_vec()));
    }

    #[test]
    fn cuts_long_lines_at_max_line() {
        let mut splitter = LineSplitter::default();
        let mut out = Vec::new();
        for chunk in vec![b'x'; 2 * MAX_LINE + 10].chunks(1000) {
            out.extend(splitter.push(chunk));
        }
        out.extend(splitter.push(b"\n"));
        let lens: Vec<usize> = out.iter().map(Vec::len).collect();
        assert_eq!(lens, vec![MAX_LINE, MAX_LINE, 11]);
        assert_eq!(splitter.finish(), None);
    }
}
