//! Lending a tensor's memory to a collective: `flotilla-comm` works on typed
//! buffers ([`Buf`]) and does not link libtorch, so the trainer describes a
//! tensor to it (element type, memory, address) for the length of one call.
//! A group that cannot reach a tensor's memory (CUDA tensors over the TCP
//! backend) gets a host copy of it instead ([`Staging`]).

use std::collections::HashMap;

use flotilla_comm::{Buf, CommError, DType, Memory};
use tch::{Device, Kind, Tensor};

/// Set to `1`, every collective runs on host copies of its tensors, as CUDA
/// tensors over the TCP backend do: the fallback's path, testable without
/// a GPU.
pub const STAGE_ENV: &str = "FLOTILLA_STAGE_COLLECTIVES";

/// Which way a collective moves a tensor's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// It reads them (a send).
    Read,
    /// It overwrites them (a receive).
    Write,
    /// Both (reductions, gathers).
    ReadWrite,
}

/// Host copies of tensors for groups that move host memory: page-locked
/// (pinned) when the tensor is on a GPU, so that copies run at the bus's
/// speed, and kept per element type and length for the next collective of
/// that size (a step repeats its sizes).
#[derive(Default)]
pub struct Staging {
    /// Stage even tensors the group could reach ([`STAGE_ENV`]).
    always: bool,
    copies: HashMap<(Kind, i64, Device), Tensor>,
}

impl Staging {
    /// Staging as [`STAGE_ENV`] says.
    pub fn from_env() -> Staging {
        Staging { always: std::env::var(STAGE_ENV).is_ok_and(|v| v == "1"), copies: HashMap::new() }
    }

    /// Staging of every tensor, reachable or not.
    pub fn always() -> Staging {
        Staging { always: true, copies: HashMap::new() }
    }

    /// Runs `op` on `t`'s memory when the group `reaches` it (see
    /// `ProcessGroup::reaches`), else on a host copy, filled from `t` and
    /// copied back into it as `flow` needs. `t` must be contiguous.
    pub fn lend<R>(
        &mut self,
        reaches: bool,
        t: &mut Tensor,
        flow: Flow,
        op: impl FnOnce(&mut Buf<'_>) -> Result<R, CommError>,
    ) -> Result<R, CommError> {
        if !self.always && reaches {
            return op(&mut buf(t)?);
        }
        if !t.is_contiguous() {
            return Err(CommError::Unsupported("collectives need contiguous tensors".into()));
        }
        let (kind, n, device) = (t.kind(), t.numel() as i64, t.device());
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            tracing::info!(?device, forced = self.always, "collectives staged through host copies of their tensors");
        });
        let host = self.copies.entry((kind, n, device)).or_insert_with(|| {
            let h = Tensor::empty([n], (kind, Device::Cpu));
            match device {
                Device::Cuda(_) => h.pin_memory(device),
                _ => h,
            }
        });
        let flat = t.view([-1]);
        if flow != Flow::Write {
            tch::no_grad(|| host.copy_(&flat));
        }
        let r = op(&mut buf(host)?)?;
        if flow != Flow::Read {
            let mut flat = flat;
            tch::no_grad(|| flat.copy_(host));
        }
        Ok(r)
    }
}

/// The element type a collective moves for tensors of `kind`, if any.
pub fn dtype_of(kind: Kind) -> Option<DType> {
    match kind {
        Kind::Float => Some(DType::F32),
        Kind::BFloat16 => Some(DType::BF16),
        _ => None,
    }
}

/// The tensor kind of a collective's element type.
pub fn kind_of(dtype: DType) -> Kind {
    match dtype {
        DType::F32 => Kind::Float,
        DType::BF16 => Kind::BFloat16,
    }
}

pub fn memory_of(device: Device) -> Memory {
    match device {
        Device::Cuda(n) => Memory::Cuda(n),
        _ => Memory::Host,
    }
}

