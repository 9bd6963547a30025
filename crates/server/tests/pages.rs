//! Lists longer than one page, read through the real APIs: every page is authorized as the
//! first, tokens continue exactly where their page ended, and bad page requests are refused.

mod common;

use std::collections::BTreeMap;

use common::Server;
use drover_proto as pb;
use drover_store::conformance::{job, schedule, task};
use drover_store::{NodeSpec, OutputFile, Store};
use tonic::Code;

/// Job ids of every page of `ListJobs`, `size` at a time, as the caller sees them.
async fn job_pages(client: &mut common::Client, size: u32) -> Vec<Vec<(i64, String)>> {
    let mut pages = Vec::new();
    let mut page_token = String::new();
    loop {
        let req = pb::ListJobsRequest { all: true, page_size: size, page_token, ..Default::default() };
        let page = client.list_jobs(req).await.unwrap().into_inner();
        pages.push(page.jobs.into_iter().map(|j| (j.id, j.project)).collect());
        if page.next_page_token.is_empty() {
            return pages;
        }
        page_token = page.next_page_token;
    }
}

#[tokio::test]
async fn jobs_are_listed_page_by_page_within_the_callers_projects() {
    let server = Server::start().await;
    let mut op = server.operator().await;
    for name in ["alpha", "beta"] {
        op.create_project(pb::CreateProjectRequest { name: name.into() }).await.unwrap();
    }
    let mut alpha_jobs = Vec::new();
    for i in 0..5 {
        for project in ["alpha", "beta"] {
            let mut plan = job(vec![task("t", &[])]);
            plan.project = project.into();
            plan.tasks[0].constraints.insert("never".into(), "matches".into());
            let id = server.store.submit(&plan, "", "f", i).await.unwrap();
            if project == "alpha" {
                alpha_jobs.push((id, project.to_string()));
            }
        }
    }
    alpha_jobs.reverse();
    let req = pb::CreateKeyRequest { project: "alpha".into(), role: "viewer".into(), ..Default::default() };
    let alpha_key = op.create_key(req).await.unwrap().into_inner().secret;
    let mut alpha = server.client(Some(&alpha_key)).await;

    let pages = job_pages(&mut alpha, 2).await;
    assert_eq!(pages, vec![alpha_jobs[0..2].to_vec(), alpha_jobs[2..4].to_vec(), alpha_jobs[4..].to_vec()]);
    assert_eq!(job_pages(&mut op, 3).await.concat().len(), 10, "the operator sees both projects");

    // A token the operator got (past beta's newest job) shows alpha's caller only alpha's jobs.
    let req = pb::ListJobsRequest { all: true, page_size: 1, ..Default::default() };
    let op_first = op.list_jobs(req).await.unwrap().into_inner();
    assert_eq!(op_first.jobs[0].project, "beta");
    let req = pb::ListJobsRequest { all: true, page_token: op_first.next_page_token, ..Default::default() };
    let rest = alpha.list_jobs(req).await.unwrap().into_inner().jobs;
    assert_eq!(rest.into_iter().map(|j| (j.id, j.project)).collect::<Vec<_>>(), alpha_jobs);

    // A client that predates pages sends `limit` alone and still gets an answer.
    let old = pb::ListJobsRequest { limit: 10_000, all: true, ..Default::default() };
    let page = alpha.list_jobs(old).await.unwrap().into_inner();
    assert_eq!((page.jobs.len(), page.next_page_token.as_str()), (5, ""));

    let too_big = pb::ListJobsRequest { all: true, page_size: 1_001, ..Default::default() };
    let e = alpha.list_jobs(too_big).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("page size"), "{}", e.message());
    for garbled in ["garbled", "eyJsaXN0Ijoibm9kZXMiLCJhZnRlciI6Im4ifQ"] {
        let req = pb::ListJobsRequest { all: true, page_token: garbled.into(), ..Default::default() };
        let e = alpha.list_jobs(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{garbled}");
        assert!(e.message().contains("page token"), "{}", e.message());
    }
}

#[tokio::test]
async fn keys_and_audit_records_are_listed_page_by_page() {
    let server = Server::start().await;
    let mut op = server.operator().await;
    op.create_project(pb::CreateProjectRequest { name: "alpha".into() }).await.unwrap();
    for i in 0..4 {
        let req = pb::CreateKeyRequest {
            project: "alpha".into(),
            role: "viewer".into(),
            name: format!("k{i}"),
            ..Default::default()
        };
        op.create_key(req).await.unwrap();
    }
    let mut names = Vec::new();
    let mut page_token = String::new();
    loop {
        let req = pb::ListKeysRequest { project: "alpha".into(), page_size: 3, page_token };
        let page = op.list_keys(req).await.unwrap().into_inner();
        assert!(page.keys.len() <= 3);
        names.extend(page.keys.into_iter().map(|k| k.name));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(names, ["k0", "k1", "k2", "k3"]);

    // The audit trail (a project and four keys made) read one record at a time.
    let everything = op.audit(pb::AuditRequest::default()).await.unwrap().into_inner();
    assert_eq!(everything.next_page_token, "");
    let mut ids = Vec::new();
    let mut page_token = String::new();
    loop {
        let req = pb::AuditRequest { page_size: 1, page_token, ..Default::default() };
        let page = op.audit(req).await.unwrap().into_inner();
        ids.extend(page.entries.iter().map(|e| e.id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(ids, everything.entries.iter().map(|e| e.id).collect::<Vec<_>>());
    assert_eq!(ids.len(), 5);
}

#[tokio::test]
async fn http_artifacts_are_listed_page_by_page() {
    let server = Server::start().await;
    let store = &server.store;
    let mut plan = job(vec![task("t", &[])]);
    plan.tasks[0].constraints.insert("seed".into(), "yes".into());
    let job_id = store.submit(&plan, "", "f", 1).await.unwrap();
    let node = NodeSpec {
        name: "seed-node".into(),
        labels: BTreeMap::from([("seed".to_string(), "yes".to_string())]),
        cores: 1,
        memory: 1 << 30,
        runtimes: vec!["process".into()],
        lease_until_ms: i64::MAX / 2,
    };
    store.register_node(&node, &[], 1).await.unwrap();
    let a = schedule(&**store, 2).await.remove(0);
    let files: Vec<OutputFile> = ["a", "b", "c"]
        .iter()
        .map(|p| OutputFile { path: (*p).into(), size: 1, digest: format!("sha256:{p}") })
        .collect();
    drover_store::ArtifactStore::record_outputs(&**store, a.attempt_id, a.epoch, &files, 3).await.unwrap();

    let http = reqwest::Client::new();
    let get = async |query: &str| {
        http.get(format!("{}/v1/jobs/{job_id}/artifacts?{query}", server.http))
            .bearer_auth(&server.operator)
            .send()
            .await
            .unwrap()
    };
    let first = get("page_size=2").await;
    assert_eq!(first.status(), 200);
    let token = first.headers()["x-next-page-token"].to_str().unwrap().to_owned();
    let paths = |body: String| -> Vec<String> {
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        body.as_array().unwrap().iter().map(|a| a["path"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(paths(first.text().await.unwrap()), ["a", "b"]);
    let second = get(&format!("page_size=2&page_token={token}")).await;
    assert_eq!(second.status(), 200);
    assert!(second.headers().get("x-next-page-token").is_none(), "the last page");
    assert_eq!(paths(second.text().await.unwrap()), ["c"]);

    assert_eq!(get("page_token=garbled").await.status(), 400);
    assert_eq!(get("page_size=5000").await.status(), 400);
}
