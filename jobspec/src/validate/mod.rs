//! Raw job file → validated `JobSpec`: checks every constraint, fills every
//! default, and names the field and position of the first problem found.
//!
//! Sections are checked in file order except where one needs another's
//! result (`parallelism` needs `workers` and `model`, `train` needs
//! `parallelism`, `data` needs `model`).

mod llama;
mod model;
pub(crate) mod registry;
mod tokenizer;
mod tokens;
mod train;

use serde_saphyr::{Location, Spanned};

use crate::defaults;
use crate::error::SpecError;
use crate::paths::{classify_checkpoint_url, CheckpointTarget};
use crate::raw::{Any, RawCheckpoint, RawEval, RawJob, RawMetrics, RawParallelism, RawWorkers};
use crate::{
    CheckpointSpec, DpSize, EvalSpec, JobSpec, MetricsSpec, ModelSpec, ParallelismSpec, PipelineSchedule, TrainSpec,
    WorkersSpec,
};

/// What every check needs: the origin for messages, and the source to
/// place "missing field" errors on their section's key.
pub(crate) struct Ctx<'a> {
    pub origin: &'a str,
    pub source: &'a str,
    /// Reads the files the job file names (see `crate::parse_with`).
    pub read_file: &'a crate::ReadFile<'a>,
}

impl Ctx<'_> {
    /// An error at the position of `at`'s value.
    pub fn err<T>(&self, path: &str, at: &Spanned<T>, message: impl Into<String>) -> SpecError {
        self.err_at(path, at.referenced, message)
    }

    /// `field` is required in the section at `path`, whose value is `section`.
    pub fn missing<T>(&self, path: &str, section: &Spanned<T>, field: &str) -> SpecError {
        self.err(path, section, format!("missing field `{field}`")).at_key_of(self.source, path)
    }

    pub fn err_at(&self, path: &str, at: Location, message: impl Into<String>) -> SpecError {
        SpecError::new(self.origin, path, at, message)
    }

    /// `value >= 1`.
    pub fn at_least_one<T: Copy + PartialOrd + From<u8> + std::fmt::Display>(
        &self,
        path: &str,
        value: &Spanned<T>,
    ) -> Result<T, SpecError> {
        if value.value >= T::from(1) {
            Ok(value.value)
        } else {
            Err(self.err(path, value, format!("must be at least 1, found {}", value.value)))
        }
    }

    /// A finite float, so that the spec survives JSON.
    pub fn finite(&self, path: &str, value: &Spanned<f64>) -> Result<f64, SpecError> {
        if value.value.is_finite() {
            Ok(value.value)
        } else {
            Err(self.err(path, value, format!("must be a finite number, found {}", value.value)))
        }
    }
}

/// Validates the whole file.
pub(crate) fn job(raw: RawJob, cx: &Ctx) -> Result<JobSpec, SpecError> {
    let name = name(cx, &raw.name)?;
    let model = model::model(cx, &raw.model)?;
    let data = model::data(cx, &raw.data, &raw.model, &model)?;
    let workers = workers(cx, raw.workers.as_ref())?;
    let parallelism = parallelism(cx, raw.parallelism.as_ref(), &workers, &model)?;
    let train = train::train(cx, &raw.train, workers.max / parallelism.pp)?;
    batch_split(cx, &raw, &train, &parallelism, &workers)?;
    let checkpoint = checkpoint(cx, raw.checkpoint.as_ref(), train.steps)?;
    let registry = raw.registry.as_ref().map(|r| registry::registry(cx, r, &name)).transpose()?;
    let eval = raw.eval.as_ref().map(|e| eval(cx, e, &raw, &model, &train)).transpose()?;
    let priority = raw.priority.as_ref().map_or(Ok(defaults::PRIORITY), |p| priority(cx, p))?;
    let metrics = raw.metrics.as_ref().map_or(Ok(MetricsSpec::default()), |m| metrics(cx, m))?;
    Ok(JobSpec { name, model, data, train, parallelism, workers, checkpoint, registry, eval, priority, metrics })
}

