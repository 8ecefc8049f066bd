//! `model` and `data`: the kind-dependent sections.
//!
//! Their raw forms hold the fields of every kind; here each kind gets only
//! its own fields, and the data kind must suit the model kind.

use serde_saphyr::Spanned;

use super::Ctx;
use crate::defaults;
use crate::error::SpecError;
use crate::raw::{DataKind, Layers, ModelKind, PathList, RawData, RawModel};
use crate::{DataSpec, GptSpec, MlpSpec, ModelSpec};

const MLP_FIELDS: &[&str] = &["kind", "layers"];
const GPT_FIELDS: &[&str] = &["kind", "layers", "d_model", "heads", "context", "vocab"];
const SYNTHETIC_FIELDS: &[&str] = &["kind", "seed", "samples"];
const FEATURES_FIELDS: &[&str] = &["kind", "path"];
const TOKENS_FIELDS: &[&str] = &["kind", "path", "dtype", "format"];
const TEXT_FIELDS: &[&str] = &["kind", "path", "tokenizer"];

/// Refuses the first field present in `given` but not in `allowed`.
pub(super) fn only_fields(
    cx: &Ctx,
    section: &str,
    kind: &str,
    given: &[(&str, Option<serde_saphyr::Location>)],
    allowed: &[&str],
) -> Result<(), SpecError> {
    for (field, at) in given {
        if let (Some(at), false) = (at, allowed.contains(field)) {
            let expected: Vec<String> = allowed.iter().map(|f| format!("`{f}`")).collect();
            return Err(cx.err_at(
                &format!("{section}.{field}"),
                *at,
                format!("unknown field `{field}` for {section} kind `{kind}`, expected one of {}", expected.join(", ")),
            ));
        }
    }
    Ok(())
}

pub(super) fn loc<T>(v: &Option<Spanned<T>>) -> Option<serde_saphyr::Location> {
    v.as_ref().map(|s| s.referenced)
}

/// A required field of a kind: missing → named by the section, at its position.
pub(super) fn required<'a, T>(
    cx: &Ctx,
    section: &Spanned<impl Sized>,
    section_path: &str,
    field: &str,
    value: &'a Option<Spanned<T>>,
) -> Result<&'a Spanned<T>, SpecError> {
    value.as_ref().ok_or_else(|| cx.missing(section_path, section, field))
}

pub(super) fn model(cx: &Ctx, raw: &Spanned<RawModel>) -> Result<ModelSpec, SpecError> {
    let m = &raw.value;
    let given = [
        ("layers", m.layers.as_ref().map(|s| s.referenced)),
        ("d_model", loc(&m.d_model)),
        ("heads", loc(&m.heads)),
        ("context", loc(&m.context)),
        ("vocab", loc(&m.vocab)),
        ("kv_heads", loc(&m.kv_heads)),
        ("ffn", loc(&m.ffn)),
        ("rope_theta", loc(&m.rope_theta)),
        ("rope_scaling", m.rope_scaling.as_ref().map(|s| s.referenced)),
        ("norm_eps", loc(&m.norm_eps)),
        ("tie_embeddings", loc(&m.tie_embeddings)),
        ("from", loc(&m.from)),
        ("init", loc(&m.init)),
    ];
    if m.kind.value == ModelKind::Llama {
        only_fields(cx, "model", "llama", &given, super::llama::FIELDS)?;
        return super::llama::llama(cx, raw);
    }
    let layers = required(cx, raw, "model", "layers", &m.layers)?;
    match m.kind.value {
        ModelKind::Llama => unreachable!("read above"),
        ModelKind::Mlp => {
            only_fields(cx, "model", "mlp", &given, MLP_FIELDS)?;
            let widths = match &layers.value {
                Layers::Widths(w) => w,
                Layers::Count(n) => {
                    return Err(cx.err(
                        "model.layers",
                        layers,
                        format!(
                            "for model kind `mlp`, layers is a list of widths \
                             [inputs, hidden..., classes], found the number {n}"
                        ),
                    ));
                }
            };
            if widths.len() < 2 {
                return Err(cx.err(
                    "model.layers",
                    layers,
                    format!("needs at least 2 widths (inputs and classes), found {}", widths.len()),
                ));
            }
            let mut out = Vec::with_capacity(widths.len());
            for (i, w) in widths.iter().enumerate() {
                out.push(dim(cx, &format!("model.layers[{i}]"), w)?);
            }
            let last = widths.len() - 1;
            if out[last] < 2 {
                return Err(cx.err(
                    &format!("model.layers[{last}]"),
                    &widths[last],
                    format!("the last width is the number of classes and must be at least 2, found {}", out[last]),
                ));
            }
            let spec = MlpSpec { layers: out };
            within_parameters(cx, layers, mlp_parameters(&spec))?;
            Ok(ModelSpec::Mlp(spec))
        }
        ModelKind::Gpt => {
            only_fields(cx, "model", "gpt", &given, GPT_FIELDS)?;
            let blocks = match &layers.value {
                Layers::Count(n) => Spanned::new(*n, layers.referenced, layers.defined),
                Layers::Widths(_) => {
                    return Err(cx.err(
                        "model.layers",
                        layers,
                        "for model kind `gpt`, layers is the number of transformer blocks, found a list",
                    ));
                }
            };
            let layers = cx.at_least_one("model.layers", &blocks)?;
            if layers > defaults::MODEL_BLOCKS_LIMIT {
                let limit = defaults::MODEL_BLOCKS_LIMIT;
                return Err(cx.err("model.layers", &blocks, format!("must be at most {limit}, found {layers}")));
            }
            let d_model = dim(cx, "model.d_model", required(cx, raw, "model", "d_model", &m.d_model)?)?;
            let heads_s = required(cx, raw, "model", "heads", &m.heads)?;
            let heads = dim(cx, "model.heads", heads_s)?;
            let context = dim(cx, "model.context", required(cx, raw, "model", "context", &m.context)?)?;
            let vocab_s = required(cx, raw, "model", "vocab", &m.vocab)?;
            dim(cx, "model.vocab", vocab_s)?;
            if d_model % heads != 0 {
                return Err(cx.err(
                    "model.heads",
                    heads_s,
                    format!("must divide model.d_model ({d_model}) evenly, found {heads}"),
                ));
            }
            if vocab_s.value < 2 {
                return Err(cx.err("model.vocab", vocab_s, format!("must be at least 2, found {}", vocab_s.value)));
            }
            let spec = GptSpec { layers, d_model, heads, context, vocab: vocab_s.value };
            within_parameters(cx, &blocks, gpt_parameters(&spec))?;
            Ok(ModelSpec::Gpt(spec))
        }
    }
}

