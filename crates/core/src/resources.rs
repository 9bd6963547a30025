//! Resources a task reserves and a node offers.

use serde::{Deserialize, Serialize};

/// Cores and memory, and a task's process limit; a task's request or a node's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Whole cores, pinned by the agent.
    pub cores: u32,
    /// Bytes of memory; 0 reserves none.
    #[serde(default)]
    pub memory: u64,
    /// Most processes and threads the task may have at once; 0 = the node's default. A limit,
    /// not a reservation: placement never counts it against a node.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pids: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Default for Resources {
    fn default() -> Self {
        Resources { cores: 1, memory: 0, pids: 0 }
    }
}

impl Resources {
    /// Nothing: no cores, no memory.
    pub const NONE: Resources = Resources { cores: 0, memory: 0, pids: 0 };

    /// Whether `need` fits in `self`.
    pub fn fits(&self, need: &Resources) -> bool {
        need.cores <= self.cores && need.memory <= self.memory
    }

    /// What is left after taking `need` (never below zero).
    pub fn minus(&self, need: &Resources) -> Resources {
        Resources {
            cores: self.cores.saturating_sub(need.cores),
            memory: self.memory.saturating_sub(need.memory),
            pids: self.pids,
        }
    }

    /// `self` and `more` together (saturating).
    pub fn plus(&self, more: &Resources) -> Resources {
        Resources {
            cores: self.cores.saturating_add(more.cores),
            memory: self.memory.saturating_add(more.memory),
            pids: self.pids,
        }
    }
}

/// A memory size that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a memory size; write a number with a unit, like 512MiB, 2GiB or 1G")]
pub struct BadMemorySize(pub String);

/// Parses sizes like `256MiB`, `1.5GiB`, `512M`, `1G`, `4096` (bytes). Decimal (`MB`, `GB`) and
/// binary (`MiB`, `GiB`, and the shorthand `M`, `G`) units are accepted.
pub fn parse_memory(text: &str) -> Result<u64, BadMemorySize> {
    let bad = || BadMemorySize(text.to_string());
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "kb" => 1_000,
        "m" | "mib" => 1 << 20,
        "mb" => 1_000_000,
        "g" | "gib" => 1 << 30,
        "gb" => 1_000_000_000,
        "t" | "tib" => 1 << 40,
        "tb" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// Formats bytes for people: `256MiB`, `1.5GiB`.
pub fn format_memory(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if v.fract() == 0.0 { format!("{}{}", v as u64, UNITS[i]) } else { format!("{:.1}{}", v, UNITS[i]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_memory("1G").unwrap(), 1 << 30);
        assert_eq!(parse_memory("1GB").unwrap(), 1_000_000_000);
        assert_eq!(parse_memory("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_memory("4096").unwrap(), 4096);
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("12 parsecs").is_err());
        assert_eq!(format_memory(256 << 20), "256MiB");
        assert_eq!(format_memory(3 << 29), "1.5GiB");
    }
}
