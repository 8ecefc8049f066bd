//! Pipeline stages and ZeRO compute what one process computes: for each
//! layout, 50 steps on the same global batch give the single-process loss
//! within 1e-5 (relative) at every step.

mod support;

use flotilla::proto::v1 as pb;
use support::*;

/// Runs `yaml` (with `PAR` and `WORKERS` filled in) to the end on `workers`
/// local workers; returns the loss of each step in the final model's
/// history (which must be `steps`) and the folder it ran in.
fn run_steps(
    yaml: &str,
    par: &str,
    workers: usize,
    steps: std::ops::RangeInclusive<u64>,
) -> (Vec<f64>, tempfile::TempDir) {
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
    let history = read_metrics(&dir.path().join(format!("runs/{name}-1/final/metrics.jsonl")));
    assert_eq!(history.iter().map(|m| m.0).collect::<Vec<_>>(), steps.collect::<Vec<u64>>());
    (history.iter().map(|m| m.1).collect(), dir)
}

/// [`run_steps`] of a 50-step job that runs on all its workers throughout.
fn run(yaml: &str, par: &str, workers: usize) -> (Vec<f64>, tempfile::TempDir) {
    let (losses, dir) = run_steps(yaml, par, workers, 1..=50);
    let name = yaml.lines().find_map(|l| l.strip_prefix("name: ")).unwrap().trim();
    let metrics = read_metrics(&dir.path().join(format!("runs/{name}-1/final/metrics.jsonl")));
    assert!(metrics.iter().all(|m| m.2 == workers as u64), "ran on {workers} workers");
    (losses, dir)
}

fn assert_same_curve(what: &str, base: &[f64], other: &[f64]) {
    let rel = |a: f64, b: f64| (a - b).abs() / a.abs().max(1e-12);
    let worst = base.iter().zip(other).map(|(a, b)| rel(*a, *b)).fold(0.0, f64::max);
    eprintln!("{what}: largest relative loss difference from the reference run: {worst:e}");
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

/// A checkpoint taken at step 20 under pp2 x dp2 + ZeRO-2 resumes under
/// dp3 + ZeRO-1 and under one process (`checkpoint.resume_from`), and the
/// next 20 steps match the uninterrupted run.
#[test]
fn a_checkpoint_reshards_across_layouts() {
    let base = GPT.replace("steps: 50", "steps: 40").replace(
        "workers: {min: WORKERS, max: WORKERS}",
        "workers: {min: WORKERS, max: WORKERS}\ncheckpoint: {every: 20, keep: 2RESUME}",
    );
    let (whole, first) = run_steps(&base.replace("RESUME", ""), "pp: 2, dp: 2, zero: 2, micro_batches: 2", 4, 1..=40);
    let step20 = first.path().join("runs/layout-gpt-1/step-00000020");
    assert!(step20.join("manifest.json").exists(), "the step-20 checkpoint is kept");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(step20.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["world_size"], 4, "written by the four ranks");
    let resume = base.replace("RESUME", &format!(", resume_from: '{}'", step20.display()));
    for (par, workers) in [("dp: 3, zero: 1, micro_batches: 2", 3), ("micro_batches: 2", 1)] {
        let (rest, _dir) = run_steps(&resume, par, workers, 1..=40);
        assert_same_curve(&format!("resumed under {par}"), &whole[20..], &rest[20..]);
        assert_eq!(&whole[..20], &rest[..20], "the history up to the checkpoint is carried over");
    }
}

/// What each rank reports holding: under ZeRO-1 with dp = N the optimizer
/// state per rank is 1/N of ZeRO-0's, and under ZeRO-3 so are the
/// parameters (within one element per layer of rounding).
#[test]
fn zero_partitions_what_each_rank_holds() {
    let yaml = GPT.replace("steps: 50", "steps: 6");
    let memory = |par: &str, workers: usize| -> Vec<serde_json::Value> {
        let dir = tempfile::tempdir().unwrap();
        let ranks = run_with_stats(dir.path(), &yaml.replace("WORKERS", &workers.to_string()).replace("PAR", par));
        assert_eq!(ranks.len(), workers, "{par}: one report per rank");
        ranks.iter().map(|r| r["memory"].clone()).collect()
    };
    let get = |m: &serde_json::Value, k: &str| m[k].as_u64().unwrap() as f64;
    let zero0 = memory("dp: 3, zero: 0", 3);
    // A GPT of 2 blocks has 4 layers: at most one element (4 bytes) of
    // rounding per layer and kind of state.
    let slack = 4.0 * 4.0 * 2.0;
    for (par, kinds) in
        [("dp: 3, zero: 1", vec!["optimizer"]), ("dp: 3, zero: 3", vec!["optimizer", "params", "grads"])]
    {
        let ranks = memory(par, 3);
        for (r, m) in ranks.iter().enumerate() {
            for k in &kinds {
                let want = get(&zero0[r], k) / 3.0;
                assert!(
                    (get(m, k) - want).abs() <= slack,
                    "{par} rank {r}: {k} {} bytes, 1/3 of zero0's is {want}",
                    get(m, k)
                );
            }
            assert!(get(m, "activations") > 0.0, "{par} rank {r}: activations are measured");
        }
        let sum: f64 = ranks.iter().map(|m| get(m, "optimizer")).sum();
        assert!((sum - get(&zero0[0], "optimizer")).abs() < 1.0, "{par}: the partitions add up to the whole");
    }
}

/// While a pp2 x dp2 + ZeRO-1 job runs on a coordinator, every rank's
/// memory report reaches `GetJob` and `flotilla status`, with its stage and
/// replica, and the two replicas of a stage report the same bytes.
#[test]
fn status_shows_each_rank_s_stage_replica_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (_coordinator, url) = coordinator(dir.path());
    let _workers: Vec<Proc> = (0..4).map(|i| worker(dir.path(), &url, &format!("w{i}"))).collect();
    let yaml = GPT
        .replace("steps: 50", "steps: 100000")
        .replace("WORKERS", "4")
        .replace("PAR", "pp: 2, dp: 2, zero: 1, micro_batches: 2");
    let job = job_file(dir.path(), "job", &yaml);
    let out = flotilla(dir.path(), &["submit", job.to_str().unwrap(), "--coordinator", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = "layout-gpt-1".to_string();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id), "{}", String::from_utf8_lossy(&out.stdout));
    let rt = runtime();
    let status = rt.block_on(async {
        let mut c = client(&url).await;
        wait_for(&mut c, &id, std::time::Duration::from_secs(60), |s| {
            s.ranks.len() == 4 && s.ranks.iter().all(|r| r.memory.is_some())
        })
        .await
    });
    for r in &status.ranks {
        assert_eq!((r.stage, r.replica), (r.rank % 2, r.rank / 2), "rank {}", r.rank);
        let m = r.memory.clone().unwrap();
        assert!(m.params_bytes > 0 && m.activation_bytes > 0, "rank {}: {m:?}", r.rank);
        assert_eq!(m.grads_bytes, m.params_bytes, "ZeRO-1 keeps the stage's gradients");
        let twin =
            status.ranks.iter().find(|o| o.stage == r.stage && o.rank != r.rank).unwrap().memory.clone().unwrap();
        assert_eq!(m.params_bytes, twin.params_bytes, "replicas of stage {} hold the same parameters", r.stage);
        assert!(m.optimizer_bytes.abs_diff(m.params_bytes) <= 4 * 2 * 4, "moments of half the stage: {m:?}");
    }
    let shown = flotilla(dir.path(), &["status", &id, "--coordinator", &url]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("STAGE") && text.contains("OPTIMIZER") && text.contains("KiB"), "{text}");
    let cancel = flotilla(dir.path(), &["cancel", &id, "--coordinator", &url]);
    assert!(cancel.status.success(), "{}", String::from_utf8_lossy(&cancel.stderr));
}