/// `data.samples` of synthetic data: at least 1, and few enough that the
/// numbers a worker generates stay under [`defaults::SYNTHETIC_ELEMENTS_LIMIT`].
fn synthetic_samples(cx: &Ctx, at: &str, s: &Spanned<u64>, model: &ModelSpec) -> Result<u64, SpecError> {
    let field = format!("{at}.samples");
    let samples = cx.at_least_one(&field, s)?;
    let per_sample = match model {
        ModelSpec::Mlp(m) => m.layers[0] as u64,
        ModelSpec::Gpt(g) => g.context as u64 + 1,
        ModelSpec::Llama(l) => l.context as u64 + 1,
    };
    let limit = defaults::SYNTHETIC_ELEMENTS_LIMIT;
    if samples.checked_mul(per_sample).is_none_or(|n| n > limit) {
        return Err(cx.err(
            &field,
            s,
            format!("{samples} samples of {per_sample} numbers each are more than the {limit} a worker generates"),
        ));
    }
    Ok(samples)
}

/// A width: at least 1 and at most [`defaults::MODEL_DIM_LIMIT`].
pub(super) fn dim(cx: &Ctx, path: &str, value: &Spanned<usize>) -> Result<usize, SpecError> {
    let v = cx.at_least_one(path, value)?;
    if v > defaults::MODEL_DIM_LIMIT {
        return Err(cx.err(path, value, format!("must be at most {}, found {v}", defaults::MODEL_DIM_LIMIT)));
    }
    Ok(v)
}

/// The parameters of an MLP (weights and biases), `None` past `u64`.
fn mlp_parameters(spec: &MlpSpec) -> Option<u64> {
    spec.layers.windows(2).try_fold(0u64, |sum, w| {
        let (a, b) = (w[0] as u64, w[1] as u64);
        sum.checked_add(a.checked_mul(b)?.checked_add(b)?)
    })
}

/// About the parameters of a GPT (embeddings, blocks, head), `None` past
/// `u64`: an upper estimate, for the sanity bound only.
fn gpt_parameters(g: &GptSpec) -> Option<u64> {
    let (d, v, c, l) = (g.d_model as u64, g.vocab as u64, g.context as u64, g.layers as u64);
    let embeddings = v.checked_add(c)?.checked_mul(d)?;
    let block = d.checked_mul(d)?.checked_mul(12)?.checked_add(d.checked_mul(13)?)?;
    let head = d.checked_mul(v)?.checked_add(v)?.checked_add(d.checked_mul(2)?)?;
    embeddings.checked_add(block.checked_mul(l)?)?.checked_add(head)
}

