//! flotilla's wire types and gRPC stubs, generated from `proto/`: the client
//! API (package `flotilla.v1`, re-exported at the root) and the coordinator
//! replicas' Raft and cluster services (`flotilla.raft.v1`); and the
//! client-side rule for finding the leading replica ([`leader`]); and what
//! a client sends to prove who it is ([`auth`]).

pub mod auth;
pub mod leader;

pub mod v1 {
    tonic::include_proto!("flotilla.v1");
}

pub mod raft {
    pub mod v1 {
        tonic::include_proto!("flotilla.raft.v1");
    }
}

pub use v1::*;
