//! `model.kind: llama`: the fields of the job file, or of the Hugging Face
//! `config.json` that `model.from` names, merged. A field given in both
//! must agree; `context` (the training length) is the job file's.

use std::fmt::Display;

use serde_saphyr::Spanned;

use super::model::{dim, required, within_parameters};
use super::Ctx;
use crate::error::SpecError;
use crate::hf_config;
use crate::raw::{Layers, ModelInit, RawModel, RawRopeScaling};
use crate::{defaults, LlamaSpec, ModelSpec, RopeScaling};

pub(super) const FIELDS: &[&str] = &[
    "kind",
    "layers",
    "d_model",
    "heads",
    "kv_heads",
    "ffn",
    "vocab",
    "context",
    "rope_theta",
    "rope_scaling",
    "norm_eps",
    "tie_embeddings",
    "from",
    "init",
];

/// A field's value: the job file's (checked against the config's, when
/// both are there) or the config's.
fn pick<T: PartialEq + Display + Copy>(
    cx: &Ctx,
    field: &str,
    job: Option<&Spanned<T>>,
    hf: Option<(T, &str)>,
) -> Result<Option<T>, SpecError> {
    match (job, hf) {
        (Some(j), Some((h, dir))) if j.value != h => Err(cx.err(
            &format!("model.{field}"),
            j,
            format!(
                "{} contradicts `{}: {h}` in {dir}/config.json; leave the field out or make them agree",
                j.value,
                hf_config::key_of(field)
            ),
        )),
        (Some(j), _) => Ok(Some(j.value)),
        (None, h) => Ok(h.map(|(h, _)| h)),
    }
}

pub(super) fn llama(cx: &Ctx, raw: &Spanned<RawModel>) -> Result<ModelSpec, SpecError> {
    let m = &raw.value;
    let hf = match &m.from {
        None => None,
        Some(from) => Some((read_config(cx, from)?, from.value.as_str())),
    };
    let hf_ref = hf.as_ref().map(|(h, dir)| (h, *dir));
    let from_config = |f: fn(&LlamaSpec) -> usize| hf_ref.map(|(h, d)| (f(h), d));
    // A field the spec needs: the job file's or the config's, else missing.
    let need = |field: &str, job: Option<&Spanned<usize>>, hf: Option<(usize, &str)>| -> Result<usize, SpecError> {
        match pick(cx, field, job, hf)? {
            Some(v) => Ok(v),
            None => Err(cx.missing("model", raw, field)),
        }
    };
    let blocks = match &m.layers {
        None => None,
        Some(l) => match &l.value {
            Layers::Count(n) => Some(Spanned::new(*n, l.referenced, l.defined)),
            Layers::Widths(_) => {
                return Err(cx.err(
                    "model.layers",
                    l,
                    "for model kind `llama`, layers is the number of decoder layers, found a list",
                ));
            }
        },
    };
    let layers = need("layers", blocks.as_ref(), from_config(|h| h.layers))?;
    let layers_at = blocks.as_ref().map_or(raw.referenced, |b| b.referenced);
    if layers == 0 || layers > defaults::MODEL_BLOCKS_LIMIT {
        let limit = defaults::MODEL_BLOCKS_LIMIT;
        return Err(cx.err_at("model.layers", layers_at, format!("must be from 1 to {limit}, found {layers}")));
    }
    // Each width is checked where it was written: in the job file, or (from
    // the config) at `model.from`.
    let from_at = m.from.as_ref().map_or(raw.referenced, |f| f.referenced);
    let width = |field: &str, job: &Option<Spanned<usize>>, v: usize| -> Result<usize, SpecError> {
        let at = job.as_ref().map_or(from_at, |j| j.referenced);
        dim(cx, &format!("model.{field}"), &Spanned::new(v, at, at))
    };
    let d_model = width("d_model", &m.d_model, need("d_model", m.d_model.as_ref(), from_config(|h| h.d_model))?)?;
    let heads = width("heads", &m.heads, need("heads", m.heads.as_ref(), from_config(|h| h.heads))?)?;
    let kv_heads = width(
        "kv_heads",
        &m.kv_heads,
        pick(cx, "kv_heads", m.kv_heads.as_ref(), from_config(|h| h.kv_heads))?.unwrap_or(heads),
    )?;
    let ffn = width("ffn", &m.ffn, need("ffn", m.ffn.as_ref(), from_config(|h| h.ffn))?)?;
    let vocab = width("vocab", &m.vocab, need("vocab", m.vocab.as_ref(), from_config(|h| h.vocab))?)?;
    let context_s = required(cx, raw, "model", "context", &m.context)?;
    let context = dim(cx, "model.context", context_s)?;
    let at = |j: &Option<Spanned<usize>>| j.as_ref().map_or(from_at, |j| j.referenced);
    if d_model % heads != 0 || (d_model / heads) % 2 != 0 {
        return Err(cx.err_at(
            "model.heads",
            at(&m.heads),
            format!(
                "must divide model.d_model ({d_model}) into heads of an even width (rotary embeddings), found {heads}"
            ),
        ));
    }
    if heads % kv_heads != 0 {
        return Err(cx.err_at(
            "model.kv_heads",
            at(&m.kv_heads),
            format!("must divide model.heads ({heads}), found {kv_heads}"),
        ));
    }
    if vocab < 2 {
        return Err(cx.err_at("model.vocab", at(&m.vocab), format!("must be at least 2, found {vocab}")));
    }
    let max_positions = match hf_ref {
        Some((h, dir)) if context > h.max_positions => {
            return Err(cx.err(
                "model.context",
                context_s,
                format!("{context} is longer than `max_position_embeddings: {}` in {dir}/config.json", h.max_positions),
            ));
        }
        Some((h, _)) => h.max_positions,
        None => context,
    };
    // A float above 0: the job file's, the config's or the default.
    let float = |field: &str, job: Option<&Spanned<f64>>, hf: fn(&LlamaSpec) -> f64, default: f64| {
        let v = pick(cx, field, job, hf_ref.map(|(h, d)| (hf(h), d)))?.unwrap_or(default);
        positive(cx, field, job, from_at, v)
    };
    let rope_theta = float("rope_theta", m.rope_theta.as_ref(), |h| h.rope_theta, defaults::LLAMA_ROPE_THETA)?;
    let norm_eps = float("norm_eps", m.norm_eps.as_ref(), |h| h.norm_eps, defaults::LLAMA_NORM_EPS)?;
    let tie_embeddings =
        pick(cx, "tie_embeddings", m.tie_embeddings.as_ref(), hf_ref.map(|(h, d)| (h.tie_embeddings, d)))?
            .unwrap_or(false);
    let rope_scaling = rope_scaling(cx, m.rope_scaling.as_ref(), hf_ref)?;
    let pretrained = match &m.init {
        Some(i) if i.value == ModelInit::Pretrained && m.from.is_none() => {
            return Err(cx.err(
                "model.init",
                i,
                "`pretrained` needs `model.from`, the folder the weights are read from",
            ));
        }
        Some(i) => i.value == ModelInit::Pretrained,
        None => false,
    };
    let spec = LlamaSpec {
        layers,
        d_model,
        heads,
        kv_heads,
        ffn,
        vocab,
        context,
        max_positions,
        rope_theta,
        rope_scaling,
        norm_eps,
        tie_embeddings,
        from: m.from.as_ref().map(|f| f.value.clone()),
        pretrained,
    };
    within_parameters(cx, &Spanned::new((), layers_at, layers_at), parameters(&spec))?;
    Ok(ModelSpec::Llama(spec))
}

