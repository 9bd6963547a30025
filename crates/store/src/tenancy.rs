//! What a shared farm keeps per project besides its jobs: settings and quotas, what its running
//! tasks hold, what it stores, what its work cost (per price-table version), and the audit trail
//! of every change anyone made.

use std::collections::BTreeMap;

use async_trait::async_trait;
use drover_core::tenancy::{Metered, MeteredByVersion, PriceTable, ProjectSettings};

use crate::pages::{self, List};
use crate::{Page, PageRequest, Result, StoreError};

/// What a project's open attempts hold right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Holding {
    /// Cores reserved.
    pub cores: u64,
    /// Memory reserved, bytes.
    pub memory: u64,
    /// Attempts assigned or running.
    pub tasks: u64,
}

/// One entry of the audit trail: who changed what, when, from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Increasing id; 0 before it is stored.
    pub id: i64,
    /// When it happened.
    pub time_ms: i64,
    /// Who: `key <id>`, `oidc <subject>`, `node <name>` or `anonymous`.
    pub actor: String,
    /// The address the call came from (`ip:port`), empty when unknown.
    pub address: String,
    /// The project it touched; `None` for cluster-wide changes (nodes, tokens, operator keys).
    pub project: Option<String>,
    /// What was done: `job.submit`, `job.cancel`, `key.create`, `key.revoke`, `secret.set`,
    /// `secret.delete`, `project.create`, `project.set`, `token.create`, `node.join`,
    /// `node.revoke`.
    pub action: String,
    /// What it was done to: a job id, key id, secret name, project or node name.
    pub target: String,
    /// More, for people (never a secret's value).
    pub detail: String,
}

/// Which audit records to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Only these projects' records (`None`: every record, cluster-wide ones included).
    pub projects: Option<Vec<String>>,
    /// Only records at or after this time.
    pub since_ms: Option<i64>,
    /// Only records with an id above this (for paging).
    pub after_id: i64,
    /// Most records to return.
    pub limit: u32,
}

/// What one job's attempts used, per price-table version (the version in force when each
/// attempt was assigned), by task.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobMetered {
    /// The job's project.
    pub project: String,
    /// Job id.
    pub job_id: i64,
    /// Per task id: its attempts' use per price version. A running attempt counts until now.
    pub tasks: BTreeMap<i64, MeteredByVersion>,
}

