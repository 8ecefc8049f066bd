//! The control state machine: every durable fact the coordinator keeps (jobs,
//! workers, generations, plans, committed checkpoints) changes only through
//! [`State::apply`]. It does no I/O and reads no clock, so every replica that
//! applies the same commands ends in the same state.

use flotilla_jobspec::RegistrySpec;
use imbl::OrdMap;

use serde::{Deserialize, Serialize};

pub use crate::auth::TokenRecord;
use crate::data_key::DataKey;
use crate::scheduler::queue::Verdict;
use crate::scheduler::{self, PlanRequest};

mod queue;
pub mod sweep;

pub use sweep::{JobTemplate, NewSweep, Sweep, SweepId, SweepPhase, TrialRef};

pub type JobId = String;
pub type WorkerId = String;

/// How many generations a job may restart on failure reports before it fails.
pub const DEFAULT_MAX_RESTARTS: u32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobPhase {
    Pending,
    Running,
    Waiting,
    Succeeded,
    Failed,
    Cancelled,
    /// Trained; the model is being handed to the job's registry.
    Registering,
    /// Trained, but the last hand-off failed; it is retried with backoff
    /// (and by `flotilla register`).
    TrainedNotRegistered,
}

impl JobPhase {
    pub fn is_terminal(self) -> bool {
        matches!(self, JobPhase::Succeeded | JobPhase::Failed | JobPhase::Cancelled)
    }
    /// Training, or waiting to train: the job holds or wants workers.
    pub fn is_active(self) -> bool {
        matches!(self, JobPhase::Pending | JobPhase::Running | JobPhase::Waiting)
    }
    /// Trained, with the registry hand-off still to be done.
    pub fn is_handing_off(self) -> bool {
        matches!(self, JobPhase::Registering | JobPhase::TrainedNotRegistered)
    }
}

/// A model version the hand-off registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisteredModel {
    /// The registry's URL.
    pub registry: String,
    pub model: String,
    pub version: u64,
    /// Where the version's files are (an MLflow source URI, or the version's
    /// folder in the built-in registry).
    pub uri: String,
    /// The MLflow run the version points at ("" for the built-in registry).
    #[serde(default)]
    pub run_id: String,
    pub at_ms: i64,
}

/// The registry hand-off of a job that has a `registry` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handoff {
    /// Failed attempts so far.
    pub attempts: u32,
    pub last_error: String,
    pub last_attempt_ms: i64,
    /// Raised by `flotilla register JOB`: try again now.
    pub retry_request: u64,
    /// Set once, by the first attempt that succeeds.
    pub registered: Option<RegisteredModel>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub step: u64,
    pub location: String,
    pub generation: u64,
    /// How long training stood still for it, and how long it took in all.
    #[serde(default)]
    pub blocked_ms: f64,
    #[serde(default)]
    pub total_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankSlot {
    pub worker: WorkerId,
    pub data_addr: String,
    /// Where the worker serves Prometheus metrics; empty: nowhere.
    #[serde(default)]
    pub metrics_addr: String,
    /// What the worker computes on (`cpu`, `cuda:0 (NAME)`); empty: unknown.
    #[serde(default)]
    pub device: String,
}

/// Who is rank what in one generation of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub generation: u64,
    pub ranks: Vec<RankSlot>,
    /// The generation's data-plane secret, derived from the job's key when
    /// the plan was made; handed to its workers, never shown.
    #[serde(default)]
    pub secret: DataKey,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationRecord {
    pub generation: u64,
    pub world_size: u32,
    pub reason: String,
    pub at_ms: i64,
    pub resumed_from_step: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub name: String,
    pub spec_json: String,
    pub min_workers: u32,
    pub max_workers: u32,
    /// A fixed world size (`parallelism.dp` replicas of `stages` workers),
    /// if the job asks for one.
    pub fixed_world: Option<u32>,
    /// Pipeline stages (`parallelism.pp`): every plan is a whole number of
    /// replicas of this many workers, and `rank = replica * stages + stage`.
    #[serde(default = "one_stage")]
    pub stages: u32,
    pub total_steps: u64,
    pub keep_checkpoints: u32,
    pub output_dir: String,
    pub phase: JobPhase,
    pub generation: u64,
    pub plan: Option<Plan>,
    /// The job's data-plane key (random, minted by the leader at submit):
    /// each generation's secret is derived from it.
    #[serde(default)]
    pub data_key: DataKey,
    /// Committed checkpoints still retained, oldest first.
    pub checkpoints: Vec<CheckpointRecord>,
    pub final_model: Option<String>,
    pub restarts: u32,
    pub message: String,
    pub submitted_at_ms: i64,
    pub history: Vec<GenerationRecord>,
    /// Raised to ask the job's ranks for a checkpoint at once.
    pub checkpoint_request: u64,
    /// The job file as submitted (the YAML handed to the registry).
    #[serde(default)]
    pub spec_yaml: String,
    /// The registry the job hands its model to when trained (its job
    /// file's `registry` section), kept apart from the spec so that the
    /// hand-off and status need not parse the spec.
    #[serde(default)]
    pub registry: Option<RegistrySpec>,
    /// Unique across coordinators (ids like `name-3` repeat on another
    /// coordinator): it names the job in registries.
    #[serde(default)]
    pub uid: String,
    /// The registry hand-off, from the moment training finished.
    #[serde(default)]
    pub handoff: Option<Handoff>,
    /// The MLflow run that tracks the job, once created.
    #[serde(default)]
    pub tracking_run: Option<String>,
    /// The token that submitted the job (none through `--insecure`): it
    /// may cancel the job and retry its hand-off.
    #[serde(default)]
    pub owner: Option<Owner>,
    /// The job file's `priority`: its place in the queue (higher first,
    /// equal ones in submission order).
    #[serde(default)]
    pub priority: i32,
    /// The sweep this job is a trial of.
    #[serde(default)]
    pub sweep: Option<TrialRef>,
}

