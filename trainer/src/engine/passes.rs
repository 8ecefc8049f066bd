//! A step's forward and backward passes on one rank: its stage's share of
//! each micro-batch, in the order the pipeline schedule gives, unit by
//! unit. Each unit's input is a leaf of its own graph, so backward passes
//! run unit by unit too: a unit's gradients are handed to the step's
//! reductions as soon as they exist ([`StepGrads`]), and under ZeRO-3 a
//! unit's parameters are gathered just before each of its passes (the next
//! unit's while this one computes) and released after.

use std::time::{Duration, Instant};

use flotilla_jobspec::{JobSpec, Precision};
use tch::{Kind, Tensor};

use super::collective::Op;
use super::grads::{StepGrads, MAX_IN_FLIGHT};
use super::groups::{Groups, InFlight};
use super::plan::{micro_batches, schedule, LocalUnit, Pass, Plan};
use crate::data::Dataset;
use crate::model;
use crate::stats::HeapPeak;
use crate::types::TrainError;

/// What a step's passes measured.
pub(crate) struct PassesDone {
    /// Sum of the per-sample losses of this rank's micro-batches (last
    /// stages only; 0 elsewhere).
    pub loss_sum: f64,
    /// The same sum while the passes run, in f64 on the rank's device (one
    /// read at the end instead of a device synchronisation per micro-batch;
    /// the same additions in the same order as on the host).
    loss_acc: Option<Tensor>,
    /// Peak growth of the heap during the passes.
    pub activations: u64,
    /// Time spent waiting for activations or gradients from other stages.
    pub pipeline_wait: Duration,
    /// Time spent reading the samples (waiting for the data loader).
    pub data_wait: Duration,
}

/// One unit's part of a micro-batch between its forward and backward pass.
struct UnitRun {
    input: Tensor,
    /// The unit's output; for the model's last unit, the scaled loss.
    /// Without a graph when the unit is recomputed.
    output: Tensor,
    /// Activation checkpointing: the forward pass ran without a graph, and
    /// the backward pass runs it again from `input` to get one.
    recompute: bool,
    /// The parameter leaves it ran with (ZeRO-3: released until the
    /// backward pass gathers them again).
    leaves: Vec<Tensor>,
}

struct Live {
    units: Vec<UnitRun>,
    batch: usize,
}

pub(crate) fn compute_kind(p: Precision) -> Kind {
    match p {
        Precision::Fp32 => Kind::Float,
        Precision::Bf16 => Kind::BFloat16,
    }
}

/// Parameter leaves for one unit: views of `flat` (its whole parameters,
/// in the compute dtype), shaped, each a leaf that collects gradients.
fn leaves(u: &LocalUnit, flat: &Tensor) -> Vec<Tensor> {
    model::unflatten(flat, &u.shapes).into_iter().map(|t| t.detach().set_requires_grad(true)).collect()
}

/// Starts gathering local unit `k`'s parameters from the stage group
/// (ZeRO-3: `params` holds this rank's chunks), in the compute dtype.
pub(crate) fn gather_unit(plan: &Plan, params: &Tensor, groups: &mut Groups, k: usize, kind: Kind) -> InFlight {
    let u = &plan.units[k];
    let full = Tensor::empty([u.len as i64], (kind, plan.device));
    tch::no_grad(|| {
        full.narrow(0, u.own.start as i64, u.own.len() as i64).copy_(&params.narrow(
            0,
            u.own_off as i64,
            u.own.len() as i64,
        ))
    });
    groups.dp_submit(Op::AllGather, full)
}

/// The passes of one step.
pub(crate) struct StepPasses<'a> {
    pub plan: &'a Plan,
    pub spec: &'a JobSpec,
    pub data: &'a Dataset,
    /// The rank's parameters: the stage's (ZeRO 0-2) or its chunks' (ZeRO 3).
    pub params: &'a Tensor,
}

