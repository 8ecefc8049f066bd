//! The buffers collectives run on: a borrowed run of elements of a stated
//! type ([`DType`]) in a stated memory ([`Memory`]). The crate does not link
//! libtorch: the trainer lends it a tensor's memory through [`Buf::from_raw`]
//! (host tensors for the TCP ring; device tensors for a GPU backend, which
//! takes the pointer as it is), and tests and benches lend plain slices.
//!
//! Sums of bf16 values are taken in f32 and rounded once per addition step
//! (round to nearest even, as libtorch rounds): the ring rounds at every hop,
//! the direct exchange once at the end.

use std::marker::PhantomData;

#[cfg(not(target_endian = "little"))]
compile_error!("flotilla-comm sends buffers as their in-memory bytes and needs a little-endian target");

use crate::error::CommError;

/// Element types a collective can move and sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    /// bfloat16, as its 16 raw bits (the upper half of an f32).
    BF16,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 => 2,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
        }
    }
}

/// Where a buffer's memory lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Memory {
    Host,
    /// Memory of CUDA device `n`, for a GPU backend.
    Cuda(usize),
}

/// `len` elements of `dtype`, borrowed mutably for `'a`: what one collective
/// reads and writes in place.
pub struct Buf<'a> {
    ptr: *mut u8,
    len: usize,
    dtype: DType,
    memory: Memory,
    _borrow: PhantomData<&'a mut [u8]>,
}

// SAFETY: a `Buf` is an exclusive borrow of its memory, like `&mut [u8]`,
// which is `Send`.
unsafe impl Send for Buf<'_> {}

impl<'a> Buf<'a> {
    pub fn f32(values: &'a mut [f32]) -> Buf<'a> {
        Buf {
            ptr: values.as_mut_ptr().cast(),
            len: values.len(),
            dtype: DType::F32,
            memory: Memory::Host,
            _borrow: PhantomData,
        }
    }

    /// bf16 values as their raw bits.
    pub fn bf16(bits: &'a mut [u16]) -> Buf<'a> {
        Buf {
            ptr: bits.as_mut_ptr().cast(),
            len: bits.len(),
            dtype: DType::BF16,
            memory: Memory::Host,
            _borrow: PhantomData,
        }
    }

    /// A buffer over memory the caller owns (a tensor's storage).
    ///
    /// # Safety
    /// `ptr` must point to `len * dtype.size()` bytes of `memory`, aligned to
    /// `dtype.size()`, that stay valid, and that nothing else reads or writes,
    /// for as long as `'a`.
    pub unsafe fn from_raw(ptr: *mut u8, len: usize, dtype: DType, memory: Memory) -> Buf<'a> {
        assert!(len == 0 || (ptr as usize) % dtype.size() == 0, "a {} buffer must be aligned", dtype.name());
        Buf { ptr, len, dtype, memory, _borrow: PhantomData }
    }

    /// Elements (not bytes).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn memory(&self) -> Memory {
        self.memory
    }

    /// The first element's address, for backends that take pointers.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    /// The bytes of a host buffer; an error for device memory.
    pub fn host_bytes_mut(&mut self) -> Result<&mut [u8], CommError> {
        self.check_host()?;
        if self.len == 0 {
            return Ok(&mut []);
        }
        // SAFETY: `from_raw`'s contract (or the slice the buffer came from)
        // makes these bytes ours for `'a`, and `&mut self` keeps this the
        // only borrow of them.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len * self.dtype.size()) })
    }

    /// The bytes of a host buffer, read only.
    pub fn host_bytes(&self) -> Result<&[u8], CommError> {
        self.check_host()?;
        if self.len == 0 {
            return Ok(&[]);
        }
        // SAFETY: as in `host_bytes_mut`, shared.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr, self.len * self.dtype.size()) })
    }

    fn check_host(&self) -> Result<(), CommError> {
        match self.memory {
            Memory::Host => Ok(()),
            Memory::Cuda(d) => Err(CommError::Unsupported(format!(
                "a buffer in the memory of CUDA device {d} needs a GPU process group; this one moves host memory"
            ))),
        }
    }
}

