//! Masking secrets in what leaves a task: its output and the messages about how it ended.
//!
//! A [`Masker`] is built once per attempt from the secret values. It looks for each value and
//! for the forms a task most often prints one in without meaning to: standard and URL-safe
//! base64 (padded, unpadded, wrapped like `base64` and `openssl base64` wrap, and embedded in a
//! longer encoded text such as an HTTP basic credential), percent-encoding as URL encoders
//! write it, JSON string escaping, and, for a multi-line value, each of its lines on its own.
//! Every maximal run of overlapping occurrences becomes one `***`, so the result does not depend
//! on which forms matched.
//!
//! Output arrives in pieces (a line each, or a piece of an over-long line), and a secret can
//! straddle them: a multi-line value printed whole spans several lines, and a program may write
//! part of a value, pause, and write the rest. A [`MaskStream`] therefore holds back the
//! longest tail of its input that could still begin a secret (at most the longest form − 1
//! bytes) and releases it once the next piece shows whether it was one, or when the stream
//! ends. Nothing else is delayed: a line ending in a newline cannot begin a secret unless the
//! secret itself spans lines. [`LineMasker`] sits on top and keeps what it ships line-shaped,
//! because readers print every shipped piece as a line of its own.

use std::collections::BTreeSet;

use aho_corasick::{AhoCorasick, MatchKind};
use base64::Engine;
use base64::engine::GeneralPurpose;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};

use crate::runtime::MAX_LINE;

/// What stands in for a secret.
pub const MASK: &[u8] = b"***";

/// Values, lines of values and encoded forms shorter than this are not looked for: a two-letter
/// line of a certificate, or an empty variable, would otherwise mask innocent text all over a
/// log while hiding next to nothing.
pub const MIN_LEN: usize = 4;

/// Widths at which base64 tools wrap their output: 76 (`base64`, MIME) and 64 (`openssl
/// base64`, PEM).
const BASE64_WRAPS: [usize; 2] = [76, 64];

/// Why a masker cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum MaskError {
    /// The secrets make more or longer patterns than the matcher can hold.
    #[error("cannot build the secret matcher: {0}")]
    Build(#[from] aho_corasick::BuildError),
}

/// Finds the secrets of one attempt, in every form it knows, and masks them.
#[derive(Debug, Clone, Default)]
pub struct Masker {
    /// Every form of every secret, sorted and without duplicates; sorted so that
    /// [`Masker::could_begin`] can binary-search it.
    patterns: Vec<Vec<u8>>,
    /// Finds every occurrence of every pattern, overlapping ones included; `None` when there is
    /// nothing to look for.
    finder: Option<AhoCorasick>,
    /// Bit `b` is set when some pattern begins with byte `b`: most bytes of a tail cannot begin
    /// a secret, and this says so without a search.
    first: [u64; 4],
    /// Length of the longest pattern.
    longest: usize,
}

impl Masker {
    /// A masker for these secret values. Values shorter than [`MIN_LEN`] (after trimming
    /// surrounding whitespace) are ignored.
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Result<Masker, MaskError> {
        let mut forms = BTreeSet::new();
        for secret in secrets {
            forms_of(secret, &mut forms);
        }
        if forms.is_empty() {
            return Ok(Masker::default());
        }
        let patterns: Vec<Vec<u8>> = forms.into_iter().collect();
        let finder = AhoCorasick::builder().match_kind(MatchKind::Standard).build(&patterns)?;
        let mut first = [0u64; 4];
        for p in &patterns {
            first[usize::from(p[0] >> 6)] |= 1 << (p[0] & 63);
        }
        let longest = patterns.iter().map(Vec::len).max().unwrap_or(0);
        Ok(Masker { patterns, finder: Some(finder), first, longest })
    }

