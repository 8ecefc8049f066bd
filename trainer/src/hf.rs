//! Hugging Face model folders in and out: the weights of `model.init:
//! pretrained` read from `model.safetensors` or a sharded
//! `model.safetensors.index.json` (f32, bf16 or f16), and the
//! `config.json` written beside a Llama's final weights.
//!
//! Opening a folder reads only the safetensors headers and checks them
//! against the model's layout: a missing, extra or mis-shaped tensor is an
//! error naming it. A rank then reads the bytes of its own units' tensors
//! only ([`HfWeights::unit`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde_json::Value;
use tch::{Kind, Tensor};

use flotilla_jobspec::{hf_config, LlamaSpec, ModelSpec};

use crate::checkpoint::Layout;
use crate::model::{self, llama, Unit};

/// Largest safetensors header read (transformers' own limit is 100 MB).
const HEADER_MAX_BYTES: u64 = 100 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error("read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Format { path: String, message: String },
    #[error("{folder} lacks the tensor `{name}` the model needs")]
    Missing { folder: String, name: String },
    #[error("{folder} holds the tensor `{name}`, which the model does not have")]
    Extra { folder: String, name: String },
    #[error("the tensor `{name}` in {path} has shape {found:?}; the model needs {expected:?}")]
    Shape { path: String, name: String, expected: Vec<usize>, found: Vec<usize> },
}

/// Where one tensor lies.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    kind: Kind,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

/// A model folder's weights, checked against a layout, read on demand.
#[derive(Debug)]
pub struct HfWeights {
    files: Vec<PathBuf>,
    entries: BTreeMap<String, Entry>,
}

impl HfWeights {
    /// Reads the headers of `dir`'s weights and checks every tensor's name
    /// and shape against `layout`. With `tied` embeddings (the config's
    /// `tie_word_embeddings`) the output projection is read from the token
    /// embedding, as transformers does: `lm_head.weight` may be absent, and
    /// is ignored when present.
    pub fn open(dir: &Path, layout: &Layout, tied: bool) -> Result<HfWeights, HfError> {
        let folder = dir.display().to_string();
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> =
            if index.exists() { shard_files(dir, &index)? } else { vec![dir.join("model.safetensors")] };
        let mut entries = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            for (name, mut e) in read_header(f)? {
                e.file = i;
                if entries.insert(name.clone(), e).is_some() {
                    return Err(HfError::Format {
                        path: f.display().to_string(),
                        message: format!("the tensor `{name}` is in more than one file"),
                    });
                }
            }
        }
        if tied {
            if let Some(e) = entries.get(llama::EMBEDDING).cloned() {
                entries.insert(llama::LM_HEAD.to_string(), e);
            }
        }
        for (name, shape) in layout.names.iter().zip(&layout.shapes) {
            let e = entries.get(name).ok_or_else(|| HfError::Missing { folder: folder.clone(), name: name.clone() })?;
            if &e.shape != shape {
                return Err(HfError::Shape {
                    path: files[e.file].display().to_string(),
                    name: name.clone(),
                    expected: shape.clone(),
                    found: e.shape.clone(),
                });
            }
        }
        if let Some(extra) = entries.keys().find(|n| !layout.names.contains(n)) {
            return Err(HfError::Extra { folder, name: extra.clone() });
        }
        Ok(HfWeights { files, entries })
    }

    /// The named tensors, read from their files, as one flat f32 tensor in
    /// the order given (a unit's parameters, as `model::UnitInit` yields).
    pub fn unit(&self, names: &[String]) -> Result<Tensor, HfError> {
        let mut parts = Vec::with_capacity(names.len());
        for name in names {
            let e = &self.entries[name];
            let path = &self.files[e.file];
            let io = |source| HfError::Io { path: path.display().to_string(), source };
            let mut f = File::open(path).map_err(io)?;
            f.seek(SeekFrom::Start(e.start)).map_err(io)?;
            let mut bytes = vec![0u8; (e.end - e.start) as usize];
            f.read_exact(&mut bytes).map_err(io)?;
            let shape: Vec<i64> = e.shape.iter().map(|&d| d as i64).collect();
            let t = Tensor::f_from_data_size(&bytes, &shape, e.kind).map_err(|err| HfError::Format {
                path: path.display().to_string(),
                message: format!("the tensor `{name}`: {err}"),
            })?;
            parts.push(t.to_kind(Kind::Float).reshape([-1]));
        }
        Ok(Tensor::cat(&parts, 0))
    }
}

/// The shard files a `model.safetensors.index.json` names, each once, in
/// the order first named.
fn shard_files(dir: &Path, index: &Path) -> Result<Vec<PathBuf>, HfError> {
    let path = index.display().to_string();
    let bad = |message: String| HfError::Format { path: path.clone(), message };
    let text = std::fs::read_to_string(index).map_err(|source| HfError::Io { path: path.clone(), source })?;
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| bad("has no `weight_map` object".into()))?;
    let mut files: Vec<PathBuf> = Vec::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| bad(format!("the file of `{name}` is not a string")))?;
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(bad(format!("the file {file:?} of `{name}` is not a plain file name")));
        }
        let p = dir.join(file);
        if !files.contains(&p) {
            files.push(p);
        }
    }
    Ok(files)
}

