//! Raw job file → validated `JobSpec`: checks every constraint, fills every
//! default, and names the field and position of the first problem found.
//!
//! Sections are checked in file order except where one needs another's
//! result (`train` and `parallelism` need `workers`, `data` needs `model`).

mod model;
pub(crate) mod registry;
mod train;

use serde_saphyr::{Location, Spanned};

use crate::defaults;
use crate::error::SpecError;
use crate::paths::classify_checkpoint_url;
use crate::raw::{Any, RawCheckpoint, RawJob, RawParallelism, RawWorkers};
use crate::{CheckpointSpec, DpSize, JobSpec, ParallelismSpec, WorkersSpec};

/// What every check needs: the origin for messages, and the source to
/// place "missing field" errors on their section's key.
pub(crate) struct Ctx<'a> {
    pub origin: &'a str,
    pub source: &'a str,
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
pub(crate) fn job(raw: RawJob, origin: &str, source: &str) -> Result<JobSpec, SpecError> {
    let cx = Ctx { origin, source };
    let name = name(&cx, &raw.name)?;
    let model = model::model(&cx, &raw.model)?;
    let data = model::data(&cx, &raw.data, &raw.model, &model)?;
    let workers = workers(&cx, raw.workers.as_ref())?;
    let train = train::train(&cx, &raw.train, &workers)?;
    let parallelism = parallelism(&cx, raw.parallelism.as_ref(), &workers)?;
    let checkpoint = checkpoint(&cx, raw.checkpoint.as_ref(), train.steps)?;
    let registry = raw.registry.as_ref().map(|r| registry::registry(&cx, r, &name)).transpose()?;
    Ok(JobSpec { name, model, data, train, parallelism, workers, checkpoint, registry })
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
) -> Result<ParallelismSpec, SpecError> {
    let Some(raw) = raw else {
        return Ok(ParallelismSpec { dp: DpSize::Auto, bucket_mb: defaults::BUCKET_MB });
    };
    let p = &raw.value;
    if let Some(pp) = p.pp.as_ref().filter(|v| v.value != Any::Int(defaults::PP)) {
        return Err(cx.err(
            "parallelism.pp",
            pp,
            format!("pipeline parallelism is not yet supported (only pp: {}); found {}", defaults::PP, pp.value),
        ));
    }
    if let Some(zero) = p.zero.as_ref().filter(|v| v.value != Any::Int(defaults::ZERO)) {
        return Err(cx.err(
            "parallelism.zero",
            zero,
            format!("ZeRO is not yet supported (only zero: {}); found {}", defaults::ZERO, zero.value),
        ));
    }
    if let Some(s) = &p.schedule {
        return Err(cx.err("parallelism.schedule", s, "pipeline schedules are not yet supported"));
    }
    if let Some(m) = &p.micro_batches {
        return Err(cx.err(
            "parallelism.micro_batches",
            m,
            "pipeline micro-batches are not yet supported (gradient accumulation follows train.micro_batch)",
        ));
    }
    let dp = match &p.dp {
        None => DpSize::Auto,
        Some(dp) => match &dp.value {
            Any::Str(s) if s == "auto" => DpSize::Auto,
            Any::Int(n) if usize::try_from(*n).is_ok_and(|n| (workers.min..=workers.max).contains(&n)) => {
                DpSize::Fixed(*n as usize)
            }
            other => {
                return Err(cx.err(
                    "parallelism.dp",
                    dp,
                    format!(
                        "must be `auto` or within workers.min..=workers.max ({}..={}), found {other}",
                        workers.min, workers.max
                    ),
                ));
            }
        },
    };
    let bucket_mb = match &p.bucket_mb {
        None => defaults::BUCKET_MB,
        Some(b) => {
            let v = cx.finite("parallelism.bucket_mb", b)?;
            if v <= 0.0 || v > defaults::BUCKET_MB_LIMIT {
                return Err(cx.err(
                    "parallelism.bucket_mb",
                    b,
                    format!("must be > 0 and at most {}, found {v}", defaults::BUCKET_MB_LIMIT),
                ));
            }
            v
        }
    };
    Ok(ParallelismSpec { dp, bucket_mb })
}

fn checkpoint(cx: &Ctx, raw: Option<&Spanned<RawCheckpoint>>, steps: u64) -> Result<CheckpointSpec, SpecError> {
    let mut spec = CheckpointSpec {
        url: defaults::CHECKPOINT_URL.to_owned(),
        every: defaults::CHECKPOINT_EVERY,
        keep: defaults::CHECKPOINT_KEEP,
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
    Ok(spec)
}
