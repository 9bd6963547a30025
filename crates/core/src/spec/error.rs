//! Job-file problems: where they are (file, line, column, field), what is wrong, how to fix it.

use std::fmt;

/// A 1-based line and column in a job file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    /// Where whole-file problems point.
    pub const START: Pos = Pos { line: 1, column: 1 };
}

/// One problem in a job file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// The job file's name, as given to [`crate::spec::compile`].
    pub file: String,
    /// 1-based line of the offending key or value.
    pub line: usize,
    /// 1-based column (in characters) of the offending key or value.
    pub column: usize,
    /// Dotted path of the offending field, like `tasks[2].depends_on[0]`; empty for syntax errors.
    pub field: String,
    /// What is wrong: lowercase, no trailing period.
    pub message: String,
    /// How to fix it, when there is something useful to say.
    pub hint: Option<String>,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// All problems found in a job file (at least one), in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecErrors(pub Vec<SpecError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

/// Collects problems while a job file is checked, so one run reports all of them.
pub(crate) struct Problems {
    file: String,
    list: Vec<SpecError>,
}

impl Problems {
    pub fn new(file: &str) -> Self {
        Problems { file: file.to_string(), list: Vec::new() }
    }

    /// Records a problem at `pos` in `field`.
    pub fn add(&mut self, pos: Pos, field: &str, message: impl Into<String>, hint: Option<String>) {
        self.list.push(SpecError {
            file: self.file.clone(),
            line: pos.line,
            column: pos.column,
            field: field.to_string(),
            message: message.into(),
            hint,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The problems sorted by position, each reported once.
    pub fn into_errors(mut self) -> SpecErrors {
        self.list.sort_by(|a, b| (a.line, a.column, &a.field).cmp(&(b.line, b.column, &b.field)));
        self.list.dedup();
        SpecErrors(self.list)
    }
}

/// Longest word, in characters, that a suggestion is looked for or made from. Edit distance
/// takes time in the product of the two lengths, so a megabyte-long name would take hours to
/// compare, and typos worth suggesting are in short names.
const MAX_SUGGESTED_LEN: usize = 256;

/// The candidate closest to `word` by edit distance, if it is close enough to be a likely typo.
pub(crate) fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let len = word.chars().count();
    if len > MAX_SUGGESTED_LEN {
        return None;
    }
    let word_lower = word.to_lowercase();
    // The distance is at least the difference in length, so candidates too far apart in
    // length are skipped without computing it.
    let near = |c: &&str| {
        let c_len = c.chars().count();
        c_len <= MAX_SUGGESTED_LEN && len.abs_diff(c_len) <= 2.max(c_len / 3)
    };
    candidates
        .into_iter()
        .filter(near)
        .map(|c| (edit_distance(&word_lower, &c.to_lowercase()), c))
        .filter(|(d, c)| *d <= 2.max(c.chars().count() / 3) && *d < c.chars().count())
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = substitute.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(edit_distance("dependson", "depends_on"), 1);
        assert_eq!(closest("dependson", ["name", "depends_on"]), Some("depends_on"));
        assert_eq!(closest("comand", ["command", "steps"]), Some("command"));
        assert_eq!(closest("zzzzzz", ["command", "steps"]), None);
        // Long words are not compared at all: that would take time in the square of their length.
        let long = "x".repeat(100_000);
        assert_eq!(closest(&long[1..], [long.as_str()]), None);
    }

    #[test]
    fn display_has_one_problem_per_line_and_an_indented_hint() {
        let mut p = Problems::new("job.yaml");
        p.add(Pos { line: 3, column: 5 }, "tasks[0].tiemout", "unknown field `tiemout`", Some("x".into()));
        p.add(Pos::START, "version", "missing `version`", None);
        let text = p.into_errors().to_string();
        assert_eq!(
            text,
            "job.yaml:1:1: version: missing `version`\n\
             job.yaml:3:5: tasks[0].tiemout: unknown field `tiemout`\n  hint: x"
        );
    }
}
