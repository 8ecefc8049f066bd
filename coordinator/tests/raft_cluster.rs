//! In-process Raft clusters under faults: clients write through random
//! replicas while the router partitions, drops, duplicates and delays.
//! Afterwards every acknowledged write is on every replica exactly once.
//! Repeat a failing run with the printed `FLOTILLA_RAFT_SEED`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_coordinator::raft::RaftStore;
use flotilla_coordinator::{MetaStore, StoreError};
use support::router::Faults;
use support::{count_named, mem_addr, mem_id, open_mem, propose_following, submit, test_options, Router};

/// Acknowledged writes a run needs before it checks them.
const MIN_ACKED: usize = 10;

/// What the clients saw.
#[derive(Default)]
struct Outcomes {
    acked: BTreeSet<String>,
    failed: BTreeSet<String>,
}

async fn chaos(size: u64, run_for: Duration) {
    let seed = support::seed();
    let router = Router::new(seed);
    let dirs: Vec<_> = (0..size).map(|_| tempfile::tempdir().unwrap()).collect();
    let peers: BTreeMap<u64, String> = (1..=size).map(|id| (id, mem_addr(id))).collect();
    let mut nodes = BTreeMap::new();
    for id in 1..=size {
        let opts = test_options(id, dirs[id as usize - 1].path(), mem_addr(id), &peers);
        nodes.insert(id, open_mem(&router, opts).await);
    }
    let nodes = Arc::new(nodes);
    support::wait_leader(&nodes, Duration::from_secs(10)).await;

    router.set_faults(Faults { drop: 0.05, lose_reply: 0.03, duplicate: 0.05, max_delay: Duration::from_millis(10) });

    // Clients: unique names, through random replicas, following hints.
    // The faults last at least `run_for` and until enough writes got
    // through to check something: a loaded machine gets fewer per second.
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let done = Arc::new(AtomicBool::new(false));
    let stop = Instant::now() + run_for;
    // A hang guard only: no progress at all for this long is a failure.
    let give_up = stop + Duration::from_secs(180);
    let mut clients = Vec::new();
    for client in 0..3 {
        let (nodes, router, outcomes, done) = (nodes.clone(), router.clone(), outcomes.clone(), done.clone());
        clients.push(tokio::spawn(async move {
            let mut seq = 0;
            while !done.load(Ordering::SeqCst) {
                seq += 1;
                let name = format!("c{client}-{seq}");
                let start = router.random(1..=size);
                let result = propose_following(&nodes, start, submit(&name), mem_id).await;
                {
                    let mut o = outcomes.lock().unwrap();
                    match result {
                        Ok(_) => o.acked.insert(name),
                        Err(_) => o.failed.insert(name),
                    };
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }

    // The partitions: a random minority cut off now and then; once, the
    // leader itself, and a write through it must not be acknowledged.
    let mut minority_checked = false;
    let mut minority_names = Vec::new();
    let enough = || outcomes.lock().unwrap().acked.len() >= MIN_ACKED;
    while Instant::now() < stop || (!enough() && Instant::now() < give_up) {
        let pick: u32 = router.random(0..3);
        if pick == 0 || !minority_checked {
            let leader = nodes.values().find(|s| s.is_leader()).map(|s| s.id());
            let Some(leader) = leader else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            router.isolate(&[leader]);
            // Let the majority elect someone else, then write through the
            // isolated replica.
            let rest: BTreeMap<u64, RaftStore> =
                nodes.iter().filter(|(id, _)| **id != leader).map(|(id, s)| (*id, s.clone())).collect();
            support::wait_leader(&rest, Duration::from_secs(20)).await;
            let name = format!("minority-{leader}-{}", minority_names.len());
            let result = nodes[&leader].propose(submit(&name)).await;
            assert!(result.is_err(), "replica {leader}, cut off from the majority, acknowledged {name}");
            if let Err(StoreError::NotLeader { .. }) | Err(StoreError::Unavailable(_)) = result {
            } else {
                panic!("unexpected answer from an isolated replica: {result:?}");
            }
            minority_names.push(name);
            minority_checked = true;
        } else if pick == 1 {
            let victim = router.random(1..=size);
            let other = router.random(1..=size);
            // At most two of the replicas: a minority of 3 is one.
            let side: Vec<u64> = if size >= 5 { vec![victim, other] } else { vec![victim] };
            router.isolate(&side);
        } else {
            router.heal();
        }
        let pause: u64 = router.random(300..800);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    done.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }

    router.heal();
    router.set_faults(Faults::default());
    let leader = support::wait_leader(&nodes, Duration::from_secs(20)).await;
    // A write in the final term makes every earlier entry committed.
    propose_following(&nodes, leader, submit("final"), mem_id).await.expect("write after healing");
    let state = support::wait_converged(&nodes, Duration::from_secs(20)).await;

    let o = std::mem::take(&mut *outcomes.lock().unwrap());
    println!("size {size}: {} acknowledged, {} failed, {} jobs", o.acked.len(), o.failed.len(), state.jobs.len());
    assert!(
        o.acked.len() >= MIN_ACKED,
        "too few writes got through in {:?}: {}",
        give_up - stop + run_for,
        o.acked.len()
    );
    for node in nodes.values() {
        let s = node.snapshot();
        assert_eq!(*s, *state, "replica {} differs", node.id());
        for name in &o.acked {
            assert_eq!(count_named(&s, name), 1, "acknowledged {name} on replica {}", node.id());
        }
        for name in &o.failed {
            assert!(count_named(&s, name) <= 1, "{name} applied twice on replica {}", node.id());
        }
        for name in &minority_names {
            assert_eq!(count_named(&s, name), 0, "{name}, written in a minority, survived on {}", node.id());
        }
    }
    // Every job in the state was asked for by someone.
    for job in state.jobs.values() {
        let known = o.acked.contains(&job.name) || o.failed.contains(&job.name) || job.name == "final";
        assert!(known, "job {} was never submitted", job.name);
    }
    for node in nodes.values() {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_keep_acknowledged_writes_exactly_once_under_faults() {
    chaos(3, Duration::from_secs(8)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_replicas_keep_acknowledged_writes_exactly_once_under_faults() {
    chaos(5, Duration::from_secs(8)).await;
}
