//! flotilla's worker side: the agent that follows the coordinator, the train
//! engine it supervises (one loop for every layout, its state in tensors),
//! the models, data sets, sampler, optimizer and checkpoints the engine
//! uses. Collectives come from `flotilla-comm`.

pub mod agent;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod engine;
pub mod hf;
pub mod model;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod optim;
pub mod preemption;
pub mod rendezvous;
pub mod rng;
pub mod sampler;
pub mod shards;
pub mod stats;
pub mod telemetry;
pub mod tensorboard;
pub mod tokenize;
pub mod types;
mod uplink;

pub use agent::{Agent, AgentConfig};
/// Checkpoint and model storage (its own crate, shared with the coordinator).
pub use flotilla_storage as storage;
pub use types::TrainOptions;
