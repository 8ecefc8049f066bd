//! Every job-file example in the documentation (README.md and docs/*.md) is valid: complete
//! examples as they are, section examples spliced into an otherwise minimal job.
//!
//! A block fenced as ```` ```yaml ```` is a job file or a section of one. YAML that is not a
//! job file says what it is after `yaml` on the fence line and is left to its own test:
//! ```` ```yaml coordinator ```` (a coordinator's configuration file, checked by
//! `tests/docs.rs`) and ```` ```yaml sweep ```` (a sweep file). A plain `yaml` block whose
//! top-level key is not a job file's is an error here, so an unlabelled one cannot slip by.

use std::path::{Path, PathBuf};

use flotilla_jobspec::parse_with;

/// The job file's top-level keys, in the order a spliced job writes them.
const SECTIONS: [&str; 12] = [
    "version",
    "name",
    "model",
    "data",
    "train",
    "parallelism",
    "workers",
    "checkpoint",
    "priority",
    "eval",
    "registry",
    "metrics",
];

/// Info strings after `yaml` that mark YAML other than a job file.
const OTHER_YAML: [&str; 2] = ["coordinator", "sweep"];

/// README.md and every page under docs/.
fn pages() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut pages = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("read docs/")
        .map(|e| e.expect("list docs/").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// The job-file blocks of one page: each block's first line number and text.
fn job_blocks(doc: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String, bool)> = None;
    for (i, line) in doc.lines().enumerate() {
        let fence = line.trim_end();
        match &mut current {
            None => {
                if let Some(info) = fence.strip_prefix("```yaml") {
                    let label = info.trim();
                    assert!(
                        label.is_empty() || OTHER_YAML.contains(&label),
                        "line {}: ```yaml {label}: label YAML as one of {OTHER_YAML:?} or leave it a job file",
                        i + 1
                    );
                    current = Some((i + 2, String::new(), label.is_empty()));
                }
            }
            Some((start, block, is_job)) => {
                if fence == "```" {
                    if *is_job {
                        blocks.push((*start, std::mem::take(block)));
                    }
                    current = None;
                } else {
                    block.push_str(line);
                    block.push('\n');
                }
            }
        }
    }
    blocks
}

/// A minimal job whose sections named in `snippet` are the snippet's (or, for an
/// indented snippet, whose `train` section has it added).
fn splice(snippet: &str) -> Result<String, String> {
    let uses_gpt = snippet.contains("kind: tokens") || snippet.contains("kind: text");
    let model = if uses_gpt {
        "model: {kind: gpt, layers: 1, d_model: 8, heads: 2, context: 8, vocab: 256}\n"
    } else {
        "model: {kind: mlp, layers: [4, 8, 3]}\n"
    };
    let mut train = "train:\n  steps: 1000\n  global_batch: 64\n".to_owned();
    let indented = snippet.starts_with(' ');
    if indented {
        train.push_str(snippet);
    }
    let base = [
        ("name", "name: doc-example\n".to_owned()),
        ("model", model.to_owned()),
        ("data", "data: {kind: synthetic}\n".to_owned()),
        ("train", train),
    ];
    // The snippet's top-level keys: each must be a job file's.
    let keys: Vec<&str> = snippet
        .lines()
        .filter(|l| !l.starts_with([' ', '#']) && !l.trim().is_empty())
        .map(|l| l.split(':').next().unwrap_or(""))
        .collect();
    if let Some(key) = keys.iter().find(|k| !SECTIONS.contains(k)) {
        return Err(format!(
            "`{key}` is not a job file's key: label the block ```yaml {}",
            OTHER_YAML.join(" or ```yaml ")
        ));
    }
    // The snippet where its first section goes, the minimal job's other sections around it.
    let mut job = String::new();
    for section in SECTIONS {
        if keys.first() == Some(&section) {
            job.push_str(snippet);
        } else if keys.contains(&section) {
            continue;
        } else if let Some((_, text)) = base.iter().find(|(k, _)| *k == section) {
            job.push_str(text);
        }
    }
    Ok(job)
}

/// The files examples name: a `tokenizer.json` is a small one (256 ids,
/// as the spliced model's vocab), a `config.json` a small Llama's; nothing else exists.
fn read_example_file(path: &str, _limit: u64) -> Result<String, String> {
    if path.ends_with("tokenizer.json") {
        Ok(r#"{"model": {"type": "WordLevel", "vocab": {"<unk>": 0, "a": 255}, "unk_token": "<unk>"}}"#.into())
    } else if path.ends_with("/config.json") {
        Ok(r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-05, "rope_theta": 10000.0}"#
            .into())
    } else {
        Err(format!("the documentation's examples name {path}, which this test does not have"))
    }
}

#[test]
fn jobfile_examples_are_valid() {
    let mut checked = Vec::new();
    for page in pages() {
        let doc = std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("read {}: {e}", page.display()));
        let name = page.file_name().unwrap().to_string_lossy().into_owned();
        for (line, block) in job_blocks(&doc) {
            let complete = block.starts_with("name:") && block.contains("\ntrain:");
            let job = if complete {
                block.clone()
            } else {
                splice(&block).unwrap_or_else(|e| panic!("{name}:{line}: {e}\n{block}"))
            };
            if let Err(e) = parse_with(&job, &name, &read_example_file) {
                panic!("{name}:{line}: example\n{block}\nas job\n{job}\nfails: {e}");
            }
            checked.push(name.clone());
        }
    }
    // The reference alone has more than 20; the registry page has its section too.
    let in_reference = checked.iter().filter(|n| *n == "jobfile.md").count();
    assert!(in_reference >= 20, "found only {in_reference} job-file blocks in docs/jobfile.md");
    assert!(checked.iter().any(|n| n == "registry.md"), "docs/registry.md's registry section was not checked");
}

#[test]
fn a_misspelt_section_example_is_caught() {
    // The test's own net: a section the parser refuses fails, and an unknown key is named.
    let job = splice("train:\n  stepz: 10\n  global_batch: 8\n").unwrap();
    assert!(parse_with(&job, "doc", &read_example_file).is_err(), "{job}");
    let err = splice("job: quickstart\n").unwrap_err();
    assert!(err.contains("`job`") && err.contains("yaml sweep"), "{err}");
}
