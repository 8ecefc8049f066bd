//! The `flotilla` binary.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use flotilla::cli::{self, client, Cli, Command};
use flotilla_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

fn init_logs(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Cancels `token` on Ctrl-C, and on SIGTERM too when `sigterm` (a worker
/// treats SIGTERM as a preemption notice instead).
fn cancel_on_signals(token: CancellationToken, sigterm: bool) {
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv(), if sigterm => {}
        }
        tracing::info!("signal received; shutting down");
        token.cancel();
        // If the clean shutdown hangs, do not hang with it.
        tokio::time::sleep(Duration::from_secs(15)).await;
        std::process::exit(1);
    });
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let code = runtime.block_on(async move {
        match main_async(cli).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                1
            }
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    std::process::exit(code);
}

async fn main_async(cli: Cli) -> anyhow::Result<i32> {
    match flotilla_proto::auth::Credentials::resolve(cli.token_file.as_deref()) {
        Ok(c) => flotilla_proto::auth::Credentials::set_current(c),
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(cli::EXIT_BAD_INPUT);
        }
    }
    match cli.command {
        Command::Run { job, workers } => {
            // The embedded coordinator's decisions show in the job's phase
            // lines; its logs would only repeat them.
            init_logs("warn,flotilla_coordinator=off");
            cli::run::run(&job, workers).await
        }
        Command::Selftest(cli::SelftestCmd::Nccl { json, hang }) => {
            init_logs("warn");
            cli::selftest::nccl(&json, hang).await
        }
        Command::Validate { job, json } => match cli::load_job(&job) {
            Ok((_, mut spec)) if json => {
                spec.resolve_paths(&std::env::current_dir()?);
                println!("{}", spec.to_json());
                Ok(0)
            }
            Ok((_, spec)) => {
                println!(
                    "{}: ok ({} model, {} steps, {}..{} workers)",
                    job.display(),
                    spec.model.kind(),
                    spec.train.steps,
                    spec.workers.min,
                    spec.workers.max
                );
                Ok(0)
            }
            Err(code) => Ok(code),
        },
        Command::ExportInit { job, out } => {
            let spec = match cli::load_job(&job) {
                Ok((_, spec)) => spec,
                Err(code) => return Ok(code),
            };
            // As the train loop does before it builds the model.
            tch::set_num_threads(1);
            let (layout, flat) = match &spec.model {
                flotilla_jobspec::ModelSpec::Llama(l) if l.pretrained => {
                    // `from` as the job file names it: relative to the file's folder.
                    let base = std::path::absolute(&job)?.parent().map(|p| p.to_path_buf()).unwrap_or_default();
                    let dir = base.join(l.from.as_deref().unwrap_or_default());
                    match flotilla_trainer::hf::pretrained_weights(&spec.model, &dir) {
                        Ok(w) => w,
                        Err(e) => {
                            eprintln!("error: {e}");
                            return Ok(cli::EXIT_BAD_INPUT);
                        }
                    }
                }
                _ => flotilla_trainer::model::initial_weights(&spec.model, spec.train.seed),
            };
            std::fs::write(&out, flotilla_trainer::checkpoint::encode_weights(&layout, &flat))
                .with_context(|| format!("write initial weights to {}", out.display()))?;
            println!("{}: {} tensors, {} parameters", out.display(), layout.names.len(), layout.total);
            Ok(0)
        }
        Command::HfEval { model, tokens, out } => {
            tch::set_num_threads(1);
            let batch = tch::Tensor::read_safetensors(&tokens)
                .with_context(|| format!("read {}", tokens.display()))?
                .into_iter()
                .find(|(n, _)| n == "tokens")
                .with_context(|| format!("{} has no tensor `tokens`", tokens.display()))?
                .1
                .to_kind(tch::Kind::Int64);
            let (logits, loss) = match flotilla_trainer::hf::evaluate(&model, &batch) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(cli::EXIT_BAD_INPUT);
                }
            };
            tch::Tensor::write_safetensors(&[("logits", &logits)], &out)
                .with_context(|| format!("write {}", out.display()))?;
            println!("{}", serde_json::json!({ "loss": loss }));
            Ok(0)
        }
        Command::Tokenize { tokenizer, text, out } => {
            let (text, tokenizer) = (text.display().to_string(), tokenizer.display().to_string());
            let ids = match flotilla_trainer::tokenize::text_tokens(&text, &tokenizer, None) {
                Ok(ids) => ids,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(cli::EXIT_BAD_INPUT);
                }
            };
            let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
            std::fs::write(&out, bytes).with_context(|| format!("write {}", out.display()))?;
            println!("{}", serde_json::json!({ "tokens": ids.len() }));
            Ok(0)
        }
        Command::Coordinator(cmd) => match cmd.admin {
            Some(admin) => {
                init_logs("warn");
                cli::coordinator::admin(admin).await
            }
            None => {
                init_logs("info");
                let a = cmd.serve;
                let overrides = cli::coordinator::Overrides {
                    listen: a.listen,
                    advertise: a.advertise,
                    lease_ms: a.lease_ms,
                    heartbeat_ms: a.heartbeat_ms,
                    start_grace_ms: a.start_grace_ms,
                    handoff_retry_max_ms: a.handoff_retry_max_ms,
                    id: a.id,
                    data_dir: a.data_dir,
                    peers: a.peers,
                    join: a.join,
                    etcd: a.etcd,
                    memory: a.memory,
                    tls_dir: a.tls_dir,
                    admin_token_file: a.admin_token_file,
                    insecure: a.insecure,
                    browsers: a.browsers,
                };
                let (cfg, base) = match cli::coordinator::load(a.config.as_deref(), overrides) {
                    Ok(v) => v,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return Ok(cli::EXIT_BAD_INPUT);
                    }
                };
                let token = CancellationToken::new();
                cancel_on_signals(token.clone(), true);
                cli::coordinator::run(cfg, base, token).await?;
                Ok(0)
            }
        },
        Command::Worker(args) => {
            init_logs("info");
            let token = CancellationToken::new();
            cancel_on_signals(token.clone(), false);
            cli::worker::run(args, token).await
        }
        Command::Certs { cmd: cli::CertsCommand::Init { dir, hosts, force } } => {
            cli::certs::init(&dir, &hosts, force)?;
            Ok(0)
        }
        Command::K8s { cmd } => Ok(cli::render::k8s(cmd)),
        Command::Token { cmd } => {
            init_logs("warn");
            cli::token::token(cmd).await
        }
        Command::Slurm { cmd } => Ok(cli::render::slurm(cmd)),
        Command::Submit { job, coordinator, wait, submission_id } => {
            init_logs("warn");
            let (text, _) = match cli::load_job(&job) {
                Ok(v) => v,
                Err(code) => return Ok(code),
            };
            cli::certs::dial_as_client(&coordinator.tls)?;
            let mut c = client::connect(&coordinator.coordinator).await?;
            let submitted = match submission_id {
                Some(sid) => client::submit_as(&mut c, &job, text, sid).await,
                None => client::submit(&mut c, &job, text).await,
            };
            let id = match submitted {
                Ok(id) => id,
                Err(s) => {
                    eprintln!("error: {}", s.message());
                    return Ok(if s.code() == tonic::Code::InvalidArgument { cli::EXIT_BAD_INPUT } else { 1 });
                }
            };
            println!("{id}");
            if !wait {
                return Ok(0);
            }
            let started = Instant::now();
            let status = client::follow(&mut c, &id).await?;
            client::print_outcome(&status, started.elapsed());
            Ok(cli::exit_code(status.phase))
        }
        Command::Sweep { sweep, coordinator, wait, submission_id } => {
            init_logs("warn");
            let req = match cli::sweep::load(&sweep, submission_id.unwrap_or_else(flotilla_coordinator::random_id)) {
                Ok(r) => r,
                Err(code) => return Ok(code),
            };
            cli::certs::dial_as_client(&coordinator.tls)?;
            let mut c = client::connect(&coordinator.coordinator).await?;
            cli::sweep::submit(&mut c, req, wait).await
        }
        Command::Status { job, json, coordinator } => {
            init_logs("warn");
            cli::certs::dial_as_client(&coordinator.tls)?;
            let mut c = client::connect(&coordinator.coordinator).await?;
            match job {
                Some(id) if cli::sweep::is_sweep_id(&id) => return cli::sweep::status(&mut c, &id, json).await,
                Some(id) => match flotilla::rpc!(c, get_job, pb::GetJobRequest { job_id: id.clone() }) {
                    Ok(s) if json => println!("{:#}", cli::status::status_json(&s)),
                    Ok(s) => cli::status::print_detail(&s),
                    Err(s) => {
                        eprintln!("error: {}", s.message());
                        return Ok(1);
                    }
                },
                None => {
                    let jobs = flotilla::rpc!(c, list_jobs, pb::ListJobsRequest {})?.jobs;
                    if json {
                        for j in &jobs {
                            println!("{}", cli::status::status_json(j));
                        }
                    } else {
                        cli::status::print_table(&jobs);
                    }
                }
            }
            Ok(0)
        }
        Command::Register { job, coordinator, no_wait } => {
            init_logs("warn");
            cli::certs::dial_as_client(&coordinator.tls)?;
            let mut c = client::connect(&coordinator.coordinator).await?;
            cli::models::register(&mut c, &job, no_wait).await
        }
        Command::Models(cmd) => {
            init_logs("warn");
            cli::models::models(cmd).await
        }
        Command::Cancel { job, coordinator } => {
            init_logs("warn");
            cli::certs::dial_as_client(&coordinator.tls)?;
            let mut c = client::connect(&coordinator.coordinator).await?;
            if cli::sweep::is_sweep_id(&job) {
                return cli::sweep::cancel(&mut c, &job).await;
            }
            match flotilla::rpc!(c, cancel_job, pb::CancelJobRequest { job_id: job.clone() }) {
                Ok(s) => {
                    println!("{} {}", s.job_id, client::phase_name(s.phase));
                    Ok(0)
                }
                Err(s) => {
                    eprintln!("error: {}", s.message());
                    Ok(1)
                }
            }
        }
    }
}
