//! SIGTERM (and Ctrl-C) to `flotilla run` stops every process it started.

mod support;

use std::time::{Duration, Instant};

use support::*;

const LONG_JOB: &str = "
name: forever
model: {kind: mlp, layers: [8, 16, 2]}
data: {kind: synthetic}
train: {steps: 100000000, global_batch: 8}
workers: {min: 2, max: 2}
";

fn stop_run_with(signal: i32) {
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(dir.path(), "job", LONG_JOB);
    let (mut run, lines, workers) = start_run(dir.path(), &job);
    let pid = run.id() as i32;
    assert_eq!(workers.len(), 2, "two local workers: {workers:?}");
    // Keep draining stderr so the process never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});

    unsafe { libc::kill(pid, signal) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = run.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "flotilla run did not exit after signal {signal}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(130), "interrupted runs exit 130");
    let deadline = Instant::now() + Duration::from_secs(10);
    while workers.iter().any(|w| alive(*w)) {
        assert!(Instant::now() < deadline, "workers left behind: {workers:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_to_run_leaves_no_process_behind() {
    stop_run_with(libc::SIGTERM);
}

#[test]
fn ctrl_c_to_run_leaves_no_process_behind() {
    stop_run_with(libc::SIGINT);
}

#[test]
fn kill_9_of_run_still_takes_its_workers_down() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(dir.path(), "job", LONG_JOB);
    let (mut run, _lines, workers) = start_run(dir.path(), &job);
    assert_eq!(workers.len(), 2);
    run.kill().unwrap();
    run.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while workers.iter().any(|w| alive(*w)) {
        assert!(Instant::now() < deadline, "orphaned workers: {workers:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
