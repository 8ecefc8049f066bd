//! The coordinator's meta store against etcd, measured in the same run.
//!
//! 1. Writes: throughput and p50/p99 latency with 1 and 16 closed-loop
//!    clients, for the embedded Raft store (1 and 3 replicas, gRPC between
//!    them on loopback, a redb data dir each) against raw etcd `put`s of a
//!    value the size of a serialized command (1 and 3 members), and the
//!    `EtcdStore` backend on the same etcd clusters. A flotilla write is
//!    `MetaStore::propose` of `Command::RegisterWorker` on the leader,
//!    acknowledged once committed and applied.
//! 2. Scale: three coordinator replicas as separate processes (this binary
//!    re-executed with `FLOTILLA_BENCH_REPLICA` set), 10,000 workers
//!    registered on the leader and heartbeating once a second over 32
//!    HTTP/2 channels; heartbeat latency and the replicas' CPU use.
//!
//! `cargo bench -p flotilla-coordinator --bench meta_store` runs both; it
//! needs etcd (`./scripts/bootstrap --etcd`). `FLOTILLA_BENCH_PARTS=writes`
//! (or `scale`) runs only that part. Under `cargo test` it runs a few writes
//! per backend and 200 workers for 2 s, and checks that every write and
//! heartbeat was answered.

#[path = "../tests/support/etcd.rs"]
mod etcd;
#[path = "meta_store/scale.rs"]
mod scale;
#[path = "meta_store/stats.rs"]
mod stats;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd::EtcdCluster;
use etcd_client::{Client, GetOptions};
use flotilla_coordinator::raft::{RaftOptions, RaftStore};
use flotilla_coordinator::{
    serve_with_routes, Command, CoordinatorConfig, EtcdOptions, EtcdStore, MetaStore, ServerHandle,
};
use stats::{measure, ms, table, Budget, Op, Sample};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Which parts run: a comma-separated list of `writes` and `scale`; both
/// when unset.
const PARTS_ENV: &str = "FLOTILLA_BENCH_PARTS";

/// The sizes of one run.
struct Setup {
    /// Writes before each measurement, not counted.
    warmup: usize,
    budget: Budget,
    scale: scale::Load,
}

fn main() {
    if let Ok(spec) = std::env::var(scale::REPLICA_ENV) {
        scale::replica_main(&spec);
        return;
    }
    let full = std::env::args().any(|a| a == "--bench");
    let setup = if full {
        Setup { warmup: 50, budget: Budget::Time(Duration::from_secs(4)), scale: scale::Load::full() }
    } else {
        Setup { warmup: 2, budget: Budget::Ops(4), scale: scale::Load::smoke() }
    };
    let parts = std::env::var(PARTS_ENV).unwrap_or_else(|_| "writes,scale".into());
    let part = |name: &str| parts.split(',').any(|p| p.trim() == name);
    assert!(part("writes") || part("scale"), "{PARTS_ENV}={parts}: expected `writes`, `scale` or both");
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(async {
        if part("writes") {
            writes(&setup).await;
        }
        if part("scale") {
            scale::run(&setup.scale).await;
        }
    });
}

/// The command a flotilla write proposes; `i` makes its address unique.
pub fn register(i: u64) -> Command {
    Command::RegisterWorker {
        metrics_addr: String::new(),
        device: String::new(),
        data_addr: worker_addr(i),
        hostname: format!("bench-host-{i}"),
        rank_hint: None,
        key_hash: String::new(),
        at_ms: 1_700_000_000_000,
    }
}

/// A unique worker data address, `10.x.y.z:7000`.
pub fn worker_addr(i: u64) -> String {
    format!("10.{}.{}.{}:7000", (i >> 16) & 255, (i >> 8) & 255, i & 255)
}

/// One row of the write table.
struct Row {
    backend: &'static str,
    members: usize,
    clients: usize,
    sample: Sample,
}

async fn writes(setup: &Setup) {
    let seq = Arc::new(AtomicU64::new(0));
    let value_len = serde_json::to_vec(&register(u64::MAX >> 1)).unwrap().len();
    let mut rows = Vec::new();
    for members in [1, 3] {
        let cluster = EtcdCluster::start(members).await.expect("start etcd (scripts/bootstrap --etcd)");
        let client = Client::connect(cluster.endpoints(), None).await.expect("connect to etcd");
        let kv = client.kv_client();
        let put: Op = Arc::new(move |i| {
            let mut kv = kv.clone();
            Box::pin(async move {
                let value = serde_json::to_vec(&register(i)).unwrap();
                kv.put(format!("/bench/raw/{i:012}"), value, None).await.expect("etcd put");
            })
        });
        let raw = run_backend(setup, "etcd put", members, &put, &seq).await;
        let mut kv = client.kv_client();
        let stored = kv.get("/bench/raw/", Some(GetOptions::new().with_prefix().with_count_only())).await;
        let expected: usize = raw.iter().map(|r| r.sample.count()).sum::<usize>() + 2 * setup.warmup;
        assert_eq!(stored.expect("count etcd keys").count() as usize, expected, "every put is in etcd");
        rows.extend(raw);

        let mut opts = EtcdOptions::new(cluster.endpoints(), "http://127.0.0.1:1");
        opts.prefix = "/bench/store".into();
        let store = EtcdStore::connect(opts).await.expect("connect etcd store");
        wait_until(|| store.is_leader(), "etcd store leads").await;
        let store_rows = run_backend(setup, "flotilla EtcdStore", members, &proposer(store.clone()), &seq).await;
        check_applied(store.as_ref(), &store_rows, setup);
        rows.extend(store_rows);
        store.shutdown().await;

        let raft = RaftCluster::start(members as u64).await;
        let leader = raft.leader().await;
        let raft_rows = run_backend(setup, "flotilla Raft", members, &proposer(Arc::new(leader.clone())), &seq).await;
        check_applied(&leader, &raft_rows, setup);
        rows.extend(raft_rows);
        raft.stop().await;
    }
    print_writes(&rows, value_len);
}

