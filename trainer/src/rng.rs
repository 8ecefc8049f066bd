//! A small deterministic random number generator (SplitMix64) for data and
//! shuffles: the same seed gives the same numbers on every machine, which is
//! what lets every rank generate and shuffle the data identically.

#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// A generator for one item of a stream: `mix(seed, stream, index)`.
    pub fn keyed(seed: u64, stream: u64, index: u64) -> Self {
        let mut g = SplitMix64(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        g.0 ^= g.next_u64() ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        g
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        // Multiply-shift: unbiased enough for shuffles of any practical size.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.next_f64().max(f64::MIN_POSITIVE);
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_different_keys_differ() {
        let a: Vec<u64> = (0..4).map(|_| SplitMix64::new(7).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(SplitMix64::keyed(1, 2, 3).next_u64(), SplitMix64::keyed(1, 2, 4).next_u64());
        assert_ne!(SplitMix64::keyed(1, 2, 3).next_u64(), SplitMix64::keyed(1, 3, 3).next_u64());
    }

    #[test]
    fn below_stays_in_range_and_normal_has_sane_moments() {
        let mut g = SplitMix64::new(42);
        assert!((0..10_000).all(|_| g.below(7) < 7));
        let xs: Vec<f64> = (0..20_000).map(|_| g.normal()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }
}
