//! One test suite for every meta-store backend. A backend's test file builds
//! a [`TestCluster`] of N replicas and calls the `suite_*` functions that
//! apply to it; each function asserts what every backend must do.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use flotilla_coordinator::state::{Command, Event, Rejection, State};
use flotilla_coordinator::{MetaStore, StoreError};

/// N replicas of one backend, numbered `0..size()`.
#[async_trait]
pub trait TestCluster: Send + Sync {
    fn size(&self) -> usize;
    /// Replica `i`, or `None` while it is stopped.
    fn replica(&self, i: usize) -> Option<Arc<dyn MetaStore>>;
    /// Stops replica `i` as a shutdown would (a leader hands over).
    async fn stop(&mut self, i: usize);
    /// Starts replica `i` again as a new store object on the same durable
    /// backend (after `stop`, or in place of a running one).
    async fn start(&mut self, i: usize);
    /// Makes the backend snapshot its state and drop the log before it.
    /// Returns false when the backend has no such thing.
    async fn compact(&mut self) -> bool;
}

const WAIT: Duration = Duration::from_secs(10);

/// The running replicas, with their numbers.
pub fn live(c: &dyn TestCluster) -> Vec<(usize, Arc<dyn MetaStore>)> {
    (0..c.size()).filter_map(|i| c.replica(i).map(|r| (i, r))).collect()
}

/// A fresh read on replica `i`. The leader must serve it; a follower either
/// serves it (etcd: every replica can read the log's head from etcd) or
/// redirects to the leader (Raft: the services read on the leader only).
/// `None` for a redirect.
pub async fn fresh_read(r: &dyn MetaStore, i: usize) -> Option<Arc<State>> {
    match r.read_fresh().await {
        Ok(s) => Some(s),
        Err(StoreError::NotLeader { leader: Some(_) }) if !r.is_leader() => None,
        Err(e) => panic!("read_fresh on replica {i}: {e}"),
    }
}

