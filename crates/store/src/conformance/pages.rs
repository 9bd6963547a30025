//! Paged lists: each list pages in its own order, a token continues exactly after its page,
//! rows added between pages neither repeat nor hide the rows still to come, a token never
//! widens the filter it is used with, and bad requests are refused with a clear error.

use drover_core::Role;

use super::{job, node, schedule, task};
use crate::*;

/// Every page of a list, `size` rows at a time, following tokens to the end. Only the last
/// page may lack a token, and a page with a token is never empty.
async fn every_page<T>(size: u32, mut read: impl AsyncFnMut(PageRequest) -> Result<Page<T>>) -> Vec<Vec<T>> {
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = read(PageRequest::after(size, token)).await.unwrap();
        assert!(page.items.len() <= size as usize, "a page holds at most its size");
        token = page.next_token;
        let empty = page.items.is_empty();
        pages.push(page.items);
        if token.is_empty() {
            return pages;
        }
        assert!(!empty, "a page followed by another is never empty");
    }
}

/// Asserts that a read was refused as invalid `what` (`page size` or `page token`).
fn refused<T: std::fmt::Debug>(read: Result<Page<T>>, what: &str) {
    match read {
        Err(StoreError::Invalid { what: w, detail }) if w == what => {
            assert!(!detail.is_empty(), "the error says why");
        }
        other => panic!("expected an invalid {what}, got {other:?}"),
    }
}

fn key(id: &str, project: Option<&str>, created_ms: i64) -> KeyRecord {
    KeyRecord {
        id: id.into(),
        secret_sha256: id.as_bytes().to_vec(),
        project: project.map(str::to_string),
        role: if project.is_some() { Role::Viewer } else { Role::Operator },
        name: String::new(),
        created_ms,
        expires_ms: None,
        revoked_ms: None,
        created_by: "op".into(),
    }
}

/// Jobs page newest first; a job submitted between two pages appears on neither (it is newer
/// than the first), and the next page starts exactly after the last job of the previous one.
pub async fn jobs_page_newest_first<S: Store>(store: &S) {
    let mut other = job(vec![task("t", &[])]);
    other.project = "other".into();
    let mut mine = Vec::new();
    for i in 0..5 {
        mine.push(store.submit(&job(vec![task("t", &[])]), "", "f", i).await.unwrap());
        store.submit(&other, "", "f", i).await.unwrap();
    }
    mine.reverse();
    let default = ["default".to_string()];
    let pages = every_page(2, async |page| store.list_jobs(true, Some(&default), &page).await).await;
    let ids: Vec<Vec<i64>> = pages.iter().map(|p| p.iter().map(|j| j.id).collect()).collect();
    assert_eq!(ids, vec![mine[0..2].to_vec(), mine[2..4].to_vec(), mine[4..].to_vec()]);

    // A list that fills its last page exactly ends there, without an empty page after it.
    let exact = every_page(5, async |page| store.list_jobs(true, Some(&default), &page).await).await;
    assert_eq!(exact.len(), 1, "five jobs in pages of five are one page");

    let first = store.list_jobs(true, Some(&default), &PageRequest::first(2)).await.unwrap();
    let newer = store.submit(&job(vec![task("t", &[])]), "", "f", 9).await.unwrap();
    let next =
        store.list_jobs(true, Some(&default), &PageRequest::after(2, &first.next_token)).await.unwrap();
    let ids: Vec<i64> = next.items.iter().map(|j| j.id).collect();
    assert_eq!(ids, mine[2..4].to_vec(), "continues exactly after the first page");
    assert!(!ids.contains(&newer));

    // A token is only a position: used with another filter, that filter holds.
    let theirs = ["other".to_string()];
    let next =
        store.list_jobs(true, Some(&theirs), &PageRequest::after(100, &first.next_token)).await.unwrap();
    assert_eq!(next.items.len(), 3, "the other project's jobs older than the position");
    assert!(next.items.iter().all(|j| j.project == "other"));
    let none = store.list_jobs(true, Some(&[]), &PageRequest::after(2, &first.next_token)).await.unwrap();
    assert!(none.items.is_empty() && none.next_token.is_empty(), "no projects, no jobs, whatever the token");
}

