//! The agent's journal of running steps: one small file per attempt with its `TaskSpec` and the
//! `RunHandle` of the step in flight, so that after a crash the next agent run can find what
//! the previous one left running.
//!
//! Reports about those attempts died with the old process, and the server hands them out again
//! once the agent re-registers without them, so the safe recovery is to stop them: leaving them
//! running would make the work run twice at the same time.
//!
//! The journal never holds a secret value: an entry keeps the names of the task's secrets with
//! empty values, files are readable by the agent's user only (0600, in a 0700 directory), and a
//! resumed attempt that would need the values for a new step fails instead (see
//! [`crate::attempt::SECRETS_GONE`]). The step in flight got its secrets when it started.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::runtime::{RunHandle, Runtime, StopSignal, TaskSpec};

/// Mode of the journal directory: the agent's user only.
const DIR_MODE: u32 = 0o700;
/// Mode of an entry: it names the task's secrets and says where its sandbox runs.
const FILE_MODE: u32 = 0o600;

/// Runtimes by kind.
pub type Runtimes = std::collections::BTreeMap<String, Arc<dyn Runtime>>;

/// What the journal keeps per attempt.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
}

/// Writes an entry aside, then renames it into place, so a crash leaves the old entry or the new.
fn write_entry(path: &Path, text: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    // A leftover temporary file keeps its mode when reopened; start from a fresh one.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(FILE_MODE).open(&tmp)?;
    file.write_all(text)?;
    drop(file);
    std::fs::rename(&tmp, path)
}

/// A directory of entries.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
    /// Set once this run made sure the directory exists with its mode.
    dir_checked: Arc<std::sync::atomic::AtomicBool>,
}

impl Journal {
    /// A journal in `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Journal {
        Journal { dir: dir.into(), dir_checked: Arc::default() }
    }

    fn path(&self, attempt_id: i64) -> PathBuf {
        self.dir.join(format!("attempt-{attempt_id}.json"))
    }

    /// Records (or updates) an attempt, without its secret values. Failures are logged, not
    /// fatal: the journal only matters after a crash.
    pub async fn record(&self, entry: &Entry) {
        let mut kept = entry.clone();
        kept.spec.secrets.values_mut().for_each(String::clear);
        let (dir, path) = (self.dir.clone(), self.path(entry.spec.attempt_id));
        let checked = self.dir_checked.clone();
        // One trip to the blocking pool for the whole write, not one per file operation: this
        // runs for every step.
        let written = tokio::task::spawn_blocking(move || {
            use std::sync::atomic::Ordering;
            let text = serde_json::to_vec(&kept).map_err(std::io::Error::other)?;
            if !checked.load(Ordering::Acquire) {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(&dir)?;
                // The mode above applies only to directories it creates; one an older agent
                // made may be wider.
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(DIR_MODE))?;
                checked.store(true, Ordering::Release);
            }
            match write_entry(&path, &text) {
                // Removed while the agent ran: made again.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    use std::os::unix::fs::DirBuilderExt;
                    std::fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(&dir)?;
                    write_entry(&path, &text)
                }
                other => other,
            }
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        if let Err(e) = written {
            tracing::warn!(attempt_id = entry.spec.attempt_id, error = %e, "cannot write the attempt journal");
        }
    }

    /// Forgets an attempt that ended.
    pub async fn forget(&self, attempt_id: i64) {
        let _ = tokio::fs::remove_file(self.path(attempt_id)).await;
    }

    /// Entries left by an earlier agent run.
    pub fn leftovers(&self) -> Vec<Entry> {
        read_entries(&self.dir)
    }

    /// Deals with what an earlier agent run left: steps of runtimes whose sandboxes outlive the
    /// agent and can be waited on again (containers) are re-attached and returned, to be
    /// resumed; everything else is stopped and cleaned up. Returns the resumable entries and
    /// how many were stopped.
    pub async fn recover(&self, runtimes: &Runtimes) -> (Vec<(Entry, RunHandle)>, usize) {
        let mut resumable = Vec::new();
        let mut stopped = Vec::new();
        for entry in self.leftovers() {
            let attached = match (runtimes.get(&entry.runtime), &entry.handle) {
                (Some(runtime), Some(handle)) if runtime.kind() == "docker" => {
                    // Output of the step in flight went to the old agent; from here on the
                    // step is only waited on.
                    let (tx, _rx) = mpsc::channel(1);
                    runtime.attach(handle, tx).await.unwrap_or(false)
                }
                _ => false,
            };
            match (entry.handle.clone(), attached) {
                (Some(handle), true) => {
                    tracing::info!(attempt_id = entry.spec.attempt_id, "re-attached to a running container");
                    resumable.push((entry, handle));
                }
                _ => stopped.push(entry),
            }
        }
        let n = stopped.len();
        self.stop_entries(stopped, runtimes).await;
        (resumable, n)
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
                self.forget(attempt_id).await;
                continue;
            };
            if let Some(handle) = &entry.handle {
                // Output of a step we no longer report has nowhere to go.
                let (tx, _rx) = mpsc::channel(1);
                match runtime.attach(handle, tx).await {
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
            self.forget(attempt_id).await;
        }
    }
}

