//! Collectives on real rings over loopback: results, bit-identity across
//! ranks, sequencing, and mismatches between ranks.

mod support;

use std::time::{Duration, Instant};

use flotilla_comm::{CommError, F32Collectives, ProcessGroup, SingleProcess, TcpRing};
use support::*;

#[test]
fn all_reduce_sums_exactly_for_every_world_and_length() {
    for world in 1..=5 {
        let listeners = listeners(world);
        let mut rings = ring(&listeners, "sums", 1);
        let lengths = [0, 1, 2, 3, world - 1, world + 1, 1000, 100_003];
        on_each(&mut rings, |rank, ring| {
            for len in lengths {
                let mut buf = int_buffer(rank, len);
                ring.all_reduce_f32(&mut buf).unwrap_or_else(|e| panic!("world {world} len {len} rank {rank}: {e}"));
                assert!(buf == int_sum(world, len), "world {world} len {len} rank {rank}");
            }
        });
    }
}

#[test]
fn all_reduce_is_bit_identical_across_ranks() {
    for world in [2, 3, 5] {
        let listeners = listeners(world);
        let mut rings = ring(&listeners, "bits", 7);
        let len = 300_007;
        let inputs: Vec<Vec<f32>> = (0..world)
            .map(|rank| {
                let mut rng = Rng::new(rank as u64 + 1);
                (0..len).map(|_| rng.float()).collect()
            })
            .collect();
        let outputs = on_each(&mut rings, |rank, ring| {
            let mut buf = inputs[rank].clone();
            ring.all_reduce_f32(&mut buf).unwrap();
            buf
        });
        for (rank, out) in outputs.iter().enumerate() {
            for i in 0..len {
                assert_eq!(
                    out[i].to_bits(),
                    outputs[0][i].to_bits(),
                    "world {world}: rank {rank} differs from rank 0 at {i}"
                );
            }
        }
        // and the sum is right up to rounding
        for i in (0..len).step_by(997) {
            let exact: f64 = inputs.iter().map(|v| v[i] as f64).sum();
            let scale: f64 = inputs.iter().map(|v| (v[i] as f64).abs()).sum();
            assert!((outputs[0][i] as f64 - exact).abs() <= scale * 1e-6, "element {i}");
        }
    }
}

#[test]
fn every_group_passes_the_shared_suite() {
    shared_suite(&mut [SingleProcess::new(4)]);
    assert_eq!(SingleProcess::new(4).generation(), 4);
    for world in 1..=4 {
        let listeners = listeners(world);
        let mut rings = ring(&listeners, "suite", 2);
        assert!(rings.iter().all(|r| r.generation() == 2));
        shared_suite(&mut rings);
    }
}

#[test]
fn all_gather_and_broadcast_carry_large_and_empty_payloads() {
    let world = 3;
    let listeners = listeners(world);
    let mut rings = ring(&listeners, "large", 1);
    on_each(&mut rings, |rank, ring| {
        // lengths 0, 1 MiB + 1, 5 bytes: empty and larger than one socket write
        let sizes = [0, (1 << 20) + 1, 5];
        let mine: Vec<u8> = (0..sizes[rank]).map(|i| (i % 251) as u8 ^ rank as u8).collect();
        let all = ring.all_gather_bytes(&mine).unwrap();
        for (r, got) in all.iter().enumerate() {
            let want: Vec<u8> = (0..sizes[r]).map(|i| (i % 251) as u8 ^ r as u8).collect();
            assert!(got == &want, "rank {rank} got a wrong message from {r}");
        }
        for root in 0..world {
            let len = 600_001; // several broadcast pieces
            let mut buf: Vec<f32> = (0..len).map(|i| (i + rank) as f32).collect();
            ring.broadcast_f32(&mut buf, root).unwrap();
            assert!(buf.iter().enumerate().all(|(i, &v)| v == (i + root) as f32));
        }
        let mut empty: [f32; 0] = [];
        ring.broadcast_f32(&mut empty, 1).unwrap();
        ring.all_reduce_f32(&mut empty).unwrap();
    });
}

#[test]
fn many_collectives_in_a_row_stay_in_step() {
    let world = 4;
    let listeners = listeners(world);
    let mut rings = ring(&listeners, "sequence", 1);
    on_each(&mut rings, |rank, ring| {
        for round in 0..50 {
            let len = round * 13 % 40;
            let mut buf = int_buffer(rank + round, len);
            ring.all_reduce_f32(&mut buf).unwrap();
            let expected: Vec<f32> = (0..len).map(|i| (0..world).map(|r| int_value(r + round, i)).sum()).collect();
            assert_eq!(buf, expected);
            if round % 5 == 0 {
                ring.barrier().unwrap();
            }
            let all = ring.all_gather_bytes(&[round as u8, rank as u8]).unwrap();
            assert!(all.iter().enumerate().all(|(r, m)| m == &[round as u8, r as u8]));
            let mut b = [rank as f32; 3];
            ring.broadcast_f32(&mut b, round % world).unwrap();
            assert_eq!(b, [(round % world) as f32; 3]);
        }
    });
}

#[test]
fn length_mismatch_is_a_protocol_error() {
    let world = 3;
    let listeners = listeners(world);
    let mut rings = ring(&listeners, "mismatch", 1);
    let results = on_each(&mut rings, |rank, ring| {
        let mut buf = vec![1.0f32; if rank == 1 { 11 } else { 10 }];
        let first = ring.all_reduce_f32(&mut buf);
        // the ring is broken now: the next call fails at once
        let started = Instant::now();
        let again = ring.barrier();
        assert!(again.is_err() && started.elapsed() < Duration::from_secs(1));
        first
    });
    for (rank, result) in results.iter().enumerate() {
        assert!(matches!(result, Err(CommError::Protocol { .. })), "rank {rank}: {result:?}");
    }
    // rank 2 reads what rank 1 sends and sees the other length
    assert_eq!(results[2].as_ref().unwrap_err().peer(), Some(1));
}

#[test]
fn different_ops_on_different_ranks_is_a_protocol_error() {
    let world = 2;
    let listeners = listeners(world);
    let mut rings = ring(&listeners, "order", 1);
    let results = on_each(
        &mut rings,
        |rank, ring: &mut TcpRing| {
            if rank == 0 {
                ring.barrier()
            } else {
                ring.all_gather_bytes(b"x").map(drop)
            }
        },
    );
    for (rank, result) in results.iter().enumerate() {
        let err = result.as_ref().expect_err("ops differ");
        assert!(matches!(err, CommError::Protocol { .. }), "rank {rank}: {err}");
        assert_eq!(err.peer(), Some(1 - rank), "rank {rank}: {err}");
    }
}
