//! One direction of a ring: a connection to a neighbour, with message-level
//! send and receive under a deadline. Socket errors are turned into
//! [`CommError`]s that name the neighbour.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use crate::buffer::{add_into, staging, DType};
use crate::error::CommError;
use crate::wire::{Blame, Frame, Kind, Op, FRAME_LEN};

/// Bytes moved per system call; also the size of the staging buffer.
pub(crate) const PIECE: usize = 256 * 1024;
/// A socket timeout set this long ago is set again before the next call, so
/// that a call never overshoots its deadline by more than this.
const REARM_AFTER: Duration = Duration::from_millis(2);
/// Payloads up to this size are copied behind their header and written in one
/// system call.
const INLINE_PAYLOAD: usize = 16 * 1024;
/// Largest error message accepted in an `Abort` frame.
const MAX_ABORT_MESSAGE: u64 = 64 * 1024;

/// When the current op must be done, and what to say if it is not.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    pub at: Instant,
    pub op: Op,
    /// The op timeout the deadline came from, for error messages.
    pub timeout: Duration,
}

impl Deadline {
    pub fn after(timeout: Duration, op: Op) -> Deadline {
        Deadline { at: later(Instant::now(), timeout), op, timeout }
    }
}

/// What is sent after a header (typed buffers as their little-endian bytes).
pub(crate) enum Payload<'a> {
    Bytes(&'a [u8]),
}

/// Why a step of a collective failed.
#[derive(Debug)]
pub(crate) enum Fault {
    /// Not one byte arrived from the previous rank before the deadline: it is
    /// silent, or is itself waiting on someone.
    Silent,
    /// The previous rank passed its own deadline waiting on its predecessor.
    Stuck,
    /// The previous rank forwarded the error that ended this op.
    Aborted(CommError),
    /// Anything else, already blamed on a neighbour.
    Failed(CommError),
}

impl From<CommError> for Fault {
    fn from(error: CommError) -> Self {
        Fault::Failed(error)
    }
}

pub(crate) struct Link {
    stream: TcpStream,
    /// The rank at the other end.
    pub peer: usize,
    buf: Vec<u8>,
    /// Where received values wait to be added into the caller's buffer
    /// (words, so that it is aligned for every element type).
    stage: Vec<u32>,
    /// False while a message is partly written: nothing else may be sent.
    send_idle: bool,
    /// False while a message is partly read: the next bytes are not a header.
    recv_idle: bool,
    /// Sequence number and arrival time of the first data frame received for
    /// the latest collective: proof that the sender had started it by then.
    first_data: Option<(u64, Instant)>,
    read_armed: Option<(Instant, Instant)>,
    write_armed: Option<(Instant, Instant)>,
}

impl Link {
    pub fn new(stream: TcpStream, peer: usize) -> Link {
        Link {
            stream,
            peer,
            buf: Vec::new(),
            stage: Vec::new(),
            send_idle: true,
            recv_idle: true,
            first_data: None,
            read_armed: None,
            write_armed: None,
        }
    }

    /// Whether the last message was written whole, so that another may follow.
    pub fn send_idle(&self) -> bool {
        self.send_idle
    }

    /// Records whether a writer thread on a clone of this connection left a
    /// message half written.
    pub fn set_send_idle(&mut self, idle: bool) {
        self.send_idle = idle;
    }

    /// Another handle to the same connection, for a writer thread.
    pub fn clone_stream(&self) -> io::Result<TcpStream> {
        self.stream.try_clone()
    }

    /// When the first data frame of collective `seq` arrived, if one has.
    pub fn first_data_at(&self, seq: u64) -> Option<Instant> {
        self.first_data.filter(|(s, _)| *s == seq).map(|(_, at)| at)
    }

    /// Whether the last message was read whole, so that a header comes next.
    pub fn recv_idle(&self) -> bool {
        self.recv_idle
    }

