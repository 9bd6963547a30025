//! A YAML (or JSON) document as a tree whose every node and key knows its line and column.
//!
//! Built from serde-saphyr's event parser (`granit_parser`) rather than through serde, because
//! the schema checks need positions for every key and value and want to report all problems,
//! not stop at the first. JSON goes through the same parser (JSON is YAML 1.2) after
//! `serde_json` has checked that it is strict JSON.

use std::collections::{HashMap, HashSet};

use serde_saphyr::granit_parser::{Event, Marker, Options, Parser, ScalarStyle};

use super::error::Pos;

/// Most nodes a document may expand to, counting every copy an alias makes: a budget against
/// "billion laughs" documents.
const MAX_NODES: usize = 1_000_000;

/// Deepest nesting of values, counting the levels an alias brings along. A job file needs
/// fewer than ten; the parser stops at a few hundred on its own, but aliases that nest into
/// each other can build a tree thousands of levels deep out of a short file, and cloning or
/// dropping such a tree recurses once per level.
const MAX_DEPTH: usize = 64;

/// A value with the position where it starts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub pos: Pos,
    pub value: Value,
}

/// A YAML value, scalars resolved with the YAML 1.2 core schema.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<Entry>),
}

/// One `key: value` pair of a mapping.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    pub key: String,
    pub key_pos: Pos,
    pub value: Node,
}

impl Node {
    /// How the value is named in "expected X, found Y" messages.
    pub fn kind(&self) -> &'static str {
        match self.value {
            Value::Null => "nothing (null)",
            Value::Bool(_) => "a boolean",
            Value::Int(_) | Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// The value as text if it is a string, number or boolean.
    pub fn scalar_text(&self) -> Option<String> {
        match &self.value {
            Value::Str(s) => Some(s.clone()),
            Value::Int(i) => Some(i.to_string()),
            Value::Float(f) => Some(f.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Null | Value::Seq(_) | Value::Map(_) => None,
        }
    }
}

/// Why a document could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    pub pos: Pos,
    pub message: String,
    pub hint: Option<String>,
}

fn syntax(pos: Pos, message: impl Into<String>, hint: Option<&str>) -> SyntaxError {
    SyntaxError { pos, message: message.into(), hint: hint.map(str::to_string) }
}

fn pos_of(marker: &Marker) -> Pos {
    Pos { line: marker.line().max(1), column: marker.col() + 1 }
}

/// Parses JSON: strictly checked by `serde_json` first (so trailing commas and the like are
/// rejected with JSON's own messages), then read through the YAML parser for positions.
pub(crate) fn parse_json(source: &str) -> Result<Node, SyntaxError> {
    if let Err(e) = serde_json::from_str::<serde_json::Value>(source) {
        let text = e.to_string();
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        let message = text.strip_suffix(&suffix).unwrap_or(&text);
        let pos = Pos { line: e.line().max(1), column: e.column().max(1) };
        return Err(syntax(pos, format!("invalid JSON: {message}"), None));
    }
    parse_yaml(source)
}

/// Parses a single YAML document.
pub(crate) fn parse_yaml(source: &str) -> Result<Node, SyntaxError> {
    let mut options = Options::default();
    options.emit_comments = false;
    let mut parser = Parser::new_from_str_with_options(source, options);
    let mut builder = Builder::default();
    while let Some(next) = parser.next_event() {
        let (event, span) = next.map_err(|e| {
            syntax(
                pos_of(e.marker()),
                format!("invalid YAML: {}", e.info()),
                Some("check the indentation and quoting around this position"),
            )
        })?;
        builder.event(event, pos_of(&span.start))?;
    }
    builder
        .root
        .ok_or_else(|| syntax(Pos::START, "the job file is empty", Some("start it with `version: 1`")))
}

/// A collection still being read, with the [`Shape`] of what it holds so far.
enum Open {
    Seq {
        pos: Pos,
        anchor: usize,
        items: Vec<Node>,
        shape: Shape,
    },
    Map {
        pos: Pos,
        anchor: usize,
        entries: Vec<Entry>,
        keys: HashSet<String>,
        key: Option<(String, Pos)>,
        shape: Shape,
    },
}

/// How many values a node holds (itself included; a mapping's keys count too) and how many
/// levels deep it is, tracked while the tree is built so that neither needs a recursive walk.
#[derive(Debug, Clone, Copy, Default)]
struct Shape {
    size: usize,
    depth: usize,
}

impl Shape {
    /// A scalar.
    const LEAF: Shape = Shape { size: 1, depth: 1 };

