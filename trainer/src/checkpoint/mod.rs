//! Sharded checkpoints. Step `s` of a job is the folder `step-<s>/` holding
//! one safetensors shard per rank and `manifest.json`, written last. Every
//! logical tensor (parameters, AdamW moments) is cut into contiguous flat
//! ranges (pieces) held by the ranks, and the manifest says which piece
//! lives in which shard, at which byte offset, with what element type and
//! CRC-32C. A rank that loads reads only the pieces it needs, so a
//! checkpoint loads under any layout and world size without any rank
//! assembling the whole state; a piece whose checksum does not match marks
//! the checkpoint as torn.
//!
//! Format 3 (written now) records each tensor's dtype and each piece's
//! offset and checksum. Format 2 (written by the release before) has one
//! checksum per shard and f32 tensors; it still loads, by reading the
//! shards that hold wanted pieces whole.

mod read;
mod write;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use read::{load, load_pieces, Loaded, Request};
pub use write::{
    encode_weights, manifest, shard_pieces, write_final, write_held, ManifestHead, WrittenPiece, WrittenShard,
};

use crate::storage::{Storage, StorageError};

pub const MANIFEST: &str = "manifest.json";
pub const FORMAT: &str = "flotilla-checkpoint/3";
/// The format of the release before, which still loads.
pub const FORMAT_2: &str = "flotilla-checkpoint/2";
/// The state groups of a checkpoint, the prefix of their tensors' names.
pub const GROUPS: [&str; 3] = ["param", "adam.m", "adam.v"];

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("checkpoint {path} is torn or corrupt: {message}")]
    Corrupt { path: String, message: String },
    #[error("checkpoint {path} does not fit this job: {message}")]
    Mismatch { path: String, message: String },
    #[error("encode a checkpoint shard: {0}")]
    Encode(String),
}

/// Element types of stored tensors, named as safetensors names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dtype {
    /// Format 2 wrote "f32".
    #[serde(rename = "F32", alias = "f32")]
    F32,
    #[serde(rename = "BF16", alias = "bf16")]
    BF16,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::BF16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::BF16 => "BF16",
        }
    }

    /// Little-endian bytes of this type as f32s, appended to `out`.
    pub fn extend_f32(self, bytes: &[u8], out: &mut Vec<f32>) {
        match self {
            Dtype::F32 => out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
            Dtype::BF16 => out.extend(
                bytes.chunks_exact(2).map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)),
            ),
        }
    }
}

/// Names, shapes and flat offsets of the model's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub names: Vec<String>,
    pub shapes: Vec<Vec<usize>>,
    pub offsets: Vec<usize>,
    pub total: usize,
}

impl Layout {
    pub fn new(entries: Vec<(String, Vec<usize>)>) -> Layout {
        let mut offsets = Vec::with_capacity(entries.len());
        let mut total = 0;
        for (_, shape) in &entries {
            offsets.push(total);
            total += shape.iter().product::<usize>();
        }
        let (names, shapes) = entries.into_iter().unzip();
        Layout { names, shapes, offsets, total }
    }

    pub fn numel(&self, i: usize) -> usize {
        self.shapes[i].iter().product()
    }
}

/// The flat range of a tensor of `len` elements that rank `rank` of `world` stores.
pub fn shard_range(len: usize, rank: usize, world: usize) -> (usize, usize) {
    (len * rank / world, len * (rank + 1) / world)
}

/// Elements `start..end` of a logical tensor, in shard `shard`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Piece {
    pub shard: usize,
    pub start: usize,
    pub end: usize,
    /// Byte offset of the piece's data in the shard file (format 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// CRC-32C of the piece's bytes, as 8 hex digits (format 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32c: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: Dtype,
    pub pieces: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub file: String,
    /// CRC-32C of the whole shard file, as 8 hex digits.
    pub crc32c: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplerState {
    /// Global index of the next sample to use.
    pub position: u64,
    pub seed: u64,
    pub global_batch: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub job: String,
    pub step: u64,
    pub generation: u64,
    pub world_size: usize,
    pub sampler: SamplerState,
    /// Seed of the torch generator the weights were drawn from (training
    /// itself draws no random numbers).
    pub torch_seed: u64,
    pub optimizer: String,
    pub optimizer_step: u64,
    pub tensors: Vec<TensorEntry>,
    pub shards: Vec<ShardEntry>,
}

/// Elements of one type, as their little-endian bytes: one group of a
/// snapshot in host memory.
#[derive(Debug, Clone, PartialEq)]
pub struct HostArray {
    pub dtype: Dtype,
    pub bytes: Vec<u8>,
}

impl HostArray {
    pub fn new(dtype: Dtype) -> HostArray {
        HostArray { dtype, bytes: Vec::new() }
    }

    pub fn from_f32(values: &[f32]) -> HostArray {
        HostArray { dtype: Dtype::F32, bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }

    /// Elements (not bytes).
    pub fn len(&self) -> usize {
        self.bytes.len() / self.dtype.size()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.len());
        self.dtype.extend_f32(&self.bytes, &mut out);
        out
    }

