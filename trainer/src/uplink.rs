//! The worker's line to the coordinator: registers with whichever replica
//! leads, heartbeats, follows the assignment stream and delivers what train
//! loops report. It runs on tasks of its own that await nothing but the
//! coordinator, so a train loop that is slow to stop, or slow storage, never
//! costs the worker its lease: the agent does that work elsewhere.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use flotilla_proto::auth::{AuthChannel, Credentials};
use flotilla_proto::v1 as pb;
use flotilla_proto::v1::worker_service_client::WorkerServiceClient;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Status};

use crate::preemption::Notice;
use crate::types::{Outcome, TrainError, TrainEvent};

const RPC_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub(crate) struct UplinkConfig {
    pub coordinators: Vec<String>,
    /// Where peers reach this worker's data port.
    pub data_addr: SocketAddr,
    pub rank_hint: Option<u32>,
    /// After a preemption notice, how long to wait for the release.
    pub preemption_grace: Duration,
    /// Where this worker serves its metrics, advertised at registration.
    pub metrics_addr: Option<SocketAddr>,
    /// What it computes on (`cpu`, `cuda:0 (NAME)`), advertised too.
    pub device: String,
}

/// Identifies one rank of one generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RunKey {
    pub job: String,
    pub generation: u64,
    pub rank: u32,
}

/// What a train loop tells the coordinator.
pub(crate) enum RunMsg {
    Event(TrainEvent),
    Ended(Result<Outcome, TrainError>),
}

impl RunMsg {
    /// Whether losing this report would lose work or stall the job.
    fn must_arrive(&self) -> bool {
        !matches!(self, RunMsg::Event(TrainEvent::Progress { .. } | TrainEvent::Rank { .. }))
    }
}

pub(crate) type Report = (RunKey, RunMsg);

/// The checkpoints of a run that the coordinator still retains after a
/// commit: the agent deletes the others.
pub(crate) struct Retained {
    pub key: RunKey,
    pub steps: Vec<u64>,
}

/// What the coordinator wants of the agent, as the uplink hears it.
pub(crate) struct Orders {
    /// The newest assignment (an empty job id: idle, stop any work). Closed
    /// when the worker should leave: released after a preemption notice,
    /// or its grace is over.
    pub assignment: watch::Receiver<pb::Assignment>,
    pub retained: mpsc::UnboundedReceiver<Retained>,
    /// The current session with the leader (its client and this worker's
    /// id), for train loops that use the rendezvous board.
    pub session: watch::Receiver<Option<Session>>,
}

/// A registered worker's client of the leading coordinator.
#[derive(Clone)]
pub(crate) struct Session {
    pub client: WorkerServiceClient<AuthChannel>,
    pub worker: String,
}

