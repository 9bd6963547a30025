//! AI-agent tasks on the node: before the steps, check the repository out and write the
//! prompt, start the task's LLM metering proxy and point the sandbox at it; after them, count
//! the tokens, keep the changes as `agent.patch` and push them as a branch when asked.
//!
//! The real API key goes to the proxy only. The sandbox gets the proxy's address (through the
//! runtime's [`HostPort`]) and a per-attempt token that is worthless anywhere else.

mod git;
pub mod proxy;
mod wrap;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use drover_core::{AgentSpec, InputSpec, LlmProvider};
use rand::Rng;
use serde::{Deserialize, Serialize};

use self::git::Repo;
use self::proxy::{ApiFlavor, MeteringProxy, ProxyConfig, ProxyError, TokenUsage};
use crate::runtime::{HostPort, TaskSpec};

/// The prompt's file name in the workspace; the agent's command also reads it on stdin.
pub const PROMPT_FILE: &str = "prompt.txt";
/// The patch artifact's name: the agent's changes against the checked-out repository.
pub const PATCH_FILE: &str = "agent.patch";
/// The name under which the runtime exposes the proxy (`DROVER_HOST_LLM`).
const HOST_PORT_NAME: &str = "llm";

/// What the node needs to run one AI-agent task.
#[derive(Clone)]
pub struct AiTask {
    /// The task's `agent` block.
    pub spec: AgentSpec,
    /// The task's inputs, to tell an input named as `repo` from a git URL.
    pub inputs: Vec<InputSpec>,
    /// The real API key (the value of the `key_secret`); empty when the task names none.
    pub llm_key: String,
    /// The node's upstream for tasks that name none.
    pub default_upstream: Option<String>,
}

impl fmt::Debug for AiTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AiTask")
            .field("spec", &self.spec)
            .field("llm_key", &if self.llm_key.is_empty() { "" } else { "<redacted>" })
            .field("default_upstream", &self.default_upstream)
            .finish()
    }
}

/// Why an agent task could not be set up or wrapped up.
#[derive(Debug, thiserror::Error)]
pub enum AiTaskError {
    /// A git command failed.
    #[error("git {action} failed: {detail}")]
    Git {
        /// Which git command.
        action: String,
        /// Its error output.
        detail: String,
    },
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the node was doing.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The metering proxy could not start.
    #[error("cannot start the llm metering proxy: {0}")]
    Proxy(#[from] ProxyError),
    /// The task and the node's configuration do not fit together.
    #[error("{0}")]
    Config(String),
}

/// An agent task set up and running: what [`Prepared::finish`] needs afterwards.
pub struct Prepared {
    repo: Repo,
    proxy: Option<(MeteringProxy, ProxySetup)>,
    spec: AgentSpec,
    /// The prompt as the agent got it (inline or from its file).
    prompt: String,
    workspace: PathBuf,
    ids: (i64, i64, i64),
}

/// How a task's metering proxy was started, but its key: what starting it again takes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProxySetup {
    /// Where it listens: the sandbox was told this address.
    pub listen: SocketAddr,
    /// The per-attempt token the sandbox holds (in its environment already).
    pub token: String,
    /// The upstream API.
    pub upstream: String,
    /// Which API the upstream speaks.
    pub flavor: ApiFlavor,
}

/// What a restarted agent needs to take over an AI-agent task whose step outlived the agent
/// run that prepared it: all of [`Prepared`] but the proxy's key, which is never written down
/// (the server gives it again, see [`Prepared::resume`]). Kept in the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resumable {
    /// The task's `agent` block.
    pub spec: AgentSpec,
    /// The prompt as the agent got it.
    pub prompt: String,
    /// The attempt's workspace.
    pub workspace: PathBuf,
    /// The repository's git directory (outside the workspace).
    pub git_dir: PathBuf,
    /// The checkout.
    pub work_tree: PathBuf,
    /// Job, task and attempt.
    pub ids: (i64, i64, i64),
    /// The metering proxy, when the task calls an LLM.
    pub proxy: Option<ProxySetup>,
    /// Tokens and calls counted so far.
    #[serde(default)]
    pub used: TokenUsage,
}

