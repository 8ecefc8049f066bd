//! Pure arithmetic of the ring all-reduce: where each of the `world` chunks of
//! a buffer starts and ends, and which chunk a rank sends and receives at each
//! step. No sockets here, so it is tested by what it returns.

use std::ops::Range;

/// Elements `[len * index / world, len * (index + 1) / world)` of a buffer of
/// `len` elements split into `world` chunks. Chunks differ in length by at most
/// one, cover the buffer exactly once, and may be empty when `len < world`.
///
/// Panics if `world == 0` or `index >= world`.
pub fn chunk_range(len: usize, world: usize, index: usize) -> Range<usize> {
    assert!(world > 0, "world must be at least 1");
    assert!(index < world, "chunk index {index} out of range for world {world}");
    let bound = |i: usize| ((len as u128 * i as u128) / world as u128) as usize;
    bound(index)..bound(index + 1)
}

/// The two phases of a ring all-reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The received chunk is added into the local one.
    ReduceScatter,
    /// The received chunk, already fully reduced, overwrites the local one.
    AllGather,
}

/// One step of a ring all-reduce as seen by one rank: send chunk `send` to the
/// next rank while receiving chunk `recv` from the previous one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingStep {
    pub phase: Phase,
    pub send: usize,
    pub recv: usize,
}

/// The `2 * (world - 1)` steps of a ring all-reduce for `rank`: reduce-scatter,
/// after which `rank` holds the full sum of chunk `(rank + 1) % world`, then
/// all-gather, which passes each full chunk once around the ring. Every chunk
/// is summed by exactly one rank and then only copied, so all ranks end with
/// bit-identical results.
pub fn all_reduce_steps(rank: usize, world: usize) -> Vec<RingStep> {
    assert!(rank < world, "rank {rank} out of range for world {world}");
    let at = |offset: isize| (rank as isize + offset).rem_euclid(world as isize) as usize;
    let mut steps = Vec::with_capacity(2 * (world - 1));
    for s in 0..world as isize - 1 {
        steps.push(RingStep { phase: Phase::ReduceScatter, send: at(-s), recv: at(-s - 1) });
    }
    for s in 0..world as isize - 1 {
        steps.push(RingStep { phase: Phase::AllGather, send: at(1 - s), recv: at(-s) });
    }
    steps
}

/// The rank whose message `rank` receives at step `step` of a ring all-gather,
/// where each rank first sends its own message and then forwards what it got.
pub fn gather_origin(rank: usize, world: usize, step: usize) -> usize {
    (rank + world - 1 - step % world) % world
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn chunks_cover_the_buffer_exactly_once(world in 1usize..=64, len in 0usize..=100_000) {
            let mut seen = vec![0u8; len];
            let mut next_start = 0;
            for i in 0..world {
                let r = chunk_range(len, world, i);
                prop_assert_eq!(r.start, next_start, "chunks are contiguous and in order");
                prop_assert!(r.len() == len / world || r.len() == len / world + 1);
                for e in r.clone() {
                    seen[e] += 1;
                }
                next_start = r.end;
            }
            prop_assert_eq!(next_start, len);
            prop_assert!(seen.iter().all(|&n| n == 1));
        }

        #[test]
        fn chunk_bounds_do_not_overflow_for_huge_buffers(world in 1usize..=4096, len in (usize::MAX / 2)..=usize::MAX) {
            prop_assert_eq!(chunk_range(len, world, 0).start, 0);
            prop_assert_eq!(chunk_range(len, world, world - 1).end, len);
        }
    }

    /// Runs the schedule of every rank in lock step on integer vectors and
    /// checks that each rank ends with the full sum.
    fn simulate(world: usize, len: usize) {
        let mut bufs: Vec<Vec<u64>> = (0..world).map(|r| (0..len).map(|i| (r * 1000 + i) as u64).collect()).collect();
        let expected: Vec<u64> = (0..len).map(|i| (0..world).map(|r| (r * 1000 + i) as u64).sum()).collect();
        let schedules: Vec<_> = (0..world).map(|r| all_reduce_steps(r, world)).collect();
        for step in 0..2 * (world - 1) {
            // what every rank sends in this step, taken before anyone receives
            let sent: Vec<Vec<u64>> =
                (0..world).map(|r| bufs[r][chunk_range(len, world, schedules[r][step].send)].to_vec()).collect();
            for r in 0..world {
                let prev = (r + world - 1) % world;
                let mine = schedules[r][step];
                let theirs = schedules[prev][step];
                assert_eq!(mine.recv, theirs.send, "rank {r} receives what rank {prev} sends");
                let range = chunk_range(len, world, mine.recv);
                for (dst, src) in bufs[r][range].iter_mut().zip(&sent[prev]) {
                    match mine.phase {
                        Phase::ReduceScatter => *dst += *src,
                        Phase::AllGather => *dst = *src,
                    }
                }
            }
        }
        for (r, buf) in bufs.iter().enumerate() {
            assert_eq!(buf, &expected, "rank {r} of world {world}, len {len}");
        }
    }

    #[test]
    fn schedule_sums_every_element_on_every_rank() {
        for world in 1usize..=7 {
            for len in [0, 1, 2, 3, world.saturating_sub(1), world + 1, 97] {
                simulate(world, len);
            }
        }
    }

    #[test]
    fn gather_origin_walks_backwards_around_the_ring() {
        assert_eq!((0..3).map(|s| gather_origin(0, 4, s)).collect::<Vec<_>>(), vec![3, 2, 1]);
        assert_eq!(gather_origin(2, 3, 0), 1);
    }
}
