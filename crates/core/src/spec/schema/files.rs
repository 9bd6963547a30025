//! The task fields that move files: `inputs` placed in the workspace before the task starts,
//! and `outputs` kept as artifacts when it ends.
//!
//! Paths and URLs may be templates, so the checks on their rendered text (relative paths,
//! http(s) URLs) are made in `expand`; here are the checks on the shape of the fields.

use super::{At, Fields, RawInput, RawSource, Reader, TaskSpec, join};
use crate::spec::tree::{Node, Value};

const INPUT_FIELDS: &[&str] = &["path", "url", "from", "to"];
const INPUT_SOURCES: &[&str] = &["path", "url", "from"];

impl Reader<'_> {
    /// Reads `outputs`, `outputs_on_failure` and `inputs`.
    pub(super) fn files(&mut self, t: &Fields<'_>, field: &str, task: &mut TaskSpec) {
        let f = |key: &str| join(field, key);
        if let Some(n) = t.get("outputs") {
            task.outputs =
                Some(self.list(n, &f("outputs"), "globs", "outputs: [\"out/*.png\"]", |r, item, path| {
                    r.non_empty_string(item, path, "output")
                }));
        }
        if let Some(n) = t.get("outputs_on_failure") {
            match n.value {
                Value::Bool(b) => task.outputs_on_failure = b,
                _ => self.wrong_type(n, &f("outputs_on_failure"), "`true` or `false`"),
            }
        }
        if let Some(n) = t.get("inputs") {
            let example = "inputs: [{ path: ./data, to: data }]";
            task.inputs = self.list(n, &f("inputs"), "inputs", example, |r, item, path| r.input(item, path));
        }
    }

    /// One input: exactly one of `path`, `url` and `from`, and an optional `to`.
    fn input(&mut self, node: &Node, field: &str) -> Option<RawInput> {
        let m = self.mapping(node, field, INPUT_FIELDS)?;
        let mut sources: Vec<_> = INPUT_SOURCES.iter().filter_map(|key| m.entry(key)).collect();
        sources.sort_by_key(|e| (e.key_pos.line, e.key_pos.column));
        let to = m.get("to").and_then(|n| self.non_empty_string(n, &join(field, "to"), "`to`"));
        let source = match sources.as_slice() {
            [] => {
                self.problems.add(
                    m.pos,
                    field,
                    "input has no source",
                    Some("set one of `path` (a local file or directory), `url` or `from: TASK:PATH`".into()),
                );
                return None;
            }
            [first, second, ..] => {
                self.problems.add(
                    second.key_pos,
                    &join(field, &second.key),
                    format!("input has both `{}` and `{}`", first.key, second.key),
                    Some(
                        "an input comes from one of `path`, `url` or `from`; write one input for each".into(),
                    ),
                );
                return None;
            }
            [one] => one,
        };
        let path = join(field, &source.key);
        let source = match source.key.as_str() {
            "path" => RawSource::Path(self.non_empty_string(&source.value, &path, "input path")?),
            "url" => RawSource::Url(self.non_empty_string(&source.value, &path, "input url")?),
            _ => self.artifact(&source.value, &path)?,
        };
        Some(RawInput { source, to })
    }

    /// `from: TASK:PATH`, an output of another task of the job.
    fn artifact(&mut self, node: &Node, field: &str) -> Option<RawSource> {
        let from = self.non_empty_string(node, field, "`from`")?;
        match from.value.split_once(':') {
            Some((task, path)) if !task.trim().is_empty() && !path.trim().is_empty() => {
                let at = |value: &str| At {
                    value: value.trim().to_string(),
                    pos: from.pos,
                    field: from.field.clone(),
                };
                Some(RawSource::Artifact { task: at(task), path: at(path) })
            }
            _ => {
                self.problems.add(
                    node.pos,
                    field,
                    format!("expected `TASK:PATH`, found `{}`", from.value),
                    Some("name the producing task and one of its outputs, like `from: \"prepare:out/model.bin\"`".into()),
                );
                None
            }
        }
    }
}
