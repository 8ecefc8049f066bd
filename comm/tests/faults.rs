//! Rings that go wrong: silent ranks, ranks that hang up, stragglers from an
//! old generation, peers that never come up. Every failure names a rank.

mod support;

use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use flotilla_comm::{Algorithm, CommError, CommListener, F32Collectives, ProcessGroup, TcpRing};
use support::*;

/// Every rank but `silent` runs `op` with a short op timeout; `silent` keeps
/// its ring open but never calls. Returns what the others got.
fn with_a_silent_rank<F>(world: usize, silent: usize, op: F) -> Vec<Option<Result<(), CommError>>>
where
    F: Fn(&mut TcpRing) -> Result<(), CommError> + Sync,
{
    let listeners = listeners(world);
    let mut rings = ring(&listeners, "silent", 1);
    let done = Barrier::new(world);
    on_each(&mut rings, |rank, ring| {
        let result = (rank != silent).then(|| {
            ring.set_op_timeout(Duration::from_millis(300));
            let started = Instant::now();
            let result = op(ring);
            assert!(started.elapsed() < Duration::from_secs(3), "rank {rank} took {:?}", started.elapsed());
            result
        });
        done.wait(); // the silent rank keeps its ring open until the others are done
        result
    })
}

fn all_reduce_with_a_silent_rank(world: usize, silent: usize, len: usize) -> Vec<Option<Result<(), CommError>>> {
    with_a_silent_rank(world, silent, |ring| ring.all_reduce_f32(&mut vec![1.0; len]))
}

fn assert_timeout_naming(results: &[Option<Result<(), CommError>>], silent: usize, op_name: &str) {
    for (rank, result) in results.iter().enumerate() {
        if let Some(result) = result {
            match result {
                Err(CommError::Timeout { rank: culprit, op, .. }) => {
                    assert_eq!(*culprit, silent, "rank {rank} blamed the wrong rank");
                    assert_eq!(*op, op_name);
                }
                other => panic!("rank {rank}: expected a timeout naming {silent}, got {other:?}"),
            }
        }
    }
}

#[test]
fn a_silent_rank_is_named_by_its_neighbour() {
    assert_timeout_naming(&all_reduce_with_a_silent_rank(2, 1, 1000), 1, "all_reduce");
}

#[test]
fn a_silent_rank_is_named_by_every_other_rank() {
    assert_timeout_naming(&all_reduce_with_a_silent_rank(3, 2, 1000), 2, "all_reduce");
    // chunks large enough to be sent from a helper thread
    assert_timeout_naming(&all_reduce_with_a_silent_rank(4, 1, 200_000), 1, "all_reduce");
    let gather = with_a_silent_rank(5, 0, |ring| ring.all_gather_bytes(b"hi").map(drop));
    assert_timeout_naming(&gather, 0, "all_gather_bytes");
}

#[test]
fn a_silent_broadcast_root_is_named_along_the_chain() {
    let results = with_a_silent_rank(4, 2, |ring| ring.broadcast_f32(&mut vec![0.0; 1000], 2));
    assert_timeout_naming(&results, 2, "broadcast");
}

#[test]
fn a_rank_that_hangs_up_mid_way_is_named() {
    let world = 3;
    let listeners = listeners(world);
    let mut rings: Vec<Option<TcpRing>> = ring(&listeners, "hangup", 1).into_iter().map(Some).collect();
    let results = on_each(&mut rings, |rank, slot| {
        let ring = slot.as_mut().unwrap();
        ring.all_reduce_f32(&mut int_buffer(rank, 100)).unwrap();
        if rank == 1 {
            thread::sleep(Duration::from_millis(100));
            *slot = None; // the process goes away in the middle of the others' all_reduce
            return None;
        }
        let started = Instant::now();
        let result = ring.all_reduce_f32(&mut vec![1.0; 4_000_000]);
        assert!(started.elapsed() < Duration::from_secs(5), "failed by closing, not by timeout");
        Some(result)
    });
    for (rank, result) in results.iter().enumerate() {
        if let Some(result) = result {
            let err = result.as_ref().expect_err("rank 1 is gone");
            assert!(matches!(err, CommError::PeerClosed { .. } | CommError::Io { .. }), "rank {rank}: {err}");
            assert_eq!(err.peer(), Some(1), "rank {rank}: {err}");
        }
    }
}

