//! The etcd meta store: commands are appended to a log in etcd with
//! compare-and-swap on a head key, every replica follows that log with a
//! watch and applies it to its own [`State`], and one replica, elected through
//! etcd's election API, takes writes. For sites that already run etcd.

mod election;
mod log;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, DeleteOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::log::{decode, timed, unavailable, Entry, Keys, Replica, SnapshotRecord};
use crate::state::{Command, Event, State, DEFAULT_MAX_RESTARTS};
use crate::store::{MetaStore, StoreError};

const LOCK: &str = "etcd store lock";

/// How a replica reaches etcd and takes part in the election.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// etcd client URLs, `http://host:port`.
    pub endpoints: Vec<String>,
    /// The key prefix of this flotilla cluster, e.g. `/flotilla`.
    pub prefix: String,
    /// This replica's client-facing address (`http://host:port`): its value
    /// in the election, and the hint followers answer with.
    pub advertise: String,
    /// TTL of the lease that holds this replica's candidacy; a leader that
    /// cannot renew it steps down, and others take over once it lapses.
    pub lease_ttl_s: i64,
    /// The leader writes a snapshot and deletes the log before it every this
    /// many entries.
    pub snapshot_every: u64,
    /// Deadline of a single etcd request.
    pub op_timeout: Duration,
    /// The state of a brand-new cluster; whichever replica comes first writes
    /// it as the snapshot at index 0, so every replica starts from the same.
    pub initial: State,
}

impl EtcdOptions {
    pub fn new(endpoints: Vec<String>, advertise: impl Into<String>) -> Self {
        EtcdOptions {
            endpoints,
            prefix: "/flotilla".into(),
            advertise: advertise.into(),
            lease_ttl_s: 5,
            snapshot_every: 1000,
            op_timeout: Duration::from_secs(5),
            initial: State::new(DEFAULT_MAX_RESTARTS),
        }
    }
}

/// The leadership this replica holds: its key in the election.
#[derive(Debug, Clone)]
struct Leadership {
    key: Vec<u8>,
    /// The key's create revision; writes are guarded on it.
    rev: i64,
}

/// What the store's tasks share.
struct Shared {
    opts: EtcdOptions,
    client: Client,
    keys: Keys,
    /// Names this replica's entries in the log (unique per store object).
    id: String,
    next_seq: AtomicU64,
    replica: Mutex<Replica>,
    state_tx: watch::Sender<Arc<State>>,
    applied_tx: watch::Sender<u64>,
    leader_tx: watch::Sender<Option<Leadership>>,
    /// The current leader's address as last observed.
    hint: Mutex<Option<String>>,
    /// One proposal at a time from this replica.
    propose_lock: tokio::sync::Mutex<()>,
    cancel: CancellationToken,
}

