//! Recovery after `kill -9` of one of two workers, flotilla against torchrun
//! (`--max-restarts`, c10d rendezvous) measured in the same run: the time
//! from the kill to the first training step completed after it, and the
//! steps redone (the last step completed before the kill minus the step the
//! job resumed from). Both sides train the same GPT on the same tokens with
//! a checkpoint every `EVERY` steps and are killed `PAST` steps after one.
//!
//! flotilla runs a coordinator with its default settings and two workers on
//! a job with `workers: {min: 1, max: 2}`; it is measured with the survivor
//! going on alone and with a replacement worker started right after the
//! kill. Step times come from the coordinator's metric points (`time_ms`,
//! stamped by the worker when the step finished). torchrun runs
//! `benches/recovery_baseline.py` (DDP on gloo, `torch.save` of model,
//! optimizer and step) with two processes; the bench kills rank 1 and reads
//! the steps rank 0 logs with their wall-clock times.
//!
//! `cargo bench --bench recovery` prints the medians of `ROUNDS` runs of each
//! and the ratio; it needs `.deps/venv` (`./scripts/bootstrap --python`).
//! Under `cargo test` it kills a worker of a tiny flotilla job once, without
//! Python, and checks that the job recovered.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flotilla::jobspec::GptSpec;
use flotilla::proto::v1 as pb;
use support::*;

/// Runs of each system; medians are reported.
const ROUNDS: usize = 3;

struct Setup {
    gpt: GptSpec,
    global_batch: usize,
    micro_batch: usize,
    /// Checkpoint period, in steps.
    every: u64,
    /// The kill comes once the job is this many steps past its first checkpoint.
    past: u64,
}

impl Setup {
    fn kill_at(&self) -> u64 {
        self.every + self.past
    }
}

/// One kill and what followed.
#[derive(Debug, Clone, Copy)]
struct Trial {
    /// From the kill to the first step completed after it.
    recovery_s: f64,
    /// Of which: from the kill to the new generation (flotilla only).
    detect_s: Option<f64>,
    steps_redone: u64,
    /// Restarts it took (torchrun's restart count, flotilla's generations).
    restarts: u64,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn flotilla_trial(dir: &Path, s: &Setup, replacement: bool) -> Trial {
    let g = &s.gpt;
    let (_coord, url) = coordinator_with(dir, &[]);
    let _a = worker(dir, &url, "worker-a");
    let mut b = worker(dir, &url, "worker-b");
    let yaml = format!(
        "name: recovery\n\
         model: {{kind: gpt, layers: {}, d_model: {}, heads: {}, context: {}, vocab: {}}}\n\
         data: {{kind: tokens, path: tokens.u16, dtype: u16}}\n\
         train: {{steps: 100000, global_batch: {}, micro_batch: {}, seed: 1, grad_clip: 1.0}}\n\
         workers: {{min: 1, max: 2}}\n\
         checkpoint: {{url: runs, every: {}, keep: 2}}\n",
        g.layers, g.d_model, g.heads, g.context, g.vocab, s.global_batch, s.micro_batch, s.every
    );
    let job = job_file(dir, "recovery", &yaml);
    let out = flotilla(dir, &["submit", job.to_str().unwrap(), "--coordinator", &url]);
    assert!(out.status.success(), "submit: {}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    runtime().block_on(async {
        let mut c = client(&url).await;
        let before = wait_for(&mut c, &id, Duration::from_secs(300), |st| {
            st.latest_checkpoint.as_ref().is_some_and(|k| k.step >= s.every) && st.step >= s.kill_at()
        })
        .await;
        assert_eq!(before.world_size, 2, "{before:#?}");
        let killed_gen = before.generation;
        let kill_ms = now_ms();
        b.kill9();
        let _c = replacement.then(|| worker(dir, &url, "worker-c"));
        let deadline = Instant::now() + Duration::from_secs(300);
        let (points, first) = loop {
            let req = pb::GetMetricsRequest { job_id: id.clone() };
            let points = c.get_metrics(req).await.unwrap().into_inner().points;
            if let Some(p) = points.iter().find(|p| p.generation > killed_gen).cloned() {
                break (points, p);
            }
            assert!(Instant::now() < deadline, "no step after the kill; see the logs in {}", dir.display());
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let last = points.iter().filter(|p| p.time_ms <= kill_ms).map(|p| p.step).max().unwrap_or(0);
        let status = c.get_job(pb::GetJobRequest { job_id: id.clone() }).await.unwrap().into_inner();
        let detected = status.generations.iter().find(|r| r.generation > killed_gen).map(|r| r.at_unix_ms);
        Trial {
            recovery_s: (first.time_ms - kill_ms) as f64 / 1e3,
            detect_s: detected.map(|t| (t - kill_ms) as f64 / 1e3),
            steps_redone: last.saturating_sub(first.step - 1),
            restarts: first.generation - killed_gen,
        }
    })
}

/// One line of what the baseline's rank 0 logs.
struct Logged {
    step: u64,
    time_ms: i64,
    restart: u64,
    resumed_from: u64,
}

fn read_logged(path: &Path) -> Vec<Logged> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| Logged {
            step: v["step"].as_u64().unwrap(),
            time_ms: v["time_ms"].as_i64().unwrap(),
            restart: v["restart"].as_u64().unwrap(),
            resumed_from: v["resumed_from"].as_u64().unwrap(),
        })
        .collect()
}

