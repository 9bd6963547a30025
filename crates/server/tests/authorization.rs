//! The tenant-isolation matrix: every gRPC method (read from the service descriptors) and every
//! HTTP route (read from the router) called by every kind of caller, each answer checked. A
//! method or route added later without a case here fails `every_method_and_route_has_a_case`.
//!
//! A real server runs in-process on a loopback port with a SQLite store; the callers are real
//! gRPC and HTTP clients carrying real keys.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

mod common;

use drover_proto as pb;
use drover_proto::Bearer;
use drover_proto::agent_session_client::AgentSessionClient;
use drover_proto::drover_client::DroverClient;
use drover_store::conformance::{job, schedule, task};
use drover_store::sqlite::SqliteStore;
use drover_store::{
    AccessStore, ArtifactStore, AttemptReport, NodeSpec, OutputFile, OutputLine, PageRequest, SecretStore,
    Store, TenantStore,
};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use prost::Message;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

type Client = DroverClient<InterceptedService<Channel, Bearer>>;

/// The callers every case is tried with.
const CALLERS: [&str; 9] = [
    "operator",
    "alpha-admin",
    "alpha-submitter",
    "alpha-viewer",
    "beta-admin",
    "node",
    "no-key",
    "revoked",
    "expired",
];

/// What a caller gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The call succeeded.
    Allowed,
    /// `not found`, worded exactly as for an object that does not exist.
    Hidden,
    /// `permission denied`: the caller sees the object but its role is too weak.
    Denied,
    /// `unauthenticated`: no usable credential.
    Unauth,
}

use Outcome::{Allowed, Denied, Hidden, Unauth};

/// The seeded world every case acts on.
struct World {
    url: String,
    http: String,
    keys: BTreeMap<&'static str, String>,
    /// A finished job of `alpha` with a log line and an artifact `out.txt`.
    alpha_job: i64,
    /// A queued job of `alpha` that no node can run (for cancel).
    cancel_job: i64,
    /// A blob `alpha` holds.
    alpha_blob: String,
    /// An `alpha` key that cases try to revoke.
    victim_key: String,
    store: Arc<SqliteStore>,
    server: common::Server,
}

/// An id no object has.
const MISSING: i64 = 987_654;

fn status_of<T>(r: Result<tonic::Response<T>, Status>) -> Result<T, Status> {
    r.map(tonic::Response::into_inner)
}

async fn client(url: &str, key: Option<&str>) -> Client {
    let channel = Channel::from_shared(url.to_owned()).unwrap().connect().await.unwrap();
    DroverClient::with_interceptor(channel, Bearer::new(key).unwrap())
}

impl World {
    async fn start() -> World {
        let server = common::Server::start().await;
        let (url, operator, store) = (server.url.clone(), server.operator.clone(), server.store.clone());
        let blobs = server.blobs.clone();
        let mut op = client(&url, Some(&operator)).await;
        for p in ["alpha", "beta"] {
            op.create_project(pb::CreateProjectRequest { name: p.into() }).await.unwrap();
        }
        let mut keys = BTreeMap::from([("operator", operator.clone())]);
        for (name, project, role) in [
            ("alpha-admin", "alpha", "admin"),
            ("alpha-submitter", "alpha", "submitter"),
            ("alpha-viewer", "alpha", "viewer"),
            ("beta-admin", "beta", "admin"),
            ("revoked", "alpha", "admin"),
            ("expired", "alpha", "admin"),
            ("victim", "alpha", "viewer"),
        ] {
            let expires = if name == "expired" { 1 } else { 0 };
            let req = pb::CreateKeyRequest {
                project: project.into(),
                role: role.into(),
                name: name.into(),
                expires_in_ms: expires,
            };
            keys.insert(name, op.create_key(req).await.unwrap().into_inner().secret);
        }
        let revoked_id = drover_core::access::Credential::parse(&keys["revoked"]).unwrap().id;
        op.revoke_key(pb::RevokeKeyRequest { id: revoked_id }).await.unwrap();
        let victim_key = drover_core::access::Credential::parse(&keys["victim"]).unwrap().id;

        // A node credential, for the agent's view of the client API.
        keys.insert("node", server.enroll("matrix-node").await);

        // A blob of alpha, uploaded by alpha's submitter.
        let alpha_blob = upload(&url, &keys["alpha-submitter"], "alpha", b"alpha's data").await.unwrap();

        // A finished alpha job with output and an artifact, run on a node registered directly
        // in the store (it has no session, so the server never places anything on it).
        let mut seed = job(vec![task("t", &[])]);
        seed.project = "alpha".into();
        seed.tasks[0].constraints.insert("seed".into(), "yes".into());
        let alpha_job = store.submit(&seed, "", "seed.yaml", 1).await.unwrap();
        let node = NodeSpec {
            name: "seed-node".into(),
            labels: BTreeMap::from([("seed".to_string(), "yes".to_string())]),
            cores: 1,
            memory: 1 << 30,
            runtimes: vec!["process".into()],
            lease_until_ms: i64::MAX / 2,
        };
        store.register_node(&node, &[], 1).await.unwrap();
        let a = schedule(&*store, 2).await.remove(0);
        store.attempt_started(a.attempt_id, a.epoch, 3).await.unwrap();
        let line = OutputLine { step: 0, stderr: false, data: b"seed output\n".to_vec() };
        store.append_output(a.attempt_id, a.epoch, &[line]).await.unwrap();
        let stored = blobs.put(&mut &b"artifact bytes"[..], None, None).await.unwrap();
        let file =
            OutputFile { path: "out.txt".into(), size: stored.size, digest: stored.digest.to_string() };
        store.record_outputs(a.attempt_id, a.epoch, &[file], 4).await.unwrap();
        let report = AttemptReport {
            attempt_id: a.attempt_id,
            epoch: a.epoch,
            exit_code: Some(0),
            ..Default::default()
        };
        store.attempt_finished(&report, 5).await.unwrap();

        let mut stuck = job(vec![task("waits", &[])]);
        stuck.project = "alpha".into();
        stuck.tasks[0].constraints.insert("never".into(), "matches".into());
        let cancel_job = store.submit(&stuck, "", "stuck.yaml", 6).await.unwrap();

        op.set_secret(pb::SetSecretRequest {
            project: "alpha".into(),
            name: "TOKEN".into(),
            value: "s3cret".into(),
        })
        .await
        .unwrap();
        // The expired key has lived its millisecond.
        tokio::time::sleep(Duration::from_millis(5)).await;
        World {
            url,
            http: server.http.clone(),
            keys,
            alpha_job,
            cancel_job,
            alpha_blob,
            victim_key,
            store,
            server,
        }
    }