impl StepPasses<'_> {
    /// Runs every pass of step `step` for this rank's `indices` (its
    /// replica's samples), feeding gradients to `grads`.
    pub fn run(
        &self,
        groups: &mut Groups,
        grads: &mut StepGrads,
        own_grads: &mut Tensor,
        indices: &[u64],
    ) -> Result<PassesDone, TrainError> {
        let plan = self.plan;
        let kind = compute_kind(plan.precision);
        let global = self.spec.train.global_batch as f64;
        let mbs = micro_batches(indices.len(), self.spec.train.global_batch.div_ceil(plan.dp), self.spec);
        let last_mb = mbs.len() - 1;
        // Parameter leaves shared by every micro-batch (ZeRO 0-2).
        let shared: Vec<Vec<Tensor>> = if plan.zero < 3 {
            let flat = tch::no_grad(|| self.params.to_kind(kind));
            plan.units.iter().map(|u| leaves(u, &flat.narrow(0, u.offset as i64, u.len as i64))).collect()
        } else {
            Vec::new()
        };
        let heap = HeapPeak::start();
        let mut live: Vec<Option<Live>> = (0..mbs.len()).map(|_| None).collect();
        let mut done = PassesDone {
            loss_sum: 0.0,
            loss_acc: None,
            activations: 0,
            pipeline_wait: Duration::ZERO,
            data_wait: Duration::ZERO,
        };
        for pass in schedule(self.spec.parallelism.schedule, plan.pp, plan.stage, mbs.len()) {
            match pass {
                Pass::Forward(j) => {
                    let batch = &indices[mbs[j].clone()];
                    live[j] = Some(self.forward(groups, &shared, batch, global, kind, &heap, &mut done)?);
                }
                Pass::Backward(j) => {
                    let l = live[j].take().expect("forward before backward");
                    self.backward(groups, grads, own_grads, l, j == last_mb, kind, &heap, &mut done)?;
                }
            }
        }
        groups.flush_sends()?;
        if let Some(acc) = done.loss_acc.take() {
            done.loss_sum = acc.double_value(&[]);
        }
        done.activations = heap.peak();
        Ok(done)
    }

    fn gather(&self, groups: &mut Groups, k: usize, kind: Kind) -> InFlight {
        gather_unit(self.plan, self.params, groups, k, kind)
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        groups: &mut Groups,
        shared: &[Vec<Tensor>],
        batch: &[u64],
        global: f64,
        kind: Kind,
        heap: &HeapPeak,
        done: &mut PassesDone,
    ) -> Result<Live, TrainError> {
        let plan = self.plan;
        let n = plan.units.len();
        let zero3 = plan.zero >= 3;
        let mut pending = zero3.then(|| self.gather(groups, 0, kind));
        if batch.is_empty() {
            // A replica with fewer samples: nothing to compute or send (its
            // other stages skip it too), but ZeRO-3's gathers need it.
            for k in 0..n {
                if let Some(f) = pending.take() {
                    let _ = groups.dp_wait(f)?;
                }
                if k + 1 < n && zero3 {
                    pending = Some(self.gather(groups, k + 1, kind));
                }
            }
            return Ok(Live { units: Vec::new(), batch: 0 });
        }
        let (x, y) = match plan.reads_data() {
            true => {
                let read = Instant::now();
                let (x, y) = self.data.batch(batch).map_err(|e| TrainError::fatal("read the step's samples", e))?;
                done.data_wait += read.elapsed();
                (Some(x.to_device(plan.device)), Some(y.to_device(plan.device)))
            }
            false => (None, None),
        };
        let mut input = if let Some(x) = x.filter(|_| plan.first_stage()) {
            x
        } else {
            let shape = model::output_shape(&self.spec.model, plan.input_unit.expect("a previous stage"), batch.len());
            let w = Instant::now();
            let t = groups.recv_from_prev(&shape, kind)?;
            done.pipeline_wait += w.elapsed();
            t.set_requires_grad(true)
        };
        let mut units = Vec::with_capacity(n);
        for k in 0..n {
            let u = &plan.units[k];
            let params = if zero3 {
                let (full, _) = groups.dp_wait(pending.take().expect("a gather per unit"))?;
                if plan.overlap && k + 1 < n {
                    pending = Some(self.gather(groups, k + 1, kind));
                }
                leaves(u, &full)
            } else {
                shared[k].iter().map(|t| t.shallow_clone()).collect()
            };
            let x_in = if k == 0 { input.shallow_clone() } else { input.detach().set_requires_grad(true) };
            // The unit that ends in the loss keeps its graph: recomputing it
            // would compute the loss twice.
            let recompute = self.spec.train.activation_checkpointing && !(plan.last_stage() && k + 1 == n);
            let mut out = if recompute {
                tch::no_grad(|| model::forward(&self.spec.model, u.unit, &params, &x_in))
            } else {
                model::forward(&self.spec.model, u.unit, &params, &x_in)
            };
            if plan.last_stage() && k + 1 == n {
                let loss = model::loss_sum(&self.spec.model, &out, y.as_ref().expect("the last stage reads samples"));
                let l = tch::no_grad(|| loss.detach().to_kind(Kind::Double));
                done.loss_acc = Some(match done.loss_acc.take() {
                    Some(acc) => acc + l,
                    None => l,
                });
                out = loss / global;
            }
            if zero3 {
                // Released until the backward pass gathers them again.
                for mut t in params.iter().map(|t| t.shallow_clone()) {
                    t.set_data(&Tensor::empty([0], (kind, plan.device)));
                }
                if !plan.overlap && k + 1 < n {
                    pending = Some(self.gather(groups, k + 1, kind));
                }
            }
            heap.sample();
            units.push(UnitRun { input: x_in, output: out.shallow_clone(), recompute, leaves: params });
            input = out;
        }
        if !plan.last_stage() {
            groups.send_to_next(input.detach());
        }
        heap.sample();
        Ok(Live { units, batch: batch.len() })
    }

    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        groups: &mut Groups,
        grads: &mut StepGrads,
        own_grads: &mut Tensor,
        live: Live,
        last_mb: bool,
        kind: Kind,
        heap: &HeapPeak,
        done: &mut PassesDone,
    ) -> Result<(), TrainError> {
        let plan = self.plan;
        let n = plan.units.len();
        let zero3 = plan.zero >= 3;
        let overlap = plan.overlap;
        let mut pending = zero3.then(|| self.gather(groups, n - 1, kind));
        if live.batch == 0 {
            for k in (0..n).rev() {
                if let Some(f) = pending.take() {
                    let _ = groups.dp_wait(f)?;
                }
                if k > 0 && zero3 {
                    pending = Some(self.gather(groups, k - 1, kind));
                }
                if zero3 {
                    let none: Vec<Tensor> = plan.units[k].shapes.iter().map(|_| Tensor::new()).collect();
                    grads.add(plan, groups, k, &none)?;
                    grads.drain_to(groups, own_grads, if overlap { MAX_IN_FLIGHT } else { 0 })?;
                }
                if last_mb && overlap {
                    grads.unit_done(plan, groups, own_grads, k);
                }
            }
            return Ok(());
        }
        let mut grad_out = if plan.last_stage() {
            None
        } else {
            let shape = model::output_shape(&self.spec.model, plan.units[n - 1].unit, live.batch);
            let w = Instant::now();
            let g = groups.recv_from_next(&shape, kind)?;
            done.pipeline_wait += w.elapsed();
            Some(g)
        };
        for (k, run) in live.units.into_iter().enumerate().rev() {
            let u = &plan.units[k];
            if zero3 {
                let (full, _) = groups.dp_wait(pending.take().expect("a gather per unit"))?;
                if overlap && k > 0 {
                    pending = Some(self.gather(groups, k - 1, kind));
                }
                for (mut leaf, fresh) in run.leaves.iter().map(|t| t.shallow_clone()).zip(leaves(u, &full)) {
                    leaf.set_data(&fresh.detach());
                }
                if !overlap && k > 0 {
                    pending = Some(self.gather(groups, k - 1, kind));
                }
            }
            // Checkpointed: the same forward again, this time with a graph
            // (deterministic, so the same values).
            let output = if run.recompute {
                let output = model::forward(&self.spec.model, u.unit, &run.leaves, &run.input);
                // The recomputed unit's activations count with the rest.
                heap.sample();
                output
            } else {
                run.output.shallow_clone()
            };
            let root = match &grad_out {
                None => output,
                Some(g) => (&output * g).sum(Kind::Float),
            };
            let wants_input = k > 0 || !plan.first_stage();
            let mut inputs: Vec<&Tensor> = run.leaves.iter().collect();
            if wants_input {
                inputs.push(&run.input);
            }
            let mut got = Tensor::run_backward(&[&root], &inputs, false, false);
            grad_out = if wants_input { got.pop() } else { None };
            drop(run);
            grads.add(plan, groups, k, &got)?;
            if zero3 {
                grads.drain_to(groups, own_grads, if overlap { MAX_IN_FLIGHT } else { 0 })?;
            }
            if last_mb && overlap {
                grads.unit_done(plan, groups, own_grads, k);
            }
        }
        if !plan.first_stage() {
            groups.send_to_prev(grad_out.expect("an input gradient").detach());
        }
        Ok(())
    }
}
