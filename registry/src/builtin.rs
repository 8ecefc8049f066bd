//! The built-in registry: a folder in any object store (or the local file
//! system) holding, per model,
//!
//! ```text
//! <model>/claims/<N>          the job that took version N (written once)
//! <model>/<N>/...             the version's files
//! <model>/<N>/version.json    written last: the version exists once it does
//! <model>/aliases/<alias>     the version an alias points at
//! <model>/index.json          every version and alias, rebuilt after a change
//! ```
//!
//! Version numbers are taken with a create-if-absent write of the claim, so
//! two jobs never get the same number; a job that finds its own claim (a
//! retried hand-off) finishes that version instead of taking another.
//! Versions never change once `version.json` is written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use flotilla_storage::Storage;
use serde::{Deserialize, Serialize};

use crate::{Catalog, ModelSummary, Registered, RegistryError, Selector, VersionInfo};

pub const VERSION_FILE: &str = "version.json";
pub const INDEX_FILE: &str = "index.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// `<model>/<N>/version.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub model: String,
    pub version: u64,
    pub job_id: String,
    /// The job's unique id (job ids repeat across coordinators).
    #[serde(default)]
    pub job_uid: String,
    pub created_ms: i64,
    pub files: Vec<FileEntry>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Index {
    model: String,
    versions: Vec<IndexEntry>,
    aliases: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct IndexEntry {
    version: u64,
    job_id: String,
    created_ms: i64,
}

/// A model version to write: its files by name, and what describes it.
pub struct NewVersion<'a> {
    pub model: &'a str,
    pub job_id: &'a str,
    /// Unique per job, whichever coordinator ran it: what a claim names.
    pub job_uid: &'a str,
    pub created_ms: i64,
    pub files: Vec<(String, Vec<u8>)>,
    pub tags: &'a BTreeMap<String, String>,
    pub alias: Option<&'a str>,
}

pub struct Builtin {
    root: Storage,
}

impl Builtin {
    /// Opens the registry at `url` (absolute path, `file://`, `s3://`, ...).
    pub fn open(url: &str) -> Result<Builtin, RegistryError> {
        Ok(Builtin { root: Storage::open(url)? })
    }

    pub fn url(&self) -> &str {
        self.root.url()
    }

    /// Registers `v` once per job: see the module's documentation.
    pub async fn register(&self, v: NewVersion<'_>) -> Result<Registered, RegistryError> {
        let model = self.root.child(v.model);
        let version = self.claim(&model, v.job_uid).await?;
        let dir = model.child(&version.to_string());
        let uri = dir.url().to_string();
        let done = Registered { model: v.model.to_string(), version, uri, run_id: String::new() };
        match read_json::<VersionRecord>(&dir, VERSION_FILE).await? {
            Some(rec) if rec.job_uid == v.job_uid => {
                tracing::info!(
                    model = v.model,
                    version,
                    job = v.job_id,
                    "version already written by an earlier attempt"
                );
            }
            Some(rec) => {
                return Err(RegistryError::Corrupt {
                    what: format!("{}/{VERSION_FILE}", dir.url()),
                    message: format!(
                        "claimed by job {} ({}) but written by job {} ({})",
                        v.job_id, v.job_uid, rec.job_id, rec.job_uid
                    ),
                });
            }
            None => {
                let mut files = Vec::with_capacity(v.files.len());
                for (name, bytes) in &v.files {
                    files.push(FileEntry {
                        name: name.clone(),
                        size: bytes.len() as u64,
                        sha256: crate::sha256_hex(bytes),
                    });
                    dir.put(name, bytes.clone()).await?;
                }
                let rec = VersionRecord {
                    model: v.model.to_string(),
                    version,
                    job_id: v.job_id.to_string(),
                    job_uid: v.job_uid.to_string(),
                    created_ms: v.created_ms,
                    files,
                    tags: v.tags.clone(),
                };
                dir.put(VERSION_FILE, serde_json::to_vec_pretty(&rec).expect("plain data serializes")).await?;
            }
        }
        if let Some(alias) = v.alias {
            model.child("aliases").put(alias, version.to_string().into_bytes()).await?;
        }
        self.write_index(v.model).await?;
        Ok(done)
    }

    /// The version this job (by its unique id) claimed before, or the next
    /// free one.
    async fn claim(&self, model: &Storage, job: &str) -> Result<u64, RegistryError> {
        let claims = model.child("claims");
        let mut highest = 0;
        for (name, _) in claims.files().await? {
            let Ok(n) = name.parse::<u64>() else { continue };
            highest = highest.max(n);
            if claims.get(&name).await? == job.as_bytes() {
                return Ok(n);
            }
        }
        let mut n = highest + 1;
        loop {
            if claims.put_new(&n.to_string(), job.as_bytes().to_vec()).await? {
                return Ok(n);
            }
            // Taken meanwhile: by an attempt of this very job, or another.
            if claims.get(&n.to_string()).await? == job.as_bytes() {
                return Ok(n);
            }
            n += 1;
        }
    }