fn read_entries(dir: &Path) -> Vec<Entry> {
    let Ok(read) = std::fs::read_dir(dir) else { return Vec::new() };
    read.flatten()
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
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::process::ProcessRuntime;

    #[tokio::test]
    async fn leftover_steps_are_stopped_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(dir.path().join("journal"));
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
        journal
            .record(&Entry {
                runtime: "process".into(),
                spec: spec.clone(),
                handle: Some(handle.clone()),
                timeout_ms: None,
            })
            .await;
        let pid = handle.pid.unwrap();
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());

        // A new agent run with a fresh runtime finds and stops it.
        let runtimes: std::collections::BTreeMap<String, Arc<dyn Runtime>> =
            [("process".to_string(), Arc::new(ProcessRuntime::new()) as Arc<dyn Runtime>)].into();
        assert_eq!(journal.stop_leftovers(&runtimes).await, 1);
        let start = std::time::Instant::now();
        while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z")) {
            assert!(start.elapsed() < std::time::Duration::from_secs(5), "leftover step survived");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(journal.leftovers().is_empty());
        drop(first);
    }

    #[tokio::test]
    async fn entries_keep_secret_names_but_never_values_and_only_the_agent_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let journal_dir = dir.path().join("journal");
        let journal = Journal::new(&journal_dir);
        let value = "multi\nline-s3cr3t-value";
        let spec = TaskSpec {
            attempt_id: 777,
            secrets: [("API_TOKEN".to_owned(), value.to_owned())].into(),
            ..Default::default()
        };
        let entry = Entry { runtime: "process".into(), spec, handle: None, timeout_ms: None };
        // Twice: the second write replaces the first.
        journal.record(&entry).await;
        journal.record(&entry).await;
        let path = journal_dir.join("attempt-777.json");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("s3cr3t") && text.contains("API_TOKEN"), "{text}");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&journal_dir), 0o700);
        assert_eq!(std::fs::read_dir(&journal_dir).unwrap().count(), 1, "no temporary file is left");
        let back = journal.leftovers();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].spec.secrets, [("API_TOKEN".to_owned(), String::new())].into());
        // The caller's entry still holds the value.
        assert_eq!(entry.spec.secrets["API_TOKEN"], value);
    }

    #[tokio::test]
    async fn a_journal_directory_made_wider_is_narrowed() {
        let dir = tempfile::tempdir().unwrap();
        let journal_dir = dir.path().join("journal");
        std::fs::create_dir(&journal_dir).unwrap();
        std::fs::set_permissions(&journal_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(journal_dir.join("attempt-5.tmp"), "stale").unwrap();
        std::fs::set_permissions(journal_dir.join("attempt-5.tmp"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let spec = TaskSpec { attempt_id: 5, ..Default::default() };
        Journal::new(&journal_dir)
            .record(&Entry { runtime: "process".into(), spec, handle: None, timeout_ms: None })
            .await;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&journal_dir), 0o700);
        assert_eq!(mode(&journal_dir.join("attempt-5.json")), 0o600);
    }
}
