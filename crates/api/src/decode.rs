//! Decoding [`Node`] trees into typed resources while collecting every error.
//!
//! Each type implements [`Decode`]; a failing field records a
//! [`Diagnostic`] with its position and field path in the shared [`Cx`] and
//! decoding goes on with the next field, so one pass reports all mistakes.

use std::collections::BTreeMap;
use std::fmt;

use crate::yaml::{Mark, Node, Plain, Value, plain_scalar};

/// One problem found in an input file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub col: usize,
    /// Dotted field path such as `spec.ingress[0].ports[1].port`; empty for
    /// problems with the document as a whole.
    pub field: String,
    /// What was wrong and what is expected.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.col)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// The decoding context: where we are and what went wrong so far.
#[derive(Debug)]
pub struct Cx {
    file: String,
    path: Vec<Seg>,
    errors: Vec<Diagnostic>,
}

#[derive(Debug, Clone)]
enum Seg {
    Field(String),
    Index(usize),
}

impl Cx {
    pub fn new(file: impl Into<String>) -> Self {
        Cx {
            file: file.into(),
            path: Vec::new(),
            errors: Vec::new(),
        }
    }

    pub fn file(&self) -> &str {
        &self.file
    }

    /// The current field path, dotted.
    pub fn path(&self) -> String {
        let mut out = String::new();
        for seg in &self.path {
            match seg {
                Seg::Field(name) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(name);
                }
                Seg::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        out
    }

    /// Records an error at `mark` for the current field path.
    pub fn error(&mut self, mark: Mark, message: impl Into<String>) {
        let field = self.path();
        self.errors.push(Diagnostic {
            file: self.file.clone(),
            line: mark.line,
            col: mark.col,
            field,
            message: message.into(),
        });
    }

    /// Records an error unless `ok`; returns `ok`.
    pub fn check(&mut self, ok: bool, mark: Mark, message: impl FnOnce() -> String) -> bool {
        if !ok {
            self.error(mark, message());
        }
        ok
    }

    /// Runs `f` with `name` appended to the field path.
    pub fn at<T>(&mut self, name: &str, f: impl FnOnce(&mut Cx) -> T) -> T {
        self.path.push(Seg::Field(name.to_string()));
        let out = f(self);
        self.path.pop();
        out
    }

    /// Runs `f` with `[index]` appended to the field path.
    pub fn at_index<T>(&mut self, index: usize, f: impl FnOnce(&mut Cx) -> T) -> T {
        self.path.push(Seg::Index(index));
        let out = f(self);
        self.path.pop();
        out
    }

    pub fn error_count(&self) -> usize {
        self.errors.len()
    }

    pub fn into_errors(self) -> Vec<Diagnostic> {
        self.errors
    }

    /// Starts decoding a mapping with exactly the fields in `known`.
    ///
    /// Unknown and duplicate keys are reported (with a suggestion for likely
    /// typos) and skipped; `None` if `node` is not a mapping at all.
    pub fn fields<'n>(
        &mut self,
        node: &'n Node,
        known: &'static [&'static str],
    ) -> Option<Fields<'n>> {
        let Value::Map(entries) = &node.value else {
            self.error(
                node.mark,
                format!("expected a mapping, found {}", node.describe()),
            );
            return None;
        };
        for (i, (key, _)) in entries.iter().enumerate() {
            let name = key.as_scalar().unwrap_or_default();
            if !known.contains(&name) {
                let hint = match closest(name, known) {
                    Some(s) => format!("; did you mean `{s}`?"),
                    None => format!("; expected one of: {}", known.join(", ")),
                };
                self.at(name, |cx| {
                    cx.error(key.mark, format!("unknown field `{name}`{hint}"))
                });
            } else if entries[..i]
                .iter()
                .any(|(k, _)| k.as_scalar() == Some(name))
            {
                self.at(name, |cx| {
                    cx.error(key.mark, format!("field `{name}` appears twice"))
                });
            }
        }
        Some(Fields { node, entries })
    }
}

/// A mapping being decoded field by field.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'n> {
    node: &'n Node,
    entries: &'n [(Node, Node)],
}

impl<'n> Fields<'n> {
    /// Where the mapping starts.
    pub fn mark(&self) -> Mark {
        self.node.mark
    }

