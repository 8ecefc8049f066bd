//! A TCP proxy on loopback that forwards every connection to one address
//! and records the first bytes each client sent: a place to capture real
//! handshakes and replay them. Standard library only, so that the
//! integration tests of the umbrella crate can include this file too.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;

/// How many bytes of each client's stream are kept.
const KEEP: usize = 64 * 1024;

pub struct RecordingProxy {
    pub addr: SocketAddr,
    recorded: Arc<Mutex<Vec<Arc<Mutex<Vec<u8>>>>>>,
}

impl RecordingProxy {
    /// Listens on `bind` (port 0: any free one) and forwards to `target`.
    pub fn start(bind: SocketAddr, target: SocketAddr) -> RecordingProxy {
        let listener = TcpListener::bind(bind).expect("bind the proxy");
        let addr = listener.local_addr().unwrap();
        let recorded: Arc<Mutex<Vec<Arc<Mutex<Vec<u8>>>>>> = Arc::default();
        let all = recorded.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(target) else { continue };
                let record = Arc::new(Mutex::new(Vec::new()));
                all.lock().unwrap().push(record.clone());
                pump(client.try_clone().unwrap(), server.try_clone().unwrap(), Some(record));
                pump(server, client, None);
            }
        });
        RecordingProxy { addr, recorded }
    }

    /// The bytes each client sent so far (up to 64 KiB each), in the order
    /// the connections came.
    pub fn recorded(&self) -> Vec<Vec<u8>> {
        self.recorded.lock().unwrap().iter().map(|r| r.lock().unwrap().clone()).collect()
    }
}

/// Copies `from` to `to` on a thread until either end closes.
fn pump(mut from: TcpStream, mut to: TcpStream, record: Option<Arc<Mutex<Vec<u8>>>>) {
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some(r) = &record {
                let mut r = r.lock().unwrap();
                let room = KEEP.saturating_sub(r.len()).min(n);
                r.extend_from_slice(&buf[..room]);
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

/// Sends `bytes` to `addr` as a new connection and reads whatever comes
/// back until the other end closes (or 30 s pass); returns what came back.
pub fn replay(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect to replay");
    s.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    // The peer may close before taking every byte: that is a refusal too.
    let _ = s.write_all(bytes);
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back);
    back
}
