//! flotilla's coordinator: the control state machine and scheduler (pure),
//! the meta store they run on, the leader's soft state, and the gRPC
//! services that workers and clients talk to. It never links libtorch.

pub mod api;
pub mod auth;
pub mod convert;
pub mod coordinator;
pub mod data_key;
pub mod etcd;
pub mod handoff;
pub mod http;
pub mod limits;
pub mod raft;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod soft;
pub mod state;
pub mod store;
pub mod sweeps;
pub mod telemetry;

#[cfg(test)]
mod state_tests;

pub use auth::{AuthMode, Role};
pub use coordinator::{Coordinator, CoordinatorConfig};
pub use etcd::{EtcdOptions, EtcdStore};
pub use raft::{RaftOptions, RaftStore};
pub use server::{serve, serve_with_routes, serve_with_store, serve_with_tls, ServerHandle};
pub use state::{Command, Event, JobPhase, State};
pub use store::{MemStore, MetaStore, StoreError};

/// 128 random bits in hex, from the standard library's randomly keyed
/// hasher, the time and the process id: ids for submissions and jobs.
pub fn random_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::new();
    for i in 0..2u64 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(i);
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
        h.write_u32(std::process::id());
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}
