//! The shared meta-store suite on the etcd backend, against real etcd
//! servers started on loopback: one member and a three-member cluster, one
//! and three coordinator replicas. Then what only etcd has: a member killed
//! with SIGKILL while writes go on, a leader that dies without resigning.

mod store_suite;
mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use etcd_client::{Client, GetOptions};
use flotilla_coordinator::{EtcdOptions, EtcdStore, MetaStore, StoreError};
use store_suite::*;
use support::etcd::EtcdCluster;

const PREFIX: &str = "/flotilla-test";

/// Coordinator replicas on one etcd cluster.
struct Etcd {
    stores: Vec<Option<Arc<EtcdStore>>>,
    etcd: EtcdCluster,
}

impl Etcd {
    async fn new(members: usize, replicas: usize) -> Etcd {
        let etcd = EtcdCluster::start(members).await.expect("start etcd");
        let mut c = Etcd { stores: vec![None; replicas], etcd };
        for i in 0..replicas {
            c.start(i).await;
        }
        c
    }

    fn options(&self, i: usize) -> EtcdOptions {
        let mut o = EtcdOptions::new(self.etcd.endpoints(), format!("http://127.0.0.1:{}", 19000 + i));
        o.prefix = PREFIX.into();
        o.lease_ttl_s = 2;
        o.op_timeout = Duration::from_secs(2);
        o
    }

    fn store(&self, i: usize) -> Arc<EtcdStore> {
        self.stores[i].clone().expect("replica is running")
    }

    async fn client(&self) -> Client {
        Client::connect(self.etcd.endpoints(), None).await.expect("etcd client")
    }
}

#[async_trait]
impl TestCluster for Etcd {
    fn size(&self) -> usize {
        self.stores.len()
    }
    fn replica(&self, i: usize) -> Option<Arc<dyn MetaStore>> {
        self.stores[i].clone().map(|s| s as Arc<dyn MetaStore>)
    }
    async fn stop(&mut self, i: usize) {
        if let Some(s) = self.stores[i].take() {
            s.shutdown().await;
        }
    }
    async fn start(&mut self, i: usize) {
        self.stop(i).await;
        let store = EtcdStore::connect(self.options(i)).await.expect("connect etcd store");
        self.stores[i] = Some(store);
    }
    async fn compact(&mut self) -> bool {
        let (li, _) = leader(self).await;
        let index = self.store(li).snapshot_now().await.expect("snapshot");
        assert!(index > 0);
        true
    }
}

macro_rules! suite_tests {
    ($($name:ident: $suite:ident on $members:literal members, $replicas:literal replicas;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let mut c = Etcd::new($members, $replicas).await;
            $suite(&mut c).await;
        }
    )*};
}

suite_tests! {
    one_member_one_replica_propose: suite_propose_returns_events on 1 members, 1 replicas;
    one_member_one_replica_restart: suite_restart_recovers on 1 members, 1 replicas;
    one_member_one_replica_concurrent: suite_concurrent_proposals on 1 members, 1 replicas;
    one_member_one_replica_snapshot: suite_snapshot_then_new_replica on 1 members, 1 replicas;
    one_member_propose: suite_propose_returns_events on 1 members, 3 replicas;
    one_member_state_on_every_replica: suite_state_on_every_replica on 1 members, 3 replicas;
    one_member_followers_redirect: suite_followers_redirect on 1 members, 3 replicas;
    one_member_failover: suite_leader_failover on 1 members, 3 replicas;
    one_member_restart: suite_restart_recovers on 1 members, 3 replicas;
    one_member_concurrent: suite_concurrent_proposals on 1 members, 3 replicas;
    one_member_snapshot: suite_snapshot_then_new_replica on 1 members, 3 replicas;
    three_members_state_on_every_replica: suite_state_on_every_replica on 3 members, 3 replicas;
    three_members_failover: suite_leader_failover on 3 members, 3 replicas;
    three_members_concurrent: suite_concurrent_proposals on 3 members, 3 replicas;
}

