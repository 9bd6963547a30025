//! The agent session: one bidirectional stream per connected agent.

use std::pin::Pin;
use std::sync::Arc;

use drover_proto as pb;
use drover_proto::agent_message::Msg as In;
use drover_proto::agent_session_server::AgentSession;
use drover_proto::server_message::Msg as Out;
use drover_store::{AttemptReport, AttemptUpdate, NodeSpec, OutputChunk, OutputFile, OutputLine, Signal};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::auth::{self, Caller};
use crate::completions::Acks;
use crate::convert::status;
use crate::session_output::SessionOutput;
use crate::{Session, Shared, now_ms};

type OutStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, Status>> + Send>>;

pub(crate) struct AgentApi(pub(crate) Arc<Shared>);

fn out(msg: Out) -> Result<pb::ServerMessage, Status> {
    Ok(pb::ServerMessage { msg: Some(msg) })
}

#[tonic::async_trait]
impl AgentSession for AgentApi {
    type SessionStream = OutStream;

    async fn session(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<OutStream>, Status> {
        let shared = self.0.clone();
        let caller = auth::caller(&shared, &req).await?;
        let mut inbound = req.into_inner();
        let first = inbound
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("session closed before Register"))??;
        let Some(In::Register(reg)) = first.msg else {
            return Err(Status::invalid_argument("the first message of a session must be Register"));
        };
        let forced = match &caller {
            Caller::Node { name, labels, .. } if *name == reg.name => labels.clone(),
            Caller::Node { name, .. } => {
                tracing::warn!(credential_node = %name, asked = %reg.name, "refused a registration under another node's name");
                return Err(Status::permission_denied(format!(
                    "this credential belongs to node `{name}`; it cannot register `{}`",
                    reg.name
                )));
            }
            Caller::Open => Default::default(),
            Caller::Person { .. } => {
                return Err(Status::permission_denied(
                    "an API key cannot register a node; enroll the agent with `drover agent --join TOKEN`",
                ));
            }
        };
        if let Err(mismatch) = pb::ProtocolMismatch::check_agent(&reg.version, reg.protocol) {
            tracing::warn!(
                name = %reg.name,
                agent_version = %mismatch.agent_version,
                agent_protocol = mismatch.agent_protocol,
                server_protocol = mismatch.server_protocol,
                "refused an agent of another protocol"
            );
            return Err(Status::failed_precondition(mismatch.to_string()));
        }
        check_registration(&reg)?;
        let lease = shared.config.lease;
        let now = now_ms();
        let mut labels: std::collections::BTreeMap<String, String> = reg.labels.into_iter().collect();
        // The operator's labels from the join token win over what the agent says of itself.
        labels.extend(forced);
        let spec = NodeSpec {
            name: reg.name.clone(),
            labels,
            cores: reg.cores,
            memory: reg.memory,
            runtimes: reg.runtimes,
            lease_until_ms: now + lease.as_millis() as i64,
        };
        let registration = shared.store.register_node(&spec, &reg.attempts, now).await.map_err(status)?;
        let (node_id, epoch) = (registration.node_id, registration.epoch);
        tracing::info!(node_id, epoch, name = %reg.name, cores = reg.cores, "agent registered");
        let (tx, rx) = mpsc::channel(1024);
        tx.send(out(Out::Registered(pb::Registered {
            node_id,
            epoch,
            heartbeat_ms: shared.config.heartbeat.as_millis() as u64,
            lease_ms: lease.as_millis() as u64,
            max_outputs_bytes: shared.config.max_outputs,
            max_log_bytes: shared.config.max_log,
            protocol: pb::PROTOCOL_VERSION,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        })))
        .await
        .map_err(|_| Status::cancelled("session closed"))?;
        let stop = Arc::new(tokio::sync::Notify::new());
        let session = Session {
            name: reg.name.clone(),
            stop: stop.clone(),
            epoch,
            tx: tx.clone(),
            warm: Default::default(),
            paused: String::new(),
        };
        shared.sessions.lock().unwrap_or_else(|e| e.into_inner()).insert(node_id, session);
        // A revocation that raced this registration marked the node down before
        // `register_node` brought it back; look once more now that the session is findable.
        if let Caller::Node { credential_id, .. } = &caller
            && shared
                .access
                .node_credential(credential_id)
                .await
                .map_err(status)?
                .is_none_or(|c| c.revoked_ms.is_some())
        {
            shared.end_session(node_id, "the node's credential was revoked");
            let _ = shared.access.revoke_node(&reg.name, now_ms()).await;
        }
        // Cancels sent while the node was away reached no one; the job keeps them. Read only
        // now that the session is findable, so a cancel committed later reaches it as a signal.
        let cancelled = shared.store.cancelled_attempts_on(node_id).await.map_err(status)?;
        if !cancelled.is_empty() {
            tracing::info!(
                node_id,
                attempts = cancelled.len(),
                "asking the agent again to stop attempts of cancelled jobs"
            );
            // Sent beside the session: the stream is handed to the agent only on return, so
            // more messages than the channel holds would wait here forever.
            let tx = tx.clone();
            tokio::spawn(async move {
                for attempt_id in cancelled {
                    let reason = "cancelled by user while the node was away".to_owned();
                    if tx.send(out(Out::Cancel(pb::CancelAttempt { attempt_id, reason }))).await.is_err() {
                        return;
                    }
                }
            });
        }
        shared.publish(Signal::Changed { job_id: 0 }).await;
        shared.publish(Signal::Schedule).await;

        let span = tracing::info_span!("agent_session", node_id, epoch);
        let acks = Acks::spawn(shared.store.clone(), tx.clone());
        let mut output = SessionOutput::spawn(shared.store.clone());
        tokio::spawn(
            async move {
                loop {
                    let msg = tokio::select! {
                        msg = inbound.next() => msg,
                        _ = stop.notified() => break,
                    };
                    let Some(msg) = msg else { break };
                    let msg = match msg {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::info!(error = %e, "agent session broke");
                            break;
                        }
                    };
                    let session = SessionIo { tx: &tx, acks: &acks, output: &mut output };
                    match handle(&shared, node_id, epoch, msg, session).await {
                        Ok(true) => {}
                        Ok(false) => break,
                        Err(e) => {
                            tracing::error!(error = %e, "agent message failed");
                            let _ = tx.send(Err(e)).await;
                            break;
                        }
                    }
                }
                let mut sessions = shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
                if sessions.get(&node_id).is_some_and(|s| s.epoch == epoch) {
                    sessions.remove(&node_id);
                }
                tracing::info!("agent session ended");
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[tracing::instrument(skip_all)]
    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinResponse>, Status> {
        let from = req.remote_addr();
        crate::access_api::join(&self.0, from, req.into_inner()).await.map(Response::new)
    }

    #[tracing::instrument(skip_all)]
    async fn attempt_key(
        &self,
        req: Request<pb::AttemptKeyRequest>,
    ) -> Result<Response<pb::AttemptKeyResponse>, Status> {
        let caller = auth::caller(&self.0, &req).await?;
        attempt_key(&self.0, &caller, req.into_inner()).await.map(Response::new)
    }
}

/// Gives a restarted agent the LLM key and the secrets of an attempt it took over: only a node
/// asking in its own name (its credential's), only for an attempt open on it, only the key and
/// the secrets its task names.
async fn attempt_key(
    shared: &Shared,
    caller: &Caller,
    ask: pb::AttemptKeyRequest,
) -> Result<pb::AttemptKeyResponse, Status> {
    match caller {
        Caller::Node { name, .. } if *name == ask.node => {}
        Caller::Node { name, .. } => {
            tracing::warn!(credential_node = %name, asked = %ask.node, "refused a key asked for another node");
            return Err(Status::permission_denied(format!(
                "this credential belongs to node `{name}`; it cannot ask for the attempts of `{}`",
                ask.node
            )));
        }
        // Without authentication a node is whoever registers under its name.
        Caller::Open => {}
        Caller::Person { .. } => {
            return Err(Status::permission_denied("only the node running an attempt may ask for its key"));
        }
    }
    let Some((project, plan)) =
        shared.store.open_attempt_plan(ask.attempt_id, &ask.node).await.map_err(status)?
    else {
        return Err(Status::not_found(format!(
            "attempt {} is not open on node `{}`; it was handed on or has ended",
            ask.attempt_id, ask.node
        )));
    };
    let key_name = plan.agent.as_ref().and_then(|a| a.key_secret.clone());
    if key_name.is_none() && plan.secrets.is_empty() {
        return Err(Status::failed_precondition(format!(
            "attempt {} has no LLM key and no secrets",
            ask.attempt_id
        )));
    }
    let mut names = plan.secrets.clone();
    names.extend(key_name.clone());
    let mut values = shared.secrets.secret_values(&project, &names).await.map_err(status)?;
    let llm_key = match &key_name {
        // Sent apart from `secrets`, as at assignment: those become the sandbox's environment.
        Some(name) => match values.get(name) {
            Some(key) => key.clone(),
            None => {
                return Err(Status::failed_precondition(format!(
                    "project `{project}` no longer has the secret `{name}`"
                )));
            }
        },
        None => String::new(),
    };
    values.retain(|name, _| plan.secrets.contains(name));
    tracing::info!(
        attempt_id = ask.attempt_id,
        node = %ask.node,
        secrets = values.len(),
        llm_key = key_name.is_some(),
        "an attempt's keys given again to a restarted agent"
    );
    Ok(pb::AttemptKeyResponse { llm_key, secrets: values.into_iter().collect() })
}

/// Where a session's messages go besides the store: its outbound stream, its acknowledger
/// and its output writer.
struct SessionIo<'s> {
    tx: &'s mpsc::Sender<Result<pb::ServerMessage, Status>>,
    acks: &'s Acks,
    output: &'s mut SessionOutput,
}

/// Handles one message from an agent. `Ok(false)` ends the session. Starts and finishes go to
/// the group commit and output to the session's writer, each acknowledged once stored;
/// everything else is applied here, in order.
async fn handle(
    shared: &Shared,
    node_id: i64,
    epoch: i64,
    msg: pb::AgentMessage,
    session: SessionIo<'_>,
) -> Result<bool, Status> {
    let SessionIo { tx, acks, output } = session;
    let now = now_ms();
    match msg.msg {
        Some(In::Heartbeat(beat)) => {
            if let Some(session) = shared.sessions.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&node_id)
                && session.epoch == epoch
            {
                session.warm = beat.warm.into_iter().collect();
                if session.paused != beat.paused {
                    match beat.paused.as_str() {
                        "" => tracing::info!(node_id, "node takes work again"),
                        why => tracing::warn!(node_id, why, "node takes no new work"),
                    }
                    session.paused = beat.paused;
                }
            }
            let until = now + shared.config.lease.as_millis() as i64;
            if !shared.store.renew_lease(node_id, epoch, until, now).await.map_err(status)? {
                tracing::warn!("heartbeat from a stale session; the agent must register again");
                let _ = tx.send(Err(Status::failed_precondition("session is stale; register again"))).await;
                return Ok(false);
            }
            let renewed = pb::LeaseRenewed {
                heartbeat_seq: beat.seq,
                lease_ms: shared.config.lease.as_millis() as u64,
            };
            if tx.send(out(Out::LeaseRenewed(renewed))).await.is_err() {
                return Ok(false);
            }
        }
        Some(In::Reports(batch)) => {
            if batch.reports.len() > pb::MAX_REPORTS_PER_MESSAGE {
                return Err(Status::invalid_argument(format!(
                    "a message carries at most {} reports, not {}",
                    pb::MAX_REPORTS_PER_MESSAGE,
                    batch.reports.len()
                )));
            }
            // In the agent's order: acknowledgements are cumulative, so they must follow it.
            for report in batch.reports {
                if !handle_report(shared, epoch, report, acks, output, now).await? {
                    return Ok(false);
                }
            }
        }
        Some(In::FileChunk(chunk)) => shared.reads.deliver(node_id, chunk),
        Some(In::Register(_)) => return Err(Status::invalid_argument("Register sent twice in one session")),
        None => {}
    }
    Ok(true)
}

