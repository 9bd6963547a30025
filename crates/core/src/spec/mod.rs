//! Job files: parsing (YAML or JSON), validation with file/line/column/field errors,
//! minijinja templating, and expansion into a [`crate::JobPlan`].
//!
//! [`compile`] runs the stages in order: `tree` reads the text into a tree whose every key
//! and value knows its position; `schema` checks names, types and values against the
//! version 1 schema; `expand` checks the tasks against each other, renders templates
//! (`template`) and expands arrays (`frames`) into one task per frame. Problems from all
//! stages are collected, so one run reports all of them.

use std::collections::BTreeMap;

use crate::job::JobPlan;
use crate::limits::MAX_SOURCE_BYTES;

mod error;
mod expand;
mod frames;
mod schema;
mod template;
mod tree;

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod tests;

pub use error::{SpecError, SpecErrors};
pub use frames::parse_frames;

/// Values templates can use besides `frame`.
#[derive(Debug, Clone, Default)]
pub struct TemplateContext {
    /// The submitting user's environment (`{{ env.X }}`).
    pub env: BTreeMap<String, String>,
    /// `--param K=V` values; they override the file's `params` defaults (`{{ params.Y }}`).
    pub params: BTreeMap<String, String>,
}

/// Parses (YAML, or JSON when the file name ends in .json or the text starts with `{`),
/// validates, renders templates, expands arrays. The plan it returns has passed
/// [`JobPlan::validate`], so the server accepts it; the limits of [`crate::limits`] apply.
///
/// `file` is only used to name the file in errors and to pick the format.
pub fn compile(source: &str, file: &str, ctx: &TemplateContext) -> Result<JobPlan, SpecErrors> {
    let mut problems = error::Problems::new(file);
    if source.len() > MAX_SOURCE_BYTES {
        // The server keeps the text with the job and refuses a larger one.
        problems.add(
            error::Pos::START,
            "",
            format!(
                "the job file is {} bytes, more than the limit of {} MiB",
                source.len(),
                MAX_SOURCE_BYTES >> 20
            ),
            Some("use arrays and templates to describe many similar tasks, or split the job".into()),
        );
        return Err(problems.into_errors());
    }
    let by_extension = file.ends_with(".json");
    let json = by_extension || source.trim_start_matches('\u{feff}').trim_start().starts_with('{');
    let parsed = if json { tree::parse_json(source) } else { tree::parse_yaml(source) };
    let root = match parsed {
        Ok(root) => root,
        Err(e) => {
            let hint = if json && !by_extension {
                Some("the file was read as JSON because it starts with `{`".to_string())
            } else {
                e.hint
            };
            problems.add(e.pos, "", e.message, hint);
            return Err(problems.into_errors());
        }
    };
    let spec = schema::read_job(&root, &mut problems);
    let plan = expand::build(&spec, ctx, &mut problems);
    if problems.is_empty() { Ok(plan) } else { Err(problems.into_errors()) }
}