/// A safetensors file's tensors, from its header.
fn read_header(path: &Path) -> Result<Vec<(String, Entry)>, HfError> {
    let shown = path.display().to_string();
    let io = |source| HfError::Io { path: shown.clone(), source };
    let bad = |message: String| HfError::Format { path: shown.clone(), message };
    let mut f = File::open(path).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io)?;
    let n = u64::from_le_bytes(len);
    if n > HEADER_MAX_BYTES || 8 + n > size {
        return Err(bad(format!("not a safetensors file (header of {n} bytes in a file of {size})")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io)?;
    let v: Value = serde_json::from_slice(&header).map_err(|e| bad(format!("not a safetensors header: {e}")))?;
    let map = v.as_object().ok_or_else(|| bad("the header is not a JSON object".into()))?;
    let mut out = Vec::new();
    for (name, t) in map.iter().filter(|(k, _)| *k != "__metadata__") {
        let field = |k: &str| t.get(k).ok_or_else(|| bad(format!("the tensor `{name}` has no `{k}`")));
        let dtype = field("dtype")?.as_str().unwrap_or("");
        let (kind, width) = match dtype {
            "F32" => (Kind::Float, 4),
            "BF16" => (Kind::BFloat16, 2),
            "F16" => (Kind::Half, 2),
            other => return Err(bad(format!("the tensor `{name}` is {other}; flotilla reads F32, BF16 and F16"))),
        };
        let shape: Vec<usize> = field("shape")?
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .ok_or_else(|| bad(format!("the tensor `{name}` has a malformed shape")))?;
        let offsets: Vec<u64> = field("data_offsets")?
            .as_array()
            .and_then(|a| a.iter().map(Value::as_u64).collect())
            .ok_or_else(|| bad(format!("the tensor `{name}` has malformed data_offsets")))?;
        let [s, e] = offsets[..] else { return Err(bad(format!("the tensor `{name}` has malformed data_offsets"))) };
        let numel = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64));
        let (start, end) = (8 + n + s, 8 + n + e);
        if e < s || numel.and_then(|k| k.checked_mul(width)) != Some(e - s) || end > size {
            return Err(bad(format!("the tensor `{name}`'s bytes do not match its shape {shape:?} and dtype {dtype}")));
        }
        out.push((name.clone(), Entry { file: 0, kind, shape, start, end }));
    }
    Ok(out)
}

/// A Llama folder's model: the spec its `config.json` describes (trained
/// at `context`), and its weights.
pub fn open_llama(dir: &Path, context: usize) -> Result<(ModelSpec, HfWeights), HfError> {
    let path = dir.join("config.json");
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(&path).map_err(|source| HfError::Io { path: shown.clone(), source })?;
    let h = hf_config::parse(&text).map_err(|message| HfError::Format { path: shown, message })?;
    let tied = h.tie_embeddings;
    let spec = ModelSpec::Llama(LlamaSpec { context, from: Some(dir.display().to_string()), pretrained: true, ..h });
    let weights = HfWeights::open(dir, &model::layout(&spec), tied)?;
    Ok((spec, weights))
}

/// Runs a Hugging Face Llama folder on `tokens` (`[batch, context + 1]`
/// ids, f32): the logits of the first `context` positions and the mean
/// cross-entropy of predicting each next token.
pub fn evaluate(dir: &Path, tokens: &Tensor) -> Result<(Tensor, f64), HfError> {
    let (b, w) = tokens.size2().map_err(|e| HfError::Format { path: "tokens".into(), message: e.to_string() })?;
    let context = (w - 1) as usize;
    let (spec, weights) = open_llama(dir, context)?;
    let layout = model::layout(&spec);
    let x = tokens.narrow(1, 0, w - 1);
    let y = tokens.narrow(1, 1, w - 1);
    let mut h = x.shallow_clone();
    let mut at = 0;
    for (unit, names) in Unit::all(&spec) {
        let shapes: Vec<Vec<i64>> =
            layout.shapes[at..at + names.len()].iter().map(|s| s.iter().map(|&d| d as i64).collect()).collect();
        at += names.len();
        let p = model::unflatten(&weights.unit(&names)?, &shapes);
        h = tch::no_grad(|| model::forward(&spec, unit, &p, &h));
    }
    let loss = model::loss_sum(&spec, &h, &y).double_value(&[]) / b as f64;
    Ok((h, loss))
}

/// A pretrained Llama's whole initial weights, flat in layout order (what
/// `flotilla export-init` writes for `model.init: pretrained`).
pub fn pretrained_weights(spec: &ModelSpec, dir: &Path) -> Result<(Layout, Vec<f32>), HfError> {
    let layout = model::layout(spec);
    let weights = HfWeights::open(dir, &layout, model::tied(spec))?;
    let parts = Unit::all(spec).into_iter().map(|(_, names)| weights.unit(&names)).collect::<Result<Vec<_>, _>>()?;
    let mut out = vec![0f32; layout.total];
    Tensor::cat(&parts, 0).copy_data(&mut out, layout.total);
    Ok((layout, out))
}
