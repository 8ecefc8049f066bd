//! Checkpoint saving: flotilla's asynchronous path (copy the state, then
//! encode and upload the shard in the background) on the local disk and on a
//! real S3-compatible server (s3s-fs), against `torch.save` and
//! `safetensors` of the same state from Python, measured in the same run.
//!
//! `cargo bench --bench checkpoint` saves a state of parameters plus two
//! AdamW moments (>= 256 MiB) and prints, per target, the time training is
//! blocked (the copy), the total save time and the throughput, each the
//! median of 5 rounds that alternate between the contenders. It needs
//! `./scripts/bootstrap --python --s3`. Under `cargo test` it saves a small
//! state to the local disk only.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use flotilla::trainer::checkpoint::{self, even_holding, HostArray, Layout, Snapshot};
use flotilla::trainer::engine::weights::{CopyPiece, Weights, WeightsSlot};
use flotilla::trainer::storage::Storage;
use support::*;
use tch::Tensor;

struct Measure {
    blocked_s: f64,
    total_s: f64,
    bytes: usize,
}

/// The whole state of `numel` elements, as one piece.
fn whole(numel: usize) -> Vec<CopyPiece> {
    vec![CopyPiece { params: 0..numel, moments: 0..numel, local: 0 }]
}

/// Writes rank 0's shard of `snap` (the whole state) under `url`.
fn upload(rt: &tokio::runtime::Runtime, url: &str, layout: &Layout, snap: Snapshot) -> (usize, Option<Snapshot>) {
    let snap = Arc::new(snap);
    let dir = Storage::open(url).unwrap().child(&checkpoint::step_name(snap.step));
    let (shard, up) = rt.block_on(checkpoint::write_held(&dir, layout, &snap, 0, even_holding(layout, 0, 1))).unwrap();
    assert_eq!(up.bytes as u64, shard.entry.bytes);
    (up.bytes, Arc::try_unwrap(snap).ok())
}

/// The engine's path for a checkpoint taken at once (a worker is leaving):
/// copy the state into the buffers of the previous checkpoint (training is
/// blocked for this), then write this rank's shard from them in the
/// background.
fn flotilla_save(
    rt: &tokio::runtime::Runtime,
    url: &str,
    layout: &Layout,
    state: &mut WeightsSlot,
    buffers: &mut Option<Snapshot>,
) -> Measure {
    let t0 = Instant::now();
    let c = state.copy_now(&whole(layout.total), buffers.take().unwrap_or_default(), 1, 1);
    let (bytes, back) = upload(rt, url, layout, c.snap);
    let total_s = t0.elapsed().as_secs_f64();
    *buffers = back;
    assert!(buffers.is_some(), "the upload released the snapshot");
    Measure { blocked_s: c.blocked.as_secs_f64(), total_s, bytes }
}

/// The engine's path for a periodic checkpoint: the copy runs beside the
/// next step (played by `step` of arithmetic on this thread, which takes a
/// core as forward and backward passes do), and training waits only to
/// start it and, when the step ends first, for the rest of it (the update
/// takes the weights back).
fn flotilla_save_beside_a_step(
    rt: &tokio::runtime::Runtime,
    url: &str,
    layout: &Layout,
    state: &mut WeightsSlot,
    expect: &HostArray,
    buffers: &mut Option<Snapshot>,
    step: std::time::Duration,
) -> Measure {
    state.start_copy(whole(layout.total), buffers.take().unwrap_or_default(), 1, 1);
    let busy = Instant::now();
    let mut x = 1.0f64;
    while busy.elapsed() < step {
        for _ in 0..1000 {
            x = (x * 1.000001).sin() + 1.0;
        }
    }
    std::hint::black_box(x);
    let (_, copied) = state.write();
    let c = copied.expect("a copy was running");
    assert!(c.snap.params == *expect, "the copy holds the parameters");
    let (t0, blocked) = (c.started, c.blocked);
    let (bytes, back) = upload(rt, url, layout, c.snap);
    // The save's total leaves out the step that ran beside the copy.
    let total_s = t0.elapsed().as_secs_f64() - step.as_secs_f64();
    *buffers = back;
    Measure { blocked_s: blocked.as_secs_f64(), total_s, bytes }
}

/// The median of `ms` by total save time.
fn median(mut ms: Vec<Measure>) -> Measure {
    ms.sort_by(|a, b| a.total_s.total_cmp(&b.total_s));
    ms.swap_remove(ms.len() / 2)
}

