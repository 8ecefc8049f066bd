//! The openraft type configuration of the meta store and the options a
//! replica is opened with. Every default is defined here, once.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::PathBuf;
use std::time::Duration;

use openraft::{BasicNode, Config, SnapshotPolicy};
use serde::{Deserialize, Serialize};

use crate::state::{Command, Event, Rejection, State, DEFAULT_MAX_RESTARTS};

/// A replica's id in the Raft cluster.
pub type NodeId = u64;

/// What applying one committed entry returned: the state machine's events,
/// or its refusal. Blank and membership entries answer `Ok(vec![])`.
pub type ApplyResult = Result<Vec<Event>, Rejection>;

/// What one log entry proposes: one command, or several proposed together
/// (applied in order, each answered on its own). A lone command is stored
/// as a bare `Command`, as before batching.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Proposal {
    One(Command),
    Batch(Vec<Command>),
}

openraft::declare_raft_types!(
    /// The meta store's Raft: `Proposal`s in, one `ApplyResult` per command
    /// out, replicas named by `u64` and reached at
    /// `BasicNode { addr: "http://host:port" }`.
    pub TypeConfig:
        D = Proposal,
        R = Vec<ApplyResult>,
        NodeId = NodeId,
        Node = BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, BasicNode>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;

pub const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(100);
pub const DEFAULT_ELECTION_MIN: Duration = Duration::from_millis(500);
pub const DEFAULT_ELECTION_MAX: Duration = Duration::from_millis(1000);
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(3);
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 5000;
pub const DEFAULT_LOGS_KEPT_AFTER_SNAPSHOT: u64 = 1000;
/// How long `add_member` waits for a new replica's first answer.
pub const DEFAULT_JOIN_CONTACT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `add_member` waits for a new replica to hold the whole log.
pub const DEFAULT_JOIN_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);

/// How one replica is opened: see [`crate::raft::RaftStore::open`].
#[derive(Debug, Clone)]
pub struct RaftOptions {
    /// This replica's id; unique in the cluster, never reused.
    pub id: NodeId,
    /// Where the redb database (log, vote, snapshots) lives.
    pub data_dir: PathBuf,
    /// This replica's gRPC address as peers and clients reach it,
    /// `http://host:port`.
    pub addr: String,
    /// The initial voters (id → address), this replica included, for a
    /// cluster that is created now. On a fresh data dir the lowest id in it
    /// initializes the cluster; a replica that will be added later with
    /// `add_member` is opened with an empty map (or one without itself).
    /// Ignored once the data dir holds state.
    pub peers: BTreeMap<NodeId, String>,
    pub heartbeat: Duration,
    pub election_min: Duration,
    pub election_max: Duration,
    /// How long `propose` and `read_fresh` wait for a quorum.
    pub write_timeout: Duration,
    /// A snapshot is taken after this many applied entries since the last.
    pub snapshot_every: u64,
    /// Applied entries kept in the log behind a snapshot (for slow
    /// followers); older ones are purged.
    pub logs_kept_after_snapshot: u64,
    /// `add_member` refuses a replica that has not answered at all (its
    /// replication has matched nothing) within this long.
    pub join_contact_timeout: Duration,
    /// `add_member` refuses a replica that does not hold the log up to its
    /// own admission within this long.
    pub join_catch_up_timeout: Duration,
    /// The state of a cluster that has applied nothing yet.
    pub initial_state: State,
}

impl RaftOptions {
    /// Options with every default, for replica `id` at `addr`.
    pub fn new(id: NodeId, data_dir: impl Into<PathBuf>, addr: impl Into<String>) -> Self {
        RaftOptions {
            id,
            data_dir: data_dir.into(),
            addr: addr.into(),
            peers: BTreeMap::new(),
            heartbeat: DEFAULT_HEARTBEAT,
            election_min: DEFAULT_ELECTION_MIN,
            election_max: DEFAULT_ELECTION_MAX,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            snapshot_every: DEFAULT_SNAPSHOT_EVERY,
            logs_kept_after_snapshot: DEFAULT_LOGS_KEPT_AFTER_SNAPSHOT,
            join_contact_timeout: DEFAULT_JOIN_CONTACT_TIMEOUT,
            join_catch_up_timeout: DEFAULT_JOIN_CATCH_UP_TIMEOUT,
            initial_state: State::new(DEFAULT_MAX_RESTARTS),
        }
    }

    /// The initial voters, this replica included.
    pub fn with_peers(mut self, peers: BTreeMap<NodeId, String>) -> Self {
        self.peers = peers;
        self
    }

    /// openraft's configuration, validated.
    pub(crate) fn raft_config(&self) -> Result<Config, Box<openraft::ConfigError>> {
        Config {
            cluster_name: "flotilla".to_string(),
            heartbeat_interval: self.heartbeat.as_millis() as u64,
            election_timeout_min: self.election_min.as_millis() as u64,
            election_timeout_max: self.election_max.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.logs_kept_after_snapshot,
            // Purge as soon as a snapshot covers the entries.
            purge_batch_size: 1,
            ..Default::default()
        }
        .validate()
        .map_err(Box::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(i: u64) -> Command {
        Command::RegisterWorker {
            metrics_addr: String::new(),
            device: String::new(),
            data_addr: format!("10.0.0.{i}:7000"),
            hostname: format!("h{i}"),
            rank_hint: None,
            key_hash: String::new(),
            at_ms: 0,
        }
    }

    #[test]
    fn a_lone_command_is_stored_as_before_batching_and_a_batch_reads_back() {
        let bare = serde_json::to_vec(&register(1)).unwrap();
        assert_eq!(serde_json::to_vec(&Proposal::One(register(1))).unwrap(), bare);
        assert_eq!(serde_json::from_slice::<Proposal>(&bare).unwrap(), Proposal::One(register(1)));
        let batch = Proposal::Batch(vec![register(1), register(2)]);
        let bytes = serde_json::to_vec(&batch).unwrap();
        assert_eq!(serde_json::from_slice::<Proposal>(&bytes).unwrap(), batch);
    }
}
