//! Data sets: synthetic ones generated from a seed (identical on every rank),
//! labelled feature vectors from a safetensors file, token streams from a
//! text file (its bytes, or the ids of a tokenizer, see `tokenize`), and
//! corpora of token shards read on demand (`crate::shards`). A sample is
//! addressed by its index; the sampler decides which indices a rank uses.

use std::path::Path;

use flotilla_jobspec::{DataSpec, GptSpec, MlpSpec, ModelSpec};
use safetensors::{Dtype, SafeTensors};
use tch::Tensor;

use crate::rng::SplitMix64;
use crate::shards::Corpus;
use crate::tokenize::TokenCache;

const TEACHER: u64 = 1;
const FEATURES: u64 = 2;
const TRANSITIONS: u64 = 3;
const SEQUENCE: u64 = 4;
/// Successors each token may have in the synthetic token chain.
const SYNTHETIC_BRANCHING: u64 = 3;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("read data file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("data file {path}: {message}")]
    Format { path: String, message: String },
    /// Reading samples of a corpus failed after the start.
    #[error("read samples: {0}")]
    Read(String),
}

#[derive(Debug)]
pub enum Dataset {
    /// Feature vectors with class labels.
    Classes { inputs: usize, x: Vec<f32>, y: Vec<i64> },
    /// Token windows of `context + 1` tokens, sample `i` starting at `i * stride`.
    Sequences { context: usize, stride: usize, count: usize, tokens: Vec<u32> },
    /// Token windows read from shards as they are needed (`kind: tokens`).
    Corpus(Corpus),
}

impl Dataset {
    pub fn len(&self) -> u64 {
        match self {
            Dataset::Classes { y, .. } => y.len() as u64,
            Dataset::Sequences { count, .. } => *count as u64,
            Dataset::Corpus(c) => c.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts reading the samples `indices` ahead of their [`Dataset::batch`]
    /// (a corpus of shards; the other kinds are in memory already).
    pub fn prefetch(&self, indices: &[u64]) {
        if let Dataset::Corpus(c) = self {
            c.prefetch(indices);
        }
    }

    /// Inputs and targets of the samples at `indices`.
    pub fn batch(&self, indices: &[u64]) -> Result<(Tensor, Tensor), DataError> {
        let b = indices.len() as i64;
        Ok(match self {
            Dataset::Classes { inputs, x, y } => {
                let mut xs = Vec::with_capacity(indices.len() * inputs);
                let mut ys = Vec::with_capacity(indices.len());
                for &i in indices {
                    let i = i as usize;
                    xs.extend_from_slice(&x[i * inputs..(i + 1) * inputs]);
                    ys.push(y[i]);
                }
                (Tensor::from_slice(&xs).view([b, *inputs as i64]), Tensor::from_slice(&ys))
            }
            Dataset::Corpus(c) => {
                let win: Vec<i64> = c.windows(indices)?.into_iter().map(i64::from).collect();
                shift(&win, b, c.context())
            }
            Dataset::Sequences { context, stride, tokens, .. } => {
                let w = context + 1;
                let mut win = Vec::with_capacity(indices.len() * w);
                for &i in indices {
                    let start = i as usize * stride;
                    win.extend(tokens[start..start + w].iter().map(|t| i64::from(*t)));
                }
                shift(&win, b, *context)
            }
        })
    }

    /// Loads or generates the data set a job file describes; text with a
    /// tokenizer goes through the job's token `cache` when there is one.
    pub fn load(data: &DataSpec, model: &ModelSpec, cache: Option<&TokenCache>) -> Result<Dataset, DataError> {
        match (data, model) {
            (DataSpec::Synthetic { seed, samples }, ModelSpec::Mlp(m)) => Ok(synthetic_classes(m, *seed, *samples)),
            (DataSpec::Features { path }, ModelSpec::Mlp(m)) => load_features(Path::new(path), m),
            (data, model) if model.sequence().is_some() => {
                let (context, vocab) = model.sequence().expect("a language model");
                match data {
                    DataSpec::Synthetic { seed, samples } => Ok(synthetic_tokens(context, vocab, *seed, *samples)),
                    DataSpec::Tokens { path, dtype, format } => {
                        Corpus::open(path, *dtype, *format, context, vocab).map(Dataset::Corpus)
                    }
                    DataSpec::Text { path, tokenizer: None } => {
                        let tokens = read(path)?.into_iter().map(u32::from).collect();
                        sequences(path, tokens, context, vocab)
                    }
                    DataSpec::Text { path, tokenizer: Some(tokenizer) } => {
                        let tokens = crate::tokenize::text_tokens(path, tokenizer, cache)?;
                        sequences(path, tokens, context, vocab)
                    }
                    DataSpec::Features { .. } => {
                        Err(DataError::Format { path: "<data>".into(), message: "features feed only an MLP".into() })
                    }
                }
            }
            (_, m) => Err(DataError::Format {
                path: "<data>".into(),
                message: format!("this data kind cannot feed a {} model", m.kind()),
            }),
        }
    }
}

/// Inputs (the first `context` tokens) and targets (the last `context`) of
/// `b` windows of `context + 1` tokens, back to back in `win`.
fn shift(win: &[i64], b: i64, context: usize) -> (Tensor, Tensor) {
    let all = Tensor::from_slice(win).view([b, context as i64 + 1]);
    (all.narrow(1, 0, context as i64), all.narrow(1, 1, context as i64))
}

fn read(path: &str) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|source| DataError::Io { path: path.to_string(), source })
}