/// `metrics`: `tensorboard` is a local folder (a path or a `file://` URL).
fn metrics(cx: &Ctx, raw: &Spanned<RawMetrics>) -> Result<MetricsSpec, SpecError> {
    let Some(dir) = &raw.value.tensorboard else { return Ok(MetricsSpec::default()) };
    match classify_checkpoint_url(&dir.value) {
        Ok(CheckpointTarget::Path(_) | CheckpointTarget::FileUrl(_)) => {
            Ok(MetricsSpec { tensorboard: Some(dir.value.clone()) })
        }
        Ok(CheckpointTarget::ObjectStore) => Err(cx.err(
            "metrics.tensorboard",
            dir,
            "must be a local folder (rank 0's worker writes the event files there); object-store URLs are not \
             supported",
        )),
        Err(problem) => Err(cx.err("metrics.tensorboard", dir, problem)),
    }
}

/// `priority`: an integer within `-PRIORITY_LIMIT..=PRIORITY_LIMIT`.
fn priority(cx: &Ctx, p: &Spanned<i64>) -> Result<i32, SpecError> {
    let limit = defaults::PRIORITY_LIMIT;
    match i32::try_from(p.value) {
        Ok(v) if (-limit..=limit).contains(&v) => Ok(v),
        _ => Err(cx.err("priority", p, format!("must be between -{limit} and {limit}, found {}", p.value))),
    }
}

/// `eval`: its data checked as `data` is, against the same model.
fn eval(
    cx: &Ctx,
    raw: &Spanned<RawEval>,
    job: &RawJob,
    model: &ModelSpec,
    train: &TrainSpec,
) -> Result<EvalSpec, SpecError> {
    let e = &raw.value;
    let data = model::data_at(cx, "eval.data", &e.data, &job.model, model)?;
    let every = e.every.as_ref().map_or(0, |v| v.value);
    let batches = match &e.batches {
        None => 1,
        Some(b) => cx.at_least_one("eval.batches", b)?,
    };
    let batch = match &e.batch {
        None => train.global_batch,
        Some(b) => cx.at_least_one("eval.batch", b)?,
    };
    if let Some(b) = e.batches.as_ref().filter(|_| batches.saturating_mul(batch) > defaults::EVAL_SAMPLES_LIMIT) {
        return Err(cx.err(
            "eval.batches",
            b,
            format!(
                "{batches} batches of {batch} samples is more than {} samples per evaluation",
                defaults::EVAL_SAMPLES_LIMIT
            ),
        ));
    }
    Ok(EvalSpec { data, every, batches, batch })
}

/// Checks `version` (read before the rest of the file, see `crate::parse`).
pub(crate) fn version(cx: &Ctx, version: Option<&Spanned<Any>>) -> Result<(), SpecError> {
    match version {
        None => Ok(()),
        Some(v) if v.value == Any::Int(defaults::VERSION) => Ok(()),
        Some(v) => Err(cx.err(
            "version",
            v,
            format!("unsupported job file version {}; this flotilla reads version {}", v.value, defaults::VERSION),
        )),
    }
}

/// `[a-z0-9][a-z0-9-]{0,62}`.
fn name(cx: &Ctx, name: &Spanned<String>) -> Result<String, SpecError> {
    let s = &name.value;
    let lower_alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let bad_char = s.chars().find(|&c| !(lower_alnum(c) || c == '-'));
    let problem = if s.is_empty() {
        Some("must not be empty".to_owned())
    } else if s.chars().count() > defaults::NAME_MAX_LEN {
        Some(format!("must be at most {} characters long", defaults::NAME_MAX_LEN))
    } else if !s.starts_with(lower_alnum) {
        Some("must start with a lowercase letter or a digit".to_owned())
    } else {
        bad_char.map(|c| format!("may only hold lowercase letters, digits and `-`, not {c:?}"))
    };
    match problem {
        None => Ok(s.clone()),
        Some(p) => Err(cx.err(
            "name",
            name,
            format!(
                "{p}, found {s:?} (a name matches [a-z0-9][a-z0-9-]{{0,62}}: \
                 it is used in ids and paths)"
            ),
        )),
    }
}

