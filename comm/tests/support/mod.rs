//! Helpers shared by the integration tests: listeners on loopback, rings built
//! in parallel, one thread per rank, and a suite every `ProcessGroup` passes.
#![allow(dead_code)]

pub mod proxy;

use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use flotilla_comm::chunk::chunk_range;
use flotilla_comm::{CommError, CommListener, F32Collectives, ProcessGroup, RingConfig, Secret, TcpRing};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// One listener per simulated worker process, on 127.0.0.1 with a free port.
pub fn listeners(world: usize) -> Vec<CommListener> {
    (0..world).map(|_| CommListener::bind("127.0.0.1:0".parse().unwrap()).expect("bind listener")).collect()
}

pub fn config(peers: &[SocketAddr], job: &str, generation: u64, rank: usize) -> RingConfig {
    RingConfig {
        job: job.to_string(),
        generation,
        rank,
        world: peers.len(),
        peers: peers.to_vec(),
        connect_timeout: CONNECT_TIMEOUT,
        op_timeout: OP_TIMEOUT,
        secret: secret(job, generation),
    }
}

/// The secret every rank of `job`'s `generation` is given in these tests.
pub fn secret(job: &str, generation: u64) -> Secret {
    let mut bytes = [0u8; 32];
    for (i, b) in job.bytes().chain(generation.to_le_bytes()).enumerate() {
        bytes[i % 32] ^= b.rotate_left(i as u32 % 8);
    }
    Secret::from_bytes(&bytes).expect("32 bytes")
}

pub fn addrs(listeners: &[CommListener]) -> Vec<SocketAddr> {
    listeners.iter().map(CommListener::local_addr).collect()
}

/// Builds one ring over `listeners`, every rank connecting from its own thread.
pub fn ring(listeners: &[CommListener], job: &str, generation: u64) -> Vec<TcpRing> {
    let peers = addrs(listeners);
    let results = thread::scope(|scope| {
        let handles: Vec<_> = listeners
            .iter()
            .enumerate()
            .map(|(rank, listener)| {
                let cfg = config(&peers, job, generation, rank);
                scope.spawn(move || TcpRing::connect(listener, cfg))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
    });
    results
        .into_iter()
        .enumerate()
        .map(|(rank, r)| r.unwrap_or_else(|e| panic!("rank {rank} could not connect: {e}")))
        .collect()
}

/// Runs `f` for every rank on its own thread and returns the results in rank order.
pub fn on_each<G, T, F>(groups: &mut [G], f: F) -> Vec<T>
where
    G: Send,
    T: Send,
    F: Fn(usize, &mut G) -> T + Sync,
{
    let f = &f;
    thread::scope(|scope| {
        let handles: Vec<_> =
            groups.iter_mut().enumerate().map(|(rank, group)| scope.spawn(move || f(rank, group))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Small integers, so that any summation order gives the exact sum.
pub fn int_value(rank: usize, i: usize) -> f32 {
    ((i * 7 + rank * 13) % 31) as f32 - 15.0
}

pub fn int_buffer(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| int_value(rank, i)).collect()
}

pub fn int_sum(world: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| (0..world).map(|r| int_value(r, i) as i64).sum::<i64>() as f32).collect()
}

/// A small deterministic generator (xorshift64*), enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A float of random sign and magnitude between 1e-3 and 1e3.
    pub fn float(&mut self) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        let exponent = (self.next_u64() % 7) as i32 - 3;
        let sign = if self.next_u64() & 1 == 0 { 1.0 } else { -1.0 };
        sign * (1.0 + unit) * 10f32.powi(exponent)
    }
}

/// The behaviour every `ProcessGroup` shares, whatever its backend: run on
/// all ranks of one group at once.
pub fn shared_suite<G: ProcessGroup>(groups: &mut [G]) {
    let world = groups.len();
    let results = on_each(groups, |rank, group| -> Result<(), CommError> {
        assert_eq!(group.rank(), rank);
        assert_eq!(group.world(), world);

        let mut buf = int_buffer(rank, 37);
        group.all_reduce_f32(&mut buf)?;
        assert_eq!(buf, int_sum(world, 37), "all_reduce on rank {rank}");

        let mine = vec![rank as u8; rank * 3];
        let all = group.all_gather_bytes(&mine)?;
        let expected: Vec<Vec<u8>> = (0..world).map(|r| vec![r as u8; r * 3]).collect();
        assert_eq!(all, expected, "all_gather on rank {rank}");

        for root in 0..world {
            let mut buf = vec![rank as f32 + 0.5; 5];
            group.broadcast_f32(&mut buf, root)?;
            assert_eq!(buf, vec![root as f32 + 0.5; 5], "broadcast from {root} on rank {rank}");
        }

        let mut buf = int_buffer(rank, 37);
        let own = group.reduce_scatter_f32(&mut buf)?;
        assert_eq!(own, chunk_range(37, world, rank), "reduce_scatter range on rank {rank}");
        assert_eq!(&buf[own.clone()], &int_sum(world, 37)[own.clone()], "reduce_scatter on rank {rank}");

        let mut buf = vec![-1.0; 37];
        buf[own.clone()].iter_mut().for_each(|v| *v = rank as f32);
        group.all_gather_f32(&mut buf)?;
        let expected: Vec<f32> =
            (0..37).map(|i| (0..world).find(|&r| chunk_range(37, world, r).contains(&i)).unwrap() as f32).collect();
        assert_eq!(buf, expected, "all_gather on rank {rank}");

        if world > 1 {
            let (next, prev) = ((rank + 1) % world, (rank + world - 1) % world);
            group.send_f32(next, &[rank as f32; 3])?;
            let mut got = [0.0; 3];
            group.recv_f32(prev, &mut got)?;
            assert_eq!(got, [prev as f32; 3], "recv on rank {rank}");
        }
        let to_self = group.send_f32(rank, &[1.0]);
        assert!(matches!(to_self, Err(CommError::Protocol { .. })), "{to_self:?}");

        group.barrier()?;
        let bad_root = group.broadcast_f32(&mut [0.0], world);
        assert!(matches!(bad_root, Err(CommError::Protocol { .. })), "{bad_root:?}");
        group.barrier()?;
        Ok(())
    });
    for (rank, result) in results.into_iter().enumerate() {
        result.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
    }
}