/// Runs the Python baselines once: (torch.save, safetensors).
fn python_round(py: &std::path::Path, numel: usize, dir: &std::path::Path) -> (Measure, Measure) {
    let out = Command::new(py)
        .arg(repo().join("benches/checkpoint_baseline.py"))
        .arg(numel.to_string())
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Both block training for the whole save.
    let m = |name: &str| {
        let secs = v[name].as_f64().unwrap();
        let bytes = v[&format!("{name}_bytes")].as_u64().unwrap() as usize;
        Measure { blocked_s: secs, total_s: secs, bytes }
    };
    (m("torch_save"), m("safetensors"))
}

fn row(name: &str, m: &Measure) {
    println!(
        "{name:<22} {:>10.1} MiB {:>10.1} ms {:>10.1} ms {:>8.1}% {:>9.2} GB/s",
        m.bytes as f64 / (1 << 20) as f64,
        m.blocked_s * 1e3,
        m.total_s * 1e3,
        100.0 * m.blocked_s / m.total_s,
        m.bytes as f64 / m.total_s / 1e9
    );
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    // Parameters and two moments of `numel` f32 each.
    let numel: usize = if full { 24 << 20 } else { 1 << 16 };
    let layout = Layout::new(vec![("w".into(), vec![numel / 1024, 1024])]);
    let f = |k: f32| (0..numel).map(|i| (i as f32 * k).sin()).collect::<Vec<f32>>();
    let params = f(1e-3);
    let expect = HostArray::from_f32(&params);
    let mut state = WeightsSlot::new(Weights {
        params: Tensor::from_slice(&params),
        m: Tensor::from_slice(&f(2e-3)),
        v: Tensor::from_slice(&f(3e-3)),
    });
    drop(params);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    println!(
        "{:<22} {:>14} {:>13} {:>13} {:>9} {:>14}",
        "target", "state", "blocked", "total", "blocked", "throughput"
    );
    let local_root = dir.path().join("local");
    let local_url = local_root.to_str().unwrap().to_string();
    let mut buffers = None;
    let first = flotilla_save(&rt, &format!("{local_url}/first"), &layout, &mut state, &mut buffers);
    row("flotilla, local (1st)", &first);
    if !full {
        let steady = flotilla_save(&rt, &format!("{local_url}/steady"), &layout, &mut state, &mut buffers);
        row("flotilla, local disk", &steady);
        assert!(steady.bytes >= numel * 12, "the shard holds the whole state");
        let step = std::time::Duration::from_millis(20);
        let beside = flotilla_save_beside_a_step(
            &rt,
            &format!("{local_url}/beside"),
            &layout,
            &mut state,
            &expect,
            &mut buffers,
            step,
        );
        row("  copy beside a step", &beside);
        return;
    }
    let s3 = S3Server::start(dir.path(), &["bench"]);
    for (k, v) in s3.env() {
        // SAFETY: no other thread reads the environment yet.
        unsafe { std::env::set_var(k, v) };
    }
    let py = repo().join(".deps/venv/bin/python");
    let have_py = py.exists();
    if !have_py {
        println!("baselines skipped: run ./scripts/bootstrap --python");
    }
    // Rounds alternate between the contenders, so that the machine's page
    // cache and load weigh on each alike; each row is the median round.
    const ROUNDS: usize = 5;
    let (mut local, mut remote, mut torch, mut st) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut beside = Vec::new();
    const STEP: std::time::Duration = std::time::Duration::from_millis(300);
    let mut s3_buffers = None;
    for r in 0..ROUNDS {
        local.push(flotilla_save(&rt, &format!("{local_url}/r{r}"), &layout, &mut state, &mut buffers));
        let _ = std::fs::remove_dir_all(local_root.join(format!("r{r}")));
        beside.push(flotilla_save_beside_a_step(
            &rt,
            &format!("{local_url}/b{r}"),
            &layout,
            &mut state,
            &expect,
            &mut buffers,
            STEP,
        ));
        let _ = std::fs::remove_dir_all(local_root.join(format!("b{r}")));
        remote.push(flotilla_save(&rt, &format!("s3://bench/ckpt/r{r}"), &layout, &mut state, &mut s3_buffers));
        if have_py {
            let (t, s) = python_round(&py, numel, dir.path());
            torch.push(t);
            st.push(s);
        }
    }
    let local = median(local);
    row("flotilla, local disk", &local);
    row("  copy beside a step", &median(beside));
    row("flotilla, s3s-fs", &median(remote));
    if !have_py {
        return;
    }
    for (name, m) in [("torch_save", median(torch)), ("safetensors", median(st))] {
        row(&format!("PyTorch {name}, disk"), &m);
        println!(
            "  flotilla local / {name}: {:.2}x throughput, training blocked {:.0}x less",
            (local.bytes as f64 / local.total_s) / (m.bytes as f64 / m.total_s),
            m.blocked_s / local.blocked_s
        );
    }
}
