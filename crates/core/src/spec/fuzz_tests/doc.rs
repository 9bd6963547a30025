//! Documents as a tree the fuzz tests can mutate and write out as YAML or JSON text.
//!
//! Unlike `serde_json::Value`, a mapping here is a list of entries, so a mutation can write a
//! key twice and the parser's duplicate-key check is reached.

use proptest::prelude::*;
use proptest::sample::Index;

use super::super::tree::{Node, Value};

/// A YAML or JSON value, mappings in written order with duplicates allowed.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Doc {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Doc>),
    Map(Vec<(String, Doc)>),
}

impl Doc {
    /// A mapping from `(key, value)` pairs.
    pub fn map<'a>(entries: impl IntoIterator<Item = (&'a str, Doc)>) -> Doc {
        Doc::Map(entries.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    }

    /// A string value.
    pub fn str(text: impl Into<String>) -> Doc {
        Doc::Str(text.into())
    }

    /// The document a parsed tree holds.
    pub fn from_node(node: &Node) -> Doc {
        match &node.value {
            Value::Null => Doc::Null,
            Value::Bool(b) => Doc::Bool(*b),
            Value::Int(i) => Doc::Int(*i),
            Value::Float(f) => Doc::Float(*f),
            Value::Str(s) => Doc::Str(s.clone()),
            Value::Seq(items) => Doc::Seq(items.iter().map(Doc::from_node).collect()),
            Value::Map(entries) => {
                Doc::Map(entries.iter().map(|e| (e.key.clone(), Doc::from_node(&e.value))).collect())
            }
        }
    }

    /// `depth` levels of lists and mappings around `self`.
    pub fn nested(self, depth: usize) -> Doc {
        (0..depth).fold(
            self,
            |inner, level| {
                if level % 2 == 0 { Doc::Seq(vec![inner]) } else { Doc::map([("k", inner)]) }
            },
        )
    }

    /// Flow style (`{"k": [1, "x"]}`): strict JSON unless a float is not finite.
    pub fn to_flow(&self) -> String {
        let mut out = String::new();
        self.write_flow(&mut out);
        out
    }

    fn write_flow(&self, out: &mut String) {
        match self {
            Doc::Null => out.push_str("null"),
            Doc::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Doc::Int(i) => out.push_str(&i.to_string()),
            Doc::Float(f) if f.is_nan() => out.push_str(".nan"),
            Doc::Float(f) if f.is_infinite() => out.push_str(if *f > 0.0 { ".inf" } else { "-.inf" }),
            // `{:?}` keeps a fraction or exponent, so the float reads back as a float.
            Doc::Float(f) => out.push_str(&format!("{f:?}")),
            Doc::Str(s) => out.push_str(&quote(s)),
            Doc::Seq(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    item.write_flow(out);
                }
                out.push(']');
            }
            Doc::Map(entries) => {
                out.push('{');
                for (i, (key, value)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    out.push_str(&quote(key));
                    out.push_str(": ");
                    value.write_flow(out);
                }
                out.push('}');
            }
        }
    }

    /// Block style, as job files are usually written; plain keys where YAML allows them.
    pub fn to_block(&self) -> String {
        let mut out = String::new();
        match self {
            Doc::Seq(items) if !items.is_empty() => self.write_block(0, &mut out),
            Doc::Map(entries) if !entries.is_empty() => self.write_block(0, &mut out),
            scalar => {
                scalar.write_flow(&mut out);
                out.push('\n');
            }
        }
        out
    }

    /// Writes a non-empty collection, each line indented by `indent` spaces.
    fn write_block(&self, indent: usize, out: &mut String) {
        let pad = " ".repeat(indent);
        let item = |lead: String, value: &Doc, out: &mut String| {
            out.push_str(&pad);
            out.push_str(&lead);
            match value {
                Doc::Seq(v) if !v.is_empty() => {
                    out.push('\n');
                    value.write_block(indent + 2, out);
                }
                Doc::Map(v) if !v.is_empty() => {
                    out.push('\n');
                    value.write_block(indent + 2, out);
                }
                scalar => {
                    out.push(' ');
                    scalar.write_flow(out);
                    out.push('\n');
                }
            }
        };
        match self {
            Doc::Seq(items) => items.iter().for_each(|v| item("-".to_string(), v, out)),
            Doc::Map(entries) => entries.iter().for_each(|(k, v)| item(format!("{}:", plain_key(k)), v, out)),
            _ => {}
        }
    }

    /// Every node's path (indices of items or entries from the root), in depth-first order.
    fn paths(&self) -> Vec<Vec<usize>> {
        let mut all = Vec::new();
        let mut stack = vec![(self, Vec::new())];
        while let Some((doc, path)) = stack.pop() {
            let children: Vec<&Doc> = match doc {
                Doc::Seq(items) => items.iter().collect(),
                Doc::Map(entries) => entries.iter().map(|(_, v)| v).collect(),
                _ => Vec::new(),
            };
            for (i, child) in children.into_iter().enumerate() {
                let mut p = path.clone();
                p.push(i);
                stack.push((child, p));
            }
            all.push(path);
        }
        all
    }

    fn at_mut(&mut self, path: &[usize]) -> &mut Doc {
        path.iter().fold(self, |doc, &i| match doc {
            Doc::Seq(items) => &mut items[i],
            Doc::Map(entries) => &mut entries[i].1,
            _ => unreachable!("paths lead through collections"),
        })
    }

    /// Applies `mutation` at the node `at` picks.
    pub fn mutate(&mut self, at: Index, mutation: &Mutation) {
        let paths = self.paths();
        let node = self.at_mut(&paths[at.index(paths.len())]);
        mutation.apply(node);
    }
}

