//! A step's gradients on their way from the backward passes to the update:
//! where each unit's gradients add up across micro-batches (f32, whatever
//! the compute precision), and the reductions over the stage's
//! data-parallel group that start as soon as a unit's last backward pass is
//! done, while the passes of the units before it run.
//!
//! - ZeRO 0: the stage's flat gradient tensor, cut into buckets of
//!   `parallelism.bucket_mb` (the first one the backward pass fills, at most
//!   1 MiB, so that reducing starts early); a bucket is all-reduced in place
//!   once every unit it covers is done.
//! - ZeRO 1: the same tensor; each unit's range is reduce-scattered in
//!   place, leaving this rank's chunk reduced.
//! - ZeRO 2: a unit's gradients add up in a tensor of their own for the
//!   step, reduce-scattered once the unit is done; this rank keeps its chunk.
//! - ZeRO 3: each micro-batch's gradients of a unit are reduce-scattered
//!   right after its backward pass and this rank's chunk added to its own.

use std::collections::VecDeque;
use std::ops::Range;

use flotilla_comm::CommError;
use tch::{Kind, Tensor};

use super::collective::Op;
use super::groups::{Groups, InFlight};
use super::plan::{bucket_elems, unit_buckets, Plan, FIRST_BUCKET_MB};

/// At most this many ZeRO-3 reductions in flight, so that the temporary
/// gradient tensors they hold stay few.
pub(crate) const MAX_IN_FLIGHT: usize = 3;

/// What to do with a reduction's result.
enum Then {
    /// Nothing: it was reduced in place in the rank's gradients.
    Nothing,
    /// Copy (ZeRO 2) or add (ZeRO 3) the owned chunk into the rank's
    /// compact gradients at `own_local`.
    TakeChunk { own_local: Range<usize>, add: bool },
}

pub(crate) struct StepGrads {
    zero: u8,
    /// Per local unit, per tensor: where its gradients add up this step.
    acc: Vec<Vec<Tensor>>,
    /// ZeRO 2: per local unit, the flat tensor `acc` views.
    unit_flat: Vec<Tensor>,
    buckets: Vec<Range<usize>>,
    /// Buckets (ZeRO 0) or units (ZeRO 1-2) not yet queued.
    next_bucket: usize,
    in_flight: VecDeque<(InFlight, Then)>,
}

impl StepGrads {
    /// Starts a step: zeroes the rank's gradients and makes the
    /// accumulators.
    pub fn start(plan: &Plan, grads: &mut Tensor, bucket_mb: f64) -> StepGrads {
        let _ = grads.zero_();
        let views = |flat: &Tensor, base: usize, shapes: &[Vec<i64>]| {
            let mut at = base as i64;
            shapes
                .iter()
                .map(|s| {
                    let n: i64 = s.iter().product();
                    let v = flat.narrow(0, at, n).view(s.as_slice());
                    at += n;
                    v
                })
                .collect::<Vec<_>>()
        };
        let (acc, unit_flat) = match plan.zero {
            0 | 1 => (plan.units.iter().map(|u| views(grads, u.offset, &u.shapes)).collect(), Vec::new()),
            2 => {
                let flat: Vec<Tensor> =
                    plan.units.iter().map(|u| Tensor::zeros([u.len as i64], (Kind::Float, grads.device()))).collect();
                (plan.units.iter().zip(&flat).map(|(u, f)| views(f, 0, &u.shapes)).collect(), flat)
            }
            _ => (Vec::new(), Vec::new()),
        };
        let buckets = if plan.zero == 0 {
            let units: Vec<_> = plan.units.iter().map(|u| u.stage_range()).collect();
            unit_buckets(&units, bucket_elems(bucket_mb), bucket_elems(FIRST_BUCKET_MB))
        } else {
            Vec::new()
        };
        let next_bucket = if plan.zero == 0 { buckets.len() } else { plan.units.len() };
        StepGrads { zero: plan.zero, acc, unit_flat, buckets, next_bucket, in_flight: VecDeque::new() }
    }

