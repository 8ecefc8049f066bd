//! The `flotilla` command line.

pub mod certs;
pub mod client;
pub mod coordinator;
pub mod metrics;
pub mod models;
pub mod procs;
pub mod render;
pub mod run;
pub mod selftest;
pub mod status;
pub mod sweep;
pub mod token;
pub mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Exit code for a bad job file or bad arguments.
pub const EXIT_BAD_INPUT: i32 = 2;
/// Exit code for a job that failed or was cancelled.
pub const EXIT_JOB_FAILED: i32 = 1;
/// Exit code for a job whose model is trained but not registered (its
/// registry hand-off failed; the coordinator keeps retrying).
pub const EXIT_NOT_REGISTERED: i32 = 3;

/// The phase's exit code for `run`, `submit --wait` and `register`.
pub fn exit_code(phase: i32) -> i32 {
    use flotilla_proto::v1::JobPhase;
    match JobPhase::try_from(phase) {
        Ok(JobPhase::Succeeded) => 0,
        Ok(JobPhase::TrainedNotRegistered | JobPhase::Registering) => EXIT_NOT_REGISTERED,
        _ => EXIT_JOB_FAILED,
    }
}

#[derive(Debug, Parser)]
#[command(name = "flotilla", version, about = "Distributed deep-learning training: one binary, one YAML file")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// A file holding the API token that calls to the coordinator carry
    /// (or set FLOTILLA_TOKEN to the token itself). A coordinator writes an
    /// admin token file on first start; `flotilla token create` makes more.
    #[arg(long, env = "FLOTILLA_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Args, Clone)]
