//! The scale simulation: three coordinator replicas as separate processes,
//! many workers registered on the leader and heartbeating at a fixed rate
//! (open loop, spread evenly), heartbeat latency and each replica's CPU.

use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_coordinator::raft::{RaftOptions, RaftStore};
use flotilla_coordinator::{serve_with_routes, CoordinatorConfig};
use flotilla_proto::v1 as pb;
use flotilla_proto::v1::job_service_client::JobServiceClient;
use flotilla_proto::v1::worker_service_client::WorkerServiceClient;
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use super::stats::{ms, table, Sample};

/// Set in a child process: `<id>,<port 1>,<port 2>,<port 3>,<data dir>`
/// makes it run replica `id` instead of the bench.
pub const REPLICA_ENV: &str = "FLOTILLA_BENCH_REPLICA";

/// The replicas' lease: long enough that the first workers registered do
/// not lapse while the rest register (heartbeats cost the same whatever the
/// lease).
const LEASE: Duration = Duration::from_secs(60);

/// HTTP/2 connections the load is spread over.
const CHANNELS: usize = 32;
/// Registrations in flight at once.
const REGISTER_CONCURRENCY: usize = 64;
/// How many times one registration is sent again after an error.
const REGISTER_TRIES: usize = 5;

/// The simulated fleet.
pub struct Load {
    workers: usize,
    /// Each worker heartbeats once per period.
    period: Duration,
    duration: Duration,
}

impl Load {
    pub fn full() -> Load {
        Load { workers: 10_000, period: Duration::from_secs(1), duration: Duration::from_secs(20) }
    }

    pub fn smoke() -> Load {
        Load { workers: 200, period: Duration::from_secs(1), duration: Duration::from_secs(2) }
    }
}

/// Runs one replica until stdin closes (the bench ended or died).
pub fn replica_main(spec: &str) {
    let parts: Vec<&str> = spec.splitn(5, ',').collect();
    assert_eq!(parts.len(), 5, "{REPLICA_ENV}=<id>,<port>,<port>,<port>,<dir>, got {spec}");
    let id: u64 = parts[0].parse().expect("replica id");
    let ports: Vec<u16> = parts[1..4].iter().map(|p| p.parse().expect("port")).collect();
    let peers: BTreeMap<u64, String> =
        ports.iter().enumerate().map(|(i, p)| (i as u64 + 1, format!("http://127.0.0.1:{p}"))).collect();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", ports[id as usize - 1])).await.expect("bind");
        let opts = RaftOptions::new(id, parts[4], peers[&id].clone()).with_peers(peers.clone());
        let store = RaftStore::open(opts).await.expect("open replica");
        let cfg = CoordinatorConfig { lease: LEASE, ..CoordinatorConfig::default() };
        let routes = store.routes();
        let _server = serve_with_routes(listener, Arc::new(store), cfg, CancellationToken::new(), routes)
            .await
            .expect("serve replica");
        tokio::task::spawn_blocking(|| {
            let mut buf = [0u8; 64];
            while std::io::stdin().read(&mut buf).is_ok_and(|n| n > 0) {}
        })
        .await
        .ok();
    });
    std::process::exit(0);
}

/// Three replica processes; killed when dropped.
struct Replicas {
    children: Vec<Child>,
    addrs: Vec<String>,
    _dir: TempDir,
}

