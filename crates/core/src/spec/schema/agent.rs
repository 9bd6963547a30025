//! The `agent` block of AI-agent tasks: the coding agent's command, its prompt, the
//! repository it works on, its token budget and where to push its changes.

use super::{At, RawAgent, Reader, join};
use crate::spec::tree::{Node, Value};

const AGENT_FIELDS: &[&str] = &["command", "prompt", "repo", "budget", "push"];
const PUSH_FIELDS: &[&str] = &["remote", "branch"];

impl Reader<'_> {
    pub(super) fn agent(&mut self, node: &Node, field: &str) -> Option<RawAgent> {
        let m = self.mapping(node, field, AGENT_FIELDS)?;
        let f = |key: &str| join(field, key);
        let command = self
            .required(
                &m,
                field,
                "command",
                "give the coding agent's command, like `command: [\"my-agent\", \"--yes\"]`",
            )
            .and_then(|n| self.command(n, &f("command")));
        let prompt = self
            .required(
                &m,
                field,
                "prompt",
                "say what the agent should do, like `prompt: \"Fix the failing test\"`",
            )
            .and_then(|n| self.non_empty_string(n, &f("prompt"), "prompt"));
        let repo = m.get("repo").and_then(|n| self.non_empty_string(n, &f("repo"), "repo"));
        let budget = m.get("budget").and_then(|n| self.budget(n, &f("budget")));
        let push = m.get("push").and_then(|n| self.push(n, &f("push")));
        Some(RawAgent { command: command?, prompt: prompt?, repo, budget, push })
    }

    /// `push: { remote, branch }`.
    fn push(&mut self, node: &Node, field: &str) -> Option<(At<String>, At<String>)> {
        let p = self.mapping(node, field, PUSH_FIELDS)?;
        let remote = self
            .required(
                &p,
                field,
                "remote",
                "give the git URL to push to, like `remote: https://git.example.com/x.git`",
            )
            .and_then(|n| self.non_empty_string(n, &join(field, "remote"), "remote"));
        let branch = self
            .required(
                &p,
                field,
                "branch",
                "name the branch to push the changes to, like `branch: drover/fix`",
            )
            .and_then(|n| self.branch(n, &join(field, "branch")));
        Some((remote?, branch?))
    }

    /// A token budget: a whole number of tokens, at least 1.
    fn budget(&mut self, node: &Node, field: &str) -> Option<u64> {
        match node.value {
            Value::Int(i) if i < 1 => {
                self.problems.add(
                    node.pos,
                    field,
                    format!("budget must be at least 1 token, found {i}"),
                    Some("omit `budget` for no token limit".into()),
                );
                None
            }
            Value::Int(i) => u64::try_from(i).ok(),
            _ => {
                self.wrong_type(node, field, "a whole number of tokens");
                None
            }
        }
    }

    /// A branch name, roughly as `git check-ref-format --branch` accepts it.
    fn branch(&mut self, node: &Node, field: &str) -> Option<At<String>> {
        let b = self.non_empty_string(node, field, "branch")?;
        let v = &b.value;
        let bad = v.starts_with('-')
            || v.starts_with('/')
            || v.ends_with('/')
            || v.ends_with(".lock")
            || v.contains("..")
            || v.contains("//")
            || v.contains("@{")
            || v.chars().any(|c| c.is_whitespace() || c.is_control() || "~^:?*[\\".contains(c));
        // A template renders later; only check names written out.
        if bad && !v.contains("{{") {
            self.problems.add(
                node.pos,
                field,
                format!("`{v}` is not a valid git branch name"),
                Some("use letters, digits, `-`, `_`, `.` and `/`, like `drover/fix-tests`".into()),
            );
            return None;
        }
        Some(b)
    }
}
