//! A Hugging Face `config.json` of a Llama model: read into the fields
//! `model.kind: llama` has, and written back for an exported model.
//!
//! Reads both spellings of the rotary settings: transformers 4's top-level
//! `rope_theta` and `rope_scaling`, and transformers 5's `rope_parameters`.

use serde_json::{json, Map, Value};

use crate::{LlamaSpec, RopeScaling};

/// The one architecture `model.from` reads.
pub const LLAMA_ARCHITECTURE: &str = "LlamaForCausalLM";

/// Longest `config.json` read (a real one is a few KiB).
pub const CONFIG_MAX_BYTES: u64 = 1 << 20;

/// Which job-file field each config key fills, for messages.
pub const FIELD_KEYS: &[(&str, &str)] = &[
    ("layers", "num_hidden_layers"),
    ("d_model", "hidden_size"),
    ("heads", "num_attention_heads"),
    ("kv_heads", "num_key_value_heads"),
    ("ffn", "intermediate_size"),
    ("vocab", "vocab_size"),
    ("rope_theta", "rope_theta"),
    ("norm_eps", "rms_norm_eps"),
    ("tie_embeddings", "tie_word_embeddings"),
];

/// The config key a job-file field is read from.
pub fn key_of(field: &str) -> &'static str {
    FIELD_KEYS.iter().find(|(f, _)| *f == field).map_or("?", |(_, k)| k)
}

/// Reads a `config.json`'s text into a spec of that model, with `context`
/// its `max_position_embeddings` and no `from`. The error says what is
/// wrong in words (the caller adds where).
pub fn parse(text: &str) -> Result<LlamaSpec, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("is not valid JSON: {e}"))?;
    let o = v.as_object().ok_or("is not a JSON object")?;
    let arch = match o.get("architectures").and_then(Value::as_array).map(Vec::as_slice) {
        Some([Value::String(a)]) => a.clone(),
        Some(list) if !list.is_empty() => format!("{}", Value::Array(list.to_vec())).chars().take(120).collect(),
        _ => match o.get("model_type").and_then(Value::as_str) {
            Some("llama") => LLAMA_ARCHITECTURE.to_string(),
            Some(t) => format!("model_type `{}`", t.chars().take(60).collect::<String>()),
            None => return Err("names no architecture (`architectures` or `model_type`)".into()),
        },
    };
    if arch != LLAMA_ARCHITECTURE {
        return Err(format!(
            "describes the architecture {arch}, but model kind `llama` reads only {LLAMA_ARCHITECTURE}"
        ));
    }
    for (key, want) in [("attention_bias", false), ("mlp_bias", false)] {
        if o.get(key).and_then(Value::as_bool).is_some_and(|b| b != want) {
            return Err(format!("sets `{key}: true`; flotilla's Llama has no biases"));
        }
    }
    if let Some(act) = o.get("hidden_act").and_then(Value::as_str).filter(|a| *a != "silu") {
        return Err(format!("sets `hidden_act: {act}`; flotilla's Llama uses silu"));
    }
    let int = |k: &str| -> Result<usize, String> {
        o.get(k)
            .and_then(Value::as_u64)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| format!("lacks `{k}` as a non-negative integer"))
    };
    let heads = int("num_attention_heads")?;
    let d_model = int("hidden_size")?;
    if let Some(hd) = o.get("head_dim").and_then(Value::as_u64) {
        if heads == 0 || hd as usize * heads != d_model {
            return Err(format!(
                "sets `head_dim: {hd}`, but hidden_size / num_attention_heads is {d_model}/{heads}; \
                 flotilla's Llama needs head_dim * heads = hidden_size"
            ));
        }
    }
    let rope = o.get("rope_parameters").and_then(Value::as_object);
    let rope_theta = rope
        .and_then(|r| r.get("rope_theta"))
        .or_else(|| o.get("rope_theta"))
        .and_then(Value::as_f64)
        .unwrap_or(10000.0);
    let scaling = rope.or_else(|| o.get("rope_scaling").and_then(Value::as_object));
    let max_positions = int("max_position_embeddings")?;
    Ok(LlamaSpec {
        layers: int("num_hidden_layers")?,
        d_model,
        heads,
        kv_heads: if o.contains_key("num_key_value_heads") { int("num_key_value_heads")? } else { heads },
        ffn: int("intermediate_size")?,
        vocab: int("vocab_size")?,
        context: max_positions,
        max_positions,
        rope_theta,
        rope_scaling: scaling.map(rope_scaling).transpose()?.flatten(),
        norm_eps: o.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
        tie_embeddings: o.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
        from: None,
        pretrained: false,
    })
}

fn rope_scaling(r: &Map<String, Value>) -> Result<Option<RopeScaling>, String> {
    let kind = r.get("rope_type").or_else(|| r.get("type")).and_then(Value::as_str).unwrap_or("default");
    match kind {
        "default" => Ok(None),
        "llama3" => {
            let f = |k: &str| r.get(k).and_then(Value::as_f64).ok_or_else(|| format!("rope scaling lacks `{k}`"));
            Ok(Some(RopeScaling {
                factor: f("factor")?,
                low_freq_factor: f("low_freq_factor")?,
                high_freq_factor: f("high_freq_factor")?,
                original_max_positions: f("original_max_position_embeddings")? as usize,
            }))
        }
        other => Err(format!(
            "uses rope type `{}`; flotilla's Llama supports `default` and `llama3`",
            other.chars().take(40).collect::<String>()
        )),
    }
}

/// The `config.json` of a model of `spec`, loadable by transformers'
/// `AutoModelForCausalLM` (written in float32).
pub fn write(spec: &LlamaSpec) -> String {
    let mut c = json!({
        "architectures": [LLAMA_ARCHITECTURE],
        "model_type": "llama",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "hidden_act": "silu",
        "hidden_size": spec.d_model,
        "intermediate_size": spec.ffn,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.d_model / spec.heads,
        "vocab_size": spec.vocab,
        "max_position_embeddings": spec.max_positions,
        "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_theta,
        "tie_word_embeddings": spec.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": true,
        "torch_dtype": "float32",
    });
    if let Some(s) = &spec.rope_scaling {
        c["rope_scaling"] = json!({
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_positions,
        });
    }
    serde_json::to_string_pretty(&c).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const V5: &str = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": 512, "max_position_embeddings": 64, "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        "tie_word_embeddings": true}"#;

    #[test]
    fn reads_both_rope_spellings_and_writes_what_it_reads() {
        let a = parse(V5).unwrap();
        assert_eq!((a.layers, a.d_model, a.heads, a.kv_heads, a.ffn, a.vocab), (2, 64, 4, 2, 128, 512));
        assert_eq!(a.rope_theta, 500000.0);
        assert_eq!(a.rope_scaling.as_ref().unwrap().original_max_positions, 32);
        assert!(a.tie_embeddings);
        assert_eq!(parse(&write(&a)).unwrap(), a, "the v4 spelling written reads back the same");
    }

    #[test]
    fn another_architecture_is_named() {
        let e = parse(r#"{"architectures": ["MistralForCausalLM"], "hidden_size": 8}"#).unwrap_err();
        assert!(e.contains("MistralForCausalLM"), "{e}");
        let e = parse(r#"{"model_type": "gpt2"}"#).unwrap_err();
        assert!(e.contains("gpt2"), "{e}");
        assert!(parse("[1]").unwrap_err().contains("not a JSON object"));
    }
}
