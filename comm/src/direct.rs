//! Direct connections between any two ranks of a ring, made on first use
//! through the listeners and handshake that built the ring, and the
//! latency-optimal collectives and `send`/`recv` over them.
//!
//! Each direction of each pair is its own connection, dialed by the sender:
//! dialing needs only the peer's listener, so a rank never waits to send, and
//! every wait is a wait on the rank that should have sent (the one blamed when
//! the deadline passes). Collectives exchange with every other rank in one
//! round and sum contributions in rank order, so every rank computes the same
//! additions in the same order and the results are bit-identical.

use std::net::SocketAddr;
use std::ops::Range;
use std::time::Instant;

use crate::auth::Secret;
use crate::buffer::{staging, sum_in_rank_order, DType};
use crate::chunk::chunk_range;
use crate::error::CommError;
use crate::link::{Deadline, Fault, Link, Payload};
use crate::listener::ListenerHandle;
use crate::ring::{dial, DialError};
use crate::sender::Sender;
use crate::wire::{Frame, Hello, Kind, Lane, Op};

/// Payloads up to this many bytes are written by the calling thread: they fit
/// in the socket buffers, so writing every message before reading any cannot
/// deadlock. Larger ones go through the connection's writer thread.
const INLINE_SEND: usize = 8 * 1024;

/// A connection this rank dialed and writes to.
struct Outgoing {
    link: Link,
    /// Started for the first message too large to write inline.
    sender: Option<Sender>,
}

/// The connections of one lane: one to and one from each other rank.
struct Directed {
    lane: Lane,
    out: Vec<Option<Outgoing>>,
    incoming: Vec<Option<Link>>,
}

impl Directed {
    fn new(lane: Lane, world: usize) -> Directed {
        Directed { lane, out: (0..world).map(|_| None).collect(), incoming: (0..world).map(|_| None).collect() }
    }
}

/// Who this rank is in the ring, for handshakes.
struct Identity {
    job: String,
    generation: u64,
    rank: usize,
    world: usize,
    peers: Vec<SocketAddr>,
    listener: ListenerHandle,
    secret: Secret,
}

/// The direct connections of one rank, on both lanes, and the sequence
/// numbers of its point-to-point messages.
pub(crate) struct DirectLinks {
    me: Identity,
    collective: Directed,
    p2p: Directed,
    /// Point-to-point messages sent to / received from each rank so far.
    sent: Vec<u64>,
    received: Vec<u64>,
}

impl DirectLinks {
    pub fn new(
        listener: ListenerHandle,
        job: String,
        generation: u64,
        rank: usize,
        peers: Vec<SocketAddr>,
        secret: Secret,
    ) -> DirectLinks {
        let world = peers.len();
        DirectLinks {
            me: Identity { job, generation, rank, world, peers, listener, secret },
            collective: Directed::new(Lane::Direct, world),
            p2p: Directed::new(Lane::PointToPoint, world),
            sent: vec![0; world],
            received: vec![0; world],
        }
    }

    /// Closes every direct connection now and stops their writer threads.
    pub fn close_all(&mut self) {
        for lane in [&mut self.collective, &mut self.p2p] {
            for out in lane.out.iter_mut() {
                if let Some(o) = out {
                    o.link.close();
                }
                *out = None;
            }
            for link in lane.incoming.iter_mut() {
                if let Some(l) = link {
                    l.close();
                }
                *link = None;
            }
        }
    }

    /// Skips every queued write that has not started.
    pub fn cancel_all(&self) {
        for o in self.collective.out.iter().chain(&self.p2p.out).flatten() {
            if let Some(sender) = &o.sender {
                sender.cancel();
            }
        }
    }

    /// Waits for every writer thread; returns the first error any of them met.
    pub fn flush_all(&mut self) -> Option<CommError> {
        let mut first = None;
        for o in self.collective.out.iter_mut().chain(self.p2p.out.iter_mut()).flatten() {
            if let Some(sender) = &o.sender {
                let flushed = sender.flush();
                o.link.set_send_idle(flushed.idle);
                if first.is_none() {
                    first = flushed.error;
                }
            }
        }
        first
    }

