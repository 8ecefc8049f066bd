//! Three coordinator replicas (embedded Raft) and two workers, all real
//! processes on loopback: `kill -9` of the leader mid-training costs the job
//! nothing. A new leader is elected, the workers follow it without a new
//! generation, the job finishes with every job and committed checkpoint still
//! listed, and the killed replica, restarted on its data directory, catches
//! up. Then the same job on coordinators that keep their log in a real
//! three-member etcd cluster, one member of which is killed mid-training.

#[path = "../coordinator/tests/support/etcd.rs"]
mod etcd;
mod support;

use std::time::{Duration, Instant};

use flotilla::proto::v1 as pb;
use support::cluster::*;
use support::*;

const JOB: &str = "
name: ha
model: {kind: gpt, layers: 2, d_model: 64, heads: 4, context: 64, vocab: 64}
data: {kind: synthetic, seed: 4, samples: 4096}
train:
  steps: 160
  global_batch: 32
  micro_batch: 16
  seed: 3
  optimizer: {lr: 0.002}
  schedule: {warmup_steps: 10}
workers: {min: 2, max: 2}
checkpoint: {url: runs, every: 10, keep: 100}
";

/// Two workers following the replicas in `list`, and the job submitted
/// through them; returns the workers and the job's id.
fn start_job(dir: &std::path::Path, list: &str) -> (Vec<Proc>, String) {
    let workers = vec![worker(dir, list, "worker-a"), worker(dir, list, "worker-b")];
    let job_path = job_file(dir, "job", JOB);
    let out = flotilla(dir, &["submit", job_path.to_str().unwrap(), "--coordinator", list]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (workers, String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Waits until the job has committed two checkpoints and passed step 25.
async fn past_two_checkpoints(addrs: &[String], id: &str) -> pb::JobStatus {
    wait_job(addrs, id, Duration::from_secs(90), "a committed checkpoint", |s| s.checkpoints.len() >= 2 && s.step >= 25)
        .await
}

#[test]
fn killing_the_leader_replica_costs_the_job_nothing() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(3);
    let addrs: Vec<String> = ports.iter().map(|p| format!("https://127.0.0.1:{p}")).collect();
    let list = addrs.join(",");
    let mut replicas: Vec<Option<Proc>> = (1..=3).map(|id| Some(replica(dir.path(), id, &ports))).collect();

    let (_workers, id) = start_job(dir.path(), &list);

    rt.block_on(async {
        let before = past_two_checkpoints(&addrs, &id).await;
        assert!(before.step < 160, "the job ended before the fail-over; make it longer");
        assert_eq!(before.generations.len(), 1, "{before:#?}");

        let (leader_addr, _) = leader_client(&addrs).await;
        let index = addrs.iter().position(|a| *a == leader_addr).unwrap();
        eprintln!("killing the leader, replica {} at {leader_addr}, at step {}", index + 1, before.step);
        replicas[index].as_mut().unwrap().kill9();
        let killed_at = Instant::now();

        let (new_leader, _) = leader_client(&addrs).await;
        assert_ne!(new_leader, leader_addr);
        eprintln!("new leader {new_leader} after {:.2}s", killed_at.elapsed().as_secs_f64());

        let done = wait_job(&addrs, &id, Duration::from_secs(180), "the job to end", |s| {
            matches!(pb::JobPhase::try_from(s.phase), Ok(pb::JobPhase::Succeeded | pb::JobPhase::Failed))
        })
        .await;
        assert!(is_phase(&done, pb::JobPhase::Succeeded), "{done:#?}");
        assert_eq!(done.generations.len(), 1, "a fail-over alone never starts a new generation: {done:#?}");
        let steps: Vec<u64> = done.checkpoints.iter().map(|c| c.step).collect();
        for c in &before.checkpoints {
            assert!(steps.contains(&c.step), "checkpoint {} committed before the kill is gone: {steps:?}", c.step);
        }
        let (_, mut c) = leader_client(&addrs).await;
        let jobs = c.list_jobs(pb::ListJobsRequest {}).await.unwrap().into_inner().jobs;
        assert_eq!(jobs.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>(), vec![id.as_str()]);

        // The killed replica comes back on its data directory and catches up.
        replicas[index] = Some(replica(dir.path(), index + 1, &ports));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = flotilla(dir.path(), &["coordinator", "members", "--coordinator", &list]);
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            if out.status.success() && caught_up(&text, index + 1) {
                break;
            }
            assert!(Instant::now() < deadline, "replica {} did not catch up:\n{text}", index + 1);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let model = dir.path().join(format!("runs/{id}/final/model.safetensors"));
    assert!(model.exists(), "final model at {}", model.display());
}

/// Whether `flotilla coordinator members` shows replica `id` as a voter
/// with the leader's whole log.
fn caught_up(members: &str, id: usize) -> bool {
    let commit = members
        .lines()
        .find_map(|l| l.strip_prefix("last log index:").map(|v| v.trim().parse::<u64>().unwrap_or(u64::MAX)));
    let row = members.lines().find(|l| l.split_whitespace().next() == Some(&id.to_string()));
    match (commit, row) {
        (Some(commit), Some(row)) => {
            let cols: Vec<&str> = row.split_whitespace().collect();
            cols.contains(&"voter") && cols.last().and_then(|m| m.parse::<u64>().ok()) == Some(commit)
        }
        _ => false,
    }
}

/// Starts a coordinator replica on the etcd cluster at `endpoints`.
fn etcd_replica(dir: &std::path::Path, i: usize, port: u16, endpoints: &str) -> Proc {
    let listen = format!("127.0.0.1:{port}");
    let args = [&["--listen", listen.as_str(), "--etcd", endpoints][..], &TIMINGS[..]].concat();
    spawn_coordinator(&dir.join(format!("coordinator-etcd-{i}.log")), &args).0
}

#[test]
fn the_job_finishes_when_an_etcd_member_dies() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = rt.block_on(etcd::EtcdCluster::start(3)).expect("start etcd");
    let endpoints = etcd.endpoints().join(",");
    let ports = free_ports(2);
    let addrs: Vec<String> = ports.iter().map(|p| format!("https://127.0.0.1:{p}")).collect();
    let list = addrs.join(",");
    let _replicas: Vec<Proc> = (0..2).map(|i| etcd_replica(dir.path(), i, ports[i], &endpoints)).collect();

    let (_workers, id) = start_job(dir.path(), &list);

    rt.block_on(async {
        let before = past_two_checkpoints(&addrs, &id).await;
        assert!(before.step < 160, "the job ended before the kill; make it longer");
        eprintln!("killing etcd member 1 of 3 at step {}", before.step);
        etcd.kill(0);

        let done = wait_job(&addrs, &id, Duration::from_secs(180), "the job to end", |s| {
            matches!(pb::JobPhase::try_from(s.phase), Ok(pb::JobPhase::Succeeded | pb::JobPhase::Failed))
        })
        .await;
        assert!(is_phase(&done, pb::JobPhase::Succeeded), "{done:#?}");
        let steps: Vec<u64> = done.checkpoints.iter().map(|c| c.step).collect();
        for c in &before.checkpoints {
            assert!(steps.contains(&c.step), "checkpoint {} committed before the kill is gone: {steps:?}", c.step);
        }
        assert!(steps.iter().any(|s| *s > before.step), "checkpoints were committed after the kill: {steps:?}");
    });
    let model = dir.path().join(format!("runs/{id}/final/model.safetensors"));
    assert!(model.exists(), "final model at {}", model.display());
}
