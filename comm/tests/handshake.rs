//! The data-link handshake under attack: garbage, a peer with another
//! secret, a replay of a captured handshake, a straggler of an older
//! generation. Each is refused at the door and counted, and a correct ring
//! still forms and computes the right sums beside it.

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use flotilla_comm::{CommError, CommListener, F32Collectives, Secret, TcpRing};
use support::proxy::{replay, RecordingProxy};
use support::*;

/// Builds the ring of `job` generation 1 over `listeners` whose rank `r` is
/// reached at `peers[r]`, checks one all-reduce, and returns the rings.
fn ring_via(listeners: &[CommListener], peers: &[std::net::SocketAddr], job: &str) -> Vec<TcpRing> {
    let mut rings = std::thread::scope(|scope| {
        let handles: Vec<_> = listeners
            .iter()
            .enumerate()
            .map(|(rank, l)| scope.spawn(move || TcpRing::connect(l, config(peers, job, 1, rank)).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
    });
    assert_sums(&mut rings);
    rings
}

fn assert_sums(rings: &mut [TcpRing]) {
    let world = rings.len();
    let sums = on_each(rings, |rank, ring| {
        let mut buf = int_buffer(rank, 1000);
        ring.all_reduce_f32(&mut buf).map(|()| buf)
    });
    for sum in sums {
        assert_eq!(sum.unwrap(), int_sum(world, 1000));
    }
}

#[test]
fn garbage_is_refused_and_the_ring_forms() {
    let listeners = listeners(2);
    for l in &listeners {
        let mut s = TcpStream::connect(l.local_addr()).unwrap();
        s.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not a handshake").unwrap();
    }
    let mut rings = ring(&listeners, "garbage", 1);
    assert_sums(&mut rings);
    // The door counts each refusal once the bytes are read.
    let deadline = Instant::now() + Duration::from_secs(10);
    while listeners.iter().any(|l| l.refused() < 1) {
        assert!(Instant::now() < deadline, "garbage was not refused");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_rank_with_another_secret_is_refused_while_the_real_ring_forms() {
    let listeners = listeners(3);
    let (real, stranger) = (&listeners[..2], &listeners[2]);
    let peers = addrs(real);
    std::thread::scope(|scope| {
        // Claims rank 0 of the same job and generation, without the secret.
        let impostor = scope.spawn(|| {
            let mut cfg = config(&[stranger.local_addr(), peers[1]], "secret", 1, 0);
            cfg.secret = Secret::random().unwrap();
            cfg.connect_timeout = Duration::from_secs(2);
            TcpRing::connect(stranger, cfg)
        });
        let mut rings = ring_via(real, &peers, "secret");
        let refused = impostor.join().unwrap();
        assert!(matches!(refused, Err(CommError::Setup(_))), "{:?}", refused.map(|_| ()));
        assert_sums(&mut rings);
    });
    assert!(listeners[1].refused() >= 1, "the impostor's connection was refused");
}

#[test]
fn a_replayed_handshake_is_refused_and_the_ring_goes_on() {
    let listeners = listeners(2);
    // Rank 0 reaches rank 1 through a proxy that records what it sends.
    let proxy = RecordingProxy::start("127.0.0.1:0".parse().unwrap(), listeners[1].local_addr());
    let peers = vec![listeners[0].local_addr(), proxy.addr];
    let mut rings = ring_via(&listeners, &peers, "replay");
    let captured = proxy.recorded();
    assert!(!captured.is_empty(), "the proxy saw rank 0's handshake");

    let before = listeners[1].refused();
    for bytes in &captured {
        replay(listeners[1].local_addr(), bytes);
    }
    assert_eq!(listeners[1].refused(), before + captured.len() as u64, "every replay refused");
    assert_sums(&mut rings);
}

#[test]
fn a_straggler_of_an_older_generation_is_refused_while_the_new_ring_forms() {
    let listeners = listeners(3);
    let (real, straggler) = (&listeners[..2], &listeners[2]);
    let peers = addrs(real);
    let mut rings = std::thread::scope(|scope| {
        let handles: Vec<_> = real
            .iter()
            .enumerate()
            .map(|(rank, l)| {
                let peers = &peers;
                scope.spawn(move || TcpRing::connect(l, config(peers, "older", 2, rank)).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
    });
    // Generation 1's rank 0, with generation 1's secret, dials rank 1.
    let mut cfg = config(&[straggler.local_addr(), peers[1]], "older", 1, 0);
    cfg.connect_timeout = Duration::from_secs(2);
    let refused = TcpRing::connect(straggler, cfg);
    match refused {
        Err(CommError::Setup(message)) => assert!(message.contains("generation 2 already exists"), "{message}"),
        other => panic!("expected a stale refusal, got {:?}", other.map(|_| ())),
    }
    assert!(listeners[1].refused() >= 1);
    assert_sums(&mut rings);
}