fn torchrun_trial(dir: &Path, s: &Setup, tokens: &Path) -> Trial {
    use std::os::unix::process::CommandExt;
    let g = &s.gpt;
    let out = dir.join("torchrun");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let arg = |v: usize| v.to_string();
    let mut run = Command::new(repo().join(".deps/venv/bin/torchrun"))
        .args(["--nnodes=1", "--nproc-per-node=2", "--max-restarts=3", "--rdzv-backend=c10d"])
        .arg(format!("--rdzv-endpoint=127.0.0.1:{port}"))
        .arg(repo().join("benches/recovery_baseline.py"))
        .args(["--out", out.to_str().unwrap(), "--tokens", tokens.to_str().unwrap(), "--steps", "100000"])
        .args(["--every", &s.every.to_string(), "--layers", &arg(g.layers), "--d-model", &arg(g.d_model)])
        .args(["--heads", &arg(g.heads), "--context", &arg(g.context), "--vocab", &arg(g.vocab)])
        .args(["--global-batch", &arg(s.global_batch), "--micro-batch", &arg(s.micro_batch)])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("torchrun.log")).unwrap())
        .process_group(0)
        .spawn()
        .expect("start torchrun");
    let log = out.join("steps.jsonl");
    let deadline = Instant::now() + Duration::from_secs(300);
    while read_logged(&log).last().is_none_or(|l| l.step < s.kill_at()) {
        assert!(Instant::now() < deadline && run.try_wait().unwrap().is_none(), "torchrun did not reach the kill");
        std::thread::sleep(Duration::from_millis(20));
    }
    let victim: i32 = std::fs::read_to_string(out.join("pid-1")).unwrap().trim().parse().unwrap();
    let kill_ms = now_ms();
    // SAFETY: a plain kill(2) of a process this bench started.
    assert_eq!(unsafe { libc::kill(victim, libc::SIGKILL) }, 0, "kill rank 1");
    let first = loop {
        if let Some(l) = read_logged(&log).into_iter().find(|l| l.restart > 0) {
            break l;
        }
        assert!(Instant::now() < deadline && run.try_wait().unwrap().is_none(), "torchrun did not recover");
        std::thread::sleep(Duration::from_millis(20));
    };
    let last = read_logged(&log).iter().filter(|l| l.time_ms <= kill_ms).map(|l| l.step).max().unwrap_or(0);
    stop_torchrun(&mut run, &out);
    Trial {
        recovery_s: (first.time_ms - kill_ms) as f64 / 1e3,
        detect_s: None,
        steps_redone: last.saturating_sub(first.resumed_from),
        restarts: first.restart,
    }
}

