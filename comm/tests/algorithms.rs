//! Every collective through both algorithms (the pipelined ring and direct
//! exchange) at every world size and at awkward lengths, bit-identity across
//! ranks, and `send`/`recv` between any two ranks, over real loopback rings.

mod support;

use flotilla_comm::chunk::chunk_range;
use flotilla_comm::{Algorithm, F32Collectives, TcpRing, DIRECT_MAX_BYTES};
use support::*;

const ALGORITHMS: [Algorithm; 3] = [Algorithm::Ring, Algorithm::Direct, Algorithm::Auto];

/// Runs every chunked collective on one length and checks the results exactly.
fn check_every_op(ring: &mut TcpRing, rank: usize, world: usize, len: usize, what: &str) {
    let mut buf = int_buffer(rank, len);
    ring.all_reduce_f32(&mut buf).unwrap_or_else(|e| panic!("{what}: all_reduce: {e}"));
    assert!(buf == int_sum(world, len), "{what}: all_reduce");

    let mut buf = int_buffer(rank, len);
    let own = ring.reduce_scatter_f32(&mut buf).unwrap_or_else(|e| panic!("{what}: reduce_scatter: {e}"));
    assert_eq!(own, chunk_range(len, world, rank), "{what}: reduce_scatter range");
    assert!(buf[own.clone()] == int_sum(world, len)[own.clone()], "{what}: reduce_scatter");

    // every rank fills its own chunk; the rest is garbage before the gather
    let mut buf = vec![f32::NAN; len];
    for i in own.clone() {
        buf[i] = int_value(rank, i);
    }
    ring.all_gather_f32(&mut buf).unwrap_or_else(|e| panic!("{what}: all_gather: {e}"));
    for r in 0..world {
        for i in chunk_range(len, world, r) {
            assert_eq!(buf[i], int_value(r, i), "{what}: all_gather element {i} from rank {r}");
        }
    }

    let root = len % world;
    let mut buf = int_buffer(rank, len);
    ring.broadcast_f32(&mut buf, root).unwrap_or_else(|e| panic!("{what}: broadcast: {e}"));
    assert!(buf == int_buffer(root, len), "{what}: broadcast from {root}");
}

#[test]
fn every_op_is_exact_for_every_world_length_and_algorithm() {
    for world in 1..=5 {
        let listeners = listeners(world);
        let mut rings = ring(&listeners, "exact", 1);
        // empty, one element, fewer than the ranks, odd, around the automatic
        // threshold, and several pipeline pieces per chunk
        let lengths = [0, 1, world - 1, world + 1, 7, 1001, DIRECT_MAX_BYTES / 4 + 1, 300_007];
        on_each(&mut rings, |rank, ring| {
            for algorithm in ALGORITHMS {
                ring.set_algorithm(algorithm);
                for len in lengths {
                    check_every_op(
                        ring,
                        rank,
                        world,
                        len,
                        &format!("world {world} {algorithm:?} len {len} rank {rank}"),
                    );
                }
            }
        });
    }
}

#[test]
fn both_algorithms_are_bit_identical_across_ranks() {
    for world in [2, 3, 5] {
        let listeners = listeners(world);
        let mut rings = ring(&listeners, "bits", 1);
        let len = 200_003;
        let inputs: Vec<Vec<f32>> = (0..world)
            .map(|rank| {
                let mut rng = Rng::new(rank as u64 + 11);
                (0..len).map(|_| rng.float()).collect()
            })
            .collect();
        for algorithm in [Algorithm::Ring, Algorithm::Direct] {
            let outputs = on_each(&mut rings, |rank, ring| {
                ring.set_algorithm(algorithm);
                let mut buf = inputs[rank].clone();
                ring.all_reduce_f32(&mut buf).unwrap();
                // reduce_scatter then all_gather is an all-reduce too
                let mut halves = inputs[rank].clone();
                ring.reduce_scatter_f32(&mut halves).unwrap();
                ring.all_gather_f32(&mut halves).unwrap();
                (buf, halves)
            });
            for (rank, (all, halves)) in outputs.iter().enumerate() {
                for i in 0..len {
                    assert_eq!(
                        all[i].to_bits(),
                        outputs[0].0[i].to_bits(),
                        "world {world} {algorithm:?}: rank {rank} at {i}"
                    );
                    assert_eq!(
                        halves[i].to_bits(),
                        outputs[0].1[i].to_bits(),
                        "world {world} {algorithm:?}: rank {rank} at {i}"
                    );
                }
            }
            for i in (0..len).step_by(991) {
                let exact: f64 = inputs.iter().map(|v| v[i] as f64).sum();
                let scale: f64 = inputs.iter().map(|v| (v[i] as f64).abs()).sum();
                assert!((outputs[0].0[i] as f64 - exact).abs() <= scale * 1e-6, "element {i}");
            }
        }
    }
}

