//! [`RaftStore`]: the [`MetaStore`] on openraft. Writes go through
//! `client_write` on the leader; a follower answers with the leader's
//! address. Also the membership administration used by the `Cluster` service.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use flotilla_proto::raft::v1::cluster_server::ClusterServer;
use flotilla_proto::raft::v1::raft_server::RaftServer;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, RaftMetrics, RaftNetworkFactory, ServerState};
use tokio::sync::watch;
use tonic::service::Routes;

use super::db::Db;
use super::log_store::LogStore;
use super::network::GrpcNetwork;
use super::proposer::Proposer;
use super::service::{ClusterApi, RaftApi};
use super::state_machine::StateMachineStore;
use super::types::{NodeId, Raft, RaftOptions, TypeConfig};
use crate::limits;
use crate::state::{Command, Event, State};
use crate::store::{MetaStore, StoreError};

/// The largest gRPC message a replica accepts from a peer (snapshot chunks
/// and entry batches, JSON-encoded).
const MAX_MESSAGE: usize = 64 << 20;

/// How long `shutdown` waits for the storage to close.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a replica could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("invalid raft options: {0}")]
    Config(#[from] Box<openraft::ConfigError>),
    #[error("open raft storage in {dir}: {reason}")]
    Storage { dir: String, reason: String },
    #[error("start raft node: {0}")]
    Start(String),
}

/// One replica of the coordinator's meta store; a cheap clone of a handle.
#[derive(Clone)]
pub struct RaftStore {
    inner: Arc<Inner>,
}

struct Inner {
    id: NodeId,
    addr: String,
    raft: Raft,
    /// Batches concurrent writes into one entry each.
    proposer: Proposer,
    state: watch::Receiver<Arc<State>>,
    write_timeout: Duration,
    join_contact_timeout: Duration,
    join_catch_up_timeout: Duration,
    /// The initial voters this replica was opened with: the only senders
    /// it accepts Raft messages from before it knows a membership.
    bootstrap: BTreeSet<NodeId>,
    /// The database, to know when the node's tasks have let go of it.
    db: Weak<redb::Database>,
}

/// One member of the cluster as this replica sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    pub id: NodeId,
    pub addr: String,
    /// A voter, or a learner that only follows the log.
    pub voter: bool,
    /// The highest index known to be replicated to it; known on the leader.
    pub matched_index: Option<u64>,
}

/// The membership and the leader, as this replica sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterInfo {
    pub leader: Option<NodeId>,
    pub leader_addr: Option<String>,
    pub members: Vec<MemberInfo>,
    /// The last log index this replica holds (on the leader: every member
    /// whose matched index equals it has the whole log).
    pub last_log_index: Option<u64>,
}

impl RaftStore {
    /// Opens the replica described by `opts`, with peers reached over gRPC.
    /// On a fresh data dir, the lowest id of `opts.peers` creates the
    /// cluster with those peers as voters; an existing data dir is resumed
    /// as it was and never initialized again.
    pub async fn open(opts: RaftOptions) -> Result<RaftStore, OpenError> {
        RaftStore::open_with_network(opts, GrpcNetwork).await
    }

