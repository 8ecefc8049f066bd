//! The `ProcessGroup` trait that parallel strategies code against, and the
//! trivial group of one process.

use std::ops::Range;

use crate::buffer::{Buf, Memory};
use crate::chunk::chunk_range;
use crate::error::CommError;

/// The ranks of one generation of a job, able to run collectives together.
///
/// Collectives run in place on typed buffers ([`Buf`]: f32 or bf16, in host
/// or device memory); a backend refuses memory it cannot reach with
/// [`CommError::Unsupported`]. Every rank must call the same collectives in
/// the same order with buffers of the same type and length (all_gather_bytes
/// messages may differ); a mismatch is reported as [`CommError::Protocol`]. `send` and `recv` involve only the two
/// ranks named, in matching order per pair. Each call has a deadline (the
/// group's op timeout); a failed call names the rank to blame. Results are
/// bit-identical on every rank.
///
/// Chunked ops split a buffer of `len` elements into `world` chunks at
/// [`chunk_range`]`(len, world, r)`; rank `r` owns chunk `r`.
pub trait ProcessGroup: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    fn generation(&self) -> u64;
    /// In-place sum over all ranks.
    fn all_reduce_sum(&mut self, buf: &mut Buf<'_>) -> Result<(), CommError>;
    /// In-place sum over all ranks of this rank's own chunk only; returns its
    /// range (in elements). The rest of `buf` is left with unspecified values.
    fn reduce_scatter_sum(&mut self, buf: &mut Buf<'_>) -> Result<Range<usize>, CommError>;
    /// Every rank fills its own chunk of `buf`; afterwards every rank has every
    /// rank's chunk.
    fn all_gather(&mut self, buf: &mut Buf<'_>) -> Result<(), CommError>;
    /// Every rank contributes `mine` (lengths may differ per rank); returns
    /// all ranks' contributions in rank order.
    fn all_gather_bytes(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CommError>;
    /// Overwrite `buf` on every rank with root's contents.
    fn broadcast(&mut self, buf: &mut Buf<'_>, root: usize) -> Result<(), CommError>;
    /// Sends `buf` to rank `to`, which receives it with `recv(this rank, ..)`
    /// of the same type and length. Returns once the message is written to
    /// the connection; two ranks that send large messages to each other at the
    /// same time must not both wait for theirs to be read first.
    fn send(&mut self, to: usize, buf: &Buf<'_>) -> Result<(), CommError>;
    /// Receives the next message that rank `from` sends to this rank.
    fn recv(&mut self, from: usize, buf: &mut Buf<'_>) -> Result<(), CommError>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), CommError>;
    /// Whether this group's collectives work on buffers in `memory` (host
    /// memory for the TCP backend; a GPU backend's device). Callers stage
    /// other buffers through host memory.
    fn reaches(&self, memory: Memory) -> bool {
        memory == Memory::Host
    }
}

/// The group of a single process (world 1): every collective returns at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SingleProcess {
    generation: u64,
}

impl SingleProcess {
    pub fn new(generation: u64) -> SingleProcess {
        SingleProcess { generation }
    }
}

impl ProcessGroup for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world(&self) -> usize {
        1
    }

    fn generation(&self) -> u64 {
        self.generation
    }

    fn all_reduce_sum(&mut self, _buf: &mut Buf<'_>) -> Result<(), CommError> {
        Ok(())
    }

    fn reduce_scatter_sum(&mut self, buf: &mut Buf<'_>) -> Result<Range<usize>, CommError> {
        Ok(chunk_range(buf.len(), 1, 0))
    }

    fn all_gather(&mut self, _buf: &mut Buf<'_>) -> Result<(), CommError> {
        Ok(())
    }

    fn all_gather_bytes(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        Ok(vec![mine.to_vec()])
    }

    fn broadcast(&mut self, _buf: &mut Buf<'_>, root: usize) -> Result<(), CommError> {
        if root != 0 {
            return Err(CommError::Protocol {
                rank: 0,
                message: format!("broadcast root {root} is out of range for world 1"),
            });
        }
        Ok(())
    }

    fn send(&mut self, to: usize, _buf: &Buf<'_>) -> Result<(), CommError> {
        Err(no_peer(to))
    }

    fn recv(&mut self, from: usize, _buf: &mut Buf<'_>) -> Result<(), CommError> {
        Err(no_peer(from))
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        Ok(())
    }
}

fn no_peer(peer: usize) -> CommError {
    CommError::Protocol { rank: 0, message: format!("rank 0 of a world of 1 has no rank {peer} to talk to") }
}

/// The collectives on plain f32 slices, for tests, benches and tools that
/// hold their data in `Vec<f32>`: each wraps the slice in a [`Buf`].
pub trait F32Collectives: ProcessGroup {
    fn all_reduce_f32(&mut self, values: &mut [f32]) -> Result<(), CommError> {
        self.all_reduce_sum(&mut Buf::f32(values))
    }

    fn reduce_scatter_f32(&mut self, values: &mut [f32]) -> Result<Range<usize>, CommError> {
        self.reduce_scatter_sum(&mut Buf::f32(values))
    }

    fn all_gather_f32(&mut self, values: &mut [f32]) -> Result<(), CommError> {
        self.all_gather(&mut Buf::f32(values))
    }

    fn broadcast_f32(&mut self, values: &mut [f32], root: usize) -> Result<(), CommError> {
        self.broadcast(&mut Buf::f32(values), root)
    }

    /// Sends a copy of `values` (a `Buf` borrows its memory mutably).
    fn send_f32(&mut self, to: usize, values: &[f32]) -> Result<(), CommError> {
        let mut copy = values.to_vec();
        self.send(to, &Buf::f32(&mut copy))
    }

    fn recv_f32(&mut self, from: usize, values: &mut [f32]) -> Result<(), CommError> {
        self.recv(from, &mut Buf::f32(values))
    }
}

impl<G: ProcessGroup + ?Sized> F32Collectives for G {}