/// Applies or queues one report of an outbox batch. `Ok(false)` when the session can no
/// longer acknowledge and must end.
async fn handle_report(
    shared: &Shared,
    epoch: i64,
    report: pb::Report,
    acks: &Acks,
    output: &mut SessionOutput,
    now: i64,
) -> Result<bool, Status> {
    match report.kind {
        Some(pb::report::Kind::Update(mut u)) => {
            // The session's epoch, not the one the message names: epochs are unique across
            // nodes, so the store's fence then accepts the update only if the attempt was
            // assigned to this very node (and this registration of it).
            u.epoch = epoch;
            let applied = match u.kind {
                Some(pb::attempt_update::Kind::Started(_)) => {
                    let started = AttemptUpdate::Started { attempt_id: u.attempt_id, epoch: u.epoch };
                    return queue(shared, acks, u.attempt_id, u.seq, started).await;
                }
                Some(pb::attempt_update::Kind::Finished(f)) => {
                    // Output sent before the finish is stored first: an ended attempt takes none.
                    output.stored(u.attempt_id).await.map_err(|e| Status::unavailable(e.to_string()))?;
                    let failure = pb::FailureClass::decode(f.failure)
                        .map_err(|e| Status::invalid_argument(e.to_string()))?;
                    let report = AttemptReport {
                        attempt_id: u.attempt_id,
                        epoch: u.epoch,
                        exit_code: f.exit_code,
                        signal: f.signal,
                        failure,
                        message: f.message,
                        cpu_seconds: f.cpu_seconds,
                        peak_memory: f.peak_memory_bytes,
                        input_tokens: f.input_tokens,
                        output_tokens: f.output_tokens,
                    };
                    return queue(shared, acks, u.attempt_id, u.seq, AttemptUpdate::Finished(report)).await;
                }
                Some(pb::attempt_update::Kind::Outputs(o)) => {
                    let files: Vec<OutputFile> = o
                        .files
                        .into_iter()
                        .map(|f| OutputFile { path: f.path, size: f.size, digest: f.digest })
                        .collect();
                    if let Some(refused) = outputs_over_quota(shared, u.attempt_id, &files).await? {
                        // Not kept: the task's log says why, where its owner looks first.
                        let line = OutputLine {
                            step: 0,
                            stderr: true,
                            data: format!("drover: {refused}\n").into_bytes(),
                        };
                        let applied = shared
                            .store
                            .append_output(u.attempt_id, u.epoch, &[line])
                            .await
                            .map_err(status)?;
                        return Ok(acks.done(u.attempt_id, u.seq, applied).await.is_ok());
                    }
                    shared
                        .artifacts
                        .record_outputs(u.attempt_id, u.epoch, &files, now)
                        .await
                        .map_err(status)?
                }
                None => return Err(Status::invalid_argument("update without a kind")),
            };
            Ok(acks.done(u.attempt_id, u.seq, applied).await.is_ok())
        }
        Some(pb::report::Kind::Output(mut o)) => {
            o.epoch = epoch;
            let chunks = output_chunks(o.lines, o.chunks)?;
            let stored = output
                .append(o.attempt_id, o.epoch, o.seq, chunks)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            Ok(acks.queued(o.attempt_id, o.seq, stored).await.is_ok())
        }
        None => Err(Status::invalid_argument("report without a kind")),
    }
}

