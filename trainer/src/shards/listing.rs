//! From the entries of `data.path` to the corpus's shards: patterns listed
//! in their folder, named files looked up, every shard's size (and nanoGPT
//! header) checked before the first step, so that a missing or short shard
//! fails the start with its name.

use std::collections::{HashMap, HashSet};

use flotilla_jobspec::{glob, TokenDtype, TokenFormat};
use flotilla_storage::Storage;
use futures::{StreamExt, TryStreamExt};

use super::layout::{ShardLayout, NANOGPT_HEADER_BYTES};
use crate::data::DataError;

/// Metadata requests in flight at once while listing.
const LISTING_CONCURRENCY: usize = 32;

/// One shard: where it lies and where its tokens lie inside it.
#[derive(Debug, Clone)]
pub(crate) struct Shard {
    /// Its full location (a path or URL), for messages.
    pub location: String,
    pub folder: Storage,
    pub name: String,
    pub layout: ShardLayout,
}

/// The shards `entries` name, in order, each checked.
pub(crate) async fn shards(
    entries: &[String],
    dtype: TokenDtype,
    format: TokenFormat,
) -> Result<Vec<Shard>, DataError> {
    let mut folders: HashMap<String, Storage> = HashMap::new();
    // (location, folder, name, size if a listing gave it)
    let mut found: Vec<(String, Storage, String, Option<u64>)> = Vec::new();
    for entry in entries {
        let (folder_url, name) = split(entry)?;
        let folder = match folders.get(folder_url) {
            Some(f) => f.clone(),
            None => {
                let f = Storage::open(folder_url)
                    .map_err(|e| DataError::Format { path: entry.clone(), message: e.to_string() })?;
                folders.insert(folder_url.to_string(), f.clone());
                f
            }
        };
        if glob::is_glob(name) {
            let listed = folder
                .files()
                .await
                .map_err(|e| DataError::Format { path: entry.clone(), message: format!("list the folder: {e}") })?;
            let before = found.len();
            for (file, size) in listed {
                if !file.contains('/') && glob::matches(name, &file) {
                    found.push((format!("{folder_url}/{file}"), folder.clone(), file, Some(size)));
                }
            }
            if found.len() == before {
                return Err(DataError::Format { path: entry.clone(), message: "the pattern matches no file".into() });
            }
        } else {
            found.push((entry.clone(), folder, name.to_string(), None));
        }
    }
    let mut seen = HashSet::new();
    if let Some((twice, ..)) = found.iter().find(|(location, ..)| !seen.insert(location.as_str())) {
        return Err(DataError::Format {
            path: twice.clone(),
            message: "is named twice in data.path (directly or by a pattern)".into(),
        });
    }
    futures::stream::iter(
        found.into_iter().map(|(location, folder, name, size)| check(location, folder, name, size, dtype, format)),
    )
    .buffered(LISTING_CONCURRENCY)
    .try_collect()
    .await
}

/// Splits an entry into its folder and its file name (or pattern).
fn split(entry: &str) -> Result<(&str, &str), DataError> {
    glob::split_folder(entry).ok_or_else(|| DataError::Format {
        path: entry.to_string(),
        message: "needs a folder and a file name (an absolute path or an object-store URL)".into(),
    })
}

/// Looks up (unless listed) and checks one shard's size and header.
async fn check(
    location: String,
    folder: Storage,
    name: String,
    size: Option<u64>,
    dtype: TokenDtype,
    format: TokenFormat,
) -> Result<Shard, DataError> {
    let bad = |message: String| DataError::Format { path: location.clone(), message };
    let size = match size {
        Some(s) => s,
        None => folder.size(&name).await.map_err(|e| {
            bad(if e.is_not_found() { "the shard is missing".into() } else { format!("look up the shard: {e}") })
        })?,
    };
    let layout = match format {
        TokenFormat::Raw => ShardLayout::raw(size, dtype.size() as u64),
        TokenFormat::Nanogpt => {
            let header = if size < NANOGPT_HEADER_BYTES {
                Vec::new()
            } else {
                folder
                    .get_range(&name, 0..NANOGPT_HEADER_BYTES)
                    .await
                    .map_err(|e| bad(format!("read the nanoGPT header: {e}")))?
            };
            ShardLayout::nanogpt(size, &header)
        }
    }
    .map_err(bad)?;
    Ok(Shard { location, folder, name, layout })
}
