//! The validated job specification: what the rest of flotilla codes against.
//!
//! A `JobSpec` only comes out of [`crate::parse`] (or [`JobSpec::from_json`] on
//! the output of [`JobSpec::to_json`]), so every constraint in docs/jobfile.md
//! holds for it. It carries no source positions.

use serde::{Deserialize, Serialize};

/// A validated job file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct JobSpec {
    /// `[a-z0-9][a-z0-9-]{0,62}`; used in ids and paths.
    pub name: String,
    pub model: ModelSpec,
    pub data: DataSpec,
    pub train: TrainSpec,
    pub parallelism: ParallelismSpec,
    pub workers: WorkersSpec,
    pub checkpoint: CheckpointSpec,
    /// Where the finished model is handed over; none: it stays in the
    /// job's output folder only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistrySpec>,
    /// Validation while training; none: no evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalSpec>,
    /// The job's place in the coordinator's queue: higher runs first, equal
    /// priorities in submission order. Within `-1000..=1000`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
    /// Where training's metrics go besides the coordinator.
    #[serde(default, skip_serializing_if = "MetricsSpec::is_empty")]
    pub metrics: MetricsSpec,
}

/// `metrics`: where training's metrics go besides the coordinator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct MetricsSpec {
    /// A local folder where rank 0 writes TensorBoard event files (an
    /// absolute path once resolved); none: no event files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensorboard: Option<String>,
}

impl MetricsSpec {
    pub fn is_empty(&self) -> bool {
        self.tensorboard.is_none()
    }
}

fn is_zero(p: &i32) -> bool {
    *p == 0
}

/// Evaluation on held-out data: the loss (and, for the MLP, the accuracy)
/// of the first `batches * batch` samples of `data`, in order, every
/// `every` steps and after the last.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EvalSpec {
    pub data: DataSpec,
    /// Steps between evaluations; 0: after the last step only.
    pub every: u64,
    /// Batches per evaluation, >= 1.
    pub batches: usize,
    /// Samples per batch, >= 1 (default `train.global_batch`).
    pub batch: usize,
}

/// The model to train, chosen by `model.kind`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ModelSpec {
    Mlp(MlpSpec),
    Gpt(GptSpec),
    Llama(LlamaSpec),
}

impl ModelSpec {
    /// The `model.kind` this spec was written with: `"mlp"` or `"gpt"`.
    pub fn kind(&self) -> &'static str {
        match self {
            ModelSpec::Mlp(_) => "mlp",
            ModelSpec::Gpt(_) => "gpt",
            ModelSpec::Llama(_) => "llama",
        }
    }

    /// The layers a pipeline splits the model at: an MLP's linear layers;
    /// a GPT's embedding, each block and the head.
    pub fn pipeline_layers(&self) -> usize {
        match self {
            ModelSpec::Mlp(m) => m.layers.len().saturating_sub(1),
            ModelSpec::Gpt(g) => g.layers + 2,
            ModelSpec::Llama(l) => l.layers + 2,
        }
    }

    /// What [`ModelSpec::pipeline_layers`] counts, for messages.
    pub fn pipeline_layers_described(&self) -> String {
        match self {
            ModelSpec::Mlp(m) => format!("{} linear layers", m.layers.len().saturating_sub(1)),
            ModelSpec::Gpt(g) => format!("{} layers: the embedding, {} blocks and the head", g.layers + 2, g.layers),
            ModelSpec::Llama(l) => {
                format!("{} layers: the embedding, {} decoder layers and the head", l.layers + 2, l.layers)
            }
        }
    }

    /// A language model's `(context, vocab)`: what token data is cut to and
    /// checked against. `None` for the MLP.
    pub fn sequence(&self) -> Option<(usize, usize)> {
        match self {
            ModelSpec::Mlp(_) => None,
            ModelSpec::Gpt(g) => Some((g.context, g.vocab)),
            ModelSpec::Llama(l) => Some((l.context, l.vocab)),
        }
    }
}

