//! The Raft log on redb: entries, vote, committed id and purge point. The
//! log store and its readers are cheap clones of one database handle.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader, StorageIOError, Vote};
use redb::{ReadableDatabase, ReadableTable};

use super::db::{self, decode, encode, err, Db, DbError, KEY_COMMITTED, KEY_PURGED, KEY_VOTE, LOG};
use super::types::{Entry, LogId, NodeId, StorageError, TypeConfig};

#[derive(Clone)]
pub struct LogStore {
    db: Db,
}

impl LogStore {
    pub(crate) fn new(db: Db) -> Self {
        LogStore { db }
    }

    /// Whether nothing was ever stored: no vote, no entry, nothing purged.
    pub(crate) async fn is_pristine(&mut self) -> Result<bool, StorageError> {
        let state = self.get_log_state().await?;
        let vote = self.read_vote().await?;
        Ok(state.last_log_id.is_none() && vote.is_none())
    }
}

fn to_owned_bound(b: Bound<&u64>) -> Bound<u64> {
    match b {
        Bound::Included(x) => Bound::Included(*x),
        Bound::Excluded(x) => Bound::Excluded(*x),
        Bound::Unbounded => Bound::Unbounded,
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let range = (to_owned_bound(range.start_bound()), to_owned_bound(range.end_bound()));
        self.db
            .run(move |db| {
                let txn = db.begin_read().map_err(err("begin read"))?;
                let table = txn.open_table(LOG).map_err(err("open log"))?;
                let mut out = Vec::new();
                for item in table.range::<u64>(range).map_err(err("range log"))? {
                    let (_, v) = item.map_err(err("read log"))?;
                    out.push(decode::<Entry>(v.value())?);
                }
                Ok(out)
            })
            .await
            .map_err(|e| StorageIOError::read_logs(&e).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        self.db
            .run(|db| {
                let purged: Option<LogId> = db::read_meta(db, KEY_PURGED)?;
                let txn = db.begin_read().map_err(err("begin read"))?;
                let table = txn.open_table(LOG).map_err(err("open log"))?;
                let last = match table.last().map_err(err("read log"))? {
                    Some((_, v)) => Some(decode::<Entry>(v.value())?.log_id),
                    None => purged,
                };
                Ok(LogState { last_purged_log_id: purged, last_log_id: last })
            })
            .await
            .map_err(|e| StorageIOError::read_logs(&e).into())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.db.put_meta(KEY_VOTE, vote).await.map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.db.get_meta(KEY_VOTE).await.map_err(|e| StorageIOError::read_vote(&e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // The committed index may be older after a crash (the leader tells it
        // again; every acknowledged entry is in the durable log): no fsync
        // of its own on the apply path.
        self.db.put_meta_lazily(KEY_COMMITTED, &committed).await.map_err(|e| StorageIOError::write(&e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let committed: Option<Option<LogId>> =
            self.db.get_meta(KEY_COMMITTED).await.map_err(|e| StorageIOError::read(&e))?;
        Ok(committed.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let encoded: Vec<(u64, Vec<u8>)> = entries
            .into_iter()
            .map(|e| Ok((e.log_id.index, encode(&e)?)))
            .collect::<Result<_, DbError>>()
            .map_err(|e| StorageIOError::write_logs(&e))?;
        let result = self
            .db
            .run(move |db| {
                let txn = db.begin_write().map_err(err("begin write"))?;
                {
                    let mut table = txn.open_table(LOG).map_err(err("open log"))?;
                    for (index, bytes) in &encoded {
                        table.insert(*index, bytes.as_slice()).map_err(err("write log"))?;
                    }
                }
                txn.commit().map_err(err("commit log"))
            })
            .await;
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(&e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let from = log_id.index;
        self.db
            .run(move |db| {
                let txn = db.begin_write().map_err(err("begin write"))?;
                {
                    let mut table = txn.open_table(LOG).map_err(err("open log"))?;
                    table.retain_in::<u64, _>(from.., |_, _| false).map_err(err("truncate log"))?;
                }
                txn.commit().map_err(err("commit truncate"))
            })
            .await
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let upto = log_id.index;
        let purged = encode(&log_id).map_err(|e| StorageIOError::write_logs(&e))?;
        self.db
            .run(move |db| {
                let txn = db.begin_write().map_err(err("begin write"))?;
                {
                    let mut meta = txn.open_table(db::META).map_err(err("open meta"))?;
                    meta.insert(KEY_PURGED, purged.as_slice()).map_err(err("write purge point"))?;
                    let mut table = txn.open_table(LOG).map_err(err("open log"))?;
                    table.retain_in::<u64, _>(..=upto, |_, _| false).map_err(err("purge log"))?;
                }
                txn.commit().map_err(err("commit purge"))
            })
            .await
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}
