//! The registry hand-off, end to end with real processes: a real MLflow
//! server (its metrics, versions, aliases and artifacts read back with
//! MLflow's own Python client), the built-in registry on local files and on
//! s3s-fs, MLflow stopped at the hand-off and started again, and the
//! coordinator's Raft leader killed in the middle of a hand-off.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use flotilla::proto::v1 as pb;
use support::cluster::*;
use support::mlflow::{inspect, MlflowServer, SlowProxy};
use support::*;

const STEPS: u64 = 300;

/// A job with `registry` (a YAML flow mapping) that trains for a few
/// seconds (long enough for its tracking run to appear while it trains).
fn job_yaml(name: &str, checkpoint_url: &str, registry: &str) -> String {
    format!(
        "name: {name}
model: {{kind: mlp, layers: [16, 768, 768, 4]}}
data: {{kind: synthetic, seed: 7, samples: 4096}}
train:
  steps: {STEPS}
  global_batch: 256
  micro_batch: 128
  seed: 0
  optimizer: {{lr: 0.003}}
  schedule: {{warmup_steps: 20}}
workers: {{min: 1, max: 2}}
checkpoint: {{url: '{checkpoint_url}', every: 100, keep: 2}}
registry: {registry}
eval: {{data: {{kind: synthetic, seed: 8, samples: 512}}, every: 100, batches: 2, batch: 128}}
"
    )
}

fn submit(dir: &Path, coordinator: &str, yaml: &str) -> String {
    let path = job_file(dir, "job", yaml);
    let out = flotilla(dir, &["submit", path.to_str().unwrap(), "--coordinator", coordinator]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Polls the job until `done`; panics after `within`.
fn wait(
    addrs: &[String],
    id: &str,
    within: Duration,
    what: &str,
    done: impl Fn(&pb::JobStatus) -> bool,
) -> pb::JobStatus {
    runtime().block_on(wait_job(addrs, id, within, what, done))
}

fn phase(s: &pb::JobStatus) -> pb::JobPhase {
    pb::JobPhase::try_from(s.phase).unwrap()
}

/// (step, loss) per line of a metrics.jsonl.
fn losses(path: &Path) -> Vec<(u64, f64)> {
    read_metrics(path).into_iter().map(|(step, loss, _)| (step, loss)).collect()
}

/// The steps and losses MLflow holds for a version's run.
fn run_losses(v: &serde_json::Value) -> Vec<(u64, f64)> {
    v["loss"].as_array().unwrap().iter().map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap())).collect()
}

