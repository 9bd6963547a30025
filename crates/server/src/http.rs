//! The HTTP API: read-only JSON and downloads for scripts and browsers, the same data the gRPC
//! client API serves, with the same credentials (`Authorization: Bearer drv_...`) and the
//! same authorization.
//!
//! - `GET /v1/jobs/{id}`: the job and its tasks;
//! - `GET /v1/jobs/{id}/artifacts[?task=NAME][&page_size=N][&page_token=T]`: kept outputs, a
//!   page at a time: the body is the page's array, and an `X-Next-Page-Token` header, present
//!   while more follow, carries the `page_token` of the next page;
//! - `GET /v1/jobs/{id}/tasks/{task}/artifacts/{*path}`: one file's bytes, kept or live;
//! - `GET /v1/jobs/{id}/tasks/{task}/logs`: the task's output as text.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{MethodRouter, get};
use drover_core::Role;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tonic::{Code, Status};

use crate::Shared;
use crate::auth::{self, Caller};
use crate::client_api::{visible_job, visible_job_with_tasks};
use crate::convert::{self, status};
use crate::downloads::{self, task_filter};

/// Serves the HTTP API on `listener` until `shutdown` resolves.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: drover_tls::Listener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = axum::serve::Listener::local_addr(&listener) {
        tracing::info!(%addr, "http api listening");
    }
    axum::serve(listener, router(shared)).with_graceful_shutdown(shutdown).await
}

/// Every route, with its handler. The router is built from this list, and the authorization
/// test walks it, so a route added here without a test case fails that test.
pub(crate) fn routes() -> Vec<(&'static str, MethodRouter<Arc<Shared>>)> {
    vec![
        ("/v1/jobs/{id}", get(job)),
        ("/v1/jobs/{id}/artifacts", get(artifacts)),
        ("/v1/jobs/{id}/tasks/{task}/artifacts/{*path}", get(artifact)),
        ("/v1/jobs/{id}/tasks/{task}/logs", get(logs)),
    ]
}

fn router(shared: Arc<Shared>) -> Router {
    routes().into_iter().fold(Router::new(), |r, (path, handler)| r.route(path, handler)).with_state(shared)
}

/// The caller of an HTTP request, from its `Authorization: Bearer` header.
struct Authed(Caller);

impl FromRequestParts<Arc<Shared>> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, shared: &Arc<Shared>) -> Result<Authed, ApiError> {
        let header = match parts.headers.get(header::AUTHORIZATION) {
            Some(v) => Some(
                v.to_str()
                    .map_err(|_| ApiError(Status::unauthenticated("the authorization header is not text")))?,
            ),
            None => None,
        };
        let caller =
            auth::authenticate(&*shared.access, shared.config.auth, shared.oidc.as_ref(), header).await?;
        caller.require_person()?;
        Ok(Authed(caller))
    }
}

/// An API error as HTTP: the gRPC code mapped to a status, the message as JSON.
struct ApiError(Status);

impl From<Status> for ApiError {
    fn from(s: Status) -> ApiError {
        ApiError(s)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = match self.0.code() {
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::InvalidArgument => StatusCode::BAD_REQUEST,
            Code::FailedPrecondition => StatusCode::CONFLICT,
            Code::ResourceExhausted => StatusCode::PAYLOAD_TOO_LARGE,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (code, Json(json!({ "error": self.0.message() }))).into_response()
    }
}

async fn job(
    State(shared): State<Arc<Shared>>,
    Authed(caller): Authed,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    let (job, tasks) = visible_job_with_tasks(&shared, &caller, id, Role::Viewer).await?;
    let job = convert::job(job, tasks);
    let tasks: Vec<Value> = job
        .tasks
        .iter()
        .map(|t| {
            json!({"id": t.id, "name": t.name, "frame": t.frame, "state": t.state, "exit_code": t.exit_code,
                "attempts": t.attempts, "node": t.node, "reason": t.reason, "failure": t.failure,
                "cpu_seconds": t.cpu_seconds, "peak_memory_bytes": t.peak_memory_bytes,
                "started_ms": t.started_ms, "ended_ms": t.ended_ms})
        })
        .collect();
    Ok(Json(json!({"id": job.id, "name": job.name, "project": job.project, "priority": job.priority,
        "state": job.state, "cancelled": job.cancelled, "created_ms": job.created_ms, "tasks": tasks})))
}

/// The header that carries the token of a list's next page.
pub(crate) const NEXT_PAGE_TOKEN: &str = "x-next-page-token";

#[derive(Deserialize)]
struct ArtifactsQuery {
    #[serde(default)]
    task: String,
    #[serde(default)]
    page_size: u32,
    #[serde(default)]
    page_token: String,
}

async fn artifacts(
    State(shared): State<Arc<Shared>>,
    Authed(caller): Authed,
    Path(id): Path<i64>,
    Query(q): Query<ArtifactsQuery>,
) -> Result<Response, ApiError> {
    let filter = task_filter(&q.task)?;
    visible_job(&shared, &caller, id, Role::Viewer).await?;
    let page = crate::paging::page(q.page_size, q.page_token);
    let list = shared.artifacts.list_artifacts(id, &filter, &page).await.map_err(status)?;
    let items: Vec<Value> = list
        .items
        .into_iter()
        .map(|a| {
            json!({"task": a.task_name, "frame": a.frame, "attempt": a.attempt, "path": a.path,
                "size": a.size, "digest": a.digest, "created_ms": a.created_ms})
        })
        .collect();
    let mut response = Json(Value::Array(items)).into_response();
    if !list.next_token.is_empty() {
        let token = header::HeaderValue::from_str(&list.next_token)
            .map_err(|e| ApiError(Status::internal(format!("a page token is not a header value: {e}"))))?;
        response.headers_mut().insert(NEXT_PAGE_TOKEN, token);
    }
    Ok(response)
}

async fn artifact(
    State(shared): State<Arc<Shared>>,
    Authed(caller): Authed,
    Path((id, task, path)): Path<(i64, String, String)>,
) -> Result<Response, ApiError> {
    visible_job(&shared, &caller, id, Role::Viewer).await?;
    let download = downloads::artifact(&shared, id, &task, &path).await?;
    // A broken download (a corrupted blob, an agent gone mid-way) aborts the body, so the
    // client sees a failed transfer rather than a short file.
    let body = Body::from_stream(
        download.chunks.map(|c| c.map(|c| bytes::Bytes::from(c.data)).map_err(std::io::Error::other)),
    );
    let mut response = Response::builder().header(header::CONTENT_TYPE, "application/octet-stream");
    if let Some(size) = download.size {
        response = response.header(header::CONTENT_LENGTH, size);
    }
    response.body(body).map_err(|e| ApiError(Status::internal(e.to_string())))
}

async fn logs(
    State(shared): State<Arc<Shared>>,
    Authed(caller): Authed,
    Path((id, task)): Path<(i64, String)>,
) -> Result<Response, ApiError> {
    visible_job(&shared, &caller, id, Role::Viewer).await?;
    let stream = downloads::logs(shared, id, &task, false, 0, true).await?;
    let body = Body::from_stream(stream.map(|batch| {
        batch
            .map(|b| bytes::Bytes::from(b.chunks.into_iter().flat_map(|c| c.data).collect::<Vec<u8>>()))
            .map_err(std::io::Error::other)
    }));
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response())
}
