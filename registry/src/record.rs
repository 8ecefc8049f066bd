//! What a hand-off carries besides the weights: the metric history
//! (`metrics.jsonl`, one JSON object per step) and the lineage
//! (`lineage.json`).

use serde::{Deserialize, Serialize};

/// One training step's metrics, as rank 0 recorded them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricRecord {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub samples_per_sec: f64,
    pub grad_norm: f64,
    pub generation: u64,
    pub world_size: u32,
    /// When the step finished, milliseconds since the Unix epoch.
    #[serde(default)]
    pub time_ms: i64,
    /// The validation loss after this step, when the job evaluated then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// The validation accuracy (classifiers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_accuracy: Option<f64>,
}

impl MetricRecord {
    /// The metrics an MLflow run gets per step, by key.
    pub fn values(&self) -> Vec<(&'static str, f64)> {
        let mut v = vec![
            ("loss", self.loss),
            ("lr", self.lr),
            ("grad_norm", self.grad_norm),
            ("samples_per_sec", self.samples_per_sec),
        ];
        v.extend(self.eval_loss.map(|l| ("eval_loss", l)));
        v.extend(self.eval_accuracy.map(|a| ("eval_accuracy", a)));
        v
    }
}

/// `records` as JSON lines.
pub fn to_jsonl(records: &[MetricRecord]) -> String {
    let mut out = String::new();
    for r in records {
        out.push_str(&serde_json::to_string(r).expect("plain numbers serialize"));
        out.push('\n');
    }
    out
}

/// Reads JSON lines; a line that does not parse is an error naming it.
pub fn from_jsonl(text: &str) -> Result<Vec<MetricRecord>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("line {}: {e}", i + 1)))
        .collect()
}

/// A generation of the job: who trained, from where, and why it began.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationLineage {
    pub generation: u64,
    pub world_size: u32,
    pub reason: String,
    pub at_ms: i64,
    pub resumed_from_step: u64,
}

/// A committed checkpoint of the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointLineage {
    pub step: u64,
    pub generation: u64,
    pub location: String,
}

/// Where a registered model comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lineage {
    pub job_id: String,
    pub job_name: String,
    pub flotilla_version: String,
    pub total_steps: u64,
    /// The final weights as the job wrote them, and their SHA-256.
    pub final_model: String,
    pub weights_sha256: String,
    /// The checkpoint the last generation resumed from (the weights are that
    /// checkpoint trained on to the last step); `None`: trained from scratch
    /// in one generation.
    pub resumed_from: Option<CheckpointLineage>,
    /// Every generation of the job and why it changed.
    pub generations: Vec<GenerationLineage>,
    /// The committed checkpoints still retained.
    pub checkpoints: Vec<CheckpointLineage>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_round_trips_and_names_a_bad_line() {
        let r = MetricRecord {
            step: 3,
            loss: 0.5,
            lr: 1e-3,
            samples_per_sec: 100.0,
            grad_norm: 0.25,
            generation: 2,
            world_size: 2,
            time_ms: 17,
            eval_loss: None,
            eval_accuracy: None,
        };
        let evaluated = MetricRecord { step: 4, eval_loss: Some(0.75), eval_accuracy: Some(0.5), ..r.clone() };
        let text = to_jsonl(&[r.clone(), evaluated.clone()]);
        assert!(!text.lines().next().unwrap().contains("eval"), "a step without evaluation says nothing of it");
        assert_eq!(from_jsonl(&text).unwrap(), vec![r.clone(), evaluated.clone()]);
        assert_eq!(evaluated.values().len(), 6);
        assert_eq!(r.values().len(), 4);
        let err = from_jsonl(&format!("{text}{{\"step\": 5}}\n")).unwrap_err();
        assert!(err.starts_with("line 3:"), "{err}");
    }
}
