//! The arithmetic of a sharded token corpus, without I/O: where a shard's
//! token ids lie (its header, their width, their count), which window of
//! `context + 1` tokens a sample index is, and which byte ranges a set of
//! samples needs.
//!
//! Windows never cross a shard boundary: a shard of `T` tokens holds
//! `floor((T - 1) / context)` windows (none when `T <= context`), window
//! `j` starting at its token `j * context`; the corpus's sample indices
//! number the windows of shard 0, then those of shard 1, and so on.

/// First int32 of a nanoGPT `.bin` shard.
pub const NANOGPT_MAGIC: i32 = 20240520;
/// The header version whose token ids are u16.
pub const NANOGPT_VERSION: i32 = 1;
/// Bytes of a nanoGPT header: 256 little-endian int32.
pub const NANOGPT_HEADER_BYTES: u64 = 256 * 4;

/// Where one shard's token ids lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardLayout {
    /// Byte offset of the first token id.
    pub start: u64,
    /// Bytes per token id.
    pub width: u64,
    /// Token ids in the shard.
    pub tokens: u64,
}

impl ShardLayout {
    /// A headerless shard of `size` bytes of `width`-byte token ids.
    pub fn raw(size: u64, width: u64) -> Result<ShardLayout, String> {
        if size % width != 0 {
            return Err(format!("{size} bytes is not a whole number of {width}-byte tokens"));
        }
        Ok(ShardLayout { start: 0, width, tokens: size / width })
    }

    /// A nanoGPT shard of `size` bytes whose first bytes are `header`.
    pub fn nanogpt(size: u64, header: &[u8]) -> Result<ShardLayout, String> {
        if size < NANOGPT_HEADER_BYTES || (header.len() as u64) < NANOGPT_HEADER_BYTES {
            return Err(format!("{size} bytes is shorter than the {NANOGPT_HEADER_BYTES}-byte nanoGPT header"));
        }
        let int = |k: usize| i32::from_le_bytes(header[4 * k..4 * k + 4].try_into().expect("4 bytes"));
        if int(0) != NANOGPT_MAGIC {
            return Err(format!("not a nanoGPT shard: the header starts with {} instead of {NANOGPT_MAGIC}", int(0)));
        }
        if int(1) != NANOGPT_VERSION {
            return Err(format!(
                "nanoGPT header version {}; only version {NANOGPT_VERSION} (u16 token ids) is read",
                int(1)
            ));
        }
        let tokens = u64::try_from(int(2)).map_err(|_| format!("the header's token count is {}", int(2)))?;
        let want = NANOGPT_HEADER_BYTES + 2 * tokens;
        if size != want {
            let side = if size < want { "shorter" } else { "longer" };
            return Err(format!(
                "the header says {tokens} tokens ({want} bytes with the header), but the shard has {size} bytes: \
                 {side} than its header says"
            ));
        }
        Ok(ShardLayout { start: NANOGPT_HEADER_BYTES, width: 2, tokens })
    }
}

/// Sample index → (shard, first token) over many shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Windows {
    context: u64,
    /// `ends[s]`: windows in shards `0..=s`.
    ends: Vec<u64>,
}

impl Windows {
    /// The windows of shards holding `tokens[s]` tokens each.
    pub fn new(context: u64, tokens: &[u64]) -> Windows {
        assert!(context > 0, "a context of at least one token");
        let mut total = 0;
        let ends = tokens
            .iter()
            .map(|&t| {
                total += if t > context { (t - 1) / context } else { 0 };
                total
            })
            .collect();
        Windows { context, ends }
    }

    /// Windows in the whole corpus.
    pub fn len(&self) -> u64 {
        self.ends.last().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Windows in shard `s`.
    pub fn in_shard(&self, s: usize) -> u64 {
        self.ends[s] - if s == 0 { 0 } else { self.ends[s - 1] }
    }

    /// The shard of window `index` and the window's first token there.
    pub fn locate(&self, index: u64) -> (usize, u64) {
        assert!(index < self.len(), "window {index} of {}", self.len());
        // The first shard whose cumulative count exceeds `index`.
        let s = self.ends.partition_point(|&end| end <= index);
        let before = if s == 0 { 0 } else { self.ends[s - 1] };
        (s, (index - before) * self.context)
    }

    /// Tokens per window.
    pub fn width(&self) -> u64 {
        self.context + 1
    }
}

/// One ranged read: `tokens` token ids of `shard` from its token `first`,
/// holding the windows `parts` (sample index, first token within the read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub shard: usize,
    pub first: u64,
    pub tokens: u64,
    pub parts: Vec<(u64, u64)>,
}

