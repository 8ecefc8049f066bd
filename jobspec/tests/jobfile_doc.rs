//! Every YAML example in the README's job file reference is valid: complete examples as they
//! are, section examples spliced into an otherwise minimal job.

use flotilla_jobspec::parse_with;

/// The reference lives in the README, after its heading.
const README: &str = include_str!("../../README.md");

fn doc() -> &'static str {
    let start = README.find("## Job file reference").expect("README has the job file reference");
    &README[start..]
}

const SECTIONS: [&str; 9] =
    ["version", "name", "model", "data", "train", "parallelism", "workers", "checkpoint", "priority"];

fn yaml_blocks(doc: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```yaml") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// A minimal job whose `key` section is `snippet` (or, for an indented
/// snippet, whose `train` section has it added).
fn splice(snippet: &str) -> String {
    let uses_gpt = snippet.contains("kind: tokens") || snippet.contains("kind: text");
    let model = if uses_gpt {
        "model: {kind: gpt, layers: 1, d_model: 8, heads: 2, context: 8, vocab: 256}\n"
    } else {
        "model: {kind: mlp, layers: [4, 8, 3]}\n"
    };
    let mut train = "train:\n  steps: 1000\n  global_batch: 64\n".to_owned();
    if snippet.starts_with(' ') {
        train.push_str(snippet);
    }
    let base = [
        ("name", "name: doc-example\n".to_owned()),
        ("model", model.to_owned()),
        ("data", "data: {kind: synthetic}\n".to_owned()),
        ("train", train),
    ];
    let key = snippet.split(':').next().unwrap_or("");
    let mut job = String::new();
    for section in SECTIONS {
        if section == key {
            job.push_str(snippet);
        } else if let Some((_, text)) = base.iter().find(|(k, _)| *k == section) {
            job.push_str(text);
        }
    }
    job
}

/// The files examples name: a `tokenizer.json` is a small one (256 ids,
/// as the spliced model's vocab); nothing else exists.
fn read_example_file(path: &str, _limit: u64) -> Result<String, String> {
    if path.ends_with("tokenizer.json") {
        Ok(r#"{"model": {"type": "WordLevel", "vocab": {"<unk>": 0, "a": 255}, "unk_token": "<unk>"}}"#.into())
    } else {
        Err(format!("the README's examples name {path}, which this test does not have"))
    }
}

#[test]
fn jobfile_examples_are_valid() {
    let blocks = yaml_blocks(doc());
    assert!(blocks.len() >= 10, "found only {} yaml blocks", blocks.len());
    for block in blocks {
        let complete = block.starts_with("name:") && block.contains("\ntrain:");
        let job = if complete { block.clone() } else { splice(&block) };
        if let Err(e) = parse_with(&job, "README.md", &read_example_file) {
            panic!("example\n{block}\nas job\n{job}\nfails: {e}");
        }
    }
}
