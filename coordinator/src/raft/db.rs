//! The redb database of one replica: the log, Raft's own records (vote,
//! committed index, purge point) and the latest snapshot. Every commit is
//! durable when it returns, so a `kill -9` loses nothing acknowledged.

use std::path::Path;
use std::sync::{Arc, Weak};

use redb::{Database, ReadableDatabase, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Log entries by index, JSON-encoded.
pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// Raft's records and the snapshot, JSON-encoded, by the keys below.
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

pub(crate) const KEY_VOTE: &str = "vote";
pub(crate) const KEY_COMMITTED: &str = "committed";
pub(crate) const KEY_PURGED: &str = "last_purged";
pub(crate) const KEY_SNAPSHOT: &str = "snapshot";

/// The file inside the data dir.
pub(crate) const FILE_NAME: &str = "meta.redb";

/// How many times `open` tries again while another handle in this
/// process still closes the file (20 ms apart).
const OPEN_RETRIES: u32 = 100;

/// A shared handle on the database; redb calls run on the blocking pool.
#[derive(Clone)]
pub(crate) struct Db(Arc<Database>);

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct DbError(String);

impl DbError {
    fn from<E: std::fmt::Display>(what: &str, e: E) -> Self {
        DbError(format!("{what}: {e}"))
    }
}

impl Db {
    /// Opens (or creates) the database in `dir`, creating its tables. A
    /// database still held by a node of this process that is shutting down
    /// is waited for, a little.
    pub(crate) async fn open(dir: &Path) -> Result<Db, DbError> {
        std::fs::create_dir_all(dir).map_err(|e| DbError::from("create data dir", e))?;
        let path = dir.join(FILE_NAME);
        let mut attempts = 0;
        let db = loop {
            let opened = tokio::task::spawn_blocking({
                let path = path.clone();
                move || Database::create(path)
            })
            .await
            .map_err(|e| DbError::from("redb task", e))?;
            match opened {
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if attempts < OPEN_RETRIES => {
                    attempts += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                other => break other.map_err(|e| DbError::from("open redb", e))?,
            }
        };
        let txn = db.begin_write().map_err(|e| DbError::from("begin write", e))?;
        txn.open_table(LOG).map_err(|e| DbError::from("create log table", e))?;
        txn.open_table(META).map_err(|e| DbError::from("create meta table", e))?;
        txn.commit().map_err(|e| DbError::from("commit", e))?;
        Ok(Db(Arc::new(db)))
    }

    /// A handle that does not keep the database open: it is closed once
    /// every `Db` is dropped.
    pub(crate) fn downgrade(&self) -> Weak<Database> {
        Arc::downgrade(&self.0)
    }

    /// Runs `f` on the blocking pool.
    pub(crate) async fn run<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, DbError> + Send + 'static,
    {
        let db = self.0.clone();
        tokio::task::spawn_blocking(move || f(&db)).await.map_err(|e| DbError::from("redb task", e))?
    }

    /// Reads one record of the META table.
    pub(crate) async fn get_meta<T: DeserializeOwned + Send + 'static>(
        &self,
        key: &'static str,
    ) -> Result<Option<T>, DbError> {
        self.run(move |db| read_meta(db, key)).await
    }

    /// Writes one record of the META table, durable when this returns.
    pub(crate) async fn put_meta<T: Serialize>(&self, key: &'static str, value: &T) -> Result<(), DbError> {
        self.put_meta_with(key, value, redb::Durability::Immediate).await
    }

    /// Writes one record of the META table without waiting for the disk: it
    /// becomes durable with the next durable commit (the next log append or
    /// vote). For what may safely be older after a crash.
    pub(crate) async fn put_meta_lazily<T: Serialize>(&self, key: &'static str, value: &T) -> Result<(), DbError> {
        self.put_meta_with(key, value, redb::Durability::None).await
    }

    async fn put_meta_with<T: Serialize>(
        &self,
        key: &'static str,
        value: &T,
        durability: redb::Durability,
    ) -> Result<(), DbError> {
        let bytes = encode(value)?;
        self.run(move |db| {
            let mut txn = db.begin_write().map_err(|e| DbError::from("begin write", e))?;
            txn.set_durability(durability).map_err(|e| DbError::from("set durability", e))?;
            {
                let mut table = txn.open_table(META).map_err(|e| DbError::from("open meta", e))?;
                table.insert(key, bytes.as_slice()).map_err(|e| DbError::from("write meta", e))?;
            }
            txn.commit().map_err(|e| DbError::from("commit", e))
        })
        .await
    }
}

pub(crate) fn read_meta<T: DeserializeOwned>(db: &Database, key: &str) -> Result<Option<T>, DbError> {
    let txn = db.begin_read().map_err(|e| DbError::from("begin read", e))?;
    let table = txn.open_table(META).map_err(|e| DbError::from("open meta", e))?;
    let value = table.get(key).map_err(|e| DbError::from("read meta", e))?;
    value.map(|v| decode(v.value())).transpose()
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, DbError> {
    serde_json::to_vec(value).map_err(|e| DbError::from("encode", e))
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DbError> {
    serde_json::from_slice(bytes).map_err(|e| DbError::from("decode", e))
}

pub(crate) fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> DbError + '_ {
    move |e| DbError::from(what, e)
}
