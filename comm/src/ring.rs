//! A process group over a TCP ring: how the ring is built from a
//! [`CommListener`] and a [`RingConfig`], and what happens when a collective
//! fails (the culprit is agreed along the ring, then the ring is closed). The
//! collectives themselves are in `ops.rs`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use crate::auth::{self, Role, Secret};
use crate::chunk::Algorithm;
use crate::direct::DirectLinks;
use crate::error::CommError;
use crate::link::{later, Deadline, Fault, Link, Payload};
use crate::listener::CommListener;
use crate::sender::Sender;
use crate::wire::{Answer, Blame, Frame, Hello, Kind, Lane, Op, MAX_JOB_LEN};

/// Everything a rank needs to join a ring of one generation of a job.
#[derive(Debug, Clone)]
pub struct RingConfig {
    /// Job id; also the namespace of the ring, so two rings of one process in
    /// one generation need two different ids (e.g. `"job-7/dp0"`).
    pub job: String,
    pub generation: u64,
    pub rank: usize,
    pub world: usize,
    /// Data address of every rank, index = rank.
    pub peers: Vec<SocketAddr>,
    /// Total time to build the ring; peers start at different times, so
    /// connects are retried until then.
    pub connect_timeout: Duration,
    /// Default deadline of each collective.
    pub op_timeout: Duration,
    /// The generation's secret, shared by every rank of it: each data
    /// connection's handshake proves it in both directions.
    pub secret: Secret,
}

/// A process group whose ranks form a ring of TCP connections: each rank
/// sends to `rank + 1` and receives from `rank - 1`. Small collectives and
/// `send`/`recv` use direct connections between any two ranks, made on first
/// use through the same listeners and handshake.
pub struct TcpRing {
    pub(crate) job: String,
    pub(crate) rank: usize,
    pub(crate) world: usize,
    pub(crate) generation: u64,
    pub(crate) op_timeout: Duration,
    /// Sequence number of the last collective started on this ring.
    pub(crate) seq: u64,
    /// To `rank + 1`; `None` for a world of one or once broken.
    pub(crate) send: Option<Link>,
    /// From `rank - 1`; `None` for a world of one or once broken.
    pub(crate) recv: Option<Link>,
    /// The writer thread of `send`.
    pub(crate) sender: Option<Sender>,
    /// Direct connections to the other ranks, made on demand.
    pub(crate) direct: DirectLinks,
    /// Which algorithm collectives use.
    pub(crate) algorithm: Algorithm,
    /// The error that broke the ring, repeated by every later call.
    pub(crate) broken: Option<CommError>,
}

impl TcpRing {
    /// Joins the ring described by `cfg`: connects to the next rank (retrying
    /// until `connect_timeout`) and claims from `listener` the connection of
    /// the previous rank.
    pub fn connect(listener: &CommListener, cfg: RingConfig) -> Result<TcpRing, CommError> {
        validate(&cfg)?;
        let RingConfig { job, generation, rank, world, .. } = &cfg;
        let (rank, world, generation) = (*rank, *world, *generation);
        listener.begin_generation(job, generation, &cfg.secret).map_err(|newest| {
            CommError::Setup(format!(
                "generation {generation} of job {job:?} is older than generation {newest} already built here"
            ))
        })?;
        let mut ring = TcpRing {
            job: job.clone(),
            rank,
            world,
            generation,
            op_timeout: cfg.op_timeout,
            seq: 0,
            send: None,
            recv: None,
            sender: None,
            direct: DirectLinks::new(
                listener.handle(),
                job.clone(),
                generation,
                rank,
                cfg.peers.clone(),
                cfg.secret.clone(),
            ),
            algorithm: Algorithm::Auto,
            broken: None,
        };
        if world == 1 {
            return Ok(ring);
        }
        let deadline = later(Instant::now(), cfg.connect_timeout);
        let next = (rank + 1) % world;
        let prev = (rank + world - 1) % world;
        let hello = Hello {
            job: job.clone(),
            generation,
            from_rank: rank as u32,
            to_rank: next as u32,
            world: world as u32,
            lane: Lane::Ring,
        };
        let abandoned = || listener.is_abandoned(job, generation);
        let send =
            dial(cfg.peers[next], next, &hello, &cfg.secret, deadline, &abandoned).map_err(DialError::into_error)?;
        let parked = listener.claim(job, generation, prev, Lane::Ring, deadline)?;
        if parked.hello.to_rank as usize != rank || parked.hello.world as usize != world {
            return Err(CommError::Setup(format!(
                "rank {prev} connected to rank {} of a world of {}, but this is rank {rank} of {world}",
                parked.hello.to_rank, parked.hello.world
            )));
        }
        parked.stream.set_nodelay(true).map_err(|source| CommError::Io { rank: prev, source })?;
        let send = Link::new(send, next);
        let writer = send.clone_stream().map_err(|source| CommError::Io { rank: next, source })?;
        ring.sender = Some(Sender::start(writer, next).map_err(|source| CommError::Io { rank, source })?);
        ring.send = Some(send);
        ring.recv = Some(Link::new(parked.stream, prev));
        tracing::debug!(job = %ring.job, generation, rank, world, "ring built");
        Ok(ring)
    }