/// A snapshot deletes the log keys it covers; the log goes on after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_deletes_covered_log() {
    let mut c = Etcd::new(1, 1).await;
    for k in 0..10 {
        propose(&c, register(&format!("h{k}"))).await.expect("propose");
    }
    assert!(c.compact().await);
    propose(&c, register("h10")).await.expect("propose");
    let mut kv = c.client().await;
    let log = kv.get(format!("{PREFIX}/log/"), Some(GetOptions::new().with_prefix())).await.expect("get log");
    let keys: Vec<String> = log.kvs().iter().map(|kv| kv.key_str().unwrap().to_string()).collect();
    assert_eq!(keys, vec![format!("{PREFIX}/log/{:020}", 11)]);
    assert_eq!(c.store(0).applied_index(), 11);
}

/// Every replica follows a snapshot written automatically every few entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_snapshots() {
    let etcd = EtcdCluster::start(1).await.expect("start etcd");
    let mut c = Etcd { stores: vec![None, None], etcd };
    let connect = |c: &Etcd, i: usize| {
        let mut o = c.options(i);
        o.snapshot_every = 5;
        EtcdStore::connect(o)
    };
    c.stores[0] = Some(connect(&c, 0).await.expect("connect"));
    for k in 0..12 {
        propose(&c, register(&format!("a{k}"))).await.expect("propose");
    }
    c.stores[1] = Some(connect(&c, 1).await.expect("connect"));
    let want = (*c.store(0).snapshot()).clone();
    assert_eq!(want.workers.len(), 12);
    converge(&c, &want).await;
    let mut kv = c.client().await;
    let log = kv.get(format!("{PREFIX}/log/"), Some(GetOptions::new().with_prefix())).await.expect("get log");
    assert!(log.kvs().len() < 5, "{} log keys left after snapshots every 5", log.kvs().len());
}

/// A follower cut off from etcd while the log is snapshotted and etcd's
/// history compacted finds its watch compacted when it is back: it reloads
/// from the snapshot and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_behind_a_compaction_reloads() {
    let etcd = EtcdCluster::start(3).await.expect("start etcd");
    let eps = etcd.endpoints();
    // Replica 1 reaches etcd only through one member that does not lead
    // etcd (so that writes through the others go on at once without it).
    let cut = (etcd_leader(&etcd).await + 1) % 3;
    let others: Vec<String> = (0..3).filter(|&i| i != cut).map(|i| eps[i].clone()).collect();
    let mut c = Etcd { stores: vec![None, None], etcd };
    let mut o = c.options(0);
    o.endpoints = others.clone();
    c.stores[0] = Some(EtcdStore::connect(o).await.expect("connect"));
    let mut o = c.options(1);
    o.endpoints = vec![eps[cut].clone()];
    c.stores[1] = Some(EtcdStore::connect(o).await.expect("connect"));
    propose(&c, register("early")).await.expect("propose");
    converge(&c, &c.store(0).snapshot()).await;
    c.etcd.kill(cut);
    let t = Instant::now();
    while !c.store(0).is_leader() {
        assert!(t.elapsed() < Duration::from_secs(10), "replica 0 did not take over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for k in 0..10 {
        propose(&c, register(&format!("late{k}"))).await.expect("propose");
    }
    c.store(0).snapshot_now().await.expect("snapshot");
    let mut kv = Client::connect(&others, None).await.expect("etcd client");
    let rev = kv.get("/", None).await.expect("get").header().expect("header").revision();
    kv.compact(rev, None).await.expect("compact etcd history");
    assert_eq!(c.store(1).applied_index(), 1, "replica 1 should have been cut off");
    c.etcd.restart(cut).await.expect("restart the member");
    let want = (*c.store(0).snapshot()).clone();
    assert_eq!(want.workers.len(), 11);
    converge(&c, &want).await;
    assert_eq!(c.store(1).applied_index(), 11);
}