/// Why an attempt's outputs may not be kept (its project's stored-bytes quota), if so.
async fn outputs_over_quota(
    shared: &Shared,
    attempt_id: i64,
    files: &[OutputFile],
) -> Result<Option<String>, Status> {
    let Some(project) = shared.tenants.attempt_project(attempt_id).await.map_err(status)? else {
        return Ok(None);
    };
    let total: u64 = files.iter().map(|f| f.size).sum();
    match crate::tenancy::check_storage(shared, &project, total).await {
        Ok(()) => Ok(None),
        Err(s) if s.code() == tonic::Code::ResourceExhausted => {
            Ok(Some(format!("outputs not kept ({} files): {}", files.len(), s.message())))
        }
        Err(s) => Err(s),
    }
}

/// The output of one report as the store takes it, checked: within the count limits, every
/// chunk's line lengths adding up to its bytes, no line longer than an agent ships. Lines sent
/// one by one (as agents of protocol 2 did) come first, as their own chunks.
fn output_chunks(
    lines: Vec<pb::OutputLine>,
    chunks: Vec<pb::OutputChunk>,
) -> Result<Vec<OutputChunk>, Status> {
    if lines.len() > MAX_LINES_PER_BATCH {
        return Err(Status::invalid_argument(format!(
            "an output batch carries at most {MAX_LINES_PER_BATCH} lines"
        )));
    }
    if chunks.len() > pb::MAX_OUTPUT_CHUNKS {
        return Err(Status::invalid_argument(format!(
            "an output batch carries at most {} chunks, not {}",
            pb::MAX_OUTPUT_CHUNKS,
            chunks.len()
        )));
    }
    let lines: Vec<OutputLine> =
        lines.into_iter().map(|l| OutputLine { step: l.step, stderr: l.stderr, data: l.data }).collect();
    let mut out = OutputChunk::from_lines(&lines);
    out.reserve(chunks.len());
    for c in chunks {
        let chunk = OutputChunk { step: c.step, stderr: c.stderr, lens: c.lens, data: c.data };
        chunk.check(pb::MAX_OUTPUT_LINE).map_err(|e| Status::invalid_argument(e.to_string()))?;
        out.push(chunk);
    }
    Ok(out)
}

