//! A rank's Prometheus series, labelled with its `job_id` (not `job`, which
//! Prometheus gives every target), `rank`, `stage` and `replica`: where each step's time went (the timings `stats` measures,
//! not measured again), throughput, the step's loss, learning rate and
//! gradient norm, what the collectives moved, checkpoints and memory. They
//! are recorded through the `metrics` facade; the worker's `--metrics-addr`
//! listener renders them (without it nothing is kept).

use std::time::Duration;

use metrics::Label;

use crate::engine::collective::{Traffic, OP_NAMES};
use crate::stats::StepTiming;
use crate::types::Assignment;

/// One rank's series.
pub struct RankMetrics {
    labels: Vec<Label>,
    /// Samples and tokens (language models) of one step, over the world.
    samples: f64,
    tokens: Option<f64>,
}

/// Where a step's time went, as the `phase` label of
/// `flotilla_step_phase_seconds`: the passes less the waits inside them,
/// the communication the passes did not hide (wherever it was waited for),
/// the update less its gathers, reading samples and waiting for other
/// pipeline stages. The parts do not overlap: the same split the ranks
/// report to the coordinator.
pub fn phases(t: &StepTiming) -> [(&'static str, f64); 5] {
    [
        ("forward_backward", t.compute_ms() / 1e3),
        ("exposed_comm", t.comm_wait_ms / 1e3),
        ("optimizer", t.update_ms() / 1e3),
        ("data_wait", t.data_wait_ms / 1e3),
        ("pipeline_wait", t.waited_ms / 1e3),
    ]
}

impl RankMetrics {
    pub fn new(a: &Assignment) -> RankMetrics {
        let labels = vec![
            Label::new("job_id", a.job.clone()),
            Label::new("rank", a.rank.to_string()),
            Label::new("stage", a.stage.to_string()),
            Label::new("replica", a.replica.to_string()),
        ];
        let samples = a.spec.train.global_batch as f64;
        let tokens = a.spec.model.sequence().map(|(context, _)| samples * context as f64);
        RankMetrics { labels, samples, tokens }
    }

    fn with(&self, name: &'static str, value: &'static str) -> Vec<Label> {
        let mut labels = self.labels.clone();
        labels.push(Label::new(name, value));
        labels
    }

    /// A step done: its timings and throughput.
    pub fn step(&self, t: &StepTiming) {
        let wall = t.wall_ms / 1e3;
        metrics::histogram!("flotilla_step_seconds", self.labels.clone()).record(wall);
        for (phase, secs) in phases(t) {
            metrics::histogram!("flotilla_step_phase_seconds", self.with("phase", phase)).record(secs);
        }
        metrics::gauge!("flotilla_step", self.labels.clone()).set(t.step as f64);
        if wall > 0.0 {
            metrics::gauge!("flotilla_samples_per_second", self.labels.clone()).set(self.samples / wall);
            if let Some(tokens) = self.tokens {
                metrics::gauge!("flotilla_tokens_per_second", self.labels.clone()).set(tokens / wall);
            }
        }
        metrics::gauge!("flotilla_memory_bytes", self.with("kind", "host_resident")).set(crate::stats::rss() as f64);
    }

    /// The step's loss (the world's mean), learning rate and gradient norm.
    pub fn progress(&self, loss: f64, lr: f64, grad_norm: f64) {
        metrics::gauge!("flotilla_loss", self.labels.clone()).set(loss);
        metrics::gauge!("flotilla_learning_rate", self.labels.clone()).set(lr);
        metrics::gauge!("flotilla_grad_norm", self.labels.clone()).set(grad_norm);
    }

    /// An evaluation's loss.
    pub fn eval(&self, loss: f64) {
        metrics::gauge!("flotilla_eval_loss", self.labels.clone()).set(loss);
    }

    /// What the collectives moved during a step: bytes as a counter, and
    /// each step's time per op as a histogram (its `_sum` is the total).
    pub fn traffic(&self, t: &Traffic) {
        for (i, op) in OP_NAMES.iter().enumerate() {
            if t.bytes[i] == 0 && t.time[i].is_zero() {
                continue;
            }
            let labels = self.with("op", op);
            metrics::counter!("flotilla_collective_bytes_total", labels.clone()).increment(t.bytes[i]);
            metrics::histogram!("flotilla_collective_seconds", labels).record(t.time[i].as_secs_f64());
        }
    }

    /// A checkpoint committed: how long training was held up for it, and
    /// how long it took in all.
    pub fn checkpoint(&self, blocked: Duration, total: Duration) {
        metrics::histogram!("flotilla_checkpoint_blocked_seconds", self.labels.clone()).record(blocked.as_secs_f64());
        metrics::histogram!("flotilla_checkpoint_seconds", self.labels.clone()).record(total.as_secs_f64());
    }

    /// The tensors the rank holds, by kind (`MemoryUsage`).
    pub fn held(&self, usage: &crate::types::MemoryUsage) {
        for (kind, bytes) in [
            ("params", usage.params),
            ("grads", usage.grads),
            ("optimizer", usage.optimizer),
            ("activations", usage.activations),
        ] {
            metrics::gauge!("flotilla_memory_bytes", self.with("kind", kind)).set(bytes as f64);
        }
        if usage.cuda.is_some() {
            for (kind, bytes) in [("device_used", usage.device_used), ("device_peak", usage.device_peak)] {
                metrics::gauge!("flotilla_memory_bytes", self.with("kind", kind)).set(bytes as f64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_s_phases_add_up_to_its_parts() {
        let t = StepTiming {
            step: 3,
            wall_ms: 100.0,
            passes_ms: 60.0,
            waited_ms: 10.0,
            comm_wait_ms: 20.0,
            optimizer_ms: 15.0,
            data_wait_ms: 5.0,
            comm_in_passes_ms: 8.0,
            comm_in_update_ms: 3.0,
        };
        let p = phases(&t);
        assert_eq!(p[0], ("forward_backward", 0.037));
        assert_eq!(p[2], ("optimizer", 0.012));
        // 60 ms of passes and 15 of update hold 11 of the 20 ms of waiting on
        // collectives: the five parts add up to 95 - 11 ms.
        let sum: f64 = p.iter().map(|(_, s)| s).sum();
        assert!((sum - 0.084).abs() < 1e-12, "{sum}");
        assert!(crate::stats::rss() > 0, "this process has resident memory");
    }
}
