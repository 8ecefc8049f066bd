//! Tied input and output embeddings (a Llama's `tie_embeddings`): the
//! model has one matrix, used by the embedding unit and by the head. The
//! engine keeps a copy of it in each of the two units, so that a pipeline
//! may put them on different stages and ZeRO may cut each unit on its own.
//! The copies start equal (`model::UnitInit`, or the same tensor of a
//! Hugging Face folder) and stay equal because every step gives both the
//! same gradient, the sum of the two units' gradients, before clipping and
//! AdamW.
//!
//! After the step's reductions, each rank holds its owned chunk of each of
//! its units' gradients. Every rank of the world adds what it owns of
//! either copy into a matrix of zeros (replicas that hold the same
//! unreduced-chunk gradients under ZeRO 0 send theirs once, through
//! replica 0) and the world sums the matrices: each element then has
//! exactly its two contributions, so the sum is the same whatever the
//! layout. Each rank copies its owned parts back into both copies. The
//! global gradient norm counts the matrix once, as a model with one tensor
//! would: the head's copy is left out of it.
//!
//! Cost: one all-reduce of the matrix over the world per step (ranks of
//! middle pipeline stages add zeros); without peers it is a local add.

use std::ops::Range;

use flotilla_comm::CommError;
use tch::{Kind, Tensor};

use super::collective::Op;
use super::groups::Groups;
use super::plan::Plan;
use crate::model::llama::{EMBEDDING, LM_HEAD};

/// One copy of the matrix in a local unit.
struct Copy {
    /// The local unit.
    unit: usize,
    /// Where the matrix lies in the unit's parameters.
    within: Range<usize>,
    /// The head's copy (left out of the gradient norm).
    head: bool,
}

pub(crate) struct Tied {
    len: usize,
    copies: Vec<Copy>,
}

impl Tied {
    /// The tie of this rank's stage, for a model with tied embeddings (on
    /// every rank, including those that hold no copy: they still take part
    /// in the sum).
    pub fn new(plan: &Plan, tied: bool) -> Option<Tied> {
        if !tied {
            return None;
        }
        let layout = &plan.layout;
        let emb = layout.names.iter().position(|n| n == EMBEDDING).expect("a tied model has an embedding");
        let len = layout.numel(emb);
        let mut copies = Vec::new();
        for (k, u) in plan.units.iter().enumerate() {
            let mut at = 0;
            for &t in &u.tensors {
                let n = layout.numel(t);
                let name = layout.names[t].as_str();
                if name == EMBEDDING || name == LM_HEAD {
                    assert_eq!(n, len, "both copies of a tied matrix have its size");
                    copies.push(Copy { unit: k, within: at..at + n, head: name == LM_HEAD });
                }
                at += n;
            }
        }
        Some(Tied { len, copies })
    }

    /// The part of copy `c` this rank owns: its range in the rank's
    /// gradient tensor and the same elements' range in the matrix.
    fn owned(&self, plan: &Plan, c: &Copy) -> Option<(Range<usize>, Range<usize>)> {
        let u = &plan.units[c.unit];
        let (lo, hi) = (u.own.start.max(c.within.start), u.own.end.min(c.within.end));
        if lo >= hi {
            return None;
        }
        let base = if plan.zero <= 1 { u.offset + lo } else { u.own_off + (lo - u.own.start) };
        Some((base..base + (hi - lo), lo - c.within.start..hi - c.within.start))
    }

    /// Gives both copies the sum of their reduced gradients (see the module
    /// documentation). Every rank of the world calls it once per step.
    pub fn sum_grads(&self, plan: &Plan, groups: &mut Groups, grads: &mut Tensor) -> Result<(), CommError> {
        let sum = Tensor::zeros([self.len as i64], (Kind::Float, grads.device()));
        let counts = !(plan.zero == 0 && plan.replica != 0);
        let parts: Vec<_> = self.copies.iter().filter_map(|c| self.owned(plan, c)).collect();
        tch::no_grad(|| {
            if counts {
                for (g, m) in &parts {
                    let mut dst = sum.narrow(0, m.start as i64, m.len() as i64);
                    let _ = dst.g_add_(&grads.narrow(0, g.start as i64, g.len() as i64));
                }
            }
        });
        let (sum, _) = groups.world.run(Op::AllReduce, sum)?;
        tch::no_grad(|| {
            for (g, m) in &parts {
                grads.narrow(0, g.start as i64, g.len() as i64).copy_(&sum.narrow(0, m.start as i64, m.len() as i64));
            }
        });
        Ok(())
    }

    /// Squares of the head copy's gradients this rank counts in the norm,
    /// to be taken out of it.
    pub fn head_squares(&self, plan: &Plan, grads: &Tensor) -> f64 {
        self.copies
            .iter()
            .filter(|c| c.head)
            .filter_map(|c| self.owned(plan, c))
            .map(|(g, _)| grads.narrow(0, g.start as i64, g.len() as i64).square().sum(Kind::Double).double_value(&[]))
            .sum()
    }
}
