//! The client operations, shared by both front ends: the gRPC `JobService`
//! (`service.rs`) and the HTTP/JSON API (`http/`). Each takes the
//! coordinator, the caller (as `auth` found it) and parsed, bounded input,
//! and returns wire types or a `Status` (the one error type both front ends
//! map: gRPC sends it, `convert::api_error` turns it into HTTP).

use std::path::Path;
use std::pin::Pin;

use flotilla_jobspec::DpSize;
use flotilla_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::Status;

use crate::auth::Caller;
use crate::convert;
use crate::coordinator::{now_ms, Coordinator};
use crate::state::{Command, Event, JobTemplate};

mod sweeps;
pub use sweeps::{cancel_sweep, get_sweep, list_sweeps, submit_sweep, sweep_status};

pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Every call but `GetLeader` is served by the leading replica only; the
/// others refuse with the leader's address so that clients can follow it.
pub fn lead(c: &Coordinator) -> Result<(), Status> {
    if c.store.is_leader() {
        Ok(())
    } else {
        Err(flotilla_proto::leader::not_leader(c.store.leader_hint().as_deref()))
    }
}

/// Resolves once this replica no longer leads (checked at the driver's
/// period and on every change the driver sees).
pub async fn lost_lead(c: &Coordinator) {
    let mut leading = c.leading.subscribe();
    let mut tick = tokio::time::interval(c.cfg.tick);
    loop {
        if !c.store.is_leader() {
            return;
        }
        tokio::select! {
            _ = leading.changed() => {}
            _ = tick.tick() => {}
        }
    }
}

fn not_found(job: &str) -> Status {
    Status::not_found(format!("job {job} not found"))
}

/// Refuses `caller` unless it may act on `job` (an admin, or the token that
/// submitted it).
pub fn manage(c: &Coordinator, caller: &Caller, job: &str, what: &str) -> Result<(), Status> {
    let state = c.state();
    let j = state.jobs.get(job).ok_or_else(|| not_found(job))?;
    caller.may_manage(j.owner.as_ref(), what)
}

/// A job's status now.
pub fn job_status(c: &Coordinator, job_id: &str) -> Result<pb::JobStatus, Status> {
    let state = c.state();
    let job = state.jobs.get(job_id).ok_or_else(|| not_found(job_id))?;
    let soft = c.soft();
    Ok(convert::job_status(job, state.queue_position(job_id), &soft))
}

/// A job file's template: parsed and validated (`origin` names it, and
/// the files it names are read relative to its folder), its paths resolved
/// against `base_dir`.
pub fn template(spec_yaml: &str, origin: &str, base_dir: &str) -> Result<JobTemplate, Status> {
    let spec = flotilla_jobspec::parse(spec_yaml, origin).map_err(|e| Status::invalid_argument(e.to_string()))?;
    template_of(spec, spec_yaml, base_dir)
}

/// [`template`] for a job file already parsed.
pub(crate) fn template_of(
    mut spec: flotilla_jobspec::JobSpec,
    spec_yaml: &str,
    base_dir: &str,
) -> Result<JobTemplate, Status> {
    let base = Path::new(base_dir);
    if !base.is_absolute() {
        return Err(Status::invalid_argument(format!("base_dir must be an absolute path, got {base_dir:?}")));
    }
    spec.resolve_paths(base);
    let stages = spec.parallelism.pp.max(1) as u32;
    // `dp` counts replicas, each of `pp` workers.
    let fixed_world = match spec.parallelism.dp {
        DpSize::Auto => None,
        DpSize::Fixed(n) => Some(n as u32 * stages),
    };
    Ok(JobTemplate {
        name: spec.name.clone(),
        spec_json: spec.to_json(),
        min_workers: spec.workers.min as u32,
        max_workers: spec.workers.max as u32,
        fixed_world,
        stages,
        total_steps: spec.train.steps,
        keep_checkpoints: spec.checkpoint.keep as u32,
        output_root: spec.checkpoint.url.clone(),
        spec_yaml: spec_yaml.to_string(),
        registry: spec.registry.clone(),
        priority: spec.priority,
    })
}

