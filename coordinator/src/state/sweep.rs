//! Sweeps in the replicated state: a sweep keeps every trial's job template
//! (validated at submission); the leader's driver starts trials as jobs
//! that name their sweep, records each finished trial's metric curve and
//! stops poor trials. A trial starts at most once: the trial's record holds
//! its job, so a repeated `StartTrial` (a new leader) changes nothing.

use imbl::OrdMap;
use serde::{Deserialize, Serialize};

use super::{Event, JobId, JobPhase, Owner, Rejection, State};
use crate::data_key::DataKey;

pub type SweepId = String;

/// What a job is made from: a validated job file, without the parts the
/// leader mints (uid, data key) or the submitter gives (owner).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobTemplate {
    pub name: String,
    pub spec_json: String,
    pub min_workers: u32,
    pub max_workers: u32,
    pub fixed_world: Option<u32>,
    pub stages: u32,
    pub total_steps: u64,
    pub keep_checkpoints: u32,
    pub output_root: String,
    pub spec_yaml: String,
    pub registry: Option<flotilla_jobspec::RegistrySpec>,
    pub priority: i32,
}

/// A trial's place: its sweep and index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrialRef {
    pub sweep: SweepId,
    pub trial: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    /// The values it takes: dotted path and value (JSON).
    pub params: Vec<(String, String)>,
    pub template: JobTemplate,
    /// Its job, once started.
    pub job: Option<JobId>,
    /// Why it was stopped early (the median rule), if it was.
    pub stopped: Option<String>,
    /// The metric by step, recorded once its job ended.
    pub curve: Option<Vec<(u64, f64)>>,
    /// Its running mean by step (what early stopping compares), recorded
    /// with `curve`.
    #[serde(default)]
    pub means: Option<Vec<(u64, f64)>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sweep {
    pub id: SweepId,
    pub name: String,
    pub owner: Option<Owner>,
    pub submitted_at_ms: i64,
    pub max_parallel: u32,
    /// `loss` or `eval_loss`.
    pub metric: String,
    /// `minimize` or `maximize`.
    pub goal: String,
    /// The median rule's warm-up in steps, when early stopping is on.
    pub early_stopping: Option<u64>,
    pub trials: Vec<Trial>,
    pub cancelled: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SweepPhase {
    Running,
    Done,
    Cancelled,
}

impl Sweep {
    pub fn minimize(&self) -> bool {
        self.goal != "maximize"
    }

    /// Cancelled; done once every trial's job ended and its curve is kept;
    /// else running.
    pub fn phase(&self, jobs: &OrdMap<JobId, super::Job>) -> SweepPhase {
        if self.cancelled {
            return SweepPhase::Cancelled;
        }
        let ended = |t: &Trial| {
            t.curve.is_some() && t.job.as_ref().and_then(|j| jobs.get(j)).is_some_and(|j| j.phase.is_terminal())
        };
        if self.trials.iter().all(ended) {
            SweepPhase::Done
        } else {
            SweepPhase::Running
        }
    }
}

/// The sweep-related part of a submitted sweep command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewSweep {
    pub name: String,
    pub max_parallel: u32,
    pub metric: String,
    pub goal: String,
    pub early_stopping: Option<u64>,
    /// Each trial's values and job template.
    pub trials: Vec<(Vec<(String, String)>, JobTemplate)>,
}

impl State {
    pub(super) fn submit_sweep(
        &mut self,
        sweep: NewSweep,
        owner: Option<Owner>,
        submission_id: Option<String>,
        at_ms: i64,
    ) -> Result<Vec<Event>, Rejection> {
        if let Some(id) = submission_id.as_ref().and_then(|s| self.sweep_submissions.get(s)) {
            return Ok(vec![Event::SweepRepeated { sweep: id.clone() }]);
        }
        if sweep.trials.is_empty() || sweep.max_parallel == 0 {
            return Err(Rejection::Invalid("a sweep has at least one trial and max_parallel >= 1".into()));
        }
        self.next_sweep_seq += 1;
        let id = format!("{}-s{}", sweep.name, self.next_sweep_seq);
        let trials = sweep
            .trials
            .into_iter()
            .map(|(params, template)| Trial { params, template, job: None, stopped: None, curve: None, means: None })
            .collect();
        self.sweeps.insert(
            id.clone(),
            Sweep {
                id: id.clone(),
                name: sweep.name,
                owner,
                submitted_at_ms: at_ms,
                max_parallel: sweep.max_parallel,
                metric: sweep.metric,
                goal: sweep.goal,
                early_stopping: sweep.early_stopping,
                trials,
                cancelled: false,
            },
        );
        if let Some(s) = submission_id {
            self.sweep_submissions.insert(s, id.clone());
        }
        Ok(vec![Event::SweepSubmitted { sweep: id }])
    }

