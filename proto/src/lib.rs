//! flotilla's wire types and gRPC stubs (package `flotilla.v1`), generated
//! from `proto/flotilla/v1/flotilla.proto`, and the client-side rule for
//! finding the leading coordinator replica ([`leader`]).

pub mod leader;

pub mod v1 {
    tonic::include_proto!("flotilla.v1");
}

pub use v1::*;
