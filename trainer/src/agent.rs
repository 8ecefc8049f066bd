//! The worker agent: follows what the coordinator assigns this worker and
//! supervises the train loop of the current generation (one thread). Talking
//! to the coordinator (registration, heartbeats, reports) is the uplink's,
//! on tasks of its own; the agent does the slow work: stopping a train loop
//! (which can wait out a collective's deadline) and deleting old checkpoints.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use flotilla_comm::{CommListener, Secret, SECRET_LEN};
use flotilla_jobspec::{DeviceChoice, JobSpec};
use flotilla_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::checkpoint;
use crate::engine;
use crate::preemption::{self, PreemptionConfig};
use crate::rendezvous::Rendezvous;
use crate::storage::Storage;
use crate::types::{Assignment, TrainError, TrainEvent, TrainOptions};
use crate::uplink::{Report, Retained, RunKey, RunMsg, Session, Uplink, UplinkConfig};

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
    /// Where this worker serves Prometheus metrics (already listening),
    /// advertised at registration; an unspecified IP is replaced by the
    /// host peers reach the worker on.
    pub metrics_addr: Option<SocketAddr>,
}

/// The train loop of one rank of one generation.
struct Run {
    key: RunKey,
    output_dir: String,
    checkpoint_request: Arc<AtomicU64>,
    cancel: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Run {
    /// Asks the loop to stop and waits until it has: at its next step, or
    /// when the collective it is blocked in fails at its deadline.
    async fn stop(mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        tracing::info!(job = %self.key.job, gen = self.key.generation, rank = self.key.rank, "train loop stopped");
    }
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
    /// The uplink's session with the leader, for the rendezvous board.
    session: Option<Session>,
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
        Ok(Agent { cfg, listener: Arc::new(listener), data_addr, current: None, session: None })
    }

    pub fn data_addr(&self) -> SocketAddr {
        self.data_addr
    }

