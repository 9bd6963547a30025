//! What a project may do and spend: its settings (which sandboxes, images, networks and LLM
//! endpoints its jobs may use, a priority ceiling), its quotas, its budget, and the prices that
//! turn metered use into cost. Pure: the server checks plans and the scheduler consults these;
//! stores only keep them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::job::{JobPlan, NetworkPolicy, RuntimeKind};

/// A network mode as settings name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// No network.
    None,
    /// Only listed hosts, through the node's proxy.
    Egress,
    /// A network of the task's own, shared with its services.
    Bridge,
    /// Unrestricted.
    Full,
}

impl NetworkMode {
    /// The mode of a task's network policy.
    pub fn of(policy: &NetworkPolicy) -> NetworkMode {
        match policy {
            NetworkPolicy::None => NetworkMode::None,
            NetworkPolicy::Egress { .. } => NetworkMode::Egress,
            NetworkPolicy::Bridge => NetworkMode::Bridge,
            NetworkPolicy::Full => NetworkMode::Full,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            NetworkMode::None => "none",
            NetworkMode::Egress => "egress",
            NetworkMode::Bridge => "bridge",
            NetworkMode::Full => "full",
        }
    }
}

/// How long a budget's period is; periods start at midnight UTC (of the day, of Monday, of the
/// first of the month).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// A calendar day.
    Day,
    /// A week from Monday.
    Week,
    /// A calendar month.
    Month,
}

impl Period {
    /// When the period holding `now_ms` (Unix milliseconds) began.
    pub fn start_ms(self, now_ms: i64) -> i64 {
        const DAY: i64 = 86_400_000;
        let day = now_ms.div_euclid(DAY);
        match self {
            Period::Day => day * DAY,
            // 1970-01-01 was a Thursday: day 0 is 3 days after a Monday.
            Period::Week => (day - (day + 3).rem_euclid(7)) * DAY,
            Period::Month => {
                let (y, m, _) = civil_from_days(day);
                days_from_civil(y, m, 1) * DAY
            }
        }
    }
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Days since 1970-01-01 of a civil date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A spending limit per period, in the price table's currency.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Most cost per period.
    pub amount: f64,
    /// The period.
    pub period: Period,
}

/// Most a project may hold at once; `None` is no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Quota {
    /// Cores reserved by its running tasks.
    pub cores: Option<u32>,
    /// Memory reserved by its running tasks, bytes.
    pub memory: Option<u64>,
    /// Tasks assigned or running.
    pub tasks: Option<u32>,
    /// GPUs reserved by its running tasks (once nodes report GPUs).
    pub gpus: Option<u32>,
    /// Bytes of blobs it holds (uploads, outputs, logs); a blob shared with other projects
    /// counts for each.
    pub stored_bytes: Option<u64>,
}

/// What a project's jobs may use, set by operators and the project's admins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProjectSettings {
    /// Sandboxes its tasks may use; empty: every one the fleet offers.
    pub runtimes: Vec<RuntimeKind>,
    /// Patterns (`*` matches any run of characters) an image must match, as written in the job
    /// file (`build:DOCKERFILE` for images built at submit); empty: any image.
    pub images: Vec<String>,
    /// Network modes its tasks may ask for; empty: all.
    pub networks: Vec<NetworkMode>,
    /// Patterns an AI-agent task's LLM upstream must match.
    pub llm_upstreams: Vec<String>,
    /// Whether containers may run as root (`user: root` or `user: 0`).
    pub containers_as_root: bool,
    /// Patterns of the node accounts a process task's `user:` may name (the render farm runs
    /// frames as the submitting artist); empty: none, so process tasks run as a fresh
    /// unprivileged uid of their own. Nodes must allow the account too (`--run-as`).
    pub run_as: Vec<String>,
    /// Highest job priority allowed.
    pub max_priority: Option<i32>,
    /// Limits on what it holds at once.
    pub quota: Quota,
    /// Its spending limit, if any.
    pub budget: Option<Budget>,
    /// How long its jobs are kept after they end (then deleted with their logs, outputs and
    /// the blobs nothing else points to); `None`: the server's `--log-retention`.
    #[serde(with = "retention_text", skip_serializing_if = "Option::is_none")]
    pub retention: Option<Duration>,
}

