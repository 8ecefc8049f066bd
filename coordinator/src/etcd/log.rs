//! The replicated log as this replica sees it: the key layout in etcd, the
//! entries' encoding, and the follower that loads the latest snapshot and the
//! log after it, then applies every new entry in order from a watch.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, GetResponse, KeyValue, Txn, TxnResponse, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::{Shared, LOCK};
use crate::state::{Command, Event, Rejection, State};
use crate::store::StoreError;

/// Where everything of one flotilla cluster lives under its prefix.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    /// `<prefix>/head`: the index of the last entry, as decimal text.
    pub head: String,
    /// `<prefix>/snapshot`: a [`SnapshotRecord`] as JSON.
    pub snapshot: String,
    /// `<prefix>/log/`: entries under their zero-padded index.
    pub log_prefix: String,
    /// The election's name; candidates' keys live under it.
    pub election: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        let p = prefix.trim_end_matches('/');
        Keys {
            head: format!("{p}/head"),
            snapshot: format!("{p}/snapshot"),
            log_prefix: format!("{p}/log/"),
            election: format!("{p}/election"),
        }
    }

    pub fn log(&self, index: u64) -> String {
        format!("{}{index:020}", self.log_prefix)
    }

    /// The first key after every log key.
    pub fn log_end(&self) -> String {
        let mut end = self.log_prefix.clone();
        end.pop();
        end.push('0');
        end
    }

    fn index_of(&self, key: &[u8]) -> Option<u64> {
        std::str::from_utf8(key).ok()?.strip_prefix(&self.log_prefix)?.parse().ok()
    }
}

/// One log entry: the command and who proposed it, so that the proposer can
/// pick out the result of its own entry when it is applied.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub proposer: String,
    pub seq: u64,
    pub cmd: Command,
}

/// The state after applying every entry up to `index`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SnapshotRecord {
    pub index: u64,
    pub state: State,
}

type EtcdResult<T> = Result<T, etcd_client::Error>;

pub(crate) type ApplyResult = Result<Vec<Event>, Rejection>;

/// What this replica has applied.
pub(crate) struct Replica {
    pub state: State,
    /// The index of the last applied entry (0: none).
    pub index: u64,
    /// The etcd revision that wrote the last applied entry, which is the head
    /// key's mod revision as long as nobody appended after it.
    pub head_rev: i64,
    /// The index of the newest snapshot this replica knows of.
    pub snapshot_index: u64,
    /// This replica's proposals waiting for their entry to be applied.
    pub pending: HashMap<u64, oneshot::Sender<ApplyResult>>,
}

/// An entry that arrived out of order (the watch missed some): the follower
/// must load the log again.
struct Gap {
    expected: u64,
    got: u64,
}

pub(crate) fn decode<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Unavailable(format!("decode {what}: {e}")))
}

pub(crate) fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("{what}: {e}"))
}

impl Shared {
    /// Applies entry `index` written at revision `rev` if it is the next one;
    /// an entry already applied is skipped.
    fn apply_entry(&self, index: u64, rev: i64, entry: Entry) -> Result<(), Gap> {
        let mut r = self.replica.lock().expect(LOCK);
        if index <= r.index {
            return Ok(());
        }
        if index != r.index + 1 {
            return Err(Gap { expected: r.index + 1, got: index });
        }
        let result = r.state.apply(entry.cmd);
        r.index = index;
        r.head_rev = rev;
        if result.is_ok() {
            self.state_tx.send_replace(Arc::new(r.state.clone()));
        }
        if entry.proposer == self.id {
            if let Some(tx) = r.pending.remove(&entry.seq) {
                let _ = tx.send(result);
            }
        }
        drop(r);
        self.applied_tx.send_replace(index);
        Ok(())
    }

    fn apply_kv(&self, kv: &KeyValue) -> Result<(), StoreError> {
        let Some(index) = self.keys.index_of(kv.key()) else { return Ok(()) };
        let entry: Entry = decode("log entry", kv.value())?;
        self.apply_entry(index, kv.mod_revision(), entry).map_err(|g| {
            StoreError::Unavailable(format!("log has a hole: expected entry {}, got {}", g.expected, g.got))
        })
    }

    /// Loads the snapshot and the log after it as of one revision, and
    /// returns that revision: the watch goes on from the next one.
    pub(crate) async fn load(&self) -> Result<i64, StoreError> {
        let t = self.opts.op_timeout;
        let resp = timed(t, || self.get(&self.keys.snapshot, None)).await?;
        let rev = resp.header().map_or(0, |h| h.revision());
        let snap: Option<SnapshotRecord> = match resp.kvs().first() {
            Some(kv) => Some(decode("snapshot", kv.value())?),
            None => None,
        };
        let from = snap.as_ref().map_or(0, |s| s.index) + 1;
        let at_rev = GetOptions::new().with_revision(rev);
        let log_opts = at_rev.clone().with_range(self.keys.log_end());
        let log = timed(t, || self.get(&self.keys.log(from), Some(log_opts.clone()))).await?;
        let head = timed(t, || self.get(&self.keys.head, Some(at_rev.clone()))).await?;
        if let Some(snap) = snap {
            let mut r = self.replica.lock().expect(LOCK);
            r.snapshot_index = r.snapshot_index.max(snap.index);
            if snap.index > r.index {
                tracing::info!(index = snap.index, "etcd store: loaded snapshot");
                r.state = snap.state;
                r.index = snap.index;
                self.state_tx.send_replace(Arc::new(r.state.clone()));
                drop(r);
                self.applied_tx.send_replace(snap.index);
            }
        }
        for kv in log.kvs() {
            self.apply_kv(kv)?;
        }
        let mut r = self.replica.lock().expect(LOCK);
        match head.kvs().first() {
            Some(h) => {
                let index: u64 = decode("head", h.value())?;
                if index != r.index {
                    return Err(StoreError::Unavailable(format!("log ends at {} but the head says {index}", r.index)));
                }
                r.head_rev = h.mod_revision();
            }
            None => r.head_rev = 0,
        }
        Ok(rev)
    }

