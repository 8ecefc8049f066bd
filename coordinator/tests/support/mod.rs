//! Helpers shared by the coordinator's integration tests: real etcd
//! servers on loopback, an in-memory Raft message router with faults, and
//! small cluster utilities.

#![allow(dead_code)]

pub mod etcd;
pub mod router;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_coordinator::raft::{RaftOptions, RaftStore};
use flotilla_coordinator::state::Event;
use flotilla_coordinator::{Command, MetaStore, State, StoreError};
use openraft::ServerState;

pub use router::Router;

/// The seed of a randomized test: `FLOTILLA_RAFT_SEED` if set, else fresh.
/// Printed, so that a failing run can be repeated.
pub fn seed() -> u64 {
    let seed = match std::env::var("FLOTILLA_RAFT_SEED") {
        Ok(s) => s.parse().expect("FLOTILLA_RAFT_SEED is a u64"),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64,
    };
    println!("FLOTILLA_RAFT_SEED={seed}");
    seed
}

/// The address an in-memory replica goes by.
pub fn mem_addr(id: u64) -> String {
    format!("mem://{id}")
}

/// The replica id behind a `mem://` address.
pub fn mem_id(addr: &str) -> Option<u64> {
    addr.strip_prefix("mem://")?.parse().ok()
}

/// Options tuned for tests: fast heartbeats and elections.
pub fn test_options(id: u64, dir: &Path, addr: String, peers: &BTreeMap<u64, String>) -> RaftOptions {
    let mut opts = RaftOptions::new(id, dir, addr).with_peers(peers.clone());
    opts.heartbeat = Duration::from_millis(50);
    opts.election_min = Duration::from_millis(300);
    opts.election_max = Duration::from_millis(600);
    opts.write_timeout = Duration::from_secs(2);
    opts
}

/// Opens replica `id` of an in-memory cluster and connects it to `router`.
pub async fn open_mem(router: &Arc<Router>, opts: RaftOptions) -> RaftStore {
    let id = opts.id;
    let store = RaftStore::open_with_network(opts, router.network(id)).await.expect("open replica");
    router.register(id, store.raft().clone());
    store
}

/// A job submission named `name`.
pub fn submit(name: &str) -> Command {
    Command::SubmitJob {
        name: name.to_string(),
        spec_json: "{}".to_string(),
        min_workers: 1,
        max_workers: 1,
        fixed_world: None,
        stages: 1,
        total_steps: 10,
        keep_checkpoints: 1,
        output_root: "/tmp/flotilla-raft-test".to_string(),
        submission_id: None,
        spec_yaml: String::new(),
        registry: None,
        uid: String::new(),
        data_key: Default::default(),
        owner: None,
        priority: 0,
        at_ms: 0,
    }
}

/// How many jobs in `state` carry `name`.
pub fn count_named(state: &State, name: &str) -> usize {
    state.jobs.values().filter(|j| j.name == name).count()
}

/// Proposes through `start`, following leader hints (by `addr → id`).
pub async fn propose_following(
    nodes: &BTreeMap<u64, RaftStore>,
    start: u64,
    cmd: Command,
    id_of: impl Fn(&str) -> Option<u64>,
) -> Result<Vec<Event>, StoreError> {
    let mut at = start;
    for _ in 0..4 {
        match nodes[&at].propose(cmd.clone()).await {
            Err(StoreError::NotLeader { leader: Some(addr) }) => match id_of(&addr).filter(|id| nodes.contains_key(id))
            {
                Some(next) if next != at => at = next,
                _ => return Err(StoreError::NotLeader { leader: Some(addr) }),
            },
            other => return other,
        }
    }
    Err(StoreError::Unavailable("too many redirects".into()))
}

/// The id of the leader of `nodes`, once one of them is a leader that all
/// others (among `nodes`) follow, waiting up to `within`.
pub async fn wait_leader(nodes: &BTreeMap<u64, RaftStore>, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let leaders: Vec<u64> = nodes.values().filter(|s| s.is_leader()).map(|s| s.id()).collect();
        if let [leader] = leaders[..] {
            let agreed = nodes.values().all(|s| s.raft().metrics().borrow().current_leader == Some(leader));
            if agreed {
                return leader;
            }
        }
        assert!(Instant::now() < deadline, "no leader within {within:?}: leaders {leaders:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every node has applied the same last log id and holds the
/// same state, and returns that state.
pub async fn wait_converged(nodes: &BTreeMap<u64, RaftStore>, within: Duration) -> Arc<State> {
    let deadline = Instant::now() + within;
    loop {
        let applied: Vec<_> = nodes.values().map(|s| s.raft().metrics().borrow().last_applied).collect();
        let logs: Vec<_> = nodes.values().map(|s| s.raft().metrics().borrow().last_log_index).collect();
        let states: Vec<Arc<State>> = nodes.values().map(|s| s.snapshot()).collect();
        let same_applied = applied.windows(2).all(|w| w[0] == w[1]) && applied[0].map(|l| l.index) == logs[0];
        if same_applied && states.windows(2).all(|w| w[0] == w[1]) {
            return states[0].clone();
        }
        assert!(Instant::now() < deadline, "no convergence within {within:?}: applied {applied:?}, logs {logs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The server state of `store` now.
pub fn server_state(store: &RaftStore) -> ServerState {
    store.raft().metrics().borrow().state
}