    pub(super) fn start_trial(
        &mut self,
        at: TrialRef,
        uid: String,
        data_key: DataKey,
        at_ms: i64,
    ) -> Result<Vec<Event>, Rejection> {
        let s = self.sweeps.get(&at.sweep).ok_or_else(|| Rejection::Invalid(format!("no sweep {}", at.sweep)))?;
        let t = s
            .trials
            .get(at.trial as usize)
            .ok_or_else(|| Rejection::Invalid(format!("sweep {} has no trial {}", at.sweep, at.trial)))?;
        if let Some(job) = &t.job {
            return Ok(vec![Event::SubmissionRepeated { job: job.clone() }]);
        }
        if s.cancelled {
            return Ok(vec![Event::Ignored { reason: format!("sweep {} is cancelled", at.sweep) }]);
        }
        let (template, owner) = (t.template.clone(), s.owner.clone());
        let job = self.insert_job(template, uid, data_key, owner, at_ms)?;
        self.jobs.get_mut(&job).expect("just inserted").sweep = Some(at.clone());
        let s = self.sweeps.get_mut(&at.sweep).expect("checked");
        s.trials[at.trial as usize].job = Some(job.clone());
        Ok(vec![Event::JobSubmitted { job }])
    }

    /// Cancels a trial's job, saying why, and marks the trial stopped.
    pub(super) fn stop_trial(&mut self, job: &str, reason: String) -> Result<Vec<Event>, Rejection> {
        let j = self.job(job)?;
        let Some(at) = j.sweep.clone() else {
            return Err(Rejection::Invalid(format!("job {job} is not a trial of a sweep")));
        };
        if !j.phase.is_active() {
            return Ok(vec![Event::Ignored { reason: format!("job {job} is not training") }]);
        }
        let j = self.job_mut(job)?;
        j.phase = JobPhase::Cancelled;
        j.message = reason.clone();
        self.release_job(job);
        if let Some(t) = self.sweeps.get_mut(&at.sweep).and_then(|s| s.trials.get_mut(at.trial as usize)) {
            t.stopped = Some(reason);
        }
        Ok(vec![Event::JobCancelled { job: job.to_string() }])
    }

    pub(super) fn cancel_sweep(&mut self, sweep: &str) -> Result<Vec<Event>, Rejection> {
        let s = self.sweeps.get_mut(sweep).ok_or_else(|| Rejection::Invalid(format!("no sweep {sweep}")))?;
        if s.cancelled {
            return Ok(vec![Event::Ignored { reason: format!("sweep {sweep} is cancelled already") }]);
        }
        s.cancelled = true;
        let jobs: Vec<JobId> = s.trials.iter().filter_map(|t| t.job.clone()).collect();
        let mut events = vec![Event::SweepCancelled { sweep: sweep.to_string() }];
        for job in jobs {
            if self.jobs.get(&job).is_some_and(|j| !j.phase.is_terminal()) {
                let j = self.job_mut(&job)?;
                j.phase = JobPhase::Cancelled;
                j.message = format!("cancelled with its sweep {sweep}");
                self.release_job(&job);
                events.push(Event::JobCancelled { job });
            }
        }
        Ok(events)
    }

    pub(super) fn record_trial(
        &mut self,
        at: TrialRef,
        curve: Vec<(u64, f64)>,
        means: Vec<(u64, f64)>,
    ) -> Result<Vec<Event>, Rejection> {
        let t = self
            .sweeps
            .get_mut(&at.sweep)
            .and_then(|s| s.trials.get_mut(at.trial as usize))
            .ok_or_else(|| Rejection::Invalid(format!("no trial {} in sweep {}", at.trial, at.sweep)))?;
        if t.curve.is_some() {
            return Ok(vec![Event::Ignored { reason: "the trial's curve is recorded already".into() }]);
        }
        t.curve = Some(curve);
        t.means = Some(means);
        Ok(vec![Event::TrialRecorded { sweep: at.sweep, trial: at.trial }])
    }

    /// Sweeps in submission order.
    pub fn sweeps_in_order(&self) -> Vec<&Sweep> {
        let mut s: Vec<&Sweep> = self.sweeps.values().collect();
        s.sort_by_key(|s| (s.submitted_at_ms, s.id.clone()));
        s
    }
}