/// Who submitted a job: the token's public id and its name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub token_id: String,
    pub name: String,
}

impl Job {
    pub fn latest_checkpoint(&self) -> Option<&CheckpointRecord> {
        self.checkpoints.last()
    }
    pub fn world_size(&self) -> u32 {
        self.plan.as_ref().map_or(0, |p| p.ranks.len() as u32)
    }
    fn workers(&self) -> Vec<WorkerId> {
        self.plan.as_ref().map(|p| p.ranks.iter().map(|r| r.worker.clone()).collect()).unwrap_or_default()
    }
    /// The job's size limits, as the scheduler reads them.
    pub fn plan_request(&self) -> PlanRequest {
        PlanRequest { min: self.min_workers, max: self.max_workers, fixed: self.fixed_world, stages: self.stages }
    }
    /// The pipeline stage and data-parallel replica of `rank`.
    pub fn stage_and_replica(&self, rank: u32) -> (u32, u32) {
        let stages = self.stages.max(1);
        (rank % stages, rank / stages)
    }
}

/// Jobs persisted before pipelines existed have one stage.
fn one_stage() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Worker {
    pub id: WorkerId,
    pub data_addr: String,
    pub hostname: String,
    pub registered_at_ms: i64,
    /// The job this worker is assigned to, if any.
    pub job: Option<JobId>,
    /// Set when the worker announced it is going away: it is no longer
    /// scheduled, and leaves its job at the next committed checkpoint.
    pub leaving: Option<String>,
    /// The rank it asked for in a job's first plan (see [`scheduler::apply_rank_hints`]).
    #[serde(default)]
    pub rank_hint: Option<u32>,
    /// SHA-256 (hex) of the key its registration handed out: calls for this
    /// worker prove it (empty through `--insecure`).
    #[serde(default)]
    pub key_hash: String,
    /// Where it serves Prometheus metrics (host:port); empty: nowhere.
    #[serde(default)]
    pub metrics_addr: String,
    /// What it computes on (`cpu`, `cuda:0 (NAME)`); empty: unknown.
    #[serde(default)]
    pub device: String,
}