    async fn records(&self, model: &str) -> Result<Vec<VersionRecord>, RegistryError> {
        let dir = self.root.child(model);
        let mut out = Vec::new();
        for folder in dir.folders().await? {
            if folder.parse::<u64>().is_err() {
                continue;
            }
            if let Some(rec) = read_json::<VersionRecord>(&dir.child(&folder), VERSION_FILE).await? {
                out.push(rec);
            }
        }
        out.sort_by_key(|r| r.version);
        Ok(out)
    }

    async fn aliases(&self, model: &str) -> Result<BTreeMap<String, u64>, RegistryError> {
        let dir = self.root.child(model).child("aliases");
        let mut out = BTreeMap::new();
        for (name, _) in dir.files().await? {
            let text = String::from_utf8_lossy(&dir.get(&name).await?).trim().to_string();
            let v = text.parse().map_err(|_| RegistryError::Corrupt {
                what: format!("{}/{name}", dir.url()),
                message: format!("expected a version number, found {text:?}"),
            })?;
            out.insert(name, v);
        }
        Ok(out)
    }

    async fn write_index(&self, model: &str) -> Result<(), RegistryError> {
        let versions = self
            .records(model)
            .await?
            .into_iter()
            .map(|r| IndexEntry { version: r.version, job_id: r.job_id, created_ms: r.created_ms })
            .collect();
        let index = Index { model: model.to_string(), versions, aliases: self.aliases(model).await? };
        self.root
            .child(model)
            .put(INDEX_FILE, serde_json::to_vec_pretty(&index).expect("plain data serializes"))
            .await?;
        Ok(())
    }

    fn info(&self, rec: VersionRecord, aliases: &BTreeMap<String, u64>) -> VersionInfo {
        VersionInfo {
            aliases: aliases.iter().filter(|(_, v)| **v == rec.version).map(|(a, _)| a.clone()).collect(),
            uri: self.root.child(&rec.model).child(&rec.version.to_string()).url().to_string(),
            model: rec.model,
            version: rec.version,
            job_id: rec.job_id,
            created_ms: rec.created_ms,
            run_id: String::new(),
            tags: rec.tags,
        }
    }
}

#[async_trait]
impl Catalog for Builtin {
    async fn models(&self) -> Result<Vec<ModelSummary>, RegistryError> {
        let mut out = Vec::new();
        let mut names = self.root.folders().await?;
        names.sort();
        for name in names {
            let records = self.records(&name).await?;
            let Some(latest) = records.last() else { continue };
            out.push(ModelSummary {
                latest_version: latest.version,
                versions: records.len(),
                aliases: self.aliases(&name).await?,
                name,
            });
        }
        Ok(out)
    }

    async fn versions(&self, model: &str) -> Result<Vec<VersionInfo>, RegistryError> {
        let aliases = self.aliases(model).await?;
        Ok(self.records(model).await?.into_iter().map(|r| self.info(r, &aliases)).collect())
    }

    async fn resolve(&self, model: &str, sel: &Selector) -> Result<VersionInfo, RegistryError> {
        let aliases = self.aliases(model).await?;
        let records = self.records(model).await?;
        let missing = |what: String| RegistryError::NotFound(format!("{what} in the registry at {}", self.root.url()));
        let rec = match sel {
            Selector::Latest => records.into_iter().last().ok_or_else(|| missing(format!("no model {model:?}")))?,
            Selector::Version(n) => records
                .into_iter()
                .find(|r| r.version == *n)
                .ok_or_else(|| missing(format!("no version {n} of model {model:?}")))?,
            Selector::Alias(a) => {
                let n = aliases.get(a).ok_or_else(|| missing(format!("no alias {a:?} on model {model:?}")))?;
                records
                    .into_iter()
                    .find(|r| r.version == *n)
                    .ok_or_else(|| missing(format!("alias {a:?} names version {n}, which is not")))?
            }
        };
        Ok(self.info(rec, &aliases))
    }