/// Page sizes above the cap and tokens this store did not make (garbled, or of another list)
/// are refused, not read as an empty page.
pub async fn page_requests_are_checked<S: Store + AccessStore>(store: &S) {
    store.submit(&job(vec![task("t", &[])]), "", "f", 1).await.unwrap();
    store.submit(&job(vec![task("t", &[])]), "", "f", 2).await.unwrap();
    refused(store.list_jobs(true, None, &PageRequest::first(MAX_PAGE_SIZE + 1)).await, "page size");
    refused(store.list_nodes(&PageRequest::first(u32::MAX)).await, "page size");
    let full = store.list_jobs(true, None, &PageRequest::first(MAX_PAGE_SIZE)).await.unwrap();
    assert_eq!(full.items.len(), 2, "the cap itself is allowed");
    let default = store.list_jobs(true, None, &PageRequest::first(0)).await.unwrap();
    assert_eq!(default.items.len(), 2, "0 asks for the default size");

    let jobs_token = store.list_jobs(true, None, &PageRequest::first(1)).await.unwrap().next_token;
    assert!(!jobs_token.is_empty());
    for garbled in ["not a token", "eyJsaXN0Ijoiam9icyJ9", &jobs_token[..jobs_token.len() - 3], "%00"] {
        refused(store.list_jobs(true, None, &PageRequest::after(1, garbled)).await, "page token");
    }
    // Empty filters are answered without a query, but a bad token is still an error.
    refused(store.list_jobs(true, Some(&[]), &PageRequest::after(1, "garbled!")).await, "page token");
    refused(store.list_nodes(&PageRequest::after(1, &jobs_token)).await, "page token");
    refused(store.list_projects(None, &PageRequest::after(1, &jobs_token)).await, "page token");
    refused(store.list_keys(None, &PageRequest::after(1, &jobs_token)).await, "page token");
}

/// Nodes and projects page by name; a name added behind the position is not seen, one ahead
/// of it is, each once.
pub async fn nodes_and_projects_page_by_name<S: Store + AccessStore>(store: &S) {
    for name in ["n-b", "n-d", "n-f", "n-h"] {
        store.register_node(&node(name, 1, 10_000), &[], 1).await.unwrap();
    }
    let first = store.list_nodes(&PageRequest::first(2)).await.unwrap();
    let names = |nodes: &[NodeRecord]| nodes.iter().map(|n| n.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&first.items), ["n-b", "n-d"]);
    store.register_node(&node("n-a", 1, 10_000), &[], 2).await.unwrap();
    store.register_node(&node("n-e", 1, 10_000), &[], 2).await.unwrap();
    let second = store.list_nodes(&PageRequest::after(2, &first.next_token)).await.unwrap();
    assert_eq!(names(&second.items), ["n-e", "n-f"], "n-a is behind the position, n-e ahead of it");
    let all = every_page(3, async |page| store.list_nodes(&page).await).await;
    let all: Vec<NodeRecord> = all.into_iter().flatten().collect();
    assert_eq!(all, store.nodes().await.unwrap(), "pages add up to the whole list");

    for name in ["p-c", "p-a", "p-e", "p-b", "p-d"] {
        store.create_project(name, 5).await.unwrap();
    }
    let all = every_page(2, async |page| store.list_projects(None, &page).await).await;
    let all: Vec<ProjectRecord> = all.into_iter().flatten().collect();
    assert_eq!(all, store.projects().await.unwrap());
    let only = ["p-e".to_string(), "p-b".to_string(), "p-d".to_string(), "nope".to_string()];
    let pages = every_page(2, async |page| store.list_projects(Some(&only), &page).await).await;
    let pages: Vec<Vec<&str>> = pages.iter().map(|p| p.iter().map(|p| p.name.as_str()).collect()).collect();
    assert_eq!(pages, vec![vec!["p-b", "p-d"], vec!["p-e"]]);
    assert!(store.list_projects(Some(&[]), &PageRequest::first(2)).await.unwrap().items.is_empty());
}

