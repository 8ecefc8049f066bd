//! Reading: the pieces of logical tensors one rank asks for, and nothing
//! else. The manifest is checked whole first (every tensor present, of the
//! model's shape, tiled exactly by its pieces); then each wanted piece is
//! fetched and verified: in format 3 by a ranged read checked against the
//! piece's own CRC-32C, in format 2 by reading the shards that hold wanted
//! pieces whole and checking each shard's CRC-32C.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use safetensors::SafeTensors;

use super::{decode_manifest, CheckpointError, Layout, Manifest, Piece, TensorEntry, GROUPS, MANIFEST};
use crate::storage::Storage;

/// What a rank reads: pieces of logical tensors as `(tensor index, element
/// range)`, in the order they fill its flat tensors; `moments` for both of
/// AdamW's moments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub params: Vec<(usize, Range<usize>)>,
    pub moments: Vec<(usize, Range<usize>)>,
}

impl Request {
    /// Every tensor, whole.
    pub fn whole(layout: &Layout) -> Request {
        let all: Vec<(usize, Range<usize>)> = (0..layout.names.len()).map(|i| (i, 0..layout.numel(i))).collect();
        Request { params: all.clone(), moments: all }
    }
}

/// The requested pieces, as f32, in request order.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub manifest: Manifest,
    pub params: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// Loads the whole state of a checkpoint for a model of `layout`.
pub async fn load(dir: &Storage, layout: &Layout) -> Result<Loaded, CheckpointError> {
    load_pieces(dir, layout, &Request::whole(layout)).await
}

/// Loads the pieces `req` names from the checkpoint in `dir`.
pub async fn load_pieces(dir: &Storage, layout: &Layout, req: &Request) -> Result<Loaded, CheckpointError> {
    let path = dir.url().to_string();
    let manifest = decode_manifest(&dir.get(MANIFEST).await?, &path)?;
    let entries = check_tensors(&manifest, layout, &path)?;
    let mut reader = Reader { dir, manifest: &manifest, path: &path, shards: HashMap::new() };
    let mut out: [Vec<f32>; 3] = Default::default();
    for (g, list) in [(0, &req.params), (1, &req.moments), (2, &req.moments)] {
        for (t, range) in list {
            let e = entries[&(g, *t)];
            let size = e.dtype.size();
            let mut pieces: Vec<&Piece> =
                e.pieces.iter().filter(|p| p.start < range.end && p.end > range.start).collect();
            pieces.sort_by_key(|p| p.start);
            for p in pieces {
                let bytes = reader.piece(e, p).await?;
                let (a, b) = (p.start.max(range.start), p.end.min(range.end));
                e.dtype.extend_f32(&bytes[(a - p.start) * size..(b - p.start) * size], &mut out[g]);
            }
        }
    }
    let [params, m, v] = out;
    Ok(Loaded { manifest, params, m, v })
}

/// Checks that the manifest describes every tensor of `layout` in every
/// group, with the model's shape, each tiled exactly by pieces of shards
/// that exist; returns the entries by (group, tensor index).
fn check_tensors<'m>(
    m: &'m Manifest,
    layout: &Layout,
    path: &str,
) -> Result<HashMap<(usize, usize), &'m TensorEntry>, CheckpointError> {
    let corrupt = |message: String| CheckpointError::Corrupt { path: path.to_string(), message };
    let by_name: BTreeMap<&str, &TensorEntry> = m.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut out = HashMap::new();
    for (g, group) in GROUPS.iter().enumerate() {
        for (i, name) in layout.names.iter().enumerate() {
            let logical = format!("{group}/{name}");
            let e = by_name.get(logical.as_str()).ok_or_else(|| CheckpointError::Mismatch {
                path: path.to_string(),
                message: format!("has no tensor {logical}"),
            })?;
            if e.shape != layout.shapes[i] {
                return Err(CheckpointError::Mismatch {
                    path: path.to_string(),
                    message: format!("{logical} has shape {:?}, the model has {:?}", e.shape, layout.shapes[i]),
                });
            }
            let numel = layout.numel(i);
            let mut pieces: Vec<&Piece> = e.pieces.iter().collect();
            pieces.sort_by_key(|p| p.start);
            let mut covered = 0;
            for p in pieces {
                if p.start != covered || p.end > numel || p.end <= p.start || p.shard >= m.shards.len() {
                    return Err(corrupt(format!("pieces of {logical} do not tile it")));
                }
                covered = p.end;
            }
            if covered != numel {
                return Err(corrupt(format!("pieces of {logical} cover {covered} of {numel} elements")));
            }
            out.insert((g, i), *e);
        }
    }
    Ok(out)
}

/// Fetches pieces: by ranged reads where the manifest says where each
/// piece is (format 3), else from whole shards, each read once.
struct Reader<'a> {
    dir: &'a Storage,
    manifest: &'a Manifest,
    path: &'a str,
    shards: HashMap<usize, Vec<u8>>,
}

impl Reader<'_> {
    fn corrupt(&self, message: String) -> CheckpointError {
        CheckpointError::Corrupt { path: self.path.to_string(), message }
    }

    /// The bytes of piece `p` of tensor entry `e`, verified.
    async fn piece(&mut self, e: &TensorEntry, p: &Piece) -> Result<Vec<u8>, CheckpointError> {
        let len = (p.end - p.start) * e.dtype.size();
        let file = &self.manifest.shards[p.shard].file;
        if let (Some(offset), Some(want)) = (p.offset, &p.crc32c) {
            let bytes = match self.dir.get_range(file, offset..offset + len as u64).await {
                Ok(b) => b,
                Err(err) => return Err(self.corrupt(format!("shard {file}: {err}"))),
            };
            let got = super::crc(&bytes);
            if bytes.len() != len || got != *want {
                return Err(self.corrupt(format!(
                    "piece {}..{} of {} in shard {file} has checksum {got} and {} bytes, manifest says {want} and {len}",
                    p.start,
                    p.end,
                    e.name,
                    bytes.len()
                )));
            }
            return Ok(bytes);
        }
        let path = self.path.to_string();
        let corrupt = |message: String| CheckpointError::Corrupt { path: path.clone(), message };
        let file = file.clone();
        let shard = self.whole_shard(p.shard).await?;
        let parsed = SafeTensors::deserialize(shard).map_err(|err| corrupt(format!("shard {file}: {err}")))?;
        let view = parsed.tensor(&e.name).map_err(|_| corrupt(format!("shard {file} lacks {}", e.name)))?;
        if view.data().len() != len {
            return Err(corrupt(format!("piece of {} in shard {file} has the wrong size", e.name)));
        }
        Ok(view.data().to_vec())
    }

    /// A whole shard, read once and checked against its entry.
    async fn whole_shard(&mut self, shard: usize) -> Result<&[u8], CheckpointError> {
        if !self.shards.contains_key(&shard) {
            let s = &self.manifest.shards[shard];
            let bytes = match self.dir.get(&s.file).await {
                Ok(b) => b,
                Err(err) => return Err(self.corrupt(format!("shard {}: {err}", s.file))),
            };
            let sum = super::crc(&bytes);
            if sum != s.crc32c || bytes.len() as u64 != s.bytes {
                return Err(self.corrupt(format!(
                    "shard {} has checksum {sum} and {} bytes, manifest says {} and {}",
                    s.file,
                    bytes.len(),
                    s.crc32c,
                    s.bytes
                )));
            }
            self.shards.insert(shard, bytes);
        }
        Ok(&self.shards[&shard])
    }
}
