//! Retention through the real API of an in-process server: a job past its project's retention
//! disappears with the blobs only it used, a blob a newer job still names stays downloadable,
//! other projects keep their jobs, and a garbled retention is refused.

mod common;

use std::time::Duration;

use common::Server;
use drover_core::{InputSource, InputSpec, JobPlan};
use drover_proto as pb;
use drover_store::RetentionStore;
use drover_store::conformance::{job, task};
use futures::StreamExt;
use tonic::Code;

/// How long the loops get to do what the test waits for.
const WAIT: Duration = Duration::from_secs(20);

async fn set(
    server: &Server,
    key: Option<&str>,
    project: &str,
    k: &str,
    v: &str,
) -> Result<(), tonic::Status> {
    let mut c = match key {
        Some(key) => server.client(Some(key)).await,
        None => server.operator().await,
    };
    let req = pb::SetProjectSettingsRequest {
        project: project.into(),
        settings: vec![pb::SettingValue { key: k.into(), value: v.into() }],
    };
    c.set_project_settings(req).await.map(|_| ())
}

async fn upload(server: &Server, project: &str, data: &[u8]) -> String {
    let first = pb::BlobChunk { data: data.to_vec(), project: project.into(), ..Default::default() };
    let mut op = server.operator().await;
    op.put_blob(futures::stream::iter(vec![first])).await.unwrap().into_inner().digest
}

/// A one-task job of `project` reading the uploaded blobs `inputs`.
fn reading(project: &str, inputs: &[&str]) -> JobPlan {
    let mut t = task("a", &[]);
    t.inputs = inputs
        .iter()
        .enumerate()
        .map(|(i, d)| InputSpec {
            source: InputSource::Blob { digest: d.to_string(), directory: false },
            to: format!("in{i}"),
        })
        .collect();
    let mut plan = job(vec![t]);
    plan.project = project.into();
    plan
}

/// Submits `plan`; with `end`, cancels it at once (no node runs it, so it ends then).
async fn submit(server: &Server, plan: &JobPlan, end: bool) -> i64 {
    let mut op = server.operator().await;
    let req = pb::SubmitRequest {
        plan_json: serde_json::to_string(plan).unwrap(),
        filename: "t.yaml".into(),
        ..Default::default()
    };
    let job_id = op.submit(req).await.unwrap().into_inner().job_id;
    if end {
        op.cancel(pb::CancelRequest { job_id }).await.unwrap();
    }
    job_id
}

async fn job_code(server: &Server, job_id: i64) -> Code {
    let mut op = server.operator().await;
    match op.get_job(pb::GetJobRequest { job_id }).await {
        Ok(_) => Code::Ok,
        Err(e) => e.code(),
    }
}

async fn download(server: &Server, project: &str, digest: &str) -> Vec<u8> {
    let mut op = server.operator().await;
    let req = pb::BlobRef { digest: digest.into(), size: 0, project: project.into() };
    let mut stream = op.get_blob(req).await.unwrap().into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        bytes.extend(chunk.unwrap().data);
    }
    bytes
}