#[test]
fn mlflow_gets_metrics_while_training_and_one_version_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let ml = MlflowServer::start(&dir.path().join("mlflow"));
    let (_coordinator, url) = coordinator(dir.path());
    let _workers = [worker(dir.path(), &url, "worker-a"), worker(dir.path(), &url, "worker-b")];
    let registry = format!(
        "{{kind: mlflow, url: '{}', model: digits-mlp, experiment: registry-tests, alias: candidate, tags: {{team: tests}}}}",
        ml.url()
    );
    let id = submit(dir.path(), &url, &job_yaml("tracked", "runs", &registry));
    let addrs = [url.clone()];

    // The run exists, with metrics in it, while the job still trains.
    let training = wait(&addrs, &id, Duration::from_secs(120), "a tracking run while training", tracked_or_trained);
    assert!(still_training(&training), "the job was trained before its tracking run appeared: {training:#?}");
    let done = wait(&addrs, &id, Duration::from_secs(120), "the job to end", client_settled);
    assert_eq!(phase(&done), pb::JobPhase::Succeeded, "{done:#?}");
    let reg = done.registration.clone().unwrap();
    assert_eq!((reg.model.as_str(), reg.version), ("digits-mlp", 1));
    assert_eq!(reg.run_id, training.registration.unwrap().tracking_run, "the version belongs to the training run");

    let out = dir.path().join("downloaded");
    let info = inspect(&ml.url(), "digits-mlp", "candidate", &out);
    let versions = info["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 1, "{info:#}");
    let v = &versions[0];
    assert_eq!(v["run_id"], reg.run_id.as_str());
    assert_eq!(info["alias_version"], 1);
    assert_eq!(v["run_status"], "FINISHED");
    assert_eq!(v["run_tags"]["flotilla.job_id"], id.as_str());
    assert_eq!(v["tags"]["team"], "tests");
    assert_eq!(v["params"]["train.steps"], STEPS.to_string().as_str());

    // The run's loss curve is the job's, one point per step.
    let job_dir = dir.path().join("runs").join(&id);
    let history = losses(&job_dir.join("final/metrics.jsonl"));
    assert_eq!(history.len() as u64, STEPS);
    assert_eq!(run_losses(v), history);
    // And so is its validation loss, every 100 steps.
    let evals: Vec<(u64, f64)> = std::fs::read_to_string(job_dir.join("final/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|m| Some((m["step"].as_u64().unwrap(), m["eval_loss"].as_f64()?)))
        .collect();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), vec![100, 200, 300]);
    let run_evals: Vec<(u64, f64)> =
        v["eval_loss"].as_array().unwrap().iter().map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap())).collect();
    assert_eq!(run_evals, evals);
    // Logged in batches while training and at the hand-off, not per step.
    let batches = ml.requests("/runs/log-batch");
    assert!((1..=STEPS as usize / 10).contains(&batches), "{batches} log-batch calls for {STEPS} steps");

    // The artifacts are the final weights, byte for byte, through MLflow's
    // client and through `flotilla models download`.
    let weights = std::fs::read(job_dir.join("final/model.safetensors")).unwrap();
    let downloaded = Path::new(info["downloaded"].as_str().unwrap());
    assert_eq!(std::fs::read(downloaded.join("model.safetensors")).unwrap(), weights);
    let ours = dir.path().join("ours");
    let o = flotilla(
        dir.path(),
        &["models", "download", "digits-mlp@candidate", "--registry", &ml.url(), "--out", ours.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(ours.join("model.safetensors")).unwrap(), weights);
    let lineage: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ours.join("lineage.json")).unwrap()).unwrap();
    assert_eq!(lineage["job_id"], id.as_str());
    assert_eq!(lineage["generations"].as_array().unwrap().len() as u64, done.generation);
    let job_yaml_back = std::fs::read_to_string(ours.join("job.yaml")).unwrap();
    assert!(job_yaml_back.contains("name: tracked"), "{job_yaml_back}");
}

/// Pending (waiting for its workers), running or waiting: not trained yet.
fn still_training(s: &pb::JobStatus) -> bool {
    matches!(phase(s), pb::JobPhase::Pending | pb::JobPhase::Running | pb::JobPhase::Waiting)
}

/// The job has its tracking run, or is past training without one.
fn tracked_or_trained(s: &pb::JobStatus) -> bool {
    !still_training(s) || s.registration.as_ref().is_some_and(|r| !r.tracking_run.is_empty())
}

fn client_settled(s: &pb::JobStatus) -> bool {
    matches!(
        phase(s),
        pb::JobPhase::Succeeded | pb::JobPhase::Failed | pb::JobPhase::Cancelled | pb::JobPhase::TrainedNotRegistered
    )
}