    fn key(&self, caller: &str) -> Option<&str> {
        match caller {
            "no-key" => None,
            other => Some(self.keys[other].as_str()),
        }
    }

    async fn client(&self, caller: &str) -> Client {
        client(&self.url, self.key(caller)).await
    }

    fn alpha_plan_json(&self) -> String {
        let mut plan = job(vec![task("made", &[])]);
        plan.project = "alpha".into();
        plan.tasks[0].constraints.insert("never".into(), "matches".into());
        serde_json::to_string(&plan).unwrap()
    }
}

async fn upload(url: &str, key: &str, project: &str, data: &[u8]) -> Result<String, Status> {
    let mut c = client(url, Some(key)).await;
    let first = pb::BlobChunk { data: data.to_vec(), project: project.into(), ..Default::default() };
    Ok(c.put_blob(futures::stream::iter(vec![first])).await?.into_inner().digest)
}

async fn drain<T>(stream: Result<tonic::Response<tonic::Streaming<T>>, Status>) -> Result<String, Status> {
    let mut stream = stream?.into_inner();
    let mut n = 0;
    // Watch and follow streams do not end by themselves; a few messages prove access.
    while let Ok(Some(item)) = tokio::time::timeout(Duration::from_millis(300), stream.next()).await {
        item?;
        n += 1;
    }
    Ok(format!("{n} messages"))
}

/// A call made as one caller (`CALLERS`).
type Fut<'a> = BoxFuture<'a, Result<String, Status>>;

/// A call made as one caller (`CALLERS`).
type Call =
    Box<dyn for<'a> Fn(&'a World, &'static str) -> BoxFuture<'a, Result<String, Status>> + Send + Sync>;

/// One row of the matrix.
struct Case {
    /// `Service/Method` or `GET /path`.
    target: &'static str,
    /// What the call does.
    what: &'static str,
    call: Call,
    /// What each caller must get.
    expect: fn(&str) -> Outcome,
    /// For `Hidden`: the same call on an object that does not exist (made by the operator),
    /// and the id text to put in its message to compare.
    missing: Option<(Call, String, String)>,
    /// Checks that callers refused did not change anything (run after them, before the
    /// callers allowed).
    unchanged: Option<Call>,
}

fn call<F>(f: F) -> Call
where
    F: for<'a> Fn(&'a World, &'static str) -> BoxFuture<'a, Result<String, Status>> + Send + Sync + 'static,
{
    Box::new(f)
}

fn unauthenticated(caller: &str) -> Option<Outcome> {
    matches!(caller, "no-key" | "revoked" | "expired").then_some(Unauth)
}

/// Reading a project's objects: alpha's members and the operator; everyone else sees nothing.
fn alpha_reader(caller: &str) -> Outcome {
    unauthenticated(caller).unwrap_or(match caller {
        "operator" | "alpha-admin" | "alpha-submitter" | "alpha-viewer" => Allowed,
        _ => Hidden,
    })
}

