//! The collectives of [`TcpRing`]: ring all-reduce (reduce-scatter then
//! all-gather), ring all-gather of byte messages, a pipelined broadcast along
//! the ring, and a barrier. Each message carries a header that the receiver
//! checks against what it expects, so ranks that disagree fail loudly.

use std::ops::Range;
use std::thread;

use crate::chunk::{all_reduce_steps, chunk_range, gather_origin, Phase};
use crate::error::CommError;
use crate::group::ProcessGroup;
use crate::link::{Deadline, Fault, Link, Payload};
use crate::ring::TcpRing;
use crate::wire::{Frame, Kind, Op};

/// Messages up to this many payload bytes are written before reading, without
/// a helper thread: they fit in the socket buffers, so this cannot deadlock.
const INLINE_SEND: usize = 8 * 1024;
/// Elements per message of a broadcast, so that ranks along the ring forward
/// one piece while the next one arrives.
const BROADCAST_PIECE: usize = 256 * 1024;

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

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        if self.world == 1 {
            return Ok(());
        }
        let (rank, world, len) = (self.rank, self.world, buf.len());
        self.run(Op::AllReduce, |links, dl, seq| {
            for (i, step) in all_reduce_steps(rank, world).into_iter().enumerate() {
                let header = data_frame(Op::AllReduce, seq, i, len);
                let want_range = chunk_range(len, world, step.recv);
                let want = Frame { len: want_range.len() as u64 * 4, ..header };
                let (src, dst) = split_two(buf, chunk_range(len, world, step.send), want_range);
                let add = step.phase == Phase::ReduceScatter;
                exchange(links.send, header, Payload::F32(src), links.recv, dl, |recv| {
                    let got = recv.recv_frame(dl)?;
                    recv.expect(&got, &want)?;
                    recv.recv_f32(dst, add, dl)?;
                    Ok(())
                })?;
            }
            Ok(())
        })
    }

    fn all_gather_bytes(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        self.gather(Op::AllGather, mine)
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        if root >= self.world {
            return Err(CommError::Protocol {
                rank: self.rank,
                message: format!("broadcast root {root} is out of range for world {}", self.world),
            });
        }
        if self.world == 1 {
            return Ok(());
        }
        let (world, len) = (self.world, buf.len());
        // Position along the chain root -> root+1 -> ... -> root-1.
        let pos = (self.rank + world - root) % world;
        self.run(Op::Broadcast, |links, dl, seq| {
            // Every rank first tells the next one that it has entered the
            // broadcast: ranks check that they agree on root and length, and
            // a rank whose predecessor never entered can tell so.
            let entered = data_frame(Op::Broadcast, seq, root, len);
            exchange(links.send, entered, Payload::Bytes(&[]), links.recv, dl, |recv| {
                let got = recv.recv_frame(dl)?;
                recv.expect(&got, &entered)?;
                Ok(())
            })?;
            let pieces = len.div_ceil(BROADCAST_PIECE).max(1);
            for k in 0..pieces {
                let range = k * BROADCAST_PIECE..((k + 1) * BROADCAST_PIECE).min(len);
                let header = data_frame(Op::Broadcast, seq, root, len);
                if pos > 0 {
                    let want = Frame { len: range.len() as u64 * 4, ..header };
                    let got = links.recv.recv_frame(dl)?;
                    links.recv.expect(&got, &want)?;
                    links.recv.recv_f32(&mut buf[range.clone()], false, dl)?;
                }
                if pos < world - 1 {
                    links.send.send(header, Payload::F32(&buf[range]), dl)?;
                }
            }
            Ok(())
        })
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        self.gather(Op::Barrier, &[]).map(drop)
    }
}

impl TcpRing {
    /// Ring all-gather of variable-length messages: at step `s` each rank
    /// forwards the message it received at step `s - 1` (its own at step 0).
    fn gather(&mut self, op: Op, mine: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        if self.world == 1 {
            return Ok(vec![mine.to_vec()]);
        }
        let (rank, world) = (self.rank, self.world);
        self.run(op, |links, dl, seq| {
            let mut out = vec![Vec::new(); world];
            out[rank] = mine.to_vec();
            for step in 0..world - 1 {
                let sending = (rank + world - step) % world;
                let origin = gather_origin(rank, world, step);
                let header = Frame { aux: sending as u32, ..data_frame(op, seq, 0, step) };
                let want = Frame { aux: origin as u32, ..header };
                let received = exchange(links.send, header, Payload::Bytes(&out[sending]), links.recv, dl, |recv| {
                    let got = recv.recv_frame(dl)?;
                    recv.expect(&got, &Frame { len: got.len, ..want })?;
                    Ok(recv.recv_bytes(got.len, dl)?)
                })?;
                out[origin] = received;
            }
            Ok(out)
        })
    }
}

/// A data frame header; `len` is filled in when it is sent.
fn data_frame(op: Op, seq: u64, aux: usize, total: usize) -> Frame {
    Frame { kind: Kind::Data, op, aux: aux as u32, seq, total: total as u64, len: 0 }
}

/// Sends one message to the next rank while receiving one from the previous
/// rank with `receive`. Large messages are sent from a scoped helper thread so
/// that a ring of blocked writers cannot deadlock.
fn exchange<R>(
    send: &mut Link,
    header: Frame,
    payload: Payload<'_>,
    recv: &mut Link,
    dl: Deadline,
    receive: impl FnOnce(&mut Link) -> Result<R, Fault>,
) -> Result<R, Fault> {
    let bytes = match &payload {
        Payload::F32(values) => values.len() * 4,
        Payload::Bytes(bytes) => bytes.len(),
    };
    if bytes <= INLINE_SEND {
        send.send(header, payload, dl)?;
        return receive(recv);
    }
    let (sent, received) = thread::scope(|scope| {
        let sender = scope.spawn(move || send.send(header, payload, dl));
        let received = receive(recv);
        let sent = sender.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (sent, received)
    });
    // A receive fault comes first: it may lead to the real culprit.
    let value = received?;
    sent?;
    Ok(value)
}

/// A shared view of chunk `a` and a mutable view of chunk `b` of one buffer;
/// the two chunks must not overlap.
fn split_two(buf: &mut [f32], a: Range<usize>, b: Range<usize>) -> (&[f32], &mut [f32]) {
    if a.end <= b.start {
        let (left, right) = buf.split_at_mut(b.start);
        (&left[a], &mut right[..b.end - b.start])
    } else {
        assert!(b.end <= a.start, "chunks {a:?} and {b:?} overlap");
        let (left, right) = buf.split_at_mut(a.start);
        (&right[..a.end - a.start], &mut left[b])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_two_gives_both_orders() {
        let mut buf: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let (a, b) = split_two(&mut buf, 0..3, 5..7);
        assert_eq!(a, &[0.0, 1.0, 2.0]);
        assert_eq!(b, &[5.0, 6.0]);
        let (a, b) = split_two(&mut buf, 8..10, 3..3);
        assert_eq!(a, &[8.0, 9.0]);
        assert!(b.is_empty());
    }
}