#[test]
fn mlflow_down_at_the_hand_off_leaves_the_model_trained_not_registered_until_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut ml = MlflowServer::start(&dir.path().join("mlflow"));
    let (_coordinator, url) =
        coordinator_with(dir.path(), &[&TIMINGS[..], &["--handoff-retry-max-ms", "1000"]].concat());
    let _workers = [worker(dir.path(), &url, "worker-a"), worker(dir.path(), &url, "worker-b")];
    let registry = format!("{{kind: mlflow, url: '{}', model: outage, alias: candidate}}", ml.url());
    let id = submit(dir.path(), &url, &job_yaml("outage", "runs", &registry));
    let addrs = [url.clone()];

    let training = wait(&addrs, &id, Duration::from_secs(120), "a tracking run", tracked_or_trained);
    assert!(still_training(&training), "the job was trained before its tracking run appeared: {training:#?}");
    let tracking_run = training.registration.unwrap().tracking_run;
    ml.stop();

    let failed = wait(&addrs, &id, Duration::from_secs(120), "the failed hand-off", client_settled);
    assert_eq!(phase(&failed), pb::JobPhase::TrainedNotRegistered, "{failed:#?}");
    assert!(failed.message.contains("trained, not registered"), "{}", failed.message);
    assert!(!failed.final_model.is_empty(), "the trained model is kept");
    let status = flotilla(dir.path(), &["status", &id, "--coordinator", &url]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("trained-not-registered") && text.contains("not registered in"), "{text}");
    // A retry by hand while MLflow is still down fails, visibly.
    let by_hand = flotilla(dir.path(), &["register", &id, "--coordinator", &url]);
    assert_eq!(by_hand.status.code(), Some(3), "{}", String::from_utf8_lossy(&by_hand.stdout));
    // And the coordinator keeps retrying by itself.
    wait(&addrs, &id, Duration::from_secs(30), "more attempts", |s| s.registration.as_ref().unwrap().attempts >= 3);

    ml.restart();
    let done =
        wait(&addrs, &id, Duration::from_secs(60), "the retried hand-off", |s| phase(s) == pb::JobPhase::Succeeded);
    let reg = done.registration.unwrap();
    assert_eq!((reg.version, reg.run_id.as_str()), (1, tracking_run.as_str()), "the training run gets the version");
    let again = flotilla(dir.path(), &["register", &id, "--coordinator", &url]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("outage version 1"),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );

    let info = inspect(&ml.url(), "outage", "candidate", &dir.path().join("downloaded"));
    assert_eq!(info["versions"].as_array().unwrap().len(), 1, "exactly one version: {info:#}");
    let v = &info["versions"][0];
    // Steps logged before the outage and those the hand-off added: every
    // step is there. A batch cut by the outage may have landed twice.
    let mut steps: Vec<u64> = run_losses(v).into_iter().map(|(s, _)| s).collect();
    steps.dedup();
    assert_eq!(steps, (1..=STEPS).collect::<Vec<_>>());
    let weights = std::fs::read(dir.path().join("runs").join(&id).join("final/model.safetensors")).unwrap();
    let downloaded = Path::new(info["downloaded"].as_str().unwrap());
    assert_eq!(std::fs::read(downloaded.join("model.safetensors")).unwrap(), weights);
}

/// `flotilla run` of a job handing over to the built-in registry at
/// `registry_url`; returns the job's output folder as a URL.
fn run_builtin(dir: &Path, checkpoint_url: &str, registry_url: &str, env: &[(String, String)]) -> String {
    let registry = format!("{{kind: builtin, url: '{registry_url}', model: digits, alias: candidate}}");
    let job = job_file(dir, "builtin", &job_yaml("builtin", checkpoint_url, &registry));
    let out = std::process::Command::new(bin())
        .args(["run", job.to_str().unwrap(), "--workers", "1"])
        .envs(env.iter().cloned())
        .current_dir(dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("registered:  digits version"), "{stdout}");
    format!("{checkpoint_url}/builtin-1")
}

fn show_json(dir: &Path, reference: &str, registry: &str, env: &[(String, String)]) -> serde_json::Value {
    let o = std::process::Command::new(bin())
        .args(["models", "show", reference, "--json", "--registry", registry])
        .envs(env.iter().cloned())
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn builtin_registry_on_local_files() {
    let dir = tempfile::tempdir().unwrap();
    let registry = format!("file://{}/models", dir.path().display());
    run_builtin(dir.path(), "runs", &registry, &[]);
    let v1 = dir.path().join("models/digits/1");
    let weights = std::fs::read(dir.path().join("runs/builtin-1/final/model.safetensors")).unwrap();
    assert_eq!(std::fs::read(v1.join("model.safetensors")).unwrap(), weights);
    assert_eq!(losses(&v1.join("metrics.jsonl")), losses(&dir.path().join("runs/builtin-1/final/metrics.jsonl")));
    assert_eq!(losses(&v1.join("metrics.jsonl")).len() as u64, STEPS);
    let first = show_json(dir.path(), "digits@candidate", &registry, &[]);
    assert_eq!((first["version"].as_u64(), first["job_id"].as_str()), (Some(1), Some("builtin-1")));

    // The same job file run again (on a new embedded coordinator, where the
    // job id is builtin-1 again) is a new version; the alias moves, version
    // 1 stays as it was.
    run_builtin(dir.path(), "runs2", &registry, &[]);
    assert_eq!(show_json(dir.path(), "digits@candidate", &registry, &[])["version"], 2);
    assert_eq!(std::fs::read(v1.join("model.safetensors")).unwrap(), weights);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("models/digits/index.json")).unwrap()).unwrap();
    assert_eq!(index["versions"].as_array().unwrap().len(), 2);
}

