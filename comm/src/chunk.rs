//! Pure arithmetic of the collectives: where each of the `world` chunks of a
//! buffer starts and ends, which chunk a rank sends and receives at each step
//! of a ring schedule, the pieces a chunk is streamed in, and which algorithm
//! a buffer size gets. No sockets here, so it is tested by what it returns.

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

/// The `world - 1` steps of a ring reduce-scatter for `rank`: at step `s` it
/// sends chunk `rank - s - 1` (what it received and reduced at step `s - 1`,
/// its own values at step 0) and receives chunk `rank - s - 2`, adding into
/// it. Afterwards `rank` holds the full sum of its own chunk `rank`.
pub fn reduce_scatter_steps(rank: usize, world: usize) -> Vec<RingStep> {
    assert!(rank < world, "rank {rank} out of range for world {world}");
    let at = |offset: isize| (rank as isize + offset).rem_euclid(world as isize) as usize;
    (0..world as isize - 1)
        .map(|s| RingStep { phase: Phase::ReduceScatter, send: at(-s - 1), recv: at(-s - 2) })
        .collect()
}

/// The `world - 1` steps of a ring all-gather for `rank`, which starts with
/// its own chunk: at step `s` it sends chunk `rank - s` and receives chunk
/// `rank - s - 1`, overwriting it.
pub fn all_gather_steps(rank: usize, world: usize) -> Vec<RingStep> {
    assert!(rank < world, "rank {rank} out of range for world {world}");
    let at = |offset: isize| (rank as isize + offset).rem_euclid(world as isize) as usize;
    (0..world as isize - 1).map(|s| RingStep { phase: Phase::AllGather, send: at(-s), recv: at(-s - 1) }).collect()
}

/// The `2 * (world - 1)` steps of a ring all-reduce for `rank`: the
/// reduce-scatter, after which `rank` holds the full sum of its own chunk,
/// then the all-gather, which passes each full chunk once around the ring.
/// Every chunk is summed by exactly one rank per addition and then only
/// copied, so all ranks end with bit-identical results.
///
/// In every schedule here the chunk sent at step `s + 1` is the one received
/// at step `s`, so a rank forwards each piece as soon as it has it.
pub fn all_reduce_steps(rank: usize, world: usize) -> Vec<RingStep> {
    let mut steps = reduce_scatter_steps(rank, world);
    steps.extend(all_gather_steps(rank, world));
    steps
}

/// The pieces of at most `piece` elements that `range` is sent in, in order;
/// none for an empty range.
pub fn pieces(range: Range<usize>, piece: usize) -> impl Iterator<Item = Range<usize>> {
    assert!(piece > 0, "pieces must hold at least one element");
    let end = range.end;
    range.step_by(piece).map(move |start| start..(start + piece).min(end))
}

/// Buffers of at most this many bytes are all-reduced, reduce-scattered,
/// all-gathered and broadcast by direct exchange between every pair of ranks
/// (one round trip); larger ones by the bandwidth-optimal ring.
pub const DIRECT_MAX_BYTES: usize = 64 * 1024;

/// Which algorithm a collective uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// Direct exchange up to [`DIRECT_MAX_BYTES`], the ring above.
    #[default]
    Auto,
    /// Always the pipelined ring.
    Ring,
    /// Always direct exchange between every pair of ranks.
    Direct,
}

impl Algorithm {
    /// Whether a collective over a buffer of `bytes` uses direct exchange.
    pub fn is_direct(self, bytes: usize) -> bool {
        match self {
            Algorithm::Auto => bytes <= DIRECT_MAX_BYTES,
            Algorithm::Ring => false,
            Algorithm::Direct => true,
        }
    }
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

    /// Runs a reduce-scatter schedule on integer vectors; every rank must end
    /// with the full sum of its own chunk.
    fn simulate_reduce_scatter(world: usize, len: usize) {
        let mut bufs: Vec<Vec<u64>> = (0..world).map(|r| (0..len).map(|i| (r * 1000 + i) as u64).collect()).collect();
        let expected: Vec<u64> = (0..len).map(|i| (0..world).map(|r| (r * 1000 + i) as u64).sum()).collect();
        let schedules: Vec<_> = (0..world).map(|r| reduce_scatter_steps(r, world)).collect();
        for step in 0..world - 1 {
            let sent: Vec<Vec<u64>> =
                (0..world).map(|r| bufs[r][chunk_range(len, world, schedules[r][step].send)].to_vec()).collect();
            for r in 0..world {
                let prev = (r + world - 1) % world;
                assert_eq!(schedules[r][step].recv, schedules[prev][step].send);
                let range = chunk_range(len, world, schedules[r][step].recv);
                for (dst, src) in bufs[r][range].iter_mut().zip(&sent[prev]) {
                    *dst += *src;
                }
            }
        }
        for (r, buf) in bufs.iter().enumerate() {
            let own = chunk_range(len, world, r);
            assert_eq!(&buf[own.clone()], &expected[own], "rank {r} of world {world}, len {len}");
        }
    }

    proptest! {
        #[test]
        fn every_step_forwards_what_the_previous_one_received(world in 1usize..=64, rank_seed in 0usize..1000) {
            let rank = rank_seed % world;
            for steps in [reduce_scatter_steps(rank, world), all_gather_steps(rank, world), all_reduce_steps(rank, world)] {
                for pair in steps.windows(2) {
                    prop_assert_eq!(pair[1].send, pair[0].recv);
                }
            }
            let rs = reduce_scatter_steps(rank, world);
            prop_assert_eq!(rs.len(), world - 1);
            if let Some(last) = rs.last() {
                prop_assert_eq!(last.recv, rank, "the reduce-scatter ends on the rank's own chunk");
            }
            let ag = all_gather_steps(rank, world);
            if let Some(first) = ag.first() {
                prop_assert_eq!(first.send, rank, "the all-gather starts with the rank's own chunk");
            }
            // in the all-gather every other chunk arrives exactly once
            let mut got: Vec<usize> = ag.iter().map(|s| s.recv).collect();
            got.sort_unstable();
            let others: Vec<usize> = (0..world).filter(|&c| c != rank).collect();
            prop_assert_eq!(got, others);
        }

        #[test]
        fn reduce_scatter_leaves_each_rank_its_own_sum(world in 1usize..=9, len in 0usize..=200) {
            simulate_reduce_scatter(world, len);
        }

        #[test]
        fn pieces_cover_a_range_in_order(start in 0usize..1000, len in 0usize..5000, piece in 1usize..700) {
            let ps: Vec<_> = pieces(start..start + len, piece).collect();
            let mut next = start;
            for p in &ps {
                prop_assert_eq!(p.start, next);
                prop_assert!(!p.is_empty() && p.len() <= piece);
                next = p.end;
            }
            prop_assert_eq!(next, start + len);
            prop_assert_eq!(ps.len(), len.div_ceil(piece));
        }

        #[test]
        fn direct_exchange_is_chosen_by_size_unless_forced(bytes in 0usize..(1 << 24)) {
            prop_assert_eq!(Algorithm::Auto.is_direct(bytes), bytes <= DIRECT_MAX_BYTES);
            prop_assert!(Algorithm::Direct.is_direct(bytes));
            prop_assert!(!Algorithm::Ring.is_direct(bytes));
        }
    }

    #[test]
    fn gather_origin_walks_backwards_around_the_ring() {
        assert_eq!((0..3).map(|s| gather_origin(0, 4, s)).collect::<Vec<_>>(), vec![3, 2, 1]);
        assert_eq!(gather_origin(2, 3, 0), 1);
    }
}
