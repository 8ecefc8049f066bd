//! Evaluation while training (`eval:`): the validation loss after each
//! evaluation step is the same for 1, 2 and 3 workers, under ZeRO-3 and in
//! a 2-stage pipeline; it is in the job's metric history and in what `flotilla
//! run` prints; an MLP also gets its accuracy.

mod support;

use support::*;

const GPT: &str = "
name: evaluated
model: {kind: gpt, layers: 2, d_model: 32, heads: 2, context: 16, vocab: 24}
data: {kind: synthetic, seed: 5, samples: 300}
train:
  steps: 10
  global_batch: 12
  micro_batch: 6
  seed: 2
  optimizer: {lr: 0.003}
workers: {min: WORKERS, max: WORKERS}
parallelism: {PAR}
eval: {data: {kind: synthetic, seed: 99, samples: 64}, every: 4, batches: 3, batch: 10}
";

/// The (step, eval loss, eval accuracy) records of a finished run's history.
fn evals(dir: &std::path::Path, name: &str) -> Vec<(u64, f64, Option<f64>)> {
    std::fs::read_to_string(dir.join(format!("runs/{name}-1/final/metrics.jsonl")))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|m| Some((m["step"].as_u64()?, m["eval_loss"].as_f64()?, m["eval_accuracy"].as_f64())))
        .collect()
}

fn run(yaml: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(dir.path(), "job", yaml);
    let out = flotilla(dir.path(), &["run", job.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (dir, String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn the_validation_loss_is_the_same_on_every_layout() {
    let mut reference: Option<Vec<(u64, f64, Option<f64>)>> = None;
    for (par, workers) in [("dp: 1", 1), ("dp: 2", 2), ("dp: 3", 3), ("dp: 2, zero: 3", 2), ("pp: 2", 2)] {
        let yaml = GPT.replace("WORKERS", &workers.to_string()).replace("PAR", par);
        let (dir, printed) = run(&yaml);
        let got = evals(dir.path(), "evaluated");
        assert_eq!(got.iter().map(|e| e.0).collect::<Vec<_>>(), vec![4, 8, 10], "{par}: evaluated at 4, 8 and the end");
        assert!(got.iter().all(|e| e.1.is_finite() && e.1 > 0.0 && e.2.is_none()), "{par}: {got:?}");
        assert!(printed.contains(&format!("eval: loss {:.4}", got[2].1)), "{par}: {printed}");
        match &reference {
            None => reference = Some(got),
            Some(want) => {
                for (a, b) in want.iter().zip(&got) {
                    let rel = (a.1 - b.1).abs() / a.1;
                    eprintln!("{par}: step {} eval loss {} vs {} (relative {rel:e})", a.0, a.1, b.1);
                    assert!(rel <= 1e-6, "{par}: eval loss at step {} is {} against {} on one worker", a.0, b.1, a.1);
                }
            }
        }
    }
}

#[test]
fn a_classifier_gets_its_accuracy() {
    let yaml = "
name: classified
model: {kind: mlp, layers: [8, 32, 4]}
data: {kind: synthetic, seed: 3, samples: 512}
train: {steps: 30, global_batch: 32, seed: 1, optimizer: {lr: 0.01}}
workers: {min: 2, max: 2}
eval: {data: {kind: synthetic, seed: 3, samples: 256}, every: 10, batches: 4, batch: 64}
";
    let (dir, _) = run(yaml);
    let got = evals(dir.path(), "classified");
    assert_eq!(got.iter().map(|e| e.0).collect::<Vec<_>>(), vec![10, 20, 30]);
    let accuracy: Vec<f64> = got.iter().map(|e| e.2.expect("an accuracy")).collect();
    // Samples of the training set's own teacher: learnable, so the accuracy
    // rises well above chance (1/4) and every value is a share of 256.
    assert!(accuracy.iter().all(|a| (0.0..=1.0).contains(a) && (a * 256.0).fract() == 0.0), "{accuracy:?}");
    assert!(accuracy[2] > 0.5, "accuracy after 30 steps: {accuracy:?}");
    assert!(got[2].1 < got[0].1, "the validation loss falls: {got:?}");
}
