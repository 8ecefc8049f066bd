//! `train.activation_checkpointing: true` drops each unit's inner
//! activations after its forward pass and computes them again in its
//! backward pass: on one process, under ZeRO-3 and in a 1F1B pipeline, the
//! losses are those of the same job without it (within 1e-6), and every
//! rank keeps less memory for activations.

mod support;

use support::*;

const GPT: &str = "
name: recompute
model: {kind: gpt, layers: 4, d_model: 64, heads: 4, context: 64, vocab: 32}
data: {kind: synthetic, seed: 5, samples: 256}
train:
  steps: 12
  global_batch: 16
  micro_batch: 8
  seed: 2
  optimizer: {lr: 0.003}
  grad_clip: 1.0
  activation_checkpointing: AC
workers: {min: WORKERS, max: WORKERS}
parallelism: {PAR}
";

/// Runs the job; each step's loss, and each rank's activation bytes.
fn run(par: &str, workers: usize, checkpointing: bool) -> (Vec<f64>, Vec<u64>) {
    let dir = tempfile::tempdir().unwrap();
    let yaml = GPT
        .replace("WORKERS", &workers.to_string())
        .replace("PAR", par)
        .replace("AC", if checkpointing { "true" } else { "false" });
    let ranks = run_with_stats(dir.path(), &yaml);
    assert_eq!(ranks.len(), workers);
    let activations = ranks.iter().map(|r| r["memory"]["activations"].as_u64().unwrap()).collect();
    let losses = read_metrics(&dir.path().join("runs/recompute-1/final/metrics.jsonl")).iter().map(|m| m.1).collect();
    (losses, activations)
}

#[test]
fn recomputed_activations_change_no_loss_and_keep_less_memory() {
    for (par, workers) in [("dp: 1", 1), ("dp: 2, zero: 3", 2), ("pp: 2, schedule: 1f1b", 2)] {
        let (plain, kept) = run(par, workers, false);
        let (recomputed, kept_recomputing) = run(par, workers, true);
        assert_eq!(plain.len(), 12);
        let rel = |a: f64, b: f64| (a - b).abs() / a.abs().max(1e-12);
        let worst = plain.iter().zip(&recomputed).map(|(a, b)| rel(*a, *b)).fold(0.0, f64::max);
        eprintln!("{par}: largest relative loss difference {worst:e}; activations {kept:?} -> {kept_recomputing:?}");
        assert!(worst <= 1e-6, "{par}: losses differ by up to {worst:e}: {plain:?} vs {recomputed:?}");
        for (rank, (a, b)) in kept.iter().zip(&kept_recomputing).enumerate() {
            assert!(b < a, "{par} rank {rank}: {b} bytes of activations with checkpointing, {a} without");
        }
    }
}