    fn others(&self) -> impl Iterator<Item = usize> + '_ {
        let (rank, world) = (self.me.rank, self.me.world);
        // Start after ourselves, so that not every rank writes to rank 0 first.
        (1..world).map(move |i| (rank + i) % world)
    }

    /// Writes one message to `to` on `lane`, dialing first if needed: inline
    /// when small, else queued on the connection's writer thread.
    ///
    /// # Safety
    /// `bytes` must stay valid and unmodified until `flush_all` returns.
    unsafe fn post(
        &mut self,
        lane: Lane,
        to: usize,
        frame: Frame,
        bytes: &[u8],
        dl: Deadline,
    ) -> Result<(), CommError> {
        let me = &self.me;
        let directed = match lane {
            Lane::PointToPoint => &mut self.p2p,
            _ => &mut self.collective,
        };
        let slot = &mut directed.out[to];
        if slot.is_none() {
            let link = dial_peer(me, directed.lane, to, dl)?;
            *slot = Some(Outgoing { link, sender: None });
        }
        let out = slot.as_mut().expect("just connected");
        if bytes.len() <= INLINE_SEND {
            return out.link.send(frame, Payload::Bytes(bytes), dl);
        }
        if out.sender.is_none() {
            let stream = out.link.clone_stream().map_err(|source| CommError::Io { rank: to, source })?;
            out.sender = Some(Sender::start(stream, to).map_err(|source| CommError::Io { rank: to, source })?);
        }
        let sender = out.sender.as_ref().expect("just started");
        if let Some(error) = sender.take_error() {
            return Err(error);
        }
        let frame = Frame { len: bytes.len() as u64, ..frame };
        sender.queue(Some(frame), bytes, dl);
        Ok(())
    }

    /// Reads one message from `from` on `lane` into `dst` (the bytes of
    /// `dtype` elements; claiming the connection first if needed), checking
    /// its header against `want`.
    fn receive(
        &mut self,
        lane: Lane,
        from: usize,
        want: Frame,
        dst: &mut [u8],
        dtype: DType,
        dl: Deadline,
    ) -> Result<(), CommError> {
        let me = &self.me;
        let directed = match lane {
            Lane::PointToPoint => &mut self.p2p,
            _ => &mut self.collective,
        };
        let slot = &mut directed.incoming[from];
        if slot.is_none() {
            *slot = Some(claim_peer(me, directed.lane, from, dl)?);
        }
        let link = slot.as_mut().expect("just connected");
        let want = Frame { len: dst.len() as u64, ..want };
        let got = link.recv_frame(dl).map_err(|fault| fault_error(fault, from, dl))?;
        link.expect(&got, &want)?;
        link.recv_elems(dst, dtype, false, dl)
    }

    fn frame(&self, op: Op, seq: u64, total: usize, from: usize) -> Frame {
        Frame { kind: Kind::Data, op, aux: from as u32, seq, total: total as u64, len: 0 }
    }

    /// Every rank sends its whole buffer (the bytes of `dtype` elements) to
    /// every other; each sums all contributions in rank order.
    pub fn all_reduce(&mut self, buf: &mut [u8], dtype: DType, dl: Deadline, seq: u64) -> Result<(), CommError> {
        let (rank, world, bytes) = (self.me.rank, self.me.world, buf.len());
        let mine = self.frame(Op::AllReduce, seq, bytes / dtype.size(), rank);
        let peers: Vec<usize> = self.others().collect();
        for &p in &peers {
            // SAFETY: `buf` is only read until flush_all below.
            unsafe { self.post(Lane::Direct, p, mine, buf, dl)? };
        }
        let mut words = Vec::new();
        let stage = staging(&mut words, (world - 1) * bytes);
        for p in (0..world).filter(|&p| p != rank) {
            let slot = if p < rank { p } else { p - 1 };
            let want = self.frame(Op::AllReduce, seq, bytes / dtype.size(), p);
            self.receive(Lane::Direct, p, want, &mut stage[slot * bytes..(slot + 1) * bytes], dtype, dl)?;
        }
        if let Some(error) = self.flush_all() {
            return Err(error);
        }
        sum_in_rank_order(buf, stage, dtype, rank, world);
        Ok(())
    }

    /// Every rank sends chunk `p` to rank `p` and sums the chunks it gets, in
    /// rank order, into its own. Ranges are in elements.
    pub fn reduce_scatter(
        &mut self,
        buf: &mut [u8],
        dtype: DType,
        dl: Deadline,
        seq: u64,
    ) -> Result<Range<usize>, CommError> {
        let (rank, world, size) = (self.me.rank, self.me.world, dtype.size());
        let len = buf.len() / size;
        let own = chunk_range(len, world, rank);
        let peers: Vec<usize> = self.others().collect();
        for &p in &peers {
            let frame = self.frame(Op::ReduceScatter, seq, len, rank);
            let r = chunk_range(len, world, p);
            // SAFETY: `buf` is only read until flush_all below.
            unsafe { self.post(Lane::Direct, p, frame, &buf[r.start * size..r.end * size], dl)? };
        }
        let n = own.len() * size;
        let mut words = Vec::new();
        let stage = staging(&mut words, (world - 1) * n);
        for p in (0..world).filter(|&p| p != rank) {
            let slot = if p < rank { p } else { p - 1 };
            let want = self.frame(Op::ReduceScatter, seq, len, p);
            self.receive(Lane::Direct, p, want, &mut stage[slot * n..(slot + 1) * n], dtype, dl)?;
        }
        if let Some(error) = self.flush_all() {
            return Err(error);
        }
        sum_in_rank_order(&mut buf[own.start * size..own.end * size], stage, dtype, rank, world);
        Ok(own)
    }

    /// Every rank sends its own chunk to every other and receives theirs in
    /// place.
    pub fn all_gather(&mut self, buf: &mut [u8], dtype: DType, dl: Deadline, seq: u64) -> Result<(), CommError> {
        let (rank, world, size) = (self.me.rank, self.me.world, dtype.size());
        let len = buf.len() / size;
        let own = chunk_range(len, world, rank);
        let base = buf.as_mut_ptr();
        // SAFETY: the own chunk is only read (by writer threads until
        // flush_all); the other chunks are written below, disjoint from it.
        let mine = unsafe { std::slice::from_raw_parts(base.add(own.start * size), own.len() * size) };
        let peers: Vec<usize> = self.others().collect();
        for &p in &peers {
            let frame = self.frame(Op::AllGatherF32, seq, len, rank);
            unsafe { self.post(Lane::Direct, p, frame, mine, dl)? };
        }
        for p in (0..world).filter(|&p| p != rank) {
            let r = chunk_range(len, world, p);
            let dst = unsafe { std::slice::from_raw_parts_mut(base.add(r.start * size), r.len() * size) };
            let want = self.frame(Op::AllGatherF32, seq, len, p);
            self.receive(Lane::Direct, p, want, dst, dtype, dl)?;
        }
        match self.flush_all() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// The root sends its buffer to every other rank.
    pub fn broadcast(
        &mut self,
        buf: &mut [u8],
        dtype: DType,
        root: usize,
        dl: Deadline,
        seq: u64,
    ) -> Result<(), CommError> {
        let frame = self.frame(Op::Broadcast, seq, buf.len() / dtype.size(), root);
        if self.me.rank == root {
            let peers: Vec<usize> = self.others().collect();
            for p in peers {
                // SAFETY: `buf` is only read until flush_all below.
                unsafe { self.post(Lane::Direct, p, frame, buf, dl)? };
            }
            match self.flush_all() {
                Some(error) => Err(error),
                None => Ok(()),
            }
        } else {
            self.receive(Lane::Direct, root, frame, buf, dtype, dl)
        }
    }

    /// Sends `buf` (the bytes of `dtype` elements) to `to` as the next
    /// point-to-point message.
    pub fn send(&mut self, to: usize, buf: &[u8], dtype: DType, dl: Deadline) -> Result<(), CommError> {
        let seq = self.sent[to] + 1;
        let frame = self.frame(Op::PointToPoint, seq, buf.len() / dtype.size(), self.me.rank);
        // SAFETY: flushed before returning.
        unsafe { self.post(Lane::PointToPoint, to, frame, buf, dl)? };
        if let Some(error) = self.flush_all() {
            return Err(error);
        }
        self.sent[to] = seq;
        Ok(())
    }

    /// Receives the next point-to-point message from `from` into `buf`.
    pub fn recv(&mut self, from: usize, buf: &mut [u8], dtype: DType, dl: Deadline) -> Result<(), CommError> {
        let seq = self.received[from] + 1;
        let want = self.frame(Op::PointToPoint, seq, buf.len() / dtype.size(), from);
        self.receive(Lane::PointToPoint, from, want, buf, dtype, dl)?;
        self.received[from] = seq;
        Ok(())
    }
}

