//! Sharded checkpoints. Step `s` of a job is the folder `step-<s>/` holding
//! one safetensors shard per rank and `manifest.json`, written last. Every
//! logical tensor (parameters, AdamW moments) is split into contiguous flat
//! ranges, one per rank, and the manifest says which range lives in which
//! shard, with each shard's CRC-32C. Loading assembles the logical tensors
//! from the ranges, so a checkpoint loads under any world size, and a shard
//! whose checksum does not match marks the checkpoint as torn.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::storage::{Storage, StorageError, Upload};

pub const MANIFEST: &str = "manifest.json";
pub const FORMAT: &str = "flotilla-checkpoint/2";
const GROUPS: [&str; 3] = ["param", "adam.m", "adam.v"];

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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Piece {
    pub shard: usize,
    pub start: usize,
    pub end: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
    pub pieces: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub file: String,
    /// CRC-32C of the shard file (hardware-accelerated: checking it costs
    /// little next to the I/O), as 8 hex digits.
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

/// Parameters and optimizer state, flat, in layout order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub step: u64,
    pub params: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub optimizer_step: u64,
}

impl Snapshot {
    /// Copies the live state into this snapshot, reusing its buffers. This
    /// is the part of a checkpoint that training waits for, so the copy runs
    /// on two threads: the train thread and one more, each taking half of
    /// every array (memory bandwidth, not arithmetic, is the limit).
    pub fn fill(&mut self, step: u64, optimizer_step: u64, params: &[f32], m: &[f32], v: &[f32]) {
        self.fill_on(step, optimizer_step, params, m, v, true)
    }

    fn fill_on(&mut self, step: u64, optimizer_step: u64, params: &[f32], m: &[f32], v: &[f32], two_threads: bool) {
        self.step = step;
        self.optimizer_step = optimizer_step;
        let mut halves: [Vec<(&mut [f32], &[f32])>; 2] = [Vec::new(), Vec::new()];
        for (dst, src) in [(&mut self.params, params), (&mut self.m, m), (&mut self.v, v)] {
            dst.resize(src.len(), 0.0);
            let mid = src.len() / 2;
            let (d0, d1) = dst.split_at_mut(mid);
            let (s0, s1) = src.split_at(mid);
            halves[0].push((d0, s0));
            halves[1].push((d1, s1));
        }
        let [mine, theirs] = halves;
        let copy = |pairs: Vec<(&mut [f32], &[f32])>| pairs.into_iter().for_each(|(d, s)| d.copy_from_slice(s));
        if !two_threads || params.len() < 1 << 16 {
            // Small states: a thread costs more than it saves.
            copy(mine);
            copy(theirs);
            return;
        }
        std::thread::scope(|scope| {
            scope.spawn(|| copy(theirs));
            copy(mine);
        });
    }
}

/// A copy of the state into a snapshot that runs on its own thread while
/// training goes on, for as long as training only reads the state (the
/// next step's forward and backward passes); [`BackgroundCopy::finish`]
/// waits for it before anything writes to the state again.
pub struct BackgroundCopy {
    handle: Option<std::thread::JoinHandle<Snapshot>>,
    started: std::time::Instant,
    spawn: std::time::Duration,
}

/// The state's memory, lent to the copying thread.
struct Lent(*const f32, usize);
// SAFETY: the memory is only read, and `BackgroundCopy`'s contract keeps it
// alive and unwritten until the copying thread has been joined.
unsafe impl Send for Lent {}

impl BackgroundCopy {
    /// Starts copying `params`, `m` and `v` into `snap`.
    ///
    /// # Safety
    /// Until [`BackgroundCopy::finish`] returns or the value is dropped (both
    /// join the copying thread), nothing may write to or free the memory of
    /// `params`, `m` and `v`.
    pub unsafe fn start(
        mut snap: Snapshot,
        step: u64,
        optimizer_step: u64,
        params: &[f32],
        m: &[f32],
        v: &[f32],
    ) -> BackgroundCopy {
        let started = std::time::Instant::now();
        let lent = [params, m, v].map(|s| Lent(s.as_ptr(), s.len()));
        let handle = std::thread::Builder::new()
            .name("checkpoint-copy".into())
            .spawn(move || {
                let lent = lent;
                // SAFETY: see `start`'s contract.
                let [p, m, v] = lent.each_ref().map(|l| unsafe { std::slice::from_raw_parts(l.0, l.1) });
                // One thread: the other core is training.
                snap.fill_on(step, optimizer_step, p, m, v, false);
                snap
            })
            .expect("spawn the checkpoint copy thread");
        BackgroundCopy { handle: Some(handle), started, spawn: started.elapsed() }
    }

