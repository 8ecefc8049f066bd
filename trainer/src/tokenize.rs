//! `data.kind: text` with a `tokenizer`: the text tokenized by a Hugging
//! Face `tokenizer.json` (the `tokenizers` crate), once per job, into a
//! cache beside the job's checkpoints that later starts read instead.
//!
//! Documents: the text is cut after every `\n` (each piece keeps its line
//! break; the last may have none), each piece is encoded on its own without
//! the tokenizer's special tokens (Python: `tok.encode(piece,
//! add_special_tokens=False).ids`), and the ids are joined in file order.
//! Added tokens written in the text (an `<|endoftext|>` between stories)
//! become their ids. The file's truncation and padding are ignored.
//!
//! The cache is `OUTPUT/tokens/text-<key>.u32`, keyed by a SHA-256 of the
//! text, the `tokenizer.json` and this module's rules, so a changed file
//! is tokenized again. Tokenizing is deterministic, so workers of a job
//! need not wait for each other: each that finds no usable cache tokenizes
//! by itself and offers its result with a create-if-absent write; the
//! first write wins and every other worker holds the same ids. A cache
//! file that is short, torn or of another key is detected by its header
//! and checksum, never trained on, and written again whole.

use flotilla_storage::Storage;
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use crate::data::DataError;

/// The folder under a job's output location that holds its token caches.
pub const CACHE_FOLDER: &str = "tokens";
/// What a cache key covers besides the two files: the rules above and the
/// tokenizer implementation, so that a change to either makes new files.
const KEY_DOMAIN: &[u8] = b"flotilla text tokens 1; tokenizers 0.23; pieces end after \\n; no special tokens\0";
const MAGIC: &[u8; 8] = b"FLTOKS01";
/// Magic, key, token count (u64), CRC-32C of the ids (u32), zero (u32).
const HEADER_BYTES: usize = 8 + 32 + 8 + 4 + 4;
/// Text encoded per batch: bounds the memory of the encodings in flight.
const BATCH_BYTES: usize = 1 << 20;

/// Where a job keeps its token caches, and the runtime that reaches them.
pub struct TokenCache {
    folder: Storage,
    io: tokio::runtime::Handle,
}

impl TokenCache {
    /// The cache folder of the job whose output location is `out`.
    pub fn new(out: &Storage, io: tokio::runtime::Handle) -> TokenCache {
        TokenCache { folder: out.child(CACHE_FOLDER), io }
    }
}

fn io_error(path: &str) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io { path: path.to_string(), source }
}

fn format_error(path: &str, message: impl Into<String>) -> DataError {
    DataError::Format { path: path.to_string(), message: message.into() }
}

/// Loads a `tokenizer.json`, with its truncation and padding turned off.
pub fn load_tokenizer(path: &str, json: &[u8]) -> Result<Tokenizer, DataError> {
    let mut tokenizer =
        Tokenizer::from_bytes(json).map_err(|e| format_error(path, format!("is not a usable tokenizer.json: {e}")))?;
    tokenizer.with_truncation(None).map_err(|e| format_error(path, format!("cannot turn off truncation: {e}")))?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}

