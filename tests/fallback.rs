//! The GPU fallback's path on CPUs: CUDA tensors over the TCP backend go
//! through host copies of themselves (pinned on a GPU machine), filled
//! before a collective and copied back after it. `FLOTILLA_STAGE_COLLECTIVES=1`
//! makes every collective take that path; a job run that way ends with the
//! same weights, bit for bit, as without it, under ZeRO-3 with a pipeline
//! (reductions, scatters, gathers, sends and receives all staged).

mod support;

use support::*;

const JOB: &str = "
name: staged
model: {kind: gpt, layers: 2, d_model: 16, heads: 2, context: 12, vocab: 24}
data: {kind: synthetic, seed: 5, samples: 300}
train:
  steps: 12
  global_batch: 12
  seed: 2
  optimizer: {lr: 0.003}
  grad_clip: 1.0
workers: {min: 4, max: 4}
parallelism: {pp: 2, dp: 2, zero: 3, micro_batches: 2}
";

/// The final model's bytes and the step losses of a run of [`JOB`].
fn run(staged: bool) -> (Vec<u8>, Vec<f64>) {
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(dir.path(), "job", JOB);
    let mut c = cmd();
    c.args(["run", job.to_str().unwrap()]).current_dir(dir.path());
    if staged {
        c.env("FLOTILLA_STAGE_COLLECTIVES", "1");
    } else {
        c.env_remove("FLOTILLA_STAGE_COLLECTIVES");
    }
    let out = c.output().expect("run flotilla");
    assert!(out.status.success(), "staged={staged}: {}", String::from_utf8_lossy(&out.stderr));
    let final_dir = dir.path().join("runs/staged-1/final");
    let losses = read_metrics(&final_dir.join("metrics.jsonl")).iter().map(|m| m.1).collect();
    // Every worker says once that it staged (and only then).
    let logs: Vec<String> = std::fs::read_dir(dir.path().join("runs/staged-1/logs"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(logs.len(), 4, "a log per worker");
    for log in &logs {
        assert_eq!(log.contains("collectives staged through host copies"), staged, "staged={staged}: {log}");
    }
    (std::fs::read(final_dir.join("model.safetensors")).unwrap(), losses)
}

#[test]
fn staged_collectives_train_the_same_weights_bit_for_bit() {
    let (direct, direct_losses) = run(false);
    let (staged, staged_losses) = run(true);
    assert_eq!(direct_losses.len(), 12);
    assert_eq!(staged_losses, direct_losses, "the same loss at every step");
    assert!(staged == direct, "the final weights differ ({} and {} bytes)", staged.len(), direct.len());
}