    /// Whether there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.finder.is_none()
    }

    /// `data` with every secret masked.
    pub fn mask(&self, data: &[u8]) -> Vec<u8> {
        let mut stream = self.stream();
        let mut out = stream.push(data);
        out.extend(stream.finish());
        out
    }

    /// `text` with every secret masked. A secret is valid UTF-8 and so is each of its forms, so
    /// an occurrence never starts or ends inside a character and the result stays valid.
    pub fn mask_str(&self, text: &str) -> String {
        if self.is_empty() {
            return text.to_owned();
        }
        match String::from_utf8(self.mask(text.as_bytes())) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }

    /// A stream of bytes to mask piece by piece.
    pub fn stream(&self) -> MaskStream<'_> {
        MaskStream { masker: self, held: Vec::new(), covered: 0 }
    }

    /// A stream of output lines to mask piece by piece.
    pub fn lines(&self) -> LineMasker<'_> {
        LineMasker { stream: self.stream(), partial: Vec::new() }
    }

    /// Where the tail of `buf` that could still begin a secret starts (`buf.len()` when no
    /// tail could): the earliest position whose rest is a proper prefix of some pattern.
    fn hold_point(&self, buf: &[u8]) -> usize {
        let from = buf.len().saturating_sub(self.longest.saturating_sub(1));
        (from..buf.len()).find(|&at| self.could_begin(&buf[at..])).unwrap_or(buf.len())
    }

    /// Whether `tail` (not empty) is a proper prefix of some pattern. In sorted order, the
    /// patterns that start with `tail` come right after where `tail` itself would sit, and
    /// the first of them is `tail` itself when it is a pattern; so two looks suffice.
    fn could_begin(&self, tail: &[u8]) -> bool {
        let b = tail[0];
        if self.first[usize::from(b >> 6)] & (1 << (b & 63)) == 0 {
            return false;
        }
        let at = self.patterns.partition_point(|p| p.as_slice() < tail);
        self.patterns[at..].iter().take(2).any(|p| p.len() > tail.len() && p.starts_with(tail))
    }

    /// Occurrences in `buf` that start before `before`, as `(start, end)` sorted by start.
    fn occurrences(&self, buf: &[u8], before: usize) -> Vec<(usize, usize)> {
        let Some(finder) = &self.finder else { return Vec::new() };
        // The finder is built with MatchKind::Standard, the one kind overlapping search needs.
        let mut found: Vec<(usize, usize)> = finder
            .find_overlapping_iter(buf)
            .filter(|m| m.start() < before)
            .map(|m| (m.start(), m.end()))
            .collect();
        found.sort_unstable();
        found
    }
}

/// Masks a byte stream given in pieces, holding back only what could still begin a secret.
#[derive(Debug)]
pub struct MaskStream<'m> {
    masker: &'m Masker,
    /// Input not released yet: the tail that could still begin a secret.
    held: Vec<u8>,
    /// How many leading bytes of `held` already lie inside the `***` released last. They are
    /// kept because an occurrence that starts among them may run on into the next piece; it
    /// then extends that `***` instead of starting a new one.
    covered: usize,
}

impl MaskStream<'_> {
    /// Takes the next piece; returns what can be released now, masked.
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        if self.masker.is_empty() {
            return data.to_vec();
        }
        self.advance(data, false)
    }

    /// The stream ended: masks and releases whatever was held back.
    pub fn finish(&mut self) -> Vec<u8> {
        self.advance(&[], true)
    }

    /// Whether some input is held back.
    pub fn holds(&self) -> bool {
        !self.held.is_empty()
    }

    fn advance(&mut self, data: &[u8], end: bool) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(data);
        let hold = if end { buf.len() } else { self.masker.hold_point(&buf) };
        // Every occurrence that starts before `hold` lies wholly in `buf`: one that ran past its
        // end would make its start a place to hold from.
        let mut out = Vec::with_capacity(buf.len());
        // Input before `next` is in `out` already (or in the `***` released last).
        let mut next = self.covered;
        // End of the masked run `out` ends in; an occurrence starting before it extends it.
        let mut run_end = self.covered;
        for (start, end) in self.masker.occurrences(&buf, hold) {
            if start < run_end {
                run_end = run_end.max(end);
            } else {
                out.extend_from_slice(&buf[next..start]);
                out.extend_from_slice(MASK);
                run_end = end;
            }
            next = run_end;
        }
        if next < hold {
            out.extend_from_slice(&buf[next..hold]);
            next = hold;
        }
        self.covered = next - hold;
        self.held = buf.split_off(hold);
        out
    }
}

