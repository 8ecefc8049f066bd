//! What the authenticated handshake costs: the time to open a data
//! connection (hello, the listener's challenge and proof, ours, the verdict:
//! two round trips and four HMAC-SHA256s) against a plain TCP connect with
//! one round trip, and the ring all-reduce's bus bandwidth over connections
//! opened that way against one plain TCP stream on loopback, all measured in
//! the same run. The secret costs only at connect time: frames after the
//! handshake are not touched.
//!
//! `cargo bench -p flotilla-comm --bench handshake` (a release build).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

mod common;

use common::{all_reduce_bus_gbps, config, median};
use flotilla_comm::{CommListener, Secret, TcpRing};

const CONNECTS: u64 = 200;
const SIZES_MIB: [usize; 3] = [1, 16, 64];

fn main() {
    let (ring_connect, plain_connect, proofs) = (ring_connect_time(), plain_connect_time(), proofs_time());
    println!("opening a data connection (median of {CONNECTS}, loopback)");
    println!("  a 2-rank ring built: each rank dials one authenticated connection and");
    println!("  accepts one (with thread start-up and the ring's writer thread): {:>8.1} us", micros(ring_connect));
    println!("  plain TCP connect + 1 round trip (no handshake at all):          {:>8.1} us", micros(plain_connect));
    println!("  ratio: {:.2}x", ring_connect.as_secs_f64() / plain_connect.as_secs_f64());
    println!("  of which the four HMAC-SHA256 proofs of one handshake:           {:>8.1} us", micros(proofs));
    println!();
    let plain = plain_stream_gbps();
    println!("ring all_reduce bus bandwidth over authenticated connections (loopback)");
    println!("  plain TCP stream, same run: {plain:.2} GB/s");
    for world in [2, 4] {
        for mib in SIZES_MIB {
            let bus = all_reduce_bus_gbps(world, mib);
            println!("  world {world}, {mib:>3} MiB: {bus:>6.2} GB/s  ({:.2} of the plain stream)", bus / plain);
        }
    }
}

/// What one handshake spends on cryptography: two proofs made and two
/// checked, over a hello of a typical size.
fn proofs_time() -> Duration {
    use hmac::{Hmac, Mac};
    let (key, hello, nonce) = ([7u8; 32], [1u8; 100], [2u8; 32]);
    let rounds = 10_000u32;
    let started = Instant::now();
    for i in 0..rounds * 4 {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
        mac.update(&i.to_le_bytes());
        mac.update(&hello);
        mac.update(&nonce);
        std::hint::black_box(mac.finalize());
    }
    started.elapsed() / rounds
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Builds a 2-rank ring again and again (a new generation each time) on
/// the same listeners: each rank dials one connection and accepts one.
fn ring_connect_time() -> Duration {
    let listeners: Vec<CommListener> =
        (0..2).map(|_| CommListener::bind("127.0.0.1:0".parse().unwrap()).unwrap()).collect();
    let peers: Vec<_> = listeners.iter().map(CommListener::local_addr).collect();
    let secret = Secret::random().unwrap();
    let times = (1..=CONNECTS)
        .map(|generation| {
            let started = Instant::now();
            thread::scope(|scope| {
                for (rank, l) in listeners.iter().enumerate() {
                    let cfg = config(&peers, generation, rank, &secret);
                    scope.spawn(move || TcpRing::connect(l, cfg).unwrap());
                }
            });
            started.elapsed()
        })
        .collect();
    median(times)
}

/// A plain TCP connect and a one-byte round trip, the floor of any
/// handshake with an answer.
fn plain_connect_time() -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for s in listener.incoming() {
            let mut s = s.unwrap();
            let mut b = [0u8; 1];
            if s.read_exact(&mut b).is_ok() {
                let _ = s.write_all(&b);
            }
        }
    });
    let times = (0..CONNECTS)
        .map(|_| {
            let started = Instant::now();
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_nodelay(true).unwrap();
            s.write_all(&[1]).unwrap();
            s.read_exact(&mut [0u8; 1]).unwrap();
            started.elapsed()
        })
        .collect();
    median(times)
}

/// GB/s of one TCP stream on loopback writing 1 GiB in 1 MiB writes.
fn plain_stream_gbps() -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let total = 1usize << 30;
    let reader = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < total {
            got += s.read(&mut buf).unwrap();
        }
    });
    let mut s = TcpStream::connect(addr).unwrap();
    let chunk = vec![7u8; 1 << 20];
    let started = Instant::now();
    for _ in 0..total / chunk.len() {
        s.write_all(&chunk).unwrap();
    }
    reader.join().unwrap();
    total as f64 / started.elapsed().as_secs_f64() / 1e9
}
