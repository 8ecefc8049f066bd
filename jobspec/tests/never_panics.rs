//! `parse` must answer every input with a spec or an error, never a panic,
//! and whatever it accepts must survive JSON.

use flotilla_jobspec::{parse, JobSpec, SpecError};
use proptest::prelude::*;

const SAMPLES: [&str; 3] = [
    include_str!("../../configs/quickstart.yaml"),
    include_str!("../../configs/gpt-tiny.yaml"),
    include_str!("../../configs/gpt-text.yaml"),
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
    Delete { at: usize, len: usize },
    Insert { at: usize, bit: usize },
    DuplicateLine { line: usize },
    SwapLines { a: usize, b: usize },
    Digit { at: usize, digit: u8 },
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 1usize..12).prop_map(|(at, len)| Edit::Delete { at, len }),
        (any::<usize>(), 0..YAML_BITS.len()).prop_map(|(at, bit)| Edit::Insert { at, bit }),
        any::<usize>().prop_map(|line| Edit::DuplicateLine { line }),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::SwapLines { a, b }),
        (any::<usize>(), 0u8..10).prop_map(|(at, digit)| Edit::Digit { at, digit }),
    ]
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
    }
    s
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
            let lines = source.split('\n').count() as u64;
            prop_assert!(line <= lines + 1, "line {} of {}: {}", line, lines, message);
            prop_assert!((line == 0) == (column == 0), "{}:{}: {}", line, column, message);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn mutated_samples_never_panic(sample in 0..SAMPLES.len(), edits in prop::collection::vec(edit(), 1..6)) {
        let mut source = SAMPLES[sample].to_owned();
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
