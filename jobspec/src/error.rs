//! `SpecError`, and its making from YAML/serde errors and from spans.
//!
//! Every error names the dotted field path and the 1-based line/column in
//! the job file. serde-saphyr knows the position of a YAML error but not its
//! field path; `serde_path_to_error` tracks the path, and this module merges
//! the two into one message written for the person editing the file.

use serde_path_to_error::Segment;
use serde_saphyr::{Error as YamlError, Location, MessageFormatter, UserMessageFormatter};

/// Why a job file was rejected, and where.
///
/// Displays as `origin:line:column: path: message`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{origin}:{line}:{column}: {path}: {message}")]
pub struct SpecError {
    /// The name the caller gave the source (usually its file path).
    pub origin: String,
    /// Dotted field path such as `train.optimizer.lr` or `model.layers[2]`;
    /// `<yaml>` when the document itself is at fault (syntax, empty, not a
    /// mapping).
    pub path: String,
    /// 1-based line of the offending value or key; 0 only when unknown.
    pub line: u64,
    /// 1-based column (in characters) of the offending value or key; 0 only when unknown.
    pub column: u64,
    /// What is wrong, and where it helps, what to write instead.
    pub message: String,
}

/// The path used when the whole document is at fault.
pub(crate) const DOCUMENT_PATH: &str = "<yaml>";

impl SpecError {
    pub(crate) fn new(origin: &str, path: impl Into<String>, at: Location, message: impl Into<String>) -> Self {
        SpecError {
            origin: origin.to_owned(),
            path: path.into(),
            line: at.line(),
            column: at.column(),
            message: message.into(),
        }
    }
}

impl SpecError {
    /// Moves the position from a mapping's first entry (where the parser
    /// puts it) to the key that holds the mapping, when the source shows that
    /// key plainly: for "missing field" errors, which name the parent.
    pub(crate) fn at_key_of(mut self, source: &str, path: &str) -> Self {
        let last = path.rsplit('.').next().unwrap_or(path);
        if let Some((line, column)) = key_position(source, self.line, self.column, last) {
            self.line = line;
            self.column = column;
        }
        self
    }
}

/// Where `key:` is written for a mapping that has an entry at
/// `line:column`: earlier on the same line (`key: {a: 1}`), or on the nearest
/// content line above that is indented less than the entry (block style).
fn key_position(source: &str, line: u64, column: u64, key: &str) -> Option<(u64, u64)> {
    let li = usize::try_from(line).ok()?.checked_sub(1)?;
    let col = usize::try_from(column).ok()?.checked_sub(1)?;
    let lines: Vec<&str> = source.lines().collect();
    let here = lines.get(li)?;
    let before: String = here.chars().take(col).collect();
    if let Some(c) = find_key(&before, key) {
        return Some((line, c + 1));
    }
    for (i, text) in lines.get(..li)?.iter().enumerate().rev() {
        let content = text.trim_start();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let indent = text.chars().count() - content.chars().count();
        if indent >= col {
            continue; // a sibling entry or its contents
        }
        let c = find_key(text, key)?;
        return Some((u64::try_from(i).ok()? + 1, c + 1));
    }
    None
}

/// The 0-based character column of `key` written as a mapping key in `text`.
fn find_key(text: &str, key: &str) -> Option<u64> {
    if key.is_empty() {
        return None;
    }
    let mut found = None;
    for (at, _) in text.match_indices(key) {
        let before_ok = text[..at].chars().next_back().is_none_or(|c| matches!(c, ' ' | '-' | '{' | ',' | '\t'));
        let after_ok = text[at + key.len()..].trim_start_matches(' ').starts_with(':');
        if before_ok && after_ok {
            found = Some(text[..at].chars().count());
        }
    }
    found.and_then(|c| u64::try_from(c).ok())
}

/// A field path as serde-saphyr plus `serde_path_to_error` report it, with
/// the `value` steps that `Spanned` adds removed.
pub(crate) fn path_segments(path: &serde_path_to_error::Path) -> Vec<String> {
    let mut out = Vec::new();
    for seg in path {
        match seg {
            Segment::Map { key } if key == "value" => {}
            Segment::Map { key } => out.push(key.clone()),
            Segment::Seq { index } => match out.last_mut() {
                Some(last) => last.push_str(&format!("[{index}]")),
                None => out.push(format!("[{index}]")),
            },
            Segment::Enum { variant } => out.push(variant.clone()),
            Segment::Unknown => {}
        }
    }
    out
}

