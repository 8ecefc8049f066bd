//! Helpers shared by the integration tests: real `flotilla` processes on
//! 127.0.0.1, job files in temporary folders, and readers for what a job
//! leaves behind.
#![allow(dead_code)]

pub mod cluster;
pub mod mlflow;
pub mod slurm;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use flotilla::proto::auth::{AuthChannel, Credentials, TOKEN_ENV, TOKEN_FILE_ENV};
use flotilla::proto::v1 as pb;
use flotilla::proto::v1::job_service_client::JobServiceClient;
use tonic::transport::Channel;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_flotilla")
}

/// The TLS folder of this test binary: one CA, made once by `flotilla certs
/// init`, that every coordinator, worker and CLI it starts (through [`cmd`])
/// and its own in-process clients (see [`channel`]) use.
pub fn tls_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = Command::new(bin()).args(["certs", "init", dir.to_str().unwrap()]).output().expect("run flotilla");
        assert!(out.status.success(), "flotilla certs init: {}", String::from_utf8_lossy(&out.stderr));
        let tls = flotilla::proto::tls::Tls::load(&flotilla::proto::tls::TlsPaths::in_dir(
            &dir,
            flotilla::proto::tls::Role::Client,
        ))
        .unwrap();
        assert!(flotilla::proto::tls::set_dialing(Some(&tls)), "this test process already dials in plaintext");
        dir
    })
}

/// `flotilla` with this test binary's TLS folder and the admin token in
/// its environment.
pub fn cmd() -> Command {
    let mut c = Command::new(bin());
    c.env("FLOTILLA_TLS_DIR", tls_dir());
    with_token(&mut c);
    c
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The admin token of every coordinator these tests start (given to it
/// with `--admin-token-file`), carried by every process and client they
/// start: tests run with tokens required, as users do.
pub fn admin_token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| flotilla::coordinator::auth::new_token().expect("random source").0)
}

/// The file holding [`admin_token`].
pub fn admin_token_file() -> &'static Path {
    static FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("admin-{}.token", std::process::id()));
        std::fs::write(&path, format!("{}\n", admin_token())).expect("write the test admin token");
        path
    })
}

/// [`admin_token`] as client credentials.
pub fn credentials() -> Credentials {
    Credentials::token(admin_token()).unwrap()
}

/// `channel` carrying the admin token.
pub fn authed(channel: Channel) -> AuthChannel {
    credentials().wrap(channel)
}

/// A channel to `url` with this test binary's client certificate (mutual
/// TLS; plaintext to an `http://` URL), carrying the admin token.
pub async fn channel(url: &str) -> Result<AuthChannel, String> {
    tls_dir();
    let channel = if url.starts_with("http://") {
        // A coordinator started with --insecure (see `spawn_coordinator_from`): plaintext.
        let endpoint = Channel::from_shared(url.to_string()).map_err(|e| e.to_string())?;
        endpoint.connect().await.map_err(|e| flotilla::proto::leader::error_chain(&e))?
    } else {
        flotilla::proto::leader::channel(url, Duration::from_secs(5)).await?
    };
    Ok(authed(channel))
}

/// An HTTP client of the coordinator's port with this test binary's CA
/// and client certificate, carrying `token` (none: no token at all).
pub fn http_client(token: Option<&str>) -> reqwest::ClientBuilder {
    let dir = tls_dir();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(dir.join("ca.pem")).unwrap()).unwrap();
    let mut pem = std::fs::read(dir.join("client.pem")).unwrap();
    pem.extend(std::fs::read(dir.join("client.key")).unwrap());
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = token {
        headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
    }
    reqwest::Client::builder()
        .tls_certs_only([ca])
        .identity(reqwest::Identity::from_pem(&pem).unwrap())
        .default_headers(headers)
}

