//! `train`, with its `optimizer` and `schedule` subsections.

use serde_saphyr::Spanned;

use super::Ctx;
use crate::defaults;
use crate::error::SpecError;
use crate::raw::{Any, RawOptimizer, RawSchedule, RawTrain};
use crate::{AdamWSpec, DeviceChoice, Precision, ScheduleSpec, TrainSpec};

/// `max_replicas`: the most data-parallel replicas the job can run with.
pub(super) fn train(cx: &Ctx, raw: &Spanned<RawTrain>, max_replicas: usize) -> Result<TrainSpec, SpecError> {
    let t = &raw.value;
    let steps = cx.at_least_one("train.steps", &t.steps)?;
    let global_batch = cx.at_least_one("train.global_batch", &t.global_batch)?;
    if global_batch < max_replicas {
        return Err(cx.err(
            "train.global_batch",
            &t.global_batch,
            format!(
                "must be at least the largest number of data-parallel replicas ({max_replicas}: workers.max / parallelism.pp) so that every replica gets a sample, found {global_batch}"
            ),
        ));
    }
    let micro_batch = match &t.micro_batch {
        None => global_batch,
        Some(m) => {
            let v = cx.at_least_one("train.micro_batch", m)?;
            if v > global_batch {
                return Err(cx.err(
                    "train.micro_batch",
                    m,
                    format!("must be at most train.global_batch ({global_batch}), found {v}"),
                ));
            }
            v
        }
    };
    let optimizer = optimizer(cx, t.optimizer.as_ref())?;
    let schedule = schedule(cx, t.schedule.as_ref(), steps, optimizer.lr)?;
    let grad_clip = match &t.grad_clip {
        None => None,
        Some(g) => Some(positive(cx, "train.grad_clip", g)?),
    };
    let precision = match &t.precision {
        None => Precision::default(),
        Some(p) => match &p.value {
            Any::Str(v) if v == "fp32" => Precision::Fp32,
            Any::Str(v) if v == "bf16" => Precision::Bf16,
            other => return Err(cx.err("train.precision", p, format!("must be `fp32` or `bf16`, found {other}"))),
        },
    };
    let device = match &t.device {
        None => DeviceChoice::default(),
        Some(d) => match &d.value {
            Any::Str(v) if v == "auto" => DeviceChoice::Auto,
            Any::Str(v) if v == "cpu" => DeviceChoice::Cpu,
            Any::Str(v) if v == "cuda" => DeviceChoice::Cuda,
            other => return Err(cx.err("train.device", d, format!("must be `auto`, `cpu` or `cuda`, found {other}"))),
        },
    };
    Ok(TrainSpec {
        precision,
        device,
        activation_checkpointing: t.activation_checkpointing.as_ref().is_some_and(|a| a.value),
        steps,
        global_batch,
        micro_batch,
        seed: t.seed.as_ref().map_or(defaults::TRAIN_SEED, |s| s.value),
        optimizer,
        schedule,
        grad_clip,
    })
}

/// A finite float > 0.
fn positive(cx: &Ctx, path: &str, v: &Spanned<f64>) -> Result<f64, SpecError> {
    let x = cx.finite(path, v)?;
    if x > 0.0 {
        Ok(x)
    } else {
        Err(cx.err(path, v, format!("must be greater than 0, found {x}")))
    }
}

/// A finite float in `[0, 1)`.
fn unit_interval(cx: &Ctx, path: &str, v: &Spanned<f64>) -> Result<f64, SpecError> {
    let x = cx.finite(path, v)?;
    if (0.0..1.0).contains(&x) {
        Ok(x)
    } else {
        Err(cx.err(path, v, format!("must be in [0, 1), found {x}")))
    }
}

fn optimizer(cx: &Ctx, raw: Option<&Spanned<RawOptimizer>>) -> Result<AdamWSpec, SpecError> {
    let mut spec = AdamWSpec {
        lr: defaults::LR,
        beta1: defaults::BETA1,
        beta2: defaults::BETA2,
        eps: defaults::EPS,
        weight_decay: defaults::WEIGHT_DECAY,
    };
    let Some(raw) = raw else {
        return Ok(spec);
    };
    let o = &raw.value;
    if let Some(lr) = &o.lr {
        spec.lr = positive(cx, "train.optimizer.lr", lr)?;
    }
    if let Some(betas) = &o.betas {
        let [b1, b2] = betas.value.as_slice() else {
            return Err(cx.err(
                "train.optimizer.betas",
                betas,
                format!("must hold exactly two values [beta1, beta2], found {}", betas.value.len()),
            ));
        };
        spec.beta1 = unit_interval(cx, "train.optimizer.betas[0]", b1)?;
        spec.beta2 = unit_interval(cx, "train.optimizer.betas[1]", b2)?;
    }
    if let Some(eps) = &o.eps {
        spec.eps = positive(cx, "train.optimizer.eps", eps)?;
    }
    if let Some(wd) = &o.weight_decay {
        let x = cx.finite("train.optimizer.weight_decay", wd)?;
        if x < 0.0 {
            return Err(cx.err("train.optimizer.weight_decay", wd, format!("must be at least 0, found {x}")));
        }
        spec.weight_decay = x;
    }
    Ok(spec)
}

fn schedule(cx: &Ctx, raw: Option<&Spanned<RawSchedule>>, steps: u64, lr: f64) -> Result<ScheduleSpec, SpecError> {
    let mut spec = ScheduleSpec { warmup_steps: defaults::WARMUP_STEPS, min_lr: defaults::MIN_LR };
    let Some(raw) = raw else {
        return Ok(spec);
    };
    let s = &raw.value;
    if let Some(w) = &s.warmup_steps {
        if w.value > steps {
            return Err(cx.err(
                "train.schedule.warmup_steps",
                w,
                format!("must be at most train.steps ({steps}), found {}", w.value),
            ));
        }
        spec.warmup_steps = w.value;
    }
    if let Some(m) = &s.min_lr {
        let x = cx.finite("train.schedule.min_lr", m)?;
        if !(0.0..=lr).contains(&x) {
            return Err(cx.err(
                "train.schedule.min_lr",
                m,
                format!("must be in [0, train.optimizer.lr] = [0, {lr}], found {x}"),
            ));
        }
        spec.min_lr = x;
    }
    Ok(spec)
}
