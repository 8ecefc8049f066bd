//! ZeRO: peak resident memory per rank for `zero: 0..3` on a GPT large
//! enough for the difference to show (4 blocks of width 384, 7.4 M
//! parameters, two data-parallel ranks), with the bytes each rank reports
//! holding, and the step time of each stage relative to plain data
//! parallelism (`zero: 0`) in the same run.
//!
//! Each layout runs through `flotilla run` with `FLOTILLA_STATS_DIR` set;
//! peak resident memory is the worker process's VmHWM, which includes the
//! process itself and libtorch, and the one-time build of the whole model at
//! start (every rank draws the initial weights). Step time is the median
//! over the steps after the first two.
//!
//! `cargo bench --bench zero` prints the table; under `cargo test` it runs a
//! tiny model under `zero: 3` and checks that the statistics are there.

#[path = "../tests/support/mod.rs"]
mod support;

use support::*;

fn job(gpt: &str, steps: u64, zero: u8) -> String {
    format!(
        "name: zero
model: {{kind: gpt, {gpt}}}
data: {{kind: synthetic, seed: 1, samples: 512}}
train: {{steps: {steps}, global_batch: 8, seed: 3}}
workers: {{min: 2, max: 2}}
parallelism: {{dp: 2, zero: {zero}, micro_batches: 2}}
"
    )
}

fn median_step_ms(rank: &serde_json::Value) -> f64 {
    let mut v: Vec<f64> =
        rank["steps"].as_array().unwrap().iter().skip(2).map(|s| s["wall_ms"].as_f64().unwrap()).collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn mib(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap() / (1 << 20) as f64
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    if !std::env::args().any(|a| a == "--bench") {
        let ranks = run_with_stats(dir.path(), &job("layers: 1, d_model: 16, heads: 2, context: 8, vocab: 16", 4, 3));
        assert_eq!(ranks.len(), 2);
        for r in &ranks {
            assert!(r["peak_rss_bytes"].as_u64().unwrap() > 0);
            assert_eq!(r["steps"].as_array().unwrap().len(), 4);
        }
        println!("zero smoke: zero 3 on 2 ranks reported {} parameter bytes on rank 0", r0(&ranks));
        return;
    }
    let gpt = "layers: 4, d_model: 384, heads: 6, context: 64, vocab: 256";
    println!("ZeRO on 2 data-parallel ranks: GPT 4x384 (context 64, vocab 256), global batch 8, 10 steps; rank 0");
    println!(
        "{:>4} {:>14} {:>11} {:>10} {:>14} {:>15} {:>12} {:>10}",
        "zero", "peak RSS (MiB)", "params", "grads", "optimizer", "activations", "step (ms)", "vs zero 0"
    );
    let mut base = None;
    for zero in 0..=3u8 {
        let d = tempfile::tempdir_in(dir.path()).unwrap();
        let ranks = run_with_stats(d.path(), &job(gpt, 10, zero));
        let r = &ranks[0];
        let m = &r["memory"];
        let step = median_step_ms(r);
        let base = *base.get_or_insert(step);
        println!(
            "{zero:>4} {:>14.1} {:>11.1} {:>10.1} {:>14.1} {:>15.1} {step:>12.1} {:>10.2}",
            mib(&r["peak_rss_bytes"]),
            mib(&m["params"]),
            mib(&m["grads"]),
            mib(&m["optimizer"]),
            mib(&m["activations"]),
            step / base
        );
    }
}

fn r0(ranks: &[serde_json::Value]) -> u64 {
    ranks[0]["memory"]["params"].as_u64().unwrap()
}
