//! `flotilla sweep SWEEP.yaml`: checks the sweep file and every trial here
//! (exit 2 on a bad one), submits it, and with `--wait` follows it to the
//! end; and the leaderboard that `flotilla status SWEEP` prints.

use std::path::Path;
use std::time::Duration;

use flotilla_proto::v1 as pb;

use super::client::Client;
use super::EXIT_BAD_INPUT;

/// Whether `id` names a sweep (`NAME-sN`) rather than a job (`NAME-N`).
pub fn is_sweep_id(id: &str) -> bool {
    id.rsplit_once('-').is_some_and(|(_, seq)| {
        seq.strip_prefix('s').is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// The sweep file's request: its text, its base job's text and names; or
/// the exit code after printing why not.
pub fn load(path: &Path, submission_id: String) -> Result<pb::SubmitSweepRequest, i32> {
    let bad = |msg: String| {
        eprintln!("error: {msg}");
        EXIT_BAD_INPUT
    };
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read sweep file {origin}: {e}")))?;
    let spec = flotilla_jobspec::sweep::parse_sweep(&text, &origin).map_err(|e| bad(e.to_string()))?;
    let job_path = path.parent().unwrap_or(Path::new("")).join(&spec.job);
    let job_origin = job_path.display().to_string();
    let job_text = std::fs::read_to_string(&job_path)
        .map_err(|e| bad(format!("cannot read the base job file {job_origin}: {e}")))?;
    let read = flotilla_jobspec::files_under(job_path.parent().unwrap_or(Path::new("")).to_path_buf());
    flotilla_jobspec::sweep::trials(&spec, &job_text, &job_origin, &read).map_err(|e| bad(e.to_string()))?;
    let cwd = std::env::current_dir().map_err(|e| bad(format!("no working directory: {e}")))?;
    // The coordinator reads the files the job names relative to its path.
    let job_origin = cwd.join(&job_path).display().to_string();
    Ok(pb::SubmitSweepRequest {
        sweep_yaml: text,
        sweep_origin: origin,
        job_yaml: job_text,
        job_origin,
        base_dir: cwd.display().to_string(),
        submission_id,
    })
}

/// `flotilla sweep`: submit, print the id, and with `wait` follow it and
/// print the leaderboard; exit 1 when it was cancelled or no trial succeeded.
pub async fn submit(c: &mut Client, req: pb::SubmitSweepRequest, wait: bool) -> anyhow::Result<i32> {
    let id = match crate::rpc!(c, submit_sweep, req) {
        Ok(r) => r.sweep_id,
        Err(s) => {
            eprintln!("error: {}", s.message());
            return Ok(if s.code() == tonic::Code::InvalidArgument { EXIT_BAD_INPUT } else { 1 });
        }
    };
    println!("{id}");
    if !wait {
        return Ok(0);
    }
    loop {
        let s = crate::rpc!(c, get_sweep, pb::GetSweepRequest { sweep_id: id.clone() })?;
        if s.state != "running" {
            print_leaderboard(&s);
            let ok = s.state == "done" && s.trials.iter().any(|t| t.state == "succeeded");
            return Ok(if ok { 0 } else { 1 });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The sweep and its trials, best first.
pub fn print_leaderboard(s: &pb::SweepStatus) {
    println!(
        "sweep {} ({}): {} {} by {}, at most {} at a time",
        s.sweep_id, s.name, s.state, s.goal, s.metric, s.max_parallel
    );
    println!("{:>4}  {:>5}  {:<12} {:<10} {:>12} {:>6}  params", "rank", "trial", "job", "state", s.metric, "step");
    for t in &s.trials {
        let rank = if t.rank == 0 { "-".to_string() } else { t.rank.to_string() };
        let metric = t.metric.map_or("-".to_string(), |m| format!("{m:.5}"));
        let params: Vec<String> = t.params.iter().map(|p| format!("{}={}", p.path, p.value)).collect();
        let job = if t.job_id.is_empty() { "-" } else { &t.job_id };
        println!(
            "{rank:>4}  {:>5}  {job:<12} {:<10} {metric:>12} {:>6}  {}",
            t.trial,
            t.state,
            t.step,
            params.join(" ")
        );
    }
}

/// `flotilla status SWEEP`.
pub async fn status(c: &mut Client, id: &str, json: bool) -> anyhow::Result<i32> {
    match crate::rpc!(c, get_sweep, pb::GetSweepRequest { sweep_id: id.to_string() }) {
        Ok(s) if json => println!("{:#}", flotilla_coordinator::http::json::sweep(&s)),
        Ok(s) => print_leaderboard(&s),
        Err(s) => {
            eprintln!("error: {}", s.message());
            return Ok(1);
        }
    }
    Ok(0)
}

/// `flotilla cancel SWEEP`.
pub async fn cancel(c: &mut Client, id: &str) -> anyhow::Result<i32> {
    match crate::rpc!(c, cancel_sweep, pb::GetSweepRequest { sweep_id: id.to_string() }) {
        Ok(s) => {
            println!("{} {}", s.sweep_id, s.state);
            Ok(0)
        }
        Err(s) => {
            eprintln!("error: {}", s.message());
            Ok(1)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sweep_ids_and_job_ids_never_look_alike() {
        assert!(super::is_sweep_id("lr-s3"));
        assert!(super::is_sweep_id("my-sweep-s12"));
        assert!(!super::is_sweep_id("lr-3"));
        assert!(!super::is_sweep_id("lr-s"));
        assert!(!super::is_sweep_id("lrs3"));
    }
}