    /// Closes both directions now, so that a peer blocked on us fails at once.
    pub fn close(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Sends one message: `frame` (whose `len` is set here) and its payload.
    pub fn send(&mut self, mut frame: Frame, payload: Payload<'_>, dl: Deadline) -> Result<(), CommError> {
        frame.len = match payload {
            Payload::Bytes(bytes) => bytes.len() as u64,
        };
        self.send_idle = false;
        self.write_message(frame, payload, dl).map_err(|e| classify(e, self.peer, dl))?;
        self.send_idle = true;
        Ok(())
    }

    fn write_message(&mut self, frame: Frame, payload: Payload<'_>, dl: Deadline) -> io::Result<()> {
        let Payload::Bytes(bytes) = payload;
        // Small messages go out in one write with their header; large ones
        // straight from the caller's buffer after it.
        let head = if bytes.len() <= INLINE_PAYLOAD { bytes.len() } else { 0 };
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.extend_from_slice(&frame.encode());
        buf.extend_from_slice(&bytes[..head]);
        let result = self.write_all_by(&buf, dl).and_then(|()| self.write_all_by(&bytes[head..], dl));
        self.buf = buf;
        result
    }

    /// Reads the next header. Only data frames come back as `Ok`; `Stuck` and
    /// `Abort` frames become faults.
    pub fn recv_frame(&mut self, dl: Deadline) -> Result<Frame, Fault> {
        let mut header = [0u8; FRAME_LEN];
        let mut got = 0;
        while got < FRAME_LEN {
            match self.read_by(&mut header[got..], dl) {
                Ok(0) => return Err(Fault::Failed(CommError::PeerClosed { rank: self.peer, op: dl.op.name() })),
                Ok(n) => {
                    got += n;
                    self.recv_idle = false;
                }
                Err(e) if got == 0 && is_timeout(&e) => return Err(Fault::Silent),
                Err(e) => return Err(Fault::Failed(classify(e, self.peer, dl))),
            }
        }
        let frame = Frame::decode(&header).map_err(|message| CommError::Protocol { rank: self.peer, message })?;
        self.recv_idle = frame.len == 0;
        match frame.kind {
            Kind::Data => {
                if self.first_data.is_none_or(|(seq, _)| seq != frame.seq) {
                    self.first_data = Some((frame.seq, Instant::now()));
                }
                Ok(frame)
            }
            Kind::Stuck => Err(Fault::Stuck),
            Kind::Abort => Err(self.recv_abort(frame, dl)),
        }
    }

    fn recv_abort(&mut self, frame: Frame, dl: Deadline) -> Fault {
        if frame.len > MAX_ABORT_MESSAGE {
            return Fault::Failed(CommError::Protocol {
                rank: self.peer,
                message: format!("abort message of {} bytes", frame.len),
            });
        }
        let text = match self.recv_bytes(frame.len, dl) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => return Fault::Failed(e),
        };
        let rank = frame.aux as usize;
        let op = dl.op.name();
        let forwarded = format!("{text} (forwarded by rank {})", self.peer);
        Fault::Aborted(match Blame::from_code(frame.total) {
            Some(Blame::Timeout) => CommError::Timeout { rank, op, after: dl.timeout },
            Some(Blame::Closed) => CommError::PeerClosed { rank, op },
            Some(Blame::Protocol) => CommError::Protocol { rank, message: forwarded },
            Some(Blame::Io) => CommError::Io { rank, source: io::Error::other(forwarded) },
            None => CommError::Protocol {
                rank: self.peer,
                message: format!("abort with unknown blame code {}", frame.total),
            },
        })
    }

    /// Checks a received data frame against the one this rank expects.
    pub fn expect(&self, got: &Frame, want: &Frame) -> Result<(), CommError> {
        let same = got.op == want.op
            && got.seq == want.seq
            && got.aux == want.aux
            && got.total == want.total
            && got.len == want.len;
        if same {
            Ok(())
        } else {
            Err(CommError::Protocol { rank: self.peer, message: format!("expected {want}, got {got}") })
        }
    }

    /// Receives `dst.len()` bytes of `dtype` elements and adds them into
    /// `dst` (or overwrites it, reading straight into it).
    pub fn recv_elems(&mut self, dst: &mut [u8], dtype: DType, add: bool, dl: Deadline) -> Result<(), CommError> {
        let result = if add { self.recv_add(dst, dtype, dl) } else { self.read_exact_by(dst, dl) };
        self.recv_idle = result.is_ok();
        result.map_err(|e| classify(e, self.peer, dl))
    }

    /// Reads a piece at a time into the staging buffer and adds it into `dst`.
    fn recv_add(&mut self, dst: &mut [u8], dtype: DType, dl: Deadline) -> io::Result<()> {
        let mut words = std::mem::take(&mut self.stage);
        let stage = staging(&mut words, PIECE);
        let mut result = Ok(());
        // PIECE is a multiple of every element size: parts hold whole elements.
        for part in dst.chunks_mut(PIECE) {
            let got = &mut stage[..part.len()];
            if let Err(e) = self.read_exact_by(got, dl) {
                result = Err(e);
                break;
            }
            add_into(part, got, dtype);
        }
        self.stage = words;
        result
    }

