//! API tokens against real coordinator and worker processes: a call
//! without a token, with a revoked one, or outside its role is refused
//! with the right code; a submitter manages only its own jobs; a worker
//! reports only for itself and the job it is assigned to, so that none of
//! the attacks a stranger could once make on a running job changes it.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use flotilla::proto::auth::Credentials;
use flotilla::proto::v1 as pb;
use flotilla::proto::v1::job_service_client::JobServiceClient;
use flotilla::proto::v1::worker_service_client::WorkerServiceClient;
use support::*;
use tonic::transport::Channel;
use tonic::Code;

/// `flotilla ARGS` in `cwd` carrying `token` (none: no token at all).
fn flotilla_as(cwd: &Path, token: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = support::cmd();
    cmd.args(args).current_dir(cwd).env_remove("FLOTILLA_TOKEN").env_remove("FLOTILLA_TOKEN_FILE");
    if let Some(t) = token {
        cmd.env("FLOTILLA_TOKEN", t);
    }
    cmd.output().expect("run flotilla")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// A channel with this test binary's client certificate and no token.
async fn raw_channel(url: &str) -> Channel {
    tls_dir();
    flotilla::proto::leader::channel(url, std::time::Duration::from_secs(5)).await.unwrap()
}

const IDLE_JOB: &str = "
name: idle
model: {kind: mlp, layers: [4, 8, 2]}
data: {kind: synthetic, seed: 1, samples: 64}
train: {steps: 10, global_batch: 8, seed: 1}
workers: {min: 1, max: 1}
";

#[test]
fn calls_without_a_valid_token_or_outside_their_role_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_coord, url) = coordinator(dir.path());
    let d = dir.path();
    let job = job_file(d, "idle", IDLE_JOB);
    let job = job.to_str().unwrap();

    // No token: the CLI says how to get one; a raw client gets UNAUTHENTICATED.
    let out = flotilla_as(d, None, &["status", "--coordinator", &url]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no API token"), "{}", stderr(&out));
    runtime().block_on(async {
        let mut anon = JobServiceClient::new(Credentials::none().wrap(raw_channel(&url).await));
        let s = anon.list_jobs(pb::ListJobsRequest {}).await.unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
        // Which replica leads is no secret: clients find the leader first.
        assert!(anon.get_leader(pb::GetLeaderRequest {}).await.unwrap().into_inner().is_leader);
        let mut forged = JobServiceClient::new(Credentials::token("flt_0000").unwrap().wrap(raw_channel(&url).await));
        let s = forged.list_jobs(pb::ListJobsRequest {}).await.unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
        assert!(s.message().contains("unknown or revoked"), "{s:?}");
    });

    let reader = create_token(d, &url, "read", "reader");
    let alice = create_token(d, &url, "submit", "alice");
    let bob = create_token(d, &url, "submit", "bob");
    let worker = create_token(d, &url, "worker", "workers");

    // A read token reads, and may not submit, make tokens or change membership.
    let out = flotilla_as(d, Some(&reader), &["status", "--coordinator", &url]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = flotilla_as(d, Some(&reader), &["submit", job, "--coordinator", &url]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("read role, which may not call SubmitJob"), "{}", stderr(&out));
    let out =
        flotilla_as(d, Some(&reader), &["token", "create", "--role", "admin", "--name", "me", "--coordinator", &url]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("PermissionDenied"), "{}", stderr(&out));
    let out = flotilla_as(d, Some(&reader), &["coordinator", "add", "9", "http://127.0.0.1:9", "--coordinator", &url]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("may not call AddMember"), "{}", stderr(&out));
    // A worker token runs workers only.
    let out = flotilla_as(d, Some(&worker), &["status", "--coordinator", &url]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("worker role, which may not call ListJobs"), "{}", stderr(&out));

    // A submitter cancels its own jobs, not another's; an admin cancels any.
    let submit = |token: &str, id: &str| {
        let out = flotilla_as(d, Some(token), &["submit", job, "--coordinator", &url, "--submission-id", id]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    let alices = submit(&alice, "a-1");
    let out = flotilla_as(d, Some(&bob), &["cancel", &alices, "--coordinator", &url]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("only an admin or the token that submitted the job"), "{}", stderr(&out));
    let out = flotilla_as(d, Some(&alice), &["status", &alices, "--json", "--coordinator", &url]);
    let status: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(status["phase"], "pending", "{status}");
    assert_eq!(status["submitted_by"], "alice", "{status}");
    let out = flotilla_as(d, Some(&alice), &["cancel", &alices, "--coordinator", &url]);
    assert!(out.status.success(), "{}", stderr(&out));
    let bobs = submit(&bob, "b-1");
    let out = flotilla(d, &["cancel", &bobs, "--coordinator", &url]);
    assert!(out.status.success(), "admin cancel: {}", stderr(&out));

    // Revoked: refused at once; the list shows it revoked, and never a secret.
    let out = flotilla(d, &["token", "revoke", "bob", "--coordinator", &url]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = flotilla_as(d, Some(&bob), &["status", "--coordinator", &url]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unknown or revoked"), "{}", stderr(&out));
    let out = flotilla(d, &["token", "list", "--coordinator", &url]);
    let list = stdout(&out);
    for name in ["reader", "alice", "bob", "workers"] {
        assert!(list.contains(name), "{list}");
    }
    for secret in [&reader, &alice, &bob, &worker] {
        assert!(!list.contains(secret.as_str()), "a token's secret is listed:\n{list}");
    }
    let bob_line = list.lines().find(|l| l.starts_with("bob ")).unwrap();
    assert!(!bob_line.contains(" - "), "bob shows as not revoked: {bob_line}");
    // A name is never reused, so a revoked token cannot come back under it.
    let out = flotilla(d, &["token", "create", "--role", "admin", "--name", "bob", "--coordinator", &url]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("exists already"), "{}", stderr(&out));
}

#[test]
fn a_coordinator_makes_its_admin_token_file_on_first_start_and_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data/admin.token");
    let args = ["--listen", "127.0.0.1:0", "--data-dir", dir.path().join("data").to_str().unwrap().to_owned().leak()];
    let start = |log: &str| {
        spawn_coordinator(&dir.path().join(log), &[&args[..], &["--admin-token-file", file.to_str().unwrap()]].concat())
    };
    let (mut first, url) = start("first.log");
    let log = wait_log(&first, "the token file", Duration::from_secs(30), |l| l.contains("admin token in"));
    assert!(log.contains("wrote a new admin token"), "{log}");
    let shown = std::fs::canonicalize(&file).unwrap();
    assert!(log.contains(&format!("`--token-file {}`", shown.display())), "the hint names the file: {log}");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the admin token file is readable by others");
    let token = std::fs::read_to_string(&file).unwrap().trim().to_string();
    let out = flotilla_as(dir.path(), Some(&token), &["status", "--coordinator", &url]);
    assert!(out.status.success(), "{}", stderr(&out));
    first.kill9();

    let (second, url) = start("second.log");
    let log = wait_log(&second, "the token file", Duration::from_secs(30), |l| l.contains("admin token in"));
    assert!(!log.contains("wrote a new"), "{log}");
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), token, "the token changed on restart");
    let out = flotilla_as(dir.path(), None, &["status", "--coordinator", &url, "--token-file", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
}

const JOB: &str = "
name: guarded
model: {kind: mlp, layers: [8, 16, 4]}
data: {kind: synthetic, seed: 3, samples: 256}
train: {steps: 8000, global_batch: 16, seed: 5}
workers: {min: 1, max: 1}
checkpoint: {url: runs, every: 2000, keep: 2}
";

/// The final weights of [`JOB`] run undisturbed (once per test binary).
fn undisturbed() -> &'static std::collections::BTreeMap<String, Vec<f32>> {
    static WEIGHTS: std::sync::OnceLock<std::collections::BTreeMap<String, Vec<f32>>> = std::sync::OnceLock::new();
    WEIGHTS.get_or_init(|| {
        let quiet = tempfile::tempdir().unwrap();
        let job = job_file(quiet.path(), "job", JOB);
        let out = flotilla(quiet.path(), &["run", job.to_str().unwrap(), "--workers", "1"]);
        assert!(out.status.success(), "{}", stderr(&out));
        read_tensors(&quiet.path().join("runs/guarded-1/final/model.safetensors"))
    })
}

/// What a stranger holding a `worker` token tries on a running job.
#[derive(Debug, Clone, Copy)]
enum Attack {
    /// Report the job finished, as the real worker and as itself.
    Finish,
    /// Six fatal failures, as the real worker and as itself.
    Fail,
    /// Commit a checkpoint of a made-up step, as the real worker and as itself.
    Commit,
    /// Fake progress, as the real worker and as itself.
    Progress,
    /// A preemption notice for the real worker.
    Preempt,
    /// Read the real worker's assignments (its job, peers and data secret).
    Assignments,
    /// Heartbeat for the real worker, without a key and with its own.
    Heartbeat,
    /// Register again under the real worker's id and data address.
    TakeOver,
}

/// Runs [`JOB`] on one real worker, lets a stranger with a `worker` token
/// (and a registered worker of its own) try `attack` while it trains, and
/// checks that every try is refused and that the job ends in its first
/// generation with the undisturbed run's weights.
fn attack_running_job(attack: Attack) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (coord, url) = coordinator(d);
    let stranger_token = create_token(d, &url, "worker", "stranger");
    let _real = worker(d, &url, "real");
    let job = job_file(d, "job", JOB);
    let out = flotilla(d, &["submit", job.to_str().unwrap(), "--coordinator", &url]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out);
    runtime().block_on(async {
        let mut c = client(&url).await;
        let running =
            wait_for(&mut c, &id, Duration::from_secs(120), |s| is_phase(s, pb::JobPhase::Running) && s.step > 0).await;
        let (generation, real) = (running.generation, running.ranks[0].worker_id.clone());
        let real_addr = running.ranks[0].data_addr.clone();
        let folder = running.output_dir.clone();

        let creds = Credentials::token(&stranger_token).unwrap().for_worker();
        let mut w = WorkerServiceClient::new(creds.wrap(raw_channel(&url).await));
        let reg = pb::RegisterRequest { data_addr: "127.0.0.1:1".into(), hostname: "x".into(), ..Default::default() };
        let mine = w.register(reg).await.unwrap().into_inner();
        assert!(!mine.worker_key.is_empty());
        creds.set_worker_key(&mine.worker_key);
        w.heartbeat(pb::HeartbeatRequest { worker_id: mine.worker_id.clone() }).await.unwrap();

        let denied = |what: &str, r: Result<(), tonic::Status>| {
            let s = r.expect_err(what);
            assert_eq!(s.code(), Code::PermissionDenied, "{attack:?} {what}: {s:?}");
        };
        let us = [real.clone(), mine.worker_id.clone()];
        match attack {
            Attack::Finish => {
                for worker_id in us {
                    let finish = pb::FinishReport {
                        worker_id,
                        job_id: id.clone(),
                        generation,
                        step: 8000,
                        final_model: format!("{folder}/final/model.safetensors"),
                    };
                    denied("finish", w.report_finished(finish).await.map(|_| ()));
                }
            }
            Attack::Fail => {
                for worker_id in us {
                    for _ in 0..6 {
                        let failure = pb::FailureReport {
                            worker_id: worker_id.clone(),
                            job_id: id.clone(),
                            generation,
                            kind: pb::FailureKind::Fatal as i32,
                            message: "fake".into(),
                            ..Default::default()
                        };
                        denied("failure", w.report_failure(failure).await.map(|_| ()));
                    }
                }
            }
            Attack::Commit => {
                for worker_id in us {
                    let commit = pb::CheckpointCommit {
                        worker_id,
                        job_id: id.clone(),
                        generation,
                        step: 1_000_000,
                        location: format!("{folder}/step-01000000"),
                        ..Default::default()
                    };
                    denied("commit", w.commit_checkpoint(commit).await.map(|_| ()));
                }
            }
            Attack::Progress => {
                for worker_id in us {
                    let progress = pb::ProgressReport {
                        worker_id,
                        job_id: id.clone(),
                        generation,
                        step: 7_999,
                        loss: 1e-9,
                        ..Default::default()
                    };
                    denied("progress", w.report_progress(progress).await.map(|_| ()));
                }
            }
            Attack::Preempt => {
                let notice =
                    pb::PreemptionNotice { worker_id: real.clone(), source: "sigterm".into(), detail: String::new() };
                denied("preemption", w.report_preemption(notice).await.map(|_| ()));
            }
            Attack::Assignments => {
                let req = pb::AssignmentsRequest { worker_id: real.clone() };
                denied("assignments", w.assignments(req).await.map(|_| ()));
            }
            Attack::Heartbeat => {
                denied("heartbeat", w.heartbeat(pb::HeartbeatRequest { worker_id: real.clone() }).await.map(|_| ()));
                let keyless = Credentials::token(&stranger_token).unwrap();
                let mut k = WorkerServiceClient::new(keyless.wrap(raw_channel(&url).await));
                let s = k.heartbeat(pb::HeartbeatRequest { worker_id: real.clone() }).await.unwrap_err();
                assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
                assert!(s.message().contains("needs its key"), "{s:?}");
            }
            Attack::TakeOver => {
                let steal = pb::RegisterRequest {
                    data_addr: real_addr.clone(),
                    hostname: "x".into(),
                    worker_id: real.clone(),
                    ..Default::default()
                };
                let stolen = w.register(steal).await.unwrap().into_inner();
                assert_ne!(stolen.worker_id, real, "a stranger took over the real worker's id");
            }
        }

        // The job went on as if nothing happened.
        let done = wait_for(&mut c, &id, Duration::from_secs(300), |s| {
            is_phase(s, pb::JobPhase::Succeeded) || is_phase(s, pb::JobPhase::Failed)
        })
        .await;
        assert!(is_phase(&done, pb::JobPhase::Succeeded), "{attack:?}: {done:#?}");
        assert_eq!(done.generation, generation, "{attack:?} changed the generation: {done:#?}");
        assert_eq!(done.restarts, 0, "{done:#?}");
        let steps: Vec<u64> = done.checkpoints.iter().map(|c| c.step).collect();
        assert_eq!(steps, vec![4000, 6000], "{attack:?}: the checkpoints the job took, and no other");
    });
    let attacked = read_tensors(&d.join("runs/guarded-1/final/model.safetensors"));
    assert_eq!(&attacked, undisturbed(), "{attack:?}: the final weights differ from the undisturbed run's");
    drop(coord);
}

#[test]
fn a_stranger_cannot_finish_a_running_job() {
    attack_running_job(Attack::Finish);
}

#[test]
fn a_stranger_cannot_fail_a_running_job() {
    attack_running_job(Attack::Fail);
}

#[test]
fn a_stranger_cannot_commit_a_checkpoint_of_a_running_job() {
    attack_running_job(Attack::Commit);
}

#[test]
fn a_stranger_cannot_report_progress_of_a_running_job() {
    attack_running_job(Attack::Progress);
}

#[test]
fn a_stranger_cannot_preempt_a_real_worker() {
    attack_running_job(Attack::Preempt);
}

#[test]
fn a_stranger_cannot_read_a_real_workers_assignments() {
    attack_running_job(Attack::Assignments);
}

#[test]
fn a_stranger_cannot_heartbeat_for_a_real_worker() {
    attack_running_job(Attack::Heartbeat);
}

#[test]
fn a_stranger_cannot_take_over_a_real_workers_id() {
    attack_running_job(Attack::TakeOver);
}
