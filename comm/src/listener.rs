//! The data port of a worker process. It accepts peer connections for the whole
//! life of the process, runs each one's handshake, and parks it by
//! (job, generation, from rank, lane) until
//! [`TcpRing::connect`](crate::TcpRing::connect) claims it. Only a peer that
//! proves it knows the generation's secret is parked; garbage, stale
//! generations, failed proofs and rings this process never builds are
//! refused at the door, logged, and counted.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::auth::{self, Role, Secret, PROOF_LEN};
use crate::error::CommError;
use crate::wire::{Answer, Hello, Lane, HELLO_PREFIX};

/// How long an accepted connection may take to send its hello, and its
/// proof once challenged.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a hello for a ring this process has not begun yet waits for it
/// (peers start at different times); the connector retries after.
const RING_WAIT: Duration = Duration::from_secs(10);

/// One per worker process: owns the data port and parks incoming ring
/// connections until a ring of the right job and generation claims them.
pub struct CommListener {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_thread: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a connection is parked or the listener shuts down.
    changed: Condvar,
    stop: AtomicBool,
    /// Connections refused at the door so far.
    refused: AtomicU64,
}

type Key = (String, u64, u32, Lane);

#[derive(Default)]
struct State {
    parked: HashMap<Key, Parked>,
    /// Newest generation claimed (or being claimed) per job.
    newest: HashMap<String, u64>,
    /// The secret of that generation, per job.
    secrets: HashMap<String, Secret>,
    /// Per job, the newest generation this worker stopped: its rings (and
    /// older ones) are built no further.
    abandoned: HashMap<String, u64>,
    shut: bool,
}

impl State {
    /// Whether `generation` of ring `job` (a job id, or a job's group such
    /// as `job#dp0`) was abandoned.
    fn is_abandoned(&self, job: &str, generation: u64) -> bool {
        let base = job.split('#').next().unwrap_or(job);
        self.abandoned.get(base).is_some_and(|g| generation <= *g)
    }
}

/// A connection whose handshake was accepted, waiting for its ring.
pub(crate) struct Parked {
    pub stream: TcpStream,
    pub hello: Hello,
}

impl CommListener {
    /// Binds the data port (port 0 picks a free one) and starts accepting.
    pub fn bind(addr: SocketAddr) -> io::Result<CommListener> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            refused: AtomicU64::new(0),
        });
        let accept_shared = Arc::clone(&shared);
        let accept_thread = thread::Builder::new()
            .name("flotilla-comm-accept".into())
            .spawn(move || accept_loop(listener, accept_shared))?;
        tracing::debug!(%addr, "comm listener bound");
        Ok(CommListener { addr, shared, accept_thread: Mutex::new(Some(accept_thread)) })
    }

    /// The address actually bound (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many connections were refused at the door so far: bytes that are
    /// not a handshake, generations older than one begun here, proofs that
    /// do not hold, rings this process did not begin in time.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }

    /// Stops accepting, closes every parked connection and fails pending
    /// claims. Idempotent; also done on drop.
    pub fn shutdown(&self) {
        if self.shared.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        {
            let mut state = self.shared.lock();
            state.shut = true;
            state.parked.clear();
        }
        self.shared.changed.notify_all();
        // Wake the blocking accept with a connection of our own.
        let woke = TcpStream::connect_timeout(&wake_addr(self.addr), Duration::from_secs(1));
        let handle = self.accept_thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        match (woke, handle) {
            (Ok(_), Some(handle)) => {
                let _ = handle.join();
            }
            (Err(error), Some(_)) => {
                // The thread ends at its next accept; do not wait for it.
                tracing::warn!(addr = %self.addr, %error, "could not wake the comm accept thread");
            }
            (_, None) => {}
        }
        tracing::debug!(addr = %self.addr, "comm listener shut down");
    }

    /// Gives up on `generation` (and older ones) of `job` and of its groups
    /// (`job#...`): rings being built for them fail at once instead of
    /// waiting out their connect timeout for a peer that may be dead. The
    /// worker calls it when it stops a rank because the coordinator moved
    /// on.
    pub fn abandon(&self, job: &str, generation: u64) {
        {
            let mut state = self.shared.lock();
            let g = state.abandoned.entry(job.to_string()).or_insert(generation);
            *g = (*g).max(generation);
        }
        self.shared.changed.notify_all();
    }

    /// Whether [`CommListener::abandon`] gave up on `generation` of `job`.
    pub fn is_abandoned(&self, job: &str, generation: u64) -> bool {
        self.shared.lock().is_abandoned(job, generation)
    }

    /// Records that `generation` of `job` is being built here with `secret`,
    /// so that older generations are refused from now on and peers of this
    /// one can prove themselves, and drops parked connections of older
    /// generations. Fails with the newest generation if `generation` is
    /// itself older than one already claimed.
    pub(crate) fn begin_generation(&self, job: &str, generation: u64, secret: &Secret) -> Result<(), u64> {
        let mut state = self.shared.lock();
        let newest = state.newest.entry(job.to_string()).or_insert(generation);
        if *newest > generation {
            return Err(*newest);
        }
        *newest = generation;
        state.secrets.insert(job.to_string(), secret.clone());
        state.parked.retain(|(j, g, _, _), _| !(j == job && *g < generation));
        drop(state);
        // Handshakes waiting for this ring may go on.
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Waits until `from_rank` of (`job`, `generation`) has connected on
    /// `lane`, and takes its connection.
    pub(crate) fn claim(
        &self,
        job: &str,
        generation: u64,
        from_rank: usize,
        lane: Lane,
        deadline: Instant,
    ) -> Result<Parked, CommError> {
        self.shared.claim(job, generation, from_rank, lane, deadline)
    }

    /// A handle that can claim connections later, for links that a ring
    /// builds on demand.
    pub(crate) fn handle(&self) -> ListenerHandle {
        ListenerHandle(Arc::clone(&self.shared))
    }
}

