//! `registry`: where a finished job's model is handed over (an MLflow
//! tracking server or flotilla's built-in registry in any object store).

use serde_saphyr::Spanned;

use super::Ctx;
use crate::error::SpecError;
use crate::paths::classify_checkpoint_url;
use crate::raw::{RawRegistry, RegistryKind as RawKind};
use crate::{RegistryKind, RegistrySpec};

/// Longest registered model name.
const MODEL_NAME_MAX: usize = 128;
/// Tag keys that flotilla sets itself start with this.
pub const RESERVED_TAG_PREFIX: &str = "flotilla.";

pub(crate) fn registry(cx: &Ctx, raw: &Spanned<RawRegistry>, job_name: &str) -> Result<RegistrySpec, SpecError> {
    let r = &raw.value;
    let kind = match r.kind.value {
        RawKind::Mlflow => RegistryKind::Mlflow,
        RawKind::Builtin => RegistryKind::Builtin,
    };
    let Some(url) = &r.url else {
        return Err(cx.missing("registry", raw, "url"));
    };
    match kind {
        RegistryKind::Mlflow => {
            let rest = url.value.strip_prefix("http://").or_else(|| url.value.strip_prefix("https://"));
            if rest.is_none_or(|h| h.split('/').next().unwrap_or("").is_empty()) {
                return Err(cx.err(
                    "registry.url",
                    url,
                    format!(
                        "an MLflow tracking server is reached over HTTP: write `http://host:port`, found {:?}",
                        url.value
                    ),
                ));
            }
        }
        RegistryKind::Builtin => {
            classify_checkpoint_url(&url.value).map_err(|m| cx.err("registry.url", url, m))?;
        }
    }
    let model = match &r.model {
        None => job_name.to_string(),
        Some(m) => {
            model_name(&m.value).map_err(|p| cx.err("registry.model", m, p))?;
            m.value.clone()
        }
    };
    let experiment = match (&r.experiment, kind) {
        (Some(e), RegistryKind::Builtin) => {
            return Err(cx.err("registry.experiment", e, "only an MLflow registry (kind: mlflow) has experiments"));
        }
        (Some(e), RegistryKind::Mlflow) => {
            if e.value.trim().is_empty() || e.value.chars().count() > 256 {
                return Err(cx.err("registry.experiment", e, "must be 1 to 256 characters, not blank"));
            }
            e.value.clone()
        }
        (None, RegistryKind::Mlflow) => job_name.to_string(),
        (None, RegistryKind::Builtin) => String::new(),
    };
    let alias = match &r.alias {
        None => None,
        Some(a) => {
            alias(&a.value).map_err(|p| cx.err("registry.alias", a, p))?;
            Some(a.value.clone())
        }
    };
    let mut tags = std::collections::BTreeMap::new();
    if let Some(t) = &r.tags {
        for (key, value) in &t.value {
            let path = format!("registry.tags.{key}");
            let bad_key = key.is_empty()
                || key.len() > 250
                || !key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/' | ' '));
            if bad_key {
                return Err(cx.err(
                    &path,
                    value,
                    "a tag key is 1 to 250 characters: letters, digits, `_`, `-`, `.`, `/` and spaces",
                ));
            }
            if key.starts_with(RESERVED_TAG_PREFIX) {
                return Err(cx.err(
                    &path,
                    value,
                    format!("tag keys starting with `{RESERVED_TAG_PREFIX}` are set by flotilla"),
                ));
            }
            if value.value.chars().count() > 5000 {
                return Err(cx.err(&path, value, "a tag value is at most 5000 characters"));
            }
            tags.insert(key.clone(), value.value.clone());
        }
    }
    Ok(RegistrySpec { kind, url: url.value.clone(), model, experiment, alias, tags })
}

/// `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`: a name that is also a folder name.
pub fn model_name(s: &str) -> Result<(), String> {
    let first_ok = s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if first_ok && rest_ok && s.len() <= MODEL_NAME_MAX {
        Ok(())
    } else {
        Err(format!(
            "a model name starts with a letter or digit and holds up to {MODEL_NAME_MAX} letters, digits, `.`, `_` \
             and `-`; found {s:?}"
        ))
    }
}

/// `[a-z][a-z0-9_-]{0,62}`, not `latest` and not `v<digits>` (MLflow keeps
/// both for itself), so that `NAME@X` reads as a version when X is a number
/// and as an alias otherwise.
pub fn alias(s: &str) -> Result<(), String> {
    let shape = s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'));
    let reserved = s == "latest" || (s.len() > 1 && s.starts_with('v') && s[1..].chars().all(|c| c.is_ascii_digit()));
    if !shape {
        Err(format!("an alias starts with a lowercase letter and holds up to 63 lowercase letters, digits, `_` and `-`; found {s:?}"))
    } else if reserved {
        Err(format!("{s:?} is reserved by MLflow (`latest` and `v<number>`); choose another alias"))
    } else {
        Ok(())
    }
}
