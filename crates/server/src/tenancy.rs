//! Projects' settings, quotas, budgets and cost as the server applies them: a submit that breaks
//! a setting or comes from a project whose budget is spent is refused; the scheduler keeps a
//! project inside its quota and holds its tasks once its budget is spent; usage is priced.
//!
//! Settings and the spend of budgets change slowly, so the scheduler reads them at most once
//! per [`REFRESH`]; holdings (what running tasks reserve) are read every round.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use drover_core::JobPlan;
use drover_core::placement::Room;
use drover_core::tenancy::{MeteredByVersion, PriceTable, ProjectSettings, cost_by_version};
use drover_store::{Holding, StoreError};
use tonic::Status;

use crate::convert::status;
use crate::{Shared, now_ms};

/// How long settings and budget spend are reused by the scheduler before being read again.
const REFRESH: Duration = Duration::from_secs(1);

/// What the scheduler knows of projects, refreshed every [`REFRESH`].
#[derive(Default)]
pub(crate) struct PolicyCache {
    cached: Mutex<Option<(Instant, Policy)>>,
}

/// Settings and budget state of every project.
#[derive(Clone, Default)]
pub(crate) struct Policy {
    settings: BTreeMap<String, ProjectSettings>,
    /// Projects whose budget is spent, with the hold reason.
    spent: BTreeMap<String, String>,
}

/// A round's view of projects for placement: who may take how much more, and who is held whole.
pub(crate) struct RoundLimits {
    /// Room under the quota of each project that has one.
    pub(crate) rooms: BTreeMap<String, Room>,
    /// Projects to leave out of the round, with why (a spent budget, a full quota).
    pub(crate) held: BTreeMap<String, String>,
    /// Projects with a quota or budget that are not held: any hold reason of theirs is stale.
    pub(crate) free: Vec<String>,
}

impl PolicyCache {
    async fn policy(&self, shared: &Shared) -> Result<Policy, StoreError> {
        if let Some((at, policy)) = &*self.cached.lock().unwrap_or_else(|e| e.into_inner())
            && at.elapsed() < REFRESH
        {
            return Ok(policy.clone());
        }
        let settings = shared.tenants.all_project_settings().await?;
        let mut spent = BTreeMap::new();
        let budgets: Vec<(&String, drover_core::tenancy::Budget)> =
            settings.iter().filter_map(|(p, s)| s.budget.map(|b| (p, b))).collect();
        if !budgets.is_empty() {
            let prices = shared.tenants.price_versions().await?;
            let now = now_ms();
            // One read per distinct period start (at most day, week and month).
            let mut by_start: BTreeMap<i64, BTreeMap<String, MeteredByVersion>> = BTreeMap::new();
            for (_, budget) in &budgets {
                let start = budget.period.start_ms(now);
                if let std::collections::btree_map::Entry::Vacant(e) = by_start.entry(start) {
                    e.insert(shared.tenants.metered_since(start, now).await?);
                }
            }
            for (project, budget) in budgets {
                let used = by_start
                    .get(&budget.period.start_ms(now))
                    .and_then(|m| m.get(project))
                    .map(|m| cost_by_version(m, &prices))
                    .unwrap_or(0.0);
                if used >= budget.amount {
                    spent.insert(
                        project.clone(),
                        format!("budget: {used:.2} of {:.2} spent this period", budget.amount),
                    );
                }
            }
        }
        let policy = Policy { settings, spent };
        *self.cached.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), policy.clone()));
        Ok(policy)
    }

    /// Forgets the cached policy (settings were just changed here).
    pub(crate) fn invalidate(&self) {
        *self.cached.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// What the next placement round may do, per project.
    pub(crate) async fn round(&self, shared: &Shared) -> Result<RoundLimits, StoreError> {
        let policy = self.policy(shared).await?;
        let limited: Vec<(&String, &ProjectSettings)> = policy
            .settings
            .iter()
            .filter(|(_, s)| {
                let q = &s.quota;
                q.cores.is_some() || q.memory.is_some() || q.tasks.is_some() || s.budget.is_some()
            })
            .collect();
        let mut limits = RoundLimits { rooms: BTreeMap::new(), held: policy.spent.clone(), free: Vec::new() };
        if limited.is_empty() {
            return Ok(limits);
        }
        let holdings = shared.tenants.holdings().await?;
        for (project, settings) in limited {
            if limits.held.contains_key(project) {
                continue;
            }
            let held = holdings.get(project).copied().unwrap_or_default();
            let room = room(&settings.quota, &held);
            // A quota already full holds the whole project: its tasks leave the round, so
            // they cannot fill it and keep other projects' tasks out.
            match full(&room) {
                Some(reason) => {
                    limits.held.insert(project.clone(), reason);
                }
                None => {
                    limits.rooms.insert(project.clone(), room);
                    limits.free.push(project.clone());
                }
            }
        }
        Ok(limits)
    }
}