    /// The collection holding what `self` counted, once closed.
    fn closed(self) -> Shape {
        Shape { size: self.size + 1, depth: self.depth + 1 }
    }

    /// Takes a completed child (and its key, if in a mapping) into account.
    fn add(&mut self, child: Shape, keyed: bool) {
        self.size += child.size + usize::from(keyed);
        self.depth = self.depth.max(child.depth);
    }
}

#[derive(Default)]
struct Builder {
    stack: Vec<Open>,
    anchors: HashMap<usize, (Node, Shape)>,
    documents: usize,
    nodes: usize,
    root: Option<Node>,
}

impl Builder {
    fn event(&mut self, event: Event<'_>, pos: Pos) -> Result<(), SyntaxError> {
        if event.is_node() {
            self.spend(1, pos)?;
        }
        match event {
            Event::DocumentStart(..) => {
                self.documents += 1;
                if self.documents > 1 {
                    return Err(syntax(
                        pos,
                        "a job file holds one YAML document, found a second one",
                        Some("put each job in its own file"),
                    ));
                }
            }
            Event::Scalar(text, style, anchor, tag) => {
                if let Some(Open::Map { key: key @ None, keys, .. }) = self.stack.last_mut() {
                    if !keys.insert(text.to_string()) {
                        return Err(syntax(
                            pos,
                            format!("duplicate key `{text}`"),
                            Some("each key may appear only once in a mapping"),
                        ));
                    }
                    *key = Some((text.into_owned(), pos));
                    return Ok(());
                }
                let forced_string = tag.as_ref().and_then(|t| t.core_suffix()) == Some("str");
                let value = if style == ScalarStyle::Plain && !forced_string {
                    resolve_plain(&text)
                } else {
                    Value::Str(text.into_owned())
                };
                self.finish(Node { pos, value }, Shape::LEAF, anchor)?;
            }
            Event::SequenceStart(_, anchor, _) => {
                self.check_not_key(pos)?;
                self.stack.push(Open::Seq { pos, anchor, items: Vec::new(), shape: Shape::default() });
            }
            Event::MappingStart(_, anchor, _) => {
                self.check_not_key(pos)?;
                self.stack.push(Open::Map {
                    pos,
                    anchor,
                    entries: Vec::new(),
                    keys: HashSet::new(),
                    key: None,
                    shape: Shape::default(),
                });
            }
            Event::SequenceEnd | Event::MappingEnd => match self.stack.pop() {
                Some(Open::Seq { pos, anchor, items, shape }) => {
                    self.finish(Node { pos, value: Value::Seq(items) }, shape.closed(), anchor)?
                }
                Some(Open::Map { pos, anchor, entries, shape, .. }) => {
                    self.finish(Node { pos, value: Value::Map(entries) }, shape.closed(), anchor)?
                }
                None => return Err(syntax(pos, "unbalanced YAML structure", None)),
            },
            Event::Alias(id) => {
                self.check_not_key(pos)?;
                let Some(shape) = self.anchors.get(&id).map(|(_, shape)| *shape) else {
                    return Err(syntax(pos, "alias refers to an unknown anchor", None));
                };
                // The alias event itself was counted as one node above.
                self.spend(shape.size.saturating_sub(1), pos)?;
                // Checked before the copy, which recurses once per level.
                self.check_depth(shape, pos)?;
                if let Some((target, _)) = self.anchors.get(&id) {
                    let node = Node { pos, value: target.value.clone() };
                    self.finish(node, shape, 0)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Counts `n` more values against [`MAX_NODES`].
    fn spend(&mut self, n: usize, pos: Pos) -> Result<(), SyntaxError> {
        self.nodes = self.nodes.saturating_add(n);
        if self.nodes > MAX_NODES {
            return Err(syntax(
                pos,
                format!("the document expands to more than {MAX_NODES} values"),
                Some("use fewer aliases or split the job"),
            ));
        }
        Ok(())
    }

    /// Refuses a node `shape.depth` levels deep at the current level if the whole would nest
    /// deeper than [`MAX_DEPTH`].
    fn check_depth(&self, shape: Shape, pos: Pos) -> Result<(), SyntaxError> {
        if self.stack.len() + shape.depth > MAX_DEPTH {
            return Err(syntax(
                pos,
                format!("the document nests deeper than {MAX_DEPTH} levels"),
                Some("a job file needs only a few levels; check for aliases that nest into each other"),
            ));
        }
        Ok(())
    }

    /// Mapping keys must be plain names, not lists, mappings or aliases.
    fn check_not_key(&self, pos: Pos) -> Result<(), SyntaxError> {
        if let Some(Open::Map { key: None, .. }) = self.stack.last() {
            return Err(syntax(pos, "mapping keys must be plain names", Some("quote the key if it is text")));
        }
        Ok(())
    }

    /// Attaches a completed node of `shape` to its parent (or makes it the root).
    fn finish(&mut self, node: Node, shape: Shape, anchor: usize) -> Result<(), SyntaxError> {
        self.check_depth(shape, node.pos)?;
        if anchor != 0 {
            self.anchors.insert(anchor, (node.clone(), shape));
        }
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Open::Seq { items, shape: parent, .. }) => {
                items.push(node);
                parent.add(shape, false);
            }
            Some(Open::Map { entries, key, shape: parent, .. }) => {
                // check_not_key and the scalar-key path guarantee a pending key here.
                if let Some((key, key_pos)) = key.take() {
                    entries.push(Entry { key, key_pos, value: node });
                    parent.add(shape, true);
                }
            }
        }
        Ok(())
    }
}

/// Resolves a plain scalar by the YAML 1.2 core schema.
fn resolve_plain(text: &str) -> Value {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => return Value::Float(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => return Value::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Value::Float(f64::NAN),
        _ => {}
    }
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        return match text.parse::<i64>() {
            Ok(i) => Value::Int(i),
            Err(_) => text.parse::<f64>().map(Value::Float).unwrap_or_else(|_| Value::Str(text.into())),
        };
    }
    if let Some(hex) = text.strip_prefix("0x")
        && let Ok(i) = i64::from_str_radix(hex, 16)
    {
        return Value::Int(i);
    }
    if let Some(oct) = text.strip_prefix("0o")
        && let Ok(i) = i64::from_str_radix(oct, 8)
    {
        return Value::Int(i);
    }
    let float_like =
        digits.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'))
            && digits.bytes().next().is_some_and(|b| b.is_ascii_digit() || b == b'.')
            && digits.bytes().any(|b| b.is_ascii_digit());
    if float_like && let Ok(f) = text.parse::<f64>() {
        return Value::Float(f);
    }
    Value::Str(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(node: &Node) -> &[Entry] {
        match &node.value {
            Value::Map(e) => e,
            other => panic!("not a map: {other:?}"),
        }
    }

    #[test]
    fn positions_of_keys_and_values() {
        let root = parse_yaml("# comment\nversion: 1\ntasks:\n  - name: a\n    command: 'x'\n").unwrap();
        assert_eq!(root.pos, Pos { line: 2, column: 1 });
        let top = map(&root);
        assert_eq!(top[0].key, "version");
        assert_eq!(top[0].value, Node { pos: Pos { line: 2, column: 10 }, value: Value::Int(1) });
        let Value::Seq(tasks) = &top[1].value.value else { panic!() };
        assert_eq!(tasks[0].pos, Pos { line: 4, column: 5 });
        let task = map(&tasks[0]);
        assert_eq!(task[1].key_pos, Pos { line: 5, column: 5 });
        assert_eq!(task[1].value.value, Value::Str("x".into()));
    }

    #[test]
    fn scalars_follow_the_core_schema() {
        assert_eq!(resolve_plain("12"), Value::Int(12));
        assert_eq!(resolve_plain("-3"), Value::Int(-3));
        assert_eq!(resolve_plain("1.5"), Value::Float(1.5));
        assert_eq!(resolve_plain("true"), Value::Bool(true));
        assert_eq!(resolve_plain("~"), Value::Null);
        assert_eq!(resolve_plain("yes"), Value::Str("yes".into()));
        assert_eq!(resolve_plain("1-100"), Value::Str("1-100".into()));
        assert_eq!(resolve_plain("256MiB"), Value::Str("256MiB".into()));
        assert_eq!(resolve_plain("e5"), Value::Str("e5".into()));
        let root = parse_yaml("a: !!str 1\nb: '2'\n").unwrap();
        assert_eq!(map(&root)[0].value.value, Value::Str("1".into()));
        assert_eq!(map(&root)[1].value.value, Value::Str("2".into()));
    }

    #[test]
    fn aliases_are_copied_and_budgeted() {
        let root = parse_yaml("a: &x {k: 1}\nb: *x\n").unwrap();
        assert_eq!(map(&root)[0].value.value, map(&root)[1].value.value);
        let mut laughs = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..9 {
            let p = i - 1;
            laughs.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let e = parse_yaml(&laughs).unwrap_err();
        assert!(e.message.contains("expands to more than"), "{e:?}");
    }

    #[test]
    fn aliases_cannot_nest_deeper_than_the_limit() {
        let mut chain = String::from("a0: &a0 [x]\n");
        for i in 1..2000 {
            chain.push_str(&format!("a{i}: &a{i} [*a{}]\n", i - 1));
        }
        // A small stack proves that the refusal comes before any deep copy or drop.
        let e = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || parse_yaml(&chain).unwrap_err())
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(e.message, format!("the document nests deeper than {MAX_DEPTH} levels"));
        assert_eq!(e.pos.line, MAX_DEPTH - 1, "{e:?}");
        let nested = format!("a: {}1{}\n", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse_yaml(&nested).unwrap_err().message.contains("nests deeper"));
        let fits = format!("a: {}1{}\n", "[".repeat(MAX_DEPTH - 2), "]".repeat(MAX_DEPTH - 2));
        assert!(parse_yaml(&fits).is_ok());
    }

    #[test]
    fn structural_errors() {
        let e = parse_yaml("a: 1\na: 2\n").unwrap_err();
        assert_eq!((e.pos, e.message.as_str()), (Pos { line: 2, column: 1 }, "duplicate key `a`"));
        let e = parse_yaml("a: 1\n---\nb: 2\n").unwrap_err();
        assert!(e.message.contains("one YAML document"), "{e:?}");
        assert_eq!(parse_yaml("").unwrap_err().message, "the job file is empty");
        let e = parse_json("{\"a\": 1,}").unwrap_err();
        assert_eq!(e.pos, Pos { line: 1, column: 9 });
        assert!(e.message.starts_with("invalid JSON: trailing comma"), "{e:?}");
    }

    #[test]
    fn json_goes_through_the_same_tree() {
        let root = parse_json("{\"a\":1,\n\t\"b\": [true, null, \"x\\/y\"]}").unwrap();
        let top = map(&root);
        assert_eq!(top[1].key_pos, Pos { line: 2, column: 2 });
        let Value::Seq(items) = &top[1].value.value else { panic!() };
        let values: Vec<_> = items.iter().map(|n| n.value.clone()).collect();
        assert_eq!(values, vec![Value::Bool(true), Value::Null, Value::Str("x/y".into())]);
    }
}
