//! The sweep operations: submit (every trial validated first), get with
//! its leaderboard, list, cancel. Shared by gRPC and HTTP like the job ones.

use flotilla_proto::v1 as pb;
use tonic::Status;

use super::{lead, template_of};
use crate::auth::Caller;
use crate::convert;
use crate::coordinator::{now_ms, Coordinator};
use crate::state::{Command, Event, JobPhase, NewSweep, State, Sweep, SweepPhase};
use crate::sweeps::curve;

fn not_found(sweep: &str) -> Status {
    Status::not_found(format!("sweep {sweep} not found"))
}

/// Validates a sweep file and every trial's job file; keeps the sweep and
/// returns its id (the first sweep's again for a repeated `submission_id`).
pub async fn submit_sweep(c: &Coordinator, caller: &Caller, req: pb::SubmitSweepRequest) -> Result<String, Status> {
    let sweep_origin = if req.sweep_origin.is_empty() { "sweep.yaml" } else { &req.sweep_origin };
    let job_origin = if req.job_origin.is_empty() { "job.yaml" } else { &req.job_origin };
    let spec = flotilla_jobspec::sweep::parse_sweep(&req.sweep_yaml, sweep_origin)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    // Files the job names are read relative to its folder, as for a job.
    let folder = std::path::Path::new(job_origin).parent().map(std::path::Path::to_path_buf).unwrap_or_default();
    let read = flotilla_jobspec::files_under(folder);
    let trials = flotilla_jobspec::sweep::trials(&spec, &req.job_yaml, job_origin, &read)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let mut made = Vec::with_capacity(trials.len());
    let mut bytes = 0;
    for t in trials {
        let params = t.params.iter().map(|(p, v)| (p.clone(), v.to_string())).collect();
        let template = template_of(t.spec, &t.job_yaml, &req.base_dir)?;
        bytes += template.spec_json.len() + template.spec_yaml.len();
        if bytes > crate::limits::MAX_SWEEP_BYTES {
            return Err(Status::invalid_argument(format!(
                "the trials' job files come to more than {} bytes; make the base job smaller or the sweep \
                 shorter",
                crate::limits::MAX_SWEEP_BYTES
            )));
        }
        made.push((params, template));
    }
    let sweep = NewSweep {
        name: spec.name.clone(),
        max_parallel: spec.max_parallel,
        metric: spec.metric.as_str().into(),
        goal: spec.goal.as_str().into(),
        early_stopping: spec.early_stopping,
        trials: made,
    };
    let cmd = Command::SubmitSweep {
        sweep,
        owner: caller.owner(),
        submission_id: (!req.submission_id.is_empty()).then(|| req.submission_id.clone()),
        at_ms: now_ms(),
    };
    let events = c.propose(cmd).await.map_err(convert::status)?;
    let id = events
        .iter()
        .find_map(|e| match e {
            Event::SweepSubmitted { sweep } | Event::SweepRepeated { sweep } => Some(sweep.clone()),
            _ => None,
        })
        .ok_or_else(|| Status::internal("submit produced no sweep"))?;
    tracing::info!(sweep = %id, trials = spec.trials, "sweep submitted");
    Ok(id)
}

/// A sweep with its leaderboard (see `SweepStatus` in the proto).
pub fn sweep_status(c: &Coordinator, state: &State, s: &Sweep) -> pb::SweepStatus {
    let soft = c.soft();
    let mut trials: Vec<pb::TrialStatus> = s
        .trials
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let job = t.job.as_ref().and_then(|j| state.jobs.get(j));
            let live;
            let points: &[(u64, f64)] = match (&t.curve, job) {
                (Some(c), _) => c,
                (None, Some(j)) => {
                    live = curve(soft.metrics.get(&j.id).map_or(&[][..], |v| v), &s.metric);
                    &live
                }
                (None, None) => &[],
            };
            let last = points.last().copied();
            let state = match job.map(|j| j.phase) {
                None => "pending",
                Some(_) if t.stopped.is_some() => "stopped",
                Some(JobPhase::Pending | JobPhase::Waiting) => "queued",
                Some(JobPhase::Running) => "running",
                Some(JobPhase::Registering | JobPhase::TrainedNotRegistered) => "registering",
                Some(JobPhase::Succeeded) => "succeeded",
                Some(JobPhase::Failed) => "failed",
                Some(JobPhase::Cancelled) => "cancelled",
            };
            pb::TrialStatus {
                trial: i as u32,
                job_id: t.job.clone().unwrap_or_default(),
                params: t.params.iter().map(|(p, v)| pb::SweepParam { path: p.clone(), value: v.clone() }).collect(),
                state: state.into(),
                metric: last.map(|(_, v)| v),
                step: last.map_or(0, |(s, _)| s),
                message: t.stopped.clone().or_else(|| job.map(|j| j.message.clone())).unwrap_or_default(),
                rank: 0,
            }
        })
        .collect();
    drop(soft);
    let minimize = s.minimize();
    let key = |t: &pb::TrialStatus| match t.metric.filter(|m| !m.is_nan()) {
        Some(m) if minimize => (0, m),
        Some(m) => (0, -m),
        None => (1, 0.0),
    };
    trials.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        ka.0.cmp(&kb.0).then(ka.1.total_cmp(&kb.1)).then(a.trial.cmp(&b.trial))
    });
    for (i, t) in trials.iter_mut().enumerate() {
        if t.metric.is_some_and(|m| !m.is_nan()) {
            t.rank = i as u32 + 1;
        }
    }
    pb::SweepStatus {
        sweep_id: s.id.clone(),
        name: s.name.clone(),
        state: match s.phase(&state.jobs) {
            SweepPhase::Running => "running",
            SweepPhase::Done => "done",
            SweepPhase::Cancelled => "cancelled",
        }
        .into(),
        metric: s.metric.clone(),
        goal: s.goal.clone(),
        max_parallel: s.max_parallel,
        trials,
        submitted_by: s.owner.as_ref().map(|o| o.name.clone()).unwrap_or_default(),
        submitted_at_ms: s.submitted_at_ms,
    }
}

/// A sweep's status, read after the replica has caught up with the log.
pub async fn get_sweep(c: &Coordinator, sweep: &str) -> Result<pb::SweepStatus, Status> {
    lead(c)?;
    c.store.read_fresh().await.map_err(convert::status)?;
    let state = c.state();
    let s = state.sweeps.get(sweep).ok_or_else(|| not_found(sweep))?;
    Ok(sweep_status(c, &state, s))
}

/// Every sweep, oldest first.
pub async fn list_sweeps(c: &Coordinator) -> Result<Vec<pb::SweepStatus>, Status> {
    lead(c)?;
    c.store.read_fresh().await.map_err(convert::status)?;
    let state = c.state();
    Ok(state.sweeps_in_order().into_iter().map(|s| sweep_status(c, &state, s)).collect())
}

/// Cancels a sweep and its trials (its submitter or an admin).
pub async fn cancel_sweep(c: &Coordinator, caller: &Caller, sweep: &str) -> Result<pb::SweepStatus, Status> {
    let owner = c.state().sweeps.get(sweep).ok_or_else(|| not_found(sweep))?.owner.clone();
    caller.may_manage(owner.as_ref(), "cancel it")?;
    c.propose(Command::CancelSweep { sweep: sweep.to_string(), at_ms: now_ms() }).await.map_err(convert::status)?;
    let state = c.state();
    let s = state.sweeps.get(sweep).ok_or_else(|| not_found(sweep))?;
    Ok(sweep_status(c, &state, s))
}