/// A multi-layer perceptron classifier.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct MlpSpec {
    /// `[inputs, hidden..., classes]`: at least two entries, each >= 1, classes >= 2.
    pub layers: Vec<usize>,
}

/// A decoder-only transformer language model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct GptSpec {
    /// Number of transformer blocks.
    pub layers: usize,
    /// Width of the residual stream; a multiple of `heads`.
    pub d_model: usize,
    /// Attention heads per block.
    pub heads: usize,
    /// Sequence length the model is trained on.
    pub context: usize,
    /// Vocabulary size (token ids are `0..vocab`).
    pub vocab: usize,
}

/// A Llama-family decoder-only language model (the architecture of
/// transformers' `LlamaForCausalLM`): RMSNorm, rotary position embeddings,
/// a SwiGLU MLP, grouped-query attention, no biases.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LlamaSpec {
    /// Decoder layers.
    pub layers: usize,
    /// Width of the residual stream; a multiple of `heads`.
    pub d_model: usize,
    /// Query heads per layer.
    pub heads: usize,
    /// Key/value heads per layer; divides `heads`.
    pub kv_heads: usize,
    /// Width of the SwiGLU MLP's hidden layer.
    pub ffn: usize,
    /// Vocabulary size (token ids are `0..vocab`).
    pub vocab: usize,
    /// Sequence length the model is trained on.
    pub context: usize,
    /// Longest sequence the model is meant for (`max_position_embeddings`
    /// of the exported config): the source's, or `context`.
    pub max_positions: usize,
    /// Base of the rotary embeddings' frequencies.
    pub rope_theta: f64,
    /// Llama 3's frequency scaling, when the model uses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// RMSNorm's epsilon.
    pub norm_eps: f64,
    /// The output projection is the token embedding (one tensor).
    pub tie_embeddings: bool,
    /// A Hugging Face model folder the architecture was read from
    /// (`config.json`); after [`JobSpec::resolve_paths`] an absolute path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Start from the weights in `from` instead of a random init.
    #[serde(default)]
    pub pretrained: bool,
}

/// The `llama3` scaling of rotary frequencies (transformers'
/// `rope_scaling` with `rope_type: llama3`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_positions: usize,
}

/// Where the training samples come from, chosen by `data.kind`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DataSpec {
    /// Generated in process from `seed`; works with either model.
    Synthetic { seed: u64, samples: u64 },
    /// A safetensors file with `x` (f32 `[N, inputs]`) and `y` (i64 `[N]`); MLP only.
    Features { path: String },
    /// Token files (shards), each a flat file of little-endian token ids or
    /// a nanoGPT `.bin` shard; language models only. `path` lists files,
    /// patterns (wildcards in the file name) and object-store URLs; the
    /// shards are the files they name, in that order.
    Tokens {
        #[serde(deserialize_with = "one_or_many")]
        path: Vec<String>,
        dtype: TokenDtype,
        #[serde(default)]
        format: TokenFormat,
    },
    /// A text file; language models only. Without `tokenizer`, read as
    /// bytes (token ids 0..=255, `vocab >= 256`); with it, tokenized by that
    /// Hugging Face `tokenizer.json` (once per job, into a cache beside the
    /// checkpoints), whose ids all fit the model's vocab.
    Text {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tokenizer: Option<String>,
    },
}

/// How a `tokens` shard lays out its token ids.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum TokenFormat {
    /// Token ids of `dtype`, back to back, nothing else.
    #[default]
    Raw,
    /// nanoGPT's `.bin` shard: a header of 256 little-endian i32 (magic
    /// 20240520, version 1, token count), then that many u16 token ids.
    Nanogpt,
}

/// A list of strings, or (as job specs wrote it before lists) one string.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// Width of one token id in a `tokens` file.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    U8,
    U16,
    U32,
}

