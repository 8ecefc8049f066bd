//! What validation needs to know of a Hugging Face `tokenizer.json`: that
//! it parses, and how many token ids it can produce, so that a job whose
//! model is too small for its tokenizer fails when it is submitted.
//!
//! Only the parts that give ids are read: the model's vocabulary (a map of
//! piece to id for BPE, WordPiece and WordLevel; a list of pieces for
//! Unigram, ids in order) and the added tokens. The worker loads the whole
//! file with the `tokenizers` crate.

use std::collections::HashMap;

use serde::de::IgnoredAny;
use serde::Deserialize;

/// Largest `tokenizer.json` validation reads (the biggest common ones are
/// a few tens of megabytes).
pub const TOKENIZER_MAX_BYTES: u64 = 64 << 20;

#[derive(Deserialize)]
struct File {
    model: Model,
    #[serde(default)]
    added_tokens: Vec<Added>,
}

#[derive(Deserialize)]
struct Model {
    vocab: Vocab,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Vocab {
    Ids(HashMap<String, u64>),
    Pieces(Vec<IgnoredAny>),
}

#[derive(Deserialize)]
struct Added {
    id: u64,
}

/// The number of ids the tokenizer in `text` can produce: one more than
/// the largest id of its vocabulary and added tokens. The error says what
/// is wrong, with the line in the JSON where it can.
pub fn id_count(text: &str) -> Result<u64, String> {
    let file: File = serde_json::from_str(text).map_err(|e| format!("is not a tokenizer.json: {e}"))?;
    let vocab = match &file.model.vocab {
        Vocab::Ids(ids) => ids.values().max().map(|m| m + 1),
        Vocab::Pieces(pieces) => (!pieces.is_empty()).then_some(pieces.len() as u64),
    };
    let added = file.added_tokens.iter().map(|a| a.id + 1).max();
    match vocab.max(added) {
        Some(n) if vocab.is_some() => Ok(n),
        _ => Err("is a tokenizer.json with an empty vocabulary".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_from_the_vocab_and_the_added_tokens() {
        let bpe = r#"{"added_tokens": [{"id": 7, "content": "<eos>", "special": true}],
            "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 4}, "merges": ["a b"]}}"#;
        assert_eq!(id_count(bpe), Ok(8));
        let no_added = r#"{"model": {"type": "WordLevel", "vocab": {"a": 0, "b": 9}, "unk_token": "a"}}"#;
        assert_eq!(id_count(no_added), Ok(10));
        let unigram = r#"{"added_tokens": [{"id": 1}], "model": {"type": "Unigram", "vocab": [["a", -1.0], ["b", -2.0], ["c", -3.0]]}}"#;
        assert_eq!(id_count(unigram), Ok(3));
    }

    #[test]
    fn what_is_not_a_tokenizer_says_so() {
        assert!(id_count("{").unwrap_err().contains("line 1"));
        assert!(id_count(r#"{"version": "1.0"}"#).unwrap_err().contains("missing field `model`"));
        assert!(id_count(r#"{"model": {"vocab": {}}}"#).unwrap_err().contains("empty vocabulary"));
        assert!(id_count(r#"{"model": {"vocab": {"a": -1}}}"#).is_err());
    }
}