/// Ends torchrun: SIGTERM lets its agent stop the workers; what is left
/// after a while (the workers run in sessions of their own) is killed.
fn stop_torchrun(run: &mut std::process::Child, out: &Path) {
    let pgid = run.id() as i32;
    // SAFETY: plain kill(2) calls on processes this bench started.
    unsafe { libc::kill(-pgid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    while run.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let _ = run.wait();
    for rank in 0..2 {
        let Some(pid) =
            std::fs::read_to_string(out.join(format!("pid-{rank}"))).ok().and_then(|p| p.trim().parse().ok())
        else {
            continue;
        };
        let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("recovery_baseline.py"));
        if ours && alive(pid) {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Medians of recovery, steps redone, restarts and (flotilla) detection.
fn summary(trials: &[Trial]) -> (f64, f64, f64, Option<f64>) {
    let detect: Vec<f64> = trials.iter().filter_map(|t| t.detect_s).collect();
    (
        median(trials.iter().map(|t| t.recovery_s).collect()),
        median(trials.iter().map(|t| t.steps_redone as f64).collect()),
        median(trials.iter().map(|t| t.restarts as f64).collect()),
        (!detect.is_empty()).then(|| median(detect)),
    )
}

fn smoke() {
    let s = Setup {
        gpt: GptSpec { layers: 1, d_model: 32, heads: 2, context: 16, vocab: 32 },
        global_batch: 8,
        micro_batch: 8,
        every: 5,
        past: 3,
    };
    let dir = tempfile::tempdir().unwrap();
    write_tokens(&dir.path().join("tokens.u16"), &s.gpt, 2, 512);
    let t = flotilla_trial(dir.path(), &s, false);
    assert!(t.recovery_s > 0.0 && t.recovery_s.is_finite(), "{t:?}");
    assert!(t.steps_redone <= 2 * s.every, "resumed from a checkpoint at most two periods back: {t:?}");
    println!(
        "recovery smoke: flotilla tiny gpt recovered in {:.2} s, {} steps redone (run with --bench for torchrun)",
        t.recovery_s, t.steps_redone
    );
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        smoke();
        return;
    }
    let s = Setup {
        gpt: GptSpec { layers: 4, d_model: 128, heads: 4, context: 64, vocab: 256 },
        global_batch: 32,
        micro_batch: 16,
        every: 20,
        past: 10,
    };
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.u16");
    write_tokens(&tokens, &s.gpt, 2, 2048);
    let py = repo().join(".deps/venv/bin/torchrun");
    assert!(py.exists(), "{} is missing: run ./scripts/bootstrap --python", py.display());
    let (mut alone, mut replaced, mut torch) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        for (name, list, replacement) in [("alone", &mut alone, false), ("replaced", &mut replaced, true)] {
            let d = tempfile::tempdir_in(dir.path()).unwrap();
            std::fs::copy(&tokens, d.path().join("tokens.u16")).unwrap();
            let t = flotilla_trial(d.path(), &s, replacement);
            eprintln!("round {round} flotilla {name}: {t:?}");
            list.push(t);
        }
        let d = tempfile::tempdir_in(dir.path()).unwrap();
        let t = torchrun_trial(d.path(), &s, &tokens);
        eprintln!("round {round} torchrun: {t:?}");
        torch.push(t);
    }
    let base = summary(&torch);
    println!(
        "recovery after kill -9 of 1 of 2 workers: GPT {}x{} (context {}, vocab {}), checkpoint every {} steps, \
         killed {} steps past one; median of {ROUNDS} runs",
        s.gpt.layers, s.gpt.d_model, s.gpt.context, s.gpt.vocab, s.every, s.past
    );
    println!(
        "{:<34} {:>14} {:>12} {:>12} {:>9} {:>12}",
        "system", "recovery (s)", "detect (s)", "steps redone", "restarts", "vs torchrun"
    );
    for (name, trials) in [
        ("flotilla, survivor alone", &alone),
        ("flotilla, replacement at once", &replaced),
        ("torchrun (c10d, max-restarts 3)", &torch),
    ] {
        let (rec, redone, restarts, detect) = summary(trials);
        let detect = detect.map_or("-".to_string(), |d| format!("{d:.2}"));
        println!("{name:<34} {rec:>14.2} {detect:>12} {redone:>12.0} {restarts:>9.0} {:>12.2}", rec / base.0);
    }
}
