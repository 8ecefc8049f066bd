//! Strangers at a worker's data port while a 2-worker job trains: garbage,
//! a replay of a captured handshake of the running generation, and a
//! handshake of an older generation are each refused and logged, and the
//! job ends with the same weights (digest) as an undisturbed run.

#[path = "../comm/tests/support/proxy.rs"]
mod proxy;
mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use flotilla::proto::v1 as pb;
use proxy::{replay, RecordingProxy};
use support::*;

const STEPS: u64 = 4000;

fn job() -> String {
    format!(
        "
name: guarded
model: {{kind: mlp, layers: [16, 32, 4]}}
data: {{kind: synthetic, seed: 5, samples: 1024}}
train: {{steps: {STEPS}, global_batch: 16, seed: 2}}
workers: {{min: 2, max: 2}}
checkpoint: {{url: runs, every: 0}}
"
    )
}

/// The parameters' digest rank 0 recorded beside the final model.
fn digest(run: &Path) -> String {
    let replicas: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("final/replicas.json")).unwrap()).unwrap();
    let digests = replicas["param_sha256_by_rank"].as_array().unwrap();
    assert!(digests.windows(2).all(|d| d[0] == d[1]), "replicas agree: {replicas}");
    digests[0].as_str().unwrap().to_string()
}

fn count(log: &str, what: &str) -> usize {
    log.lines().filter(|l| l.contains(what)).count()
}

#[test]
fn strangers_at_a_data_port_are_refused_and_the_job_trains_to_the_same_weights() {
    let undisturbed = tempfile::tempdir().unwrap();
    let file = job_file(undisturbed.path(), "job", &job());
    let out = flotilla(undisturbed.path(), &["run", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let expected = digest(&undisturbed.path().join("runs/guarded-1"));

    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (_coord, url) = coordinator(dir.path());
    // Peers reach worker a at 127.0.0.2, through a proxy that records what
    // they send; a itself listens on 127.0.0.1.
    let a = worker_with_args(dir.path(), &url, "worker-a", &["--op-timeout-s", "20", "--advertise-host", "127.0.0.2"]);
    let log = wait_log(&a, "worker a's data address", Duration::from_secs(60), |l| l.contains("data_addr=127.0.0.2:"));
    let port: u16 = log
        .split("data_addr=127.0.0.2:")
        .nth(1)
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let data_port: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let proxy = RecordingProxy::start(format!("127.0.0.2:{port}").parse().unwrap(), data_port);
    let mut b = worker(dir.path(), &url, "worker-b");
    let file = job_file(dir.path(), "job", &job());
    let out = flotilla(dir.path(), &["submit", file.to_str().unwrap(), "--coordinator", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();

    rt.block_on(async {
        let mut c = client(&url).await;
        wait_for(&mut c, &id, Duration::from_secs(120), |s| s.generation == 1 && s.step >= 5).await;
        let first_generation = proxy.recorded();
        assert!(!first_generation.is_empty(), "worker b's handshakes went through the proxy");

        // b dies before any checkpoint: generation 2 (a and c) starts over
        // from step 0, as the undisturbed run did.
        b.kill9();
        let _c = worker(dir.path(), &url, "worker-c");
        let s = wait_for(&mut c, &id, Duration::from_secs(120), |s| {
            // Throughput is reported only by the running generation: its ring is up.
            s.generation >= 2 && is_phase(s, pb::JobPhase::Running) && s.world_size == 2 && s.samples_per_sec > 0.0
        })
        .await;
        let g = s.generations.iter().find(|g| g.generation == s.generation).unwrap();
        assert_eq!(g.resumed_from_step, 0, "{s:#?}");
        let current: Vec<Vec<u8>> = proxy.recorded().split_off(first_generation.len());
        assert!(!current.is_empty(), "worker c's handshakes went through the proxy");

        let stranger = |bytes: &[u8]| {
            let mut s = TcpStream::connect(data_port).unwrap();
            let _ = s.write_all(bytes);
        };
        stranger(b"GET / HTTP/1.1\r\nHost: worker\r\n\r\n");
        wait_log(&a, "garbage refused", Duration::from_secs(60), |l| {
            count(l, "refused a data connection: not a flotilla handshake") >= 1
        });
        for bytes in &first_generation {
            replay(data_port, bytes);
        }
        wait_log(&a, "the older generation refused", Duration::from_secs(60), |l| {
            count(l, "refused a data connection of an older generation") >= first_generation.len()
        });
        for bytes in &current {
            replay(data_port, bytes);
        }
        let log = wait_log(&a, "the replays refused", Duration::from_secs(60), |l| {
            count(l, "did not prove the generation's secret") >= current.len()
        });
        assert!(log.lines().filter(|l| l.contains("refused a data connection")).all(|l| l.contains("WARN")), "{log}");

        let s = c.get_job(pb::GetJobRequest { job_id: id.clone() }).await.unwrap().into_inner();
        assert!(
            is_phase(&s, pb::JobPhase::Running) && s.step < STEPS,
            "the job ended before the strangers were done; make it longer: {s:#?}"
        );
        let done = wait_for(&mut c, &id, Duration::from_secs(300), |s| {
            is_phase(s, pb::JobPhase::Succeeded) || is_phase(s, pb::JobPhase::Failed)
        })
        .await;
        assert!(is_phase(&done, pb::JobPhase::Succeeded), "{done:#?}");
        assert_eq!(done.generation, s.generation, "the strangers cost the job no generation: {done:#?}");
    });
    assert_eq!(digest(&dir.path().join("runs/guarded-1")), expected, "same weights as the undisturbed run");
}
