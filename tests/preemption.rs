//! Preemption notices: a fake cloud metadata server on loopback (AWS IMDSv2
//! and GCE), SIGTERM and a Slurm-style signal. On notice, a checkpoint at the
//! current step is committed before the worker leaves, no step is redone, and
//! the job finishes on the remaining worker with the parameters of an
//! uninterrupted run.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla::proto::v1 as pb;
use support::*;

const JOB: &str = "
name: spot
model: {kind: gpt, layers: 2, d_model: 64, heads: 4, context: 64, vocab: 64}
data: {kind: synthetic, seed: 4, samples: 4096}
train:
  steps: 200
  global_batch: 32
  micro_batch: 16
  seed: 3
  optimizer: {lr: 0.002}
  schedule: {warmup_steps: 10}
workers: {min: 1, max: 2}
checkpoint: {url: runs, every: 0}
";

/// Answers like the AWS and GCE metadata services; `preempt` flips them.
fn metadata_server(preempt: Arc<AtomicBool>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut head = Vec::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push(line.trim_end().to_string());
            }
            let first = head.first().cloned().unwrap_or_default();
            let header = |name: &str| {
                head.iter().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                })
            };
            let on = preempt.load(Ordering::SeqCst);
            let (status, body) = match first.split_whitespace().take(2).collect::<Vec<_>>()[..] {
                ["PUT", "/latest/api/token"] if header("X-aws-ec2-metadata-token-ttl-seconds").is_some() => {
                    (200, "token-123".to_string())
                }
                ["GET", "/latest/meta-data/spot/instance-action"] => match header("X-aws-ec2-metadata-token") {
                    Some(t) if t == "token-123" && on => {
                        (200, r#"{"action": "terminate", "time": "2026-11-22T17:00:00Z"}"#.to_string())
                    }
                    Some(t) if t == "token-123" => (404, String::new()),
                    _ => (401, String::new()),
                },
                ["GET", "/computeMetadata/v1/instance/preempted"]
                    if header("Metadata-Flavor").as_deref() == Some("Google") =>
                {
                    (200, if on { "TRUE" } else { "FALSE" }.to_string())
                }
                _ => (400, String::new()),
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

enum Notice {
    Aws,
    Gce,
    Sigterm,
    Usr1,
}

fn preempt_one_worker(notice: Notice, expected: &std::collections::BTreeMap<String, Vec<f32>>) {
    let dir = tempfile::tempdir().unwrap();
    let preempt = Arc::new(AtomicBool::new(false));
    let metadata = metadata_server(preempt.clone());
    let (_coord, url) = coordinator(dir.path());
    let extra: Vec<String> = match notice {
        Notice::Aws => vec!["--aws-metadata-url".into(), metadata.clone(), "--metadata-poll-ms".into(), "50".into()],
        Notice::Gce => vec!["--gce-metadata-url".into(), metadata.clone(), "--metadata-poll-ms".into(), "50".into()],
        Notice::Sigterm => vec![],
        Notice::Usr1 => vec!["--preemption-signal".into(), "USR1".into()],
    };
    let log = dir.path().join("spot-worker.log");
    let mut spot = with_token(&mut std::process::Command::new(bin()))
        .args(["worker", "--coordinator", &url, "--data-addr", "127.0.0.1:0"])
        .args(&extra)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _steady = worker(dir.path(), &url, "steady");
    let job = job_file(dir.path(), "job", JOB);
    let out = flotilla(dir.path(), &["submit", job.to_str().unwrap(), "--coordinator", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    runtime().block_on(async {
        let mut c = client(&url).await;
        let s = wait_for(&mut c, "spot-1", Duration::from_secs(60), |s| s.step >= 30 && s.world_size == 2).await;
        assert!(s.step < 150, "too late to preempt: {}", s.step);
        match notice {
            Notice::Aws | Notice::Gce => preempt.store(true, Ordering::SeqCst),
            Notice::Sigterm => unsafe {
                libc::kill(spot.id() as i32, libc::SIGTERM);
            },
            Notice::Usr1 => unsafe {
                libc::kill(spot.id() as i32, libc::SIGUSR1);
            },
        }
        // The preempted worker leaves by itself once its checkpoint is committed.
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(st) = spot.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "the preempted worker did not leave");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(status.success(), "{status}: {}", std::fs::read_to_string(&log).unwrap());
        let done =
            wait_for(&mut c, "spot-1", Duration::from_secs(120), |s| s.phase != pb::JobPhase::Running as i32).await;
        assert!(is_phase(&done, pb::JobPhase::Succeeded), "{done:#?}");
        let g2 = &done.generations[1];
        assert_eq!(g2.world_size, 1, "{done:#?}");
        assert!(g2.reason.contains("preempted"), "{done:#?}");
        let at = g2.resumed_from_step;
        assert!(at >= 30, "checkpoint at the notice's step, got {at}");
        // No step is redone: generation 1 stopped at the checkpoint, generation 2 went on from it.
        let points =
            c.get_metrics(pb::GetMetricsRequest { job_id: "spot-1".into() }).await.unwrap().into_inner().points;
        let last_g1 = points.iter().filter(|p| p.generation == 1).map(|p| p.step).max().unwrap();
        let first_g2 = points.iter().filter(|p| p.generation == 2).map(|p| p.step).min().unwrap();
        assert_eq!((last_g1, first_g2), (at, at + 1), "steps redone after the preemption checkpoint");
    });
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("preemption notice"), "{log_text}");
    let got = read_tensors(&dir.path().join("runs/spot-1/final/model.safetensors"));
    assert_params_close(&got, expected, 1e-5);
}

#[test]
fn preemption_notices_checkpoint_the_current_step_and_lose_nothing() {
    let reference = tempfile::tempdir().unwrap();
    let job = job_file(reference.path(), "job", JOB);
    let out = flotilla(reference.path(), &["run", job.to_str().unwrap(), "--workers", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let expected = read_tensors(&reference.path().join("runs/spot-1/final/model.safetensors"));
    for notice in [Notice::Aws, Notice::Gce, Notice::Sigterm, Notice::Usr1] {
        preempt_one_worker(notice, &expected);
    }
}
