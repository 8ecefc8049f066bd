//! `flotilla models list|show|download` (reading a registry directly) and
//! `flotilla register JOB` (asking the coordinator to retry a hand-off).

use std::path::PathBuf;

use flotilla_proto::v1 as pb;
use flotilla_registry::{open_catalog, parse_reference, Catalog, VersionInfo};

use super::client::{self, Client};
use super::{ModelsCmd, ModelsCommand, EXIT_BAD_INPUT, EXIT_JOB_FAILED};

/// Runs a `models` subcommand; returns the exit code.
pub async fn models(cmd: ModelsCmd) -> anyhow::Result<i32> {
    let Some(url) = cmd.registry else {
        eprintln!("error: say which registry: --registry URL (or FLOTILLA_REGISTRY)");
        return Ok(EXIT_BAD_INPUT);
    };
    let url = absolute(&url)?;
    let catalog = open_catalog(&url)?;
    let result = match cmd.command {
        ModelsCommand::List { json } => list(catalog.as_ref(), json).await,
        ModelsCommand::Show { reference, json } => match resolve(catalog.as_ref(), &reference).await? {
            Ok(v) => {
                show(&v, json);
                Ok(())
            }
            Err(code) => return Ok(code),
        },
        ModelsCommand::Download { reference, out } => match resolve(catalog.as_ref(), &reference).await? {
            Ok(v) => {
                let dir = out.unwrap_or_else(|| PathBuf::from(format!("{}-{}", v.model, v.version)));
                let files = catalog.download(&v, &dir).await;
                files.map(|files| {
                    println!("{}@{} -> {}", v.model, v.version, dir.display());
                    for f in files {
                        println!("  {}", f.display());
                    }
                })
            }
            Err(code) => return Ok(code),
        },
    };
    match result {
        Ok(()) => Ok(0),
        Err(e) => {
            eprintln!("error: {e}");
            Ok(EXIT_JOB_FAILED)
        }
    }
}

/// A relative built-in registry path, made absolute against the current directory.
fn absolute(url: &str) -> anyhow::Result<String> {
    if url.contains("://") || url.starts_with('/') {
        return Ok(url.to_string());
    }
    Ok(std::env::current_dir()?.join(url).display().to_string())
}

async fn resolve(catalog: &dyn Catalog, reference: &str) -> anyhow::Result<Result<VersionInfo, i32>> {
    let (name, sel) = match parse_reference(reference) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {reference:?}: {e} (write NAME, NAME@VERSION or NAME@ALIAS)");
            return Ok(Err(EXIT_BAD_INPUT));
        }
    };
    match catalog.resolve(&name, &sel).await {
        Ok(v) => Ok(Ok(v)),
        Err(e) => {
            eprintln!("error: {e}");
            Ok(Err(EXIT_JOB_FAILED))
        }
    }
}

async fn list(catalog: &dyn Catalog, json: bool) -> Result<(), flotilla_registry::RegistryError> {
    let models = catalog.models().await?;
    if json {
        for m in &models {
            println!("{}", serde_json::to_string(m).expect("plain data serializes"));
        }
        return Ok(());
    }
    println!("{:<32} {:>7} {:>9}  ALIASES", "MODEL", "LATEST", "VERSIONS");
    for m in models {
        let aliases: Vec<String> = m.aliases.iter().map(|(a, v)| format!("{a}->{v}")).collect();
        println!("{:<32} {:>7} {:>9}  {}", m.name, m.latest_version, m.versions, aliases.join(" "));
    }
    Ok(())
}

fn show(v: &VersionInfo, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(v).expect("plain data serializes"));
        return;
    }
    println!("model:    {}", v.model);
    println!("version:  {}", v.version);
    if !v.aliases.is_empty() {
        println!("aliases:  {}", v.aliases.join(", "));
    }
    println!("job:      {}", v.job_id);
    println!("created:  {} ms since the epoch", v.created_ms);
    println!("files:    {}", v.uri);
    if !v.run_id.is_empty() {
        println!("run:      {}", v.run_id);
    }
    for (k, val) in &v.tags {
        println!("tag:      {k} = {val}");
    }
}

/// `flotilla register JOB`: asks for a hand-off now and, unless `no_wait`,
/// follows the job until it is registered or the attempt failed.
pub async fn register(c: &mut Client, job: &str, no_wait: bool) -> anyhow::Result<i32> {
    let before = match crate::rpc!(c, get_job, pb::GetJobRequest { job_id: job.to_string() }) {
        Ok(s) => s,
        Err(s) => {
            eprintln!("error: {}", s.message());
            return Ok(EXIT_JOB_FAILED);
        }
    };
    let attempts = before.registration.as_ref().map_or(0, |r| r.attempts);
    let status = match crate::rpc!(c, register_model, pb::RegisterModelRequest { job_id: job.to_string() }) {
        Ok(s) => s,
        Err(s) => {
            eprintln!("error: {}", s.message());
            return Ok(if s.code() == tonic::Code::InvalidArgument { EXIT_BAD_INPUT } else { EXIT_JOB_FAILED });
        }
    };
    if status.phase == pb::JobPhase::Succeeded as i32 || no_wait {
        report(&status);
        return Ok(if no_wait { 0 } else { super::exit_code(status.phase) });
    }
    // Wait for this retry's outcome: registered, or one more failed attempt.
    let watch = |mut wc: pb::job_service_client::JobServiceClient<flotilla_proto::auth::AuthChannel>| {
        let req = pb::WatchJobRequest { job_id: job.to_string() };
        async move { wc.watch_job(req).await }
    };
    let mut stream = c.call(watch).await.map_err(|s| anyhow::anyhow!("watch the job: {}", s.message()))?;
    let mut last = status;
    loop {
        let failed_again = last.registration.as_ref().is_some_and(|r| r.attempts > attempts)
            && last.phase == pb::JobPhase::TrainedNotRegistered as i32;
        if client::is_terminal(last.phase) || failed_again {
            break;
        }
        match stream.message().await {
            Ok(Some(s)) => last = s,
            Ok(None) => break,
            Err(s) if client::retryable(&s) => {
                stream = c.call(watch).await.map_err(|s| anyhow::anyhow!("watch the job: {}", s.message()))?;
            }
            Err(s) => anyhow::bail!("watch the job: {}", s.message()),
        }
    }
    report(&last);
    Ok(super::exit_code(last.phase))
}

fn report(s: &pb::JobStatus) {
    match client::registration_line(s) {
        Some(line) => println!("{} {}: {line}", s.job_id, client::phase_name(s.phase)),
        None => println!("{} {}: {}", s.job_id, client::phase_name(s.phase), s.message),
    }
}
