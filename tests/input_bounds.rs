//! Bad input loses nothing and costs little, against a real coordinator
//! process: every limit of `flotilla_coordinator::limits` refuses its
//! oversized input with a short message, the coordinator keeps serving, and
//! its resident memory stays bounded. A worker confined with
//! `--storage-root` refuses a job that would write elsewhere.

mod support;

use std::path::Path;
use std::time::Duration;

use flotilla::coordinator::limits;
use flotilla::proto::v1 as pb;
use flotilla::proto::v1::worker_service_client::WorkerServiceClient;
use support::*;
use tonic::Code;

/// The resident memory of process `pid`, in bytes (`VmRSS`).
fn rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kb * 1024
}

/// A generous bound on growth: twice the starting RSS plus 100 MB.
fn assert_rss_bounded(pid: i32, start: u64, after: &str) {
    let now = rss(pid);
    let bound = 2 * start + (100 << 20);
    assert!(now < bound, "after {after}: resident memory {now} bytes, bound {bound} (started at {start})");
}

/// A refusal with `code` whose message is short (quotes only a prefix).
fn assert_short_refusal<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, what: &str) -> String {
    let status = result.expect_err(what);
    assert_eq!(status.code(), code, "{what}: {status:?}");
    assert!(status.message().len() < 400, "{what}: a {}-byte message", status.message().len());
    status.message().to_string()
}

#[test]
fn an_oversized_id_is_refused_with_a_short_message() {
    let dir = tempfile::tempdir().unwrap();
    let (coord, url) = coordinator(dir.path());
    let start = rss(coord.pid());
    runtime().block_on(async {
        let mut c = client(&url).await;
        let huge = "j".repeat(1 << 20);
        for _ in 0..20 {
            let m = assert_short_refusal(
                c.get_job(pb::GetJobRequest { job_id: huge.clone() }).await,
                Code::InvalidArgument,
                "get_job",
            );
            assert!(m.contains("job_id is at most") && m.contains("1048576"), "{m}");
            assert_short_refusal(
                c.cancel_job(pb::CancelJobRequest { job_id: huge.clone() }).await,
                Code::InvalidArgument,
                "cancel_job",
            );
        }
        let mut w = WorkerServiceClient::new(channel(&url).await.unwrap());
        assert_short_refusal(
            w.heartbeat(pb::HeartbeatRequest { worker_id: huge.clone() }).await,
            Code::InvalidArgument,
            "heartbeat",
        );
        let register = pb::RegisterRequest {
            data_addr: "127.0.0.1:1".into(),
            hostname: "h".repeat(1 << 20),
            ..Default::default()
        };
        assert_short_refusal(w.register(register).await, Code::InvalidArgument, "register");
        // A normal id still gets its ordinary answer.
        let missing = c.get_job(pb::GetJobRequest { job_id: "no-such-job".into() }).await.unwrap_err();
        assert_eq!(missing.code(), Code::NotFound);
    });
    assert_rss_bounded(coord.pid(), start, "oversized ids");
}