/// Changing a project's jobs: submitters and up.
fn alpha_submitter(caller: &str) -> Outcome {
    unauthenticated(caller).unwrap_or(match caller {
        "operator" | "alpha-admin" | "alpha-submitter" => Allowed,
        "alpha-viewer" => Denied,
        _ => Hidden,
    })
}

/// Managing a project: admins and the operator.
fn alpha_admin(caller: &str) -> Outcome {
    unauthenticated(caller).unwrap_or(match caller {
        "operator" | "alpha-admin" => Allowed,
        "alpha-submitter" | "alpha-viewer" => Denied,
        _ => Hidden,
    })
}

/// Anything a person may do; nodes may not.
fn any_person(caller: &str) -> Outcome {
    unauthenticated(caller).unwrap_or(if caller == "node" { Denied } else { Allowed })
}

/// Cluster administration.
fn operator_only(caller: &str) -> Outcome {
    unauthenticated(caller).unwrap_or(if caller == "operator" { Allowed } else { Denied })
}

fn job_missing(
    f: for<'a> fn(&'a World, &'static str, i64) -> Fut<'a>,
    real: fn(&World) -> i64,
) -> impl Fn(&World) -> (Call, String, String) {
    move |w: &World| {
        let call = call(move |w, _| f(w, "operator", MISSING));
        (call, MISSING.to_string(), real(w).to_string())
    }
}

fn get_job<'a>(w: &'a World, caller: &'static str, id: i64) -> Fut<'a> {
    async move {
        let mut c = w.client(caller).await;
        status_of(c.get_job(pb::GetJobRequest { job_id: id }).await).map(|j| j.project)
    }
    .boxed()
}

fn watch<'a>(w: &'a World, caller: &'static str, id: i64) -> Fut<'a> {
    async move {
        let mut c = w.client(caller).await;
        drain(c.watch(pb::WatchRequest { job_id: id, after_seq: 0 }).await).await
    }
    .boxed()
}

fn cancel<'a>(w: &'a World, caller: &'static str, id: i64) -> Fut<'a> {
    async move {
        let mut c = w.client(caller).await;
        status_of(c.cancel(pb::CancelRequest { job_id: id }).await).map(|r| r.state)
    }
    .boxed()
}

fn logs<'a>(w: &'a World, caller: &'static str, id: i64) -> Fut<'a> {
    async move {
        let mut c = w.client(caller).await;
        drain(
            c.logs(pb::LogsRequest {
                job_id: id,
                task: String::new(),
                follow: false,
                after_id: 0,
                chunks: true,
            })
            .await,
        )
        .await
    }
    .boxed()
}

fn list_artifacts<'a>(w: &'a World, caller: &'static str, id: i64) -> Fut<'a> {
    async move {
        let mut c = w.client(caller).await;
        status_of(c.list_artifacts(pb::ListArtifactsRequest { job_id: id, ..Default::default() }).await)
            .map(|r| format!("{} artifacts", r.artifacts.len()))
    }
    .boxed()
}

fn get_artifact<'a>(w: &'a World, caller: &'static str, id: i64) -> Fut<'a> {
    async move {
        let mut c = w.client(caller).await;
        let req = pb::GetArtifactRequest { job_id: id, task: "t".into(), path: "out.txt".into() };
        drain(c.get_artifact(req).await).await
    }
    .boxed()
}

fn usage_of_job<'a>(w: &'a World, caller: &'static str, id: i64) -> Fut<'a> {
    async move {
        let mut c = w.client(caller).await;
        status_of(c.usage(pb::UsageRequest { project: String::new(), job_id: id }).await)
            .map(|r| format!("{} jobs", r.jobs.len()))
    }
    .boxed()
}

fn set_secret<'a>(w: &'a World, caller: &'static str, project: String) -> Fut<'a> {
    async move {
        let mut c = w.client(caller).await;
        let req = pb::SetSecretRequest { project, name: "ADDED".into(), value: "v".into() };
        status_of(c.set_secret(req).await).map(|_| String::new())
    }
    .boxed()
}

fn list_secrets<'a>(w: &'a World, caller: &'static str, project: String) -> Fut<'a> {
    async move {
        let mut c = w.client(caller).await;
        status_of(c.list_secrets(pb::ListSecretsRequest { project, ..Default::default() }).await)
            .map(|r| r.names.join(","))
    }
    .boxed()
}

fn delete_secret<'a>(w: &'a World, caller: &'static str, project: String) -> Fut<'a> {
    async move {
        let mut c = w.client(caller).await;
        let req = pb::DeleteSecretRequest { project, name: "TOKEN".into() };
        status_of(c.delete_secret(req).await).map(|_| String::new())
    }
    .boxed()
}