/// `cmd` with the admin token in its environment.
pub fn with_token(cmd: &mut Command) -> &mut Command {
    cmd.env(TOKEN_ENV, admin_token()).env_remove(TOKEN_FILE_ENV)
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Starts `flotilla coordinator` on a free loopback port with short leases;
/// returns it and its URL.
pub fn coordinator(dir: &Path) -> (Proc, String) {
    coordinator_with(dir, &["--lease-ms", "1500", "--heartbeat-ms", "200", "--start-grace-ms", "300"])
}

/// Starts `flotilla coordinator` on a free loopback port with `args` (none:
/// the defaults); returns it and its URL.
pub fn coordinator_with(dir: &Path, args: &[&str]) -> (Proc, String) {
    let data = dir.join("coordinator-data");
    let base = ["--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()];
    spawn_coordinator(&dir.join("coordinator.log"), &[&base[..], args].concat())
}

/// Starts `flotilla coordinator ARGS`, logging to `log`; returns it and the
/// URL from the first line it prints.
pub fn spawn_coordinator(log: &Path, args: &[&str]) -> (Proc, String) {
    spawn_coordinator_from(cmd(), log, args)
}

/// [`spawn_coordinator`] from `command` (a `flotilla` with its own
/// environment). The URL is `http://` for a coordinator started with
/// `--insecure`, `https://` otherwise.
pub fn spawn_coordinator_from(mut command: Command, log: &Path, args: &[&str]) -> (Proc, String) {
    let log = log.to_path_buf();
    command.arg("coordinator").args(args);
    if !args.iter().any(|a| *a == "--insecure" || *a == "--admin-token-file") {
        command.arg("--admin-token-file").arg(admin_token_file());
    }
    let mut child =
        command.stdout(Stdio::piped()).stderr(std::fs::File::create(&log).unwrap()).spawn().expect("start coordinator");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr =
        line.trim().strip_prefix("coordinator listening on ").unwrap_or_else(|| panic!("odd first line {line:?}"));
    let scheme = if args.contains(&"--insecure") { "http" } else { "https" };
    (Proc { child, log }, format!("{scheme}://{addr}"))
}

/// Starts `flotilla worker` against `url`, logging to `dir/<name>.log`.
pub fn worker(dir: &Path, url: &str, name: &str) -> Proc {
    worker_with_args(dir, url, name, &["--op-timeout-s", "20"])
}

/// Starts `flotilla worker` against `url` with `args` after the
/// coordinator and a loopback data port, logging to `dir/<name>.log`.
pub fn worker_with_args(dir: &Path, url: &str, name: &str, args: &[&str]) -> Proc {
    let log = dir.join(format!("{name}.log"));
    let child = cmd()
        .args(["worker", "--coordinator", url, "--data-addr", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start worker");
    Proc { child, log }
}

/// Polls `p`'s log until `found` holds for it (or `within` passes: then
/// panics with the log); returns the log.
pub fn wait_log(p: &Proc, what: &str, within: Duration, found: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + within;
    loop {
        let log = p.log_text();
        if found(&log) {
            return log;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes `yaml` as `dir/<name>.yaml`.
pub fn job_file(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    path
}

/// `flotilla token create` with the admin token; the new token.
pub fn create_token(dir: &Path, url: &str, role: &str, name: &str) -> String {
    let out = flotilla(dir, &["token", "create", "--role", role, "--name", name, "--coordinator", url]);
    assert!(out.status.success(), "token create: {}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(token.starts_with("flt_"), "{token}");
    token
}

/// `flotilla ARGS` run in `cwd`, to completion.
pub fn flotilla(cwd: &Path, args: &[&str]) -> Output {
    cmd().args(args).current_dir(cwd).output().expect("run flotilla")
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// A client of the coordinator at `url`, once it leads (a replica that has
/// just started refuses calls until it has won its election).
pub async fn client(url: &str) -> JobServiceClient<AuthChannel> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match channel(url).await.map(JobServiceClient::new) {
            Ok(mut c) => {
                let leads = c.get_leader(pb::GetLeaderRequest {}).await.is_ok_and(|r| r.into_inner().is_leader);
                if leads {
                    return c;
                }
                assert!(Instant::now() < deadline, "coordinator at {url} does not lead");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) if Instant::now() > deadline => panic!("coordinator at {url} unreachable: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Polls the job until `done` holds or `timeout` passes (then panics with
/// the last status).
pub async fn wait_for(
    c: &mut JobServiceClient<AuthChannel>,
    job: &str,
    timeout: Duration,
    done: impl Fn(&pb::JobStatus) -> bool,
) -> pb::JobStatus {
    let deadline = Instant::now() + timeout;
    loop {
        let s = c.get_job(pb::GetJobRequest { job_id: job.into() }).await.unwrap().into_inner();
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "timed out waiting on {job}; last status {s:#?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn is_phase(s: &pb::JobStatus, p: pb::JobPhase) -> bool {
    s.phase == p as i32
}

/// Tensors of a safetensors file (f32 only), by name.
pub fn read_tensors(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let v = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            (name, v)
        })
        .collect()
}

/// (step, loss, world_size) per line of a run's metrics.jsonl.
pub fn read_metrics(path: &Path) -> Vec<(u64, f64, u64)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap(), v["world_size"].as_u64().unwrap())
        })
        .collect()
}

/// Asserts two parameter sets match within a relative tolerance.
pub fn assert_params_close(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>, rtol: f64) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, xa) in a {
        let xb = &b[name];
        assert_eq!(xa.len(), xb.len(), "{name}");
        for (i, (p, q)) in xa.iter().zip(xb).enumerate() {
            let (p, q) = (f64::from(*p), f64::from(*q));
            let tol = rtol * p.abs().max(q.abs()).max(1e-3);
            assert!((p - q).abs() <= tol, "{name}[{i}]: {p} vs {q}");
        }
    }
}

/// Process ids whose parent is `pid`.
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) {
            // Fields after the command name (which may contain spaces).
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let ppid: i32 = rest.split(' ').nth(1).unwrap().parse().unwrap();
            if ppid == pid {
                out.push(child);
            }
        }
    }
    out
}

/// Whether `pid` is a live process (a zombie counts as gone).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat[stat.rfind(')').unwrap() + 2..].starts_with('Z'),
        Err(_) => false,
    }
}

