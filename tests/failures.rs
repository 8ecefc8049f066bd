//! Jobs that cannot succeed end with a reason instead of hanging.

mod support;

use std::time::{Duration, Instant};

use support::*;

#[test]
fn a_missing_data_file_fails_the_job_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(
        dir.path(),
        "job",
        "
name: missing
model: {kind: gpt, layers: 1, d_model: 8, heads: 2, context: 8, vocab: 256}
data: {kind: text, path: nowhere.txt}
train: {steps: 10, global_batch: 4}
workers: {min: 2, max: 2}
",
    );
    let out = flotilla(dir.path(), &["run", job.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("job missing-1 failed"), "{stdout}");
    assert!(stdout.contains("gave up after 5 restarts"), "{stdout}");
    assert!(stdout.contains(&format!("{}/nowhere.txt: No such file", dir.path().display())), "{stdout}");
}

#[test]
fn run_gives_up_when_every_local_worker_dies() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(
        dir.path(),
        "job",
        "
name: doomed
model: {kind: mlp, layers: [8, 16, 2]}
data: {kind: synthetic}
train: {steps: 100000000, global_batch: 8}
workers: {min: 2, max: 2}
",
    );
    let (mut run, lines, workers) = start_run(dir.path(), &job);
    assert_eq!(workers.len(), 2);
    for w in workers {
        unsafe { libc::kill(w, libc::SIGKILL) };
    }
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = run.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "run hung after its workers died");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(1));
    assert!(rest.iter().any(|l| l.contains("every local worker exited")), "{rest:?}");
}
