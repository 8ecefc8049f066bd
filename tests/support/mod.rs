//! Helpers shared by the integration tests: real `flotilla` processes on
//! 127.0.0.1, job files in temporary folders, and readers for what a job
//! leaves behind.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use flotilla::proto::v1 as pb;
use flotilla::proto::v1::job_service_client::JobServiceClient;
use tonic::transport::Channel;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_flotilla")
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
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
    let log = dir.join("coordinator.log");
    let mut child = Command::new(bin())
        .args(["coordinator", "--listen", "127.0.0.1:0", "--lease-ms", "1500", "--heartbeat-ms", "200"])
        .args(["--start-grace-ms", "300"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start coordinator");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr =
        line.trim().strip_prefix("coordinator listening on ").unwrap_or_else(|| panic!("odd first line {line:?}"));
    let url = format!("http://{addr}");
    (Proc { child, log }, url)
}

/// Starts `flotilla worker` against `url`, logging to `dir/<name>.log`.
pub fn worker(dir: &Path, url: &str, name: &str) -> Proc {
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(bin())
        .args(["worker", "--coordinator", url, "--data-addr", "127.0.0.1:0", "--op-timeout-s", "20"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start worker");
    Proc { child, log }
}

/// Writes `yaml` as `dir/<name>.yaml`.
pub fn job_file(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    path
}

/// `flotilla ARGS` run in `cwd`, to completion.
pub fn flotilla(cwd: &Path, args: &[&str]) -> Output {
    Command::new(bin()).args(args).current_dir(cwd).output().expect("run flotilla")
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

pub async fn client(url: &str) -> JobServiceClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match JobServiceClient::connect(url.to_string()).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("coordinator at {url} unreachable: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Polls the job until `done` holds or `timeout` passes (then panics with
/// the last status).
pub async fn wait_for(
    c: &mut JobServiceClient<Channel>,
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
