//! The small shell prelude every step of an agent task runs under.
//!
//! Where the sandbox reaches the metering proxy depends on the runtime (the host's loopback for
//! a plain process, a forwarded address inside a VM), and only the runtime knows it: it says so
//! in `DROVER_HOST_LLM`. Rather than teach every runtime to expand variables inside other
//! variables, each step starts under `/bin/sh`, which derives the SDKs' base URLs from
//! `DROVER_HOST_LLM` and then `exec`s the real command, so the command's process, signals and
//! exit status are its own. The agent's command also gets the prompt on stdin and runs in the
//! repository's directory.

/// Name `$0` of wrapped steps, seen in `ps` and in shell error messages.
const ARG0: &str = "drover-step";

/// Sets the base URLs when the runtime made the proxy reachable. OpenAI clients expect the
/// version prefix in their base URL; Anthropic clients add it themselves.
const PRELUDE: &str = r#"if [ -n "${DROVER_HOST_LLM:-}" ]; then
  export ANTHROPIC_BASE_URL="http://$DROVER_HOST_LLM" OPENAI_BASE_URL="http://$DROVER_HOST_LLM/v1"
fi
"#;

/// Wraps `steps` in place: every step gets the prelude; steps that run `agent_argv` also get
/// the prompt file on stdin and start in `repo_dir` (relative to the workspace; empty for the
/// workspace itself).
pub(crate) fn wrap_steps(
    steps: &mut [Vec<String>],
    agent_argv: &[String],
    prompt_file: &str,
    repo_dir: &str,
) {
    for step in steps.iter_mut() {
        let is_agent = step.as_slice() == agent_argv;
        let mut script = PRELUDE.to_owned();
        if is_agent {
            if !repo_dir.is_empty() {
                script.push_str(&format!("cd \"$DROVER_WORKSPACE\"/{} || exit 127\n", quote(repo_dir)));
            }
            script.push_str(&format!("exec \"$@\" < \"$DROVER_WORKSPACE\"/{}\n", quote(prompt_file)));
        } else {
            script.push_str("exec \"$@\"\n");
        }
        let mut argv = vec!["/bin/sh".to_owned(), "-c".to_owned(), script, ARG0.to_owned()];
        argv.append(step);
        *step = argv;
    }
}

/// `text` as one single-quoted shell word.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// Runs a wrapped step with `sh`, the way a runtime would, and returns its stdout.
    fn run(step: &[String], workspace: &std::path::Path, host: Option<&str>) -> String {
        let mut cmd = Command::new(&step[0]);
        cmd.args(&step[1..]).current_dir(workspace).env_clear().env("PATH", "/usr/bin:/bin");
        cmd.env("DROVER_WORKSPACE", workspace);
        if let Some(host) = host {
            cmd.env("DROVER_HOST_LLM", host);
        }
        let out = cmd.output().expect("sh runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn the_agent_step_reads_the_prompt_in_the_repo_and_others_only_get_base_urls() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("my repo")).expect("mkdir");
        std::fs::write(dir.path().join("prompt.txt"), "fix it\n").expect("write");
        let agent: Vec<String> = ["/bin/sh", "-c", "pwd; cat; echo \"$ANTHROPIC_BASE_URL $OPENAI_BASE_URL\""]
            .map(String::from)
            .into();
        let other: Vec<String> =
            ["/bin/sh", "-c", "pwd; echo \"[$ANTHROPIC_BASE_URL]\""].map(String::from).into();
        let mut steps = vec![other.clone(), agent.clone()];
        wrap_steps(&mut steps, &agent, "prompt.txt", "my repo");
        let root = std::fs::canonicalize(dir.path()).expect("canonical");
        let out = run(&steps[1], &root, Some("127.0.0.1:4000"));
        assert_eq!(
            out,
            format!(
                "{}\nfix it\nhttp://127.0.0.1:4000 http://127.0.0.1:4000/v1\n",
                root.join("my repo").display()
            )
        );
        let out = run(&steps[0], &root, None);
        assert_eq!(out, format!("{}\n[]\n", root.display()));
    }

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(quote("a'b"), r"'a'\''b'");
    }
}
