//! Writing: a rank's shard (the pieces it holds, as one safetensors file
//! written straight from its snapshot's memory), the manifest that rank 0
//! makes of every rank's shard, and the final model.

use std::sync::Arc;

use bytes::Bytes;
use safetensors::tensor::TensorView;
use serde::{Deserialize, Serialize};

use super::{
    CheckpointError, Dtype, Held, Layout, Manifest, Piece, SamplerState, ShardEntry, Snapshot, TensorEntry, FORMAT,
    GROUPS,
};
use crate::storage::{Storage, Upload};

/// Where one piece of a shard went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WrittenPiece {
    pub group: usize,
    pub tensor: usize,
    pub start: usize,
    pub end: usize,
    pub dtype: Dtype,
    /// Byte offset in the shard file.
    pub offset: u64,
    pub crc32c: String,
}

/// A shard as written: its entry in the manifest and its pieces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WrittenShard {
    pub entry: ShardEntry,
    pub pieces: Vec<WrittenPiece>,
}

fn shard_file(rank: usize) -> String {
    format!("rank-{rank:05}.safetensors")
}

/// One span of a snapshot group, handed to the storage layer without a copy.
struct SnapshotBytes {
    snap: Arc<Snapshot>,
    group: usize,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for SnapshotBytes {
    fn as_ref(&self) -> &[u8] {
        self.snap.group(self.group).elements(self.start, self.end)
    }
}

/// Rank `rank`'s shard of `snap`: the safetensors header (length prefix and
/// JSON, padded to 8 bytes) and the pieces `held` names, in file order,
/// borrowing the snapshot's memory; and where each piece went, with its
/// checksum and the whole file's.
pub fn shard_pieces(layout: &Layout, snap: &Arc<Snapshot>, rank: usize, held: &[Held]) -> (Vec<Bytes>, WrittenShard) {
    let mut json = String::from("{");
    let mut spans = Vec::new();
    let mut offset = 0usize;
    for (g, group) in GROUPS.iter().enumerate() {
        let dtype = snap.group(g).dtype;
        for h in held {
            let bytes = (h.end - h.start) * dtype.size();
            if !spans.is_empty() {
                json.push(',');
            }
            let key =
                serde_json::to_string(&format!("{group}/{}", layout.names[h.tensor])).expect("a string serializes");
            json.push_str(&format!(
                r#"{key}:{{"dtype":"{}","shape":[{}],"data_offsets":[{offset},{}]}}"#,
                dtype.name(),
                h.end - h.start,
                offset + bytes
            ));
            offset += bytes;
            spans.push((g, *h));
        }
    }
    json.push('}');
    while (8 + json.len()) % 8 != 0 {
        json.push(' ');
    }
    let mut header = (json.len() as u64).to_le_bytes().to_vec();
    header.extend_from_slice(json.as_bytes());
    let mut crc = crc32c::crc32c(&header);
    let mut at = header.len();
    let mut parts = vec![Bytes::from(header)];
    let mut pieces = Vec::with_capacity(spans.len());
    for (group, h) in spans {
        let part = SnapshotBytes { snap: snap.clone(), group, start: h.local, end: h.local + h.end - h.start };
        let data = part.as_ref();
        crc = crc32c::crc32c_append(crc, data);
        pieces.push(WrittenPiece {
            group,
            tensor: h.tensor,
            start: h.start,
            end: h.end,
            dtype: snap.group(group).dtype,
            offset: at as u64,
            crc32c: super::crc(data),
        });
        at += data.len();
        parts.push(Bytes::from_owner(part));
    }
    let entry = ShardEntry { file: shard_file(rank), crc32c: format!("{crc:08x}"), bytes: at as u64 };
    (parts, WrittenShard { entry, pieces })
}

/// Uploads rank `rank`'s shard of `snap`: the pieces `held` says it holds.
pub async fn write_held(
    dir: &Storage,
    layout: &Layout,
    snap: &Arc<Snapshot>,
    rank: usize,
    held: Vec<Held>,
) -> Result<(WrittenShard, Upload), CheckpointError> {
    let (layout, snap2) = (layout.clone(), snap.clone());
    let (parts, shard) = tokio::task::spawn_blocking(move || shard_pieces(&layout, &snap2, rank, &held))
        .await
        .map_err(|e| CheckpointError::Encode(e.to_string()))?;
    let upload = dir.put_pieces(&shard.entry.file, parts).await?;
    Ok((shard, upload))
}

/// What a manifest says about a checkpoint besides its shards.
#[derive(Debug, Clone)]
pub struct ManifestHead<'a> {
    pub job: &'a str,
    pub generation: u64,
    pub step: u64,
    pub optimizer_step: u64,
    pub sampler: SamplerState,
    pub torch_seed: u64,
    /// The element type of each state group.
    pub dtypes: [Dtype; 3],
}

/// The manifest of a checkpoint whose shard `r` is `shards[r]`.
pub fn manifest(head: ManifestHead<'_>, layout: &Layout, shards: Vec<WrittenShard>) -> Manifest {
    let mut tensors = Vec::new();
    for (g, group) in GROUPS.iter().enumerate() {
        for (i, name) in layout.names.iter().enumerate() {
            let pieces = shards
                .iter()
                .enumerate()
                .flat_map(|(r, s)| {
                    s.pieces.iter().filter(move |p| p.group == g && p.tensor == i).map(move |p| Piece {
                        shard: r,
                        start: p.start,
                        end: p.end,
                        offset: Some(p.offset),
                        crc32c: Some(p.crc32c.clone()),
                    })
                })
                .collect();
            tensors.push(TensorEntry {
                name: format!("{group}/{name}"),
                shape: layout.shapes[i].clone(),
                dtype: head.dtypes[g],
                pieces,
            });
        }
    }
    Manifest {
        format: FORMAT.into(),
        job: head.job.into(),
        step: head.step,
        generation: head.generation,
        world_size: shards.len(),
        sampler: head.sampler,
        torch_seed: head.torch_seed,
        optimizer: "adamw".into(),
        optimizer_step: head.optimizer_step,
        tensors,
        shards: shards.into_iter().map(|s| s.entry).collect(),
    }
}

/// `params` (flat, in `layout` order) as a safetensors file with one
/// full-shape f32 tensor per parameter, by name.
pub fn encode_weights(layout: &Layout, params: &[f32]) -> Vec<u8> {
    let buffers: Vec<(String, Vec<u8>, Vec<usize>)> = layout
        .names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let off = layout.offsets[i];
            let bytes = params[off..off + layout.numel(i)].iter().flat_map(|v| v.to_le_bytes()).collect();
            (n.clone(), bytes, layout.shapes[i].clone())
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = buffers
        .iter()
        .map(|(n, b, s)| (n.clone(), TensorView::new(safetensors::Dtype::F32, s.clone(), b).expect("sizes agree")))
        .collect();
    safetensors::serialize(views, None).expect("f32 views serialize")
}

/// Writes the final weights beside the job spec, under `final/`; returns
/// the model's location.
pub async fn write_final(
    out: &Storage,
    layout: &Layout,
    params: &[f32],
    spec_json: &str,
) -> Result<String, CheckpointError> {
    let dir = out.child("final");
    dir.put("model.safetensors", encode_weights(layout, params)).await?;
    dir.put("job.json", spec_json.as_bytes().to_vec()).await?;
    Ok(format!("{}/model.safetensors", dir.url()))
}
