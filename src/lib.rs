//! flotilla: distributed deep-learning training from one YAML file.
//!
//! This umbrella crate is the `flotilla` binary and re-exports the parts for
//! scripting: the job file parser, the wire API, the coordinator and the
//! trainer.

pub mod cli;
pub mod deploy;

pub use flotilla_comm as comm;
pub use flotilla_coordinator as coordinator;
pub use flotilla_jobspec as jobspec;
pub use flotilla_proto as proto;
pub use flotilla_trainer as trainer;
