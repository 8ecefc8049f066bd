//! AdamW on flat f32 buffers, the learning-rate schedule (linear warmup then
//! cosine decay) and global-norm gradient clipping. Pure functions: the train
//! loop hands in buffers, nothing here touches tensors or I/O.
//!
//! The update follows PyTorch's `torch.optim.AdamW` (decoupled weight decay,
//! bias-corrected moments, eps added after the square root), so that a
//! PyTorch reference run computes the same numbers.

use flotilla_jobspec::{AdamWSpec, ScheduleSpec};

/// Learning rate for 0-based update `step` of `total`.
pub fn learning_rate(opt: &AdamWSpec, sched: &ScheduleSpec, step: u64, total: u64) -> f64 {
    let warmup = sched.warmup_steps;
    if step < warmup {
        return opt.lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    sched.min_lr + 0.5 * (opt.lr - sched.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Euclidean norm of `grads`, accumulated in f64.
pub fn global_norm(grads: &[f32]) -> f64 {
    grads.iter().map(|g| f64::from(*g) * f64::from(*g)).sum::<f64>().sqrt()
}

/// The factor that brings gradients of norm `norm` down to `max_norm` (the
/// coefficient PyTorch's `clip_grad_norm_` uses), or `None` when they are
/// already small enough.
pub fn clip_coef(norm: f64, max_norm: f64) -> Option<f32> {
    let coef = max_norm / (norm + 1e-6);
    (coef < 1.0).then_some(coef as f32)
}

/// Scales `grads` so that their norm is at most `max_norm`. Returns the norm
/// before clipping.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f64) -> f64 {
    let norm = global_norm(grads);
    if let Some(c) = clip_coef(norm, max_norm) {
        grads.iter_mut().for_each(|g| *g *= c);
    }
    norm
}

/// AdamW's state: first and second moments and the number of updates done.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub step: u64,
}

impl AdamW {
    pub fn new(len: usize) -> Self {
        AdamW { m: vec![0.0; len], v: vec![0.0; len], step: 0 }
    }

    /// One update of all of `params` with `grads` at learning rate `lr`.
    pub fn update(&mut self, spec: &AdamWSpec, lr: f64, params: &mut [f32], grads: &[f32]) {
        assert_eq!(params.len(), self.m.len());
        self.begin();
        self.apply(spec, lr, 0, params, grads);
    }

    /// Starts an update: the parts are then applied with [`AdamW::apply`].
    pub fn begin(&mut self) {
        self.step += 1;
    }

    /// Applies the current update to the parameters `offset..offset+len`
    /// (`params` is that slice of the flat parameters, `grads` its gradients).
    pub fn apply(&mut self, spec: &AdamWSpec, lr: f64, offset: usize, params: &mut [f32], grads: &[f32]) {
        assert_eq!(params.len(), grads.len());
        let t = self.step as i32;
        let (b1, b2) = (spec.beta1, spec.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2_sqrt = (1.0 - b2.powi(t)).sqrt();
        let step_size = (lr / bc1) as f32;
        let decay = (1.0 - lr * spec.weight_decay) as f32;
        let (b1f, b2f) = (b1 as f32, b2 as f32);
        let (one_b1, one_b2) = ((1.0 - b1) as f32, (1.0 - b2) as f32);
        let bc2_sqrt = bc2_sqrt as f32;
        let eps = spec.eps as f32;
        let (m, v) = (&mut self.m[offset..offset + params.len()], &mut self.v[offset..offset + params.len()]);
        for (((p, g), m), v) in params.iter_mut().zip(grads).zip(m.iter_mut()).zip(v.iter_mut()) {
            *p *= decay;
            *m = b1f * *m + one_b1 * g;
            *v = b2f * *v + one_b2 * g * g;
            let denom = v.sqrt() / bc2_sqrt + eps;
            *p -= step_size * *m / denom;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AdamWSpec {
        AdamWSpec { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }

    #[test]
    fn warmup_is_linear_then_cosine_reaches_min_lr() {
        let opt = AdamWSpec { lr: 1.0, ..spec() };
        let sched = ScheduleSpec { warmup_steps: 4, min_lr: 0.1 };
        let lrs: Vec<f64> = (0..4).map(|s| learning_rate(&opt, &sched, s, 14)).collect();
        assert_eq!(lrs, vec![0.25, 0.5, 0.75, 1.0]);
        assert!((learning_rate(&opt, &sched, 9, 14) - 0.55).abs() < 1e-12, "half way is the mean");
        assert!((learning_rate(&opt, &sched, 14, 14) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn first_adam_step_moves_each_parameter_by_lr_against_its_gradient() {
        // With bias correction, the first update is lr * g/|g| (up to eps).
        let mut adam = AdamW::new(3);
        let mut p = vec![1.0f32, 1.0, 1.0];
        adam.update(&spec(), 0.1, &mut p, &[2.0, -0.5, 0.0]);
        assert!((p[0] - 0.9).abs() < 1e-6, "{p:?}");
        assert!((p[1] - 1.1).abs() < 1e-6, "{p:?}");
        assert_eq!(p[2], 1.0);
        assert_eq!(adam.step, 1);
    }

    #[test]
    fn an_update_applied_in_parts_equals_the_whole() {
        let grads: Vec<f32> = (0..10).map(|i| i as f32 * 0.3 - 1.0).collect();
        let mut whole = AdamW::new(10);
        let mut parts = AdamW::new(10);
        let mut p1: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let mut p2 = p1.clone();
        for _ in 0..3 {
            whole.update(&spec(), 0.1, &mut p1, &grads);
            parts.begin();
            parts.apply(&spec(), 0.1, 0, &mut p2[..4], &grads[..4]);
            parts.apply(&spec(), 0.1, 4, &mut p2[4..], &grads[4..]);
        }
        assert_eq!(p1, p2);
        assert_eq!(whole, parts);
    }

    #[test]
    fn weight_decay_is_decoupled() {
        let mut adam = AdamW::new(1);
        let mut p = vec![2.0f32];
        adam.update(&AdamWSpec { weight_decay: 0.5, ..spec() }, 0.1, &mut p, &[0.0]);
        assert!((p[0] - 2.0 * (1.0 - 0.05)).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn clipping_scales_to_the_max_norm_and_leaves_small_gradients() {
        let mut g = vec![3.0f32, 4.0];
        assert_eq!(clip_grad_norm(&mut g, 1.0), 5.0);
        assert!((global_norm(&g) - 1.0).abs() < 1e-5);
        let mut small = vec![0.3f32, 0.4];
        clip_grad_norm(&mut small, 1.0);
        assert_eq!(small, vec![0.3, 0.4]);
    }
}
