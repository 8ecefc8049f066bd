//! Every deliberately bad job file in `configs/bad/` is refused with its own
//! message, its field path and a position, exit code 2 and no panic: by
//! `validate`, by `run` (before anything starts), and by the coordinator's
//! API when a client skips the local check.

mod support;

use std::time::Duration;

use flotilla::proto::v1 as pb;
use support::*;

struct Bad {
    path: std::path::PathBuf,
    text: String,
    expect: String,
    expect_path: String,
}

fn bad_configs() -> Vec<Bad> {
    let mut out: Vec<Bad> = std::fs::read_dir(repo().join("configs/bad"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let header = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .unwrap_or_else(|| panic!("{} lacks `{key}`", path.display()))
                    .trim()
                    .to_string()
            };
            let (expect, expect_path) = (header("# expect: "), header("# expect-path: "));
            Bad { path, text, expect, expect_path }
        })
        .collect();
    out.sort_by(|a, b| a.path.cmp(&b.path));
    assert!(out.len() >= 14, "only {} bad configs", out.len());
    out
}

fn check_message(b: &Bad, message: &str) {
    assert!(message.contains(&b.expect), "{}: expected {:?} in {message:?}", b.path.display(), b.expect);
    let needle = format!(": {}: ", b.expect_path);
    assert!(message.contains(&needle), "{}: expected path {:?} in {message:?}", b.path.display(), b.expect_path);
    // origin:line:column: path: message
    let name = b.path.display().to_string();
    let rest = message.split(&format!("{name}:")).nth(1).unwrap_or_else(|| panic!("no origin in {message:?}"));
    let mut parts = rest.split(':');
    let line: usize = parts.next().unwrap().parse().unwrap_or_else(|_| panic!("no line in {message:?}"));
    let column: usize = parts.next().unwrap().parse().unwrap_or_else(|_| panic!("no column in {message:?}"));
    assert!(line >= 1 && line <= b.text.lines().count() && column >= 1, "{message}");
}

#[test]
fn validate_and_run_refuse_every_bad_config_with_its_own_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut seen = std::collections::HashSet::new();
    for b in bad_configs() {
        for cmd in ["validate", "run"] {
            let out = flotilla(dir.path(), &[cmd, b.path.to_str().unwrap()]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{cmd} {}: {stderr}", b.path.display());
            assert!(!stderr.contains("panicked"), "{stderr}");
            check_message(&b, &stderr);
        }
        seen.insert(b.expect.clone());
    }
    assert!(seen.len() >= 14, "the bad configs should fail in different ways");
    assert!(!dir.path().join("runs").exists(), "a refused job started nothing");
}

#[test]
fn the_coordinator_refuses_bad_configs_with_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let (_coord, url) = coordinator(dir.path());
    runtime().block_on(async {
        let mut c = client(&url).await;
        for b in bad_configs() {
            let req = pb::SubmitJobRequest {
                spec_yaml: b.text.clone(),
                origin: b.path.display().to_string(),
                base_dir: "/tmp".into(),
                ..Default::default()
            };
            let status = c.submit_job(req).await.expect_err("a bad config is refused");
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{}", b.path.display());
            check_message(&b, status.message());
        }
        let relative = pb::SubmitJobRequest {
            spec_yaml: std::fs::read_to_string(repo().join("configs/quickstart.yaml")).unwrap(),
            origin: "q.yaml".into(),
            base_dir: "not/absolute".into(),
            ..Default::default()
        };
        let status = c.submit_job(relative).await.expect_err("relative base_dir");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        // Nothing was queued, and the coordinator still answers.
        let jobs = c.list_jobs(pb::ListJobsRequest {}).await.unwrap().into_inner().jobs;
        assert!(jobs.is_empty(), "{jobs:?}");
        let missing = c.get_job(pb::GetJobRequest { job_id: "nope-1".into() }).await.unwrap_err();
        assert_eq!(missing.code(), tonic::Code::NotFound);
        let cancel = c.cancel_job(pb::CancelJobRequest { job_id: "nope-1".into() }).await.unwrap_err();
        assert_eq!(cancel.code(), tonic::Code::NotFound);
        tokio::time::sleep(Duration::from_millis(10)).await;
    });
}

#[test]
fn submit_of_a_bad_config_exits_2_and_a_missing_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = flotilla(dir.path(), &["validate", "no-such-job.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read job file no-such-job.yaml"));
    let bad = repo().join("configs/bad/zero-3.yaml");
    let out = flotilla(dir.path(), &["submit", bad.to_str().unwrap(), "--coordinator", "http://127.0.0.1:9"]);
    assert_eq!(out.status.code(), Some(2), "refused locally, before connecting");
}
