//! `data.kind: text` with a `tokenizer` against Python's `tokenizers`: a
//! byte-level BPE trained in the test by the Python package
//! (`scripts/oracle/tokenizer_hf.py`) on a text with Unicode, CRLF lines,
//! runs of blank lines and an added token; flotilla's ids equal the Python
//! tokenizer's; a GPT trained on the text through the job's token cache has
//! the losses of the same job fed Python's ids as `kind: tokens`; a
//! tokenizer too big for the model is a job-file error.
//!
//! Needs `.deps/venv` with `tokenizers` (`./scripts/bootstrap --python`).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::*;

/// The venv's python, which must have `tokenizers` and numpy.
fn tokenizers_python() -> PathBuf {
    let py = repo().join(".deps/venv/bin/python");
    let ok = Command::new(&py).args(["-c", "import tokenizers, numpy"]).output().is_ok_and(|o| o.status.success());
    assert!(ok, "{} lacks tokenizers: run `./scripts/bootstrap --python` (./scripts/test does)", py.display());
    py
}

/// A corpus in `dir/corpus.txt`: the README, and lines that exercise the
/// edges of byte-level tokenization. Python trains its tokenizer on it and
/// writes `tokenizer.json` and its ids (`ids.u16`) into `dir`.
fn python_side(dir: &Path) -> (PathBuf, Vec<u32>) {
    let mut text = std::fs::read_to_string(repo().join("README.md")).unwrap();
    text.push_str(
        "emoji 🚀, 日本語 and é\r\ntrailing spaces   \r\n\n\n\n   indented<|endoftext|>a new story\tafter a tab\n",
    );
    text.push_str("a last line without a line break");
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, &text).unwrap();
    let out = Command::new(tokenizers_python())
        .arg(repo().join("scripts/oracle/tokenizer_hf.py"))
        .args(["--text", corpus.to_str().unwrap(), "--out", dir.to_str().unwrap()])
        .output()
        .expect("start tokenizer_hf.py");
    assert!(out.status.success(), "tokenizer_hf.py: {}", String::from_utf8_lossy(&out.stderr));
    let ids = std::fs::read(dir.join("ids.u16")).unwrap();
    let ids: Vec<u32> = ids.chunks_exact(2).map(|c| u32::from(u16::from_le_bytes([c[0], c[1]]))).collect();
    // A real tokenizer: merges in use, fewer ids than bytes.
    assert!(
        ids.iter().any(|&i| i > 256) && ids.len() * 3 < text.len() * 2,
        "{} ids for {} bytes",
        ids.len(),
        text.len()
    );
    (corpus, ids)
}

fn u32s(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

#[test]
fn flotilla_tokenizes_as_python_does_and_trains_on_the_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (corpus, python_ids) = python_side(d);
    let tokenizer = d.join("tokenizer.json");

    // The ids, by `flotilla tokenize`.
    let out = flotilla(d, &["tokenize", tokenizer.to_str().unwrap(), corpus.to_str().unwrap(), "ids.u32"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ours = u32s(&std::fs::read(d.join("ids.u32")).unwrap());
    assert_eq!(ours.len(), python_ids.len(), "as many ids as Python's");
    if let Some(i) = (0..ours.len()).find(|&i| ours[i] != python_ids[i]) {
        panic!("id {i} is {} where Python's is {}", ours[i], python_ids[i]);
    }

    // A job on the text with the tokenizer (two workers, each of which may
    // find no cache at its start and tokenize) and one on Python's ids: the
    // same losses.
    let job = |name: &str, data: &str| {
        format!(
            "name: {name}
model: {{kind: gpt, layers: 1, d_model: 16, heads: 2, context: 16, vocab: 512}}
data: {data}
train: {{steps: 4, global_batch: 8, seed: 3, optimizer: {{lr: 0.01}}}}
workers: {{min: 2, max: 2}}
"
        )
    };
    let losses = |name: &str, yaml: &str| -> Vec<(u64, f64, u64)> {
        let file = job_file(d, name, yaml);
        let out = flotilla(d, &["run", file.to_str().unwrap()]);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        read_metrics(&d.join(format!("runs/{name}-1/final/metrics.jsonl")))
    };
    let text = losses("text", &job("text", "{kind: text, path: corpus.txt, tokenizer: tokenizer.json}"));
    let tokens = losses("tokens", &job("tokens", "{kind: tokens, path: ids.u16, dtype: u16}"));
    assert_eq!(text.len(), 4);
    assert_eq!(text, tokens, "(step, loss, world) of the text job against the token job");

    // The job's cache holds Python's ids, after a 56-byte header.
    let cache: Vec<_> = std::fs::read_dir(d.join("runs/text-1/tokens")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(cache.len(), 1, "{cache:?}");
    let bytes = std::fs::read(&cache[0]).unwrap();
    assert_eq!(u32s(&bytes[56..]), python_ids);
}

#[test]
fn a_tokenizer_with_more_ids_than_the_model_is_a_job_file_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    python_side(d);
    let file = job_file(
        d,
        "small",
        "name: small
model: {kind: gpt, layers: 1, d_model: 16, heads: 2, context: 16, vocab: 300}
data: {kind: text, path: corpus.txt, tokenizer: tokenizer.json}
train: {steps: 1, global_batch: 1}
",
    );
    let out = flotilla(d, &["validate", file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("small.yaml:3:") && err.contains("data.tokenizer"), "{err}");
    assert!(err.contains("token ids up to 511, more than model.vocab (300, line 2)"), "{err}");
}