impl TokenDtype {
    /// Bytes per token id.
    pub fn size(self) -> usize {
        match self {
            TokenDtype::U8 => 1,
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }
}

/// How the job trains.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TrainSpec {
    /// Optimizer steps to run, >= 1.
    pub steps: u64,
    /// Samples per optimizer step across all replicas, >= `workers.max`.
    pub global_batch: usize,
    /// Samples per forward/backward pass, `1..=global_batch`.
    pub micro_batch: usize,
    /// Seeds parameter init and the data order.
    pub seed: u64,
    pub optimizer: AdamWSpec,
    pub schedule: ScheduleSpec,
    /// Clip the global gradient norm to this value (> 0) when set.
    pub grad_clip: Option<f64>,
    /// The arithmetic of forward and backward passes.
    #[serde(default)]
    pub precision: Precision,
    /// Where each rank keeps its tensors and runs its passes.
    #[serde(default)]
    pub device: DeviceChoice,
    /// Keep only each unit's input between its forward and backward pass
    /// and compute its inner activations again in the backward pass.
    #[serde(default)]
    pub activation_checkpointing: bool,
}

/// The arithmetic of forward and backward passes. Master weights, gradients
/// as reduced and AdamW's moments are f32 under both.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    Fp32,
    /// Matrix products, attention and activations in bfloat16, from a bf16
    /// copy of the f32 master weights; layer norm, softmax and the loss in
    /// f32; each micro-batch's gradients added into f32 gradients.
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// Where a job's ranks compute.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// The worker's GPU when it has one (`flotilla worker --gpu`), else its
    /// CPU.
    #[default]
    Auto,
    /// The CPU, whatever the worker has.
    Cpu,
    /// The worker's GPU; a worker without one refuses the job.
    Cuda,
}

impl DeviceChoice {
    pub fn name(self) -> &'static str {
        match self {
            DeviceChoice::Auto => "auto",
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
        }
    }
}

/// AdamW hyper-parameters (all finite).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct AdamWSpec {
    /// Peak learning rate, > 0.
    pub lr: f64,
    /// In `[0, 1)`.
    pub beta1: f64,
    /// In `[0, 1)`.
    pub beta2: f64,
    /// > 0.
    pub eps: f64,
    /// >= 0 (decoupled weight decay).
    pub weight_decay: f64,
}

/// Learning-rate schedule: linear warmup from 0 to `lr` over `warmup_steps`,
/// then cosine decay to `min_lr` at the last step.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ScheduleSpec {
    /// `<= train.steps`.
    pub warmup_steps: u64,
    /// In `[0, lr]`.
    pub min_lr: f64,
}

/// How the job is split across workers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ParallelismSpec {
    /// Number of data-parallel replicas.
    pub dp: DpSize,
    /// Size of a gradient bucket in MiB: gradients are all-reduced bucket by
    /// bucket, so that one bucket's communication overlaps the packing and
    /// unpacking of the others.
    pub bucket_mb: f64,
    /// Pipeline stages: each data-parallel replica is `pp` workers, one per
    /// stage, each holding a contiguous run of the model's layers.
    #[serde(default = "one")]
    pub pp: usize,
    /// ZeRO stage inside each data-parallel group: 0 (replicated), 1
    /// (optimizer state partitioned), 2 (and gradients), 3 (and parameters).
    #[serde(default)]
    pub zero: u8,
    /// Micro-batches each replica's share of the global batch is split
    /// into; none: chunks of `train.micro_batch` samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub micro_batches: Option<usize>,
    /// The pipeline schedule (used when `pp > 1`).
    #[serde(default)]
    pub schedule: PipelineSchedule,
    /// Layers per stage, `pp` entries summing to the model's layer count;
    /// none: balanced by parameter count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<Vec<usize>>,
    /// Overlap communication with computation: reduce a layer's gradients
    /// while the backward pass of the layers before it runs, and (ZeRO-3)
    /// gather the next layer's parameters while one computes. Off: every
    /// collective runs after the passes (for measuring what overlap saves).
    #[serde(default = "yes")]
    pub overlap: bool,
}

