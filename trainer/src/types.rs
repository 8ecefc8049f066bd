//! The types every part of the worker shares: what the coordinator asks a
//! rank to do ([`Assignment`]), what the engine reports while it runs
//! ([`TrainEvent`], [`MemoryUsage`]), and how a run ends ([`Outcome`],
//! [`TrainError`]).

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use flotilla_comm::{CommError, Secret};
use flotilla_jobspec::JobSpec;

/// What the coordinator asked this rank to do.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub job: String,
    pub generation: u64,
    pub rank: usize,
    pub world: usize,
    pub peers: Vec<SocketAddr>,
    pub spec: JobSpec,
    pub spec_json: String,
    /// Where the job's checkpoints and final model go (path or URL).
    pub output_dir: String,
    /// Committed checkpoints (paths or URLs), newest first.
    pub checkpoints: Vec<String>,
    /// The agent's runtime, for storage I/O from the train thread.
    pub io: tokio::runtime::Handle,
    /// The coordinator's checkpoint request counter, kept current by the
    /// agent: rank 0 asks for a checkpoint when it grows.
    pub checkpoint_request: Arc<AtomicU64>,
    /// This rank's pipeline stage and data-parallel replica, as the
    /// coordinator's plan says (`rank = replica * stages + stage`).
    pub stage: usize,
    pub replica: usize,
    /// Pipeline stages of the plan (`parallelism.pp`).
    pub stages: usize,
    /// The generation's data-plane secret: every connection between ranks
    /// proves it.
    pub secret: Secret,
    /// Where this rank keeps its tensors and computes (`train.device`
    /// resolved against the worker's GPU).
    pub device: tch::Device,
    /// The coordinator's rendezvous board for this generation, where a GPU
    /// backend shares what its ranks need to connect (NCCL's unique ids).
    pub rendezvous: Option<crate::rendezvous::Rendezvous>,
    /// Set when the worker stops this rank (the coordinator moved on, or
    /// the worker leaves): a collective blocked in a GPU backend aborts
    /// instead of waiting out its deadline.
    pub abort: Arc<std::sync::atomic::AtomicBool>,
}

/// The bytes a rank holds, by kind: what `flotilla status` shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryUsage {
    /// Parameters kept between steps (all of the stage's, or this rank's
    /// partition under ZeRO-3).
    pub params: u64,
    /// Gradients kept for the update (the stage's, or this rank's
    /// partition under ZeRO-2 and 3).
    pub grads: u64,
    /// AdamW's moments (the stage's, or this rank's partition under ZeRO 1-3).
    pub optimizer: u64,
    /// Peak growth of the process's heap during a step's passes above what
    /// it held when the step began: the activations kept for backward
    /// passes, and the parameters gathered for them under ZeRO-3.
    pub activations: u64,
    /// The CUDA device the rank computes on, if any.
    pub cuda: Option<u32>,
    /// That device's memory in use (the whole device, as the CUDA runtime
    /// reports it) after the rank's latest step's passes, and the most
    /// seen after any step's passes in this generation.
    pub device_used: u64,
    pub device_peak: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TrainEvent {
    Progress {
        step: u64,
        loss: f64,
        lr: f64,
        samples_per_sec: f64,
        grad_norm: f64,
        /// When the step finished, wall-clock milliseconds since the Unix epoch.
        time_ms: i64,
        /// The evaluation after this step, if one ran (`eval:`).
        eval_loss: Option<f64>,
        eval_accuracy: Option<f64>,
    },
    /// Rank 0 wrote the manifest of this checkpoint; commit it.
    Checkpoint {
        step: u64,
        location: String,
        /// How long training stood still for it, and how long it took in all.
        blocked_ms: f64,
        total_ms: f64,
    },
    /// Rank 0 finished the last step and wrote the final model.
    Finished { step: u64, final_model: String },
    /// What this rank holds and where its recent steps went (every rank
    /// sends it after its first step of a generation, again when what it
    /// holds grows, and about once a second).
    Rank { memory: MemoryUsage, times: Option<crate::stats::StepSplit> },
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error("{0}")]
    Fatal(String),
}

impl TrainError {
    pub(crate) fn fatal(context: &str, e: impl std::fmt::Display) -> TrainError {
        TrainError::Fatal(format!("{context}: {e}"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub connect_timeout: Duration,
    pub op_timeout: Duration,
    /// The worker's GPU (an index among the CUDA devices libtorch sees),
    /// if it has one: where `train.device: auto | cuda` jobs compute.
    pub gpu: Option<usize>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions { connect_timeout: Duration::from_secs(30), op_timeout: Duration::from_secs(120), gpu: None }
    }
}

/// Wall-clock milliseconds since the Unix epoch.
pub(crate) fn wall_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