/// The PyTorch oracle's interpreter, `.deps/venv/bin/python`. Panics (never
/// skips) when it is missing or cannot import torch: `scripts/test` installs
/// it, so a missing venv is a broken setup, not a reason to pass.
pub fn oracle_python() -> PathBuf {
    let py = repo().join(".deps/venv/bin/python");
    let ok = Command::new(&py)
        .args(["-c", "import torch, safetensors, numpy"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "the PyTorch oracle needs {} with torch, safetensors and numpy: run `./scripts/bootstrap --python` \
         (./scripts/test does this)",
        py.display()
    );
    py
}

/// Writes a `features` data file (`x` f32 [N, inputs], `y` i64 [N]) with
/// flotilla's synthetic teacher-labelled data for an MLP of `layers`.
pub fn write_features(path: &Path, layers: &[usize], seed: u64, samples: u64) {
    use flotilla::trainer::data::{synthetic_classes, Dataset};
    let spec = flotilla::jobspec::MlpSpec { layers: layers.to_vec() };
    let Dataset::Classes { inputs, x, y } = synthetic_classes(&spec, seed, samples) else { unreachable!() };
    let xb: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let yb: Vec<u8> = y.iter().flat_map(|v| v.to_le_bytes()).collect();
    let n = y.len();
    let views = vec![
        ("x", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n, inputs], &xb).unwrap()),
        ("y", safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![n], &yb).unwrap()),
    ];
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Writes a `tokens` data file (u16, little-endian) of `samples` chains from
/// flotilla's synthetic token generator for `gpt`.
pub fn write_tokens(path: &Path, gpt: &flotilla::jobspec::GptSpec, seed: u64, samples: u64) {
    use flotilla::trainer::data::{synthetic_sequences, Dataset};
    let Dataset::Sequences { tokens, .. } = synthetic_sequences(gpt, seed, samples) else { unreachable!() };
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| (*t as u16).to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

/// One step of a loss curve: 1-based step, loss, and the step's wall time.
#[derive(Debug, Clone, Copy)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f64,
    pub seconds: f64,
}

/// A flotilla run's metrics.jsonl as step records (seconds from samples/s).
pub fn read_steps(path: &Path, global_batch: usize) -> Vec<StepRecord> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            StepRecord {
                step: v["step"].as_u64().unwrap(),
                loss: v["loss"].as_f64().unwrap(),
                seconds: global_batch as f64 / v["samples_per_sec"].as_f64().unwrap(),
            }
        })
        .collect()
}

/// Runs `flotilla run JOB --workers N` in `dir` and returns its steps.
pub fn flotilla_steps(dir: &Path, job: &Path, name: &str, workers: usize, global_batch: usize) -> Vec<StepRecord> {
    let _ = std::fs::remove_dir_all(dir.join("runs"));
    let out = flotilla(dir, &["run", job.to_str().unwrap(), "--workers", &workers.to_string()]);
    assert!(
        out.status.success(),
        "flotilla run on {workers} workers: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    read_steps(&dir.join(format!("runs/{name}-1/metrics.jsonl")), global_batch)
}

/// Writes the job's spec as JSON (`flotilla validate --json`) and its
/// initial weights (`flotilla export-init`) into `dir`; returns their paths.
pub fn oracle_inputs(dir: &Path, job: &Path) -> (PathBuf, PathBuf) {
    let out = flotilla(dir, &["validate", "--json", job.to_str().unwrap()]);
    assert!(out.status.success(), "validate --json: {}", String::from_utf8_lossy(&out.stderr));
    let spec = dir.join("spec.json");
    std::fs::write(&spec, &out.stdout).unwrap();
    let init = dir.join("init.safetensors");
    let out = flotilla(dir, &["export-init", job.to_str().unwrap(), init.to_str().unwrap()]);
    assert!(out.status.success(), "export-init: {}", String::from_utf8_lossy(&out.stderr));
    (spec, init)
}

/// Runs the PyTorch reference (`scripts/oracle/reference.py`) with `world`
/// processes (DDP on gloo when > 1) and returns its steps.
pub fn reference_steps(dir: &Path, spec: &Path, init: &Path, world: usize) -> Vec<StepRecord> {
    let out_path = dir.join(format!("reference-{world}.jsonl"));
    let out = Command::new(oracle_python())
        .arg(repo().join("scripts/oracle/reference.py"))
        .args(["--spec", spec.to_str().unwrap(), "--init", init.to_str().unwrap()])
        .args(["--out", out_path.to_str().unwrap(), "--world", &world.to_string()])
        .current_dir(dir)
        .output()
        .expect("start the PyTorch reference");
    assert!(
        out.status.success(),
        "reference with {world} processes: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&out_path).unwrap();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            StepRecord {
                step: v["step"].as_u64().unwrap(),
                loss: v["loss"].as_f64().unwrap(),
                seconds: v["seconds"].as_f64().unwrap(),
            }
        })
        .collect()
}

