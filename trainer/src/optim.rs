//! AdamW on flat f32 tensors, the learning-rate schedule (linear warmup then
//! cosine decay) and global-norm gradient clipping. The update runs as
//! tensor operations on the device that holds the state; the schedule and
//! clipping coefficient are scalars.
//!
//! The update is PyTorch's `torch.optim.AdamW` (single-tensor form:
//! decoupled weight decay, `lerp` for the first moment, bias-corrected
//! moments, eps added after the square root), operation for operation, so
//! that a PyTorch reference run computes the same numbers.

use flotilla_jobspec::{AdamWSpec, ScheduleSpec};
use tch::Tensor;

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

/// The factor that brings gradients of norm `norm` down to `max_norm` (the
/// coefficient PyTorch's `clip_grad_norm_` uses), or `None` when they are
/// already small enough.
pub fn clip_coef(norm: f64, max_norm: f64) -> Option<f64> {
    let coef = max_norm / (norm + 1e-6);
    (coef < 1.0).then_some(coef)
}

/// Elements updated at a time: bounds the scratch memory of an update to
/// two blocks, whatever the size of the state.
const BLOCK: i64 = 1 << 20;

/// AdamW's step counter. The moments are the caller's flat tensors, beside
/// the parameters they belong to.
#[derive(Debug, Default)]
pub struct AdamW {
    pub step: u64,
}

impl AdamW {
    /// Starts an update: its parts are then applied with [`AdamW::apply`].
    pub fn begin(&mut self) {
        self.step += 1;
    }

