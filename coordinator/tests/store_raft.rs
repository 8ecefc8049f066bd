//! The shared meta-store suite on the embedded Raft backend: one and three
//! replicas, each with its own redb database in a temporary directory,
//! connected by the in-memory router (no faults: the fault scenarios are in
//! raft_cluster.rs). A stopped replica is shut down and reopened on its data
//! directory.

mod store_suite;
mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use flotilla_coordinator::{MetaStore, RaftStore};
use store_suite::*;
use support::{mem_addr, open_mem, test_options, Router};

struct Raft {
    router: Arc<Router>,
    dirs: Vec<tempfile::TempDir>,
    peers: BTreeMap<u64, String>,
    stores: Vec<Option<Arc<RaftStore>>>,
}

impl Raft {
    async fn new(replicas: usize) -> Raft {
        let router = Router::new(support::seed());
        let dirs = (0..replicas).map(|_| tempfile::tempdir().unwrap()).collect();
        let peers = (1..=replicas as u64).map(|id| (id, mem_addr(id))).collect();
        let mut c = Raft { router, dirs, peers, stores: vec![None; replicas] };
        for i in 0..replicas {
            c.start(i).await;
        }
        c
    }
}

#[async_trait]
impl TestCluster for Raft {
    fn size(&self) -> usize {
        self.stores.len()
    }
    fn replica(&self, i: usize) -> Option<Arc<dyn MetaStore>> {
        self.stores[i].clone().map(|s| s as Arc<dyn MetaStore>)
    }
    async fn stop(&mut self, i: usize) {
        if let Some(s) = self.stores[i].take() {
            s.shutdown().await;
            self.router.unregister(i as u64 + 1);
        }
    }
    async fn start(&mut self, i: usize) {
        self.stop(i).await;
        let id = i as u64 + 1;
        let opts = test_options(id, self.dirs[i].path(), mem_addr(id), &self.peers);
        self.stores[i] = Some(Arc::new(open_mem(&self.router, opts).await));
    }
    async fn compact(&mut self) -> bool {
        let (li, _) = leader(self).await;
        let raft = self.stores[li].as_ref().unwrap().raft().clone();
        let applied = raft.metrics().borrow().last_applied.map(|l| l.index).unwrap_or(0);
        raft.trigger().snapshot().await.expect("trigger a snapshot");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = raft.metrics().borrow().clone();
            if m.snapshot.is_some_and(|s| s.index >= applied) {
                return true;
            }
            assert!(Instant::now() < deadline, "no snapshot at {applied}: {:?}", m.snapshot);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Raft {
    fn drop(&mut self) {
        // Stores left running stop with the runtime; their data dirs go with `dirs`.
        self.stores.clear();
    }
}

macro_rules! suite_tests {
    ($($name:ident: $suite:ident on $replicas:literal replicas;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let mut c = Raft::new($replicas).await;
            $suite(&mut c).await;
            for i in 0..c.size() {
                c.stop(i).await;
            }
        }
    )*};
}

suite_tests! {
    one_replica_propose: suite_propose_returns_events on 1 replicas;
    one_replica_restart: suite_restart_recovers on 1 replicas;
    one_replica_concurrent: suite_concurrent_proposals on 1 replicas;
    one_replica_snapshot: suite_snapshot_then_new_replica on 1 replicas;
    three_replicas_propose: suite_propose_returns_events on 3 replicas;
    three_replicas_state_on_every_replica: suite_state_on_every_replica on 3 replicas;
    three_replicas_followers_redirect: suite_followers_redirect on 3 replicas;
    three_replicas_failover: suite_leader_failover on 3 replicas;
    three_replicas_restart: suite_restart_recovers on 3 replicas;
    three_replicas_concurrent: suite_concurrent_proposals on 3 replicas;
    three_replicas_snapshot: suite_snapshot_then_new_replica on 3 replicas;
}