/// Masks one output stream of a step, shipping line-shaped pieces: whole lines, plus the
/// pieces without a newline that the runtime itself cut (over-long lines, a last line without
/// newline). A line whose masked start is ready while its end is held back waits for the end,
/// up to [`MAX_LINE`] bytes.
#[derive(Debug)]
pub struct LineMasker<'m> {
    stream: MaskStream<'m>,
    /// Masked output of an unfinished line.
    partial: Vec<u8>,
}

impl LineMasker<'_> {
    /// Takes the next piece of output; returns the pieces to ship now.
    pub fn push(&mut self, data: Vec<u8>) -> Vec<Vec<u8>> {
        if self.stream.masker.is_empty() {
            return if data.is_empty() { Vec::new() } else { vec![data] };
        }
        let released = self.stream.push(&data);
        self.partial.extend_from_slice(&released);
        let mut pieces = take_lines(&mut self.partial);
        // With nothing held, the output ends where the runtime's piece ended, so a piece
        // without newline is one the runtime cut there.
        if !self.partial.is_empty() && (!self.stream.holds() || self.partial.len() >= MAX_LINE) {
            pieces.push(std::mem::take(&mut self.partial));
        }
        pieces
    }

    /// Whether everything pushed so far was returned: a masker that starts afresh here
    /// returns the same output for the same input that follows.
    pub fn is_clean(&self) -> bool {
        self.partial.is_empty() && !self.stream.holds()
    }

    /// The stream ended: the pieces still to ship.
    pub fn finish(&mut self) -> Vec<Vec<u8>> {
        let rest = self.stream.finish();
        self.partial.extend_from_slice(&rest);
        let mut pieces = take_lines(&mut self.partial);
        if !self.partial.is_empty() {
            pieces.push(std::mem::take(&mut self.partial));
        }
        pieces
    }
}

/// Takes the complete lines (newline kept) out of `buf`, leaving an unfinished one.
fn take_lines(buf: &mut Vec<u8>) -> Vec<Vec<u8>> {
    let Some(last) = buf.iter().rposition(|&b| b == b'\n') else { return Vec::new() };
    let rest = buf.split_off(last + 1);
    let lines = std::mem::replace(buf, rest);
    lines.split_inclusive(|&b| b == b'\n').map(<[u8]>::to_vec).collect()
}

/// Adds the forms of one secret value to `forms`. Surrounding whitespace is not part of what is
/// looked for: it is no secret, and a form that began with a newline would hold back every
/// line end of the output.
fn forms_of(value: &str, forms: &mut BTreeSet<Vec<u8>>) {
    let trimmed = value.trim();
    if trimmed.len() < MIN_LEN {
        return;
    }
    let mut add = |form: Vec<u8>| {
        if form.len() >= MIN_LEN {
            forms.insert(form);
        }
    };
    add(trimmed.as_bytes().to_vec());
    for line in trimmed.lines() {
        add(line.trim().as_bytes().to_vec());
    }
    // Encoders see the value as set (`printf '%s' "$S" | base64`) or as typed in a file,
    // with or without its surrounding whitespace.
    let exact: BTreeSet<&str> = [value, trimmed].into();
    for v in exact {
        for engine in [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD] {
            add(engine.encode(v).into_bytes());
        }
        let encoded = STANDARD.encode(v);
        for width in BASE64_WRAPS {
            if encoded.len() > width {
                add(encoded.as_bytes().chunks(width).collect::<Vec<_>>().join(&b'\n'));
            }
        }
    }
    for engine in [STANDARD_NO_PAD, URL_SAFE_NO_PAD] {
        for shift in 0..3 {
            add(embedded_base64(&engine, trimmed.as_bytes(), shift));
        }
    }
    for upper in [true, false] {
        for space_plus in [true, false] {
            for keep_slash in [true, false] {
                add(percent_encoded(trimmed.as_bytes(), upper, space_plus, keep_slash));
            }
        }
    }
    if let Ok(json) = serde_json::to_string(trimmed) {
        add(json.as_bytes()[1..json.len() - 1].to_vec());
    }
}

