//! What the comm benches share: a ring's configuration and its all-reduce
//! bus bandwidth.
#![allow(dead_code)]

use std::thread;
use std::time::{Duration, Instant};

use flotilla_comm::{CommListener, F32Collectives, ProcessGroup, RingConfig, Secret, TcpRing};

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub fn config(peers: &[std::net::SocketAddr], generation: u64, rank: usize, secret: &Secret) -> RingConfig {
    RingConfig {
        job: "bench".into(),
        generation,
        rank,
        world: peers.len(),
        peers: peers.to_vec(),
        connect_timeout: Duration::from_secs(10),
        op_timeout: Duration::from_secs(120),
        secret: secret.clone(),
    }
}

/// Bus bandwidth (2 (w-1)/w of the buffer per rank per second) of an f32
/// all-reduce of `mib` MiB on a ring of `world` ranks, median of 5.
pub fn all_reduce_bus_gbps(world: usize, mib: usize) -> f64 {
    let listeners: Vec<CommListener> =
        (0..world).map(|_| CommListener::bind("127.0.0.1:0".parse().unwrap()).unwrap()).collect();
    let peers: Vec<_> = listeners.iter().map(CommListener::local_addr).collect();
    let secret = Secret::random().unwrap();
    let len = mib * (1 << 20) / 4;
    let times: Vec<Duration> = thread::scope(|scope| {
        let handles: Vec<_> = listeners
            .iter()
            .enumerate()
            .map(|(rank, l)| {
                let cfg = config(&peers, 1, rank, &secret);
                scope.spawn(move || {
                    let mut ring = TcpRing::connect(l, cfg).unwrap();
                    let mut buf = vec![1.0f32; len];
                    ring.all_reduce_f32(&mut buf).unwrap(); // warm-up
                    (0..5)
                        .map(|_| {
                            ring.barrier().unwrap();
                            let started = Instant::now();
                            ring.all_reduce_f32(&mut buf).unwrap();
                            started.elapsed()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| median(h.join().unwrap())).collect()
    });
    let slowest = times.into_iter().max().unwrap();
    let bytes = (len * 4) as f64 * 2.0 * (world - 1) as f64 / world as f64;
    bytes / slowest.as_secs_f64() / 1e9
}