/// Gaussian features labelled by a fixed random linear teacher: learnable,
/// and the same on every machine for the same seed.
pub fn synthetic_classes(m: &MlpSpec, seed: u64, samples: u64) -> Dataset {
    let inputs = m.layers[0];
    let classes = *m.layers.last().expect("validated: at least two layers");
    let mut g = SplitMix64::keyed(seed, TEACHER, 0);
    let teacher: Vec<f64> = (0..inputs * classes).map(|_| g.normal()).collect();
    let mut x = Vec::with_capacity(samples as usize * inputs);
    let mut y = Vec::with_capacity(samples as usize);
    for i in 0..samples {
        let mut g = SplitMix64::keyed(seed, FEATURES, i);
        let row: Vec<f64> = (0..inputs).map(|_| g.normal()).collect();
        let best = (0..classes)
            .map(|c| (0..inputs).map(|k| row[k] * teacher[k * classes + c]).sum::<f64>())
            .enumerate()
            .fold((0, f64::NEG_INFINITY), |acc, (c, s)| if s > acc.1 { (c, s) } else { acc })
            .0;
        x.extend(row.iter().map(|v| *v as f32));
        y.push(best as i64);
    }
    Dataset::Classes { inputs, x, y }
}

/// Token sequences from a fixed random chain where each token has a few
/// possible successors: a language model can learn it down to ln(3) nats.
pub fn synthetic_sequences(gpt: &GptSpec, seed: u64, samples: u64) -> Dataset {
    synthetic_tokens(gpt.context, gpt.vocab, seed, samples)
}

fn synthetic_tokens(context: usize, vocab: usize, seed: u64, samples: u64) -> Dataset {
    let vocab = vocab as u64;
    let w = context + 1;
    let successors: Vec<Vec<u32>> = (0..vocab)
        .map(|t| {
            let mut g = SplitMix64::keyed(seed, TRANSITIONS, t);
            (0..SYNTHETIC_BRANCHING).map(|_| g.below(vocab) as u32).collect()
        })
        .collect();
    let mut tokens = Vec::with_capacity(samples as usize * w);
    for i in 0..samples {
        let mut g = SplitMix64::keyed(seed, SEQUENCE, i);
        let mut t = g.below(vocab) as u32;
        for _ in 0..w {
            tokens.push(t);
            t = successors[t as usize][g.below(SYNTHETIC_BRANCHING) as usize];
        }
    }
    Dataset::Sequences { context, stride: w, count: samples as usize, tokens }
}