/// Validates a job file and queues the job; returns its id (the first
/// job's again for a repeated `submission_id`).
pub async fn submit(c: &Coordinator, caller: &Caller, req: pb::SubmitJobRequest) -> Result<String, Status> {
    let origin = if req.origin.is_empty() { "job.yaml" } else { &req.origin };
    let t = template(&req.spec_yaml, origin, &req.base_dir)?;
    let cmd = Command::SubmitJob {
        name: t.name,
        spec_json: t.spec_json,
        min_workers: t.min_workers,
        max_workers: t.max_workers,
        fixed_world: t.fixed_world,
        stages: t.stages,
        total_steps: t.total_steps,
        keep_checkpoints: t.keep_checkpoints,
        output_root: t.output_root,
        submission_id: (!req.submission_id.is_empty()).then(|| req.submission_id.clone()),
        registry: t.registry,
        uid: crate::random_id(),
        data_key: crate::data_key::DataKey::random()
            .map_err(|e| Status::internal(format!("could not mint the job's data-plane key: {e}")))?,
        spec_yaml: t.spec_yaml,
        owner: caller.owner(),
        priority: t.priority,
        at_ms: now_ms(),
    };
    let events = c.propose(cmd).await.map_err(convert::status)?;
    let job_id = events
        .iter()
        .find_map(|e| match e {
            Event::JobSubmitted { job } | Event::SubmissionRepeated { job } => Some(job.clone()),
            _ => None,
        })
        .ok_or_else(|| Status::internal("submit produced no job"))?;
    tracing::info!(job = %job_id, "job submitted");
    Ok(job_id)
}

/// A job's status, read after the replica has caught up with the log.
pub async fn get_job(c: &Coordinator, job: &str) -> Result<pb::JobStatus, Status> {
    c.store.read_fresh().await.map_err(convert::status)?;
    job_status(c, job)
}

/// Every job, oldest first.
pub async fn list_jobs(c: &Coordinator) -> Result<Vec<pb::JobStatus>, Status> {
    c.store.read_fresh().await.map_err(convert::status)?;
    let state = c.state();
    let soft = c.soft();
    let positions = state.queue_positions();
    Ok(state
        .jobs_in_order()
        .into_iter()
        .map(|j| convert::job_status(j, positions.get(&j.id).copied(), &soft))
        .collect())
}

/// Cancels a job (its owner or an admin); returns its status after.
pub async fn cancel(c: &Coordinator, caller: &Caller, job: &str) -> Result<pb::JobStatus, Status> {
    manage(c, caller, job, "cancel it")?;
    c.propose(Command::CancelJob { job: job.to_string(), at_ms: now_ms() }).await.map_err(convert::status)?;
    job_status(c, job)
}

/// Retries a trained job's registry hand-off now (its owner or an admin).
pub async fn register_model(c: &Coordinator, caller: &Caller, job: &str) -> Result<pb::JobStatus, Status> {
    manage(c, caller, job, "retry its hand-off")?;
    c.propose(Command::RetryHandoff { job: job.to_string(), at_ms: now_ms() }).await.map_err(convert::status)?;
    c.handoff_wake.notify_one();
    job_status(c, job)
}

/// The metric points rank 0 reported, in order (leader's soft state).
pub fn metrics(c: &Coordinator, job: &str) -> Result<Vec<pb::MetricPoint>, Status> {
    if !c.state().jobs.contains_key(job) {
        return Err(not_found(job));
    }
    Ok(c.soft().metrics.get(job).cloned().unwrap_or_default())
}

/// A registered worker as clients see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    pub id: String,
    pub hostname: String,
    pub data_addr: String,
    pub registered_at_ms: i64,
    pub job: Option<String>,
    pub rank: Option<u32>,
    /// Why it is leaving, if it announced it is.
    pub leaving: Option<String>,
    /// Where it serves Prometheus metrics; empty: nowhere.
    pub metrics_addr: String,
    /// What it computes on (`cpu`, `cuda:0 (NAME)`); empty: unknown.
    pub device: String,
}

/// Every registered worker, by id.
pub async fn workers(c: &Coordinator) -> Result<Vec<WorkerInfo>, Status> {
    c.store.read_fresh().await.map_err(convert::status)?;
    let state = c.state();
    Ok(state
        .workers
        .values()
        .map(|w| WorkerInfo {
            id: w.id.clone(),
            hostname: w.hostname.clone(),
            data_addr: w.data_addr.clone(),
            registered_at_ms: w.registered_at_ms,
            job: w.job.clone(),
            rank: state.rank_of(&w.id).map(|(_, r)| r),
            leaving: w.leaving.clone(),
            metrics_addr: w.metrics_addr.clone(),
            device: w.device.clone(),
        })
        .collect())
}

