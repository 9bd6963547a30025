//! The client API: submit, inspect, watch, cancel, logs, nodes.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use drover_core::JobPlan;
use drover_proto as pb;
use drover_proto::drover_server::Drover;
use drover_store::Signal;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::convert::{self, status};
use crate::downloads::{self, no_job, task_filter};
use crate::{Shared, now_ms, transfer};

/// Longest a stream waits for a change before checking the store again anyway.
const POLL_FALLBACK: Duration = Duration::from_secs(1);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub(crate) struct ClientApi(pub(crate) Arc<Shared>);

#[tonic::async_trait]
impl Drover for ClientApi {
    #[tracing::instrument(skip_all)]
    async fn submit(&self, req: Request<pb::SubmitRequest>) -> Result<Response<pb::SubmitResponse>, Status> {
        let req = req.into_inner();
        let plan: JobPlan = serde_json::from_str(&req.plan_json)
            .map_err(|e| Status::invalid_argument(format!("job plan is not valid: {e}")))?;
        plan.validate().map_err(|e| Status::invalid_argument(format!("job plan is not valid: {e}")))?;
        self.check_references(&plan).await?;
        let job_id =
            self.0.store.submit(&plan, &req.source, &req.filename, now_ms()).await.map_err(status)?;
        tracing::info!(job_id, tasks = plan.tasks.len(), name = %plan.name, "job submitted");
        self.0.publish(Signal::Changed { job_id }).await;
        self.0.publish(Signal::Schedule).await;
        Ok(Response::new(pb::SubmitResponse { job_id, tasks: plan.tasks.len() as u32 }))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let id = req.into_inner().job_id;
        let job = self.0.store.job(id).await.map_err(status)?.ok_or_else(|| no_job(id))?;
        let tasks = self.0.store.tasks(id).await.map_err(status)?;
        Ok(Response::new(convert::job(job, tasks)))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let req = req.into_inner();
        let limit = if req.limit == 0 { 50 } else { req.limit.min(10_000) };
        let jobs = self.0.store.list_jobs(limit, req.all).await.map_err(status)?;
        Ok(Response::new(pb::ListJobsResponse { jobs: jobs.into_iter().map(convert::summary).collect() }))
    }

