//! Training throughput of flotilla against PyTorch DDP (gloo), measured in
//! the same run on the same jobs: an MLP and a GPT, on 1 and 2 processes,
//! in f32 and in bf16 (PyTorch casting as flotilla does, its f32 gradients
//! summed with gloo's all-reduce after the backward passes), and a Llama in
//! f32 against transformers' `LlamaForCausalLM` in the same loop (the
//! tokens/s figure is samples/s × its context), one CPU thread per process
//! on both sides.
//!
//! `cargo bench --bench train_throughput` prints steady-state samples/s
//! (the steps after the first few, from each step's own wall time, so that
//! process start-up, imports and connecting are excluded) and the ratio.
//! Each configuration runs `ROUNDS` times, flotilla and PyTorch alternating,
//! and the median of each is shown: on a shared machine single runs are noisy.
//! It needs `.deps/venv` (`./scripts/bootstrap --python`). Names after
//! `--` pick models (`cargo bench --bench train_throughput -- llama`). Under
//! `cargo test` it only trains a tiny job on flotilla, without Python.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;

use flotilla::jobspec::GptSpec;
use support::*;

/// Steps left out of the steady-state figure.
const WARMUP_STEPS: usize = 10;
/// Runs of each configuration; the median is reported.
const ROUNDS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Job {
    name: &'static str,
    yaml: String,
    global_batch: usize,
}

fn mlp_job(dir: &Path, steps: u64) -> Job {
    let layers = [256, 512, 512, 10];
    write_features(&dir.join("mlp.safetensors"), &layers, 1, 8192);
    Job {
        name: "mlp",
        yaml: format!(
            "name: bench-mlp\nmodel: {{kind: mlp, layers: [256, 512, 512, 10]}}\n\
             data: {{kind: features, path: mlp.safetensors}}\n\
             train: {{steps: {steps}, global_batch: 256, micro_batch: 128, seed: 1, grad_clip: 1.0, precision: PRECISION}}\n\
             workers: {{min: WORKERS, max: WORKERS}}\n"
        ),
        global_batch: 256,
    }
}

fn gpt_job(dir: &Path, steps: u64) -> Job {
    let gpt = GptSpec { layers: 4, d_model: 128, heads: 4, context: 64, vocab: 256 };
    write_tokens(&dir.join("gpt.u16"), &gpt, 2, 2048);
    Job {
        name: "gpt",
        yaml: format!(
            "name: bench-gpt\nmodel: {{kind: gpt, layers: 4, d_model: 128, heads: 4, context: 64, vocab: 256}}\n\
             data: {{kind: tokens, path: gpt.u16, dtype: u16}}\n\
             train: {{steps: {steps}, global_batch: 32, micro_batch: 16, seed: 1, grad_clip: 1.0, precision: PRECISION}}\n\
             workers: {{min: WORKERS, max: WORKERS}}\n"
        ),
        global_batch: 32,
    }
}

/// A Llama made by transformers (`scripts/oracle/llama_hf.py`) that both
/// sides train from its weights.
fn llama_job(dir: &Path, steps: u64) -> Job {
    let py = repo().join(".deps/venv/bin/python");
    let args = ["--layers", "4", "--d-model", "128", "--heads", "4", "--kv-heads", "2", "--ffn", "352"];
    let out = std::process::Command::new(py)
        .arg(repo().join("scripts/oracle/llama_hf.py"))
        .args(["make", "--out", "llama-base", "--vocab", "256", "--context", "64"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("start llama_hf.py");
    assert!(out.status.success(), "llama_hf.py: {}", String::from_utf8_lossy(&out.stderr));
    let gpt = GptSpec { layers: 1, d_model: 8, heads: 1, context: 64, vocab: 256 };
    write_tokens(&dir.join("llama.u16"), &gpt, 3, 2048);
    Job {
        name: "llama",
        yaml: format!(
            "name: bench-llama\nmodel: {{kind: llama, from: llama-base, init: pretrained, context: 64}}\n\
             data: {{kind: tokens, path: llama.u16, dtype: u16}}\n\
             train: {{steps: {steps}, global_batch: 32, micro_batch: 16, seed: 1, grad_clip: 1.0, precision: PRECISION}}\n\
             workers: {{min: WORKERS, max: WORKERS}}\n"
        ),
        global_batch: 32,
    }
}

fn job_for(dir: &Path, job: &Job, workers: usize, precision: &str) -> std::path::PathBuf {
    let yaml = job.yaml.replace("WORKERS", &workers.to_string()).replace("PRECISION", precision);
    job_file(dir, &format!("{}-{workers}-{precision}", job.name), &yaml)
}

fn smoke() {
    let dir = tempfile::tempdir().unwrap();
    let mut job = mlp_job(dir.path(), 12);
    job.yaml = job.yaml.replace("[256, 512, 512, 10]", "[256, 16, 10]");
    let path = job_for(dir.path(), &job, 1, "fp32");
    let steps = flotilla_steps(dir.path(), &path, "bench-mlp", 1, job.global_batch);
    let sps = steady_samples_per_sec(&steps, job.global_batch, WARMUP_STEPS);
    assert!(sps.is_finite() && sps > 0.0, "{sps}");
    println!("train_throughput smoke: flotilla tiny mlp {sps:.0} samples/s (run with --bench for the comparison)");
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        smoke();
        return;
    }
    let steps = 50;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    println!(
        "steady-state training throughput, samples/s (steps {}..{steps} of each run, median of {ROUNDS} runs; \
         1 CPU thread per process)",
        WARMUP_STEPS + 1
    );
    println!(
        "{:<5} {:<9} {:>5} {:>12} {:>20} {:>14}",
        "model", "precision", "procs", "flotilla", "pytorch (DDP/gloo)", "flotilla/torch"
    );
    let picked: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let wanted = |name: &str| picked.is_empty() || picked.iter().any(|p| p == name);
    let mut jobs = Vec::new();
    for (name, make) in [("mlp", mlp_job as fn(&Path, u64) -> Job), ("gpt", gpt_job), ("llama", llama_job)] {
        if wanted(name) {
            jobs.push(make(d, steps));
        }
    }
    for job in jobs {
        // The reference trains a Llama in f32 only.
        let precisions: &[&str] = if job.name == "llama" { &["fp32"] } else { &["fp32", "bf16"] };
        for &precision in precisions {
            let (spec, init) = oracle_inputs(d, &job_for(d, &job, 1, precision));
            for w in [1usize, 2] {
                let path = job_for(d, &job, w, precision);
                let (mut ours, mut theirs) = (Vec::new(), Vec::new());
                for _ in 0..ROUNDS {
                    let f = flotilla_steps(d, &path, &format!("bench-{}", job.name), w, job.global_batch);
                    ours.push(steady_samples_per_sec(&f, job.global_batch, WARMUP_STEPS));
                    let r = reference_steps(d, &spec, &init, w);
                    theirs.push(steady_samples_per_sec(&r, job.global_batch, WARMUP_STEPS));
                }
                let (a, b) = (median(ours), median(theirs));
                println!("{:<5} {precision:<9} {w:>5} {a:>12.0} {b:>20.0} {:>14.2}", job.name, a / b);
            }
        }
    }
}
