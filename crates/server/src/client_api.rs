//! The client API: submit, inspect, watch, cancel, logs, nodes.

use std::pin::Pin;
use std::sync::Arc;

use drover_core::{JobPlan, Role};
use drover_proto as pb;
use drover_proto::drover_server::Drover;
use drover_store::Signal;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::access_api::{self, no_project, require_project};
use crate::audit::{self, Change};
use crate::auth::{self, Caller};
use crate::convert::{self, status};
use crate::downloads::{self, no_job, task_filter};
use crate::streams::{self, StreamKind};
use crate::{Shared, now_ms, paging, transfer};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub(crate) struct ClientApi(pub(crate) Arc<Shared>);

#[tonic::async_trait]
impl Drover for ClientApi {
    #[tracing::instrument(skip_all)]
    async fn submit(&self, req: Request<pb::SubmitRequest>) -> Result<Response<pb::SubmitResponse>, Status> {
        let caller = self.caller(&req).await?;
        let from = req.remote_addr();
        self.0.disk.check("a submit")?;
        let req = req.into_inner();
        let plan = crate::intake::decode_plan(&req)?;
        let settings = require_project(&self.0, &caller, &plan.project, Role::Submitter).await?;
        crate::tenancy::check_submit(&self.0, &plan, &settings).await?;
        self.check_references(&plan).await?;
        let job_id =
            self.0.store.submit(&plan, &req.source, &req.filename, now_ms()).await.map_err(status)?;
        tracing::info!(job_id, tasks = plan.tasks.len(), name = %plan.name, by = %caller.who(), "job submitted");
        // Placement first: the audit record is another write, and the job waits on no one.
        self.0.publish(Signal::Schedule).await;
        self.0.publish(Signal::Changed { job_id }).await;
        let what = format!("{} ({} tasks)", plan.name, plan.tasks.len());
        audit::record(&self.0, &caller, from, Change::of(&plan.project, "job.submit", job_id).detail(what))
            .await;
        Ok(Response::new(pb::SubmitResponse { job_id, tasks: plan.tasks.len() as u32 }))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let caller = self.caller(&req).await?;
        let id = req.into_inner().job_id;
        let (job, tasks) = visible_job_with_tasks(&self.0, &caller, id, Role::Viewer).await?;
        Ok(Response::new(convert::job(job, tasks)))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let caller = self.caller(&req).await?;
        caller.require_person()?;
        let req = req.into_inner();
        let page = paging::page_or_limit(req.page_size, req.limit, req.page_token);
        // The caller's projects filter every page: a token only says where to continue.
        let projects = caller.visible().filter();
        let jobs = self.0.store.list_jobs(req.all, projects.as_deref(), &page).await.map_err(status)?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.items.into_iter().map(convert::summary).collect(),
            next_page_token: jobs.next_token,
        }))
    }

    type WatchStream = BoxStream<pb::Event>;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let shared = self.0.clone();
        visible_job(&shared, &caller, req.job_id, Role::Viewer).await?;
        let (tx, rx) = mpsc::channel(256);
        let open = shared.streams.open(StreamKind::Watch);
        tokio::spawn(async move {
            let _open = open;
            let mut changes = shared.changes.subscribe();
            let mut after = req.after_seq;
            // Whether the latest job event sent says the job is final. Kept across pages: the
            // page that ends with it may be full, and the next one then empty.
            let mut ended = false;
            loop {
                changes.mark_unchanged();
                let events = match shared.store.events_after(req.job_id, after, 1000).await {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = tx.send(Err(status(e))).await;
                        return;
                    }
                };
                let caught_up = events.len() < 1000;
                for e in events {
                    after = e.seq;
                    if e.kind == "job" {
                        ended = e.state.parse::<drover_core::JobState>().is_ok_and(|s| s.is_final());
                    }
                    if tx.send(Ok(convert::event(e))).await.is_err() {
                        return;
                    }
                }
                if ended && caught_up {
                    // A final job can still change if a cancelled job had nothing left; check
                    // that the last event sent is the job's last.
                    match shared.store.job(req.job_id).await {
                        Ok(Some(j)) if j.last_seq <= after && j.state.is_final() => return,
                        // Events committed since the page was read: read them now.
                        Ok(Some(j)) if j.last_seq > after => continue,
                        // Otherwise the next change brings what is missing.
                        _ => {}
                    }
                }
                if caught_up && !streams::wait_for_change(&mut changes, &tx).await {
                    tracing::debug!(job_id = req.job_id, after_seq = after, "watch client left");
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[tracing::instrument(skip_all)]
    async fn cancel(&self, req: Request<pb::CancelRequest>) -> Result<Response<pb::CancelResponse>, Status> {
        let caller = self.caller(&req).await?;
        let from = req.remote_addr();
        let id = req.into_inner().job_id;
        let job = visible_job(&self.0, &caller, id, Role::Submitter).await?;
        let open = self.0.store.cancel_job(id, now_ms()).await.map_err(status)?;
        tracing::info!(job_id = id, running = open.len(), by = %caller.who(), "job cancelled");
        audit::record(&self.0, &caller, from, Change::of(&job.project, "job.cancel", id)).await;
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
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        visible_job(&self.0, &caller, req.job_id, Role::Viewer).await?;
        let stream =
            downloads::logs(self.0.clone(), req.job_id, &req.task, req.follow, req.after_id, req.chunks)
                .await?;
        Ok(Response::new(stream))
    }

    async fn put_blob(
        &self,
        req: Request<tonic::Streaming<pb::BlobChunk>>,
    ) -> Result<Response<pb::BlobRef>, Status> {
        let caller = self.caller(&req).await?;
        let mut stream = req.into_inner();
        let first = stream.next().await.ok_or_else(|| Status::invalid_argument("empty upload"))??;
        // Agents upload outputs (their records name the project); everyone else uploads for a
        // project they can submit to, which then holds the blob.
        let project = match &caller {
            Caller::Node { .. } => None,
            _ if first.project.is_empty() => {
                return Err(Status::invalid_argument("an upload names its project in its first chunk"));
            }
            _ => {
                require_project(&self.0, &caller, &first.project, Role::Submitter).await?;
                Some(first.project.clone())
            }
        };
        // Agents' outputs belong to work the server accepted already: the space kept free is
        // for them.
        if project.is_some() {
            self.0.disk.check("an upload")?;
        }
        if let Some(project) = &project {
            // The announced size is checked before anything is stored (unless the project holds
            // the announced blob already), the real one after.
            let held = !first.digest.is_empty()
                && self.0.access.blob_projects(&first.digest).await.map_err(status)?.contains(project);
            if !held {
                crate::tenancy::check_storage(&self.0, project, first.size).await?;
            }
        }
        let stored = transfer::put(&self.0.blobs, first, stream, self.0.config.max_upload).await?;
        // Whoever uploads a blob means to use it: a deletion of the digest as unreferenced must
        // not take it from under the reference that follows.
        crate::retention::claim(&self.0, &transfer::digest(&stored.digest)?).await?;
        if let Some(project) = project {
            let held = self.0.access.blob_projects(&stored.digest).await.map_err(status)?.contains(&project);
            if !held {
                crate::tenancy::check_storage(&self.0, &project, stored.size).await?;
            }
            self.0
                .access
                .add_project_blob(&project, &stored.digest, stored.size, now_ms())
                .await
                .map_err(status)?;
        }
        Ok(Response::new(stored))
    }

    async fn stat_blob(&self, req: Request<pb::BlobRef>) -> Result<Response<pb::BlobStat>, Status> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let digest = transfer::digest(&req.digest)?;
        // A blob the caller cannot reach answers as a missing one: a digest alone tells nothing.
        if !self.may_read_blob(&caller, &req.project, &req.digest).await? {
            return Ok(Response::new(pb::BlobStat { exists: false, size: 0 }));
        }
        let size = self.0.blobs.stat(&digest).await.map_err(transfer::blob_status)?;
        Ok(Response::new(pb::BlobStat { exists: size.is_some(), size: size.unwrap_or(0) }))
    }

    type GetBlobStream = BoxStream<pb::BlobChunk>;

    async fn get_blob(&self, req: Request<pb::BlobRef>) -> Result<Response<Self::GetBlobStream>, Status> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let digest = transfer::digest(&req.digest)?;
        if !self.may_read_blob(&caller, &req.project, &req.digest).await? {
            return Err(transfer::blob_status(drover_blobs::BlobError::NotFound { digest }));
        }
        Ok(Response::new(transfer::get(&self.0.blobs, &digest).await?))
    }

    async fn set_secret(
        &self,
        req: Request<pb::SetSecretRequest>,
    ) -> Result<Response<pb::SetSecretResponse>, Status> {
        let caller = self.caller(&req).await?;
        let from = req.remote_addr();
        let req = req.into_inner();
        let project = if req.project.is_empty() { "default".to_string() } else { req.project };
        require_project(&self.0, &caller, &project, Role::Admin).await?;
        if !drover_store::valid_secret_name(&req.name) {
            return Err(Status::invalid_argument(format!(
                "`{}` is not a secret name; use capitals, digits and `_`, like DB_PASSWORD",
                req.name
            )));
        }
        let created =
            self.0.secrets.set_secret(&project, &req.name, &req.value, now_ms()).await.map_err(status)?;
        tracing::info!(project = %project, name = %req.name, created, by = %caller.who(), "secret set");
        audit::record(&self.0, &caller, from, Change::of(&project, "secret.set", &req.name)).await;
        Ok(Response::new(pb::SetSecretResponse { created }))
    }

    async fn list_secrets(
        &self,
        req: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let project = if req.project.is_empty() { "default".to_string() } else { req.project };
        require_project(&self.0, &caller, &project, Role::Submitter).await?;
        let page = paging::page(req.page_size, req.page_token);
        let names = self.0.secrets.list_secret_names(&project, &page).await.map_err(status)?;
        Ok(Response::new(pb::ListSecretsResponse { names: names.items, next_page_token: names.next_token }))
    }

    async fn delete_secret(
        &self,
        req: Request<pb::DeleteSecretRequest>,
    ) -> Result<Response<pb::DeleteSecretResponse>, Status> {
        let caller = self.caller(&req).await?;
        let from = req.remote_addr();
        let req = req.into_inner();
        let project = if req.project.is_empty() { "default".to_string() } else { req.project };
        require_project(&self.0, &caller, &project, Role::Admin).await?;
        let deleted = self.0.secrets.delete_secret(&project, &req.name).await.map_err(status)?;
        tracing::info!(project = %project, name = %req.name, deleted, by = %caller.who(), "secret deleted");
        if deleted {
            audit::record(&self.0, &caller, from, Change::of(&project, "secret.delete", &req.name)).await;
        }
        Ok(Response::new(pb::DeleteSecretResponse { deleted }))
    }

    async fn usage(&self, req: Request<pb::UsageRequest>) -> Result<Response<pb::UsageResponse>, Status> {
        let caller = self.caller(&req).await?;
        caller.require_person()?;
        let req = req.into_inner();
        if req.job_id != 0 {
            visible_job(&self.0, &caller, req.job_id, Role::Viewer).await?;
        }
        if !req.project.is_empty() {
            let project = req.project.clone();
            caller.require(&project, Role::Viewer, || no_project(&project))?;
        } else if let auth::Visible::Some(projects) = caller.visible() {
            // Only the caller's projects: one filter per project, summed rows kept apart.
            return usage_of_projects(&self.0, &projects).await.map(Response::new);
        }
        crate::usage::usage(&self.0, req).await.map(Response::new)
    }

    async fn list_artifacts(
        &self,
        req: Request<pb::ListArtifactsRequest>,
    ) -> Result<Response<pb::ListArtifactsResponse>, Status> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let filter = task_filter(&req.task)?;
        visible_job(&self.0, &caller, req.job_id, Role::Viewer).await?;
        let page = paging::page(req.page_size, req.page_token);
        let artifacts = self.0.artifacts.list_artifacts(req.job_id, &filter, &page).await.map_err(status)?;
        Ok(Response::new(pb::ListArtifactsResponse {
            artifacts: artifacts.items.into_iter().map(convert::artifact).collect(),
            next_page_token: artifacts.next_token,
        }))
    }

    type GetArtifactStream = BoxStream<pb::BlobChunk>;

    async fn get_artifact(
        &self,
        req: Request<pb::GetArtifactRequest>,
    ) -> Result<Response<Self::GetArtifactStream>, Status> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        visible_job(&self.0, &caller, req.job_id, Role::Viewer).await?;
        let download = downloads::artifact(&self.0, req.job_id, &req.task, &req.path).await?;
        Ok(Response::new(download.chunks))
    }

    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        // Every person may see the fleet (what it offers is not any project's data).
        self.caller(&req).await?.require_person()?;
        let req = req.into_inner();
        let page =
            self.0.store.list_nodes(&paging::page(req.page_size, req.page_token)).await.map_err(status)?;
        let mut nodes: Vec<pb::Node> = page.items.into_iter().map(convert::node).collect();
        let sessions = self.0.sessions.lock().unwrap_or_else(|e| e.into_inner());
        for node in &mut nodes {
            if let Some(session) = sessions.get(&node.id) {
                node.warm = session.warm.clone().into_iter().collect();
            }
        }
        Ok(Response::new(pb::ListNodesResponse { nodes, next_page_token: page.next_token }))
    }

    async fn who_am_i(
        &self,
        req: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        Ok(Response::new(access_api::who_am_i(&self.caller(&req).await?)))
    }

    #[tracing::instrument(skip_all)]
    async fn create_key(
        &self,
        req: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        let caller = self.caller(&req).await?;
        let from = req.remote_addr();
        access_api::create_key(&self.0, &caller, from, req.into_inner()).await.map(Response::new)
    }

    async fn list_keys(
        &self,
        req: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let caller = self.caller(&req).await?;
        access_api::list_keys(&self.0, &caller, req.into_inner()).await.map(Response::new)
    }

    #[tracing::instrument(skip_all)]
    async fn revoke_key(
        &self,
        req: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::RevokeKeyResponse>, Status> {
        let caller = self.caller(&req).await?;
        let from = req.remote_addr();
        access_api::revoke_key(&self.0, &caller, from, req.into_inner()).await.map(Response::new)
    }

    #[tracing::instrument(skip_all)]
    async fn create_project(
        &self,
        req: Request<pb::CreateProjectRequest>,
    ) -> Result<Response<pb::CreateProjectResponse>, Status> {
        let caller = self.caller(&req).await?;
        let from = req.remote_addr();
        access_api::create_project(&self.0, &caller, from, req.into_inner()).await.map(Response::new)
    }

    async fn list_projects(
        &self,
        req: Request<pb::ListProjectsRequest>,
    ) -> Result<Response<pb::ListProjectsResponse>, Status> {
        let caller = self.caller(&req).await?;
        access_api::list_projects(&self.0, &caller, req.into_inner()).await.map(Response::new)
    }

    #[tracing::instrument(skip_all)]
    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let caller = self.caller(&req).await?;
        let from = req.remote_addr();
        access_api::create_join_token(&self.0, &caller, from, req.into_inner()).await.map(Response::new)
    }

    #[tracing::instrument(skip_all)]
    async fn revoke_node(
        &self,
        req: Request<pb::RevokeNodeRequest>,
    ) -> Result<Response<pb::RevokeNodeResponse>, Status> {
        let caller = self.caller(&req).await?;
        let from = req.remote_addr();
        access_api::revoke_node(&self.0, &caller, from, req.into_inner()).await.map(Response::new)
    }

    async fn get_project(
        &self,
        req: Request<pb::GetProjectRequest>,
    ) -> Result<Response<pb::ProjectInfo>, Status> {
        let caller = self.caller(&req).await?;
        crate::projects_api::get(&self.0, &caller, req.into_inner()).await.map(Response::new)
    }

    #[tracing::instrument(skip_all)]
    async fn set_project_settings(
        &self,
        req: Request<pb::SetProjectSettingsRequest>,
    ) -> Result<Response<pb::ProjectInfo>, Status> {
        let caller = self.caller(&req).await?;
        let from = req.remote_addr();
        crate::projects_api::set(&self.0, &caller, from, req.into_inner()).await.map(Response::new)
    }

    async fn audit(&self, req: Request<pb::AuditRequest>) -> Result<Response<pb::AuditResponse>, Status> {
        let caller = self.caller(&req).await?;
        audit::list(&self.0, &caller, req.into_inner()).await.map(Response::new)
    }
}