    type WatchStream = BoxStream<pb::Event>;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let req = req.into_inner();
        let shared = self.0.clone();
        shared.store.job(req.job_id).await.map_err(status)?.ok_or_else(|| no_job(req.job_id))?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            let mut changes = shared.changes.subscribe();
            let mut after = req.after_seq;
            loop {
                changes.mark_unchanged();
                let events = match shared.store.events_after(req.job_id, after, 1000).await {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = tx.send(Err(status(e))).await;
                        return;
                    }
                };
                let mut ended = false;
                let caught_up = events.len() < 1000;
                for e in events {
                    after = e.seq;
                    ended |= e.kind == "job"
                        && e.state.parse::<drover_core::JobState>().is_ok_and(|s| s.is_final());
                    if tx.send(Ok(convert::event(e))).await.is_err() {
                        return;
                    }
                }
                if ended && caught_up {
                    // A final job can still change if a cancelled job had nothing left; check
                    // that the last event sent is the job's last.
                    match shared.store.job(req.job_id).await {
                        Ok(Some(j)) if j.last_seq <= after && j.state.is_final() => return,
                        _ => continue,
                    }
                }
                if caught_up {
                    let _ = tokio::time::timeout(POLL_FALLBACK, changes.changed()).await;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[tracing::instrument(skip_all)]
    async fn cancel(&self, req: Request<pb::CancelRequest>) -> Result<Response<pb::CancelResponse>, Status> {
        let id = req.into_inner().job_id;
        let open = self.0.store.cancel_job(id, now_ms()).await.map_err(status)?;
        tracing::info!(job_id = id, running = open.len(), "job cancelled");
        for a in &open {
            // The node's session may be held by another server; the signal reaches it there.
            self.0.publish(Signal::Cancel { attempt_id: a.attempt_id, node_id: a.node_id }).await;
        }
        self.0.publish(Signal::Changed { job_id: id }).await;
        let state =
            self.0.store.job(id).await.map_err(status)?.map(|j| j.state.to_string()).unwrap_or_default();
        Ok(Response::new(pb::CancelResponse { cancelled: open.len() as u32, state }))
    }

    type LogsStream = BoxStream<pb::LogBatch>;

    async fn logs(&self, req: Request<pb::LogsRequest>) -> Result<Response<Self::LogsStream>, Status> {
        let req = req.into_inner();
        let stream = downloads::logs(self.0.clone(), req.job_id, &req.task, req.follow, req.after_id).await?;
        Ok(Response::new(stream))
    }

    async fn put_blob(
        &self,
        req: Request<tonic::Streaming<pb::BlobChunk>>,
    ) -> Result<Response<pb::BlobRef>, Status> {
        let stored = transfer::put(&self.0.blobs, req.into_inner(), self.0.config.max_upload).await?;
        Ok(Response::new(stored))
    }

    async fn stat_blob(&self, req: Request<pb::BlobRef>) -> Result<Response<pb::BlobStat>, Status> {
        let digest = transfer::digest(&req.into_inner().digest)?;
        let size = self.0.blobs.stat(&digest).await.map_err(transfer::blob_status)?;
        Ok(Response::new(pb::BlobStat { exists: size.is_some(), size: size.unwrap_or(0) }))
    }

    type GetBlobStream = BoxStream<pb::BlobChunk>;

    async fn get_blob(&self, req: Request<pb::BlobRef>) -> Result<Response<Self::GetBlobStream>, Status> {
        let digest = transfer::digest(&req.into_inner().digest)?;
        Ok(Response::new(transfer::get(&self.0.blobs, &digest).await?))
    }

    async fn set_secret(
        &self,
        req: Request<pb::SetSecretRequest>,
    ) -> Result<Response<pb::SetSecretResponse>, Status> {
        let req = req.into_inner();
        let project = if req.project.is_empty() { "default".to_string() } else { req.project };
        if !drover_store::valid_secret_name(&req.name) {
            return Err(Status::invalid_argument(format!(
                "`{}` is not a secret name; use capitals, digits and `_`, like DB_PASSWORD",
                req.name
            )));
        }
        let created =
            self.0.secrets.set_secret(&project, &req.name, &req.value, now_ms()).await.map_err(status)?;
        tracing::info!(project = %project, name = %req.name, created, "secret set");
        Ok(Response::new(pb::SetSecretResponse { created }))
    }

    async fn list_secrets(
        &self,
        req: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        let req = req.into_inner();
        let project = if req.project.is_empty() { "default".to_string() } else { req.project };
        let names = self.0.secrets.secret_names(&project).await.map_err(status)?;
        Ok(Response::new(pb::ListSecretsResponse { names }))
    }

    async fn delete_secret(
        &self,
        req: Request<pb::DeleteSecretRequest>,
    ) -> Result<Response<pb::DeleteSecretResponse>, Status> {
        let req = req.into_inner();
        let project = if req.project.is_empty() { "default".to_string() } else { req.project };
        let deleted = self.0.secrets.delete_secret(&project, &req.name).await.map_err(status)?;
        Ok(Response::new(pb::DeleteSecretResponse { deleted }))
    }

    async fn usage(&self, req: Request<pb::UsageRequest>) -> Result<Response<pb::UsageResponse>, Status> {
        crate::usage::usage(&self.0, req.into_inner()).await.map(Response::new)
    }

    async fn list_artifacts(
        &self,
        req: Request<pb::ListArtifactsRequest>,
    ) -> Result<Response<pb::ListArtifactsResponse>, Status> {
        let req = req.into_inner();
        let filter = task_filter(&req.task)?;
        self.0.store.job(req.job_id).await.map_err(status)?.ok_or_else(|| no_job(req.job_id))?;
        let artifacts = self.0.artifacts.artifacts(req.job_id, &filter).await.map_err(status)?;
        Ok(Response::new(pb::ListArtifactsResponse {
            artifacts: artifacts.into_iter().map(convert::artifact).collect(),
        }))
    }

    type GetArtifactStream = BoxStream<pb::BlobChunk>;

    async fn get_artifact(
        &self,
        req: Request<pb::GetArtifactRequest>,
    ) -> Result<Response<Self::GetArtifactStream>, Status> {
        let req = req.into_inner();
        let download = downloads::artifact(&self.0, req.job_id, &req.task, &req.path).await?;
        Ok(Response::new(download.chunks))
    }

    async fn list_nodes(
        &self,
        _req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let mut nodes: Vec<pb::Node> =
            self.0.store.nodes().await.map_err(status)?.into_iter().map(convert::node).collect();
        let sessions = self.0.sessions.lock().unwrap_or_else(|e| e.into_inner());
        for node in &mut nodes {
            if let Some(session) = sessions.get(&node.id) {
                node.warm = session.warm.clone().into_iter().collect();
            }
        }
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }
}

impl ClientApi {
    /// Refuses a job that names secrets its project lacks or images the server does not have,
    /// before anything is stored.
    async fn check_references(&self, plan: &JobPlan) -> Result<(), Status> {
        let keys = plan.tasks.iter().filter_map(|t| t.agent.as_ref().and_then(|a| a.key_secret.clone()));
        let wanted: std::collections::BTreeSet<String> =
            plan.tasks.iter().flat_map(|t| t.secrets.iter().cloned()).chain(keys).collect();
        if !wanted.is_empty() {
            let wanted: Vec<String> = wanted.into_iter().collect();
            let found = self.0.secrets.secret_values(&plan.project, &wanted).await.map_err(status)?;
            let missing: Vec<&str> =
                wanted.iter().filter(|n| !found.contains_key(*n)).map(String::as_str).collect();
            if !missing.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "project `{}` has no secret {}; set it with `drover secrets set NAME --project {}` (value on stdin)",
                    plan.project,
                    missing.iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", "),
                    plan.project
                )));
            }
        }
        let blobs: std::collections::BTreeSet<&str> =
            plan.tasks.iter().filter_map(|t| t.image_blob.as_deref()).collect();
        for blob in blobs {
            let digest = transfer::digest(blob)?;
            if self.0.blobs.stat(&digest).await.map_err(transfer::blob_status)?.is_none() {
                return Err(Status::failed_precondition(format!(
                    "image archive {blob} was never uploaded; submit with the drover CLI, which uploads it"
                )));
            }
        }
        Ok(())
    }
}