/// A write on `store`: a proposal of a new worker.
fn proposer<S: MetaStore>(store: Arc<S>) -> Op {
    Arc::new(move |i| {
        let store = store.clone();
        Box::pin(async move {
            store.propose(register(i)).await.expect("propose");
        })
    })
}

/// Warms up, then measures with 1 and with 16 clients.
async fn run_backend(setup: &Setup, backend: &'static str, members: usize, op: &Op, seq: &Arc<AtomicU64>) -> Vec<Row> {
    let mut rows = Vec::new();
    for clients in [1, 16] {
        measure(op, 1, Budget::Ops(setup.warmup), seq).await;
        let sample = measure(op, clients, setup.budget, seq).await;
        eprintln!("{backend} ({members}) x{clients}: {:.0} writes/s, p99 {}", sample.per_s(), ms(sample.q(0.99)));
        rows.push(Row { backend, members, clients, sample });
    }
    rows
}

/// Every acknowledged write of `rows` (and the warm-ups) registered a worker.
fn check_applied<S: MetaStore + ?Sized>(store: &S, rows: &[Row], setup: &Setup) {
    let writes: usize = rows.iter().map(|r| r.sample.count()).sum::<usize>() + 2 * setup.warmup;
    assert_eq!(store.snapshot().workers.len(), writes, "every acknowledged write is applied");
}

fn print_writes(rows: &[Row], value_len: usize) {
    let baseline =
        |r: &Row| rows.iter().find(|b| b.backend == "etcd put" && b.members == r.members && b.clients == r.clients);
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let (tput, p99) = match baseline(r) {
                Some(b) if b.backend != r.backend => (
                    format!("{:.2}", r.sample.per_s() / b.sample.per_s()),
                    format!("{:.2}", r.sample.q(0.99).as_secs_f64() / b.sample.q(0.99).as_secs_f64()),
                ),
                _ => ("1".into(), "1".into()),
            };
            vec![
                r.backend.to_string(),
                r.members.to_string(),
                r.clients.to_string(),
                format!("{:.0}", r.sample.per_s()),
                ms(r.sample.q(0.5)),
                ms(r.sample.q(0.99)),
                tput,
                p99,
            ]
        })
        .collect();
    println!("\nWrites acknowledged once committed (etcd value {value_len} bytes, the JSON of the command):\n");
    table(&["backend", "replicas", "clients", "writes/s", "p50", "p99", "writes/s vs etcd", "p99 vs etcd"], &body);
}

/// Polls `ready` every 20 ms for up to 30 s.
pub async fn wait_until(ready: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Raft replicas in this process, each served as a coordinator (its Raft
/// routes and the client services, one port) with its own data dir.
struct RaftCluster {
    replicas: Vec<(RaftStore, ServerHandle)>,
    _dirs: Vec<TempDir>,
}

impl RaftCluster {
    async fn start(n: u64) -> RaftCluster {
        let mut listeners = Vec::new();
        let mut peers = BTreeMap::new();
        for id in 1..=n {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind replica port");
            peers.insert(id, format!("http://{}", listener.local_addr().unwrap()));
            listeners.push(listener);
        }
        let dirs: Vec<TempDir> = (0..n).map(|_| tempfile::tempdir().expect("data dir")).collect();
        let mut replicas = Vec::new();
        for (listener, (dir, (id, addr))) in listeners.into_iter().zip(dirs.iter().zip(&peers)) {
            let opts = RaftOptions::new(*id, dir.path(), addr.clone()).with_peers(peers.clone());
            let store = RaftStore::open(opts).await.expect("open raft replica");
            let server = serve_with_routes(
                listener,
                Arc::new(store.clone()),
                // Workers that never heartbeat: no lease may lapse during the run.
                CoordinatorConfig { lease: Duration::from_secs(3600), ..CoordinatorConfig::default() },
                CancellationToken::new(),
                store.routes(),
            )
            .await
            .expect("serve replica");
            replicas.push((store, server));
        }
        RaftCluster { replicas, _dirs: dirs }
    }

    async fn leader(&self) -> RaftStore {
        wait_until(|| self.replicas.iter().any(|(s, _)| s.is_leader()), "a raft replica leads").await;
        self.replicas.iter().find(|(s, _)| s.is_leader()).map(|(s, _)| s.clone()).expect("leader")
    }

    async fn stop(self) {
        for (store, server) in self.replicas {
            server.shutdown().await.expect("stop server");
            store.shutdown().await;
        }
    }
}
