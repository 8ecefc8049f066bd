//! A small ordered YAML tree and its printer, for the manifests the render
//! functions build: keys keep the order they were written in, strings are
//! quoted whenever YAML could read them as something else, and a block
//! scalar keeps a file's text (comments included) as it was.

use std::fmt::Write;

/// One YAML value.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    Str(String),
    Int(i64),
    Bool(bool),
    /// A literal block scalar (`|`): the text exactly, line breaks included.
    Block(String),
    List(Vec<Node>),
    Map(Vec<(String, Node)>),
}

impl From<&str> for Node {
    fn from(s: &str) -> Node {
        Node::Str(s.to_string())
    }
}
impl From<String> for Node {
    fn from(s: String) -> Node {
        Node::Str(s)
    }
}
impl From<&String> for Node {
    fn from(s: &String) -> Node {
        Node::Str(s.clone())
    }
}
impl From<i64> for Node {
    fn from(v: i64) -> Node {
        Node::Int(v)
    }
}
impl From<u64> for Node {
    fn from(v: u64) -> Node {
        Node::Int(v as i64)
    }
}
impl From<u32> for Node {
    fn from(v: u32) -> Node {
        Node::Int(i64::from(v))
    }
}
impl From<usize> for Node {
    fn from(v: usize) -> Node {
        Node::Int(v as i64)
    }
}
impl From<bool> for Node {
    fn from(v: bool) -> Node {
        Node::Bool(v)
    }
}
impl From<Vec<Node>> for Node {
    fn from(v: Vec<Node>) -> Node {
        Node::List(v)
    }
}

/// A map from `(key, value)` pairs, in order.
pub fn map<const N: usize>(entries: [(&str, Node); N]) -> Node {
    Node::Map(entries.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

/// A list of strings.
pub fn strs<S: AsRef<str>>(items: &[S]) -> Node {
    Node::List(items.iter().map(|s| Node::Str(s.as_ref().to_string())).collect())
}

impl Node {
    /// Adds `key: value` to a map (no-op on other nodes).
    pub fn push(&mut self, key: &str, value: Node) {
        if let Node::Map(entries) = self {
            entries.push((key.to_string(), value));
        }
    }
}

/// Several documents, separated by `---`.
pub fn documents(docs: &[Node]) -> String {
    let mut out = String::new();
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&to_string(d));
    }
    out
}

/// One document.
pub fn to_string(node: &Node) -> String {
    let mut out = String::new();
    match node {
        Node::Map(entries) if !entries.is_empty() => write_map(&mut out, entries, 0),
        Node::List(items) if !items.is_empty() => write_list(&mut out, items, 0),
        other => {
            out.push_str(&inline(other, 0));
            out.push('\n');
        }
    }
    out
}

fn write_map(out: &mut String, entries: &[(String, Node)], indent: usize) {
    for (i, (k, v)) in entries.iter().enumerate() {
        // The first key of a map inside a list sits after its `- `.
        if i > 0 || !out.ends_with("- ") {
            out.push_str(&" ".repeat(indent));
        }
        out.push_str(&scalar(k));
        out.push(':');
        write_value(out, v, indent);
    }
}

fn write_list(out: &mut String, items: &[Node], indent: usize) {
    for item in items {
        out.push_str(&" ".repeat(indent));
        out.push_str("- ");
        match item {
            Node::Map(entries) if !entries.is_empty() => write_map(out, entries, indent + 2),
            Node::List(inner) if !inner.is_empty() => {
                out.push('\n');
                write_list(out, inner, indent + 2);
            }
            other => {
                out.push_str(&inline(other, indent + 2));
                out.push('\n');
            }
        }
    }
}

/// Writes what follows `key:`.
fn write_value(out: &mut String, v: &Node, indent: usize) {
    match v {
        Node::Map(entries) if !entries.is_empty() => {
            out.push('\n');
            write_map(out, entries, indent + 2);
        }
        Node::List(items) if !items.is_empty() => {
            out.push('\n');
            write_list(out, items, indent + 2);
        }
        other => {
            out.push(' ');
            out.push_str(&inline(other, indent + 2));
            out.push('\n');
        }
    }
}

