//! Rendering `{{ ... }}` templates in string values, with strict undefined names.
//!
//! Values are rendered one by one after parsing (never the raw YAML text), so a template can
//! neither break the file's structure nor inject fields.
//!
//! Templates are a small language with loops and macros, so a few bytes of one can ask for
//! years of work or gigabytes of text (`{% for a in range(100000) %}{% for b in range(100000)
//! %}`, `{{ 'x' * 100000000 }}`). Rendering runs on minijinja's fuel, which counts
//! instructions and the bytes they make: each value has [`FUEL_PER_VALUE`] and the whole job
//! [`FUEL_PER_JOB`], so compiling any job file ends in bounded time and memory.

use std::cell::Cell;
use std::collections::BTreeMap;

use minijinja::{Environment, ErrorKind, UndefinedBehavior, Value};

/// Fuel for rendering one value: about as many instructions, or 64 times as many bytes of
/// values made. A real template takes a few dozen; this leaves room for loops over hundreds of
/// items and for values of megabytes, and stops a runaway template within a fraction of a
/// second.
const FUEL_PER_VALUE: u64 = 200_000;

/// Fuel for rendering all values of a job. A 100,000-frame array that renders a handful of
/// simple templates per frame needs a few million; a job that renders costly templates in
/// every frame of a large array is stopped after a few seconds of work instead of hours.
const FUEL_PER_JOB: u64 = 20_000_000;

/// Why a value's template could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TemplateError {
    pub message: String,
    pub hint: Option<String>,
}

const TOO_COSTLY_HINT: &str = "templates are for filling in values; generate large or repetitive text \
     before submitting, or put it in an input file";

/// Renders values with `env`, `params` and (in array tasks) `frame`.
pub(crate) struct Renderer {
    jinja: Environment<'static>,
    env: Value,
    params: Value,
    param_names: Vec<String>,
    /// Fuel spent by the values rendered so far, against [`FUEL_PER_JOB`].
    spent: Cell<u64>,
}

impl Renderer {
    pub fn new(env: &BTreeMap<String, String>, params: &BTreeMap<String, String>) -> Self {
        let mut jinja = Environment::new();
        jinja.set_undefined_behavior(UndefinedBehavior::Strict);
        jinja.set_fuel(Some(FUEL_PER_VALUE));
        // Shell scripts written as `|` blocks end with a newline; keep it.
        if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder().keep_trailing_newline(true).build() {
            jinja.set_syntax(syntax);
        }
        Renderer {
            jinja,
            env: Value::from(env.clone()),
            params: Value::from(params.clone()),
            param_names: params.keys().cloned().collect(),
            spent: Cell::new(0),
        }
    }

    /// Renders `text`; `frame` is defined only when given.
    pub fn render(&self, text: &str, frame: Option<i64>) -> Result<String, TemplateError> {
        if !text.contains("{{") && !text.contains("{%") && !text.contains("{#") {
            return Ok(text.to_string());
        }
        let mut context = BTreeMap::new();
        context.insert("env", self.env.clone());
        context.insert("params", self.params.clone());
        if let Some(frame) = frame {
            context.insert("frame", Value::from(frame));
        }
        if self.spent.get() >= FUEL_PER_JOB {
            return Err(TemplateError {
                message: "the job's templates take too much work to render".to_string(),
                hint: Some(TOO_COSTLY_HINT.to_string()),
            });
        }
        // A template that does not parse costs no fuel.
        let template = self.jinja.template_from_str(text).map_err(|e| self.explain(&e, frame.is_some()))?;
        match template.render_captured(Value::from(context)) {
            Ok(captured) => {
                let used = captured.state().fuel_levels().map_or(0, |(consumed, _)| consumed);
                self.spent.set(self.spent.get().saturating_add(used));
                Ok(captured.into_output())
            }
            Err(e) => {
                // The fuel a failed render used is not reported; it may have been all of it.
                self.spent.set(self.spent.get().saturating_add(FUEL_PER_VALUE));
                Err(self.explain(&e, frame.is_some()))
            }
        }
    }

