//! The data port of a worker process. It accepts peer connections for the whole
//! life of the process, reads each one's handshake, and parks it by
//! (job, generation, from rank) until [`TcpRing::connect`](crate::TcpRing::connect)
//! claims it. Stale generations are refused at the door.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::error::CommError;
use crate::wire::{Hello, Lane, Verdict};

/// How long an accepted connection may take to send its handshake.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

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
}

type Key = (String, u64, u32, Lane);

#[derive(Default)]
struct State {
    parked: HashMap<Key, Parked>,
    /// Newest generation claimed (or being claimed) per job.
    newest: HashMap<String, u64>,
    shut: bool,
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

    /// Records that `generation` of `job` is being built here, so that older
    /// generations are refused from now on, and drops parked connections of
    /// older generations. Fails with the newest generation if `generation` is
    /// itself older than one already claimed.
    pub(crate) fn begin_generation(&self, job: &str, generation: u64) -> Result<(), u64> {
        let mut state = self.shared.lock();
        let newest = state.newest.entry(job.to_string()).or_insert(generation);
        if *newest > generation {
            return Err(*newest);
        }
        *newest = generation;
        state.parked.retain(|(j, g, _, _), _| !(j == job && *g < generation));
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

fn receive_hello(shared: &Shared, mut stream: TcpStream, from: SocketAddr) {
    let hello = match read_hello(&mut stream) {
        Ok(hello) => hello,
        Err(error) => {
            tracing::debug!(%from, %error, "dropped a connection with a bad handshake");
            return;
        }
    };
    let mut state = shared.lock();
    if state.shut {
        return;
    }
    let newest = state.newest.get(&hello.job).copied().unwrap_or(0);
    if hello.generation < newest {
        drop(state);
        tracing::info!(
            %from, job = %hello.job, generation = hello.generation, newest,
            "refused a connection from an old generation"
        );
        let _ = stream.write_all(&Verdict::Stale { newest }.encode());
        return;
    }
    // Answer while holding the lock, so that no newer generation can begin
    // between the check and the parking.
    if let Err(error) = stream.write_all(&Verdict::Accepted.encode()) {
        tracing::debug!(%from, %error, "could not answer a handshake");
        return;
    }
    let _ = stream.set_read_timeout(None);
    let _ = stream.set_write_timeout(None);
    tracing::debug!(
        %from, job = %hello.job, generation = hello.generation, from_rank = hello.from_rank,
        "parked a ring connection"
    );
    let key = (hello.job.clone(), hello.generation, hello.from_rank, hello.lane);
    // A repeated key is a retry of the same connector: the newest wins.
    state.parked.insert(key, Parked { stream, hello });
    drop(state);
    shared.changed.notify_all();
}

fn read_hello(stream: &mut TcpStream) -> io::Result<Hello> {
    stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
    stream.set_write_timeout(Some(HELLO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let invalid = |message: String| io::Error::new(io::ErrorKind::InvalidData, message);
    let mut prefix = [0u8; 8];
    stream.read_exact(&mut prefix)?;
    let rest_len = Hello::rest_len(&prefix).map_err(invalid)?;
    let mut rest = vec![0u8; rest_len];
    stream.read_exact(&mut rest)?;
    Hello::decode_rest(&rest).map_err(invalid)
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

    fn say_hello(listener: &CommListener, job: &str, generation: u64) -> (TcpStream, Verdict) {
        let mut stream = TcpStream::connect(listener.local_addr()).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let hello = Hello { job: job.into(), generation, from_rank: 0, to_rank: 1, world: 2, lane: Lane::Ring };
        stream.write_all(&hello.encode()).unwrap();
        let mut answer = [0u8; 9];
        stream.read_exact(&mut answer).unwrap();
        (stream, Verdict::decode(&answer).unwrap())
    }

    #[test]
    fn older_generations_are_closed_and_refused() {
        let listener = CommListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let (mut old, verdict) = say_hello(&listener, "job", 1);
        assert_eq!(verdict, Verdict::Accepted);

        listener.begin_generation("job", 2).unwrap();
        // the parked generation-1 connection is closed at once
        assert_eq!(old.read(&mut [0u8; 1]).unwrap(), 0);
        // and a new one is refused
        assert_eq!(say_hello(&listener, "job", 1).1, Verdict::Stale { newest: 2 });
        assert_eq!(listener.begin_generation("job", 1), Err(2));
        // other jobs and newer generations are not affected
        assert_eq!(say_hello(&listener, "other", 1).1, Verdict::Accepted);
        let (_keep, verdict) = say_hello(&listener, "job", 3);
        assert_eq!(verdict, Verdict::Accepted);

        let soon = Instant::now() + Duration::from_secs(1);
        let parked = listener.claim("job", 3, 0, Lane::Ring, soon).unwrap();
        assert_eq!(parked.hello.generation, 3);
        let missing = listener.claim("job", 3, 1, Lane::Ring, Instant::now() + Duration::from_millis(50));
        assert!(matches!(missing, Err(CommError::Setup(_))));
    }

    #[test]
    fn shutdown_fails_pending_claims_and_stops_accepting() {
        let listener = CommListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
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
        let listener = CommListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut stream = TcpStream::connect(listener.local_addr()).unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 16];
        assert!(matches!(stream.read(&mut buf), Ok(0) | Err(_)));
        assert_eq!(say_hello(&listener, "job", 1).1, Verdict::Accepted);
    }
}
