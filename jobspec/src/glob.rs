//! The wildcards of a `tokens` data path: `*` (any run of characters), `?`
//! (one character) and `[...]` (one character of a set, `[a-z]` ranges,
//! `[!...]` negated), in the file name only. The folder part names one
//! folder, which is listed; the matching files are taken in name order.

/// Whether `path` holds a wildcard character (`*`, `?` or `[`).
pub fn is_glob(path: &str) -> bool {
    path.contains(['*', '?', '['])
}

/// Splits `path` into its folder and its last segment (the file name or
/// the pattern): `s3://b/corpus/train-*.bin` gives `("s3://b/corpus",
/// "train-*.bin")`. `None` when there is no folder part.
pub fn split_folder(path: &str) -> Option<(&str, &str)> {
    let (folder, name) = path.rsplit_once('/')?;
    (!folder.is_empty() && !name.is_empty()).then_some((folder, name))
}

/// Why `path` is not a usable data path pattern: a wildcard outside the
/// file name, a `[` without its `]`, or an empty set.
pub fn pattern_problem(path: &str) -> Option<String> {
    if !is_glob(path) {
        return None;
    }
    let (folder, name) = path.rsplit_once('/').unwrap_or(("", path));
    if is_glob(folder) {
        return Some(format!(
            "wildcards may appear only in the file name, not in the folder `{}`",
            folder.chars().take(64).collect::<String>()
        ));
    }
    let chars: Vec<char> = name.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '[' {
            let Some(end) = set_end(&chars, i) else {
                return Some("a `[` without its closing `]`".into());
            };
            i = end;
        }
        i += 1;
    }
    None
}

/// Index of the `]` that closes the set opening at `open`: a `]` right
/// after `[` or `[!` belongs to the set.
fn set_end(p: &[char], open: usize) -> Option<usize> {
    let mut i = open + 1;
    if p.get(i) == Some(&'!') {
        i += 1;
    }
    if p.get(i) == Some(&']') {
        i += 1;
    }
    while i < p.len() {
        if p[i] == ']' {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Whether the file name `name` matches `pattern` (a checked pattern's
/// last segment).
pub fn matches(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Iterative matching with one backtrack point for the last `*`.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        let step = match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
                continue;
            }
            Some('?') => Some(pi + 1),
            Some('[') => match set_end(&p, pi) {
                Some(end) if in_set(&p[pi + 1..end], n[ni]) => Some(end + 1),
                Some(_) => None,
                None => (n[ni] == '[').then_some(pi + 1),
            },
            Some(c) => (*c == n[ni]).then_some(pi + 1),
            None => None,
        };
        match (step, star) {
            (Some(next), _) => {
                pi = next;
                ni += 1;
            }
            (None, Some((sp, sn))) => {
                pi = sp + 1;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            }
            (None, None) => return false,
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Whether `c` is in the set `body` (what lies between `[` and `]`).
fn in_set(body: &[char], c: char) -> bool {
    let (negated, body) = match body.first() {
        Some('!') => (true, &body[1..]),
        _ => (false, body),
    };
    let mut found = false;
    let mut i = 0;
    while i < body.len() {
        if i + 2 < body.len() && body[i + 1] == '-' {
            found |= body[i] <= c && c <= body[i + 2];
            i += 3;
        } else {
            found |= body[i] == c;
            i += 1;
        }
    }
    found != negated
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_file_names() {
        assert!(matches("train-*.bin", "train-000.bin"));
        assert!(matches("train-*.bin", "train-.bin"));
        assert!(!matches("train-*.bin", "train-000.bin.tmp"));
        assert!(!matches("train-*.bin", "val-000.bin"));
        assert!(matches("*", "anything"));
        assert!(matches("a*b*c", "a-b-b-c"));
        assert!(!matches("a*b*c", "a-b-b-d"));
        assert!(matches("s??.u16", "s01.u16"));
        assert!(!matches("s??.u16", "s1.u16"));
        assert!(matches("s[0-4].bin", "s3.bin"));
        assert!(!matches("s[0-4].bin", "s7.bin"));
        assert!(matches("s[!0-4].bin", "s7.bin"));
        assert!(matches("s[]x].bin", "s].bin"));
        assert!(matches("plain.bin", "plain.bin"));
        assert!(!matches("plain.bin", "plain.bins"));
    }

    #[test]
    fn patterns_are_checked() {
        assert_eq!(pattern_problem("corpus/a.bin"), None);
        assert_eq!(pattern_problem("s3://b/corpus/train-*.bin"), None);
        assert!(pattern_problem("corpus/*/a.bin").unwrap().contains("only in the file name"));
        assert!(pattern_problem("corpus/s[0-4.bin").unwrap().contains("closing `]`"));
        assert_eq!(pattern_problem("*.bin"), None, "relative to the job file's folder");
        assert_eq!(split_folder("s3://b/c/x-*.bin"), Some(("s3://b/c", "x-*.bin")));
    }
}
