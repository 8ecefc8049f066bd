//! The leader's sweep driver: starts trials while fewer than `max_parallel`
//! of a sweep's trials are queued or training, keeps each ended trial's
//! metric curve in the replicated state, and stops trials that the median
//! rule finds poor. The decisions are pure functions of the state and the
//! leader's metrics ([`plan`], [`median_rule`]); the driver proposes them.

use flotilla_proto::v1::MetricPoint;

use crate::coordinator::{now_ms, Coordinator};
use crate::state::{Command, State, Sweep, TrialRef};

/// The most points of a trial's curve kept in the replicated state.
pub const MAX_CURVE_POINTS: usize = 512;

/// What the driver does for the sweeps now.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Start(TrialRef),
    /// An ended trial's curve and [`means`].
    Record(TrialRef, Vec<(u64, f64)>, Vec<(u64, f64)>),
    Stop {
        job: String,
        reason: String,
    },
}

/// The `metric` (`loss` or `eval_loss`) by step from a job's points,
/// thinned evenly to at most [`MAX_CURVE_POINTS`] (the last one kept).
pub fn curve(points: &[MetricPoint], metric: &str) -> Vec<(u64, f64)> {
    thin(series(points, metric))
}

/// The mean of the metric from the first point to each step, thinned like
/// [`curve`]: what the median rule compares (steadier than one step's
/// value, and the same for two trials that trained alike however either
/// was thinned).
pub fn means(points: &[MetricPoint], metric: &str) -> Vec<(u64, f64)> {
    let mut sum = 0.0;
    let all = series(points, metric)
        .into_iter()
        .enumerate()
        .map(|(i, (step, v))| {
            sum += v;
            (step, sum / (i + 1) as f64)
        })
        .collect();
    thin(all)
}

fn series(points: &[MetricPoint], metric: &str) -> Vec<(u64, f64)> {
    points
        .iter()
        .filter_map(|p| match metric {
            "eval_loss" => p.eval_loss.map(|v| (p.step, v)),
            _ => Some((p.step, p.loss)),
        })
        .collect()
}

fn thin(all: Vec<(u64, f64)>) -> Vec<(u64, f64)> {
    if all.len() <= MAX_CURVE_POINTS {
        return all;
    }
    let stride = all.len().div_ceil(MAX_CURVE_POINTS);
    let mut out: Vec<(u64, f64)> = all.iter().step_by(stride).copied().collect();
    if out.last() != all.last() {
        out.pop();
        out.extend(all.last().copied());
    }
    out
}

/// The curve's value at `step`: its last point at or before it.
pub fn value_at(curve: &[(u64, f64)], step: u64) -> Option<f64> {
    curve.iter().take_while(|(s, _)| *s <= step).last().map(|(_, v)| *v)
}

/// The median rule on [`means`]: a running trial whose mean metric up to
/// its latest step `s` (past the warm-up) is worse than the median of the
/// completed trials' means at `s` is stopped. `None` keeps it; `Some` says
/// why not.
pub fn median_rule(running: &[(u64, f64)], completed: &[&[(u64, f64)]], warmup: u64, minimize: bool) -> Option<String> {
    let &(step, value) = running.last()?;
    if step < warmup.max(1) {
        return None;
    }
    let mut at: Vec<f64> = completed.iter().filter_map(|c| value_at(c, step)).filter(|v| v.is_finite()).collect();
    if at.is_empty() {
        return None;
    }
    at.sort_by(f64::total_cmp);
    let n = at.len();
    let median = if n % 2 == 1 { at[n / 2] } else { (at[n / 2 - 1] + at[n / 2]) / 2.0 };
    let worse = if value.is_nan() {
        true
    } else if minimize {
        value > median
    } else {
        value < median
    };
    worse.then(|| {
        format!(
            "stopped early: median rule (mean metric {value:.4} up to step {step}, median of completed trials {median:.4})"
        )
    })
}

