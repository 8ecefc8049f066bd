//! Sweeps against real processes, TLS and tokens on: three coordinator
//! replicas and three workers run a grid sweep of four trials, at most two
//! at a time; the leading replica is `kill -9`ed mid-sweep, and the new
//! leader neither loses a trial nor runs one twice. And a bad sweep file is
//! refused before anything is submitted (exit 2, field and line).

mod support;

use std::time::{Duration, Instant};

use flotilla::proto::v1 as pb;
use support::cluster::*;
use support::*;

/// The base job and the grid (shared with python/tests).
const JOB: &str = include_str!("fixtures/sweep/job.yaml");
const SWEEP: &str = include_str!("fixtures/sweep/grid.yaml");

/// The sweep from whichever replica leads.
async fn sweep(addrs: &[String], id: &str) -> pb::SweepStatus {
    loop {
        let (_, mut c) = leader_client(addrs).await;
        if let Ok(s) = c.get_sweep(pb::GetSweepRequest { sweep_id: id.into() }).await {
            return s.into_inner();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every job, from the leader.
async fn jobs(addrs: &[String]) -> Vec<pb::JobStatus> {
    loop {
        let (_, mut c) = leader_client(addrs).await;
        if let Ok(r) = c.list_jobs(pb::ListJobsRequest {}).await {
            return r.into_inner().jobs;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn active(jobs: &[pb::JobStatus]) -> usize {
    let active = [pb::JobPhase::Pending, pb::JobPhase::Running, pb::JobPhase::Waiting];
    jobs.iter().filter(|j| active.iter().any(|p| *p as i32 == j.phase)).count()
}

#[test]
fn a_sweep_survives_a_leader_kill_with_every_trial_run_once() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut replicas, addrs) = start_replicas(d, 3);
    let list = addrs.join(",");
    let _workers: Vec<Proc> = (0..3).map(|i| worker(d, &list, &format!("w{i}"))).collect();
    job_file(d, "job", JOB);
    let sweep_path = d.join("sweep.yaml");
    std::fs::write(&sweep_path, SWEEP).unwrap();
    let submit = ["sweep", sweep_path.to_str().unwrap(), "--coordinator", &list, "--submission-id", "lrs-once"];
    let out = flotilla(d, &submit);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(id.starts_with("lrs-s"), "{id}");

    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(240);
        let mut most = 0;
        // Wait until the first trials started (two are still to start).
        loop {
            let s = sweep(&addrs, &id).await;
            most = most.max(active(&jobs(&addrs).await));
            if s.trials.iter().any(|t| t.state != "pending") {
                let states: Vec<&str> = s.trials.iter().map(|t| t.state.as_str()).collect();
                eprintln!("trials at the kill: {states:?}");
                assert!(states.iter().filter(|s| **s == "pending").count() >= 2, "{states:?}");
                break;
            }
            assert!(Instant::now() < deadline, "timed out waiting for trials to run: {s:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (leader, _) = leader_client(&addrs).await;
        let index = addrs.iter().position(|a| *a == leader).unwrap();
        eprintln!("killing the leader, replica {}", index + 1);
        replicas[index].kill9();

        let done = loop {
            let s = sweep(&addrs, &id).await;
            most = most.max(active(&jobs(&addrs).await));
            if s.state != "running" {
                break s;
            }
            assert!(Instant::now() < deadline, "timed out waiting for the sweep: {s:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(done.state, "done", "{done:#?}");
        assert!(most <= 2, "{most} trials were queued or running at once; max_parallel is 2");
        let all = jobs(&addrs).await;
        assert_eq!(all.len(), 4, "every trial once, none twice: {all:#?}");
        let mut trial_jobs: Vec<&str> = done.trials.iter().map(|t| t.job_id.as_str()).collect();
        trial_jobs.sort();
        let mut listed: Vec<&str> = all.iter().map(|j| j.job_id.as_str()).collect();
        listed.sort();
        assert_eq!(trial_jobs, listed);
        assert!(done.trials.iter().all(|t| t.state == "succeeded"), "{done:#?}");
        // Ranked best first by the final loss; the trial with the tiny
        // learning rate learns nothing and is last.
        let ranked: Vec<f64> = done.trials.iter().filter_map(|t| t.metric).collect();
        assert!(ranked.windows(2).all(|w| w[0] <= w[1]), "{ranked:?}");
        let last_lr: f64 = done.trials.last().unwrap().params[0].value.parse().unwrap();
        assert!(last_lr < 1e-6, "{done:#?}");
        assert_eq!(done.trials.iter().map(|t| t.rank).collect::<Vec<_>>(), [1, 2, 3, 4]);
    });

    let out = flotilla(d, &["status", &id, "--coordinator", &list]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("done") && text.contains("train.optimizer.lr=0.003"), "{text}");

    // The same submission again (a retry) is the same sweep; `--wait`
    // follows it (done already) and prints its leaderboard.
    let mut again = submit.to_vec();
    again.push("--wait");
    let out = flotilla(d, &again);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.lines().next(), Some(id.as_str()), "{text}");
    assert_eq!(text.lines().filter(|l| l.contains("succeeded")).count(), 4, "{text}");
}

#[test]
fn a_sweep_with_a_bad_trial_is_refused_before_anything_is_submitted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    job_file(d, "job", JOB);
    let path = d.join("sweep.yaml");
    std::fs::write(&path, "name: bad\njob: job.yaml\nparameters:\n  train.global_batch: {values: [16, 0]}\n").unwrap();
    // No coordinator listens there: the files are refused first.
    let out = flotilla(d, &["sweep", path.to_str().unwrap(), "--coordinator", "https://127.0.0.1:9"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("trial 1") && err.contains("train.global_batch"), "{err}");

    std::fs::write(&path, "name: bad\njob: job.yaml\nparameters:\n  train.optimizer.lr: {distribution: normal}\n")
        .unwrap();
    let out = flotilla(d, &["sweep", path.to_str().unwrap(), "--coordinator", "https://127.0.0.1:9"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(":4:") && err.contains("parameters.train.optimizer.lr.distribution"), "{err}");
}

/// `flotilla ARGS` in `cwd` with `token` (no admin token).
fn flotilla_as(cwd: &std::path::Path, token: &str, args: &[&str]) -> std::process::Output {
    let mut c = cmd();
    c.args(args).current_dir(cwd).env("FLOTILLA_TOKEN", token).env_remove("FLOTILLA_TOKEN_FILE");
    c.output().expect("run flotilla")
}

#[test]
fn a_sweep_is_managed_by_its_submitter_and_admins_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_coord, url) = coordinator(d);
    let alice = create_token(d, &url, "submit", "alice");
    let bob = create_token(d, &url, "submit", "bob");
    let reader = create_token(d, &url, "read", "reader");
    // No worker: the trials wait in the queue.
    job_file(d, "job", JOB);
    let path = d.join("sweep.yaml");
    std::fs::write(&path, SWEEP).unwrap();
    let sweep = path.to_str().unwrap();

    let out = flotilla_as(d, &reader, &["sweep", sweep, "--coordinator", &url]);
    assert!(!out.status.success(), "a read token submitted a sweep");
    let out = flotilla_as(d, &alice, &["sweep", sweep, "--coordinator", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();

    let out = flotilla_as(d, &bob, &["cancel", &id, "--coordinator", &url]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("may not cancel"), "bob cancelled alice's sweep: {err}");
    let out = flotilla_as(d, &reader, &["status", &id, "--coordinator", &url]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("running") && text.contains("queued"), "{text}");

    let out = flotilla_as(d, &alice, &["cancel", &id, "--coordinator", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = flotilla(d, &["status", &id, "--json", "--coordinator", &url]);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["state"], "cancelled", "{s:#}");
    let trials = s["trials"].as_array().unwrap();
    let started: Vec<&serde_json::Value> = trials.iter().filter(|t| !t["job_id"].is_null()).collect();
    assert_eq!(started.len(), 2, "max_parallel 2: {s:#}");
    assert!(started.iter().all(|t| t["state"] == "cancelled"), "{s:#}");
    assert_eq!(s["submitted_by"], "alice");
}