fn usage_of_project<'a>(w: &'a World, caller: &'static str, project: String) -> Fut<'a> {
    async move {
        let mut c = w.client(caller).await;
        status_of(c.usage(pb::UsageRequest { project, job_id: 0 }).await)
            .map(|r| format!("{} jobs", r.jobs.len()))
    }
    .boxed()
}

fn create_key<'a>(w: &'a World, caller: &'static str, project: String) -> Fut<'a> {
    async move {
        let mut c = w.client(caller).await;
        let req =
            pb::CreateKeyRequest { project, role: "viewer".into(), name: "made".into(), expires_in_ms: 0 };
        status_of(c.create_key(req).await).map(|_| String::new())
    }
    .boxed()
}

fn list_keys<'a>(w: &'a World, caller: &'static str, project: String) -> Fut<'a> {
    async move {
        let mut c = w.client(caller).await;
        status_of(c.list_keys(pb::ListKeysRequest { project, ..Default::default() }).await)
            .map(|r| format!("{} keys", r.keys.len()))
    }
    .boxed()
}

fn submit<'a>(w: &'a World, caller: &'static str, project: String) -> Fut<'a> {
    let plan = w.alpha_plan_json().replace("\"alpha\"", &format!("\"{project}\""));
    async move {
        let mut c = w.client(caller).await;
        let req = pb::SubmitRequest { plan_json: plan, filename: "m.yaml".into(), ..Default::default() };
        status_of(c.submit(req).await).map(|_| String::new())
    }
    .boxed()
}

fn get_project<'a>(w: &'a World, caller: &'static str, project: String) -> Fut<'a> {
    async move {
        let mut c = w.client(caller).await;
        status_of(c.get_project(pb::GetProjectRequest { name: project }).await).map(|p| p.name)
    }
    .boxed()
}

fn set_settings<'a>(w: &'a World, caller: &'static str, project: String) -> Fut<'a> {
    async move {
        let mut c = w.client(caller).await;
        let settings = vec![pb::SettingValue { key: "quota.cores".into(), value: "100".into() }];
        status_of(c.set_project_settings(pb::SetProjectSettingsRequest { project, settings }).await)
            .map(|p| p.name)
    }
    .boxed()
}

fn audit_of<'a>(w: &'a World, caller: &'static str, project: String) -> Fut<'a> {
    async move {
        let mut c = w.client(caller).await;
        let req = pb::AuditRequest { project, ..Default::default() };
        status_of(c.audit(req).await).map(|r| format!("{} records", r.entries.len()))
    }
    .boxed()
}