    /// Receives `len` bytes, growing the result as they arrive (a bogus length
    /// runs into the deadline rather than into an allocation failure).
    pub fn recv_bytes(&mut self, len: u64, dl: Deadline) -> Result<Vec<u8>, CommError> {
        let mut out = Vec::with_capacity(len.min(PIECE as u64) as usize);
        let mut left = len;
        while left > 0 {
            let start = out.len();
            let take = left.min(PIECE as u64) as usize;
            out.resize(start + take, 0);
            self.read_exact_by(&mut out[start..], dl).map_err(|e| classify(e, self.peer, dl))?;
            left -= take as u64;
        }
        self.recv_idle = true;
        Ok(out)
    }

    fn read_by(&mut self, buf: &mut [u8], dl: Deadline) -> io::Result<usize> {
        let now = Instant::now();
        let remaining = dl.at.saturating_duration_since(now);
        if remaining.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        if needs_rearm(self.read_armed, dl.at, now) {
            self.stream.set_read_timeout(Some(remaining))?;
            self.read_armed = Some((now, dl.at));
        }
        loop {
            match self.stream.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    fn read_exact_by(&mut self, mut buf: &mut [u8], dl: Deadline) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_by(buf, dl)? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => buf = &mut buf[n..],
            }
        }
        Ok(())
    }

    fn write_all_by(&mut self, buf: &[u8], dl: Deadline) -> io::Result<()> {
        write_all_by(&self.stream, &mut self.write_armed, buf, dl)
    }
}

/// Writes all of `buf` to `stream` before the deadline; `armed` remembers the
/// socket's write timeout so that it is not set on every call.
pub(crate) fn write_all_by(
    mut stream: &TcpStream,
    armed: &mut Option<(Instant, Instant)>,
    mut buf: &[u8],
    dl: Deadline,
) -> io::Result<()> {
    while !buf.is_empty() {
        let now = Instant::now();
        let remaining = dl.at.saturating_duration_since(now);
        if remaining.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        if needs_rearm(*armed, dl.at, now) {
            stream.set_write_timeout(Some(remaining))?;
            *armed = Some((now, dl.at));
        }
        match stream.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `at + by`, or a time so far away that it never comes when that overflows.
pub(crate) fn later(at: Instant, by: Duration) -> Instant {
    at.checked_add(by).or_else(|| at.checked_add(Duration::from_secs(100 * 365 * 24 * 3600))).unwrap_or(at)
}

fn needs_rearm(armed: Option<(Instant, Instant)>, deadline: Instant, now: Instant) -> bool {
    match armed {
        Some((at, for_deadline)) => for_deadline != deadline || now.duration_since(at) > REARM_AFTER,
        None => true,
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// Turns a socket error with `peer` into the error a caller sees.
pub(crate) fn classify(e: io::Error, peer: usize, dl: Deadline) -> CommError {
    use io::ErrorKind::*;
    match e.kind() {
        WouldBlock | TimedOut => CommError::Timeout { rank: peer, op: dl.op.name(), after: dl.timeout },
        UnexpectedEof | BrokenPipe | ConnectionReset | ConnectionAborted | WriteZero => {
            CommError::PeerClosed { rank: peer, op: dl.op.name() }
        }
        _ => CommError::Io { rank: peer, source: e },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_timeout_does_not_overflow() {
        let dl = Deadline::after(Duration::MAX, Op::Barrier);
        assert!(dl.at > Instant::now() + Duration::from_secs(3600));
    }

    #[test]
    fn socket_errors_name_the_peer() {
        let dl = Deadline::after(Duration::from_millis(5), Op::AllReduce);
        let timeout = classify(io::ErrorKind::WouldBlock.into(), 4, dl);
        assert!(matches!(timeout, CommError::Timeout { rank: 4, op: "all_reduce", .. }));
        let closed = classify(io::ErrorKind::ConnectionReset.into(), 2, dl);
        assert!(matches!(closed, CommError::PeerClosed { rank: 2, .. }));
        let other = classify(io::ErrorKind::PermissionDenied.into(), 1, dl);
        assert_eq!(other.peer(), Some(1));
    }
}
