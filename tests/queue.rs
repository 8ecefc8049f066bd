//! The job queue against real processes: a coordinator (TLS and tokens on)
//! and real workers. Each test controls when workers appear, so every
//! decision the queue makes is forced by the state, never by timing; the
//! time limits only guard against a hang.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use flotilla::proto::auth::AuthChannel;
use flotilla::proto::v1 as pb;
use flotilla::proto::v1::job_service_client::JobServiceClient;
use support::*;

/// A tiny MLP job of `steps` steps on `min..=max` workers at `priority`.
fn job_yaml(name: &str, steps: u64, workers: (u32, u32), priority: i32) -> String {
    format!(
        "
name: {name}
model: {{kind: mlp, layers: [4, 8, 3]}}
data: {{kind: synthetic, samples: 256}}
train: {{steps: {steps}, global_batch: 12}}
workers: {{min: {}, max: {}}}
checkpoint: {{url: runs, every: 0}}
priority: {priority}
",
        workers.0, workers.1
    )
}

/// Submits a job file with the CLI; returns the job id it prints.
fn submit(dir: &Path, url: &str, file: &str, yaml: &str) -> String {
    let path = job_file(dir, file, yaml);
    let out = flotilla(dir, &["submit", path.to_str().unwrap(), "--coordinator", url]);
    assert!(out.status.success(), "submit {file}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().lines().last().unwrap().trim().to_string()
}

/// `flotilla status ARGS` against `url`; its stdout.
fn status(dir: &Path, url: &str, args: &[&str]) -> String {
    let mut all = vec!["status", "--coordinator", url];
    all.extend(args);
    let out = flotilla(dir, &all);
    assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every job, from one snapshot of the state.
async fn jobs(c: &mut JobServiceClient<AuthChannel>) -> Vec<pb::JobStatus> {
    c.list_jobs(pb::ListJobsRequest {}).await.unwrap().into_inner().jobs
}

/// Polls the job list until `done` holds for one snapshot (a hang guard
/// only: nothing here depends on how long it takes).
async fn wait_jobs(url: &str, what: &str, done: impl Fn(&[pb::JobStatus]) -> bool) -> Vec<pb::JobStatus> {
    let mut c = client(url).await;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let all = jobs(&mut c).await;
        if done(&all) {
            return all;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {all:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn find<'a>(all: &'a [pb::JobStatus], id: &str) -> &'a pb::JobStatus {
    all.iter().find(|j| j.job_id == id).unwrap_or_else(|| panic!("no job {id} in {all:#?}"))
}

fn phase(all: &[pb::JobStatus], id: &str) -> pb::JobPhase {
    pb::JobPhase::try_from(find(all, id).phase).unwrap()
}

fn registered(p: &Proc) {
    wait_log(p, "the worker to register", Duration::from_secs(120), |l| l.contains("registered worker="));
}

#[test]
fn a_high_priority_job_submitted_behind_two_low_priority_ones_starts_first() {
    let dir = tempfile::tempdir().unwrap();
    let (_coord, url) = coordinator(dir.path());
    // No worker yet: all three wait in the queue.
    let low1 = submit(dir.path(), &url, "low1", &job_yaml("low", 30, (1, 1), 0));
    let low2 = submit(dir.path(), &url, "low2", &job_yaml("low", 30, (1, 1), 0));
    let high = submit(dir.path(), &url, "high", &job_yaml("high", 30, (1, 1), 5));
    assert_eq!((low1.as_str(), low2.as_str(), high.as_str()), ("low-1", "low-2", "high-3"));

    let table = status(dir.path(), &url, &[]);
    let row = |id: &str| {
        table
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("no {id} in\n{table}"))
            .split_whitespace()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    assert_eq!(row("JOB")[2..4], ["QUEUE", "PRIO"], "{table}");
    assert_eq!(row(&high)[1..4], ["pending", "#1", "5"], "{table}");
    assert_eq!(row(&low1)[1..4], ["pending", "#2", "0"], "{table}");
    assert_eq!(row(&low2)[1..4], ["pending", "#3", "0"], "{table}");
    let detail = status(dir.path(), &url, &[&low2]);
    assert!(detail.contains("queue:        position 3 in the queue, priority 0"), "{detail}");
    let json: serde_json::Value = serde_json::from_str(&status(dir.path(), &url, &[&high, "--json"])).unwrap();
    assert_eq!((json["queue_position"].as_u64(), json["priority"].as_i64()), (Some(1), Some(5)));

    // One worker runs them one at a time, in queue order.
    let worker = worker(dir.path(), &url, "worker");
    runtime().block_on(async {
        let all = wait_jobs(&url, "every job to succeed", |all| {
            // One worker: whenever a low job has started, the high one has ended.
            let started = |id: &str| find(all, id).generation > 0;
            let ended = |id: &str| phase(all, id) == pb::JobPhase::Succeeded;
            assert!(!started(&low1) || ended(&high), "low-1 started before high-3 ended: {all:#?}");
            assert!(!started(&low2) || ended(&low1), "low-2 started before low-1 ended: {all:#?}");
            [&high, &low1, &low2].iter().all(|id| ended(id))
        })
        .await;
        assert!(all.iter().all(|j| j.queue_position == 0), "{all:#?}");
    });
    // The worker's own record of what it ran, in order.
    let log = worker.log_text();
    let mut order: Vec<String> = Vec::new();
    for line in log.lines().filter(|l| l.contains("starting train loop")) {
        let id = line.split("job=").nth(1).and_then(|r| r.split_whitespace().next()).unwrap().to_string();
        if !order.contains(&id) {
            order.push(id);
        }
    }
    assert_eq!(order, [high, low1, low2], "{log}");
}

#[test]
fn a_small_job_backfills_beside_a_large_one_that_waits() {
    let dir = tempfile::tempdir().unwrap();
    let (_coord, url) = coordinator(dir.path());
    let first: Vec<Proc> = (1..=2).map(|i| worker(dir.path(), &url, &format!("worker{i}"))).collect();
    first.iter().for_each(registered);
    // Runs on 2 of the 4 workers until cancelled.
    let running = submit(dir.path(), &url, "running", &job_yaml("running", 100_000_000, (2, 2), 0));
    runtime().block_on(async {
        wait_jobs(&url, "the first job to run", |all| find(all, &running).world_size == 2).await;
    });
    // Queued while no worker is free: a job of 3, then two of 1, all of one priority.
    let large = submit(dir.path(), &url, "large", &job_yaml("large", 100_000_000, (3, 3), 0));
    let small = submit(dir.path(), &url, "small", &job_yaml("small", 100_000_000, (1, 1), 0));
    let later = submit(dir.path(), &url, "later", &job_yaml("later", 100_000_000, (1, 1), 0));
    // Two more workers: `large` (3) does not fit in 2; when `running` ends
    // it gets 2 back, 1 more than it is short, so one free worker is spare:
    // `small` backfills on it and `later` waits.
    let more: Vec<Proc> = (3..=4).map(|i| worker(dir.path(), &url, &format!("worker{i}"))).collect();
    more.iter().for_each(registered);
    runtime().block_on(async {
        let all = wait_jobs(&url, "the small job to backfill", |all| find(all, &small).world_size == 1).await;
        assert_eq!(phase(&all, &large), pb::JobPhase::Pending, "{all:#?}");
        assert_eq!(find(&all, &large).queue_position, 1);
        assert_eq!(find(&all, &later).queue_position, 2);
        assert_eq!(find(&all, &running).world_size, 2);

        // The running job ends: the large one starts on its 2 workers and
        // the free one `later` never took.
        let mut c = client(&url).await;
        c.cancel_job(pb::CancelJobRequest { job_id: running.clone() }).await.unwrap();
        let all = wait_jobs(&url, "the large job to start", |all| phase(all, &large) == pb::JobPhase::Running).await;
        assert_eq!(find(&all, &large).world_size, 3, "{all:#?}");
        let s = find(&all, &small);
        assert_eq!((s.world_size, s.generation), (1, 1), "the backfilled job runs on, undisturbed: {all:#?}");
        let l = find(&all, &later);
        assert_eq!((l.generation, l.queue_position), (0, 1), "{all:#?}");
        for id in [&large, &small, &later] {
            c.cancel_job(pb::CancelJobRequest { job_id: id.clone() }).await.unwrap();
        }
    });
}
