//! `model` and `data`: the kind-dependent sections.
//!
//! Their raw forms hold the fields of every kind; here each kind gets only
//! its own fields, and the data kind must suit the model kind.

use serde_saphyr::Spanned;

use super::Ctx;
use crate::defaults;
use crate::error::SpecError;
use crate::raw::{DataKind, Layers, ModelKind, RawData, RawModel};
use crate::{DataSpec, GptSpec, MlpSpec, ModelSpec};

const MLP_FIELDS: &[&str] = &["kind", "layers"];
const GPT_FIELDS: &[&str] = &["kind", "layers", "d_model", "heads", "context", "vocab"];
const SYNTHETIC_FIELDS: &[&str] = &["kind", "seed", "samples"];
const FEATURES_FIELDS: &[&str] = &["kind", "path"];
const TOKENS_FIELDS: &[&str] = &["kind", "path", "dtype"];
const TEXT_FIELDS: &[&str] = &["kind", "path"];

/// Refuses the first field present in `given` but not in `allowed`.
fn only_fields(
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

fn loc<T>(v: &Option<Spanned<T>>) -> Option<serde_saphyr::Location> {
    v.as_ref().map(|s| s.referenced)
}

/// A required field of a kind: missing → named by the section, at its position.
fn required<'a, T>(
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
    ];
    let layers = required(cx, raw, "model", "layers", &m.layers)?;
    match m.kind.value {
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
                out.push(cx.at_least_one(&format!("model.layers[{i}]"), w)?);
            }
            let last = widths.len() - 1;
            if out[last] < 2 {
                return Err(cx.err(
                    &format!("model.layers[{last}]"),
                    &widths[last],
                    format!("the last width is the number of classes and must be at least 2, found {}", out[last]),
                ));
            }
            Ok(ModelSpec::Mlp(MlpSpec { layers: out }))
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
            let d_model = cx.at_least_one("model.d_model", required(cx, raw, "model", "d_model", &m.d_model)?)?;
            let heads_s = required(cx, raw, "model", "heads", &m.heads)?;
            let heads = cx.at_least_one("model.heads", heads_s)?;
            let context = cx.at_least_one("model.context", required(cx, raw, "model", "context", &m.context)?)?;
            let vocab_s = required(cx, raw, "model", "vocab", &m.vocab)?;
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
            Ok(ModelSpec::Gpt(GptSpec { layers, d_model, heads, context, vocab: vocab_s.value }))
        }
    }
}

pub(super) fn data(
    cx: &Ctx,
    raw: &Spanned<RawData>,
    raw_model: &Spanned<RawModel>,
    model: &ModelSpec,
) -> Result<DataSpec, SpecError> {
    let d = &raw.value;
    let given =
        [("seed", loc(&d.seed)), ("samples", loc(&d.samples)), ("path", loc(&d.path)), ("dtype", loc(&d.dtype))];
    let (name, allowed, needs_model) = match d.kind.value {
        DataKind::Synthetic => ("synthetic", SYNTHETIC_FIELDS, None),
        DataKind::Features => ("features", FEATURES_FIELDS, Some("mlp")),
        DataKind::Tokens => ("tokens", TOKENS_FIELDS, Some("gpt")),
        DataKind::Text => ("text", TEXT_FIELDS, Some("gpt")),
    };
    if let Some(needed) = needs_model.filter(|&k| k != model.kind()) {
        return Err(cx.err(
            "data.kind",
            &d.kind,
            format!("data kind `{name}` needs model kind `{needed}`, but model.kind is `{}`", model.kind()),
        ));
    }
    only_fields(cx, "data", name, &given, allowed)?;
    let path = || -> Result<String, SpecError> {
        let p = required(cx, raw, "data", "path", &d.path)?;
        if p.value.is_empty() {
            return Err(cx.err("data.path", p, "must not be empty"));
        }
        Ok(p.value.clone())
    };
    Ok(match d.kind.value {
        DataKind::Synthetic => DataSpec::Synthetic {
            seed: d.seed.as_ref().map_or(defaults::SYNTHETIC_SEED, |s| s.value),
            samples: match &d.samples {
                None => defaults::SYNTHETIC_SAMPLES,
                Some(s) => cx.at_least_one("data.samples", s)?,
            },
        },
        DataKind::Features => DataSpec::Features { path: path()? },
        DataKind::Tokens => {
            DataSpec::Tokens { path: path()?, dtype: d.dtype.as_ref().map_or(defaults::TOKEN_DTYPE, |s| s.value) }
        }
        DataKind::Text => {
            let path = path()?;
            if let (ModelSpec::Gpt(g), Some(vocab)) = (model, &raw_model.value.vocab) {
                if g.vocab < defaults::TEXT_VOCAB {
                    return Err(cx.err(
                        "model.vocab",
                        vocab,
                        format!(
                            "data kind `text` uses each byte as a token and needs model.vocab >= {}, found {}",
                            defaults::TEXT_VOCAB,
                            g.vocab
                        ),
                    ));
                }
            }
            DataSpec::Text { path }
        }
    })
}
