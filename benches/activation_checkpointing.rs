//! What activation checkpointing saves and costs, from the statistics every
//! rank writes (`FLOTILLA_STATS_DIR`), both sides in the same run: a GPT
//! trained with `train.activation_checkpointing` off and on, on one process
//! and as a 2-stage 1F1B pipeline: the activation bytes each rank keeps
//! during a step (the heap's peak growth, recomputation included), per unit
//! of the model, and the median step time.
//!
//! `cargo bench --bench activation_checkpointing` prints the table; under
//! `cargo test` it runs a tiny model with checkpointing on and checks that
//! the statistics are there.

#[path = "../tests/support/mod.rs"]
mod support;

use support::*;

fn job(gpt: &str, steps: u64, workers: usize, par: &str, on: bool) -> String {
    format!(
        "name: recompute
model: {{kind: gpt, {gpt}}}
data: {{kind: synthetic, seed: 1, samples: 512}}
train: {{steps: {steps}, global_batch: 16, micro_batch: 8, seed: 3, activation_checkpointing: {on}}}
workers: {{min: {workers}, max: {workers}}}
parallelism: {{{par}}}
"
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn median_step_ms(rank: &serde_json::Value) -> f64 {
    median(rank["steps"].as_array().unwrap().iter().skip(2).map(|s| s["wall_ms"].as_f64().unwrap()).collect())
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    if !std::env::args().any(|a| a == "--bench") {
        let tiny = "layers: 2, d_model: 16, heads: 2, context: 8, vocab: 16";
        let ranks = run_with_stats(dir.path(), &job(tiny, 3, 1, "dp: 1", true));
        assert_eq!(ranks.len(), 1);
        assert!(ranks[0]["memory"]["activations"].as_u64().unwrap() > 0);
        println!("activation checkpointing smoke: {} activation bytes", ranks[0]["memory"]["activations"]);
        return;
    }
    let layers = 6;
    let gpt = format!("layers: {layers}, d_model: 256, heads: 4, context: 128, vocab: 256");
    // Units: the embedding, each block, the head.
    let units = (layers + 2) as f64;
    println!("GPT {layers}x256 (context 128, vocab 256), global batch 16 in micro-batches of 8, 12 steps");
    println!(
        "{:<22} {:>5} {:>16} {:>16} {:>10} {:>10} {:>9}",
        "layout", "rank", "activations MiB", "per unit MiB", "off (ms)", "on (ms)", "on/off"
    );
    for (par, workers) in [("dp: 1", 1), ("pp: 2, schedule: 1f1b", 2)] {
        let run = |on: bool| {
            let d = tempfile::tempdir_in(dir.path()).unwrap();
            run_with_stats(d.path(), &job(&gpt, 12, workers, par, on))
        };
        let (off, on) = (run(false), run(true));
        for (r, (a, b)) in off.iter().zip(&on).enumerate() {
            let mib = |v: &serde_json::Value| v["memory"]["activations"].as_f64().unwrap() / (1 << 20) as f64;
            let share = units / workers as f64;
            let (t_off, t_on) = (median_step_ms(a), median_step_ms(b));
            println!(
                "{par:<22} {r:>5} {:>7.1} -> {:>6.1} {:>7.2} -> {:>6.2} {t_off:>10.1} {t_on:>10.1} {:>9.2}",
                mib(a),
                mib(b),
                mib(a) / share,
                mib(b) / share,
                t_on / t_off
            );
        }
    }
}