/// Keys page oldest first (ties by id), secrets by name, audit records by id; each list read
/// in pages is the whole list, in its order.
pub async fn keys_secrets_and_audit_page<S: AccessStore + SecretStore + TenantStore>(store: &S) {
    // Several keys made in the same millisecond: the id orders them, and a page may end
    // between two of them.
    for (id, project, at) in
        [("k3", Some("team"), 1), ("k1", Some("team"), 1), ("op", None, 1), ("k2", Some("team"), 2)]
    {
        store.create_key(&key(id, project, at)).await.unwrap();
    }
    for project in [None, Some("team")] {
        let pages = every_page(1, async |page| store.list_keys(project, &page).await).await;
        let paged: Vec<KeyRecord> = pages.into_iter().flatten().collect();
        assert_eq!(paged, store.keys(project).await.unwrap());
    }
    let team = every_page(2, async |page| store.list_keys(Some("team"), &page).await).await;
    let team: Vec<Vec<&str>> = team.iter().map(|p| p.iter().map(|k| k.id.as_str()).collect()).collect();
    assert_eq!(team, vec![vec!["k1", "k3"], vec!["k2"]]);

    for name in ["E", "A", "C", "B", "D"] {
        store.set_secret("team", name, "v", 1).await.unwrap();
    }
    store.set_secret("other", "AA", "v", 1).await.unwrap();
    let names = every_page(2, async |page| store.list_secret_names("team", &page).await).await;
    assert_eq!(names, vec![vec!["A", "B"], vec!["C", "D"], vec!["E"]]);

    let mut ids = Vec::new();
    for i in 0..5 {
        let project = (i % 2 == 0).then(|| "team".to_string());
        let record = AuditRecord {
            id: 0,
            time_ms: i,
            actor: "key k1".into(),
            address: String::new(),
            project,
            action: "job.submit".into(),
            target: i.to_string(),
            detail: String::new(),
        };
        ids.push(store.append_audit(&record).await.unwrap());
    }
    let all = AuditFilter::default();
    let pages = every_page(2, async |page| store.list_audit(&all, &page).await).await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
    let paged: Vec<AuditRecord> = pages.into_iter().flatten().collect();
    assert_eq!(paged, store.audit(&all).await.unwrap());
    let of_team = AuditFilter { projects: Some(vec!["team".into()]), ..Default::default() };
    let pages = every_page(2, async |page| store.list_audit(&of_team, &page).await).await;
    let paged: Vec<i64> = pages.into_iter().flatten().map(|r| r.id).collect();
    assert_eq!(paged, [ids[0], ids[2], ids[4]], "the filter holds on every page");
}

/// Artifacts page by task, path and newest attempt, down to rows that tie on all three.
pub async fn artifacts_page_by_task_and_path<S: Store + ArtifactStore>(store: &S) {
    let id = store.submit(&job(vec![task("a", &[]), task("b", &[])]), "", "f", 1).await.unwrap();
    store.register_node(&node("n-art", 2, 100_000), &[], 1).await.unwrap();
    let file = |path: &str| OutputFile { path: path.into(), size: 1, digest: format!("sha256:{path}") };
    for a in schedule(store, 2).await {
        let files = [file("z"), file("m"), file("a")];
        store.record_outputs(a.attempt_id, a.epoch, &files, 3).await.unwrap();
        // The same path kept again by the same attempt: only the row tells the two apart.
        store.record_outputs(a.attempt_id, a.epoch, &[file("m")], 4).await.unwrap();
    }
    let every = TaskFilter::default();
    let whole = store.artifacts(id, &every).await.unwrap();
    assert_eq!(whole.len(), 8);
    for size in [1, 3, 8] {
        let pages = every_page(size, async |page| store.list_artifacts(id, &every, &page).await).await;
        let paged: Vec<ArtifactRecord> = pages.into_iter().flatten().collect();
        assert_eq!(paged, whole, "pages of {size}");
    }
    let of_b = TaskFilter { name: Some("b".into()), frame: None };
    let pages = every_page(3, async |page| store.list_artifacts(id, &of_b, &page).await).await;
    let paged: Vec<ArtifactRecord> = pages.into_iter().flatten().collect();
    assert_eq!(paged, store.artifacts(id, &of_b).await.unwrap());
    assert!(paged.iter().all(|a| a.task_name == "b") && paged.len() == 4);
}
