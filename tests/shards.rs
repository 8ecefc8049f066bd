//! A token corpus of many shards in a real S3-compatible store (s3s-fs on
//! loopback) trains exactly as the same shards on the local disk, named by
//! a list, by a pattern, or written as nanoGPT `.bin` shards; evaluation
//! data comes from the store the same way. A missing shard, or one shorter
//! than its header says, fails the job at its start, naming the shard.

mod support;

use std::path::Path;

use flotilla::jobspec::GptSpec;
use support::*;

const SHARDS: usize = 8;

fn gpt() -> GptSpec {
    GptSpec { layers: 1, d_model: 16, heads: 2, context: 8, vocab: 32 }
}

/// The synthetic chain's tokens, cut into `SHARDS` shards of unequal sizes.
fn shards(seed: u64, samples: u64) -> Vec<Vec<u16>> {
    use flotilla::trainer::data::{synthetic_sequences, Dataset};
    let Dataset::Sequences { tokens, .. } = synthetic_sequences(&gpt(), seed, samples) else { unreachable!() };
    let mut out = Vec::new();
    let mut rest: &[u32] = &tokens;
    for k in 0..SHARDS {
        let take = if k + 1 == SHARDS { rest.len() } else { rest.len() / (SHARDS - k) + 7 * k };
        let (head, tail) = rest.split_at(take.min(rest.len()));
        out.push(head.iter().map(|t| *t as u16).collect());
        rest = tail;
    }
    out
}

fn raw(tokens: &[u16]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
}

/// A nanoGPT shard whose header claims `claimed` tokens.
fn nanogpt(tokens: &[u16], claimed: usize) -> Vec<u8> {
    let mut header = [0i32; 256];
    header[..3].copy_from_slice(&[20240520, 1, claimed as i32]);
    let mut b: Vec<u8> = header.iter().flat_map(|v| v.to_le_bytes()).collect();
    b.extend(raw(tokens));
    b
}

fn write_all(dir: &Path, name: impl Fn(usize) -> String, bytes: impl Fn(&[u16]) -> Vec<u8>, parts: &[Vec<u16>]) {
    std::fs::create_dir_all(dir).unwrap();
    for (k, p) in parts.iter().enumerate() {
        std::fs::write(dir.join(name(k)), bytes(p)).unwrap();
    }
}

fn job(name: &str, data: &str, eval: &str) -> String {
    format!(
        "name: {name}
model: {{kind: gpt, layers: 1, d_model: 16, heads: 2, context: 8, vocab: 32}}
data: {data}
eval: {{data: {eval}, every: 4, batches: 2, batch: 6}}
train: {{steps: 12, global_batch: 8, micro_batch: 4, seed: 5}}
workers: {{min: 1, max: 1}}
"
    )
}

/// Runs `yaml` with `flotilla run` in `dir`, reaching `s3`; returns the
/// history (every line of the final metrics) or the run's output.
fn run(dir: &Path, s3: &S3Server, name: &str, yaml: &str) -> Result<Vec<serde_json::Value>, String> {
    let file = job_file(dir, name, yaml);
    let out = cmd().args(["run", file.to_str().unwrap()]).current_dir(dir).envs(s3.env()).output().unwrap();
    if !out.status.success() {
        return Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
    }
    let text = std::fs::read_to_string(dir.join(format!("runs/{name}-1/final/metrics.jsonl"))).unwrap();
    Ok(text.lines().map(|l| serde_json::from_str(l).unwrap()).collect())
}

/// (step, loss, eval loss) of a history, as bits.
fn curve(history: &[serde_json::Value]) -> Vec<(u64, u64, Option<u64>)> {
    history
        .iter()
        .map(|m| {
            let bits = |k: &str| m[k].as_f64().map(f64::to_bits);
            (m["step"].as_u64().unwrap(), bits("loss").unwrap(), bits("eval_loss"))
        })
        .collect()
}

#[test]
fn a_sharded_corpus_in_s3_trains_exactly_like_the_same_shards_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(dir.path(), &["corpus"]);
    let train = shards(3, 60);
    let val = shards(4, 40);
    let name = |k: usize| format!("part-{k:03}.u16");
    write_all(&dir.path().join("local/train"), name, raw, &train);
    write_all(&dir.path().join("local/val"), name, raw, &val);
    write_all(&s3.root.join("corpus/train"), name, raw, &train);
    write_all(&s3.root.join("corpus/val"), name, raw, &val);
    write_all(&s3.root.join("corpus/nano"), |k| format!("train_{k:06}.bin"), |t| nanogpt(t, t.len()), &train);
    // Not a shard of the corpus: the pattern leaves it out.
    std::fs::write(s3.root.join("corpus/train/README.txt"), "not tokens").unwrap();

    let listed: Vec<String> = (0..SHARDS).map(|k| format!("local/train/{}", name(k))).collect();
    let local = job(
        "local",
        &format!("{{kind: tokens, path: [{}]}}", listed.join(", ")),
        "{kind: tokens, path: 'local/val/*.u16'}",
    );
    let local = curve(&run(dir.path(), &s3, "local", &local).unwrap());
    assert_eq!(local.len(), 12);
    assert_eq!(local.iter().filter(|s| s.2.is_some()).map(|s| s.0).collect::<Vec<_>>(), vec![4, 8, 12]);

    let s3_eval = "{kind: tokens, path: 's3://corpus/val/part-*.u16'}";
    let in_s3 = job("ins3", "{kind: tokens, path: 's3://corpus/train/part-*.u16', dtype: u16}", s3_eval);
    assert_eq!(curve(&run(dir.path(), &s3, "ins3", &in_s3).unwrap()), local, "s3 and the local disk");
    let nano = job("nano", "{kind: tokens, path: 's3://corpus/nano/train_*.bin', format: nanogpt}", s3_eval);
    assert_eq!(curve(&run(dir.path(), &s3, "nano", &nano).unwrap()), local, "nanoGPT shards");
}

#[test]
fn a_missing_shard_or_one_shorter_than_its_header_fails_the_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(dir.path(), &["corpus"]);
    let train = shards(3, 30);
    write_all(&s3.root.join("corpus/raw"), |k| format!("part-{k}.u16"), raw, &train);
    let eval = "{kind: synthetic, seed: 1, samples: 20}";

    let missing = "s3://corpus/raw/part-9.u16";
    let yaml = job("missing", &format!("{{kind: tokens, path: ['s3://corpus/raw/part-0.u16', '{missing}']}}"), eval);
    let out = run(dir.path(), &s3, "missing", &yaml).unwrap_err();
    assert!(out.contains("job missing-1 failed"), "{out}");
    assert!(out.contains(&format!("data file {missing}: the shard is missing")), "{out}");

    // Shard 5's header claims ten tokens more than it holds.
    write_all(&s3.root.join("corpus/nano"), |k| format!("train_{k}.bin"), |t| nanogpt(t, t.len()), &train);
    std::fs::write(s3.root.join("corpus/nano/train_5.bin"), nanogpt(&train[5], train[5].len() + 10)).unwrap();
    let yaml = job("short", "{kind: tokens, path: 's3://corpus/nano/*.bin', format: nanogpt}", eval);
    let out = run(dir.path(), &s3, "short", &yaml).unwrap_err();
    assert!(out.contains("job short-1 failed"), "{out}");
    let want = format!("data file s3://corpus/nano/train_5.bin: the header says {} tokens", train[5].len() + 10);
    assert!(out.contains(&want) && out.contains("shorter than its header says"), "{out}");
}
