//! Frame ranges of array tasks: `1-100`, `1-9x2`, `1,5,7`, `1-3,10-20x5`, `7`.

use std::collections::HashSet;

/// Most frames one array task may expand to.
pub(crate) const MAX_FRAMES: u64 = 1_000_000;

/// Parses a frame range like `1-100`, `1-9x2`, `1,5,7`, `1-3,10-20x5`, `7` into its frames, in
/// the order written. Items are separated by commas; each is a frame number, or `A-B`
/// (inclusive), optionally with a step `xS`. Frames must be non-negative, ranges must count up,
/// no frame may appear twice, and the total is capped at 1,000,000 frames.
pub fn parse_frames(text: &str) -> Result<Vec<i64>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("frame range is empty".into());
    }
    let mut items = Vec::new();
    let mut total: u64 = 0;
    for item in text.split(',') {
        let item = item.trim();
        if item.is_empty() {
            return Err(format!("frame range `{text}` has an empty item"));
        }
        let (range, step) = match item.split_once('x') {
            Some((range, step)) => (range.trim(), Some(step.trim())),
            None => (item, None),
        };
        let (first, last) = match range.split_once('-') {
            Some((a, b)) => {
                (number(a.trim(), item, "the first frame")?, number(b.trim(), item, "the last frame")?)
            }
            None if step.is_some() => {
                return Err(format!("`{item}` has a step but no range; write it like `1-9x2`"));
            }
            None => {
                let n = number(range, item, "a frame number")?;
                (n, n)
            }
        };
        let step = match step {
            Some(s) => number(s, item, "the step after `x`")?,
            None => 1,
        };
        if step == 0 {
            return Err(format!("`{item}` has step 0; the step must be at least 1"));
        }
        if last < first {
            return Err(format!(
                "`{item}` counts down; write the smaller frame first, like `{last}-{first}`"
            ));
        }
        // Both ends are non-negative i64, so the difference fits in u64.
        total += (last - first) as u64 / step as u64 + 1;
        if total > MAX_FRAMES {
            return Err(format!("frame range `{text}` has more than {MAX_FRAMES} frames"));
        }
        items.push((first, last, step));
    }
    let mut frames = Vec::with_capacity(total as usize);
    let mut seen = HashSet::with_capacity(total as usize);
    for (first, last, step) in items {
        let mut f = first;
        while f <= last {
            if !seen.insert(f) {
                return Err(format!("frame {f} appears twice in `{text}`"));
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
        assert_eq!(parse_frames("1-1000000").unwrap().len(), 1_000_000);
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
        assert!(err("1-1000001").contains("more than 1000000 frames"));
        assert!(err("1-600000,600001-1200000").contains("more than 1000000 frames"));
        assert!(err("").contains("empty"));
        assert!(err("1,,2").contains("empty item"));
        assert!(err("1-3,2").contains("frame 2 appears twice"));
        assert!(err("-5").contains("missing the first frame"));
        assert!(err("99999999999999999999").contains("too large"));
    }
}