fn sequences(path: &str, tokens: Vec<u32>, context: usize, vocab: usize) -> Result<Dataset, DataError> {
    let format = |message: String| DataError::Format { path: path.to_string(), message };
    if let Some((pos, bad)) = tokens.iter().enumerate().find(|(_, t)| **t as usize >= vocab) {
        return Err(format(format!("token {bad} at position {pos} is outside the model's vocab of {vocab}")));
    }
    if tokens.len() < context + 1 {
        return Err(format(format!("{} tokens are fewer than one sample (context {context} + 1)", tokens.len())));
    }
    let count = (tokens.len() - 1) / context;
    Ok(Dataset::Sequences { context, stride: context, count, tokens })
}

fn load_features(path: &Path, m: &MlpSpec) -> Result<Dataset, DataError> {
    let name = path.display().to_string();
    let format = |message: String| DataError::Format { path: name.clone(), message };
    let bytes = std::fs::read(path).map_err(|source| DataError::Io { path: name.clone(), source })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| format(format!("not a safetensors file: {e}")))?;
    let x = st.tensor("x").map_err(|_| format("has no tensor `x` (f32 [N, inputs])".into()))?;
    let y = st.tensor("y").map_err(|_| format("has no tensor `y` (i64 [N] labels)".into()))?;
    if x.dtype() != Dtype::F32 || x.shape().len() != 2 {
        return Err(format(format!("`x` must be f32 [N, inputs], got {:?} {:?}", x.dtype(), x.shape())));
    }
    if y.dtype() != Dtype::I64 || y.shape().len() != 1 {
        return Err(format(format!("`y` must be i64 [N], got {:?} {:?}", y.dtype(), y.shape())));
    }
    let (n, inputs) = (x.shape()[0], x.shape()[1]);
    if y.shape()[0] != n || n == 0 {
        return Err(format(format!("`x` has {n} rows and `y` {} labels; they must match and be > 0", y.shape()[0])));
    }
    if inputs != m.layers[0] {
        return Err(format(format!("`x` has {inputs} features but model.layers[0] is {}", m.layers[0])));
    }
    let classes = *m.layers.last().expect("validated") as i64;
    let xs: Vec<f32> = x.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let ys: Vec<i64> = y.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
    if let Some((i, bad)) = ys.iter().enumerate().find(|(_, l)| **l < 0 || **l >= classes) {
        return Err(format(format!("label {bad} of sample {i} is outside 0..{classes}")));
    }
    Ok(Dataset::Classes { inputs, x: xs, y: ys })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_classes_are_reproducible_and_use_every_class() {
        let m = MlpSpec { layers: vec![8, 16, 4] };
        let (a, b) = (synthetic_classes(&m, 3, 500), synthetic_classes(&m, 3, 500));
        let (Dataset::Classes { x: xa, y: ya, .. }, Dataset::Classes { x: xb, y: yb, .. }) = (&a, &b) else {
            unreachable!()
        };
        assert_eq!((xa, ya), (xb, yb));
        for c in 0..4 {
            assert!(ya.iter().filter(|l| **l == c).count() > 50, "class {c} is rare");
        }
    }

    #[test]
    fn token_windows_shift_targets_by_one() {
        let d = sequences("t", (0..13).collect(), 4, 16).unwrap();
        assert_eq!(d.len(), 3);
        let (x, y) = d.batch(&[1]).unwrap();
        assert_eq!(Vec::<i64>::try_from(x.view([-1])).unwrap(), vec![4, 5, 6, 7]);
        assert_eq!(Vec::<i64>::try_from(y.view([-1])).unwrap(), vec![5, 6, 7, 8]);
    }

    #[test]
    fn tokens_outside_the_vocab_are_rejected_with_their_position() {
        let err = sequences("t.bin", vec![0, 1, 9, 2], 2, 4).unwrap_err().to_string();
        assert!(err.contains("token 9 at position 2"), "{err}");
    }
}