/// `key` as written before a colon: plain when YAML reads it back as the same text.
fn plain_key(key: &str) -> String {
    let simple = !key.is_empty()
        && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        && !matches!(key, "null" | "true" | "false" | "y" | "n");
    if simple { key.to_string() } else { quote(key) }
}

/// A JSON string literal, which YAML reads as a double-quoted scalar.
fn quote(text: &str) -> String {
    serde_json::Value::String(text.to_string()).to_string()
}

/// One change to a document node.
#[derive(Debug, Clone)]
pub(super) enum Mutation {
    /// Removes an entry or item.
    Drop(Index),
    /// Writes an entry or item a second time.
    Duplicate(Index),
    /// Swaps the values of two entries or items.
    Swap(Index, Index),
    /// Gives an entry another key: unknown, a typo or another known one.
    Rename(Index, String),
    /// Replaces the node.
    Replace(Doc),
    /// Puts the node inside a list or mapping `depth` levels deep.
    Nest(usize),
}

impl Mutation {
    fn apply(&self, node: &mut Doc) {
        match (self, node) {
            (Mutation::Drop(i), Doc::Seq(items)) if !items.is_empty() => {
                items.remove(i.index(items.len()));
            }
            (Mutation::Drop(i), Doc::Map(entries)) if !entries.is_empty() => {
                entries.remove(i.index(entries.len()));
            }
            (Mutation::Duplicate(i), Doc::Seq(items)) if !items.is_empty() => {
                let copy = items[i.index(items.len())].clone();
                items.push(copy);
            }
            (Mutation::Duplicate(i), Doc::Map(entries)) if !entries.is_empty() => {
                let copy = entries[i.index(entries.len())].clone();
                entries.push(copy);
            }
            (Mutation::Swap(a, b), Doc::Seq(items)) if !items.is_empty() => {
                let n = items.len();
                items.swap(a.index(n), b.index(n));
            }
            (Mutation::Swap(a, b), Doc::Map(entries)) if !entries.is_empty() => {
                let (a, b) = (a.index(entries.len()), b.index(entries.len()));
                let value = entries[a].1.clone();
                entries[a].1 = std::mem::replace(&mut entries[b].1, value);
            }
            (Mutation::Rename(i, key), Doc::Map(entries)) if !entries.is_empty() => {
                let n = entries.len();
                entries[i.index(n)].0 = key.clone();
            }
            (Mutation::Nest(depth), node) => *node = node.clone().nested(*depth),
            (Mutation::Replace(with), node) => *node = with.clone(),
            // A mutation that does not fit the node leaves it as it is.
            _ => {}
        }
    }
}