/// Samples per second over the steps after the first `skip` (start-up,
/// first-touch allocation), from the steps' own wall times.
pub fn steady_samples_per_sec(steps: &[StepRecord], global_batch: usize, skip: usize) -> f64 {
    let rest = &steps[skip.min(steps.len().saturating_sub(1))..];
    let secs: f64 = rest.iter().map(|s| s.seconds).sum();
    (rest.len() * global_batch) as f64 / secs
}

/// Starts `flotilla worker` with extra environment variables.
pub fn worker_with_env(dir: &Path, url: &str, name: &str, env: &[(String, String)]) -> Proc {
    let log = dir.join(format!("{name}.log"));
    let child = cmd()
        .args(["worker", "--coordinator", url, "--data-addr", "127.0.0.1:0", "--op-timeout-s", "20"])
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start worker");
    Proc { child, log }
}

/// A real S3-compatible server (s3s-fs, installed by `scripts/bootstrap --s3`)
/// on a free loopback port, storing buckets as folders under `root`.
pub struct S3Server {
    pub proc: Proc,
    pub root: PathBuf,
    pub endpoint: String,
}

pub const S3_KEY: &str = "flotilla-test";
pub const S3_SECRET: &str = "flotilla-test-secret";

impl S3Server {
    pub fn start(dir: &Path, buckets: &[&str]) -> S3Server {
        let exe = repo().join(".deps/s3s-fs/bin/s3s-fs");
        assert!(exe.exists(), "{} is missing: run ./scripts/bootstrap --s3", exe.display());
        let root = dir.join("s3-root");
        for b in buckets {
            std::fs::create_dir_all(root.join(b)).unwrap();
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = dir.join("s3s-fs.log");
        let child = Command::new(exe)
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", S3_KEY])
            .args(["--secret-key", S3_SECRET])
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start s3s-fs");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not start: {}", std::fs::read_to_string(&log).unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }
        S3Server { proc: Proc { child, log }, root, endpoint: format!("http://127.0.0.1:{port}") }
    }

    /// The environment a worker needs to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", S3_KEY),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT", self.endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

/// `flotilla run JOB` in `cwd`, returned once its job is running, with the
/// rest of its stderr and the pids of its local workers.
pub fn start_run(cwd: &Path, job: &Path) -> (Child, std::io::Lines<BufReader<std::process::ChildStderr>>, Vec<i32>) {
    let mut run = Command::new(bin())
        .args(["run", job.to_str().unwrap()])
        .current_dir(cwd)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start flotilla run");
    let mut lines = BufReader::new(run.stderr.take().unwrap()).lines();
    let started = Instant::now();
    loop {
        let line = lines.next().expect("run ended before its job started").unwrap();
        if line.contains("running (job started)") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "job did not start");
    }
    let workers = children_of(run.id() as i32);
    (run, lines, workers)
}

/// Runs `yaml` to the end with `flotilla run` in `dir`, with
/// `FLOTILLA_STATS_DIR` set; returns each rank's statistics, in rank order.
pub fn run_with_stats(dir: &Path, yaml: &str) -> Vec<serde_json::Value> {
    let stats = dir.join("stats");
    std::fs::create_dir_all(&stats).unwrap();
    let job = job_file(dir, "job", yaml);
    let out = Command::new(bin())
        .args(["run", job.to_str().unwrap()])
        .current_dir(dir)
        .env("FLOTILLA_STATS_DIR", &stats)
        .output()
        .expect("run flotilla");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut ranks: Vec<serde_json::Value> = std::fs::read_dir(&stats)
        .unwrap()
        .map(|e| serde_json::from_slice(&std::fs::read(e.unwrap().path()).unwrap()).unwrap())
        .collect();
    ranks.sort_by_key(|r| r["rank"].as_u64());
    ranks
}
