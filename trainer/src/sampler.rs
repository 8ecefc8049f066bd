//! The deterministic, resumable sampler. A job consumes samples by global
//! position: step `s` (0-based) uses positions `s*B .. (s+1)*B` of an endless
//! stream made of epochs, each a permutation of the data set seeded by
//! (seed, epoch). Rank `r` of `w` takes the contiguous slice
//! `B*r/w .. B*(r+1)/w` of its step, so the union over ranks is the same
//! global batch whatever the world size.

use std::collections::HashMap;

use crate::rng::SplitMix64;

const SHUFFLE_STREAM: u64 = 0x5348_5546;

pub struct Sampler {
    len: u64,
    seed: u64,
    global_batch: u64,
    cache: HashMap<u64, Vec<u32>>,
}

impl Sampler {
    pub fn new(len: u64, seed: u64, global_batch: u64) -> Self {
        assert!(len > 0 && len <= u64::from(u32::MAX), "data set size {len} out of range");
        Sampler { len, seed, global_batch, cache: HashMap::new() }
    }

    /// Global position of the first sample of `step`.
    pub fn position(&self, step: u64) -> u64 {
        step * self.global_batch
    }

    /// The range of the global batch that rank `rank` of `world` takes.
    pub fn rank_range(global_batch: u64, rank: usize, world: usize) -> (u64, u64) {
        let w = world as u64;
        (global_batch * rank as u64 / w, global_batch * (rank as u64 + 1) / w)
    }

    /// Data set indices of rank `rank`'s share of `step` (0-based).
    pub fn indices(&mut self, step: u64, rank: usize, world: usize) -> Vec<u64> {
        let (lo, hi) = Self::rank_range(self.global_batch, rank, world);
        let base = self.position(step);
        (base + lo..base + hi).map(|p| self.index_at(p)).collect()
    }

    /// The data set index at global position `pos`.
    pub fn index_at(&mut self, pos: u64) -> u64 {
        let epoch = pos / self.len;
        let k = (pos % self.len) as usize;
        if !self.cache.contains_key(&epoch) {
            // Keep the current and next epoch only.
            self.cache.retain(|e, _| *e + 1 >= epoch);
            self.cache.insert(epoch, permutation(self.len, self.seed, epoch));
        }
        u64::from(self.cache[&epoch][k])
    }
}

/// Fisher-Yates shuffle of 0..len seeded by (seed, epoch).
pub fn permutation(len: u64, seed: u64, epoch: u64) -> Vec<u32> {
    let mut p: Vec<u32> = (0..len as u32).collect();
    let mut g = SplitMix64::keyed(seed, SHUFFLE_STREAM, epoch);
    for i in (1..p.len()).rev() {
        let j = g.below(i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn each_epoch_is_a_permutation_and_epochs_differ() {
        let a = permutation(100, 3, 0);
        let b = permutation(100, 3, 1);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<u32>>());
        assert_ne!(a, b);
        assert_eq!(a, permutation(100, 3, 0));
    }

    proptest! {
        /// The ranks' shares of a step, concatenated in rank order, are the
        /// single-process batch, for every world size.
        #[test]
        fn shares_concatenate_to_the_global_batch(len in 1u64..300, batch in 1u64..40, world in 1usize..6, step in 0u64..50) {
            let mut one = Sampler::new(len, 9, batch);
            let whole = one.indices(step, 0, 1);
            let mut many = Sampler::new(len, 9, batch);
            let joined: Vec<u64> = (0..world).flat_map(|r| many.indices(step, r, world)).collect();
            prop_assert_eq!(joined, whole);
        }

        /// Resuming at a step gives the same indices as running up to it.
        #[test]
        fn resuming_mid_stream_matches(len in 1u64..100, batch in 1u64..20, stop in 0u64..30) {
            let mut straight = Sampler::new(len, 1, batch);
            let all: Vec<Vec<u64>> = (0..=stop + 3).map(|s| straight.indices(s, 0, 1)).collect();
            let mut resumed = Sampler::new(len, 1, batch);
            for s in stop..=stop + 3 {
                prop_assert_eq!(&resumed.indices(s, 0, 1), &all[s as usize]);
            }
        }
    }
}