/// Most output lines in one message; agents send far fewer.
const MAX_LINES_PER_BATCH: usize = 10_000;
/// Most labels, runtimes and listed attempts a registration may carry.
const MAX_LABELS: usize = 128;
const MAX_RUNTIMES: usize = 16;
const MAX_KNOWN_ATTEMPTS: usize = 100_000;
/// Longest release string a registration may carry.
const MAX_VERSION_BYTES: usize = 64;

/// Refuses a registration whose fields are out of bounds, before anything is stored.
fn check_registration(reg: &pb::Register) -> Result<(), Status> {
    let bad = |why: String| Err(Status::invalid_argument(format!("registration refused: {why}")));
    if !crate::access_api::valid_node_name(&reg.name) {
        return bad(format!("`{}` is not a node name; use letters, digits, `.`, `-` and `_`", reg.name));
    }
    if reg.cores == 0 {
        return bad("a node needs at least one core".into());
    }
    if reg.labels.len() > MAX_LABELS
        || reg.labels.iter().any(|(k, v)| k.is_empty() || k.len() > 63 || v.len() > 255)
    {
        return bad(format!("at most {MAX_LABELS} labels, keys up to 63 bytes and values up to 255"));
    }
    if reg.runtimes.len() > MAX_RUNTIMES || reg.runtimes.iter().any(|r| r.is_empty() || r.len() > 32) {
        return bad(format!("at most {MAX_RUNTIMES} runtimes with short names"));
    }
    if reg.attempts.len() > MAX_KNOWN_ATTEMPTS {
        return bad(format!("at most {MAX_KNOWN_ATTEMPTS} attempts may be listed"));
    }
    if reg.version.len() > MAX_VERSION_BYTES {
        return bad(format!("a version of at most {MAX_VERSION_BYTES} bytes"));
    }
    Ok(())
}