    /// Changes the deadline of every later collective.
    pub fn set_op_timeout(&mut self, d: Duration) {
        self.op_timeout = d;
    }

    /// Chooses the algorithm of later collectives ([`Algorithm::Auto`] by
    /// default: by buffer size). Every rank must choose the same.
    pub fn set_algorithm(&mut self, algorithm: Algorithm) {
        self.algorithm = algorithm;
    }

    /// The error that broke the group, if one did.
    pub(crate) fn check_broken(&self) -> Result<(), CommError> {
        match &self.broken {
            Some(error) => Err(error.duplicate()),
            None => Ok(()),
        }
    }

    /// Closes every connection after a failure; later calls repeat `error`.
    pub(crate) fn break_with(&mut self, error: &CommError) {
        tracing::warn!(
            job = %self.job, generation = self.generation, rank = self.rank, seq = self.seq,
            %error, "collective failed; group closed"
        );
        if let Some(link) = &self.send {
            link.close();
        }
        if let Some(link) = &self.recv {
            link.close();
        }
        self.direct.close_all();
        self.sender = None;
        self.send = None;
        self.recv = None;
        self.broken = Some(error.duplicate());
    }

    /// Runs one collective: stamps it with the next sequence number, and on
    /// failure agrees on the culprit with the neighbours and breaks the ring.
    pub(crate) fn run<T>(
        &mut self,
        op: Op,
        body: impl FnOnce(&mut Links<'_>, Deadline, u64) -> Result<T, Fault>,
    ) -> Result<T, CommError> {
        if let Some(error) = &self.broken {
            return Err(error.duplicate());
        }
        self.seq += 1;
        let dl = Deadline::after(self.op_timeout, op);
        let (Some(send), Some(recv), Some(sender)) = (self.send.as_mut(), self.recv.as_mut(), self.sender.as_ref())
        else {
            unreachable!("a ring of world > 1 that is not broken has both links and a writer");
        };
        let mut links = Links { send, recv, sender };
        let outcome = {
            // Waits for the writer thread whatever happens, also on unwinding,
            // so that no queued piece outlives the caller's buffer.
            let guard = FlushOnDrop(sender);
            let outcome = body(&mut links, dl, self.seq);
            drop(guard);
            // Sends already queued still go out (or fail) before the verdict
            // is passed on, so that the next rank reads whole messages.
            let flushed = sender.flush();
            links.send.set_send_idle(flushed.idle);
            match (outcome, flushed.error) {
                (Ok(value), None) => return Ok(value),
                (Ok(_), Some(error)) => Fault::Failed(error),
                // A receive fault comes first: it may lead to the real culprit.
                (Err(fault), _) => fault,
            }
        };
        let error = links.resolve(outcome, dl, self.seq, grace(self.op_timeout));
        // Dropping the sockets makes neighbours still blocked on us fail at once.
        self.break_with(&error);
        Err(error)
    }
}

/// The two connections of a working ring, borrowed for one collective, and
/// the writer thread that sends on `send`.
pub(crate) struct Links<'a> {
    pub send: &'a mut Link,
    pub recv: &'a mut Link,
    pub sender: &'a Sender,
}

/// Cancels and waits for a writer thread when dropped while unwinding.
struct FlushOnDrop<'a>(&'a Sender);

impl Drop for FlushOnDrop<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.cancel();
            self.0.flush();
        }
    }
}

