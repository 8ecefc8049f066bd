//! `flotilla k8s render` and `flotilla slurm render`: read and validate the
//! job file, hand it to the pure renderers in [`crate::deploy`], print.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

use crate::deploy::{k8s, slurm};

#[derive(Debug, Subcommand)]
pub enum K8sCommand {
    /// Print a ConfigMap with the job file and an Indexed Job with one worker
    /// pod per worker (`workers.max`, or `parallelism.dp` when fixed), for
    /// `kubectl apply -f -`. Warnings go to stderr.
    Render(K8sRenderArgs),
}

#[derive(Debug, Subcommand)]
pub enum SlurmCommand {
    /// Print an sbatch script that runs the job: one `flotilla worker` task
    /// per worker, and a coordinator on the first node unless --coordinator.
    Render(SlurmRenderArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CloudArg {
    None,
    Eks,
    Gke,
}

#[derive(Debug, Args)]
pub struct K8sRenderArgs {
    pub job: PathBuf,
    /// The worker image (built from deploy/docker/) [default: flotilla:<version>-cuda].
    #[arg(long)]
    pub image: Option<String>,
    #[arg(long, default_value = "flotilla")]
    pub namespace: String,
    /// The coordinator replicas' URLs, comma-separated [default: the three
    /// replicas of deploy/kubernetes/base].
    #[arg(long)]
    pub coordinator: Option<String>,
    /// Spot node pools and the preemption notice of this cloud.
    #[arg(long, value_enum, default_value = "none")]
    pub cloud: CloudArg,
    /// Schedule on on-demand nodes instead of spot/preemptible ones.
    #[arg(long)]
    pub on_demand: bool,
    /// GPUs per worker pod (nvidia.com/gpu): 1, or 0 for CPU workers (a
    /// worker computes on one GPU; more GPUs, more workers).
    #[arg(long, default_value_t = 1)]
    pub gpus: u32,
    /// CPU requested per worker pod.
    #[arg(long, default_value = "4")]
    pub cpu: String,
    /// Memory requested per worker pod.
    #[arg(long, default_value = "16Gi")]
    pub memory: String,
    /// Seconds a preempted worker waits for its checkpoint; the pods'
    /// terminationGracePeriodSeconds is 30 more.
    #[arg(long, default_value_t = 60)]
    pub preemption_grace_s: u64,
    /// A Secret whose keys become the workers' environment (object-store
    /// credentials); not needed with IRSA or Workload Identity.
    #[arg(long)]
    pub credentials_secret: Option<String>,
    #[arg(long, default_value = k8s::WORKER_SERVICE_ACCOUNT)]
    pub service_account: String,
    /// A ReadWriteMany PersistentVolumeClaim mounted at /work, the workers'
    /// working directory, where relative paths of the job resolve.
    #[arg(long)]
    pub workdir_claim: Option<String>,
    /// The Kubernetes Job's name [default: flotilla-<job name>].
    #[arg(long)]
    pub job_name: Option<String>,
    /// The Secret (key `token`) holding the API token the workers submit
    /// and run the job with; it needs the admin role.
    #[arg(long, default_value = k8s::ADMIN_TOKEN_SECRET)]
    pub token_secret: String,
}

#[derive(Debug, Args)]
pub struct SlurmRenderArgs {
    pub job: PathBuf,
    /// The flotilla binary on the nodes [default: this binary].
    #[arg(long)]
    pub flotilla: Option<PathBuf>,
    /// Use this running coordinator (URLs, comma-separated) instead of
    /// starting one on the first node of the allocation.
    #[arg(long)]
    pub coordinator: Option<String>,
    /// How workers reach the coordinator started on the first node
    /// [default: that node's hostname].
    #[arg(long)]
    pub coordinator_host: Option<String>,
    #[arg(long, default_value_t = 7070)]
    pub coordinator_port: u16,
    /// Where the started coordinator keeps its log, per Slurm job.
    #[arg(long, default_value = "flotilla-coordinator")]
    pub coordinator_dir: String,
    /// GPUs per node: one task per GPU (--gpus-per-task=1). 0: no GPUs.
    #[arg(long, default_value_t = 0)]
    pub gpus_per_node: u32,
    #[arg(long)]
    pub cpus_per_task: Option<u32>,
    /// The time limit (sbatch --time).
    #[arg(long)]
    pub time: Option<String>,
    #[arg(long)]
    pub partition: Option<String>,
    #[arg(long)]
    pub account: Option<String>,
    /// Seconds a worker that got USR1 waits for its checkpoint.
    #[arg(long, default_value_t = 60)]
    pub preemption_grace_s: u64,
    /// Seconds before the time limit that Slurm sends USR1 [default: grace + 30].
    #[arg(long)]
    pub signal_lead_s: Option<u64>,
    /// The API token file the tasks read on the nodes (a path on a shared
    /// filesystem; the token needs the worker and submit roles, i.e. admin)
    /// [default with a started coordinator: the admin token file it writes
    /// in its folder; needed with --coordinator].
    #[arg(long)]
    pub node_token_file: Option<String>,
}

/// Runs `flotilla k8s ...`; returns the exit code.
pub fn k8s(cmd: K8sCommand) -> i32 {
    let K8sCommand::Render(a) = cmd;
    let (text, spec) = match super::load_job(&a.job) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let defaults = k8s::K8sOptions::default();
    let opts = k8s::K8sOptions {
        image: a.image.unwrap_or(defaults.image),
        namespace: a.namespace,
        coordinator: a.coordinator.unwrap_or(defaults.coordinator),
        cloud: match a.cloud {
            CloudArg::None => k8s::Cloud::None,
            CloudArg::Eks => k8s::Cloud::Eks,
            CloudArg::Gke => k8s::Cloud::Gke,
        },
        spot: !a.on_demand,
        gpus: a.gpus,
        cpu: a.cpu,
        memory: a.memory,
        preemption_grace_s: a.preemption_grace_s,
        credentials_secret: a.credentials_secret,
        service_account: a.service_account,
        workdir_claim: a.workdir_claim,
        job_name: a.job_name,
        token_secret: a.token_secret,
    };
    match k8s::render(&spec, &text, &opts) {
        Ok(out) => {
            for w in &out.warnings {
                eprintln!("warning: {w}");
            }
            print!("{}", out.manifests);
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            super::EXIT_BAD_INPUT
        }
    }
}

/// Runs `flotilla slurm ...`; returns the exit code.
pub fn slurm(cmd: SlurmCommand) -> i32 {
    let SlurmCommand::Render(a) = cmd;
    let spec = match super::load_job(&a.job) {
        Ok((_, spec)) => spec,
        Err(code) => return code,
    };
    // The tasks read the job file where it is now: an absolute path.
    let job_file = std::fs::canonicalize(&a.job).unwrap_or_else(|_| a.job.clone());
    let flotilla = a
        .flotilla
        .or_else(|| std::env::current_exe().ok())
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "flotilla".into());
    let opts = slurm::SlurmOptions {
        job_file: job_file.display().to_string(),
        flotilla,
        coordinator: a.coordinator,
        coordinator_host: a.coordinator_host,
        coordinator_port: a.coordinator_port,
        coordinator_dir: a.coordinator_dir,
        gpus_per_node: a.gpus_per_node,
        cpus_per_task: a.cpus_per_task,
        time: a.time,
        partition: a.partition,
        account: a.account,
        preemption_grace_s: a.preemption_grace_s,
        signal_lead_s: a.signal_lead_s,
        token_file: a.node_token_file,
    };
    match slurm::render(&spec, &opts) {
        Ok(script) => {
            print!("{script}");
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            super::EXIT_BAD_INPUT
        }
    }
}