/// A request to change the state. Time is carried in, never read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// An API token (its hash; the secret is never stored).
    CreateToken {
        token: TokenRecord,
    },
    /// Revokes the valid token named `name`.
    RevokeToken {
        name: String,
        at_ms: i64,
    },
    SubmitJob {
        name: String,
        spec_json: String,
        min_workers: u32,
        max_workers: u32,
        /// The exact world size, `dp * stages`, for a fixed `parallelism.dp`.
        fixed_world: Option<u32>,
        /// Pipeline stages (`parallelism.pp`).
        #[serde(default = "one_stage")]
        stages: u32,
        total_steps: u64,
        keep_checkpoints: u32,
        /// Where the job's folder (named after its id) is created.
        output_root: String,
        /// Chosen by the client, the same on every retry of one submission:
        /// a repeat returns the job the first one created.
        #[serde(default)]
        submission_id: Option<String>,
        /// The job file's text, kept for the registry hand-off.
        #[serde(default)]
        spec_yaml: String,
        /// The job file's `registry` section.
        #[serde(default)]
        registry: Option<RegistrySpec>,
        /// Chosen by the leader at random.
        #[serde(default)]
        uid: String,
        /// The job's data-plane key, minted by the leader at random.
        #[serde(default)]
        data_key: DataKey,
        /// The submitting token.
        #[serde(default)]
        owner: Option<Owner>,
        /// The job file's `priority`.
        #[serde(default)]
        priority: i32,
        at_ms: i64,
    },
    CancelJob {
        job: JobId,
        at_ms: i64,
    },
    RegisterWorker {
        data_addr: String,
        hostname: String,
        /// The rank the worker asks for (Slurm's task id, an indexed Job's index).
        #[serde(default)]
        rank_hint: Option<u32>,
        /// SHA-256 (hex) of the worker's key, minted by the leader.
        #[serde(default)]
        key_hash: String,
        /// Where it serves Prometheus metrics; empty: nowhere.
        #[serde(default)]
        metrics_addr: String,
        /// What it computes on; empty: unknown.
        #[serde(default)]
        device: String,
        at_ms: i64,
    },
    RemoveWorker {
        worker: WorkerId,
        reason: String,
        at_ms: i64,
    },
    /// The worker is going away: checkpoint its job now and let it leave
    /// then (a free worker is removed at once).
    PreemptWorker {
        worker: WorkerId,
        reason: String,
        at_ms: i64,
    },
    /// Start a pending or waiting job on free workers (the leader decides when).
    Schedule {
        job: JobId,
        at_ms: i64,
    },
    /// Start a new generation of a running job with the same workers, after a
    /// failure report that no membership change explained.
    RestartGeneration {
        job: JobId,
        generation: u64,
        reason: String,
        at_ms: i64,
    },
    CommitCheckpoint {
        job: JobId,
        generation: u64,
        step: u64,
        location: String,
        /// How long training stood still for it, and how long it took in all.
        #[serde(default)]
        blocked_ms: f64,
        #[serde(default)]
        total_ms: f64,
        at_ms: i64,
    },
    FinishJob {
        job: JobId,
        generation: u64,
        step: u64,
        final_model: String,
        at_ms: i64,
    },
    FailJob {
        job: JobId,
        reason: String,
        at_ms: i64,
    },
    /// A hand-off attempt registered the model: the job has succeeded.
    HandoffDone {
        job: JobId,
        registered: RegisteredModel,
        at_ms: i64,
    },
    /// A hand-off attempt failed; it is retried later.
    HandoffFailed {
        job: JobId,
        error: String,
        at_ms: i64,
    },
    /// Retry the hand-off now (`flotilla register JOB`).
    RetryHandoff {
        job: JobId,
        at_ms: i64,
    },
    /// Records the MLflow run that tracks the job (the first one wins).
    SetTrackingRun {
        job: JobId,
        run_id: String,
    },
    /// A sweep with every trial's validated job template.
    SubmitSweep {
        sweep: NewSweep,
        owner: Option<Owner>,
        /// As for `SubmitJob`: a repeat returns the first sweep.
        submission_id: Option<String>,
        at_ms: i64,
    },
    /// Queues a trial of a sweep as a job (once: a repeat returns its job).
    StartTrial {
        at: TrialRef,
        uid: String,
        data_key: DataKey,
        at_ms: i64,
    },
    /// Cancels a trial that early stopping found poor, saying why.
    StopTrial {
        job: JobId,
        reason: String,
        at_ms: i64,
    },
    /// Cancels a sweep and every trial of it that has not ended.
    CancelSweep {
        sweep: SweepId,
        at_ms: i64,
    },
    /// Keeps an ended trial's metric curve and running means (the first
    /// record wins).
    RecordTrial {
        at: TrialRef,
        curve: Vec<(u64, f64)>,
        #[serde(default)]
        means: Vec<(u64, f64)>,
    },
}

/// What a command did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    TokenCreated {
        name: String,
    },
    TokenRevoked {
        name: String,
    },
    /// A submission retried with the id of one already taken.
    SubmissionRepeated {
        job: JobId,
    },
    JobSubmitted {
        job: JobId,
    },
    JobCancelled {
        job: JobId,
    },
    WorkerRegistered {
        worker: WorkerId,
    },
    WorkerRemoved {
        worker: WorkerId,
        reason: String,
    },
    WorkerLeaving {
        worker: WorkerId,
        job: JobId,
        reason: String,
    },
    CheckpointRequested {
        job: JobId,
        request: u64,
    },
    GenerationStarted {
        job: JobId,
        generation: u64,
        world_size: u32,
        resume_step: u64,
        reason: String,
    },
    JobWaiting {
        job: JobId,
        generation: u64,
        reason: String,
    },
    CheckpointCommitted {
        job: JobId,
        step: u64,
    },
    CheckpointsDropped {
        job: JobId,
        steps: Vec<u64>,
    },
    JobSucceeded {
        job: JobId,
    },
    JobFailed {
        job: JobId,
        reason: String,
    },
    /// Training finished; the registry hand-off starts.
    JobTrained {
        job: JobId,
    },
    ModelRegistered {
        job: JobId,
        model: String,
        version: u64,
    },
    HandoffFailed {
        job: JobId,
        attempts: u32,
        error: String,
    },
    HandoffRetried {
        job: JobId,
    },
    TrackingRunSet {
        job: JobId,
        run_id: String,
    },
    SweepSubmitted {
        sweep: SweepId,
    },
    /// A sweep submission retried with the id of one already taken.
    SweepRepeated {
        sweep: SweepId,
    },
    SweepCancelled {
        sweep: SweepId,
    },
    TrialRecorded {
        sweep: SweepId,
        trial: u32,
    },
    /// A command that changed nothing because it was already applied or is
    /// stale (an old generation's report); not an error.
    Ignored {
        reason: String,
    },
}

