//! Whether reading a sharded token corpus from an object store keeps up
//! with training, both sides in the same run: the tokens/s one worker reads
//! from s3s-fs (on loopback) through the corpus reader, in the order the
//! sampler asks for them, with read-ahead (two steps asked ahead, as the
//! train loop does) and without; the tokens/s a training step of a small
//! GPT consumes; and the GPT's median step time on that corpus in s3s-fs
//! against the same job on in-memory synthetic data.
//!
//! `cargo bench --bench shard_reading` prints the table; under `cargo test`
//! it runs a tiny corpus and checks that the reader delivers every window.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use flotilla::jobspec::{TokenDtype, TokenFormat};
use flotilla::trainer::rng::SplitMix64;
use flotilla::trainer::sampler::Sampler;
use flotilla::trainer::shards::Corpus;
use support::*;

struct Size {
    shards: usize,
    tokens_per_shard: usize,
    context: usize,
    vocab: usize,
    gpt: &'static str,
    global_batch: usize,
    read_steps: u64,
    train_steps: u64,
}

const SMOKE: Size = Size {
    shards: 3,
    tokens_per_shard: 4000,
    context: 16,
    vocab: 64,
    gpt: "layers: 1, d_model: 16, heads: 2",
    global_batch: 8,
    read_steps: 20,
    train_steps: 3,
};

const BENCH: Size = Size {
    shards: 8,
    tokens_per_shard: 2 << 20,
    context: 256,
    vocab: 4096,
    gpt: "layers: 4, d_model: 256, heads: 4",
    global_batch: 16,
    read_steps: 200,
    train_steps: 20,
};

/// Reads `steps` steps of `global_batch` samples the way one worker of a
/// 1-worker job does; returns input tokens per second.
fn read_rate(z: &Size, url: &str, ahead: u64) -> f64 {
    let corpus = Corpus::open(&[url.to_string()], TokenDtype::U16, TokenFormat::Raw, z.context, z.vocab).unwrap();
    let mut sampler = Sampler::new(corpus.len(), 11, z.global_batch as u64);
    let started = Instant::now();
    for s in 0..ahead {
        corpus.prefetch(&sampler.indices(s, 0, 1));
    }
    let mut got = 0usize;
    for s in 0..z.read_steps {
        if ahead > 0 {
            corpus.prefetch(&sampler.indices(s + ahead, 0, 1));
        }
        let indices = sampler.indices(s, 0, 1);
        got += corpus.windows(&indices).unwrap().len();
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(got, z.read_steps as usize * z.global_batch * (z.context + 1), "every window delivered");
    (z.read_steps as usize * z.global_batch * z.context) as f64 / secs
}

/// Mean milliseconds a step after the first waits for its samples when each
/// step computes for `step` (a sleep: only the reading uses the processor),
/// with `ahead` steps read ahead. (The first step waits for its reads either way.)
fn wait_per_step(z: &Size, url: &str, ahead: u64, step: Duration, steps: u64) -> f64 {
    let corpus = Corpus::open(&[url.to_string()], TokenDtype::U16, TokenFormat::Raw, z.context, z.vocab).unwrap();
    let mut sampler = Sampler::new(corpus.len(), 12, z.global_batch as u64);
    for s in 0..ahead {
        corpus.prefetch(&sampler.indices(s, 0, 1));
    }
    let mut waited = Duration::ZERO;
    for s in 0..steps {
        if ahead > 0 {
            corpus.prefetch(&sampler.indices(s + ahead, 0, 1));
        }
        let indices = sampler.indices(s, 0, 1);
        let t = Instant::now();
        corpus.windows(&indices).unwrap();
        if s > 0 {
            waited += t.elapsed();
        }
        std::thread::sleep(step);
    }
    waited.as_secs_f64() * 1e3 / (steps - 1) as f64
}

fn job(z: &Size, data: &str) -> String {
    format!(
        "name: reading
model: {{kind: gpt, {}, context: {}, vocab: {}}}
data: {data}
train: {{steps: {}, global_batch: {}, seed: 3}}
",
        z.gpt, z.context, z.vocab, z.train_steps, z.global_batch
    )
}

fn median_step_ms(rank: &serde_json::Value) -> f64 {
    let mut v: Vec<f64> =
        rank["steps"].as_array().unwrap().iter().skip(2).map(|s| s["wall_ms"].as_f64().unwrap()).collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let z = if std::env::args().any(|a| a == "--bench") { BENCH } else { SMOKE };
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(dir.path(), &["corpus"]);
    for (k, v) in s3.env() {
        // SAFETY: set before this process starts any other thread.
        unsafe { std::env::set_var(k, v) };
    }
    let folder = s3.root.join("corpus/train");
    std::fs::create_dir_all(&folder).unwrap();
    for k in 0..z.shards {
        let mut g = SplitMix64::keyed(7, 1, k as u64);
        let bytes: Vec<u8> =
            (0..z.tokens_per_shard).flat_map(|_| (g.below(z.vocab as u64) as u16).to_le_bytes()).collect();
        std::fs::write(folder.join(format!("part-{k:03}.u16")), bytes).unwrap();
    }
    let url = "s3://corpus/train/part-*.u16";
    let with_ahead = read_rate(&z, url, 2);
    let without = read_rate(&z, url, 0);

    let run = |data: &str| {
        let d = tempfile::tempdir_in(dir.path()).unwrap();
        median_step_ms(&run_with_stats(d.path(), &job(&z, data))[0])
    };
    let synthetic = run("{kind: synthetic, seed: 1, samples: 4096}");
    let in_s3 = run(&format!("{{kind: tokens, path: '{url}'}}"));
    let consumed = (z.global_batch * z.context) as f64 / (synthetic / 1e3);
    let step = Duration::from_secs_f64(synthetic / 1e3);
    let waits = [2, 0].map(|ahead| wait_per_step(&z, url, ahead, step, z.read_steps / 10));

    println!(
        "corpus: {} shards of {} u16 tokens in s3s-fs; GPT {} context {} vocab {}, global batch {}, 1 worker",
        z.shards, z.tokens_per_shard, z.gpt, z.context, z.vocab, z.global_batch
    );
    println!("{:<44} {:>14} {:>18}", "", "tokens/s", "× step consumption");
    println!("{:<44} {:>14.0} {:>18.1}", "reader, read-ahead 2 steps", with_ahead, with_ahead / consumed);
    println!("{:<44} {:>14.0} {:>18.1}", "reader, no read-ahead", without, without / consumed);
    println!("{:<44} {:>14.0} {:>18.1}", "training step consumes", consumed, 1.0);
    println!(
        "steps of {synthetic:.0} ms (sleeping) wait for their samples (steps 2 on): {:.2} ms a step with read-ahead, \
         {:.2} ms without",
        waits[0], waits[1]
    );
    println!(
        "median step: {synthetic:.1} ms on synthetic data, {in_s3:.1} ms on the corpus in s3s-fs (s3 / synthetic = {:.3})",
        in_s3 / synthetic
    );
}
