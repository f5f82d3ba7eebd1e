//! A YAML/JSON document tree that remembers where every node came from.
//!
//! serde-based loaders stop at the first error and forget positions; Skiff
//! needs every error of a file with its line and column, so documents are
//! first read into this tree and then decoded by [`crate::decode`].
//! Reading is bounded: input size, nesting depth and node count (including
//! alias expansion) are all capped, so hostile files cannot exhaust memory.

use std::borrow::Cow;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

/// A 1-based line and column in a source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mark {
    pub line: usize,
    pub col: usize,
}

/// One node of a document with the position where it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Value,
    pub mark: Mark,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `~`, `null`, or an empty value.
    Null,
    /// A scalar's text; `quoted` scalars are always strings.
    Scalar {
        text: String,
        quoted: bool,
    },
    Seq(Vec<Node>),
    /// Entries in source order; keys are scalars (others are rejected on read).
    Map(Vec<(Node, Node)>),
}

/// Limits applied while reading one file.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: usize,
    pub max_depth: usize,
    pub max_nodes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 8 * 1024 * 1024,
            max_depth: 64,
            max_nodes: 1_000_000,
        }
    }
}

/// Why a file could not be read as YAML at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SyntaxError {
    pub mark: Mark,
    pub message: String,
}

impl Node {
    /// A short name of the node's type for "expected X, found Y" messages.
    pub fn describe(&self) -> String {
        match &self.value {
            Value::Null => "null".to_string(),
            Value::Scalar { text, .. } => {
                let shown: String = text.chars().take(40).collect();
                if shown.len() < text.len() {
                    format!("{shown:?}…")
                } else {
                    format!("{shown:?}")
                }
            }
            Value::Seq(_) => "a list".to_string(),
            Value::Map(_) => "a mapping".to_string(),
        }
    }

    /// The scalar text, if this is a scalar.
    pub fn as_scalar(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// Looks up a key in a mapping node.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.as_scalar() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// Converts to JSON, typing plain scalars by the YAML 1.2 core schema.
    pub fn to_json(&self) -> serde_json::Value {
        match &self.value {
            Value::Null => serde_json::Value::Null,
            Value::Scalar { text, quoted } => {
                if *quoted {
                    return serde_json::Value::String(text.clone());
                }
                match plain_scalar(text) {
                    Plain::Null => serde_json::Value::Null,
                    Plain::Bool(b) => serde_json::Value::Bool(b),
                    Plain::Int(i) => serde_json::Value::from(i),
                    Plain::Float(f) => serde_json::Number::from_f64(f)
                        .map(serde_json::Value::Number)
                        .unwrap_or_else(|| serde_json::Value::String(text.clone())),
                    Plain::Str => serde_json::Value::String(text.clone()),
                }
            }
            Value::Seq(items) => {
                serde_json::Value::Array(items.iter().map(Node::to_json).collect())
            }
            Value::Map(entries) => serde_json::Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.as_scalar().unwrap_or_default().to_string(), v.to_json()))
                    .collect(),
            ),
        }
    }
}

/// The YAML 1.2 core-schema reading of a plain scalar.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Plain {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str,
}

/// Types a plain (unquoted) scalar per the YAML 1.2 core schema.
pub fn plain_scalar(text: &str) -> Plain {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Plain::Null,
        "true" | "True" | "TRUE" => return Plain::Bool(true),
        "false" | "False" | "FALSE" => return Plain::Bool(false),
        _ => {}
    }
    if let Some(hex) = text.strip_prefix("0x")
        && let Ok(i) = i64::from_str_radix(hex, 16)
    {
        return Plain::Int(i);
    }
    if let Some(oct) = text.strip_prefix("0o")
        && let Ok(i) = i64::from_str_radix(oct, 8)
    {
        return Plain::Int(i);
    }
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && let Ok(i) = text.parse::<i64>()
    {
        return Plain::Int(i);
    }
    let looks_numeric = digits
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_digit() || b == b'.')
        && digits
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'));
    if looks_numeric && let Ok(f) = text.parse::<f64>() {
        return Plain::Float(f);
    }
    match digits {
        ".inf" | ".Inf" | ".INF" => {
            return Plain::Float(if text.starts_with('-') {
                f64::NEG_INFINITY
            } else {
                f64::INFINITY
            });
        }
        ".nan" | ".NaN" | ".NAN" if digits == text => return Plain::Float(f64::NAN),
        _ => {}
    }
    Plain::Str
}

