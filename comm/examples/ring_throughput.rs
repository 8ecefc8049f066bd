//! Throughput sanity check: `world` ranks as threads in one process, joined by
//! a TCP ring over loopback, all-reducing a buffer a few times.
//!
//! cargo run --release --example ring_throughput -- [world=2] [mib=64] [iters=5]
//!
//! Loopback numbers say nothing about a real network; they show that the ring
//! streams large buffers without stalls. Bus bandwidth is the usual
//! `2 (world - 1) / world` times the algorithm bandwidth.

use std::env;
use std::thread;
use std::time::{Duration, Instant};

use flotilla_comm::{CommListener, F32Collectives, ProcessGroup, RingConfig, Secret, TcpRing};

fn main() {
    let arg = |i: usize, default: usize| {
        env::args().nth(i).map(|a| a.parse().expect("arguments are numbers")).unwrap_or(default)
    };
    let (world, mib, iters) = (arg(1, 2), arg(2, 64), arg(3, 5));
    let len = mib * 1024 * 1024 / 4;
    let listeners: Vec<CommListener> =
        (0..world).map(|_| CommListener::bind("127.0.0.1:0".parse().unwrap()).unwrap()).collect();
    let peers: Vec<_> = listeners.iter().map(CommListener::local_addr).collect();
    let secret = Secret::random().expect("a random secret");

    let times: Vec<Vec<Duration>> = thread::scope(|scope| {
        let handles: Vec<_> = listeners
            .iter()
            .enumerate()
            .map(|(rank, listener)| {
                let cfg = RingConfig {
                    job: "throughput".into(),
                    generation: 1,
                    rank,
                    world,
                    peers: peers.clone(),
                    connect_timeout: Duration::from_secs(10),
                    op_timeout: Duration::from_secs(120),
                    secret: secret.clone(),
                };
                scope.spawn(move || {
                    let mut ring = TcpRing::connect(listener, cfg).expect("connect");
                    let mut buf = vec![1.0f32; len];
                    let mut times = Vec::new();
                    for _ in 0..iters {
                        ring.barrier().expect("barrier");
                        let started = Instant::now();
                        ring.all_reduce_f32(&mut buf).expect("all_reduce");
                        times.push(started.elapsed());
                    }
                    // the values doubled `world`-fold each round
                    let expected = (world as f32).powi(iters as i32);
                    assert!(buf.iter().all(|&v| v == expected), "wrong sum on rank {rank}");
                    times
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let bytes = (len * 4) as f64;
    for i in 0..iters {
        let slowest = times.iter().map(|t| t[i]).max().unwrap();
        let algbw = bytes / slowest.as_secs_f64() / 1e9;
        let busbw = algbw * 2.0 * (world as f64 - 1.0) / world as f64;
        println!(
            "world {world} {mib} MiB all_reduce #{i}: {:>8.1} ms  algbw {algbw:.2} GB/s  busbw {busbw:.2} GB/s",
            slowest.as_secs_f64() * 1e3
        );
    }
}
