//! A shared farm's rules, through the real API of an in-process server: project settings
//! refusing submits, quotas holding tasks until capacity frees, cost at the prices in force, a
//! spent budget refusing and holding, and the audit trail.

mod common;

use std::time::Duration;

use common::Server;
use drover_core::tenancy::PriceTable;
use drover_core::{NetworkPolicy, RuntimeKind, TaskState};
use drover_proto as pb;
use drover_proto::agent_message::Msg;
use drover_store::conformance::{job, task};
use drover_store::{Store, TenantStore};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(10);

fn submit_request(plan: &drover_core::JobPlan) -> pb::SubmitRequest {
    pb::SubmitRequest {
        plan_json: serde_json::to_string(plan).unwrap(),
        filename: "t.yaml".into(),
        ..Default::default()
    }
}

async fn set(
    server: &Server,
    project: &str,
    settings: &[(&str, &str)],
) -> Result<pb::ProjectInfo, tonic::Status> {
    let mut op = server.operator().await;
    let req = pb::SetProjectSettingsRequest {
        project: project.into(),
        settings: settings
            .iter()
            .map(|(k, v)| pb::SettingValue { key: k.to_string(), value: v.to_string() })
            .collect(),
    };
    op.set_project_settings(req).await.map(|r| r.into_inner())
}

async fn project(server: &Server, name: &str) {
    let mut op = server.operator().await;
    op.create_project(pb::CreateProjectRequest { name: name.into() }).await.unwrap();
}

async fn jobs_of(server: &Server, project: &str) -> usize {
    let page = drover_store::PageRequest::first(drover_store::MAX_PAGE_SIZE);
    server.store.list_jobs(true, Some(&[project.to_string()]), &page).await.unwrap().items.len()
}

#[tokio::test]
async fn each_setting_refuses_a_violating_submit_by_name_and_stores_nothing() {
    let server = Server::start().await;
    project(&server, "fx").await;
    set(
        &server,
        "fx",
        &[
            ("runtimes", "process,docker"),
            ("networks", "none,egress"),
            ("images", "registry.example.com/*"),
            ("max_priority", "10"),
        ],
    )
    .await
    .unwrap();
    let mut op = server.operator().await;
    let base = || {
        let mut p = job(vec![task("t", &[])]);
        p.project = "fx".into();
        p
    };
    let mut cases: Vec<(&str, drover_core::JobPlan)> = Vec::new();
    let mut p = base();
    p.tasks[0].runtime = RuntimeKind::Microvm;
    p.tasks[0].image = Some("dir:/srv/vm".into());
    cases.push(("runtimes", p));
    let mut p = base();
    p.tasks[0].network = NetworkPolicy::Full;
    cases.push(("networks", p));
    let mut p = base();
    p.tasks[0].runtime = RuntimeKind::Docker;
    p.tasks[0].image = Some("sha256:0123".into());
    p.tasks[0].image_name = Some("docker.io/miner:1".into());
    cases.push(("images", p));
    let mut p = base();
    p.tasks[0].runtime = RuntimeKind::Docker;
    p.tasks[0].image = Some("registry.example.com/tool:1".into());
    p.tasks[0].user = Some("root".into());
    cases.push(("containers_as_root", p));
    let mut p = base();
    p.tasks[0].user = Some("artist".into());
    cases.push(("run_as", p));
    let mut p = base();
    p.priority = 11;
    cases.push(("max_priority", p));
    for (setting, plan) in cases {
        let err = op.submit(submit_request(&plan)).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{setting}: {err:?}");
        assert!(
            err.message().contains(&format!("project setting `{setting}`")),
            "{setting}: {}",
            err.message()
        );
    }
    // The LLM upstream: https only by default.
    project(&server, "agents").await;
    let mut p = job(vec![task("t", &[])]);
    p.project = "agents".into();
    p.tasks[0].agent = Some(common::agent_block("http://llm.internal:8080", None));
    let err = op.submit(submit_request(&p)).await.unwrap_err();
    assert!(err.message().contains("project setting `llm_upstreams`"), "{}", err.message());
    assert_eq!(jobs_of(&server, "fx").await + jobs_of(&server, "agents").await, 0, "nothing was stored");
    // A job within the settings goes through.
    op.submit(submit_request(&base())).await.unwrap();
    assert_eq!(jobs_of(&server, "fx").await, 1);
}