#[test]
fn builtin_registry_on_s3() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(dir.path(), &["runs", "models"]);
    let env = s3.env();
    run_builtin(dir.path(), "s3://runs/jobs", "s3://models/registry", &env);
    let v1 = s3.root.join("models/registry/digits/1");
    let final_dir = s3.root.join("runs/jobs/builtin-1/final");
    assert_eq!(
        std::fs::read(v1.join("model.safetensors")).unwrap(),
        std::fs::read(final_dir.join("model.safetensors")).unwrap()
    );
    assert_eq!(losses(&v1.join("metrics.jsonl")).len() as u64, STEPS);
    let lineage: serde_json::Value = serde_json::from_slice(&std::fs::read(v1.join("lineage.json")).unwrap()).unwrap();
    assert_eq!(lineage["job_id"], "builtin-1");
    assert_eq!(show_json(dir.path(), "digits@candidate", "s3://models/registry", &env)["version"], 1);

    // Version numbers are taken with conditional writes, which the server
    // must honour for two jobs never to share one.
    for (k, v) in &env {
        std::env::set_var(k, v);
    }
    let claims = flotilla_trainer::storage::Storage::open("s3://models/registry/digits/claims").unwrap();
    let rt = runtime();
    assert!(!rt.block_on(claims.put_new("1", b"another job".to_vec())).unwrap(), "claim 1 is taken");
    assert!(rt.block_on(claims.put_new("99", b"another job".to_vec())).unwrap());
    assert_eq!(
        rt.block_on(claims.get("1")).unwrap(),
        std::fs::read(s3.root.join("models/registry/digits/claims/1")).unwrap()
    );
}

#[test]
fn killing_the_leader_during_the_hand_off_registers_one_version() {
    let dir = tempfile::tempdir().unwrap();
    let ml = MlflowServer::start(&dir.path().join("mlflow"));
    // Every request to MLflow waits 250 ms: a hand-off takes seconds.
    let proxy = SlowProxy::start(ml.port, Duration::from_millis(250));
    let ports = free_ports(3);
    let mut replicas: Vec<Option<Proc>> = (1..=3).map(|id| Some(replica(dir.path(), id, &ports))).collect();
    let addrs: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
    let list = addrs.join(",");
    let _workers = [worker(dir.path(), &list, "worker-a"), worker(dir.path(), &list, "worker-b")];
    let registry = format!("{{kind: mlflow, url: '{}', model: failover, alias: candidate}}", proxy.url());
    let id = submit(dir.path(), &list, &job_yaml("failover", "runs", &registry));

    let handing = wait(&addrs, &id, Duration::from_secs(180), "the hand-off", |s| {
        phase(s) != pb::JobPhase::Running && phase(s) != pb::JobPhase::Pending
    });
    assert_eq!(phase(&handing), pb::JobPhase::Registering, "{handing:#?}");
    let start = proxy.count();
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.count() < start + 4 {
        assert!(Instant::now() < deadline, "the hand-off sent no requests");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (leader, _) = runtime().block_on(leader_client(&addrs));
    let before_kill = runtime().block_on(job(&addrs, &id));
    assert_eq!(phase(&before_kill), pb::JobPhase::Registering, "the hand-off ended before the kill: {before_kill:#?}");
    let index = addrs.iter().position(|a| *a == leader).unwrap();
    replicas[index].take().unwrap().kill9();

    let done = wait(&addrs, &id, Duration::from_secs(120), "the job to end", client_settled);
    assert_eq!(phase(&done), pb::JobPhase::Succeeded, "{done:#?}");
    let info = inspect(&ml.url(), "failover", "candidate", &dir.path().join("downloaded"));
    let versions = info["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 1, "exactly one version: {info:#}");
    assert_eq!(versions[0]["version"].as_u64(), Some(done.registration.unwrap().version));
    let weights = std::fs::read(dir.path().join("runs").join(&id).join("final/model.safetensors")).unwrap();
    let downloaded = Path::new(info["downloaded"].as_str().unwrap());
    assert_eq!(std::fs::read(downloaded.join("model.safetensors")).unwrap(), weights);
}
