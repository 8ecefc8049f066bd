//! Lending a tensor's memory to a collective: `flotilla-comm` works on typed
//! buffers ([`Buf`]) and does not link libtorch, so the trainer describes a
//! tensor to it (element type, memory, address) for the length of one call.

use flotilla_comm::{Buf, CommError, DType, Memory};
use tch::{Device, Kind, Tensor};

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
    fn other_kinds_and_strided_views_are_refused() {
        let mut i = Tensor::from_slice(&[1i64, 2]);
        assert!(matches!(buf(&mut i), Err(CommError::Unsupported(_))));
        let mut s = Tensor::zeros([4, 4], (Kind::Float, Device::Cpu)).transpose(0, 1);
        assert!(matches!(buf(&mut s), Err(CommError::Unsupported(_))));
    }
}
