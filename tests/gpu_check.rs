//! The GPU check's rehearsal: `scripts/gpu-check --rehearse` runs every
//! stage of the check that issue 15's device machine runs (single-rank
//! curves on two devices, dp2 and pp2 against one rank, the NCCL self-test,
//! `kill -9` of a worker, the benchmark against PyTorch, checkpoints
//! resumed on the other device) on CPUs with tiny sizes, so that the script's plumbing is proven before the one short
//! session on a GPU. Checks that the report and figures.json hold every
//! stage with parsed numbers and that every comparison passed.

mod support;

use std::process::Command;

use serde_json::Value;
use support::*;

fn num(v: &Value, what: &str) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{what} is not a number: {v}"))
}

#[test]
fn the_gpu_check_rehearses_every_stage_on_cpus() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let out = Command::new(repo().join("scripts/gpu-check"))
        .arg("--rehearse")
        .arg(&out_dir)
        .env("FLOTILLA_BIN", bin())
        .env("GPU_CHECK_PYTHON", oracle_python())
        .env_remove("FLOTILLA_COORDINATOR")
        .env_remove("FLOTILLA_TLS_DIR")
        .env_remove("FLOTILLA_TOKEN_FILE")
        .current_dir(dir.path())
        .output()
        .expect("run scripts/gpu-check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let figures: Value = serde_json::from_slice(&std::fs::read(out_dir.join("figures.json")).unwrap_or_default())
        .unwrap_or_else(|e| panic!("no figures.json ({e})\nstdout:\n{stdout}\nstderr:\n{stderr}"));
    assert!(out.status.success(), "gpu-check --rehearse failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(figures["mode"], "rehearse");
    assert_eq!(figures["passed"], true, "{figures:#}");
    let stages = &figures["stages"];
    // (serde_json's map is sorted by key; the order they ran in is the report's.)
    assert_eq!(stages.as_object().unwrap().keys().collect::<Vec<_>>(), ["a", "b", "c", "d", "e", "f", "g", "h"]);
    for (key, stage) in stages.as_object().unwrap() {
        let status = stage["status"].as_str().unwrap();
        // The NCCL self-test is skipped by a binary without the cuda feature.
        let allowed: &[&str] = if key == "d" || key == "g" { &["pass", "skipped"] } else { &["pass"] };
        assert!(allowed.contains(&status), "stage {key}: {status}: {stage:#}");
        assert!(stage["failures"].as_array().unwrap().is_empty(), "stage {key}: {stage:#}");
        num(&stage["seconds"], "seconds");
        num(&stage["budget_s"], "budget");
        for log in stage["logs"].as_array().unwrap() {
            assert!(out_dir.join(log.as_str().unwrap()).exists(), "stage {key}: {log} is missing");
        }
    }

    // a. What the check found.
    let a = &stages["a"]["figures"];
    assert!(a["flotilla_version"].as_str().unwrap().starts_with("flotilla "), "{a:#}");
    assert_eq!(a["torch"]["cuda_available"], false);
    assert!(a["libraries"]["torch_lib"].as_str().unwrap().ends_with("torch/lib"), "{a:#}");
    assert!(a["libraries"]["libnccl_symlink"].as_str().unwrap().contains("libnccl.so -> "), "{a:#}");
    assert_eq!(a["ldd_not_found"].as_array().unwrap().len(), 0);

    // b. Four curves of 50 steps, each within its bound (and equal: both
    // sides run on CPU here).
    let b = &stages["b"]["figures"];
    for (what, rtol) in [("mlp-fp32", 1e-4), ("mlp-bf16", 1e-2), ("gpt-fp32", 1e-4), ("gpt-bf16", 1e-2)] {
        let f = &b[what];
        assert_eq!(f["steps"], serde_json::json!([50, 50]), "{what}: {f:#}");
        assert_eq!(num(&f["rtol"], "rtol"), rtol, "{what}");
        assert_eq!(num(&f["max_rel_diff"], what), 0.0, "{what}: the same job on the same device: {f:#}");
        assert_eq!(f["learns"], true, "{what}: {f:#}");
    }

    // c. dp2 and pp2 against one rank, tests/parallelism.rs's bound.
    let c = &stages["c"]["figures"];
    for what in ["dp2", "pp2"] {
        assert!(num(&c[what]["max_rel_diff"], what) <= 1e-5, "{what}: {c:#}");
        assert_eq!(c[what]["world_sizes"], serde_json::json!([2]), "{what}");
    }

    // d. The self-test's exit code is recorded.
    assert!(stages["d"]["figures"]["exit_code"].is_i64(), "{:#}", stages["d"]);

    // e. The kill: measured, named, resumed from a checkpoint, same weights.
    let e = &stages["e"]["figures"];
    for k in ["named_s", "new_generation_s", "training_again_s"] {
        assert!(num(&e[k], k) >= 0.0, "{e:#}");
    }
    assert!(num(&e["named_s"], "named") <= num(&e["new_generation_s"], "new generation"), "{e:#}");
    let killed = e["killed_worker"].as_str().unwrap();
    assert!(e["new_generation_reason"].as_str().unwrap().contains(killed), "{e:#}");
    assert!(e["killed_rank"].is_u64(), "{e:#}");
    assert!(num(&e["resumed_from_step"], "resumed") >= 10.0, "{e:#}");
    assert!(num(&e["params_max_rel_diff"], "params") <= 1e-5, "{e:#}");
    assert!(num(&e["loss_max_rel_diff"], "losses") <= 1e-4, "{e:#}");
    assert_eq!(e["phase"], "succeeded");

    // f. Both sides measured; the FLOP count is the stated formula.
    let f = &stages["f"]["figures"];
    let (l, d, t, v) =
        (num(&f["layers"], "L"), num(&f["d_model"], "d"), num(&f["context"], "T"), num(&f["vocab"], "V"));
    let flops = 6.0 * (l * 12.0 * d * d + v * d) + 12.0 * l * t * d;
    assert_eq!(num(&f["flops_per_token"], "flops"), flops);
    for side in ["flotilla", "torch_eager"] {
        assert!(num(&f[side]["tokens_per_sec"], side) > 0.0, "{side}: {f:#}");
    }
    assert!(num(&f["flotilla_vs_eager"], "ratio") > 0.0);
    assert!(f["torch_compile"]["skipped"].is_string(), "{f:#}");

    // h. Each crossing: killed after a checkpoint, resumed by the
    // replacements from it, the same losses and (one device here) weights
    // as the uninterrupted run, and the devices read from the coordinator
    // (both cpu when rehearsing).
    let h = &stages["h"]["figures"];
    for (what, layout) in [("gpu-to-cpu", "dp: 2, zero: 1"), ("cpu-to-gpu", "pp: 2")] {
        let x = &h[what];
        assert!(x["layout"].as_str().unwrap().starts_with(layout), "{what}: {x:#}");
        assert_eq!(x["phase"], "succeeded", "{what}: {x:#}");
        // From a checkpoint of the first side: at least its last one the
        // coordinator had when the workers froze (past step 30).
        let resumed = num(&x["resumed_from_step"], "resumed");
        assert!(resumed >= 10.0 && resumed >= num(&x["checkpoint_step_at_kill"], "checkpoint"), "{what}: {x:#}");
        assert!(resumed < num(&x["total_steps"], "steps"), "{what}: {x:#}");
        assert!(num(&x["loss_max_rel_diff"], "losses") <= 1e-4, "{what}: {x:#}");
        assert!(num(&x["params_max_rel_diff"], "params") <= 1e-5, "{what}: {x:#}");
        for k in ["ranks_before", "ranks_after", "workers_before", "workers_after"] {
            assert_eq!(x[k], serde_json::json!(["cpu", "cpu"]), "{what} {k}: {x:#}");
        }
        // The first generation and the last have both workers (one between
        // them may have none: the replacements start once both are dropped).
        let gens = x["generations"].as_array().unwrap();
        assert!(gens.len() >= 2, "{what}: {x:#}");
        assert_eq!(gens[0]["world_size"], 2, "{what}: {x:#}");
        assert_eq!(gens[gens.len() - 1]["world_size"], 2, "{what}: {x:#}");
    }

    let report = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    assert!(report.contains("Verdict: **PASS**"), "{report}");
    // Every stage in the table, in the order they ran: the watchdog last.
    let mut at = 0;
    for title in [
        "a. environment",
        "b. single-rank",
        "c. two ranks",
        "d. NCCL",
        "e. kill -9",
        "f. benchmark",
        "h. checkpoints across devices",
        "g. NCCL watchdog",
    ] {
        let found = report[at..].find(&format!("| {title}"));
        at += found.unwrap_or_else(|| panic!("{title} missing from the report, or out of order:\n{report}")) + 1;
    }
}

/// Every job file the check runs on the GPU machine (device `cuda`, the
/// real sizes, the 124M benchmark) is one `flotilla validate` accepts, so
/// that a change of the job file format shows here rather than there.
#[test]
fn the_gpu_check_s_job_files_validate() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(oracle_python())
        .arg(repo().join("scripts/gpu/check.py"))
        .arg("--write-jobs")
        .arg(dir.path())
        .output()
        .expect("run check.py --write-jobs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let jobs: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(jobs.len(), 8 + 3 + 1 + 1 + 2, "{jobs:?}");
    for job in &jobs {
        let text = std::fs::read_to_string(job).unwrap();
        // Stage h's jobs say `auto`: the worker's GPU, or its CPU when it sees none.
        if job.contains("/h-") {
            assert!(text.contains("device: auto"), "{job}:\n{text}");
        } else {
            assert!(text.contains("device: cuda") || job.ends_with("-cpu.yaml"), "{job}:\n{text}");
        }
        let v = flotilla(dir.path(), &["validate", job]);
        assert!(v.status.success(), "{job}: {}", String::from_utf8_lossy(&v.stderr));
    }
    let bench = std::fs::read_to_string(dir.path().join("f-bench.yaml")).unwrap();
    for size in ["layers: 12", "d_model: 768", "heads: 12", "context: 1024", "vocab: 50304", "precision: bf16"] {
        assert!(bench.contains(size), "{size}: {bench}");
    }
}
