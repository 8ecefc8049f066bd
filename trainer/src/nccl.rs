//! NCCL collectives on CUDA tensors (feature `cuda`). NCCL and the CUDA
//! runtime are loaded when first used, so this builds on machines without
//! CUDA. Rank 0 creates the communicator's unique id and shares it through
//! the coordinator's rendezvous board.
//!
//! Operations run in place on the CUDA default stream. tch never switches
//! libtorch off the default stream, so that is the stream libtorch's kernels
//! run on: an all-reduce is ordered after the kernels that produced the
//! tensor and before the ones that read it, with no host synchronisation.

use std::time::Duration;

use cudarc::nccl::{result, sys};
use tch::{Device, Kind, Tensor};

use crate::rendezvous::{Rendezvous, RendezvousError};

/// The rendezvous key under which rank 0 publishes the unique id.
pub const UNIQUE_ID_KEY: &str = "nccl-unique-id";

#[derive(Debug, thiserror::Error)]
pub enum NcclError {
    #[error("nccl: {0:?}")]
    Nccl(result::NcclError),
    #[error("cuda: {0}")]
    Cuda(String),
    #[error(transparent)]
    Rendezvous(#[from] RendezvousError),
    #[error("{0}")]
    Tensor(String),
}

impl From<result::NcclError> for NcclError {
    fn from(e: result::NcclError) -> Self {
        NcclError::Nccl(e)
    }
}

pub struct NcclGroup {
    comm: sys::ncclComm_t,
    rank: usize,
    world: usize,
    generation: u64,
    device: usize,
}

// SAFETY: an NCCL communicator may be used from any one thread at a time;
// NcclGroup is not Sync and its methods take &mut self.
unsafe impl Send for NcclGroup {}

fn data_type(kind: Kind) -> Result<sys::ncclDataType_t, NcclError> {
    Ok(match kind {
        Kind::Float => sys::ncclDataType_t::ncclFloat32,
        Kind::Double => sys::ncclDataType_t::ncclFloat64,
        Kind::Half => sys::ncclDataType_t::ncclFloat16,
        Kind::BFloat16 => sys::ncclDataType_t::ncclBfloat16,
        Kind::Int => sys::ncclDataType_t::ncclInt32,
        Kind::Int64 => sys::ncclDataType_t::ncclInt64,
        other => return Err(NcclError::Tensor(format!("NCCL cannot reduce {other:?} tensors"))),
    })
}

/// Unique ids travel as their 128 raw bytes.
fn id_to_bytes(id: &sys::ncclUniqueId) -> Vec<u8> {
    id.internal.iter().map(|c| *c as u8).collect()
}

fn id_from_bytes(bytes: &[u8]) -> Result<sys::ncclUniqueId, NcclError> {
    let mut id = sys::ncclUniqueId { internal: [0; 128] };
    if bytes.len() != id.internal.len() {
        return Err(NcclError::Tensor(format!("a unique id has 128 bytes, got {}", bytes.len())));
    }
    for (d, s) in id.internal.iter_mut().zip(bytes) {
        *d = *s as _;
    }
    Ok(id)
}

impl NcclGroup {
    /// Joins the generation's communicator on CUDA device `device`.
    pub fn connect(
        rendezvous: &Rendezvous,
        rank: usize,
        world: usize,
        generation: u64,
        device: usize,
        timeout: Duration,
    ) -> Result<NcclGroup, NcclError> {
        cudarc::runtime::result::device::set(device as i32).map_err(|e| NcclError::Cuda(format!("{e:?}")))?;
        let id = if rank == 0 {
            let id = result::get_uniqueid()?;
            rendezvous.publish(UNIQUE_ID_KEY, id_to_bytes(&id))?;
            id
        } else {
            id_from_bytes(&rendezvous.wait(UNIQUE_ID_KEY, timeout)?)?
        };
        let mut comm = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out pointer; every rank passes the same id.
        unsafe { result::comm_init_rank(&mut comm, world as i32, id, rank as i32) }?;
        Ok(NcclGroup { comm, rank, world, generation, device })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn check(&self, t: &Tensor) -> Result<(sys::ncclDataType_t, usize), NcclError> {
        if t.device() != Device::Cuda(self.device) {
            return Err(NcclError::Tensor(format!("tensor is on {:?}, the group on cuda:{}", t.device(), self.device)));
        }
        if !t.is_contiguous() {
            return Err(NcclError::Tensor("NCCL needs a contiguous tensor".into()));
        }
        Ok((data_type(t.kind())?, t.numel()))
    }

    /// Sums `t` over all ranks, in place.
    pub fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<(), NcclError> {
        let (dtype, count) = self.check(t)?;
        let ptr = t.data_ptr();
        // SAFETY: `ptr` addresses `count` contiguous elements of `dtype` on
        // this group's device, alive for the call; in-place is allowed.
        unsafe {
            result::all_reduce(ptr, ptr, count, dtype, sys::ncclRedOp_t::ncclSum, self.comm, std::ptr::null_mut())
        }?;
        Ok(())
    }

    /// Overwrites `t` on every rank with root's.
    pub fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<(), NcclError> {
        let (dtype, count) = self.check(t)?;
        let ptr = t.data_ptr();
        // SAFETY: as for all_reduce.
        unsafe { result::broadcast(ptr, ptr, count, dtype, root as i32, self.comm, std::ptr::null_mut()) }?;
        Ok(())
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        // SAFETY: the communicator was initialised and is not used after this.
        unsafe {
            let _ = result::comm_abort(self.comm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_ids_survive_the_trip_through_bytes() {
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        for (i, c) in id.internal.iter_mut().enumerate() {
            *c = (i as u8).wrapping_mul(37) as _;
        }
        let back = id_from_bytes(&id_to_bytes(&id)).unwrap();
        assert_eq!(back.internal, id.internal);
        assert!(id_from_bytes(&[1, 2, 3]).is_err());
    }

    #[test]
    fn only_float_and_integer_tensors_are_reduced() {
        assert!(data_type(Kind::Float).is_ok());
        assert!(data_type(Kind::BFloat16).is_ok());
        assert!(data_type(Kind::Bool).is_err());
    }
}
