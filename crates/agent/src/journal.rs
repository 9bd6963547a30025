//! The agent's journal of running steps: for each attempt its `TaskSpec` and the `RunHandle`
//! of the step in flight, kept in the agent's state log (see [`crate::state_log`]), so that
//! after a crash the next agent run can find what the previous one left running.
//!
//! Steps whose sandboxes outlive the agent are re-attached and resumed: containers, microVMs
//! (through their second port), and process steps through their supervisors (whose output is
//! shipped on from where the earlier run got to). An AI-agent task's metering proxy, which
//! lived in the agent, starts again from what its entry keeps (see [`Entry::ai`]). Steps that
//! cannot be re-attached are stopped, and their attempts reported lost, so the server settles
//! them at once instead of leaving the work to run twice.
//!
//! The journal never holds a secret value: an entry keeps the names of the task's secrets with
//! empty values, the log is readable by the agent's user only (0600, in a 0700 directory),
//! and a resumed attempt that would need the values for a new step fails instead (see
//! [`crate::attempt::SECRETS_GONE`]). The step in flight got its secrets when it started.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::ai_task::proxy::TokenUsage;
use crate::reach::OutputReach;
use crate::runtime::{OutputChunk, RunHandle, Runtime, StopSignal, TaskSpec};
use crate::state_log::{Record, StateLog};

/// Runtimes by kind.
pub type Runtimes = BTreeMap<String, Arc<dyn Runtime>>;

/// What the journal keeps per attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Runtime kind that runs it.
    pub runtime: String,
    /// The attempt; as written to and read from the journal, its secrets have names only
    /// (empty values).
    pub spec: TaskSpec,
    /// The step in flight, once started.
    pub handle: Option<RunHandle>,
    /// The attempt's timeout, restarted in full when a re-attached attempt resumes.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// An AI-agent task: its metering proxy lives in the agent process. A restarted agent
    /// re-attaches it only with [`Entry::ai`] (an entry of an older agent lacks it).
    #[serde(default)]
    pub metered: bool,
    /// What taking an AI-agent task over takes: its setup, its proxy's (but the key) and the
    /// tokens counted so far, kept current while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ai: Option<Box<crate::ai_task::Resumable>>,
    /// The outputs the attempt keeps when it ends, so that a re-attached attempt keeps them too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<KeptOutputs>,
    /// The server's limits the attempt runs under, so that a re-attached attempt keeps them:
    /// it is resumed before the restarted agent registers and learns them again. An older
    /// agent's entry lacks them, and the limits known when it is resumed apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<AttemptLimits>,
}

/// Limits the server sets for every attempt, as an attempt runs under them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptLimits {
    /// Most output the attempt logs, bytes (0: no limit).
    pub max_log: u64,
    /// Most bytes of outputs it keeps.
    pub max_outputs: u64,
}

/// Which outputs an attempt keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeptOutputs {
    /// Globs of the paths kept, relative to the workspace.
    pub globs: Vec<String>,
    /// Whether they are kept when the attempt failed too.
    pub on_failure: bool,
}

/// A step an earlier agent run left running, re-attached by this one.
#[derive(Debug)]
pub struct Reattached {
    /// The attempt, as journaled.
    pub entry: Entry,
    /// The step in flight.
    pub handle: RunHandle,
    /// The step's output from where the earlier run got to, when the runtime ships it on.
    pub output: mpsc::Receiver<OutputChunk>,
    /// How far the step's output in the outbox reaches, for a runtime whose output says where
    /// it ends: `output` begins there, and the masked bytes past its clean offsets were
    /// shipped already.
    pub reach: Option<OutputReach>,
    /// For a runtime whose output says where it ends, when the outbox's output of the attempt
    /// reaches only into an earlier step: that reach. What the earlier steps wrote past it is
    /// not in the outbox (held back for the log's tail, or not yet shipped when the earlier
    /// run ended) and is read again from their files.
    pub earlier: Option<OutputReach>,
}

