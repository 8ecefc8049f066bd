//! Running a validated job elsewhere than `flotilla run`: the worker
//! manifests of a Kubernetes Indexed Job and the sbatch script of a Slurm
//! job, each a pure function from the job and its options to text (the CLI's
//! `flotilla k8s render` and `flotilla slurm render` print them), and the
//! hints a worker reads from the launcher that started it.

pub mod k8s;
#[cfg(test)]
mod k8s_tests;
pub mod launch_env;
pub mod slurm;
pub mod yaml;

use flotilla_jobspec::{DataSpec, DpSize, JobSpec};

/// Where the flotilla binary lives in the container images (`deploy/docker/`).
pub const IMAGE_BINARY: &str = "/usr/local/bin/flotilla";

/// Exit code of `flotilla worker --submit` when the worker left its job on a
/// preemption notice before the job ended (EX_TEMPFAIL: run it again).
pub const EXIT_PREEMPTED: i32 = 75;

/// Options that cannot be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("{option} {value:?}: {why}")]
    BadOption { option: &'static str, value: String, why: String },
}

fn bad(option: &'static str, value: &str, why: impl Into<String>) -> RenderError {
    RenderError::BadOption { option, value: value.to_string(), why: why.into() }
}

/// How many workers a job is rendered with: its fixed data-parallel size,
/// else `workers.max`.
pub fn world_size(spec: &JobSpec) -> usize {
    match spec.parallelism.dp {
        DpSize::Fixed(n) => n,
        DpSize::Auto => spec.workers.max,
    }
}

/// Whether `url` names an object store rather than a path on a disk.
pub fn is_object_store(url: &str) -> bool {
    ["s3://", "gs://", "az://"].iter().any(|p| url.starts_with(p))
}

/// The job's data files (or patterns, or URLs), if it reads any.
pub fn data_paths(spec: &JobSpec) -> Vec<&str> {
    match &spec.data {
        DataSpec::Synthetic { .. } => Vec::new(),
        DataSpec::Features { path } | DataSpec::Text { path, .. } => vec![path],
        DataSpec::Tokens { path, .. } => path.iter().map(String::as_str).collect(),
    }
}

/// A DNS label (RFC 1123): what Kubernetes names and namespaces must be.
pub fn is_dns_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Quotes `s` for a POSIX shell when it needs it.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("configs/quickstart.yaml"), "configs/quickstart.yaml");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn dns_labels() {
        assert!(is_dns_label("flotilla-quickstart", 63));
        for bad in ["", "-a", "a-", "A", "a_b", &"a".repeat(64)] {
            assert!(!is_dns_label(bad, 63), "{bad}");
        }
    }
}