fn cases(w: &World) -> Vec<Case> {
    let alpha = |w: &World| w.alpha_job;
    let stuck = |w: &World| w.cancel_job;
    let by_job = |target,
                  what,
                  f: for<'a> fn(&'a World, &'static str, i64) -> Fut<'a>,
                  id: fn(&World) -> i64,
                  expect: fn(&str) -> Outcome| Case {
        target,
        what,
        call: call(move |w, caller| f(w, caller, id(w))),
        expect,
        missing: Some(job_missing(f, id)(w)),
        unchanged: None,
    };
    let project_missing = |f: for<'a> fn(&'a World, &'static str, String) -> Fut<'a>| {
        (
            call(move |w, _| f(w, "operator", "no-such-project".into())),
            "no-such-project".to_owned(),
            "alpha".to_owned(),
        )
    };
    let by_project = |target,
                      what,
                      f: for<'a> fn(&'a World, &'static str, String) -> Fut<'a>,
                      expect: fn(&str) -> Outcome| Case {
        target,
        what,
        call: call(move |w, caller| f(w, caller, "alpha".into())),
        expect,
        missing: Some(project_missing(f)),
        unchanged: None,
    };

    let cases = vec![
        Case {
            unchanged: Some(call(|w, _| {
                async move {
                    let alpha = ["alpha".to_string()];
                    let jobs = w.store.list_jobs(true, Some(&alpha), &PageRequest::first(100)).await.unwrap();
                    assert_eq!(jobs.items.len(), 2, "a refused submit stored a job");
                    Ok(String::new())
                }
                .boxed()
            })),
            ..by_project("Drover/Submit", "submit a job to alpha", submit, alpha_submitter)
        },
        by_job("Drover/GetJob", "read alpha's job", get_job, alpha, alpha_reader),
        Case {
            target: "Drover/ListJobs",
            what: "list jobs: only one's own projects",
            call: call(|w, caller| {
                async move {
                    let mut c = w.client(caller).await;
                    let jobs = status_of(
                        c.list_jobs(pb::ListJobsRequest { limit: 100, all: true, ..Default::default() })
                            .await,
                    )?
                    .jobs;
                    let projects: BTreeSet<String> = jobs.into_iter().map(|j| j.project).collect();
                    Ok(projects.into_iter().collect::<Vec<_>>().join(","))
                }
                .boxed()
            }),
            expect: any_person,
            missing: None,
            unchanged: None,
        },
        by_job("Drover/Watch", "watch alpha's job", watch, alpha, alpha_reader),
        Case {
            unchanged: Some(call(|w, _| {
                async move {
                    let job = w.store.job(w.cancel_job).await.unwrap().unwrap();
                    assert!(!job.cancelled, "a refused cancel cancelled the job");
                    Ok(String::new())
                }
                .boxed()
            })),
            ..by_job("Drover/Cancel", "cancel alpha's job", cancel, stuck, alpha_submitter)
        },
        by_job("Drover/Logs", "read alpha's logs", logs, alpha, alpha_reader),
        Case {
            target: "Drover/ListNodes",
            what: "list nodes",
            call: call(|w, caller| {
                async move {
                    let mut c = w.client(caller).await;
                    status_of(c.list_nodes(pb::ListNodesRequest::default()).await)
                        .map(|r| r.nodes.len().to_string())
                }
                .boxed()
            }),
            expect: any_person,
            missing: None,
            unchanged: None,
        },
        Case {
            target: "Drover/PutBlob",
            what: "upload a blob to alpha",
            call: call(|w, caller| {
                async move {
                    let mut c = w.client(caller).await;
                    let first = pb::BlobChunk {
                        data: b"new".to_vec(),
                        project: "alpha".into(),
                        ..Default::default()
                    };
                    let _ = w;
                    status_of(c.put_blob(futures::stream::iter(vec![first])).await).map(|r| r.digest)
                }
                .boxed()
            }),
            // Agents upload outputs (their records name the project).
            expect: |caller| if caller == "node" { Allowed } else { alpha_submitter(caller) },
            missing: Some((
                call(|w, caller| {
                    async move {
                        let mut c = w.client(caller).await;
                        let first = pb::BlobChunk {
                            data: b"new".to_vec(),
                            project: "no-such-project".into(),
                            ..Default::default()
                        };
                        status_of(c.put_blob(futures::stream::iter(vec![first])).await).map(|r| r.digest)
                    }
                    .boxed()
                }),
                "no-such-project".into(),
                "alpha".into(),
            )),
            unchanged: Some(call(|w, _| {
                async move {
                    let digest = drover_blobs::Digest::of(b"new").to_string();
                    assert!(
                        w.store.blob_projects(&digest).await.unwrap().is_empty(),
                        "a refused upload was kept"
                    );
                    Ok(String::new())
                }
                .boxed()
            })),
        },
        Case {
            target: "Drover/StatBlob",
            what: "see whether alpha's blob exists: others are told it does not",
            call: call(|w, caller| {
                async move {
                    let mut c = w.client(caller).await;
                    let req = pb::BlobRef { digest: w.alpha_blob.clone(), size: 0, project: "alpha".into() };
                    let stat = status_of(c.stat_blob(req).await)?;
                    if stat.exists { Ok("exists".into()) } else { Err(Status::not_found("absent")) }
                }
                .boxed()
            }),
            expect: |caller| if caller == "node" { Hidden } else { alpha_reader(caller) },
            missing: None,
            unchanged: None,
        },
        Case {
            target: "Drover/GetBlob",
            what: "download alpha's blob",
            call: call(|w, caller| {
                async move {
                    let mut c = w.client(caller).await;
                    let req = pb::BlobRef { digest: w.alpha_blob.clone(), size: 0, project: "alpha".into() };
                    drain(c.get_blob(req).await).await
                }
                .boxed()
            }),
            expect: |caller| if caller == "node" { Hidden } else { alpha_reader(caller) },
            missing: Some((
                call(|w, caller| {
                    async move {
                        let mut c = w.client(caller).await;
                        let digest = drover_blobs::Digest::of(b"never stored").to_string();
                        drain(c.get_blob(pb::BlobRef { digest, size: 0, project: "alpha".into() }).await)
                            .await
                    }
                    .boxed()
                }),
                drover_blobs::Digest::of(b"never stored").to_string(),
                w.alpha_blob.clone(),
            )),
            unchanged: None,
        },
        Case {
            unchanged: Some(call(|w, _| {
                async move {
                    let names = w.store.secret_names("alpha").await.unwrap();
                    assert!(!names.contains(&"ADDED".to_string()), "a refused caller set a secret");
                    Ok(String::new())
                }
                .boxed()
            })),
            ..by_project("Drover/SetSecret", "set a secret of alpha", set_secret, alpha_admin)
        },
        by_project("Drover/ListSecrets", "list alpha's secret names", list_secrets, alpha_submitter),
        Case {
            unchanged: Some(call(|w, _| {
                async move {
                    let names = w.store.secret_names("alpha").await.unwrap();
                    assert!(names.contains(&"TOKEN".to_string()), "a refused caller deleted a secret");
                    Ok(String::new())
                }
                .boxed()
            })),
            ..by_project("Drover/DeleteSecret", "delete a secret of alpha", delete_secret, alpha_admin)
        },
        by_job("Drover/ListArtifacts", "list alpha's artifacts", list_artifacts, alpha, alpha_reader),
        by_job("Drover/GetArtifact", "download alpha's artifact", get_artifact, alpha, alpha_reader),
        // Usage is for people; agents never ask.
        Case {
            expect: |caller| if caller == "node" { Denied } else { alpha_reader(caller) },
            ..by_job("Drover/Usage", "usage of alpha's job", usage_of_job, alpha, alpha_reader)
        },
        Case {
            expect: |caller| if caller == "node" { Denied } else { alpha_reader(caller) },
            missing: None,
            ..by_project("Drover/Usage", "usage of project alpha", usage_of_project, alpha_reader)
        },
        Case {
            target: "Drover/WhoAmI",
            what: "who am I",
            call: call(|w, caller| {
                async move {
                    let mut c = w.client(caller).await;
                    status_of(c.who_am_i(pb::WhoAmIRequest {}).await).map(|r| r.kind)
                }
                .boxed()
            }),
            expect: |caller| unauthenticated(caller).unwrap_or(Allowed),
            missing: None,
            unchanged: None,
        },
        Case {
            expect: |caller| if caller == "node" { Denied } else { alpha_admin(caller) },
            unchanged: Some(call(|w, _| {
                async move {
                    let keys = w.store.keys(Some("alpha")).await.unwrap();
                    assert!(keys.iter().all(|k| k.name != "made"), "a refused caller made a key");
                    Ok(String::new())
                }
                .boxed()
            })),
            ..by_project("Drover/CreateKey", "create a viewer key of alpha", create_key, alpha_admin)
        },
        Case {
            expect: |caller| if caller == "node" { Denied } else { alpha_admin(caller) },
            ..by_project("Drover/ListKeys", "list alpha's keys", list_keys, alpha_admin)
        },
        Case {
            target: "Drover/RevokeKey",
            what: "revoke a key of alpha",
            call: call(|w, caller| {
                async move {
                    let mut c = w.client(caller).await;
                    status_of(c.revoke_key(pb::RevokeKeyRequest { id: w.victim_key.clone() }).await)
                        .map(|_| String::new())
                }
                .boxed()
            }),
            expect: |caller| if caller == "node" { Denied } else { alpha_admin(caller) },
            missing: Some((
                call(|w, caller| {
                    async move {
                        let mut c = w.client(caller).await;
                        status_of(c.revoke_key(pb::RevokeKeyRequest { id: "0000000000000000".into() }).await)
                            .map(|_| String::new())
                    }
                    .boxed()
                }),
                "0000000000000000".into(),
                w.victim_key.clone(),
            )),
            unchanged: Some(call(|w, _| {
                async move {
                    let key = w.store.key(&w.victim_key).await.unwrap().unwrap();
                    assert!(key.revoked_ms.is_none(), "a refused caller revoked a key");
                    Ok(String::new())
                }
                .boxed()
            })),
        },
        Case {
            target: "Drover/CreateProject",
            what: "create a project",
            call: call(|w, caller| {
                async move {
                    let mut c = w.client(caller).await;
                    status_of(c.create_project(pb::CreateProjectRequest { name: "gamma".into() }).await)
                        .map(|_| String::new())
                }
                .boxed()
            }),
            expect: operator_only,
            missing: None,
            unchanged: Some(call(|w, _| {
                async move {
                    let projects = w.store.projects().await.unwrap();
                    assert!(projects.iter().all(|p| p.name != "gamma"), "a refused caller made a project");
                    Ok(String::new())
                }
                .boxed()
            })),
        },
        Case {
            target: "Drover/ListProjects",
            what: "list projects: only one's own",
            call: call(|w, caller| {
                async move {
                    let mut c = w.client(caller).await;
                    let projects =
                        status_of(c.list_projects(pb::ListProjectsRequest::default()).await)?.projects;
                    Ok(projects.into_iter().map(|p| p.name).collect::<Vec<_>>().join(","))
                }
                .boxed()
            }),
            expect: any_person,
            missing: None,
            unchanged: None,
        },
        Case {
            target: "Drover/CreateJoinToken",
            what: "create a join token",
            call: call(|w, caller| {
                async move {
                    let mut c = w.client(caller).await;
                    status_of(c.create_join_token(pb::CreateJoinTokenRequest::default()).await)
                        .map(|_| String::new())
                }
                .boxed()
            }),
            expect: operator_only,
            missing: None,
            unchanged: None,
        },
        Case {
            target: "Drover/RevokeNode",
            what: "revoke a node",
            call: call(|w, caller| {
                async move {
                    let mut c = w.client(caller).await;
                    status_of(c.revoke_node(pb::RevokeNodeRequest { name: "seed-node".into() }).await)
                        .map(|_| String::new())
                }
                .boxed()
            }),
            expect: operator_only,
            missing: None,
            unchanged: Some(call(|w, _| {
                async move {
                    let nodes = w.store.nodes().await.unwrap();
                    let seed = nodes.iter().find(|n| n.name == "seed-node").unwrap();
                    assert_eq!(seed.state, drover_core::NodeState::Ready, "a refused caller revoked a node");
                    Ok(String::new())
                }
                .boxed()
            })),
        },
        Case {
            expect: |caller| if caller == "node" { Denied } else { alpha_reader(caller) },
            ..by_project("Drover/GetProject", "read alpha's settings and use", get_project, alpha_reader)
        },
        Case {
            expect: |caller| if caller == "node" { Denied } else { alpha_admin(caller) },
            unchanged: Some(call(|w, _| {
                async move {
                    let settings = w.store.project_settings("alpha").await.unwrap().unwrap();
                    assert_eq!(settings.quota.cores, None, "a refused caller changed a setting");
                    Ok(String::new())
                }
                .boxed()
            })),
            ..by_project("Drover/SetProjectSettings", "set alpha's quota", set_settings, alpha_admin)
        },
        Case {
            expect: |caller| if caller == "node" { Denied } else { alpha_admin(caller) },
            ..by_project("Drover/Audit", "read alpha's audit trail", audit_of, alpha_admin)
        },
        Case {
            target: "AgentSession/Session",
            what: "open an agent session as matrix-node",
            call: call(|w, caller| session_as(w, caller, "matrix-node").boxed()),
            expect: |caller| {
                unauthenticated(caller).unwrap_or(if caller == "node" { Allowed } else { Denied })
            },
            missing: None,
            unchanged: None,
        },
        Case {
            target: "AgentSession/AttemptKey",
            what: "ask again for the llm key of an attempt matrix-node does not run",
            call: call(|w, caller| {
                async move {
                    let channel = Channel::from_shared(w.url.clone()).unwrap().connect().await.unwrap();
                    let mut agents =
                        AgentSessionClient::with_interceptor(channel, Bearer::new(w.key(caller)).unwrap());
                    let req = pb::AttemptKeyRequest { node: "matrix-node".into(), attempt_id: MISSING };
                    status_of(agents.attempt_key(req).await).map(|k| k.llm_key)
                }
                .boxed()
            }),
            // Only the node itself may ask, and it runs no such attempt.
            expect: |caller| {
                unauthenticated(caller).unwrap_or(if caller == "node" { Hidden } else { Denied })
            },
            missing: None,
            unchanged: None,
        },
        Case {
            target: "AgentSession/Join",
            what: "join with a token that is not valid",
            call: call(|w, _| {
                async move {
                    let channel = Channel::from_shared(w.url.clone()).unwrap().connect().await.unwrap();
                    let mut agents = AgentSessionClient::new(channel);
                    let token = format!("drj_{}_{}", "1".repeat(16), "2".repeat(64));
                    status_of(agents.join(pb::JoinRequest { token, name: "intruder".into() }).await)
                        .map(|_| String::new())
                }
                .boxed()
            }),
            // The token is the credential: whoever calls, a bad one is refused.
            expect: |_| Denied,
            missing: None,
            unchanged: None,
        },
    ];
    cases
}