    /// Waits for the copy. Returns the snapshot, when the copy started, and
    /// how long training waited for it (starting it and this wait).
    pub fn finish(mut self) -> (Snapshot, std::time::Instant, std::time::Duration) {
        let t = std::time::Instant::now();
        let snap = self.handle.take().expect("joined once").join().expect("the checkpoint copy thread panicked");
        (snap, self.started, self.spawn + t.elapsed())
    }
}

impl Drop for BackgroundCopy {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The folder name of step `step`'s checkpoint.
pub fn step_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The step of a `step-<s>` folder name.
pub fn parse_step_dir(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

fn shard_file(rank: usize) -> String {
    format!("rank-{rank:05}.safetensors")
}

fn group_slice<'a>(s: &'a Snapshot, g: usize) -> &'a [f32] {
    [&s.params, &s.m, &s.v][g]
}

/// The little-endian bytes of `v`, borrowed: safetensors stores f32 little
/// endian, which is the memory layout on every target flotilla builds for.
fn as_bytes(v: &[f32]) -> &[u8] {
    const { assert!(cfg!(target_endian = "little"), "checkpoints assume a little-endian target") };
    // SAFETY: f32 has no padding and any byte pattern is a valid u8; the
    // slice covers exactly the floats' memory and lives as long as `v`.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// One tensor piece of a shard: `GROUPS[group]`'s floats `start..end` of
/// the flat state.
#[derive(Debug, Clone, Copy)]
struct Span {
    group: usize,
    start: usize,
    end: usize,
}

/// One contiguous piece of a logical tensor that a rank holds and writes:
/// elements `start..end` of tensor `tensor` (its index in the layout),
/// found at `local` in the rank's snapshot arrays (the same place in each
/// of the parameters and the two moments).
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

/// A shard's layout: the safetensors header (length prefix and JSON,
/// padded to 8 bytes) and the spans of the snapshot that follow it in file
/// order. Nothing is copied: the spans are written straight from the
/// snapshot's memory.
fn shard_plan(layout: &Layout, held: &[Held]) -> (Vec<u8>, Vec<Span>) {
    let mut json = String::from("{");
    let mut spans = Vec::new();
    let mut offset = 0usize;
    for (g, group) in GROUPS.iter().enumerate() {
        for h in held {
            let bytes = (h.end - h.start) * 4;
            if !spans.is_empty() {
                json.push(',');
            }
            let name = &layout.names[h.tensor];
            let key = serde_json::to_string(&format!("{group}/{name}")).expect("a string serializes");
            json.push_str(&format!(
                r#"{key}:{{"dtype":"F32","shape":[{}],"data_offsets":[{offset},{}]}}"#,
                h.end - h.start,
                offset + bytes
            ));
            offset += bytes;
            spans.push(Span { group: g, start: h.local, end: h.local + h.end - h.start });
        }
    }
    json.push('}');
    while (8 + json.len()) % 8 != 0 {
        json.push(' ');
    }
    let mut header = (json.len() as u64).to_le_bytes().to_vec();
    header.extend_from_slice(json.as_bytes());
    (header, spans)
}

/// A span of a shared snapshot, handed to the storage layer without a copy.
struct SnapshotBytes {
    snap: Arc<Snapshot>,
    span: Span,
}

impl AsRef<[u8]> for SnapshotBytes {
    fn as_ref(&self) -> &[u8] {
        as_bytes(&group_slice(&self.snap, self.span.group)[self.span.start..self.span.end])
    }
}

/// Rank `rank`'s shard of `snap` as the pieces of one safetensors file
/// (borrowing the snapshot's memory), and its entry with the CRC-32C of the
/// whole file.
pub fn shard_pieces(layout: &Layout, snap: &Arc<Snapshot>, rank: usize, held: &[Held]) -> (Vec<Bytes>, ShardEntry) {
    let (header, spans) = shard_plan(layout, held);
    let mut crc = crc32c::crc32c(&header);
    let mut len = header.len();
    let mut pieces = vec![Bytes::from(header)];
    for span in spans {
        let piece = SnapshotBytes { snap: snap.clone(), span };
        crc = crc32c::crc32c_append(crc, piece.as_ref());
        len += piece.as_ref().len();
        pieces.push(Bytes::from_owner(piece));
    }
    let entry = ShardEntry { file: shard_file(rank), crc32c: format!("{crc:08x}"), bytes: len as u64 };
    (pieces, entry)
}

/// Rank `rank`'s shard of `snap`: the safetensors bytes and their entry.
pub fn encode_shard(layout: &Layout, snap: &Arc<Snapshot>, rank: usize, world: usize) -> (Vec<u8>, ShardEntry) {
    let (pieces, entry) = shard_pieces(layout, snap, rank, &even_holding(layout, rank, world));
    (pieces.concat(), entry)
}

/// Uploads rank `rank`'s shard of `snap` (an even share of the whole
/// state) into the checkpoint folder `dir`, straight from the snapshot's memory.
pub async fn write_shard(
    dir: &Storage,
    layout: &Layout,
    snap: &Arc<Snapshot>,
    rank: usize,
    world: usize,
) -> Result<(ShardEntry, Upload), CheckpointError> {
    write_held(dir, layout, snap, rank, even_holding(layout, rank, world)).await
}

/// Uploads rank `rank`'s shard of `snap`: the pieces `held` says it holds.
pub async fn write_held(
    dir: &Storage,
    layout: &Layout,
    snap: &Arc<Snapshot>,
    rank: usize,
    held: Vec<Held>,
) -> Result<(ShardEntry, Upload), CheckpointError> {
    let (layout, snap2) = (layout.clone(), snap.clone());
    let (pieces, entry) = tokio::task::spawn_blocking(move || shard_pieces(&layout, &snap2, rank, &held))
        .await
        .map_err(|e| CheckpointError::Encode(e.to_string()))?;
    let upload = dir.put_pieces(&entry.file, pieces).await?;
    Ok((entry, upload))
}

/// The manifest of a checkpoint whose shards are `shards` (index = rank),
/// each an even share of the whole state.
pub fn manifest(
    job: &str,
    generation: u64,
    layout: &Layout,
    snap: &Snapshot,
    sampler: SamplerState,
    torch_seed: u64,
    shards: Vec<ShardEntry>,
) -> Manifest {
    let world = shards.len();
    let holdings: Vec<Vec<Held>> = (0..world).map(|r| even_holding(layout, r, world)).collect();
    manifest_held(job, generation, layout, snap, sampler, torch_seed, shards, &holdings)
}

/// The manifest of a checkpoint whose shard `r` holds `holdings[r]`.
#[allow(clippy::too_many_arguments)]
pub fn manifest_held(
    job: &str,
    generation: u64,
    layout: &Layout,
    snap: &Snapshot,
    sampler: SamplerState,
    torch_seed: u64,
    shards: Vec<ShardEntry>,
    holdings: &[Vec<Held>],
) -> Manifest {
    let mut tensors = Vec::new();
    for group in GROUPS {
        for (i, name) in layout.names.iter().enumerate() {
            let pieces = holdings
                .iter()
                .enumerate()
                .flat_map(|(r, held)| {
                    held.iter().filter(|h| h.tensor == i).map(move |h| Piece { shard: r, start: h.start, end: h.end })
                })
                .collect();
            tensors.push(TensorEntry {
                name: format!("{group}/{name}"),
                shape: layout.shapes[i].clone(),
                dtype: "f32".into(),
                pieces,
            });
        }
    }
    Manifest {
        format: FORMAT.into(),
        job: job.into(),
        step: snap.step,
        generation,
        world_size: shards.len(),
        sampler,
        torch_seed,
        optimizer: "adamw".into(),
        optimizer_step: snap.optimizer_step,
        tensors,
        shards,
    }
}

/// Writes the manifest: the last file of a checkpoint.
pub async fn write_manifest(dir: &Storage, m: &Manifest) -> Result<(), CheckpointError> {
    let json = serde_json::to_vec_pretty(m).expect("manifest serializes");
    dir.put(MANIFEST, json).await?;
    Ok(())
}

pub fn decode_manifest(bytes: &[u8], path: &str) -> Result<Manifest, CheckpointError> {
    let m: Manifest = serde_json::from_slice(bytes).map_err(|e| CheckpointError::Corrupt {
        path: path.to_string(),
        message: format!("manifest is not valid: {e}"),
    })?;
    if m.format != FORMAT {
        return Err(CheckpointError::Mismatch {
            path: path.to_string(),
            message: format!("format {:?}, expected {FORMAT:?}", m.format),
        });
    }
    Ok(m)
}

/// Loads a checkpoint for a model of `layout`, verifying every shard's
/// checksum and that the pieces cover every tensor exactly once.
pub async fn load(dir: &Storage, layout: &Layout) -> Result<(Manifest, Snapshot), CheckpointError> {
    let m = decode_manifest(&dir.get(MANIFEST).await?, dir.url())?;
    let mut shards = Vec::with_capacity(m.shards.len());
    for s in &m.shards {
        match dir.get(&s.file).await {
            Ok(b) => shards.push(b),
            Err(e) => {
                return Err(CheckpointError::Corrupt {
                    path: dir.url().to_string(),
                    message: format!("shard {}: {e}", s.file),
                })
            }
        }
    }
    let snap = assemble(&m, &shards, layout, dir.url())?;
    Ok((m, snap))
}

/// Assembles the logical tensors from the shards' bytes (index = rank),
/// after checking each shard against the manifest.
pub fn assemble(m: &Manifest, shards: &[Vec<u8>], layout: &Layout, path: &str) -> Result<Snapshot, CheckpointError> {
    let path = path.to_string();
    let corrupt = |message: String| CheckpointError::Corrupt { path: path.clone(), message };
    if shards.len() != m.shards.len() {
        return Err(corrupt(format!("{} shards for {} entries", shards.len(), m.shards.len())));
    }
    for (bytes, s) in shards.iter().zip(&m.shards) {
        let sum = crc(bytes);
        if sum != s.crc32c || bytes.len() as u64 != s.bytes {
            return Err(corrupt(format!(
                "shard {} has checksum {sum} and {} bytes, manifest says {} and {}",
                s.file,
                bytes.len(),
                s.crc32c,
                s.bytes
            )));
        }
    }
    let parsed: Vec<SafeTensors<'_>> = shards
        .iter()
        .zip(&m.shards)
        .map(|(b, s)| SafeTensors::deserialize(b).map_err(|e| corrupt(format!("shard {}: {e}", s.file))))
        .collect::<Result<_, _>>()?;
    let entries: BTreeMap<&str, &TensorEntry> = m.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut groups = vec![vec![0f32; layout.total]; GROUPS.len()];
    for (g, group) in GROUPS.iter().enumerate() {
        for (i, name) in layout.names.iter().enumerate() {
            let logical = format!("{group}/{name}");
            let e = entries.get(logical.as_str()).ok_or_else(|| CheckpointError::Mismatch {
                path: path.clone(),
                message: format!("has no tensor {logical}"),
            })?;
            if e.shape != layout.shapes[i] {
                return Err(CheckpointError::Mismatch {
                    path: path.clone(),
                    message: format!("{logical} has shape {:?}, the model has {:?}", e.shape, layout.shapes[i]),
                });
            }
            let numel = layout.numel(i);
            let dst = &mut groups[g][layout.offsets[i]..layout.offsets[i] + numel];
            let mut covered = 0;
            let mut pieces = e.pieces.clone();
            pieces.sort_by_key(|p| p.start);
            for p in &pieces {
                if p.start != covered || p.end > numel || p.shard >= parsed.len() {
                    return Err(corrupt(format!("pieces of {logical} do not tile it")));
                }
                let view = parsed[p.shard]
                    .tensor(&logical)
                    .map_err(|_| corrupt(format!("shard {} lacks {logical}", p.shard)))?;
                let data = view.data();
                if data.len() != (p.end - p.start) * 4 {
                    return Err(corrupt(format!("piece of {logical} in shard {} has the wrong size", p.shard)));
                }
                for (d, c) in dst[p.start..p.end].iter_mut().zip(data.chunks_exact(4)) {
                    *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
                covered = p.end;
            }
            if covered != numel {
                return Err(corrupt(format!("pieces of {logical} cover {covered} of {numel} elements")));
            }
        }
    }
    let v = groups.pop().expect("three groups");
    let mom = groups.pop().expect("three groups");
    let params = groups.pop().expect("three groups");
    Ok(Snapshot { step: m.step, params, m: mom, v, optimizer_step: m.optimizer_step })
}

/// `params` (flat, in `layout` order) as a safetensors file with one
/// full-shape f32 tensor per parameter, by name.
pub fn encode_weights(layout: &Layout, params: &[f32]) -> Vec<u8> {
    let buffers: Vec<(String, &[u8], Vec<usize>)> = layout
        .names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let off = layout.offsets[i];
            (n.clone(), as_bytes(&params[off..off + layout.numel(i)]), layout.shapes[i].clone())
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = buffers
        .iter()
        .map(|(n, b, s)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).expect("sizes agree")))
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

/// SHA-256 of a flat f32 buffer's little-endian bytes.
pub fn digest(values: &[f32]) -> String {
    hex(&Sha256::digest(as_bytes(values)))
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

fn crc(bytes: &[u8]) -> String {
    format!("{:08x}", crc32c::crc32c(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::new(vec![("a".into(), vec![3, 2]), ("b".into(), vec![5]), ("c".into(), vec![1])])
    }

    fn snap(l: &Layout) -> Snapshot {
        let f = |k: f32| (0..l.total).map(|i| i as f32 * k + 0.5).collect::<Vec<_>>();
        Snapshot { step: 7, params: f(1.0), m: f(-2.0), v: f(3.0), optimizer_step: 7 }
    }

    fn storage(dir: &std::path::Path) -> Storage {
        Storage::open(dir.to_str().unwrap()).unwrap()
    }

    async fn save(dir: &Storage, l: &Layout, s: &Snapshot, world: usize) {
        let mut shards = Vec::new();
        let shared = Arc::new(s.clone());
        for r in 0..world {
            shards.push(write_shard(dir, l, &shared, r, world).await.unwrap().0);
        }
        let sampler = SamplerState { position: 70, seed: 1, global_batch: 10 };
        write_manifest(dir, &manifest("j-1", 2, l, s, sampler, 0, shards)).await.unwrap();
    }

    #[test]
    fn fill_copies_the_state_into_reused_buffers() {
        for n in [5usize, 1 << 17] {
            let f = |k: f32| (0..n).map(|i| i as f32 * k).collect::<Vec<f32>>();
            let (p, m, v) = (f(1.0), f(2.0), f(3.0));
            let mut snap = Snapshot { params: vec![9.0; n + 3], ..Default::default() };
            snap.fill(4, 3, &p, &m, &v);
            assert_eq!((snap.step, snap.optimizer_step), (4, 3));
            assert_eq!((snap.params == p, snap.m == m, snap.v == v), (true, true, true), "n = {n}");
            let before = snap.params.as_ptr();
            snap.fill(5, 4, &v, &p, &m);
            assert_eq!(snap.params.as_ptr(), before, "the buffers are reused");
            assert_eq!((snap.params == v, snap.m == p, snap.v == m), (true, true, true), "n = {n}");
        }
    }

    #[tokio::test]
    async fn round_trips_for_every_world_size() {
        let l = layout();
        let s = snap(&l);
        for world in 1..=8 {
            let tmp = tempfile::tempdir().unwrap();
            let dir = storage(tmp.path());
            save(&dir, &l, &s, world).await;
            let (m, back) = load(&dir, &l).await.unwrap();
            assert_eq!(back, s, "world {world}");
            assert_eq!(m.world_size, world);
            assert_eq!(m.sampler.position, 70);
        }
    }

    /// Ranks that hold uneven pieces in compact buffers (a pipeline stage's
    /// tensors, a ZeRO partition cutting through a tensor) write a
    /// checkpoint that loads back whole; pieces that leave a gap are torn.
    #[tokio::test]
    async fn uneven_holdings_round_trip_and_a_gap_is_torn() {
        let l = layout();
        let whole = snap(&l);
        // Rank 0: all of `a` and the first 2 elements of `b`; rank 1: the
        // rest of `b` and `c`. Each keeps only its pieces, back to back.
        let holdings = [
            vec![Held { tensor: 0, start: 0, end: 6, local: 0 }, Held { tensor: 1, start: 0, end: 2, local: 6 }],
            vec![Held { tensor: 1, start: 2, end: 5, local: 0 }, Held { tensor: 2, start: 0, end: 1, local: 3 }],
        ];
        let compact = |h: &[Held]| {
            let take = |v: &[f32]| -> Vec<f32> {
                h.iter().flat_map(|p| v[l.offsets[p.tensor] + p.start..l.offsets[p.tensor] + p.end].to_vec()).collect()
            };
            Snapshot { step: 7, params: take(&whole.params), m: take(&whole.m), v: take(&whole.v), optimizer_step: 7 }
        };
        let sampler = SamplerState { position: 70, seed: 1, global_batch: 10 };
        for (gap, expect_ok) in [(false, true), (true, false)] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = storage(tmp.path());
            let mut shards = Vec::new();
            for (r, h) in holdings.iter().enumerate() {
                let snap = Arc::new(compact(h));
                shards.push(write_held(&dir, &l, &snap, r, h.clone()).await.unwrap().0);
            }
            let mut listed = holdings.to_vec();
            if gap {
                listed[1].remove(0);
            }
            let m = manifest_held("j-1", 2, &l, &whole, sampler.clone(), 0, shards, &listed);
            write_manifest(&dir, &m).await.unwrap();
            match load(&dir, &l).await {
                Ok((_, back)) => {
                    assert!(expect_ok, "a gap must not load");
                    assert_eq!(back, whole);
                }
                Err(e) => {
                    assert!(!expect_ok, "{e}");
                    assert!(e.to_string().contains("pieces of param/b cover 2 of 5"), "{e}");
                }
            }
        }
    }

    #[tokio::test]
    async fn a_changed_shard_is_detected_as_torn() {
        let l = layout();
        let tmp = tempfile::tempdir().unwrap();
        let dir = storage(tmp.path());
        save(&dir, &l, &snap(&l), 2).await;
        let shard = tmp.path().join("rank-00001.safetensors");
        let mut bytes = std::fs::read(&shard).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&shard, bytes).unwrap();
        let err = load(&dir, &l).await.unwrap_err();
        assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");
        std::fs::remove_file(&shard).unwrap();
        assert!(matches!(load(&dir, &l).await.unwrap_err(), CheckpointError::Corrupt { .. }));
    }

    #[tokio::test]
    async fn a_folder_without_manifest_is_not_a_checkpoint_and_shapes_must_match() {
        let l = layout();
        let tmp = tempfile::tempdir().unwrap();
        let dir = storage(tmp.path());
        write_shard(&dir, &l, &Arc::new(snap(&l)), 0, 1).await.unwrap();
        let err = load(&dir, &l).await.unwrap_err();
        assert!(matches!(&err, CheckpointError::Storage(e) if e.is_not_found()), "{err}");
        save(&dir, &l, &snap(&l), 1).await;
        let other = Layout::new(vec![("a".into(), vec![2, 3]), ("b".into(), vec![5]), ("c".into(), vec![1])]);
        assert!(matches!(load(&dir, &other).await.unwrap_err(), CheckpointError::Mismatch { .. }));
    }

    #[tokio::test]
    async fn prune_regression_never_removes_a_checkpoint_newer_than_the_last_commit() {
        let tmp = tempfile::tempdir().unwrap();
        let out = storage(tmp.path());
        for s in [10, 20, 30, 40] {
            out.child(&step_name(s)).put("manifest.json", b"{}".to_vec()).await.unwrap();
        }
        out.child("final").put("model.safetensors", vec![0]).await.unwrap();
        assert_eq!(prune(&out, &[20, 30]).await.unwrap(), vec![10]);
        assert!(tmp.path().join("final").exists());
        assert!(!tmp.path().join(step_name(10)).exists());
        assert!(tmp.path().join(step_name(30)).exists());
        assert!(tmp.path().join(step_name(40)).exists(), "a newer checkpoint may still be in flight");
    }
}