/// What the end of an agent task adds to the attempt's report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wrapup {
    /// Tokens the proxy counted.
    pub tokens: TokenUsage,
    /// Whether the proxy refused calls for the spent budget: the attempt fails with `budget`.
    pub budget_spent: bool,
    /// Things people should know (a push that failed), added to the attempt's message.
    pub notes: Vec<String>,
}

/// Sets the agent task up in `task`'s workspace (inputs already placed) and rewrites `task`
/// to reach the proxy: host port, per-attempt token, wrapped steps.
pub async fn prepare(ai: &AiTask, task: &mut TaskSpec) -> Result<Prepared, AiTaskError> {
    let workspace = task.workspace.clone();
    tokio::fs::create_dir_all(&workspace)
        .await
        .map_err(|source| AiTaskError::Io { context: format!("create {}", workspace.display()), source })?;
    let (repo, repo_dir) = match checkout(ai, &workspace).await {
        Ok(found) => found,
        Err(e) => {
            let _ = tokio::fs::remove_dir_all(sibling(&workspace, ".git")).await;
            return Err(e);
        }
    };
    let prompt = match read_prompt_file(ai, &workspace).await {
        Ok(prompt) => prompt,
        Err(e) => {
            let _ = tokio::fs::remove_dir_all(&repo.git_dir).await;
            return Err(e);
        }
    };
    tokio::fs::write(workspace.join(PROMPT_FILE), &prompt)
        .await
        .map_err(|source| AiTaskError::Io { context: "write the prompt".into(), source })?;

    let started = start_proxy(ai).await;
    if started.is_err() {
        let _ = tokio::fs::remove_dir_all(&repo.git_dir).await;
    }
    let proxy = match started? {
        Some((proxy, setup)) => {
            task.host_ports.push(HostPort { name: HOST_PORT_NAME.into(), addr: proxy.local_addr() });
            // The proxy accepts the token in either header, whichever SDK the agent uses.
            task.env.insert("ANTHROPIC_API_KEY".into(), setup.token.clone());
            task.env.insert("OPENAI_API_KEY".into(), setup.token.clone());
            Some((proxy, setup))
        }
        None => None,
    };
    wrap::wrap_steps(&mut task.steps, &ai.spec.command.to_argv(), PROMPT_FILE, &repo_dir);
    tracing::info!(
        repo = ai.spec.repo.as_deref().unwrap_or(""),
        proxy = ?proxy.as_ref().map(|(p, _)| p.local_addr()),
        budget = ?ai.spec.budget,
        "agent task prepared"
    );
    Ok(Prepared {
        repo,
        proxy,
        spec: ai.spec.clone(),
        prompt,
        workspace,
        ids: (task.job_id, task.task_id, task.attempt_id),
    })
}

impl Prepared {
    /// What a restarted agent needs to take the task over (see [`Prepared::resume`]).
    pub fn resumable(&self) -> Resumable {
        Resumable {
            spec: self.spec.clone(),
            prompt: self.prompt.clone(),
            workspace: self.workspace.clone(),
            git_dir: self.repo.git_dir.clone(),
            work_tree: self.repo.work_tree.clone(),
            ids: self.ids,
            proxy: self.proxy.as_ref().map(|(_, setup)| setup.clone()),
            used: self.usage(),
        }
    }

    /// Tokens and calls the proxy counted so far (none without a proxy).
    pub fn usage(&self) -> TokenUsage {
        self.proxy.as_ref().map(|(p, _)| p.usage()).unwrap_or_default()
    }

    /// Reads the proxy's usage while the task runs; `None` without a proxy.
    pub fn usage_probe(&self) -> Option<proxy::UsageProbe> {
        self.proxy.as_ref().map(|(p, _)| p.probe())
    }

