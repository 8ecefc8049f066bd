//! Parse-level unit tests: defaults, JSON, path resolution, and the message,
//! path and position of representative errors.

use std::path::Path;

use crate::*;

const MINIMAL: &str = "\
name: tiny
model:
  kind: mlp
  layers: [3, 2]
data:
  kind: synthetic
train:
  steps: 10
  global_batch: 4
";

fn ok(source: &str) -> JobSpec {
    parse(source, "test.yaml").unwrap_or_else(|e| panic!("{e}"))
}

fn err(source: &str) -> SpecError {
    match parse(source, "test.yaml") {
        Ok(spec) => panic!("parsed, but should not have: {spec:?}"),
        Err(e) => e,
    }
}

/// `MINIMAL` followed by `extra` top-level sections.
fn with(extra: &str) -> String {
    format!("{MINIMAL}{extra}")
}

#[test]
fn omitted_fields_take_their_defaults() {
    let spec = ok(MINIMAL);
    assert_eq!(spec.data, DataSpec::Synthetic { seed: defaults::SYNTHETIC_SEED, samples: defaults::SYNTHETIC_SAMPLES });
    let t = &spec.train;
    assert_eq!(t.micro_batch, t.global_batch);
    assert_eq!(t.seed, defaults::TRAIN_SEED);
    assert_eq!(
        t.optimizer,
        AdamWSpec {
            lr: defaults::LR,
            beta1: defaults::BETA1,
            beta2: defaults::BETA2,
            eps: defaults::EPS,
            weight_decay: defaults::WEIGHT_DECAY,
        }
    );
    assert_eq!(t.schedule, ScheduleSpec { warmup_steps: defaults::WARMUP_STEPS, min_lr: defaults::MIN_LR });
    assert_eq!(t.grad_clip, None);
    assert_eq!(spec.parallelism.dp, DpSize::Auto);
    assert_eq!(spec.workers, WorkersSpec { min: defaults::WORKERS_MIN, max: defaults::WORKERS_MIN });
    assert_eq!(
        spec.checkpoint,
        CheckpointSpec {
            url: defaults::CHECKPOINT_URL.into(),
            every: defaults::CHECKPOINT_EVERY,
            keep: defaults::CHECKPOINT_KEEP,
            resume_from: None,
        }
    );
}

#[test]
fn empty_sections_are_like_absent_ones() {
    assert_eq!(ok(&with("workers:\nparallelism:\ncheckpoint:\n")), ok(MINIMAL));
}

#[test]
fn workers_max_defaults_to_min_and_min_to_one() {
    let spec = ok(&with("workers: {min: 3}\n"));
    assert_eq!((spec.workers.min, spec.workers.max), (3, 3));
    let spec = ok(&with("workers: {max: 4}\n"));
    assert_eq!((spec.workers.min, spec.workers.max), (1, 4));
}

#[test]
fn explicit_forms_are_read() {
    let spec = ok(&with("version: 1\nparallelism: {dp: 2, pp: 1, zero: 0}\nworkers: {min: 2, max: 4}\n"));
    assert_eq!(spec.parallelism.dp, DpSize::Fixed(2));
    let source = MINIMAL.replace(
        "  global_batch: 4\n",
        "  global_batch: 4\n  optimizer: {kind: adamw, betas: [0.8, 0.95]}\n  schedule: {kind: cosine}\n",
    );
    let spec = ok(&source);
    assert_eq!((spec.train.optimizer.beta1, spec.train.optimizer.beta2), (0.8, 0.95));
}

#[test]
fn tokens_default_to_u16() {
    let source = "name: g\nmodel: {kind: gpt, layers: 1, d_model: 8, heads: 2, context: 4, vocab: 300}\n\
                  data: {kind: tokens, path: t.bin}\ntrain: {steps: 1, global_batch: 1}\n";
    let raw = TokenFormat::Raw;
    assert_eq!(ok(source).data, DataSpec::Tokens { path: vec!["t.bin".into()], dtype: TokenDtype::U16, format: raw });
}

