//! Rendering `{{ ... }}` templates in string values, with strict undefined names.
//!
//! Values are rendered one by one after parsing (never the raw YAML text), so a template can
//! neither break the file's structure nor inject fields.

use std::collections::BTreeMap;

use minijinja::{Environment, ErrorKind, UndefinedBehavior, Value};

/// Why a value's template could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TemplateError {
    pub message: String,
    pub hint: Option<String>,
}

/// Renders values with `env`, `params` and (in array tasks) `frame`.
pub(crate) struct Renderer {
    jinja: Environment<'static>,
    env: Value,
    params: Value,
    param_names: Vec<String>,
}

impl Renderer {
    pub fn new(env: &BTreeMap<String, String>, params: &BTreeMap<String, String>) -> Self {
        let mut jinja = Environment::new();
        jinja.set_undefined_behavior(UndefinedBehavior::Strict);
        // Shell scripts written as `|` blocks end with a newline; keep it.
        if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder().keep_trailing_newline(true).build() {
            jinja.set_syntax(syntax);
        }
        Renderer {
            jinja,
            env: Value::from(env.clone()),
            params: Value::from(params.clone()),
            param_names: params.keys().cloned().collect(),
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
        self.jinja.render_str(text, Value::from(context)).map_err(|e| self.explain(&e, frame.is_some()))
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
}
