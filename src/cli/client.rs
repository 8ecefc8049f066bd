//! The client side of the CLI: submit, status, cancel, and following a job
//! with a progress bar.

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_proto::v1 as pb;
use flotilla_proto::v1::job_service_client::JobServiceClient;
use indicatif::{ProgressBar, ProgressStyle};
use tonic::transport::Channel;

pub type Client = JobServiceClient<Channel>;

pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let channel = Channel::from_shared(url.to_string())
        .with_context(|| format!("coordinator address {url:?}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connect to the coordinator at {url}"))?;
    Ok(JobServiceClient::new(channel))
}

/// Submits a job file's text; relative paths in it resolve against the
/// current directory.
pub async fn submit(client: &mut Client, path: &Path, text: String) -> Result<String, tonic::Status> {
    let base = std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_else(|_| "/".into());
    let req = pb::SubmitJobRequest { spec_yaml: text, origin: path.display().to_string(), base_dir: base };
    Ok(client.submit_job(req).await?.into_inner().job_id)
}

pub fn phase_name(phase: i32) -> &'static str {
    match pb::JobPhase::try_from(phase).unwrap_or(pb::JobPhase::Unspecified) {
        pb::JobPhase::Pending => "pending",
        pb::JobPhase::Running => "running",
        pb::JobPhase::Waiting => "waiting",
        pb::JobPhase::Succeeded => "succeeded",
        pb::JobPhase::Failed => "failed",
        pb::JobPhase::Cancelled => "cancelled",
        pb::JobPhase::Unspecified => "unknown",
    }
}

pub fn is_terminal(phase: i32) -> bool {
    matches!(
        pb::JobPhase::try_from(phase),
        Ok(pb::JobPhase::Succeeded | pb::JobPhase::Failed | pb::JobPhase::Cancelled)
    )
}

pub fn print_table(jobs: &[pb::JobStatus]) {
    println!("{:<24} {:<10} {:>5} {:>4} {:>13} {:>10}", "JOB", "PHASE", "GEN", "WORLD", "STEP", "LOSS");
    for j in jobs {
        println!(
            "{:<24} {:<10} {:>5} {:>4} {:>13} {:>10.4}",
            j.job_id,
            phase_name(j.phase),
            j.generation,
            j.world_size,
            format!("{}/{}", j.step, j.total_steps),
            j.loss
        );
    }
}

pub fn print_detail(j: &pb::JobStatus) {
    println!("job:          {}", j.job_id);
    println!(
        "phase:        {}{}",
        phase_name(j.phase),
        if j.message.is_empty() { String::new() } else { format!(" ({})", j.message) }
    );
    println!("step:         {}/{}  loss {:.4}  {:.0} samples/s", j.step, j.total_steps, j.loss, j.samples_per_sec);
    println!(
        "workers:      {} (min {}, max {})  generation {}  restarts {}",
        j.world_size, j.min_workers, j.max_workers, j.generation, j.restarts
    );
    for r in &j.ranks {
        println!("  rank {:<3}    {} at {}", r.rank, r.worker_id, r.data_addr);
    }
    println!("output:       {}", j.output_dir);
    if let Some(c) = &j.latest_checkpoint {
        println!(
            "checkpoint:   step {} at {} (training blocked {:.1} ms of {:.1} ms)",
            c.step, c.location, c.blocked_ms, c.total_ms
        );
    }
    if !j.final_model.is_empty() {
        println!("final model:  {}", j.final_model);
    }
    if !j.generations.is_empty() {
        println!("generations:");
        for g in &j.generations {
            println!(
                "  {:<4} world {:<3} from step {:<6} {}",
                g.generation, g.world_size, g.resumed_from_step, g.reason
            );
        }
    }
}

/// Follows a job until it ends, with a progress bar on a terminal or a line
/// every tenth of the run otherwise. Returns the final status.
pub async fn follow(client: &mut Client, job: &str) -> anyhow::Result<pb::JobStatus> {
    let mut stream =
        client.watch_job(pb::WatchJobRequest { job_id: job.to_string() }).await.context("watch the job")?.into_inner();
    let tty = std::io::stderr().is_terminal();
    let bar = ProgressBar::new(0);
    if tty {
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] step {pos}/{len}  {msg}  eta {eta}")
                .expect("template is valid")
                .progress_chars("=> "),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_prefix(job.to_string());
    let started = Instant::now();
    let mut last_line_step = 0u64;
    let mut last_phase = -1;
    let mut last: Option<pb::JobStatus> = None;
    while let Some(status) = stream.message().await.context("follow the job")? {
        bar.set_length(status.total_steps);
        bar.set_position(status.step);
        bar.set_message(format!(
            "loss {:.4}  {:.0} samples/s  {} workers",
            status.loss, status.samples_per_sec, status.world_size
        ));
        if status.phase != last_phase {
            let line = format!("{job}: {} ({})", phase_name(status.phase), status.message);
            if tty {
                bar.println(line)
            } else {
                eprintln!("{line}")
            }
            last_phase = status.phase;
        }
        let tenth = (status.total_steps / 10).max(1);
        if !tty && status.step >= last_line_step + tenth {
            eprintln!(
                "{job}: step {}/{}  loss {:.4}  {:.0} samples/s  {} workers  {:.1}s",
                status.step,
                status.total_steps,
                status.loss,
                status.samples_per_sec,
                status.world_size,
                started.elapsed().as_secs_f64()
            );
            last_line_step = status.step;
        }
        let done = is_terminal(status.phase);
        last = Some(status);
        if done {
            break;
        }
    }
    bar.finish_and_clear();
    last.context("the coordinator closed the watch before the job ended")
}

/// One line per outcome, for `run` and `submit --wait`.
pub fn print_outcome(s: &pb::JobStatus, elapsed: Duration) {
    match pb::JobPhase::try_from(s.phase) {
        Ok(pb::JobPhase::Succeeded) => {
            println!(
                "job {} succeeded in {:.1}s: {} steps, final loss {:.4}",
                s.job_id,
                elapsed.as_secs_f64(),
                s.total_steps,
                s.loss
            );
            println!("  checkpoints: {}", s.output_dir);
            for c in &s.checkpoints {
                println!(
                    "    step {:>8}  {}  (blocked {:.1} ms, saved in {:.1} ms)",
                    c.step, c.location, c.blocked_ms, c.total_ms
                );
            }
            println!("  final model: {}", s.final_model);
            println!("  metrics:     {}/metrics.jsonl", s.output_dir);
        }
        _ => {
            println!("job {} {}: {}", s.job_id, phase_name(s.phase), s.message);
        }
    }
}

/// Writes the job's per-step metrics to `<output>/metrics.jsonl`.
pub async fn save_metrics(client: &mut Client, job: &str, output: &str) -> anyhow::Result<String> {
    let points = client.get_metrics(pb::GetMetricsRequest { job_id: job.to_string() }).await?.into_inner().points;
    let mut text = String::new();
    for p in points {
        let line = serde_json::json!({
            "step": p.step, "loss": p.loss, "lr": p.lr, "samples_per_sec": p.samples_per_sec,
            "grad_norm": p.grad_norm, "generation": p.generation, "world_size": p.world_size,
        });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    let out = flotilla_trainer::storage::Storage::open(output)?;
    out.put("metrics.jsonl", text.into_bytes()).await.context("write metrics.jsonl")?;
    Ok(format!("{output}/metrics.jsonl"))
}