/// A command that cannot apply; the state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Rejection {
    #[error("job {0} not found")]
    JobNotFound(JobId),
    #[error("worker {0} not found")]
    WorkerNotFound(WorkerId),
    #[error("no token named {0}")]
    TokenNotFound(String),
    #[error("job {job} is {phase:?}: {what}")]
    BadPhase { job: JobId, phase: JobPhase, what: String },
    #[error("not enough free workers for job {job}: {free} free, {needed} needed")]
    NotEnoughWorkers { job: JobId, free: u32, needed: u32 },
    #[error("invalid command: {0}")]
    Invalid(String),
    #[error("{0}")]
    Exists(String),
}

/// The replicated state. Its maps are persistent (`imbl::OrdMap`): a clone
/// shares every node, so publishing the state after each applied batch
/// costs O(1), not O(workers), and an update copies only its path.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub next_job_seq: u64,
    pub next_worker_seq: u64,
    pub jobs: OrdMap<JobId, Job>,
    pub workers: OrdMap<WorkerId, Worker>,
    pub max_restarts: u32,
    /// Client submission ids -> the job each created.
    #[serde(default)]
    pub submissions: OrdMap<String, JobId>,
    /// API tokens by name, revoked ones included (a name is never reused).
    #[serde(default)]
    pub tokens: OrdMap<String, TokenRecord>,
    #[serde(default)]
    pub next_sweep_seq: u64,
    #[serde(default)]
    pub sweeps: OrdMap<SweepId, Sweep>,
    /// Client submission ids -> the sweep each created.
    #[serde(default)]
    pub sweep_submissions: OrdMap<String, SweepId>,
}

impl State {
    pub fn new(max_restarts: u32) -> Self {
        State { max_restarts, ..Default::default() }
    }

    /// Free workers (not leaving), in a stable order.
    pub fn free_workers(&self) -> Vec<&Worker> {
        self.workers.values().filter(|w| w.job.is_none() && w.leaving.is_none()).collect()
    }

    /// Jobs in submission order.
    pub fn jobs_in_order(&self) -> Vec<&Job> {
        let mut jobs: Vec<&Job> = self.jobs.values().collect();
        jobs.sort_by_key(|j| (j.submitted_at_ms, job_seq(&j.id)));
        jobs
    }

    /// The worker's rank in its job's current plan.
    pub fn rank_of(&self, worker: &str) -> Option<(&Job, u32)> {
        let w = self.workers.get(worker)?;
        let job = self.jobs.get(w.job.as_ref()?)?;
        let plan = job.plan.as_ref()?;
        let rank = plan.ranks.iter().position(|r| r.worker == worker)?;
        Some((job, rank as u32))
    }

