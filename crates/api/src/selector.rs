//! Label selectors: `matchLabels` and `matchExpressions`, Kubernetes semantics.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::decode::{Cx, Decode};
use crate::meta::{Labels, check_label_key};
use crate::string_enum;
use crate::yaml::Node;

/// Selects objects by their labels. The empty selector selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

string_enum! {
    pub enum Operator {
        In = "In",
        NotIn = "NotIn",
        Exists = "Exists",
        DoesNotExist = "DoesNotExist",
    }
}

impl LabelSelector {
    /// The selector that selects everything.
    pub fn everything() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// Whether `labels` satisfy every term (terms are AND'ed).
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => !value.is_some_and(|v| self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

impl LabelSelector {
    /// Parses Kubernetes' selector string form, as `-l` and
    /// `?labelSelector=` take it: `app=web,tier!=db,env in (a,b),!debug,zone`.
    pub fn parse(text: &str) -> Result<LabelSelector, String> {
        let mut sel = LabelSelector::default();
        let mut depth = 0i32;
        let mut start = 0;
        let mut terms = Vec::new();
        for (i, c) in text.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    terms.push(&text[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        terms.push(&text[start..]);
        for term in terms.into_iter().map(str::trim).filter(|t| !t.is_empty()) {
            let req = |key: &str, operator, values: Vec<String>| -> Result<Requirement, String> {
                let key = key.trim();
                check_label_key(key).map_err(|why| format!("`{key}` in selector: {why}"))?;
                for v in &values {
                    if !crate::meta::is_label_value(v) {
                        return Err(format!("`{v}` in selector is not a valid label value"));
                    }
                }
                Ok(Requirement {
                    key: key.to_string(),
                    operator,
                    values,
                })
            };
            let set = |rest: &str| -> Result<Vec<String>, String> {
                let inner = rest
                    .trim()
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| format!("expected a list like (a,b) in `{term}`"))?;
                Ok(inner
                    .split(',')
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty())
                    .collect())
            };
            if let Some((key, value)) = term.split_once("!=") {
                sel.match_expressions.push(req(
                    key,
                    Operator::NotIn,
                    vec![value.trim().to_string()],
                )?);
            } else if let Some((key, value)) =
                term.split_once("==").or_else(|| term.split_once('='))
            {
                let r = req(key, Operator::In, vec![value.trim().to_string()])?;
                sel.match_labels
                    .insert(r.key, r.values.into_iter().next().unwrap_or_default());
            } else if let Some((key, rest)) = term.split_once(" notin ") {
                sel.match_expressions
                    .push(req(key, Operator::NotIn, set(rest)?)?);
            } else if let Some((key, rest)) = term.split_once(" in ") {
                sel.match_expressions
                    .push(req(key, Operator::In, set(rest)?)?);
            } else if let Some(key) = term.strip_prefix('!') {
                sel.match_expressions
                    .push(req(key, Operator::DoesNotExist, vec![])?);
            } else {
                sel.match_expressions
                    .push(req(term, Operator::Exists, vec![])?);
            }
        }
        Ok(sel)
    }
}

impl Decode for LabelSelector {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["matchLabels", "matchExpressions"])?;
        let match_labels: BTreeMap<String, String> = m.or_default(cx, "matchLabels");
        if let Some(n) = m.raw("matchLabels") {
            cx.at("matchLabels", |cx| {
                crate::meta::check_labels(&match_labels, n, cx)
            });
        }
        let match_expressions = m.or_default(cx, "matchExpressions");
        Some(LabelSelector {
            match_labels,
            match_expressions,
        })
    }
}

impl Decode for Requirement {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["key", "operator", "values"])?;
        let key: Option<String> = m.req(cx, "key");
        if let Some(k) = &key
            && let Err(why) = check_label_key(k)
        {
            m.check(cx, "key", false, || {
                format!("invalid label key `{k}`: {why}")
            });
        }
        let operator: Option<Operator> = m.req(cx, "operator");
        let values: Vec<String> = m.or_default(cx, "values");
        if let Some(op) = operator {
            let needs_values = matches!(op, Operator::In | Operator::NotIn);
            m.check(cx, "values", needs_values != values.is_empty(), || {
                if needs_values {
                    format!("operator {op} needs at least one value")
                } else {
                    format!("operator {op} takes no values")
                }
            });
        }
        Some(Requirement {
            key: key?,
            operator: operator?,
            values,
        })
    }
}

impl std::fmt::Display for LabelSelector {
    /// Kubernetes' selector string form: `app=web,tier in (a,b),!debug`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_empty() {
            return f.write_str("(all)");
        }
        let mut parts: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.match_expressions {
            parts.push(match r.operator {
                Operator::In => format!("{} in ({})", r.key, r.values.join(",")),
                Operator::NotIn => format!("{} notin ({})", r.key, r.values.join(",")),
                Operator::Exists => r.key.clone(),
                Operator::DoesNotExist => format!("!{}", r.key),
            });
        }
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_the_string_form() {
        let sel = LabelSelector::parse("app=web, tier!=db,env in (a, b),!debug,zone,x==y").unwrap();
        assert_eq!(sel.match_labels, labels(&[("app", "web"), ("x", "y")]));
        assert_eq!(
            sel.to_string(),
            "app=web,x=y,tier notin (db),env in (a,b),!debug,zone"
        );
        assert!(sel.matches(&labels(&[
            ("app", "web"),
            ("x", "y"),
            ("env", "a"),
            ("zone", "1")
        ])));
        assert!(!sel.matches(&labels(&[
            ("app", "web"),
            ("x", "y"),
            ("env", "a"),
            ("zone", "1"),
            ("debug", "")
        ])));
        assert!(LabelSelector::parse("").unwrap().is_empty());
        assert!(LabelSelector::parse("bad key=x").is_err());
        assert!(LabelSelector::parse("env in a,b").is_err());
    }

    #[test]
    fn operators_follow_kubernetes() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        let req = |key: &str, operator, values: &[&str]| Requirement {
            key: key.to_string(),
            operator,
            values: values.iter().map(|s| s.to_string()).collect(),
        };
        assert!(req("app", Operator::In, &["web", "api"]).matches(&l));
        assert!(!req("app", Operator::NotIn, &["web"]).matches(&l));
        // NotIn matches objects without the key at all.
        assert!(req("zone", Operator::NotIn, &["a"]).matches(&l));
        assert!(req("tier", Operator::Exists, &[]).matches(&l));
        assert!(req("zone", Operator::DoesNotExist, &[]).matches(&l));
        assert!(LabelSelector::everything().matches(&Labels::new()));
    }
}