/// The sweep's actions now; `metrics` gives a job's points (the leader's).
pub fn plan(state: &State, sweep: &Sweep, metrics: &dyn Fn(&str) -> Vec<MetricPoint>) -> Vec<Action> {
    let mut out = Vec::new();
    let at = |trial: usize| TrialRef { sweep: sweep.id.clone(), trial: trial as u32 };
    let completed: Vec<&[(u64, f64)]> = sweep
        .trials
        .iter()
        .filter(|t| t.stopped.is_none())
        .filter(|t| {
            t.job
                .as_ref()
                .and_then(|j| state.jobs.get(j))
                .is_some_and(|j| j.phase == crate::state::JobPhase::Succeeded || j.phase.is_handing_off())
        })
        .filter_map(|t| t.means.as_deref())
        .collect();
    let mut active = 0u32;
    for (i, t) in sweep.trials.iter().enumerate() {
        let Some(job) = t.job.as_ref().and_then(|j| state.jobs.get(j)) else { continue };
        // Trained (handing off) counts as ended for the sweep.
        if (job.phase.is_terminal() || job.phase.is_handing_off()) && t.curve.is_none() {
            let points = metrics(&job.id);
            out.push(Action::Record(at(i), curve(&points, &sweep.metric), means(&points, &sweep.metric)));
        }
        if job.phase.is_active() {
            active += 1;
            if let Some(warmup) = sweep.early_stopping.filter(|_| job.phase == crate::state::JobPhase::Running) {
                let mine = means(&metrics(&job.id), &sweep.metric);
                if let Some(reason) = median_rule(&mine, &completed, warmup, sweep.minimize()) {
                    out.push(Action::Stop { job: job.id.clone(), reason });
                }
            }
        }
    }
    if sweep.cancelled {
        return out.into_iter().filter(|a| matches!(a, Action::Record(..))).collect();
    }
    for (i, t) in sweep.trials.iter().enumerate() {
        if active >= sweep.max_parallel {
            break;
        }
        if t.job.is_none() {
            out.push(Action::Start(at(i)));
            active += 1;
        }
    }
    out
}

/// The most bytes of a final model's `metrics.jsonl` read back.
const MAX_HISTORY_BYTES: u64 = 64 << 20;
/// How long reading it may hold up the driver.
const HISTORY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The metric history saved beside a final model (`…/final/model.safetensors`
/// → `…/final/metrics.jsonl`), if it can be read quickly.
async fn final_history(final_model: Option<&str>) -> Option<Vec<MetricPoint>> {
    let (folder, _) = final_model?.rsplit_once('/')?;
    let read = async {
        let dir = flotilla_storage::Storage::open(folder).ok()?;
        if dir.size("metrics.jsonl").await.ok()? > MAX_HISTORY_BYTES {
            return None;
        }
        let bytes = dir.get("metrics.jsonl").await.ok()?;
        flotilla_registry::record::from_jsonl(&String::from_utf8_lossy(&bytes)).ok()
    };
    let records = tokio::time::timeout(HISTORY_TIMEOUT, read).await.ok().flatten()?;
    let points: Vec<MetricPoint> = records
        .into_iter()
        .map(|r| MetricPoint { step: r.step, loss: r.loss, eval_loss: r.eval_loss, ..Default::default() })
        .collect();
    (!points.is_empty()).then_some(points)
}

impl Coordinator {
    /// One pass over the sweeps that are not done (leader only).
    pub(crate) async fn drive_sweeps(&self) {
        let state = self.state();
        for sweep in state.sweeps.values() {
            if sweep.phase(&state.jobs) != crate::state::SweepPhase::Running && !sweep.cancelled {
                continue;
            }
            let actions = {
                let soft = self.soft();
                plan(&state, sweep, &|job| soft.metrics.get(job).cloned().unwrap_or_default())
            };
            for action in actions {
                let cmd = match action {
                    Action::Start(at) => {
                        let data_key = match crate::data_key::DataKey::random() {
                            Ok(k) => k,
                            Err(e) => {
                                tracing::error!(error = %e, "could not mint a trial's data-plane key");
                                return;
                            }
                        };
                        tracing::info!(sweep = %at.sweep, trial = at.trial, "starting trial");
                        Command::StartTrial { at, uid: crate::random_id(), data_key, at_ms: now_ms() }
                    }
                    Action::Record(at, soft_curve, soft_means) => {
                        // A trained trial's full history is in its final
                        // folder: it holds what a new leader never saw.
                        let job = sweep.trials[at.trial as usize].job.as_ref().and_then(|j| state.jobs.get(j));
                        match final_history(job.and_then(|j| j.final_model.as_deref())).await {
                            Some(points) => Command::RecordTrial {
                                curve: curve(&points, &sweep.metric),
                                means: means(&points, &sweep.metric),
                                at,
                            },
                            None => Command::RecordTrial { at, curve: soft_curve, means: soft_means },
                        }
                    }
                    Action::Stop { job, reason } => {
                        tracing::info!(job = %job, reason = %reason, "stopping trial");
                        Command::StopTrial { job, reason, at_ms: now_ms() }
                    }
                };
                if let Err(e) = self.propose(cmd).await {
                    tracing::warn!(sweep = %sweep.id, error = %e, "could not apply a sweep decision");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