#[test]
fn submits_with_a_huge_base_dir_are_refused_and_status_still_works() {
    let dir = tempfile::tempdir().unwrap();
    let (coord, url) = coordinator(dir.path());
    let start = rss(coord.pid());
    let yaml = std::fs::read_to_string(repo().join("configs/quickstart.yaml")).unwrap();
    runtime().block_on(async {
        let mut c = client(&url).await;
        let base_dir = format!("/{}", "d".repeat(3_900_000));
        for i in 0..25 {
            let req = pb::SubmitJobRequest {
                spec_yaml: yaml.clone(),
                origin: "quickstart.yaml".into(),
                base_dir: base_dir.clone(),
                submission_id: format!("huge-{i}"),
            };
            let m = assert_short_refusal(c.submit_job(req).await, Code::InvalidArgument, "submit");
            assert!(m.contains("base_dir is at most"), "{m}");
        }
        // An oversized job file is refused the same way.
        let req = pb::SubmitJobRequest {
            spec_yaml: format!("{yaml}\n#{}", "x".repeat(limits::MAX_JOB_FILE)),
            origin: "quickstart.yaml".into(),
            base_dir: dir.path().display().to_string(),
            submission_id: String::new(),
        };
        assert_short_refusal(c.submit_job(req).await, Code::InvalidArgument, "huge job file");
        assert!(c.list_jobs(pb::ListJobsRequest {}).await.unwrap().into_inner().jobs.is_empty());
    });
    let out = flotilla(dir.path(), &["status", "--coordinator", &url]);
    assert!(out.status.success(), "status after the refused submits: {}", String::from_utf8_lossy(&out.stderr));
    // A real job is still taken.
    let job = job_file(dir.path(), "job", &yaml);
    let out = flotilla(dir.path(), &["submit", job.to_str().unwrap(), "--coordinator", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_rss_bounded(coord.pid(), start, "25 submits of a 3.9 MB base_dir");
}

const LONG_JOB: &str = "
name: rendezvous
model: {kind: mlp, layers: [4, 8, 2]}
data: {kind: synthetic, seed: 1, samples: 64}
train: {steps: 1000000, global_batch: 8, micro_batch: 8, seed: 1}
workers: {min: 1, max: 1}
checkpoint: {url: runs, every: 0, keep: 1}
";

#[test]
fn a_rendezvous_key_flood_is_refused_past_the_per_job_bound() {
    let dir = tempfile::tempdir().unwrap();
    // Without tokens, so that this client may publish as the job's worker
    // would (with tokens, only that worker, proving its key, may).
    let (coord, url) = coordinator_with(
        dir.path(),
        &["--lease-ms", "1500", "--heartbeat-ms", "200", "--start-grace-ms", "300", "--insecure"],
    );
    let _worker = worker(dir.path(), &url, "worker");
    let job = job_file(dir.path(), "job", LONG_JOB);
    let out = flotilla(dir.path(), &["submit", job.to_str().unwrap(), "--coordinator", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    runtime().block_on(async {
        let mut c = client(&url).await;
        let running =
            wait_for(&mut c, &id, Duration::from_secs(120), |s| is_phase(s, pb::JobPhase::Running) && s.step > 0).await;
        let generation = running.generation;
        let start = rss(coord.pid());
        let mut w = WorkerServiceClient::new(channel(&url).await.unwrap());
        let put = |key: String, value: Vec<u8>| pb::RendezvousPut {
            job_id: id.clone(),
            generation,
            key,
            value,
            worker_id: String::new(),
        };

        // A key past its length limit.
        let long = put("k".repeat(limits::MAX_RENDEZVOUS_KEY + 1), vec![1]);
        assert_short_refusal(w.publish_rendezvous(long).await, Code::InvalidArgument, "long key");

        // Keys up to the per-generation bound are taken, then refused.
        let mut taken = 0;
        let refusal = loop {
            match w.publish_rendezvous(put(format!("flood-{taken}"), vec![7; 16])).await {
                Ok(_) => taken += 1,
                Err(s) => break s,
            }
            assert!(taken <= limits::MAX_RENDEZVOUS_KEYS, "more keys taken than the bound");
        };
        assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
        assert!(refusal.message().contains("rendezvous keys"), "{}", refusal.message());
        assert_eq!(taken, limits::MAX_RENDEZVOUS_KEYS);
        // Replacing a published key still works; what was published reads back.
        w.publish_rendezvous(put("flood-0".into(), vec![8; 16])).await.unwrap();
        let get = pb::RendezvousGet { job_id: id.clone(), generation, key: "flood-0".into(), worker_id: String::new() };
        assert_eq!(w.lookup_rendezvous(get).await.unwrap().into_inner().value, vec![8; 16]);
        // The flood did not harm the job.
        let later = wait_for(&mut c, &id, Duration::from_secs(60), |s| s.step > running.step + 5).await;
        assert_eq!(later.generation, generation, "{later:#?}");
        assert_rss_bounded(coord.pid(), start, "a rendezvous key flood");
        c.cancel_job(pb::CancelJobRequest { job_id: id.clone() }).await.unwrap();
    });
}

#[test]
fn locations_with_dot_dot_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_coord, url) = coordinator(dir.path());
    runtime().block_on(async {
        let mut c = client(&url).await;
        let mut w = WorkerServiceClient::new(channel(&url).await.unwrap());
        let commit = pb::CheckpointCommit {
            worker_id: "w-1".into(),
            job_id: "j-1".into(),
            generation: 1,
            step: 10,
            location: "/runs/j-1/../j-2/step-10".into(),
            ..Default::default()
        };
        let m = assert_short_refusal(w.commit_checkpoint(commit).await, Code::InvalidArgument, "commit");
        assert!(m.contains("`..`"), "{m}");
        let finish = pb::FinishReport {
            worker_id: "w-1".into(),
            job_id: "j-1".into(),
            final_model: "../../etc/model.safetensors".into(),
            ..Default::default()
        };
        assert_short_refusal(w.report_finished(finish).await, Code::InvalidArgument, "finish");
        let submit = pb::SubmitJobRequest {
            spec_yaml: std::fs::read_to_string(repo().join("configs/quickstart.yaml")).unwrap(),
            origin: "quickstart.yaml".into(),
            base_dir: format!("{}/../elsewhere", dir.path().display()),
            submission_id: String::new(),
        };
        assert_short_refusal(c.submit_job(submit).await, Code::InvalidArgument, "base_dir with ..");
    });
    // A job file naming a place with `..` is refused by `flotilla validate`.
    let job = job_file(
        dir.path(),
        "escape",
        "name: escape\nmodel: {kind: mlp, layers: [4, 3]}\ndata: {kind: synthetic}\n\
         train: {steps: 5, global_batch: 4}\ncheckpoint: {url: ../outside}\n",
    );
    let out = flotilla(dir.path(), &["validate", job.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("checkpoint.url") && err.contains("`..`"), "{err}");
}

const SHORT_JOB: &str = "
model: {kind: mlp, layers: [4, 8, 2]}
data: {kind: synthetic, seed: 1, samples: 64}
train: {steps: 20, global_batch: 8, micro_batch: 8, seed: 1}
workers: {min: 1, max: 1}
";

/// A job file named `name` writing its checkpoints to `url`.
fn short_job(dir: &Path, name: &str, url: &str) -> std::path::PathBuf {
    job_file(dir, name, &format!("name: {name}\n{SHORT_JOB}checkpoint: {{url: {url}, every: 10, keep: 1}}\n"))
}

#[test]
fn a_worker_with_a_storage_root_refuses_a_job_outside_it() {
    let dir = tempfile::tempdir().unwrap();
    let allowed = dir.path().join("allowed");
    std::fs::create_dir_all(&allowed).unwrap();
    let (_coord, url) = coordinator(dir.path());
    let log = dir.path().join("confined.log");
    let child = with_token(&mut std::process::Command::new(bin()))
        .args(["worker", "--coordinator", &url, "--data-addr", "127.0.0.1:0", "--op-timeout-s", "20"])
        .args(["--storage-root", allowed.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start worker");
    let _worker = Proc { child, log };

    let outside = short_job(dir.path(), "outside", "elsewhere");
    let inside = short_job(dir.path(), "inside", "allowed/runs");
    let submit = |job: &Path| {
        let out = flotilla(dir.path(), &["submit", job.to_str().unwrap(), "--coordinator", &url]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let outside_id = submit(&outside);
    runtime().block_on(async {
        let mut c = client(&url).await;
        let refused = wait_for(&mut c, &outside_id, Duration::from_secs(120), |s| {
            s.generations.iter().any(|g| g.reason.contains("outside this worker's storage roots"))
        })
        .await;
        let reason = refused.generations.iter().map(|g| g.reason.as_str()).find(|r| r.contains("storage roots"));
        assert!(reason.unwrap().contains("elsewhere"), "{refused:#?}");
        let _ = c.cancel_job(pb::CancelJobRequest { job_id: outside_id.clone() }).await;
        assert!(!dir.path().join("elsewhere").exists(), "the refused job wrote outside the root");

        // A job inside the root runs to the end on the same worker.
        let inside_id = submit(&inside);
        let done = wait_for(&mut c, &inside_id, Duration::from_secs(180), |s| {
            is_phase(s, pb::JobPhase::Succeeded) || is_phase(s, pb::JobPhase::Failed)
        })
        .await;
        assert!(is_phase(&done, pb::JobPhase::Succeeded), "{done:#?}");
        assert!(done.output_dir.starts_with(allowed.to_str().unwrap()), "{}", done.output_dir);
    });
}
