//! An MLflow tracking server through its REST API (`/api/2.0/mlflow/...`):
//! experiments, runs, batched metrics, artifacts through the server's
//! artifact proxy (`/api/2.0/mlflow-artifacts/...`), registered models,
//! model versions, tags and aliases.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};

use crate::{Catalog, MetricRecord, ModelSummary, RegistryError, Selector, VersionInfo};

/// MLflow's limit on metrics in one `runs/log-batch` call.
pub const MAX_METRICS_PER_BATCH: usize = 1000;
/// MLflow's limit on params in one `runs/log-batch` call.
pub const MAX_PARAMS_PER_BATCH: usize = 100;
/// The tag that ties runs and model versions to the job that made them.
pub const JOB_TAG: &str = "flotilla.job_id";
/// The job's unique id: what a retried hand-off finds its run by.
pub const UID_TAG: &str = "flotilla.job_uid";
const ARTIFACT_SCHEME: &str = "mlflow-artifacts:/";

pub struct Mlflow {
    base: String,
    http: reqwest::Client,
}

/// A run's id and where its artifacts go.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub run_id: String,
    pub artifact_uri: String,
}

/// A registered model version.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelVersion {
    pub name: String,
    pub version: u64,
    pub source: String,
    pub run_id: String,
    pub created_ms: i64,
    pub tags: BTreeMap<String, String>,
    pub aliases: Vec<String>,
}

