//! Where a generation starts: the newest checkpoint that every rank can
//! load its own pieces of, or the seed. Each rank reads only the pieces its
//! place in the layout needs (whatever layout wrote the checkpoint), and
//! the ranks agree on each candidate before using it: a piece one rank
//! finds torn makes every rank skip that checkpoint.

use flotilla_jobspec::JobSpec;
use flotilla_registry::MetricRecord;

use super::collective::Collectives;
use super::plan::Plan;
use crate::checkpoint::{self, Loaded, Manifest, Request};
use crate::storage::Storage;
use crate::types::{Assignment, TrainError};

/// A checkpoint every rank loaded: this rank's pieces and (on rank 0) the
/// metric history up to it.
pub(crate) struct Resumed {
    pub loaded: Loaded,
    pub history: Vec<MetricRecord>,
}

/// The checkpoints a generation may start from, best first: the job's own
/// committed ones, or else the one its job file names in
/// `checkpoint.resume_from`.
pub(crate) fn candidates(a: &Assignment) -> Vec<String> {
    if a.checkpoints.is_empty() {
        a.spec.checkpoint.resume_from.iter().cloned().collect()
    } else {
        a.checkpoints.clone()
    }
}

/// Refuses a checkpoint taken with another global batch or seed: resuming
/// from it would not continue the same run.
pub(crate) fn check_resume(m: &Manifest, spec: &JobSpec, location: &str) -> Result<(), String> {
    let train = &spec.train;
    if m.sampler.global_batch != train.global_batch as u64 || m.sampler.seed != train.seed {
        return Err(format!(
            "checkpoint {} was taken with global_batch {} and seed {}, the job has {} and {}",
            location, m.sampler.global_batch, m.sampler.seed, train.global_batch, train.seed
        ));
    }
    Ok(())
}

/// The newest candidate every rank loads, or `None` to start from the seed.
/// Fails when there were candidates and none loads everywhere.
pub(crate) fn newest(a: &Assignment, plan: &Plan, world: &mut Collectives) -> Result<Option<Resumed>, TrainError> {
    let candidates = candidates(a);
    let wanted = plan.wanted();
    let req = Request { params: wanted.params, moments: wanted.moments };
    let mut skipped = Vec::new();
    for location in &candidates {
        let mine = Storage::open(location)
            .map_err(|e| e.to_string())
            .and_then(|dir| a.io.block_on(checkpoint::load_pieces(&dir, &plan.layout, &req)).map_err(|e| e.to_string()))
            .and_then(|l| check_resume(&l.manifest, &a.spec, location).map(|()| l));
        let verdict = match &mine {
            Ok(_) => Vec::new(),
            Err(e) => e.as_bytes().iter().take(1000).copied().collect::<Vec<u8>>(),
        };
        let mut flagged = vec![u8::from(mine.is_err())];
        flagged.extend(verdict);
        let all = world.all_gather_bytes(flagged)?;
        let refusals: Vec<String> = all
            .iter()
            .enumerate()
            .filter(|(_, b)| b.first() != Some(&0))
            .map(|(r, b)| format!("rank {r}: {}", String::from_utf8_lossy(b.get(1..).unwrap_or_default())))
            .collect();
        match mine {
            Ok(loaded) if refusals.is_empty() => {
                let history = if a.rank == 0 {
                    a.io.block_on(checkpoint::read_history(location, loaded.manifest.step))
                } else {
                    Vec::new()
                };
                tracing::info!(job = %a.job, gen = a.generation, rank = a.rank, step = loaded.manifest.step, "resumed from checkpoint");
                return Ok(Some(Resumed { loaded, history }));
            }
            _ => {
                let why = refusals.join("; ");
                tracing::warn!(job = %a.job, rank = a.rank, checkpoint = %location, error = %why, "skipping checkpoint");
                skipped.push(format!("{location}: {why}"));
            }
        }
    }
    if skipped.is_empty() {
        Ok(None)
    } else {
        Err(TrainError::Fatal(format!("no committed checkpoint loads: {}", skipped.join("; "))))
    }
}