    /// Bytes of elements `start..end`.
    pub fn elements(&self, start: usize, end: usize) -> &[u8] {
        let s = self.dtype.size();
        &self.bytes[start * s..end * s]
    }
}

/// The pieces of the state a rank holds, in host memory: each group holds
/// the pieces [`Held`] lists, back to back.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub step: u64,
    pub optimizer_step: u64,
    pub params: HostArray,
    pub m: HostArray,
    pub v: HostArray,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            step: 0,
            optimizer_step: 0,
            params: HostArray::new(Dtype::F32),
            m: HostArray::new(Dtype::F32),
            v: HostArray::new(Dtype::F32),
        }
    }
}

impl Snapshot {
    pub fn group(&self, g: usize) -> &HostArray {
        [&self.params, &self.m, &self.v][g]
    }
}

/// One contiguous piece of a logical tensor that a rank holds and writes:
/// elements `start..end` of tensor `tensor` (its index in the layout),
/// found at element `local` in each of the rank's snapshot arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub tensor: usize,
    pub start: usize,
    pub end: usize,
    pub local: usize,
}

/// What rank `rank` of `world` writes when every rank has the whole flat
/// state: an even share of every tensor.
pub fn even_holding(layout: &Layout, rank: usize, world: usize) -> Vec<Held> {
    (0..layout.names.len())
        .filter_map(|i| {
            let (a, b) = shard_range(layout.numel(i), rank, world);
            (a < b).then(|| Held { tensor: i, start: a, end: b, local: layout.offsets[i] + a })
        })
        .collect()
}

/// The folder name of step `step`'s checkpoint.
pub fn step_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The step of a `step-<s>` folder name.
pub fn parse_step_dir(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

/// Writes the manifest: the last file of a checkpoint.
pub async fn write_manifest(dir: &Storage, m: &Manifest) -> Result<(), CheckpointError> {
    let json = serde_json::to_vec_pretty(m).expect("manifest serializes");
    dir.put(MANIFEST, json).await?;
    Ok(())
}

/// Reads a manifest of a format this release loads.
pub fn decode_manifest(bytes: &[u8], path: &str) -> Result<Manifest, CheckpointError> {
    let m: Manifest = serde_json::from_slice(bytes).map_err(|e| CheckpointError::Corrupt {
        path: path.to_string(),
        message: format!("manifest is not valid: {e}"),
    })?;
    if m.format != FORMAT && m.format != FORMAT_2 {
        return Err(CheckpointError::Mismatch {
            path: path.to_string(),
            message: format!("format {:?}, expected {FORMAT:?} or {FORMAT_2:?}", m.format),
        });
    }
    Ok(m)
}

/// The metric history file of a checkpoint and of the final model.
pub const HISTORY: &str = "metrics.jsonl";

/// Writes `history` as `metrics.jsonl` in `dir`.
pub async fn write_history(dir: &Storage, history: &[flotilla_registry::MetricRecord]) -> Result<(), CheckpointError> {
    dir.put(HISTORY, flotilla_registry::record::to_jsonl(history).into_bytes()).await?;
    Ok(())
}

/// The metric history saved in the checkpoint at `location`, up to `step`.
/// A missing or unreadable history is not worth failing a resume for: the
/// steps before it are then missing from the job's history, with a warning.
pub async fn read_history(location: &str, step: u64) -> Vec<flotilla_registry::MetricRecord> {
    let text = match Storage::open(location) {
        Ok(dir) => dir.get(HISTORY).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let records = text.and_then(|b| flotilla_registry::record::from_jsonl(&String::from_utf8_lossy(&b)));
    match records {
        Ok(mut r) => {
            r.retain(|m| m.step <= step);
            r
        }
        Err(e) => {
            tracing::warn!(checkpoint = location, error = %e, "no metric history in the checkpoint; it starts here");
            Vec::new()
        }
    }
}

/// SHA-256 of bytes, as hex.
pub fn digest(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Records each rank's parameter digest at the end of training in
/// `final/replicas.json`.
pub async fn write_replica_digests(out: &Storage, digests: &[String]) -> Result<(), CheckpointError> {
    let json = serde_json::to_vec_pretty(&serde_json::json!({ "param_sha256_by_rank": digests })).expect("json");
    out.child("final").put("replicas.json", json).await?;
    Ok(())
}

/// Removes `step-*` folders under `out` whose step is not in `keep` and is
/// older than the newest kept one. Newer folders may be checkpoints still
/// being written, and are left alone.
pub async fn prune(out: &Storage, keep: &[u64]) -> Result<Vec<u64>, CheckpointError> {
    let mut removed = Vec::new();
    let Some(&newest) = keep.iter().max() else { return Ok(removed) };
    for name in out.folders().await? {
        if let Some(step) = parse_step_dir(&name) {
            if step < newest && !keep.contains(&step) {
                out.delete_folder(&name).await?;
                removed.push(step);
            }
        }
    }
    removed.sort();
    Ok(removed)
}

pub(crate) fn crc(bytes: &[u8]) -> String {
    format!("{:08x}", crc32c::crc32c(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests;
