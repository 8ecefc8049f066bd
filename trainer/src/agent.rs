//! The worker agent: registers with the coordinator, keeps its lease alive,
//! follows its assignment stream, and supervises the train loop of the
//! current generation (one thread), forwarding what the loop reports.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use flotilla_comm::CommListener;
use flotilla_jobspec::JobSpec;
use flotilla_proto::v1 as pb;
use flotilla_proto::v1::worker_service_client::WorkerServiceClient;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::checkpoint;
use crate::engine;
use crate::preemption::{self, Notice, PreemptionConfig};
use crate::storage::Storage;
use crate::types::{Assignment, Outcome, TrainError, TrainEvent, TrainOptions};

const RPC_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The coordinator replicas' URLs, e.g. `http://10.0.0.1:7070`; the
    /// agent follows whichever leads.
    pub coordinators: Vec<String>,
    /// Where to listen for peers' collectives.
    pub data_bind: SocketAddr,
    /// The host peers reach this worker on; by default the local address
    /// used to reach the coordinator.
    pub advertise_host: Option<IpAddr>,
    pub train: TrainOptions,
    pub preemption: PreemptionConfig,
    /// After a preemption notice, how long the worker waits for its job's
    /// checkpoint (and its release by the coordinator) before it exits anyway.
    pub preemption_grace: Duration,
    /// The rank this worker asks for in a job's first plan (Slurm's
    /// `SLURM_PROCID`, an indexed Job's `JOB_COMPLETION_INDEX`).
    pub rank_hint: Option<u32>,
    /// Where jobs may read and write on this machine (absolute paths or
    /// object-store URLs, `--storage-root`); empty: anywhere. A job whose
    /// data, output or checkpoints lie elsewhere is refused as a fatal
    /// failure of this rank.
    pub storage_roots: Vec<String>,
}

/// Identifies one rank of one generation.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RunKey {
    job: String,
    generation: u64,
    rank: u32,
}

enum RunMsg {
    Event(TrainEvent),
    Ended(Result<Outcome, TrainError>),
}

struct Run {
    key: RunKey,
    output_dir: String,
    checkpoint_request: Arc<AtomicU64>,
    cancel: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Run {
    async fn stop(mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        tracing::info!(job = %self.key.job, gen = self.key.generation, rank = self.key.rank, "train loop stopped");
    }
}

fn timed<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(RPC_TIMEOUT);
    r
}

/// The local address this machine uses to reach `url`'s host.
fn local_ip_towards(url: &str) -> IpAddr {
    let hostport = url.split("://").last().unwrap_or(url).trim_end_matches('/');
    let probe = || -> Option<IpAddr> {
        let target = std::net::ToSocketAddrs::to_socket_addrs(hostport).ok()?.next()?;
        let sock = UdpSocket::bind(if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).ok()?;
        sock.connect(target).ok()?;
        Some(sock.local_addr().ok()?.ip())
    };
    probe().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

pub struct Agent {
    cfg: AgentConfig,
    listener: Arc<CommListener>,
    data_addr: SocketAddr,
    current: Option<Run>,
    events_tx: mpsc::UnboundedSender<(RunKey, RunMsg)>,
    events_rx: mpsc::UnboundedReceiver<(RunKey, RunMsg)>,
    /// Set once the machine announced its end: exit when released or then.
    leaving: Option<tokio::time::Instant>,
    /// The id the coordinator gave this worker; kept across reconnections
    /// so that a leader change does not make a new worker of it.
    worker_id: Option<String>,
    /// Where the last refusal said the leader is.
    leader_hint: Option<String>,
    /// Reports that must reach the coordinator (checkpoint commits, the end
    /// of a train loop), kept while it cannot be reached.
    pending: std::collections::VecDeque<(RunKey, RunMsg)>,
}

/// A report that failed this way may succeed on another replica or later.
fn retryable(s: &tonic::Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded)
}

impl RunMsg {
    /// Whether losing this report would lose work or stall the job.
    fn must_arrive(&self) -> bool {
        !matches!(self, RunMsg::Event(TrainEvent::Progress { .. } | TrainEvent::Memory(_)))
    }
}

