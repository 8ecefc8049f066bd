//! Views of f32 buffers as the little-endian bytes that go on the wire, so
//! that payloads are written from and read into the caller's buffer without a
//! conversion copy.

#[cfg(not(target_endian = "little"))]
compile_error!("flotilla-comm sends f32 buffers as their in-memory bytes and needs a little-endian target");

/// The bytes of `values` as they go on the wire.
pub(crate) fn as_bytes(values: &[f32]) -> &[u8] {
    // SAFETY: u8 has no alignment requirement and every byte of an f32 is
    // initialised; the length covers exactly the same memory.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) }
}

/// The bytes of `values`, to be filled from the wire.
pub(crate) fn as_bytes_mut(values: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above; any bit pattern is a valid f32, so writing arbitrary
    // bytes cannot produce an invalid value.
    unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(values)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_are_little_endian_f32() {
        let mut values = [1.0f32, -2.5];
        assert_eq!(&as_bytes(&values)[..4], &1.0f32.to_le_bytes());
        as_bytes_mut(&mut values)[4..].copy_from_slice(&7.0f32.to_le_bytes());
        assert_eq!(values, [1.0, 7.0]);
    }
}
