//! Thin gRPC services: check who calls (`auth`: the role is checked before
//! a service sees the request; what depends on the request's content is
//! checked here), check the request's bounds (`limits`), parse it, call the
//! coordinator (the client operations live in `api`, shared with the HTTP
//! API), map errors.

use std::sync::Arc;
use std::time::Instant;

use flotilla_proto::v1 as pb;
use flotilla_proto::v1::job_service_server::JobService;
use flotilla_proto::v1::token_service_server::TokenService;
use flotilla_proto::v1::worker_service_server::WorkerService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::api::{self, lead, lost_lead, BoxStream};
use crate::auth::{self, Caller, Role, TokenRecord};
use crate::convert;
use crate::coordinator::{now_ms, Coordinator};
use crate::limits::{self, bounded};
use crate::state::{Command, Event, JobPhase};

#[derive(Clone)]
pub struct JobApi(pub Arc<Coordinator>);

/// Refuses requests for a job's older (or future) generation.
fn current_generation(c: &Coordinator, job_id: &str, generation: u64) -> Result<(), Status> {
    let state = c.state();
    let job = state.jobs.get(job_id).ok_or_else(|| Status::not_found(format!("job {job_id} not found")))?;
    if job.generation != generation || job.phase != JobPhase::Running {
        return Err(Status::failed_precondition(format!(
            "generation {generation} of {job_id} is not the running one (current {})",
            job.generation
        )));
    }
    Ok(())
}

#[derive(Clone)]
pub struct WorkerApi(pub Arc<Coordinator>);

