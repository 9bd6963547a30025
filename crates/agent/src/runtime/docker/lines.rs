//! Cutting the frames of an exec's output stream into [`OutputChunk`]-sized lines: one per
//! line, newline kept, lines longer than [`MAX_LINE`] cut into pieces, a last line without
//! newline still sent. Docker delivers output in frames of arbitrary size, so the splitter is
//! fed pieces and keeps the unfinished line between them.
//!
//! [`OutputChunk`]: crate::runtime::OutputChunk

use crate::runtime::MAX_LINE;

/// The unfinished line of one stream.
#[derive(Debug, Default)]
pub(super) struct LineSplitter {
    line: Vec<u8>,
}

impl LineSplitter {
    /// Adds `data` and returns the lines (or [`MAX_LINE`] pieces) it completed.
    pub(super) fn push(&mut self, mut data: &[u8]) -> Vec<Vec<u8>> {
        let mut complete = Vec::new();
        while !data.is_empty() {
            let room = MAX_LINE - self.line.len();
            let window = &data[..data.len().min(room)];
            match window.iter().position(|&b| b == b'\n') {
                Some(newline) => {
                    self.line.extend_from_slice(&window[..=newline]);
                    complete.push(std::mem::take(&mut self.line));
                    data = &data[newline + 1..];
                }
                None => {
                    self.line.extend_from_slice(window);
                    data = &data[window.len()..];
                    if self.line.len() == MAX_LINE {
                        complete.push(std::mem::take(&mut self.line));
                    }
                }
            }
        }
        complete
    }

    /// The last line when the stream ended without a newline.
    pub(super) fn finish(&mut self) -> Option<Vec<u8>> {
        (!self.line.is_empty()).then(|| std::mem::take(&mut self.line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(input: &[u8], piece: usize) -> Vec<Vec<u8>> {
        let mut splitter = LineSplitter::default();
        let mut out: Vec<Vec<u8>> = input.chunks(piece).flat_map(|p| splitter.push(p)).collect();
        out.extend(splitter.finish());
        out
    }

    #[test]
    fn keeps_newlines_and_the_last_partial_line() {
        for piece in [1, 3, 1000] {
            let out = split(b"a\n\nbc\nlast", piece);
            assert_eq!(out, vec![b"a\n".to_vec(), b"\n".to_vec(), b"bc\n".to_vec(), b"last".to_vec()]);
        }
    }

    #[test]
    fn cuts_long_lines_at_max_line() {
        let mut input = vec![b'x'; 2 * MAX_LINE + 10];
        input.push(b'\n');
        input.extend_from_slice(&vec![b'y'; MAX_LINE]);
        input.push(b'\n');
        for piece in [1000, MAX_LINE, 3 * MAX_LINE] {
            let out = split(&input, piece);
            assert_eq!(out.concat(), input);
            let lens: Vec<usize> = out.iter().map(Vec::len).collect();
            assert_eq!(lens, vec![MAX_LINE, MAX_LINE, 11, MAX_LINE, 1]);
        }
    }
}
