//! A corpus of shards on the local disk: the windows read back, the checks
//! made at the start, and errors found while reading.

use std::path::Path;

use flotilla_jobspec::{TokenDtype, TokenFormat};

use super::*;

fn u16_bytes(tokens: &[u32]) -> Vec<u8> {
    tokens.iter().flat_map(|t| (*t as u16).to_le_bytes()).collect()
}

fn nanogpt_bytes(tokens: &[u32], claimed: i32) -> Vec<u8> {
    let mut b = vec![0u8; NANOGPT_HEADER_BYTES as usize];
    for (k, v) in [NANOGPT_MAGIC, 1, claimed].into_iter().enumerate() {
        b[4 * k..4 * k + 4].copy_from_slice(&v.to_le_bytes());
    }
    b.extend(u16_bytes(tokens));
    b
}

fn p(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

fn open(paths: &[String], format: TokenFormat) -> Result<Corpus, DataError> {
    Corpus::open(paths, TokenDtype::U16, format, 4, 1000)
}

/// Shards `s0..s2` of 13, 4 and 9 tokens: token `100 * s + k` at position `k`.
fn three_shards(dir: &Path, nanogpt: bool) {
    for (s, n) in [(0u32, 13u32), (1, 4), (2, 9)] {
        let tokens: Vec<u32> = (0..n).map(|k| 100 * s + k).collect();
        let bytes = if nanogpt { nanogpt_bytes(&tokens, n as i32) } else { u16_bytes(&tokens) };
        std::fs::write(dir.join(format!("s{s}.bin")), bytes).unwrap();
    }
}

#[test]
fn windows_come_from_their_shards_by_list_or_pattern_in_either_format() {
    for (nanogpt, format) in [(false, TokenFormat::Raw), (true, TokenFormat::Nanogpt)] {
        let dir = tempfile::tempdir().unwrap();
        three_shards(dir.path(), nanogpt);
        let listed =
            open(&[p(dir.path(), "s0.bin"), p(dir.path(), "s1.bin"), p(dir.path(), "s2.bin")], format).unwrap();
        let globbed = open(&[p(dir.path(), "s[0-9].bin")], format).unwrap();
        for c in [&listed, &globbed] {
            // 3 windows in s0, none in s1, 2 in s2.
            assert_eq!(c.len(), 5);
            c.prefetch(&[4, 0]);
            c.prefetch(&[0]);
            let got = c.windows(&[0, 4]).unwrap();
            assert_eq!(got, vec![0, 1, 2, 3, 4, 204, 205, 206, 207, 208]);
            // Asked for twice: still there after one take, then fetched anew.
            assert_eq!(c.windows(&[0, 0, 2]).unwrap()[..5], [0, 1, 2, 3, 4]);
            assert_eq!(c.windows(&[3]).unwrap(), vec![200, 201, 202, 203, 204]);
            assert!(c.windows(&[5]).is_err());
        }
    }
}

#[test]
fn a_missing_or_malformed_shard_fails_the_open_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    three_shards(dir.path(), false);
    let missing = p(dir.path(), "s7.bin");
    let e = open(&[p(dir.path(), "s0.bin"), missing.clone()], TokenFormat::Raw).unwrap_err().to_string();
    assert!(e.contains(&missing) && e.contains("the shard is missing"), "{e}");

    std::fs::write(dir.path().join("odd.bin"), [1u8, 0, 2]).unwrap();
    let e = open(&[p(dir.path(), "odd.bin")], TokenFormat::Raw).unwrap_err().to_string();
    assert!(e.contains("odd.bin") && e.contains("3 bytes is not a whole number of 2-byte tokens"), "{e}");

    let tokens: Vec<u32> = (0..50).collect();
    let mut short = nanogpt_bytes(&tokens, 50);
    short.truncate(short.len() - 10);
    std::fs::write(dir.path().join("short.bin"), short).unwrap();
    let e = open(&[p(dir.path(), "short.bin")], TokenFormat::Nanogpt).unwrap_err().to_string();
    assert!(e.contains("short.bin") && e.contains("shorter than its header says"), "{e}");
    let e = open(&[p(dir.path(), "s0.bin")], TokenFormat::Nanogpt).unwrap_err().to_string();
    assert!(e.contains("s0.bin") && e.contains("shorter than the 1024-byte nanoGPT header"), "{e}");

    let e = open(&[p(dir.path(), "t*.bin")], TokenFormat::Raw).unwrap_err().to_string();
    assert!(e.contains("t*.bin") && e.contains("matches no file"), "{e}");
    let e = open(&[p(dir.path(), "s*.bin"), p(dir.path(), "s1.bin")], TokenFormat::Raw).unwrap_err().to_string();
    assert!(e.contains("s1.bin") && e.contains("named twice"), "{e}");
    let e = open(&[p(dir.path(), "s1.bin")], TokenFormat::Raw).unwrap_err().to_string();
    assert!(e.contains("hold no sample"), "{e}");
}

#[test]
fn a_token_outside_the_vocab_or_a_shard_cut_short_fails_the_read_naming_the_shard() {
    let dir = tempfile::tempdir().unwrap();
    let mut tokens: Vec<u32> = (0..21).collect();
    tokens[13] = 999;
    std::fs::write(dir.path().join("v.bin"), u16_bytes(&tokens)).unwrap();
    let c = Corpus::open(&[p(dir.path(), "v.bin")], TokenDtype::U16, TokenFormat::Raw, 4, 500).unwrap();
    assert_eq!(c.windows(&[0, 1]).unwrap().len(), 10);
    let e = c.windows(&[2, 3]).unwrap_err().to_string();
    assert!(e.contains("v.bin") && e.contains("token 999 at position 13") && e.contains("vocab of 500"), "{e}");

    // The shard shrinks after the start.
    std::fs::write(dir.path().join("v.bin"), u16_bytes(&tokens[..10])).unwrap();
    let e = c.windows(&[4]).unwrap_err().to_string();
    assert!(e.contains("v.bin"), "{e}");
}