    async fn download(&self, v: &VersionInfo, dir: &Path) -> Result<Vec<PathBuf>, RegistryError> {
        let folder = self.root.child(&v.model).child(&v.version.to_string());
        let rec = read_json::<VersionRecord>(&folder, VERSION_FILE)
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("{}/{VERSION_FILE}", folder.url())))?;
        std::fs::create_dir_all(dir).map_err(|e| RegistryError::Refused(format!("create {}: {e}", dir.display())))?;
        let mut out = Vec::new();
        for f in &rec.files {
            let bytes = folder.get(&f.name).await?;
            if crate::sha256_hex(&bytes) != f.sha256 {
                return Err(RegistryError::Corrupt {
                    what: format!("{}/{}", folder.url(), f.name),
                    message: "its SHA-256 does not match version.json".into(),
                });
            }
            let path = dir.join(&f.name);
            std::fs::write(&path, &bytes)
                .map_err(|e| RegistryError::Refused(format!("write {}: {e}", path.display())))?;
            out.push(path);
        }
        Ok(out)
    }
}

/// Reads and parses `name` in `dir`; `None` if it does not exist.
async fn read_json<T: serde::de::DeserializeOwned>(dir: &Storage, name: &str) -> Result<Option<T>, RegistryError> {
    match dir.get(name).await {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| RegistryError::Corrupt { what: format!("{}/{name}", dir.url()), message: e.to_string() }),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_version<'a>(job: &'a str, tags: &'a BTreeMap<String, String>, weights: &[u8]) -> NewVersion<'a> {
        NewVersion {
            model: "digits",
            job_id: job,
            job_uid: job,
            created_ms: 1,
            files: vec![("model.safetensors".into(), weights.to_vec()), ("job.yaml".into(), b"name: x\n".to_vec())],
            tags,
            alias: Some("candidate"),
        }
    }

    #[tokio::test]
    async fn versions_are_numbered_once_per_job_and_never_rewritten() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Builtin::open(tmp.path().to_str().unwrap()).unwrap();
        let tags = BTreeMap::from([("team".to_string(), "vision".to_string())]);
        let a = reg.register(new_version("job-1", &tags, b"aaaa")).await.unwrap();
        assert_eq!(a.version, 1);
        // A retried hand-off of the same job: the same version, nothing rewritten.
        let again = reg.register(new_version("job-1", &tags, b"zzzz")).await.unwrap();
        assert_eq!(again, a);
        let b = reg.register(new_version("job-2", &tags, b"bbbb")).await.unwrap();
        assert_eq!(b.version, 2);

        let versions = reg.versions("digits").await.unwrap();
        assert_eq!(
            versions.iter().map(|v| (v.version, v.job_id.as_str())).collect::<Vec<_>>(),
            [(1, "job-1"), (2, "job-2")]
        );
        assert_eq!(versions[1].aliases, ["candidate"], "the alias moved to the newest version");
        let models = reg.models().await.unwrap();
        assert_eq!((models[0].name.as_str(), models[0].latest_version, models[0].versions), ("digits", 2, 2));

        let v1 = reg.resolve("digits", &Selector::Version(1)).await.unwrap();
        let out = tmp.path().join("out");
        let files = reg.download(&v1, &out).await.unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(std::fs::read(out.join("model.safetensors")).unwrap(), b"aaaa", "the first attempt's bytes");
        assert_eq!(reg.resolve("digits", &Selector::Alias("candidate".into())).await.unwrap().version, 2);
        assert!(matches!(reg.resolve("digits", &Selector::Version(9)).await, Err(RegistryError::NotFound(_))));
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(tmp.path().join("digits/index.json")).unwrap()).unwrap();
        assert_eq!(index["versions"].as_array().unwrap().len(), 2);
        assert_eq!(index["aliases"]["candidate"], 2);
    }

    #[tokio::test]
    async fn a_claim_left_by_a_crash_is_finished_by_the_retry() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Builtin::open(tmp.path().to_str().unwrap()).unwrap();
        // An attempt claimed version 1 and died before version.json.
        std::fs::create_dir_all(tmp.path().join("digits/claims")).unwrap();
        std::fs::write(tmp.path().join("digits/claims/1"), "job-1").unwrap();
        std::fs::create_dir_all(tmp.path().join("digits/1")).unwrap();
        assert!(reg.versions("digits").await.unwrap().is_empty(), "no version until version.json exists");
        let tags = BTreeMap::new();
        let done = reg.register(new_version("job-1", &tags, b"w")).await.unwrap();
        assert_eq!(done.version, 1);
        assert_eq!(reg.versions("digits").await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_tampered_file_fails_the_download() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Builtin::open(tmp.path().to_str().unwrap()).unwrap();
        let tags = BTreeMap::new();
        reg.register(new_version("job-1", &tags, b"good")).await.unwrap();
        std::fs::write(tmp.path().join("digits/1/model.safetensors"), "evil").unwrap();
        let v = reg.resolve("digits", &Selector::Latest).await.unwrap();
        let err = reg.download(&v, &tmp.path().join("out")).await.unwrap_err();
        assert!(err.to_string().contains("SHA-256"), "{err}");
    }
}
