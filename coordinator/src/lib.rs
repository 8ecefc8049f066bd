//! flotilla's coordinator: the control state machine and scheduler (pure),
//! the meta store they run on, the leader's soft state, and the gRPC
//! services that workers and clients talk to. It never links libtorch.

pub mod convert;
pub mod coordinator;
pub mod etcd;
pub mod handoff;
pub mod raft;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod soft;
pub mod state;
pub mod store;

#[cfg(test)]
mod state_tests;

pub use coordinator::{Coordinator, CoordinatorConfig};
pub use etcd::{EtcdOptions, EtcdStore};
pub use raft::{RaftOptions, RaftStore};
pub use server::{serve, serve_with_routes, serve_with_store, ServerHandle};
pub use state::{Command, Event, JobPhase, State};
pub use store::{MemStore, MetaStore, StoreError};