/// Where a job's model is: the registered version's folder when it is in
/// storage this replica reads (the built-in registry, or MLflow artifacts
/// on an object store), else the job's own `final/` folder (the files the
/// registry was handed).
pub fn model_location(c: &Coordinator, job: &str) -> Result<String, Status> {
    let state = c.state();
    let j = state.jobs.get(job).ok_or_else(|| not_found(job))?;
    let registered = j.handoff.as_ref().and_then(|h| h.registered.as_ref()).map(|r| r.uri.clone());
    // The job's final model is `…/final/model.safetensors`: its folder.
    let trained = j.final_model.as_deref().map(|m| m.rsplit_once('/').map_or(m, |(folder, _)| folder).to_string());
    registered
        .filter(|uri| flotilla_storage::Storage::open(uri).is_ok())
        .or(trained)
        .ok_or_else(|| Status::failed_precondition(format!("job {job} has no trained model yet")))
}

/// A job's model folder (see [`model_location`]) and its files with their
/// sizes.
pub async fn model_files(
    c: &Coordinator,
    job: &str,
) -> Result<(flotilla_storage::Storage, Vec<(String, u64)>), Status> {
    let location = model_location(c, job)?;
    let storage = flotilla_storage::Storage::open(&location)
        .map_err(|e| Status::internal(format!("the model of {job} is at {location}, which cannot be opened: {e}")))?;
    let files = storage
        .files()
        .await
        .map_err(|e| Status::unavailable(format!("could not list the model of {job} at {location}: {e}")))?;
    Ok((storage, files))
}

/// How much of a model file one read takes.
const MODEL_CHUNK: u64 = 8 << 20;

/// One file of a job's model (a name [`model_files`] lists): its size and
/// its bytes, read in chunks as the receiver takes them.
pub async fn model_file(c: &Coordinator, job: &str, name: &str) -> Result<(u64, BoxStream<Vec<u8>>), Status> {
    let (storage, files) = model_files(c, job).await?;
    let Some(&(_, size)) = files.iter().find(|(n, _)| n == name) else {
        return Err(Status::not_found(format!("the model of {job} has no file {}", crate::limits::quote(name))));
    };
    let (tx, rx) = mpsc::channel(2);
    let name = name.to_string();
    tokio::spawn(async move {
        let mut at = 0;
        while at < size {
            let end = (at + MODEL_CHUNK).min(size);
            let chunk = storage
                .get_range(&name, at..end)
                .await
                .map_err(|e| Status::unavailable(format!("reading {name} of the model failed: {e}")));
            let failed = chunk.is_err();
            if tx.send(chunk).await.is_err() || failed {
                return;
            }
            at = end;
        }
    });
    Ok((size, Box::pin(ReceiverStream::new(rx))))
}

/// Whether a job in this phase has ended (nothing will change it again).
pub fn ended(phase: i32) -> bool {
    phase == pb::JobPhase::Succeeded as i32
        || phase == pb::JobPhase::Failed as i32
        || phase == pb::JobPhase::Cancelled as i32
}

/// What a follower of a job sees: its status (now, then on every change),
/// and each metric point once, in order. Ends after the status that shows
/// the job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum JobUpdate {
    Status(Box<pb::JobStatus>),
    Metric(pb::MetricPoint),
}

/// Follows a job (see [`JobUpdate`]); with `metrics` false, statuses only.
/// Fails with the leader's address when this replica stops leading.
pub fn watch(c: std::sync::Arc<Coordinator>, job: String, metrics: bool) -> Result<BoxStream<JobUpdate>, Status> {
    let first = job_status(&c, &job)?;
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut states = c.store.subscribe();
        let mut softs = c.soft_version.subscribe();
        let mut sent_points = 0usize;
        let mut last: Option<pb::JobStatus> = None;
        let mut now = Ok(first);
        loop {
            let status = match now {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            if metrics {
                let points = c.soft().metrics.get(&job).map(|h| h.get(sent_points..).unwrap_or_default().to_vec());
                for p in points.unwrap_or_default() {
                    sent_points += 1;
                    if tx.send(Ok(JobUpdate::Metric(p))).await.is_err() {
                        return;
                    }
                }
            }
            if last.as_ref() != Some(&status) {
                let done = ended(status.phase);
                last = Some(status.clone());
                if tx.send(Ok(JobUpdate::Status(Box::new(status)))).await.is_err() || done {
                    return;
                }
            }
            tokio::select! {
                biased;
                _ = c.shutdown.cancelled() => return,
                _ = tx.closed() => return,
                _ = lost_lead(&c) => {
                    let _ = tx.send(Err(flotilla_proto::leader::not_leader(c.store.leader_hint().as_deref()))).await;
                    return;
                }
                r = states.changed() => if r.is_err() { return },
                r = softs.changed() => if r.is_err() { return },
            }
            now = job_status(&c, &job);
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}
