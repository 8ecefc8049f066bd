//! Token corpora of many shards, local or in an object store (`data.kind:
//! tokens`): the shards are listed and checked when the job starts, then
//! only the byte ranges of the windows a rank trains on are read, by a
//! read-ahead thread that the train loop tells which windows its next
//! steps need (the sampler is deterministic). Nothing holds a whole shard.

mod layout;
mod listing;
mod reader;

use std::sync::Arc;

use flotilla_jobspec::{TokenDtype, TokenFormat};

pub use self::layout::{plan_reads, Read, ShardLayout, Windows, NANOGPT_HEADER_BYTES, NANOGPT_MAGIC};
use self::reader::{Reader, Source};
use crate::data::DataError;

/// A corpus of token shards read on demand.
pub struct Corpus {
    source: Arc<Source>,
    reader: Reader,
    context: usize,
}

impl std::fmt::Debug for Corpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Corpus({} shards, {} windows)", self.source.shards.len(), self.source.windows.len())
    }
}

impl Corpus {
    /// Lists and checks the shards `paths` name (files, patterns, URLs),
    /// windows of `context + 1` tokens, ids below `vocab`; starts the
    /// read-ahead thread.
    pub fn open(
        paths: &[String],
        dtype: TokenDtype,
        format: TokenFormat,
        context: usize,
        vocab: usize,
    ) -> Result<Corpus, DataError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| DataError::Io { path: "<read-ahead runtime>".into(), source: e })?;
        let shards = runtime.block_on(listing::shards(paths, dtype, format))?;
        let tokens: Vec<u64> = shards.iter().map(|s| s.layout.tokens).collect();
        let windows = Windows::new(context as u64, &tokens);
        let name = || paths.join(", ").chars().take(200).collect::<String>();
        if windows.is_empty() {
            let total: u64 = tokens.iter().sum();
            return Err(DataError::Format {
                path: name(),
                message: format!(
                    "{} shards with {total} tokens hold no sample: each needs more than context {context} tokens",
                    shards.len()
                ),
            });
        }
        if windows.len() > u64::from(u32::MAX) {
            return Err(DataError::Format {
                path: name(),
                message: format!("{} samples; at most {} are addressed", windows.len(), u32::MAX),
            });
        }
        tracing::info!(shards = shards.len(), samples = windows.len(), "token corpus listed");
        let source = Arc::new(Source { shards, windows, vocab: vocab as u64 });
        let reader = Reader::start(runtime, source.clone())?;
        Ok(Corpus { source, reader, context })
    }

    /// Samples (windows) in the corpus.
    pub fn len(&self) -> u64 {
        self.source.windows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn context(&self) -> usize {
        self.context
    }

    /// Starts fetching the windows `indices` (a coming step's) in the
    /// background; each is kept until a `windows` call has taken it as
    /// often as it was asked for here.
    pub fn prefetch(&self, indices: &[u64]) {
        // An index past the end is refused by `windows`; never fetched.
        let valid: Vec<u64> = indices.iter().copied().filter(|i| *i < self.len()).collect();
        self.reader.ask(&valid);
    }

    /// The `context + 1` tokens of each window `indices`, back to back.
    pub fn windows(&self, indices: &[u64]) -> Result<Vec<u32>, DataError> {
        if let Some(bad) = indices.iter().find(|i| **i >= self.len()) {
            return Err(DataError::Read(format!("sample {bad} of a corpus of {}", self.len())));
        }
        self.reader.take(indices, self.context + 1)
    }
}

#[cfg(test)]
mod tests;
