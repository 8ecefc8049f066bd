//! flotilla's TCP process group against `torch.distributed` on gloo and
//! against the loopback TCP limit, all measured in the same run.
//!
//! `cargo bench --bench collectives` prints, for all_reduce, reduce_scatter,
//! all_gather and broadcast with 2 and 4 ranks (threads here, processes for
//! gloo) and buffers of 1 KiB to 256 MiB, the bus bandwidth of each (nccl-tests
//! convention: busbw = algbw * 2(n-1)/n for all_reduce, (n-1)/n for
//! reduce_scatter and all_gather, 1 for broadcast), their ratio, and
//! flotilla's share of one loopback TCP stream (the physical limit).
//!
//! Gloo runs through `benches/gloo_collectives.py` with `$FLOTILLA_PYTHON`,
//! else `.deps/venv/bin/python`; without a Python that imports torch, gloo is
//! skipped. `FLOTILLA_BENCH_MIN_BYTES` / `FLOTILLA_BENCH_MAX_BYTES` bound the
//! sizes, `FLOTILLA_BENCH_OPS` and `FLOTILLA_BENCH_WORLDS` (comma-separated)
//! pick ops and rank counts. Under `cargo test` (no `--bench` argument) it runs
//! a smoke round: two small sizes, 2 ranks, a few repetitions, no Python.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flotilla::comm::{CommListener, F32Collectives, ProcessGroup, RingConfig, TcpRing};

const OPS: [&str; 4] = ["all_reduce", "reduce_scatter", "all_gather", "broadcast"];
/// Bytes each measurement aims to move: reps = budget / size, within bounds.
const BUDGET_BYTES: usize = 256 << 20;

fn reps_for(bytes: usize, full: bool) -> usize {
    if full {
        (BUDGET_BYTES / bytes.max(1)).clamp(3, 200)
    } else {
        3
    }
}

/// A comma-separated list from the environment, if set.
fn env_list(name: &str) -> Option<Vec<String>> {
    std::env::var(name).ok().map(|v| v.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect())
}

/// busbw / algbw for `op` over `world` ranks.
fn bus_factor(op: &str, world: usize) -> f64 {
    let n = world as f64;
    match op {
        "all_reduce" => 2.0 * (n - 1.0) / n,
        "reduce_scatter" | "all_gather" => (n - 1.0) / n,
        _ => 1.0,
    }
}

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

/// Bytes per second of each stream when `world` loopback streams run at
/// once, stream `i` from thread `i` to thread `i + 1`: the traffic of a ring
/// of `world` ranks, so the limit of one rank's link at that concurrency
/// (on a machine with fewer cores than streams, they share the cores).
fn ring_limit(world: usize, bytes: usize) -> f64 {
    let listeners: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let barrier = std::sync::Barrier::new(2 * world);
    let t0 = std::sync::Mutex::new(None::<Instant>);
    std::thread::scope(|s| {
        for (i, l) in listeners.iter().enumerate() {
            let (barrier, t0) = (&barrier, &t0);
            // Readers and writers start together, once every stream is up.
            s.spawn(move || {
                let (mut r, _) = l.accept().unwrap();
                let mut buf = vec![0u8; 1 << 20];
                if barrier.wait().is_leader() {
                    *t0.lock().unwrap() = Some(Instant::now());
                }
                let mut got = 0;
                while got < bytes {
                    let n = r.read(&mut buf).unwrap();
                    assert!(n > 0);
                    got += n;
                }
            });
            let to = addrs[(i + 1) % world];
            s.spawn(move || {
                let mut w = TcpStream::connect(to).unwrap();
                w.set_nodelay(true).unwrap();
                let chunk = vec![1u8; 1 << 20];
                if barrier.wait().is_leader() {
                    *t0.lock().unwrap() = Some(Instant::now());
                }
                let mut sent = 0;
                while sent < bytes {
                    let n = chunk.len().min(bytes - sent);
                    w.write_all(&chunk[..n]).unwrap();
                    sent += n;
                }
            });
        }
    });
    let started = t0.lock().unwrap().expect("the streams started");
    bytes as f64 / started.elapsed().as_secs_f64()
}