/// Turns a serde-saphyr error into a `SpecError`, using the field path
/// `segments` tracked while deserialising.
pub(crate) fn from_yaml(err: &YamlError, mut segments: Vec<String>, source: &str, origin: &str) -> SpecError {
    let at = err.location().unwrap_or(Location::UNKNOWN);
    let inner = innermost(err);
    let found = || found_text(source, at);
    let named = |mut segments: Vec<String>, field: &str| {
        if segments.last().map(String::as_str) != Some(field) {
            segments.push(field.to_owned());
        }
        segments.join(".")
    };
    let (path, message) = match inner {
        YamlError::SerdeUnknownField { field, expected, .. } => {
            (named(segments, field), format!("unknown field `{field}`, expected one of {}", tick_list(expected)))
        }
        YamlError::SerdeMissingField { field, .. } => {
            // Named by the parent, at its key, or by the field itself when
            // the parent is the whole file.
            if segments.is_empty() {
                let mut e = SpecError::new(origin, *field, at, format!("missing field `{field}`"));
                if let Some((line, column)) = first_content(source) {
                    (e.line, e.column) = (line, column);
                }
                return e;
            }
            let path = segments.join(".");
            return SpecError::new(origin, path.clone(), at, format!("missing field `{field}`"))
                .at_key_of(source, &path);
        }
        YamlError::DuplicateMappingKey { key, .. } => match key {
            Some(key) => {
                if segments.last() == Some(key) {
                    segments.pop();
                }
                (named(segments, key), format!("duplicate key `{key}`"))
            }
            None => (segments.join("."), "duplicate key".to_owned()),
        },
        YamlError::SerdeUnknownVariant { variant, expected, .. } => {
            let what = segments.last().map_or("value", String::as_str);
            let what = what.split('[').next().unwrap_or(what);
            let msg = format!("unknown {what} `{variant}`, expected one of {}", tick_list(expected));
            (segments.join("."), msg)
        }
        YamlError::InvalidScalar { ty, .. } => {
            (segments.join("."), format!("expected {}, found {}", describe_type(ty), found()))
        }
        YamlError::SerdeInvalidType { unexpected, expected, .. } => {
            (segments.join("."), format!("expected {expected}, found {unexpected}"))
        }
        YamlError::SerdeInvalidValue { unexpected, expected, .. } => {
            (segments.join("."), format!("expected {expected}, found {unexpected}"))
        }
        YamlError::SerdeInvalidLength { len, expected, .. } => {
            (segments.join("."), format!("expected {expected}, found {len} items"))
        }
        YamlError::Unexpected { expected, .. } => {
            let expected = match *expected {
                "mapping start" => "a mapping of fields",
                "sequence start" => "a list",
                "string scalar" => "a string",
                other => other,
            };
            (segments.join("."), format!("expected {expected}, found {}", found_node(source, at)))
        }
        YamlError::NullIntoString { .. } => (segments.join("."), "expected a string, found null".to_owned()),
        YamlError::ExternalMessage { .. } | YamlError::IndentationError { .. } => {
            (String::new(), format!("invalid YAML: {}", UserMessageFormatter.format_message(inner)))
        }
        YamlError::Eof { .. } if has_no_content(source) => (String::new(), "the job file is empty".to_owned()),
        _ => (segments.join("."), UserMessageFormatter.format_message(inner).into_owned()),
    };
    let path = if path.is_empty() { DOCUMENT_PATH.to_owned() } else { path };
    SpecError::new(origin, path, at, message)
}

/// The error under any alias or snippet wrappers.
fn innermost(err: &YamlError) -> &YamlError {
    match err {
        YamlError::WithSnippet { error, .. } | YamlError::AliasError { error, .. } => innermost(error),
        other => other,
    }
}

/// `[a, b]` as "`a`, `b`".
fn tick_list(names: &[&str]) -> String {
    let ticked: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    ticked.join(", ")
}

/// How the parser's target type reads in a message.
fn describe_type(ty: &str) -> &str {
    match ty {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a non-negative integer",
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "an integer",
        "f32" | "f64" => "a number",
        "bool" => "`true` or `false`",
        "char" => "a single character",
        other => other,
    }
}

/// The source text at `at`, quoted, for "found ..." in messages.
fn found_text(source: &str, at: Location) -> String {
    const MAX: usize = 40;
    let span = at.span();
    // With a byte span, an empty one is an empty (null) value; without, the
    // value is taken to run from the column to the end of the line.
    let from_span = span.byte_offset().zip(span.byte_len()).map(|(off, len)| {
        let start = usize::try_from(off).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        source.get(start..end).filter(|s| !s.trim().is_empty())
    });
    let text = from_span.unwrap_or_else(|| {
        let line = source.lines().nth(usize::try_from(at.line()).ok()?.checked_sub(1)?)?;
        let col = usize::try_from(at.column()).ok()?.checked_sub(1)?;
        let (start, _) = line.char_indices().nth(col)?;
        let rest = line[start..].split(" #").next().unwrap_or("").trim();
        (!rest.is_empty()).then_some(rest)
    });
    match text {
        None => "nothing".to_owned(),
        Some(t) => {
            // A plain scalar may run over several lines (often a sign of
            // bad indentation): show it as YAML reads it, on one line.
            let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
            let shown: String = t.chars().take(MAX).collect();
            let more = if t.chars().nth(MAX).is_some() { "..." } else { "" };
            format!("`{shown}{more}`")
        }
    }
}

/// Like [`found_text`], but for a node that may be a list or a mapping,
/// whose span the parser leaves empty.
fn found_node(source: &str, at: Location) -> String {
    let text = found_text(source, at);
    if text != "nothing" {
        return text;
    }
    let first = usize::try_from(at.span().byte_offset().unwrap_or(u64::MAX))
        .ok()
        .and_then(|off| source.get(off..))
        .and_then(|rest| rest.chars().next());
    match first {
        Some('-' | '[') => "a list".to_owned(),
        Some('{') => "a mapping".to_owned(),
        _ => text,
    }
}

/// Line and column of the first thing in `source` that is not a comment.
fn first_content(source: &str) -> Option<(u64, u64)> {
    source.lines().enumerate().find_map(|(i, l)| {
        let t = l.trim_start();
        if t.is_empty() || t.starts_with('#') {
            return None;
        }
        let column = l.chars().count() - t.chars().count() + 1;
        Some((u64::try_from(i).ok()? + 1, u64::try_from(column).ok()?))
    })
}

/// Only blank lines and comments.
fn has_no_content(source: &str) -> bool {
    source.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#')
    })
}
