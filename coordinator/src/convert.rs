//! Domain types to wire types, and errors to gRPC statuses and to the HTTP
//! API's codes: in one place.

use flotilla_proto::v1 as pb;
use tonic::Status;

use crate::soft::Soft;
use crate::state::{CheckpointRecord, Job, JobPhase, Rejection, State};
use crate::store::StoreError;

pub fn phase(p: JobPhase) -> pb::JobPhase {
    match p {
        JobPhase::Pending => pb::JobPhase::Pending,
        JobPhase::Running => pb::JobPhase::Running,
        JobPhase::Waiting => pb::JobPhase::Waiting,
        JobPhase::Succeeded => pb::JobPhase::Succeeded,
        JobPhase::Failed => pb::JobPhase::Failed,
        JobPhase::Cancelled => pb::JobPhase::Cancelled,
        JobPhase::Registering => pb::JobPhase::Registering,
        JobPhase::TrainedNotRegistered => pb::JobPhase::TrainedNotRegistered,
    }
}

/// A metric point as the registry and `metrics.jsonl` record it.
pub fn metric_record(p: &pb::MetricPoint) -> flotilla_registry::MetricRecord {
    flotilla_registry::MetricRecord {
        step: p.step,
        loss: p.loss,
        lr: p.lr,
        samples_per_sec: p.samples_per_sec,
        grad_norm: p.grad_norm,
        generation: p.generation,
        world_size: p.world_size,
        time_ms: p.time_ms,
        eval_loss: p.eval_loss,
        eval_accuracy: p.eval_accuracy,
    }
}

pub fn checkpoint(c: &CheckpointRecord) -> pb::CheckpointRef {
    pb::CheckpointRef {
        step: c.step,
        location: c.location.clone(),
        generation: c.generation,
        blocked_ms: c.blocked_ms,
        total_ms: c.total_ms,
    }
}

