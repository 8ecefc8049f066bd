//! CPU communication backend of flotilla: a [`ProcessGroup`] over a TCP ring
//! between worker processes, for data-parallel training.
//!
//! Each worker process binds one [`CommListener`] for its whole life. For each
//! generation of a job, every rank calls [`TcpRing::connect`] with the same
//! [`RingConfig`] (but its own rank); the ring then runs bandwidth-optimal ring
//! collectives whose results are bit-identical on every rank. Calls block the
//! calling thread (the train loop's own thread), each under a deadline; a
//! failed call names the rank to blame and leaves the ring broken.

mod error;
mod group;
mod link;
mod listener;
mod ops;
mod ring;
mod wire;

pub mod chunk;

pub use error::CommError;
pub use group::{ProcessGroup, SingleProcess};
pub use listener::CommListener;
pub use ring::{RingConfig, TcpRing};