    /// As [`RaftStore::open`], with another network (tests route messages
    /// in memory).
    pub async fn open_with_network<N>(opts: RaftOptions, network: N) -> Result<RaftStore, OpenError>
    where
        N: RaftNetworkFactory<TypeConfig>,
    {
        let config = Arc::new(opts.raft_config()?);
        let storage_err = |reason: String| OpenError::Storage { dir: opts.data_dir.display().to_string(), reason };
        let db = Db::open(&opts.data_dir).await.map_err(|e| storage_err(e.to_string()))?;
        let weak_db = db.downgrade();
        let mut log_store = LogStore::new(db.clone());
        let pristine = log_store.is_pristine().await.map_err(|e| storage_err(e.to_string()))?;
        let sm =
            StateMachineStore::open(db, opts.initial_state.clone()).await.map_err(|e| storage_err(e.to_string()))?;
        let state = sm.watch();
        let raft =
            Raft::new(opts.id, config, network, log_store, sm).await.map_err(|e| OpenError::Start(e.to_string()))?;
        let founder = opts.peers.keys().next() == Some(&opts.id);
        if pristine && founder {
            let members: BTreeMap<NodeId, BasicNode> =
                opts.peers.iter().map(|(id, addr)| (*id, BasicNode { addr: addr.clone() })).collect();
            tracing::info!(id = opts.id, members = ?opts.peers, "initializing raft cluster");
            raft.initialize(members).await.map_err(|e| OpenError::Start(format!("initialize cluster: {e}")))?;
        }
        tracing::info!(id = opts.id, addr = %opts.addr, pristine, "raft replica open");
        let proposer = Proposer::start(raft.clone(), opts.write_timeout);
        let inner = Inner {
            id: opts.id,
            addr: opts.addr,
            raft,
            proposer,
            state,
            write_timeout: opts.write_timeout,
            join_contact_timeout: opts.join_contact_timeout,
            join_catch_up_timeout: opts.join_catch_up_timeout,
            bootstrap: opts.peers.keys().copied().collect(),
            db: weak_db,
        };
        Ok(RaftStore { inner: Arc::new(inner) })
    }

    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// This replica's gRPC address.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// The openraft node: for metrics, and for tests that deliver messages.
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// The `Raft` and `Cluster` gRPC services of this replica, to be served
    /// beside the coordinator's own (see `server::serve_with_routes`).
    pub fn routes(&self) -> Routes {
        let raft = RaftServer::new(RaftApi::new(self.inner.raft.clone(), self.inner.bootstrap.clone()))
            .max_decoding_message_size(MAX_MESSAGE);
        let cluster = ClusterServer::new(ClusterApi(self.clone()));
        Routes::new(raft).add_service(cluster)
    }

