//! The `agent` block of AI-agent tasks: the coding agent's command, its prompt, the
//! repository it works on, its token budget and where to push its changes.

use super::{At, RawAgent, Reader, join, quoted};
use crate::job::{LlmProvider, valid_branch, valid_secret_name, valid_upstream};
use crate::spec::error::closest;
use crate::spec::tree::{Node, Value};

const AGENT_FIELDS: &[&str] =
    &["command", "prompt", "prompt_file", "repo", "budget", "push", "provider", "upstream", "key_secret"];
const PUSH_FIELDS: &[&str] = &["remote", "branch"];
const BUDGET_FIELDS: &[&str] = &["tokens"];
const PROVIDERS: &[&str] = &["anthropic", "openai"];

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
        let (prompt, prompt_file) = match (m.get("prompt"), m.get("prompt_file"), m.entry("prompt_file")) {
            (Some(_), Some(_), Some(e)) => {
                self.problems.add(
                    e.key_pos,
                    &f("prompt_file"),
                    "both `prompt` and `prompt_file` are set",
                    Some("give the prompt inline or as a file in the workspace, not both".into()),
                );
                return None;
            }
            (_, Some(n), _) => (None, Some(self.non_empty_string(n, &f("prompt_file"), "prompt_file")?)),
            _ => {
                let prompt = self
                    .required(
                        &m,
                        field,
                        "prompt",
                        "say what the agent should do, like `prompt: \"Fix the failing test\"`, or name a \
                         file in the workspace with `prompt_file: TASK.md`",
                    )
                    .and_then(|n| self.non_empty_string(n, &f("prompt"), "prompt"));
                (Some(prompt?), None)
            }
        };
        let repo = m.get("repo").and_then(|n| self.non_empty_string(n, &f("repo"), "repo"));
        let budget = m.get("budget").and_then(|n| self.budget(n, &f("budget")));
        let push = m.get("push").and_then(|n| self.push(n, &f("push")));
        let provider = m.get("provider").and_then(|n| self.provider(n, &f("provider")));
        let upstream = m.get("upstream").and_then(|n| self.upstream(n, &f("upstream")));
        let key_secret = m.get("key_secret").and_then(|n| self.key_secret(n, &f("key_secret")));
        Some(RawAgent {
            command: command?,
            prompt,
            prompt_file,
            repo,
            budget,
            push,
            provider,
            upstream,
            key_secret,
        })
    }

    /// `provider: anthropic | openai`.
    fn provider(&mut self, node: &Node, field: &str) -> Option<LlmProvider> {
        let word = self.string(node, field)?;
        match word.value.as_str() {
            "anthropic" => Some(LlmProvider::Anthropic),
            "openai" => Some(LlmProvider::OpenAi),
            other => {
                let hint = match closest(other, PROVIDERS.iter().copied()) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("providers are {}", quoted(PROVIDERS)),
                };
                self.problems.add(node.pos, field, format!("unknown provider `{other}`"), Some(hint));
                None
            }
        }
    }

    /// `upstream`: the LLM API's base URL, http or https.
    fn upstream(&mut self, node: &Node, field: &str) -> Option<At<String>> {
        let url = self.non_empty_string(node, field, "upstream")?;
        if !valid_upstream(&url.value) {
            self.problems.add(
                node.pos,
                field,
                format!("upstream `{}` is not an http or https URL", url.value),
                Some("give the API's base URL, like `upstream: https://api.anthropic.com`".into()),
            );
            return None;
        }
        Some(url)
    }

    /// `key_secret`: the name of the project secret holding the real API key.
    fn key_secret(&mut self, node: &Node, field: &str) -> Option<At<String>> {
        let name = self.non_empty_string(node, field, "key_secret")?;
        let v = &name.value;
        if !valid_secret_name(v) {
            self.problems.add(
                node.pos,
                field,
                format!("`{v}` is not a secret name"),
                Some("name a project secret, like `key_secret: ANTHROPIC_KEY`".into()),
            );
            return None;
        }
        Some(name)
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

    /// A token budget: a whole number of tokens, at least 1, written as is or as `{tokens: N}`.
    fn budget(&mut self, node: &Node, field: &str) -> Option<u64> {
        if let Value::Map(_) = node.value {
            let m = self.mapping(node, field, BUDGET_FIELDS)?;
            let tokens = self.required(&m, field, "tokens", "give the token limit, like `tokens: 200000`")?;
            return self.budget(tokens, &join(field, "tokens"));
        }
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
        // A template renders later; only check names written out (the plan's check covers
        // the rendered name).
        if !valid_branch(v) && !v.contains("{{") {
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
