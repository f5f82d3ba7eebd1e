//! Output formats: YAML from JSON values, aligned tables, and line diffs.

use serde_json::Value;

/// Renders a JSON value as YAML that `skiff apply` reads back unchanged.
pub fn to_yaml(v: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, v, 0, false);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

fn write_value(out: &mut String, v: &Value, indent: usize, in_list: bool) {
    match v {
        Value::Object(map) if !map.is_empty() => {
            for (i, (k, val)) in map.iter().enumerate() {
                if i > 0 || !in_list {
                    out.push_str(&" ".repeat(indent));
                }
                out.push_str(&scalar_key(k));
                out.push(':');
                write_child(out, val, indent);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for item in items {
                out.push_str(&" ".repeat(indent));
                out.push_str("- ");
                match item {
                    Value::Object(m) if !m.is_empty() => write_value(out, item, indent + 2, true),
                    Value::Array(a) if !a.is_empty() => {
                        out.push('\n');
                        write_value(out, item, indent + 2, false);
                    }
                    _ => {
                        out.push_str(&scalar(item));
                        out.push('\n');
                    }
                }
            }
        }
        _ => {
            out.push_str(&scalar(v));
            out.push('\n');
        }
    }
}

fn write_child(out: &mut String, v: &Value, indent: usize) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            out.push('\n');
            write_value(out, v, indent + 2, false);
        }
        Value::Array(a) if !a.is_empty() => {
            out.push('\n');
            write_value(out, v, indent, false);
        }
        _ => {
            out.push(' ');
            out.push_str(&scalar(v));
            out.push('\n');
        }
    }
}

fn scalar_key(k: &str) -> String {
    if needs_quotes(k) {
        json_string(k)
    } else {
        k.to_string()
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) if needs_quotes(s) => json_string(s),
        Value::String(s) => s.clone(),
        Value::Array(_) => "[]".into(),
        Value::Object(_) => "{}".into(),
    }
}

fn json_string(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// Whether a plain YAML scalar would read back as something else.
fn needs_quotes(s: &str) -> bool {
    s.is_empty()
        || skiff_api::yaml::plain_scalar(s) != skiff_api::yaml::Plain::Str
        || s.starts_with(|c: char| " -?:,[]{}#&*!|>'\"%@`".contains(c))
        || s.ends_with(' ')
        || s.contains(": ")
        || s.contains(" #")
        || s.contains('\n')
        || s.chars().any(|c| c.is_control())
        || matches!(
            s,
            "yes" | "no" | "on" | "off" | "y" | "n" | "Yes" | "No" | "On" | "Off"
        )
}

/// Left-aligned columns, two spaces apart.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, cell)| format!("{cell:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// A unified-style line diff (`-` old, `+` new, ` ` same); empty when equal.
pub fn diff_lines(old: &str, new: &str) -> Vec<String> {
    let (a, b): (Vec<&str>, Vec<&str>) = (old.lines().collect(), new.lines().collect());
    if a == b {
        return Vec::new();
    }
    // Longest common subsequence table; manifests are small.
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push(format!(" {}", a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push(format!("-{}", a[i]));
            i += 1;
        } else {
            out.push(format!("+{}", b[j]));
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_reads_back_as_the_same_value() {
        let v = serde_json::json!({
            "apiVersion": "skiff.dev/v1",
            "metadata": {"name": "a", "labels": {"version": "1.0", "on": "yes", "empty": ""}},
            "spec": {"ports": [{"name": "http", "port": 80}], "args": ["--x", "a: b", "# not a comment", "true"], "none": null, "list": [], "map": {},
                     "nested": [[1, 2], {"k": [3]}], "text": "line1\nline2"}
        });
        let yaml = to_yaml(&v);
        let back = skiff_api::yaml::parse(&yaml, skiff_api::yaml::Limits::default()).unwrap();
        assert_eq!(back[0].to_json(), v, "{yaml}");
    }

    #[test]
    fn diffs_lines() {
        assert!(diff_lines("a\nb\n", "a\nb\n").is_empty());
        assert_eq!(
            diff_lines("a\nb\nc\n", "a\nx\nc\n"),
            [" a", "-b", "+x", " c"]
        );
    }

    #[test]
    fn aligns_tables() {
        let t = table(&[
            vec!["NAME".into(), "MODE".into()],
            vec!["checkout".into(), "enforce".into()],
        ]);
        assert_eq!(t, "NAME      MODE\ncheckout  enforce\n");
    }
}