    /// Stops the Raft node and waits (up to a few seconds) until its tasks
    /// have closed the database, so that the data dir can be opened again.
    pub async fn shutdown(&self) {
        self.inner.proposer.shutdown().await;
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "raft node ended with an error");
        }
        let deadline = tokio::time::Instant::now() + SHUTDOWN_TIMEOUT;
        while self.inner.db.strong_count() > 0 {
            if tokio::time::Instant::now() > deadline {
                tracing::warn!(id = self.inner.id, "raft storage still open after shutdown");
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn metrics(&self) -> RaftMetrics<NodeId, BasicNode> {
        self.inner.raft.metrics().borrow().clone()
    }

    fn addr_of(metrics: &RaftMetrics<NodeId, BasicNode>, id: NodeId) -> Option<String> {
        metrics.membership_config.membership().get_node(&id).map(|n| n.addr.clone())
    }

    /// The membership and leader as this replica sees them.
    pub fn members(&self) -> ClusterInfo {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, node)| MemberInfo {
                id: *id,
                addr: node.addr.clone(),
                voter: voters.contains(id),
                matched_index: m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(id).cloned().flatten())
                    .map(|l| l.index)
                    .or(if *id == m.id { m.last_log_index } else { None }),
            })
            .collect();
        ClusterInfo {
            leader: m.current_leader,
            leader_addr: m.current_leader.and_then(|l| Self::addr_of(&m, l)),
            members,
            last_log_index: m.last_log_index,
        }
    }

    /// [`RaftStore::members`], or `NotLeader` on a follower.
    pub(crate) fn members_on_leader(&self) -> Result<ClusterInfo, StoreError> {
        self.ensure_leader()?;
        Ok(self.members())
    }

    fn ensure_leader(&self) -> Result<(), StoreError> {
        if self.is_leader() {
            Ok(())
        } else {
            Err(StoreError::NotLeader { leader: self.leader_hint() })
        }
    }

    /// Adds replica `id` at `addr` (as the network reaches it; the gRPC
    /// service checks that it is `http://host:port`): first as a learner,
    /// then, once it holds the log up to its own admission, as a voter. A
    /// replica that never answers (within `join_contact_timeout`) or does
    /// not catch up (within `join_catch_up_timeout`) is removed again and
    /// the call refused: the voters, and so the quorum, stay as they were.
    /// Only on the leader.
    pub async fn add_member(&self, id: NodeId, addr: String) -> Result<ClusterInfo, StoreError> {
        self.ensure_leader()?;
        if id == 0 {
            return Err(StoreError::Invalid("replica ids start at 1".into()));
        }
        let info = self.members();
        if let Some(m) = info.members.iter().find(|m| m.id == id) {
            if m.addr != addr {
                return Err(StoreError::Refused(format!(
                    "replica {id} is already a member at {}; remove it first to move it to {}",
                    m.addr,
                    limits::quote(&addr)
                )));
            }
            if m.voter {
                return Ok(info);
            }
        }
        let raft = &self.inner.raft;
        let node = BasicNode { addr: addr.clone() };
        let added = match tokio::time::timeout(self.inner.write_timeout, raft.add_learner(id, node, false)).await {
            Err(_) => return Err(self.no_quorum()),
            Ok(result) => result.map_err(|e| self.write_error(e))?,
        };
        tracing::info!(id, %addr, "replica added as a learner; waiting for it to catch up");
        if let Err(why) = self.wait_caught_up(id, added.log_id.index).await {
            tracing::warn!(id, %addr, reason = %why, "new replica refused; removing it again");
            let undo = self.membership_write(ChangeMembers::RemoveNodes(BTreeSet::from([id]))).await;
            let undone = match undo {
                Ok(()) => "it was removed again and the cluster is as before".to_string(),
                Err(e) => format!("removing it again failed ({e}); run `flotilla coordinator remove {id}`"),
            };
            return Err(StoreError::Refused(format!("replica {id} at {addr} was not added: {why}; {undone}")));
        }
        self.membership_write(ChangeMembers::AddVoterIds(BTreeSet::from([id]))).await?;
        tracing::info!(id, "replica added to the cluster");
        Ok(self.members())
    }

    /// Waits until the leader's replication to `id` has matched the log up
    /// to `index`; says why not otherwise.
    async fn wait_caught_up(&self, id: NodeId, index: u64) -> Result<(), String> {
        let start = tokio::time::Instant::now();
        let (contact, catch_up) = (self.inner.join_contact_timeout, self.inner.join_catch_up_timeout);
        let mut metrics = self.inner.raft.metrics();
        loop {
            let matched = {
                let m = metrics.borrow_and_update();
                let Some(replication) = m.replication.as_ref() else {
                    return Err("this replica stopped leading while it caught up".into());
                };
                replication.get(&id).cloned().flatten().map(|l| l.index)
            };
            if matched.is_some_and(|m| m >= index) {
                return Ok(());
            }
            let waited = start.elapsed();
            if matched.is_none() && waited >= contact {
                return Err(format!(
                    "it did not answer within {contact:?} (is it running, started with --join, and reachable at \
                     that address?)"
                ));
            }
            if waited >= catch_up {
                return Err(format!(
                    "it did not catch up within {catch_up:?} (it holds the log to index {}, {index} needed)",
                    matched.unwrap_or(0)
                ));
            }
            // Metrics change on every replication step; the period bounds
            // the wait when nothing happens at all.
            let _ = tokio::time::timeout(Duration::from_millis(100), metrics.changed()).await;
        }
    }

    /// Removes replica `id` from the voters and from the cluster. Only on
    /// the leader; never the last voter.
    pub async fn remove_member(&self, id: NodeId) -> Result<ClusterInfo, StoreError> {
        self.ensure_leader()?;
        let info = self.members();
        let Some(member) = info.members.iter().find(|m| m.id == id) else {
            return Err(StoreError::Refused(format!("replica {id} is not a member of the cluster")));
        };
        if member.voter {
            if info.members.iter().filter(|m| m.voter).count() == 1 {
                return Err(StoreError::Refused(format!("replica {id} is the last voter; it cannot be removed")));
            }
            self.membership_write(ChangeMembers::RemoveVoters(BTreeSet::from([id]))).await?;
        }
        // A removed voter stays a learner unless removed as a node too.
        self.membership_write(ChangeMembers::RemoveNodes(BTreeSet::from([id]))).await?;
        tracing::info!(id, "replica removed from the cluster");
        Ok(self.members())
    }

    async fn membership_write(&self, change: ChangeMembers<NodeId, BasicNode>) -> Result<(), StoreError> {
        let write = self.inner.raft.change_membership(change, false);
        match tokio::time::timeout(self.inner.write_timeout, write).await {
            Err(_) => Err(self.no_quorum()),
            Ok(result) => result.map(|_| ()).map_err(|e| self.write_error(e)),
        }
    }

    fn no_quorum(&self) -> StoreError {
        StoreError::Unavailable(format!("no quorum within {:?}", self.inner.write_timeout))
    }

    fn write_error(&self, e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> StoreError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                StoreError::NotLeader { leader: f.leader_node.map(|n| n.addr).or_else(|| self.leader_hint()) }
            }
            RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
                StoreError::Unavailable(format!("change membership: {c}"))
            }
            RaftError::Fatal(f) => StoreError::Unavailable(format!("raft stopped: {f}")),
        }
    }
}