/// A project's room from its quota and holdings.
fn room(quota: &drover_core::tenancy::Quota, held: &Holding) -> Room {
    Room {
        cores: quota.cores.map(|max| (held.cores, u64::from(max))),
        memory: quota.memory.map(|max| (held.memory, max)),
        tasks: quota.tasks.map(|max| (held.tasks, u64::from(max))),
    }
}

/// The reason a room takes nothing more (a limit reached), if so.
fn full(room: &Room) -> Option<String> {
    let at_limit = |what: &str, limit: Option<(u64, u64)>| match limit {
        Some((used, max)) if used >= max => Some(format!("project quota: {what} {used}/{max}")),
        _ => None,
    };
    at_limit("cores", room.cores).or_else(|| at_limit("tasks", room.tasks)).or_else(|| match room.memory {
        Some((used, max)) if used >= max => Some(format!(
            "project quota: memory {}/{}",
            drover_core::resources::format_memory(used),
            drover_core::resources::format_memory(max)
        )),
        _ => None,
    })
}

/// Refuses a plan that breaks its project's `settings` or whose project has spent its budget.
pub(crate) async fn check_submit(
    shared: &Shared,
    plan: &JobPlan,
    settings: &ProjectSettings,
) -> Result<(), Status> {
    settings.check(plan).map_err(|v| Status::failed_precondition(v.to_string()))?;
    if let Some(budget) = settings.budget {
        let spent = period_spend(shared, &plan.project, budget.period).await?;
        if spent.0 >= budget.amount {
            return Err(Status::failed_precondition(format!(
                "project `{}` has spent its budget: {:.2} of {:.2} this {}; ask an admin to raise it \
                 (`drover projects set {} budget=AMOUNT/PERIOD`) or wait for the next period",
                plan.project,
                spent.0,
                budget.amount,
                period_word(budget.period),
                plan.project
            )));
        }
    }
    Ok(())
}

fn period_word(period: drover_core::tenancy::Period) -> &'static str {
    match period {
        drover_core::tenancy::Period::Day => "day",
        drover_core::tenancy::Period::Week => "week",
        drover_core::tenancy::Period::Month => "month",
    }
}

/// What `project` spent in the current `period`, and when that period began.
pub(crate) async fn period_spend(
    shared: &Shared,
    project: &str,
    period: drover_core::tenancy::Period,
) -> Result<(f64, i64), Status> {
    let now = now_ms();
    let start = period.start_ms(now);
    let used = shared.tenants.metered_since(start, now).await.map_err(status)?;
    let prices = shared.tenants.price_versions().await.map_err(status)?;
    Ok((used.get(project).map(|m| cost_by_version(m, &prices)).unwrap_or(0.0), start))
}

/// Refuses to store `more` bytes for `project` past its stored-bytes quota.
pub(crate) async fn check_storage(shared: &Shared, project: &str, more: u64) -> Result<(), Status> {
    let settings = shared.tenants.project_settings(project).await.map_err(status)?.unwrap_or_default();
    let Some(max) = settings.quota.stored_bytes else { return Ok(()) };
    let stored = shared.tenants.stored_bytes(project).await.map_err(status)?;
    if stored.saturating_add(more) > max {
        return Err(Status::resource_exhausted(format!(
            "project quota: stored bytes {}/{} ({} more would not fit); delete old jobs' artifacts or ask an admin \
             to raise `quota.stored_bytes`",
            drover_core::resources::format_memory(stored),
            drover_core::resources::format_memory(max),
            drover_core::resources::format_memory(more)
        )));
    }
    Ok(())
}

/// The cost of metered use at the stored prices.
pub(crate) fn cost(used: &MeteredByVersion, prices: &BTreeMap<i64, PriceTable>) -> f64 {
    cost_by_version(used, prices)
}