fn run_op(ring: &mut TcpRing, op: &str, buf: &mut [f32]) {
    match op {
        "all_reduce" => ring.all_reduce_f32(buf).unwrap(),
        "reduce_scatter" => drop(ring.reduce_scatter_f32(buf).unwrap()),
        "all_gather" => ring.all_gather_f32(buf).unwrap(),
        "broadcast" => ring.broadcast_f32(buf, 0).unwrap(),
        other => panic!("unknown op {other}"),
    }
}

/// Mean seconds per call of every (op, size) on the slowest of `world` ranks,
/// each rank a thread with its own listener, as a worker process would have.
fn flotilla_seconds(
    world: usize,
    ops: &[&'static str],
    sizes: &[usize],
    full: bool,
) -> HashMap<(&'static str, usize), f64> {
    let listeners: Vec<CommListener> =
        (0..world).map(|_| CommListener::bind("127.0.0.1:0".parse().unwrap()).unwrap()).collect();
    let peers: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr()).collect();
    let secret = flotilla_comm::Secret::random().unwrap();
    let per_rank: Vec<Vec<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .iter()
            .enumerate()
            .map(|(rank, l)| {
                let (peers, secret) = (peers.clone(), secret.clone());
                s.spawn(move || {
                    let cfg = RingConfig {
                        job: "bench".into(),
                        generation: 1,
                        rank,
                        world,
                        peers,
                        connect_timeout: Duration::from_secs(10),
                        op_timeout: Duration::from_secs(120),
                        secret,
                    };
                    let mut ring = TcpRing::connect(l, cfg).unwrap();
                    let mut times = Vec::new();
                    for &op in ops {
                        for &bytes in sizes {
                            let mut buf = vec![1.0f32; bytes / 4];
                            run_op(&mut ring, op, &mut buf); // warm-up
                            let reps = reps_for(bytes, full);
                            ring.barrier().unwrap();
                            let t0 = Instant::now();
                            for _ in 0..reps {
                                run_op(&mut ring, op, &mut buf);
                            }
                            times.push(t0.elapsed().as_secs_f64() / reps as f64);
                        }
                    }
                    times
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut out = HashMap::new();
    let mut i = 0;
    for &op in ops {
        for &bytes in sizes {
            out.insert((op, bytes), per_rank.iter().map(|t| t[i]).fold(0.0, f64::max));
            i += 1;
        }
    }
    out
}

/// The interpreter for the gloo baseline, if one is there.
fn python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FLOTILLA_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".deps/venv/bin/python");
    venv.exists().then_some(venv)
}

/// Runs the gloo script for `world` ranks; seconds per (op, size), or why not.
fn gloo_seconds(
    python: &PathBuf,
    world: usize,
    ops: &[&str],
    sizes: &[usize],
) -> Result<HashMap<(String, usize), f64>, String> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/gloo_collectives.py");
    let sizes_arg: Vec<String> = sizes.iter().map(|s| s.to_string()).collect();
    let mut child = Command::new(python)
        .arg(&script)
        .args(["--world", &world.to_string(), "--sizes", &sizes_arg.join(","), "--ops", &ops.join(",")])
        .args(["--budget-bytes", &BUDGET_BYTES.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("could not start {}: {e}", python.display()))?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err("gloo script ran past 10 minutes".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child.stdout.take().unwrap().read_to_string(&mut stdout).map_err(|e| e.to_string())?;
    child.stderr.take().unwrap().read_to_string(&mut stderr).map_err(|e| e.to_string())?;
    if !status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
        return Err(format!(
            "gloo script failed ({status}): {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ));
    }
    let line = stdout.lines().rev().find(|l| l.starts_with('{')).ok_or("gloo script printed no JSON")?;
    let json: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let mut out = HashMap::new();
    for r in json["results"].as_array().ok_or("no results in gloo JSON")? {
        if let (Some(op), Some(bytes), Some(secs)) = (r["op"].as_str(), r["bytes"].as_u64(), r["seconds"].as_f64()) {
            out.insert((op.to_string(), bytes as usize), secs);
        }
    }
    Ok(out)
}

fn human(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

fn time(secs: f64) -> String {
    if secs < 1e-3 {
        format!("{:.1} us", secs * 1e6)
    } else {
        format!("{:.2} ms", secs * 1e3)
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let bound = |name: &str, default: usize| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let (min, max) = (bound("FLOTILLA_BENCH_MIN_BYTES", 0), bound("FLOTILLA_BENCH_MAX_BYTES", usize::MAX));
    let (sizes, worlds): (Vec<usize>, Vec<usize>) = if full {
        let worlds = env_list("FLOTILLA_BENCH_WORLDS")
            .map(|w| w.iter().map(|n| n.parse().expect("FLOTILLA_BENCH_WORLDS holds numbers")).collect())
            .unwrap_or_else(|| vec![2, 4]);
        ((0..=9).map(|i| 1024usize << (2 * i)).filter(|&b| (min..=max).contains(&b)).collect(), worlds)
    } else {
        (vec![1 << 10, 256 << 10], vec![2])
    };
    let ops: Vec<&'static str> = match env_list("FLOTILLA_BENCH_OPS") {
        Some(names) => OPS.iter().copied().filter(|op| names.iter().any(|n| n == op)).collect(),
        None => OPS.to_vec(),
    };
    let started = Instant::now();
    let limit = loopback_limit(if full { 1 << 30 } else { 16 << 20 });
    println!("loopback TCP stream (the limit): {:.2} GB/s", limit / 1e9);
    let python = if full { python() } else { None };
    match (&python, full) {
        (Some(p), _) => println!("gloo baseline: {} benches/gloo_collectives.py", p.display()),
        (None, true) => {
            println!("gloo skipped: no Python with torch (set FLOTILLA_PYTHON or run scripts/bootstrap --python)")
        }
        (None, false) => println!("smoke round: gloo skipped"),
    }
    let ring_limits: std::collections::BTreeMap<usize, f64> =
        worlds.iter().map(|&w| (w, ring_limit(w, if full { 256 << 20 } else { 16 << 20 }))).collect();
    for (w, l) in &ring_limits {
        println!("{w} loopback streams at once, as in a ring of {w} ranks: {:.2} GB/s each", l / 1e9);
    }
    println!(
        "{:<15} {:>5} {:>8} | {:>10} {:>10} | {:>10} {:>10} | {:>6} {:>9} {:>9}",
        "op", "ranks", "size", "flotilla", "busbw GB/s", "gloo", "busbw GB/s", "ratio", "of limit", "of ring"
    );
    for &world in &worlds {
        let ours = flotilla_seconds(world, &ops, &sizes, full);
        let gloo = match &python {
            Some(p) => gloo_seconds(p, world, &ops, &sizes).unwrap_or_else(|why| {
                println!("gloo skipped for {world} ranks: {why}");
                HashMap::new()
            }),
            None => HashMap::new(),
        };
        for &op in &ops {
            for &bytes in &sizes {
                let secs = ours[&(op, bytes)];
                let busbw = bytes as f64 / secs * bus_factor(op, world);
                let (gloo_time, gloo_bw, ratio) = match gloo.get(&(op.to_string(), bytes)) {
                    Some(&g) => {
                        let gbw = bytes as f64 / g * bus_factor(op, world);
                        (time(g), format!("{:.3}", gbw / 1e9), format!("{:.2}x", busbw / gbw))
                    }
                    None => ("-".into(), "-".into(), "-".into()),
                };
                println!(
                    "{op:<15} {world:>5} {:>8} | {:>10} {:>10.3} | {:>10} {:>10} | {:>6} {:>8.0}% {:>8.0}%",
                    human(bytes),
                    time(secs),
                    busbw / 1e9,
                    gloo_time,
                    gloo_bw,
                    ratio,
                    100.0 * busbw / limit,
                    100.0 * busbw / ring_limits[&world]
                );
            }
        }
    }
    println!("total {:.0} s", started.elapsed().as_secs_f64());
}
