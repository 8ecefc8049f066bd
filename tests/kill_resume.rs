//! `kill -9` of a worker mid-run while a replacement starts: the job resumes
//! from its last committed checkpoint and ends with the same parameters as
//! an uninterrupted run. And without a replacement, under a lease far longer
//! than the test: the survivor's report and the closed connection remove the
//! killed worker at once.

mod support;

use std::time::Duration;

use flotilla::proto::v1 as pb;
use support::*;

const JOB: &str = "
name: resume
model: {kind: gpt, layers: 2, d_model: 64, heads: 4, context: 64, vocab: 64}
data: {kind: synthetic, seed: 4, samples: 4096}
train:
  steps: 300
  global_batch: 32
  micro_batch: 16
  seed: 3
  optimizer: {lr: 0.002}
  schedule: {warmup_steps: 10}
  grad_clip: 1.0
workers: {min: 2, max: 2}
checkpoint: {url: runs, every: 20, keep: 3}
";

#[test]
fn a_killed_worker_is_replaced_and_the_job_resumes_exactly() {
    let rt = runtime();
    // The uninterrupted reference.
    let reference = tempfile::tempdir().unwrap();
    let job = job_file(reference.path(), "job", JOB);
    let out = flotilla(reference.path(), &["run", job.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let expected = read_tensors(&reference.path().join("runs/resume-1/final/model.safetensors"));

    let dir = tempfile::tempdir().unwrap();
    let (_coord, url) = coordinator(dir.path());
    let mut a = worker(dir.path(), &url, "worker-a");
    let _b = worker(dir.path(), &url, "worker-b");
    let job = job_file(dir.path(), "job", JOB);
    let out = flotilla(dir.path(), &["submit", job.to_str().unwrap(), "--coordinator", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(id, "resume-1");

    rt.block_on(async {
        let mut c = client(&url).await;
        // Past a committed checkpoint, well before the end.
        let s = wait_for(&mut c, &id, Duration::from_secs(60), |s| {
            s.latest_checkpoint.as_ref().is_some_and(|c| c.step >= 40) && s.step >= 45
        })
        .await;
        assert!(s.step < 300, "the job finished before the kill; make it longer");
        assert_eq!(s.world_size, 2);
        a.kill9();
        let _c = worker(dir.path(), &url, "worker-c");
        let done = wait_for(&mut c, &id, Duration::from_secs(120), |s| {
            is_phase(s, pb::JobPhase::Succeeded) || is_phase(s, pb::JobPhase::Failed)
        })
        .await;
        assert!(is_phase(&done, pb::JobPhase::Succeeded), "{done:#?}");
        let resumed = done.generations.iter().skip(1).find(|g| g.world_size == 2).expect("a later 2-worker generation");
        assert!(resumed.resumed_from_step >= 40, "resumed from {}: {done:#?}", resumed.resumed_from_step);
        assert!(done.generations.iter().any(|g| g.reason.contains("removed")), "{done:#?}");
        let metrics = c.get_metrics(pb::GetMetricsRequest { job_id: id.clone() }).await.unwrap().into_inner().points;
        assert!(metrics.iter().any(|p| p.generation > 1), "steps ran after the kill");
    });

    let got = read_tensors(&dir.path().join("runs/resume-1/final/model.safetensors"));
    assert_params_close(&got, &expected, 1e-5);
    // The history beside the final model is the weights' own: every step
    // once, those before the resume from the checkpoint it came from, the
    // redone ones from the new generation; and its losses are the
    // uninterrupted run's.
    let history: Vec<serde_json::Value> = std::fs::read_to_string(dir.path().join("runs/resume-1/final/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<u64> = history.iter().map(|h| h["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=steps.len() as u64).collect::<Vec<_>>());
    assert!(history.first().unwrap()["generation"] == 1 && history.last().unwrap()["generation"].as_u64() > Some(1));
    let uninterrupted = read_metrics(&reference.path().join("runs/resume-1/final/metrics.jsonl"));
    assert_eq!(uninterrupted.len(), history.len());
    for (r, h) in uninterrupted.iter().zip(&history) {
        let loss = h["loss"].as_f64().unwrap();
        assert!((r.1 - loss).abs() <= 1e-4 * r.1.abs().max(1e-6), "step {}: {} vs {loss}", r.0, r.1);
    }
}

#[test]
fn a_killed_worker_is_removed_without_waiting_for_its_lease() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    // A lease longer than the bound below: only the fast path can explain
    // a recovery within it.
    let (_coord, url) = coordinator_with(dir.path(), &["--lease-ms", "120000", "--start-grace-ms", "300"]);
    let _a = worker(dir.path(), &url, "worker-a");
    let mut b = worker(dir.path(), &url, "worker-b");
    let job = job_file(dir.path(), "job", &JOB.replace("workers: {min: 2, max: 2}", "workers: {min: 1, max: 2}"));
    let out = flotilla(dir.path(), &["submit", job.to_str().unwrap(), "--coordinator", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();

    rt.block_on(async {
        let mut c = client(&url).await;
        let s = wait_for(&mut c, &id, Duration::from_secs(60), |s| {
            s.latest_checkpoint.as_ref().is_some_and(|c| c.step >= 20) && s.step >= 25 && s.world_size == 2
        })
        .await;
        let killed_gen = s.generation;
        b.kill9();
        // Generous: recovery takes about a second; the lease is two minutes.
        let resumed = wait_for(&mut c, &id, Duration::from_secs(60), |s| {
            s.generation > killed_gen && is_phase(s, pb::JobPhase::Running) && s.samples_per_sec > 0.0
        })
        .await;
        assert_eq!(resumed.world_size, 1, "{resumed:#?}");
        let next = resumed.generations.iter().find(|g| g.generation == killed_gen + 1).expect("the next generation");
        assert!(next.reason.contains("connection closed"), "{resumed:#?}");
        assert!(next.resumed_from_step >= 20, "{resumed:#?}");
    });
}