/// The characters of the base64 of `value` that depend on nothing but `value` when it sits
/// `shift` bytes (mod 3) into longer encoded data, as a password does in the base64 of
/// `user:password`. The first and last characters also carry bits of the neighbours and
/// are left out.
fn embedded_base64(engine: &GeneralPurpose, value: &[u8], shift: usize) -> Vec<u8> {
    let mut data = vec![0u8; shift];
    data.extend_from_slice(value);
    let encoded = engine.encode(&data);
    // Character `i` holds bits 6i..6i+6; the value's are bits 8·shift..8·(shift+len).
    let first = (8 * shift).div_ceil(6);
    let last = 8 * (shift + value.len()) / 6;
    encoded.as_bytes().get(first..last).map(<[u8]>::to_vec).unwrap_or_default()
}

/// `value` percent-encoded: unreserved characters (RFC 3986) as they are, every other byte as
/// `%XX`; with the variations common encoders make (hex case, `+` for space in forms, `/` left
/// alone by Python's `quote`).
fn percent_encoded(value: &[u8], upper: bool, space_plus: bool, keep_slash: bool) -> Vec<u8> {
    let hex: &[u8; 16] = if upper { b"0123456789ABCDEF" } else { b"0123456789abcdef" };
    let mut out = Vec::with_capacity(value.len() * 3);
    for &b in value {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(b),
            b'/' if keep_slash => out.push(b),
            b' ' if space_plus => out.push(b'+'),
            _ => out.extend_from_slice(&[b'%', hex[usize::from(b >> 4)], hex[usize::from(b & 15)]]),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    const KEY: &str = "-----BEGIN KEY-----\nZq7+c0rr/ect horse?>~\nbattery staple\n-----END KEY-----";

    fn masker(secrets: &[&str]) -> Masker {
        Masker::new(secrets.iter().copied()).expect("masker builds")
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    /// Streams `pieces` through a fresh stream, returning everything released.
    fn streamed(m: &Masker, pieces: &[&[u8]]) -> Vec<u8> {
        let mut stream = m.stream();
        let mut out = Vec::new();
        for p in pieces {
            out.extend(stream.push(p));
        }
        out.extend(stream.finish());
        out
    }

    #[test]
    fn masks_the_value_and_its_common_encodings() {
        let m = masker(&[KEY]);
        let forms = [
            KEY.to_owned(),
            STANDARD.encode(KEY),
            STANDARD_NO_PAD.encode(KEY),
            URL_SAFE.encode(KEY),
            URL_SAFE_NO_PAD.encode(KEY),
            String::from_utf8(percent_encoded(KEY.as_bytes(), true, false, false)).unwrap(),
            String::from_utf8(percent_encoded(KEY.as_bytes(), false, true, true)).unwrap(),
            serde_json::to_string(KEY).unwrap(),
        ];
        for form in &forms {
            let out = m.mask_str(&format!("before {form} after"));
            assert!(out.starts_with("before ") && out.ends_with(" after"), "{out}");
            assert!(
                out.contains("***") && !out.contains("horse") && !out.contains(&form[2..form.len() - 2]),
                "{out}"
            );
        }
        // The value has characters that URL-safe base64 and percent-encoding write differently.
        assert_ne!(STANDARD.encode(KEY), URL_SAFE.encode(KEY));
        assert!(
            percent_encoded(KEY.as_bytes(), true, false, false)
                .starts_with(b"-----BEGIN%20KEY-----%0AZq7%2Bc0rr%2Fect")
        );
    }

    #[test]
    fn masks_a_multi_line_value_line_by_line() {
        let m = masker(&[KEY]);
        let printed: String = KEY.lines().map(|l| format!("> {l}\n")).collect();
        assert_eq!(m.mask_str(&printed), "> ***\n> ***\n> ***\n> ***\n");
        // A line shorter than MIN_LEN is not looked for on its own.
        let m = masker(&["first line\nok\nthird line"]);
        assert_eq!(m.mask_str("ok\nfirst line\n"), "ok\n***\n");
    }

    #[test]
    fn masks_base64_wrapped_and_embedded() {
        let long = "a secret long enough that its base64 runs past seventy-six columns: 0123456789";
        let m = masker(&[long]);
        let encoded = STANDARD.encode(long);
        let wrapped = format!("{}\n{}\n", &encoded[..76], &encoded[76..]);
        assert_eq!(m.mask_str(&wrapped), "***\n");
        // A password inside an HTTP basic credential: only the characters that carry
        // nothing but the password's bits can be recognised, and they are masked.
        let m = masker(&["hunter2-pw"]);
        for user in ["u", "us", "use", "user"] {
            let header = format!("Authorization: Basic {}", STANDARD.encode(format!("{user}:hunter2-pw")));
            let out = m.mask_str(&header);
            assert!(out.contains("***"), "{user}: {out}");
            // What is left carries the user name and at most a character at either end.
            let left = out.trim_start_matches("Authorization: Basic ").replace("***", "");
            assert!(left.len() <= STANDARD.encode(format!("{user}:")).len() + 3, "{user}: {out}");
        }
    }

    #[test]
    fn masks_across_every_split() {
        let m = masker(&[KEY, "hunter2"]);
        let b64 = STANDARD.encode(KEY);
        let input = format!("pw=hunter2\n{KEY}\nnot hunter\nb64 {b64}\nend hunt");
        let want = "pw=***\n***\nnot hunter\nb64 ***\nend hunt";
        assert_eq!(text(&m.mask(input.as_bytes())), want);
        let bytes = input.as_bytes();
        for a in 0..=bytes.len() {
            assert_eq!(text(&streamed(&m, &[&bytes[..a], &bytes[a..]])), want, "split at {a}");
        }
        for a in (0..=bytes.len()).step_by(3) {
            for b in (a..=bytes.len()).step_by(5) {
                let out = streamed(&m, &[&bytes[..a], &bytes[a..b], &bytes[b..]]);
                assert_eq!(text(&out), want, "split at {a} and {b}");
            }
        }
        // One byte at a time.
        let pieces: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(text(&streamed(&m, &pieces)), want);
    }

    #[test]
    fn overlapping_secrets_mask_as_one_run() {
        let m = masker(&["abcdef", "defghi", "wxyz"]);
        assert_eq!(m.mask_str("1 abcdefghi 2"), "1 *** 2");
        assert_eq!(m.mask_str("1 abcdefwxyz 2"), "1 ****** 2");
        let m = masker(&["secret", "secret-longer"]);
        assert_eq!(m.mask_str("a secret-longer b secret-long"), "a *** b ***-long");
        let input = b"1 abcdefghi 2 secret-longer";
        let m = masker(&["abcdef", "defghi", "secret", "secret-longer"]);
        for a in 0..=input.len() {
            assert_eq!(text(&streamed(&m, &[&input[..a], &input[a..]])), "1 *** 2 ***", "split at {a}");
        }
    }

    #[test]
    fn empty_and_very_short_secrets_are_ignored() {
        assert!(masker(&[]).is_empty());
        assert!(masker(&["", "ab", "abc", "  \n  ", " xy \n"]).is_empty());
        let m = masker(&["abc", "abcd"]);
        assert_eq!(m.mask_str("abc abcd"), "abc ***");
    }

    #[test]
    fn holds_back_only_what_could_begin_a_secret_and_flushes_it_at_the_end() {
        let m = masker(&["hunter2"]);
        let mut s = m.stream();
        assert_eq!(s.push(b"line one\n"), b"line one\n");
        assert_eq!(s.push(b"pw=hun"), b"pw=");
        assert!(s.holds());
        assert_eq!(s.push(b"t"), b"");
        assert_eq!(s.push(b"ing\n"), b"hunting\n");
        assert_eq!(s.push(b"pw=hunte"), b"pw=");
        assert_eq!(s.finish(), b"hunte");
        assert!(!s.holds());
    }

    #[test]
    fn lines_stay_line_shaped() {
        let m = masker(&[KEY, "hunter2"]);
        let mut lines = m.lines();
        assert_eq!(lines.push(b"plain\n".to_vec()), vec![b"plain\n".to_vec()]);
        // A multi-line value printed whole arrives as several lines; its first lines wait
        // for the rest.
        let key_lines: Vec<String> = format!("{KEY}\n").split_inclusive('\n').map(str::to_owned).collect();
        for l in &key_lines[..key_lines.len() - 1] {
            assert!(lines.push(l.clone().into_bytes()).is_empty(), "{l}");
        }
        assert_eq!(lines.push(key_lines[key_lines.len() - 1].clone().into_bytes()), vec![b"***\n".to_vec()]);
        // The first line of the value, followed by something else, was the line alone.
        assert!(lines.push(b"-----BEGIN KEY-----\n".to_vec()).is_empty());
        assert_eq!(lines.push(b"other\n".to_vec()), vec![b"***\n".to_vec(), b"other\n".to_vec()]);
        // A line whose end is held waits whole; a piece the runtime cut goes as it came.
        assert!(lines.push(b"pw=hunt".to_vec()).is_empty());
        assert_eq!(lines.push(b"er2 ok\n".to_vec()), vec![b"pw=*** ok\n".to_vec()]);
        assert_eq!(lines.push(b"cut without newline".to_vec()), vec![b"cut without newline".to_vec()]);
        assert!(lines.push(b"last hunter".to_vec()).is_empty());
        assert_eq!(lines.finish(), vec![b"last hunter".to_vec()]);
    }

    #[test]
    fn an_unending_line_is_shipped_in_bounded_pieces() {
        let m = masker(&["hunter2"]);
        let mut lines = m.lines();
        let mut shipped = Vec::new();
        let mut piece = vec![b'x'; MAX_LINE - 3];
        piece.extend_from_slice(b"hun");
        for _ in 0..4 {
            for p in lines.push(piece.clone()) {
                assert!(p.len() <= 2 * MAX_LINE);
                shipped.extend(p);
            }
        }
        shipped.extend(lines.finish().concat());
        assert_eq!(shipped, piece.repeat(4));
    }

    /// Random texts over a small alphabet, random secrets, random splits: streaming gives what
    /// masking the whole text gives, and that is the union of all occurrences masked.
    #[test]
    fn streaming_agrees_with_a_plain_reference() {
        let mut rng = StdRng::seed_from_u64(7);
        let pick = |rng: &mut StdRng, len: usize| -> String {
            (0..len).map(|_| ['a', 'b', 'c', '\n', ' '][rng.random_range(0..5)]).collect()
        };
        for _ in 0..300 {
            let secrets: Vec<String> = (0..rng.random_range(1..4))
                .map(|_| {
                    let len = rng.random_range(4..9);
                    pick(&mut rng, len)
                })
                .collect();
            let m = Masker::new(secrets.iter().map(String::as_str)).expect("masker builds");
            let input = pick(&mut rng, 60);
            let whole = m.mask(input.as_bytes());
            assert_eq!(whole, reference(&m.patterns, input.as_bytes()), "{secrets:?} {input:?}");
            let mut cuts: Vec<usize> = (0..4).map(|_| rng.random_range(0..=input.len())).collect();
            cuts.sort_unstable();
            let mut pieces = Vec::new();
            let mut at = 0;
            for c in cuts.into_iter().chain([input.len()]) {
                pieces.push(&input.as_bytes()[at..c]);
                at = c;
            }
            assert_eq!(streamed(&m, &pieces), whole, "{secrets:?} {input:?} {pieces:?}");
        }
    }

    fn reference(patterns: &[Vec<u8>], input: &[u8]) -> Vec<u8> {
        let mut spans: Vec<(usize, usize)> = Vec::new();
        for p in patterns {
            for start in 0..input.len() {
                if input[start..].starts_with(p) {
                    spans.push((start, start + p.len()));
                }
            }
        }
        spans.sort_unstable();
        let mut out = Vec::new();
        let mut next = 0;
        let mut run_end = 0;
        for (start, end) in spans {
            if start < run_end {
                run_end = run_end.max(end);
            } else {
                out.extend_from_slice(&input[next..start]);
                out.extend_from_slice(MASK);
                run_end = end;
            }
            next = run_end;
        }
        out.extend_from_slice(&input[next..]);
        out
    }
}