    /// Takes over a task an earlier agent run prepared: its proxy starts again where the
    /// sandbox was told to find it, with the same token, counting from what it had counted
    /// (so the budget holds across the restart). `llm_key` is the real key, from the server.
    pub async fn resume(state: Resumable, llm_key: &str) -> Result<Prepared, AiTaskError> {
        let proxy = match state.proxy {
            Some(setup) => {
                let mut config = ProxyConfig::new(setup.upstream.clone(), llm_key, setup.token.clone())
                    .with_flavor(setup.flavor)
                    .with_listen(setup.listen)
                    .with_used(state.used);
                if let Some(budget) = state.spec.budget {
                    config = config.with_budget(budget);
                }
                Some((MeteringProxy::start(config).await?, setup))
            }
            None => None,
        };
        tracing::info!(
            proxy = ?proxy.as_ref().map(|(p, _)| p.local_addr()),
            used_tokens = state.used.total_tokens(),
            "agent task taken over after a restart"
        );
        Ok(Prepared {
            repo: Repo { git_dir: state.git_dir, work_tree: state.work_tree },
            proxy,
            spec: state.spec,
            prompt: state.prompt,
            workspace: state.workspace,
            ids: state.ids,
        })
    }

    /// Stops the proxy, keeps the changes as [`PATCH_FILE`] in the workspace and, when the
    /// attempt `succeeded` and the task asks for it, pushes them as a branch.
    pub async fn finish(self, succeeded: bool) -> Wrapup {
        let mut wrapup = Wrapup::default();
        if let Some((proxy, _)) = self.proxy {
            wrapup.tokens = proxy.shutdown().await;
            wrapup.budget_spent = wrapup.tokens.refused > 0;
        }
        match self.repo.patch().await {
            Ok(patch) => {
                let changed = !patch.is_empty();
                if let Err(source) = tokio::fs::write(self.workspace.join(PATCH_FILE), &patch).await {
                    wrapup
                        .notes
                        .push(AiTaskError::Io { context: "write agent.patch".into(), source }.to_string());
                }
                match (&self.spec.push, succeeded && !wrapup.budget_spent, changed) {
                    (Some(push), true, true) => {
                        let message = commit_message(&self.prompt, self.ids);
                        match self.repo.push(&push.remote, &push.branch, &message).await {
                            Ok(()) => {
                                tracing::info!(remote = %push.remote, branch = %push.branch, "changes pushed")
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "changes not pushed");
                                wrapup.notes.push(format!("changes not pushed to {}: {e}", push.branch));
                            }
                        }
                    }
                    (Some(_), true, false) => {
                        wrapup.notes.push("the agent changed nothing; nothing pushed".into())
                    }
                    _ => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "no patch of the agent's changes");
                wrapup.notes.push(format!("no patch of the changes: {e}"));
            }
        }
        if let Err(e) = tokio::fs::remove_dir_all(&self.repo.git_dir).await {
            tracing::debug!(error = %e, "git directory not removed");
        }
        wrapup
    }
}

/// Puts the repository in place and returns it with its directory relative to the workspace
/// (empty for the workspace itself). The git directory sits next to the workspace.
async fn checkout(ai: &AiTask, workspace: &Path) -> Result<(Repo, String), AiTaskError> {
    let git_dir = sibling(workspace, ".git");
    let repo = ai.spec.repo.as_deref().map(str::trim).filter(|r| !r.is_empty());
    let input = repo.and_then(|r| {
        let r = r.trim_end_matches('/');
        ai.inputs
            .iter()
            .find(|i| i.to.trim_end_matches('/') == r)
            .map(|i| i.to.trim_end_matches('/').to_owned())
    });
    match (repo, input) {
        (_, Some(dir)) => {
            // An input holding a checkout (or a plain tree, which becomes one).
            let work_tree = workspace.join(&dir);
            let adopted = git::adopt_git_dir(&work_tree, &git_dir).await?;
            let repo = if adopted {
                Repo { git_dir, work_tree }
            } else {
                let repo = Repo::init(git_dir, work_tree).await?;
                repo.baseline().await?;
                repo
            };
            Ok((repo, dir))
        }
        (Some(url), None) => {
            let repo = Repo::init(git_dir, workspace.to_path_buf()).await?;
            // Inputs are not the agent's changes: keep them out of the patch.
            let mut excluded = vec![format!("/{PROMPT_FILE}"), format!("/{PATCH_FILE}")];
            excluded.extend(ai.inputs.iter().map(|i| format!("/{}", i.to.trim_end_matches('/'))));
            repo.exclude(&excluded).await?;
            repo.checkout(url).await?;
            Ok((repo, String::new()))
        }
        (None, None) => {
            // No repository: the workspace as the inputs left it is the starting point.
            let repo = Repo::init(git_dir, workspace.to_path_buf()).await?;
            repo.exclude(&[format!("/{PROMPT_FILE}"), format!("/{PATCH_FILE}")]).await?;
            repo.baseline().await?;
            Ok((repo, String::new()))
        }
    }
}

