//! `add_member` never costs the cluster its quorum: in-memory replicas
//! (the fault router) where the new replica never answers, then the same
//! replica started and joining normally.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use flotilla_coordinator::raft::RaftStore;
use flotilla_coordinator::StoreError;
use support::{mem_addr, mem_id, open_mem, propose_following, submit, test_options, Router};

fn voters(store: &RaftStore) -> BTreeSet<u64> {
    store.members().members.iter().filter(|m| m.voter).map(|m| m.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_replica_is_refused_and_removed_again() {
    let router = Router::new(support::seed());
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let peers: BTreeMap<u64, String> = (1..=3).map(|id| (id, mem_addr(id))).collect();
    let mut nodes = BTreeMap::new();
    for id in 1..=3u64 {
        let mut opts = test_options(id, dirs[id as usize - 1].path(), mem_addr(id), &peers);
        opts.join_contact_timeout = Duration::from_secs(1);
        nodes.insert(id, open_mem(&router, opts).await);
    }
    let leader = support::wait_leader(&nodes, Duration::from_secs(10)).await;

    // Replica 4 is not on the network: it never answers.
    match nodes[&leader].add_member(4, mem_addr(4)).await {
        Err(StoreError::Refused(m)) => {
            assert!(m.contains("did not answer") && m.contains("removed again"), "{m}")
        }
        other => panic!("adding an unreachable replica answered {other:?}"),
    }
    let info = nodes[&leader].members();
    assert_eq!(info.members.iter().map(|m| m.id).collect::<BTreeSet<_>>(), BTreeSet::from([1, 2, 3]));
    assert_eq!(voters(&nodes[&leader]), BTreeSet::from([1, 2, 3]));
    propose_following(&nodes, leader, submit("after-refusal"), mem_id).await.unwrap();

    // A malformed id is refused before anything changes.
    assert!(matches!(nodes[&leader].add_member(0, mem_addr(0)).await, Err(StoreError::Invalid(_))));
    // Removing a replica that is not a member is refused too.
    assert!(matches!(nodes[&leader].remove_member(4).await, Err(StoreError::Refused(_))));

    // Once replica 4 runs, the same call makes it a voter with the whole log.
    let new = open_mem(&router, test_options(4, dirs[3].path(), mem_addr(4), &BTreeMap::new())).await;
    nodes.insert(4, new);
    let info = nodes[&leader].add_member(4, mem_addr(4)).await.unwrap();
    assert!(info.members.iter().any(|m| m.id == 4 && m.voter), "{info:?}");
    let state = support::wait_converged(&nodes, Duration::from_secs(15)).await;
    assert_eq!(support::count_named(&state, "after-refusal"), 1);
    // Adding it again is a no-op; another address for the same id is refused.
    assert!(nodes[&leader].add_member(4, mem_addr(4)).await.is_ok());
    assert!(matches!(nodes[&leader].add_member(4, mem_addr(5)).await, Err(StoreError::Refused(_))));
    for node in nodes.values() {
        node.shutdown().await;
    }
}