#[async_trait]
impl MetaStore for RaftStore {
    async fn propose(&self, cmd: Command) -> Result<Vec<Event>, StoreError> {
        let write = self.inner.proposer.propose(cmd);
        match tokio::time::timeout(self.inner.write_timeout, write).await {
            Err(_) => Err(self.no_quorum()),
            Ok(Err(_)) => Err(StoreError::Unavailable("raft stopped".into())),
            Ok(Ok(Err(e))) => Err(self.write_error(e)),
            Ok(Ok(Ok(result))) => result.map_err(StoreError::Rejected),
        }
    }

    fn snapshot(&self) -> Arc<State> {
        self.inner.state.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<Arc<State>> {
        self.inner.state.clone()
    }

    fn is_leader(&self) -> bool {
        let m = self.inner.raft.metrics();
        let m = m.borrow();
        // A leader restarted from its own committed vote believes it leads
        // until it hears of a newer term; until a quorum has acknowledged it
        // in this term, it does not count as leading.
        m.state == ServerState::Leader && m.current_leader == Some(self.inner.id) && m.millis_since_quorum_ack.is_some()
    }

    fn leader_hint(&self) -> Option<String> {
        let m = self.metrics();
        m.current_leader.and_then(|l| Self::addr_of(&m, l))
    }

    fn raft_status(&self) -> Option<crate::store::RaftStatus> {
        let m = self.metrics();
        let last_log_index = m.last_log_index.unwrap_or(0);
        // openraft's metrics carry no commit index: the leader computes it
        // from what its voters matched (its own log counts as matched).
        let commit_index = m.replication.as_ref().and_then(|r| {
            let matched = m
                .membership_config
                .membership()
                .voter_ids()
                .map(|v| match r.get(&v) {
                    Some(l) => l.map_or(0, |l| l.index),
                    None if v == self.inner.id => last_log_index,
                    None => 0,
                })
                .collect();
            crate::telemetry::quorum_index(matched)
        });
        Some(crate::store::RaftStatus {
            term: m.current_term,
            last_log_index,
            applied_index: m.last_applied.map_or(0, |l| l.index),
            commit_index,
        })
    }

    async fn read_fresh(&self) -> Result<Arc<State>, StoreError> {
        let read = self.inner.raft.ensure_linearizable();
        match tokio::time::timeout(self.inner.write_timeout, read).await {
            Err(_) => Err(self.no_quorum()),
            Ok(Ok(_)) => Ok(self.snapshot()),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                Err(StoreError::NotLeader { leader: f.leader_node.map(|n| n.addr).or_else(|| self.leader_hint()) })
            }
            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)))) => {
                Err(StoreError::Unavailable(q.to_string()))
            }
            Ok(Err(RaftError::Fatal(f))) => Err(StoreError::Unavailable(format!("raft stopped: {f}"))),
        }
    }
}