/// A value written on the current line (a block scalar continues below it).
fn inline(v: &Node, indent: usize) -> String {
    match v {
        Node::Str(s) => scalar(s),
        Node::Int(i) => i.to_string(),
        Node::Bool(b) => b.to_string(),
        Node::Map(_) => "{}".into(),
        Node::List(_) => "[]".into(),
        Node::Block(text) => block(text, indent),
    }
}

fn block(text: &str, indent: usize) -> String {
    if text.is_empty() {
        return "\"\"".into();
    }
    let body = text.strip_suffix('\n').unwrap_or(text);
    // Keep: the text's final line breaks exactly; strip: it has none.
    let chomp = if !text.ends_with('\n') {
        "-"
    } else if body.ends_with('\n') || body.is_empty() {
        "+"
    } else {
        ""
    };
    // An explicit indentation (the content sits two columns in from its
    // key or `- `) when the first line starts with a space.
    let width = if body.starts_with(' ') { "2" } else { "" };
    let mut out = format!("|{width}{chomp}\n");
    let pad = " ".repeat(indent.max(1));
    for (i, line) in body.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        if !line.is_empty() {
            out.push_str(&pad);
            out.push_str(line);
        }
    }
    out
}

/// A string as a plain scalar when YAML reads it back as the same string,
/// else double-quoted with JSON escapes (a subset of YAML's).
pub fn scalar(s: &str) -> String {
    let plain_chars = s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=@+".contains(c));
    let lower = s.to_ascii_lowercase();
    let special_word = matches!(
        lower.as_str(),
        "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n" | "null" | "~" | ".inf" | "-.inf" | ".nan"
    );
    let number_like = s.starts_with(|c: char| c.is_ascii_digit() || c == '.' || c == '-' || c == '+')
        && s.chars().any(|c| c.is_ascii_digit());
    if !s.is_empty() && plain_chars && !special_word && !number_like && !s.starts_with(['-', '.', '@', '=']) {
        return s.to_string();
    }
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_maps_and_lists() {
        let doc = map([
            ("kind", "Job".into()),
            ("spec", map([("completions", 2u32.into()), ("args", strs(&["worker", "--x"]))])),
            ("containers", Node::List(vec![map([("name", "a".into()), ("ports", Node::List(vec![]))])])),
        ]);
        assert_eq!(
            to_string(&doc),
            "kind: Job\nspec:\n  completions: 2\n  args:\n    - worker\n    - \"--x\"\ncontainers:\n  - name: a\n    ports: []\n"
        );
    }

    #[test]
    fn strings_that_read_as_other_types_are_quoted() {
        for s in ["true", "no", "1", "1.5", "-3", "", "a: b", "#x", "x y", "1e3", "null", "~", "@x", "*"] {
            assert!(scalar(s).starts_with('"'), "{s}");
        }
        for s in ["abc", "flotilla-worker", "nvidia.com/gpu", "eks.amazonaws.com/capacityType", "v1"] {
            assert_eq!(scalar(s), s);
        }
        assert_eq!(scalar("a\"b\\c\nd"), r#""a\"b\\c\nd""#);
    }

    #[test]
    fn block_scalars_keep_the_text() {
        let doc = map([("data", map([("job.yaml", Node::Block("# c\nname: x\n\nmodel: {}\n".into()))]))]);
        assert_eq!(to_string(&doc), "data:\n  job.yaml: |\n    # c\n    name: x\n\n    model: {}\n");
        let no_newline = map([("k", Node::Block("a\nb".into()))]);
        assert_eq!(to_string(&no_newline), "k: |-\n  a\n  b\n");
        let two_newlines = map([("k", Node::Block("a\n\n".into()))]);
        assert_eq!(to_string(&two_newlines), "k: |+\n  a\n\n");
        let leading_space = map([("k", Node::Block("  a\nb\n".into()))]);
        assert_eq!(to_string(&leading_space), "k: |2\n    a\n  b\n");
    }

    #[test]
    fn documents_are_separated() {
        assert_eq!(documents(&[map([("a", 1u32.into())]), map([("b", 2u32.into())])]), "a: 1\n---\nb: 2\n");
    }
}