/// Dials `to`'s listener for a connection this rank writes to.
fn dial_peer(me: &Identity, lane: Lane, to: usize, dl: Deadline) -> Result<Link, CommError> {
    let hello = Hello {
        job: me.job.clone(),
        generation: me.generation,
        from_rank: me.rank as u32,
        to_rank: to as u32,
        world: me.world as u32,
        lane,
    };
    let abandoned = || me.listener.is_abandoned(&me.job, me.generation);
    let stream = match dial(me.peers[to], to, &hello, &me.secret, dl.at, &abandoned) {
        Ok(stream) => stream,
        Err(DialError::Stale(error)) => return Err(error),
        Err(DialError::Unreachable(_)) => return Err(timeout(to, dl)),
    };
    Ok(Link::new(stream, to))
}

/// Takes from our listener the connection `from` dialed to write to us.
fn claim_peer(me: &Identity, lane: Lane, from: usize, dl: Deadline) -> Result<Link, CommError> {
    let parked = match me.listener.claim(&me.job, me.generation, from, lane, dl.at) {
        Ok(parked) => parked,
        Err(_) if Instant::now() >= dl.at => return Err(timeout(from, dl)),
        Err(error) => return Err(error),
    };
    if parked.hello.to_rank as usize != me.rank || parked.hello.world as usize != me.world {
        return Err(CommError::Protocol {
            rank: from,
            message: format!(
                "connected to rank {} of a world of {}, but this is rank {} of {}",
                parked.hello.to_rank, parked.hello.world, me.rank, me.world
            ),
        });
    }
    parked.stream.set_nodelay(true).map_err(|source| CommError::Io { rank: from, source })?;
    Ok(Link::new(parked.stream, from))
}

fn timeout(rank: usize, dl: Deadline) -> CommError {
    CommError::Timeout { rank, op: dl.op.name(), after: dl.timeout }
}

/// The error for a fault on a direct connection from `from`: silence is
/// `from`'s.
fn fault_error(fault: Fault, from: usize, dl: Deadline) -> CommError {
    match fault {
        Fault::Silent => timeout(from, dl),
        Fault::Stuck => CommError::Protocol { rank: from, message: "a ring frame on a direct connection".into() },
        Fault::Aborted(error) | Fault::Failed(error) => error,
    }
}