/// `t`'s memory as a collective's buffer, borrowed for as long as `t` is.
/// `t` must be contiguous and of a kind collectives move. Whoever lends a
/// tensor must not read or write its memory through another handle (a
/// shallow clone, a view) until the collective is done: libtorch tensors
/// share memory across handles, which no borrow can see.
pub fn buf(t: &mut Tensor) -> Result<Buf<'_>, CommError> {
    let dtype = dtype_of(t.kind())
        .ok_or_else(|| CommError::Unsupported(format!("collectives move f32 or bf16 tensors, not {:?}", t.kind())))?;
    if !t.is_contiguous() {
        return Err(CommError::Unsupported("collectives need contiguous tensors".into()));
    }
    let len = t.numel();
    let memory = memory_of(t.device());
    // SAFETY: a contiguous tensor of `len` elements of `dtype` owns that many
    // elements at `data_ptr`, aligned for its type; holding `&mut t` for the
    // buffer's life keeps its storage alive, and the caller promises (above)
    // that nothing else touches that memory meanwhile.
    Ok(unsafe { Buf::from_raw(t.data_ptr().cast::<u8>(), len, dtype, memory) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_comm::{ProcessGroup, SingleProcess};

    #[test]
    fn tensors_lend_their_memory_with_their_type() {
        let mut t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let b = buf(&mut t).unwrap();
        assert_eq!((b.len(), b.dtype(), b.memory()), (3, DType::F32, Memory::Host));
        let mut h = Tensor::zeros([4], (Kind::BFloat16, Device::Cpu));
        assert_eq!(buf(&mut h).unwrap().dtype(), DType::BF16);
        let mut g = SingleProcess::new(1);
        g.all_reduce_sum(&mut buf(&mut t).unwrap()).unwrap();
    }

    #[test]
    fn staged_collectives_see_and_return_the_tensor_s_values() {
        let mut s = Staging::always();
        let mut t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]);
        let before = t.data_ptr();
        // The op gets a host copy (not the tensor's memory) with its values
        // and writes through it; the tensor gets the result.
        s.lend(true, &mut t, Flow::ReadWrite, |b| {
            let bytes = b.host_bytes_mut()?;
            assert_ne!(bytes.as_ptr(), before as *const u8, "a copy, not the tensor");
            let vals: Vec<f32> = bytes.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            assert_eq!(vals, [1.0, 2.0, 3.0, 4.0]);
            bytes[..4].copy_from_slice(&9.5f32.to_le_bytes());
            Ok(())
        })
        .unwrap();
        assert_eq!(Vec::<f32>::try_from(t.view([-1])).unwrap(), [9.5, 2.0, 3.0, 4.0]);
        // A send reads only: what the op writes does not come back.
        s.lend(true, &mut t, Flow::Read, |b| {
            b.host_bytes_mut()?[..4].copy_from_slice(&0.0f32.to_le_bytes());
            Ok(())
        })
        .unwrap();
        assert_eq!(t.double_value(&[0, 0]), 9.5);
        // A receive writes only: the copy is not filled first, the result lands.
        let mut r = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        s.lend(true, &mut r, Flow::Write, |b| {
            b.host_bytes_mut()?[12..].copy_from_slice(&7.0f32.to_le_bytes());
            Ok(())
        })
        .unwrap();
        assert_eq!(r.double_value(&[3]), 7.0);
    }

    #[test]
    fn unstaged_collectives_get_the_tensor_s_own_memory() {
        let mut s = Staging::default();
        let mut t = Tensor::from_slice(&[1.0f32, 2.0]);
        let at = t.data_ptr() as usize;
        s.lend(true, &mut t, Flow::ReadWrite, |b| {
            assert_eq!(b.host_bytes_mut()?.as_ptr() as usize, at);
            Ok(())
        })
        .unwrap();
        // A group that cannot reach the memory gets a copy.
        s.lend(false, &mut t, Flow::ReadWrite, |b| {
            assert_ne!(b.host_bytes_mut()?.as_ptr() as usize, at);
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn other_kinds_and_strided_views_are_refused() {
        let mut i = Tensor::from_slice(&[1i64, 2]);
        assert!(matches!(buf(&mut i), Err(CommError::Unsupported(_))));
        let mut s = Tensor::zeros([4, 4], (Kind::Float, Device::Cpu)).transpose(0, 1);
        assert!(matches!(buf(&mut s), Err(CommError::Unsupported(_))));
    }
}
