//! What a rank keeps from step to step, as flat f32 tensors on the job's
//! device: its parameters and AdamW moments ([`Weights`], behind the slot
//! that lends them to checkpoint copies), its gradients, and the optimizer's
//! step. Which of them hold the whole stage and which only this rank's
//! chunks follows the ZeRO stage (see `engine::plan`). Made from the seed
//! unit by unit, or from a checkpoint's pieces, never from the whole model.

use flotilla_comm::CommError;
use flotilla_jobspec::{AdamWSpec, ModelSpec};
use tch::{Kind, Tensor};

use super::collective::Op;
use super::groups::Groups;
use super::plan::Plan;
use super::tied::Tied;
use super::weights::{CopyPiece, Weights, WeightsSlot};
use crate::checkpoint::Loaded;
use crate::hf::HfWeights;
use crate::model::{Unit, UnitInit};
use crate::optim::{self, AdamW};
use crate::types::MemoryUsage;
use crate::types::TrainError;

pub(crate) struct State {
    pub weights: WeightsSlot,
    /// Gradients: the stage's (ZeRO 0-1) or this rank's chunks' (ZeRO 2-3).
    pub grads: Tensor,
    pub adam: AdamW,
}

fn zeros(plan: &Plan, n: usize) -> Tensor {
    Tensor::zeros([n as i64], (Kind::Float, plan.device))
}

impl State {
    fn new(plan: &Plan, params: Tensor, m: Tensor, v: Tensor, step: u64) -> State {
        State {
            weights: WeightsSlot::new(Weights { params, m, v }),
            grads: zeros(plan, plan.grads_len()),
            adam: AdamW { step },
        }
    }

    /// The initial state: parameters drawn from `seed` one unit at a time
    /// (or, for a pretrained model, read unit by unit from its folder),
    /// keeping only what this rank holds; zero moments.
    pub fn init(plan: &Plan, model: &ModelSpec, seed: u64) -> Result<State, TrainError> {
        let params = zeros(plan, plan.params_len());
        let place = |i: usize, flat: Tensor| {
            let u = &plan.units[i - plan.units_range.start];
            let (src, dst) = if plan.zero >= 3 {
                (flat.narrow(0, u.own.start as i64, u.own.len() as i64), u.own_local_range())
            } else {
                (flat, u.stage_range())
            };
            tch::no_grad(|| params.narrow(0, dst.start as i64, dst.len() as i64).copy_(&src));
        };
        match model {
            ModelSpec::Llama(l) if l.pretrained => {
                let dir = l.from.as_deref().unwrap_or_default();
                let weights = HfWeights::open(std::path::Path::new(dir), &plan.layout, crate::model::tied(model))
                    .map_err(|e| TrainError::fatal("read the pretrained weights", e))?;
                let units = Unit::all(model);
                for i in plan.units_range.clone() {
                    let flat =
                        weights.unit(&units[i].1).map_err(|e| TrainError::fatal("read the pretrained weights", e))?;
                    place(i, flat);
                }
            }
            _ => {
                let units = UnitInit::new(model, seed);
                for (i, flat) in units.take(plan.units_range.end).enumerate() {
                    if i >= plan.units_range.start {
                        place(i, flat);
                    }
                }
            }
        }
        Ok(State::new(plan, params, zeros(plan, plan.moments_len()), zeros(plan, plan.moments_len()), 0))
    }

    /// The state a checkpoint's pieces (read for [`Plan::wanted`]) make.
    pub fn from_checkpoint(plan: &Plan, loaded: &Loaded) -> State {
        let t = |v: &[f32]| Tensor::from_slice(v).to_device(plan.device);
        assert_eq!(loaded.params.len(), plan.params_len(), "the checkpoint's pieces fill the parameters");
        assert_eq!(loaded.m.len(), plan.moments_len(), "the checkpoint's pieces fill the moments");
        State::new(plan, t(&loaded.params), t(&loaded.m), t(&loaded.v), loaded.manifest.optimizer_step)
    }

