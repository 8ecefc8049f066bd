//! `model.kind: llama` against Hugging Face transformers: a tiny Llama
//! (2 layers, 4 heads / 2 kv heads, vocab 512, d_model 64) made and saved
//! by transformers with random weights (`scripts/oracle/llama_hf.py`);
//! flotilla's logits on a batch equal `LlamaForCausalLM`'s; job files read
//! its `config.json`; fine-tuning from it matches a plain PyTorch loop on
//! the transformers model on 1 worker, dp2 + ZeRO-2 and pp2 1F1B; the
//! final folder loads in transformers with the loss flotilla computes; bad
//! folders are clear errors.
//!
//! Needs `.deps/venv` with transformers (`./scripts/bootstrap --python`,
//! which ./scripts/test runs); each test says so and returns without it.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::*;

/// The venv's python when it has transformers; `None` (with the reason
/// printed) otherwise.
fn transformers_python() -> Option<PathBuf> {
    let py = repo().join(".deps/venv/bin/python");
    let ok = Command::new(&py)
        .args(["-c", "import torch, transformers, safetensors"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!(
            "skipped: {} lacks transformers; run `./scripts/bootstrap --python` (./scripts/test does)",
            py.display()
        );
        return None;
    }
    Some(py)
}

/// Runs `scripts/oracle/llama_hf.py` with `args` in `dir`; its stdout.
fn hf(py: &Path, dir: &Path, args: &[&str]) -> String {
    let out = Command::new(py)
        .arg(repo().join("scripts/oracle/llama_hf.py"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("start llama_hf.py");
    assert!(out.status.success(), "llama_hf.py {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn loss_of(json_line: &str) -> f64 {
    let v: serde_json::Value = serde_json::from_str(json_line.trim().lines().last().unwrap()).unwrap();
    v["loss"].as_f64().unwrap()
}

/// flotilla's logits and loss for `model` on `batch` (`flotilla hf-eval`).
fn flotilla_eval(dir: &Path, model: &Path, batch: &Path, out: &Path) -> f64 {
    let o = flotilla(dir, &["hf-eval", model.to_str().unwrap(), batch.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(o.status.success(), "hf-eval: {}", String::from_utf8_lossy(&o.stderr));
    loss_of(&String::from_utf8_lossy(&o.stdout))
}

fn max_abs_diff(a: &Path, b: &Path) -> f64 {
    let (a, b) = (&read_tensors(a)["logits"], &read_tensors(b)["logits"]);
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max)
}

/// flotilla and transformers run the model folder `model` on the batch in
/// `dir/batch.safetensors`; checks their logits within 1e-5 and their
/// losses within 1e-5 relative.
fn compare_in_transformers(py: &Path, dir: &Path, label: &str, model: &Path) {
    let ours = flotilla_eval(dir, model, &dir.join("batch.safetensors"), &dir.join("ours.safetensors"));
    let m = model.to_str().unwrap();
    let theirs =
        loss_of(&hf(py, dir, &["logits", "--model", m, "--batch", "batch.safetensors", "--out", "ref.safetensors"]));
    let diff = max_abs_diff(&dir.join("ours.safetensors"), &dir.join("ref.safetensors"));
    eprintln!("{label}: loss flotilla {ours} transformers {theirs}; max |logits difference| {diff:e}");
    assert!(diff <= 1e-5, "{label}: logits differ by {diff}");
    assert!((ours - theirs).abs() <= 1e-5 * theirs.abs(), "{label}: loss {ours} vs transformers {theirs}");
}

#[test]
fn logits_equal_transformers_with_default_and_llama3_rope_single_file_and_sharded() {
    let Some(py) = transformers_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, extra) in [("plain", vec![]), ("llama3", vec!["--llama3", "--shards"]), ("tied", vec!["--tied"])] {
        let mut args = vec!["make", "--out", name, "--seed", "5", "--batch", "batch.safetensors"];
        args.extend(extra);
        hf(&py, d, &args);
        compare_in_transformers(&py, d, name, &d.join(name));
    }
    assert!(d.join("llama3/model.safetensors.index.json").exists(), "the sharded form was exercised");
    assert!(
        !read_tensors(&d.join("tied/model.safetensors")).contains_key("lm_head.weight"),
        "transformers saves a tied model without lm_head.weight, and flotilla reads it so"
    );
}

fn validate(dir: &Path, yaml: &str) -> (i32, String) {
    let job = job_file(dir, "job", yaml);
    let out = flotilla(dir, &["validate", "--json", job.to_str().unwrap()]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn job_files_read_the_config_and_name_what_contradicts_it() {
    let Some(py) = transformers_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    hf(&py, d, &["make", "--out", "base", "--llama3"]);
    let head = "name: ft\ndata: {kind: synthetic}\ntrain: {steps: 2, global_batch: 2}\n";
    let (code, text) =
        validate(d, &format!("{head}model: {{kind: llama, from: base, init: pretrained, context: 16}}\n"));
    assert_eq!(code, 0, "{text}");
    let spec: serde_json::Value = serde_json::from_str(&text).unwrap();
    let m = &spec["model"];
    assert_eq!((m["layers"].as_u64(), m["kv_heads"].as_u64(), m["ffn"].as_u64()), (Some(2), Some(2), Some(128)));
    assert_eq!(m["rope_scaling"]["original_max_positions"].as_u64(), Some(32), "{m}");
    assert_eq!(m["from"].as_str(), Some(d.join("base").to_str().unwrap()), "from is made absolute");

    let (code, text) = validate(d, &format!("{head}model:\n  kind: llama\n  from: base\n  heads: 8\n  context: 16\n"));
    assert_eq!(code, 2, "{text}");
    assert!(text.contains(":7:10: model.heads: 8 contradicts `num_attention_heads: 4`"), "{text}");

    let (code, text) = validate(d, &format!("{head}model: {{kind: llama, from: base, context: 100}}\n"));
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("model.context: 100 is longer than `max_position_embeddings: 64`"), "{text}");

    let (code, text) = validate(d, &format!("{head}model: {{kind: llama, layers: 2, d_model: 64, heads: 4, ffn: 8, vocab: 9, context: 4, init: pretrained}}\n"));
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("model.init: `pretrained` needs `model.from`"), "{text}");

    std::fs::create_dir(d.join("mistral")).unwrap();
    let config = std::fs::read_to_string(d.join("base/config.json")).unwrap();
    std::fs::write(d.join("mistral/config.json"), config.replace("LlamaForCausalLM", "MistralForCausalLM")).unwrap();
    let (code, text) = validate(d, &format!("{head}model:\n  kind: llama\n  from: mistral\n  context: 16\n"));
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains(":6:9: model.from: mistral/config.json describes the architecture MistralForCausalLM"),
        "{text}"
    );
}

#[test]
fn a_weight_of_the_wrong_shape_is_an_error_naming_it() {
    let Some(py) = transformers_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    hf(&py, d, &["make", "--out", "base", "--batch", "batch.safetensors"]);
    // The same config with a narrower MLP: every MLP weight mis-shaped.
    std::fs::create_dir(d.join("narrow")).unwrap();
    std::fs::copy(d.join("base/model.safetensors"), d.join("narrow/model.safetensors")).unwrap();
    let config = std::fs::read_to_string(d.join("base/config.json")).unwrap();
    std::fs::write(
        d.join("narrow/config.json"),
        config.replace("\"intermediate_size\": 128", "\"intermediate_size\": 96"),
    )
    .unwrap();
    let o = flotilla(d, &["hf-eval", "narrow", "batch.safetensors", "out.safetensors"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("the tensor `model.layers.0.mlp.gate_proj.weight`"), "{err}");
    assert!(err.contains("has shape [128, 64]; the model needs [96, 64]"), "{err}");
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-12)
}

const STEPS: usize = 50;

/// The fine-tuning job on `workers` workers with `parallelism`.
fn ft_job(workers: usize, parallelism: &str) -> String {
    format!(
        "
name: ft-llama
model: {{kind: llama, from: base, init: pretrained, context: 16}}
data: {{kind: tokens, path: tokens.u16, dtype: u16}}
train:
  steps: {STEPS}
  global_batch: 8
  micro_batch: 2
  seed: 3
  optimizer: {{lr: 0.003, betas: [0.9, 0.95], weight_decay: 0.05}}
  schedule: {{warmup_steps: 5, min_lr: 0.0003}}
  grad_clip: 1.0
workers: {{min: {workers}, max: {workers}}}
parallelism: {parallelism}
"
    )
}

/// Fine-tunes the transformers-made model with flotilla on `workers`
/// workers and `parallelism`, and checks each step's loss against the
/// reference's, and the final folder in transformers against flotilla on a
/// held-out batch. Returns the largest relative loss difference.
fn fine_tune(py: &Path, d: &Path, label: &str, workers: usize, parallelism: &str, reference: &[StepRecord]) -> f64 {
    let job = job_file(d, &format!("job-{label}"), &ft_job(workers, parallelism));
    let steps = flotilla_steps(d, &job, "ft-llama", workers, 8);
    assert_eq!(steps.len(), STEPS, "{label}");
    let worst = steps.iter().zip(reference).map(|(a, b)| rel(a.loss, b.loss)).fold(0.0, f64::max);
    eprintln!(
        "{label}: largest relative loss difference to PyTorch {worst:.2e}; loss {:.5} -> {:.5}",
        steps[0].loss,
        steps[STEPS - 1].loss
    );
    for (a, b) in steps.iter().zip(reference) {
        assert!(rel(a.loss, b.loss) <= 1e-4, "{label}: step {}: flotilla {} vs PyTorch {}", a.step, a.loss, b.loss);
    }
    assert!(
        steps[STEPS - 1].loss < steps[0].loss - 0.1,
        "{label} learns: {} -> {}",
        steps[0].loss,
        steps[STEPS - 1].loss
    );

    // The final folder is a transformers model with flotilla's loss.
    let fin = d.join("runs/ft-llama-1/final");
    assert!(fin.join("config.json").exists(), "{label}: the final folder has a config.json");
    compare_in_transformers(py, d, &format!("{label}, held-out batch"), &fin);
    worst
}

#[test]
fn fine_tuning_matches_pytorch_on_1_worker_dp2_zero2_and_pp2_1f1b() {
    let Some(py) = transformers_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    hf(&py, d, &["make", "--out", "base", "--seed", "11", "--batch", "batch.safetensors"]);
    let chain = flotilla::jobspec::GptSpec { layers: 1, d_model: 8, heads: 1, context: 16, vocab: 512 };
    write_tokens(&d.join("tokens.u16"), &chain, 9, 400);

    // The reference: the transformers model in a plain PyTorch loop, with
    // the same sample order, AdamW, schedule and clipping.
    let job = job_file(d, "job-ref", &ft_job(1, "{}"));
    // export-init writes the folder's weights as flotilla reads them.
    let (spec, init) = oracle_inputs(d, &job);
    let reference = reference_steps(d, &spec, &init, 1);
    assert_eq!(reference.len(), STEPS);

    let one = fine_tune(&py, d, "1 worker", 1, "{}", &reference);
    let zero2 = fine_tune(&py, d, "dp2 + ZeRO-2", 2, "{dp: 2, zero: 2}", &reference);
    let pp2 = fine_tune(&py, d, "pp2 1F1B", 2, "{pp: 2, schedule: 1f1b}", &reference);
    eprintln!("largest relative loss differences: 1 worker {one:.2e}, dp2 + ZeRO-2 {zero2:.2e}, pp2 1F1B {pp2:.2e}");
}

/// Tied input and output embeddings: flotilla keeps a copy of the matrix
/// in the embedding unit and one in the head and gives both the summed
/// gradient. Fine-tuning matches the transformers model (one tensor) with
/// the copies on different pipeline stages, cut into ZeRO-3 chunks, and
/// held whole by two replicas; the final folder has one matrix.
#[test]
fn tied_embeddings_fine_tune_like_pytorch_on_dp2_zero3_and_pp2() {
    let Some(py) = transformers_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    hf(&py, d, &["make", "--out", "base", "--seed", "13", "--tied", "--batch", "batch.safetensors"]);
    let chain = flotilla::jobspec::GptSpec { layers: 1, d_model: 8, heads: 1, context: 16, vocab: 512 };
    write_tokens(&d.join("tokens.u16"), &chain, 4, 400);
    let job = job_file(d, "job-ref", &ft_job(1, "{}"));
    let (spec, init) = oracle_inputs(d, &job);
    let reference = reference_steps(d, &spec, &init, 1);
    assert_eq!(reference.len(), STEPS);

    let dp2 = fine_tune(&py, d, "tied, dp2", 2, "{dp: 2}", &reference);
    let zero3 = fine_tune(&py, d, "tied, dp2 + ZeRO-3", 2, "{dp: 2, zero: 3}", &reference);
    let pp2 = fine_tune(&py, d, "tied, pp2 GPipe", 2, "{pp: 2}", &reference);
    eprintln!("tied: largest relative loss differences: dp2 {dp2:.2e}, dp2 + ZeRO-3 {zero3:.2e}, pp2 {pp2:.2e}");
    let fin = read_tensors(&d.join("runs/ft-llama-1/final/model.safetensors"));
    assert!(!fin.contains_key("lm_head.weight") && fin.contains_key("model.embed_tokens.weight"));
}

/// Trained from a random init in bf16 and handed to the built-in registry.
#[test]
fn a_registered_llama_is_a_transformers_folder() {
    let Some(py) = transformers_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    hf(&py, d, &["make", "--out", "unused", "--batch", "batch.safetensors"]);
    let job = job_file(
        d,
        "job",
        "
name: scratch
model: {kind: llama, layers: 2, d_model: 32, heads: 4, kv_heads: 1, ffn: 48, vocab: 512, context: 16, rope_theta: 500000}
data: {kind: synthetic, samples: 64}
train: {steps: 3, global_batch: 4, precision: bf16}
registry: {kind: builtin, url: models}
",
    );
    let out = flotilla(d, &["run", job.to_str().unwrap()]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let version = d.join("models/scratch/1");
    assert!(version.join("config.json").exists(), "the registered version has the config");
    compare_in_transformers(&py, d, "registered version", &version);
}

/// A Llama's checkpoint (pipeline of 2, ZeRO-1) resumes on 1 worker and
/// trains on as the original run did. Needs no transformers.
#[test]
fn a_llama_checkpoint_resumes_in_another_layout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = "model: {kind: llama, layers: 2, d_model: 32, heads: 4, kv_heads: 2, ffn: 48, vocab: 64, context: 8}\n\
                 data: {kind: synthetic, samples: 64}\ntrain: {steps: 6, global_batch: 4}\n";
    let a = job_file(
        d,
        "a",
        &format!("name: cka\n{model}checkpoint: {{every: 3}}\nparallelism: {{pp: 2, zero: 1}}\nworkers: {{min: 2, max: 2}}\n"),
    );
    let b = job_file(d, "b", &format!("name: ckb\n{model}checkpoint: {{resume_from: runs/cka-1/step-00000003}}\n"));
    for job in [&a, &b] {
        let out = flotilla(d, &["run", job.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (first, resumed) =
        (read_steps(&d.join("runs/cka-1/metrics.jsonl"), 4), read_steps(&d.join("runs/ckb-1/metrics.jsonl"), 4));
    let tail: Vec<_> = first.iter().filter(|s| s.step > 3).collect();
    let again: Vec<_> = resumed.iter().filter(|s| s.step > 3).collect();
    assert_eq!(tail.len(), 3, "{first:?}");
    let trained: Vec<u64> = resumed.iter().map(|s| s.step).collect();
    assert_eq!(trained, vec![4, 5, 6], "the resumed run trains from step 4 only");
    for (x, y) in tail.iter().zip(&again) {
        assert!(rel(x.loss, y.loss) <= 1e-6, "step {}: {} vs resumed {}", x.step, x.loss, y.loss);
    }
}
