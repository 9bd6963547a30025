//! Rows of the result table and how they are printed.

use std::fmt::Write as _;

use crate::stats::median;

/// Which way a figure improves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    /// Throughputs and rates.
    Higher,
    /// Latencies and memory.
    Lower,
}

/// A measured value: the per-run results (each run gives one number) or why there is none.
#[derive(Debug, Clone)]
pub enum Measure {
    /// One value per run; the table shows their median.
    Runs(Vec<f64>),
    /// A published figure, not measured here.
    Published(f64),
    /// Nothing was measured, and why (not installed, skipped, not implemented yet).
    Unavailable(String),
    /// The measurement was attempted and failed.
    Failed(String),
}

impl Measure {
    /// The median over runs, or the published value.
    pub fn value(&self) -> Option<f64> {
        match self {
            Measure::Runs(v) => median(v),
            Measure::Published(v) => Some(*v),
            Measure::Unavailable(_) | Measure::Failed(_) => None,
        }
    }

    /// An error turned into a failed measure.
    pub fn failed(context: &str, e: &anyhow::Error) -> Measure {
        Measure::Failed(format!("{context}: {e:#}").replace('\n', " "))
    }
}

/// One line of the table: a figure of Drover next to the same figure of a peer.
#[derive(Debug, Clone)]
pub struct Row {
    /// Section name (`throughput`, `latency`, ...), the first column.
    pub section: &'static str,
    /// What is measured, with its unit.
    pub figure: String,
    /// Unit suffix used when printing values.
    pub unit: &'static str,
    /// Which way is better.
    pub better: Better,
    /// Drover's measure.
    pub drover: Measure,
    /// Name of the peer.
    pub peer: String,
    /// The peer's measure.
    pub peer_value: Measure,
}

impl Row {
    /// How many times better Drover is than the peer (> 1: Drover is better), when both exist.
    pub fn ratio(&self) -> Option<f64> {
        let (d, p) = (self.drover.value()?, self.peer_value.value()?);
        let r = match self.better {
            Better::Higher => d / p,
            Better::Lower => p / d,
        };
        r.is_finite().then_some(r)
    }

    /// Whether Drover's own measurement failed.
    pub fn drover_failed(&self) -> bool {
        matches!(self.drover, Measure::Failed(_))
    }
}

/// Formats a number with a sensible number of digits.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 10_000.0 {
        let s = format!("{v:.0}");
        // Thousands separators for readability.
        let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn cell(m: &Measure, unit: &str) -> String {
    let runs = |v: &Vec<f64>| if v.len() > 1 { format!(" (median of {})", v.len()) } else { String::new() };
    match m {
        Measure::Runs(v) => match median(v) {
            Some(x) => format!("{} {unit}{}", num(x), runs(v)),
            None => "no samples".to_string(),
        },
        Measure::Published(x) => format!("{} {unit} (published)", num(*x)),
        Measure::Unavailable(why) => format!("unavailable: {why}"),
        Measure::Failed(why) => format!("FAILED: {why}"),
    }
}

/// The table in Markdown, one row per figure.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "| section | figure | Drover | peer | peer value | Drover vs peer |");
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- |");
    for r in rows {
        let ratio = match r.ratio() {
            Some(x) => format!("{}× {}", num(x), if x >= 1.0 { "better" } else { "worse" }),
            None => "n/a".to_string(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            r.section,
            r.figure,
            cell(&r.drover, r.unit).replace('|', "/"),
            r.peer,
            cell(&r.peer_value, r.unit).replace('|', "/"),
            ratio
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(better: Better, d: f64, p: f64) -> Row {
        Row {
            section: "x",
            figure: "f".into(),
            unit: "u",
            better,
            drover: Measure::Runs(vec![d]),
            peer: "p".into(),
            peer_value: Measure::Runs(vec![p]),
        }
    }

    #[test]
    fn ratio_is_oriented_so_above_one_means_drover_wins() {
        assert_eq!(row(Better::Higher, 10.0, 5.0).ratio(), Some(2.0));
        assert_eq!(row(Better::Lower, 10.0, 5.0).ratio(), Some(0.5));
    }

    #[test]
    fn unavailable_peer_has_no_ratio_and_says_why() {
        let mut r = row(Better::Higher, 1.0, 1.0);
        r.peer_value = Measure::Unavailable("not installed".into());
        assert_eq!(r.ratio(), None);
        assert!(table(&[r]).contains("unavailable: not installed"));
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(num(1234567.0), "1,234,567");
        assert_eq!(num(150.2), "150");
        assert_eq!(num(12.345), "12.3");
        assert_eq!(num(0.1234), "0.12");
    }
}