#[tokio::test]
async fn project_admins_tighten_settings_and_only_operators_loosen_them() {
    let server = Server::start().await;
    project(&server, "fx").await;
    set(&server, "fx", &[("quota.cores", "40")]).await.unwrap();
    let mut op = server.operator().await;
    let req = pb::CreateKeyRequest { project: "fx".into(), role: "admin".into(), ..Default::default() };
    let admin = op.create_key(req).await.unwrap().into_inner().secret;
    let mut admin = server.client(Some(&admin)).await;
    let setting = |k: &str, v: &str| pb::SetProjectSettingsRequest {
        project: "fx".into(),
        settings: vec![pb::SettingValue { key: k.into(), value: v.into() }],
    };
    admin.set_project_settings(setting("quota.cores", "20")).await.unwrap();
    let err = admin.set_project_settings(setting("quota.cores", "80")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("quota.cores"), "{}", err.message());
    let err = admin.set_project_settings(setting("colour", "red")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let info = admin.get_project(pb::GetProjectRequest { name: "fx".into() }).await.unwrap().into_inner();
    assert!(info.settings_json.contains("\"cores\":20"), "{}", info.settings_json);
}

/// Enrolls `name` with `cores` and opens its session.
async fn node(server: &Server, name: &str) -> common::Session {
    let credential = server.enroll(name).await;
    server.session(Some(&credential), name).await.unwrap()
}

async fn next_assign(session: &mut common::Session) -> pb::Assign {
    session.assign(WAIT).await.expect("no assignment")
}

fn update(a: &pb::Assign, seq: u64, kind: pb::attempt_update::Kind) -> Msg {
    common::update(pb::AttemptUpdate { attempt_id: a.attempt_id, epoch: a.epoch, seq, kind: Some(kind) })
}

fn finished() -> pb::attempt_update::Kind {
    pb::attempt_update::Kind::Finished(pb::Finished { exit_code: Some(0), ..Default::default() })
}

async fn wait_task(
    server: &Server,
    job: i64,
    check: impl Fn(&[drover_store::TaskRecord]) -> bool,
) -> Vec<drover_store::TaskRecord> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let tasks = server.store.tasks(job).await.unwrap();
        if check(&tasks) {
            return tasks;
        }
        assert!(tokio::time::Instant::now() < deadline, "tasks never got there: {tasks:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_quota_holds_tasks_with_its_reason_and_releases_them_when_capacity_frees() {
    let server = Server::start().await;
    project(&server, "fx").await;
    set(&server, "fx", &[("quota.cores", "1")]).await.unwrap();
    // The node has room for more (1 core per session here, so two nodes).
    let mut a = node(&server, "a").await;
    let mut b = node(&server, "b").await;
    let mut plan = job(vec![task("one", &[]), task("two", &[])]);
    plan.project = "fx".into();
    let mut op = server.operator().await;
    let job_id = op.submit(submit_request(&plan)).await.unwrap().into_inner().job_id;
    // One task runs; the other waits, saying why.
    let tasks = wait_task(&server, job_id, |t| {
        t.iter().any(|t| t.state == TaskState::Assigned)
            && t.iter().any(|t| t.reason.starts_with("project quota"))
    })
    .await;
    let waiting = tasks.iter().find(|t| t.state == TaskState::Queued).unwrap();
    assert_eq!(waiting.reason, "project quota: cores 1/1");
    // Another project is not held by fx's quota.
    let mut other = job(vec![task("free", &[])]);
    other.project = "default".into();
    let other_id = op.submit(submit_request(&other)).await.unwrap().into_inner().job_id;
    wait_task(&server, other_id, |t| t[0].state == TaskState::Assigned).await;
    // Whichever node got fx's running task finishes it; the held task then runs.
    let (owner, assign) = tokio::select! {
        x = next_assign(&mut a) => (0, x),
        x = next_assign(&mut b) => (1, x),
    };
    let (session, assign) = if assign.job_id == job_id {
        (if owner == 0 { &a } else { &b }, assign)
    } else {
        let s = if owner == 0 { &mut b } else { &mut a };
        let x = next_assign(s).await;
        (&*s, x)
    };
    session.send(update(&assign, 1, pb::attempt_update::Kind::Started(pb::Started {}))).await;
    session.send(update(&assign, 2, finished())).await;
    let tasks = wait_task(&server, job_id, |t| {
        t.iter().any(|t| t.state == TaskState::Succeeded) && t.iter().all(|t| t.state != TaskState::Queued)
    })
    .await;
    assert!(tasks.iter().all(|t| !t.reason.starts_with("project quota")), "{tasks:#?}");
}

#[tokio::test]
async fn cost_follows_usage_at_the_prices_in_force_when_the_work_ran() {
    let server = Server::start().await;
    let prices = PriceTable {
        core_hour: 2.0,
        gib_hour: 0.5,
        input_tokens_1k: 0.01,
        output_tokens_1k: 0.1,
        gib_month: 3.0,
        ..Default::default()
    };
    server.store.record_prices(&prices, 0).await.unwrap();
    // One attempt of 1 core and 1 GiB for exactly one hour, with 2,000 input and 500 output
    // tokens, driven through the store so its times are exact.
    let mut plan = job(vec![task("t", &[])]);
    plan.tasks[0].resources = drover_core::Resources { cores: 1, memory: 1 << 30, pids: 0 };
    let job_id = server.store.submit(&plan, "", "f", 1).await.unwrap();
    let n = drover_store::NodeSpec {
        name: "n".into(),
        labels: Default::default(),
        cores: 4,
        memory: 8 << 30,
        runtimes: vec!["process".into()],
        lease_until_ms: i64::MAX / 2,
    };
    server.store.register_node(&n, &[], 1).await.unwrap();
    let a = drover_store::conformance::schedule(&*server.store, 2).await.remove(0);
    server.store.attempt_started(a.attempt_id, a.epoch, 1_000).await.unwrap();
    let report = drover_store::AttemptReport {
        attempt_id: a.attempt_id,
        epoch: a.epoch,
        exit_code: Some(0),
        input_tokens: 2_000,
        output_tokens: 500,
        ..Default::default()
    };
    server.store.attempt_finished(&report, 3_601_000).await.unwrap();
    // Prices change afterwards: the finished work keeps its prices.
    server.store.record_prices(&PriceTable { core_hour: 100.0, ..prices }, 4_000_000).await.unwrap();
    let mut op = server.operator().await;
    let usage = op.usage(pb::UsageRequest { project: String::new(), job_id }).await.unwrap().into_inner();
    let expected = 2.0 + 0.5 + 0.02 + 0.05;
    assert!((usage.jobs[0].cost - expected).abs() < 1e-9, "{usage:#?}");
    assert!((usage.projects[0].cost - expected).abs() < 1e-9);
    assert_eq!(usage.tasks.len(), 1);
    assert!((usage.tasks[0].cost - expected).abs() < 1e-9);
    assert_eq!(usage.tasks[0].task_name, "t");
    // Storage is priced per month at the current prices.
    let digest = format!("sha256:{}", "1".repeat(64));
    drover_store::AccessStore::add_project_blob(&*server.store, "default", &digest, 1 << 30, 5)
        .await
        .unwrap();
    let usage =
        op.usage(pb::UsageRequest { project: "default".into(), job_id: 0 }).await.unwrap().into_inner();
    assert_eq!(usage.projects[0].stored_bytes, 1 << 30);
    assert!((usage.projects[0].storage_cost_month - 3.0).abs() < 1e-9, "{usage:#?}");
}

#[tokio::test]
async fn a_spent_budget_refuses_submits_and_holds_queued_tasks() {
    let server = Server::start().await;
    project(&server, "fx").await;
    // One core-second costs 1: a task that runs a moment spends the whole budget.
    server.store.record_prices(&PriceTable { core_hour: 3600.0, ..Default::default() }, 0).await.unwrap();
    set(&server, "fx", &[("budget", "0.3/day")]).await.unwrap();
    let mut s = node(&server, "n").await;
    let mut plan = job(vec![task("first", &[])]);
    plan.project = "fx".into();
    let mut op = server.operator().await;
    op.submit(submit_request(&plan)).await.unwrap();
    let assign = next_assign(&mut s).await;
    s.send(update(&assign, 1, pb::attempt_update::Kind::Started(pb::Started {}))).await;
    // A job submitted while the budget still holds waits behind the running task.
    let mut waiting = job(vec![task("later", &[])]);
    waiting.project = "fx".into();
    waiting.tasks[0].constraints.insert("pool".into(), "none-yet".into());
    let later = op.submit(submit_request(&waiting)).await.unwrap().into_inner().job_id;
    tokio::time::sleep(Duration::from_millis(600)).await;
    s.send(update(&assign, 2, finished())).await;
    s.wait_ack(2, WAIT).await;
    // Spent: new submits are refused with the reason, queued tasks are held with `budget`.
    let deadline = tokio::time::Instant::now() + WAIT;
    let err = loop {
        match op.submit(submit_request(&plan)).await {
            Err(e) => break e,
            Ok(_) => {
                assert!(tokio::time::Instant::now() < deadline, "the spent budget never refused a submit");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("spent its budget"), "{}", err.message());
    let tasks = wait_task(&server, later, |t| t[0].reason.starts_with("budget")).await;
    assert_eq!(tasks[0].state, TaskState::Queued);
    let info = op.get_project(pb::GetProjectRequest { name: "fx".into() }).await.unwrap().into_inner();
    assert!(info.budget_spent >= 0.3, "{info:?}");
    // Raising the budget releases the hold; the task then waits for a node with its label,
    // and says so.
    set(&server, "fx", &[("budget", "1000/day")]).await.unwrap();
    wait_task(&server, later, |t| t[0].reason == "no ready node has the label pool=none-yet").await;
}

#[tokio::test]
async fn every_kind_of_change_is_audited_and_admins_read_only_their_projects() {
    let server = Server::start().await;
    let mut op = server.operator().await;
    op.create_project(pb::CreateProjectRequest { name: "alpha".into() }).await.unwrap();
    op.create_project(pb::CreateProjectRequest { name: "beta".into() }).await.unwrap();
    let key = |project: &str| pb::CreateKeyRequest {
        project: project.into(),
        role: "admin".into(),
        ..Default::default()
    };
    let alpha_admin = op.create_key(key("alpha")).await.unwrap().into_inner();
    let beta_admin = op.create_key(key("beta")).await.unwrap().into_inner().secret;
    let mut plan = job(vec![task("t", &[])]);
    plan.project = "alpha".into();
    plan.tasks[0].constraints.insert("never".into(), "x".into());
    let job_id = op.submit(submit_request(&plan)).await.unwrap().into_inner().job_id;
    op.cancel(pb::CancelRequest { job_id }).await.unwrap();
    op.set_secret(pb::SetSecretRequest {
        project: "alpha".into(),
        name: "TOKEN".into(),
        value: "hunter2".into(),
    })
    .await
    .unwrap();
    op.delete_secret(pb::DeleteSecretRequest { project: "alpha".into(), name: "TOKEN".into() })
        .await
        .unwrap();
    set(&server, "alpha", &[("quota.cores", "8")]).await.unwrap();
    let alpha_key_id = alpha_admin.key.unwrap().id;
    op.revoke_key(pb::RevokeKeyRequest { id: alpha_key_id.clone() }).await.unwrap();
    let credential = server.enroll("audited").await;
    let _ = credential;
    op.revoke_node(pb::RevokeNodeRequest { name: "audited".into() }).await.unwrap();

    let all = op.audit(pb::AuditRequest::default()).await.unwrap().into_inner().entries;
    let actions: Vec<&str> = all.iter().map(|e| e.action.as_str()).collect();
    for action in [
        "project.create",
        "key.create",
        "job.submit",
        "job.cancel",
        "secret.set",
        "secret.delete",
        "project.set",
        "key.revoke",
        "token.create",
        "node.join",
        "node.revoke",
    ] {
        assert!(actions.contains(&action), "no `{action}` record in {actions:?}");
    }
    let submit = all.iter().find(|e| e.action == "job.submit").unwrap();
    assert_eq!((submit.project.as_str(), submit.target.clone()), ("alpha", job_id.to_string()));
    assert!(submit.actor.starts_with("key "), "{submit:?}");
    assert!(submit.address.starts_with("127.0.0.1:"), "{submit:?}");
    assert!(all.iter().all(|e| !e.detail.contains("hunter2")), "a secret's value reached the audit trail");
    let join = all.iter().find(|e| e.action == "node.join").unwrap();
    assert_eq!(join.actor, "node audited");

    // beta's admin sees beta's records only, and alpha's answer as a missing project.
    let mut beta = server.client(Some(&beta_admin)).await;
    let own = beta.audit(pb::AuditRequest::default()).await.unwrap().into_inner().entries;
    assert!(own.iter().all(|e| e.project == "beta"), "{own:#?}");
    assert!(!own.is_empty());
    let err =
        beta.audit(pb::AuditRequest { project: "alpha".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Since a time: nothing from the future.
    let later = op.audit(pb::AuditRequest { since_ms: i64::MAX / 2, ..Default::default() }).await.unwrap();
    assert!(later.into_inner().entries.is_empty());
}

#[tokio::test]
async fn a_stored_bytes_quota_refuses_uploads_and_outputs_with_a_clear_error() {
    let server = Server::start().await;
    project(&server, "fx").await;
    set(&server, "fx", &[("quota.stored_bytes", "100")]).await.unwrap();
    let mut op = server.operator().await;
    let upload = |data: Vec<u8>| {
        let digest = drover_blobs::Digest::of(&data).to_string();
        let first = pb::BlobChunk { size: data.len() as u64, data, project: "fx".into(), digest };
        futures::stream::iter(vec![first])
    };
    op.put_blob(upload(vec![b'a'; 60])).await.unwrap();
    let err = op.put_blob(upload(vec![b'b'; 60])).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("project quota: stored bytes"), "{}", err.message());
    // The same content again costs nothing more: the project holds it already.
    op.put_blob(upload(vec![b'a'; 60])).await.unwrap();

    // An attempt's outputs past the quota are not kept, and its log says so.
    let mut s = node(&server, "n").await;
    let mut plan = job(vec![task("t", &[])]);
    plan.project = "fx".into();
    let job_id = op.submit(submit_request(&plan)).await.unwrap().into_inner().job_id;
    let a = next_assign(&mut s).await;
    s.send(update(&a, 1, pb::attempt_update::Kind::Started(pb::Started {}))).await;
    let big =
        pb::OutputFile { path: "out.bin".into(), size: 1000, digest: format!("sha256:{}", "0".repeat(64)) };
    s.send(update(&a, 2, pb::attempt_update::Kind::Outputs(pb::Outputs { files: vec![big] }))).await;
    s.wait_ack(2, WAIT).await;
    let arts = op.list_artifacts(pb::ListArtifactsRequest { job_id, ..Default::default() }).await.unwrap();
    assert!(arts.into_inner().artifacts.is_empty(), "outputs over the quota were kept");
    let logs = server.store.logs_after(job_id, &drover_store::TaskFilter::default(), 0, 10).await.unwrap();
    let text: String = logs.iter().map(|l| String::from_utf8_lossy(&l.data).into_owned()).collect();
    assert!(text.contains("outputs not kept") && text.contains("stored bytes"), "{text}");
}