/// Refuses a model above [`defaults::PARAMETERS_LIMIT`] (or whose count
/// overflows), at `at` (the `layers` field).
pub(super) fn within_parameters<T>(cx: &Ctx, at: &Spanned<T>, count: Option<u64>) -> Result<(), SpecError> {
    let limit = defaults::PARAMETERS_LIMIT;
    match count {
        Some(n) if n <= limit => Ok(()),
        Some(n) => Err(cx.err("model.layers", at, format!("the model has {n} parameters, above the limit of {limit}"))),
        None => {
            Err(cx.err("model.layers", at, format!("the model's parameter count overflows (the limit is {limit})")))
        }
    }
}

pub(super) fn data(
    cx: &Ctx,
    raw: &Spanned<RawData>,
    raw_model: &Spanned<RawModel>,
    model: &ModelSpec,
) -> Result<DataSpec, SpecError> {
    data_at(cx, "data", raw, raw_model, model)
}

/// The data section at `at` (`data`, `eval.data`).
pub(super) fn data_at(
    cx: &Ctx,
    at: &str,
    raw: &Spanned<RawData>,
    raw_model: &Spanned<RawModel>,
    model: &ModelSpec,
) -> Result<DataSpec, SpecError> {
    let d = &raw.value;
    let given = [
        ("seed", loc(&d.seed)),
        ("samples", loc(&d.samples)),
        ("path", loc(&d.path)),
        ("dtype", loc(&d.dtype)),
        ("tokenizer", loc(&d.tokenizer)),
        ("format", loc(&d.format)),
    ];
    let (name, allowed, needs_model) = match d.kind.value {
        DataKind::Synthetic => ("synthetic", SYNTHETIC_FIELDS, None),
        DataKind::Features => ("features", FEATURES_FIELDS, Some("mlp")),
        DataKind::Tokens => ("tokens", TOKENS_FIELDS, Some("gpt")),
        DataKind::Text => ("text", TEXT_FIELDS, Some("gpt")),
    };
    // Token data suits every language model: the GPT and the Llama.
    let fits = |needed: &str| needed == model.kind() || (needed == "gpt" && model.sequence().is_some());
    if let Some(needed) = needs_model.filter(|&k| !fits(k)) {
        let needed = if needed == "gpt" { "`gpt` or `llama`".to_string() } else { format!("`{needed}`") };
        return Err(cx.err(
            &format!("{at}.kind"),
            &d.kind,
            format!("data kind `{name}` needs model kind {needed}, but model.kind is `{}`", model.kind()),
        ));
    }
    only_fields(cx, at, name, &given, allowed)?;
    let path = || -> Result<String, SpecError> {
        let given = required(cx, raw, at, "path", &d.path)?;
        let PathList::One(p) = &given.value else {
            let m = format!("data kind `{name}` reads one file; a list of paths is for kind `tokens`");
            return Err(cx.err(&format!("{at}.path"), given, m));
        };
        if p.is_empty() {
            return Err(cx.err(&format!("{at}.path"), given, "must not be empty"));
        }
        crate::paths::path_problem(p).map_or(Ok(()), |m| Err(cx.err(&format!("{at}.path"), given, m)))?;
        Ok(p.clone())
    };
    Ok(match d.kind.value {
        DataKind::Synthetic => DataSpec::Synthetic {
            seed: d.seed.as_ref().map_or(defaults::SYNTHETIC_SEED, |s| s.value),
            samples: match &d.samples {
                None => defaults::SYNTHETIC_SAMPLES,
                Some(s) => synthetic_samples(cx, at, s, model)?,
            },
        },
        DataKind::Features => DataSpec::Features { path: path()? },
        DataKind::Tokens => super::tokens::tokens(cx, at, raw)?,
        DataKind::Text => {
            let path = path()?;
            let model_vocab = model.sequence().map_or(0, |(_, v)| v);
            if let Some(t) = &d.tokenizer {
                let tokenizer = super::tokenizer::tokenizer(cx, at, t, raw_model, model_vocab)?;
                return Ok(DataSpec::Text { path, tokenizer: Some(tokenizer) });
            }
            if let Some(vocab) = raw_model.value.vocab.as_ref().filter(|_| model_vocab < defaults::TEXT_VOCAB) {
                return Err(cx.err(
                    "model.vocab",
                    vocab,
                    format!(
                        "data kind `text` without a tokenizer uses each byte as a token and needs model.vocab >= {}, found {}",
                        defaults::TEXT_VOCAB,
                        model_vocab
                    ),
                ));
            }
            DataSpec::Text { path, tokenizer: None }
        }
    })
}