pub struct CoordinatorArg {
    /// The coordinator's address, or the addresses of its replicas separated
    /// by commas (the leader among them is found and followed).
    #[arg(long, env = "FLOTILLA_COORDINATOR", default_value = "http://127.0.0.1:7070")]
    pub coordinator: String,
    #[command(flatten)]
    pub tls: certs::TlsArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a job on this machine: an embedded coordinator and `workers.max`
    /// local worker processes.
    Run {
        job: PathBuf,
        /// Number of local workers (default: the job's workers.max).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Check a job file and print what it asks for.
    Validate {
        job: PathBuf,
        /// Print the validated spec as JSON (defaults filled in, paths made
        /// absolute against the current directory) instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Write the initial weights a job's train loop starts from (built from
    /// `train.seed`, or a pretrained model's) as safetensors: one f32 tensor
    /// per parameter, by name.
    ExportInit { job: PathBuf, out: PathBuf },
    /// Run a Hugging Face Llama folder on a batch of token sequences (a
    /// safetensors file with `tokens`, i64 `[batch, context + 1]`): write
    /// the logits (`logits`, f32) to OUT and print the mean next-token loss
    /// as JSON. For checking flotilla's Llama against transformers.
    #[command(hide = true)]
    HfEval { model: PathBuf, tokens: PathBuf, out: PathBuf },
    /// Tokenize a text file as `data.kind: text` with a `tokenizer` does
    /// (pieces cut after each line break, no special tokens): write the ids
    /// to OUT as little-endian u32 and print their count as JSON. For
    /// checking flotilla's ids against Python's `tokenizers`.
    #[command(hide = true)]
    Tokenize { tokenizer: PathBuf, text: PathBuf, out: PathBuf },
    /// Check this machine's GPUs the way jobs use them (for the GPU check,
    /// `scripts/gpu-check`).
    #[command(hide = true, subcommand)]
    Selftest(SelftestCmd),
    /// Run a coordinator replica, or administer a replicated coordinator
    /// (`members`, `add`, `remove`).
    Coordinator(CoordinatorCmd),
    /// Run a worker that takes assignments from a coordinator.
    Worker(worker::WorkerArgs),
    /// TLS material for the coordinator's port (replicas, workers, the CLI).
    Certs {
        #[command(subcommand)]
        cmd: CertsCommand,
    },
    /// Submit a job file to a running coordinator.
    Submit {
        job: PathBuf,
        #[command(flatten)]
        coordinator: CoordinatorArg,
        /// Follow the job until it ends; exit 1 if it does not succeed, 3 if
        /// its model is trained but not registered.
        #[arg(long)]
        wait: bool,
        /// Name the submission: every submit with the same id returns the job
        /// the first one created (default: a new random id).
        #[arg(long)]
        submission_id: Option<String>,
    },
    /// Submit a sweep file: every trial's job file is checked first; the
    /// coordinator runs the trials, at most `max_parallel` at a time.
    Sweep {
        sweep: PathBuf,
        #[command(flatten)]
        coordinator: CoordinatorArg,
        /// Follow the sweep until it ends and print its leaderboard; exit 1
        /// if it was cancelled or no trial succeeded.
        #[arg(long)]
        wait: bool,
        /// Name the submission: every submit with the same id returns the
        /// sweep the first one created (default: a new random id).
        #[arg(long)]
        submission_id: Option<String>,
    },
    /// Show all jobs, or one job (or sweep: its leaderboard) in detail: its ranks with their pipeline
    /// stage, replica and the memory each reported holding.
    Status {
        job: Option<String>,
        /// Print JSON instead: the job as one object, or one object per
        /// job and line without JOB.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        coordinator: CoordinatorArg,
    },
    /// Cancel a job, or a sweep and its trials.
    Cancel {
        job: String,
        #[command(flatten)]
        coordinator: CoordinatorArg,
    },
    /// Hand a trained job's model to its registry now (a job whose hand-off
    /// failed: "trained-not-registered"). Never registers a job twice.
    Register {
        job: String,
        #[command(flatten)]
        coordinator: CoordinatorArg,
        /// Return once the retry is requested instead of waiting for its outcome.
        #[arg(long)]
        no_wait: bool,
    },
    /// Read a model registry: list models, show a version, download one.
    Models(ModelsCmd),
    /// Kubernetes: render the manifests that run a job's workers.
    K8s {
        #[command(subcommand)]
        cmd: render::K8sCommand,
    },
    /// Slurm: render an sbatch script that runs a job.
    Slurm {
        #[command(subcommand)]
        cmd: render::SlurmCommand,
    },
    /// API tokens (admin role): create, list, revoke.
    Token {
        #[command(subcommand)]
        cmd: token::TokenCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Make a CA, a certificate for the coordinator replicas (valid for
    /// localhost, 127.0.0.1, ::1 and --hosts) and one for workers and the
    /// CLI, in DIR: ca.pem/ca.key, coordinator.pem/.key, client.pem/.key.
    Init {
        dir: PathBuf,
        /// More names the replicas are reached by (host names or IP
        /// addresses), comma-separated.
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
        /// Replace files that exist (a new CA: everyone needs the new files).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
pub struct ModelsCmd {
    #[command(subcommand)]
    pub command: ModelsCommand,
    /// The registry: an MLflow tracking server (http://host:port), or a
    /// built-in registry's folder (path, file://, s3://, gs://, az://).
    #[arg(long, env = "FLOTILLA_REGISTRY", global = true)]
    pub registry: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Every registered model, its latest version and aliases.
    List {
        /// One JSON object per model instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One version: NAME (the latest), NAME@VERSION or NAME@ALIAS.
    Show {
        reference: String,
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Copy a version's files (weights, job file, metrics, lineage) into a folder.
    Download {
        reference: String,
        /// The folder to write into [default: ./NAME-VERSION].
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct CoordinatorCmd {
    #[command(subcommand)]
    pub admin: Option<AdminCommand>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Runs one replica. Settings come from `--config` (YAML) and the flags,
/// flags winning; without either, a one-replica Raft cluster keeps its log
/// in `./flotilla-coordinator`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The coordinator's configuration file (YAML: listen, advertise,
    /// lease_ms, heartbeat_ms, start_grace_ms, store: {raft | etcd | memory}).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to serve the gRPC API on (clients, workers, peer replicas)
    /// [default: 127.0.0.1:7070].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// The URL clients and peers reach this replica at [default: http://<listen>].
    #[arg(long)]
    pub advertise: Option<String>,
    /// A worker that has not heartbeated for this long is declared lost [default: 5000].
    #[arg(long)]
    pub lease_ms: Option<u64>,
    /// How often workers heartbeat [default: 1000].
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// How long a job with enough (but fewer than workers.max) workers
    /// waits for more before it starts [default: 3000].
    #[arg(long)]
    pub start_grace_ms: Option<u64>,
    /// A failed registry hand-off is retried after 2 s, doubled per failure
    /// up to this many milliseconds [default: 60000].
    #[arg(long)]
    pub handoff_retry_max_ms: Option<u64>,
    /// Raft: this replica's id [default: 1].
    #[arg(long)]
    pub id: Option<u64>,
    /// Raft: where this replica keeps its log, vote and snapshots
    /// [default: ./flotilla-coordinator].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Raft: an initial member, ID=URL; repeat for each (this replica
    /// included). Used only when the data directory is new.
    #[arg(long = "peer", value_parser = coordinator::parse_peer)]
    pub peers: Vec<(u64, String)>,
    /// Raft: start outside any cluster and wait to be added to one with
    /// `flotilla coordinator add` (a new data directory only).
    #[arg(long)]
    pub join: bool,
    /// Keep the log in an existing etcd cluster instead: its endpoints,
    /// comma-separated.
    #[arg(long)]
    pub etcd: Option<String>,
    /// Keep the log in memory only (lost with the process).
    #[arg(long)]
    pub memory: bool,
    /// Serve TLS with this folder's ca.pem, coordinator.pem and
    /// coordinator.key (see `flotilla certs init`); clients must present a
    /// certificate signed by that CA [default: DATA_DIR/tls, made on first start].
    #[arg(long, env = "FLOTILLA_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// The admin token file this replica accepts, made (mode 0600) with a
    /// new token when missing [default: DATA_DIR/admin.token]. Give every
    /// replica of a cluster the same file, or make them each their own.
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// Serve plaintext, without TLS, and accept calls without API tokens.
    /// For a trusted network only: anyone who reaches the port can do anything.
    #[arg(long)]
    pub insecure: bool,
    /// Serve browsers: the web dashboard (`/`) and the HTTP API also take
    /// TLS connections without a client certificate (an API token is still
    /// needed for every API call); gRPC still needs one.
    #[arg(long)]
    pub browsers: bool,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Show the replicas, the leader, and how far each has replicated the log.
    Members {
        #[command(flatten)]
        coordinator: CoordinatorArg,
    },
    /// Add a replica: started beforehand with `--id ID --join`, it
    /// first catches up as a learner, then becomes a voter.
    Add {
        id: u64,
        /// The new replica's URL, e.g. http://10.0.0.4:7070.
        url: String,
        #[command(flatten)]
        coordinator: CoordinatorArg,
    },
    /// Remove a replica from the cluster.
    Remove {
        id: u64,
        #[command(flatten)]
        coordinator: CoordinatorArg,
    },
}

fn parse_signal(s: &str) -> Result<i32, String> {
    let name = s.trim_start_matches("SIG").to_ascii_uppercase();
    Ok(match name.as_str() {
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "HUP" => libc::SIGHUP,
        "TERM" => libc::SIGTERM,
        "INT" => libc::SIGINT,
        other => other.parse().map_err(|_| format!("unknown signal {s:?}; use USR1, USR2, HUP or a number"))?,
    })
}

/// Reads and validates a job file; on error prints it and returns the exit code.
pub fn load_job(path: &std::path::Path) -> Result<(String, flotilla_jobspec::JobSpec), i32> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot read job file {}: {e}", path.display());
            return Err(EXIT_BAD_INPUT);
        }
    };
    match flotilla_jobspec::parse(&text, &path.display().to_string()) {
        Ok(spec) => Ok((text, spec)),
        Err(e) => {
            eprintln!("error: {e}");
            Err(EXIT_BAD_INPUT)
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum SelftestCmd {
    /// NCCL through a coordinator's rendezvous board, a rank per visible
    /// GPU, every collective against a CPU reference; with --hang, the
    /// watchdog against an operation that never finishes. Exit 0 passed,
    /// 1 failed, 3 nothing to check here (no `cuda` feature, GPU or NCCL).
    Nccl {
        /// Where to write the checks as JSON.
        #[arg(long)]
        json: PathBuf,
        #[arg(long)]
        hang: bool,
    },
}