/// Reads every document of `src`. Empty documents are returned as `Null` nodes.
///
/// Fails on the first syntax error or exceeded limit: a file that is not
/// well-formed YAML has no tree to report further errors against.
pub fn parse(src: &str, limits: Limits) -> Result<Vec<Node>, SyntaxError> {
    if src.len() > limits.max_bytes {
        return Err(SyntaxError {
            mark: Mark { line: 1, col: 1 },
            message: format!(
                "file is {} bytes; the limit is {} bytes ({} MiB): split it into smaller files",
                src.len(),
                limits.max_bytes,
                limits.max_bytes / (1024 * 1024)
            ),
        });
    }
    let mut reader = Reader {
        limits,
        nodes: 0,
        anchors: Vec::new(),
    };
    reader.read(src)
}

struct Reader {
    limits: Limits,
    nodes: usize,
    /// Anchored nodes by anchor id, kept to expand aliases.
    anchors: Vec<(usize, Node)>,
}

/// A collection being built while its events arrive.
enum Open {
    Seq(Vec<Node>, Mark, usize),
    Map(Vec<(Node, Node)>, Option<Node>, Mark, usize),
}

fn mark_of(span: &Span) -> Mark {
    Mark {
        line: span.start.line(),
        col: span.start.col() + 1,
    }
}

impl Reader {
    fn read(&mut self, src: &str) -> Result<Vec<Node>, SyntaxError> {
        let mut docs = Vec::new();
        let mut stack: Vec<Open> = Vec::new();
        let mut parser = Parser::new_from_str(src);
        let mut in_doc = false;
        let mut doc_root: Option<Node> = None;
        while let Some(event) = parser.next_event() {
            let (event, span) = event.map_err(|e| SyntaxError {
                mark: Mark {
                    line: e.marker().line(),
                    col: e.marker().col() + 1,
                },
                message: if e.info().contains("recursion limit") {
                    format!("invalid YAML: nested too deeply ({})", e.info())
                } else {
                    format!("invalid YAML: {}", e.info())
                },
            })?;
            let mark = mark_of(&span);
            let done: Option<Node> = match event {
                Event::StreamStart | Event::Nothing => None,
                Event::StreamEnd => break,
                Event::DocumentStart(_) => {
                    in_doc = true;
                    doc_root = None;
                    self.anchors.clear();
                    None
                }
                Event::DocumentEnd => {
                    if in_doc {
                        docs.push(doc_root.take().unwrap_or(Node {
                            value: Value::Null,
                            mark,
                        }));
                    }
                    in_doc = false;
                    None
                }
                Event::Alias(id) => {
                    let Some((_, node)) = self.anchors.iter().rev().find(|(a, _)| *a == id) else {
                        return Err(SyntaxError {
                            mark,
                            message: "alias refers to an unknown anchor".to_string(),
                        });
                    };
                    let node = node.clone();
                    self.count(count_nodes(&node), mark)?;
                    Some(node)
                }
                Event::Scalar(text, style, anchor, tag) => {
                    self.count(1, mark)?;
                    let quoted = !matches!(style, ScalarStyle::Plain)
                        || tag.as_ref().is_some_and(|t| t.suffix == "str");
                    let value = if !quoted && plain_scalar(&text) == Plain::Null {
                        Value::Null
                    } else {
                        Value::Scalar {
                            text: Cow::into_owned(text),
                            quoted,
                        }
                    };
                    let node = Node { value, mark };
                    self.anchor(anchor, &node);
                    Some(node)
                }
                Event::SequenceStart(anchor, _) => {
                    self.count(1, mark)?;
                    self.depth(stack.len() + 1, mark)?;
                    stack.push(Open::Seq(Vec::new(), mark, anchor));
                    None
                }
                Event::MappingStart(anchor, _) => {
                    self.count(1, mark)?;
                    self.depth(stack.len() + 1, mark)?;
                    stack.push(Open::Map(Vec::new(), None, mark, anchor));
                    None
                }
                Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                    Some(Open::Seq(items, mark, anchor)) => {
                        let node = Node {
                            value: Value::Seq(items),
                            mark,
                        };
                        self.anchor(anchor, &node);
                        Some(node)
                    }
                    Some(Open::Map(entries, _, mark, anchor)) => {
                        let node = Node {
                            value: Value::Map(entries),
                            mark,
                        };
                        self.anchor(anchor, &node);
                        Some(node)
                    }
                    None => None,
                },
            };
            if let Some(node) = done {
                match stack.last_mut() {
                    Some(Open::Seq(items, ..)) => items.push(node),
                    Some(Open::Map(entries, pending, ..)) => match pending.take() {
                        Some(key) => entries.push((key, node)),
                        None => {
                            if !matches!(node.value, Value::Scalar { .. } | Value::Null) {
                                return Err(SyntaxError {
                                    mark: node.mark,
                                    message: "mapping keys must be plain strings".to_string(),
                                });
                            }
                            *pending = Some(key_node(node));
                        }
                    },
                    None => doc_root = Some(node),
                }
            }
        }
        Ok(docs)
    }

    fn count(&mut self, n: usize, mark: Mark) -> Result<(), SyntaxError> {
        self.nodes = self.nodes.saturating_add(n);
        if self.nodes > self.limits.max_nodes {
            return Err(SyntaxError {
                mark,
                message: format!(
                    "file has more than {} values (counting alias expansions)",
                    self.limits.max_nodes
                ),
            });
        }
        Ok(())
    }

    fn depth(&self, depth: usize, mark: Mark) -> Result<(), SyntaxError> {
        if depth > self.limits.max_depth {
            return Err(SyntaxError {
                mark,
                message: format!(
                    "nesting is deeper than {} levels; no Skiff resource is nested that deeply",
                    self.limits.max_depth
                ),
            });
        }
        Ok(())
    }

    fn anchor(&mut self, anchor: usize, node: &Node) {
        if anchor != 0 {
            self.anchors.push((anchor, node.clone()));
        }
    }
}

