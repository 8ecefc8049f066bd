//! Raft replicas restarted on their data dirs: the state comes back from
//! redb (snapshot, then the committed entries after it), a replica that was
//! down catches up, and a replica added after the log was compacted is
//! brought up by a snapshot.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flotilla_coordinator::raft::{RaftOptions, RaftStore};
use flotilla_coordinator::{MetaStore, State};
use support::{count_named, mem_addr, mem_id, open_mem, propose_following, submit, test_options, Router};

async fn wait_state(store: &RaftStore, expected: &State, within: Duration) {
    let deadline = Instant::now() + within;
    while *store.snapshot() != *expected {
        assert!(Instant::now() < deadline, "replica {} did not restore its state", store.id());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_replica_elects_itself_fast_and_survives_restart() {
    let router = Router::new(0);
    let dir = tempfile::tempdir().unwrap();
    let peers = BTreeMap::from([(1, mem_addr(1))]);
    // Production timeouts: a lone replica needs no election delay.
    let opts = RaftOptions::new(1, dir.path(), mem_addr(1)).with_peers(peers.clone());

    let started = Instant::now();
    let store = open_mem(&router, opts.clone()).await;
    while !store.is_leader() {
        assert!(started.elapsed() < Duration::from_secs(1), "a lone replica took over 1 s to lead");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("single replica leads after {:?}", started.elapsed());
    for i in 0..5 {
        store.propose(submit(&format!("job-{i}"))).await.unwrap();
    }
    let before = store.snapshot();
    assert_eq!(before.jobs.len(), 5);
    store.shutdown().await;
    router.unregister(1);
    drop(store);

    let store = open_mem(&router, opts).await;
    wait_state(&store, &before, Duration::from_secs(5)).await;
    let started = Instant::now();
    while !store.is_leader() {
        assert!(started.elapsed() < Duration::from_secs(3), "the restarted replica did not lead again");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    store.propose(submit("after-restart")).await.unwrap();
    let after = store.snapshot();
    assert_eq!(after.jobs.len(), 6);
    assert_eq!(count_named(&after, "after-restart"), 1);
    assert_eq!(store.read_fresh().await.unwrap(), after);
    store.shutdown().await;
}

fn compacting_options(id: u64, dir: &std::path::Path, peers: &BTreeMap<u64, String>) -> RaftOptions {
    let mut opts = test_options(id, dir, mem_addr(id), peers);
    opts.snapshot_every = 10;
    opts.logs_kept_after_snapshot = 0;
    opts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_replica_catches_up_and_a_new_one_is_sent_a_snapshot() {
    let router = Router::new(support::seed());
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let peers: BTreeMap<u64, String> = (1..=3).map(|id| (id, mem_addr(id))).collect();
    let mut nodes = BTreeMap::new();
    for id in 1..=3 {
        nodes.insert(id, open_mem(&router, compacting_options(id, dirs[id as usize - 1].path(), &peers)).await);
    }
    let leader = support::wait_leader(&nodes, Duration::from_secs(10)).await;
    for i in 0..25 {
        propose_following(&nodes, leader, submit(&format!("early-{i}")), mem_id).await.unwrap();
    }
    support::wait_converged(&nodes, Duration::from_secs(10)).await;

    // Stop a follower; the others go on without it.
    let down = *nodes.keys().find(|id| **id != leader).unwrap();
    let stopped = nodes.remove(&down).unwrap();
    let state_at_stop = stopped.snapshot();
    let applied_at_stop = stopped.raft().metrics().borrow().last_applied.unwrap().index;
    stopped.shutdown().await;
    router.unregister(down);
    drop(stopped);
    for i in 0..25 {
        propose_following(&nodes, leader, submit(&format!("late-{i}")), mem_id).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let purged = loop {
        let purged = nodes[&leader].raft().metrics().borrow().purged.map(|l| l.index);
        if purged.is_some_and(|p| p > applied_at_stop) {
            break purged.unwrap();
        }
        assert!(Instant::now() < deadline, "the leader's log was not compacted past {applied_at_stop}: {purged:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("leader purged up to {purged}; the stopped replica had applied {applied_at_stop}");

    // Reopened, the replica first has exactly what it had, from its own
    // redb; connected again, it is brought up to date by a snapshot, since
    // the entries it lacks are gone from the leader's log.
    let reopened = RaftStore::open_with_network(
        compacting_options(down, dirs[down as usize - 1].path(), &peers),
        router.network(down),
    )
    .await
    .unwrap();
    wait_state(&reopened, &state_at_stop, Duration::from_secs(5)).await;
    router.register(down, reopened.raft().clone());
    nodes.insert(down, reopened);
    let state = support::wait_converged(&nodes, Duration::from_secs(15)).await;
    assert_eq!(state.jobs.len(), 50);
    let snap = nodes[&down].raft().metrics().borrow().snapshot.map(|l| l.index);
    assert!(snap.is_some_and(|s| s > applied_at_stop), "no snapshot past {applied_at_stop} on {down}: {snap:?}");

    // A new replica joins: from an empty dir, only a snapshot can bring it.
    let new = open_mem(&router, compacting_options(4, dirs[3].path(), &BTreeMap::new())).await;
    assert_eq!(new.snapshot().jobs.len(), 0);
    nodes.insert(4, new);
    let info = nodes[&leader].add_member(4, mem_addr(4)).await.unwrap();
    assert!(info.members.iter().any(|m| m.id == 4 && m.voter), "4 is not a voter: {info:?}");
    let state = support::wait_converged(&nodes, Duration::from_secs(15)).await;
    assert_eq!(state.jobs.len(), 50);
    assert!(nodes[&4].raft().metrics().borrow().snapshot.is_some(), "the new replica got no snapshot");
    for name in ["early-0", "late-24"] {
        assert_eq!(count_named(&nodes[&4].snapshot(), name), 1);
    }
    for node in nodes.values() {
        node.shutdown().await;
    }
}
