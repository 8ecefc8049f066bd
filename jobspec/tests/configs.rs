//! The sample job files in `configs/`: the good ones parse, and each bad one
//! fails with the message, field path and position its header announces.
//!
//! A bad file starts with comment lines:
//! `# expect: <part of the message>`, `# expect-path: <field path>`, and
//! optionally `# expect-at: <text on the reported line>` (by default the
//! last segment of the path, without any `[index]`).

use std::fs;
use std::path::{Path, PathBuf};

use flotilla_jobspec::{parse, DataSpec, DpSize, ModelSpec};

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn header(source: &str, key: &str) -> Option<String> {
    let prefix = format!("# {key}:");
    source.lines().take_while(|l| l.starts_with('#')).find_map(|l| l.strip_prefix(&prefix).map(|v| v.trim().to_owned()))
}

#[test]
fn good_configs_parse() {
    let files = yaml_files(&configs_dir());
    assert!(files.len() >= 3, "expected the sample configs, found {files:?}");
    for file in files {
        let source = fs::read_to_string(&file).unwrap();
        if let Err(e) = parse(&source, &file.display().to_string()) {
            panic!("{e}");
        }
    }
}

#[test]
fn quickstart_says_what_the_tutorial_says() {
    let source = fs::read_to_string(configs_dir().join("quickstart.yaml")).unwrap();
    let spec = parse(&source, "quickstart.yaml").unwrap();
    assert_eq!(spec.name, "quickstart");
    assert!(matches!(spec.model, ModelSpec::Mlp(_)));
    assert!(matches!(spec.data, DataSpec::Synthetic { .. }));
    assert_eq!((spec.workers.min, spec.workers.max), (1, 2));
    assert_eq!(spec.parallelism.dp, DpSize::Auto);
    assert_eq!((spec.train.steps, spec.train.global_batch, spec.train.micro_batch), (200, 64, 32));
    assert_eq!(spec.train.grad_clip, Some(1.0));
    assert_eq!(spec.checkpoint.url, "runs");
    assert_eq!((spec.checkpoint.every, spec.checkpoint.keep), (50, 2));
}

#[test]
fn bad_configs_fail_where_they_say() {
    let files = yaml_files(&configs_dir().join("bad"));
    assert!(files.len() >= 14, "expected at least 14 bad configs, found {}", files.len());
    let mut failures = Vec::new();
    for file in &files {
        let source = fs::read_to_string(file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let expect = header(&source, "expect").unwrap_or_else(|| panic!("{name}: no `# expect:`"));
        let expect_path = header(&source, "expect-path").unwrap_or_else(|| panic!("{name}: no `# expect-path:`"));
        let err = match parse(&source, &name) {
            Ok(_) => {
                failures.push(format!("{name}: parsed, but should fail with {expect:?}"));
                continue;
            }
            Err(e) => e,
        };
        if !err.message.contains(&expect) {
            failures.push(format!("{name}: message {:?} lacks {expect:?}", err.message));
        }
        if err.path != expect_path {
            failures.push(format!("{name}: path {:?}, expected {expect_path:?} ({err})", err.path));
        }
        if err.origin != name {
            failures.push(format!("{name}: origin {:?}", err.origin));
        }
        let needle = header(&source, "expect-at").unwrap_or_else(|| {
            let last = expect_path.rsplit('.').next().unwrap_or(&expect_path);
            last.split('[').next().unwrap_or(last).to_owned()
        });
        let line = usize::try_from(err.line).unwrap();
        match source.lines().nth(line.wrapping_sub(1)) {
            None => failures.push(format!("{name}: line {} is not in the file ({err})", err.line)),
            Some(text) => {
                if !text.contains(&needle) {
                    failures.push(format!("{name}: line {} is {text:?}, which lacks {needle:?} ({err})", err.line));
                }
                let width = text.chars().count() as u64;
                if err.column < 1 || err.column > width + 1 {
                    failures.push(format!("{name}: column {} is outside {text:?}", err.column));
                }
            }
        }
        let shown = err.to_string();
        let prefix = format!("{name}:{}:{}: {expect_path}: ", err.line, err.column);
        if !shown.starts_with(&prefix) {
            failures.push(format!("{name}: displays as {shown:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad configs misbehave:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}
