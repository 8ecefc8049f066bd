//! The read-ahead thread: fetches the byte ranges of windows asked for in
//! advance, several requests in flight, into a table the train thread takes
//! them from. A window asked for `n` times stays until taken `n` times; one
//! taken without being asked for is fetched at once and waited for.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tokio::sync::{mpsc, Semaphore};

use super::layout::{plan_reads, Read, Windows};
use super::listing::Shard;
use crate::data::DataError;

/// Ranged reads in flight at once.
const READS_IN_FLIGHT: usize = 16;
/// Most tokens one ranged read fetches (neighbouring windows share a read).
const READ_TOKENS_MAX: u64 = 1 << 20;

/// What the two threads share.
struct Table {
    slots: Mutex<Slots>,
    changed: Condvar,
}

#[derive(Default)]
struct Slots {
    by_index: HashMap<u64, Slot>,
    /// Set when the read-ahead thread has ended.
    closed: bool,
}

enum Slot {
    /// Asked for `want` times (0: by a take that found nothing), not here yet.
    Pending {
        want: usize,
    },
    Ready {
        want: usize,
        tokens: Vec<u32>,
    },
    Failed(String),
}

/// The corpus's shards and windows, for the read-ahead thread.
pub(crate) struct Source {
    pub shards: Vec<Shard>,
    pub windows: Windows,
    pub vocab: u64,
}

/// The train thread's side: ask ahead, take windows.
pub(crate) struct Reader {
    table: Arc<Table>,
    asks: Option<mpsc::UnboundedSender<Vec<u64>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reader {
    /// Starts the read-ahead thread, with its own runtime, for `source`.
    pub fn start(runtime: tokio::runtime::Runtime, source: Arc<Source>) -> Result<Reader, DataError> {
        let table = Arc::new(Table { slots: Mutex::new(Slots::default()), changed: Condvar::new() });
        let (tx, rx) = mpsc::unbounded_channel();
        let t = table.clone();
        let thread = std::thread::Builder::new()
            .name("flotilla-read-ahead".into())
            .spawn(move || {
                let _closed = Closer(t.clone());
                runtime.block_on(serve(source, t, rx));
            })
            .map_err(|e| DataError::Io { path: "<read-ahead thread>".into(), source: e })?;
        Ok(Reader { table, asks: Some(tx), thread: Some(thread) })
    }

    /// Asks for `indices` (repeats counted) to be fetched ahead.
    pub fn ask(&self, indices: &[u64]) {
        let mut slots = self.lock();
        let mut new = Vec::new();
        for &i in indices {
            match slots.by_index.get_mut(&i) {
                Some(Slot::Pending { want } | Slot::Ready { want, .. }) => *want += 1,
                Some(Slot::Failed(_)) => {}
                None => {
                    slots.by_index.insert(i, Slot::Pending { want: 1 });
                    new.push(i);
                }
            }
        }
        self.send(new);
    }

    /// The tokens of the windows `indices`, back to back, `width` each;
    /// waits for those still on their way and fetches those never asked for.
    pub fn take(&self, indices: &[u64], width: usize) -> Result<Vec<u32>, DataError> {
        let mut slots = self.lock();
        let mut new = Vec::new();
        for &i in indices {
            if let std::collections::hash_map::Entry::Vacant(v) = slots.by_index.entry(i) {
                v.insert(Slot::Pending { want: 0 });
                new.push(i);
            }
        }
        self.send(new);
        loop {
            let mut waiting = false;
            for i in indices {
                match slots.by_index.get(i) {
                    Some(Slot::Failed(message)) => {
                        let message = message.clone();
                        slots.by_index.remove(i);
                        return Err(DataError::Read(message));
                    }
                    Some(Slot::Pending { .. }) => waiting = true,
                    Some(Slot::Ready { .. }) => {}
                    None => unreachable!("inserted above and removed only by takes"),
                }
            }
            if !waiting {
                break;
            }
            if slots.closed {
                return Err(DataError::Read("the read-ahead thread has stopped".into()));
            }
            slots = self.table.changed.wait(slots).unwrap_or_else(|e| e.into_inner());
        }
        let mut out = Vec::with_capacity(indices.len() * width);
        for i in indices {
            let Some(Slot::Ready { tokens, .. }) = slots.by_index.get(i) else { unreachable!("all ready") };
            out.extend_from_slice(tokens);
        }
        for i in indices {
            if let Some(Slot::Ready { want, .. }) = slots.by_index.get_mut(i) {
                if *want <= 1 {
                    slots.by_index.remove(i);
                } else {
                    *want -= 1;
                }
            }
        }
        Ok(out)
    }

    fn lock(&self) -> MutexGuard<'_, Slots> {
        self.table.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, indices: Vec<u64>) {
        if !indices.is_empty() {
            // A closed channel means the thread has ended: `take` says so.
            let _ = self.asks.as_ref().expect("until drop").send(indices);
        }
    }
}

