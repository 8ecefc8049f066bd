//! A persistent writer thread for one outgoing connection, so that a rank
//! receives and reduces on its own thread while its sends stream out beside
//! it. The thread lives as long as the link; a collective queues pieces of the
//! caller's buffer and, before it returns, waits until every queued piece is
//! written (or skipped after an error), so no piece outlives its buffer.

use std::io;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Instant;

use crate::error::CommError;
use crate::link::{classify, write_all_by, Deadline};
use crate::wire::{Frame, FRAME_LEN};

/// Headers with payloads up to this size are written in one system call.
const COALESCE: usize = 16 * 1024;

/// A piece of memory to write, owned by the caller of a collective.
struct Piece {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the memory behind a piece is only read by the writer thread, and
// the queuing collective waits for the piece to be written (`wait_written` or
// `flush`, also on unwinding through `Drop`) before it touches that memory
// again or returns to its caller.
unsafe impl Send for Piece {}

enum Job {
    Write { header: Option<[u8; FRAME_LEN]>, piece: Piece, dl: Deadline },
    Stop,
}

#[derive(Default)]
struct State {
    /// Jobs queued so far.
    queued: u64,
    /// Jobs finished (written or skipped), in queue order.
    done: u64,
    /// The first error since the last flush; later jobs are skipped.
    error: Option<CommError>,
    /// Payload bytes still owed by the message being written.
    owed: u64,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    cancel: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The writer thread of one link; see the module docs.
pub(crate) struct Sender {
    jobs: mpsc::Sender<Job>,
    shared: Arc<Shared>,
    peer: usize,
    thread: Option<JoinHandle<()>>,
}

/// What a flush found: the first error of the batch, and whether the stream
/// is between messages.
pub(crate) struct Flushed {
    pub error: Option<CommError>,
    pub idle: bool,
}

impl Sender {
    /// Starts the writer thread on `stream`, a clone of the link to `peer`.
    pub fn start(stream: TcpStream, peer: usize) -> io::Result<Sender> {
        let (jobs, queue) = mpsc::channel();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            cancel: AtomicBool::new(false),
        });
        let thread_shared = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name(format!("flotilla-comm-send-{peer}"))
            .spawn(move || write_loop(stream, peer, queue, &thread_shared))?;
        Ok(Sender { jobs, shared, peer, thread: Some(thread) })
    }

    /// Queues `header` (if any) and then `bytes` for writing; returns the
    /// job's number for [`wait_written`](Self::wait_written).
    ///
    /// # Safety
    /// `bytes` must stay valid and unmodified until the job is written:
    /// until `wait_written` of this number or `flush` returns.
    pub unsafe fn queue(&self, header: Option<Frame>, bytes: &[u8], dl: Deadline) -> u64 {
        let piece = Piece { ptr: bytes.as_ptr(), len: bytes.len() };
        let number = {
            let mut state = self.shared.lock();
            state.queued += 1;
            state.queued
        };
        let job = Job::Write { header: header.map(|f| f.encode()), piece, dl };
        if self.jobs.send(job).is_err() {
            // The thread is gone (it only ends on Stop): count the job as done.
            let mut state = self.shared.lock();
            state.done += 1;
            let source = io::Error::other("the writer thread is gone");
            state.error.get_or_insert(CommError::Io { rank: self.peer, source });
        }
        number
    }

    /// Blocks until job `job` (and every job before it) is finished.
    pub fn wait_written(&self, job: u64) {
        let mut state = self.shared.lock();
        while state.done < job {
            state = self.shared.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The error of a job queued since the last flush, if one failed; taken,
    /// so that the next flush reports none.
    pub fn take_error(&self) -> Option<CommError> {
        let error = self.shared.lock().error.take();
        if error.is_some() {
            // Nothing queued after a failed write may go out.
            self.cancel();
        }
        error
    }

    /// Skips every job not yet started; used when a collective fails.
    pub fn cancel(&self) {
        self.shared.cancel.store(true, Ordering::SeqCst);
    }

    /// Waits for every queued job, then reports and clears the batch's error.
    pub fn flush(&self) -> Flushed {
        let queued = self.shared.lock().queued;
        self.wait_written(queued);
        let mut state = self.shared.lock();
        self.shared.cancel.store(false, Ordering::SeqCst);
        Flushed { error: state.error.take(), idle: state.owed == 0 }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.cancel();
        let _ = self.jobs.send(Job::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn write_loop(stream: TcpStream, peer: usize, queue: mpsc::Receiver<Job>, shared: &Shared) {
    let mut armed: Option<(Instant, Instant)> = None;
    let mut staging: Vec<u8> = Vec::with_capacity(FRAME_LEN + COALESCE);
    while let Ok(job) = queue.recv() {
        let Job::Write { header, piece, dl } = job else { return };
        let skip = shared.cancel.load(Ordering::SeqCst) || shared.lock().error.is_some();
        let result = if skip {
            Ok(())
        } else {
            // SAFETY: see `Sender::queue`; the memory stays valid until this
            // job is counted as done below.
            let bytes = unsafe { std::slice::from_raw_parts(piece.ptr, piece.len) };
            if let Some(h) = header {
                let len = Frame::decode(&h).map(|f| f.len).unwrap_or(0);
                shared.lock().owed = len;
            }
            write_piece(&stream, &mut armed, &mut staging, header.as_ref(), bytes, dl, shared)
        };
        let mut state = shared.lock();
        if let Err(e) = result {
            state.error.get_or_insert(classify(e, peer, dl));
        }
        state.done += 1;
        drop(state);
        shared.changed.notify_all();
    }
}

fn write_piece(
    stream: &TcpStream,
    armed: &mut Option<(Instant, Instant)>,
    staging: &mut Vec<u8>,
    header: Option<&[u8; FRAME_LEN]>,
    bytes: &[u8],
    dl: Deadline,
    shared: &Shared,
) -> io::Result<()> {
    let rest = match header {
        Some(h) if bytes.len() <= COALESCE => {
            staging.clear();
            staging.extend_from_slice(h);
            staging.extend_from_slice(bytes);
            write_all_by(stream, armed, staging, dl)?;
            &bytes[bytes.len()..]
        }
        Some(h) => {
            write_all_by(stream, armed, h, dl)?;
            bytes
        }
        None => bytes,
    };
    write_all_by(stream, armed, rest, dl)?;
    let mut state = shared.lock();
    state.owed = state.owed.saturating_sub(bytes.len() as u64);
    Ok(())
}
