//! The coordinator's configuration file, mutated and made up: `load` answers
//! a configuration or an error, never a panic; every error starts with the
//! file's name and names the field, and for well-formed YAML the line too.
//!
//! Cases per property: `PROPTEST_CASES` (default 512); run longer by hand
//! with `PROPTEST_CASES=100000 cargo test --test fuzz_coordinator_config`.

use std::path::Path;

use flotilla::cli::coordinator::{load, Overrides};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512);
    ProptestConfig { cases, ..ProptestConfig::default() }
}

/// Configurations as docs/operations.md writes them, one per store.
const SAMPLES: &[&str] = &[
    "listen: 0.0.0.0:7070\nadvertise: http://10.0.0.1:7070\nstore:\n  raft:\n    id: 1\n    data_dir: /var/lib/flotilla\n    peers: {1: http://10.0.0.1:7070, 2: http://10.0.0.2:7070, 3: http://10.0.0.3:7070}\n",
    "listen: 127.0.0.1:7070\nlease_ms: 5000\nheartbeat_ms: 1000\nstart_grace_ms: 30000\nhandoff_retry_max_ms: 60000\nstore:\n  etcd:\n    endpoints: [http://10.0.0.9:2379]\n    prefix: /flotilla\n",
    "store:\n  memory: true\n",
    "store:\n  raft:\n    id: 4\n    join: true\n    data_dir: replica-4\n",
];

/// Pieces that change what a YAML document means.
const BITS: &[&str] = &[
    ":",
    " ",
    "\n",
    "  ",
    "-",
    "[",
    "]",
    "{",
    "}",
    ",",
    "#",
    "&a ",
    "*a",
    "!!int ",
    "'",
    "\"",
    "|",
    "~",
    "0",
    "-1",
    "18446744073709551616",
    "1e999",
    ".nan",
    "true",
    "store:",
    "raft:",
    "etcd:",
    "memory: true",
    "id: 0",
    "peers: {}",
    "join: true",
    "prefix: x",
    "endpoints: []",
    "listen: ",
    "\u{feff}",
    "é",
    "\r",
];

fn check(dir: &Path, text: &str) -> Result<(), TestCaseError> {
    let path = dir.join("coordinator.yaml");
    std::fs::write(&path, text).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let origin = path.display().to_string();
    let Err(message) = load(Some(&path), Overrides::default()) else { return Ok(()) };
    let rest = message.strip_prefix(&origin);
    prop_assert!(rest.is_some(), "{} does not start with the file's name", message);
    let rest = rest.unwrap();
    if rest.starts_with(": store") {
        return Ok(()); // a check of the whole configuration, naming its field
    }
    // `file:line:column: path: message`, from the parser.
    let mut parts = rest.splitn(4, ':').skip(1);
    let line: u64 = parts.next().and_then(|l| l.parse().ok()).unwrap_or(u64::MAX);
    prop_assert!(line != u64::MAX, "no line in {}", message);
    let tail = parts.nth(1).unwrap_or_default();
    prop_assert!(tail.trim_start().len() > 1, "no field or message in {}", message);
    if !text.trim().is_empty() && flotilla_jobspec::read_yaml::<serde_json::Value>(text, "probe").is_ok() {
        prop_assert!(line >= 1, "no position for well-formed YAML: {}\n{}", message, text);
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn mutated_configs_never_panic(
        sample in 0..SAMPLES.len(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0..BITS.len(), any::<bool>()), 1..6),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut text = SAMPLES[sample].to_owned();
        for (at, bit, delete) in edits {
            let mut at = at.index(text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            if delete {
                let end = text[at..].char_indices().nth(BITS[bit].len()).map_or(text.len(), |(i, _)| at + i);
                text.replace_range(at..end, "");
            } else {
                text.insert_str(at, BITS[bit]);
            }
        }
        check(dir.path(), &text)?;
    }

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,120}") {
        let dir = tempfile::tempdir().unwrap();
        check(dir.path(), &text)?;
    }
}

#[test]
fn the_samples_load_and_deep_nesting_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    for sample in SAMPLES {
        std::fs::write(dir.path().join("coordinator.yaml"), sample).unwrap();
        load(Some(&dir.path().join("coordinator.yaml")), Overrides::default()).unwrap();
    }
    for depth in [1_000, 100_000] {
        check(dir.path(), &format!("store: {}", "[".repeat(depth))).unwrap();
        check(dir.path(), &format!("store:\n  raft:\n    peers: {}", "{1: ".repeat(depth))).unwrap();
    }
}