impl Drop for Reader {
    /// Ends the thread: no more asks; reads in flight are dropped with its runtime.
    fn drop(&mut self) {
        self.asks.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Marks the table closed when the read-ahead thread ends, even by a panic.
struct Closer(Arc<Table>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.slots.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.0.changed.notify_all();
    }
}

/// The read-ahead loop: each batch of asked windows becomes ranged reads,
/// at most [`READS_IN_FLIGHT`] at once, in the order asked.
async fn serve(source: Arc<Source>, table: Arc<Table>, mut asks: mpsc::UnboundedReceiver<Vec<u64>>) {
    let permits = Arc::new(Semaphore::new(READS_IN_FLIGHT));
    let mut reads = tokio::task::JoinSet::new();
    while let Some(indices) = asks.recv().await {
        for read in plan_reads(&source.windows, &indices, READ_TOKENS_MAX) {
            let Ok(permit) = permits.clone().acquire_owned().await else { return };
            let (source, table) = (source.clone(), table.clone());
            reads.spawn(async move {
                let got = fetch(&source, &read).await;
                deliver(&table, &read, got, &source);
                drop(permit);
            });
            while reads.try_join_next().is_some() {}
        }
    }
    while reads.join_next().await.is_some() {}
}

/// The token ids of one read.
async fn fetch(source: &Source, read: &Read) -> Result<Vec<u32>, String> {
    let shard = &source.shards[read.shard];
    let l = shard.layout;
    let range = l.start + read.first * l.width..l.start + (read.first + read.tokens) * l.width;
    let bytes = shard
        .folder
        .get_range(&shard.name, range.clone())
        .await
        .map_err(|e| format!("shard {}: read bytes {range:?}: {e}", shard.location))?;
    if bytes.len() as u64 != range.end - range.start {
        return Err(format!(
            "shard {}: bytes {range:?} gave {} bytes; the shard is shorter than when the job started",
            shard.location,
            bytes.len()
        ));
    }
    Ok(decode(&bytes, l.width))
}

/// Little-endian token ids of `width` bytes each.
pub(crate) fn decode(bytes: &[u8], width: u64) -> Vec<u32> {
    match width {
        1 => bytes.iter().map(|b| u32::from(*b)).collect(),
        2 => bytes.chunks_exact(2).map(|c| u32::from(u16::from_le_bytes([c[0], c[1]]))).collect(),
        _ => bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
    }
}

/// Puts a read's windows (or its failure) in the table and wakes the taker.
fn deliver(table: &Table, read: &Read, got: Result<Vec<u32>, String>, source: &Source) {
    let width = source.windows.width() as usize;
    let shard = &source.shards[read.shard];
    let mut slots = table.slots.lock().unwrap_or_else(|e| e.into_inner());
    for &(index, off) in &read.parts {
        let outcome = got.as_ref().map_err(String::clone).and_then(|tokens| {
            let window = &tokens[off as usize..off as usize + width];
            match window.iter().position(|t| u64::from(*t) >= source.vocab) {
                Some(k) => Err(format!(
                    "shard {}: token {} at position {} is outside the model's vocab of {}",
                    shard.location,
                    window[k],
                    read.first + off + k as u64,
                    source.vocab
                )),
                None => Ok(window.to_vec()),
            }
        });
        if let Some(slot) = slots.by_index.get_mut(&index) {
            if let Slot::Pending { want } = *slot {
                *slot = match outcome {
                    Ok(tokens) => Slot::Ready { want, tokens },
                    Err(message) => Slot::Failed(message),
                };
            }
        }
    }
    drop(slots);
    table.changed.notify_all();
}