#[test]
fn a_new_generation_reuses_the_listeners_and_shuts_out_the_old_one() {
    let world = 3;
    let listeners = listeners(world);
    let mut gen1 = ring(&listeners, "replan", 1);
    on_each(&mut gen1, |rank, ring| ring.all_reduce_f32(&mut int_buffer(rank, 10)).unwrap());

    // re-plan: the same processes build generation 2 while generation 1 still exists
    let mut gen2 = ring(&listeners, "replan", 2);
    let sums = on_each(&mut gen2, |rank, ring| {
        let mut buf = int_buffer(rank, 10);
        ring.all_reduce_f32(&mut buf).unwrap();
        buf
    });
    assert!(sums.iter().all(|s| s == &int_sum(world, 10)));
    drop(gen1);

    // a straggler process still on generation 1 is refused by its peer at once
    let straggler = CommListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut peers = addrs(&listeners);
    peers[0] = straggler.local_addr();
    let started = Instant::now();
    let refused = TcpRing::connect(&straggler, config(&peers, "replan", 1, 0));
    match refused {
        Err(CommError::Setup(message)) => {
            assert!(message.contains("refused generation 1"), "{message}")
        }
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("a generation-1 straggler joined after generation 2"),
    }
    assert!(started.elapsed() < Duration::from_secs(2), "refused, not timed out");

    // and a process cannot go back to generation 1 on its own listener either
    let back = TcpRing::connect(&listeners[1], config(&addrs(&listeners), "replan", 1, 1));
    assert!(matches!(back, Err(CommError::Setup(m)) if m.contains("older")));

    // generation 2 is unharmed
    on_each(&mut gen2, |_, ring| ring.barrier().unwrap());
}