    /// The bytes of what this rank holds, by kind.
    pub fn memory(&self, plan: &Plan, activations: u64) -> MemoryUsage {
        let b = |n: usize| (n * 4) as u64;
        // Under bf16 a step also keeps a bf16 copy of the stage's parameters
        // (ZeRO 0-2) for its passes.
        let compute = match plan.precision {
            flotilla_jobspec::Precision::Bf16 if plan.zero < 3 => (plan.stage_len * 2) as u64,
            _ => 0,
        };
        MemoryUsage {
            params: b(plan.params_len()) + compute,
            grads: b(plan.grads_len()),
            optimizer: 2 * b(plan.moments_len()),
            activations,
            cuda: match plan.device {
                tch::Device::Cuda(g) => Some(g as u32),
                _ => None,
            },
            device_used: 0,
            device_peak: 0,
        }
    }

    /// The gradient tensors this rank owns after the step's reductions.
    fn owned_grads(&self, plan: &Plan) -> Vec<Tensor> {
        match plan.zero {
            0 => vec![self.grads.shallow_clone()],
            1 => plan
                .units
                .iter()
                .map(|u| self.grads.narrow(0, u.own_stage_range().start as i64, u.own.len() as i64))
                .collect(),
            _ => vec![self.grads.shallow_clone()],
        }
    }

    /// Squared norm of the reduced gradients this rank owns (its share of
    /// the global norm: replicas of a stage that hold the same gradients
    /// count once, through replica 0).
    /// A tied matrix counts once: its head copy is left out.
    pub fn owned_grad_squares(&self, plan: &Plan, tied: Option<&Tied>) -> f64 {
        if plan.zero == 0 && plan.replica != 0 {
            return 0.0;
        }
        let all: f64 = self.owned_grads(plan).iter().map(|g| g.square().sum(Kind::Double).double_value(&[])).sum();
        all - tied.map_or(0.0, |t| t.head_squares(plan, &self.grads))
    }

    /// Clips the owned gradients by `clip` (the coefficient, when the
    /// global norm is too large) and applies AdamW at learning rate `lr`.
    /// Waits for a running checkpoint copy first and returns it.
    pub fn update(
        &mut self,
        plan: &Plan,
        opt: &AdamWSpec,
        lr: f64,
        clip: Option<f64>,
    ) -> Option<super::weights::Copied> {
        if let Some(c) = clip {
            tch::no_grad(|| {
                for mut g in self.owned_grads(plan) {
                    let _ = g.g_mul_scalar_(c);
                }
            });
        }
        let (w, copied) = self.weights.write();
        self.adam.begin();
        match plan.zero {
            0 | 3 => self.adam.apply(opt, lr, &w.params, &self.grads, &w.m, &w.v),
            _ => {
                for u in &plan.units {
                    let own = |t: &Tensor, r: std::ops::Range<usize>| t.narrow(0, r.start as i64, r.len() as i64);
                    let g = if plan.zero == 1 {
                        own(&self.grads, u.own_stage_range())
                    } else {
                        own(&self.grads, u.own_local_range())
                    };
                    let (m, v) = (own(&w.m, u.own_local_range()), own(&w.v, u.own_local_range()));
                    self.adam.apply(opt, lr, &own(&w.params, u.own_stage_range()), &g, &m, &v);
                }
            }
        }
        copied
    }

    /// ZeRO 1-2: every replica updated its chunks; gathers the stage's
    /// parameters back whole, unit by unit.
    pub fn gather_params(&mut self, plan: &Plan, groups: &mut Groups) -> Result<(), CommError> {
        if !(1..=2).contains(&plan.zero) {
            return Ok(());
        }
        let Some(dp) = groups.dp() else { return Ok(()) };
        let (w, _) = self.weights.write();
        let tickets: Vec<_> = plan
            .units
            .iter()
            .map(|u| dp.submit(Op::AllGather, w.params.narrow(0, u.offset as i64, u.len as i64)))
            .collect();
        for t in tickets {
            let _ = dp.wait(t)?;
        }
        Ok(())
    }

    /// Where the pieces this rank writes into checkpoints live.
    pub fn copy_pieces(plan: &Plan) -> Vec<CopyPiece> {
        plan.holding()
            .iter()
            .map(|h| {
                let (params, moments) = plan.locate(h.tensor, h.start, h.end);
                CopyPiece {
                    params: params.expect("a rank holds the parameters it writes"),
                    moments: moments.expect("a rank holds the moments it writes"),
                    local: h.local,
                }
            })
            .collect()
    }
}

/// The coefficient that clips a gradient of global norm `norm`.
pub(crate) fn clip_coefficient(max: Option<f64>, norm: f64) -> Option<f64> {
    max.and_then(|m| optim::clip_coef(norm, m))
}