/// Reads and parses `model.from`'s `config.json`; errors at `model.from`.
fn read_config(cx: &Ctx, from: &Spanned<String>) -> Result<LlamaSpec, SpecError> {
    if from.value.is_empty() {
        return Err(cx.err("model.from", from, "must not be empty"));
    }
    if let Some(problem) = crate::paths::path_problem(&from.value) {
        return Err(cx.err("model.from", from, problem));
    }
    let config = format!("{}/config.json", from.value.trim_end_matches('/'));
    let text = (cx.read_file)(&config, hf_config::CONFIG_MAX_BYTES).map_err(|e| cx.err("model.from", from, e))?;
    hf_config::parse(&text).map_err(|e| cx.err("model.from", from, format!("{}/config.json {e}", from.value)))
}

/// A finite float above 0, at its own position or at `model.from`.
fn positive(
    cx: &Ctx,
    field: &str,
    job: Option<&Spanned<f64>>,
    from_at: serde_saphyr::Location,
    v: f64,
) -> Result<f64, SpecError> {
    if v.is_finite() && v > 0.0 {
        return Ok(v);
    }
    let at = job.map_or(from_at, |j| j.referenced);
    Err(cx.err_at(&format!("model.{field}"), at, format!("must be a finite number above 0, found {v}")))
}

fn rope_scaling(
    cx: &Ctx,
    job: Option<&Spanned<RawRopeScaling>>,
    hf: Option<(&LlamaSpec, &str)>,
) -> Result<Option<RopeScaling>, SpecError> {
    let Some(j) = job else { return Ok(hf.and_then(|(h, _)| h.rope_scaling.clone())) };
    let r = &j.value;
    for (name, v) in
        [("factor", &r.factor), ("low_freq_factor", &r.low_freq_factor), ("high_freq_factor", &r.high_freq_factor)]
    {
        if !(v.value.is_finite() && v.value > 0.0) {
            return Err(cx.err(
                &format!("model.rope_scaling.{name}"),
                v,
                format!("must be a finite number above 0, found {}", v.value),
            ));
        }
    }
    if r.high_freq_factor.value <= r.low_freq_factor.value {
        return Err(cx.err(
            "model.rope_scaling.high_freq_factor",
            &r.high_freq_factor,
            format!("must be above low_freq_factor ({}), found {}", r.low_freq_factor.value, r.high_freq_factor.value),
        ));
    }
    let original = cx.at_least_one("model.rope_scaling.original_context", &r.original_context)?;
    let s = RopeScaling {
        factor: r.factor.value,
        low_freq_factor: r.low_freq_factor.value,
        high_freq_factor: r.high_freq_factor.value,
        original_max_positions: original,
    };
    if let Some((h, dir)) = hf {
        if h.rope_scaling.as_ref() != Some(&s) {
            return Err(cx.err(
                "model.rope_scaling",
                j,
                format!(
                    "contradicts the rope scaling in {dir}/config.json ({:?}); leave the field out",
                    h.rope_scaling
                ),
            ));
        }
    }
    Ok(Some(s))
}

/// The Llama's parameter count, `None` past `u64`.
fn parameters(l: &LlamaSpec) -> Option<u64> {
    let (d, v, f, n) = (l.d_model as u64, l.vocab as u64, l.ffn as u64, l.layers as u64);
    let kv = d.checked_mul(l.kv_heads as u64)? / l.heads as u64;
    let attn = d.checked_mul(d)?.checked_mul(2)?.checked_add(d.checked_mul(kv)?.checked_mul(2)?)?;
    let mlp = d.checked_mul(f)?.checked_mul(3)?;
    let layer = attn.checked_add(mlp)?.checked_add(d.checked_mul(2)?)?;
    let embeddings = v.checked_mul(d)?.checked_mul(2)?;
    embeddings.checked_add(layer.checked_mul(n)?)?.checked_add(d)
}
