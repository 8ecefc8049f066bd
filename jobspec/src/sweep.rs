//! Sweep files: a base job file, parameters by dotted field path (a grid of
//! `values`, or distributions for random search), how many trials run at
//! once, the metric that ranks them and early stopping. Parsing names the
//! field and line of every problem; [`trials`] makes each trial's job file
//! (the base job with its overrides) and validates every one of them.
//!
//! Pure: the caller passes the texts; the trial generator is seeded.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use serde_saphyr::Spanned;

use crate::error::SpecError;
use crate::validate::Ctx;

type S<T> = Spanned<T>;

/// The most trials one sweep may have.
pub const MAX_TRIALS: usize = 256;
/// The most parameters one sweep may vary.
pub const MAX_PARAMETERS: usize = 32;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSweep {
    name: S<String>,
    job: S<String>,
    parameters: S<BTreeMap<String, S<RawParam>>>,
    trials: Option<S<u64>>,
    max_parallel: Option<S<u64>>,
    metric: Option<S<RawMetric>>,
    early_stopping: Option<S<RawEarlyStopping>>,
    seed: Option<S<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawParam {
    values: Option<S<Vec<Value>>>,
    distribution: Option<S<String>>,
    min: Option<S<f64>>,
    max: Option<S<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetric {
    name: S<String>,
    goal: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEarlyStopping {
    rule: S<String>,
    warmup_steps: Option<S<u64>>,
}

/// How a parameter's values are chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Domain {
    /// Every one of these (grid), or one at random (`choice`, random search).
    Values(Vec<Value>),
    Uniform {
        min: f64,
        max: f64,
    },
    LogUniform {
        min: f64,
        max: f64,
    },
    /// An integer in `min..=max`.
    Int {
        min: i64,
        max: i64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Parameter {
    /// A dotted field path in the job file, such as `train.optimizer.lr`.
    pub path: String,
    pub domain: Domain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricName {
    /// Training loss, as rank 0 reports it each step.
    Loss,
    /// Validation loss (jobs with an `eval:` section).
    EvalLoss,
}

impl MetricName {
    pub fn as_str(self) -> &'static str {
        match self {
            MetricName::Loss => "loss",
            MetricName::EvalLoss => "eval_loss",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    Minimize,
    Maximize,
}

impl Goal {
    pub fn as_str(self) -> &'static str {
        match self {
            Goal::Minimize => "minimize",
            Goal::Maximize => "maximize",
        }
    }
}

/// A validated sweep file.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepSpec {
    pub name: String,
    /// The base job file, relative to the sweep file's folder.
    pub job: String,
    pub parameters: Vec<Parameter>,
    /// Grid: the product of the values; random search: `trials`.
    pub trials: usize,
    /// Random search (some parameter has a distribution) rather than a grid.
    pub random: bool,
    pub max_parallel: u32,
    pub metric: MetricName,
    pub goal: Goal,
    /// The median rule's warm-up in steps, when early stopping is on.
    pub early_stopping: Option<u64>,
    pub seed: u64,
}

/// One trial: the values it takes and its job file.
#[derive(Debug, Clone, PartialEq)]
pub struct Trial {
    pub params: Vec<(String, Value)>,
    /// The base job with the overrides applied (JSON, which is YAML).
    pub job_yaml: String,
    /// That job file, validated.
    pub spec: crate::JobSpec,
}

/// Parses and validates a sweep file. `origin` names it in messages.
pub fn parse_sweep(source: &str, origin: &str) -> Result<SweepSpec, SpecError> {
    let raw: RawSweep = crate::deserialize(source, origin)?;
    let no_files = |_: &str, _: u64| Err("not read here".to_string());
    let cx = Ctx { origin, source, read_file: &no_files };
    let name = raw.name.value.trim().to_string();
    if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(cx.err("name", &raw.name, "must be 1 to 64 letters, digits, '-' or '_'"));
    }
    if raw.job.value.trim().is_empty() {
        return Err(cx.err("job", &raw.job, "must name the base job file"));
    }
    if raw.parameters.value.is_empty() {
        return Err(cx.err("parameters", &raw.parameters, "must vary at least one field"));
    }
    if raw.parameters.value.len() > MAX_PARAMETERS {
        return Err(cx.err("parameters", &raw.parameters, format!("at most {MAX_PARAMETERS} parameters")));
    }
    let mut parameters = Vec::new();
    for (path, p) in &raw.parameters.value {
        parameters.push(parameter(&cx, path, p)?);
    }
    let random = parameters.iter().any(|p| !matches!(p.domain, Domain::Values(_)))
        || raw.parameters.value.values().any(|p| p.value.distribution.is_some());
    let trials = match (&raw.trials, random) {
        (Some(t), true) => {
            let n = cx.at_least_one("trials", t)?;
            if n as usize > MAX_TRIALS {
                return Err(cx.err("trials", t, format!("at most {MAX_TRIALS} trials")));
            }
            n as usize
        }
        (None, true) => {
            return Err(cx.err("trials", &raw.parameters, "random search needs `trials`, how many trials to run"));
        }
        (Some(t), false) => {
            return Err(cx.err("trials", t, "a grid runs every combination of `values`; `trials` is for random search"))
        }
        (None, false) => {
            let n = parameters.iter().try_fold(1usize, |n, p| match &p.domain {
                Domain::Values(v) => n.checked_mul(v.len()),
                _ => Some(n),
            });
            match n {
                Some(n) if n <= MAX_TRIALS => n,
                _ => {
                    return Err(cx.err(
                        "parameters",
                        &raw.parameters,
                        format!("the grid has more than {MAX_TRIALS} trials"),
                    ))
                }
            }
        }
    };
    let max_parallel = match &raw.max_parallel {
        Some(m) => u32::try_from(cx.at_least_one("max_parallel", m)?).unwrap_or(u32::MAX),
        None => 1,
    };
    let (metric, goal) = match &raw.metric {
        None => (MetricName::Loss, Goal::Minimize),
        Some(m) => {
            let name = match m.value.name.value.as_str() {
                "loss" => MetricName::Loss,
                "eval_loss" => MetricName::EvalLoss,
                other => {
                    return Err(cx.err(
                        "metric.name",
                        &m.value.name,
                        format!("must be `loss` or `eval_loss`, found `{other}`"),
                    ))
                }
            };
            let goal = match m.value.goal.as_ref().map(|g| (g, g.value.as_str())) {
                None | Some((_, "minimize")) => Goal::Minimize,
                Some((_, "maximize")) => Goal::Maximize,
                Some((g, other)) => {
                    return Err(cx.err("metric.goal", g, format!("must be `minimize` or `maximize`, found `{other}`")))
                }
            };
            (name, goal)
        }
    };
    let early_stopping = match &raw.early_stopping {
        None => None,
        Some(e) => {
            if e.value.rule.value != "median" {
                return Err(cx.err(
                    "early_stopping.rule",
                    &e.value.rule,
                    format!("must be `median`, found `{}`", e.value.rule.value),
                ));
            }
            Some(e.value.warmup_steps.as_ref().map_or(0, |w| w.value))
        }
    };
    Ok(SweepSpec {
        name,
        job: raw.job.value.trim().to_string(),
        parameters,
        trials,
        random,
        max_parallel,
        metric,
        goal,
        early_stopping,
        seed: raw.seed.map_or(0, |s| s.value),
    })
}

fn parameter(cx: &Ctx, path: &str, p: &S<RawParam>) -> Result<Parameter, SpecError> {
    let at = format!("parameters.{path}");
    let ok_path = !path.is_empty()
        && path.len() <= 128
        && path.split('.').all(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    if !ok_path {
        return Err(cx.err(&at, p, "must be a dotted field path such as `train.optimizer.lr`"));
    }
    let r = &p.value;
    let range = |what: &str| -> Result<(f64, f64), SpecError> {
        let (Some(min), Some(max)) = (&r.min, &r.max) else {
            return Err(cx.err(&at, p, format!("a `{what}` distribution needs `min` and `max`")));
        };
        if !(min.value.is_finite() && max.value.is_finite() && min.value <= max.value) {
            return Err(cx.err(&format!("{at}.max"), max, "must be a finite number at least `min`"));
        }
        Ok((min.value, max.value))
    };
    let domain = match r.distribution.as_ref().map(|d| (d, d.value.as_str())) {
        None | Some((_, "choice")) => {
            let Some(values) = &r.values else {
                return Err(cx.err(&at, p, "needs `values` (a grid) or a `distribution`"));
            };
            if values.value.is_empty() {
                return Err(cx.err(&format!("{at}.values"), values, "must list at least one value"));
            }
            if r.min.is_some() || r.max.is_some() {
                return Err(cx.err(&at, p, "`min` and `max` go with `uniform`, `log_uniform` or `int`"));
            }
            Domain::Values(values.value.clone())
        }
        Some((d, kind)) => {
            if r.values.is_some() {
                return Err(cx.err(&format!("{at}.values"), d, "`values` goes with a grid or `distribution: choice`"));
            }
            match kind {
                "uniform" => {
                    let (min, max) = range(kind)?;
                    Domain::Uniform { min, max }
                }
                "log_uniform" => {
                    let (min, max) = range(kind)?;
                    if min <= 0.0 {
                        return Err(cx.err(&format!("{at}.min"), d, "a `log_uniform` range must be above 0"));
                    }
                    Domain::LogUniform { min, max }
                }
                "int" => {
                    let (min, max) = range(kind)?;
                    if min.fract() != 0.0 || max.fract() != 0.0 {
                        return Err(cx.err(&at, d, "an `int` range has whole-number `min` and `max`"));
                    }
                    Domain::Int { min: min as i64, max: max as i64 }
                }
                other => {
                    return Err(cx.err(
                        &format!("{at}.distribution"),
                        d,
                        format!("must be `uniform`, `log_uniform`, `int` or `choice`, found `{other}`"),
                    ))
                }
            }
        }
    };
    Ok(Parameter { path: path.to_string(), domain })
}

/// SplitMix64: a small, well-mixed generator, so that a seed gives the same
/// trials everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The values each trial takes, in trial order: every combination of a
/// grid (the first parameter varying slowest), or `trials` draws from the
/// seeded generator for random search.
pub fn assignments(sweep: &SweepSpec) -> Vec<Vec<(String, Value)>> {
    if !sweep.random {
        let mut out: Vec<Vec<(String, Value)>> = vec![Vec::new()];
        for p in &sweep.parameters {
            let Domain::Values(values) = &p.domain else { continue };
            out = out
                .into_iter()
                .flat_map(|row| {
                    values.iter().map(move |v| {
                        let mut row = row.clone();
                        row.push((p.path.clone(), v.clone()));
                        row
                    })
                })
                .collect();
        }
        return out;
    }
    let mut rng = Rng(sweep.seed);
    (0..sweep.trials)
        .map(|_| {
            sweep
                .parameters
                .iter()
                .map(|p| {
                    let v = match &p.domain {
                        Domain::Values(vs) => vs[rng.below(vs.len() as u64) as usize].clone(),
                        Domain::Uniform { min, max } => Value::from(min + (max - min) * rng.unit()),
                        Domain::LogUniform { min, max } => {
                            Value::from((min.ln() + (max.ln() - min.ln()) * rng.unit()).exp())
                        }
                        Domain::Int { min, max } => {
                            let span = (max - min) as u64 + 1;
                            Value::from(min + rng.below(span) as i64)
                        }
                    };
                    (p.path.clone(), v)
                })
                .collect()
        })
        .collect()
}

/// Sets `path` (dotted) in `doc` to `value`, making the mappings on the way.
pub fn set_path(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    let mut at = doc;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let Value::Object(map) = at else {
            return Err(format!("`{}` is not a mapping", parts[..i].join(".")));
        };
        if i + 1 == parts.len() {
            map.insert((*part).to_string(), value);
            return Ok(());
        }
        at = map.entry((*part).to_string()).or_insert_with(|| Value::Object(Default::default()));
    }
    Ok(())
}

/// Every trial's job file, each validated: the first that fails is reported
/// with its trial number and values. `job_origin` names the base job file
/// (files it names are read relative to its folder by `read_file`).
pub fn trials(
    sweep: &SweepSpec,
    job_source: &str,
    job_origin: &str,
    read_file: &crate::ReadFile,
) -> Result<Vec<Trial>, SpecError> {
    let base: Value = crate::deserialize(job_source, job_origin)?;
    let mut out = Vec::new();
    for (i, params) in assignments(sweep).into_iter().enumerate() {
        let mut doc = base.clone();
        let shown = params.iter().map(|(p, v)| format!("{p}={v}")).collect::<Vec<_>>().join(", ");
        let origin = format!("{job_origin} (trial {i}: {shown})");
        for (path, value) in &params {
            set_path(&mut doc, path, value.clone()).map_err(|message| SpecError {
                origin: origin.clone(),
                path: path.clone(),
                line: 0,
                column: 0,
                message,
            })?;
        }
        let job_yaml = serde_json::to_string_pretty(&doc).unwrap_or_default();
        let spec = crate::parse_with(&job_yaml, &origin, read_file)?;
        out.push(Trial { params, job_yaml, spec });
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