/// Usage of several projects, each queried on its own and the answers joined.
async fn usage_of_projects(shared: &Shared, projects: &[String]) -> Result<pb::UsageResponse, Status> {
    let mut all = pb::UsageResponse::default();
    for project in projects {
        let req = pb::UsageRequest { project: project.clone(), job_id: 0 };
        let part = crate::usage::usage(shared, req).await?;
        all.projects.extend(part.projects);
        all.jobs.extend(part.jobs);
    }
    Ok(all)
}

/// A job the caller may act on with role `need`; another project's job answers as a missing one.
pub(crate) async fn visible_job(
    shared: &Shared,
    caller: &Caller,
    job_id: i64,
    need: Role,
) -> Result<drover_store::JobRecord, Status> {
    let job = shared.store.job(job_id).await.map_err(status)?.ok_or_else(|| no_job(job_id))?;
    caller.require(&job.project, need, || no_job(job_id))?;
    Ok(job)
}

/// Job `job_id` with its tasks, read at one moment, when `caller` holds `need` in its project;
/// "no such job" otherwise, as for a job that does not exist.
pub(crate) async fn visible_job_with_tasks(
    shared: &Shared,
    caller: &Caller,
    job_id: i64,
    need: Role,
) -> Result<(drover_store::JobRecord, Vec<drover_store::TaskRecord>), Status> {
    let (job, tasks) =
        shared.store.job_with_tasks(job_id).await.map_err(status)?.ok_or_else(|| no_job(job_id))?;
    caller.require(&job.project, need, || no_job(job_id))?;
    Ok((job, tasks))
}