impl Agent {
    pub fn new(cfg: AgentConfig) -> anyhow::Result<Agent> {
        let listener = CommListener::bind(cfg.data_bind).context("bind the data port")?;
        let host = match cfg.advertise_host {
            Some(h) => h,
            None if !cfg.data_bind.ip().is_unspecified() => cfg.data_bind.ip(),
            None => local_ip_towards(cfg.coordinators.first().map_or("127.0.0.1:7070", String::as_str)),
        };
        let data_addr = SocketAddr::new(host, listener.local_addr().port());
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        Ok(Agent {
            cfg,
            listener: Arc::new(listener),
            data_addr,
            current: None,
            events_tx,
            events_rx,
            leaving: None,
            worker_id: None,
            leader_hint: None,
            pending: Default::default(),
        })
    }

    pub fn data_addr(&self) -> SocketAddr {
        self.data_addr
    }

    /// Runs until `shutdown` fires; then stops the train loop and returns.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut notices =
            preemption::watch(&self.cfg.preemption, shutdown.child_token()).context("start the preemption watchers")?;
        let mut backoff = Duration::from_millis(100);
        loop {
            let client = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                c = self.connect() => c,
            };
            match client {
                Ok(mut client) => {
                    backoff = Duration::from_millis(100);
                    match self.session(&mut client, &shutdown, &mut notices).await {
                        Ok(()) => break,
                        Err(e) => {
                            if let Some(s) = e.downcast_ref::<tonic::Status>() {
                                self.leader_hint = flotilla_proto::leader::leader_hint(s);
                            }
                            tracing::warn!(error = %e, "lost the coordinator; reconnecting")
                        }
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
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
        if let Some(run) = self.current.take() {
            run.stop().await;
        }
        self.listener.shutdown();
        Ok(())
    }

    async fn connect(&mut self) -> anyhow::Result<WorkerServiceClient<Channel>> {
        let hint = self.leader_hint.take();
        let (addr, channel) = flotilla_proto::leader::find_leader(&self.cfg.coordinators, hint.as_deref())
            .await
            .map_err(|e| anyhow::anyhow!("no leading coordinator: {e}"))?;
        tracing::debug!(coordinator = %addr, "connected to the leading coordinator");
        Ok(WorkerServiceClient::new(channel))
    }

    /// Registers and follows assignments. `Ok` on shutdown, or when a
    /// preempted worker is released or its grace runs out.
    async fn session(
        &mut self,
        client: &mut WorkerServiceClient<Channel>,
        shutdown: &CancellationToken,
        notices: &mut mpsc::Receiver<Notice>,
    ) -> anyhow::Result<()> {
        let reg = client
            .register(timed(pb::RegisterRequest {
                data_addr: self.data_addr.to_string(),
                hostname: hostname(),
                pid: std::process::id(),
                worker_id: self.worker_id.clone().unwrap_or_default(),
                rank_hint: self.cfg.rank_hint,
            }))
            .await?
            .into_inner();
        let worker = reg.worker_id;
        if self.worker_id.as_ref() != Some(&worker) {
            tracing::info!(worker = %worker, data_addr = %self.data_addr, "registered");
            self.worker_id = Some(worker.clone());
        }
        // What could not be told to the previous leader.
        while let Some((key, msg)) = self.pending.pop_front() {
            if let Err(s) = self.forward(client, &worker, &key, &msg).await {
                if retryable(&s) {
                    self.pending.push_front((key, msg));
                    return Err(s.into());
                }
                tracing::warn!(job = %key.job, gen = key.generation, error = %s, "coordinator refused a report");
            }
        }
        let mut heartbeat = tokio::time::interval(Duration::from_millis(reg.heartbeat_interval_ms.max(50)));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stream = client.assignments(pb::AssignmentsRequest { worker_id: worker.clone() }).await?.into_inner();
        loop {
            let deadline = self.leaving;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                    tracing::warn!("preemption grace is over; leaving without a final checkpoint");
                    return Ok(());
                }
                Some(notice) = notices.recv() => {
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
                        return Ok(());
                    }
                }
                _ = heartbeat.tick() => {
                    if let Err(s) = client.heartbeat(timed(pb::HeartbeatRequest { worker_id: worker.clone() })).await {
                        if s.code() == Code::NotFound && self.leaving.is_some() {
                            tracing::info!("released by the coordinator after preemption");
                            return Ok(());
                        }
                        if s.code() == Code::NotFound {
                            self.stop_current().await;
                            anyhow::bail!("the coordinator forgot this worker: {}", s.message());
                        }
                        tracing::warn!(error = %s, "heartbeat failed");
                    }
                }
                msg = stream.message() => match msg {
                    Ok(Some(a)) => self.follow(a).await,
                    Ok(None) => anyhow::bail!("assignment stream ended"),
                    Err(s) => {
                        if s.code() == Code::NotFound && self.leaving.is_some() {
                            tracing::info!("released by the coordinator after preemption");
                            return Ok(());
                        }
                        if s.code() == Code::NotFound {
                            self.stop_current().await;
                        }
                        anyhow::bail!("assignment stream failed: {s}");
                    }
                },
                Some((key, msg)) = self.events_rx.recv() => {
                    if let Err(s) = self.forward(client, &worker, &key, &msg).await {
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

    async fn stop_current(&mut self) {
        if let Some(run) = self.current.take() {
            run.stop().await;
        }
    }

    /// Starts, keeps or stops the train loop to match assignment `a`.
    async fn follow(&mut self, a: pb::Assignment) {
        let key = RunKey { job: a.job_id.clone(), generation: a.generation, rank: a.rank };
        if let Some(run) = self.current.as_ref().filter(|r| r.key == key) {
            run.checkpoint_request.store(a.checkpoint_request, Ordering::Relaxed);
            return;
        }
        self.stop_current().await;
        if a.job_id.is_empty() {
            tracing::info!("idle");
            return;
        }
        match self.start(key.clone(), a) {
            Ok(run) => self.current = Some(run),
            Err(e) => {
                let msg = RunMsg::Ended(Err(TrainError::Fatal(format!("{e:#}"))));
                let _ = self.events_tx.send((key, msg));
            }
        }
    }

    fn start(&self, key: RunKey, a: pb::Assignment) -> anyhow::Result<Run> {
        let spec = JobSpec::from_json(&a.spec_json).context("read the job spec from the coordinator")?;
        check_storage_roots(&self.cfg.storage_roots, &spec, &a)?;
        let peers = a
            .peers
            .iter()
            .map(|p| p.parse::<SocketAddr>().with_context(|| format!("peer address {p:?}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (stage, replica, stages) = plan_position(&a, spec.parallelism.pp)?;
        let assignment = Assignment {
            stage,
            replica,
            stages,
            job: a.job_id.clone(),
            generation: a.generation,
            rank: a.rank as usize,
            world: a.world_size as usize,
            peers,
            spec,
            spec_json: a.spec_json.clone(),
            output_dir: a.output_dir.clone(),
            checkpoints: a.checkpoints.iter().map(|c| c.location.clone()).collect(),
            io: tokio::runtime::Handle::current(),
            checkpoint_request: Arc::new(AtomicU64::new(a.checkpoint_request)),
        };
        tracing::info!(job = %key.job, gen = key.generation, rank = key.rank, world = a.world_size,
            resume = a.checkpoints.first().map_or(0, |c| c.step), "starting train loop");
        let cancel = Arc::new(AtomicBool::new(false));
        let checkpoint_request = assignment.checkpoint_request.clone();
        let (listener, opts, tx, k, c) =
            (self.listener.clone(), self.cfg.train.clone(), self.events_tx.clone(), key.clone(), cancel.clone());
        let thread = std::thread::Builder::new()
            .name(format!("train-{}-g{}-r{}", key.job, key.generation, key.rank))
            .spawn(move || {
                let mut emit = |e: TrainEvent| {
                    let _ = tx.send((k.clone(), RunMsg::Event(e)));
                };
                // A panic in the train loop is a bug, but it must still end
                // the run as a failure the coordinator hears about, not
                // leave the job waiting for a rank that is gone.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    engine::run(&assignment, &listener, &opts, &c, &mut emit)
                }))
                .unwrap_or_else(|panic| {
                    let what = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "unknown panic".into());
                    Err(TrainError::Fatal(format!("the train loop panicked: {what}")))
                });
                let _ = tx.send((k, RunMsg::Ended(result)));
            })
            .context("spawn the train thread")?;
        Ok(Run { key, output_dir: a.output_dir.clone(), checkpoint_request, cancel, thread: Some(thread) })
    }

    /// Sends what the train loop reported to the coordinator.
    async fn forward(
        &mut self,
        client: &mut WorkerServiceClient<Channel>,
        worker: &str,
        key: &RunKey,
        msg: &RunMsg,
    ) -> Result<(), tonic::Status> {
        let (job_id, generation, rank) = (key.job.clone(), key.generation, key.rank);
        match msg {
            RunMsg::Event(TrainEvent::Progress { step, loss, lr, samples_per_sec, grad_norm, time_ms }) => client
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
                match client.commit_checkpoint(timed(commit)).await {
                    Ok(resp) => {
                        let keep = resp.into_inner().retained_steps;
                        if let Some(dir) = self.current.as_ref().filter(|r| r.key == *key).map(|r| r.output_dir.clone())
                        {
                            let pruned = match Storage::open(&dir) {
                                Ok(out) => checkpoint::prune(&out, &keep).await,
                                Err(e) => Err(e.into()),
                            };
                            match pruned {
                                Ok(gone) if !gone.is_empty() => {
                                    tracing::info!(steps = ?gone, "removed old checkpoints")
                                }
                                Err(e) => tracing::warn!(error = %e, "could not remove old checkpoints"),
                                _ => {}
                            }
                        }
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            RunMsg::Event(TrainEvent::Memory(m)) => client
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

/// The rank's pipeline stage, data-parallel replica and the plan's stage
/// count, as the assignment names them. An assignment without stages comes
/// from a coordinator older than pipelines: one stage, every rank a replica.
/// Stages that disagree with the job's `parallelism.pp` are an error.
fn plan_position(a: &pb::Assignment, pp: usize) -> anyhow::Result<(usize, usize, usize)> {
    if a.stages == 0 {
        anyhow::ensure!(
            pp <= 1,
            "the job has parallelism.pp {pp} but the coordinator's plan has no pipeline stages (an older coordinator?)"
        );
        return Ok((0, a.rank as usize, 1));
    }
    let stages = a.stages as usize;
    anyhow::ensure!(
        stages == pp.max(1),
        "the coordinator's plan has {stages} pipeline stages but the job has parallelism.pp {pp}"
    );
    anyhow::ensure!(
        a.stage < a.stages && a.replica as u64 * u64::from(a.stages) + u64::from(a.stage) == u64::from(a.rank),
        "the coordinator's plan puts rank {} at stage {} of replica {} with {} stages; expected rank = replica * stages + stage",
        a.rank,
        a.stage,
        a.replica,
        a.stages
    );
    Ok((a.stage as usize, a.replica as usize, stages))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(rank: u32, stages: u32, stage: u32, replica: u32) -> pb::Assignment {
        pb::Assignment { job_id: "j-1".into(), rank, stages, stage, replica, ..Default::default() }
    }

    #[test]
    fn the_plan_position_comes_from_the_assignment() {
        assert_eq!(plan_position(&assignment(5, 2, 1, 2), 2).unwrap(), (1, 2, 2));
        assert_eq!(plan_position(&assignment(3, 1, 0, 3), 1).unwrap(), (0, 3, 1));
    }

    #[test]
    fn an_older_coordinator_s_assignment_means_one_stage() {
        assert_eq!(plan_position(&assignment(3, 0, 0, 0), 1).unwrap(), (0, 3, 1));
        let e = plan_position(&assignment(3, 0, 0, 0), 2).unwrap_err().to_string();
        assert!(e.contains("parallelism.pp 2") && e.contains("no pipeline stages"), "{e}");
    }

    #[test]
    fn stages_that_disagree_with_the_job_fail_the_start() {
        let e = plan_position(&assignment(1, 2, 1, 0), 4).unwrap_err().to_string();
        assert!(e.contains("2 pipeline stages") && e.contains("parallelism.pp 4"), "{e}");
        let e = plan_position(&assignment(1, 2, 0, 1), 2).unwrap_err().to_string();
        assert!(e.contains("rank = replica * stages + stage"), "{e}");
    }
}

/// Refuses a job whose data, output folder or checkpoints lie outside
/// `roots` (none: anywhere).
fn check_storage_roots(roots: &[String], spec: &JobSpec, a: &pb::Assignment) -> anyhow::Result<()> {
    use flotilla_jobspec::DataSpec;
    let mut places: Vec<(&str, &str)> = vec![("output folder", a.output_dir.as_str())];
    if let DataSpec::Features { path } | DataSpec::Tokens { path, .. } | DataSpec::Text { path } = &spec.data {
        places.push(("data", path));
    }
    if let Some(from) = &spec.checkpoint.resume_from {
        places.push(("checkpoint.resume_from", from));
    }
    places.extend(a.checkpoints.iter().map(|c| ("checkpoint", c.location.as_str())));
    for (what, place) in places {
        if !flotilla_storage::within_roots(place, roots) {
            anyhow::bail!(
                "the job's {what} {place:?} lies outside this worker's storage roots ({}); the worker refuses it \
                 (start it with a --storage-root that covers the place, or change the job file)",
                roots.join(", ")
            );
        }
    }
    Ok(())
}