impl Links<'_> {
    /// Turns a fault into the error to report. When the previous rank is
    /// silent or stuck, tells the next rank that this one is stuck too, then
    /// waits a short grace for the previous rank to name the real culprit; the
    /// verdict is passed on to the next rank.
    fn resolve(&mut self, fault: Fault, dl: Deadline, seq: u64, grace: Duration) -> CommError {
        let prev = self.recv.peer;
        let silent_prev = || CommError::Timeout { rank: prev, op: dl.op.name(), after: dl.timeout };
        let error = match fault {
            Fault::Aborted(error) => error,
            Fault::Failed(error) if self.next_hung_up(&error) => {
                // The next rank may have hung up because of an error it found;
                // its verdict travels around the ring and may reach us soon.
                let wait = Deadline { at: Instant::now() + grace, ..dl };
                match self.recv.recv_frame(wait) {
                    Err(Fault::Aborted(forwarded)) => forwarded,
                    _ => error,
                }
            }
            Fault::Failed(error) => error,
            Fault::Silent | Fault::Stuck => {
                self.tell_next(Kind::Stuck, prev, 0, &[], dl.op, seq, grace);
                // A previous rank that has sent data for this op had started
                // it by then, so its own deadline has passed by `started +
                // timeout`: until then (and a grace) its silence may be ours.
                let now = Instant::now();
                let mut until = match self.recv.first_data_at(seq) {
                    Some(started) => (now + grace).max(later(started, dl.timeout) + grace),
                    None => now + grace,
                };
                let mut prev_stuck = false;
                let mut fault = fault;
                loop {
                    match fault {
                        Fault::Aborted(error) | Fault::Failed(error) => break error,
                        // The previous rank is alive and waiting too; it passes
                        // on its verdict as soon as it has one.
                        Fault::Stuck if !prev_stuck => {
                            prev_stuck = true;
                            until = later(Instant::now(), dl.timeout) + 2 * grace;
                        }
                        // A second Stuck is a protocol slip; treat it as silence.
                        Fault::Stuck | Fault::Silent => {}
                    }
                    if Instant::now() >= until {
                        break silent_prev();
                    }
                    fault = match self.recv.recv_frame(Deadline { at: until, ..dl }) {
                        // A late data frame: the previous rank was the slow one.
                        Ok(_) => break silent_prev(),
                        Err(next_fault) => next_fault,
                    };
                }
            }
        };
        let (blame, message) = match &error {
            CommError::Timeout { .. } => (Blame::Timeout, String::new()),
            CommError::PeerClosed { .. } => (Blame::Closed, String::new()),
            CommError::Protocol { message, .. } => (Blame::Protocol, message.clone()),
            CommError::Io { source, .. } => (Blame::Io, source.to_string()),
            CommError::Setup(message) | CommError::Unsupported(message) => (Blame::Io, message.clone()),
        };
        if let Some(culprit) = error.peer() {
            self.tell_next(Kind::Abort, culprit, blame as u64, message.as_bytes(), dl.op, seq, grace);
        }
        self.send.close();
        self.recv.close();
        error
    }

    /// Whether `error` is the next rank closing on us while the previous rank
    /// could still tell us more (its link is between messages).
    fn next_hung_up(&self, error: &CommError) -> bool {
        let closed = matches!(error, CommError::PeerClosed { .. } | CommError::Io { .. });
        closed && error.peer() == Some(self.send.peer) && self.send.peer != self.recv.peer && self.recv.recv_idle()
    }

    /// Best effort: sends a Stuck or Abort frame if the send side is between
    /// messages, giving up after `grace`.
    #[allow(clippy::too_many_arguments)]
    fn tell_next(&mut self, kind: Kind, rank: usize, total: u64, message: &[u8], op: Op, seq: u64, grace: Duration) {
        if !self.send.send_idle() {
            return;
        }
        let frame = Frame { kind, op, aux: rank as u32, seq, total, len: 0 };
        let dl = Deadline::after(grace, op);
        if let Err(error) = self.send.send(frame, Payload::Bytes(message), dl) {
            tracing::debug!(%error, ?kind, "could not tell the next rank");
        }
    }
}

/// How long a rank whose predecessor went quiet waits for a verdict from it.
fn grace(op_timeout: Duration) -> Duration {
    (op_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(2))
}

fn validate(cfg: &RingConfig) -> Result<(), CommError> {
    let problem = if cfg.world == 0 {
        "world must be at least 1".to_string()
    } else if cfg.world > u32::MAX as usize {
        format!("world {} is too large", cfg.world)
    } else if cfg.rank >= cfg.world {
        format!("rank {} is out of range for world {}", cfg.rank, cfg.world)
    } else if cfg.peers.len() != cfg.world {
        format!("{} peer addresses for world {}", cfg.peers.len(), cfg.world)
    } else if cfg.job.len() > MAX_JOB_LEN {
        format!("job id is longer than {MAX_JOB_LEN} bytes")
    } else if cfg.op_timeout.is_zero() {
        "op_timeout must not be zero".to_string()
    } else {
        return Ok(());
    };
    Err(CommError::Setup(problem))
}

