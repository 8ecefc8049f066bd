//! The GPU fallback's path on CPUs: CUDA tensors over the TCP backend go
//! through host copies of themselves (pinned on a GPU machine), filled
//! before a collective and copied back after it. `FLOTILLA_STAGE_COLLECTIVES=1`
//! makes every collective take that path; a job run that way ends with the
//! same weights, bit for bit, as without it, under ZeRO-3 with a pipeline
//! (reductions, scatters, gathers, sends and receives all staged). And a
//! worker without a GPU: refusing `train.device: cuda` with its reason,
//! computing `auto` jobs on its CPU and saying so.

mod support;

use support::*;

const JOB: &str = "
name: staged
model: {kind: gpt, layers: 2, d_model: 16, heads: 2, context: 12, vocab: 24}
data: {kind: synthetic, seed: 5, samples: 300}
train:
  steps: 12
  global_batch: 12
  seed: 2
  optimizer: {lr: 0.003}
  grad_clip: 1.0
workers: {min: 4, max: 4}
parallelism: {pp: 2, dp: 2, zero: 3, micro_batches: 2}
";

/// The final model's bytes and the step losses of a run of [`JOB`].
fn run(staged: bool) -> (Vec<u8>, Vec<f64>) {
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(dir.path(), "job", JOB);
    let mut c = cmd();
    c.args(["run", job.to_str().unwrap()]).current_dir(dir.path());
    if staged {
        c.env("FLOTILLA_STAGE_COLLECTIVES", "1");
    } else {
        c.env_remove("FLOTILLA_STAGE_COLLECTIVES");
    }
    let out = c.output().expect("run flotilla");
    assert!(out.status.success(), "staged={staged}: {}", String::from_utf8_lossy(&out.stderr));
    let final_dir = dir.path().join("runs/staged-1/final");
    let losses = read_metrics(&final_dir.join("metrics.jsonl")).iter().map(|m| m.1).collect();
    // Every worker says once that it staged (and only then).
    let logs: Vec<String> = std::fs::read_dir(dir.path().join("runs/staged-1/logs"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(logs.len(), 4, "a log per worker");
    for log in &logs {
        assert_eq!(log.contains("collectives staged through host copies"), staged, "staged={staged}: {log}");
    }
    (std::fs::read(final_dir.join("model.safetensors")).unwrap(), losses)
}

#[test]
fn staged_collectives_train_the_same_weights_bit_for_bit() {
    let (direct, direct_losses) = run(false);
    let (staged, staged_losses) = run(true);
    assert_eq!(direct_losses.len(), 12);
    assert_eq!(staged_losses, direct_losses, "the same loss at every step");
    assert!(staged == direct, "the final weights differ ({} and {} bytes)", staged.len(), direct.len());
}

#[test]
fn a_cuda_job_on_a_machine_without_gpus_is_refused_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(dir.path(), "job", &JOB.replace("  grad_clip: 1.0\n", "  grad_clip: 1.0\n  device: cuda\n"));
    let out = flotilla(dir.path(), &["run", job.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("train.device: cuda") && err.contains("no GPU"), "{err}");
    assert!(!dir.path().join("runs").exists(), "nothing ran");
}

/// A worker without a GPU: it says so when it registers, fails the rank of
/// a job that insists on CUDA (naming why), and computes `auto` jobs on its
/// CPU, which its ranks report and `flotilla status` shows.
#[test]
fn a_worker_without_a_gpu_refuses_cuda_jobs_and_runs_auto_ones_on_its_cpu() {
    use std::time::Duration;

    use flotilla::proto::v1 as pb;

    let dir = tempfile::tempdir().unwrap();
    let (_coord, url) = coordinator(dir.path());
    let log = dir.path().join("worker.log");
    let child = cmd()
        .args(["worker", "--coordinator", &url, "--data-addr", "127.0.0.1:0"])
        .env_remove("LOCAL_RANK")
        .env_remove("SLURM_LOCALID")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start worker");
    let _worker = Proc { child, log };
    let short = |name: &str, device: &str| {
        job_file(
            dir.path(),
            name,
            &format!(
                "name: {name}\nmodel: {{kind: mlp, layers: [4, 8, 2]}}\ndata: {{kind: synthetic, seed: 1, samples: 64}}\n\
                 train: {{steps: 1000000, global_batch: 8, seed: 1, device: {device}}}\nworkers: {{min: 1, max: 1}}\n"
            ),
        )
    };
    let submit = |job: &std::path::Path| {
        let out = flotilla(dir.path(), &["submit", job.to_str().unwrap(), "--coordinator", &url]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let cuda = submit(&short("on-cuda", "cuda"));
    runtime().block_on(async {
        let mut c = client(&url).await;
        let refused = wait_for(&mut c, &cuda, Duration::from_secs(120), |s| {
            s.generations.iter().any(|g| g.reason.contains("train.device: cuda"))
        })
        .await;
        let reason = refused.generations.iter().map(|g| g.reason.as_str()).find(|r| r.contains("train.device"));
        assert!(reason.unwrap().contains("no GPU"), "{refused:#?}");
        let _ = c.cancel_job(pb::CancelJobRequest { job_id: cuda.clone() }).await;

        // A long job, watched while it runs.
        let auto = submit(&short("on-auto", "auto"));
        let running = wait_for(&mut c, &auto, Duration::from_secs(180), |s| {
            s.ranks.first().is_some_and(|r| r.memory.as_ref().is_some_and(|m| !m.device.is_empty()))
        })
        .await;
        let rank = &running.ranks[0];
        assert_eq!(rank.device, "cpu", "the worker registered as a CPU worker: {rank:?}");
        let memory = rank.memory.as_ref().unwrap();
        assert_eq!((memory.device.as_str(), memory.device_used_bytes, memory.device_peak_bytes), ("cpu", 0, 0));
        let shown = flotilla(dir.path(), &["status", &auto, "--coordinator", &url]);
        let text = String::from_utf8_lossy(&shown.stdout).into_owned();
        let header = text.lines().find(|l| l.contains("DEVICE")).unwrap_or_else(|| panic!("{text}"));
        let row = text.lines().skip_while(|l| !l.contains("DEVICE")).nth(1).unwrap();
        // Left-aligned under its header.
        let at = header.find("DEVICE").unwrap();
        assert_eq!(row.get(at..).and_then(|r| r.split_whitespace().next()), Some("cpu"), "{text}");
        let _ = c.cancel_job(pb::CancelJobRequest { job_id: auto.clone() }).await;
    });
}