    /// The metrics address as the coordinator is told it.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.cfg.metrics_addr.map(|a| match a.ip().is_unspecified() {
            true => SocketAddr::new(self.data_addr.ip(), a.port()),
            false => a,
        })
    }

    /// Runs until `shutdown` fires or the worker is to leave (released
    /// after a preemption notice, or its grace is over); then stops the
    /// train loop and returns.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let notices =
            preemption::watch(&self.cfg.preemption, shutdown.child_token()).context("start the preemption watchers")?;
        let (uplink, mut orders) = Uplink::start(
            UplinkConfig {
                coordinators: self.cfg.coordinators.clone(),
                data_addr: self.data_addr,
                rank_hint: self.cfg.rank_hint,
                metrics_addr: self.metrics_addr(),
                device: crate::device::describe(self.cfg.train.gpu),
                preemption_grace: self.cfg.preemption_grace,
            },
            notices,
        );
        let pruner = spawn_pruner();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                changed = orders.assignment.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let a = orders.assignment.borrow_and_update().clone();
                    // May wait out a collective's deadline; the uplink
                    // heartbeats and reports meanwhile.
                    self.follow(a, &uplink).await;
                }
                Some(r) = orders.retained.recv() => self.prune(r, &pruner),
                _ = orders.session.changed() => {
                    self.session = orders.session.borrow_and_update().clone();
                }
            }
        }
        drop(orders);
        self.stop_current().await;
        uplink.shutdown().await;
        self.listener.shutdown();
        Ok(())
    }

    async fn stop_current(&mut self) {
        if let Some(run) = self.current.take() {
            // A ring still being built (perhaps with a peer that is gone)
            // gives up now rather than at its connect timeout.
            self.listener.abandon(&run.key.job, run.key.generation);
            run.stop().await;
        }
    }

    /// Starts, keeps or stops the train loop to match assignment `a`.
    async fn follow(&mut self, a: pb::Assignment, uplink: &Uplink) {
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
        match self.start(key.clone(), a, uplink.reporter()) {
            Ok(run) => self.current = Some(run),
            Err(e) => {
                let _ = uplink.reporter().send((key, RunMsg::Ended(Err(TrainError::Fatal(format!("{e:#}"))))));
            }
        }
    }

    /// Hands the current run's old checkpoints to the pruner.
    fn prune(&self, r: Retained, pruner: &mpsc::UnboundedSender<(String, Vec<u64>)>) {
        if let Some(run) = self.current.as_ref().filter(|run| run.key == r.key) {
            let _ = pruner.send((run.output_dir.clone(), r.steps));
        }
    }

    fn start(&self, key: RunKey, a: pb::Assignment, reports: mpsc::UnboundedSender<Report>) -> anyhow::Result<Run> {
        let spec = JobSpec::from_json(&a.spec_json).context("read the job spec from the coordinator")?;
        check_storage_roots(&self.cfg.storage_roots, &spec, &a)?;
        let peers = a
            .peers
            .iter()
            .map(|p| p.parse::<SocketAddr>().with_context(|| format!("peer address {p:?}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (stage, replica, stages) = plan_position(&a, spec.parallelism.pp)?;
        let secret = Secret::from_bytes(&a.data_secret).with_context(|| {
            format!(
                "the assignment carries a data-plane secret of {} bytes, not {SECRET_LEN} (a coordinator older than this worker?)",
                a.data_secret.len()
            )
        })?;
        let device = resolve_device(spec.train.device, self.cfg.train.gpu)?;
        let rendezvous = self.session.as_ref().map(|s| {
            Rendezvous::new(tokio::runtime::Handle::current(), s.client.clone(), &s.worker, &a.job_id, a.generation)
        });
        let cancel = Arc::new(AtomicBool::new(false));
        let assignment = Assignment {
            device,
            rendezvous,
            abort: cancel.clone(),
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
            secret,
        };
        tracing::info!(job = %key.job, gen = key.generation, rank = key.rank, world = a.world_size,
            resume = a.checkpoints.first().map_or(0, |c| c.step), "starting train loop");
        let checkpoint_request = assignment.checkpoint_request.clone();
        let (listener, opts, tx, k, c) =
            (self.listener.clone(), self.cfg.train.clone(), reports, key.clone(), cancel.clone());
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
}

/// Deletes the checkpoints of a job's output folder that the coordinator no
/// longer retains, one request after another, on a task of its own (storage
/// can be slow); a backlog collapses to the newest request per folder.
fn spawn_pruner() -> mpsc::UnboundedSender<(String, Vec<u64>)> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, Vec<u64>)>();
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while let Ok(next) = rx.try_recv() {
                batch.retain(|(dir, _)| *dir != next.0);
                batch.push(next);
            }
            for (dir, keep) in batch {
                let pruned = match Storage::open(&dir) {
                    Ok(out) => checkpoint::prune(&out, &keep).await,
                    Err(e) => Err(e.into()),
                };
                match pruned {
                    Ok(gone) if !gone.is_empty() => tracing::info!(steps = ?gone, "removed old checkpoints"),
                    Err(e) => tracing::warn!(error = %e, "could not remove old checkpoints"),
                    _ => {}
                }
            }
        }
    });
    tx
}

/// Where a job's rank computes on this worker: `train.device` against the
/// worker's GPU, if it has one.
fn resolve_device(choice: DeviceChoice, gpu: Option<usize>) -> anyhow::Result<tch::Device> {
    Ok(match (choice, gpu) {
        (DeviceChoice::Cpu, _) | (DeviceChoice::Auto, None) => tch::Device::Cpu,
        (DeviceChoice::Auto | DeviceChoice::Cuda, Some(g)) => tch::Device::Cuda(g),
        (DeviceChoice::Cuda, None) => anyhow::bail!(
            "the job asks for train.device: cuda and this worker has no GPU (libtorch sees no CUDA device{})",
            if cfg!(feature = "cuda") { "" } else { "; it was built without the `cuda` feature" }
        ),
    })
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
    let eval = spec.eval.as_ref().map(|e| &e.data);
    for data in std::iter::once(&spec.data).chain(eval) {
        match data {
            DataSpec::Synthetic { .. } => {}
            DataSpec::Features { path } | DataSpec::Text { path, .. } => places.push(("data", path)),
            DataSpec::Tokens { path, .. } => places.extend(path.iter().map(|p| ("data", p.as_str()))),
        }
        if let DataSpec::Text { tokenizer: Some(t), .. } = data {
            places.push(("data.tokenizer", t));
        }
    }
    if let Some(from) = &spec.checkpoint.resume_from {
        places.push(("checkpoint.resume_from", from));
    }
    if let Some(dir) = &spec.metrics.tensorboard {
        places.push(("metrics.tensorboard", dir));
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