impl Replicas {
    fn start() -> Replicas {
        let dir = tempfile::tempdir().expect("data dir");
        let listeners: Vec<std::net::TcpListener> =
            (0..3).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("free port")).collect();
        let ports: Vec<u16> = listeners.iter().map(|l| l.local_addr().unwrap().port()).collect();
        drop(listeners);
        let exe = std::env::current_exe().expect("bench binary");
        let children = (1..=3)
            .map(|id| {
                let data = dir.path().join(format!("r{id}"));
                let spec = format!("{id},{},{},{},{}", ports[0], ports[1], ports[2], data.display());
                std::process::Command::new(&exe)
                    .env(REPLICA_ENV, spec)
                    .stdin(Stdio::piped())
                    .spawn()
                    .expect("start replica process")
            })
            .collect();
        let addrs = ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
        Replicas { children, addrs, _dir: dir }
    }

    /// The index of the leading replica, once one says it leads.
    async fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for (i, addr) in self.addrs.iter().enumerate() {
                let Ok(mut client) = JobServiceClient::connect(addr.clone()).await else { continue };
                if client.get_leader(pb::GetLeaderRequest {}).await.is_ok_and(|r| r.into_inner().is_leader) {
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "no replica leads after 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn cpu(&self) -> Vec<f64> {
        self.children.iter().map(|c| cpu_seconds(c.id())).collect()
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        for c in &mut self.children {
            drop(c.stdin.take());
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// User plus system CPU time of process `pid` so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/<pid>/stat");
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

pub async fn run(load: &Load) {
    let replicas = Replicas::start();
    let leader = replicas.leader().await;
    let mut clients = Vec::new();
    for _ in 0..CHANNELS {
        let channel: Channel = Endpoint::from_shared(replicas.addrs[leader].clone())
            .unwrap()
            .tcp_nodelay(true)
            .connect()
            .await
            .expect("connect to the leader");
        clients.push(WorkerServiceClient::new(channel));
    }

    let t = Instant::now();
    let (ids, retried) = register_all(&clients, load.workers).await;
    let register_time = t.elapsed();
    eprintln!("registered {} workers in {register_time:?}", ids.len());

    let cpu0 = (replicas.cpu(), cpu_seconds(std::process::id()));
    let (sample, sent, errors, window) = heartbeat(&clients, &ids, load).await;
    let cpu1 = (replicas.cpu(), cpu_seconds(std::process::id()));
    let wall = window.as_secs_f64();
    let cores: Vec<f64> = cpu0.0.iter().zip(&cpu1.0).map(|(a, b)| (b - a) / wall).collect();
    let followers: Vec<String> = (0..3).filter(|i| *i != leader).map(|i| format!("{:.2}", cores[i])).collect();
    let target = load.workers as f64 / load.period.as_secs_f64();
    println!(
        "\nHeartbeats: {} workers registered on the leader in {:.1} s ({:.0}/s, {retried} sent again after an error), \
         then heartbeating once every {:?} for {:?} over {CHANNELS} HTTP/2 channels; 3 replicas as processes. \
         Latency from send to reply:\n",
        ids.len(),
        register_time.as_secs_f64(),
        ids.len() as f64 / register_time.as_secs_f64(),
        load.period,
        load.duration,
    );
    table(
        &[
            "workers",
            "target/s",
            "achieved/s",
            "errors",
            "p50",
            "p99",
            "max",
            "leader CPU (cores)",
            "followers CPU (cores)",
            "load generator CPU (cores)",
        ],
        &[vec![
            ids.len().to_string(),
            format!("{target:.0}"),
            format!("{:.0}", sample.count() as f64 / wall),
            errors.to_string(),
            ms(sample.q(0.5)),
            ms(sample.q(0.99)),
            ms(sample.max()),
            format!("{:.2}", cores[leader]),
            followers.join(", "),
            format!("{:.2}", (cpu1.1 - cpu0.1) / wall),
        ]],
    );
    assert_eq!(ids.len(), load.workers, "every worker registered");
    assert_eq!(errors, 0, "every heartbeat answered");
    assert_eq!(sample.count(), sent, "every heartbeat measured");
}

/// Registers `n` workers with unique data addresses; their ids in order,
/// and how many registrations failed and were sent again.
async fn register_all(clients: &[WorkerServiceClient<Channel>], n: usize) -> (Vec<String>, usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let retried = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..REGISTER_CONCURRENCY)
        .map(|t| {
            let (mut client, next, retried) = (clients[t % clients.len()].clone(), next.clone(), retried.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return out;
                    }
                    let req = pb::RegisterRequest {
                        data_addr: super::worker_addr(i as u64),
                        hostname: format!("sim-{i}"),
                        pid: 1,
                        worker_id: String::new(),
                        rank_hint: None,
                        metrics_addr: String::new(),
                        device: String::new(),
                    };
                    let mut tries = 0;
                    let id = loop {
                        match client.register(req.clone()).await {
                            Ok(reply) => break reply.into_inner().worker_id,
                            Err(status) if tries < REGISTER_TRIES => {
                                tries += 1;
                                retried.fetch_add(1, Ordering::Relaxed);
                                eprintln!("register {i} failed, trying again: {}", status.message());
                            }
                            Err(status) => panic!("register {i}: {status}"),
                        }
                    };
                    out.push((i, id));
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("register task"));
    }
    all.sort();
    (all.into_iter().map(|(_, id)| id).collect(), retried.load(Ordering::Relaxed))
}

/// Sends heartbeats of `ids` round-robin at `ids.len() / period` per second
/// for `load.duration`, each from its own task, so a slow reply delays no
/// other. Returns the latencies, how many were sent, how many failed and
/// the sending window.
async fn heartbeat(
    clients: &[WorkerServiceClient<Channel>],
    ids: &[String],
    load: &Load,
) -> (Sample, usize, usize, Duration) {
    let rate = ids.len() as f64 / load.period.as_secs_f64();
    let total = (rate * load.duration.as_secs_f64()) as usize;
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<Duration, tonic::Status>>();
    let start = Instant::now();
    let mut sent = 0;
    while sent < total {
        let due = ((start.elapsed().as_secs_f64() * rate) as usize + 1).min(total);
        for k in sent..due {
            let mut client = clients[k % clients.len()].clone();
            let worker_id = ids[k % ids.len()].clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let reply = client.heartbeat(pb::HeartbeatRequest { worker_id }).await;
                let _ = tx.send(reply.map(|_| t.elapsed()));
            });
        }
        sent = due;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let window = start.elapsed();
    drop(tx);
    let (mut lat, mut errors) = (Vec::with_capacity(total), 0);
    while let Some(r) = rx.recv().await {
        match r {
            Ok(d) => lat.push(d),
            Err(status) => {
                if errors == 0 {
                    eprintln!("heartbeat failed: {status}");
                }
                errors += 1;
            }
        }
    }
    (Sample::from(lat, window), sent, errors, window)
}
