//! Every default and limit of job file v1, defined once.
//!
//! Validation, the docs (docs/jobfile.md) and the tests all refer to these names.

/// The only job file version this crate reads.
pub const VERSION: u64 = 1;

/// Longest accepted job name (the name is used in ids and paths).
pub const NAME_MAX_LEN: usize = 63;

/// `data.seed` for `kind: synthetic`.
pub const SYNTHETIC_SEED: u64 = 0;
/// `data.samples` for `kind: synthetic`.
pub const SYNTHETIC_SAMPLES: u64 = 4096;
/// Samples one evaluation may cover (`eval.batches * eval.batch`).
pub const EVAL_SAMPLES_LIMIT: usize = 1 << 20;
/// `data.dtype` for `kind: tokens`.
pub const TOKEN_DTYPE: crate::TokenDtype = crate::TokenDtype::U16;
/// `data.format` for `kind: tokens`.
pub const TOKEN_FORMAT: crate::TokenFormat = crate::TokenFormat::Raw;
/// Most entries `data.path` may list (kind `tokens`); a pattern names any number of shards.
pub const TOKEN_PATHS_LIMIT: usize = 10_000;
/// Smallest `model.vocab` that `data.kind: text` accepts (one token per byte value).
pub const TEXT_VOCAB: usize = 256;

/// `model.rope_theta` of a Llama without `model.from`.
pub const LLAMA_ROPE_THETA: f64 = 10000.0;
/// `model.norm_eps` of a Llama without `model.from`.
pub const LLAMA_NORM_EPS: f64 = 1e-5;

/// Upper bound on every width of a model: an MLP's layer widths, a GPT's
/// `d_model`, `heads`, `context` and `vocab`.
pub const MODEL_DIM_LIMIT: usize = 1 << 20;
/// Upper bound on a GPT's `layers` (transformer blocks).
pub const MODEL_BLOCKS_LIMIT: usize = 4096;
/// Upper bound on a model's parameter count (2^40, about 1.1 trillion): a
/// sanity bound that keeps every size a worker computes from overflowing.
pub const PARAMETERS_LIMIT: u64 = 1 << 40;
/// Upper bound on the numbers a worker generates for `kind: synthetic`
/// data: `samples` × the inputs of an MLP (or the context + 1 of a GPT).
pub const SYNTHETIC_ELEMENTS_LIMIT: u64 = 1 << 31;
/// Longest path or URL a job file may name (Linux's PATH_MAX).
pub const PATH_MAX_LEN: usize = 4096;

/// `train.seed`.
pub const TRAIN_SEED: u64 = 0;
// `train.micro_batch` defaults to `train.global_batch` (no constant: it depends on the file).

/// `train.optimizer.lr`.
pub const LR: f64 = 1e-3;
/// `train.optimizer.betas[0]`.
pub const BETA1: f64 = 0.9;
/// `train.optimizer.betas[1]`.
pub const BETA2: f64 = 0.999;
/// `train.optimizer.eps`.
pub const EPS: f64 = 1e-8;
/// `train.optimizer.weight_decay`.
pub const WEIGHT_DECAY: f64 = 0.01;

/// `train.schedule.warmup_steps`.
pub const WARMUP_STEPS: u64 = 0;
/// `train.schedule.min_lr`.
pub const MIN_LR: f64 = 0.0;

/// `workers.min`; `workers.max` defaults to the value of `workers.min`.
pub const WORKERS_MIN: usize = 1;
/// Upper bound on `workers.max`.
pub const WORKERS_LIMIT: usize = 1024;

/// `priority`: the job's place in the coordinator's queue (higher first).
pub const PRIORITY: i32 = 0;
/// `priority` lies in `-PRIORITY_LIMIT..=PRIORITY_LIMIT`.
pub const PRIORITY_LIMIT: i32 = 1000;

/// `checkpoint.url`.
pub const CHECKPOINT_URL: &str = "runs";
/// `checkpoint.every` (0 = no periodic checkpoints, only the final model).
pub const CHECKPOINT_EVERY: u64 = 0;
/// `checkpoint.keep`.
pub const CHECKPOINT_KEEP: usize = 3;

/// `parallelism.bucket_mb`: gradient bucket size in MiB.
pub const BUCKET_MB: f64 = 25.0;
/// Upper bound on `parallelism.bucket_mb`.
pub const BUCKET_MB_LIMIT: f64 = 4096.0;