impl Default for ProjectSettings {
    fn default() -> Self {
        ProjectSettings {
            runtimes: Vec::new(),
            images: Vec::new(),
            networks: Vec::new(),
            // Agents' keys travel to the upstream: only over TLS unless allowed otherwise.
            llm_upstreams: vec!["https://*".into()],
            containers_as_root: false,
            run_as: Vec::new(),
            max_priority: None,
            quota: Quota::default(),
            budget: None,
            retention: None,
        }
    }
}

/// A submit that breaks a setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("project setting `{setting}`: {message}")]
pub struct Violation {
    /// The setting, as `drover projects set` names it.
    pub setting: &'static str,
    /// What broke it, and how to fix it.
    pub message: String,
}

/// A `KEY=VALUE` that is not a setting or not a valid value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SettingError(pub String);

/// Whether `text` matches `pattern`, where `*` matches any run of characters (none included).
pub fn pattern_matches(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let rest: Vec<&str> = parts.collect();
    let Some((last, middle)) = rest.split_last() else { return pattern == text };
    let Some(mut remaining) = text.strip_prefix(first) else { return false };
    // Taking each middle part at its first occurrence leaves the longest remainder for the
    // rest, so no other choice could match where this one fails.
    for part in middle {
        match remaining.find(part) {
            Some(i) => remaining = &remaining[i + part.len()..],
            None => return false,
        }
    }
    remaining.ends_with(last)
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    items.iter().map(|i| format!("`{i}`")).collect::<Vec<_>>().join(", ")
}

impl fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ProjectSettings {
    /// Checks a plan against the settings; the first violation found, naming its setting.
    pub fn check(&self, plan: &JobPlan) -> Result<(), Violation> {
        let bad = |setting, message: String| Err(Violation { setting, message });
        if let Some(max) = self.max_priority
            && plan.priority > max
        {
            return bad(
                "max_priority",
                format!("priority {} is above project `{}`'s ceiling of {max}", plan.priority, plan.project),
            );
        }
        for t in &plan.tasks {
            let name = t.display_name();
            if !self.runtimes.is_empty() && !self.runtimes.contains(&t.runtime) {
                let allowed: Vec<&str> = self.runtimes.iter().map(|r| r.as_str()).collect();
                return bad(
                    "runtimes",
                    format!(
                        "task `{name}` runs in {}; this project allows {}",
                        t.runtime.as_str(),
                        list(&allowed)
                    ),
                );
            }
            let mode = NetworkMode::of(&t.network);
            if !self.networks.is_empty() && !self.networks.contains(&mode) {
                return bad(
                    "networks",
                    format!(
                        "task `{name}` asks for network `{mode}`; this project allows {}",
                        list(&self.networks)
                    ),
                );
            }
            let images = t.image_ref().into_iter().chain(t.services.iter().map(|s| s.image.clone()));
            for image in images {
                if !self.images.is_empty() && !self.images.iter().any(|p| pattern_matches(p, &image)) {
                    return bad(
                        "images",
                        format!(
                            "task `{name}` uses image `{image}`, which matches none of {}",
                            list(&self.images)
                        ),
                    );
                }
            }
            if t.wants_root_container() && !self.containers_as_root {
                return bad(
                    "containers_as_root",
                    format!("task `{name}` would run a container as root, which this project does not allow"),
                );
            }
            if t.runtime == RuntimeKind::Process
                && let Some(user) = t.user.as_deref()
                && !self.run_as.iter().any(|p| pattern_matches(p, user))
            {
                return bad(
                    "run_as",
                    if self.run_as.is_empty() {
                        format!(
                            "task `{name}` would run as `{user}`, and this project lets process tasks run \
                             as no named account; drop `user:` to run as a fresh unprivileged user"
                        )
                    } else {
                        format!(
                            "task `{name}` would run as `{user}`, which matches none of {}",
                            list(&self.run_as)
                        )
                    },
                );
            }
            if let Some(upstream) = t.agent.as_ref().and_then(|a| a.upstream.as_deref())
                && !self.llm_upstreams.iter().any(|p| pattern_matches(p, upstream))
            {
                return bad(
                    "llm_upstreams",
                    format!(
                        "task `{name}` sends its agent's LLM calls to {upstream}, which matches none of {}",
                        list(&self.llm_upstreams)
                    ),
                );
            }
        }
        Ok(())
    }