/// Claims connections parked on a [`CommListener`]; kept by a ring for the
/// direct links it builds on demand.
#[derive(Clone)]
pub(crate) struct ListenerHandle(Arc<Shared>);

impl ListenerHandle {
    pub(crate) fn claim(
        &self,
        job: &str,
        generation: u64,
        from_rank: usize,
        lane: Lane,
        deadline: Instant,
    ) -> Result<Parked, CommError> {
        self.0.claim(job, generation, from_rank, lane, deadline)
    }

    pub(crate) fn is_abandoned(&self, job: &str, generation: u64) -> bool {
        self.0.lock().is_abandoned(job, generation)
    }
}

impl Shared {
    fn claim(
        &self,
        job: &str,
        generation: u64,
        from_rank: usize,
        lane: Lane,
        deadline: Instant,
    ) -> Result<Parked, CommError> {
        let key: Key = (job.to_string(), generation, from_rank as u32, lane);
        let mut state = self.lock();
        loop {
            if state.shut {
                return Err(CommError::Setup("the comm listener is shut down".into()));
            }
            if state.is_abandoned(job, generation) {
                return Err(stopped(job, generation));
            }
            if let Some(parked) = state.parked.remove(&key) {
                return Ok(parked);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CommError::Setup(format!(
                    "rank {from_rank} did not connect for job {job:?} generation {generation} in time"
                )));
            }
            state = self.changed.wait_timeout(state, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

/// The error of a ring whose generation this worker gave up on.
pub(crate) fn stopped(job: &str, generation: u64) -> CommError {
    CommError::Setup(format!("job {job:?} generation {generation} was stopped on this worker"))
}

impl Drop for CommListener {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        match accepted {
            Ok((stream, from)) => {
                let shared = Arc::clone(&shared);
                let spawned = thread::Builder::new()
                    .name("flotilla-comm-hello".into())
                    .spawn(move || receive_hello(&shared, stream, from));
                if let Err(error) = spawned {
                    tracing::warn!(%from, %error, "could not start a handshake thread");
                }
            }
            Err(error) => {
                // Out of file descriptors and the like: do not spin.
                tracing::warn!(%error, "comm accept failed");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// How a handshake at the door ended.
enum Outcome {
    Parked(Hello),
    Refused(Hello, Refusal),
    /// The listener shut down meanwhile.
    Shut,
}

/// Why a connection that sent a hello was refused.
enum Refusal {
    /// A generation older than one already begun here for the job.
    Stale { newest: u64 },
    /// No ring of that job and generation began here in time.
    UnknownRing,
    /// The proof did not hold: another secret, or a replayed handshake.
    BadProof,
}

fn receive_hello(shared: &Shared, mut stream: TcpStream, from: SocketAddr) {
    let (hello, refusal) = match handshake(shared, &mut stream) {
        Ok(Outcome::Shut) => return,
        Ok(Outcome::Parked(hello)) => {
            tracing::debug!(
                %from, job = %hello.job, generation = hello.generation, from_rank = hello.from_rank,
                "parked a ring connection"
            );
            return;
        }
        Ok(Outcome::Refused(hello, refusal)) => (hello, refusal),
        Err(error) => {
            shared.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%from, %error, "refused a data connection: not a flotilla handshake, or cut short");
            return;
        }
    };
    shared.refused.fetch_add(1, Ordering::Relaxed);
    let (job, generation, from_rank) = (hello.job.as_str(), hello.generation, hello.from_rank);
    match refusal {
        Refusal::Stale { newest } => {
            tracing::warn!(%from, job, generation, newest, "refused a data connection of an older generation");
            // Tells a straggler to give up rather than retry.
            let _ = stream.write_all(&Answer::Stale { newest }.encode());
        }
        Refusal::UnknownRing => {
            tracing::warn!(%from, job, generation, from_rank, "refused a data connection for a ring not built here")
        }
        Refusal::BadProof => tracing::warn!(
            %from, job, generation, from_rank,
            "refused a data connection that did not prove the generation's secret (a stranger or a replay)"
        ),
    }
}

/// Runs the listener's side of a handshake, and parks the connection if
/// its proof holds. An error: bytes that are not a handshake, or a
/// handshake cut short.
fn handshake(shared: &Shared, stream: &mut TcpStream) -> io::Result<Outcome> {
    let (hello, hello_bytes) = read_hello(stream)?;
    let secret = match shared.await_ring(&hello) {
        Door::Shut => return Ok(Outcome::Shut),
        Door::Stale(newest) => return Ok(Outcome::Refused(hello, Refusal::Stale { newest })),
        Door::Unknown => return Ok(Outcome::Refused(hello, Refusal::UnknownRing)),
        Door::Open(secret) => secret,
    };
    let nonce = auth::nonce()?;
    let proof = auth::prove(&secret, Role::Listener, &hello_bytes, &nonce);
    stream.write_all(&Answer::Challenge { nonce, proof }.encode())?;
    let mut theirs = [0u8; PROOF_LEN];
    stream.read_exact(&mut theirs)?;
    if !auth::verify(&secret, Role::Connector, &hello_bytes, &nonce, &theirs) {
        return Ok(Outcome::Refused(hello, Refusal::BadProof));
    }
    let mut state = shared.lock();
    if state.shut {
        return Ok(Outcome::Shut);
    }
    let newest = state.newest.get(&hello.job).copied().unwrap_or(0);
    if hello.generation < newest {
        // A newer generation began during the handshake.
        return Ok(Outcome::Refused(hello, Refusal::Stale { newest }));
    }
    // Answer while holding the lock, so that no newer generation can begin
    // between the check and the parking.
    stream.write_all(&Answer::Accepted.encode())?;
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    let key = (hello.job.clone(), hello.generation, hello.from_rank, hello.lane);
    // A repeated key is a retry of the same connector: the newest wins.
    state.parked.insert(key, Parked { stream: stream.try_clone()?, hello: hello.clone() });
    drop(state);
    shared.changed.notify_all();
    Ok(Outcome::Parked(hello))
}

/// Where a hello stands with the rings begun here.
enum Door {
    /// Its ring's generation began here: prove with this secret.
    Open(Secret),
    /// Older than the newest generation begun here for the job.
    Stale(u64),
    /// Its ring did not begin here in time.
    Unknown,
    Shut,
}

impl Shared {
    /// Waits (up to [`RING_WAIT`]) until the hello's ring and generation
    /// have begun here, or have been overtaken by a newer one.
    fn await_ring(&self, hello: &Hello) -> Door {
        let deadline = Instant::now() + RING_WAIT;
        let mut state = self.lock();
        loop {
            if state.shut {
                return Door::Shut;
            }
            let newest = state.newest.get(&hello.job).copied();
            match newest {
                Some(n) if n > hello.generation => return Door::Stale(n),
                Some(n) if n == hello.generation => {
                    if let Some(secret) = state.secrets.get(&hello.job) {
                        return Door::Open(secret.clone());
                    }
                }
                _ => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Door::Unknown;
            }
            state = self.changed.wait_timeout(state, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

/// Reads a hello; returns it and its bytes (which the proofs cover).
fn read_hello(stream: &mut TcpStream) -> io::Result<(Hello, Vec<u8>)> {
    stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
    stream.set_write_timeout(Some(HELLO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let invalid = |message: String| io::Error::new(io::ErrorKind::InvalidData, message);
    let mut bytes = vec![0u8; HELLO_PREFIX];
    stream.read_exact(&mut bytes)?;
    let prefix: [u8; HELLO_PREFIX] = bytes[..].try_into().expect("prefix length");
    let rest_len = Hello::rest_len(&prefix).map_err(invalid)?;
    bytes.resize(HELLO_PREFIX + rest_len, 0);
    stream.read_exact(&mut bytes[HELLO_PREFIX..])?;
    let hello = Hello::decode_rest(&bytes[HELLO_PREFIX..]).map_err(invalid)?;
    Ok((hello, bytes))
}

/// Where to connect to reach our own accept loop.
fn wake_addr(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Answer;

    fn secret(byte: u8) -> Secret {
        Secret::from_bytes(&[byte; 32]).unwrap()
    }

    fn read_answer(stream: &mut TcpStream) -> Option<Answer> {
        let mut status = [0u8; 1];
        stream.read_exact(&mut status).ok()?;
        let mut rest = vec![0u8; Answer::rest_len(status[0]).unwrap()];
        stream.read_exact(&mut rest).unwrap();
        Some(Answer::decode(status[0], &rest).unwrap())
    }

    /// What a connector sent: its hello, then its proof.
    struct Sent {
        hello: Vec<u8>,
        proof: Option<Vec<u8>>,
    }

    /// The connector's side by hand: a hello, then a proof made with
    /// `secret`. Returns the last answer (`None`: closed without one),
    /// whether the listener's own proof held for `secret`, and what was sent.
    fn say_hello(
        listener: &CommListener,
        job: &str,
        generation: u64,
        secret: &Secret,
    ) -> (TcpStream, Option<Answer>, bool, Sent) {
        let mut stream = TcpStream::connect(listener.local_addr()).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let hello = Hello { job: job.into(), generation, from_rank: 0, to_rank: 1, world: 2, lane: Lane::Ring };
        let bytes = hello.encode(&auth::nonce().unwrap());
        stream.write_all(&bytes).unwrap();
        let mut sent = Sent { hello: bytes.clone(), proof: None };
        match read_answer(&mut stream) {
            Some(Answer::Challenge { nonce, proof }) => {
                let listener_proved = auth::verify(secret, Role::Listener, &bytes, &nonce, &proof);
                let mine = auth::prove(secret, Role::Connector, &bytes, &nonce);
                stream.write_all(&mine).unwrap();
                sent.proof = Some(mine.to_vec());
                let last = read_answer(&mut stream);
                (stream, last, listener_proved, sent)
            }
            other => (stream, other, false, sent),
        }
    }

    fn bind() -> CommListener {
        CommListener::bind("127.0.0.1:0".parse().unwrap()).unwrap()
    }

    #[test]
    fn a_peer_that_knows_the_secret_is_parked_and_the_listener_proves_it_too() {
        let listener = bind();
        listener.begin_generation("job", 1, &secret(1)).unwrap();
        let (_stream, answer, listener_proved, _) = say_hello(&listener, "job", 1, &secret(1));
        assert_eq!(answer, Some(Answer::Accepted));
        assert!(listener_proved);
        let parked = listener.claim("job", 1, 0, Lane::Ring, Instant::now() + Duration::from_secs(1)).unwrap();
        assert_eq!(parked.hello.generation, 1);
        assert_eq!(listener.refused(), 0);
    }

    #[test]
    fn a_peer_with_another_secret_is_refused_and_never_parked() {
        let listener = bind();
        listener.begin_generation("job", 1, &secret(1)).unwrap();
        let (_stream, answer, listener_proved, _) = say_hello(&listener, "job", 1, &secret(2));
        assert_eq!(answer, None, "closed without an answer");
        assert!(!listener_proved, "the connector sees the listener does not share its secret");
        assert_eq!(listener.refused(), 1);
        let missing = listener.claim("job", 1, 0, Lane::Ring, Instant::now() + Duration::from_millis(50));
        assert!(matches!(missing, Err(CommError::Setup(_))));
    }

    #[test]
    fn a_replayed_handshake_is_refused() {
        let listener = bind();
        listener.begin_generation("job", 1, &secret(1)).unwrap();
        let (_first, answer, _, sent) = say_hello(&listener, "job", 1, &secret(1));
        assert_eq!(answer, Some(Answer::Accepted));
        let _taken = listener.claim("job", 1, 0, Lane::Ring, Instant::now() + Duration::from_secs(1)).unwrap();

        // The same bytes again: the listener's fresh nonce makes the old proof fail.
        let mut replay = TcpStream::connect(listener.local_addr()).unwrap();
        replay.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        replay.write_all(&sent.hello).unwrap();
        assert!(matches!(read_answer(&mut replay), Some(Answer::Challenge { .. })));
        replay.write_all(&sent.proof.unwrap()).unwrap();
        assert_eq!(read_answer(&mut replay), None, "closed without an answer");
        assert_eq!(listener.refused(), 1);
        let missing = listener.claim("job", 1, 0, Lane::Ring, Instant::now() + Duration::from_millis(50));
        assert!(matches!(missing, Err(CommError::Setup(_))), "nothing parked for the replay");
    }

    #[test]
    fn a_hello_for_a_ring_not_begun_yet_waits_for_it() {
        let listener = bind();
        thread::scope(|scope| {
            let early = scope.spawn(|| say_hello(&listener, "job", 4, &secret(4)).1);
            thread::sleep(Duration::from_millis(100));
            listener.begin_generation("job", 4, &secret(4)).unwrap();
            assert_eq!(early.join().unwrap(), Some(Answer::Accepted));
        });
    }

    #[test]
    fn older_generations_are_closed_and_refused() {
        let listener = bind();
        listener.begin_generation("job", 1, &secret(1)).unwrap();
        let (mut old, answer, _, _) = say_hello(&listener, "job", 1, &secret(1));
        assert_eq!(answer, Some(Answer::Accepted));

        listener.begin_generation("job", 2, &secret(2)).unwrap();
        // the parked generation-1 connection is closed at once
        assert_eq!(old.read(&mut [0u8; 1]).unwrap(), 0);
        // and a new one is refused, even with the right (old) secret
        assert_eq!(say_hello(&listener, "job", 1, &secret(1)).1, Some(Answer::Stale { newest: 2 }));
        assert_eq!(listener.refused(), 1);
        assert_eq!(listener.begin_generation("job", 1, &secret(1)), Err(2));
        // other jobs and newer generations are not affected
        listener.begin_generation("other", 1, &secret(5)).unwrap();
        assert_eq!(say_hello(&listener, "other", 1, &secret(5)).1, Some(Answer::Accepted));
        listener.begin_generation("job", 3, &secret(3)).unwrap();
        let (_keep, answer, _, _) = say_hello(&listener, "job", 3, &secret(3));
        assert_eq!(answer, Some(Answer::Accepted));

        let soon = Instant::now() + Duration::from_secs(1);
        let parked = listener.claim("job", 3, 0, Lane::Ring, soon).unwrap();
        assert_eq!(parked.hello.generation, 3);
        let missing = listener.claim("job", 3, 1, Lane::Ring, Instant::now() + Duration::from_millis(50));
        assert!(matches!(missing, Err(CommError::Setup(_))));
    }

    #[test]
    fn shutdown_fails_pending_claims_and_stops_accepting() {
        let listener = bind();
        let addr = listener.local_addr();
        let started = Instant::now();
        thread::scope(|scope| {
            let claim =
                scope.spawn(|| listener.claim("job", 1, 0, Lane::Ring, Instant::now() + Duration::from_secs(10)));
            thread::sleep(Duration::from_millis(50));
            listener.shutdown();
            assert!(matches!(claim.join().unwrap(), Err(CommError::Setup(_))));
        });
        assert!(started.elapsed() < Duration::from_secs(5));
        listener.shutdown(); // idempotent
        drop(listener);
        assert!(TcpStream::connect(addr).is_err(), "the port is closed");
    }

    #[test]
    fn garbage_is_dropped_without_harm() {
        let listener = bind();
        listener.begin_generation("job", 1, &secret(1)).unwrap();
        let mut stream = TcpStream::connect(listener.local_addr()).unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 16];
        assert!(matches!(stream.read(&mut buf), Ok(0) | Err(_)));
        assert_eq!(listener.refused(), 1);
        assert_eq!(say_hello(&listener, "job", 1, &secret(1)).1, Some(Answer::Accepted));
    }
}
