//! `flotilla run JOB.yaml`: an embedded one-node coordinator on a loopback
//! port, local worker processes, the job submitted and followed to its end.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_coordinator::{AuthMode, CoordinatorConfig};
use flotilla_jobspec::{DeviceChoice, JobSpec};
use flotilla_proto::auth::Credentials;
use flotilla_proto::tls::{Role, Tls, TlsPaths};
use flotilla_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use super::client;
use super::procs::LocalWorkers;
use super::{EXIT_BAD_INPUT, EXIT_JOB_FAILED};

/// Runs the job; returns the process exit code.
pub async fn run(path: &Path, workers: Option<usize>) -> anyhow::Result<i32> {
    let (text, spec) = match super::load_job(path) {
        Ok(v) => v,
        Err(code) => return Ok(code),
    };
    let visible = flotilla_trainer::device::visible_gpus();
    let gpus = match local_gpus(&spec, workers, visible) {
        Ok(g) => g,
        Err(why) => {
            eprintln!("error: {why}");
            return Ok(EXIT_BAD_INPUT);
        }
    };
    let n = gpus.len();
    if n < spec.workers.min {
        eprintln!("error: --workers {n} is below the job's workers.min ({})", spec.workers.min);
        return Ok(EXIT_BAD_INPUT);
    }
    if gpus.iter().flatten().count() > visible {
        eprintln!(
            "flotilla: {n} workers share {visible} GPU(s): ranks on one GPU exchange tensors over TCP through \
             pinned host memory (NCCL needs a GPU per rank)"
        );
    }

    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("bind the coordinator port")?;
    // A token for this run only: the coordinator lives as long as the run,
    // and its workers and this client are the only ones that know it.
    let (token, hash) = flotilla_coordinator::auth::new_token().context("mint the run's API token")?;
    let cfg = CoordinatorConfig {
        lease: Duration::from_secs(5),
        heartbeat_interval: Duration::from_millis(500),
        start_grace: Duration::from_secs(10),
        auth: AuthMode::Tokens { bootstrap: vec![("run".into(), hash)] },
        ..CoordinatorConfig::default()
    };
    // The coordinator's log lives as long as this run.
    let data_dir = std::env::temp_dir().join(format!("flotilla-run-{}", std::process::id()));
    // So are its TLS material: a throw-away CA for this run's loopback port.
    let tls_dir = data_dir.join("tls");
    super::certs::ensure(&tls_dir, &[]).context("make this run's TLS material")?;
    let load = |role| Tls::load(&TlsPaths::in_dir(&tls_dir, role)).map_err(anyhow::Error::msg);
    let (server_tls, client_tls) = (load(Role::Coordinator)?, load(Role::Client)?);
    flotilla_proto::tls::set_dialing(Some(&client_tls));
    let (server, store) =
        super::coordinator::embedded(listener, cfg, shutdown.clone(), &data_dir, Some(&server_tls)).await?;
    let url = format!("https://{}", server.addr);

    let credentials = Credentials::token(&token).map_err(anyhow::Error::msg)?;
    let mut client = client::connect_with(&url, credentials).await?;
    let job = match client::submit(&mut client, path, text).await {
        Ok(job) => job,
        Err(status) => {
            eprintln!("error: {}", status.message());
            server.shutdown().await.ok();
            store.shutdown().await;
            let _ = std::fs::remove_dir_all(&data_dir);
            return Ok(if status.code() == tonic::Code::InvalidArgument { EXIT_BAD_INPUT } else { EXIT_JOB_FAILED });
        }
    };
    let req = pb::GetJobRequest { job_id: job.clone() };
    let status = crate::rpc!(client, get_job, req)?;
    // Logs stay on this machine even when outputs go to an object store.
    let logs = if status.output_dir.starts_with('/') {
        Path::new(&status.output_dir).join("logs")
    } else {
        std::env::current_dir()?.join("flotilla-logs").join(&job)
    };
    eprintln!("flotilla: running {job} on {n} local workers (coordinator {url}, logs in {})", logs.display());
    dashboard_hint(&url, &job, &token, &data_dir);
    // Started from this (the main) thread: the parent death signal follows it.
    let tls_args = super::certs::child_args(Some(&tls_dir));
    let mut local = LocalWorkers::start(&gpus, &url, &token, &tls_args, &logs).context("start local workers")?;

    let started = Instant::now();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let workers_gone = async {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if local.all_exited() {
                break;
            }
        }
    };
    let outcome = tokio::select! {
        r = client::follow(&mut client, &job) => Some(r),
        _ = workers_gone => Some(Err(anyhow::anyhow!(
            "every local worker exited; see the logs in {}", logs.display()
        ))),
        _ = tokio::signal::ctrl_c() => None,
        _ = sigterm.recv() => None,
    };
    let code = match outcome {
        None => {
            eprintln!("flotilla: interrupted; stopping workers");
            let req = pb::CancelJobRequest { job_id: job.clone() };
            let _ = crate::rpc!(client, cancel_job, req);
            130
        }
        Some(Ok(status)) => {
            if let Err(e) = client::save_metrics(&mut client, &job, &status.output_dir).await {
                eprintln!("warning: could not save metrics: {e:#}");
            }
            client::print_outcome(&status, started.elapsed());
            if status.phase == pb::JobPhase::TrainedNotRegistered as i32 {
                eprintln!(
                    "flotilla: this run's coordinator ends with it; to register the model later, run the job \
                     on a long-lived coordinator (`flotilla coordinator`, `flotilla submit`)"
                );
            }
            super::exit_code(status.phase)
        }
        Some(Err(e)) => {
            eprintln!("error: {e:#}");
            EXIT_JOB_FAILED
        }
    };
    tokio::task::block_in_place(|| local.stop(Duration::from_secs(10)));
    server.shutdown().await.ok();
    store.shutdown().await;
    let _ = std::fs::remove_dir_all(&data_dir);
    Ok(code)
}