/// `min` defaults to 1 and `max` to `min`; `1 <= min <= max <= 1024`.
fn workers(cx: &Ctx, raw: Option<&Spanned<RawWorkers>>) -> Result<WorkersSpec, SpecError> {
    let (min, max) = match raw {
        None => (None, None),
        Some(w) => (w.value.min.as_ref(), w.value.max.as_ref()),
    };
    let limit = defaults::WORKERS_LIMIT;
    let min_v = match min {
        None => defaults::WORKERS_MIN,
        Some(m) => {
            let v = cx.at_least_one("workers.min", m)?;
            if v > limit {
                return Err(cx.err("workers.min", m, format!("must be at most {limit}, found {v}")));
            }
            v
        }
    };
    let max_v = match max {
        None => min_v,
        Some(m) => {
            let v = cx.at_least_one("workers.max", m)?;
            if v > limit {
                return Err(cx.err("workers.max", m, format!("must be at most {limit}, found {v}")));
            }
            v
        }
    };
    if let Some(m) = min.filter(|_| min_v > max_v) {
        return Err(cx.err("workers.min", m, format!("must be at most workers.max ({max_v}), found {min_v}")));
    }
    Ok(WorkersSpec { min: min_v, max: max_v })
}

fn parallelism(
    cx: &Ctx,
    raw: Option<&Spanned<RawParallelism>>,
    workers: &WorkersSpec,
    model: &ModelSpec,
) -> Result<ParallelismSpec, SpecError> {
    let mut spec = ParallelismSpec {
        dp: DpSize::Auto,
        bucket_mb: defaults::BUCKET_MB,
        pp: 1,
        zero: 0,
        micro_batches: None,
        schedule: PipelineSchedule::default(),
        split: None,
        overlap: true,
    };
    let Some(raw) = raw else {
        return Ok(spec);
    };
    let p = &raw.value;
    let layers = model.pipeline_layers();
    if let Some(pp) = &p.pp {
        spec.pp = match pp.value {
            Any::Int(n) if n >= 1 && n as usize <= layers => n as usize,
            Any::Int(n) if n >= 1 => {
                return Err(cx.err(
                    "parallelism.pp",
                    pp,
                    format!(
                        "{n} pipeline stages is more than the model's {}; each stage needs at least one layer",
                        model.pipeline_layers_described()
                    ),
                ))
            }
            ref other => {
                return Err(cx.err(
                    "parallelism.pp",
                    pp,
                    format!("must be an integer from 1 to {layers}, found {other}"),
                ))
            }
        };
    }
    let pp = spec.pp;
    if pp > 1 {
        for (path, n) in [("workers.min", workers.min), ("workers.max", workers.max)] {
            if n % pp != 0 {
                return Err(cx.err(
                    "parallelism.pp",
                    p.pp.as_ref().expect("pp > 1 was given"),
                    format!("{path} ({n}) must be a multiple of pp ({pp}): each data-parallel replica is {pp} workers"),
                ));
            }
        }
    }
    if let Some(zero) = &p.zero {
        spec.zero = match zero.value {
            Any::Int(n @ 0..=3) => n as u8,
            ref other => {
                return Err(cx.err("parallelism.zero", zero, format!("must be 0, 1, 2 or 3, found {other}")));
            }
        };
    }
    if let Some(s) = &p.schedule {
        spec.schedule = match &s.value {
            Any::Str(v) if v == "gpipe" => PipelineSchedule::Gpipe,
            Any::Str(v) if v == "1f1b" => PipelineSchedule::OneFOneB,
            other => {
                return Err(cx.err("parallelism.schedule", s, format!("must be `gpipe` or `1f1b`, found {other}")));
            }
        };
    }
    if let Some(m) = &p.micro_batches {
        spec.micro_batches = match m.value {
            Any::Int(n) if n >= 1 => Some(n as usize),
            ref other => {
                return Err(cx.err(
                    "parallelism.micro_batches",
                    m,
                    format!("must be a positive integer, found {other}"),
                ));
            }
        };
    }
    if let Some(split) = &p.split {
        if split.value.len() != pp {
            return Err(cx.err(
                "parallelism.split",
                split,
                format!("must list the layers of each of the {pp} stages, found {} entries", split.value.len()),
            ));
        }
        if let Some(zero) = split.value.iter().find(|n| n.value == 0) {
            return Err(cx.err("parallelism.split", zero, "every stage needs at least one layer, found 0"));
        }
        let sum: u64 = split.value.iter().map(|n| n.value).sum();
        if sum != layers as u64 {
            return Err(cx.err(
                "parallelism.split",
                split,
                format!("must add up to the model's {}, adds up to {sum}", model.pipeline_layers_described()),
            ));
        }
        spec.split = Some(split.value.iter().map(|n| n.value as usize).collect());
    }
    let (min_dp, max_dp) = (workers.min.div_ceil(pp), workers.max / pp);
    if let Some(dp) = &p.dp {
        spec.dp = match &dp.value {
            Any::Str(s) if s == "auto" => DpSize::Auto,
            Any::Int(n) if usize::try_from(*n).is_ok_and(|n| (min_dp..=max_dp).contains(&n)) => {
                DpSize::Fixed(*n as usize)
            }
            other => {
                let what = if pp > 1 {
                    format!("workers.min/pp..=workers.max/pp ({min_dp}..={max_dp}) replicas of {pp} stages")
                } else {
                    format!("workers.min..=workers.max ({min_dp}..={max_dp})")
                };
                return Err(cx.err("parallelism.dp", dp, format!("must be `auto` or within {what}, found {other}")));
            }
        };
    }
    if let Some(o) = &p.overlap {
        spec.overlap = o.value;
    }
    if let Some(b) = &p.bucket_mb {
        let v = cx.finite("parallelism.bucket_mb", b)?;
        if v <= 0.0 || v > defaults::BUCKET_MB_LIMIT {
            return Err(cx.err(
                "parallelism.bucket_mb",
                b,
                format!("must be > 0 and at most {}, found {v}", defaults::BUCKET_MB_LIMIT),
            ));
        }
        spec.bucket_mb = v;
    }
    Ok(spec)
}