/// The ids of `text` by the rules of this module (see the top).
pub fn tokenize(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, String> {
    let mut ids = Vec::new();
    let mut batch = Vec::new();
    let mut batch_bytes = 0;
    let mut pieces = text.split_inclusive('\n').peekable();
    while let Some(piece) = pieces.next() {
        batch.push(piece);
        batch_bytes += piece.len();
        if batch_bytes >= BATCH_BYTES || pieces.peek().is_none() {
            let encodings =
                tokenizer.encode_batch_fast(std::mem::take(&mut batch), false).map_err(|e| e.to_string())?;
            ids.extend(encodings.iter().flat_map(|e| e.get_ids().iter().copied()));
            batch_bytes = 0;
        }
    }
    Ok(ids)
}

/// The cache key of `text` tokenized by `tokenizer_json`.
pub fn cache_key(text: &[u8], tokenizer_json: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(KEY_DOMAIN);
    for part in [text, tokenizer_json] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// The cache file's name for `key`.
pub fn cache_name(key: &[u8; 32]) -> String {
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    format!("text-{hex}.u32")
}

/// A cache file: header, then the ids as little-endian u32.
pub fn encode_cache(key: &[u8; 32], ids: &[u32]) -> Vec<u8> {
    let mut body = Vec::with_capacity(ids.len() * 4);
    for id in ids {
        body.extend_from_slice(&id.to_le_bytes());
    }
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(key);
    out.extend_from_slice(&(ids.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&body);
    out
}

/// The ids of a cache file written for `key`, or why it cannot be used.
pub fn decode_cache(key: &[u8; 32], bytes: &[u8]) -> Result<Vec<u32>, String> {
    if bytes.len() < HEADER_BYTES || &bytes[..8] != MAGIC {
        return Err(format!("{} bytes without a whole header", bytes.len()));
    }
    if &bytes[8..40] != key {
        return Err("written for other files".into());
    }
    let count = u64::from_le_bytes(bytes[40..48].try_into().expect("8 bytes"));
    let body = &bytes[HEADER_BYTES..];
    if Some(body.len() as u64) != count.checked_mul(4) {
        return Err(format!("{} bytes of ids where its header promises {count} ids", body.len()));
    }
    let crc = u32::from_le_bytes(bytes[48..52].try_into().expect("4 bytes"));
    if crc32c::crc32c(body) != crc {
        return Err("its ids do not match their checksum".into());
    }
    Ok(body.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).collect())
}

/// The ids of the text file at `path` tokenized by the `tokenizer.json` at
/// `tokenizer_path`: read from `cache` when it holds them, else tokenized
/// here and offered to it. A cache that cannot be read or written is
/// logged and passed by: the ids are the same either way.
pub fn text_tokens(path: &str, tokenizer_path: &str, cache: Option<&TokenCache>) -> Result<Vec<u32>, DataError> {
    let text = std::fs::read(path).map_err(io_error(path))?;
    let json = std::fs::read(tokenizer_path).map_err(io_error(tokenizer_path))?;
    let key = cache_key(&text, &json);
    let name = cache_name(&key);
    let mut damaged = false;
    if let Some(c) = cache {
        match c.io.block_on(c.folder.get(&name)) {
            Ok(bytes) => match decode_cache(&key, &bytes) {
                Ok(ids) => {
                    tracing::info!(cache = %name, tokens = ids.len(), "read the text's tokens from the job's cache");
                    return Ok(ids);
                }
                Err(why) => {
                    tracing::warn!(cache = %name, why = %why, "the token cache is damaged; tokenizing again");
                    damaged = true;
                }
            },
            Err(e) if e.is_not_found() => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the token cache; tokenizing here"),
        }
    }
    let text = std::str::from_utf8(&text).map_err(|e| {
        format_error(
            path,
            format!("is not UTF-8 text ({e}); a tokenizer reads text (without `tokenizer`, any bytes are tokens)"),
        )
    })?;
    let tokenizer = load_tokenizer(tokenizer_path, &json)?;
    let ids = tokenize(&tokenizer, text).map_err(|e| format_error(path, format!("cannot be tokenized: {e}")))?;
    if let Some(c) = cache {
        let bytes = encode_cache(&key, &ids);
        // A damaged file is replaced whole; otherwise the first writer wins
        // and the others' ids are the same.
        let written = if damaged {
            c.io.block_on(c.folder.put(&name, bytes)).map(|_| true)
        } else {
            c.io.block_on(c.folder.put_new(&name, bytes))
        };
        match written {
            Ok(true) => tracing::info!(cache = %name, tokens = ids.len(), "tokenized the text into the job's cache"),
            Ok(false) => tracing::info!(cache = %name, "another worker cached the same tokens first"),
            Err(e) => tracing::warn!(error = %e, "cannot write the token cache; it is tokenized again next start"),
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word-level tokenizer over whitespace-split words, with `<eos>` as
    /// an added token: enough to check the rules without a trained file.
    const WORDS: &str = r#"{"version": "1.0", "truncation": {"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0},
        "padding": null,
        "added_tokens": [{"id": 5, "content": "<eos>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "a": 1, "b": 2, "c": 3, "d": 4}, "unk_token": "<unk>"}}"#;

    fn words() -> Tokenizer {
        load_tokenizer("words.json", WORDS.as_bytes()).unwrap()
    }

    #[test]
    fn pieces_end_after_line_breaks_and_added_tokens_keep_their_ids() {
        // Truncation to 2 in the file is ignored; `x` is unknown.
        assert_eq!(tokenize(&words(), "a b c\nd<eos>a x\n\nb").unwrap(), vec![1, 2, 3, 4, 5, 1, 0, 2]);
        assert_eq!(tokenize(&words(), "").unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn a_cache_file_round_trips_and_a_damaged_one_says_why() {
        let key = cache_key(b"text", b"json");
        assert_ne!(key, cache_key(b"text", b"json2"));
        assert_ne!(cache_key(b"ab", b"c"), cache_key(b"a", b"bc"), "the parts are delimited");
        let ids: Vec<u32> = (0..1000).map(|i| i * 7 % 513).collect();
        let bytes = encode_cache(&key, &ids);
        assert_eq!(decode_cache(&key, &bytes).unwrap(), ids);
        assert!(decode_cache(&key, &bytes[..bytes.len() - 4]).unwrap_err().contains("promises 1000 ids"));
        assert!(decode_cache(&key, &bytes[..20]).unwrap_err().contains("header"));
        assert!(decode_cache(&cache_key(b"other", b"json"), &bytes).unwrap_err().contains("other files"));
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(decode_cache(&key, &flipped).unwrap_err().contains("checksum"));
    }

    #[test]
    fn the_cache_is_written_once_read_back_and_rebuilt_when_torn() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("t.txt");
        let tok = dir.path().join("tokenizer.json");
        std::fs::write(&text, "a b\nc d <eos>\n").unwrap();
        std::fs::write(&tok, WORDS).unwrap();
        let (text, tok) = (text.to_str().unwrap(), tok.to_str().unwrap());
        let rt = tokio::runtime::Runtime::new().unwrap();
        let out = Storage::open(dir.path().join("job").to_str().unwrap()).unwrap();
        let cache = TokenCache::new(&out, rt.handle().clone());
        let want = vec![1, 2, 3, 4, 5];
        let file = dir
            .path()
            .join("job")
            .join(CACHE_FOLDER)
            .join(cache_name(&cache_key(&std::fs::read(text).unwrap(), WORDS.as_bytes())));

        assert_eq!(text_tokens(text, tok, Some(&cache)).unwrap(), want);
        let written = std::fs::read(&file).unwrap();
        assert_eq!(written.len(), HEADER_BYTES + 4 * want.len());

        // A cache that is read is used as it is: a valid file with other
        // ids (as if made by another tokenizer build) is what comes back.
        let key = cache_key(&std::fs::read(text).unwrap(), WORDS.as_bytes());
        std::fs::write(&file, encode_cache(&key, &[4, 3])).unwrap();
        assert_eq!(text_tokens(text, tok, Some(&cache)).unwrap(), vec![4, 3]);

        // Torn: detected, tokenized again, and the file made whole.
        std::fs::write(&file, &written[..written.len() - 3]).unwrap();
        assert_eq!(text_tokens(text, tok, Some(&cache)).unwrap(), want);
        assert_eq!(std::fs::read(&file).unwrap(), written);

        // A changed text gets a file of its own.
        std::fs::write(text, "d d\n").unwrap();
        assert_eq!(text_tokens(text, tok, Some(&cache)).unwrap(), vec![4, 4]);
        assert_eq!(std::fs::read_dir(file.parent().unwrap()).unwrap().count(), 2);
    }

    #[test]
    fn text_that_is_not_utf8_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let (text, tok) = (dir.path().join("t.bin"), dir.path().join("tokenizer.json"));
        std::fs::write(&text, [b'a', 0xff, b'\n']).unwrap();
        std::fs::write(&tok, WORDS).unwrap();
        let e = text_tokens(text.to_str().unwrap(), tok.to_str().unwrap(), None).unwrap_err().to_string();
        assert!(e.contains("t.bin") && e.contains("not UTF-8"), "{e}");
        std::fs::write(&tok, "{\"model\": {}}").unwrap();
        std::fs::write(&text, "a\n").unwrap();
        let e = text_tokens(text.to_str().unwrap(), tok.to_str().unwrap(), None).unwrap_err().to_string();
        assert!(e.contains("is not a usable tokenizer.json"), "{e}");
    }
}
