//! What encrypting the data plane would cost: the throughput of one
//! loopback stream in plain TCP and in TLS 1.3 (rustls, each of its default
//! cipher suites), and the ring all-reduce's bus bandwidth over flotilla's
//! own (HMAC-authenticated, unencrypted) links, all in the same run. A ring
//! all-reduce moves every byte through one link per hop, so a link's
//! throughput bounds its bus bandwidth: where TLS streams slower than the
//! ring runs, the ring over TLS would run at most that fast.
//!
//! `cargo bench -p flotilla-comm --bench tls_cost` (a release build).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

mod common;

use common::all_reduce_bus_gbps;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

const TOTAL: usize = 1 << 30;
const CHUNK: usize = 1 << 20;

fn main() {
    let plain = stream_gbps(None);
    println!("one loopback stream, {} MiB in {} KiB writes", TOTAL >> 20, CHUNK >> 10);
    println!("  plain TCP:                                   {plain:>6.2} GB/s");
    let provider = rustls::crypto::ring::default_provider();
    for suite in provider.cipher_suites.iter().filter(|s| s.version() == &rustls::version::TLS13) {
        let tls = stream_gbps(Some(*suite));
        println!("  TLS 1.3 {:<36} {tls:>6.2} GB/s  ({:.2} of plain)", format!("{:?}:", suite.suite()), tls / plain);
    }
    println!();
    println!("ring all_reduce bus bandwidth over flotilla's links, same run");
    for world in [2, 4] {
        let bus = all_reduce_bus_gbps(world, 64);
        println!("  world {world}, 64 MiB: {bus:>6.2} GB/s  ({:.2} of the plain stream)", bus / plain);
    }
}

/// A self-signed certificate for `localhost` and its key.
fn certificate() -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.signing_key.serialize_der()));
    (c.cert.der().clone(), key)
}

/// GB/s of `TOTAL` bytes through one loopback stream: plain TCP, or TLS 1.3
/// with `suite` only.
fn stream_gbps(suite: Option<rustls::SupportedCipherSuite>) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let configs = suite.map(|suite| {
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = vec![suite];
        let provider = Arc::new(provider);
        let (cert, key) = certificate();
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    });
    let server_cfg = configs.as_ref().map(|c| c.0.clone());
    let reader = thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        let mut s: Box<dyn Read> = match server_cfg {
            Some(cfg) => Box::new(rustls::StreamOwned::new(rustls::ServerConnection::new(cfg).unwrap(), tcp)),
            None => Box::new(tcp),
        };
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0;
        while got < TOTAL {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "the stream ended early");
            got += n;
        }
    });
    let tcp = TcpStream::connect(addr).unwrap();
    let mut s: Box<dyn Write> = match configs {
        Some((_, client)) => {
            let name = ServerName::try_from("localhost").unwrap();
            let mut s = rustls::StreamOwned::new(rustls::ClientConnection::new(client, name).unwrap(), tcp);
            // The handshake, before the clock starts.
            s.write_all(&[]).unwrap();
            while s.conn.is_handshaking() {
                s.conn.complete_io(&mut s.sock).unwrap();
            }
            Box::new(s)
        }
        None => Box::new(tcp),
    };
    let chunk = vec![7u8; CHUNK];
    let started = Instant::now();
    for _ in 0..TOTAL / CHUNK {
        s.write_all(&chunk).unwrap();
    }
    s.flush().unwrap();
    reader.join().unwrap();
    TOTAL as f64 / started.elapsed().as_secs_f64() / 1e9
}
