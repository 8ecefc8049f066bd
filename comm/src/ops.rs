//! The collectives of [`TcpRing`]. Buffers up to
//! [`DIRECT_MAX_BYTES`](crate::chunk::DIRECT_MAX_BYTES) go by direct exchange
//! (`direct.rs`, one round trip); larger ones by the bandwidth-optimal ring,
//! pipelined: each chunk is streamed in pieces, and a piece received (and
//! reduced straight from the receive buffer) is queued at once on the link's
//! writer thread for the next rank, so sending, receiving and reducing
//! overlap. Byte messages and barriers go around the ring. Each message
//! carries a header that the receiver checks, so ranks that disagree fail
//! loudly.

use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use crate::buffer::{Buf, DType};
use crate::chunk::{all_gather_steps, all_reduce_steps, chunk_range, gather_origin, pieces, reduce_scatter_steps};
use crate::chunk::{Phase, RingStep};
use crate::direct::DirectLinks;
use crate::error::CommError;
use crate::group::ProcessGroup;
use crate::link::{Deadline, Fault};
use crate::ring::{Links, TcpRing};
use crate::wire::{Frame, Kind, Op};

/// Elements per piece that a ring chunk is streamed in.
const RING_PIECE: usize = 64 * 1024;
/// Elements per message of a broadcast along a chain of more than two ranks,
/// so that ranks along it forward one piece while the next one arrives
/// (1 MiB: measured against 256 KiB and 4 MiB pieces with 4 ranks).
const BROADCAST_PIECE: usize = 256 * 1024;
/// Elements per message of a broadcast between two ranks, where nothing is
/// forwarded: larger messages mean fewer system calls (4 MiB: 1.1-1.5x the
/// bus bandwidth of 256 KiB pieces at 16-256 MiB, in alternating runs).
const BROADCAST_PIECE_TWO: usize = 1024 * 1024;

impl ProcessGroup for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn generation(&self) -> u64 {
        self.generation
    }

    fn all_reduce_sum(&mut self, buf: &mut Buf<'_>) -> Result<(), CommError> {
        let dtype = buf.dtype();
        let bytes = buf.host_bytes_mut()?;
        if self.world == 1 {
            return self.check_broken();
        }
        if self.algorithm.is_direct(bytes.len()) {
            return self.run_direct(Op::AllReduce, true, |direct, dl, seq| direct.all_reduce(bytes, dtype, dl, seq));
        }
        let steps = all_reduce_steps(self.rank, self.world);
        self.ring_pipeline(Op::AllReduce, bytes, dtype, &steps)
    }

    fn reduce_scatter_sum(&mut self, buf: &mut Buf<'_>) -> Result<Range<usize>, CommError> {
        let dtype = buf.dtype();
        let own = chunk_range(buf.len(), self.world, self.rank);
        let bytes = buf.host_bytes_mut()?;
        if self.world == 1 {
            return self.check_broken().map(|()| own);
        }
        if self.algorithm.is_direct(bytes.len()) {
            return self
                .run_direct(Op::ReduceScatter, true, |direct, dl, seq| direct.reduce_scatter(bytes, dtype, dl, seq));
        }
        let steps = reduce_scatter_steps(self.rank, self.world);
        self.ring_pipeline(Op::ReduceScatter, bytes, dtype, &steps).map(|()| own)
    }

    fn all_gather(&mut self, buf: &mut Buf<'_>) -> Result<(), CommError> {
        let dtype = buf.dtype();
        let bytes = buf.host_bytes_mut()?;
        if self.world == 1 {
            return self.check_broken();
        }
        if self.algorithm.is_direct(bytes.len()) {
            return self.run_direct(Op::AllGatherF32, true, |direct, dl, seq| direct.all_gather(bytes, dtype, dl, seq));
        }
        let steps = all_gather_steps(self.rank, self.world);
        self.ring_pipeline(Op::AllGatherF32, bytes, dtype, &steps)
    }

    fn all_gather_bytes(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        self.gather(Op::AllGather, mine)
    }

    fn broadcast(&mut self, buf: &mut Buf<'_>, root: usize) -> Result<(), CommError> {
        if root >= self.world {
            return Err(CommError::Protocol {
                rank: self.rank,
                message: format!("broadcast root {root} is out of range for world {}", self.world),
            });
        }
        let dtype = buf.dtype();
        let bytes = buf.host_bytes_mut()?;
        if self.world == 1 {
            return self.check_broken();
        }
        if self.algorithm.is_direct(bytes.len()) {
            return self
                .run_direct(Op::Broadcast, true, |direct, dl, seq| direct.broadcast(bytes, dtype, root, dl, seq));
        }
        self.ring_broadcast(bytes, dtype, root)
    }

    fn send(&mut self, to: usize, buf: &Buf<'_>) -> Result<(), CommError> {
        let dtype = buf.dtype();
        let bytes = buf.host_bytes()?;
        self.check_peer(to, "send to")?;
        self.run_direct(Op::PointToPoint, false, |direct, dl, _| direct.send(to, bytes, dtype, dl))
    }

    fn recv(&mut self, from: usize, buf: &mut Buf<'_>) -> Result<(), CommError> {
        let dtype = buf.dtype();
        let bytes = buf.host_bytes_mut()?;
        self.check_peer(from, "receive from")?;
        self.run_direct(Op::PointToPoint, false, |direct, dl, _| direct.recv(from, bytes, dtype, dl))
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        self.gather(Op::Barrier, &[]).map(drop)
    }
}

