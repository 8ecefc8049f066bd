//! The `ProcessGroup` trait that parallel strategies code against, and the
//! trivial group of one process.

use crate::error::CommError;

/// The ranks of one generation of a job, able to run collectives together.
///
/// Every rank must call the same collectives in the same order with buffers of
/// the same length (all_gather messages may differ); a mismatch is reported as
/// [`CommError::Protocol`]. Each call has a deadline (the group's op timeout).
/// Results are bit-identical on every rank.
pub trait ProcessGroup: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    fn generation(&self) -> u64;
    /// In-place sum over all ranks.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError>;
    /// Every rank contributes `mine` (lengths may differ per rank); returns
    /// all ranks' contributions in rank order.
    fn all_gather_bytes(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CommError>;
    /// Overwrite `buf` on every rank with root's contents.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CommError>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), CommError>;
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

    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<(), CommError> {
        Ok(())
    }

    fn all_gather_bytes(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        Ok(vec![mine.to_vec()])
    }

    fn broadcast(&mut self, _buf: &mut [f32], root: usize) -> Result<(), CommError> {
        if root != 0 {
            return Err(CommError::Protocol {
                rank: 0,
                message: format!("broadcast root {root} is out of range for world 1"),
            });
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        Ok(())
    }
}
