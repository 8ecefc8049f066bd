//! `flotilla worker`: a worker agent that takes assignments from a
//! coordinator. With `--submit JOB.yaml` it also submits the job (once for
//! every worker that gives the same submission id) and exits when the job
//! ends, which is what a Slurm task or a Kubernetes Job's pod needs.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use flotilla_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use super::{client, CoordinatorArg};
use crate::deploy::{launch_env, EXIT_PREEMPTED};

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub coordinator: CoordinatorArg,
    /// Address to listen on for peers' collectives.
    #[arg(long, default_value = "0.0.0.0:0")]
    pub data_addr: SocketAddr,
    /// Address peers use to reach this worker (default: the local address
    /// that reaches the coordinator).
    #[arg(long)]
    pub advertise_host: Option<IpAddr>,
    /// Seconds a collective may wait for a peer before failing.
    #[arg(long, default_value_t = 120)]
    pub op_timeout_s: u64,
    /// Watch the AWS spot interruption notice at this metadata base URL
    /// (http://169.254.169.254 on EC2).
    #[arg(long)]
    pub aws_metadata_url: Option<String>,
    /// Watch the GCE preempted flag at this metadata base URL
    /// (http://metadata.google.internal on GCE).
    #[arg(long)]
    pub gce_metadata_url: Option<String>,
    /// How often the metadata endpoints are polled.
    #[arg(long, default_value_t = 1000)]
    pub metadata_poll_ms: u64,
    /// A signal that means "checkpoint and leave", besides SIGTERM
    /// (e.g. USR1 with Slurm's `--signal=USR1@90`).
    #[arg(long, value_parser = super::parse_signal)]
    pub preemption_signal: Option<i32>,
    /// After a preemption notice, seconds to wait for the job's
    /// checkpoint before leaving anyway.
    #[arg(long, default_value_t = 60)]
    pub preemption_grace_s: u64,
    /// The rank to ask for in a job's first plan [default: $SLURM_PROCID,
    /// else $JOB_COMPLETION_INDEX].
    #[arg(long)]
    pub rank_hint: Option<u32>,
    /// Submit this job file and serve it: exit 0 when it succeeds, 1 when it
    /// fails or is cancelled, 75 when this worker left it on a preemption
    /// notice first.
    #[arg(long)]
    pub submit: Option<PathBuf>,
    /// With --submit: the same for every worker of the job, so that it is
    /// created once [default: slurm-$SLURM_JOB_ID under Slurm].
    #[arg(long, env = "FLOTILLA_SUBMISSION_ID")]
    pub submission_id: Option<String>,
    /// Confine what jobs may read and write on this machine to this folder
    /// (an absolute or relative path, or an object-store URL such as
    /// s3://bucket/prefix); repeatable. A job whose data, output or
    /// checkpoints lie elsewhere is refused by this worker and the refusal
    /// reported to the coordinator. Default: anywhere.
    #[arg(long = "storage-root", value_name = "PATH")]
    pub storage_roots: Vec<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP, no
    /// token: bind it where only your Prometheus reaches, e.g. the pod's
    /// address). The address is advertised to the coordinator, which lists
    /// it with the worker; an unspecified IP (0.0.0.0) is advertised as
    /// the worker's data host.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<SocketAddr>,
    /// The GPU this worker computes on, an index among the devices
    /// CUDA_VISIBLE_DEVICES leaves visible [default: $LOCAL_RANK, else
    /// $SLURM_LOCALID, else 0; a process that sees one GPU takes it]. Run
    /// one worker per GPU. Jobs compute on it unless they say
    /// `train.device: cpu`; without a GPU the worker computes on its CPU.
    #[arg(long, value_name = "N")]
    pub gpu: Option<usize>,
}

/// How long `--submit` keeps trying to reach a coordinator that is not up yet.
const SUBMIT_PATIENCE: Duration = Duration::from_secs(600);