/// A caller's buffer shared between the collective's thread, which writes the
/// pieces it receives, and the writer thread, which reads the pieces queued
/// for sending. Only disjoint pieces are ever borrowed at once: a piece is
/// written only after every queued send of it has finished. Ranges are in
/// elements of `size` bytes.
#[derive(Clone, Copy)]
struct RawBuf {
    ptr: *mut u8,
    len: usize,
    size: usize,
}

impl RawBuf {
    fn new(bytes: &mut [u8], dtype: DType) -> RawBuf {
        RawBuf { ptr: bytes.as_mut_ptr(), len: bytes.len() / dtype.size(), size: dtype.size() }
    }

    /// # Safety
    /// No other borrow of `range` may be alive, and no queued send of it may
    /// be unfinished.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut(&self, range: Range<usize>) -> &mut [u8] {
        assert!(range.start <= range.end && range.end <= self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(range.start * self.size), range.len() * self.size)
    }

    /// # Safety
    /// No mutable borrow of `range` may be alive while the result is.
    unsafe fn slice(&self, range: Range<usize>) -> &[u8] {
        assert!(range.start <= range.end && range.end <= self.len);
        std::slice::from_raw_parts(self.ptr.add(range.start * self.size), range.len() * self.size)
    }
}

impl TcpRing {
    fn check_peer(&self, peer: usize, what: &str) -> Result<(), CommError> {
        self.check_broken()?;
        if peer >= self.world || peer == self.rank {
            return Err(CommError::Protocol {
                rank: self.rank,
                message: format!("rank {} cannot {what} rank {peer} in a world of {}", self.rank, self.world),
            });
        }
        Ok(())
    }

    /// Runs an op over direct connections; `collective` ops take the ring's
    /// next sequence number. Any failure closes the whole group.
    fn run_direct<T>(
        &mut self,
        op: Op,
        collective: bool,
        body: impl FnOnce(&mut DirectLinks, Deadline, u64) -> Result<T, CommError>,
    ) -> Result<T, CommError> {
        self.check_broken()?;
        if collective {
            self.seq += 1;
        }
        let dl = Deadline::after(self.op_timeout, op);
        let seq = self.seq;
        let outcome = catch_unwind(AssertUnwindSafe(|| body(&mut self.direct, dl, seq)));
        if !matches!(outcome, Ok(Ok(_))) {
            self.direct.cancel_all();
        }
        // Whatever happened, no writer thread may still read the buffer.
        let flushed = self.direct.flush_all();
        let outcome = outcome.unwrap_or_else(|panic| resume_unwind(panic));
        let error = match (outcome, flushed) {
            (Ok(value), None) => return Ok(value),
            (Ok(_), Some(error)) | (Err(error), _) => error,
        };
        self.break_with(&error);
        Err(error)
    }

    /// The pipelined ring: runs `steps`, streaming each chunk in pieces, and
    /// queues each received piece for the next rank as soon as it is in
    /// (every schedule sends at step `s + 1` what it received at step `s`).
    fn ring_pipeline(&mut self, op: Op, buf: &mut [u8], dtype: DType, steps: &[RingStep]) -> Result<(), CommError> {
        let raw = RawBuf::new(buf, dtype);
        let (world, len) = (self.world, raw.len);
        self.run(op, |links, dl, seq| {
            let header = |step: usize, chunk: usize| Frame {
                len: (chunk_range(len, world, chunk).len() * dtype.size()) as u64,
                ..data_frame(op, seq, step, len)
            };
            // Job numbers of the queued sends of each chunk's pieces, so that
            // a piece is overwritten only once its send is done.
            let mut queued: Vec<Vec<u64>> = vec![Vec::new(); world];
            let first = steps[0].send;
            queue_chunk(links, raw, header(0, first), chunk_range(len, world, first), dl, &mut queued[first]);
            for (i, step) in steps.iter().enumerate() {
                let want = header(i, step.recv);
                let got = links.recv.recv_frame(dl)?;
                links.recv.expect(&got, &want)?;
                let forward = steps.get(i + 1).map(|next| {
                    debug_assert_eq!(next.send, step.recv, "schedules forward what they received");
                    header(i + 1, step.recv)
                });
                let range = chunk_range(len, world, step.recv);
                if range.is_empty() {
                    if let Some(frame) = forward {
                        // SAFETY: an empty piece reads nothing.
                        unsafe { links.sender.queue(Some(frame), &[], dl) };
                    }
                }
                let sent_before = std::mem::take(&mut queued[step.recv]);
                for (k, piece) in pieces(range, RING_PIECE).enumerate() {
                    if let Some(&job) = sent_before.get(k) {
                        links.sender.wait_written(job);
                    }
                    // SAFETY: this piece's earlier send is done, and the only
                    // other pieces borrowed are queued sends, disjoint from it.
                    let dst = unsafe { raw.slice_mut(piece.clone()) };
                    links.recv.recv_elems(dst, dtype, step.phase == Phase::ReduceScatter, dl)?;
                    if let Some(frame) = forward {
                        let frame = (k == 0).then_some(frame);
                        // SAFETY: the run waits for the writer before returning.
                        let job = unsafe { links.sender.queue(frame, raw.slice(piece), dl) };
                        queued[step.recv].push(job);
                    }
                }
                if let Some(error) = links.sender.take_error() {
                    return Err(Fault::Failed(error));
                }
            }
            Ok(())
        })
    }