/// Text that stresses a string field: empty, blank, long, control characters, templates,
/// paths that leave the workspace, URLs, numbers written as text.
pub(super) fn awkward_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9_./:-]{0,12}",
        2 => any::<String>(),
        1 => Just(String::new()),
        1 => Just("  \t ".to_string()),
        1 => Just("../../etc/passwd".to_string()),
        1 => Just("/abs/path".to_string()),
        1 => Just("a\0b".to_string()),
        1 => Just("https://example.com/data.tar?x#y".to_string()),
        1 => Just("ftp://example.com/x".to_string()),
        1 => Just("1-100000".to_string()),
        1 => Just("18446744073709551616".to_string()),
        1 => (1usize..200_000).prop_map(|n| "x".repeat(n)),
        2 => template(),
    ]
}

/// Template text, well formed or not, cheap or costly to render.
pub(super) fn template() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("{{ frame }}".to_string()),
        Just("{{ params.p }}".to_string()),
        Just("{{ params.nope }}".to_string()),
        Just("{{ env.HOME | default('~') }}".to_string()),
        Just("{{ nope }}".to_string()),
        Just("{{ frame ".to_string()),
        Just("{% if %}".to_string()),
        Just("{# open comment".to_string()),
        Just("{{ 1 / 0 }}".to_string()),
        Just("{{ 'x' * 100000000 }}".to_string()),
        Just("{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}".to_string()),
        Just("{{ range(100000) | join(',') }}".to_string()),
        Just("{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}".to_string()),
        Just(format!("{{{{ {}1{} }}}}", "(".repeat(10_000), ")".repeat(10_000))),
        Just(format!("{}x{}", "{% if true %}".repeat(5_000), "{% endif %}".repeat(5_000))),
    ]
}

/// A replacement value of any type, many of them wrong for the field they land in.
pub(super) fn replacement() -> impl Strategy<Value = Doc> {
    prop_oneof![
        3 => awkward_text().prop_map(Doc::Str),
        1 => Just(Doc::Null),
        1 => any::<bool>().prop_map(Doc::Bool),
        2 => any::<i64>().prop_map(Doc::Int),
        1 => prop_oneof![Just(i64::MAX), Just(i64::MIN), Just(-1), Just(0), Just(1 << 32)].prop_map(Doc::Int),
        1 => any::<f64>().prop_map(Doc::Float),
        1 => Just(Doc::Seq(Vec::new())),
        1 => Just(Doc::Map(Vec::new())),
        1 => (1usize..300).prop_map(|d| Doc::Int(1).nested(d)),
        1 => proptest::collection::vec(any::<i64>().prop_map(Doc::Int), 0..5).prop_map(Doc::Seq),
    ]
}

/// A mutation of any kind; keys are renamed to unknown words, typos or other known keys.
pub(super) fn mutation() -> impl Strategy<Value = Mutation> {
    let key = prop_oneof![
        Just("version"),
        Just("name"),
        Just("tasks"),
        Just("command"),
        Just("steps"),
        Just("depends_on"),
        Just("array"),
        Just("dependson"),
        Just("comand"),
        Just("<<"),
        Just(""),
    ]
    .prop_map(str::to_string);
    prop_oneof![
        2 => any::<Index>().prop_map(Mutation::Drop),
        2 => any::<Index>().prop_map(Mutation::Duplicate),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
        2 => (any::<Index>(), prop_oneof![key, "[a-z_]{1,10}"]).prop_map(|(i, k)| Mutation::Rename(i, k)),
        4 => replacement().prop_map(Mutation::Replace),
        1 => (1usize..100).prop_map(Mutation::Nest),
    ]
}
