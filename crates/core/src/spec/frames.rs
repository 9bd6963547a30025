//! Frame ranges of array tasks: `1-100`, `1-9x2`, `1,5,7`, `1-3,10-20x5`, `7`.

use std::collections::HashSet;

use crate::limits::MAX_FRAMES;

/// Why a frame range was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// The text is not a frame range.
    Syntax(String),
    /// The range is well formed but has more than [`MAX_FRAMES`] frames.
    TooMany(String),
}

/// Parses a frame range like `1-100`, `1-9x2`, `1,5,7`, `1-3,10-20x5`, `7` into its frames, in
/// the order written. Items are separated by commas; each is a frame number, or `A-B`
/// (inclusive), optionally with a step `xS`. Frames must be non-negative, ranges must count up,
/// no frame may appear twice, and the total is capped at [`MAX_FRAMES`].
pub fn parse_frames(text: &str) -> Result<Vec<i64>, String> {
    frames(text).map_err(|e| match e {
        FrameError::Syntax(m) | FrameError::TooMany(m) => m,
    })
}

/// [`parse_frames`], telling a range over the limit apart. The frames are counted before any
/// is made, so a range over the limit costs nothing.
pub(crate) fn frames(text: &str) -> Result<Vec<i64>, FrameError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(FrameError::Syntax("frame range is empty".into()));
    }
    expand_ranges(text, count(text)?)
}

/// The items of a frame range, counted.
struct Ranges {
    /// First frame, last frame and step of each item, in the order written.
    items: Vec<(i64, i64, i64)>,
    /// Frames of all items together.
    total: usize,
}

/// The ranges of `text` and how many frames they hold in all.
fn count(text: &str) -> Result<Ranges, FrameError> {
    let syntax = FrameError::Syntax;
    let mut items = Vec::new();
    let mut total: u64 = 0;
    for item in text.split(',') {
        let item = item.trim();
        if item.is_empty() {
            return Err(syntax(format!("frame range `{text}` has an empty item")));
        }
        let (range, step) = match item.split_once('x') {
            Some((range, step)) => (range.trim(), Some(step.trim())),
            None => (item, None),
        };
        let (first, last) = match range.split_once('-') {
            Some((a, b)) => (
                number(a.trim(), item, "the first frame").map_err(syntax)?,
                number(b.trim(), item, "the last frame").map_err(syntax)?,
            ),
            None if step.is_some() => {
                return Err(syntax(format!("`{item}` has a step but no range; write it like `1-9x2`")));
            }
            None => {
                let n = number(range, item, "a frame number").map_err(syntax)?;
                (n, n)
            }
        };
        let step = match step {
            Some(s) => number(s, item, "the step after `x`").map_err(syntax)?,
            None => 1,
        };
        if step == 0 {
            return Err(syntax(format!("`{item}` has step 0; the step must be at least 1")));
        }
        if last < first {
            return Err(syntax(format!(
                "`{item}` counts down; write the smaller frame first, like `{last}-{first}`"
            )));
        }
        // Both ends are non-negative i64, so the difference fits in u64, and the running total
        // stays far from overflow because it is checked after every item.
        total += (last - first) as u64 / step as u64 + 1;
        if total > MAX_FRAMES as u64 {
            return Err(FrameError::TooMany(format!(
                "frame range `{text}` has more than {MAX_FRAMES} frames, the most one array task may have"
            )));
        }
        items.push((first, last, step));
    }
    Ok(Ranges { items, total: total as usize })
}

/// The frames of the counted ranges, in order, refusing a frame written twice.
fn expand_ranges(text: &str, Ranges { items, total }: Ranges) -> Result<Vec<i64>, FrameError> {
    let mut frames = Vec::with_capacity(total);
    let mut seen = HashSet::with_capacity(total);
    for (first, last, step) in items {
        let mut f = first;
        while f <= last {
            if !seen.insert(f) {
                return Err(FrameError::Syntax(format!("frame {f} appears twice in `{text}`")));
            }
            frames.push(f);
            match f.checked_add(step) {
                Some(next) => f = next,
                None => break,
            }
        }
    }
    Ok(frames)
}

/// A non-negative frame number (or step), `what` of `item`.
fn number(text: &str, item: &str, what: &str) -> Result<i64, String> {
    if text.is_empty() {
        return Err(format!("`{item}` is missing {what}"));
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("`{text}` in `{item}` is not a frame number"));
    }
    text.parse().map_err(|_| format!("`{text}` in `{item}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_steps_and_lists() {
        assert_eq!(parse_frames("1-100").unwrap(), (1..=100).collect::<Vec<_>>());
        assert_eq!(parse_frames("1-9x2").unwrap(), vec![1, 3, 5, 7, 9]);
        assert_eq!(parse_frames("1-10x4").unwrap(), vec![1, 5, 9]);
        assert_eq!(parse_frames("1,5,7").unwrap(), vec![1, 5, 7]);
        assert_eq!(parse_frames("1-3,10-20x5").unwrap(), vec![1, 2, 3, 10, 15, 20]);
        assert_eq!(parse_frames(" 7 ").unwrap(), vec![7]);
        assert_eq!(parse_frames("0-2, 9").unwrap(), vec![0, 1, 2, 9]);
        assert_eq!(parse_frames("1-100000").unwrap().len(), MAX_FRAMES);
        assert_eq!(parse_frames("0-199998x2").unwrap().len(), MAX_FRAMES);
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let err = |t: &str| parse_frames(t).unwrap_err();
        assert!(err("5-1").contains("counts down"), "{}", err("5-1"));
        assert!(err("1-x").contains("`1-x` is missing the last frame"), "{}", err("1-x"));
        assert!(err("1-y").contains("`y` in `1-y` is not a frame number"), "{}", err("1-y"));
        assert!(err("0x").contains("has a step but no range"), "{}", err("0x"));
        assert!(err("1-9x").contains("missing the step after `x`"), "{}", err("1-9x"));
        assert!(err("1-9x0").contains("step 0"), "{}", err("1-9x0"));
        assert!(err("3x2").contains("no range"), "{}", err("3x2"));
        assert!(err("1-100001").contains("more than 100000 frames"));
        assert!(err("1-60000,60001-120000").contains("more than 100000 frames"));
        assert_eq!(
            frames("1-1000000"),
            Err(FrameError::TooMany(
                "frame range `1-1000000` has more than 100000 frames, the most one array task may have"
                    .into()
            ))
        );
        // Counted, not made: the largest range is refused at once.
        assert!(matches!(frames("0-9223372036854775806"), Err(FrameError::TooMany(_))));
        assert!(err("").contains("empty"));
        assert!(err("1,,2").contains("empty item"));
        assert!(err("1-3,2").contains("frame 2 appears twice"));
        assert!(err("-5").contains("missing the first frame"));
        assert!(err("99999999999999999999").contains("too large"));
    }
}
