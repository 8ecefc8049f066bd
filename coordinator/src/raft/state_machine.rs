//! The replicated state machine: applies each committed `Command` to
//! [`State`] once, publishes the result on a watch channel, and keeps the
//! latest snapshot (the serialized `State`) in redb. On open it starts from
//! that snapshot; openraft then re-applies the committed entries after it.

use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::db::{decode, encode, Db, DbError, KEY_SNAPSHOT};
use super::types::{
    ApplyResult, Entry, LogId, Proposal, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};
use crate::state::State;

/// What a snapshot holds, as stored in redb.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    /// `State` as JSON: also the bytes sent to a follower.
    data: Vec<u8>,
}

/// The applied state and where in the log it stands.
#[derive(Clone)]
struct Applied {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    state: State,
}

pub struct StateMachineStore {
    db: Db,
    applied: Applied,
    tx: watch::Sender<Arc<State>>,
    snapshots_built: u64,
}

impl StateMachineStore {
    /// Starts from the stored snapshot if there is one, else from `initial`.
    pub(crate) async fn open(db: Db, initial: State) -> Result<Self, DbError> {
        let stored: Option<StoredSnapshot> = db.get_meta(KEY_SNAPSHOT).await?;
        let applied = match stored {
            Some(s) => Applied {
                last_applied: s.meta.last_log_id,
                membership: s.meta.last_membership.clone(),
                state: decode(&s.data)?,
            },
            None => Applied { last_applied: None, membership: StoredMembership::default(), state: initial },
        };
        let (tx, _) = watch::channel(Arc::new(applied.state.clone()));
        Ok(StateMachineStore { db, applied, tx, snapshots_built: 0 })
    }

    /// A receiver of the applied state, one value per applied batch.
    pub(crate) fn watch(&self) -> watch::Receiver<Arc<State>> {
        self.tx.subscribe()
    }

    fn publish(&self) {
        self.tx.send_replace(Arc::new(self.applied.state.clone()));
    }
}

/// Builds a snapshot of the state as it was when the builder was made.
pub struct SnapshotBuilder {
    db: Db,
    applied: Applied,
    seq: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let data = encode(&self.applied.state).map_err(|e| StorageIOError::read_state_machine(&e))?;
        let snapshot_id = match &self.applied.last_applied {
            Some(id) => format!("{}-{}-{}", id.leader_id, id.index, self.seq),
            None => format!("none-{}", self.seq),
        };
        let meta = SnapshotMeta {
            last_log_id: self.applied.last_applied,
            last_membership: self.applied.membership.clone(),
            snapshot_id,
        };
        let stored = StoredSnapshot { meta: meta.clone(), data: data.clone() };
        self.db
            .put_meta(KEY_SNAPSHOT, &stored)
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        tracing::debug!(snapshot = %meta, "snapshot built");
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.applied.last_applied, self.applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<ApplyResult>>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut results = Vec::new();
        for entry in entries {
            // An entry at or below the applied point was applied already
            // (a replay): answering it again must not change the state.
            if Some(entry.log_id) <= self.applied.last_applied {
                tracing::warn!(log_id = %entry.log_id, "entry applied twice; skipped");
                results.push(Vec::new());
                continue;
            }
            self.applied.last_applied = Some(entry.log_id);
            let result = match entry.payload {
                EntryPayload::Blank => Vec::new(),
                EntryPayload::Normal(Proposal::One(cmd)) => vec![self.applied.state.apply(cmd)],
                EntryPayload::Normal(Proposal::Batch(cmds)) => {
                    cmds.into_iter().map(|cmd| self.applied.state.apply(cmd)).collect()
                }
                EntryPayload::Membership(m) => {
                    self.applied.membership = StoredMembership::new(Some(entry.log_id), m);
                    Vec::new()
                }
            };
            results.push(result);
        }
        self.publish();
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshots_built += 1;
        SnapshotBuilder { db: self.db.clone(), applied: self.applied.clone(), seq: self.snapshots_built }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let state: State = decode(&data).map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let stored = StoredSnapshot { meta: meta.clone(), data };
        self.db
            .put_meta(KEY_SNAPSHOT, &stored)
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        self.applied = Applied { last_applied: meta.last_log_id, membership: meta.last_membership.clone(), state };
        self.publish();
        tracing::info!(snapshot = %meta, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let stored: Option<StoredSnapshot> =
            self.db.get_meta(KEY_SNAPSHOT).await.map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(stored.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Entry, EntryPayload};

    use super::*;
    use crate::state::{Command, DEFAULT_MAX_RESTARTS};

    fn job(index: u64, name: &str) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Proposal::One(Command::SubmitJob {
                name: name.into(),
                spec_json: "{}".into(),
                min_workers: 1,
                max_workers: 1,
                fixed_world: None,
                stages: 1,
                total_steps: 1,
                keep_checkpoints: 1,
                output_root: "/tmp".into(),
                submission_id: None,
                spec_yaml: String::new(),
                registry: None,
                uid: String::new(),
                data_key: Default::default(),
                owner: None,
                priority: 0,
                at_ms: 0,
            })),
        }
    }

    #[tokio::test]
    async fn a_replayed_entry_is_not_applied_again_and_snapshots_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).await.unwrap();
        let mut sm = StateMachineStore::open(db.clone(), State::new(DEFAULT_MAX_RESTARTS)).await.unwrap();
        let first = sm.apply([job(1, "a"), job(2, "b")]).await.unwrap();
        assert!(first.iter().all(|r| matches!(&r[..], [Ok(events)] if events.len() == 1)), "{first:?}");
        let replay = sm.apply([job(2, "b"), job(3, "c")]).await.unwrap();
        assert_eq!(replay[0], Vec::new());
        let state = sm.watch().borrow().clone();
        assert_eq!(state.jobs.len(), 3);
        assert_eq!(state.jobs.values().filter(|j| j.name == "b").count(), 1);

        let snapshot = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert_eq!(snapshot.meta.last_log_id.map(|l| l.index), Some(3));
        drop(sm);
        let mut reopened = StateMachineStore::open(db, State::default()).await.unwrap();
        assert_eq!(*reopened.watch().borrow().clone(), *state);
        assert_eq!(reopened.applied_state().await.unwrap().0.map(|l| l.index), Some(3));
    }
}
