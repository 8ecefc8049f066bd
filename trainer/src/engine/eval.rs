//! Evaluation while training (`eval:` in the job file): the loss, and for
//! the MLP the accuracy, of the first `batches × batch` samples of the
//! evaluation data, with the weights of the step just taken. Forward passes
//! only, without graphs, through every layout: the data-parallel replicas
//! split the samples, pipeline stages pass activations on as in training,
//! ZeRO-3 gathers each unit's parameters. Every rank then learns the sums
//! of every other in one small collective and divides by the sample count,
//! so the value does not depend on the world size (up to the order of a
//! few f64 additions).

use flotilla_jobspec::{EvalSpec, JobSpec, ModelSpec};
use tch::{Kind, Tensor};

use super::groups::Groups;
use super::passes::{compute_kind, gather_unit};
use super::plan::Plan;
use crate::data::Dataset;
use crate::model;
use crate::tokenize::TokenCache;
use crate::types::TrainError;

/// Rounds (micro-batches) whose samples are read ahead of their forward pass.
const READ_AHEAD_ROUNDS: usize = 2;

/// One evaluation's outcome.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Evaluated {
    /// Mean per-sample loss.
    pub loss: f64,
    /// Share of samples classified right (MLP only).
    pub accuracy: Option<f64>,
}

/// Whether `done` (steps taken) is an evaluation step of `eval`.
pub(crate) fn due(eval: &EvalSpec, done: u64, steps: u64) -> bool {
    (eval.every > 0 && done % eval.every == 0) || done == steps
}

/// Loads the evaluation data and checks it holds enough samples.
pub(crate) fn load(spec: &JobSpec, cache: &TokenCache) -> Result<Option<Dataset>, TrainError> {
    let Some(eval) = &spec.eval else { return Ok(None) };
    let data =
        Dataset::load(&eval.data, &spec.model, Some(cache)).map_err(|e| TrainError::fatal("load eval data", e))?;
    let wanted = (eval.batches * eval.batch) as u64;
    if data.len() < wanted {
        return Err(TrainError::Fatal(format!(
            "eval.data has {} samples, fewer than eval.batches × eval.batch = {wanted}",
            data.len()
        )));
    }
    Ok(Some(data))
}

/// Evaluates `params` (this rank's: its stage's, or its chunks under ZeRO-3).
pub(crate) fn evaluate(
    plan: &Plan,
    spec: &JobSpec,
    eval: &EvalSpec,
    data: &Dataset,
    params: &Tensor,
    groups: &mut Groups,
) -> Result<Evaluated, TrainError> {
    let kind = compute_kind(plan.precision);
    let total = eval.batches * eval.batch;
    // This replica's share of the samples, in order.
    let (lo, hi) = (total * plan.replica / plan.dp, total * (plan.replica + 1) / plan.dp);
    let mine: Vec<u64> = (lo as u64..hi as u64).collect();
    // Every replica runs as many micro-batches: ZeRO-3's gathers are
    // collectives of the replicas.
    let mb = spec.train.micro_batch.max(1);
    let rounds = total.div_ceil(plan.dp).div_ceil(mb).max(1);
    let flat = (plan.zero < 3).then(|| tch::no_grad(|| params.to_kind(kind)));
    let n = plan.units.len();
    let (mut loss_sum, mut correct) = (0.0f64, 0u64);
    let share = |j: usize| &mine[(j * mb).min(mine.len())..((j + 1) * mb).min(mine.len())];
    let ahead = |j: usize| {
        if j < rounds && plan.reads_data() {
            data.prefetch(share(j));
        }
    };
    for j in 0..READ_AHEAD_ROUNDS {
        ahead(j);
    }
    for j in 0..rounds {
        let batch = share(j);
        let mut x = None;
        let mut y = None;
        ahead(j + READ_AHEAD_ROUNDS);
        if !batch.is_empty() {
            let (bx, by) = match plan.reads_data() {
                true => {
                    let (x, y) = data.batch(batch).map_err(|e| TrainError::fatal("read the evaluation samples", e))?;
                    (x.to_device(plan.device), y.to_device(plan.device))
                }
                false => (Tensor::new(), Tensor::new()),
            };
            y = Some(by);
            x = Some(if plan.first_stage() {
                bx
            } else {
                let shape = model::output_shape(&spec.model, plan.input_unit.expect("a previous stage"), batch.len());
                groups.recv_from_prev(&shape, kind)?
            });
        }
        for k in 0..n {
            let u = &plan.units[k];
            let unit_params = match &flat {
                Some(f) => f.narrow(0, u.offset as i64, u.len as i64),
                None => {
                    let pending = gather_unit(plan, params, groups, k, kind);
                    groups.dp_wait(pending)?.0
                }
            };
            if let Some(input) = x.take() {
                let p = model::unflatten(&unit_params, &u.shapes);
                x = Some(tch::no_grad(|| model::forward(&spec.model, u.unit, &p, &input)));
            }
        }
        let (Some(out), Some(y)) = (x, y) else { continue };
        if plan.last_stage() {
            tch::no_grad(|| {
                loss_sum += model::loss_sum(&spec.model, &out, &y).double_value(&[]);
                if matches!(spec.model, ModelSpec::Mlp(_)) {
                    correct += out.argmax(-1, false).eq_tensor(&y).sum(Kind::Int64).int64_value(&[]) as u64;
                }
            });
        } else {
            groups.send_to_next(out);
        }
    }
    groups.flush_sends()?;
    let mut mine = loss_sum.to_le_bytes().to_vec();
    mine.extend_from_slice(&correct.to_le_bytes());
    let all = groups.world.all_gather_bytes(mine)?;
    let (mut loss_total, mut correct_total) = (0.0f64, 0u64);
    for (rank, b) in all.iter().enumerate() {
        if b.len() != 16 {
            return Err(TrainError::Fatal(format!("rank {rank} sent a malformed evaluation ({} bytes)", b.len())));
        }
        loss_total += f64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
        correct_total += u64::from_le_bytes(b[8..].try_into().expect("8 bytes"));
    }
    let accuracy = matches!(spec.model, ModelSpec::Mlp(_)).then(|| correct_total as f64 / total as f64);
    Ok(Evaluated { loss: loss_total / total as f64, accuracy })
}