/// Opens an agent session as node `name`, carrying `caller`'s credential; `Ok` once the
/// server answered `Registered`.
async fn session_as(w: &World, caller: &str, name: &str) -> Result<String, Status> {
    let session = w.server.session(w.key(caller), name).await?;
    Ok(format!("node {}", session.node_id))
}

fn outcome(result: &Result<String, Status>) -> Outcome {
    match result {
        Ok(_) => Allowed,
        Err(s) => match s.code() {
            Code::NotFound => Hidden,
            Code::PermissionDenied => Denied,
            Code::Unauthenticated => Unauth,
            other => panic!("unexpected {other:?}: {}", s.message()),
        },
    }
}

/// Every method of every gRPC service, as `Service/Method`.
fn grpc_methods() -> BTreeSet<String> {
    let fds = prost_types::FileDescriptorSet::decode(drover_proto::FILE_DESCRIPTOR_SET).unwrap();
    fds.file
        .iter()
        .flat_map(|f| &f.service)
        .flat_map(|s| s.method.iter().map(move |m| format!("{}/{}", s.name(), m.name())))
        .collect()
}

#[tokio::test]
async fn every_method_and_route_has_a_case_and_every_caller_gets_its_answer() {
    let w = World::start().await;
    let cases = cases(&w);
    let covered: BTreeSet<String> = cases.iter().map(|c| c.target.to_owned()).collect();
    let methods = grpc_methods();
    let uncovered: Vec<&String> = methods.difference(&covered).collect();
    assert!(uncovered.is_empty(), "gRPC methods without an authorization case: {uncovered:?}");
    assert!(methods.len() >= 26, "the descriptors list too few methods: {methods:?}");

    let mut failures = Vec::new();
    for case in &cases {
        // Refused callers first, then the check that they changed nothing, then the others.
        let mut order: Vec<&str> = CALLERS.iter().copied().filter(|c| (case.expect)(c) != Allowed).collect();
        let refused = order.len();
        order.extend(CALLERS.iter().copied().filter(|c| (case.expect)(c) == Allowed));
        for (i, caller) in order.iter().enumerate() {
            if i == refused
                && let Some(check) = &case.unchanged
            {
                check(&w, "operator").await.unwrap();
            }
            let result = (case.call)(&w, caller).await;
            let got = outcome(&result);
            let want = (case.expect)(caller);
            if got != want {
                failures.push(format!(
                    "{} ({}) as {caller}: want {want:?}, got {result:?}",
                    case.target, case.what
                ));
                continue;
            }
            if got == Hidden
                && let Some((missing, from, to)) = &case.missing
                && let Err(hidden) = &result
            {
                let absent = missing(&w, "operator").await.expect_err("the missing object exists");
                let expected = absent.message().replace(from.as_str(), to.as_str());
                if absent.code() != Code::NotFound || hidden.message() != expected {
                    failures.push(format!(
                        "{} ({}) as {caller}: answers {:?} but a missing object answers {:?}",
                        case.target,
                        case.what,
                        hidden.message(),
                        expected
                    ));
                }
            }
            // What lists show: never another project's objects.
            if let Ok(text) = &result {
                let leaks = match (case.target, *caller) {
                    ("Drover/ListJobs" | "Drover/ListProjects", "beta-admin") => text.contains("alpha"),
                    ("Drover/ListJobs" | "Drover/ListProjects", c) if c.starts_with("alpha") => {
                        text.contains("beta")
                    }
                    _ => false,
                };
                if leaks {
                    failures.push(format!("{} as {caller} shows another project: {text}", case.target));
                }
            }
        }
    }
    assert!(failures.is_empty(), "authorization matrix failures:\n{}", failures.join("\n"));
}

