//! The embedded Raft meta store: [`RaftStore`], a [`crate::MetaStore`] on
//! openraft with a redb database per replica and gRPC between replicas.
//!
//! A replica is opened with [`RaftStore::open`] and served with the
//! coordinator's services on one port:
//!
//! ```no_run
//! # async fn run(listener: tokio::net::TcpListener) -> Result<(), Box<dyn std::error::Error>> {
//! use std::collections::BTreeMap;
//! use std::sync::Arc;
//! use flotilla_coordinator::raft::{RaftOptions, RaftStore};
//! use flotilla_coordinator::server::serve_with_routes;
//!
//! let addr = format!("http://{}", listener.local_addr()?);
//! let peers = BTreeMap::from([(1, addr.clone())]); // one replica: a valid cluster
//! let store = RaftStore::open(RaftOptions::new(1, "/var/lib/flotilla/meta", addr).with_peers(peers)).await?;
//! let routes = store.routes();
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let server = serve_with_routes(listener, Arc::new(store.clone()), Default::default(), shutdown, routes).await?;
//! # Ok(()) }
//! ```
//!
//! Bootstrap: on a fresh data dir the lowest id in `peers` creates the
//! cluster with `peers` as voters; the others wait to hear from it. A
//! replica meant to join later is opened with empty `peers` and added with
//! [`RaftStore::add_member`] (or the `Cluster.AddMember` RPC) on the leader.
//! An existing data dir is resumed: vote and log from redb, the state
//! machine from the last snapshot, then the committed entries after it.
//!
//! Files: `types` (type config, options), `db` (redb tables), `log_store`,
//! `state_machine`, `network` (gRPC client), `service` (gRPC servers),
//! `proposer` (batches concurrent writes), `store` (the `MetaStore`).

mod db;
mod log_store;
mod network;
mod proposer;
mod service;
mod state_machine;
mod store;
mod types;

pub use log_store::LogStore;
pub use network::{GrpcNetwork, GrpcPeer};
pub use service::{ClusterApi, RaftApi};
pub use state_machine::{SnapshotBuilder, StateMachineStore};
pub use store::{ClusterInfo, MemberInfo, OpenError, RaftStore};
pub use types::*;
