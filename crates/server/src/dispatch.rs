//! Dispatch: the assignments of one placement round become the messages their agents get.
//!
//! Each node receives its share of a round in one `Assignments` message; only a share beyond
//! the protocol's count limit ([`pb::MAX_ASSIGNS_PER_MESSAGE`]) or [`MAX_MESSAGE_BYTES`] is
//! split. What the messages need from the store besides the plan (a job's project, whether
//! that project lets containers run as root) is read once per job and project in a round,
//! not once per attempt.

use std::collections::{BTreeMap, HashMap};

use drover_core::FailureClass;
use drover_proto as pb;
use drover_proto::{ServerMessage, server_message};
use drover_store::{Assignment, AttemptReport, AttemptUpdate};
use prost::Message;

use crate::Shared;
use crate::convert::assign_message;

/// Most encoded bytes of assignments in one message: well under what an agent decodes (64
/// MiB), so that a round of large plans still reaches it.
const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// Sends the assignments of a round to their nodes' agents, one message per node.
pub(crate) async fn dispatch(shared: &Shared, assignments: Vec<Assignment>) {
    let mut lookups = Lookups::default();
    let mut by_node: BTreeMap<i64, Vec<pb::Assign>> = BTreeMap::new();
    for mut a in assignments {
        tracing::info!(
            job_id = a.job_id,
            task_id = a.task_id,
            attempt_id = a.attempt_id,
            node_id = a.node_id,
            "task assigned"
        );
        resolve_artifact_inputs(shared, &mut a).await;
        let mut assign = match assign_message(&a) {
            Ok(m) => m,
            Err(e) => {
                refuse(shared, &a, &format!("the server cannot encode the task's plan: {e}")).await;
                continue;
            }
        };
        if !a.plan.secrets.is_empty() {
            assign.secrets = lookups.secrets(shared, a.job_id, &a.plan.secrets).await.into_iter().collect();
        }
        if let Some(key) = a.plan.agent.as_ref().and_then(|g| g.key_secret.clone()) {
            // Sent apart from `secrets`, which become the sandbox's environment.
            let mut found = lookups.secrets(shared, a.job_id, std::slice::from_ref(&key)).await;
            assign.llm_key = found.remove(&key).unwrap_or_default();
        }
        if a.plan.wants_root_container() {
            assign.allow_root = lookups.allows_root(shared, a.job_id).await;
        }
        by_node.entry(a.node_id).or_default().push(assign);
    }
    for (node_id, assigns) in by_node {
        for attempts in batches(assigns) {
            tracing::debug!(node_id, attempts = attempts.len(), "sending assignments");
            let msg = ServerMessage { msg: Some(server_message::Msg::Assign(pb::Assignments { attempts })) };
            shared.send_to_node(node_id, msg).await;
        }
    }
}

/// Cuts a node's assignments into messages within the protocol's limits, in order; every
/// message carries at least one, however large.
fn batches(assigns: Vec<pb::Assign>) -> Vec<Vec<pb::Assign>> {
    let mut out: Vec<Vec<pb::Assign>> = Vec::new();
    let mut bytes = 0;
    for a in assigns {
        let len = a.encoded_len();
        match out.last_mut() {
            Some(last) if last.len() < pb::MAX_ASSIGNS_PER_MESSAGE && bytes + len <= MAX_MESSAGE_BYTES => {
                bytes += len;
                last.push(a);
            }
            _ => {
                bytes = len;
                out.push(vec![a]);
            }
        }
    }
    out
}

/// Ends an attempt that cannot be sent as failed to start, as its agent would have reported
/// it, so that its task is retried or fails instead of waiting forever.
async fn refuse(shared: &Shared, a: &Assignment, why: &str) {
    tracing::error!(
        job_id = a.job_id,
        task_id = a.task_id,
        attempt_id = a.attempt_id,
        why,
        "attempt not sent"
    );
    let report = AttemptReport {
        attempt_id: a.attempt_id,
        epoch: a.epoch,
        failure: Some(FailureClass::Start),
        message: why.to_owned(),
        ..Default::default()
    };
    let settled = match shared.completions.submit(AttemptUpdate::Finished(report)).await {
        Ok(outcome) => outcome.await.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())),
        Err(e) => Err(e.to_string()),
    };
    if let Err(error) = settled {
        // Its node still holds the attempt: the lease reaper settles it when the node goes.
        tracing::error!(attempt_id = a.attempt_id, %error, "cannot settle an attempt that was not sent");
    }
}