    pub fn apply(&mut self, cmd: Command) -> Result<Vec<Event>, Rejection> {
        match cmd {
            Command::SubmitJob {
                name,
                spec_json,
                min_workers,
                max_workers,
                fixed_world,
                stages,
                total_steps,
                keep_checkpoints,
                output_root,
                submission_id,
                spec_yaml,
                registry,
                uid,
                data_key,
                owner,
                priority,
                at_ms,
            } => {
                if let Some(job) = submission_id.as_ref().and_then(|s| self.submissions.get(s)) {
                    return Ok(vec![Event::SubmissionRepeated { job: job.clone() }]);
                }
                let template = JobTemplate {
                    name,
                    spec_json,
                    min_workers,
                    max_workers,
                    fixed_world,
                    stages,
                    total_steps,
                    keep_checkpoints,
                    output_root,
                    spec_yaml,
                    registry,
                    priority,
                };
                let id = self.insert_job(template, uid, data_key, owner, at_ms)?;
                if let Some(s) = submission_id {
                    self.submissions.insert(s, id.clone());
                }
                Ok(vec![Event::JobSubmitted { job: id }])
            }
            Command::SubmitSweep { sweep, owner, submission_id, at_ms } => {
                self.submit_sweep(sweep, owner, submission_id, at_ms)
            }
            Command::StartTrial { at, uid, data_key, at_ms } => self.start_trial(at, uid, data_key, at_ms),
            Command::StopTrial { job, reason, .. } => self.stop_trial(&job, reason),
            Command::CancelSweep { sweep, .. } => self.cancel_sweep(&sweep),
            Command::RecordTrial { at, curve, means } => self.record_trial(at, curve, means),
            Command::CancelJob { job, .. } => {
                let j = self.job_mut(&job)?;
                if j.phase.is_terminal() {
                    return Ok(vec![Event::Ignored { reason: format!("job {job} already ended") }]);
                }
                j.message = if j.phase.is_handing_off() {
                    format!(
                        "cancelled before the model was registered; it stays at {}",
                        j.final_model.as_deref().unwrap_or("?")
                    )
                } else {
                    "cancelled".into()
                };
                j.phase = JobPhase::Cancelled;
                self.release_job(&job);
                Ok(vec![Event::JobCancelled { job }])
            }
            Command::CreateToken { token } => {
                if let Some(old) = self.tokens.get(&token.name) {
                    return Err(Rejection::Exists(format!(
                        "a token named {} exists already{}",
                        token.name,
                        if old.revoked_at_ms.is_some() { " (revoked; names are not reused)" } else { "" }
                    )));
                }
                if self.tokens.len() >= crate::limits::MAX_TOKENS {
                    return Err(Rejection::Invalid(format!(
                        "{} tokens exist (revoked ones included); that is the most a coordinator keeps",
                        self.tokens.len()
                    )));
                }
                let name = token.name.clone();
                self.tokens.insert(name.clone(), token);
                Ok(vec![Event::TokenCreated { name }])
            }
            Command::RevokeToken { name, at_ms } => {
                let t = self.tokens.get_mut(&name).ok_or_else(|| Rejection::TokenNotFound(name.clone()))?;
                if t.revoked_at_ms.is_some() {
                    return Ok(vec![Event::Ignored { reason: format!("token {name} is revoked already") }]);
                }
                t.revoked_at_ms = Some(at_ms);
                Ok(vec![Event::TokenRevoked { name }])
            }
            Command::RegisterWorker { data_addr, hostname, rank_hint, key_hash, metrics_addr, device, at_ms } => {
                self.next_worker_seq += 1;
                let id = format!("w{}", self.next_worker_seq);
                let worker = Worker {
                    id: id.clone(),
                    data_addr,
                    hostname,
                    registered_at_ms: at_ms,
                    job: None,
                    leaving: None,
                    rank_hint,
                    key_hash,
                    metrics_addr,
                    device,
                };
                self.workers.insert(id.clone(), worker);
                Ok(vec![Event::WorkerRegistered { worker: id }])
            }
            Command::RemoveWorker { worker, reason, at_ms } => {
                let w = self.workers.remove(&worker).ok_or_else(|| Rejection::WorkerNotFound(worker.clone()))?;
                let mut events = vec![Event::WorkerRemoved { worker: worker.clone(), reason: reason.clone() }];
                if let Some(job) = w.job {
                    let why = format!("worker {worker} removed: {reason}");
                    events.extend(self.replan(&job, &[worker.as_str()], why, at_ms));
                }
                Ok(events)
            }
            Command::PreemptWorker { worker, reason, at_ms } => {
                let w = self.workers.get(&worker).ok_or_else(|| Rejection::WorkerNotFound(worker.clone()))?;
                if w.leaving.is_some() {
                    return Ok(vec![Event::Ignored { reason: format!("worker {worker} is already leaving") }]);
                }
                let running = w.job.clone().filter(|j| self.jobs.get(j).is_some_and(|j| j.phase == JobPhase::Running));
                let Some(job) = running else {
                    return self.apply(Command::RemoveWorker { worker, reason, at_ms });
                };
                self.workers.get_mut(&worker).expect("checked").leaving = Some(reason.clone());
                let j = self.jobs.get_mut(&job).expect("checked");
                j.checkpoint_request += 1;
                let request = j.checkpoint_request;
                Ok(vec![
                    Event::WorkerLeaving { worker, job: job.clone(), reason },
                    Event::CheckpointRequested { job, request },
                ])
            }
            Command::Schedule { job, at_ms } => {
                let j = self.job(&job)?;
                if !matches!(j.phase, JobPhase::Pending | JobPhase::Waiting) {
                    return Err(Rejection::BadPhase {
                        job,
                        phase: j.phase,
                        what: "only pending or waiting jobs are scheduled".into(),
                    });
                }
                let needed = j.plan_request().min_world();
                let reason = if j.generation == 0 { "job started" } else { "enough workers again" };
                match self.queue().verdict(&job) {
                    Some(Verdict::Start(workers)) => {
                        let hint = |id: &str| self.workers.get(id).and_then(|w| w.rank_hint);
                        let workers = scheduler::apply_rank_hints(workers.clone(), hint);
                        Ok(self.start_generation(&job, workers, reason.into(), at_ms))
                    }
                    Some(Verdict::Wait { usable }) => Err(Rejection::NotEnoughWorkers { job, free: *usable, needed }),
                    None => Err(Rejection::Invalid(format!("job {job} is not in the queue"))),
                }
            }
            Command::RestartGeneration { job, generation, reason, at_ms } => {
                let j = self.job(&job)?;
                if j.phase != JobPhase::Running || j.generation != generation {
                    return Ok(vec![Event::Ignored {
                        reason: format!("restart of generation {generation} of {job} is stale"),
                    }]);
                }
                let workers = j.workers();
                let restarts = j.restarts + 1;
                if restarts > self.max_restarts {
                    let reason = format!("gave up after {} restarts; last failure: {reason}", self.max_restarts);
                    return Ok(self.fail(&job, reason));
                }
                self.job_mut(&job)?.restarts = restarts;
                Ok(self.start_generation(&job, workers, reason, at_ms))
            }
            Command::CommitCheckpoint { job, generation, step, location, blocked_ms, total_ms, at_ms } => {
                let j = self.job_mut(&job)?;
                if !j.phase.is_active() {
                    return Ok(vec![Event::Ignored { reason: format!("job {job} already ended") }]);
                }
                if j.latest_checkpoint().is_some_and(|c| c.step >= step) {
                    return Ok(vec![Event::Ignored {
                        reason: format!("checkpoint step {step} of {job} is not newer"),
                    }]);
                }
                j.checkpoints.push(CheckpointRecord { step, location, generation, blocked_ms, total_ms });
                let mut events = vec![Event::CheckpointCommitted { job: job.clone(), step }];
                let keep = j.keep_checkpoints as usize;
                if j.checkpoints.len() > keep {
                    let dropped: Vec<u64> = j.checkpoints.drain(..j.checkpoints.len() - keep).map(|c| c.step).collect();
                    events.push(Event::CheckpointsDropped { job: job.clone(), steps: dropped });
                }
                let current = j.phase == JobPhase::Running && j.generation == generation;
                let members = j.workers();
                if current {
                    // Workers that announced their end leave now: the new
                    // generation resumes from this checkpoint, redoing nothing.
                    let leaving: Vec<WorkerId> = members
                        .into_iter()
                        .filter(|w| self.workers.get(w).is_some_and(|w| w.leaving.is_some()))
                        .collect();
                    if leaving.is_empty() {
                        // A job below its maximum grows at a checkpoint, so that
                        // the new generation resumes from it and loses no step.
                        events.extend(self.grow(&job, at_ms));
                    } else {
                        for w in &leaving {
                            let reason = self.workers.remove(w).and_then(|w| w.leaving).unwrap_or_default();
                            events.push(Event::WorkerRemoved {
                                worker: w.clone(),
                                reason: format!("preempted: {reason}"),
                            });
                        }
                        let gone: Vec<&str> = leaving.iter().map(String::as_str).collect();
                        let why = format!("{} preempted", leaving.join(", "));
                        events.extend(self.replan(&job, &gone, why, at_ms));
                    }
                }
                Ok(events)
            }
            Command::FinishJob { job, generation, step, final_model, .. } => {
                let j = self.job_mut(&job)?;
                if j.phase.is_terminal() {
                    return Ok(vec![Event::Ignored { reason: format!("job {job} already ended") }]);
                }
                if j.generation != generation {
                    return Ok(vec![Event::Ignored {
                        reason: format!("finish from generation {generation} of {job} is stale"),
                    }]);
                }
                if step < j.total_steps {
                    return Err(Rejection::Invalid(format!("job {job} finished at step {step} of {}", j.total_steps)));
                }
                j.final_model = Some(final_model);
                let event = if j.registry.is_some() {
                    j.phase = JobPhase::Registering;
                    j.message = format!("trained {step} steps; handing the model to the registry");
                    j.handoff = Some(Handoff::default());
                    Event::JobTrained { job: job.clone() }
                } else {
                    j.phase = JobPhase::Succeeded;
                    j.message = format!("trained {step} steps");
                    Event::JobSucceeded { job: job.clone() }
                };
                self.release_job(&job);
                Ok(vec![event])
            }
            Command::FailJob { job, reason, .. } => {
                let j = self.job(&job)?;
                if j.phase.is_terminal() {
                    return Ok(vec![Event::Ignored { reason: format!("job {job} already ended") }]);
                }
                Ok(self.fail(&job, reason))
            }
            Command::HandoffDone { job, registered, .. } => {
                let j = self.job_mut(&job)?;
                if let Some(done) = j.handoff.as_ref().and_then(|h| h.registered.as_ref()) {
                    return Ok(vec![Event::Ignored {
                        reason: format!("job {job} is already registered as {}@{}", done.model, done.version),
                    }]);
                }
                if !j.phase.is_handing_off() {
                    return Err(Rejection::BadPhase {
                        job,
                        phase: j.phase,
                        what: "only a trained job is registered".into(),
                    });
                }
                let (model, version) = (registered.model.clone(), registered.version);
                j.phase = JobPhase::Succeeded;
                j.message = format!("trained {} steps; registered as {model} version {version}", j.total_steps);
                j.handoff.get_or_insert_with(Handoff::default).registered = Some(registered);
                Ok(vec![Event::ModelRegistered { job, model, version }, Event::JobSucceeded { job: j.id.clone() }])
            }
            Command::HandoffFailed { job, error, at_ms } => {
                let j = self.job_mut(&job)?;
                if !j.phase.is_handing_off() {
                    return Ok(vec![Event::Ignored { reason: format!("job {job} is not waiting for its hand-off") }]);
                }
                let h = j.handoff.get_or_insert_with(Handoff::default);
                h.attempts += 1;
                h.last_error = error.clone();
                h.last_attempt_ms = at_ms;
                let attempts = h.attempts;
                j.phase = JobPhase::TrainedNotRegistered;
                j.message = format!("trained, not registered (attempt {attempts}): {error}; retrying");
                Ok(vec![Event::HandoffFailed { job, attempts, error }])
            }
            Command::RetryHandoff { job, .. } => {
                let j = self.job_mut(&job)?;
                if j.registry.is_none() {
                    return Err(Rejection::Invalid(format!("job {job} has no registry section in its job file")));
                }
                if let Some(done) = j.handoff.as_ref().and_then(|h| h.registered.as_ref()) {
                    return Ok(vec![Event::Ignored {
                        reason: format!("job {job} is already registered as {}@{}", done.model, done.version),
                    }]);
                }
                if !j.phase.is_handing_off() {
                    return Err(Rejection::BadPhase {
                        job,
                        phase: j.phase,
                        what: "only a trained job that is not registered yet can be registered".into(),
                    });
                }
                let h = j.handoff.get_or_insert_with(Handoff::default);
                h.retry_request += 1;
                j.phase = JobPhase::Registering;
                j.message = "registration retried by hand".into();
                Ok(vec![Event::HandoffRetried { job }])
            }
            Command::SetTrackingRun { job, run_id } => {
                let j = self.job_mut(&job)?;
                if let Some(run) = &j.tracking_run {
                    return Ok(vec![Event::Ignored { reason: format!("job {job} is already tracked by run {run}") }]);
                }
                j.tracking_run = Some(run_id.clone());
                Ok(vec![Event::TrackingRunSet { job, run_id }])
            }
        }
    }