    /// Sets one setting from `KEY=VALUE` text, as `drover projects set` and config files give
    /// it. Lists are comma-separated; `none` (or an empty value) clears a limit or a list.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), SettingError> {
        let value = value.trim();
        let cleared = value.is_empty() || value == "none";
        let items = || value.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned);
        let bad = |why: String| SettingError(format!("`{key}={value}`: {why}"));
        let number = |what: &str| -> Result<Option<u64>, SettingError> {
            if cleared {
                return Ok(None);
            }
            value.parse().map(Some).map_err(|_| bad(format!("{what} is a whole number, or `none`")))
        };
        match key {
            "runtimes" => {
                self.runtimes = if cleared {
                    Vec::new()
                } else {
                    items()
                        .map(|r| match r.as_str() {
                            "process" => Ok(RuntimeKind::Process),
                            "docker" => Ok(RuntimeKind::Docker),
                            "microvm" => Ok(RuntimeKind::Microvm),
                            other => {
                                Err(bad(format!("`{other}` is not a runtime (process, docker, microvm)")))
                            }
                        })
                        .collect::<Result<_, _>>()?
                }
            }
            "images" => self.images = if cleared { Vec::new() } else { items().collect() },
            "networks" => {
                self.networks = if cleared {
                    Vec::new()
                } else {
                    items()
                        .map(|n| match n.as_str() {
                            "none" => Ok(NetworkMode::None),
                            "egress" => Ok(NetworkMode::Egress),
                            "bridge" => Ok(NetworkMode::Bridge),
                            "full" => Ok(NetworkMode::Full),
                            other => Err(bad(format!(
                                "`{other}` is not a network mode (none, egress, bridge, full)"
                            ))),
                        })
                        .collect::<Result<_, _>>()?
                }
            }
            "llm_upstreams" => self.llm_upstreams = if cleared { Vec::new() } else { items().collect() },
            "run_as" => self.run_as = if cleared { Vec::new() } else { items().collect() },
            "containers_as_root" => {
                self.containers_as_root = match value {
                    "true" | "yes" => true,
                    "false" | "no" => false,
                    _ => return Err(bad("give true or false".into())),
                }
            }
            "max_priority" => {
                self.max_priority = if cleared {
                    None
                } else {
                    Some(value.parse().map_err(|_| bad("a priority is a whole number, or `none`".into()))?)
                }
            }
            "quota.cores" => {
                self.quota.cores = number("a core count")?.map(|n| n.min(u32::MAX as u64) as u32)
            }
            "quota.tasks" => {
                self.quota.tasks = number("a task count")?.map(|n| n.min(u32::MAX as u64) as u32)
            }
            "quota.gpus" => self.quota.gpus = number("a GPU count")?.map(|n| n.min(u32::MAX as u64) as u32),
            "quota.memory" | "quota.stored_bytes" => {
                let bytes = if cleared {
                    None
                } else {
                    Some(crate::resources::parse_memory(value).map_err(|e| bad(e.to_string()))?)
                };
                if key == "quota.memory" {
                    self.quota.memory = bytes;
                } else {
                    self.quota.stored_bytes = bytes;
                }
            }
            "budget" => {
                self.budget = if cleared {
                    None
                } else {
                    let (amount, period) = value
                        .split_once('/')
                        .ok_or_else(|| bad("write AMOUNT/PERIOD, like 500/month".into()))?;
                    let amount: f64 = amount
                        .trim()
                        .parse()
                        .ok()
                        .filter(|a: &f64| a.is_finite() && *a >= 0.0)
                        .ok_or_else(|| bad("the amount is a number, 0 or more".into()))?;
                    let period = match period.trim() {
                        "day" => Period::Day,
                        "week" => Period::Week,
                        "month" => Period::Month,
                        other => return Err(bad(format!("`{other}` is not a period (day, week, month)"))),
                    };
                    Some(Budget { amount, period })
                }
            }
            "retention" => {
                self.retention = if cleared {
                    None
                } else {
                    let hint =
                        "write a duration like 30days, 12h or 90min, or `none` for the server's default";
                    match humantime::parse_duration(value) {
                        Ok(d) if !d.is_zero() => Some(d),
                        Ok(_) => {
                            return Err(bad(format!(
                                "a retention of zero would delete jobs as they end; {hint}"
                            )));
                        }
                        Err(e) => return Err(bad(format!("{e}; {hint}"))),
                    }
                }
            }
            _ => {
                return Err(SettingError(format!(
                    "`{key}` is not a project setting; settings are {}",
                    SETTING_KEYS.join(", ")
                )));
            }
        }
        Ok(())
    }
}