    /// The raw node of a field, if present and not null.
    pub fn raw(&self, name: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _)| k.as_scalar() == Some(name))
            .map(|(_, v)| v)
            .filter(|v| v.value != Value::Null)
    }

    /// Whether the key is present at all (even with a null value).
    pub fn has(&self, name: &str) -> bool {
        self.entries
            .iter()
            .any(|(k, _)| k.as_scalar() == Some(name))
    }

    /// An optional field: `None` when absent, null, or invalid (then reported).
    pub fn opt<T: Decode>(&self, cx: &mut Cx, name: &str) -> Option<T> {
        let node = self.raw(name)?;
        cx.at(name, |cx| T::decode(node, cx))
    }

    /// An optional field with a default for when it is absent.
    pub fn or_default<T: Decode + Default>(&self, cx: &mut Cx, name: &str) -> T {
        self.opt(cx, name).unwrap_or_default()
    }

    /// A required field: reports its absence.
    pub fn req<T: Decode>(&self, cx: &mut Cx, name: &str) -> Option<T> {
        match self.raw(name) {
            Some(node) => cx.at(name, |cx| T::decode(node, cx)),
            None => {
                let mark = self.node.mark;
                cx.at(name, |cx| {
                    cx.error(mark, format!("missing required field `{name}`"))
                });
                None
            }
        }
    }

    /// Runs a check with the field's node (or the mapping's mark if absent).
    pub fn check(
        &self,
        cx: &mut Cx,
        name: &str,
        ok: bool,
        message: impl FnOnce() -> String,
    ) -> bool {
        let mark = self.raw(name).map_or(self.node.mark, |n| n.mark);
        cx.at(name, |cx| cx.check(ok, mark, message))
    }
}

/// Suggests the known name closest to a likely typo.
fn closest(name: &str, known: &[&'static str]) -> Option<&'static str> {
    let lower = name.to_ascii_lowercase();
    known
        .iter()
        .map(|k| (edit_distance(&lower, &k.to_ascii_lowercase()), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A type that can be read from a [`Node`], reporting problems into a [`Cx`].
///
/// Returns `None` when the value is unusable; every `None` has recorded at
/// least one error.
pub trait Decode: Sized {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self>;
}

/// Reads a scalar as text. Plain scalars are accepted as strings too, so
/// `version: 1.0` is the label value "1.0" rather than an error.
fn scalar_text<'n>(node: &'n Node, cx: &mut Cx, expected: &str) -> Option<&'n str> {
    match &node.value {
        Value::Scalar { text, .. } => Some(text),
        _ => {
            cx.error(
                node.mark,
                format!("expected {expected}, found {}", node.describe()),
            );
            None
        }
    }
}

impl Decode for String {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        scalar_text(node, cx, "a string").map(str::to_string)
    }
}

impl Decode for bool {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        if let Value::Scalar {
            text,
            quoted: false,
        } = &node.value
            && let Plain::Bool(b) = plain_scalar(text)
        {
            return Some(b);
        }
        cx.error(
            node.mark,
            format!("expected true or false, found {}", node.describe()),
        );
        None
    }
}

/// Reads a scalar and parses it, reporting the parser's message on failure.
pub fn parse_scalar<T>(
    node: &Node,
    cx: &mut Cx,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Option<T> {
    let text = scalar_text(node, cx, "a string")?;
    match parse(text) {
        Ok(v) => Some(v),
        Err(why) => {
            cx.error(node.mark, why);
            None
        }
    }
}

/// Reads an unquoted integer scalar in `lo..=hi`.
pub fn integer(node: &Node, cx: &mut Cx, lo: i64, hi: i64) -> Option<i64> {
    if let Value::Scalar {
        text,
        quoted: false,
    } = &node.value
        && let Plain::Int(i) = plain_scalar(text)
        && (lo..=hi).contains(&i)
    {
        return Some(i);
    }
    cx.error(
        node.mark,
        format!(
            "expected an integer from {lo} to {hi}, found {}",
            node.describe()
        ),
    );
    None
}

macro_rules! decode_int {
    ($($t:ty),*) => {$(
        impl Decode for $t {
            fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
                let lo = i64::try_from(<$t>::MIN).unwrap_or(i64::MIN);
                let hi = i64::try_from(<$t>::MAX).unwrap_or(i64::MAX);
                integer(node, cx, lo, hi).and_then(|i| <$t>::try_from(i).ok())
            }
        }
    )*};
}
decode_int!(u8, u16, u32, u64, i32, i64);

impl Decode for f64 {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        if let Value::Scalar {
            text,
            quoted: false,
        } = &node.value
        {
            match plain_scalar(text) {
                Plain::Int(i) => return Some(i as f64),
                Plain::Float(f) if f.is_finite() => return Some(f),
                _ => {}
            }
        }
        cx.error(
            node.mark,
            format!("expected a number, found {}", node.describe()),
        );
        None
    }
}

