//! Asynchronous checkpoints. The step that takes a checkpoint only copies
//! the state (see `engine::weights`); the shard is encoded and uploaded on
//! the agent's runtime while training goes on. Ranks learn that every shard
//! is up through the step's control exchange (each says whether its own
//! upload is done), so they all finish the checkpoint at the same step:
//! they exchange what they wrote, and rank 0 writes the manifest and hands
//! the checkpoint over to be committed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::collective::Collectives;
use crate::checkpoint::{self, Held, Layout, ManifestHead, SamplerState, Snapshot, WrittenShard};
use crate::storage::Storage;
use crate::types::{Assignment, TrainError};
use flotilla_registry::MetricRecord;

/// A checkpoint rank 0 wrote the manifest of.
#[derive(Debug, Clone, PartialEq)]
pub struct Saved {
    pub step: u64,
    pub location: String,
    /// How long training stood still for it (copying the state).
    pub blocked: Duration,
    /// From the copy to the manifest.
    pub total: Duration,
}

#[derive(Debug, Serialize, Deserialize)]
enum Outcome {
    Uploaded(WrittenShard),
    Failed(String),
}

struct Pending {
    step: u64,
    optimizer_step: u64,
    dtypes: [checkpoint::Dtype; 3],
    dir: Storage,
    started: Instant,
    blocked: Duration,
    result: Arc<Mutex<Option<Outcome>>>,
}

#[derive(Default)]
pub struct Saver {
    pending: Option<Pending>,
    /// The buffers of the last snapshot, back from its upload: the next
    /// snapshot is copied into them instead of into fresh memory, which
    /// would be paged in while training waits.
    spare: Arc<Mutex<Option<Snapshot>>>,
}

impl Saver {
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Whether this rank's shard of the pending checkpoint is up (or failed).
    pub fn local_done(&self) -> bool {
        self.pending.as_ref().is_some_and(|p| p.result.lock().expect("saver lock").is_some())
    }

    /// A snapshot to copy the state into: the buffers of an earlier one
    /// when its upload is done, else empty ones.
    pub fn buffers(&mut self) -> Snapshot {
        self.spare.lock().expect("saver lock").take().unwrap_or_default()
    }

    /// Starts saving `snap`, copied at `since` and keeping training waiting
    /// for `blocked` in all: this rank's shard (the pieces `held` says the
    /// snapshot holds) is written from the snapshot's memory in the background.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        &mut self,
        a: &Assignment,
        out: &Storage,
        layout: &Layout,
        held: Vec<Held>,
        snap: Snapshot,
        since: Instant,
        blocked: Duration,
    ) {
        assert!(self.pending.is_none(), "finish the pending checkpoint first");
        let (step, optimizer_step) = (snap.step, snap.optimizer_step);
        let dtypes = [snap.params.dtype, snap.m.dtype, snap.v.dtype];
        let dir = out.child(&checkpoint::step_name(step));
        let result = Arc::new(Mutex::new(None));
        let (slot, target, layout, rank) = (result.clone(), dir.clone(), layout.clone(), a.rank);
        let spare = self.spare.clone();
        a.io.spawn(async move {
            let snap = Arc::new(snap);
            let outcome = match checkpoint::write_held(&target, &layout, &snap, rank, held).await {
                Ok((shard, up)) => {
                    tracing::info!(step, bytes = up.bytes, parts = up.parts, "checkpoint shard uploaded");
                    Outcome::Uploaded(shard)
                }
                Err(e) => Outcome::Failed(e.to_string()),
            };
            if let Ok(buffers) = Arc::try_unwrap(snap) {
                *spare.lock().expect("saver lock") = Some(buffers);
            }
            *slot.lock().expect("saver lock") = Some(outcome);
        });
        self.pending = Some(Pending { step, optimizer_step, dtypes, dir, started: since, blocked, result });
    }

    /// Finishes the pending checkpoint. Every rank must call this at the
    /// same step. Returns what rank 0 wrote; `None` on other ranks, or when
    /// a rank's upload failed (the checkpoint is then abandoned: without a
    /// manifest it is never loaded, and later retention removes it).
    /// Rank 0 writes `history` (up to the checkpoint's step) into it.
    pub fn finish(
        &mut self,
        a: &Assignment,
        world: &mut Collectives,
        layout: &Layout,
        history: &[MetricRecord],
    ) -> Result<Option<Saved>, TrainError> {
        let Some(p) = self.pending.take() else { return Ok(None) };
        let outcome = loop {
            if let Some(o) = p.result.lock().expect("saver lock").take() {
                break o;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let all = world.all_gather_bytes(serde_json::to_vec(&outcome).expect("outcome serializes"))?;
        let outcomes: Vec<Outcome> = all
            .iter()
            .map(|b| serde_json::from_slice(b))
            .collect::<Result<_, _>>()
            .map_err(|e| TrainError::Fatal(format!("read peers' shard entries: {e}")))?;
        let mut shards = Vec::with_capacity(outcomes.len());
        for (rank, o) in outcomes.into_iter().enumerate() {
            match o {
                Outcome::Uploaded(s) => shards.push(s),
                Outcome::Failed(why) => {
                    tracing::warn!(step = p.step, rank, error = %why, "checkpoint abandoned: a shard did not upload");
                    return Ok(None);
                }
            }
        }
        if a.rank != 0 {
            return Ok(None);
        }
        let train = &a.spec.train;
        let head = ManifestHead {
            job: &a.job,
            generation: a.generation,
            step: p.step,
            optimizer_step: p.optimizer_step,
            sampler: SamplerState {
                position: p.step * train.global_batch as u64,
                seed: train.seed,
                global_batch: train.global_batch as u64,
            },
            torch_seed: train.seed,
            dtypes: p.dtypes,
        };
        let upto: Vec<MetricRecord> = history.iter().filter(|r| r.step <= p.step).cloned().collect();
        a.io.block_on(checkpoint::write_history(&p.dir, &upto))
            .map_err(|e| TrainError::Fatal(format!("write the checkpoint's metric history: {e}")))?;
        let m = checkpoint::manifest(head, layout, shards);
        a.io.block_on(checkpoint::write_manifest(&p.dir, &m))
            .map_err(|e| TrainError::Fatal(format!("write checkpoint manifest: {e}")))?;
        let saved =
            Saved { step: p.step, location: p.dir.url().to_string(), blocked: p.blocked, total: p.started.elapsed() };
        tracing::info!(
            job = %a.job,
            step = saved.step,
            blocked_ms = saved.blocked.as_secs_f64() * 1e3,
            total_ms = saved.total.as_secs_f64() * 1e3,
            "checkpoint written"
        );
        Ok(Some(saved))
    }
}