/// A `null` key (`~: x`) is kept as the string "null" so it reports as unknown.
fn key_node(node: Node) -> Node {
    match node.value {
        Value::Null => Node {
            value: Value::Scalar {
                text: "null".to_string(),
                quoted: false,
            },
            mark: node.mark,
        },
        _ => node,
    }
}

fn count_nodes(node: &Node) -> usize {
    match &node.value {
        Value::Null | Value::Scalar { .. } => 1,
        Value::Seq(items) => 1 + items.iter().map(count_nodes).sum::<usize>(),
        Value::Map(entries) => {
            1 + entries
                .iter()
                .map(|(k, v)| count_nodes(k) + count_nodes(v))
                .sum::<usize>()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_documents_with_positions() {
        let docs = parse("a: 1\nb:\n  - x\n  - 'y'\n---\nc: ~\n", Limits::default()).unwrap();
        assert_eq!(docs.len(), 2);
        let b = docs[0].get("b").unwrap();
        assert_eq!(b.mark.line, 3);
        let Value::Seq(items) = &b.value else {
            panic!()
        };
        assert_eq!(items[1].mark, Mark { line: 4, col: 5 });
        assert_eq!(docs[1].get("c").unwrap().value, Value::Null);
    }

    #[test]
    fn reads_json() {
        let docs = parse("{\"a\": [1, \"2\"], \"b\": true}", Limits::default()).unwrap();
        assert_eq!(
            docs[0].to_json(),
            serde_json::json!({"a": [1, "2"], "b": true})
        );
    }

    #[test]
    fn rejects_deep_nesting_early() {
        // Flow style is also capped by the scanner's own recursion limit.
        let err = parse(&"[".repeat(100_000), Limits::default()).unwrap_err();
        assert!(
            err.message.contains("deeper than 64") || err.message.contains("recursion limit"),
            "{err}"
        );
        let block: String = (0..200).map(|i| format!("{}k:\n", " ".repeat(i))).collect();
        let err = parse(&block, Limits::default()).unwrap_err();
        assert!(err.message.contains("deeper than 64"), "{err}");
        assert_eq!(err.mark.line, 65);
    }

    #[test]
    fn rejects_oversized_input() {
        let src = "a: b\n".repeat(3_000_000);
        let err = parse(&src, Limits::default()).unwrap_err();
        assert!(err.message.contains("limit is"), "{err}");
    }

    #[test]
    fn bounds_alias_expansion() {
        // The "billion laughs" shape: each level doubles the previous one.
        let mut src = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..30 {
            src.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}]\n",
                p = i - 1
            ));
        }
        let err = parse(&src, Limits::default()).unwrap_err();
        assert!(err.message.contains("alias"), "{err}");
    }

    #[test]
    fn types_plain_scalars_by_core_schema() {
        assert_eq!(plain_scalar("42"), Plain::Int(42));
        assert_eq!(plain_scalar("-7"), Plain::Int(-7));
        assert_eq!(plain_scalar("1.5"), Plain::Float(1.5));
        assert_eq!(plain_scalar("true"), Plain::Bool(true));
        assert_eq!(plain_scalar("yes"), Plain::Str);
        assert_eq!(plain_scalar("500m"), Plain::Str);
        assert_eq!(plain_scalar("~"), Plain::Null);
    }
}