impl<T: Decode> Decode for Vec<T> {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let Value::Seq(items) = &node.value else {
            cx.error(
                node.mark,
                format!("expected a list, found {}", node.describe()),
            );
            return None;
        };
        let before = cx.error_count();
        let out: Vec<T> = items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| cx.at_index(i, |cx| T::decode(item, cx)))
            .collect();
        (cx.error_count() == before).then_some(out)
    }
}

impl<T: Decode> Decode for BTreeMap<String, T> {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let Value::Map(entries) = &node.value else {
            cx.error(
                node.mark,
                format!("expected a mapping, found {}", node.describe()),
            );
            return None;
        };
        let before = cx.error_count();
        let mut out = BTreeMap::new();
        for (key, value) in entries {
            let name = key.as_scalar().unwrap_or_default().to_string();
            cx.at(&name, |cx| {
                if out.contains_key(&name) {
                    cx.error(key.mark, format!("key `{name}` appears twice"));
                } else if let Some(v) = T::decode(value, cx) {
                    out.insert(name.clone(), v);
                }
            });
        }
        (cx.error_count() == before).then_some(out)
    }
}

/// Declares a string enum with its YAML spellings, `Decode`, `Display` and
/// serde support. The first variant is the default.
#[macro_export]
macro_rules! string_enum {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        $vis enum $name { #[default] $($(#[$vmeta])* $variant),+ }

        impl $name {
            pub const ALL: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }

            pub fn parse(s: &str) -> Option<Self> {
                match s { $($text => Some(Self::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl $crate::decode::Decode for $name {
            fn decode(node: &$crate::yaml::Node, cx: &mut $crate::decode::Cx) -> Option<Self> {
                let parsed = node.as_scalar().and_then(Self::parse);
                if parsed.is_none() {
                    cx.error(node.mark, format!(
                        "expected one of {}, found {}", Self::ALL.join(", "), node.describe()
                    ));
                }
                parsed
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml::{Limits, parse};

    #[derive(Debug)]
    struct Pair {
        a: u16,
        b: Vec<String>,
    }

    impl Decode for Pair {
        fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
            let m = cx.fields(node, &["alpha", "beta"])?;
            let a = m.req(cx, "alpha");
            let b = m.or_default(cx, "beta");
            Some(Pair { a: a?, b })
        }
    }

    fn decode_pair(src: &str) -> (Option<Pair>, Vec<Diagnostic>) {
        let docs = parse(src, Limits::default()).unwrap();
        let mut cx = Cx::new("t.yaml");
        let out = Pair::decode(&docs[0], &mut cx);
        (out, cx.into_errors())
    }

    #[test]
    fn collects_every_error_with_paths() {
        let (_, errs) = decode_pair("alpha: 70000\nbeta: [x, [y]]\nbetta: 1\n");
        let shown: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            vec![
                "t.yaml:3:1: betta: unknown field `betta`; did you mean `beta`?",
                "t.yaml:1:8: alpha: expected an integer from 0 to 65535, found \"70000\"",
                "t.yaml:2:11: beta[1]: expected a string, found a list",
            ]
        );
    }

    #[test]
    fn reports_missing_required_fields() {
        let (out, errs) = decode_pair("beta: [x]\n");
        assert!(out.is_none());
        assert_eq!(
            errs[0].to_string(),
            "t.yaml:1:1: alpha: missing required field `alpha`"
        );
    }

    #[test]
    fn decodes_valid_input() {
        let (out, errs) = decode_pair("alpha: 8080\nbeta: [x, 'y']\n");
        assert!(errs.is_empty(), "{errs:?}");
        let out = out.unwrap();
        assert_eq!(out.a, 8080);
        assert_eq!(out.b, vec!["x", "y"]);
    }

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(
            closest("matchLabel", &["matchLabels", "matchExpressions"]),
            Some("matchLabels")
        );
        assert_eq!(closest("zzz", &["matchLabels", "matchExpressions"]), None);
    }
}