#[test]
fn a_peer_that_never_comes_up_fails_setup_in_time() {
    let listeners = listeners(2);
    let mut cfg = config(&addrs(&listeners), "lonely", 1, 0);
    cfg.connect_timeout = Duration::from_millis(300);
    let started = Instant::now();
    // rank 1's listener accepts, but rank 1 never begins the ring: its
    // listener cannot challenge without the ring's secret, so the dial
    // itself does not complete
    let result = TcpRing::connect(&listeners[0], cfg.clone());
    assert!(
        matches!(&result, Err(CommError::Setup(m)) if m.contains("could not connect to rank 1")),
        "{:?}",
        result.err()
    );
    assert!(started.elapsed() < Duration::from_secs(2));

    // nobody listening at all
    let gone = listeners.into_iter().nth(1).unwrap().local_addr();
    let listener = CommListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    cfg.peers = vec![listener.local_addr(), gone];
    cfg.generation = 2;
    let started = Instant::now();
    let result = TcpRing::connect(&listener, cfg);
    assert!(
        matches!(&result, Err(CommError::Setup(m)) if m.contains("could not connect to rank 1")),
        "{:?}",
        result.err()
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// A worker that stops a rank gives up on the rings that rank was building:
/// with a peer that is gone (the dial) or one that never dials back (the
/// claim), the build fails as stopped long before its connect timeout.
#[test]
fn abandoning_a_generation_ends_the_rings_being_built_for_it() {
    // Nobody at rank 1's address: the dial retries until abandoned.
    let gone = CommListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let gone_addr = gone.local_addr();
    drop(gone);
    let listener = CommListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut cfg = config(&[listener.local_addr(), gone_addr], "left#dp0", 4, 0);
    cfg.connect_timeout = Duration::from_secs(3600);
    let result = thread::scope(|s| {
        let building = s.spawn(|| TcpRing::connect(&listener, cfg.clone()));
        thread::sleep(Duration::from_millis(100));
        // The job's id, as the coordinator knows it: its groups go too.
        listener.abandon("left", 4);
        building.join().unwrap()
    });
    assert!(
        matches!(&result, Err(CommError::Setup(m)) if m.contains("was stopped on this worker")),
        "{:?}",
        result.err()
    );
    assert!(listener.is_abandoned("left", 3) && listener.is_abandoned("left#pp", 4));
    assert!(!listener.is_abandoned("left", 5) && !listener.is_abandoned("other", 4), "newer and other jobs go on");

    // Rank 1 is up and lets itself be dialed, but never dials rank 0: the
    // claim waits until abandoned.
    let listeners = listeners(2);
    let mut cfg = config(&addrs(&listeners), "quiet", 1, 0);
    cfg.connect_timeout = Duration::from_secs(3600);
    let result = thread::scope(|s| {
        let peer_cfg = config(&addrs(&listeners), "quiet", 1, 1);
        // Rank 1 begins the generation so that its listener accepts rank 0's
        // dial, then is abandoned too before it dials back.
        let rank1 = s.spawn(|| {
            let mut peer_cfg = peer_cfg;
            peer_cfg.connect_timeout = Duration::from_secs(3600);
            peer_cfg.peers[0] = gone_addr;
            TcpRing::connect(&listeners[1], peer_cfg)
        });
        let building = s.spawn(|| TcpRing::connect(&listeners[0], cfg.clone()));
        thread::sleep(Duration::from_millis(200));
        listeners[0].abandon("quiet", 1);
        listeners[1].abandon("quiet", 1);
        (building.join().unwrap(), rank1.join().unwrap())
    });
    for r in [result.0.err(), result.1.err()] {
        assert!(matches!(&r, Some(CommError::Setup(m)) if m.contains("was stopped on this worker")), "{r:?}");
    }
}

#[test]
fn bad_configs_are_refused() {
    let listener = CommListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let peers = vec![listener.local_addr(); 2];
    let mut cfg = config(&peers, "bad", 1, 2);
    assert!(matches!(TcpRing::connect(&listener, cfg.clone()), Err(CommError::Setup(m)) if m.contains("rank 2")));
    cfg.rank = 0;
    cfg.world = 3;
    assert!(
        matches!(TcpRing::connect(&listener, cfg.clone()), Err(CommError::Setup(m)) if m.contains("peer addresses"))
    );
    cfg.world = 0;
    cfg.peers.clear();
    assert!(TcpRing::connect(&listener, cfg).is_err());
}

#[test]
fn a_world_of_one_needs_no_peers_to_talk_to() {
    let listener = CommListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut ring = TcpRing::connect(&listener, config(&[listener.local_addr()], "solo", 1, 0)).unwrap();
    let mut buf = [1.5f32, -2.0];
    ring.all_reduce_f32(&mut buf).unwrap();
    assert_eq!(buf, [1.5, -2.0]);
    assert_eq!(ring.all_gather_bytes(b"me").unwrap(), vec![b"me".to_vec()]);
}

#[test]
fn a_silent_rank_is_named_in_every_new_op_by_both_algorithms() {
    for algorithm in [Algorithm::Ring, Algorithm::Direct] {
        let results = with_a_silent_rank(4, 2, |ring| {
            ring.set_algorithm(algorithm);
            ring.reduce_scatter_f32(&mut vec![1.0; 100_000]).map(drop)
        });
        assert_timeout_naming(&results, 2, "reduce_scatter");
        let results = with_a_silent_rank(3, 0, |ring| {
            ring.set_algorithm(algorithm);
            ring.all_gather_f32(&mut vec![1.0; 1000])
        });
        assert_timeout_naming(&results, 0, "all_gather");
    }
    let results = with_a_silent_rank(3, 1, |ring| {
        ring.set_algorithm(Algorithm::Direct);
        ring.all_reduce_f32(&mut vec![1.0; 50_000])
    });
    assert_timeout_naming(&results, 1, "all_reduce");
    let results = with_a_silent_rank(4, 3, |ring| {
        ring.set_algorithm(Algorithm::Direct);
        ring.broadcast_f32(&mut [1.0; 10], 3)
    });
    assert_timeout_naming(&results, 3, "broadcast");
}

#[test]
fn recv_from_a_silent_rank_names_it() {
    // ranks 0 and 1 wait for a message that rank 2 (above and below them)
    // never sends; rank 3 waits for rank 0, which does not send either
    let results = with_a_silent_rank(3, 2, |ring| ring.recv_f32(2, &mut [0.0; 10]));
    assert_timeout_naming(&results, 2, "send/recv");
    let results = with_a_silent_rank(2, 0, |ring| ring.recv_f32(0, &mut vec![0.0; 100_000]));
    assert_timeout_naming(&results, 0, "send/recv");
}

#[test]
fn a_straggler_of_an_older_generation_cannot_open_direct_links() {
    let world = 3;
    let listeners = listeners(world);
    let mut gen1 = ring(&listeners, "direct-replan", 1);
    let mut gen2 = ring(&listeners, "direct-replan", 2);
    // generation 1 has no direct links yet, and its peers now refuse it
    let started = Instant::now();
    let err = gen1[0].send_f32(2, &[1.0]).unwrap_err();
    assert!(matches!(&err, CommError::Setup(m) if m.contains("refused generation 1")), "{err}");
    gen1[1].set_algorithm(Algorithm::Direct);
    let err = gen1[1].all_reduce_f32(&mut [1.0; 4]).unwrap_err();
    assert!(matches!(&err, CommError::Setup(m) if m.contains("refused generation 1")), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2), "refused, not timed out");
    // generation 2 opens its direct links and is unharmed
    on_each(&mut gen2, |rank, ring| {
        ring.set_algorithm(Algorithm::Direct);
        let mut buf = int_buffer(rank, 10);
        ring.all_reduce_f32(&mut buf).unwrap();
        assert_eq!(buf, int_sum(world, 10));
        if rank == 0 {
            ring.send_f32(2, &[5.0]).unwrap();
        } else if rank == 2 {
            let mut got = [0.0];
            ring.recv_f32(0, &mut got).unwrap();
            assert_eq!(got, [5.0]);
        }
    });
}