    /// Applies the current update to `params` (flat f32) with gradients
    /// `grads` and moments `m`, `v` of the same length, at learning rate `lr`.
    pub fn apply(&self, spec: &AdamWSpec, lr: f64, params: &Tensor, grads: &Tensor, m: &Tensor, v: &Tensor) {
        let n = params.numel() as i64;
        assert!(grads.numel() as i64 == n && m.numel() as i64 == n && v.numel() as i64 == n, "AdamW parts agree");
        let t = self.step as i32;
        let bias1 = 1.0 - spec.beta1.powi(t);
        let bias2_sqrt = (1.0 - spec.beta2.powi(t)).sqrt();
        let step_size = lr / bias1;
        tch::no_grad(|| {
            let len = n.min(BLOCK);
            let buf_a = Tensor::empty([len], (params.kind(), params.device()));
            let buf_b = Tensor::empty([len], (params.kind(), params.device()));
            let mut at = 0;
            while at < n {
                let k = (n - at).min(BLOCK);
                let (mut p, g) = (params.narrow(0, at, k), grads.narrow(0, at, k));
                let (mut m, mut v) = (m.narrow(0, at, k), v.narrow(0, at, k));
                let (a, mut b) = (buf_a.narrow(0, 0, k), buf_b.narrow(0, 0, k));
                if spec.weight_decay != 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * spec.weight_decay);
                }
                let _ = m.lerp_(&g, 1.0 - spec.beta1);
                // v = v * beta2 + ((1 - beta2) * g) * g, as addcmul_ with a value computes it.
                let _ = v.g_mul_scalar_(spec.beta2);
                let _ = g.mul_scalar_out(&a, 1.0 - spec.beta2);
                let _ = v.addcmul_(&a, &g);
                // denom = sqrt(v) / sqrt(1 - beta2^t) + eps
                let _ = v.sqrt_out(&b);
                let _ = b.g_div_scalar_(bias2_sqrt);
                let _ = b.g_add_scalar_(spec.eps);
                // p += (-step_size * m) / denom, as addcdiv_ with a value computes it.
                let _ = m.mul_scalar_out(&a, -step_size);
                let _ = p.addcdiv_(&a, &b);
                at += k;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AdamWSpec {
        AdamWSpec { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_slice(v)
    }

    fn values(t: &Tensor) -> Vec<f32> {
        let mut out = vec![0f32; t.numel()];
        t.copy_data(&mut out, t.numel());
        out
    }

    /// AdamW written out element by element in f64, the textbook form.
    fn reference(spec: &AdamWSpec, lr: f64, steps: usize, p: &mut [f64], g: &[f64]) {
        let (mut m, mut v) = (vec![0.0; p.len()], vec![0.0; p.len()]);
        for s in 1..=steps {
            for i in 0..p.len() {
                p[i] *= 1.0 - lr * spec.weight_decay;
                m[i] = spec.beta1 * m[i] + (1.0 - spec.beta1) * g[i];
                v[i] = spec.beta2 * v[i] + (1.0 - spec.beta2) * g[i] * g[i];
                let mh = m[i] / (1.0 - spec.beta1.powi(s as i32));
                let vh = v[i] / (1.0 - spec.beta2.powi(s as i32));
                p[i] -= lr * mh / (vh.sqrt() + spec.eps);
            }
        }
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
        let mut adam = AdamW::default();
        let (p, g, m, v) = (t(&[1.0, 1.0, 1.0]), t(&[2.0, -0.5, 0.0]), t(&[0.0; 3]), t(&[0.0; 3]));
        adam.begin();
        adam.apply(&spec(), 0.1, &p, &g, &m, &v);
        let p = values(&p);
        assert!((p[0] - 0.9).abs() < 1e-6, "{p:?}");
        assert!((p[1] - 1.1).abs() < 1e-6, "{p:?}");
        assert_eq!(p[2], 1.0);
        assert_eq!(adam.step, 1);
    }

    #[test]
    fn matches_the_textbook_update_over_many_steps() {
        let s = AdamWSpec { weight_decay: 0.1, beta2: 0.95, ..spec() };
        let g64: Vec<f64> = (0..37).map(|i| (i as f64 * 0.37).sin()).collect();
        let mut p64: Vec<f64> = (0..37).map(|i| (i as f64 * 0.11).cos()).collect();
        let (p, g) = (
            t(&p64.iter().map(|x| *x as f32).collect::<Vec<_>>()),
            t(&g64.iter().map(|x| *x as f32).collect::<Vec<_>>()),
        );
        let (m, v) = (t(&[0.0; 37]), t(&[0.0; 37]));
        let mut adam = AdamW::default();
        for _ in 0..20 {
            adam.begin();
            adam.apply(&s, 0.01, &p, &g, &m, &v);
        }
        reference(&s, 0.01, 20, &mut p64, &g64);
        for (a, b) in values(&p).iter().zip(&p64) {
            assert!((f64::from(*a) - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn an_update_applied_in_parts_equals_the_whole() {
        let grads: Vec<f32> = (0..10).map(|i| i as f32 * 0.3 - 1.0).collect();
        let p0: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let whole = (t(&p0), t(&[0.0; 10]), t(&[0.0; 10]));
        let parts = (t(&p0), t(&[0.0; 10]), t(&[0.0; 10]));
        let g = t(&grads);
        let (mut a, mut b) = (AdamW::default(), AdamW::default());
        for _ in 0..3 {
            a.begin();
            a.apply(&spec(), 0.1, &whole.0, &g, &whole.1, &whole.2);
            b.begin();
            for r in [0..4i64, 4..10] {
                let n = r.end - r.start;
                let part = |x: &Tensor| x.narrow(0, r.start, n);
                b.apply(&spec(), 0.1, &part(&parts.0), &part(&g), &part(&parts.1), &part(&parts.2));
            }
        }
        for (x, y) in [(&whole.0, &parts.0), (&whole.1, &parts.1), (&whole.2, &parts.2)] {
            assert_eq!(values(x), values(y));
        }
    }

    #[test]
    fn weight_decay_is_decoupled() {
        let mut adam = AdamW::default();
        let (p, g, m, v) = (t(&[2.0]), t(&[0.0]), t(&[0.0]), t(&[0.0]));
        adam.begin();
        adam.apply(&AdamWSpec { weight_decay: 0.5, ..spec() }, 0.1, &p, &g, &m, &v);
        assert!((values(&p)[0] - 2.0 * (1.0 - 0.05)).abs() < 1e-6);
    }

    #[test]
    fn clipping_coefficient_only_when_too_large() {
        assert!((clip_coef(5.0, 1.0).unwrap() - 0.2).abs() < 1e-6);
        assert_eq!(clip_coef(0.5, 1.0), None);
    }
}