/// Runs the worker until `token` is cancelled (Ctrl-C), it is released
/// after a preemption notice, or, with `--submit`, its job ends. Returns
/// the exit code.
pub async fn run(args: WorkerArgs, token: CancellationToken) -> anyhow::Result<i32> {
    super::certs::dial_as_client(&args.coordinator.tls)?;
    let launcher = launch_env::read(|k| std::env::var(k).ok());
    let rank_hint = args.rank_hint.or(launcher.rank_hint.map(|(r, var)| {
        tracing::info!(rank_hint = r, from = var, "rank hint from the launcher");
        r
    }));
    let job = match &args.submit {
        Some(path) => {
            let (text, _) = match super::load_job(path) {
                Ok(v) => v,
                Err(code) => return Ok(code),
            };
            let Some(submission) = args.submission_id.clone().or(launcher.submission_id) else {
                eprintln!(
                    "error: --submit needs --submission-id (or FLOTILLA_SUBMISSION_ID): the same for every worker of the job"
                );
                return Ok(super::EXIT_BAD_INPUT);
            };
            match submit(&args.coordinator.coordinator, path, text, submission, &token).await? {
                Ok(id) => Some(id),
                Err(code) => return Ok(code),
            }
        }
        None => None,
    };

    let visible = flotilla_trainer::device::visible_gpus();
    let gpu = match flotilla_trainer::device::pick_gpu(args.gpu, |k| std::env::var(k).ok(), visible) {
        Ok(g) => g,
        Err(why) => {
            eprintln!("error: {why}");
            return Ok(super::EXIT_BAD_INPUT);
        }
    };
    if let Some((g, source)) = gpu {
        tracing::info!(gpu = g, from = source.name(), visible, "computing on a GPU");
    }
    let gpu = gpu.map(|(g, _)| g);
    let metrics_addr = match args.metrics_addr {
        Some(addr) => Some(super::metrics::serve(addr, token.clone()).await?),
        None => None,
    };
    let cfg = flotilla_trainer::AgentConfig {
        coordinators: flotilla_proto::leader::parse_addrs(&args.coordinator.coordinator),
        data_bind: args.data_addr,
        advertise_host: args.advertise_host,
        train: flotilla_trainer::TrainOptions {
            op_timeout: Duration::from_secs(args.op_timeout_s),
            gpu,
            ..Default::default()
        },
        preemption: flotilla_trainer::preemption::PreemptionConfig {
            aws_metadata_url: args.aws_metadata_url,
            gce_metadata_url: args.gce_metadata_url,
            poll: Duration::from_millis(args.metadata_poll_ms),
            signal: args.preemption_signal,
        },
        preemption_grace: Duration::from_secs(args.preemption_grace_s),
        rank_hint,
        storage_roots: storage_roots(&args.storage_roots)?,
        metrics_addr,
    };
    let agent = flotilla_trainer::Agent::new(cfg)?;
    tracing::info!(data_addr = %agent.data_addr(), metrics_addr = ?agent.metrics_addr(),
        device = %flotilla_trainer::device::describe(gpu), "worker starting");
    let Some(job) = job else {
        agent.run(token).await?;
        return Ok(0);
    };

    // Serve the job until it ends; then stop the agent.
    let ended: Arc<Mutex<Option<i32>>> = Arc::new(Mutex::new(None));
    let agent_token = token.child_token();
    let watcher =
        tokio::spawn(watch_job(args.coordinator.coordinator.clone(), job.clone(), agent_token.clone(), ended.clone()));
    let result = agent.run(agent_token.clone()).await;
    watcher.abort();
    result?;
    let phase = *ended.lock().expect("job phase");
    Ok(match phase {
        Some(p) if p == pb::JobPhase::Succeeded as i32 => {
            tracing::info!(job = %job, "job succeeded; worker done");
            0
        }
        Some(p) if p == pb::JobPhase::Registering as i32 || p == pb::JobPhase::TrainedNotRegistered as i32 => {
            tracing::info!(job = %job, "job trained; the coordinator hands the model to the registry; worker done");
            0
        }
        Some(p) => {
            tracing::warn!(job = %job, phase = %client::phase_name(p), "job ended without success; worker done");
            super::EXIT_JOB_FAILED
        }
        None if token.is_cancelled() => 130,
        None => {
            tracing::info!(job = %job, "left the job on a preemption notice");
            EXIT_PREEMPTED
        }
    })
}