/// Settings, holdings, prices and the audit trail. Every method commits before it returns.
#[async_trait]
pub trait TenantStore: Send + Sync + 'static {
    /// One project's settings; `None` when there is no such project.
    async fn project_settings(&self, project: &str) -> Result<Option<ProjectSettings>>;

    /// Every project's settings, by name.
    async fn all_project_settings(&self) -> Result<BTreeMap<String, ProjectSettings>>;

    /// Replaces a project's settings; `false` when there is no such project.
    async fn set_project_settings(&self, project: &str, settings: &ProjectSettings) -> Result<bool>;

    /// What the open attempts (assigned or running) of each project hold; projects holding
    /// nothing are absent.
    async fn holdings(&self) -> Result<BTreeMap<String, Holding>>;

    /// Bytes of the blobs a project holds (see [`crate::AccessStore::blob_projects`]).
    async fn stored_bytes(&self, project: &str) -> Result<u64>;

    /// The project of an attempt's job; `None` for an unknown attempt.
    async fn attempt_project(&self, attempt_id: i64) -> Result<Option<String>>;

    /// Sets the reason of queued tasks (why they wait: a quota, a budget); tasks no longer
    /// queued are left alone, and a reason already set is not written again. No event is
    /// appended (a reason is not a change of state). On PostgreSQL a task another transaction
    /// holds at that moment (being assigned, say) is passed over rather than waited for.
    async fn set_queue_reasons(&self, reasons: &[(i64, String)]) -> Result<()>;

    /// Sets the reason of every queued task of `project` (`""` clears reasons that a hold set,
    /// those starting with `project quota` or `budget`, and leaves others, such as a retry's,
    /// alone). Like [`set_queue_reasons`](Self::set_queue_reasons): no event, no rewrite of
    /// an equal reason. [`crate::Store::assign`] clears the reason of every task it assigns.
    async fn set_project_queue_reason(&self, project: &str, reason: &str) -> Result<()>;

    /// Records the price table in force from `now_ms` if it differs from the latest one, and
    /// returns the version now in force (attempts assigned from now on carry it). An all-zero
    /// table is stored too: it means "free from now on". Before any table is stored, an
    /// all-zero one changes nothing and the answer is version 0 (what attempts carry before
    /// any prices, and what [`price_versions`](Self::price_versions) never lists). Servers
    /// sharing a store that record the same table at once get the same version.
    async fn record_prices(&self, prices: &PriceTable, now_ms: i64) -> Result<i64>;

    /// Every price-table version.
    async fn price_versions(&self) -> Result<BTreeMap<i64, PriceTable>>;

    /// What the attempts of the jobs `filter` selects used, per task and price version (cores
    /// and memory reserved × the seconds from start to end, or to `now_ms` while running, and
    /// LLM tokens), ordered by project and job id. Every selected job is listed, one without
    /// attempts with no tasks; an attempt that never started is listed with zero use.
    async fn metered(&self, filter: &crate::UsageFilter, now_ms: i64) -> Result<Vec<JobMetered>>;

    /// What each project's attempts assigned at or after `since_ms` used, per price version:
    /// the spend of a budget's period. An attempt assigned before `since_ms` does not count,
    /// not even for the part of its run after it. Projects without such attempts are absent.
    /// Attempts of jobs that retention deleted still count, by the UTC day they were assigned
    /// on (`since_ms` is a period's start, a day's).
    async fn metered_since(&self, since_ms: i64, now_ms: i64) -> Result<BTreeMap<String, MeteredByVersion>>;

    /// What the jobs retention deleted used, per project (only `project`'s when given), in
    /// project order. Projects that never had a job deleted are absent.
    async fn retired_usage(&self, project: Option<&str>) -> Result<Vec<crate::RetiredUsage>>;

    /// Appends a record to the audit trail and returns its id.
    async fn append_audit(&self, record: &AuditRecord) -> Result<i64>;

    /// Audit records, oldest (lowest id) first: at most `limit` of them (0: 1,000; never more
    /// than 10,000). Ids become visible in increasing order, so paging with `after_id` never
    /// skips a record.
    async fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>>;

    /// A page of [`audit`](Self::audit) records, oldest first: the page's position and size
    /// take the place of the filter's `after_id` and `limit` (a filter's `after_id` still
    /// holds as a floor).
    async fn list_audit(&self, filter: &AuditFilter, page: &PageRequest) -> Result<Page<AuditRecord>> {
        let at = pages::open::<i64>(List::Audit, page)?;
        let after_id = at.after.unwrap_or(filter.after_id).max(filter.after_id);
        let read = AuditFilter { after_id, limit: at.size + 1, ..filter.clone() };
        let records = self.audit(&read).await?;
        pages::close(List::Audit, &at, records, |r| r.id)
    }
}

/// Reasons a hold sets on queued tasks (a project's quota, its budget), and the only ones
/// [`TenantStore::set_project_queue_reason`] with `""` clears: a retry's `retrying in ...` or a
/// dependency's reason is not a hold's to remove.
pub(crate) const HOLD_PREFIXES: [&str; 2] = ["project quota", "budget"];

/// Audit records returned when a filter asks for 0.
const AUDIT_DEFAULT_LIMIT: u32 = 1_000;

/// Most audit records one call returns, whatever the filter asks.
const AUDIT_MAX_LIMIT: u32 = 10_000;

/// The row limit of an audit read: 0 means the default, and nothing above the cap.
pub(crate) fn audit_limit(limit: u32) -> i64 {
    i64::from(if limit == 0 { AUDIT_DEFAULT_LIMIT } else { limit.min(AUDIT_MAX_LIMIT) })
}

/// Decodes a project's stored settings. Every field has a serde default, so `{}` (what the
/// migration gives existing projects) and an empty text both read as the defaults.
pub(crate) fn decode_settings(text: &str) -> Result<ProjectSettings> {
    if text.trim().is_empty() {
        return Ok(ProjectSettings::default());
    }
    serde_json::from_str(text).map_err(|e| corrupt("project settings", e))
}