/// Checks that need both `train` and `parallelism`: how the global batch
/// splits into replicas and micro-batches.
fn batch_split(
    cx: &Ctx,
    raw: &RawJob,
    train: &TrainSpec,
    par: &ParallelismSpec,
    workers: &WorkersSpec,
) -> Result<(), SpecError> {
    let Some(m) = par.micro_batches else { return Ok(()) };
    let at = raw.parallelism.as_ref().and_then(|p| p.value.micro_batches.as_ref()).expect("micro_batches was given");
    if let Some(mb) = &raw.train.value.micro_batch {
        return Err(cx.err(
            "parallelism.micro_batches",
            at,
            format!(
                "set either train.micro_batch (line {}) or parallelism.micro_batches, not both",
                mb.referenced.line()
            ),
        ));
    }
    let g = train.global_batch;
    match par.dp {
        DpSize::Fixed(dp) if g % (dp * m) != 0 => Err(cx.err(
            "parallelism.micro_batches",
            at,
            format!(
                "train.global_batch ({g}) must be divisible by dp ({dp}) x micro_batches ({m}), so that every micro-batch has the same size"
            ),
        )),
        DpSize::Auto if g < m * (workers.max / par.pp) => Err(cx.err(
            "parallelism.micro_batches",
            at,
            format!(
                "train.global_batch ({g}) is too small for {m} micro-batches on each of up to {} replicas",
                workers.max / par.pp
            ),
        )),
        _ => Ok(()),
    }
}

fn checkpoint(cx: &Ctx, raw: Option<&Spanned<RawCheckpoint>>, steps: u64) -> Result<CheckpointSpec, SpecError> {
    let mut spec = CheckpointSpec {
        url: defaults::CHECKPOINT_URL.to_owned(),
        every: defaults::CHECKPOINT_EVERY,
        keep: defaults::CHECKPOINT_KEEP,
        resume_from: None,
    };
    let Some(raw) = raw else {
        return Ok(spec);
    };
    let c = &raw.value;
    if let Some(url) = &c.url {
        classify_checkpoint_url(&url.value).map_err(|m| cx.err("checkpoint.url", url, m))?;
        spec.url = url.value.clone();
    }
    if let Some(every) = &c.every {
        if every.value > steps {
            return Err(cx.err(
                "checkpoint.every",
                every,
                format!("must be at most train.steps ({steps}), or 0 for only the final model; found {}", every.value),
            ));
        }
        spec.every = every.value;
    }
    if let Some(keep) = &c.keep {
        spec.keep = cx.at_least_one("checkpoint.keep", keep)?;
    }
    if let Some(from) = &c.resume_from {
        classify_checkpoint_url(&from.value).map_err(|m| cx.err("checkpoint.resume_from", from, m))?;
        spec.resume_from = Some(from.value.clone());
    }
    Ok(spec)
}
