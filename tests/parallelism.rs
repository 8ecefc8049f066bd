//! Pipeline stages and ZeRO compute what one process computes: for each
//! layout, 50 steps on the same global batch give the single-process loss
//! within 1e-5 (relative) at every step.

mod support;

use support::*;

/// Runs `yaml` (with `PAR` and `WORKERS` filled in) to the end on `workers`
/// local workers; returns the loss per step and the folder it ran in.
fn run(yaml: &str, par: &str, workers: usize) -> (Vec<f64>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let yaml = yaml.replace("WORKERS", &workers.to_string()).replace("PAR", par);
    let job = job_file(dir.path(), "job", &yaml);
    let out = flotilla(dir.path(), &["run", job.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{par} on {workers} workers: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let name = yaml.lines().find_map(|l| l.strip_prefix("name: ")).unwrap().trim();
    let metrics = read_metrics(&dir.path().join(format!("runs/{name}-1/metrics.jsonl")));
    assert!(metrics.iter().all(|m| m.2 == workers as u64), "ran on {workers} workers");
    let steps: Vec<u64> = metrics.iter().map(|m| m.0).collect();
    assert_eq!(steps, (1..=50).collect::<Vec<u64>>());
    (metrics.iter().map(|m| m.1).collect(), dir)
}

fn assert_same_curve(what: &str, base: &[f64], other: &[f64]) {
    let rel = |a: f64, b: f64| (a - b).abs() / a.abs().max(1e-12);
    let worst = base.iter().zip(other).map(|(a, b)| rel(*a, *b)).fold(0.0, f64::max);
    eprintln!("{what}: largest relative loss difference from one process: {worst:e}");
    for (step, (a, b)) in base.iter().zip(other).enumerate() {
        assert!(rel(*a, *b) <= 1e-5, "{what}: step {} differs: {a} vs {b} (relative {:e})", step + 1, rel(*a, *b));
    }
}

const GPT: &str = "
name: layout-gpt
model: {kind: gpt, layers: 2, d_model: 16, heads: 2, context: 12, vocab: 24}
data: {kind: synthetic, seed: 5, samples: 300}
train:
  steps: 50
  global_batch: 12
  seed: 2
  optimizer: {lr: 0.003, betas: [0.9, 0.95], weight_decay: 0.1}
  schedule: {warmup_steps: 5}
  grad_clip: 1.0
workers: {min: WORKERS, max: WORKERS}
parallelism: {PAR}
";

const MLP: &str = "
name: layout-mlp
model: {kind: mlp, layers: [12, 32, 32, 5]}
data: {kind: synthetic, seed: 3, samples: 600}
train:
  steps: 50
  global_batch: 24
  seed: 11
  optimizer: {lr: 0.01, weight_decay: 0.1}
  schedule: {warmup_steps: 5, min_lr: 0.001}
  grad_clip: 0.5
workers: {min: WORKERS, max: WORKERS}
parallelism: {PAR}
";

/// Each layout against one process with the same micro-batches.
fn check(yaml: &str, micro: usize, layouts: &[(&str, usize)]) {
    let mb = format!("micro_batches: {micro}");
    let (one, _dir) = run(yaml, &mb, 1);
    assert!(one[49] < 0.9 * one[0], "it learns: {} -> {}", one[0], one[49]);
    for (par, workers) in layouts {
        let (other, _dir) = run(yaml, &format!("{par}, {mb}"), *workers);
        assert_same_curve(&format!("{par} ({workers} workers)"), &one, &other);
    }
}

#[test]
fn zero_1_2_3_match_one_process() {
    check(GPT, 2, &[("dp: 2, zero: 1", 2), ("dp: 2, zero: 2", 2), ("dp: 3, zero: 3", 3)]);
}

#[test]
fn gpt_pipelines_match_one_process() {
    check(
        GPT,
        6,
        &[
            ("pp: 2, schedule: gpipe", 2),
            ("pp: 2, schedule: 1f1b", 2),
            ("pp: 3, schedule: 1f1b", 3),
            ("pp: 2, dp: 2, zero: 1", 4),
        ],
    );
}

#[test]
fn mlp_pipelines_and_zero_match_one_process() {
    check(MLP, 4, &[("pp: 2, schedule: gpipe", 2), ("pp: 3, schedule: 1f1b", 3), ("dp: 2, zero: 3", 2)]);
}
