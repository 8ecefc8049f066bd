//! The meta store: keeps the log of commands and the state they build.
//! [`MetaStore`] is the seam for the replicated backends (embedded Raft,
//! etcd); [`MemStore`] keeps the log in memory on one node.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::state::{Command, Event, Rejection, State};

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The command was applied and refused by the state machine.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// This replica is not the leader; retry there.
    #[error("not the leader{}", leader.as_ref().map(|l| format!("; leader is {l}")).unwrap_or_default())]
    NotLeader { leader: Option<String> },
    /// The store cannot take writes now (no quorum, storage failure).
    #[error("meta store unavailable: {0}")]
    Unavailable(String),
    /// The request is malformed (a bad address, an id out of range).
    #[error("{0}")]
    Invalid(String),
    /// The request is well formed but cannot be done in the cluster's
    /// present state (a replica that never answered, a duplicate id).
    #[error("{0}")]
    Refused(String),
}

#[async_trait]
pub trait MetaStore: Send + Sync + 'static {
    /// Appends `cmd` to the log, applies it once committed and returns what
    /// it did.
    async fn propose(&self, cmd: Command) -> Result<Vec<Event>, StoreError>;
    /// The state after the latest applied command.
    fn snapshot(&self) -> Arc<State>;
    /// Changes to the applied state, one value per apply (or fewer).
    fn subscribe(&self) -> watch::Receiver<Arc<State>>;
    /// Whether this replica may decide (leases, scheduling) and take writes.
    fn is_leader(&self) -> bool;
    /// The client-facing address (`http://host:port`) of the replica that is
    /// leader now, if this replica knows it: the hint a follower answers with.
    fn leader_hint(&self) -> Option<String> {
        None
    }
    /// A read that reflects every write acknowledged before the call began
    /// (Raft's read index on a replicated store). Fails on a replica that
    /// cannot prove it is current, for example a deposed leader.
    async fn read_fresh(&self) -> Result<Arc<State>, StoreError> {
        Ok(self.snapshot())
    }
    /// Where the replicated log stands, for the metrics; `None` for a
    /// store that is not Raft.
    fn raft_status(&self) -> Option<RaftStatus> {
        None
    }
}

/// Where a Raft replica's log stands (see `telemetry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaftStatus {
    pub term: u64,
    pub last_log_index: u64,
    pub applied_index: u64,
    /// Known on the leader only: the index a quorum of voters has matched.
    pub commit_index: Option<u64>,
}

/// A single-node store with the log in memory: the embedded default until
/// the Raft backend lands.
pub struct MemStore {
    inner: Mutex<MemInner>,
    tx: watch::Sender<Arc<State>>,
}

struct MemInner {
    state: State,
    log: Vec<Command>,
}

impl MemStore {
    pub fn new(initial: State) -> Self {
        let (tx, _) = watch::channel(Arc::new(initial.clone()));
        MemStore { inner: Mutex::new(MemInner { state: initial, log: Vec::new() }), tx }
    }

    /// Number of commands in the log.
    pub fn log_len(&self) -> usize {
        self.inner.lock().expect("store lock").log.len()
    }
}

#[async_trait]
impl MetaStore for MemStore {
    async fn propose(&self, cmd: Command) -> Result<Vec<Event>, StoreError> {
        let mut inner = self.inner.lock().expect("store lock");
        inner.log.push(cmd.clone());
        let result = inner.state.apply(cmd);
        if result.is_ok() {
            self.tx.send_replace(Arc::new(inner.state.clone()));
        }
        Ok(result?)
    }

    fn snapshot(&self) -> Arc<State> {
        self.tx.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<Arc<State>> {
        self.tx.subscribe()
    }

    fn is_leader(&self) -> bool {
        true
    }
}
