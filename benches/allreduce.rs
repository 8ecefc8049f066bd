//! All-reduce over flotilla's TCP ring on loopback, against the physical
//! limit measured in the same run: one TCP stream over loopback.
//!
//! `cargo bench --bench allreduce` prints bus bandwidth (nccl-tests
//! convention: busbw = algbw * 2(n-1)/n) per buffer size and world size, and
//! its ratio to the loopback stream. Under `cargo test` it runs one small
//! round as a smoke test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use flotilla::comm::{CommListener, ProcessGroup, RingConfig, TcpRing};

/// Bytes per second of one loopback TCP stream moving `bytes`.
fn loopback_limit(bytes: usize) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < bytes {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0);
            got += n;
        }
    });
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let chunk = vec![1u8; 1 << 20];
    let t0 = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        let n = chunk.len().min(bytes - sent);
        s.write_all(&chunk[..n]).unwrap();
        sent += n;
    }
    reader.join().unwrap();
    bytes as f64 / t0.elapsed().as_secs_f64()
}

/// Mean seconds per all-reduce of `elems` f32 over `world` ranks (threads).
fn ring_seconds(world: usize, elems: usize, reps: usize, generation: u64) -> f64 {
    let listeners: Vec<CommListener> =
        (0..world).map(|_| CommListener::bind("127.0.0.1:0".parse().unwrap()).unwrap()).collect();
    let peers: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr()).collect();
    let times: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .iter()
            .enumerate()
            .map(|(rank, l)| {
                let peers = peers.clone();
                s.spawn(move || {
                    let cfg = RingConfig {
                        job: "bench".into(),
                        generation,
                        rank,
                        world,
                        peers,
                        connect_timeout: Duration::from_secs(10),
                        op_timeout: Duration::from_secs(60),
                    };
                    let mut ring = TcpRing::connect(l, cfg).unwrap();
                    let mut buf = vec![1.0f32; elems];
                    ring.all_reduce_sum(&mut buf).unwrap();
                    ring.barrier().unwrap();
                    let t0 = Instant::now();
                    for _ in 0..reps {
                        ring.all_reduce_sum(&mut buf).unwrap();
                    }
                    t0.elapsed().as_secs_f64() / reps as f64
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    times.into_iter().fold(0.0, f64::max)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes: &[usize] = if full { &[1 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20] } else { &[1 << 10, 64 << 10] };
    let limit = loopback_limit(if full { 1 << 30 } else { 16 << 20 });
    println!("loopback TCP stream (the limit): {:.2} GB/s", limit / 1e9);
    println!("{:>6} {:>10} {:>12} {:>12} {:>10}", "ranks", "bytes", "time", "busbw GB/s", "of limit");
    let mut generation = 0;
    for world in [2usize, 4] {
        for &bytes in sizes {
            generation += 1;
            let reps = if full { (256 << 20) / bytes.max(1 << 20) + 4 } else { 3 };
            let secs = ring_seconds(world, bytes / 4, reps, generation);
            let busbw = bytes as f64 / secs * 2.0 * (world as f64 - 1.0) / world as f64;
            println!(
                "{world:>6} {bytes:>10} {:>10.1}us {:>12.3} {:>9.0}%",
                secs * 1e6,
                busbw / 1e9,
                100.0 * busbw / limit
            );
        }
    }
}