/// Store reads a round shares between its assignments. A failed read is logged once and
/// counts as "nothing found" for the rest of the round, as it would have for each attempt.
#[derive(Default)]
struct Lookups {
    /// Each job's project; `None` when the job is gone or could not be read.
    projects: HashMap<i64, Option<String>>,
    /// Whether each project lets containers run as root.
    root: HashMap<String, bool>,
}

impl Lookups {
    async fn project(&mut self, shared: &Shared, job_id: i64) -> Option<String> {
        if let Some(project) = self.projects.get(&job_id) {
            return project.clone();
        }
        let project = match shared.store.job(job_id).await {
            Ok(job) => job.map(|j| j.project),
            Err(e) => {
                tracing::error!(job_id, error = %e, "cannot read the job to resolve its secrets and settings");
                None
            }
        };
        self.projects.insert(job_id, project.clone());
        project
    }

    /// Values of a task's secrets. A secret deleted since the submit is simply absent (the
    /// task sees no variable), and a store failure is logged: the dispatch goes on either way.
    async fn secrets(&mut self, shared: &Shared, job_id: i64, names: &[String]) -> BTreeMap<String, String> {
        let Some(project) = self.project(shared, job_id).await else { return Default::default() };
        match shared.secrets.secret_values(&project, names).await {
            Ok(values) => values,
            Err(e) => {
                tracing::error!(job_id, error = %e, "cannot resolve secrets");
                Default::default()
            }
        }
    }

    /// Whether the project of `job_id` lets containers run as root; `false` when it cannot be
    /// told, so that the agent refuses rather than runs root unchecked.
    async fn allows_root(&mut self, shared: &Shared, job_id: i64) -> bool {
        let Some(project) = self.project(shared, job_id).await else { return false };
        if let Some(allowed) = self.root.get(&project) {
            return *allowed;
        }
        let allowed = match shared.tenants.project_settings(&project).await {
            Ok(settings) => settings.unwrap_or_default().containers_as_root,
            Err(e) => {
                tracing::error!(job_id, error = %e, "cannot read project settings");
                false
            }
        };
        self.root.insert(project, allowed);
        allowed
    }
}

/// Turns `from: TASK:PATH` inputs into the blobs those tasks kept, so the agent only downloads.
/// An input whose artifact does not exist stays as it is, and the agent fails the attempt
/// with a message naming it.
async fn resolve_artifact_inputs(shared: &Shared, a: &mut Assignment) {
    for input in &mut a.plan.inputs {
        let drover_core::InputSource::Artifact { task, path } = &input.source else { continue };
        let filter = drover_store::TaskFilter { name: Some(task.clone()), frame: None };
        match shared.artifacts.artifacts(a.job_id, &filter).await {
            Ok(found) => {
                if let Some(art) = found.iter().find(|f| &f.path == path) {
                    input.source =
                        drover_core::InputSource::Blob { digest: art.digest.clone(), directory: false };
                }
            }
            Err(e) => tracing::error!(job_id = a.job_id, error = %e, "cannot resolve artifact inputs"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assign(attempt_id: i64, plan_bytes: usize) -> pb::Assign {
        pb::Assign { attempt_id, plan_json: "x".repeat(plan_bytes), ..Default::default() }
    }

    #[test]
    fn a_nodes_share_goes_in_one_message_unless_it_exceeds_a_limit() {
        let few: Vec<_> = (1..=5).map(|i| assign(i, 100)).collect();
        assert_eq!(batches(few).iter().map(Vec::len).collect::<Vec<_>>(), vec![5]);

        let many: Vec<_> = (0..pb::MAX_ASSIGNS_PER_MESSAGE as i64 + 3).map(|i| assign(i, 10)).collect();
        let cut = batches(many);
        assert_eq!(cut.iter().map(Vec::len).collect::<Vec<_>>(), vec![pb::MAX_ASSIGNS_PER_MESSAGE, 3]);
        let order: Vec<i64> = cut.iter().flatten().map(|a| a.attempt_id).collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "the order changed");

        // Large plans: as many per message as fit, and one alone when it is larger still.
        let big = MAX_MESSAGE_BYTES / 2;
        let large = vec![assign(1, big), assign(2, big), assign(3, MAX_MESSAGE_BYTES * 2), assign(4, 10)];
        assert_eq!(batches(large).iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 1, 1, 1]);
        let fits = vec![assign(1, big - 100), assign(2, big - 100), assign(3, 200)];
        assert_eq!(batches(fits).iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 1]);
    }
}
