//! Raft replicas over real loopback gRPC, each served with the coordinator's
//! client services on one port: election, writes through followers, the
//! leader's loss, and membership changes through the `Cluster` service.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_coordinator::convert::LEADER_METADATA;
use flotilla_coordinator::raft::RaftStore;
use flotilla_coordinator::{serve_with_routes, CoordinatorConfig, MetaStore, ServerHandle, StoreError};
use flotilla_proto::raft::v1 as pb;
use flotilla_proto::raft::v1::cluster_client::ClusterClient;
use support::{count_named, propose_following, submit, test_options};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

struct Replica {
    store: RaftStore,
    server: ServerHandle,
}

async fn start(
    id: u64,
    listener: TcpListener,
    dir: &std::path::Path,
    addr: &str,
    peers: &BTreeMap<u64, String>,
) -> Replica {
    let store = RaftStore::open(test_options(id, dir, addr.to_string(), peers)).await.unwrap();
    let server = serve_with_routes(
        listener,
        Arc::new(store.clone()),
        CoordinatorConfig::default(),
        CancellationToken::new(),
        store.routes(),
    )
    .await
    .unwrap();
    Replica { store, server }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_replicas_fail_over_and_change_membership() {
    let mut listeners = Vec::new();
    let mut addrs = BTreeMap::new();
    for id in 1..=4u64 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.insert(id, format!("http://{}", listener.local_addr().unwrap()));
        listeners.push(listener);
    }
    let id_of = {
        let addrs = addrs.clone();
        move |addr: &str| addrs.iter().find(|(_, a)| a.as_str() == addr).map(|(id, _)| *id)
    };
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let peers: BTreeMap<u64, String> = addrs.range(1..=3).map(|(id, a)| (*id, a.clone())).collect();
    let mut replicas = BTreeMap::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let id = i as u64 + 1;
        // Replica 4 joins later: it starts with no peers.
        let initial = if id <= 3 { peers.clone() } else { BTreeMap::new() };
        replicas.insert(id, start(id, listener, dirs[i].path(), &addrs[&id], &initial).await);
    }
    let voters = |replicas: &BTreeMap<u64, Replica>, ids: &[u64]| -> BTreeMap<u64, RaftStore> {
        ids.iter().map(|id| (*id, replicas[id].store.clone())).collect()
    };

    let nodes = voters(&replicas, &[1, 2, 3]);
    let leader = support::wait_leader(&nodes, Duration::from_secs(10)).await;
    let follower = *nodes.keys().find(|id| **id != leader).unwrap();

    // A follower names the leader; following it, the write goes through.
    match nodes[&follower].propose(submit("direct")).await {
        Err(StoreError::NotLeader { leader: Some(addr) }) => assert_eq!(addr, addrs[&leader]),
        other => panic!("a follower answered {other:?}"),
    }
    propose_following(&nodes, follower, submit("first"), &id_of).await.unwrap();
    assert_eq!(
        nodes[&follower].read_fresh().await.err().map(|e| e.to_string()),
        Some(StoreError::NotLeader { leader: Some(addrs[&leader].clone()) }.to_string())
    );

    // Admin calls on a follower are refused with the leader's address.
    let mut admin = ClusterClient::connect(addrs[&follower].clone()).await.unwrap();
    let refused = admin.add_member(pb::AddMemberRequest { id: 4, addr: addrs[&4].clone() }).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    let hint = refused.metadata().get(LEADER_METADATA).map(|v| v.to_str().unwrap().to_string());
    assert_eq!(hint.as_deref(), Some(addrs[&leader].as_str()));

    // On the leader: replica 4 is added, seen, then removed.
    let mut admin = ClusterClient::connect(addrs[&leader].clone()).await.unwrap();
    let added = admin.add_member(pb::AddMemberRequest { id: 4, addr: addrs[&4].clone() }).await.unwrap().into_inner();
    assert!(added.members.iter().any(|m| m.id == 4 && m.voter), "4 not a voter: {added:?}");
    let all = voters(&replicas, &[1, 2, 3, 4]);
    let state = support::wait_converged(&all, Duration::from_secs(10)).await;
    assert_eq!(count_named(&state, "first"), 1);
    let members = admin.members(pb::MembersRequest {}).await.unwrap().into_inner();
    assert_eq!(members.members.len(), 4);
    assert_eq!(members.leader, Some(leader));
    assert_eq!(members.leader_addr, addrs[&leader]);
    assert!(members.members.iter().all(|m| m.matched_index.is_some()), "{members:?}");
    let removed = admin.remove_member(pb::RemoveMemberRequest { id: 4 }).await.unwrap().into_inner();
    assert_eq!(removed.members.iter().map(|m| m.id).collect::<Vec<_>>(), vec![1, 2, 3]);
    let r4 = replicas.remove(&4).unwrap();
    r4.store.shutdown().await;
    r4.server.shutdown().await.unwrap();

    // The leader goes away; the other two elect one and take writes.
    let old = replicas.remove(&leader).unwrap();
    old.server.shutdown().await.unwrap();
    old.store.shutdown().await;
    let rest: Vec<u64> = replicas.keys().copied().collect();
    let nodes = voters(&replicas, &rest);
    let new_leader = support::wait_leader(&nodes, Duration::from_secs(10)).await;
    assert_ne!(new_leader, leader);
    propose_following(&nodes, rest[0], submit("after-failover"), &id_of).await.unwrap();
    let state = support::wait_converged(&nodes, Duration::from_secs(10)).await;
    assert_eq!(count_named(&state, "first"), 1);
    assert_eq!(count_named(&state, "after-failover"), 1);
    for (_, r) in replicas {
        r.store.shutdown().await;
        r.server.shutdown().await.unwrap();
    }
}
