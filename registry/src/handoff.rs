//! The hand-off of a trained job's model, and the metric tracking of a job
//! still training: [`Registries`] implements [`Registrar`] for both kinds of
//! registry, choosing by the job's `registry.kind`.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use flotilla_jobspec::{RegistryKind, RegistrySpec};
use flotilla_storage::Storage;
use serde_json::Value;

use crate::builtin::{Builtin, NewVersion};
use crate::mlflow::{Mlflow, Run, JOB_TAG, UID_TAG};
use crate::record::{self, CheckpointLineage, GenerationLineage, Lineage, MetricRecord};
use crate::{Registered, Registrar, RegistryError};

/// The files of a registered version, whichever the registry.
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const JOB_FILE: &str = "job.yaml";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const LINEAGE_FILE: &str = "lineage.json";
/// A Llama's Hugging Face config, beside its weights (absent for other models).
pub const HF_CONFIG_FILE: &str = "config.json";
/// The folder of an MLflow run's artifacts that a model version points at.
pub const MLFLOW_MODEL_DIR: &str = "model";

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A trained job, as the coordinator's state knows it.
#[derive(Debug, Clone)]
pub struct HandoffRequest {
    pub job: TrackedJob,
    pub spec_yaml: String,
    /// The final weights' URL (`.../final/model.safetensors`); the step's
    /// metric history is beside it.
    pub final_model: String,
    pub total_steps: u64,
    pub generations: Vec<GenerationLineage>,
    pub checkpoints: Vec<CheckpointLineage>,
    /// The MLflow run that tracked the job while it trained, if any.
    pub tracking_run: Option<String>,
}

/// A job with a registry section.
#[derive(Debug, Clone)]
pub struct TrackedJob {
    pub job_id: String,
    /// Unique across coordinators (job ids are not): what makes a hand-off
    /// idempotent.
    pub job_uid: String,
    pub job_name: String,
    pub spec_json: String,
    pub registry: RegistrySpec,
    pub submitted_ms: i64,
}

/// The registrar the coordinator uses: MLflow or built-in, per job.
#[derive(Debug, Default, Clone)]
pub struct Registries;

