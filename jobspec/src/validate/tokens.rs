//! `data.kind: tokens`: the shards a corpus is made of (`path`, one entry
//! or a list, each a file, a pattern or an object-store URL), the width of a
//! token id (`dtype`) and the shard layout (`format`).

use serde_saphyr::{Location, Spanned};

use super::Ctx;
use crate::error::SpecError;
use crate::paths::{classify_checkpoint_url, path_problem};
use crate::raw::{PathList, RawData};
use crate::{defaults, glob, DataSpec, TokenDtype, TokenFormat};

pub(super) fn tokens(cx: &Ctx, at: &str, raw: &Spanned<RawData>) -> Result<DataSpec, SpecError> {
    let d = &raw.value;
    let field = format!("{at}.path");
    let given = d.path.as_ref().ok_or_else(|| cx.missing(at, raw, "path"))?;
    let entries: Vec<(&str, Location)> = match &given.value {
        PathList::One(p) => vec![(p.as_str(), given.referenced)],
        PathList::Many(list) if list.is_empty() => {
            return Err(cx.err(&field, given, "lists no shard; name at least one file or pattern"));
        }
        PathList::Many(list) => list.iter().map(|p| (p.value.as_str(), p.referenced)).collect(),
    };
    let listed = matches!(given.value, PathList::Many(_));
    let mut paths = Vec::with_capacity(entries.len());
    for (i, (p, place)) in entries.into_iter().enumerate() {
        if let Some(m) = entry_problem(p) {
            let here = if listed { format!("{field}[{i}]") } else { field.clone() };
            return Err(cx.err_at(&here, place, m));
        }
        paths.push(p.to_string());
    }
    let format = d.format.as_ref().map_or(defaults::TOKEN_FORMAT, |s| s.value);
    let dtype = match (format, &d.dtype) {
        (TokenFormat::Nanogpt, Some(t)) if t.value != TokenDtype::U16 => {
            return Err(cx.err(
                &format!("{at}.dtype"),
                t,
                "`format: nanogpt` shards hold u16 token ids (header version 1); leave `dtype` out",
            ));
        }
        (TokenFormat::Nanogpt, _) => TokenDtype::U16,
        (TokenFormat::Raw, t) => t.as_ref().map_or(defaults::TOKEN_DTYPE, |s| s.value),
    };
    Ok(DataSpec::Tokens { path: paths, dtype, format })
}

/// Why one entry of `path` is refused: empty, a `..` segment, an unknown
/// URL scheme, or a wildcard outside the file name.
fn entry_problem(p: &str) -> Option<String> {
    if p.is_empty() {
        return Some("must not be empty".into());
    }
    if let Some(m) = path_problem(p) {
        return Some(m);
    }
    if let Err(m) = classify_checkpoint_url(p) {
        return Some(m);
    }
    if p.ends_with('/') {
        return Some("names a folder; name its files, e.g. `corpus/*.bin`".into());
    }
    glob::pattern_problem(p)
}