    /// Checks a job template and queues it as a new job; returns its id.
    fn insert_job(
        &mut self,
        t: JobTemplate,
        uid: String,
        data_key: DataKey,
        owner: Option<Owner>,
        at_ms: i64,
    ) -> Result<JobId, Rejection> {
        let (min_workers, max_workers, stages) = (t.min_workers, t.max_workers, t.stages);
        if min_workers == 0 || min_workers > max_workers {
            return Err(Rejection::Invalid(format!(
                "workers.min {min_workers} and workers.max {max_workers} must satisfy 1 <= min <= max"
            )));
        }
        if stages == 0 {
            return Err(Rejection::Invalid("a job has at least 1 pipeline stage".into()));
        }
        if min_workers % stages != 0 || max_workers % stages != 0 {
            return Err(Rejection::Invalid(format!(
                "workers.min {min_workers} and workers.max {max_workers} must be multiples of the \
                 {stages} pipeline stages"
            )));
        }
        if let Some(n) = t.fixed_world.filter(|n| n % stages != 0) {
            return Err(Rejection::Invalid(format!(
                "a fixed world of {n} workers must be a multiple of the {stages} pipeline stages"
            )));
        }
        self.next_job_seq += 1;
        let id = format!("{}-{}", t.name, self.next_job_seq);
        self.jobs.insert(
            id.clone(),
            Job {
                id: id.clone(),
                name: t.name,
                spec_json: t.spec_json,
                min_workers,
                max_workers,
                fixed_world: t.fixed_world,
                stages,
                total_steps: t.total_steps,
                keep_checkpoints: t.keep_checkpoints.max(1),
                output_dir: format!("{}/{id}", t.output_root.trim_end_matches('/')),
                phase: JobPhase::Pending,
                generation: 0,
                plan: None,
                data_key,
                checkpoints: Vec::new(),
                final_model: None,
                restarts: 0,
                message: "waiting for workers".into(),
                submitted_at_ms: at_ms,
                history: Vec::new(),
                checkpoint_request: 0,
                spec_yaml: t.spec_yaml,
                registry: t.registry,
                uid: if uid.is_empty() { id.clone() } else { uid },
                handoff: None,
                tracking_run: None,
                owner,
                priority: t.priority,
                sweep: None,
            },
        );
        Ok(id)
    }