/// Waits until exactly one running replica is leader and returns it; fails
/// if it ever sees two.
pub async fn leader(c: &dyn TestCluster) -> (usize, Arc<dyn MetaStore>) {
    let deadline = Instant::now() + WAIT;
    loop {
        let leaders: Vec<_> = live(c).into_iter().filter(|(_, r)| r.is_leader()).collect();
        let who: Vec<usize> = leaders.iter().map(|(i, _)| *i).collect();
        assert!(who.len() <= 1, "replicas {who:?} are all leaders");
        if leaders.len() == 1 {
            return leaders.into_iter().next().unwrap();
        }
        assert!(Instant::now() < deadline, "no single leader within {WAIT:?}: {} leaders", leaders.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn register(host: &str) -> Command {
    Command::RegisterWorker {
        metrics_addr: String::new(),
        device: String::new(),
        data_addr: format!("{host}:7000"),
        hostname: host.into(),
        rank_hint: None,
        key_hash: String::new(),
        at_ms: 1,
    }
}

/// Proposes on the leader, retrying while leadership moves.
pub async fn propose(c: &dyn TestCluster, cmd: Command) -> Result<Vec<Event>, StoreError> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, l) = leader(c).await;
        match l.propose(cmd.clone()).await {
            Err(StoreError::NotLeader { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => return other,
        }
    }
}

async fn register_ok(c: &dyn TestCluster, host: &str) -> String {
    match propose(c, register(host)).await {
        Ok(events) => match events.as_slice() {
            [Event::WorkerRegistered { worker }] => worker.clone(),
            other => panic!("registering {host} gave {other:?}"),
        },
        Err(e) => panic!("registering {host}: {e}"),
    }
}

/// Waits until every running replica's applied state equals `want`.
pub async fn converge(c: &dyn TestCluster, want: &State) {
    for (i, r) in live(c) {
        let mut rx = r.subscribe();
        let got = tokio::time::timeout(WAIT, rx.wait_for(|s| **s == *want)).await;
        assert!(got.is_ok(), "replica {i} did not reach the expected state: {:?}", r.snapshot());
    }
}

fn hosts(s: &State) -> BTreeSet<String> {
    s.workers.values().map(|w| w.hostname.clone()).collect()
}

/// propose returns the state machine's events, and its rejections.
pub async fn suite_propose_returns_events(c: &mut dyn TestCluster) {
    let first = register_ok(c, "alpha").await;
    let second = register_ok(c, "beta").await;
    assert_ne!(first, second);
    let cancel = Command::CancelJob { job: "no-such-job".into(), at_ms: 2 };
    match propose(c, cancel).await {
        Err(StoreError::Rejected(Rejection::JobNotFound(job))) => assert_eq!(job, "no-such-job"),
        other => panic!("cancel of an unknown job gave {other:?}"),
    }
    let remove = Command::RemoveWorker { worker: first.clone(), reason: "test".into(), at_ms: 3 };
    let events = propose(c, remove).await.expect("remove worker");
    assert_eq!(events, vec![Event::WorkerRemoved { worker: first, reason: "test".into() }]);
    let (_, l) = leader(c).await;
    assert_eq!(hosts(&l.snapshot()), BTreeSet::from(["beta".to_string()]));
}

/// Every replica sees the committed state, through snapshot, subscribe and
/// read_fresh.
pub async fn suite_state_on_every_replica(c: &mut dyn TestCluster) {
    for h in ["a", "b", "c"] {
        register_ok(c, h).await;
    }
    let (_, l) = leader(c).await;
    let want = (*l.snapshot()).clone();
    assert_eq!(hosts(&want).len(), 3);
    converge(c, &want).await;
    for (i, r) in live(c) {
        assert_eq!(*r.snapshot(), want, "replica {i}");
        if let Some(fresh) = fresh_read(&*r, i).await {
            assert_eq!(*fresh, want, "replica {i}");
        }
    }
    // read_fresh sees a write acknowledged just before it, on every replica.
    register_ok(c, "d").await;
    for (i, r) in live(c) {
        if let Some(fresh) = fresh_read(&*r, i).await {
            assert!(hosts(&fresh).contains("d"), "replica {i} read_fresh misses the last write");
        }
    }
}

/// Exactly one leader; every other replica refuses writes with the leader's
/// address, and applies nothing for them.
pub async fn suite_followers_redirect(c: &mut dyn TestCluster) {
    let (li, l) = leader(c).await;
    let addr = l.leader_hint();
    if c.size() > 1 {
        assert!(addr.is_some(), "the leader does not know its own address");
    }
    let addr = addr.unwrap_or_default();
    register_ok(c, "before").await;
    for (i, r) in live(c) {
        if i == li {
            continue;
        }
        assert!(!r.is_leader(), "replica {i} also claims leadership");
        match r.propose(register("refused")).await {
            Err(StoreError::NotLeader { leader }) => assert_eq!(leader.as_deref(), Some(addr.as_str()), "replica {i}"),
            other => panic!("follower {i} answered {other:?}"),
        }
    }
    register_ok(c, "after").await;
    let want = (*leader(c).await.1.snapshot()).clone();
    assert!(!hosts(&want).contains("refused"));
    converge(c, &want).await;
    for (i, r) in live(c) {
        if i != li {
            assert_eq!(r.leader_hint().as_deref(), Some(addr.as_str()), "hint on replica {i}");
        }
    }
}

/// Stopping the leader hands leadership to another replica within seconds,
/// with nothing committed lost; the old one rejoins and catches up.
pub async fn suite_leader_failover(c: &mut dyn TestCluster) {
    assert!(c.size() >= 2, "failover needs two replicas");
    for h in ["one", "two", "three"] {
        register_ok(c, h).await;
    }
    let (old, l) = leader(c).await;
    let before = (*l.snapshot()).clone();
    drop(l);
    let t = Instant::now();
    c.stop(old).await;
    let (new, nl) = leader(c).await;
    let took = t.elapsed();
    assert_ne!(new, old);
    assert!(took < Duration::from_secs(5), "failover took {took:?}");
    let fresh = nl.read_fresh().await.expect("read on the new leader");
    assert_eq!(*fresh, before, "the new leader lost committed state");
    register_ok(c, "four").await;
    c.start(old).await;
    let want = (*leader(c).await.1.snapshot()).clone();
    assert_eq!(hosts(&want).len(), 4);
    converge(c, &want).await;
}

/// A replica started again (a new store object) recovers the same state;
/// so does a restarted leader.
pub async fn suite_restart_recovers(c: &mut dyn TestCluster) {
    for h in ["r1", "r2", "r3"] {
        register_ok(c, h).await;
    }
    let (li, l) = leader(c).await;
    let want = (*l.snapshot()).clone();
    drop(l);
    for i in (0..c.size()).filter(|&i| i != li).chain([li]) {
        c.start(i).await;
        let r = c.replica(i).expect("restarted replica");
        match fresh_read(&*r, i).await {
            Some(fresh) => assert_eq!(*fresh, want, "replica {i} after restart"),
            None => converge(c, &want).await,
        }
    }
    register_ok(c, "r4").await;
    let want = (*leader(c).await.1.snapshot()).clone();
    assert_eq!(hosts(&want).len(), 4);
    converge(c, &want).await;
}

/// 16 tasks propose at once: every command is applied exactly once, in one
/// order that every replica shares.
pub async fn suite_concurrent_proposals(c: &mut dyn TestCluster) {
    const TASKS: usize = 16;
    const EACH: usize = 8;
    let (_, l) = leader(c).await;
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let l = l.clone();
        handles.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for k in 0..EACH {
                match l.propose(register(&format!("t{t}-{k}"))).await {
                    Ok(ev) => match ev.as_slice() {
                        [Event::WorkerRegistered { worker }] => ids.push(worker.clone()),
                        other => panic!("unexpected events {other:?}"),
                    },
                    Err(e) => panic!("proposal t{t}-{k}: {e}"),
                }
            }
            ids
        }));
    }
    let mut all = BTreeSet::new();
    for h in handles {
        let ids = h.await.expect("task");
        // A task's own proposals are applied in the order it made them.
        let seqs: Vec<u64> = ids.iter().map(|w| w.trim_start_matches('w').parse().unwrap()).collect();
        assert!(seqs.windows(2).all(|p| p[0] < p[1]), "out of order: {seqs:?}");
        all.extend(seqs);
    }
    let n = (TASKS * EACH) as u64;
    let first = *all.first().unwrap();
    assert_eq!(all.len() as u64, n, "some proposal was applied twice or not at all");
    assert_eq!(*all.last().unwrap(), first + n - 1, "worker numbers are not contiguous");
    let want = (*l.snapshot()).clone();
    assert_eq!(want.workers.len() as u64, n);
    // The same state everywhere: the same worker numbers for the same hosts,
    // so the same total order.
    converge(c, &want).await;
}

/// After a snapshot drops the log, a replica started afresh loads the same
/// state, and the log goes on after the snapshot.
pub async fn suite_snapshot_then_new_replica(c: &mut dyn TestCluster) {
    for k in 0..20 {
        register_ok(c, &format!("s{k}")).await;
    }
    let compacted = c.compact().await;
    for k in 20..25 {
        register_ok(c, &format!("s{k}")).await;
    }
    let (li, l) = leader(c).await;
    let want = (*l.snapshot()).clone();
    drop(l);
    assert_eq!(hosts(&want).len(), 25);
    let i = if c.size() > 1 { (li + 1) % c.size() } else { li };
    if compacted || c.size() > 1 {
        c.stop(i).await;
        c.start(i).await;
        let r = c.replica(i).expect("started replica");
        match fresh_read(&*r, i).await {
            Some(fresh) => assert_eq!(*fresh, want),
            None => converge(c, &want).await,
        }
    }
    register_ok(c, "s25").await;
    let want = (*leader(c).await.1.snapshot()).clone();
    converge(c, &want).await;
}