#[test]
fn tokens_take_lists_patterns_urls_and_nanogpt_shards() {
    let job = |data: &str| {
        format!(
            "name: g\nmodel: {{kind: gpt, layers: 1, d_model: 8, heads: 2, context: 4, vocab: 300}}\n\
             data: {data}\ntrain: {{steps: 1, global_batch: 1}}\n"
        )
    };
    let mut spec =
        ok(&job("{kind: tokens, path: [a.u16, 'shards/s-*.u16', 's3://b/c/d-[0-3].u16', 'file:///x/y.u16']}"));
    spec.resolve_paths(Path::new("/jobs"));
    let DataSpec::Tokens { path, dtype, format } = &spec.data else { panic!("{:?}", spec.data) };
    assert_eq!(path, &["/jobs/a.u16", "/jobs/shards/s-*.u16", "s3://b/c/d-[0-3].u16", "/x/y.u16"]);
    assert_eq!((*dtype, *format), (TokenDtype::U16, TokenFormat::Raw));
    let spec = ok(&job("{kind: tokens, path: 'train_*.bin', format: nanogpt}"));
    assert!(matches!(spec.data, DataSpec::Tokens { format: TokenFormat::Nanogpt, dtype: TokenDtype::U16, .. }));

    for (data, path, says) in [
        ("{kind: tokens, path: []}", "data.path", "lists no shard"),
        ("{kind: tokens, path: [a.bin, '']}", "data.path[1]", "must not be empty"),
        ("{kind: tokens, path: [a.bin, 'c/*/x.bin']}", "data.path[1]", "only in the file name"),
        ("{kind: tokens, path: 'c/s[0-3.bin'}", "data.path", "closing `]`"),
        ("{kind: tokens, path: [a.bin, 'ftp://h/x.bin']}", "data.path[1]", "unsupported URL scheme"),
        ("{kind: tokens, path: 's3://b/corpus/'}", "data.path", "names a folder"),
        ("{kind: tokens, path: [../a.bin]}", "data.path[0]", "`..` segment"),
        ("{kind: tokens, path: a.bin, format: nanogpt, dtype: u32}", "data.dtype", "hold u16"),
        ("{kind: tokens, path: a.bin, format: gzip}", "data.format", ""),
        ("{kind: text, path: [a.txt, b.txt]}", "data.path", "a list of paths is for kind `tokens`"),
        ("{kind: synthetic, format: raw}", "data.format", "unknown field `format`"),
    ] {
        let e = err(&job(data));
        assert_eq!(e.path, path, "{data}: {e}");
        assert!(e.to_string().contains(says), "{data}: {e}");
        assert!(e.line > 0, "{data}: {e}");
    }
    // Specs written before lists (one string) still read.
    let json = spec.to_json().replace(r#"["train_*.bin"]"#, r#""train_*.bin""#);
    assert!(json.contains(r#""path":"train_*.bin""#), "{json}");
    assert_eq!(JobSpec::from_json(&json).unwrap(), spec);
}

#[test]
fn json_round_trips() {
    let mut spec = ok(&with("parallelism: {dp: 1}\ncheckpoint: {url: 'file:///ck', every: 5}\n"));
    spec.train.grad_clip = Some(0.1 + 0.2);
    spec.train.optimizer.lr = 3e-4;
    let json = spec.to_json();
    assert!(json.contains(r#""model":{"kind":"mlp","layers":[3,2]}"#), "{json}");
    assert!(json.contains(r#""data":{"kind":"synthetic","seed":0,"samples":4096}"#), "{json}");
    assert!(json.contains(r#""dp":1"#), "{json}");
    assert_eq!(JobSpec::from_json(&json).unwrap(), spec);

    spec.parallelism.dp = DpSize::Auto;
    spec.data = DataSpec::Tokens { path: vec!["x".into()], dtype: TokenDtype::U32, format: TokenFormat::Raw };
    let json = spec.to_json();
    assert!(json.contains(r#""dp":"auto""#) && json.contains(r#""dtype":"u32""#), "{json}");
    assert_eq!(JobSpec::from_json(&json).unwrap(), spec);
    assert!(JobSpec::from_json(&json.replace(r#""auto""#, r#""many""#)).is_err());
}

#[test]
fn resolve_paths_makes_paths_absolute() {
    let source = "name: t\nmodel: {kind: gpt, layers: 1, d_model: 8, heads: 2, context: 4, vocab: 256}\n\
                  data: {kind: text, path: ./corpus//book.txt}\ntrain: {steps: 1, global_batch: 1}\n";
    let mut spec = ok(source);
    spec.resolve_paths(Path::new("/jobs/a"));
    assert_eq!(spec.data, DataSpec::Text { path: "/jobs/a/corpus/book.txt".into(), tokenizer: None });
    // A `..` segment could leave the folder: refused, not resolved.
    let e = err(&source.replace("./corpus//book.txt", "./corpus/../book.txt"));
    assert_eq!(e.path, "data.path");
    assert_eq!(spec.checkpoint.url, "/jobs/a/runs");
    let again = spec.clone();
    spec.resolve_paths(Path::new("/elsewhere"));
    assert_eq!(spec, again, "resolving twice changes nothing");

    let mut spec = ok(&with("checkpoint: {url: 'file:///srv/ck'}\n"));
    spec.resolve_paths(Path::new("/jobs/a"));
    assert_eq!(spec.checkpoint.url, "/srv/ck");
    let mut spec = ok(&with("checkpoint: {url: /srv/ck2}\n"));
    spec.resolve_paths(Path::new("/jobs/a"));
    assert_eq!(spec.checkpoint.url, "/srv/ck2");
    assert_eq!(spec.data, ok(MINIMAL).data, "synthetic data has no path");
}

#[test]
fn model_kind_names() {
    assert_eq!(ok(MINIMAL).model.kind(), "mlp");
    let gpt = ModelSpec::Gpt(GptSpec { layers: 1, d_model: 2, heads: 1, context: 1, vocab: 2 });
    assert_eq!(gpt.kind(), "gpt");
}

/// Each case: (source, path, part of the message, line, column).
#[test]
fn errors_name_the_field_and_the_place() {
    let train_line = |extra: &str| MINIMAL.replace("  global_batch: 4\n", &format!("  global_batch: 4\n{extra}"));
    let cases: Vec<(String, &str, &str, u64, u64)> = vec![
        (String::new(), "<yaml>", "the job file is empty", 1, 1),
        ("# nothing\n\n".into(), "<yaml>", "the job file is empty", 3, 1),
        ("- 1\n".into(), "<yaml>", "expected a mapping of fields, found a list", 1, 1),
        (MINIMAL.replace("name: tiny\n", ""), "name", "missing field `name`", 1, 1),
        (MINIMAL.replace("  layers: [3, 2]", "  layers: [3, -2]"), "model.layers[1]", "found `-2`", 4, 15),
        (MINIMAL.replace("  layers: [3, 2]", "  layers: 3"), "model.layers", "list of widths", 4, 11),
        (MINIMAL.replace("  layers: [3, 2]", "  layers: [3]"), "model.layers", "at least 2 widths", 4, 11),
        (MINIMAL.replace("  steps: 10\n", "  steps: 1.5\n"), "train.steps", "found `1.5`", 8, 10),
        (MINIMAL.replace("  steps: 10\n", "  steps: 0\n"), "train.steps", "must be at least 1, found 0", 8, 10),
        (
            MINIMAL.replace("  steps: 10\n", "  steps: 10\n   global_batch: 8\n"),
            "train.steps",
            "found `10 global_batch`",
            8,
            10,
        ),
        (
            MINIMAL.replace("  kind: synthetic\n", "  kind: synthetic\n  path: x\n"),
            "data.path",
            "unknown field `path` for data kind `synthetic`",
            7,
            9,
        ),
        (
            MINIMAL.replace("  kind: synthetic\n", "  kind: features\n  path: ''\n"),
            "data.path",
            "must not be empty",
            7,
            9,
        ),
        (
            MINIMAL.replace("  kind: synthetic\n", "  kind: synthetic\n  samples: 0\n"),
            "data.samples",
            "at least 1",
            7,
            12,
        ),
        (MINIMAL.replace("name: tiny", "name: -tiny"), "name", "must start with", 1, 7),
        (MINIMAL.replace("name: tiny", &format!("name: {}", "a".repeat(64))), "name", "at most 63", 1, 7),
        (
            train_line("  optimizer: {kind: sgd}\n"),
            "train.optimizer.kind",
            "unknown kind `sgd`, expected one of `adamw`",
            10,
            21,
        ),
        (train_line("  optimizer: {beta1: 0.9}\n"), "train.optimizer.beta1", "unknown field `beta1`", 10, 15),
        (
            train_line("  optimizer: {betas: [0.9, 1.0]}\n"),
            "train.optimizer.betas[1]",
            "must be in [0, 1), found 1",
            10,
            28,
        ),
        (train_line("  optimizer: {eps: 0}\n"), "train.optimizer.eps", "greater than 0", 10, 20),
        (train_line("  optimizer: {weight_decay: -0.1}\n"), "train.optimizer.weight_decay", "at least 0", 10, 29),
        (train_line("  optimizer: {lr: .inf}\n"), "train.optimizer.lr", "finite", 10, 19),
        (train_line("  grad_clip: 0\n"), "train.grad_clip", "greater than 0", 10, 14),
        (
            train_line("  schedule: {warmup_steps: 11}\n"),
            "train.schedule.warmup_steps",
            "at most train.steps (10)",
            10,
            28,
        ),
        (train_line("  schedule: {kind: linear}\n"), "train.schedule.kind", "unknown kind `linear`", 10, 20),
        (train_line("  micro_batch: 0\n"), "train.micro_batch", "at least 1", 10, 16),
        (with("parallelism:\n  micro_batches: 0\n"), "parallelism.micro_batches", "positive integer, found 0", 11, 18),
        (with("parallelism:\n  pp: two\n"), "parallelism.pp", "integer from 1 to 1, found `two`", 11, 7),
        (with("parallelism:\n  pp: 2\n"), "parallelism.pp", "more than the model's 1 linear layers", 11, 7),
        (with("parallelism:\n  zero: 5\n"), "parallelism.zero", "must be 0, 1, 2 or 3, found 5", 11, 9),
        (
            with("parallelism:\n  schedule: zigzag\n"),
            "parallelism.schedule",
            "`gpipe` or `1f1b`, found `zigzag`",
            11,
            13,
        ),
        (
            with("parallelism:\n  split: [2]\n"),
            "parallelism.split",
            "must add up to the model's 1 linear layers",
            11,
            10,
        ),
        (
            train_line("  micro_batch: 2\nparallelism:\n  micro_batches: 2\n"),
            "parallelism.micro_batches",
            "set either train.micro_batch (line 10) or parallelism.micro_batches",
            12,
            18,
        ),
        (
            with("parallelism:\n  dp: many\n"),
            "parallelism.dp",
            "must be `auto` or within workers.min..=workers.max (1..=1), found `many`",
            11,
            7,
        ),
        (with("parallelism:\n  tp: 2\n"), "parallelism.tp", "unknown field `tp`", 11, 3),
        (with("workers: {max: 1025}\n"), "workers.max", "at most 1024", 10, 16),
        (with("workers: {min: 0}\n"), "workers.min", "at least 1", 10, 16),
        (with("checkpoint: {keep: 0}\n"), "checkpoint.keep", "at least 1", 10, 20),
        (with("checkpoint: {url: ''}\n"), "checkpoint.url", "must not be empty", 10, 19),
        (with("checkpoint: {url: 'http://x/y'}\n"), "checkpoint.url", "unsupported URL scheme `http://`", 10, 19),
        (with("checkpoint: {url: 'gs://'}\n"), "checkpoint.url", "needs a bucket", 10, 19),
        (with("version: 1.0\n"), "version", "unsupported job file version 1", 10, 10),
        (with("---\nname: again\n"), "<yaml>", "multiple", 11, 1),
        (
            MINIMAL.replace("data:\n  kind: synthetic\n", "data:\n"),
            "data",
            "expected a mapping of fields, found nothing",
            5,
            5,
        ),
        (MINIMAL.replace("data:\n  kind: synthetic\n", "data: {seed: 1}\n"), "data", "missing field `kind`", 5, 1),
        (
            MINIMAL.replace(
                "  kind: mlp\n  layers: [3, 2]\n",
                "  kind: gpt\n  layers: 1\n  d_model: 8\n  heads: 2\n  vocab: 9\n",
            ),
            "model",
            "missing field `context`",
            2,
            1,
        ),
    ];
    assert_error_cases(&cases);
}

/// Each source fails with the error at (path, message part, line, column).
fn assert_error_cases(cases: &[(String, &str, &str, u64, u64)]) {
    let mut failures = Vec::new();
    for (source, path, message, line, column) in cases {
        let e = err(source);
        let good = e.path == *path && e.message.contains(message) && (e.line, e.column) == (*line, *column);
        if !good {
            failures.push(format!("expected {line}:{column}: {path}: …{message}…\n     got {e}\n  source {source:?}"));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn errors_display_as_origin_line_column_path_message() {
    let e =
        SpecError { origin: "a.yaml".into(), path: "train.steps".into(), line: 3, column: 10, message: "bad".into() };
    assert_eq!(e.to_string(), "a.yaml:3:10: train.steps: bad");
}

#[test]
fn number_forms() {
    let train = |extra: &str| MINIMAL.replace("  global_batch: 4\n", &format!("  global_batch: 4\n{extra}"));
    let spec = ok(&train("  grad_clip: 1\n  optimizer: {lr: 1e-3, eps: 3.0e-8}\n"));
    assert_eq!(spec.train.grad_clip, Some(1.0));
    assert_eq!((spec.train.optimizer.lr, spec.train.optimizer.eps), (1e-3, 3.0e-8));
    // serde-saphyr reads a quoted number as the number; harmless, and documented.
    assert_eq!(ok(&MINIMAL.replace("  steps: 10\n", "  steps: \"10\"\n")).train.steps, 10);
    let e = err(&MINIMAL.replace("  steps: 10\n", "  steps: 1e3\n"));
    assert_eq!(e.path, "train.steps", "{e}");
}

#[test]
fn registry_defaults_and_paths() {
    assert_eq!(ok(MINIMAL).registry, None);
    let spec = ok(&with(
        "registry:\n  kind: mlflow\n  url: http://127.0.0.1:5000\n  alias: candidate\n  tags: {team: vision}\n",
    ));
    let r = spec.registry.as_ref().unwrap();
    assert_eq!((r.kind, r.model.as_str(), r.experiment.as_str()), (RegistryKind::Mlflow, "tiny", "tiny"));
    assert_eq!(r.alias.as_deref(), Some("candidate"));
    assert_eq!(r.tags.get("team").map(String::as_str), Some("vision"));
    assert_eq!(JobSpec::from_json(&spec.to_json()).unwrap(), spec);

    let mut spec = ok(&with("registry: {kind: builtin, url: models, model: Digits.v2}\n"));
    spec.resolve_paths(Path::new("/jobs"));
    let r = spec.registry.unwrap();
    assert_eq!((r.url.as_str(), r.model.as_str(), r.experiment.as_str()), ("/jobs/models", "Digits.v2", ""));
    let mut spec = ok(&with("registry: {kind: builtin, url: 's3://bucket/models/'}\n"));
    spec.resolve_paths(Path::new("/jobs"));
    assert_eq!(spec.registry.unwrap().url, "s3://bucket/models");
}

#[test]
fn registry_errors_name_the_field_and_the_place() {
    let line = MINIMAL.lines().count() as u64 + 1;
    let cases: Vec<(&str, &str, &str, u64, u64)> = vec![
        ("registry: {kind: mlflow}\n", "registry", "missing field `url`", line, 1),
        ("registry: {kind: wandb, url: x}\n", "registry.kind", "wandb", line, 18),
        ("registry: {kind: mlflow, url: 's3://b/m'}\n", "registry.url", "http://host:port", line, 31),
        ("registry: {kind: builtin, url: 'ftp://x/y'}\n", "registry.url", "unsupported URL scheme", line, 32),
        ("registry: {kind: builtin, url: m, model: 'a/b'}\n", "registry.model", "model name", line, 42),
        ("registry: {kind: builtin, url: m, experiment: e}\n", "registry.experiment", "only an MLflow", line, 47),
        ("registry: {kind: builtin, url: m, alias: v3}\n", "registry.alias", "reserved", line, 42),
        ("registry: {kind: builtin, url: m, alias: Prod}\n", "registry.alias", "lowercase", line, 42),
        (
            "registry: {kind: builtin, url: m, tags: {flotilla.job: x}}\n",
            "registry.tags.flotilla.job",
            "set by flotilla",
            line,
            56,
        ),
        ("registry: {kind: builtin, url: m, color: red}\n", "registry.color", "unknown field", line, 35),
    ];
    let cases: Vec<(String, &str, &str, u64, u64)> = cases
        .into_iter()
        .map(|(extra, path, message, line, column)| (with(extra), path, message, line, column))
        .collect();
    assert_error_cases(&cases);
}

#[test]
fn names_and_aliases() {
    assert!(check_model_name("digits-mlp_1.0").is_ok());
    assert!(check_model_name("-x").is_err() && check_model_name("").is_err() && check_model_name("a b").is_err());
    assert!(check_alias("candidate").is_ok() && check_alias("champion-2").is_ok());
    for bad in ["latest", "v12", "3", "Prod", ""] {
        assert!(check_alias(bad).is_err(), "{bad}");
    }
}

const LLAMA_CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 64,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": false}"#;

fn llama(model: &str, config: &str) -> Result<JobSpec, SpecError> {
    let source = format!("name: ft\nmodel: {model}\ndata: {{kind: synthetic}}\ntrain: {{steps: 2, global_batch: 2}}\n");
    parse_with(&source, "job.yaml", &|path: &str, _| {
        if path == "hf/config.json" {
            Ok(config.to_string())
        } else {
            Err(format!("cannot read {path}: no such file"))
        }
    })
}

#[test]
fn a_llama_takes_its_fields_from_the_job_file_or_the_config() {
    let spec = llama("{kind: llama, layers: 3, d_model: 32, heads: 4, ffn: 64, vocab: 100, context: 8}", "").unwrap();
    let ModelSpec::Llama(l) = &spec.model else { panic!("{spec:?}") };
    assert_eq!((l.kv_heads, l.max_positions, l.pretrained), (4, 8, false), "kv_heads defaults to heads");
    assert_eq!((l.rope_theta, l.norm_eps), (defaults::LLAMA_ROPE_THETA, defaults::LLAMA_NORM_EPS));
    assert_eq!(spec.model.pipeline_layers(), 5);

    let spec = llama("{kind: llama, from: hf, init: pretrained, context: 16, kv_heads: 2}", LLAMA_CONFIG).unwrap();
    let ModelSpec::Llama(l) = &spec.model else { panic!("{spec:?}") };
    assert_eq!((l.layers, l.d_model, l.heads, l.kv_heads, l.ffn, l.vocab), (2, 64, 4, 2, 128, 512));
    assert_eq!((l.context, l.max_positions, l.pretrained), (16, 64, true));
    assert_eq!(JobSpec::from_json(&spec.to_json()).unwrap(), spec, "survives JSON");
}

#[test]
fn llama_errors_name_the_field_and_its_line() {
    let e = llama("{kind: llama, from: hf, context: 16, vocab: 500}", LLAMA_CONFIG).unwrap_err();
    assert_eq!((e.path.as_str(), e.line), ("model.vocab", 2), "{e}");
    assert!(e.message.contains("500 contradicts `vocab_size: 512` in hf/config.json"), "{e}");

    let e = llama("{kind: llama, from: elsewhere, context: 16}", LLAMA_CONFIG).unwrap_err();
    assert_eq!(e.path, "model.from");
    assert!(e.message.contains("cannot read elsewhere/config.json"), "{e}");

    let e = llama("{kind: llama, from: hf, context: 16}", &LLAMA_CONFIG.replace("Llama", "Qwen2")).unwrap_err();
    assert!(e.message.contains("describes the architecture Qwen2ForCausalLM"), "{e}");

    let e = llama("{kind: llama, layers: 1, d_model: 32, heads: 4, kv_heads: 3, ffn: 8, vocab: 9, context: 4}", "")
        .unwrap_err();
    assert_eq!(e.path, "model.kv_heads", "{e}");

    let e = llama("{kind: llama, layers: 1, d_model: 32, heads: 4, ffn: 8, context: 4}", "").unwrap_err();
    assert!(e.message.contains("missing field `vocab`"), "{e}");

    let e = llama("{kind: llama, from: hf, context: 16, dropout: 0.1}", LLAMA_CONFIG).unwrap_err();
    assert!(e.message.contains("unknown field `dropout`"), "{e}");

    let e = err("name: x\nmodel: {kind: gpt, layers: 1, d_model: 8, heads: 2, context: 4, vocab: 9, kv_heads: 1}\ndata: {kind: synthetic}\ntrain: {steps: 1, global_batch: 1}\n");
    assert!(e.message.contains("unknown field `kv_heads` for model kind `gpt`"), "{e}");
}

#[test]
fn an_eval_section_takes_data_like_data_and_defaults() {
    let spec = ok(&with("eval:\n  data: {kind: synthetic, seed: 9, samples: 64}\n"));
    let e = spec.eval.expect("an eval section");
    assert_eq!(e.data, DataSpec::Synthetic { seed: 9, samples: 64 });
    assert_eq!((e.every, e.batches, e.batch), (0, 1, 4), "after the last step, one batch of global_batch");
    let spec = ok(&with("eval: {data: {kind: features, path: held.safetensors}, every: 5, batches: 3, batch: 8}\n"));
    let e = spec.eval.unwrap();
    assert_eq!((e.every, e.batches, e.batch), (5, 3, 8));
    let mut spec = ok(&with("eval: {data: {kind: features, path: held.safetensors}}\n"));
    spec.resolve_paths(Path::new("/jobs"));
    assert_eq!(spec.eval.unwrap().data, DataSpec::Features { path: "/jobs/held.safetensors".into() });
    assert_eq!(ok(MINIMAL).eval, None);
}

#[test]
fn eval_data_that_does_not_fit_the_model_names_its_field_and_line() {
    let e = err(&with("eval:\n  data: {kind: tokens, path: t.bin}\n"));
    assert_eq!(e.path, "eval.data.kind");
    assert_eq!(e.line, 11);
    assert!(e.message.contains("needs model kind `gpt`"), "{e}");
    let e = err(&with("eval:\n  data: {kind: synthetic}\n  batches: 0\n"));
    assert_eq!(e.path, "eval.batches");
    let e = err(&with("eval:\n  data: {kind: synthetic, samples: 0}\n"));
    assert_eq!(e.path, "eval.data.samples");
    let e = err(&with("eval:\n  every: 3\n"));
    assert!(e.to_string().contains("data"), "{e}");
}

#[test]
fn priority_defaults_to_zero_and_takes_negative_values() {
    assert_eq!(ok(MINIMAL).priority, defaults::PRIORITY);
    assert_eq!(ok(&with("priority: 7\n")).priority, 7);
    assert_eq!(ok(&with("priority: -1000\n")).priority, -1000);
    let spec = ok(&with("priority: -3\n"));
    assert_eq!(JobSpec::from_json(&spec.to_json()).unwrap().priority, -3);
    assert!(!ok(MINIMAL).to_json().contains("priority"), "the default is left out of the stored spec");
}

#[test]
fn a_bad_priority_names_its_field_and_line() {
    let e = err(&with("priority: 1001\n"));
    assert_eq!((e.path.as_str(), e.line), ("priority", 10), "{e}");
    assert!(e.message.contains("between -1000 and 1000, found 1001"), "{e}");
    let e = err(&with("priority: -99999999999\n"));
    assert_eq!((e.path.as_str(), e.line), ("priority", 10), "{e}");
    let e = err(&with("priority: high\n"));
    assert_eq!((e.path.as_str(), e.line), ("priority", 10), "{e}");
    let e = err(&with("priority: 1.5\n"));
    assert_eq!(e.path, "priority", "{e}");
}

#[test]
fn metrics_tensorboard_is_a_local_folder_resolved_beside_the_job_file() {
    assert_eq!(ok(MINIMAL).metrics, MetricsSpec::default());
    assert!(!ok(MINIMAL).to_json().contains("metrics"), "no section, nothing stored");
    let mut spec = ok(&with("metrics:\n  tensorboard: runs/tb\n"));
    assert_eq!(spec.metrics.tensorboard.as_deref(), Some("runs/tb"));
    assert_eq!(JobSpec::from_json(&spec.to_json()).unwrap(), spec);
    spec.resolve_paths(Path::new("/jobs"));
    assert_eq!(spec.metrics.tensorboard.as_deref(), Some("/jobs/runs/tb"));
    let mut spec = ok(&with("metrics: {tensorboard: 'file:///var/tb'}\n"));
    spec.resolve_paths(Path::new("/jobs"));
    assert_eq!(spec.metrics.tensorboard.as_deref(), Some("/var/tb"));
    assert_eq!(ok(&with("metrics: {}\n")).metrics, MetricsSpec::default());
}

#[test]
fn a_bad_metrics_section_names_its_field_and_line() {
    let e = err(&with("metrics:\n  tensorbord: runs\n"));
    assert_eq!(e.line, 11, "{e}");
    assert!(e.message.contains("unknown field `tensorbord`"), "{e}");
    let e = err(&with("metrics:\n  tensorboard: s3://bucket/tb\n"));
    assert_eq!((e.path.as_str(), e.line), ("metrics.tensorboard", 11), "{e}");
    assert!(e.message.contains("local folder"), "{e}");
    let e = err(&with("metrics:\n  tensorboard: runs/../../etc\n"));
    assert_eq!((e.path.as_str(), e.line), ("metrics.tensorboard", 11), "{e}");
    let e = err(&with("metrics:\n  tensorboard: ''\n"));
    assert_eq!(e.path, "metrics.tensorboard", "{e}");
}