/// The `--storage-root`s with relative paths made absolute (against the
/// working directory); URLs are kept.
fn storage_roots(roots: &[String]) -> anyhow::Result<Vec<String>> {
    roots
        .iter()
        .map(|r| {
            if r.contains("://") {
                return Ok(r.clone());
            }
            let path = std::path::absolute(r).with_context(|| format!("--storage-root {r:?}"))?;
            if path.components().any(|c| c == std::path::Component::ParentDir) {
                anyhow::bail!("--storage-root {r:?}: name the folder without `..`");
            }
            Ok(path.components().collect::<PathBuf>().to_string_lossy().into_owned())
        })
        .collect()
}

/// Submits the job with `submission` as its id, waiting for a coordinator
/// that is still starting. `Ok(Err(code))` for a job the coordinator refuses.
async fn submit(
    coordinator: &str,
    path: &std::path::Path,
    text: String,
    submission: String,
    token: &CancellationToken,
) -> anyhow::Result<Result<String, i32>> {
    let deadline = Instant::now() + SUBMIT_PATIENCE;
    loop {
        let attempt = async {
            let mut c = client::connect(coordinator).await?;
            anyhow::Ok(client::submit_as(&mut c, path, text.clone(), submission.clone()).await)
        };
        let outcome = tokio::select! {
            _ = token.cancelled() => anyhow::bail!("interrupted before the job was submitted"),
            r = attempt => r,
        };
        match outcome {
            Ok(Ok(id)) => {
                tracing::info!(job = %id, submission = %submission, "job submitted (or found submitted)");
                return Ok(Ok(id));
            }
            Ok(Err(s)) if s.code() == tonic::Code::InvalidArgument => {
                eprintln!("error: {}", s.message());
                return Ok(Err(super::EXIT_BAD_INPUT));
            }
            Ok(Err(s)) if Instant::now() > deadline => {
                return Err(anyhow::anyhow!("{}", s.message())).context("submit the job")
            }
            Err(e) if Instant::now() > deadline => return Err(e).context("reach the coordinator to submit the job"),
            Ok(Err(s)) => tracing::info!(error = %s.message(), "cannot submit yet; retrying"),
            Err(e) => tracing::info!(error = %format!("{e:#}"), "coordinator not reachable yet; retrying"),
        }
        // The coordinator is still starting (the sbatch script starts it
        // beside the workers): try again shortly, unless interrupted.
        tokio::select! {
            _ = token.cancelled() => anyhow::bail!("interrupted before the job was submitted"),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Polls the job's phase; once it has ended, records it and cancels `stop`.
async fn watch_job(coordinator: String, job: String, stop: CancellationToken, ended: Arc<Mutex<Option<i32>>>) {
    let mut c: Option<client::Client> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if c.is_none() {
            c = client::connect(&coordinator).await.ok();
        }
        let Some(cl) = c.as_mut() else { continue };
        match crate::rpc!(cl, get_job, pb::GetJobRequest { job_id: job.clone() }) {
            Ok(s) if pb::JobPhase::try_from(s.phase).is_ok_and(is_done) => {
                *ended.lock().expect("job phase") = Some(s.phase);
                stop.cancel();
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e.message(), "cannot read the job's phase");
                c = None;
            }
        }
    }
}

/// The job needs this worker no more: it ended, or it is trained and only
/// its registry hand-off (the coordinator's work) remains.
fn is_done(p: pb::JobPhase) -> bool {
    matches!(
        p,
        pb::JobPhase::Succeeded
            | pb::JobPhase::Failed
            | pb::JobPhase::Cancelled
            | pb::JobPhase::Registering
            | pb::JobPhase::TrainedNotRegistered
    )
}