#[tokio::test]
async fn a_job_past_retention_goes_with_the_blobs_only_it_used() {
    let server = Server::start_with(|c| {
        c.retention_tick = Duration::from_millis(100);
        c.blob_grace = Duration::from_millis(300);
    })
    .await;
    let mut op = server.operator().await;
    op.create_project(pb::CreateProjectRequest { name: "fx".into() }).await.unwrap();
    set(&server, None, "fx", "retention", "1s").await.unwrap();

    let only_old = upload(&server, "fx", b"only the old job reads this").await;
    let both = upload(&server, "fx", b"both jobs read this").await;
    let old = submit(&server, &reading("fx", &[&only_old, &both]), true).await;
    // Queued, never ended: kept whatever its age.
    let newer = submit(&server, &reading("fx", &[&both]), false).await;
    // Ended too, but its project keeps jobs for the server's default of 30 days.
    let default_blob = upload(&server, "default", b"the default project's input").await;
    let kept = submit(&server, &reading("default", &[&default_blob]), true).await;

    let deadline = tokio::time::Instant::now() + WAIT;
    while job_code(&server, old).await != Code::NotFound {
        assert!(tokio::time::Instant::now() < deadline, "the old job was never deleted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let only_old_digest: drover_blobs::Digest = only_old.parse().unwrap();
    while server.blobs.stat(&only_old_digest).await.unwrap().is_some() {
        assert!(tokio::time::Instant::now() < deadline, "the old job's own blob was never deleted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!server.store.blob_referenced(&only_old).await.unwrap());

    assert_eq!(download(&server, "fx", &both).await, b"both jobs read this", "the newer job still names it");
    assert_eq!(download(&server, "default", &default_blob).await, b"the default project's input");
    assert_eq!(job_code(&server, newer).await, Code::Ok, "a job not ended is kept");
    assert_eq!(job_code(&server, kept).await, Code::Ok, "its project's retention has not passed");

    // The project's usage totals still count the deleted job, and say so.
    let usage = op.usage(pb::UsageRequest { project: "fx".into(), job_id: 0 }).await.unwrap().into_inner();
    assert_eq!(
        usage.jobs.iter().map(|j| j.job_id).collect::<Vec<_>>(),
        [newer],
        "only the kept job is listed"
    );
    let fx = &usage.projects[..];
    assert_eq!(fx.len(), 1, "{fx:?}");
    assert_eq!((fx[0].jobs, fx[0].deleted_jobs, fx[0].tasks), (2, 1, 2), "{fx:?}");
    let all = op.usage(pb::UsageRequest::default()).await.unwrap().into_inner();
    let projects: Vec<_> = all.projects.iter().map(|p| (p.project.as_str(), p.deleted_jobs)).collect();
    assert_eq!(projects, [("default", 0), ("fx", 1)]);
}

#[tokio::test]
async fn a_garbled_retention_is_refused_and_only_admins_set_one() {
    let server = Server::start().await;
    let mut op = server.operator().await;
    op.create_project(pb::CreateProjectRequest { name: "fx".into() }).await.unwrap();
    for garbled in ["thirty days", "30", "0s"] {
        let err = set(&server, None, "fx", "retention", garbled).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{garbled}");
        assert!(err.message().contains("retention"), "{garbled}: {}", err.message());
        assert!(err.message().contains("like 30days") || err.message().contains("zero"), "{}", err.message());
    }
    let info = op.get_project(pb::GetProjectRequest { name: "fx".into() }).await.unwrap().into_inner();
    assert!(!info.settings_json.contains("retention"), "nothing stored: {}", info.settings_json);

    let key =
        |role: &str| pb::CreateKeyRequest { project: "fx".into(), role: role.into(), ..Default::default() };
    let submitter = op.create_key(key("submitter")).await.unwrap().into_inner().secret;
    let admin = op.create_key(key("admin")).await.unwrap().into_inner().secret;
    let err = set(&server, Some(&submitter), "fx", "retention", "1s").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    set(&server, Some(&admin), "fx", "retention", "90days").await.unwrap();
    let info = op.get_project(pb::GetProjectRequest { name: "fx".into() }).await.unwrap().into_inner();
    let settings: drover_core::tenancy::ProjectSettings = serde_json::from_str(&info.settings_json).unwrap();
    assert_eq!(settings.retention, Some(Duration::from_secs(90 * 86_400)));
}

#[tokio::test]
async fn an_upload_of_a_blob_under_deletion_is_refused_then_stored_anew() {
    // Retention and collection run by hand here, between the steps.
    let server = Server::start_with(|c| c.retention_tick = Duration::from_secs(3600)).await;
    let data = b"uploaded twice";
    let digest = upload(&server, "default", data).await;
    let job_id = submit(&server, &reading("default", &[&digest]), true).await;
    assert_eq!(server.store.delete_job(job_id, 1).await.unwrap(), Some(vec![digest.clone()]));
    assert_eq!(server.store.doom_blobs(2, 10).await.unwrap(), std::slice::from_ref(&digest));

    let first = pb::BlobChunk { data: data.to_vec(), project: "default".into(), ..Default::default() };
    let mut op = server.operator().await;
    let err = op.put_blob(futures::stream::iter(vec![first.clone()])).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(err.message().contains("being deleted"), "{}", err.message());

    server.blobs.delete(&digest.parse().unwrap()).await.unwrap();
    server.store.blobs_deleted(std::slice::from_ref(&digest)).await.unwrap();
    op.put_blob(futures::stream::iter(vec![first])).await.unwrap();
    assert_eq!(download(&server, "default", &digest).await, data, "stored anew and held by the project");
}