#[test]
fn send_and_recv_connect_any_two_ranks() {
    let world = 4;
    let listeners = listeners(world);
    let mut rings = ring(&listeners, "p2p", 1);
    let message = |from: usize, to: usize, k: usize, len: usize| -> Vec<f32> {
        (0..len).map(|i| (from * 1000 + to * 100 + k) as f32 + i as f32).collect()
    };
    // non-neighbours in both directions, small and larger than socket buffers
    let pairs = [(0, 2), (2, 0), (3, 1), (1, 3), (0, 3)];
    let lengths = [0, 1, 5, 600_001];
    on_each(&mut rings, |rank, ring| {
        for (k, &len) in lengths.iter().enumerate() {
            for &(from, to) in &pairs {
                if rank == from {
                    ring.send_f32(to, &message(from, to, k, len)).unwrap();
                } else if rank == to {
                    let mut got = vec![0.0; len];
                    ring.recv_f32(from, &mut got).unwrap();
                    assert!(got == message(from, to, k, len), "{from} -> {to} message {k}");
                }
            }
        }
        // collectives still work beside the direct links, and do not count them
        let mut buf = int_buffer(rank, 1000);
        ring.all_reduce_f32(&mut buf).unwrap();
        assert_eq!(buf, int_sum(world, 1000));
    });
}

#[test]
fn a_length_mismatch_in_send_and_recv_is_a_protocol_error() {
    let listeners = listeners(3);
    let mut rings = ring(&listeners, "p2p-mismatch", 1);
    let results = on_each(&mut rings, |rank, ring| match rank {
        0 => ring.send_f32(2, &[1.0; 4]),
        2 => ring.recv_f32(0, &mut [0.0; 5]),
        _ => Ok(()),
    });
    let err = results[2].as_ref().unwrap_err();
    assert!(matches!(err, flotilla_comm::CommError::Protocol { rank: 0, .. }), "{err}");
}

/// bf16 buffers through every collective and both algorithms: small integers
/// are exact in bf16 (and their sums here too), so the results are checked
/// exactly; values and lengths are those of the f32 check.
#[test]
fn bf16_buffers_go_through_every_op_and_algorithm() {
    use flotilla_comm::{bf16_from_f32, f32_from_bf16, Buf, ProcessGroup};
    let bf16 = |v: &[f32]| v.iter().map(|x| bf16_from_f32(*x)).collect::<Vec<u16>>();
    let back = |v: &[u16]| v.iter().map(|x| f32_from_bf16(*x)).collect::<Vec<f32>>();
    for world in [2, 3] {
        let listeners = listeners(world);
        let mut rings = ring(&listeners, "bf16", 1);
        on_each(&mut rings, |rank, ring| {
            for algorithm in ALGORITHMS {
                ring.set_algorithm(algorithm);
                for len in [1, 7, 1001, DIRECT_MAX_BYTES / 2 + 3, 200_003] {
                    let what = format!("world {world} {algorithm:?} len {len} rank {rank}");
                    let mut bits = bf16(&int_buffer(rank, len));
                    ring.all_reduce_sum(&mut Buf::bf16(&mut bits)).unwrap();
                    assert!(back(&bits) == int_sum(world, len), "{what}: all_reduce");

                    let mut bits = bf16(&int_buffer(rank, len));
                    let own = ring.reduce_scatter_sum(&mut Buf::bf16(&mut bits)).unwrap();
                    assert!(back(&bits[own.clone()]) == int_sum(world, len)[own.clone()], "{what}: reduce_scatter");

                    let mut bits = vec![0u16; len];
                    for i in own.clone() {
                        bits[i] = bf16_from_f32(int_value(rank, i));
                    }
                    ring.all_gather(&mut Buf::bf16(&mut bits)).unwrap();
                    let want: Vec<f32> = (0..len)
                        .map(|i| int_value((0..world).find(|r| chunk_range(len, world, *r).contains(&i)).unwrap(), i))
                        .collect();
                    assert!(back(&bits) == want, "{what}: all_gather");

                    let mut bits = bf16(&int_buffer(rank, len));
                    ring.broadcast(&mut Buf::bf16(&mut bits), 1).unwrap();
                    assert!(back(&bits) == int_buffer(1, len), "{what}: broadcast");
                }
            }
            // Point to point, each rank to the next, in bf16.
            let next = (rank + 1) % world;
            let prev = (rank + world - 1) % world;
            let mut mine = bf16(&int_buffer(rank, 513));
            ring.send(next, &Buf::bf16(&mut mine)).unwrap();
            let mut got = vec![0u16; 513];
            ring.recv(prev, &mut Buf::bf16(&mut got)).unwrap();
            assert!(back(&got) == int_buffer(prev, 513), "rank {rank}: recv from {prev}");
        });
    }
}

/// A buffer in device memory is refused by the TCP ring before anything is
/// sent, and the ring stays usable.
#[test]
fn the_tcp_ring_refuses_device_memory_and_stays_usable() {
    use flotilla_comm::{Buf, CommError, DType, Memory, ProcessGroup};
    let listeners = listeners(2);
    let mut rings = ring(&listeners, "device", 1);
    on_each(&mut rings, |rank, ring| {
        // SAFETY: the ring refuses CUDA memory before reading it.
        let mut device = unsafe {
            Buf::from_raw(std::ptr::NonNull::<f32>::dangling().as_ptr().cast(), 4, DType::F32, Memory::Cuda(0))
        };
        let e = ring.all_reduce_sum(&mut device).unwrap_err();
        assert!(matches!(e, CommError::Unsupported(_)), "rank {rank}: {e}");
        let mut buf = int_buffer(rank, 10);
        ring.all_reduce_f32(&mut buf).unwrap();
        assert!(buf == int_sum(2, 10));
    });
}
