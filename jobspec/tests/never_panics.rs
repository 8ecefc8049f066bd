//! `parse` must answer every input with a spec or an error, never a panic,
//! and whatever it accepts must survive JSON. An error names its field path
//! and, when the input is well-formed YAML, the line and column to fix.
//!
//! Cases per property: `PROPTEST_CASES` (default 2048); run longer by hand
//! with `PROPTEST_CASES=100000 cargo test -p flotilla-jobspec --test never_panics`.

use std::path::Path;
use std::sync::LazyLock;

use flotilla_jobspec::{parse, JobSpec, SpecError};
use proptest::prelude::*;

/// Every job file in `configs/` and `configs/bad/`: the seeds of the
/// mutations.
static SAMPLES: LazyLock<Vec<String>> = LazyLock::new(|| {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut samples = Vec::new();
    for dir in [root.clone(), root.join("bad")] {
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        samples.extend(files.iter().map(|f| std::fs::read_to_string(f).unwrap()));
    }
    assert!(samples.len() > 20, "expected the sample configs, found {}", samples.len());
    samples
});

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2048);
    ProptestConfig { cases, ..ProptestConfig::default() }
}

/// Numbers no field can hold, in the spellings YAML allows.
const HUGE: &[&str] = &[
    "18446744073709551616",
    "-9223372036854775809",
    "340282366920938463463374607431768211456",
    "1e309",
    "-1e309",
    "4.9e-325",
    "0x10000000000000000",
    "0o7777777777777777777777777",
    "1_000_000_000_000_000_000_000",
    ".inf",
    "-.inf",
    ".nan",
];

/// Characters that tend to change a YAML document's meaning.
const YAML_BITS: &[&str] = &[
    ":",
    "-",
    " ",
    "  ",
    "\n",
    "\t",
    "#",
    "[",
    "]",
    "{",
    "}",
    ",",
    "'",
    "\"",
    "&a",
    "*a",
    "<<: *a",
    "!",
    "!!str",
    "|",
    ">",
    "?",
    "%",
    "@",
    "`",
    "~",
    "null",
    "0",
    "-1",
    "1e999",
    ".nan",
    "0x1F",
    "1_000",
    "18446744073709551616",
    "\u{feff}",
    "é",
    "---",
    "...",
    "\r\n",
    "\\",
    "s3://",
    "file://",
    "auto",
];

#[derive(Debug, Clone)]
enum Edit {
    Delete {
        at: usize,
        len: usize,
    },
    Insert {
        at: usize,
        bit: usize,
    },
    DuplicateLine {
        line: usize,
    },
    SwapLines {
        a: usize,
        b: usize,
    },
    Digit {
        at: usize,
        digit: u8,
    },
    /// One bit of one byte flipped (the result read as lossy UTF-8).
    FlipBit {
        at: usize,
        bit: u8,
    },
    Truncate {
        at: usize,
    },
    /// A `key: value` line inserted at some indentation.
    InsertLine {
        line: usize,
        indent: usize,
        key: usize,
        value: usize,
    },
    /// A number replaced by one out of every field's range.
    Huge {
        at: usize,
        huge: usize,
    },
    /// A value wrapped in `depth` flow sequences or mappings.
    Nest {
        at: usize,
        depth: usize,
        map: bool,
    },
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 1usize..12).prop_map(|(at, len)| Edit::Delete { at, len }),
        (any::<usize>(), 0..YAML_BITS.len()).prop_map(|(at, bit)| Edit::Insert { at, bit }),
        any::<usize>().prop_map(|line| Edit::DuplicateLine { line }),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::SwapLines { a, b }),
        (any::<usize>(), 0u8..10).prop_map(|(at, digit)| Edit::Digit { at, digit }),
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Edit::FlipBit { at, bit }),
        any::<usize>().prop_map(|at| Edit::Truncate { at }),
        (any::<usize>(), 0usize..8, any::<usize>(), 0..YAML_BITS.len() + HUGE.len())
            .prop_map(|(line, indent, key, value)| Edit::InsertLine { line, indent, key, value }),
        (any::<usize>(), 0..HUGE.len()).prop_map(|(at, huge)| Edit::Huge { at, huge }),
        (any::<usize>(), prop_oneof![1usize..8, 100usize..400], any::<bool>())
            .prop_map(|(at, depth, map)| Edit::Nest { at, depth, map }),
    ]
}

/// Keys the job file knows, and one it does not.
const KEYS: &[&str] = &[
    "version", "name", "model", "kind", "layers", "data", "train", "steps", "lr", "workers", "min", "dp", "zero",
    "url", "bogus",
];

/// The byte offsets of the numbers in `s`: (start, end).
fn numbers(s: &str) -> Vec<(usize, usize)> {
    let bytes = s.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_digit() || matches!(bytes[i], b'.' | b'e' | b'_')) {
                i += 1;
            }
            spans.push((start, i));
        } else {
            i += 1;
        }
    }
    spans
}