    /// Adds one backward pass's gradients of local unit `k` (in its
    /// tensors' order, f32 or bf16; undefined for a tensor that got none).
    /// ZeRO 3: queues their reduction at once and returns nothing to keep.
    pub fn add(&mut self, plan: &Plan, groups: &mut Groups, k: usize, grads: &[Tensor]) -> Result<(), CommError> {
        tch::no_grad(|| {
            if self.zero >= 3 {
                let u = &plan.units[k];
                let flat = Tensor::zeros([u.len as i64], (Kind::Float, plan.device));
                let mut at = 0;
                for (g, n) in grads.iter().zip(u.numels()) {
                    if g.defined() {
                        let mut part = flat.narrow(0, at, n).view_as(g);
                        let _ = part.g_add_(g);
                    }
                    at += n;
                }
                let f = groups.dp_submit(Op::ReduceScatter, flat);
                self.in_flight.push_back((f, Then::TakeChunk { own_local: u.own_local_range(), add: true }));
                return Ok(());
            }
            for (acc, g) in self.acc[k].iter_mut().zip(grads) {
                if g.defined() {
                    let _ = acc.g_add_(g);
                }
            }
            Ok(())
        })
    }

    /// Waits for the oldest reductions until at most `bound` are in flight.
    pub fn drain_to(&mut self, groups: &mut Groups, grads: &mut Tensor, bound: usize) -> Result<(), CommError> {
        while self.in_flight.len() > bound {
            self.finish_one(groups, grads)?;
        }
        Ok(())
    }

    /// Local unit `k` has had its last backward pass of the step: queues
    /// every reduction that no longer waits for any other unit (ZeRO 0-2).
    /// Units finish in reverse order.
    pub fn unit_done(&mut self, plan: &Plan, groups: &mut Groups, grads: &Tensor, k: usize) {
        match self.zero {
            0 => {
                let from = plan.units[k].offset;
                while self.next_bucket > 0 && self.buckets[self.next_bucket - 1].start >= from {
                    self.next_bucket -= 1;
                    let b = &self.buckets[self.next_bucket];
                    let view = grads.narrow(0, b.start as i64, b.len() as i64);
                    let f = groups.dp_submit(Op::AllReduce, view);
                    self.in_flight.push_back((f, Then::Nothing));
                }
            }
            1 | 2 => {
                while self.next_bucket > k {
                    self.next_bucket -= 1;
                    let u = &plan.units[self.next_bucket];
                    let (t, then) = if self.zero == 1 {
                        (grads.narrow(0, u.offset as i64, u.len as i64), Then::Nothing)
                    } else {
                        let t = std::mem::replace(&mut self.unit_flat[self.next_bucket], Tensor::new());
                        self.acc[self.next_bucket].clear();
                        (t, Then::TakeChunk { own_local: u.own_local_range(), add: false })
                    };
                    let f = groups.dp_submit(Op::ReduceScatter, t);
                    self.in_flight.push_back((f, then));
                }
            }
            _ => {}
        }
    }

    fn finish_one(&mut self, groups: &mut Groups, grads: &mut Tensor) -> Result<(), CommError> {
        let Some((f, then)) = self.in_flight.pop_front() else { return Ok(()) };
        let (t, own) = groups.dp_wait(f)?;
        if let Then::TakeChunk { own_local, add } = then {
            let src = t.narrow(0, own.start as i64, own.len() as i64);
            let mut dst = grads.narrow(0, own_local.start as i64, own_local.len() as i64);
            tch::no_grad(|| {
                if add {
                    let _ = dst.g_add_(&src);
                } else {
                    dst.copy_(&src);
                }
            });
        }
        Ok(())
    }

    /// Queues what is left (every unit is done) and waits for every
    /// reduction: afterwards the rank's gradients hold what it owns, reduced.
    pub fn finish(mut self, plan: &Plan, groups: &mut Groups, grads: &mut Tensor) -> Result<(), CommError> {
        if !plan.units.is_empty() {
            self.unit_done(plan, groups, grads, 0);
        }
        while !self.in_flight.is_empty() {
            self.finish_one(groups, grads)?;
        }
        Ok(())
    }
}