impl Mlflow {
    /// A client for the tracking server at `url` (`http://host:port`).
    pub fn new(url: &str) -> Result<Mlflow, RegistryError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(300))
            .build()
            .map_err(|e| RegistryError::Refused(format!("HTTP client: {e}")))?;
        Ok(Mlflow { base: url.trim_end_matches('/').to_string(), http })
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    async fn send(&self, what: &str, req: reqwest::RequestBuilder) -> Result<Value, RegistryError> {
        let resp = req
            .send()
            .await
            .map_err(|e| RegistryError::Unavailable(format!("MLflow at {}: {what}: {}", self.base, error_chain(&e))))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| {
            RegistryError::Unavailable(format!("MLflow at {}: {what}: read the answer: {e}", self.base))
        })?;
        if status.is_success() {
            return Ok(if body.is_empty() { json!({}) } else { serde_json::from_slice(&body).unwrap_or(json!({})) });
        }
        let parsed: Value = serde_json::from_slice(&body).unwrap_or(json!({}));
        let code = parsed["error_code"].as_str().unwrap_or("").to_string();
        let message = parsed["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned());
        let text = format!("MLflow at {}: {what}: {status} {code}: {message}", self.base);
        Err(if code == "RESOURCE_DOES_NOT_EXIST" || status == reqwest::StatusCode::NOT_FOUND {
            RegistryError::NotFound(text)
        } else if code == "RESOURCE_ALREADY_EXISTS" {
            RegistryError::Refused(format!("{ALREADY_EXISTS}{text}"))
        } else if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            RegistryError::Unavailable(text)
        } else {
            RegistryError::Refused(text)
        })
    }

    fn api(&self, path: &str) -> String {
        format!("{}/api/2.0/mlflow/{path}", self.base)
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, RegistryError> {
        self.send(path, self.http.get(self.api(path)).query(query)).await
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value, RegistryError> {
        self.send(path, self.http.post(self.api(path)).json(&body)).await
    }

    /// The experiment's id, creating it if needed.
    pub async fn experiment(&self, name: &str) -> Result<String, RegistryError> {
        match self.get("experiments/get-by-name", &[("experiment_name", name)]).await {
            Ok(v) => return Ok(str_field(&v["experiment"]["experiment_id"])),
            Err(RegistryError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        match self.post("experiments/create", json!({ "name": name })).await {
            Ok(v) => Ok(str_field(&v["experiment_id"])),
            // Created meanwhile by someone else.
            Err(e) if already_exists(&e) => {
                let v = self.get("experiments/get-by-name", &[("experiment_name", name)]).await?;
                Ok(str_field(&v["experiment"]["experiment_id"]))
            }
            Err(e) => Err(e),
        }
    }

    /// The run tagged with the job's unique id, if there is one.
    pub async fn find_run(&self, experiment_id: &str, job_uid: &str) -> Result<Option<Run>, RegistryError> {
        let filter = format!("tags.`{UID_TAG}` = '{}'", job_uid.replace('\'', "\\'"));
        let v = self
            .post(
                "runs/search",
                json!({ "experiment_ids": [experiment_id], "filter": filter, "max_results": 10,
                        "order_by": ["attributes.start_time ASC"] }),
            )
            .await?;
        Ok(v["runs"].as_array().and_then(|r| r.first()).map(|r| run_of(&r["info"])))
    }

    pub async fn get_run(&self, run_id: &str) -> Result<Run, RegistryError> {
        let v = self.get("runs/get", &[("run_id", run_id)]).await?;
        Ok(run_of(&v["run"]["info"]))
    }

    pub async fn create_run(
        &self,
        experiment_id: &str,
        name: &str,
        start_ms: i64,
        tags: &BTreeMap<String, String>,
    ) -> Result<Run, RegistryError> {
        let tags: Vec<Value> = tags.iter().map(|(k, v)| json!({ "key": k, "value": v })).collect();
        let v = self
            .post(
                "runs/create",
                json!({ "experiment_id": experiment_id, "run_name": name, "start_time": start_ms, "tags": tags }),
            )
            .await?;
        Ok(run_of(&v["run"]["info"]))
    }

    /// Logs params in batches of MLflow's limit.
    pub async fn log_params(&self, run_id: &str, params: &BTreeMap<String, String>) -> Result<(), RegistryError> {
        let all: Vec<Value> = params.iter().map(|(k, v)| json!({ "key": k, "value": v })).collect();
        for chunk in all.chunks(MAX_PARAMS_PER_BATCH) {
            self.post("runs/log-batch", json!({ "run_id": run_id, "params": chunk })).await?;
        }
        Ok(())
    }

    /// Logs every metric of `records` in batches of MLflow's limit (a few
    /// calls for a whole job, never one per step). Returns the calls made.
    pub async fn log_metrics(&self, run_id: &str, records: &[MetricRecord]) -> Result<usize, RegistryError> {
        let now = crate::handoff::now_ms();
        let all: Vec<Value> = records
            .iter()
            .flat_map(|r| {
                let ts = if r.time_ms > 0 { r.time_ms } else { now };
                r.values()
                    .into_iter()
                    .filter(|(_, v)| v.is_finite())
                    .map(move |(key, value)| json!({ "key": key, "value": value, "timestamp": ts, "step": r.step }))
            })
            .collect();
        let mut calls = 0;
        for chunk in all.chunks(MAX_METRICS_PER_BATCH) {
            self.post("runs/log-batch", json!({ "run_id": run_id, "metrics": chunk })).await?;
            calls += 1;
        }
        Ok(calls)
    }

    /// The steps at which `key` was logged in the run.
    pub async fn logged_steps(
        &self,
        run_id: &str,
        key: &str,
    ) -> Result<std::collections::BTreeSet<u64>, RegistryError> {
        let mut steps = std::collections::BTreeSet::new();
        let mut token = String::new();
        loop {
            let mut q = vec![("run_id", run_id), ("metric_key", key), ("max_results", "25000")];
            if !token.is_empty() {
                q.push(("page_token", token.as_str()));
            }
            let v = self.get("metrics/get-history", &q).await?;
            for m in v["metrics"].as_array().into_iter().flatten() {
                steps.insert(
                    m["step"].as_u64().or_else(|| m["step"].as_str().and_then(|s| s.parse().ok())).unwrap_or(0),
                );
            }
            match v["next_page_token"].as_str() {
                Some(t) if !t.is_empty() => token = t.to_string(),
                _ => return Ok(steps),
            }
        }
    }

    pub async fn finish_run(&self, run_id: &str, end_ms: i64) -> Result<(), RegistryError> {
        self.post("runs/update", json!({ "run_id": run_id, "status": "FINISHED", "end_time": end_ms })).await?;
        Ok(())
    }

    /// The artifact proxy's URL for an `mlflow-artifacts:/` location.
    fn artifact_url(&self, uri: &str) -> Result<String, RegistryError> {
        let path = uri.strip_prefix(ARTIFACT_SCHEME).ok_or_else(|| {
            RegistryError::Refused(format!(
                "MLflow at {}: the run's artifact location {uri:?} is not served by the tracking server; \
                 start `mlflow server` with its artifact proxy (the default, `--serve-artifacts`)",
                self.base
            ))
        })?;
        Ok(format!("{}/api/2.0/mlflow-artifacts/artifacts/{}", self.base, path.trim_start_matches('/')))
    }

    /// Uploads one artifact through the server's proxy.
    pub async fn upload(&self, artifact_uri: &str, name: &str, bytes: Vec<u8>) -> Result<(), RegistryError> {
        let url = format!("{}/{name}", self.artifact_url(artifact_uri)?);
        self.send(&format!("upload {name}"), self.http.put(url).body(bytes)).await?;
        Ok(())
    }

    /// Files under an artifact folder, as (path relative to it, size).
    pub async fn list_artifacts(&self, uri: &str) -> Result<Vec<(String, u64)>, RegistryError> {
        let path = uri.strip_prefix(ARTIFACT_SCHEME).map(|p| p.trim_start_matches('/')).ok_or_else(|| {
            RegistryError::Refused(format!("{uri:?} is not an artifact served by the MLflow server at {}", self.base))
        })?;
        let url = format!("{}/api/2.0/mlflow-artifacts/artifacts", self.base);
        let v = self.send("list artifacts", self.http.get(url).query(&[("path", path)])).await?;
        let mut out = Vec::new();
        for f in v["files"].as_array().into_iter().flatten() {
            let name = f["path"].as_str().unwrap_or("").to_string();
            if f["is_dir"].as_bool().unwrap_or(false) {
                for (sub, size) in
                    Box::pin(self.list_artifacts(&format!("{}/{name}", uri.trim_end_matches('/')))).await?
                {
                    out.push((format!("{name}/{sub}"), size));
                }
            } else {
                let size = f["file_size"].as_u64().or_else(|| f["file_size"].as_str().and_then(|s| s.parse().ok()));
                out.push((name, size.unwrap_or(0)));
            }
        }
        out.sort();
        Ok(out)
    }

    pub async fn download_artifact(&self, uri: &str) -> Result<Vec<u8>, RegistryError> {
        let resp = self.http.get(self.artifact_url(uri)?).send().await.map_err(|e| {
            RegistryError::Unavailable(format!("MLflow at {}: download {uri}: {}", self.base, error_chain(&e)))
        })?;
        if !resp.status().is_success() {
            return Err(RegistryError::Refused(format!("MLflow at {}: download {uri}: {}", self.base, resp.status())));
        }
        Ok(resp.bytes().await.map_err(|e| RegistryError::Unavailable(format!("download {uri}: {e}")))?.to_vec())
    }

    pub async fn create_registered_model(&self, name: &str) -> Result<(), RegistryError> {
        match self.post("registered-models/create", json!({ "name": name })).await {
            Ok(_) => Ok(()),
            Err(e) if already_exists(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Versions of `model` created from `run_id`, lowest first.
    pub async fn versions_of_run(&self, model: &str, run_id: &str) -> Result<Vec<ModelVersion>, RegistryError> {
        let filter = format!("run_id = '{run_id}'");
        let v = self.get("model-versions/search", &[("filter", filter.as_str()), ("max_results", "1000")]).await?;
        let mut out: Vec<ModelVersion> = v["model_versions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(model_version)
            .filter(|m| m.name == model)
            .collect();
        out.sort_by_key(|m| m.version);
        Ok(out)
    }

    pub async fn create_version(
        &self,
        model: &str,
        source: &str,
        run_id: &str,
        tags: &BTreeMap<String, String>,
        description: &str,
    ) -> Result<ModelVersion, RegistryError> {
        let tags: Vec<Value> = tags.iter().map(|(k, v)| json!({ "key": k, "value": v })).collect();
        let v = self
            .post(
                "model-versions/create",
                json!({ "name": model, "source": source, "run_id": run_id, "tags": tags, "description": description }),
            )
            .await?;
        Ok(model_version(&v["model_version"]))
    }

    pub async fn delete_version(&self, model: &str, version: u64) -> Result<(), RegistryError> {
        let body = json!({ "name": model, "version": version.to_string() });
        self.send("model-versions/delete", self.http.delete(self.api("model-versions/delete")).json(&body)).await?;
        Ok(())
    }

    pub async fn set_alias(&self, model: &str, alias: &str, version: u64) -> Result<(), RegistryError> {
        self.post("registered-models/alias", json!({ "name": model, "alias": alias, "version": version.to_string() }))
            .await?;
        Ok(())
    }

    async fn version(&self, model: &str, version: u64) -> Result<ModelVersion, RegistryError> {
        let v = self.get("model-versions/get", &[("name", model), ("version", &version.to_string())]).await?;
        Ok(model_version(&v["model_version"]))
    }

    async fn registered_model(&self, name: &str) -> Result<Value, RegistryError> {
        Ok(self.get("registered-models/get", &[("name", name)]).await?["registered_model"].clone())
    }
}

const ALREADY_EXISTS: &str = "already exists: ";

fn already_exists(e: &RegistryError) -> bool {
    matches!(e, RegistryError::Refused(m) if m.starts_with(ALREADY_EXISTS))
}

/// reqwest's error with its causes (a refused connection is in the source).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// MLflow sends 64-bit numbers as strings or numbers, depending on the field.
fn str_field(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

fn num_field(v: &Value) -> u64 {
    v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())).unwrap_or(0)
}

fn run_of(info: &Value) -> Run {
    Run { run_id: str_field(&info["run_id"]), artifact_uri: str_field(&info["artifact_uri"]) }
}

fn model_version(v: &Value) -> ModelVersion {
    ModelVersion {
        name: str_field(&v["name"]),
        version: num_field(&v["version"]),
        source: str_field(&v["source"]),
        run_id: str_field(&v["run_id"]),
        created_ms: num_field(&v["creation_timestamp"]) as i64,
        tags: v["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| (str_field(&t["key"]), str_field(&t["value"])))
            .collect(),
        aliases: v["aliases"].as_array().into_iter().flatten().map(str_field).collect(),
    }
}

impl ModelVersion {
    fn info(self) -> VersionInfo {
        VersionInfo {
            job_id: self.tags.get(JOB_TAG).cloned().unwrap_or_default(),
            model: self.name,
            version: self.version,
            aliases: self.aliases,
            created_ms: self.created_ms,
            uri: self.source,
            run_id: self.run_id,
            tags: self.tags,
        }
    }
}

#[async_trait]
impl Catalog for Mlflow {
    async fn models(&self) -> Result<Vec<ModelSummary>, RegistryError> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let mut q = vec![("max_results", "1000")];
            if !token.is_empty() {
                q.push(("page_token", token.as_str()));
            }
            let v = self.get("registered-models/search", &q).await?;
            for m in v["registered_models"].as_array().into_iter().flatten() {
                let name = str_field(&m["name"]);
                let versions = self.get("model-versions/search", &[("filter", &format!("name = '{name}'"))]).await?;
                let versions: Vec<u64> = versions["model_versions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| num_field(&v["version"]))
                    .collect();
                out.push(ModelSummary {
                    latest_version: versions.iter().copied().max().unwrap_or(0),
                    versions: versions.len(),
                    aliases: m["aliases"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| (str_field(&a["alias"]), num_field(&a["version"])))
                        .collect(),
                    name,
                });
            }
            match v["next_page_token"].as_str() {
                Some(t) if !t.is_empty() => token = t.to_string(),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn versions(&self, model: &str) -> Result<Vec<VersionInfo>, RegistryError> {
        let v = self
            .get("model-versions/search", &[("filter", &format!("name = '{model}'")), ("max_results", "1000")])
            .await?;
        let mut out: Vec<VersionInfo> =
            v["model_versions"].as_array().into_iter().flatten().map(|m| model_version(m).info()).collect();
        // Search answers leave aliases out: take them from the model.
        let aliases = self.registered_model(model).await?["aliases"].clone();
        for a in aliases.as_array().into_iter().flatten() {
            let n = num_field(&a["version"]);
            if let Some(v) = out.iter_mut().find(|v| v.version == n) {
                v.aliases.push(str_field(&a["alias"]));
            }
        }
        out.sort_by_key(|v| v.version);
        Ok(out)
    }

    async fn resolve(&self, model: &str, sel: &Selector) -> Result<VersionInfo, RegistryError> {
        let mv = match sel {
            Selector::Version(n) => self.version(model, *n).await?,
            Selector::Alias(a) => {
                let v = self.get("registered-models/alias", &[("name", model), ("alias", a)]).await?;
                model_version(&v["model_version"])
            }
            Selector::Latest => {
                let latest = self.versions(model).await?.into_iter().last();
                let n = latest.map(|v| v.version).ok_or_else(|| {
                    RegistryError::NotFound(format!("model {model:?} has no versions at {}", self.base))
                })?;
                self.version(model, n).await?
            }
        };
        let mut info = mv.info();
        if info.aliases.is_empty() {
            let aliases = self.registered_model(model).await?["aliases"].clone();
            info.aliases = aliases
                .as_array()
                .into_iter()
                .flatten()
                .filter(|a| num_field(&a["version"]) == info.version)
                .map(|a| str_field(&a["alias"]))
                .collect();
        }
        Ok(info)
    }

    async fn download(&self, v: &VersionInfo, dir: &Path) -> Result<Vec<PathBuf>, RegistryError> {
        std::fs::create_dir_all(dir).map_err(|e| RegistryError::Refused(format!("create {}: {e}", dir.display())))?;
        let mut out = Vec::new();
        for (name, _) in self.list_artifacts(&v.uri).await? {
            let bytes = self.download_artifact(&format!("{}/{name}", v.uri.trim_end_matches('/'))).await?;
            let path = dir.join(&name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| RegistryError::Refused(format!("create {}: {e}", parent.display())))?;
            }
            std::fs::write(&path, &bytes)
                .map_err(|e| RegistryError::Refused(format!("write {}: {e}", path.display())))?;
            out.push(path);
        }
        Ok(out)
    }
}