/// bf16 bits of `x`, rounded to nearest even (NaN stays NaN).
pub fn bf16_from_f32(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    let rounding = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

pub fn f32_from_bf16(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// `bytes` as f32s; they come from an aligned buffer or staging area.
pub(crate) fn f32s(bytes: &[u8]) -> &[f32] {
    // SAFETY: any bit pattern is a valid f32; `align_to` only hands out the
    // aligned middle, which is checked to be everything.
    let (pre, mid, post) = unsafe { bytes.align_to::<f32>() };
    assert!(pre.is_empty() && post.is_empty(), "f32 bytes are whole and aligned");
    mid
}

pub(crate) fn f32s_mut(bytes: &mut [u8]) -> &mut [f32] {
    // SAFETY: as in `f32s`.
    let (pre, mid, post) = unsafe { bytes.align_to_mut::<f32>() };
    assert!(pre.is_empty() && post.is_empty(), "f32 bytes are whole and aligned");
    mid
}

pub(crate) fn u16s(bytes: &[u8]) -> &[u16] {
    // SAFETY: as in `f32s`, for u16.
    let (pre, mid, post) = unsafe { bytes.align_to::<u16>() };
    assert!(pre.is_empty() && post.is_empty(), "bf16 bytes are whole and aligned");
    mid
}

pub(crate) fn u16s_mut(bytes: &mut [u8]) -> &mut [u16] {
    // SAFETY: as in `f32s`, for u16.
    let (pre, mid, post) = unsafe { bytes.align_to_mut::<u16>() };
    assert!(pre.is_empty() && post.is_empty(), "bf16 bytes are whole and aligned");
    mid
}

/// `dst += src`, element by element, both of `dtype`.
pub(crate) fn add_into(dst: &mut [u8], src: &[u8], dtype: DType) {
    debug_assert_eq!(dst.len(), src.len());
    match dtype {
        DType::F32 => f32s_mut(dst).iter_mut().zip(f32s(src)).for_each(|(d, s)| *d += *s),
        DType::BF16 => u16s_mut(dst)
            .iter_mut()
            .zip(u16s(src))
            .for_each(|(d, s)| *d = bf16_from_f32(f32_from_bf16(*d) + f32_from_bf16(*s))),
    }
}

/// Elements summed at a time when adding contributions in rank order.
const SUM_BLOCK: usize = 2048;

/// Overwrites `own` (this rank's contribution, `n` elements of `dtype`) with
/// the sum, in rank order, of every rank's contribution: rank `p`'s is slot
/// `p` (or `p - 1` above this rank) of `stage`. Every rank adds the same
/// values in the same order, so the results are bit-identical. bf16 sums are
/// accumulated in f32 and rounded once.
pub(crate) fn sum_in_rank_order(own: &mut [u8], stage: &[u8], dtype: DType, rank: usize, world: usize) {
    let size = dtype.size();
    let n = own.len() / size;
    let mut acc = [0.0f32; SUM_BLOCK];
    for start in (0..n).step_by(SUM_BLOCK) {
        let end = (start + SUM_BLOCK).min(n);
        let acc = &mut acc[..end - start];
        for p in 0..world {
            let part: &[u8] = if p == rank {
                &own[start * size..end * size]
            } else {
                let slot = if p < rank { p } else { p - 1 };
                &stage[(slot * n + start) * size..(slot * n + end) * size]
            };
            match dtype {
                DType::F32 if p == 0 => acc.copy_from_slice(f32s(part)),
                DType::F32 => acc.iter_mut().zip(f32s(part)).for_each(|(a, v)| *a += *v),
                DType::BF16 if p == 0 => acc.iter_mut().zip(u16s(part)).for_each(|(a, v)| *a = f32_from_bf16(*v)),
                DType::BF16 => acc.iter_mut().zip(u16s(part)).for_each(|(a, v)| *a += f32_from_bf16(*v)),
            }
        }
        let out = &mut own[start * size..end * size];
        match dtype {
            DType::F32 => f32s_mut(out).copy_from_slice(acc),
            DType::BF16 => u16s_mut(out).iter_mut().zip(acc.iter()).for_each(|(o, a)| *o = bf16_from_f32(*a)),
        }
    }
}

/// A staging area of `bytes` bytes aligned for any [`DType`].
pub(crate) fn staging(words: &mut Vec<u32>, bytes: usize) -> &mut [u8] {
    words.resize(bytes.div_ceil(4), 0);
    // SAFETY: u32 memory viewed as bytes; u8 has no alignment or validity
    // requirements.
    let all = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 4) };
    &mut all[..bytes]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16_from_f32(1.0), 0x3f80);
        assert_eq!(f32_from_bf16(bf16_from_f32(1.0)), 1.0);
        // 1 + 2^-8 is half way between two bf16 values: ties go to even.
        assert_eq!(bf16_from_f32(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16_from_f32(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(f32_from_bf16(bf16_from_f32(f32::NAN)).is_nan());
        assert_eq!(f32_from_bf16(bf16_from_f32(-2.5)), -2.5);
    }

    #[test]
    fn buffers_know_their_type_and_memory() {
        let mut v = vec![1.0f32, 2.0, 3.0];
        let mut b = Buf::f32(&mut v);
        assert_eq!((b.len(), b.dtype(), b.memory()), (3, DType::F32, Memory::Host));
        assert_eq!(b.host_bytes_mut().unwrap().len(), 12);
        let mut bits = vec![0u16; 5];
        let mut b = Buf::bf16(&mut bits);
        assert_eq!(b.host_bytes_mut().unwrap().len(), 10);
        // SAFETY: never dereferenced: device memory is refused first.
        let mut d = unsafe { Buf::from_raw(std::ptr::null_mut(), 0, DType::F32, Memory::Cuda(1)) };
        let e = d.host_bytes_mut().unwrap_err().to_string();
        assert!(e.contains("CUDA device 1"), "{e}");
    }

    #[test]
    fn f32_sums_are_taken_in_rank_order_whoever_computes_them() {
        // values whose sum depends on the order of the additions
        let c = [[1e8f32, 1.0, -3.0], [1.0, 1e8, 2.5], [-1e8, 0.5, 1e-3]];
        let expected: Vec<u32> = (0..3).map(|i| ((c[0][i] + c[1][i]) + c[2][i]).to_bits()).collect();
        for rank in 0..3 {
            let mut own = c[rank].to_vec();
            let mut stage: Vec<f32> = (0..3).filter(|&p| p != rank).flat_map(|p| c[p]).collect();
            let stage = Buf::f32(&mut stage);
            sum_in_rank_order(
                Buf::f32(&mut own).host_bytes_mut().unwrap(),
                stage.host_bytes().unwrap(),
                DType::F32,
                rank,
                3,
            );
            assert_eq!(own.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), expected, "rank {rank}");
        }
    }

    #[test]
    fn bf16_sums_accumulate_in_f32_in_rank_order() {
        // 256 + 1 + 1 is 258 in f32, but 256 in bf16 added step by step.
        let c: [u16; 3] = [bf16_from_f32(256.0), bf16_from_f32(1.0), bf16_from_f32(1.0)];
        for rank in 0..3 {
            let mut own = c[rank].to_le_bytes().to_vec();
            let stage: Vec<u8> = (0..3).filter(|&p| p != rank).flat_map(|p| c[p].to_le_bytes()).collect();
            let mut words = Vec::new();
            let aligned = staging(&mut words, stage.len());
            aligned.copy_from_slice(&stage);
            let mut own_words = Vec::new();
            let own_aligned = staging(&mut own_words, 2);
            own_aligned.copy_from_slice(&own);
            sum_in_rank_order(own_aligned, aligned, DType::BF16, rank, 3);
            own.copy_from_slice(own_aligned);
            assert_eq!(f32_from_bf16(u16::from_le_bytes([own[0], own[1]])), 258.0, "rank {rank}");
        }
        let mut a = staging(&mut Vec::new(), 2).to_vec();
        a.copy_from_slice(&bf16_from_f32(256.0).to_le_bytes());
        let mut wa = Vec::new();
        let da = staging(&mut wa, 2);
        da.copy_from_slice(&a);
        let mut wb = Vec::new();
        let db = staging(&mut wb, 2);
        db.copy_from_slice(&bf16_from_f32(1.0).to_le_bytes());
        add_into(da, db, DType::BF16);
        assert_eq!(f32_from_bf16(u16s(da)[0]), 256.0, "one bf16 addition rounds");
    }
}