/// The job's status: its durable state, its place in the queue (`None`
/// when it is not queued: see [`State::queue_position`]), with the
/// progress and memory reports the leader holds.
pub fn job_status(job: &Job, queue_position: Option<u32>, soft: &Soft) -> pb::JobStatus {
    // Progress from an older generation still tells how far the job got.
    let (step, loss, sps) = match soft.progress.get(&job.id) {
        Some(p) => (p.step, p.loss, if p.generation == job.generation { p.samples_per_sec } else { 0.0 }),
        None => (job.latest_checkpoint().map_or(0, |c| c.step), 0.0, 0.0),
    };
    let eval = soft.progress.get(&job.id).and_then(|p| p.eval);
    let trained = job.final_model.is_some();
    let step = if trained { job.total_steps } else { step };
    pb::JobStatus {
        job_id: job.id.clone(),
        name: job.name.clone(),
        phase: phase(job.phase) as i32,
        generation: job.generation,
        world_size: job.world_size(),
        min_workers: job.min_workers,
        max_workers: job.max_workers,
        step,
        total_steps: job.total_steps,
        loss,
        samples_per_sec: sps,
        latest_checkpoint: job.latest_checkpoint().map(checkpoint),
        checkpoints: job.checkpoints.iter().map(checkpoint).collect(),
        output_dir: job.output_dir.clone(),
        final_model: job.final_model.clone().unwrap_or_default(),
        message: job.message.clone(),
        submitted_by: job.owner.as_ref().map(|o| o.name.clone()).unwrap_or_default(),
        eval_step: eval.map(|e| e.0),
        eval_loss: eval.map(|e| e.1),
        eval_accuracy: eval.and_then(|e| e.2),
        restarts: job.restarts,
        generations: job
            .history
            .iter()
            .map(|g| pb::GenerationRecord {
                generation: g.generation,
                world_size: g.world_size,
                reason: g.reason.clone(),
                at_unix_ms: g.at_ms,
                resumed_from_step: g.resumed_from_step,
            })
            .collect(),
        ranks: job
            .plan
            .as_ref()
            .map(|p| {
                p.ranks
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        let rank = i as u32;
                        let (stage, replica) = job.stage_and_replica(rank);
                        let report = soft.rank(&job.id, p.generation, rank);
                        pb::RankInfo {
                            rank,
                            worker_id: r.worker.clone(),
                            data_addr: r.data_addr.clone(),
                            stage,
                            replica,
                            metrics_addr: r.metrics_addr.clone(),
                            device: r.device.clone(),
                            memory: report.map(|r| r.memory.clone()),
                            step_times: report.and_then(|r| r.step_times),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default(),
        registration: registration(job),
        priority: job.priority,
        queue_position: queue_position.unwrap_or(0),
    }
}

/// The hand-off part of a job's status; `None` for a job without a registry.
fn registration(job: &Job) -> Option<pb::Registration> {
    let target = job.registry.as_ref()?;
    let handoff = job.handoff.clone().unwrap_or_default();
    let done = handoff.registered.as_ref();
    Some(pb::Registration {
        registry: target.url.clone(),
        model: done.map_or_else(|| target.model.clone(), |r| r.model.clone()),
        version: done.map_or(0, |r| r.version),
        uri: done.map(|r| r.uri.clone()).unwrap_or_default(),
        run_id: done.map(|r| r.run_id.clone()).unwrap_or_default(),
        attempts: handoff.attempts,
        last_error: handoff.last_error,
        tracking_run: job.tracking_run.clone().unwrap_or_default(),
    })
}

/// The worker's assignment as the state says it now.
pub fn assignment(state: &State, worker: &str) -> pb::Assignment {
    let Some((job, rank)) = state.rank_of(worker) else { return pb::Assignment::default() };
    let plan = job.plan.as_ref().expect("rank_of implies a plan");
    let (stage, replica) = job.stage_and_replica(rank);
    pb::Assignment {
        job_id: job.id.clone(),
        generation: plan.generation,
        rank,
        world_size: plan.ranks.len() as u32,
        peers: plan.ranks.iter().map(|r| r.data_addr.clone()).collect(),
        spec_json: job.spec_json.clone(),
        output_dir: job.output_dir.clone(),
        checkpoints: job.checkpoints.iter().rev().map(checkpoint).collect(),
        checkpoint_request: job.checkpoint_request,
        stages: job.stages.max(1),
        stage,
        replica,
        data_secret: plan.secret.as_bytes().to_vec(),
    }
}

/// The gRPC metadata key under which a follower names the leader's address
/// when it refuses a call with UNAVAILABLE.
pub use flotilla_proto::leader::LEADER_METADATA;

/// The one mapping from meta-store errors to gRPC statuses.
pub fn status(e: StoreError) -> Status {
    match e {
        StoreError::Rejected(r) => match r {
            Rejection::JobNotFound(_) | Rejection::WorkerNotFound(_) | Rejection::TokenNotFound(_) => {
                Status::not_found(r.to_string())
            }
            Rejection::Exists(_) => Status::already_exists(r.to_string()),
            Rejection::BadPhase { .. } | Rejection::NotEnoughWorkers { .. } => {
                Status::failed_precondition(r.to_string())
            }
            Rejection::Invalid(_) => Status::invalid_argument(r.to_string()),
        },
        StoreError::NotLeader { leader } => flotilla_proto::leader::not_leader(leader.as_deref()),
        e @ StoreError::Unavailable(_) => Status::unavailable(e.to_string()),
        StoreError::Invalid(m) => Status::invalid_argument(m),
        StoreError::Refused(m) => Status::failed_precondition(m),
    }
}

/// The HTTP API's rendering of an error: its HTTP status and a stable,
/// lowercase code. Every error of the HTTP API passes here, from the same
/// `Status` the gRPC API sends (domain errors become a `Status` in
/// [`status`] and in the shared operations of `api`).
pub fn api_error(s: &Status) -> (u16, &'static str) {
    use tonic::Code;
    if flotilla_proto::leader::is_not_leader(s) {
        return (503, "not_leader");
    }
    match s.code() {
        Code::InvalidArgument => (400, "invalid_argument"),
        Code::OutOfRange => (400, "out_of_range"),
        Code::Unauthenticated => (401, "unauthenticated"),
        Code::PermissionDenied => (403, "permission_denied"),
        Code::NotFound => (404, "not_found"),
        Code::AlreadyExists => (409, "already_exists"),
        Code::FailedPrecondition => (409, "failed_precondition"),
        Code::Aborted => (409, "aborted"),
        Code::ResourceExhausted => (429, "resource_exhausted"),
        Code::Unimplemented => (501, "unimplemented"),
        Code::Unavailable => (503, "unavailable"),
        Code::Cancelled => (503, "cancelled"),
        Code::DeadlineExceeded => (504, "deadline_exceeded"),
        Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => (500, "internal"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_reach_http_through_the_grpc_status() {
        let http = |e| api_error(&status(e));
        assert_eq!(http(StoreError::Rejected(Rejection::JobNotFound("j".into()))), (404, "not_found"));
        assert_eq!(http(StoreError::Invalid("x".into())), (400, "invalid_argument"));
        assert_eq!(http(StoreError::Refused("x".into())), (409, "failed_precondition"));
        assert_eq!(http(StoreError::NotLeader { leader: Some("https://h:1".into()) }), (503, "not_leader"));
        assert_eq!(http(StoreError::NotLeader { leader: None }), (503, "not_leader"));
        assert_eq!(http(StoreError::Unavailable("x".into())), (503, "unavailable"));
        assert_eq!(api_error(&Status::unauthenticated("x")), (401, "unauthenticated"));
        assert_eq!(api_error(&Status::permission_denied("x")), (403, "permission_denied"));
    }
}
