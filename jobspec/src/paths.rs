//! Checkpoint URL forms and [`JobSpec::resolve_paths`].
//!
//! Job files name files relative to themselves; the runtime wants absolute
//! paths. This module owns both the URL classification used by validation and
//! the rewrite done once the job file's directory is known.

use std::path::{Path, PathBuf};

use crate::{defaults, DataSpec, JobSpec};

/// Where `checkpoint.url` points, once classified.
#[derive(Debug, PartialEq)]
pub(crate) enum CheckpointTarget<'a> {
    /// A plain filesystem path, relative or absolute.
    Path(&'a str),
    /// `file:///abs/path`: the absolute path after `file://`.
    FileUrl(&'a str),
    /// An object store: `s3://bucket/prefix`, `gs://bucket/prefix`,
    /// `az://container/prefix`.
    ObjectStore,
}

/// Object-store schemes, reached through one crate.
const OBJECT_STORE_SCHEMES: [&str; 3] = ["s3", "gs", "az"];

/// Why a path or URL a job file names is not accepted regardless of its
/// form: too long, a NUL byte, or a `..` segment (which would let it escape
/// the folder it is resolved in; write the absolute path instead).
pub(crate) fn path_problem(path: &str) -> Option<String> {
    if path.len() > defaults::PATH_MAX_LEN {
        return Some(format!("is longer than {} bytes ({} bytes)", defaults::PATH_MAX_LEN, path.len()));
    }
    if path.contains('\0') {
        return Some("holds a NUL byte".into());
    }
    if path.split(['/', '\\']).any(|segment| segment == "..") {
        let shown: String = path.chars().take(64).collect();
        return Some(format!("{shown:?} has a `..` segment; name the place without `..` (an absolute path is fine)"));
    }
    None
}

/// Classifies a checkpoint URL, or says (as a message) why it is not accepted.
pub(crate) fn classify_checkpoint_url(url: &str) -> Result<CheckpointTarget<'_>, String> {
    if url.is_empty() {
        return Err("must not be empty; use a path such as `runs` or `file:///abs/path`".into());
    }
    if let Some(problem) = path_problem(url) {
        return Err(problem);
    }
    let Some((scheme, rest)) = split_scheme(url) else {
        return Ok(CheckpointTarget::Path(url));
    };
    let lower = scheme.to_ascii_lowercase();
    if lower == "file" {
        if rest.is_empty() {
            return Err("`file://` needs a path, e.g. `file:///abs/path`".into());
        }
        if !rest.starts_with('/') {
            let host = rest.split('/').next().unwrap_or(rest);
            return Err(format!(
                "`{url}` names the host `{host}`; only local files are supported, \
                 write `file:///abs/path` (three slashes)"
            ));
        }
        return Ok(CheckpointTarget::FileUrl(rest));
    }
    if OBJECT_STORE_SCHEMES.contains(&lower.as_str()) {
        if scheme != lower {
            return Err(format!("write the scheme in lowercase: `{lower}://`"));
        }
        let bucket = rest.split('/').next().unwrap_or("");
        if bucket.is_empty() {
            return Err(format!("`{url}` needs a bucket, e.g. `{lower}://my-bucket/checkpoints`"));
        }
        return Ok(CheckpointTarget::ObjectStore);
    }
    Err(format!("unsupported URL scheme `{scheme}://`; use a path, file:///abs/path, s3://, gs:// or az://"))
}

/// Splits `scheme://rest` when `url` starts with a URL scheme (RFC 3986 letters).
fn split_scheme(url: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let mut chars = scheme.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    (first_ok && rest_ok).then_some((scheme, rest))
}

/// `base.join(path)` unless `path` is already absolute, with `.` segments and
/// doubled separators removed (`..` is kept: resolving it needs the filesystem).
fn absolutize(base: &Path, path: &str) -> String {
    let joined: PathBuf = base.join(path).components().collect();
    joined.to_string_lossy().into_owned()
}

