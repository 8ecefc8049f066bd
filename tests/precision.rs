//! Mixed precision (`train.precision: bf16`) through real runs: every layout
//! computes what one process computes in bf16, a bf16 GPT learns about as
//! well as an f32 one, and a checkpoint taken under one precision resumes
//! under the other (the masters and moments are f32 under both).

mod support;

use support::*;

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(1e-12)
}

/// Runs `yaml` (with `WORKERS` and `PAR` filled in) to its end; the loss of
/// every step in the final metric history.
fn losses(dir: &std::path::Path, yaml: &str, par: &str, workers: usize) -> Vec<f64> {
    let yaml = yaml.replace("WORKERS", &workers.to_string()).replace("PAR", par);
    let job = job_file(dir, "job", &yaml);
    let out = flotilla(dir, &["run", job.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{par} on {workers} workers: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let name = yaml.lines().find_map(|l| l.strip_prefix("name: ")).unwrap().trim();
    let history = read_metrics(&dir.join(format!("runs/{name}-1/final/metrics.jsonl")));
    history.iter().map(|m| m.1).collect()
}

const GPT: &str = "
name: bf16-gpt
model: {kind: gpt, layers: 2, d_model: 16, heads: 2, context: 12, vocab: 24}
data: {kind: synthetic, seed: 5, samples: 300}
train:
  steps: STEPS
  global_batch: 12
  seed: 2
  precision: PRECISION
  optimizer: {lr: 0.003, betas: [0.9, 0.95], weight_decay: 0.1}
  schedule: {warmup_steps: 5}
  grad_clip: 1.0
workers: {min: WORKERS, max: WORKERS}
parallelism: {PAR}
";

fn gpt(steps: u64, precision: &str) -> String {
    GPT.replace("STEPS", &steps.to_string()).replace("PRECISION", precision)
}

#[test]
fn bf16_under_zero_2_and_a_1f1b_pipeline_matches_bf16_on_one_process() {
    let yaml = gpt(50, "bf16");
    let one = losses(tempfile::tempdir().unwrap().path(), &yaml, "micro_batches: 2", 1);
    assert_eq!(one.len(), 50);
    assert!(one[49] < 0.9 * one[0], "it learns in bf16: {} -> {}", one[0], one[49]);
    for (par, workers) in [("dp: 2, zero: 2, micro_batches: 2", 2), ("pp: 2, schedule: 1f1b, micro_batches: 2", 2)] {
        let other = losses(tempfile::tempdir().unwrap().path(), &yaml, par, workers);
        let worst = one.iter().zip(&other).map(|(a, b)| rel(*a, *b)).fold(0.0, f64::max);
        eprintln!("bf16 {par}: largest relative loss difference from one process {worst:e}");
        for (s, (a, b)) in one.iter().zip(&other).enumerate() {
            assert!(rel(*a, *b) <= 1e-3, "bf16 {par}: step {} differs: {a} vs {b}", s + 1);
        }
    }
}

#[test]
fn a_bf16_gpt_ends_within_5_percent_of_the_f32_run_after_200_steps() {
    let full = losses(tempfile::tempdir().unwrap().path(), &gpt(200, "fp32"), "micro_batches: 2", 1);
    let half = losses(tempfile::tempdir().unwrap().path(), &gpt(200, "bf16"), "micro_batches: 2", 1);
    eprintln!("after 200 steps: fp32 loss {}, bf16 loss {}", full[199], half[199]);
    assert!(full[199] < 0.8 * full[0], "the GPT learns: {} -> {}", full[0], full[199]);
    assert!(rel(full[199], half[199]) <= 0.05, "bf16 {} vs fp32 {} after 200 steps", half[199], full[199]);
    assert_ne!(full, half, "bf16 computes in another precision");
}

/// A checkpoint written by a run in one precision, resumed by a run in the
/// other: the history carries over exactly, the first resumed step's loss
/// is that of the same weights in the other precision, and training goes
/// on as well as without the switch.
#[test]
fn a_checkpoint_resumes_under_the_other_precision() {
    for (from, to) in [("fp32", "bf16"), ("bf16", "fp32")] {
        let base = gpt(40, from).replace(
            "workers: {min: WORKERS, max: WORKERS}",
            "workers: {min: WORKERS, max: WORKERS}\ncheckpoint: {every: 20, keep: 2RESUME}",
        );
        let first = tempfile::tempdir().unwrap();
        let whole = losses(first.path(), &base.replace("RESUME", ""), "micro_batches: 2, dp: 2, zero: 1", 2);
        let step20 = first.path().join("runs/bf16-gpt-1/step-00000020");
        assert!(step20.join("manifest.json").exists(), "the step-20 checkpoint is kept");
        let resumed = base
            .replace(&format!("precision: {from}"), &format!("precision: {to}"))
            .replace("RESUME", &format!(", resume_from: '{}'", step20.display()));
        let rest = losses(tempfile::tempdir().unwrap().path(), &resumed, "micro_batches: 2", 1);
        assert_eq!(rest.len(), 40);
        assert_eq!(&whole[..20], &rest[..20], "{from} -> {to}: the history up to the checkpoint is carried over");
        let d21 = rel(whole[20], rest[20]);
        eprintln!("{from} -> {to}: step 21 relative difference {d21:e}; step 40 {} vs {}", whole[39], rest[39]);
        assert!(d21 > 0.0 && d21 <= 1e-2, "{from} -> {to}: step 21 {} vs {}", whole[20], rest[20]);
        assert!(rel(whole[39], rest[39]) <= 0.05, "{from} -> {to}: step 40 {} vs {}", whole[39], rest[39]);
    }
}