impl ProjectSettings {
    /// The first setting in which `self` allows more than `before` did, if any: what only an
    /// operator may do (a project's admins may tighten their project, not loosen it).
    pub fn loosens(&self, before: &ProjectSettings) -> Option<&'static str> {
        // An empty list allows everything; otherwise every entry must have been allowed before.
        fn wider<T: PartialEq>(after: &[T], before: &[T]) -> bool {
            !before.is_empty() && (after.is_empty() || after.iter().any(|a| !before.contains(a)))
        }
        // Upstream patterns are never empty-means-all: any new pattern widens.
        fn more<T: PartialEq>(after: &[T], before: &[T]) -> bool {
            after.iter().any(|a| !before.contains(a))
        }
        fn higher<T: PartialOrd>(after: Option<T>, before: Option<T>) -> bool {
            match (after, before) {
                (None, Some(_)) => true,
                (Some(a), Some(b)) => a > b,
                _ => false,
            }
        }
        let (q, b) = (&self.quota, &before.quota);
        let budget_up = match (self.budget, before.budget) {
            (None, Some(_)) => true,
            (Some(a), Some(b)) => a.amount > b.amount || a.period != b.period,
            _ => false,
        };
        [
            ("runtimes", wider(&self.runtimes, &before.runtimes)),
            ("images", wider(&self.images, &before.images)),
            ("networks", wider(&self.networks, &before.networks)),
            ("llm_upstreams", more(&self.llm_upstreams, &before.llm_upstreams)),
            ("containers_as_root", self.containers_as_root && !before.containers_as_root),
            ("run_as", more(&self.run_as, &before.run_as)),
            ("max_priority", higher(self.max_priority, before.max_priority)),
            ("quota.cores", higher(q.cores, b.cores)),
            ("quota.memory", higher(q.memory, b.memory)),
            ("quota.tasks", higher(q.tasks, b.tasks)),
            ("quota.gpus", higher(q.gpus, b.gpus)),
            ("quota.stored_bytes", higher(q.stored_bytes, b.stored_bytes)),
            ("budget", budget_up),
        ]
        .into_iter()
        .find_map(|(key, loosened)| loosened.then_some(key))
    }
}

/// Every key [`ProjectSettings::set`] takes.
pub const SETTING_KEYS: [&str; 14] = [
    "runtimes",
    "images",
    "networks",
    "llm_upstreams",
    "containers_as_root",
    "run_as",
    "max_priority",
    "quota.cores",
    "quota.memory",
    "quota.tasks",
    "quota.gpus",
    "quota.stored_bytes",
    "budget",
    "retention",
];

/// A retention as text (`30days`), as people write and read it in stored settings.
mod retention_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| humantime::parse_duration(&t).map_err(serde::de::Error::custom)).transpose()
    }
}