impl JobSpec {
    /// Makes the relative paths of the spec absolute against `base` (usually
    /// the job file's directory, itself absolute).
    ///
    /// Rewrites the `path` of `features` and `text` data, the `tokenizer`
    /// of `text` data, a Llama's `model.from`, each entry of a `tokens`
    /// data `path` (like `checkpoint.url`: object-store URLs stay as they
    /// are), and
    /// `checkpoint.url`: `file:///abs/path` becomes `/abs/path`, a relative
    /// path is joined onto `base`. Afterwards `checkpoint.url` is an absolute
    /// filesystem path, or an object-store URL (`s3://`, `gs://`, `az://`,
    /// without a trailing slash). Calling it twice changes nothing
    /// more. Paths are taken literally: no `~` expansion, no percent-decoding.
    pub fn resolve_paths(&mut self, base: &Path) {
        let eval = self.eval.as_mut().map(|e| &mut e.data);
        for data in std::iter::once(&mut self.data).chain(eval) {
            match data {
                DataSpec::Synthetic { .. } => {}
                DataSpec::Features { path } => *path = absolutize(base, path),
                DataSpec::Text { path, tokenizer } => {
                    *path = absolutize(base, path);
                    if let Some(t) = tokenizer.as_mut() {
                        *t = absolutize(base, t);
                    }
                }
                DataSpec::Tokens { path, .. } => path.iter_mut().for_each(|p| resolve_location(p, base)),
            }
        }
        if let crate::ModelSpec::Llama(l) = &mut self.model {
            if let Some(from) = l.from.as_mut() {
                *from = absolutize(base, from);
            }
        }
        resolve_location(&mut self.checkpoint.url, base);
        if let Some(from) = self.checkpoint.resume_from.as_mut() {
            resolve_location(from, base);
        }
        if let Some(r) = self.registry.as_mut().filter(|r| r.kind == crate::RegistryKind::Builtin) {
            resolve_location(&mut r.url, base);
        }
        if let Some(dir) = self.metrics.tensorboard.as_mut() {
            resolve_location(dir, base);
        }
    }
}

/// A path or `file://` URL made absolute, an object-store URL trimmed.
fn resolve_location(url: &mut String, base: &Path) {
    let resolved = match classify_checkpoint_url(url) {
        Ok(CheckpointTarget::Path(p)) => absolutize(base, p),
        Ok(CheckpointTarget::FileUrl(p)) => absolutize(Path::new("/"), p),
        Ok(CheckpointTarget::ObjectStore) => url.trim_end_matches('/').to_string(),
        // Only reachable for a spec that skipped validation; leave it be.
        Err(_) => return,
    };
    *url = resolved;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_are_paths() {
        assert_eq!(classify_checkpoint_url("runs"), Ok(CheckpointTarget::Path("runs")));
        assert_eq!(classify_checkpoint_url("/data/ck"), Ok(CheckpointTarget::Path("/data/ck")));
        assert_eq!(classify_checkpoint_url("a:b/c"), Ok(CheckpointTarget::Path("a:b/c")));
        assert_eq!(classify_checkpoint_url("./x://y"), Ok(CheckpointTarget::Path("./x://y")));
    }

    #[test]
    fn file_urls_need_an_empty_host() {
        assert_eq!(classify_checkpoint_url("file:///ck"), Ok(CheckpointTarget::FileUrl("/ck")));
        assert_eq!(classify_checkpoint_url("FILE:///ck"), Ok(CheckpointTarget::FileUrl("/ck")));
        let err = classify_checkpoint_url("file://server/ck").unwrap_err();
        assert!(err.contains("`server`") && err.contains("file:///"), "{err}");
        assert!(classify_checkpoint_url("file://").is_err());
    }

    #[test]
    fn object_store_urls_need_a_bucket_and_a_lowercase_scheme() {
        for url in ["s3://b/k", "gs://b", "az://c/p"] {
            assert_eq!(classify_checkpoint_url(url), Ok(CheckpointTarget::ObjectStore), "{url}");
        }
        assert!(classify_checkpoint_url("s3://").unwrap_err().contains("needs a bucket"));
        assert!(classify_checkpoint_url("GS://b").unwrap_err().contains("lowercase"));
        let err = classify_checkpoint_url("http://x/y").unwrap_err();
        assert!(err.contains("unsupported URL scheme `http://`"), "{err}");
        assert!(classify_checkpoint_url("").is_err());
    }

    #[test]
    fn object_store_urls_are_kept_as_urls() {
        let mut spec = crate::parse(
            "name: s\nmodel: {kind: mlp, layers: [2, 2]}\ndata: {kind: synthetic}\ntrain: {steps: 1, global_batch: 1}\ncheckpoint: {url: 's3://bucket/runs/'}\n",
            "s.yaml",
        )
        .unwrap();
        spec.resolve_paths(Path::new("/jobs"));
        assert_eq!(spec.checkpoint.url, "s3://bucket/runs");
    }

    #[test]
    fn dot_dot_segments_and_long_paths_are_refused() {
        for bad in ["../x", "runs/../../etc", "file:///a/../b", "s3://b/../c", "a\\..\\b"] {
            let err = classify_checkpoint_url(bad).unwrap_err();
            assert!(err.contains("`..`"), "{bad}: {err}");
        }
        assert!(classify_checkpoint_url("runs/..x/y").is_ok());
        let long = "a/".repeat(defaults::PATH_MAX_LEN);
        assert!(classify_checkpoint_url(&long).unwrap_err().contains("longer than"));
    }

    #[test]
    fn absolutize_joins_and_tidies() {
        let base = Path::new("/jobs/a");
        assert_eq!(absolutize(base, "runs"), "/jobs/a/runs");
        assert_eq!(absolutize(base, "./data//x.bin"), "/jobs/a/data/x.bin");
        assert_eq!(absolutize(base, "/abs/x"), "/abs/x");
        assert_eq!(absolutize(base, "../x"), "/jobs/a/../x");
    }
}