/// A meta store replica on etcd. Dropping it stops its tasks (the leader
/// resigns); [`EtcdStore::shutdown`] also waits for them.
pub struct EtcdStore {
    shared: Arc<Shared>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl EtcdStore {
    /// Connects, loads the latest snapshot and the log after it, and starts
    /// following the log and campaigning. Fails with `Unavailable` when etcd
    /// cannot be reached within `op_timeout`.
    pub async fn connect(opts: EtcdOptions) -> Result<Arc<EtcdStore>, StoreError> {
        let connect = ConnectOptions::new().with_connect_timeout(opts.op_timeout);
        let client = timed(opts.op_timeout, || Client::connect(&opts.endpoints, Some(connect.clone()))).await?;
        let keys = Keys::new(&opts.prefix);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        static STORES: AtomicU64 = AtomicU64::new(0);
        let id =
            format!("{}#{}-{nanos}-{}", opts.advertise, std::process::id(), STORES.fetch_add(1, Ordering::Relaxed));
        let replica =
            Replica { state: opts.initial.clone(), index: 0, head_rev: 0, snapshot_index: 0, pending: HashMap::new() };
        let shared = Arc::new(Shared {
            state_tx: watch::channel(Arc::new(opts.initial.clone())).0,
            applied_tx: watch::channel(0).0,
            leader_tx: watch::channel(None).0,
            hint: Mutex::new(None),
            propose_lock: tokio::sync::Mutex::new(()),
            cancel: CancellationToken::new(),
            next_seq: AtomicU64::new(1),
            replica: Mutex::new(replica),
            opts,
            client,
            keys,
            id,
        });
        shared.create_if_absent().await?;
        let rev = shared.load().await?;
        let tasks = vec![
            tokio::spawn(shared.clone().follow(rev)),
            tokio::spawn(shared.clone().campaign()),
            tokio::spawn(shared.clone().observe()),
        ];
        Ok(Arc::new(EtcdStore { shared, tasks: Mutex::new(tasks) }))
    }

    /// Stops following and campaigning (a leader resigns and revokes its
    /// lease, so another replica takes over at once) and waits for the tasks.
    pub async fn shutdown(&self) {
        self.shared.cancel.cancel();
        let tasks = std::mem::take(&mut *self.tasks.lock().expect(LOCK));
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Stops at once, without resigning: as if the process died. Others take
    /// over when its lease lapses.
    pub fn halt(&self) {
        for t in self.tasks.lock().expect(LOCK).drain(..) {
            t.abort();
        }
        self.shared.leader_tx.send_replace(None);
        self.shared.cancel.cancel();
    }

    /// The index of the last entry this replica has applied.
    pub fn applied_index(&self) -> u64 {
        self.shared.replica.lock().expect(LOCK).index
    }

    /// Writes a snapshot of the applied state now and deletes the log up to
    /// it (leader only); returns the snapshot's index.
    pub async fn snapshot_now(&self) -> Result<u64, StoreError> {
        let leader = self.shared.leadership().await?;
        self.shared.write_snapshot(&leader).await
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
    }
}

impl Shared {
    /// Writes the initial state as the snapshot at index 0 of a new cluster.
    async fn create_if_absent(&self) -> Result<(), StoreError> {
        let record = SnapshotRecord { index: 0, state: self.opts.initial.clone() };
        let value = serde_json::to_vec(&record).map_err(|e| unavailable("encode snapshot", e))?;
        let txn = Txn::new()
            .when([Compare::version(self.keys.snapshot.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(self.keys.snapshot.as_str(), value, None)]);
        timed(self.opts.op_timeout, || self.txn(&txn)).await?;
        Ok(())
    }

    /// This replica's leadership, or the `NotLeader` answer.
    async fn leadership(&self) -> Result<Leadership, StoreError> {
        if self.cancel.is_cancelled() {
            return Err(StoreError::Unavailable("etcd store is shut down".into()));
        }
        let held = self.leader_tx.borrow().clone();
        match held {
            Some(l) => Ok(l),
            None => Err(StoreError::NotLeader { leader: self.current_leader().await }),
        }
    }

    async fn propose(&self, cmd: Command) -> Result<Vec<Event>, StoreError> {
        let _turn = self.propose_lock.lock().await;
        let leader = self.leadership().await?;
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let entry = Entry { proposer: self.id.clone(), seq, cmd };
        let value = serde_json::to_vec(&entry).map_err(|e| unavailable("encode entry", e))?;
        let (tx, rx) = oneshot::channel();
        self.replica.lock().expect(LOCK).pending.insert(seq, tx);
        let appended = self.append(&leader, seq, value).await;
        if let Err(e) = appended {
            self.replica.lock().expect(LOCK).pending.remove(&seq);
            return Err(e);
        }
        let result = match tokio::time::timeout(self.opts.op_timeout, rx).await {
            Ok(Ok(result)) => result,
            _ => {
                self.replica.lock().expect(LOCK).pending.remove(&seq);
                return Err(StoreError::Unavailable("entry committed but not applied in time".into()));
            }
        };
        let due = {
            let r = self.replica.lock().expect(LOCK);
            r.index >= r.snapshot_index + self.opts.snapshot_every
        };
        if due {
            if let Err(e) = self.write_snapshot(&leader).await {
                tracing::warn!(error = %e, "etcd store: cannot write snapshot");
            }
        }
        Ok(result?)
    }

    /// Appends entry `seq` after the last one this replica applied. When
    /// someone appended since, or a try failed on the way, catches up and
    /// tries again, unless catching up applied the entry: then an earlier try
    /// went through.
    async fn append(&self, leader: &Leadership, seq: u64, value: Vec<u8>) -> Result<(), StoreError> {
        const PAUSE: Duration = Duration::from_millis(50);
        let deadline = tokio::time::Instant::now() + self.opts.op_timeout;
        loop {
            let (index, head_rev) = {
                let r = self.replica.lock().expect(LOCK);
                if !r.pending.contains_key(&seq) {
                    return Ok(());
                }
                (r.index + 1, r.head_rev)
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let txn = Txn::new()
                .when([
                    Compare::create_revision(leader.key.clone(), CompareOp::Equal, leader.rev),
                    Compare::mod_revision(self.keys.head.as_str(), CompareOp::Equal, head_rev),
                ])
                .and_then([
                    TxnOp::put(self.keys.log(index), value.clone(), None),
                    TxnOp::put(self.keys.head.as_str(), index.to_string(), None),
                ])
                .or_else([TxnOp::get(leader.key.clone(), None), TxnOp::get(self.keys.head.as_str(), None)]);
            let resp = match timed(left, || self.txn(&txn)).await {
                Ok(resp) => resp,
                Err(e) if tokio::time::Instant::now() + PAUSE < deadline => {
                    // The try may have gone through: catch up before the next.
                    tracing::debug!(error = %e, "etcd store: append failed; catching up");
                    self.pause(PAUSE).await;
                    if let Ok(head) = self.read_head().await {
                        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                        self.wait_applied(head, left).await?;
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            if resp.succeeded() {
                return Ok(());
            }
            let gets: Vec<_> = resp
                .op_responses()
                .into_iter()
                .filter_map(|r| match r {
                    TxnOpResponse::Get(g) => Some(g),
                    _ => None,
                })
                .collect();
            let still_ours =
                gets.first().and_then(|g| g.kvs().first()).is_some_and(|kv| kv.create_revision() == leader.rev);
            if !still_ours {
                tracing::warn!("etcd store: lost the election key; stepping down");
                self.leader_tx.send_if_modified(|l| l.take().is_some());
                return Err(StoreError::NotLeader { leader: self.current_leader().await });
            }
            let head: u64 = match gets.get(1).and_then(|g| g.kvs().first()) {
                Some(kv) => decode("head", kv.value())?,
                None => 0,
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            self.wait_applied(head, left).await?;
        }
    }

    async fn write_snapshot(&self, leader: &Leadership) -> Result<u64, StoreError> {
        let record = {
            let r = self.replica.lock().expect(LOCK);
            SnapshotRecord { index: r.index, state: r.state.clone() }
        };
        let index = record.index;
        let value = serde_json::to_vec(&record).map_err(|e| unavailable("encode snapshot", e))?;
        let txn =
            Txn::new().when([Compare::create_revision(leader.key.clone(), CompareOp::Equal, leader.rev)]).and_then([
                TxnOp::put(self.keys.snapshot.as_str(), value, None::<PutOptions>),
                TxnOp::delete(self.keys.log(0), Some(DeleteOptions::new().with_range(self.keys.log(index + 1)))),
            ]);
        let resp = timed(self.opts.op_timeout, || self.txn(&txn)).await?;
        if !resp.succeeded() {
            self.leader_tx.send_if_modified(|l| l.take().is_some());
            return Err(StoreError::NotLeader { leader: self.current_leader().await });
        }
        let mut r = self.replica.lock().expect(LOCK);
        r.snapshot_index = r.snapshot_index.max(index);
        tracing::info!(index, "etcd store: wrote snapshot");
        Ok(index)
    }
}

#[async_trait]
impl MetaStore for EtcdStore {
    async fn propose(&self, cmd: Command) -> Result<Vec<Event>, StoreError> {
        self.shared.propose(cmd).await
    }

    fn snapshot(&self) -> Arc<State> {
        self.shared.state_tx.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<Arc<State>> {
        self.shared.state_tx.subscribe()
    }

    fn is_leader(&self) -> bool {
        self.shared.leader_tx.borrow().is_some()
    }

    fn leader_hint(&self) -> Option<String> {
        if self.is_leader() {
            return Some(self.shared.opts.advertise.clone());
        }
        self.shared.hint.lock().expect(LOCK).clone().filter(|h| *h != self.shared.opts.advertise)
    }

    async fn read_fresh(&self) -> Result<Arc<State>, StoreError> {
        let head = self.shared.read_head().await?;
        self.shared.wait_applied(head, self.shared.opts.op_timeout).await?;
        Ok(self.snapshot())
    }
}