#[async_trait]
impl Registrar for Registries {
    async fn hand_off(&self, req: &HandoffRequest) -> Result<Registered, RegistryError> {
        let (dir, name) = req.final_model.rsplit_once('/').ok_or_else(|| RegistryError::Corrupt {
            what: "final model".into(),
            message: format!("{:?} is not a file location", req.final_model),
        })?;
        let out = Storage::open(dir)?;
        let weights = out.get(name).await?;
        let metrics = match out.get(METRICS_FILE).await {
            Ok(b) => record::from_jsonl(&String::from_utf8_lossy(&b))
                .map_err(|m| RegistryError::Corrupt { what: format!("{dir}/{METRICS_FILE}"), message: m })?,
            Err(e) if e.is_not_found() => {
                tracing::warn!(job = %req.job.job_id, "no metric history beside the final model");
                Vec::new()
            }
            Err(e) => return Err(e.into()),
        };
        let lineage = lineage(req, crate::sha256_hex(&weights));
        let mut files = vec![
            (WEIGHTS_FILE.to_string(), weights),
            (JOB_FILE.to_string(), req.spec_yaml.clone().into_bytes()),
            (METRICS_FILE.to_string(), record::to_jsonl(&metrics).into_bytes()),
            (LINEAGE_FILE.to_string(), serde_json::to_vec_pretty(&lineage).expect("plain data serializes")),
        ];
        // A Llama's Hugging Face config travels with its weights, so that
        // the registered version is a transformers model folder too.
        match out.get(HF_CONFIG_FILE).await {
            Ok(config) => files.push((HF_CONFIG_FILE.to_string(), config)),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        let r = &req.job.registry;
        let tags = tags(&req.job);
        match r.kind {
            RegistryKind::Builtin => {
                let reg = Builtin::open(&r.url)?;
                reg.register(NewVersion {
                    model: &r.model,
                    job_id: &req.job.job_id,
                    job_uid: &req.job.job_uid,
                    created_ms: now_ms(),
                    files,
                    tags: &tags,
                    alias: r.alias.as_deref(),
                })
                .await
            }
            RegistryKind::Mlflow => mlflow_hand_off(req, files, &metrics, &tags).await,
        }
    }

    async fn track(
        &self,
        job: &TrackedJob,
        run: Option<&str>,
        points: &[MetricRecord],
    ) -> Result<Option<String>, RegistryError> {
        if job.registry.kind != RegistryKind::Mlflow {
            return Ok(None);
        }
        let ml = Mlflow::new(&job.registry.url)?;
        let run = match run {
            Some(id) => id.to_string(),
            None => tracking_run(&ml, job).await?.run_id,
        };
        if !points.is_empty() {
            ml.log_metrics(&run, points).await?;
        }
        Ok(Some(run))
    }
}

/// The job's run: found by its tag, or created with the job's parameters.
async fn tracking_run(ml: &Mlflow, job: &TrackedJob) -> Result<Run, RegistryError> {
    let experiment = ml.experiment(&job.registry.experiment).await?;
    if let Some(run) = ml.find_run(&experiment, &job.job_uid).await? {
        return Ok(run);
    }
    let mut tags = tags(job);
    tags.insert("mlflow.runName".into(), job.job_id.clone());
    let run = ml.create_run(&experiment, &job.job_id, job.submitted_ms, &tags).await?;
    ml.log_params(&run.run_id, &params(&job.spec_json)).await?;
    tracing::info!(job = %job.job_id, run = %run.run_id, "MLflow run created");
    Ok(run)
}

async fn mlflow_hand_off(
    req: &HandoffRequest,
    files: Vec<(String, Vec<u8>)>,
    metrics: &[MetricRecord],
    tags: &BTreeMap<String, String>,
) -> Result<Registered, RegistryError> {
    let r = &req.job.registry;
    let ml = Mlflow::new(&r.url)?;
    let run = match &req.tracking_run {
        Some(id) => match ml.get_run(id).await {
            Ok(run) => run,
            Err(RegistryError::NotFound(_)) => tracking_run(&ml, &req.job).await?,
            Err(e) => return Err(e),
        },
        None => tracking_run(&ml, &req.job).await?,
    };
    // The run got most steps while the job trained; add what it lacks (steps
    // logged by a leader that failed before it sent them, or all of them).
    let logged = ml.logged_steps(&run.run_id, "loss").await?;
    let missing: Vec<MetricRecord> = metrics.iter().filter(|m| !logged.contains(&m.step)).cloned().collect();
    if !missing.is_empty() {
        let calls = ml.log_metrics(&run.run_id, &missing).await?;
        tracing::info!(job = %req.job.job_id, steps = missing.len(), calls, "logged the missing metric steps");
    }
    let model_dir = format!("{}/{MLFLOW_MODEL_DIR}", run.artifact_uri.trim_end_matches('/'));
    for (name, bytes) in files {
        ml.upload(&model_dir, &name, bytes).await?;
    }
    ml.create_registered_model(&r.model).await?;
    let mut versions = ml.versions_of_run(&r.model, &run.run_id).await?;
    if versions.is_empty() {
        let description = format!("trained by flotilla job {} ({} steps)", req.job.job_id, req.total_steps);
        ml.create_version(&r.model, &model_dir, &run.run_id, tags, &description).await?;
        versions = ml.versions_of_run(&r.model, &run.run_id).await?;
    }
    // Two attempts racing (an old leader still at work after a fail-over)
    // may both have created one: the lowest stays, the others go.
    let Some(keep) = versions.first().cloned() else {
        return Err(RegistryError::Unavailable(format!("MLflow at {}: the new version is not listed", r.url)));
    };
    for extra in &versions[1..] {
        tracing::warn!(model = %r.model, version = extra.version, "deleting a duplicate version of the same run");
        ml.delete_version(&r.model, extra.version).await?;
    }
    if let Some(alias) = &r.alias {
        ml.set_alias(&r.model, alias, keep.version).await?;
    }
    ml.finish_run(&run.run_id, now_ms()).await?;
    Ok(Registered { model: r.model.clone(), version: keep.version, uri: keep.source, run_id: run.run_id })
}

/// The tags of a run and a version: the user's, and which job made them.
fn tags(job: &TrackedJob) -> BTreeMap<String, String> {
    let mut tags = job.registry.tags.clone();
    tags.insert(JOB_TAG.into(), job.job_id.clone());
    tags.insert(UID_TAG.into(), job.job_uid.clone());
    tags.insert("flotilla.job_name".into(), job.job_name.clone());
    tags.insert("flotilla.version".into(), env!("CARGO_PKG_VERSION").into());
    tags
}

fn lineage(req: &HandoffRequest, weights_sha256: String) -> Lineage {
    let resumed = req.generations.iter().rev().find(|g| g.world_size > 0).map_or(0, |g| g.resumed_from_step);
    let resumed_from = (resumed > 0).then(|| {
        req.checkpoints.iter().find(|c| c.step == resumed).cloned().unwrap_or(CheckpointLineage {
            step: resumed,
            generation: 0,
            location: String::new(),
        })
    });
    Lineage {
        job_id: req.job.job_id.clone(),
        job_name: req.job.job_name.clone(),
        flotilla_version: env!("CARGO_PKG_VERSION").into(),
        total_steps: req.total_steps,
        final_model: req.final_model.clone(),
        weights_sha256,
        resumed_from,
        generations: req.generations.clone(),
        checkpoints: req.checkpoints.clone(),
    }
}

/// The job spec flattened into MLflow params: `train.optimizer.lr` = `0.003`.
pub fn params(spec_json: &str) -> BTreeMap<String, String> {
    fn walk(prefix: &str, v: &Value, out: &mut BTreeMap<String, String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&key, v, out);
                }
            }
            Value::Null => {}
            Value::String(s) => {
                out.insert(prefix.to_string(), s.chars().take(6000).collect());
            }
            other => {
                out.insert(prefix.to_string(), other.to_string().chars().take(6000).collect());
            }
        }
    }
    let mut out = BTreeMap::new();
    if let Ok(v) = serde_json::from_str::<Value>(spec_json) {
        walk("", &v, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_flatten_the_spec() {
        let p = params(r#"{"name":"q","train":{"optimizer":{"lr":0.003,"betas":[0.9,0.999]}},"registry":null}"#);
        assert_eq!(p["name"], "q");
        assert_eq!(p["train.optimizer.lr"], "0.003");
        assert_eq!(p["train.optimizer.betas"], "[0.9,0.999]");
        assert!(!p.contains_key("registry"));
    }
}