    fn job(&self, job: &str) -> Result<&Job, Rejection> {
        self.jobs.get(job).ok_or_else(|| Rejection::JobNotFound(job.to_string()))
    }

    fn job_mut(&mut self, job: &str) -> Result<&mut Job, Rejection> {
        self.jobs.get_mut(job).ok_or_else(|| Rejection::JobNotFound(job.to_string()))
    }

    fn fail(&mut self, job: &str, reason: String) -> Vec<Event> {
        if let Some(j) = self.jobs.get_mut(job) {
            j.phase = JobPhase::Failed;
            j.message = reason.clone();
        }
        self.release_job(job);
        vec![Event::JobFailed { job: job.to_string(), reason }]
    }

    /// Frees the job's workers and drops its plan.
    fn release_job(&mut self, job: &str) {
        if let Some(j) = self.jobs.get_mut(job) {
            j.plan = None;
        }
        self.unassign(job);
    }

    /// Takes every worker off `job`, touching only those on it (the maps
    /// share their nodes with published states: a write copies its path).
    fn unassign(&mut self, job: &str) {
        let on_job: Vec<WorkerId> =
            self.workers.values().filter(|w| w.job.as_deref() == Some(job)).map(|w| w.id.clone()).collect();
        for id in on_job {
            if let Some(w) = self.workers.get_mut(&id) {
                w.job = None;
            }
        }
    }