/// Every HTTP route, with the same callers.
#[tokio::test]
async fn every_http_route_answers_each_caller_as_its_role_allows() {
    let w = World::start().await;
    let job = w.alpha_job;
    let routes: BTreeMap<&str, String> = BTreeMap::from([
        ("/v1/jobs/{id}", format!("/v1/jobs/{job}")),
        ("/v1/jobs/{id}/artifacts", format!("/v1/jobs/{job}/artifacts")),
        ("/v1/jobs/{id}/tasks/{task}/artifacts/{*path}", format!("/v1/jobs/{job}/tasks/t/artifacts/out.txt")),
        ("/v1/jobs/{id}/tasks/{task}/logs", format!("/v1/jobs/{job}/tasks/t/logs")),
    ]);
    let listed: BTreeSet<&str> = drover_server::http_route_paths().into_iter().collect();
    let cased: BTreeSet<&str> = routes.keys().copied().collect();
    assert_eq!(listed, cased, "every HTTP route needs a case here");
    let http = reqwest::Client::new();
    let mut failures = Vec::new();
    for (route, path) in &routes {
        let missing_path = path.replace(&format!("/jobs/{job}/"), &format!("/jobs/{MISSING}/"));
        let missing_path = if missing_path.ends_with(&format!("/jobs/{job}")) {
            format!("/v1/jobs/{MISSING}")
        } else {
            missing_path
        };
        for caller in CALLERS {
            let mut req = http.get(format!("{}{path}", w.http));
            if let Some(key) = w.key(caller) {
                req = req.bearer_auth(key);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap();
            let want = match alpha_reader(caller) {
                Allowed if caller == "node" => 403,
                Allowed => 200,
                Hidden if caller == "node" => 403,
                Hidden => 404,
                Denied => 403,
                Unauth => 401,
            };
            if status != want {
                failures.push(format!("GET {route} as {caller}: want {want}, got {status}: {body}"));
                continue;
            }
            if status == 404 {
                let absent = http
                    .get(format!("{}{missing_path}", w.http))
                    .bearer_auth(&w.keys["operator"])
                    .send()
                    .await
                    .unwrap();
                assert_eq!(absent.status().as_u16(), 404);
                let expected = absent.text().await.unwrap().replace(&MISSING.to_string(), &job.to_string());
                if body != expected {
                    failures
                        .push(format!("GET {route} as {caller} answers {body} but a missing job {expected}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "HTTP authorization failures:\n{}", failures.join("\n"));
}