/// Says where the run's dashboard is and where the token it asks for is
/// (a file only the user reads, gone with the run; never in the URL).
fn dashboard_hint(url: &str, job: &str, token: &str, data_dir: &Path) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let file = data_dir.join("dashboard.token");
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&file)
        .and_then(|mut f| f.write_all(format!("{token}\n").as_bytes()));
    let token_at = match written {
        Ok(()) => format!("token in {}", file.display()),
        Err(e) => format!("could not write its token to {}: {e}", file.display()),
    };
    eprintln!("flotilla: dashboard {url}/#/jobs/{job} ({token_at}; the browser warns about this run's own CA)");
}

/// The GPU of each local worker (`None`: its CPU). A job that computes on
/// CUDA (`train.device: cuda`, or `auto` with GPUs visible) gets one worker
/// per visible GPU by default (within `workers.min..=workers.max`); more
/// workers than GPUs take them in turn.
fn local_gpus(spec: &JobSpec, workers: Option<usize>, visible: usize) -> Result<Vec<Option<usize>>, String> {
    let cuda = match spec.train.device {
        DeviceChoice::Cpu => false,
        DeviceChoice::Auto => visible > 0,
        DeviceChoice::Cuda if visible == 0 => {
            return Err("the job asks for train.device: cuda and libtorch sees no GPU on this machine".into())
        }
        DeviceChoice::Cuda => true,
    };
    if !cuda {
        return Ok(vec![None; workers.unwrap_or(spec.workers.max)]);
    }
    let n = workers.unwrap_or_else(|| visible.clamp(spec.workers.min, spec.workers.max));
    Ok((0..n).map(|i| Some(i % visible)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(device: &str, min: usize, max: usize) -> JobSpec {
        let yaml = format!(
            "name: g\nmodel: {{kind: mlp, layers: [2, 2]}}\ndata: {{kind: synthetic}}\n\
             train: {{steps: 1, global_batch: 8, device: {device}}}\nworkers: {{min: {min}, max: {max}}}\n"
        );
        flotilla_jobspec::parse(&yaml, "g.yaml").unwrap()
    }

    #[test]
    fn a_cuda_job_gets_a_worker_per_gpu_each_on_its_own() {
        assert_eq!(local_gpus(&spec("auto", 1, 8), None, 4), Ok(vec![Some(0), Some(1), Some(2), Some(3)]));
        assert_eq!(local_gpus(&spec("cuda", 1, 2), None, 4), Ok(vec![Some(0), Some(1)]), "at most workers.max");
        // More workers than GPUs share them in turn (the TCP fallback).
        assert_eq!(local_gpus(&spec("cuda", 2, 2), None, 1), Ok(vec![Some(0), Some(0)]));
        assert_eq!(local_gpus(&spec("cuda", 1, 4), Some(3), 2), Ok(vec![Some(0), Some(1), Some(0)]));
    }

    #[test]
    fn cpu_jobs_and_machines_without_gpus_run_workers_max_on_the_cpu() {
        assert_eq!(local_gpus(&spec("auto", 1, 3), None, 0), Ok(vec![None; 3]));
        assert_eq!(local_gpus(&spec("cpu", 1, 2), None, 4), Ok(vec![None; 2]));
        let e = local_gpus(&spec("cuda", 1, 2), None, 0).unwrap_err();
        assert!(e.contains("train.device: cuda"), "{e}");
    }
}
