//! The node's side of an agent task's repository: git runs on the host, never in the sandbox.
//!
//! The repository's git directory lives next to the workspace, out of the sandbox's reach, and
//! every command names it and the work tree explicitly. The sandbox can write anything in the
//! work tree (a `.git` file, `.gitattributes`), but never the config, hooks or objects git
//! acts on here, so nothing the agent writes makes the host run a command of its choosing.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::AiTaskError;

/// Commit identity for the agent's changes.
const AUTHOR_NAME: &str = "Drover";
const AUTHOR_EMAIL: &str = "drover@localhost";

/// One repository: a private git directory and the work tree it describes.
#[derive(Debug, Clone)]
pub(crate) struct Repo {
    /// The git directory, outside the workspace.
    pub git_dir: PathBuf,
    /// The checkout, inside the workspace.
    pub work_tree: PathBuf,
}

impl Repo {
    /// Creates an empty repository for `work_tree` with its git directory at `git_dir`.
    pub async fn init(git_dir: PathBuf, work_tree: PathBuf) -> Result<Repo, AiTaskError> {
        let repo = Repo { git_dir, work_tree };
        repo.run("init", &["init", "-q"]).await?;
        Ok(repo)
    }

    /// Checks out the default branch of `url` into the work tree; files already there that the
    /// repository does not track (inputs) stay.
    pub async fn checkout(&self, url: &str) -> Result<(), AiTaskError> {
        // `--` keeps a URL starting with `-` from being read as an option.
        self.run("fetch", &["fetch", "-q", "--no-tags", "--", url, "HEAD"]).await?;
        self.run("checkout", &["checkout", "-q", "-f", "--detach", "FETCH_HEAD"]).await?;
        Ok(())
    }

    /// Commits everything in the work tree as the starting point the patch is taken against.
    pub async fn baseline(&self) -> Result<(), AiTaskError> {
        self.run("add", &["add", "-A"]).await?;
        self.run("commit", &["commit", "-q", "--allow-empty", "--no-verify", "-m", "Before the agent ran"])
            .await?;
        Ok(())
    }

    /// Paths (relative to the work tree, `/`-anchored patterns) git must never pick up.
    pub async fn exclude(&self, patterns: &[String]) -> Result<(), AiTaskError> {
        let info = self.git_dir.join("info");
        tokio::fs::create_dir_all(&info).await.map_err(|e| io("create git info dir", e))?;
        let mut text = patterns.join("\n");
        text.push('\n');
        tokio::fs::write(info.join("exclude"), text).await.map_err(|e| io("write git excludes", e))
    }

    /// Stages every change and returns it as a binary-safe patch against the baseline (empty
    /// when nothing changed).
    pub async fn patch(&self) -> Result<Vec<u8>, AiTaskError> {
        self.run("add", &["add", "-A"]).await?;
        self.run("diff", &["diff", "--cached", "--binary", "--no-color", "--no-ext-diff", "HEAD"]).await
    }

    /// Commits what [`patch`](Self::patch) staged and pushes it to `branch` of `remote`.
    pub async fn push(&self, remote: &str, branch: &str, message: &str) -> Result<(), AiTaskError> {
        self.run("commit", &["commit", "-q", "--no-verify", "-m", message]).await?;
        let refspec = format!("HEAD:refs/heads/{branch}");
        self.run("push", &["push", "-q", "--", remote, &refspec]).await?;
        Ok(())
    }

    /// Runs git on this repository; returns its stdout, or its stderr as the error.
    async fn run(&self, action: &str, args: &[&str]) -> Result<Vec<u8>, AiTaskError> {
        let mut cmd = tokio::process::Command::new("git");
        cmd.arg("--git-dir")
            .arg(&self.git_dir)
            .arg("--work-tree")
            .arg(&self.work_tree)
            .args(["-c", "core.hooksPath=/dev/null"])
            .args(["-c", "core.fsmonitor=false"])
            .args(["-c", "commit.gpgsign=false"])
            // Files a container or VM wrote may belong to another user.
            .args(["-c", "safe.directory=*"])
            .args(["-c", &format!("user.name={AUTHOR_NAME}")])
            .args(["-c", &format!("user.email={AUTHOR_EMAIL}")])
            .args(args)
            .current_dir(&self.work_tree)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env_remove("GIT_DIR")
            .env_remove("GIT_WORK_TREE")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = cmd.output().await.map_err(|e| io("run git", e))?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        let detail = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        let detail = if detail.is_empty() { format!("git exited with {}", out.status) } else { detail };
        Err(AiTaskError::Git { action: action.to_owned(), detail })
    }
}

/// Moves a repository's own `.git` directory (from an input) out of the work tree, so the
/// sandbox cannot change it before the node runs git on it. `false` when there is none.
pub(crate) async fn adopt_git_dir(work_tree: &Path, git_dir: &Path) -> Result<bool, AiTaskError> {
    let dot_git = work_tree.join(".git");
    match tokio::fs::symlink_metadata(&dot_git).await {
        Ok(m) if m.is_dir() => {
            tokio::fs::rename(&dot_git, git_dir)
                .await
                .map_err(|e| io("move the input's .git directory", e))?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

fn io(context: &str, source: std::io::Error) -> AiTaskError {
    AiTaskError::Io { context: context.to_owned(), source }
}
