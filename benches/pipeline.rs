//! Pipeline bubble: the idle fraction each stage measures under GPipe and
//! 1F1B, for p = 2 and 3 stages and m = 4 and 8 micro-batches, beside the
//! theoretical (p-1)/(m+p-1); and the peak activation memory of 1F1B
//! against GPipe's, in the same run.
//!
//! Each layout trains the same GPT (blocks split evenly over the stages)
//! through `flotilla run` with `FLOTILLA_STATS_DIR` set: every rank writes
//! its per-step timings and the memory it held. A stage's idle fraction is
//! the time it waited for activations or their gradients over its passes'
//! time, averaged over the steps after the first two; activations are the
//! peak heap growth of a step's passes.
//!
//! `cargo bench --bench pipeline` runs the full table (a few minutes on two
//! cores; with three stages on two cores the stages also share cores, which
//! the note under the table states). Under `cargo test` it runs one tiny
//! layout and checks the statistics are there.

#[path = "../tests/support/mod.rs"]
mod support;

use support::*;

fn job(gpt: &str, global: usize, steps: u64, pp: usize, m: usize, schedule: &str) -> String {
    format!(
        "name: bubble
model: {{kind: gpt, {gpt}}}
data: {{kind: synthetic, seed: 1, samples: 4096}}
train: {{steps: {steps}, global_batch: {global}, seed: 3}}
workers: {{min: {pp}, max: {pp}}}
parallelism: {{pp: {pp}, micro_batches: {m}, schedule: {schedule}}}
"
    )
}

/// Mean idle fraction of a rank over its steps after the first two.
fn idle(rank: &serde_json::Value) -> f64 {
    let steps = rank["steps"].as_array().unwrap();
    let steady: Vec<&serde_json::Value> = steps.iter().skip(2).collect();
    let steady = if steady.is_empty() { steps.iter().collect() } else { steady };
    let f: Vec<f64> =
        steady.iter().map(|s| s["waited_ms"].as_f64().unwrap() / s["passes_ms"].as_f64().unwrap().max(1e-9)).collect();
    f.iter().sum::<f64>() / f.len() as f64
}

fn activations(rank: &serde_json::Value) -> f64 {
    rank["memory"]["activations"].as_f64().unwrap()
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    if !std::env::args().any(|a| a == "--bench") {
        let ranks = run_with_stats(
            dir.path(),
            &job("layers: 2, d_model: 16, heads: 2, context: 8, vocab: 16", 8, 4, 2, 4, "1f1b"),
        );
        assert_eq!(ranks.len(), 2);
        for r in &ranks {
            let f = idle(r);
            assert!((0.0..1.0).contains(&f), "idle fraction {f}");
            assert!(activations(r) > 0.0);
        }
        println!("pipeline smoke: 2 stages ran, idle fractions {:.2} and {:.2}", idle(&ranks[0]), idle(&ranks[1]));
        return;
    }
    let gpt = "layers: 6, d_model: 96, heads: 4, context: 64, vocab: 64";
    println!("pipeline bubble: GPT 6x96 (context 64), global batch 32, 8 steps; idle = waiting / passes, steps 3-8");
    println!(
        "{:>2} {:>2} {:>9} {:>8} {:>24} {:>10} {:>22}",
        "p", "m", "schedule", "theory", "idle per stage", "mean idle", "activations per stage"
    );
    for p in [2usize, 3] {
        for m in [4usize, 8] {
            let mut act = Vec::new();
            for schedule in ["gpipe", "1f1b"] {
                let d = tempfile::tempdir_in(dir.path()).unwrap();
                let ranks = run_with_stats(d.path(), &job(gpt, 32, 8, p, m, schedule));
                let theory = (p - 1) as f64 / (m + p - 1) as f64;
                let per: Vec<f64> = ranks.iter().map(idle).collect();
                let mean = per.iter().sum::<f64>() / per.len() as f64;
                let mib: Vec<f64> = ranks.iter().map(|r| activations(r) / (1 << 20) as f64).collect();
                println!(
                    "{p:>2} {m:>2} {schedule:>9} {theory:>8.2} {:>24} {mean:>10.2} {:>22}",
                    per.iter().map(|f| format!("{f:.2}")).collect::<Vec<_>>().join(" "),
                    mib.iter().map(|a| format!("{a:.1}")).collect::<Vec<_>>().join(" ") + " MiB"
                );
                act.push(mib[0]);
            }
            println!("{:>2} {m:>2} stage 0 activations, 1f1b / gpipe: {:.2}", "", act[1] / act[0]);
        }
    }
}