impl ClientApi {
    async fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        auth::caller(&self.0, req).await
    }

    /// Whether the caller may read blob `digest`: a person through a project it can see that
    /// holds the blob, an agent when it runs a task of a project that holds it.
    async fn may_read_blob(&self, caller: &Caller, project: &str, digest: &str) -> Result<bool, Status> {
        match caller {
            Caller::Node { name, .. } => {
                let Some(node_id) = self.node_id(name).await? else { return Ok(false) };
                self.0.access.node_may_read_blob(node_id, digest).await.map_err(status)
            }
            _ if caller.role_in(project).is_none() => Ok(false),
            _ => Ok(self.0.access.blob_projects(digest).await.map_err(status)?.iter().any(|p| p == project)),
        }
    }

    /// The id of the node named `name`: from its session when this server holds it, else from
    /// the store (an agent may fetch files from another replica than the one it registered with).
    async fn node_id(&self, name: &str) -> Result<Option<i64>, Status> {
        let local = {
            let sessions = self.0.sessions.lock().unwrap_or_else(|e| e.into_inner());
            sessions.iter().find(|(_, s)| s.name == name).map(|(id, _)| *id)
        };
        if local.is_some() {
            return Ok(local);
        }
        let nodes = self.0.store.nodes().await.map_err(status)?;
        Ok(nodes.into_iter().find(|n| n.name == name).map(|n| n.id))
    }

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
        // Every blob the job names must be one its project holds: naming another project's
        // digest must not make an agent fetch it into this job's workspace.
        let images = plan.tasks.iter().filter_map(|t| t.image_blob.as_deref()).map(|b| (b, "image archive"));
        let inputs = plan.tasks.iter().flat_map(|t| &t.inputs).filter_map(|i| match &i.source {
            drover_core::InputSource::Blob { digest, .. } => Some((digest.as_str(), "input")),
            _ => None,
        });
        let blobs: std::collections::BTreeMap<&str, &str> = images.chain(inputs).collect();
        for (blob, what) in blobs {
            let digest = transfer::digest(blob)?;
            let held = self.0.access.blob_projects(blob).await.map_err(status)?.contains(&plan.project);
            if !held || self.0.blobs.stat(&digest).await.map_err(transfer::blob_status)?.is_none() {
                return Err(Status::failed_precondition(format!(
                    "{what} {blob} was never uploaded to project `{}`; submit with the drover CLI, which uploads it",
                    plan.project
                )));
            }
        }
        Ok(())
    }
}
