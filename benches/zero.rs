//! ZeRO and overlap, from the statistics every rank writes
//! (`FLOTILLA_STATS_DIR`), all measured in the same run:
//!
//! 1. `zero: 0..3` on two data-parallel ranks: the bytes rank 0 holds, its
//!    peak resident memory, the median step time relative to `zero: 0`,
//!    and the share of a step spent waiting on collectives;
//! 2. overlap: the same step with `parallelism.overlap` off (every
//!    collective after the passes) and on (gradients reduced while the
//!    backward pass of the layers before runs; ZeRO-3's next layer gathered
//!    while one computes), for `zero: 0` and `zero: 3`;
//! 3. ZeRO-3 on 1, 2 and 4 ranks of a larger GPT: each rank's peak resident
//!    memory once it has built its state (before the first step) and at the
//!    end, which fall with the group's size because a rank draws the
//!    initial weights one layer at a time and keeps only its chunks.
//!
//! `cargo bench --bench zero` prints the tables; under `cargo test` it runs a
//! tiny model under `zero: 3` and checks that the statistics are there.

#[path = "../tests/support/mod.rs"]
mod support;

use support::*;

fn job(gpt: &str, steps: u64, global: usize, ranks: usize, zero: u8, overlap: bool) -> String {
    format!(
        "name: zero
model: {{kind: gpt, {gpt}}}
data: {{kind: synthetic, seed: 1, samples: 512}}
train: {{steps: {steps}, global_batch: {global}, seed: 3}}
workers: {{min: {ranks}, max: {ranks}}}
parallelism: {{dp: {ranks}, zero: {zero}, micro_batches: 2, overlap: {overlap}}}
"
    )
}

fn steady<'a>(rank: &'a serde_json::Value) -> Vec<&'a serde_json::Value> {
    rank["steps"].as_array().unwrap().iter().skip(2).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn median_step_ms(rank: &serde_json::Value) -> f64 {
    median(steady(rank).iter().map(|s| s["wall_ms"].as_f64().unwrap()).collect())
}

/// The share of the steady steps' time rank `r` spent waiting on collectives.
fn comm_share(rank: &serde_json::Value) -> f64 {
    let s = steady(rank);
    let wait: f64 = s.iter().map(|s| s["comm_wait_ms"].as_f64().unwrap()).sum();
    let wall: f64 = s.iter().map(|s| s["wall_ms"].as_f64().unwrap()).sum();
    wait / wall
}

fn mib(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap() / (1 << 20) as f64
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    if !std::env::args().any(|a| a == "--bench") {
        let tiny = "layers: 1, d_model: 16, heads: 2, context: 8, vocab: 16";
        let ranks = run_with_stats(dir.path(), &job(tiny, 4, 8, 2, 3, true));
        assert_eq!(ranks.len(), 2);
        for r in &ranks {
            assert!(r["peak_rss_bytes"].as_u64().unwrap() > 0);
            assert!(r["start_peak_rss_bytes"].as_u64().unwrap() > 0);
            assert_eq!(r["steps"].as_array().unwrap().len(), 4);
            assert!(r["steps"][0]["comm_wait_ms"].as_f64().is_some());
        }
        println!("zero smoke: zero 3 on 2 ranks reported {} parameter bytes on rank 0", ranks[0]["memory"]["params"]);
        return;
    }
    let gpt = "layers: 4, d_model: 384, heads: 6, context: 64, vocab: 256";
    let run = |zero: u8, overlap: bool| {
        let d = tempfile::tempdir_in(dir.path()).unwrap();
        run_with_stats(d.path(), &job(gpt, 10, 8, 2, zero, overlap))
    };
    println!("ZeRO on 2 data-parallel ranks: GPT 4x384 (context 64, vocab 256), global batch 8, 10 steps; rank 0");
    println!(
        "{:>4} {:>14} {:>8} {:>8} {:>10} {:>12} {:>10} {:>10} {:>11}",
        "zero", "peak RSS (MiB)", "params", "grads", "optimizer", "activations", "step (ms)", "vs zero 0", "comm wait"
    );
    let mut base = None;
    let mut with_overlap = Vec::new();
    for zero in 0..=3u8 {
        let ranks = run(zero, true);
        let r = &ranks[0];
        let m = &r["memory"];
        let step = median_step_ms(r);
        let base = *base.get_or_insert(step);
        println!(
            "{zero:>4} {:>14.1} {:>8.1} {:>8.1} {:>10.1} {:>12.1} {step:>10.1} {:>10.2} {:>10.0}%",
            mib(&r["peak_rss_bytes"]),
            mib(&m["params"]),
            mib(&m["grads"]),
            mib(&m["optimizer"]),
            mib(&m["activations"]),
            step / base,
            100.0 * comm_share(r)
        );
        with_overlap.push((zero, step, comm_share(r)));
    }
    println!();
    println!("overlap of communication with computation (same job; median step, share of it waiting on collectives)");
    println!("{:>4} {:>16} {:>12} {:>16} {:>12}", "zero", "off: step (ms)", "comm wait", "on: step (ms)", "comm wait");
    for zero in [0u8, 3] {
        let off = run(zero, false);
        let (_, on_step, on_share) = with_overlap.iter().find(|(z, _, _)| *z == zero).copied().unwrap();
        println!(
            "{zero:>4} {:>16.1} {:>11.0}% {on_step:>16.1} {:>11.0}%",
            median_step_ms(&off[0]),
            100.0 * comm_share(&off[0]),
            100.0 * on_share
        );
    }
    println!();
    let big = "layers: 4, d_model: 768, heads: 12, context: 32, vocab: 256";
    println!("ZeRO-3 of a GPT 4x768 (28.7 M parameters, 110 MiB of f32), global batch 8, 3 steps; per rank");
    println!(
        "{:>5} {:>22} {:>22} {:>16}",
        "ranks", "peak RSS at start (MiB)", "peak RSS at end (MiB)", "params held (MiB)"
    );
    for ranks in [1usize, 2, 4] {
        let d = tempfile::tempdir_in(dir.path()).unwrap();
        let stats = run_with_stats(d.path(), &job(big, 3, 8, ranks, 3, true));
        let col = |k: &str| stats.iter().map(|r| format!("{:.0}", mib(&r[k]))).collect::<Vec<_>>().join(" ");
        let params = stats.iter().map(|r| format!("{:.1}", mib(&r["memory"]["params"]))).collect::<Vec<_>>().join(" ");
        println!("{ranks:>5} {:>22} {:>22} {params:>16}", col("start_peak_rss_bytes"), col("peak_rss_bytes"));
    }
}