/// The reads that fetch the windows `indices` (each once, duplicates
/// dropped): windows of one shard that touch or overlap are read together,
/// up to `max_tokens` per read (a single window is never split).
pub fn plan_reads(windows: &Windows, indices: &[u64], max_tokens: u64) -> Vec<Read> {
    let w = windows.width();
    let mut located: Vec<(usize, u64, u64)> = indices
        .iter()
        .map(|&i| {
            let (s, t) = windows.locate(i);
            (s, t, i)
        })
        .collect();
    located.sort_unstable();
    located.dedup();
    let mut reads: Vec<Read> = Vec::new();
    for (shard, start, index) in located {
        match reads.last_mut() {
            Some(r) if r.shard == shard && start <= r.first + r.tokens && start + w - r.first <= max_tokens => {
                r.tokens = r.tokens.max(start + w - r.first);
                r.parts.push((index, start - r.first));
            }
            _ => reads.push(Read { shard, first: start, tokens: w, parts: vec![(index, 0)] }),
        }
    }
    reads
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(magic: i32, version: i32, tokens: i32) -> Vec<u8> {
        let mut h = vec![0u8; NANOGPT_HEADER_BYTES as usize];
        for (k, v) in [magic, version, tokens].into_iter().enumerate() {
            h[4 * k..4 * k + 4].copy_from_slice(&v.to_le_bytes());
        }
        h
    }

    #[test]
    fn a_nanogpt_header_gives_the_token_count_and_must_match_the_size() {
        let h = header(NANOGPT_MAGIC, 1, 1000);
        assert_eq!(ShardLayout::nanogpt(1024 + 2000, &h), Ok(ShardLayout { start: 1024, width: 2, tokens: 1000 }));
        let short = ShardLayout::nanogpt(1024 + 1998, &h).unwrap_err();
        assert!(short.contains("says 1000 tokens") && short.contains("shorter than its header says"), "{short}");
        assert!(ShardLayout::nanogpt(1024 + 2002, &h).unwrap_err().contains("longer"));
        assert!(ShardLayout::nanogpt(100, &h[..100]).unwrap_err().contains("shorter than the 1024-byte"));
        let e = ShardLayout::nanogpt(3024, &header(12345, 1, 1000)).unwrap_err();
        assert!(e.contains("not a nanoGPT shard") && e.contains("12345"), "{e}");
        assert!(ShardLayout::nanogpt(3024, &header(NANOGPT_MAGIC, 2, 1000)).unwrap_err().contains("version 2"));
        assert!(ShardLayout::nanogpt(3024, &header(NANOGPT_MAGIC, 1, -5)).unwrap_err().contains("-5"));
    }

    #[test]
    fn raw_shards_hold_whole_tokens() {
        assert_eq!(ShardLayout::raw(10, 2), Ok(ShardLayout { start: 0, width: 2, tokens: 5 }));
        assert!(ShardLayout::raw(11, 2).unwrap_err().contains("11 bytes is not a whole number of 2-byte tokens"));
        assert_eq!(ShardLayout::raw(0, 4).unwrap().tokens, 0);
    }

    #[test]
    fn windows_number_shard_by_shard_and_never_cross_a_boundary() {
        // Context 4: 13 tokens hold 3 windows, 4 tokens none, 9 tokens 2.
        let w = Windows::new(4, &[13, 4, 9, 5]);
        assert_eq!(w.len(), 6);
        assert_eq!((w.in_shard(0), w.in_shard(1), w.in_shard(2), w.in_shard(3)), (3, 0, 2, 1));
        let got: Vec<(usize, u64)> = (0..6).map(|i| w.locate(i)).collect();
        assert_eq!(got, vec![(0, 0), (0, 4), (0, 8), (2, 0), (2, 4), (3, 0)]);
        // One shard: today's single-file numbering.
        let one = Windows::new(4, &[13]);
        assert_eq!((one.len(), one.locate(2)), (3, (0, 8)));
        assert!(Windows::new(4, &[3, 4]).is_empty());
    }

    #[test]
    fn neighbouring_windows_share_one_read() {
        let w = Windows::new(4, &[21, 21]);
        // 5 windows a shard: 0, 1 (adjacent in shard 0), 3 (a gap), 5 and 6 (shard 1's first two).
        let reads = plan_reads(&w, &[6, 1, 0, 3, 5, 1], 1 << 20);
        assert_eq!(
            reads,
            vec![
                Read { shard: 0, first: 0, tokens: 9, parts: vec![(0, 0), (1, 4)] },
                Read { shard: 0, first: 12, tokens: 5, parts: vec![(3, 0)] },
                Read { shard: 1, first: 0, tokens: 9, parts: vec![(5, 0), (6, 4)] },
            ]
        );
        // A cap of one window's tokens keeps every read to one window.
        assert!(plan_reads(&w, &[0, 1, 2], 5).iter().all(|r| r.tokens == 5 && r.parts.len() == 1));
    }

    proptest! {
        /// Every window lies inside its shard, and windows enumerate each
        /// shard's windows in order.
        #[test]
        fn every_window_lies_inside_its_shard(context in 1u64..9, tokens in prop::collection::vec(0u64..60, 1..8)) {
            let w = Windows::new(context, &tokens);
            let mut seen = vec![0u64; tokens.len()];
            for i in 0..w.len() {
                let (s, t) = w.locate(i);
                prop_assert_eq!(t, seen[s] * context);
                prop_assert!(t + context < tokens[s]);
                seen[s] += 1;
            }
            for (s, n) in seen.iter().enumerate() {
                prop_assert_eq!(*n, w.in_shard(s));
            }
        }

        /// The reads cover each requested window exactly where it lies.
        #[test]
        fn reads_cover_the_requested_windows(
            context in 1u64..6,
            tokens in prop::collection::vec(0u64..40, 1..5),
            picks in prop::collection::vec(0u64..1000, 0..30),
            cap in 1u64..30,
        ) {
            let w = Windows::new(context, &tokens);
            prop_assume!(!w.is_empty());
            let indices: Vec<u64> = picks.iter().map(|p| p % w.len()).collect();
            let reads = plan_reads(&w, &indices, cap);
            let mut covered: Vec<u64> = Vec::new();
            for r in &reads {
                prop_assert!(r.tokens <= cap.max(context + 1));
                prop_assert!(r.first + r.tokens <= tokens[r.shard]);
                for &(i, off) in &r.parts {
                    prop_assert_eq!(w.locate(i), (r.shard, r.first + off));
                    prop_assert!(off + context < r.tokens);
                    covered.push(i);
                }
            }
            let mut want = indices.clone();
            want.sort_unstable();
            want.dedup();
            covered.sort_unstable();
            prop_assert_eq!(covered, want);
        }
    }
}