fn yes() -> bool {
    true
}

fn one() -> usize {
    1
}

/// The order in which a pipeline stage runs its micro-batches' passes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PipelineSchedule {
    /// Every forward pass, then every backward pass.
    #[serde(rename = "gpipe")]
    Gpipe,
    /// One forward, one backward in the steady state: at most `pp - stage`
    /// micro-batches' activations held at once.
    #[default]
    #[serde(rename = "1f1b")]
    OneFOneB,
}

impl PipelineSchedule {
    pub fn name(self) -> &'static str {
        match self {
            PipelineSchedule::Gpipe => "gpipe",
            PipelineSchedule::OneFOneB => "1f1b",
        }
    }
}

/// Data-parallel degree: chosen by the scheduler, or fixed by the job.
///
/// In JSON (and YAML) this is the string `"auto"` or a plain integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DpSize {
    /// One replica per live worker, within `workers.min..=workers.max`.
    Auto,
    /// Exactly this many replicas, within `workers.min..=workers.max`.
    Fixed(usize),
}

/// How many workers the job runs on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct WorkersSpec {
    /// The job runs (and keeps running) only with at least this many workers.
    pub min: usize,
    /// The job never uses more than this many workers; `min..=1024`.
    pub max: usize,
}

/// Where and how often checkpoints are written.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CheckpointSpec {
    /// A local path (relative or absolute) or `file:///abs/path`. After
    /// [`JobSpec::resolve_paths`] it is always an absolute filesystem path.
    pub url: String,
    /// Checkpoint every this many steps; 0 = only the final model.
    pub every: u64,
    /// Periodic checkpoints kept, >= 1 (older ones are deleted).
    pub keep: usize,
    /// A checkpoint folder (`.../step-N`, of any job and any layout) the
    /// job starts from when it has no checkpoint of its own: weights,
    /// optimizer state, step and data position. After
    /// [`JobSpec::resolve_paths`], an absolute path or an object-store URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_from: Option<String>,
}

/// The model registry a finished job hands its model to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RegistrySpec {
    pub kind: RegistryKind,
    /// MLflow: the tracking server's `http(s)://` URL. Built-in: where the
    /// registry lives (after [`JobSpec::resolve_paths`], an absolute path
    /// or an object-store URL).
    pub url: String,
    /// The registered model's name (default: the job's name).
    pub model: String,
    /// MLflow: the experiment the job's run is logged in (default: the
    /// job's name). Empty for the built-in registry.
    #[serde(default)]
    pub experiment: String,
    /// An alias moved to each new version (e.g. `candidate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// Tags set on the registered version (and the MLflow run).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tags: std::collections::BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RegistryKind {
    Mlflow,
    Builtin,
}

impl JobSpec {
    /// The spec as compact JSON (what the coordinator stores).
    pub fn to_json(&self) -> String {
        // Serialising plain structs of strings, integers and finite floats
        // into a String cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads a spec written by [`JobSpec::to_json`]. It is trusted: no
    /// validation beyond the JSON shape happens here.
    pub fn from_json(s: &str) -> Result<JobSpec, serde_json::Error> {
        serde_json::from_str(s)
    }
}

impl Serialize for DpSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            DpSize::Auto => s.serialize_str("auto"),
            DpSize::Fixed(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for DpSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DpVisitor)
    }
}

/// Accepts `"auto"` or a non-negative integer.
struct DpVisitor;

impl serde::de::Visitor<'_> for DpVisitor {
    type Value = DpSize;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("`auto` or a positive integer")
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<DpSize, E> {
        usize::try_from(v).map(DpSize::Fixed).map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<DpSize, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::invalid_value(serde::de::Unexpected::Signed(v), &self)),
        }
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DpSize, E> {
        if v == "auto" {
            Ok(DpSize::Auto)
        } else {
            Err(E::invalid_value(serde::de::Unexpected::Str(v), &self))
        }
    }
}