/// The journal: the live entries, and the log they are kept in.
#[derive(Debug, Clone)]
pub struct Journal {
    log: Arc<StateLog>,
    /// Entries of attempts that have not ended, secret values cleared.
    live: Arc<Mutex<HashMap<i64, Entry>>>,
    /// How far the output of an earlier run's steps got into the outbox, by attempt: where
    /// their re-attached steps ship on from.
    reach: Arc<HashMap<i64, OutputReach>>,
    /// Token usage of AI-agent attempts whose first step is not recorded yet: the entry takes
    /// it when it is.
    early_usage: Arc<Mutex<HashMap<i64, TokenUsage>>>,
}

/// What [`Journal::recover`] did with an earlier run's entries.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Steps re-attached, to be resumed.
    pub resumable: Vec<Reattached>,
    /// Attempts whose steps were stopped (or were gone): they must be reported lost.
    pub stopped: Vec<i64>,
}

impl Journal {
    /// A journal kept in `log`, holding the `entries` an earlier run left there.
    pub fn new(log: Arc<StateLog>, entries: Vec<Entry>) -> Journal {
        let live = entries.into_iter().map(|e| (e.spec.attempt_id, e)).collect();
        Journal { log, live: Arc::new(Mutex::new(live)), reach: Arc::default(), early_usage: Arc::default() }
    }