/// Why [`dial`] failed.
pub(crate) enum DialError {
    /// The peer's listener refused our generation as older than its newest.
    Stale(CommError),
    /// The peer could not be reached before the deadline.
    Unreachable(CommError),
}

impl DialError {
    pub fn into_error(self) -> CommError {
        match self {
            DialError::Stale(error) | DialError::Unreachable(error) => error,
        }
    }
}

/// Connects to `peer` and runs the handshake with `secret`, retrying with
/// backoff until `deadline` while the peer is not up yet (or does not prove
/// the secret: a stranger on a reused port). A refusal as stale is final.
pub(crate) fn dial(
    addr: SocketAddr,
    peer: usize,
    hello: &Hello,
    secret: &Secret,
    deadline: Instant,
    abandoned: &dyn Fn() -> bool,
) -> Result<TcpStream, DialError> {
    let mut backoff = Duration::from_millis(10);
    let mut warned = false;
    loop {
        if abandoned() {
            return Err(DialError::Stale(crate::listener::stopped(&hello.job, hello.generation)));
        }
        let error = match try_dial(addr, hello, secret, deadline) {
            Ok(Dialed::Accepted(stream)) => return Ok(stream),
            Ok(Dialed::Stale { newest }) => {
                return Err(DialError::Stale(CommError::Setup(format!(
                    "rank {peer} at {addr} refused generation {} of job {:?}: generation {newest} already exists",
                    hello.generation, hello.job
                ))))
            }
            Err(error) => error,
        };
        if error.kind() == std::io::ErrorKind::PermissionDenied && !warned {
            tracing::warn!(peer, %addr, job = %hello.job, generation = hello.generation, %error, "data connection refused");
            warned = true;
        }
        let now = Instant::now();
        if now + backoff >= deadline {
            return Err(DialError::Unreachable(CommError::Setup(format!(
                "could not connect to rank {peer} at {addr} in time: {error}"
            ))));
        }
        tracing::trace!(peer, %addr, %error, "ring connect failed; retrying");
        thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_millis(250));
    }
}

/// How a handshake this rank dialed ended, short of an error.
enum Dialed {
    Accepted(TcpStream),
    Stale { newest: u64 },
}

/// One attempt: hello, the listener's challenge (whose proof must hold),
/// our proof, the verdict. A listener that does not prove the secret is a
/// `PermissionDenied` error.
fn try_dial(addr: SocketAddr, hello: &Hello, secret: &Secret, deadline: Instant) -> std::io::Result<Dialed> {
    let remaining = || {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(std::io::Error::from(std::io::ErrorKind::TimedOut))
        } else {
            Ok(left)
        }
    };
    let mut stream = TcpStream::connect_timeout(&addr, remaining()?.min(Duration::from_secs(2)))?;
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(remaining()?))?;
    let bytes = hello.encode(&auth::nonce()?);
    stream.write_all(&bytes)?;
    stream.set_read_timeout(Some(remaining()?))?;
    let nonce = match read_answer(&mut stream)? {
        Answer::Stale { newest } => return Ok(Dialed::Stale { newest }),
        Answer::Challenge { nonce, proof } if auth::verify(secret, Role::Listener, &bytes, &nonce, &proof) => nonce,
        Answer::Challenge { .. } => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "the listener did not prove the generation's secret",
            ))
        }
        Answer::Accepted => return Err(invalid("accepted before any proof".into())),
    };
    stream.write_all(&auth::prove(secret, Role::Connector, &bytes, &nonce))?;
    match read_answer(&mut stream)? {
        Answer::Accepted => {
            stream.set_read_timeout(None)?;
            stream.set_write_timeout(None)?;
            Ok(Dialed::Accepted(stream))
        }
        Answer::Stale { newest } => Ok(Dialed::Stale { newest }),
        Answer::Challenge { .. } => Err(invalid("a second challenge".into())),
    }
}

fn read_answer(stream: &mut TcpStream) -> std::io::Result<Answer> {
    let mut status = [0u8; 1];
    stream.read_exact(&mut status)?;
    let mut rest = vec![0u8; Answer::rest_len(status[0]).map_err(invalid)?];
    stream.read_exact(&mut rest)?;
    Answer::decode(status[0], &rest).map_err(invalid)
}

fn invalid(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message)
}
