//! The end of a job's last step: replicas of a stage prove they hold the
//! same parameters (digests compared), every rank sends the pieces of the
//! parameters it writes to rank 0, and rank 0 writes the final model, the
//! digests and the metric history, then reports the job finished. Only rank
//! 0 ever holds the whole model. A Llama's final folder also gets a
//! Hugging Face `config.json`, so that transformers loads it as is.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::collective::Op;
use super::groups::Groups;
use super::plan::Plan;
use super::state::State;
use super::weights::host_bytes;
use crate::checkpoint::{self, Held, Layout};
use crate::storage::Storage;
use crate::types::{Assignment, TrainError, TrainEvent};
use flotilla_registry::MetricRecord;

/// What a rank says about its final parameters.
#[derive(Debug, Serialize, Deserialize)]
struct Pieces {
    stage: usize,
    /// SHA-256 of the stage's parameters in name order (ZeRO 0-2); empty
    /// under ZeRO-3.
    digest: String,
    held: Vec<Held>,
}

/// Checks the replicas, gathers the final parameters on rank 0 and writes
/// the final model there.
#[allow(clippy::too_many_arguments)]
pub(crate) fn hand_over(
    a: &Assignment,
    plan: &Plan,
    state: &mut State,
    groups: &mut Groups,
    out: &Storage,
    history: &[MetricRecord],
    emit: &mut dyn FnMut(TrainEvent),
) -> Result<(), TrainError> {
    let params = state.weights.read().params.shallow_clone();
    let digest = if plan.zero < 3 { stage_digest(plan, &params) } else { String::new() };
    let held = plan.holding();
    // This rank's pieces of the parameters, back to back, in `held` order.
    let ranges: Vec<_> =
        held.iter().map(|h| plan.locate(h.tensor, h.start, h.end).0.expect("held parameters")).collect();
    let mine = if ranges.is_empty() {
        Tensor::zeros([0], (Kind::Float, plan.device))
    } else {
        Tensor::cat(&ranges.iter().map(|r| params.narrow(0, r.start as i64, r.len() as i64)).collect::<Vec<_>>(), 0)
    };
    let said =
        serde_json::to_vec(&Pieces { stage: plan.stage, digest: digest.clone(), held }).expect("pieces serialize");
    let all: Vec<Pieces> = groups
        .world
        .all_gather_bytes(said)?
        .iter()
        .map(|b| serde_json::from_slice(b))
        .collect::<Result<_, _>>()
        .map_err(|e| TrainError::Fatal(format!("a peer's final pieces are malformed: {e}")))?;
    if plan.zero < 3 {
        for p in &all {
            if let Some(other) = all.iter().find(|o| o.stage == p.stage && o.digest != p.digest) {
                return Err(TrainError::Fatal(format!(
                    "replicas of stage {} diverged: parameter digests {} and {}",
                    p.stage, p.digest, other.digest
                )));
            }
        }
    }
    let digests: Vec<String> = all.iter().map(|p| p.digest.clone()).collect();
    if a.rank != 0 {
        let _ = groups.world.run(Op::Send(0), mine)?;
        return Ok(());
    }
    let layout = &plan.layout;
    let mut whole = vec![0f32; layout.total];
    for (r, p) in all.iter().enumerate() {
        let n: usize = p.held.iter().map(|h| h.end - h.start).sum();
        let values = if r == 0 {
            mine.shallow_clone()
        } else {
            groups.world.run(Op::Recv(r), Tensor::zeros([n as i64], (Kind::Float, plan.device)))?.0
        };
        let mut flat = vec![0f32; n];
        values.copy_data(&mut flat, n);
        for h in &p.held {
            let off = layout.offsets[h.tensor];
            whole[off + h.start..off + h.end].copy_from_slice(&flat[h.local..h.local + h.end - h.start]);
        }
    }
    let (layout, whole) = if crate::model::tied(&a.spec.model) {
        // One matrix, as transformers saves a tied model: the embedding.
        without(layout, &whole, crate::model::llama::LM_HEAD)
    } else {
        (layout.clone(), whole)
    };
    let path =
        a.io.block_on(checkpoint::write_final(out, &layout, &whole, &a.spec_json))
            .map_err(|e| TrainError::fatal("write final model", e))?;
    if let flotilla_jobspec::ModelSpec::Llama(l) = &a.spec.model {
        // With the weights under transformers' names, the folder is a
        // Hugging Face model.
        let config = flotilla_jobspec::hf_config::write(l).into_bytes();
        a.io.block_on(out.child("final").put("config.json", config))
            .map_err(|e| TrainError::fatal("write the final model's config.json", e))?;
    }
    a.io.block_on(checkpoint::write_replica_digests(out, &digests))
        .map_err(|e| TrainError::fatal("write replica digests", e))?;
    a.io.block_on(checkpoint::write_history(&out.child("final"), history))
        .map_err(|e| TrainError::fatal("write the metric history", e))?;
    emit(TrainEvent::Finished { step: a.spec.train.steps, final_model: path });
    Ok(())
}

/// SHA-256 of the stage's parameters, tensor by tensor in name order (so
/// that it does not depend on how the engine lays them out).
fn stage_digest(plan: &Plan, params: &Tensor) -> String {
    let mut tensors: Vec<(usize, usize)> = Vec::new();
    for u in &plan.units {
        let mut at = u.offset;
        for &t in &u.tensors {
            tensors.push((t, at));
            at += plan.layout.numel(t);
        }
    }
    tensors.sort_by(|a, b| plan.layout.names[a.0].cmp(&plan.layout.names[b.0]));
    let mut bytes = Vec::with_capacity(plan.stage_len * 4);
    for (t, at) in tensors {
        bytes.extend(host_bytes(params, at..at + plan.layout.numel(t)));
    }
    checkpoint::digest(&bytes)
}

/// The layout and weights without the tensor `name`.
fn without(layout: &Layout, whole: &[f32], name: &str) -> (Layout, Vec<f32>) {
    let mut entries = Vec::new();
    let mut values = Vec::with_capacity(whole.len());
    for (i, (n, shape)) in layout.names.iter().zip(&layout.shapes).enumerate() {
        if n != name {
            entries.push((n.clone(), shape.clone()));
            values.extend_from_slice(&whole[layout.offsets[i]..layout.offsets[i] + layout.numel(i)]);
        }
    }
    (Layout::new(entries), values)
}