/// Prices that turn metered use into cost, in one currency of the operator's choosing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PriceTable {
    /// Per core reserved for an hour.
    pub core_hour: f64,
    /// Per GiB of memory reserved for an hour.
    pub gib_hour: f64,
    /// Per GPU reserved for an hour.
    pub gpu_hour: f64,
    /// Per 1,000 LLM input tokens.
    pub input_tokens_1k: f64,
    /// Per 1,000 LLM output tokens.
    pub output_tokens_1k: f64,
    /// Per GiB stored for a month (30 days).
    pub gib_month: f64,
}

/// What some work used, in the units prices apply to.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Metered {
    /// Cores reserved × seconds.
    pub core_seconds: f64,
    /// GiB of memory reserved × seconds.
    pub gib_seconds: f64,
    /// GPUs reserved × seconds.
    pub gpu_seconds: f64,
    /// LLM input tokens.
    pub input_tokens: u64,
    /// LLM output tokens.
    pub output_tokens: u64,
}

impl Metered {
    /// The sum of two measurements.
    pub fn plus(self, other: Metered) -> Metered {
        Metered {
            core_seconds: self.core_seconds + other.core_seconds,
            gib_seconds: self.gib_seconds + other.gib_seconds,
            gpu_seconds: self.gpu_seconds + other.gpu_seconds,
            input_tokens: self.input_tokens.saturating_add(other.input_tokens),
            output_tokens: self.output_tokens.saturating_add(other.output_tokens),
        }
    }
}

impl PriceTable {
    /// The cost of `used` at these prices.
    pub fn cost(&self, used: &Metered) -> f64 {
        used.core_seconds / 3600.0 * self.core_hour
            + used.gib_seconds / 3600.0 * self.gib_hour
            + used.gpu_seconds / 3600.0 * self.gpu_hour
            + used.input_tokens as f64 / 1000.0 * self.input_tokens_1k
            + used.output_tokens as f64 / 1000.0 * self.output_tokens_1k
    }

    /// The cost of keeping `bytes` stored for `duration`.
    pub fn storage_cost(&self, bytes: u64, duration: Duration) -> f64 {
        const MONTH: f64 = 30.0 * 86_400.0;
        bytes as f64 / (1u64 << 30) as f64 * duration.as_secs_f64() / MONTH * self.gib_month
    }

    /// Whether any price is set (a zero table means cost is not tracked).
    pub fn is_set(&self) -> bool {
        *self != PriceTable::default()
    }
}

/// Metered use per price-table version: what the store keeps per job and the server prices.
pub type MeteredByVersion = BTreeMap<i64, Metered>;