    /// The journal, knowing how far the output of the earlier run's steps got (what the state
    /// log recovered, see [`crate::reach`]).
    pub fn with_output_reach(mut self, reach: HashMap<i64, OutputReach>) -> Journal {
        self.reach = Arc::new(reach);
        self
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Entry>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records (or updates) an attempt, without its secret values. Failures are logged, not
    /// fatal: the journal only matters after a crash.
    pub async fn record(&self, entry: &Entry) {
        let mut kept = entry.clone();
        kept.spec.secrets.values_mut().for_each(String::clear);
        let early = self.early_usage.lock().unwrap_or_else(|e| e.into_inner()).remove(&kept.spec.attempt_id);
        if let (Some(ai), Some(used)) = (kept.ai.as_mut(), early) {
            ai.used = ai.used.latest(used);
        }
        self.live().insert(kept.spec.attempt_id, kept.clone());
        if let Err(e) = self.log.append(Record::Step(Box::new(kept))).await {
            tracing::warn!(attempt_id = entry.spec.attempt_id, error = %e, "cannot journal the attempt's step");
        }
    }

    /// Writes down the tokens an AI-agent attempt has used so far, so that a restarted agent
    /// keeps counting from there (and holds the budget). For an attempt whose first step is
    /// not recorded yet, the usage goes into that step's entry when it is.
    pub async fn record_ai_usage(&self, attempt_id: i64, used: TokenUsage) {
        let entry = {
            let mut live = self.live();
            let Some(entry) = live.get_mut(&attempt_id) else {
                // Its first step is being started: the entry will carry it.
                let mut early = self.early_usage.lock().unwrap_or_else(|e| e.into_inner());
                early.insert(attempt_id, used);
                return;
            };
            let Some(ai) = entry.ai.as_mut() else { return };
            if ai.used == used {
                return;
            }
            ai.used = used;
            entry.clone()
        };
        if let Err(e) = self.log.append(Record::Step(Box::new(entry))).await {
            tracing::warn!(attempt_id, error = %e, "cannot journal the attempt's token usage");
        }
    }

    /// What the journal holds for taking an AI-agent attempt over, usage included.
    pub fn current_ai(&self, attempt_id: i64) -> Option<Box<crate::ai_task::Resumable>> {
        self.live().get(&attempt_id).and_then(|e| e.ai.clone())
    }

    /// Forgets an attempt that ended.
    pub fn forget(&self, attempt_id: i64) {
        self.early_usage.lock().unwrap_or_else(|e| e.into_inner()).remove(&attempt_id);
        if self.live().remove(&attempt_id).is_some() {
            self.log.append_later(Record::Forget(attempt_id));
        }
    }

    /// Entries of attempts that have not ended: at start, what an earlier agent run left.
    pub fn leftovers(&self) -> Vec<Entry> {
        let mut entries: Vec<Entry> = self.live().values().cloned().collect();
        entries.sort_by_key(|e| e.spec.attempt_id);
        entries
    }

    /// Deals with what an earlier agent run left: an attempt whose end is already reported
    /// (`finished`: its report waits in the outbox) is forgotten; steps of runtimes whose
    /// sandboxes outlive the agent and can be waited on again (containers) are re-attached,
    /// to be resumed; everything else is stopped and cleaned up.
    pub async fn recover(&self, runtimes: &Runtimes, finished: &HashSet<i64>) -> Recovery {
        let mut recovery = Recovery::default();
        let mut stopped = Vec::new();
        for entry in self.leftovers() {
            if finished.contains(&entry.spec.attempt_id) {
                self.forget(entry.spec.attempt_id);
                continue;
            }
            // Room for the output a process step wrote while no agent read it, until the
            // resumed attempt takes it over.
            let (tx, output) = mpsc::channel(REATTACHED_OUTPUT_QUEUE);
            let (mut reach, mut earlier) = (None, None);
            let attached = match (runtimes.get(&entry.runtime), &entry.handle) {
                (Some(runtime), Some(handle)) if reattachable(runtime.kind(), &entry) => {
                    if runtime.output_has_offsets() {
                        reach = Some(self.output_reach(entry.spec.attempt_id, handle.step));
                        earlier = match self.reach.get(&entry.spec.attempt_id) {
                            Some(r) if (r.step as usize) < handle.step => Some(*r),
                            Some(_) => None,
                            // None of its output reached the outbox (an earlier step's was
                            // still on its way when the earlier run ended): all of it is read
                            // again. Only from an entry of an agent that notes how far output
                            // reaches (one that keeps the attempt's limits): an older one
                            // shipped output without saying so.
                            None if handle.step > 0 && entry.limits.is_some() => Some(OutputReach::default()),
                            None => None,
                        };
                    }
                    let from = reach.map_or((0, 0), |r| r.read_from());
                    match runtime.attach(handle, tx, from).await {
                        Ok(attached) => attached,
                        Err(e) => {
                            tracing::warn!(attempt_id = entry.spec.attempt_id, error = %e, "cannot re-attach a step");
                            false
                        }
                    }
                }
                _ => false,
            };
            match (entry.handle.clone(), attached) {
                (Some(handle), true) => {
                    tracing::info!(
                        attempt_id = entry.spec.attempt_id,
                        runtime = %entry.runtime,
                        step = handle.step,
                        "re-attached to a step an earlier agent run started"
                    );
                    recovery.resumable.push(Reattached { entry, handle, output, reach, earlier });
                }
                _ => stopped.push(entry),
            }
        }
        recovery.stopped = stopped.iter().map(|e| e.spec.attempt_id).collect();
        self.stop_entries(stopped, runtimes).await;
        recovery
    }

    /// How far the output of `step` of an attempt got into the outbox in the earlier run;
    /// nothing known means none of it did. What went out within the log limit is the
    /// attempt's, whichever step said it last.
    fn output_reach(&self, attempt_id: i64, step: usize) -> OutputReach {
        match self.reach.get(&attempt_id) {
            Some(r) if r.step as usize == step => *r,
            other => OutputReach {
                step: step as u32,
                kept: other.map(|r| r.kept).unwrap_or_default(),
                ..OutputReach::default()
            },
        }
    }

    /// Stops and cleans up whatever an earlier agent run left running; returns how many
    /// attempts it found.
    pub async fn stop_leftovers(&self, runtimes: &Runtimes) -> usize {
        let entries = self.leftovers();
        let n = entries.len();
        self.stop_entries(entries, runtimes).await;
        n
    }

    async fn stop_entries(&self, entries: Vec<Entry>, runtimes: &Runtimes) {
        for entry in &entries {
            let attempt_id = entry.spec.attempt_id;
            let Some(runtime) = runtimes.get(&entry.runtime) else {
                tracing::warn!(attempt_id, runtime = %entry.runtime, "leftover attempt of a runtime this agent lacks");
                self.forget(attempt_id);
                continue;
            };
            if let Some(handle) = &entry.handle {
                // Output of a step we no longer report has nowhere to go.
                let (tx, _rx) = mpsc::channel(1);
                match runtime.attach(handle, tx, (0, 0)).await {
                    Ok(true) => {
                        tracing::warn!(attempt_id, pid = ?handle.pid, "stopping a step left running by an earlier agent run");
                        let _ = runtime.signal(handle, StopSignal::Kill).await;
                        let _ = runtime.wait(handle).await;
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(attempt_id, error = %e, "cannot attach to a leftover step"),
                }
            }
            if let Err(e) = runtime.cleanup(&entry.spec).await {
                tracing::warn!(attempt_id, error = %e, "cleanup of a leftover attempt failed");
            }
            let _ = tokio::fs::remove_dir_all(&entry.spec.workspace).await;
            self.forget(attempt_id);
        }
    }
}

/// Chunks of a re-attached step's output held until its attempt resumes.
const REATTACHED_OUTPUT_QUEUE: usize = 64;

/// Whether a step of `kind` can be re-attached after an agent restart: containers, microVMs
/// and process steps outlive the agent. An AI-agent task's metering proxy does not, but it
/// starts again from what the journal keeps, unless an older agent wrote the entry.
fn reattachable(kind: &str, entry: &Entry) -> bool {
    let proxy_restartable = !entry.metered || entry.ai.is_some();
    match kind {
        "docker" | "process" | "microvm" => proxy_restartable,
        _ => false,
    }
}

/// Entries an agent of an earlier release left as one file per attempt in `dir`; the files
/// are removed once read, since the caller moves the entries into the state log.
pub fn take_legacy_entries(dir: &Path) -> Vec<Entry> {
    let Ok(read) = std::fs::read_dir(dir) else { return Vec::new() };
    let entries = read
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| {
            let text = std::fs::read(e.path()).ok()?;
            match serde_json::from_slice(&text) {
                Ok(entry) => Some(entry),
                Err(err) => {
                    tracing::warn!(path = %e.path().display(), error = %err, "unreadable journal entry ignored");
                    None
                }
            }
        })
        .collect();
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::warn!(path = %dir.display(), error = %e, "cannot remove the old journal directory");
    }
    entries
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::runtime::process::ProcessRuntime;

