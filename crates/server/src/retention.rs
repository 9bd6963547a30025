//! Retention: deletes ended jobs past their project's retention (`retention`, or the server's
//! `--log-retention`), then the blobs nothing points to any more. Only the server holding the
//! `retention` leadership runs it, a bounded amount of work per round.
//!
//! A blob file goes only after the store marked it as being deleted, which it does only for a
//! digest nothing has referenced for `blob_grace`; see [`drover_store::retention`] for why a
//! new upload of the same digest at that moment is either kept or told to upload again, never
//! left pointing to a missing file.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use drover_core::tenancy::ProjectSettings;
use drover_store::Signal;

use crate::{Shared, now_ms};

/// Most jobs deleted per round, across projects.
const JOBS_PER_ROUND: u32 = 200;
/// Most blobs deleted per round.
const BLOBS_PER_ROUND: u32 = 500;

/// How long blobs stay after nothing references them, by default.
pub const DEFAULT_BLOB_GRACE: Duration = Duration::from_secs(3600);

/// The end before which each project's jobs are past retention at `now_ms`: its own
/// `retention`, else `default`.
pub(crate) fn cutoffs(
    settings: &BTreeMap<String, ProjectSettings>,
    default: Duration,
    now_ms: i64,
) -> BTreeMap<String, i64> {
    settings
        .iter()
        .map(|(project, s)| {
            let keep = i64::try_from(s.retention.unwrap_or(default).as_millis()).unwrap_or(i64::MAX);
            (project.clone(), now_ms.saturating_sub(keep))
        })
        .collect()
}

/// Runs retention rounds while this server leads `retention`.
pub(crate) async fn retention(shared: Arc<Shared>) {
    let period = shared.config.retention_tick;
    loop {
        let lead = match shared.store.try_lead("retention").await {
            Ok(Some(lead)) => lead,
            Ok(None) => {
                tokio::time::sleep(period).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot try to lead retention");
                tokio::time::sleep(period).await;
                continue;
            }
        };
        tracing::info!("leading retention");
        while lead.is_held() {
            delete_expired_jobs(&shared).await;
            collect_blobs(&shared).await;
            tokio::time::sleep(period).await;
        }
        tracing::warn!("lost the retention leadership");
    }
}

/// Deletes up to [`JOBS_PER_ROUND`] jobs past their project's retention.
pub(crate) async fn delete_expired_jobs(shared: &Shared) {
    let settings = match shared.tenants.all_project_settings().await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot read project settings for retention");
            return;
        }
    };
    let now = now_ms();
    let mut budget = JOBS_PER_ROUND;
    for (project, before) in cutoffs(&settings, shared.config.log_retention, now) {
        if budget == 0 {
            return;
        }
        let ids = match shared.retention.expired_jobs(&project, before, budget).await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::error!(%project, error = %e, "cannot list jobs past retention");
                continue;
            }
        };
        for job_id in ids {
            budget = budget.saturating_sub(1);
            match shared.retention.delete_job(job_id, now).await {
                Ok(Some(unreferenced)) => {
                    tracing::info!(
                        job_id,
                        %project,
                        digests = unreferenced.len(),
                        "job past retention deleted"
                    );
                    shared.publish(Signal::Changed { job_id }).await;
                }
                // Restarted or deleted by another server in the meantime: nothing to do.
                Ok(None) => {}
                Err(e) => tracing::error!(job_id, %project, error = %e, "cannot delete a job past retention"),
            }
        }
    }
}

/// Deletes up to [`BLOBS_PER_ROUND`] blobs nothing has referenced for the grace period.
pub(crate) async fn collect_blobs(shared: &Shared) {
    let grace = i64::try_from(shared.config.blob_grace.as_millis()).unwrap_or(i64::MAX);
    let doomed = match shared.retention.doom_blobs(now_ms().saturating_sub(grace), BLOBS_PER_ROUND).await {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "cannot pick unreferenced blobs");
            return;
        }
    };
    if doomed.is_empty() {
        return;
    }
    let mut deleted = Vec::with_capacity(doomed.len());
    for digest in doomed {
        let parsed = match digest.parse::<drover_blobs::Digest>() {
            Ok(p) => p,
            Err(e) => {
                // Never a file of the blob store: nothing to delete, only the mark to drop.
                tracing::warn!(%digest, error = %e, "unreferenced blob has no valid digest");
                deleted.push(digest);
                continue;
            }
        };
        match shared.blobs.delete(&parsed).await {
            Ok(()) => deleted.push(digest),
            // Still marked as being deleted, so the next round tries again.
            Err(e) => tracing::warn!(%digest, error = %e, "cannot delete an unreferenced blob"),
        }
    }
    if let Err(e) = shared.retention.blobs_deleted(&deleted).await {
        tracing::error!(error = %e, "cannot record deleted blobs; the next round deletes them again");
        return;
    }
    tracing::info!(digests = deleted.len(), "unreferenced blobs deleted");
}

/// Errors of claiming a blob just written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClaimError {
    #[error(transparent)]
    Store(#[from] drover_store::StoreError),
    #[error(transparent)]
    Blob(#[from] drover_blobs::BlobError),
    #[error("blob {0} is being deleted as unreferenced; store it again in a moment")]
    BeingDeleted(String),
}

impl From<ClaimError> for tonic::Status {
    fn from(e: ClaimError) -> tonic::Status {
        match e {
            ClaimError::Store(e) => crate::convert::status(e),
            ClaimError::Blob(e) => crate::transfer::blob_status(e),
            // Retryable: once the deletion ends, the same upload stores the blob anew.
            e @ ClaimError::BeingDeleted(_) => tonic::Status::unavailable(e.to_string()),
        }
    }
}

/// Claims a blob just written (see [`drover_store::RetentionStore::claim_blob`]) and checks
/// its file is still there: a deletion that ended between the write and the claim took it.
pub(crate) async fn claim(shared: &Shared, digest: &drover_blobs::Digest) -> Result<(), ClaimError> {
    let text = digest.to_string();
    if !shared.retention.claim_blob(&text, now_ms()).await? || shared.blobs.stat(digest).await?.is_none() {
        return Err(ClaimError::BeingDeleted(text));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_project_keeps_its_own_retention_or_the_default() {
        let mut settings = BTreeMap::new();
        settings.insert("default".to_string(), ProjectSettings::default());
        let mut long = ProjectSettings::default();
        long.set("retention", "10s").unwrap();
        settings.insert("long".to_string(), long);
        let cut = cutoffs(&settings, Duration::from_secs(1), 100_000);
        assert_eq!(cut["default"], 99_000);
        assert_eq!(cut["long"], 90_000);
        let forever = cutoffs(&settings, Duration::MAX, 100_000);
        assert_eq!(forever["default"], 100_000 - i64::MAX, "saturates rather than overflows");
    }
}
