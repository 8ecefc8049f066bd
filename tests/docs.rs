//! The documentation (README.md and docs/*.md) holds together: every relative link and
//! `#anchor` points at a file and heading that exist, every Python block parses and uses
//! only what the SDK (`python/flotilla`) defines, and runs against a real coordinator and
//! worker with TLS and tokens on, and every coordinator configuration loads. Job-file
//! blocks are checked by `jobspec/tests/jobfile_doc.rs`.
//!
//! Conventions for code blocks: ```` ```python ```` runs as written, from a folder that
//! holds `configs/quickstart.yaml`, with `FLOTILLA_COORDINATOR`, `FLOTILLA_TOKEN` and
//! `FLOTILLA_TLS_DIR` set; ```` ```python norun ```` is only parsed and checked against the
//! SDK. ```` ```yaml coordinator ```` is a coordinator's configuration file.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use flotilla::cli::coordinator::{load, Overrides};
use support::*;

/// README.md and every page under docs/, with their text.
fn pages() -> Vec<(PathBuf, String)> {
    let mut paths = vec![repo().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .expect("read docs/")
        .map(|e| e.expect("list docs/").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    paths.extend(docs);
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            (p, text)
        })
        .collect()
}

fn short(page: &Path) -> String {
    page.strip_prefix(repo()).unwrap_or(page).display().to_string()
}

/// The fenced blocks of a page: info string, first line number, text.
fn blocks(text: &str) -> Vec<(String, usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(String, usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        match &mut current {
            None => {
                if let Some(info) = line.trim_end().strip_prefix("```") {
                    current = Some((info.trim().to_owned(), i + 2, String::new()));
                }
            }
            Some((_, _, body)) if line.trim_end() != "```" => {
                body.push_str(line);
                body.push('\n');
            }
            Some(_) => out.push(current.take().unwrap()),
        }
    }
    assert!(current.is_none(), "a code block is not closed");
    out
}

/// Lines outside fenced blocks, with their numbers.
fn prose(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut fenced = false;
    text.lines().enumerate().filter_map(move |(i, line)| {
        if line.starts_with("```") {
            fenced = !fenced;
            return None;
        }
        (!fenced).then_some((i + 1, line))
    })
}

/// GitHub's anchor for a heading: lowercase, letters, digits, `-` and `_` kept, spaces
/// made `-`, the rest dropped; a repeated anchor gets `-1`, `-2`, ...
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for (_, line) in prose(text) {
        let Some(heading) = line.strip_prefix('#').map(|h| h.trim_start_matches('#')) else { continue };
        if !heading.starts_with(' ') {
            continue;
        }
        let base: String = heading
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let mut anchor = base.clone();
        let mut n = 0;
        while seen.contains(&anchor) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
        seen.insert(anchor);
    }
    seen
}

/// A line with its inline code spans blanked out.
fn without_code(line: &str) -> String {
    line.split('`').enumerate().map(|(i, part)| if i % 2 == 0 { part } else { "" }).collect::<Vec<_>>().join("`")
}

/// The targets of the Markdown links on a page (`[text](target)`), with line numbers.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in prose(text) {
        let line = without_code(line);
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let end = after.find(')').unwrap_or_else(|| panic!("line {n}: a link without its `)`"));
            out.push((n, after[..end].to_owned()));
            rest = &after[end..];
        }
    }
    out
}

/// Why a link's target does not resolve, if it does not.
fn broken(page: &Path, text: &str, target: &str) -> Option<String> {
    if target.starts_with("http://") || target.starts_with("https://") || target.starts_with("mailto:") {
        return None;
    }
    let (path, anchor) = target.split_once('#').map_or((target, None), |(p, a)| (p, Some(a)));
    let file = if path.is_empty() { page.to_path_buf() } else { page.parent().unwrap().join(path) };
    if !file.exists() {
        return Some(format!("{} does not exist", file.display()));
    }
    let anchor = anchor?;
    let heads = if path.is_empty() {
        anchors(text)
    } else if file.extension().is_some_and(|e| e == "md") {
        anchors(&std::fs::read_to_string(&file).unwrap())
    } else {
        return Some("an anchor into a file that is not Markdown".into());
    };
    (!heads.contains(anchor)).then(|| format!("{} has no heading #{anchor}", short(&file)))
}

#[test]
fn every_link_and_anchor_resolves() {
    let mut bad = Vec::new();
    let mut count = 0;
    for (page, text) in pages() {
        for (line, target) in links(&text) {
            count += 1;
            if let Some(why) = broken(&page, &text, &target) {
                bad.push(format!("{}:{line}: ({target}): {why}", short(&page)));
            }
        }
    }
    assert!(bad.is_empty(), "broken links:\n{}", bad.join("\n"));
    // README's table of contents alone links every page.
    assert!(count >= 30, "found only {count} links");
}

