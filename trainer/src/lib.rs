//! flotilla's worker side: the agent that follows the coordinator, the train
//! loop it supervises, the models, data sets, sampler, optimizer and
//! checkpoints that loop uses. Collectives come from `flotilla-comm`.

pub mod agent;
pub mod buckets;
pub mod checkpoint;
pub mod data;
pub mod engine;
pub mod model;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod optim;
pub mod preemption;
pub mod rendezvous;
pub mod rng;
pub mod sampler;
pub mod saver;
pub mod stats;
pub mod train;

pub use agent::{Agent, AgentConfig};
/// Checkpoint and model storage (its own crate, shared with the coordinator).
pub use flotilla_storage as storage;
pub use train::TrainOptions;