/// Encodes settings for storage.
pub(crate) fn encode_settings(settings: &ProjectSettings) -> Result<String> {
    serde_json::to_string(settings).map_err(|e| corrupt("project settings", e))
}

/// Decodes a stored price table.
pub(crate) fn decode_prices(text: &str) -> Result<PriceTable> {
    serde_json::from_str(text).map_err(|e| corrupt("price table", e))
}

/// Encodes a price table for storage.
pub(crate) fn encode_prices(prices: &PriceTable) -> Result<String> {
    serde_json::to_string(prices).map_err(|e| corrupt("price table", e))
}

/// Whether the stored table `text` holds `prices`. The texts are compared first: without
/// serde_json's `float_roundtrip` a decoded price may be one ulp off what was encoded, and a
/// table that never compared equal would add a version every time the server starts.
pub(crate) fn same_prices(text: &str, prices: &PriceTable) -> Result<bool> {
    Ok(text == encode_prices(prices)? || decode_prices(text)? == *prices)
}

/// Use of one (job, task, price version) group as the metering queries sum it: `task_id` is
/// `None` for a job without attempts, which is listed with no tasks.
pub(crate) struct MeteredRow {
    pub(crate) project: String,
    pub(crate) job_id: i64,
    pub(crate) task_id: Option<i64>,
    pub(crate) version: i64,
    pub(crate) used: Metered,
}

/// [`Metered`] from the sums the metering queries return: reserved cores and bytes, each
/// multiplied by milliseconds held, and tokens. GPUs are not reserved yet.
pub(crate) fn metered(core_ms: f64, byte_ms: f64, input_tokens: u64, output_tokens: u64) -> Metered {
    const GIB: f64 = (1u64 << 30) as f64;
    Metered {
        core_seconds: core_ms / 1000.0,
        gib_seconds: byte_ms / GIB / 1000.0,
        gpu_seconds: 0.0,
        input_tokens,
        output_tokens,
    }
}

/// Adds what `project` used under price `version` to a spend by project and version.
pub(crate) fn add_spend(
    spend: &mut BTreeMap<String, MeteredByVersion>,
    project: String,
    version: i64,
    used: Metered,
) {
    let by_version = spend.entry(project).or_default();
    let sum = by_version.get(&version).copied().unwrap_or_default().plus(used);
    by_version.insert(version, sum);
}

/// Folds rows ordered by project, each a project's retired usage with one price version's
/// spend (none for a project without any), into one [`RetiredUsage`](crate::RetiredUsage) per
/// project.
pub(crate) fn group_retired(
    rows: impl IntoIterator<Item = (crate::RetiredUsage, Option<(i64, Metered)>)>,
) -> Vec<crate::RetiredUsage> {
    let mut out: Vec<crate::RetiredUsage> = Vec::new();
    for (usage, spend) in rows {
        if out.last().is_none_or(|u| u.project != usage.project) {
            out.push(usage);
        }
        if let (Some(u), Some((version, used))) = (out.last_mut(), spend) {
            let sum = u.spend.get(&version).copied().unwrap_or_default().plus(used);
            u.spend.insert(version, sum);
        }
    }
    out
}

/// Folds rows ordered by job into one [`JobMetered`] per job, in the rows' order.
pub(crate) fn group_metered(rows: impl IntoIterator<Item = MeteredRow>) -> Vec<JobMetered> {
    let mut out: Vec<JobMetered> = Vec::new();
    for row in rows {
        if out.last().is_none_or(|j| j.job_id != row.job_id) {
            out.push(JobMetered { project: row.project, job_id: row.job_id, tasks: BTreeMap::new() });
        }
        let (Some(job), Some(task_id)) = (out.last_mut(), row.task_id) else { continue };
        let by_version = job.tasks.entry(task_id).or_default();
        let sum = by_version.entry(row.version).or_default();
        *sum = sum.plus(row.used);
    }
    out
}

fn corrupt(what: &'static str, detail: impl ToString) -> StoreError {
    StoreError::Corrupt { what, detail: detail.to_string() }
}