/// The handle of the uplink's task.
pub(crate) struct Uplink {
    reports: mpsc::UnboundedSender<Report>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Uplink {
    /// Starts the uplink; it runs until [`Uplink::shutdown`] or until the
    /// worker should leave (then `Orders::assignment` closes).
    pub fn start(cfg: UplinkConfig, notices: mpsc::Receiver<Notice>) -> (Uplink, Orders) {
        let (reports, reports_rx) = mpsc::unbounded_channel();
        let (assignment_tx, assignment) = watch::channel(pb::Assignment::default());
        let (retained_tx, retained) = mpsc::unbounded_channel();
        let (session_tx, session) = watch::channel(None);
        let stop = CancellationToken::new();
        let line = Line {
            cfg,
            stop: stop.clone(),
            notices,
            reports: reports_rx,
            assignment: assignment_tx,
            retained: retained_tx,
            session: session_tx,
            worker_id: None,
            leader_hint: None,
            leaving: None,
            pending: VecDeque::new(),
            credentials: Credentials::current().for_worker(),
        };
        let task = tokio::spawn(line.run());
        (Uplink { reports, stop, task }, Orders { assignment, retained, session })
    }

    /// Where train loops send their reports; they are delivered in order,
    /// and those that must arrive are kept while the coordinator is away.
    pub fn reporter(&self) -> mpsc::UnboundedSender<Report> {
        self.reports.clone()
    }

    /// Stops the uplink and waits for its task.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// The state of the uplink's task.
struct Line {
    cfg: UplinkConfig,
    stop: CancellationToken,
    notices: mpsc::Receiver<Notice>,
    reports: mpsc::UnboundedReceiver<Report>,
    assignment: watch::Sender<pb::Assignment>,
    retained: mpsc::UnboundedSender<Retained>,
    session: watch::Sender<Option<Session>>,
    /// The id the coordinator gave this worker; kept across reconnections
    /// so that a leader change does not make a new worker of it.
    worker_id: Option<String>,
    /// Where the last refusal said the leader is.
    leader_hint: Option<String>,
    /// Set once the machine announced its end: leave when released or then.
    leaving: Option<tokio::time::Instant>,
    /// Reports that must reach the coordinator, kept while it cannot be
    /// reached.
    pending: VecDeque<Report>,
    /// The API token and, once registered, this worker's key.
    credentials: Credentials,
}

/// How a session with one coordinator ended without an error.
enum SessionEnd {
    Shutdown,
    /// Released after a preemption notice, or the grace is over.
    Leave,
}

impl Line {
    async fn run(mut self) {
        let stop = self.stop.clone();
        let mut backoff = Duration::from_millis(100);
        loop {
            let client = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                c = self.connect() => c,
            };
            match client {
                Ok(mut client) => {
                    backoff = Duration::from_millis(100);
                    match self.session(&mut client).await {
                        Ok(SessionEnd::Shutdown) => return,
                        // Dropping the assignment's sender tells the agent.
                        Ok(SessionEnd::Leave) => return,
                        Err(e) => match e.downcast_ref::<Status>() {
                            Some(s) if matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied) => {
                                tracing::error!(
                                    error = %s.message(),
                                    "the coordinator refuses this worker's API token (--token-file, \
                                     FLOTILLA_TOKEN); retrying"
                                );
                                self.leader_hint = None;
                            }
                            Some(s) => {
                                self.leader_hint = flotilla_proto::leader::leader_hint(s);
                                tracing::warn!(error = %e, "lost the coordinator; reconnecting")
                            }
                            None => tracing::warn!(error = %e, "lost the coordinator; reconnecting"),
                        },
                    }
                    if self.leader_hint.is_some() {
                        // Pointed at the new leader: go there at once.
                        continue;
                    }
                }
                Err(e) => {
                    self.leader_hint = None;
                    tracing::debug!(error = %e, "no leading coordinator reachable yet")
                }
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    async fn connect(&mut self) -> anyhow::Result<WorkerServiceClient<AuthChannel>> {
        let hint = self.leader_hint.take();
        let (addr, channel) = flotilla_proto::leader::find_leader(&self.cfg.coordinators, hint.as_deref())
            .await
            .map_err(|e| anyhow::anyhow!("no leading coordinator: {e}"))?;
        tracing::debug!(coordinator = %addr, "connected to the leading coordinator");
        Ok(WorkerServiceClient::new(self.credentials.wrap(channel)))
    }

    /// Registers, heartbeats (on a task of its own), follows assignments and
    /// delivers reports until shutdown, leaving, or an error.
    async fn session(&mut self, client: &mut WorkerServiceClient<AuthChannel>) -> anyhow::Result<SessionEnd> {
        let reg = client
            .register(timed(pb::RegisterRequest {
                data_addr: self.cfg.data_addr.to_string(),
                hostname: hostname(),
                pid: std::process::id(),
                worker_id: self.worker_id.clone().unwrap_or_default(),
                rank_hint: self.cfg.rank_hint,
                metrics_addr: self.cfg.metrics_addr.map(|a| a.to_string()).unwrap_or_default(),
                device: self.cfg.device.clone(),
            }))
            .await?
            .into_inner();
        let worker = reg.worker_id;
        // A new key comes with a new registration; a reconnection under the
        // same id keeps the key it proved (and an insecure coordinator
        // hands out none).
        if !reg.worker_key.is_empty() || self.worker_id.as_ref() != Some(&worker) {
            self.credentials.set_worker_key(&reg.worker_key);
        }
        if self.worker_id.as_ref() != Some(&worker) {
            tracing::info!(worker = %worker, data_addr = %self.cfg.data_addr, "registered");
            self.worker_id = Some(worker.clone());
        }
        self.session.send_replace(Some(Session { client: client.clone(), worker: worker.clone() }));
        let interval = Duration::from_millis(reg.heartbeat_interval_ms.max(50));
        let mut heartbeats = Heartbeats::spawn(client.clone(), worker.clone(), interval);
        // What could not be told to the previous leader.
        while let Some((key, msg)) = self.pending.pop_front() {
            if let Err(s) = self.deliver(client, &worker, &key, &msg).await {
                if retryable(&s) {
                    self.pending.push_front((key, msg));
                    return Err(s.into());
                }
                tracing::warn!(job = %key.job, gen = key.generation, error = %s, "coordinator refused a report");
            }
        }
        let mut stream = client.assignments(pb::AssignmentsRequest { worker_id: worker.clone() }).await?.into_inner();
        loop {
            let deadline = self.leaving;
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return Ok(SessionEnd::Shutdown),
                _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                    tracing::warn!("preemption grace is over; leaving without a final checkpoint");
                    return Ok(SessionEnd::Leave);
                }
                refused = &mut heartbeats.refused => {
                    let s = refused.unwrap_or_else(|_| Status::cancelled("the heartbeat task ended"));
                    return self.forgotten(s);
                }
                Some(notice) = self.notices.recv() => {
                    if self.leaving.is_some() {
                        continue;
                    }
                    tracing::warn!(source = notice.source, detail = %notice.detail, "preemption notice");
                    self.leaving = Some(tokio::time::Instant::now() + self.cfg.preemption_grace);
                    let report = pb::PreemptionNotice {
                        worker_id: worker.clone(),
                        source: notice.source.into(),
                        detail: notice.detail,
                    };
                    if let Err(s) = client.report_preemption(timed(report)).await {
                        tracing::warn!(error = %s, "could not tell the coordinator; leaving now");
                        return Ok(SessionEnd::Leave);
                    }
                }
                msg = stream.message() => match msg {
                    Ok(Some(a)) => {
                        self.assignment.send_replace(a);
                    }
                    Ok(None) => anyhow::bail!("assignment stream ended"),
                    Err(s) if s.code() == Code::NotFound => return self.forgotten(s),
                    Err(s) => anyhow::bail!("assignment stream failed: {s}"),
                },
                Some((key, msg)) = self.reports.recv() => {
                    if let Err(s) = self.deliver(client, &worker, &key, &msg).await {
                        if retryable(&s) && msg.must_arrive() {
                            self.pending.push_back((key, msg));
                            return Err(s.into());
                        }
                        tracing::warn!(job = %key.job, gen = key.generation, error = %s, "coordinator refused a report");
                    }
                }
            }
        }
    }

    /// The coordinator does not know this worker (any more): a preempted
    /// worker has been released; any other stops its work and registers
    /// again.
    fn forgotten(&mut self, s: Status) -> anyhow::Result<SessionEnd> {
        if s.code() == Code::NotFound && self.leaving.is_some() {
            tracing::info!("released by the coordinator after preemption");
            return Ok(SessionEnd::Leave);
        }
        if s.code() == Code::NotFound {
            self.assignment.send_replace(pb::Assignment::default());
        }
        anyhow::bail!("the coordinator forgot this worker: {}", s.message())
    }

    /// Sends one report of a train loop to the coordinator.
    async fn deliver(
        &mut self,
        client: &mut WorkerServiceClient<AuthChannel>,
        worker: &str,
        key: &RunKey,
        msg: &RunMsg,
    ) -> Result<(), Status> {
        let (job_id, generation, rank) = (key.job.clone(), key.generation, key.rank);
        match msg {
            RunMsg::Event(TrainEvent::Progress {
                step,
                loss,
                lr,
                samples_per_sec,
                grad_norm,
                time_ms,
                eval_loss,
                eval_accuracy,
            }) => client
                .report_progress(timed(pb::ProgressReport {
                    worker_id: worker.into(),
                    job_id,
                    generation,
                    rank,
                    step: *step,
                    loss: *loss,
                    lr: *lr,
                    samples_per_sec: *samples_per_sec,
                    grad_norm: *grad_norm,
                    time_ms: *time_ms,
                    eval_loss: *eval_loss,
                    eval_accuracy: *eval_accuracy,
                }))
                .await
                .map(|_| ()),
            RunMsg::Event(TrainEvent::Checkpoint { step, location, blocked_ms, total_ms }) => {
                let commit = pb::CheckpointCommit {
                    worker_id: worker.into(),
                    job_id,
                    generation,
                    step: *step,
                    location: location.clone(),
                    blocked_ms: *blocked_ms,
                    total_ms: *total_ms,
                };
                let steps = client.commit_checkpoint(timed(commit)).await?.into_inner().retained_steps;
                // Deleting the others is the agent's (slow) work.
                let _ = self.retained.send(Retained { key: key.clone(), steps });
                Ok(())
            }
            RunMsg::Event(TrainEvent::Rank { memory: m, times }) => client
                .report_memory(timed(pb::MemoryReport {
                    worker_id: worker.into(),
                    job_id,
                    generation,
                    rank,
                    usage: Some(pb::MemoryUsage {
                        params_bytes: m.params,
                        grads_bytes: m.grads,
                        optimizer_bytes: m.optimizer,
                        activation_bytes: m.activations,
                        device: m.cuda.map_or_else(|| "cpu".to_string(), |g| format!("cuda:{g}")),
                        device_used_bytes: m.device_used,
                        device_peak_bytes: m.device_peak,
                    }),
                    step_times: times.map(|t| pb::StepTimes {
                        step: t.step,
                        steps: t.steps,
                        step_ms: t.step_ms,
                        compute_ms: t.compute_ms,
                        stage_wait_ms: t.stage_wait_ms,
                        comm_ms: t.comm_ms,
                        optimizer_ms: t.optimizer_ms,
                        data_wait_ms: t.data_wait_ms,
                    }),
                }))
                .await
                .map(|_| ()),
            RunMsg::Event(TrainEvent::Finished { step, final_model }) => client
                .report_finished(timed(pb::FinishReport {
                    worker_id: worker.into(),
                    job_id,
                    generation,
                    step: *step,
                    final_model: final_model.clone(),
                }))
                .await
                .map(|_| ()),
            RunMsg::Ended(Ok(outcome)) => {
                tracing::info!(job = %key.job, gen = generation, rank, ?outcome, "train loop ended");
                Ok(())
            }
            RunMsg::Ended(Err(e)) => {
                let (kind, peer_rank) = match e {
                    TrainError::Comm(c) => (pb::FailureKind::Comm, c.peer().map(|p| p as u32)),
                    TrainError::Fatal(_) => (pb::FailureKind::Fatal, None),
                };
                tracing::error!(job = %key.job, gen = generation, rank, error = %e, "train loop failed");
                client
                    .report_failure(timed(pb::FailureReport {
                        worker_id: worker.into(),
                        job_id,
                        generation,
                        rank,
                        kind: kind as i32,
                        message: e.to_string(),
                        peer_rank,
                    }))
                    .await
                    .map(|_| ())
            }
        }
    }
}

/// Heartbeats on a task of their own, so that they never wait behind a
/// report. Ends (and is aborted when dropped) only when the coordinator
/// answers that it does not know the worker.
struct Heartbeats {
    refused: tokio::sync::oneshot::Receiver<Status>,
    task: JoinHandle<()>,
}

impl Heartbeats {
    fn spawn(mut client: WorkerServiceClient<AuthChannel>, worker: String, every: Duration) -> Heartbeats {
        let (tx, refused) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match client.heartbeat(timed(pb::HeartbeatRequest { worker_id: worker.clone() })).await {
                    Ok(_) => {}
                    Err(s) if s.code() == Code::NotFound => {
                        let _ = tx.send(s);
                        return;
                    }
                    Err(s) => tracing::warn!(error = %s, "heartbeat failed"),
                }
            }
        });
        Heartbeats { refused, task }
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn timed<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(RPC_TIMEOUT);
    r
}

/// A report that failed this way may succeed on another replica or later.
fn retryable(s: &Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}