    fn explain(&self, e: &minijinja::Error, has_frame: bool) -> TemplateError {
        let detail = e.detail().unwrap_or_default();
        match e.kind() {
            ErrorKind::UndefinedError => {
                // The detail reads "`params.nope` is undefined".
                let name = detail.split('`').nth(1).unwrap_or("a name").to_string();
                let hint = if name == "frame" || name.starts_with("frame.") {
                    if has_frame {
                        None
                    } else {
                        Some("`frame` only exists in tasks with `array`".to_string())
                    }
                } else if name.starts_with("params") {
                    Some(if self.param_names.is_empty() {
                        "no params are defined; add them under `params:` or pass `--param NAME=VALUE`"
                            .to_string()
                    } else {
                        format!(
                            "defined params: {}; add others under `params:` or pass `--param NAME=VALUE`",
                            self.param_names.join(", ")
                        )
                    })
                } else if name.starts_with("env") {
                    Some(
                        "the variable is not set in the submitting environment; \
                         give a fallback with `{{ env.NAME | default('') }}`"
                            .to_string(),
                    )
                } else {
                    Some(
                        "templates can use `params.NAME`, `env.NAME` and, in array tasks, `frame`"
                            .to_string(),
                    )
                };
                TemplateError { message: format!("template uses undefined `{name}`"), hint }
            }
            ErrorKind::OutOfFuel => TemplateError {
                message: "template takes too much work to render".to_string(),
                hint: Some(TOO_COSTLY_HINT.to_string()),
            },
            ErrorKind::SyntaxError => TemplateError {
                message: format!("template syntax error: {detail}"),
                hint: Some("templates look like `{{ params.NAME }}`; quote the value in YAML".to_string()),
            },
            kind => TemplateError {
                message: if detail.is_empty() {
                    format!("template error: {kind}")
                } else {
                    format!("template error: {detail}")
                },
                hint: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn renderer() -> Renderer {
        let env = BTreeMap::from([("USER_X".to_string(), "ada".to_string())]);
        let params = BTreeMap::from([("greeting".to_string(), "hello".to_string())]);
        Renderer::new(&env, &params)
    }

    #[test]
    fn renders_params_env_and_frame() {
        let r = renderer();
        assert_eq!(r.render("{{ params.greeting }} {{ env.USER_X }}", None).unwrap(), "hello ada");
        assert_eq!(r.render("f{{ frame }}", Some(7)).unwrap(), "f7");
        assert_eq!(r.render("plain } { text", None).unwrap(), "plain } { text");
        assert_eq!(r.render("echo {{ frame }}\n", Some(1)).unwrap(), "echo 1\n");
        assert_eq!(r.render("{{ env.NOPE | default('x') }}", None).unwrap(), "x");
    }

    #[test]
    fn undefined_names_are_named() {
        let r = renderer();
        let e = r.render("{{ params.nope }}", None).unwrap_err();
        assert_eq!(e.message, "template uses undefined `params.nope`");
        assert!(e.hint.unwrap().contains("defined params: greeting"));
        let e = r.render("x {{ frame }}", None).unwrap_err();
        assert_eq!(e.message, "template uses undefined `frame`");
        assert_eq!(e.hint.unwrap(), "`frame` only exists in tasks with `array`");
        let e = r.render("{{ params.greeting ", None).unwrap_err();
        assert!(e.message.starts_with("template syntax error"), "{e:?}");
    }

    #[test]
    fn costly_templates_run_out_of_fuel() {
        let r = renderer();
        for costly in [
            "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
            "{{ 'x' * 100000000 }}",
        ] {
            let e = r.render(costly, None).unwrap_err();
            assert_eq!(e.message, "template takes too much work to render", "{costly}");
        }
        // A loop of a hundred items is well within the fuel of a value.
        assert_eq!(r.render("{% for i in range(100) %}.{% endfor %}", None).unwrap().len(), 100);
    }

    #[test]
    fn the_job_has_a_fuel_budget_across_values() {
        let r = renderer();
        let costly = "{{ 'x' * 100000000 }}";
        let within = (FUEL_PER_JOB / FUEL_PER_VALUE) as usize;
        for _ in 0..within {
            assert_eq!(r.render(costly, None).unwrap_err().message, "template takes too much work to render");
        }
        let e = r.render("{{ frame }}", Some(1)).unwrap_err();
        assert_eq!(e.message, "the job's templates take too much work to render");
    }
}