/// The char boundary at or before `at % (len + 1)`.
fn boundary(s: &str, at: usize) -> usize {
    let mut i = at % (s.len() + 1);
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn apply(source: &str, edit: &Edit) -> String {
    let mut s = source.to_owned();
    match *edit {
        Edit::Delete { at, len } => {
            let start = boundary(&s, at);
            let end = boundary(&s, start + len.min(s.len() - start));
            s.replace_range(start..end, "");
        }
        Edit::Insert { at, bit } => {
            let at = boundary(&s, at);
            s.insert_str(at, YAML_BITS[bit]);
        }
        Edit::DuplicateLine { line } => {
            let mut lines: Vec<&str> = s.lines().collect();
            if !lines.is_empty() {
                let i = line % lines.len();
                lines.insert(i, lines[i]);
            }
            s = lines.join("\n");
        }
        Edit::SwapLines { a, b } => {
            let mut lines: Vec<&str> = s.lines().collect();
            if !lines.is_empty() {
                let n = lines.len();
                lines.swap(a % n, b % n);
            }
            s = lines.join("\n");
        }
        Edit::Digit { at, digit } => {
            let digits: Vec<usize> = s.char_indices().filter(|(_, c)| c.is_ascii_digit()).map(|(i, _)| i).collect();
            if !digits.is_empty() {
                let i = digits[at % digits.len()];
                s.replace_range(i..i + 1, &digit.to_string());
            }
        }
        Edit::FlipBit { at, bit } => {
            let mut bytes = s.into_bytes();
            if !bytes.is_empty() {
                let n = bytes.len();
                bytes[at % n] ^= 1 << bit;
            }
            s = String::from_utf8_lossy(&bytes).into_owned();
        }
        Edit::Truncate { at } => s.truncate(boundary(&s, at)),
        Edit::InsertLine { line, indent, key, value } => {
            let value = YAML_BITS.iter().chain(HUGE).nth(value).unwrap();
            let new = format!("{}{}: {value}", " ".repeat(indent), KEYS[key % KEYS.len()]);
            let mut lines: Vec<&str> = s.lines().collect();
            lines.insert(line % (lines.len() + 1), &new);
            s = lines.join("\n");
        }
        Edit::Huge { at, huge } => {
            let spans = numbers(&s);
            if !spans.is_empty() {
                let (start, end) = spans[at % spans.len()];
                s.replace_range(start..end, HUGE[huge]);
            }
        }
        Edit::Nest { at, depth, map } => {
            // After a `: ` when there is one, so that a value is wrapped.
            let colons: Vec<usize> = s.match_indices(": ").map(|(i, _)| i + 2).collect();
            let at = if colons.is_empty() { boundary(&s, at) } else { colons[at % colons.len()] };
            let end = s[at..].find('\n').map_or(s.len(), |i| at + i);
            let (open, close) = if map { ("{k: ", "}") } else { ("[", "]") };
            s.insert_str(end, &close.repeat(depth));
            s.insert_str(at, &open.repeat(depth));
        }
    }
    s
}

/// Whether `source` is well-formed YAML that a JSON value can hold (string
/// keys, no anchors left unresolved): then an error can point at a place.
fn well_formed(source: &str) -> bool {
    serde_saphyr::from_str::<serde_json::Value>(source).is_ok()
}

/// Whatever `parse` returns must be well formed.
fn check(source: &str) -> Result<(), TestCaseError> {
    match parse(source, "fuzz.yaml") {
        Ok(spec) => {
            let back = JobSpec::from_json(&spec.to_json()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(back, spec);
        }
        Err(SpecError { origin, path, line, column, message }) => {
            prop_assert_eq!(origin, "fuzz.yaml");
            prop_assert!(!path.is_empty() && !message.is_empty());
            // YAML breaks lines at `\r\n`, `\n` and a lone `\r`.
            let lines = source.replace("\r\n", "\n").split(['\n', '\r']).count() as u64;
            prop_assert!(line <= lines + 1, "line {} of {}: {}", line, lines, message);
            prop_assert!((line == 0) == (column == 0), "{}:{}: {}", line, column, message);
            if well_formed(source) {
                prop_assert!(line >= 1, "{}: {}: no position, for well-formed YAML:\n{}", path, message, source);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn mutated_samples_never_panic(sample in any::<prop::sample::Index>(), edits in prop::collection::vec(edit(), 1..6)) {
        let mut source = sample.get(&SAMPLES).clone();
        for e in &edits {
            source = apply(&source, e);
        }
        check(&source)?;
    }

    #[test]
    fn arbitrary_text_never_panics(source in "\\PC{0,200}") {
        check(&source)?;
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        check(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn yaml_soup_never_panics(bits in prop::collection::vec(0..YAML_BITS.len(), 0..60)) {
        let source: String = bits.iter().map(|&b| YAML_BITS[b]).collect();
        check(&source)?;
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    for depth in [100, 10_000, 100_000] {
        check(&"[".repeat(depth)).unwrap();
        check(&"{a: ".repeat(depth)).unwrap();
        check(&format!("name: {}{}", "[".repeat(depth), "]".repeat(depth))).unwrap();
        let block: String = (0..depth.min(2_000)).map(|i| format!("{}k{i}:\n", " ".repeat(i))).collect();
        check(&block).unwrap();
    }
}

#[test]
fn alias_bombs_are_refused() {
    let mut source = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 0..12 {
        let prev = if i == 0 { "a".to_owned() } else { format!("b{}", i - 1) };
        source.push_str(&format!(
            "b{i}: &b{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
        ));
    }
    // `version` and the reserved keys accept any value, so they walk whatever
    // they are given: the parser's alias limits must stop the expansion.
    for tail in ["version: *b11\n", "parallelism: {schedule: *b11}\n", "name: *b11\n"] {
        let source = format!("{source}{tail}");
        let started = std::time::Instant::now();
        let err = parse(&source, "bomb.yaml").unwrap_err();
        assert!(started.elapsed().as_secs() < 10, "{err}");
    }
}

#[test]
fn the_samples_are_well_formed_so_their_errors_need_a_position() {
    let formed = SAMPLES.iter().filter(|s| well_formed(s)).count();
    assert!(formed + 2 >= SAMPLES.len(), "only {formed} of {} samples are well-formed YAML", SAMPLES.len());
    for source in SAMPLES.iter() {
        check(source).unwrap();
    }
}