    fn open(dir: &Path) -> Journal {
        let (log, recovered) = StateLog::open(dir).unwrap();
        Journal::new(log, recovered.entries).with_output_reach(recovered.reach)
    }

    #[tokio::test]
    async fn leftover_steps_are_stopped_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let spec = TaskSpec {
            attempt_id: 424242,
            steps: vec![vec!["sh".into(), "-c".into(), "sleep 300".into()]],
            workspace: dir.path().join("ws"),
            ..Default::default()
        };
        let first: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new());
        first.prepare(&spec).await.unwrap();
        let (tx, _rx) = mpsc::channel(16);
        let handle = first.start(&spec, 0, tx).await.unwrap();
        let entry = Entry {
            runtime: "process".into(),
            spec: spec.clone(),
            handle: Some(handle.clone()),
            timeout_ms: None,
            // The metering proxy of an AI-agent task is gone with its agent: stopped, not resumed.
            metered: true,
            ai: None,
            outputs: None,
            limits: None,
        };
        let done = Entry { spec: TaskSpec { attempt_id: 5, ..spec.clone() }, ..entry.clone() };
        let reported =
            Entry { spec: TaskSpec { attempt_id: 6, ..spec.clone() }, handle: None, ..entry.clone() };
        {
            let journal = open(&state);
            journal.record(&entry).await;
            journal.record(&done).await;
            journal.record(&reported).await;
            journal.forget(5);
        }
        let pid = handle.pid.unwrap();
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());

        // A new agent run with a fresh runtime finds and stops it; the attempt whose end
        // waits in the outbox is only forgotten.
        let journal = open(&state);
        let runtimes: Runtimes =
            [("process".to_string(), Arc::new(ProcessRuntime::new()) as Arc<dyn Runtime>)].into();
        let recovery = journal.recover(&runtimes, &HashSet::from([6])).await;
        assert_eq!(recovery.stopped, vec![424242]);
        assert!(recovery.resumable.is_empty());
        let start = std::time::Instant::now();
        while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z")) {
            assert!(start.elapsed() < std::time::Duration::from_secs(5), "leftover step survived");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(journal.leftovers().is_empty());
        drop(journal);
        assert!(open(&state).leftovers().is_empty(), "recovered entries were not forgotten in the log");
        drop(first);
    }

    #[tokio::test]
    async fn a_process_step_is_reattached_and_its_output_flows_on() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let go = dir.path().join("go");
        let script = format!("echo before; while [ ! -e {} ]; do sleep 0.02; done; echo after", go.display());
        let spec = TaskSpec {
            attempt_id: 535353,
            steps: vec![vec!["sh".into(), "-c".into(), script]],
            workspace: dir.path().join("ws"),
            ..Default::default()
        };
        let first: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new());
        first.prepare(&spec).await.unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let handle = first.start(&spec, 0, tx).await.unwrap();
        let before = rx.recv().await.expect("the first line");
        assert_eq!(before.data, b"before\n");
        let entry = Entry {
            runtime: "process".into(),
            spec,
            handle: Some(handle.clone()),
            timeout_ms: None,
            metered: false,
            ai: None,
            outputs: Some(KeptOutputs { globs: vec!["out/*".into()], on_failure: false }),
            limits: None,
        };
        let journal = open(&state);
        journal.record(&entry).await;
        // The first line went out in a report that says how far the output reaches, as the
        // outbox logs it; then the first run's reader is gone, as with an agent that died.
        let reach = OutputReach {
            step: 0,
            stdout: crate::reach::StreamReach {
                clean: before.end.expect("process output has offsets"),
                past_clean: 0,
            },
            stderr: crate::reach::StreamReach::default(),
            kept: Default::default(),
        };
        let report = crate::state_log::LoggedReport {
            seq: 1,
            attempt_id: 535353,
            bytes: 7,
            report: drover_proto::Report::default(),
            reach: Some(reach),
        };
        journal.log.append(Record::Report(report)).await.unwrap();
        drop((rx, journal));

        let journal = open(&state);
        let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new());
        let runtimes: Runtimes = [("process".to_string(), runtime.clone())].into();
        let mut recovery = journal.recover(&runtimes, &HashSet::new()).await;
        assert!(recovery.stopped.is_empty());
        let mut resumed = recovery.resumable.pop().expect("the step is re-attached");
        assert_eq!(resumed.entry.spec.attempt_id, 535353);
        assert_eq!(resumed.entry.outputs, entry.outputs, "the outputs to keep are journaled");
        assert_eq!(resumed.reach, Some(reach));
        std::fs::write(&go, "").unwrap();
        let status = runtime.wait(&resumed.handle).await.unwrap();
        assert!(status.success(), "{status:?}");
        let mut after = Vec::new();
        while let Some(chunk) = resumed.output.recv().await {
            after.extend_from_slice(&chunk.data);
        }
        assert_eq!(after, b"after\n", "shipped on from where the first run got to, once");
        runtime.cleanup(&resumed.entry.spec).await.unwrap();
        drop(first);
    }

    #[tokio::test]
    async fn entries_keep_secret_names_but_never_values() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let value = "multi\nline-s3cr3t-value";
        let spec = TaskSpec {
            attempt_id: 777,
            secrets: [("API_TOKEN".to_owned(), value.to_owned())].into(),
            ..Default::default()
        };
        let entry = Entry {
            runtime: "process".into(),
            spec,
            handle: None,
            timeout_ms: None,
            metered: false,
            ai: None,
            outputs: None,
            limits: None,
        };
        {
            let journal = open(&state);
            // Twice: the second write replaces the first.
            journal.record(&entry).await;
            journal.record(&entry).await;
        }
        let bytes = std::fs::read(state.join("log")).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains("s3cr3t") && text.contains("API_TOKEN"), "{text}");
        let back = open(&state).leftovers();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].spec.secrets, [("API_TOKEN".to_owned(), String::new())].into());
        // The caller's entry still holds the value.
        assert_eq!(entry.spec.secrets["API_TOKEN"], value);
    }

    #[tokio::test]
    async fn entries_of_an_older_release_are_taken_over_and_their_files_removed() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join(".journal");
        std::fs::create_dir(&old).unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o700)).unwrap();
        let entry = Entry {
            runtime: "process".into(),
            spec: TaskSpec { attempt_id: 31, ..Default::default() },
            handle: None,
            timeout_ms: Some(1000),
            metered: false,
            ai: None,
            outputs: None,
            limits: None,
        };
        std::fs::write(old.join("attempt-31.json"), serde_json::to_vec(&entry).unwrap()).unwrap();
        std::fs::write(old.join("attempt-32.json"), b"{not json").unwrap();
        let taken = take_legacy_entries(&old);
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].spec.attempt_id, 31);
        assert!(!old.exists());
        assert!(take_legacy_entries(&old).is_empty());
    }
}