    /// Broadcast along the chain root -> root+1 -> ... -> root-1, in pieces,
    /// each forwarded as soon as it arrives.
    fn ring_broadcast(&mut self, buf: &mut [u8], dtype: DType, root: usize) -> Result<(), CommError> {
        let raw = RawBuf::new(buf, dtype);
        let (world, len) = (self.world, raw.len);
        let pos = (self.rank + world - root) % world;
        self.run(Op::Broadcast, |links, dl, seq| {
            // Every rank first tells the next one that it has entered the
            // broadcast: ranks check that they agree on root and length, and
            // a rank whose predecessor never entered can tell so.
            let entered = data_frame(Op::Broadcast, seq, root, len);
            // SAFETY: an empty payload reads nothing.
            unsafe { links.sender.queue(Some(entered), &[], dl) };
            let got = links.recv.recv_frame(dl)?;
            links.recv.expect(&got, &entered)?;
            // Pieces of the same size in bytes whatever the element type.
            let piece_len = (if world == 2 { BROADCAST_PIECE_TWO } else { BROADCAST_PIECE }) * 4 / dtype.size();
            for piece in pieces(0..len, piece_len) {
                let header = Frame { len: (piece.len() * dtype.size()) as u64, ..entered };
                if pos > 0 {
                    let got = links.recv.recv_frame(dl)?;
                    links.recv.expect(&got, &header)?;
                    // SAFETY: each piece is received once, before it is queued.
                    links.recv.recv_elems(unsafe { raw.slice_mut(piece.clone()) }, dtype, false, dl)?;
                }
                if pos < world - 1 {
                    // SAFETY: the run waits for the writer before returning.
                    unsafe { links.sender.queue(Some(header), raw.slice(piece), dl) };
                }
                if let Some(error) = links.sender.take_error() {
                    return Err(Fault::Failed(error));
                }
            }
            Ok(())
        })
    }

    /// Ring all-gather of variable-length messages: at step `s` each rank
    /// forwards the message it received at step `s - 1` (its own at step 0).
    fn gather(&mut self, op: Op, mine: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        if self.world == 1 {
            self.check_broken()?;
            return Ok(vec![mine.to_vec()]);
        }
        let (rank, world) = (self.rank, self.world);
        self.run(op, |links, dl, seq| {
            let mut out = vec![Vec::new(); world];
            out[rank] = mine.to_vec();
            for step in 0..world - 1 {
                let sending = (rank + world - step) % world;
                let origin = gather_origin(rank, world, step);
                let header =
                    Frame { aux: sending as u32, len: out[sending].len() as u64, ..data_frame(op, seq, 0, step) };
                let want = Frame { aux: origin as u32, ..header };
                // SAFETY: waited for below, before `out` changes.
                let job = unsafe { links.sender.queue(Some(header), &out[sending], dl) };
                let received = links.recv.recv_frame(dl).and_then(|got| {
                    links.recv.expect(&got, &Frame { len: got.len, ..want })?;
                    Ok(links.recv.recv_bytes(got.len, dl)?)
                });
                // Our message goes out whole even when theirs was wrong, so
                // that the next rank reads it before any verdict.
                links.sender.wait_written(job);
                out[origin] = received?;
                if let Some(error) = links.sender.take_error() {
                    return Err(Fault::Failed(error));
                }
            }
            Ok(out)
        })
    }
}

/// A data frame header; `len` is filled in when it is sent.
fn data_frame(op: Op, seq: u64, aux: usize, total: usize) -> Frame {
    Frame { kind: Kind::Data, op, aux: aux as u32, seq, total: total as u64, len: 0 }
}

/// Queues every piece of `range` on the writer thread, the header with the
/// first (alone when the range is empty); records the job numbers.
fn queue_chunk(links: &Links<'_>, raw: RawBuf, header: Frame, range: Range<usize>, dl: Deadline, jobs: &mut Vec<u64>) {
    if range.is_empty() {
        // SAFETY: an empty payload reads nothing.
        unsafe { links.sender.queue(Some(header), &[], dl) };
        return;
    }
    for (k, piece) in pieces(range, RING_PIECE).enumerate() {
        // SAFETY: the run waits for the writer before returning; the piece
        // is overwritten only after `wait_written` of its job.
        let job = unsafe { links.sender.queue((k == 0).then_some(header), raw.slice(piece), dl) };
        jobs.push(job);
    }
}