/// `kill -9` of one stage of a two-stage pipeline: the coordinator replans
/// on the survivor and a new worker, the pipeline resumes from its last
/// checkpoint, and the final weights and history equal an uninterrupted run's.
#[test]
fn a_pipeline_survives_kill_9_of_a_stage() {
    use std::time::Duration;
    let yaml = GPT
        .replace("steps: 50", "steps: 400")
        .replace("WORKERS", "2")
        .replace("PAR", "pp: 2, micro_batches: 2")
        .replace("name: layout-gpt", "name: pipe-kill")
        + "checkpoint: {every: 20}\n";
    let reference = tempfile::tempdir().unwrap();
    let job = job_file(reference.path(), "job", &yaml);
    let out = flotilla(reference.path(), &["run", job.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let expected = read_tensors(&reference.path().join("runs/pipe-kill-1/final/model.safetensors"));

    let dir = tempfile::tempdir().unwrap();
    let (_coordinator, url) = coordinator(dir.path());
    let mut a = worker(dir.path(), &url, "worker-a");
    let _b = worker(dir.path(), &url, "worker-b");
    let job = job_file(dir.path(), "job", &yaml);
    let out = flotilla(dir.path(), &["submit", job.to_str().unwrap(), "--coordinator", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = "pipe-kill-1";
    runtime().block_on(async {
        let mut c = client(&url).await;
        let s = wait_for(&mut c, id, Duration::from_secs(60), |s| {
            s.latest_checkpoint.as_ref().is_some_and(|c| c.step >= 40) && s.step >= 45
        })
        .await;
        assert!(s.step < 400, "the job finished before the kill; make it longer");
        a.kill9();
        let _c = worker(dir.path(), &url, "worker-c");
        let done = wait_for(&mut c, id, Duration::from_secs(120), |s| {
            is_phase(s, pb::JobPhase::Succeeded) || is_phase(s, pb::JobPhase::Failed)
        })
        .await;
        assert!(is_phase(&done, pb::JobPhase::Succeeded), "{done:#?}");
        assert!(done.generations.len() >= 2, "a new generation after the kill: {done:#?}");
        assert!(done.generations.iter().any(|g| g.reason.contains("removed")), "{done:#?}");
    });
    let got = read_tensors(&dir.path().join("runs/pipe-kill-1/final/model.safetensors"));
    assert_params_close(&got, &expected, 1e-5);
    let history = read_metrics(&dir.path().join("runs/pipe-kill-1/final/metrics.jsonl"));
    assert_eq!(history.iter().map(|m| m.0).collect::<Vec<_>>(), (1..=400).collect::<Vec<u64>>(), "every step once");
}
