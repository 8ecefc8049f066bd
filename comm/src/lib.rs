//! CPU communication backend of flotilla: a [`ProcessGroup`] over a TCP ring
//! between worker processes, for data-parallel training.
//!
//! Collectives take typed buffers ([`Buf`]: f32 or bf16) rather than tensors,
//! so that this crate builds without libtorch: the trainer lends a tensor's
//! memory for the length of one call. A GPU backend implements the same
//! trait on buffers in device memory; the TCP ring refuses those.
//!
//! Each worker process binds one [`CommListener`] for its whole life. For each
//! generation of a job, every rank calls [`TcpRing::connect`] with the same
//! [`RingConfig`] (but its own rank). Buffers above [`DIRECT_MAX_BYTES`] then
//! go around the ring with the bandwidth-optimal algorithm, pipelined in
//! pieces on a writer thread per link; smaller ones by direct exchange between
//! every pair of ranks in one round trip ([`Algorithm`] overrides the choice).
//! Either way results are bit-identical on every rank. `send`/`recv` and the
//! direct exchange use connections made on first use through the same
//! listeners and generation-checked handshake. Calls block the calling thread
//! (the train loop's own thread), each under a deadline; a failed call names
//! the rank to blame and leaves the group broken.
//!
//! Failures: a rank whose predecessor goes quiet tells its successor that it
//! is stuck too and waits briefly for the predecessor's verdict, so every rank
//! downstream of a silent or vanished rank names that rank, not its own
//! neighbour. Writes to a closed peer rely on SIGPIPE being ignored, as the
//! Rust runtime does for Rust binaries.
//!
//! The job id in [`RingConfig`] is also the namespace of a ring on a listener:
//! a process in two rings of the same generation gives them two ids.

mod auth;
mod buffer;
mod direct;
mod error;
mod group;
mod link;
mod listener;
mod ops;
mod ring;
mod sender;
mod wire;

pub mod chunk;

pub use auth::{Secret, SECRET_LEN};
pub use buffer::{bf16_from_f32, f32_from_bf16, Buf, DType, Memory};
pub use chunk::{Algorithm, DIRECT_MAX_BYTES};
pub use error::CommError;
pub use group::{F32Collectives, ProcessGroup, SingleProcess};
pub use listener::CommListener;
pub use ring::{RingConfig, TcpRing};