/// Hands a start or finish to the group commit; its acknowledgement follows the commit.
/// `Ok(false)` when the session can no longer acknowledge and must end.
async fn queue(
    shared: &Shared,
    acks: &Acks,
    attempt_id: i64,
    seq: u64,
    update: AttemptUpdate,
) -> Result<bool, Status> {
    let outcome = shared.completions.submit(update).await.map_err(|e| Status::unavailable(e.to_string()))?;
    Ok(acks.queued(attempt_id, seq, outcome).await.is_ok())
}

#[cfg(test)]
mod output_tests {
    use super::*;

    fn chunk(lens: Vec<u32>, data: &[u8]) -> pb::OutputChunk {
        pb::OutputChunk { step: 1, stderr: false, lens, data: data.to_vec() }
    }

    #[test]
    fn output_chunks_are_checked_before_they_are_stored() {
        let line = pb::OutputLine { step: 0, stderr: true, data: b"old\n".to_vec() };
        let ok = output_chunks(vec![line], vec![chunk(vec![2, 3], b"a\nbc\n"), chunk(vec![0], b"")]).unwrap();
        assert_eq!(
            ok.iter().map(|c| (c.step, c.lens.len())).collect::<Vec<_>>(),
            vec![(0, 1), (1, 2), (1, 1)]
        );
        // Output is bytes: invalid UTF-8 is no error.
        assert!(output_chunks(Vec::new(), vec![chunk(vec![2], &[0xff, 0xfe])]).is_ok());

        let refused = |lines: Vec<pb::OutputLine>, chunks: Vec<pb::OutputChunk>| {
            let err = output_chunks(lines, chunks).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
            err.message().to_owned()
        };
        assert!(refused(Vec::new(), vec![chunk(vec![2, 3], b"a\nbc")]).contains("add up to 5 bytes"));
        assert!(refused(Vec::new(), vec![chunk(vec![1], b"a\nbc")]).contains("carries 4"));
        let long = vec![b'x'; pb::MAX_OUTPUT_LINE + 1];
        assert!(refused(Vec::new(), vec![chunk(vec![long.len() as u32], &long)]).contains("longer than"));
        assert!(refused(Vec::new(), vec![chunk(vec![u32::MAX, u32::MAX], b"")]).contains("longer than"));
        let many = vec![chunk(vec![1], b"\n"); pb::MAX_OUTPUT_CHUNKS + 1];
        assert!(refused(Vec::new(), many).contains("chunks"));
        let lines = vec![pb::OutputLine::default(); MAX_LINES_PER_BATCH + 1];
        assert!(refused(lines, Vec::new()).contains("lines"));
    }
}
