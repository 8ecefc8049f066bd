//! The same job on 1, 2 and 3 workers computes the same loss curve: the
//! global batch, data order and update do not depend on the world size.

mod support;

use support::*;

fn losses(yaml: &str, workers: usize) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    let yaml = yaml.replace("WORKERS", &workers.to_string());
    let job = job_file(dir.path(), "job", &yaml);
    let out = flotilla(dir.path(), &["run", job.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{workers} workers: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let name = yaml.lines().find_map(|l| l.strip_prefix("name: ")).unwrap().trim();
    let metrics = read_metrics(&dir.path().join(format!("runs/{name}-1/metrics.jsonl")));
    assert!(metrics.iter().all(|m| m.2 == workers as u64), "ran on {workers} workers");
    assert_eq!(metrics.iter().map(|m| m.0).collect::<Vec<_>>(), (1..=50).collect::<Vec<u64>>());
    metrics.iter().map(|m| m.1).collect()
}

fn assert_same_curve(name: &str, base: &[f64], other: &[f64], rtol: f64, workers: usize) {
    let worst = base.iter().zip(other).map(|(a, b)| (a - b).abs() / a.abs().max(1e-12)).fold(0.0, f64::max);
    eprintln!("{name}: largest relative loss difference on {workers} workers vs 1: {worst:e}");
    for (step, (a, b)) in base.iter().zip(other).enumerate() {
        let rel = (a - b).abs() / a.abs().max(1e-12);
        assert!(rel <= rtol, "{name}: step {} differs on {workers} workers: {a} vs {b} (relative {rel:e})", step + 1);
    }
}

const MLP: &str = "
name: exact-mlp
model: {kind: mlp, layers: [12, 32, 32, 5]}
data: {kind: synthetic, seed: 3, samples: 600}
train:
  steps: 50
  global_batch: 24
  micro_batch: 5
  seed: 11
  optimizer: {lr: 0.01, weight_decay: 0.1}
  schedule: {warmup_steps: 5, min_lr: 0.001}
  grad_clip: 0.5
workers: {min: WORKERS, max: WORKERS}
# About 7 buckets, so that bucketed reduction is what is compared.
parallelism: {bucket_mb: 0.001}
";

const GPT: &str = "
name: exact-gpt
model: {kind: gpt, layers: 2, d_model: 16, heads: 2, context: 12, vocab: 24}
data: {kind: synthetic, seed: 5, samples: 300}
train:
  steps: 50
  global_batch: 12
  micro_batch: 4
  seed: 2
  optimizer: {lr: 0.003, betas: [0.9, 0.95]}
  schedule: {warmup_steps: 5}
workers: {min: WORKERS, max: WORKERS}
# No clipping: each bucket is applied as soon as it is reduced.
parallelism: {bucket_mb: 0.002}
";

#[test]
fn mlp_loss_curve_is_the_same_on_1_2_and_3_workers() {
    let one = losses(MLP, 1);
    assert!(one[49] < 0.7 * one[0], "the MLP learns: {} -> {}", one[0], one[49]);
    for w in [2, 3] {
        assert_same_curve("mlp", &one, &losses(MLP, w), 1e-5, w);
    }
}

#[test]
fn gpt_loss_curve_is_the_same_on_1_2_and_3_workers() {
    let one = losses(GPT, 1);
    assert!(one[49] < 0.9 * one[0], "the GPT learns: {} -> {}", one[0], one[49]);
    for w in [2, 3] {
        assert_same_curve("gpt", &one, &losses(GPT, w), 1e-4, w);
    }
}