/// Refuses a report about `job` unless `worker` proves its key and is
/// assigned to the job, and `location` (the report's `field`) lies inside
/// the job's folder: a checkpoint or model is never taken from elsewhere.
fn in_job_folder(
    c: &Coordinator,
    caller: &Caller,
    worker: &str,
    job: &str,
    field: &str,
    location: &str,
) -> Result<(), Status> {
    let state = c.state();
    let j = state.jobs.get(job).ok_or_else(|| Status::not_found(format!("job {job} not found")))?;
    caller.check_worker_in_job(&state, worker, job)?;
    let folder = format!("{}/", j.output_dir.trim_end_matches('/'));
    if !location.starts_with(&folder) {
        return Err(Status::invalid_argument(format!(
            "{field} {} is not inside the job's folder {folder}",
            limits::quote(location)
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl JobService for JobApi {
    async fn submit_job(&self, req: Request<pb::SubmitJobRequest>) -> Result<Response<pb::SubmitJobResponse>, Status> {
        lead(&self.0)?;
        let caller = Caller::of(&req)?;
        let job_id = api::submit(&self.0, &caller, bounded(req)?).await?;
        Ok(Response::new(pb::SubmitJobResponse { job_id }))
    }

    async fn submit_sweep(
        &self,
        req: Request<pb::SubmitSweepRequest>,
    ) -> Result<Response<pb::SubmitSweepResponse>, Status> {
        lead(&self.0)?;
        let caller = Caller::of(&req)?;
        let sweep_id = api::submit_sweep(&self.0, &caller, bounded(req)?).await?;
        Ok(Response::new(pb::SubmitSweepResponse { sweep_id }))
    }

    async fn get_sweep(&self, req: Request<pb::GetSweepRequest>) -> Result<Response<pb::SweepStatus>, Status> {
        Ok(Response::new(api::get_sweep(&self.0, &bounded(req)?.sweep_id).await?))
    }

    async fn list_sweeps(
        &self,
        _req: Request<pb::ListSweepsRequest>,
    ) -> Result<Response<pb::ListSweepsResponse>, Status> {
        Ok(Response::new(pb::ListSweepsResponse { sweeps: api::list_sweeps(&self.0).await? }))
    }

    async fn cancel_sweep(&self, req: Request<pb::GetSweepRequest>) -> Result<Response<pb::SweepStatus>, Status> {
        lead(&self.0)?;
        let caller = Caller::of(&req)?;
        Ok(Response::new(api::cancel_sweep(&self.0, &caller, &bounded(req)?.sweep_id).await?))
    }

    async fn get_leader(&self, _req: Request<pb::GetLeaderRequest>) -> Result<Response<pb::LeaderInfo>, Status> {
        let is_leader = self.0.store.is_leader();
        let leader = self.0.store.leader_hint().unwrap_or_default();
        Ok(Response::new(pb::LeaderInfo { is_leader, leader }))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::JobStatus>, Status> {
        lead(&self.0)?;
        Ok(Response::new(api::get_job(&self.0, &bounded(req)?.job_id).await?))
    }

    async fn list_jobs(&self, _req: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        lead(&self.0)?;
        Ok(Response::new(pb::ListJobsResponse { jobs: api::list_jobs(&self.0).await? }))
    }

    async fn cancel_job(&self, req: Request<pb::CancelJobRequest>) -> Result<Response<pb::JobStatus>, Status> {
        lead(&self.0)?;
        let caller = Caller::of(&req)?;
        Ok(Response::new(api::cancel(&self.0, &caller, &bounded(req)?.job_id).await?))
    }

    async fn register_model(&self, req: Request<pb::RegisterModelRequest>) -> Result<Response<pb::JobStatus>, Status> {
        lead(&self.0)?;
        let caller = Caller::of(&req)?;
        Ok(Response::new(api::register_model(&self.0, &caller, &bounded(req)?.job_id).await?))
    }

    type WatchJobStream = BoxStream<pb::JobStatus>;

    async fn watch_job(&self, req: Request<pb::WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        lead(&self.0)?;
        let updates = api::watch(self.0.clone(), bounded(req)?.job_id, false)?;
        let statuses = updates.filter_map(|u| match u {
            Ok(api::JobUpdate::Status(s)) => Some(Ok(*s)),
            Ok(api::JobUpdate::Metric(_)) => None,
            Err(e) => Some(Err(e)),
        });
        Ok(Response::new(Box::pin(statuses)))
    }

    async fn get_metrics(
        &self,
        req: Request<pb::GetMetricsRequest>,
    ) -> Result<Response<pb::GetMetricsResponse>, Status> {
        lead(&self.0)?;
        Ok(Response::new(pb::GetMetricsResponse { points: api::metrics(&self.0, &bounded(req)?.job_id)? }))
    }
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        lead(&self.0)?;
        let caller = Caller::of(&req)?;
        let req = bounded(req)?;
        if req.data_addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(Status::invalid_argument(format!(
                "data_addr must be a socket address like 10.0.0.5:29500, got {:?}",
                req.data_addr
            )));
        }
        if !req.metrics_addr.is_empty() && req.metrics_addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(Status::invalid_argument(format!(
                "metrics_addr must be empty or a socket address like 10.0.0.5:9464, got {:?}",
                req.metrics_addr
            )));
        }
        // The same id again only with its key: an id alone proves nothing.
        let state = self.0.state();
        let known = state.workers.get(&req.worker_id).is_some_and(|w| w.data_addr == req.data_addr)
            && caller.check_worker(&state, &req.worker_id).is_ok();
        drop(state);
        if known {
            // Back after a lost connection or a leader change: same id, fresh lease.
            self.0.soft().renew(&req.worker_id, Instant::now(), self.0.cfg.lease);
            tracing::info!(worker = %req.worker_id, pid = req.pid, "worker reconnected");
            return Ok(Response::new(pb::RegisterResponse {
                worker_id: req.worker_id,
                heartbeat_interval_ms: self.0.cfg.heartbeat_interval.as_millis() as u64,
                lease_ms: self.0.cfg.lease.as_millis() as u64,
                // The worker keeps the key it proved.
                worker_key: String::new(),
            }));
        }
        let (worker_key, key_hash) = if caller.open {
            (String::new(), String::new())
        } else {
            let key = auth::random_hex().map_err(|e| Status::internal(format!("could not mint a worker key: {e}")))?;
            let hash = auth::hash_token(&key);
            (key, hash)
        };
        let cmd = Command::RegisterWorker {
            data_addr: req.data_addr,
            hostname: req.hostname,
            rank_hint: req.rank_hint,
            key_hash,
            metrics_addr: req.metrics_addr,
            device: req.device,
            at_ms: now_ms(),
        };
        let events = self.0.propose(cmd).await.map_err(convert::status)?;
        let worker_id = events
            .iter()
            .find_map(|e| match e {
                Event::WorkerRegistered { worker } => Some(worker.clone()),
                _ => None,
            })
            .ok_or_else(|| Status::internal("register produced no worker"))?;
        self.0.soft().renew(&worker_id, Instant::now(), self.0.cfg.lease);
        tracing::info!(worker = %worker_id, pid = req.pid, "worker registered");
        Ok(Response::new(pb::RegisterResponse {
            worker_id,
            heartbeat_interval_ms: self.0.cfg.heartbeat_interval.as_millis() as u64,
            lease_ms: self.0.cfg.lease.as_millis() as u64,
            worker_key,
        }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        lead(&self.0)?;
        let caller = Caller::of(&req)?;
        let worker = bounded(req)?.worker_id;
        if !self.0.state().workers.contains_key(&worker) {
            return Err(Status::not_found(format!("worker {worker} is not registered; register again")));
        }
        caller.check_worker(&self.0.state(), &worker)?;
        self.0.soft().renew(&worker, Instant::now(), self.0.cfg.lease);
        Ok(Response::new(pb::HeartbeatResponse {}))
    }

    type AssignmentsStream = BoxStream<pb::Assignment>;

    async fn assignments(
        &self,
        req: Request<pb::AssignmentsRequest>,
    ) -> Result<Response<Self::AssignmentsStream>, Status> {
        lead(&self.0)?;
        let caller = Caller::of(&req)?;
        let worker = bounded(req)?.worker_id;
        if !self.0.state().workers.contains_key(&worker) {
            return Err(Status::not_found(format!("worker {worker} is not registered; register again")));
        }
        caller.check_worker(&self.0.state(), &worker)?;
        self.0.soft().connected(&worker);
        let c = self.0.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut states = c.store.subscribe();
            let mut last: Option<pb::Assignment> = None;
            loop {
                let state = states.borrow_and_update().clone();
                if !state.workers.contains_key(&worker) {
                    let _ =
                        tx.send(Err(Status::not_found(format!("worker {worker} was removed; register again")))).await;
                    return;
                }
                let now = convert::assignment(&state, &worker);
                if last.as_ref() != Some(&now) {
                    if tx.send(Ok(now.clone())).await.is_err() {
                        break;
                    }
                    last = Some(now);
                }
                tokio::select! {
                    biased;
                    _ = c.shutdown.cancelled() => return,
                    _ = tx.closed() => break,
                    _ = lost_lead(&c) => {
                        let _ = tx.send(Err(flotilla_proto::leader::not_leader(c.store.leader_hint().as_deref()))).await;
                        return;
                    }
                    r = states.changed() => if r.is_err() { return },
                }
            }
            // The worker hung up (its process died, or it lost us).
            c.stream_closed(&worker, Instant::now()).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report_progress(&self, req: Request<pb::ProgressReport>) -> Result<Response<pb::Ack>, Status> {
        lead(&self.0)?;
        let caller = Caller::of(&req)?;
        let r = bounded(req)?;
        current_generation(&self.0, &r.job_id, r.generation)?;
        let state = self.0.state();
        caller.check_worker_in_job(&state, &r.worker_id, &r.job_id)?;
        let job = &state.jobs[&r.job_id];
        let point = pb::MetricPoint {
            step: r.step,
            loss: r.loss,
            lr: r.lr,
            samples_per_sec: r.samples_per_sec,
            grad_norm: r.grad_norm,
            generation: r.generation,
            world_size: job.world_size(),
            time_ms: if r.time_ms > 0 { r.time_ms } else { now_ms() },
            eval_loss: r.eval_loss,
            eval_accuracy: r.eval_accuracy,
        };
        self.0.soft().record_progress(&r.job_id, point);
        self.0.bump_soft();
        Ok(Response::new(pb::Ack {}))
    }

    async fn report_memory(&self, req: Request<pb::MemoryReport>) -> Result<Response<pb::Ack>, Status> {
        lead(&self.0)?;
        let caller = Caller::of(&req)?;
        let r = bounded(req)?;
        current_generation(&self.0, &r.job_id, r.generation)?;
        caller.check_worker_in_job(&self.0.state(), &r.worker_id, &r.job_id)?;
        let usage = r.usage.ok_or_else(|| Status::invalid_argument("a memory report needs its usage"))?;
        let state = self.0.state();
        let slot = state.jobs.get(&r.job_id).and_then(|j| j.plan.as_ref()).and_then(|p| p.ranks.get(r.rank as usize));
        let Some(slot) = slot else {
            return Err(Status::invalid_argument(format!(
                "rank {} is not in generation {} of {}",
                r.rank, r.generation, r.job_id
            )));
        };
        if !r.worker_id.is_empty() && r.worker_id != slot.worker {
            return Err(Status::invalid_argument(format!(
                "rank {} of generation {} of {} is {}, not {}",
                r.rank, r.generation, r.job_id, slot.worker, r.worker_id
            )));
        }
        let report = crate::soft::RankReport { memory: usage, step_times: r.step_times };
        self.0.soft().record_rank(&r.job_id, r.generation, r.rank, report);
        self.0.bump_soft();
        Ok(Response::new(pb::Ack {}))
    }

    async fn commit_checkpoint(
        &self,
        req: Request<pb::CheckpointCommit>,
    ) -> Result<Response<pb::CheckpointCommitResponse>, Status> {
        lead(&self.0)?;
        let caller = Caller::of(&req)?;
        let r = bounded(req)?;
        in_job_folder(&self.0, &caller, &r.worker_id, &r.job_id, "location", &r.location)?;
        let cmd = Command::CommitCheckpoint {
            job: r.job_id.clone(),
            generation: r.generation,
            step: r.step,
            location: r.location,
            blocked_ms: r.blocked_ms,
            total_ms: r.total_ms,
            at_ms: now_ms(),
        };
        self.0.propose(cmd).await.map_err(convert::status)?;
        let state = self.0.state();
        let retained_steps =
            state.jobs.get(&r.job_id).map(|j| j.checkpoints.iter().map(|c| c.step).collect()).unwrap_or_default();
        Ok(Response::new(pb::CheckpointCommitResponse { retained_steps }))
    }

    async fn report_failure(&self, req: Request<pb::FailureReport>) -> Result<Response<pb::Ack>, Status> {
        lead(&self.0)?;
        let caller = Caller::of(&req)?;
        let mut r = bounded(req)?;
        r.message = limits::truncate(r.message, limits::MAX_MESSAGE);
        let state = self.0.state();
        caller.check_worker(&state, &r.worker_id)?;
        let job = state.jobs.get(&r.job_id).ok_or_else(|| Status::not_found(format!("job {} not found", r.job_id)))?;
        if job.generation != r.generation {
            return Ok(Response::new(pb::Ack {}));
        }
        caller.check_worker_in_job(&state, &r.worker_id, &r.job_id)?;
        tracing::warn!(job = %r.job_id, gen = r.generation, rank = r.rank, kind = r.kind, message = %r.message, "worker reported a failure");
        let message = format!("rank {}: {}", r.rank, r.message);
        match pb::FailureKind::try_from(r.kind).unwrap_or(pb::FailureKind::Unspecified) {
            pb::FailureKind::Comm => {
                let blamed =
                    r.peer_rank.and_then(|p| job.plan.as_ref()?.ranks.get(p as usize)).map(|s| s.worker.clone());
                self.0.soft().record_comm_failure(&r.job_id, r.generation, message, blamed, Instant::now());
                self.0.remove_unreachable().await;
            }
            _ => {
                let cmd = Command::RestartGeneration {
                    job: r.job_id.clone(),
                    generation: r.generation,
                    reason: format!("failure on {message}"),
                    at_ms: now_ms(),
                };
                self.0.propose(cmd).await.map_err(convert::status)?;
            }
        }
        Ok(Response::new(pb::Ack {}))
    }

    async fn report_preemption(&self, req: Request<pb::PreemptionNotice>) -> Result<Response<pb::Ack>, Status> {
        lead(&self.0)?;
        let caller = Caller::of(&req)?;
        let mut r = bounded(req)?;
        caller.check_worker(&self.0.state(), &r.worker_id)?;
        r.source = limits::truncate(r.source, limits::MAX_MESSAGE);
        r.detail = limits::truncate(r.detail, limits::MAX_MESSAGE);
        let reason = if r.detail.is_empty() { r.source.clone() } else { format!("{}: {}", r.source, r.detail) };
        tracing::warn!(worker = %r.worker_id, reason = %reason, "worker preempted");
        let cmd = Command::PreemptWorker { worker: r.worker_id, reason, at_ms: now_ms() };
        self.0.propose(cmd).await.map_err(convert::status)?;
        Ok(Response::new(pb::Ack {}))
    }

    async fn publish_rendezvous(&self, req: Request<pb::RendezvousPut>) -> Result<Response<pb::Ack>, Status> {
        lead(&self.0)?;
        let caller = Caller::of(&req)?;
        let r = bounded(req)?;
        current_generation(&self.0, &r.job_id, r.generation)?;
        caller.check_worker_in_job(&self.0.state(), &r.worker_id, &r.job_id)?;
        self.0
            .soft()
            .publish(&r.job_id, r.generation, &r.key, r.value)
            .map_err(|full| Status::resource_exhausted(format!("{full} (job {})", r.job_id)))?;
        Ok(Response::new(pb::Ack {}))
    }

    async fn lookup_rendezvous(
        &self,
        req: Request<pb::RendezvousGet>,
    ) -> Result<Response<pb::RendezvousValue>, Status> {
        lead(&self.0)?;
        let caller = Caller::of(&req)?;
        let r = bounded(req)?;
        current_generation(&self.0, &r.job_id, r.generation)?;
        caller.check_worker_in_job(&self.0.state(), &r.worker_id, &r.job_id)?;
        let soft = self.0.soft();
        let value = soft.lookup(&r.job_id, r.generation, &r.key).ok_or_else(|| {
            Status::not_found(format!("{} is not published yet in generation {} of {}", r.key, r.generation, r.job_id))
        })?;
        Ok(Response::new(pb::RendezvousValue { value: value.clone() }))
    }

    async fn report_finished(&self, req: Request<pb::FinishReport>) -> Result<Response<pb::Ack>, Status> {
        lead(&self.0)?;
        let caller = Caller::of(&req)?;
        let r = bounded(req)?;
        in_job_folder(&self.0, &caller, &r.worker_id, &r.job_id, "final_model", &r.final_model)?;
        let cmd = Command::FinishJob {
            job: r.job_id,
            generation: r.generation,
            step: r.step,
            final_model: r.final_model,
            at_ms: now_ms(),
        };
        self.0.propose(cmd).await.map_err(convert::status)?;
        Ok(Response::new(pb::Ack {}))
    }
}

/// Token administration (admin role, checked by `auth`).
#[derive(Clone)]
pub struct TokenApi(pub Arc<Coordinator>);

fn token_info(t: &TokenRecord) -> pb::TokenInfo {
    pb::TokenInfo {
        name: t.name.clone(),
        role: t.role.as_str().into(),
        id: t.id().into(),
        created_at_ms: t.created_at_ms,
        revoked_at_ms: t.revoked_at_ms.unwrap_or(0),
        created_by: t.created_by.clone(),
    }
}

#[tonic::async_trait]
impl TokenService for TokenApi {
    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        lead(&self.0)?;
        let caller = Caller::of(&req)?;
        let r = bounded(req)?;
        let role = Role::parse(&r.role).map_err(Status::invalid_argument)?;
        let (token, hash) = auth::new_token().map_err(|e| Status::internal(format!("could not mint a token: {e}")))?;
        let record = TokenRecord {
            name: r.name.clone(),
            role,
            hash,
            created_at_ms: now_ms(),
            created_by: if caller.open { "(insecure)".into() } else { caller.name.clone() },
            revoked_at_ms: None,
        };
        let info = token_info(&record);
        self.0.propose(Command::CreateToken { token: record }).await.map_err(convert::status)?;
        tracing::info!(name = %r.name, role = role.as_str(), by = %info.created_by, "API token created");
        Ok(Response::new(pb::CreateTokenResponse { token, info: Some(info) }))
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        lead(&self.0)?;
        drop(req);
        self.0.store.read_fresh().await.map_err(convert::status)?;
        let tokens = self.0.state().tokens.values().map(token_info).collect();
        Ok(Response::new(pb::ListTokensResponse { tokens }))
    }

    async fn revoke_token(&self, req: Request<pb::RevokeTokenRequest>) -> Result<Response<pb::TokenInfo>, Status> {
        lead(&self.0)?;
        let name = bounded(req)?.name;
        self.0.propose(Command::RevokeToken { name: name.clone(), at_ms: now_ms() }).await.map_err(convert::status)?;
        tracing::info!(%name, "API token revoked");
        let state = self.0.state();
        let t = state.tokens.get(&name).ok_or_else(|| Status::not_found(format!("no token named {name}")))?;
        Ok(Response::new(token_info(t)))
    }
}
