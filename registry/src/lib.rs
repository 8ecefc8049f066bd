//! Model registries: where a trained job's model goes so that a serving team
//! can find it, with its lineage. Two kinds: an MLflow tracking server
//! (through its REST API) and a built-in registry laid out in any object
//! store. [`Registrar`] is what the coordinator calls; [`Catalog`] is what
//! `flotilla models` reads.

pub mod builtin;
pub mod handoff;
pub mod mlflow;
pub mod record;

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use handoff::{HandoffRequest, Registries};
pub use record::{Lineage, MetricRecord};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Storage(#[from] flotilla_storage::StorageError),
    /// The registry could not be reached or answered with a server error:
    /// worth retrying.
    #[error("{0}")]
    Unavailable(String),
    /// The registry refused the request (bad name, missing permission, a
    /// server set up without an artifact proxy).
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{what}: {message}")]
    Corrupt { what: String, message: String },
}

/// What a hand-off registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    pub model: String,
    pub version: u64,
    /// The version's files: an MLflow source URI, or a folder URL.
    pub uri: String,
    /// The MLflow run ("" for the built-in registry).
    pub run_id: String,
}

/// One registered version, as `flotilla models show` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub model: String,
    pub version: u64,
    pub aliases: Vec<String>,
    /// The job that produced it.
    pub job_id: String,
    pub created_ms: i64,
    pub uri: String,
    pub run_id: String,
    pub tags: BTreeMap<String, String>,
}

/// One registered model, as `flotilla models list` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSummary {
    pub name: String,
    pub latest_version: u64,
    pub versions: usize,
    pub aliases: BTreeMap<String, u64>,
}

/// Which version of a model: `NAME`, `NAME@3`, `NAME@candidate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Latest,
    Version(u64),
    Alias(String),
}

/// Reads `NAME[@VERSION|@ALIAS]`.
pub fn parse_reference(s: &str) -> Result<(String, Selector), String> {
    let (name, sel) = match s.split_once('@') {
        None => (s, Selector::Latest),
        Some((name, v)) if !v.is_empty() && v.chars().all(|c| c.is_ascii_digit()) => {
            let n: u64 = v.parse().map_err(|_| format!("version {v:?} is too large"))?;
            if n == 0 {
                return Err("versions start at 1".into());
            }
            (name, Selector::Version(n))
        }
        Some((name, alias)) => {
            flotilla_jobspec::check_alias(alias)?;
            (name, Selector::Alias(alias.to_string()))
        }
    };
    flotilla_jobspec::check_model_name(name)?;
    Ok((name.to_string(), sel))
}

/// Hands trained models over; called by the coordinator's leader.
#[async_trait]
pub trait Registrar: Send + Sync + 'static {
    /// Registers the job's model. Idempotent per job: a repeat, even after
    /// a crash half-way, ends with the one version the first began.
    async fn hand_off(&self, req: &HandoffRequest) -> Result<Registered, RegistryError>;

    /// Logs metric points of a job still training (MLflow only); returns the
    /// tracking run, created if `run` is `None`. `Ok(None)` when the job's
    /// registry tracks nothing while training.
    async fn track(
        &self,
        job: &handoff::TrackedJob,
        run: Option<&str>,
        points: &[MetricRecord],
    ) -> Result<Option<String>, RegistryError>;
}

/// Reading a registry: `flotilla models list|show|download`.
#[async_trait]
pub trait Catalog: Send + Sync {
    async fn models(&self) -> Result<Vec<ModelSummary>, RegistryError>;
    async fn versions(&self, model: &str) -> Result<Vec<VersionInfo>, RegistryError>;
    async fn resolve(&self, model: &str, sel: &Selector) -> Result<VersionInfo, RegistryError>;
    /// Copies the version's files into `dir`; returns their paths.
    async fn download(&self, v: &VersionInfo, dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>, RegistryError>;
}

/// Opens a registry for reading from its URL: `http(s)://` is an MLflow
/// tracking server; a path, `file://`, `s3://`, `gs://` or `az://` is a
/// built-in registry.
pub fn open_catalog(url: &str) -> Result<Box<dyn Catalog>, RegistryError> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(Box::new(mlflow::Mlflow::new(url)?))
    } else {
        Ok(Box::new(builtin::Builtin::open(url)?))
    }
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        assert_eq!(parse_reference("digits").unwrap(), ("digits".into(), Selector::Latest));
        assert_eq!(parse_reference("digits@12").unwrap(), ("digits".into(), Selector::Version(12)));
        assert_eq!(
            parse_reference("digits@candidate").unwrap(),
            ("digits".into(), Selector::Alias("candidate".into()))
        );
        assert!(parse_reference("digits@0").is_err());
        assert!(parse_reference("digits@Prod").is_err());
        assert!(parse_reference("a/b@1").is_err());
    }
}
