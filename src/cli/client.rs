//! The client side of the CLI: a client that follows the leading replica,
//! submit, and following a job with a progress bar.

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use flotilla_proto::auth::{AuthChannel, Credentials};
use flotilla_proto::leader;
use flotilla_proto::v1 as pb;
use flotilla_proto::v1::job_service_client::JobServiceClient;
use indicatif::{ProgressBar, ProgressStyle};

/// How long a call keeps retrying while the coordinator replicas elect a
/// leader or the leader is unreachable.
const RETRY_FOR: Duration = Duration::from_secs(30);

/// A JobService client that follows the leading replica among a list of
/// coordinator addresses and retries calls across a leader change.
pub struct Client {
    addrs: Vec<String>,
    leader: String,
    credentials: Credentials,
    inner: JobServiceClient<AuthChannel>,
}

pub fn retryable(s: &tonic::Status) -> bool {
    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled)
}

/// Calls `method` with `req` on the leader through [`Client::call`].
#[macro_export]
macro_rules! rpc {
    ($client:expr, $method:ident, $req:expr) => {{
        let req = $req;
        $client
            .call(move |mut c| {
                let req = req.clone();
                async move { c.$method(req).await }
            })
            .await
    }};
}

/// Connects to the leader among `list` (comma-separated addresses), with
/// this process's credentials (`--token-file`, `FLOTILLA_TOKEN`).
pub async fn connect(list: &str) -> anyhow::Result<Client> {
    connect_with(list, Credentials::current()).await
}

/// Connects to the leader among `list` with `credentials`.
pub async fn connect_with(list: &str, credentials: Credentials) -> anyhow::Result<Client> {
    let addrs = leader::parse_addrs(list);
    anyhow::ensure!(!addrs.is_empty(), "no coordinator address given (--coordinator or FLOTILLA_COORDINATOR)");
    let (leader, channel) = find(&addrs, None).await?;
    let inner = JobServiceClient::new(credentials.wrap(channel));
    Ok(Client { addrs, leader, credentials, inner })
}