/// The prompt: inline, or read from `prompt_file` in the checked-out workspace. The path may
/// not leave the workspace, through `..` or through a link.
async fn read_prompt_file(ai: &AiTask, workspace: &Path) -> Result<String, AiTaskError> {
    let Some(rel) = &ai.spec.prompt_file else { return Ok(ai.spec.prompt.clone()) };
    let refuse = |why: &str| AiTaskError::Config(format!("prompt_file `{rel}` {why}"));
    if !Path::new(rel).components().all(|c| matches!(c, std::path::Component::Normal(_))) {
        return Err(refuse("is not a path inside the workspace"));
    }
    let path = tokio::fs::canonicalize(workspace.join(rel)).await.map_err(|e| refuse(&e.to_string()))?;
    let root = tokio::fs::canonicalize(workspace).await.map_err(|e| refuse(&e.to_string()))?;
    if !path.starts_with(&root) {
        return Err(refuse("leads outside the workspace"));
    }
    let text = tokio::fs::read_to_string(&path).await.map_err(|e| refuse(&e.to_string()))?;
    if text.trim().is_empty() {
        return Err(refuse("is empty"));
    }
    Ok(text)
}

/// Starts the proxy when the task names a key and returns it with how it was set up (the
/// task token among it); `None` for agents that call no LLM.
async fn start_proxy(ai: &AiTask) -> Result<Option<(MeteringProxy, ProxySetup)>, AiTaskError> {
    let Some(secret) = &ai.spec.key_secret else { return Ok(None) };
    if ai.llm_key.is_empty() {
        return Err(AiTaskError::Config(format!("the project has no secret `{secret}` (the agent's key)")));
    }
    let upstream = ai.spec.upstream.clone().or_else(|| ai.default_upstream.clone()).ok_or_else(|| {
        AiTaskError::Config(
            "no LLM upstream: set `upstream` in the agent block or start the node with --llm-upstream".into(),
        )
    })?;
    let flavor = match ai.spec.provider {
        LlmProvider::Anthropic => ApiFlavor::Anthropic,
        LlmProvider::OpenAi => ApiFlavor::OpenAi,
    };
    let token = new_token();
    let mut config =
        ProxyConfig::new(upstream.clone(), ai.llm_key.clone(), token.clone()).with_flavor(flavor);
    if let Some(budget) = ai.spec.budget {
        config = config.with_budget(budget);
    }
    let proxy = MeteringProxy::start(config).await?;
    let setup = ProxySetup { listen: proxy.local_addr(), token, upstream, flavor };
    Ok(Some((proxy, setup)))
}

/// A fresh per-attempt token: 32 random bytes, hex.
fn new_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    format!("drover-task-{}", hex::encode(bytes))
}

/// `dir` with `suffix` appended to its last component: a sibling outside the workspace.
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(suffix);
    dir.with_file_name(name)
}

/// The commit message of pushed changes: the prompt's first line, then where they came from.
fn commit_message(prompt: &str, (job_id, task_id, attempt_id): (i64, i64, i64)) -> String {
    let first = prompt.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("Changes");
    let subject: String = first.chars().take(72).collect();
    format!("{subject}\n\nMade by drover job {job_id}, task {task_id}, attempt {attempt_id}.\n")
}

#[cfg(test)]
mod tests;