/// The cost of use metered under several price versions, each at its own prices (a missing
/// version costs nothing: work done before prices were set).
pub fn cost_by_version(used: &MeteredByVersion, prices: &BTreeMap<i64, PriceTable>) -> f64 {
    used.iter().map(|(v, m)| prices.get(v).map(|p| p.cost(m)).unwrap_or(0.0)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::TaskPlan;

    fn plan(tasks: Vec<TaskPlan>) -> JobPlan {
        JobPlan { name: "j".into(), project: "fx".into(), priority: 0, labels: BTreeMap::new(), tasks }
    }

    fn task(name: &str) -> TaskPlan {
        TaskPlan { name: name.into(), ..TaskPlan::default() }
    }

    #[test]
    fn patterns() {
        assert!(pattern_matches("https://*", "https://api.anthropic.com"));
        assert!(!pattern_matches("https://*", "http://api.anthropic.com"));
        assert!(pattern_matches("registry.example.com/*:*", "registry.example.com/team/app:1"));
        assert!(pattern_matches("exact", "exact"));
        assert!(!pattern_matches("exact", "exactly"));
        assert!(pattern_matches("*", ""));
        assert!(pattern_matches("a*a", "aa"));
        assert!(!pattern_matches("a*a", "a"));
        assert!(pattern_matches("*mid*", "xmidy"));
        assert!(!pattern_matches("*mid*", "xmdy"));
    }

    #[test]
    fn every_setting_refuses_with_its_name() {
        let mut s = ProjectSettings::default();
        assert_eq!(s.check(&plan(vec![task("t")])), Ok(()));
        s.set("runtimes", "docker,microvm").unwrap();
        assert_eq!(s.check(&plan(vec![task("t")])).unwrap_err().setting, "runtimes");

        let mut s = ProjectSettings::default();
        s.set("networks", "none,egress").unwrap();
        let mut t = task("t");
        t.network = NetworkPolicy::Full;
        assert_eq!(s.check(&plan(vec![t])).unwrap_err().setting, "networks");

        let mut s = ProjectSettings::default();
        s.set("images", "registry.example.com/*").unwrap();
        let mut t = task("t");
        t.runtime = RuntimeKind::Docker;
        t.image = Some("sha256:abc".into());
        t.image_name = Some("evil/miner:1".into());
        let err = s.check(&plan(vec![t.clone()])).unwrap_err();
        assert_eq!(err.setting, "images");
        assert!(err.message.contains("evil/miner:1"), "{err}");
        t.image_name = Some("registry.example.com/tool:2".into());
        assert_eq!(s.check(&plan(vec![t.clone()])), Ok(()));

        let s = ProjectSettings::default();
        t.user = Some("0:0".into());
        assert_eq!(s.check(&plan(vec![t.clone()])).unwrap_err().setting, "containers_as_root");
        let mut s = ProjectSettings::default();
        s.set("containers_as_root", "true").unwrap();
        assert_eq!(s.check(&plan(vec![t])), Ok(()));

        let mut t = task("t");
        t.user = Some("artist".into());
        let mut s = ProjectSettings::default();
        assert_eq!(s.check(&plan(vec![t.clone()])).unwrap_err().setting, "run_as");
        s.set("run_as", "art*").unwrap();
        assert_eq!(s.check(&plan(vec![t.clone()])), Ok(()));
        t.user = Some("root".into());
        assert!(s.check(&plan(vec![t])).unwrap_err().message.contains("matches none of `art*`"));
        assert_eq!(s.loosens(&ProjectSettings::default()), Some("run_as"));

        let mut s = ProjectSettings::default();
        s.set("max_priority", "10").unwrap();
        let mut p = plan(vec![task("t")]);
        p.priority = 11;
        assert_eq!(s.check(&p).unwrap_err().setting, "max_priority");

        let s = ProjectSettings::default();
        let mut t = task("t");
        t.agent = Some(crate::job::AgentSpec {
            command: crate::job::Command::Shell("agent".into()),
            prompt: "p".into(),
            prompt_file: None,
            repo: None,
            budget: None,
            push: None,
            provider: crate::job::LlmProvider::Anthropic,
            upstream: Some("http://10.0.0.1:8080".into()),
            key_secret: None,
        });
        assert_eq!(s.check(&plan(vec![t])).unwrap_err().setting, "llm_upstreams");
    }

    #[test]
    fn setting_values_parse_and_bad_ones_say_why() {
        let mut s = ProjectSettings::default();
        s.set("quota.cores", "40").unwrap();
        s.set("quota.memory", "64GiB").unwrap();
        s.set("budget", "500/month").unwrap();
        assert_eq!(s.quota.cores, Some(40));
        assert_eq!(s.quota.memory, Some(64 << 30));
        assert_eq!(s.budget, Some(Budget { amount: 500.0, period: Period::Month }));
        s.set("quota.cores", "none").unwrap();
        assert_eq!(s.quota.cores, None);
        assert!(s.set("quota.cores", "lots").unwrap_err().0.contains("whole number"));
        assert!(s.set("runtimes", "vm").unwrap_err().0.contains("not a runtime"));
        assert!(s.set("budget", "500").unwrap_err().0.contains("AMOUNT/PERIOD"));
        assert!(s.set("colour", "red").unwrap_err().0.contains("not a project setting"));
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<ProjectSettings>(&text).unwrap(), s);
    }

    #[test]
    fn retention_takes_a_duration_and_refuses_garbled_ones() {
        let mut s = ProjectSettings::default();
        s.set("retention", "30days").unwrap();
        assert_eq!(s.retention, Some(Duration::from_secs(30 * 86_400)));
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains(r#""retention":"30days""#), "stored as people write it: {text}");
        assert_eq!(serde_json::from_str::<ProjectSettings>(&text).unwrap(), s);
        for garbled in ["thirty days", "30", "-1h", "30 fortnights"] {
            let e = s.set("retention", garbled).unwrap_err().0;
            assert!(e.contains("write a duration like 30days"), "{garbled}: {e}");
        }
        assert!(s.set("retention", "0s").unwrap_err().0.contains("retention of zero"));
        assert_eq!(s.retention, Some(Duration::from_secs(30 * 86_400)), "a refused value changes nothing");
        s.set("retention", "none").unwrap();
        assert_eq!(s.retention, None);
        assert!(!serde_json::to_string(&s).unwrap().contains("retention"), "the default is not stored");
    }

    #[test]
    fn admins_may_tighten_but_not_loosen() {
        let mut before = ProjectSettings::default();
        before.set("quota.cores", "40").unwrap();
        before.set("images", "a/*,b/*").unwrap();
        let mut after = before.clone();
        after.set("quota.cores", "20").unwrap();
        after.set("images", "a/*").unwrap();
        after.set("networks", "none").unwrap();
        assert_eq!(after.loosens(&before), None);
        let mut up = before.clone();
        up.set("quota.cores", "41").unwrap();
        assert_eq!(up.loosens(&before), Some("quota.cores"));
        let mut any_image = before.clone();
        any_image.set("images", "none").unwrap();
        assert_eq!(any_image.loosens(&before), Some("images"));
        let mut root = before.clone();
        root.set("containers_as_root", "true").unwrap();
        assert_eq!(root.loosens(&before), Some("containers_as_root"));
        let mut http = before.clone();
        http.set("llm_upstreams", "https://*,http://*").unwrap();
        assert_eq!(http.loosens(&before), Some("llm_upstreams"));
        let mut unlimited = before;
        unlimited.set("quota.cores", "none").unwrap();
        assert_eq!(
            unlimited.loosens(&ProjectSettings {
                quota: Quota { cores: Some(1), ..Quota::default() },
                ..ProjectSettings::default()
            }),
            Some("quota.cores")
        );
    }

    #[test]
    fn periods_start_at_midnight_utc() {
        // 2026-11-29 (a Sunday) 21:30 UTC.
        let now = 1_795_901_400_000;
        let day = 86_400_000;
        assert_eq!(Period::Day.start_ms(now), now - now % day);
        // Monday 2026-11-23.
        assert_eq!(Period::Week.start_ms(now), days_from_civil(2026, 11, 23) * day);
        assert_eq!(Period::Month.start_ms(now), days_from_civil(2026, 11, 1) * day);
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
    }

    #[test]
    fn costs_use_the_prices_of_their_version() {
        let used = Metered {
            core_seconds: 7200.0,
            gib_seconds: 3600.0,
            input_tokens: 2000,
            output_tokens: 500,
            ..Default::default()
        };
        let old = PriceTable {
            core_hour: 1.0,
            gib_hour: 0.5,
            input_tokens_1k: 0.01,
            output_tokens_1k: 0.1,
            ..Default::default()
        };
        assert!((old.cost(&used) - (2.0 + 0.5 + 0.02 + 0.05)).abs() < 1e-9);
        let new = PriceTable { core_hour: 2.0, ..old };
        let by_version = BTreeMap::from([(1, used), (2, used)]);
        let prices = BTreeMap::from([(1, old), (2, new)]);
        assert!((cost_by_version(&by_version, &prices) - (2.57 + 4.57)).abs() < 1e-9);
        assert!(
            (PriceTable { gib_month: 3.0, ..Default::default() }
                .storage_cost(1 << 30, Duration::from_secs(30 * 86_400))
                - 3.0)
                .abs()
                < 1e-9
        );
    }
}