    fn start_generation(&mut self, job: &str, workers: Vec<WorkerId>, reason: String, at_ms: i64) -> Vec<Event> {
        self.unassign(job);
        let ranks: Vec<RankSlot> = workers
            .iter()
            .filter_map(|id| self.workers.get(id))
            .map(|w| RankSlot {
                worker: w.id.clone(),
                data_addr: w.data_addr.clone(),
                metrics_addr: w.metrics_addr.clone(),
                device: w.device.clone(),
            })
            .collect();
        for r in &ranks {
            if let Some(w) = self.workers.get_mut(&r.worker) {
                w.job = Some(job.to_string());
            }
        }
        let Some(j) = self.jobs.get_mut(job) else { return Vec::new() };
        j.generation += 1;
        let resume_step = j.latest_checkpoint().map_or(0, |c| c.step);
        let world_size = ranks.len() as u32;
        let secret = j.data_key.generation_secret(&j.id, j.generation);
        j.plan = Some(Plan { generation: j.generation, ranks, secret });
        j.phase = JobPhase::Running;
        j.message = reason.clone();
        j.history.push(GenerationRecord {
            generation: j.generation,
            world_size,
            reason: reason.clone(),
            at_ms,
            resumed_from_step: resume_step,
        });
        vec![Event::GenerationStarted {
            job: job.to_string(),
            generation: j.generation,
            world_size,
            resume_step,
            reason,
        }]
    }

    /// After `gone` left a running job: a new generation on the workers that
    /// remain plus spare ones (free workers no queued job can use), or, when
    /// fewer than its minimum remain, back in the queue at its place: it
    /// starts again at once if the queue lets it (on its remaining workers
    /// first), and waits otherwise.
    fn replan(&mut self, job: &str, gone: &[&str], reason: String, at_ms: i64) -> Vec<Event> {
        let Some(j) = self.jobs.get(job) else { return Vec::new() };
        if j.phase != JobPhase::Running {
            return Vec::new();
        }
        let current: Vec<WorkerId> = j.workers().into_iter().filter(|w| !gone.contains(&w.as_str())).collect();
        let req = j.plan_request();
        if req.target(current.len()).is_some() {
            let spare = self.queue().spare;
            let workers = scheduler::plan(&req, &current, &spare).expect("the remaining workers make a plan");
            return self.start_generation(job, workers, reason, at_ms);
        }
        self.release_job(job);
        let j = self.jobs.get_mut(job).expect("job exists");
        j.phase = JobPhase::Waiting;
        if let Some(workers) = self.queue_preferring(Some((job, &current))).started(job) {
            return self.start_generation(job, workers.to_vec(), reason, at_ms);
        }
        let j = self.jobs.get_mut(job).expect("job exists");
        j.generation += 1;
        j.message = format!("{reason}; waiting for {} workers", req.min_world());
        j.history.push(GenerationRecord {
            generation: j.generation,
            world_size: 0,
            reason: reason.clone(),
            at_ms,
            resumed_from_step: 0,
        });
        vec![Event::JobWaiting { job: job.to_string(), generation: j.generation, reason }]
    }

    /// Grows a running job below its maximum into the spare workers (free
    /// workers no queued job can use; see [`crate::scheduler::queue`]).
    fn grow(&mut self, job: &str, at_ms: i64) -> Vec<Event> {
        let Some(j) = self.jobs.get(job) else { return Vec::new() };
        let current = j.workers();
        if current.len() as u32 >= j.max_workers {
            return Vec::new();
        }
        let req = j.plan_request();
        let spare = self.queue().spare;
        if spare.is_empty() {
            return Vec::new();
        }
        match scheduler::plan(&req, &current, &spare) {
            Some(workers) if workers != current => self.start_generation(job, workers, "workers joined".into(), at_ms),
            _ => Vec::new(),
        }
    }
}

/// The sequence number in a job id `name-N`, for stable ordering.
fn job_seq(id: &str) -> u64 {
    id.rsplit('-').next().and_then(|s| s.parse().ok()).unwrap_or(0)
}