/// The leading replica among `addrs` and a channel to it, waiting up to
/// [`RETRY_FOR`] while an election runs (a replica just started knows no
/// leader yet).
pub(crate) async fn find(addrs: &[String], hint: Option<&str>) -> anyhow::Result<(String, tonic::transport::Channel)> {
    let deadline = Instant::now() + RETRY_FOR;
    let mut hint = hint.map(str::to_string);
    loop {
        match leader::find_leader(addrs, hint.take().as_deref()).await {
            Ok(found) => return Ok(found),
            Err(e) if Instant::now() >= deadline => anyhow::bail!("no leading coordinator among {addrs:?}: {e}"),
            Err(e) => tracing::debug!(error = %e, "no leading coordinator yet"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Client {
    /// The address of the replica this client talks to.
    pub fn leader(&self) -> &str {
        &self.leader
    }

    /// Finds the leader again, starting where `status` points.
    async fn reconnect(&mut self, status: &tonic::Status) -> anyhow::Result<()> {
        let hint = leader::leader_hint(status);
        let (addr, channel) = find(&self.addrs, hint.as_deref()).await?;
        if addr != self.leader {
            tracing::info!(from = %self.leader, to = %addr, "following the new coordinator leader");
        }
        self.leader = addr;
        self.inner = JobServiceClient::new(self.credentials.wrap(channel));
        Ok(())
    }

    /// Runs `f` against the leader; on a refusal or a lost connection, finds
    /// the leader again and retries, for up to [`RETRY_FOR`].
    pub async fn call<T, F, Fut>(&mut self, mut f: F) -> Result<T, tonic::Status>
    where
        F: FnMut(JobServiceClient<AuthChannel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = Instant::now() + RETRY_FOR;
        loop {
            match f(self.inner.clone()).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if retryable(&s) && Instant::now() < deadline => {
                    if let Err(e) = self.reconnect(&s).await {
                        return Err(tonic::Status::unavailable(format!("{}; {e:#}", s.message())));
                    }
                }
                Err(s) => return Err(s),
            }
        }
    }
}

/// Submits a job file's text; relative paths in it resolve against the
/// current directory. Retries across a leader change never create the job
/// twice: every attempt carries the same submission id.
pub async fn submit(client: &mut Client, path: &Path, text: String) -> Result<String, tonic::Status> {
    submit_as(client, path, text, submission_id()).await
}

/// [`submit`] with a submission id chosen by the caller: every call with the
/// same id, from any process, returns the one job the first created.
pub async fn submit_as(client: &mut Client, path: &Path, text: String, id: String) -> Result<String, tonic::Status> {
    let base = std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_else(|_| "/".into());
    let req =
        pb::SubmitJobRequest { spec_yaml: text, origin: path.display().to_string(), base_dir: base, submission_id: id };
    Ok(crate::rpc!(client, submit_job, req)?.job_id)
}

/// A fresh id for one submission: 128 random bits, hex.
fn submission_id() -> String {
    flotilla_coordinator::random_id()
}

pub fn phase_name(phase: i32) -> &'static str {
    flotilla_coordinator::http::json::phase(phase)
}

pub fn is_terminal(phase: i32) -> bool {
    matches!(
        pb::JobPhase::try_from(phase),
        Ok(pb::JobPhase::Succeeded | pb::JobPhase::Failed | pb::JobPhase::Cancelled)
    )
}

/// Where a follower stops: the job ended, or its model is trained but the
/// registry hand-off failed (the coordinator keeps retrying it).
pub fn is_settled(phase: i32) -> bool {
    is_terminal(phase) || phase == pb::JobPhase::TrainedNotRegistered as i32
}

/// One line about the registry hand-off, if the job has a registry.
pub fn registration_line(j: &pb::JobStatus) -> Option<String> {
    let r = j.registration.as_ref()?;
    Some(if r.version > 0 {
        format!("{} version {} in {} ({})", r.model, r.version, r.registry, r.uri)
    } else if r.attempts > 0 {
        format!("not registered in {} after {} attempts: {}", r.registry, r.attempts, r.last_error)
    } else {
        format!("{} in {}: pending", r.model, r.registry)
    })
}

/// Follows a job until it ends, with a progress bar on a terminal or a line
/// every tenth of the run otherwise. Returns the final status.
pub async fn follow(client: &mut Client, job: &str) -> anyhow::Result<pb::JobStatus> {
    let watch = |mut c: JobServiceClient<AuthChannel>| {
        let req = pb::WatchJobRequest { job_id: job.to_string() };
        async move { c.watch_job(req).await }
    };
    let mut stream = client.call(watch).await.map_err(|s| anyhow::anyhow!("watch the job: {}", s.message()))?;
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
    loop {
        let status = match stream.message().await {
            Ok(Some(status)) => status,
            Ok(None) => break,
            Err(s) if retryable(&s) => {
                // The leader changed or went away: watch again on the new one.
                stream = client.call(watch).await.map_err(|s| anyhow::anyhow!("follow the job: {}", s.message()))?;
                continue;
            }
            Err(s) => anyhow::bail!("follow the job: {}", s.message()),
        };
        bar.set_length(status.total_steps);
        bar.set_position(status.step);
        let eval = super::status::eval_text(&status).map(|e| format!("  eval{e}")).unwrap_or_default();
        bar.set_message(format!(
            "loss {:.4}  {:.0} samples/s  {} workers{eval}",
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
                "{job}: step {}/{}  loss {:.4}  {:.0} samples/s  {} workers  {:.1}s{eval}",
                status.step,
                status.total_steps,
                status.loss,
                status.samples_per_sec,
                status.world_size,
                started.elapsed().as_secs_f64()
            );
            last_line_step = status.step;
        }
        let done = is_settled(status.phase);
        last = Some(status);
        if done {
            break;
        }
    }
    bar.finish_and_clear();
    last.ok_or_else(|| anyhow::anyhow!("the coordinator closed the watch before the job ended"))
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
            if let Some(e) = super::status::eval_text(s) {
                println!("  eval:{e}");
            }
            println!("  checkpoints: {}", s.output_dir);
            for c in &s.checkpoints {
                println!(
                    "    step {:>8}  {}  (blocked {:.1} ms, saved in {:.1} ms)",
                    c.step, c.location, c.blocked_ms, c.total_ms
                );
            }
            println!("  final model: {}", s.final_model);
            println!("  metrics:     {}/metrics.jsonl", s.output_dir);
            if let Some(line) = registration_line(s) {
                println!("  registered:  {line}");
            }
        }
        Ok(pb::JobPhase::TrainedNotRegistered) => {
            println!("job {} trained, not registered: {}", s.job_id, s.message);
            println!("  final model: {}", s.final_model);
            println!("  the coordinator retries the hand-off; `flotilla register {}` retries it now", s.job_id);
        }
        _ => {
            println!("job {} {}: {}", s.job_id, phase_name(s.phase), s.message);
        }
    }
}

/// Writes the job's per-step metrics to `<output>/metrics.jsonl`.
pub async fn save_metrics(client: &mut Client, job: &str, output: &str) -> anyhow::Result<String> {
    let req = pb::GetMetricsRequest { job_id: job.to_string() };
    let points = crate::rpc!(client, get_metrics, req)?.points;
    let records: Vec<_> = points.iter().map(flotilla_coordinator::convert::metric_record).collect();
    let text = flotilla_registry::record::to_jsonl(&records);
    let out = flotilla_trainer::storage::Storage::open(output)?;
    out.put("metrics.jsonl", text.into_bytes()).await.map_err(|e| anyhow::anyhow!("write metrics.jsonl: {e}"))?;
    Ok(format!("{output}/metrics.jsonl"))
}