/// A leader that dies without resigning is replaced once its lease lapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halted_leader_is_replaced_after_its_lease() {
    let mut c = Etcd::new(1, 3).await;
    propose(&c, register("x")).await.expect("propose");
    let (li, _) = leader(&c).await;
    let old = c.stores[li].take().unwrap();
    let t = Instant::now();
    old.halt();
    let (ni, _) = leader(&c).await;
    assert_ne!(ni, li);
    assert!(t.elapsed() < Duration::from_secs(6), "takeover took {:?}", t.elapsed());
    propose(&c, register("y")).await.expect("propose on the new leader");
    assert_eq!(c.store(ni).snapshot().workers.len(), 2);
}

/// A leader that loses etcd steps down before its lease could lapse, and
/// takes no writes; once etcd is back, a leader is elected and writes go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_steps_down_when_etcd_is_lost() {
    let mut c = Etcd::new(1, 2).await;
    propose(&c, register("before")).await.expect("propose");
    let (li, l) = leader(&c).await;
    c.etcd.kill(0);
    let t = Instant::now();
    while l.is_leader() {
        assert!(t.elapsed() < Duration::from_secs(2), "still leader {:?} after etcd died", t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match l.propose(register("during")).await {
        Err(StoreError::NotLeader { .. } | StoreError::Unavailable(_)) => {}
        other => panic!("a write without etcd gave {other:?}"),
    }
    assert!(!c.store(1 - li).is_leader());
    c.etcd.restart(0).await.expect("restart etcd");
    propose(&c, register("after")).await.expect("propose after etcd is back");
    let want = (*leader(&c).await.1.read_fresh().await.expect("fresh read")).clone();
    let hosts: BTreeSet<String> = want.workers.values().map(|w| w.hostname.clone()).collect();
    assert_eq!(hosts, BTreeSet::from(["before".to_string(), "after".to_string()]));
    converge(&c, &want).await;
}

/// etcd that cannot be reached is `Unavailable`, not a hang.
#[tokio::test]
async fn unreachable_etcd_is_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut o = EtcdOptions::new(vec![format!("http://127.0.0.1:{port}")], "http://127.0.0.1:19000");
    o.op_timeout = Duration::from_millis(500);
    let t = Instant::now();
    match EtcdStore::connect(o).await {
        Err(StoreError::Unavailable(_)) => {}
        Err(e) => panic!("connect gave {e}"),
        Ok(_) => panic!("connected to nothing"),
    }
    assert!(t.elapsed() < Duration::from_secs(5));
}

/// The etcd member that leads etcd's own Raft.
async fn etcd_leader(etcd: &EtcdCluster) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for (i, ep) in etcd.endpoints().iter().enumerate() {
            if let Ok(mut c) = Client::connect([ep], None).await {
                if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(1), c.status()).await {
                    if s.header().is_some_and(|h| h.member_id() == s.leader()) {
                        return i;
                    }
                }
            }
        }
        assert!(Instant::now() < deadline, "no etcd leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// kill -9 of etcd's leading member while proposing: writes go on, and
/// every acknowledged one is in every replica's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_member_killed_while_proposing() {
    let mut c = Etcd::new(3, 3).await;
    let mut acked = BTreeSet::new();
    let mut attempts = 0;
    let mut killed_at = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.len() < 60 {
        assert!(Instant::now() < deadline, "only {} writes acknowledged", acked.len());
        if acked.len() == 20 && killed_at.is_none() {
            let victim = etcd_leader(&c.etcd).await;
            c.etcd.kill(victim);
            killed_at = Some(Instant::now());
        }
        attempts += 1;
        let host = format!("k{attempts}");
        let (_, l) = leader(&c).await;
        match l.propose(register(&host)).await {
            Ok(_) => {
                acked.insert(host);
            }
            Err(StoreError::NotLeader { .. } | StoreError::Unavailable(_)) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("propose: {e}"),
        }
    }
    let (_, l) = leader(&c).await;
    let want = (*l.read_fresh().await.expect("fresh read")).clone();
    let hosts: BTreeSet<String> = want.workers.values().map(|w| w.hostname.clone()).collect();
    assert!(acked.is_subset(&hosts), "acknowledged writes lost: {:?}", acked.difference(&hosts).collect::<Vec<_>>());
    assert!(hosts.len() <= attempts);
    converge(&c, &want).await;
}