#[test]
fn the_link_check_sees_a_broken_anchor_and_file() {
    let page = repo().join("README.md");
    let text = "# One\n## Two: `x` (y)\n## Two: `x` (y)\n```sh\n# not a heading\n```\n";
    assert_eq!(anchors(text), BTreeSet::from(["one".into(), "two-x-y".into(), "two-x-y-1".into()]));
    assert!(broken(&page, text, "#two-x-y-1").is_none());
    assert!(broken(&page, text, "#not-a-heading").is_some());
    assert!(broken(&page, text, "docs/jobfile.md#parallelism").is_none());
    assert!(broken(&page, text, "docs/jobfile.md#no-such").is_some());
    assert!(broken(&page, text, "docs/no-such.md").is_some());
    assert_eq!(links("a [b](c.md) `[d](e)` [f\n](g#h)\n```\n[i](j)\n```\n"), [(1, "c.md".into()), (2, "g#h".into())]);
}

/// What the SDK defines: its modules' functions, classes and instance attributes.
fn sdk_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(repo().join("python/flotilla")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "py") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for line in text.lines() {
            let line = line.trim_start();
            for prefix in ["def ", "class ", "self."] {
                if let Some(rest) = line.strip_prefix(prefix) {
                    let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                    names.insert(name);
                }
            }
        }
    }
    names
}

/// The SDK names a block uses: `flotilla.X`, `client.X`, `job.X` and `from flotilla import X`.
fn sdk_uses(block: &str) -> Vec<String> {
    let mut uses = Vec::new();
    for line in block.lines() {
        let code = line.split('#').next().unwrap_or("");
        if let Some(names) = code.trim().strip_prefix("from flotilla import ") {
            uses.extend(names.split(',').map(|n| n.trim().to_owned()).filter(|n| !n.is_empty()));
        }
        for receiver in ["flotilla.", "client.", "job."] {
            for (at, _) in code.match_indices(receiver) {
                let before = code[..at].chars().next_back();
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.') {
                    continue;
                }
                let name: String =
                    code[at + receiver.len()..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                uses.push(name);
            }
        }
    }
    uses
}

#[test]
fn python_blocks_use_the_sdk_and_run_against_a_real_coordinator() {
    let python = oracle_python();
    let known = sdk_names();
    assert!(known.contains("submit") && known.contains("wait"), "{known:?}");
    assert_eq!(sdk_uses("job.nope()  # client.commented\nx.job.sub"), ["nope"]);

    let mut runnable = Vec::new();
    for (page, text) in pages() {
        for (info, line, block) in blocks(&text) {
            let mut words = info.split_whitespace();
            if words.next() != Some("python") {
                continue;
            }
            let at = format!("{}:{line}", short(&page));
            let label: Vec<&str> = words.collect();
            assert!(
                label.is_empty() || label == ["norun"],
                "{at}: ```python {}: only `norun` is known",
                label.join(" ")
            );
            let parsed = Command::new(&python)
                .args(["-c", "import ast, sys; ast.parse(sys.argv[1])", &block])
                .output()
                .expect("run python");
            assert!(parsed.status.success(), "{at}: does not parse:\n{}", String::from_utf8_lossy(&parsed.stderr));
            for name in sdk_uses(&block) {
                assert!(known.contains(&name), "{at}: the SDK has no `{name}`");
            }
            if label.is_empty() {
                runnable.push((at, block));
            }
        }
    }
    // The README's tour and docs/python.md's example at least.
    assert!(runnable.len() >= 2, "only {} runnable Python blocks", runnable.len());

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_coord, url) = coordinator(d);
    let _worker = worker(d, &url, "w0");
    for (i, (at, block)) in runnable.iter().enumerate() {
        // Each block from a folder of its own holding the job files it names.
        let cwd = d.join(format!("block-{i}"));
        std::fs::create_dir_all(cwd.join("configs")).unwrap();
        std::fs::copy(repo().join("configs/quickstart.yaml"), cwd.join("configs/quickstart.yaml")).unwrap();
        let out = Command::new(&python)
            .args(["-c", block])
            .env("PYTHONPATH", repo().join("python"))
            .env("FLOTILLA_COORDINATOR", &url)
            .env("FLOTILLA_TOKEN", admin_token())
            .env_remove("FLOTILLA_TOKEN_FILE")
            .env("FLOTILLA_TLS_DIR", tls_dir())
            .current_dir(&cwd)
            .output()
            .expect("run python");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{at} fails:\n{block}\n{stdout}\n{stderr}");
        if block.contains("final[\"phase\"]") {
            // A block that prints its job's final phase shows that it succeeded.
            assert!(stdout.contains("succeeded"), "{at}: no job succeeded:\n{stdout}\n{stderr}");
        }
    }
}

#[test]
fn coordinator_configurations_load() {
    let dir = tempfile::tempdir().unwrap();
    let mut count = 0;
    for (page, text) in pages() {
        for (info, line, block) in blocks(&text) {
            if info != "yaml coordinator" {
                continue;
            }
            let path = dir.path().join("coordinator.yaml");
            std::fs::write(&path, &block).unwrap();
            if let Err(e) = load(Some(&path), Overrides::default()) {
                panic!("{}:{line}: {e}\n{block}", short(&page));
            }
            count += 1;
        }
    }
    assert!(count >= 1, "no ```yaml coordinator block found");
}
