//! `tokenizer` of `kind: text` data: the `tokenizer.json` exists, parses,
//! and every id it can produce fits the model's vocabulary.

use serde_saphyr::Spanned;

use super::Ctx;
use crate::error::SpecError;
use crate::raw::RawModel;
use crate::tokenizer_json::{self, TOKENIZER_MAX_BYTES};

/// Checks the `tokenizer` of the data section at `at` against a language
/// model of `vocab` ids; returns the path as written.
pub(super) fn tokenizer(
    cx: &Ctx,
    at: &str,
    given: &Spanned<String>,
    raw_model: &Spanned<RawModel>,
    vocab: usize,
) -> Result<String, SpecError> {
    let field = format!("{at}.tokenizer");
    let path = &given.value;
    if path.is_empty() {
        return Err(cx.err(&field, given, "must not be empty"));
    }
    if let Some(problem) = crate::paths::path_problem(path) {
        return Err(cx.err(&field, given, problem));
    }
    let text = (cx.read_file)(path, TOKENIZER_MAX_BYTES).map_err(|e| cx.err(&field, given, e))?;
    let ids = tokenizer_json::id_count(&text).map_err(|e| cx.err(&field, given, format!("{path} {e}")))?;
    if ids > vocab as u64 {
        // Where the model's vocab was set: in the job file, or (a Llama) in
        // `model.from`'s config.json.
        let m = &raw_model.value;
        let set_at = match (&m.vocab, &m.from) {
            (Some(v), _) => format!("model.vocab ({vocab}, line {})", v.referenced.line()),
            (None, Some(from)) => {
                format!("model.vocab ({vocab}, from model.from's config.json, line {})", from.referenced.line())
            }
            (None, None) => format!("model.vocab ({vocab})"),
        };
        return Err(cx.err(
            &field,
            given,
            format!(
                "{path} produces token ids up to {}, more than {set_at} holds; \
                 give the model a vocab of at least {ids}",
                ids - 1
            ),
        ));
    }
    Ok(path.clone())
}

#[cfg(test)]
mod tests {
    use crate::{parse_with, DataSpec, JobSpec, SpecError};

    /// 300 ids: 0..=255 and 299 in the vocab, one added token at 299.
    const TOKENIZER: &str = r#"{"added_tokens": [{"id": 299, "content": "<eos>"}],
        "model": {"type": "BPE", "vocab": {"a": 0, "z": 255, "az": 299}, "merges": []}}"#;

    fn job(model: &str, data: &str, eval: &str) -> Result<JobSpec, SpecError> {
        let source = format!("name: t\nmodel: {model}\ndata: {data}\ntrain: {{steps: 1, global_batch: 1}}\n{eval}");
        parse_with(&source, "job.yaml", &|path: &str, _| match path {
            "tok/tokenizer.json" => Ok(TOKENIZER.to_string()),
            "broken.json" => Ok("{\"model\": ".to_string()),
            "hf/config.json" => Ok(r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 16,
                "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                "vocab_size": 280, "max_position_embeddings": 64}"#
                .to_string()),
            other => Err(format!("cannot read {other}: no such file")),
        })
    }

    const GPT: &str = "{kind: gpt, layers: 1, d_model: 8, heads: 2, context: 4, vocab: VOCAB}";

    #[test]
    fn a_tokenizer_whose_ids_fit_the_model_is_taken() {
        let spec =
            job(&GPT.replace("VOCAB", "300"), "{kind: text, path: a.txt, tokenizer: tok/tokenizer.json}", "").unwrap();
        assert_eq!(spec.data, DataSpec::Text { path: "a.txt".into(), tokenizer: Some("tok/tokenizer.json".into()) });
        assert_eq!(JobSpec::from_json(&spec.to_json()).unwrap(), spec, "survives JSON");
        // A vocab below 256 is fine with a tokenizer that fits it.
        let small = r#"{"model": {"vocab": {"a": 0, "b": 1}}}"#;
        let source = format!("name: t\nmodel: {}\ndata: {{kind: text, path: a.txt, tokenizer: s.json}}\ntrain: {{steps: 1, global_batch: 1}}\n", GPT.replace("VOCAB", "2"));
        assert!(parse_with(&source, "job.yaml", &|_: &str, _| Ok(small.to_string())).is_ok());
        // Without one, bytes need 256 ids, as before.
        let e = job(&GPT.replace("VOCAB", "100"), "{kind: text, path: a.txt}", "").unwrap_err();
        assert_eq!((e.path.as_str(), e.line), ("model.vocab", 2), "{e}");
    }

    #[test]
    fn a_tokenizer_too_big_for_the_model_names_both_fields_and_lines() {
        let e = job(&GPT.replace("VOCAB", "299"), "{kind: text, path: a.txt, tokenizer: tok/tokenizer.json}", "")
            .unwrap_err();
        assert_eq!((e.path.as_str(), e.line), ("data.tokenizer", 3), "{e}");
        assert!(e.message.contains("token ids up to 299, more than model.vocab (299, line 2)"), "{e}");
        assert!(e.message.contains("at least 300"), "{e}");

        // A Llama's vocab from its config.json: the message says so.
        let e =
            job("{kind: llama, from: hf, context: 8}", "{kind: text, path: a.txt, tokenizer: tok/tokenizer.json}", "")
                .unwrap_err();
        assert!(e.message.contains("model.vocab (280, from model.from's config.json, line 2)"), "{e}");

        let eval = "eval:\n  data: {kind: text, path: b.txt, tokenizer: tok/tokenizer.json}\n";
        let e = job(&GPT.replace("VOCAB", "256"), "{kind: text, path: a.txt}", eval).unwrap_err();
        assert_eq!((e.path.as_str(), e.line), ("eval.data.tokenizer", 6), "{e}");
    }

    #[test]
    fn a_missing_or_broken_tokenizer_is_an_error_at_its_field() {
        let gpt = GPT.replace("VOCAB", "512");
        let e = job(&gpt, "{kind: text, path: a.txt, tokenizer: nowhere.json}", "").unwrap_err();
        assert_eq!(e.path, "data.tokenizer");
        assert!(e.message.contains("cannot read nowhere.json"), "{e}");
        let e = job(&gpt, "{kind: text, path: a.txt, tokenizer: broken.json}", "").unwrap_err();
        assert!(e.message.contains("broken.json is not a tokenizer.json"), "{e}");
        let e = job(&gpt, "{kind: text, path: a.txt, tokenizer: ''}", "").unwrap_err();
        assert!(e.message.contains("must not be empty"), "{e}");
        let e = job(&gpt, "{kind: text, path: a.txt, tokenizer: ../t.json}", "").unwrap_err();
        assert!(e.message.contains("`..`"), "{e}");
        let e = job(&gpt, "{kind: tokens, path: a.bin, tokenizer: tok/tokenizer.json}", "").unwrap_err();
        assert!(e.message.contains("unknown field `tokenizer` for data kind `tokens`"), "{e}");
    }
}