    /// Follows the log until shutdown: watches the log keys from `rev + 1`
    /// and applies each new entry; reloads after a compaction or a hole.
    pub(crate) async fn follow(self: Arc<Self>, mut rev: i64) {
        let mut watcher = self.client.watch_client();
        while !self.cancel.is_cancelled() {
            let opts = WatchOptions::new().with_range(self.keys.log_end()).with_start_revision(rev + 1);
            let outcome = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return,
                r = watcher.watch(self.keys.log_prefix.as_str(), Some(opts)) => r,
            };
            let reload = match outcome {
                Ok(mut stream) => loop {
                    let msg = tokio::select! {
                        biased;
                        _ = self.cancel.cancelled() => return,
                        m = stream.message() => m,
                    };
                    let resp = match msg {
                        Ok(Some(resp)) => resp,
                        Ok(None) => break false,
                        Err(e) => {
                            tracing::debug!(error = %e, "etcd store: watch broke");
                            break false;
                        }
                    };
                    if resp.compact_revision() > 0 || resp.canceled() {
                        tracing::info!(reason = resp.cancel_reason(), "etcd store: watch cancelled");
                        break true;
                    }
                    let mut hole = false;
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        rev = rev.max(kv.mod_revision());
                        if ev.event_type() == EventType::Put && self.apply_kv(kv).is_err() {
                            hole = true;
                            break;
                        }
                    }
                    if hole {
                        break true;
                    }
                },
                Err(e) => {
                    tracing::debug!(error = %e, "etcd store: cannot watch");
                    false
                }
            };
            if !reload {
                self.pause(Duration::from_millis(200)).await;
                continue;
            }
            match self.load().await {
                Ok(r) => rev = r,
                Err(e) => {
                    tracing::warn!(error = %e, "etcd store: cannot reload the log");
                    self.pause(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Waits until this replica has applied entry `index`.
    pub(crate) async fn wait_applied(&self, index: u64, within: Duration) -> Result<(), StoreError> {
        let mut rx = self.applied_tx.subscribe();
        let caught_up = matches!(tokio::time::timeout(within, rx.wait_for(|&i| i >= index)).await, Ok(Ok(_)));
        if caught_up {
            Ok(())
        } else {
            Err(StoreError::Unavailable(format!("not caught up with entry {index} in {within:?}")))
        }
    }

    /// The index of the last entry in the log, read linearizably.
    pub(crate) async fn read_head(&self) -> Result<u64, StoreError> {
        let resp = timed(self.opts.op_timeout, || self.get(&self.keys.head, None)).await?;
        match resp.kvs().first() {
            Some(h) => decode("head", h.value()),
            None => Ok(0),
        }
    }

    /// One etcd range request.
    fn get(&self, key: &str, opts: Option<GetOptions>) -> impl std::future::Future<Output = EtcdResult<GetResponse>> {
        let mut kv = self.client.kv_client();
        let key = key.to_string();
        async move { kv.get(key, opts).await }
    }

    /// One etcd transaction.
    pub(crate) fn txn(&self, txn: &Txn) -> impl std::future::Future<Output = EtcdResult<TxnResponse>> {
        let mut kv = self.client.kv_client();
        let txn = txn.clone();
        async move { kv.txn(txn).await }
    }

    pub(crate) async fn pause(&self, d: Duration) {
        tokio::select! {
            _ = self.cancel.cancelled() => {}
            _ = tokio::time::sleep(d) => {}
        }
    }
}

/// Runs an etcd call, again while it fails for want of a connection (a
/// member that is down), until `within` has passed; a failure then reads as
/// unavailable. `call` makes a fresh request each time.
pub(crate) async fn timed<T, F, Fut>(within: Duration, mut call: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    const PAUSE: Duration = Duration::from_millis(50);
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, call()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if transient(&e) && tokio::time::Instant::now() + PAUSE < deadline => {
                tracing::debug!(error = %e, "etcd store: retrying");
                tokio::time::sleep(PAUSE).await;
            }
            Ok(Err(e)) => return Err(unavailable("etcd", e)),
            Err(_) => return Err(StoreError::Unavailable(format!("etcd did not answer within {within:?}"))),
        }
    }
}

/// Whether the request failed before etcd could act on it: retrying is safe.
fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => s.code() == tonic::Code::Unavailable,
        _ => false,
    }
}
