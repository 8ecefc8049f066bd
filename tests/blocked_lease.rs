//! A worker whose train loop is blocked in a collective keeps its lease:
//! heartbeats go on while the loop waits out the collective's deadline, so
//! only the peer that stopped answering leaves the job.

mod support;

use std::time::Duration;

use flotilla::proto::v1 as pb;
use support::*;

/// Coordinator lease (the test support's `--lease-ms`).
const LEASE: Duration = Duration::from_millis(1500);
/// The workers' collective deadline (`--op-timeout-s`): over 3 leases.
const OP_TIMEOUT_S: u64 = 8;

const JOB: &str = "
name: blocked
model: {kind: mlp, layers: [8, 16, 2]}
data: {kind: synthetic, seed: 2, samples: 512}
train: {steps: 100000000, global_batch: 8, seed: 1}
workers: {min: 2, max: 2}
checkpoint: {url: runs, every: 20, keep: 2}
";

/// The worker id a worker's log says it registered as.
fn registered_id(log: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains(" registered "))?;
    let id = line.split("worker=").nth(1)?.split_whitespace().next()?;
    Some(id.to_string())
}

#[test]
fn a_train_loop_blocked_in_a_collective_for_three_leases_keeps_its_worker_s_lease() {
    assert!(Duration::from_secs(OP_TIMEOUT_S) > 3 * LEASE);
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (coord, url) = coordinator(dir.path());
    let op_timeout = OP_TIMEOUT_S.to_string();
    let a = worker_with_args(dir.path(), &url, "worker-a", &["--op-timeout-s", &op_timeout]);
    let b = worker_with_args(dir.path(), &url, "worker-b", &["--op-timeout-s", &op_timeout]);
    let job = job_file(dir.path(), "job", JOB);
    let out = flotilla(dir.path(), &["submit", job.to_str().unwrap(), "--coordinator", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();

    rt.block_on(async {
        let mut c = client(&url).await;
        let s = wait_for(&mut c, &id, Duration::from_secs(120), |s| {
            s.latest_checkpoint.as_ref().is_some_and(|c| c.step >= 20) && s.world_size == 2
        })
        .await;
        let stalled_gen = s.generation;
        let a_id = registered_id(&a.log_text()).expect("worker a registered");
        let b_id = registered_id(&b.log_text()).expect("worker b registered");
        let ranks: Vec<&str> = s.ranks.iter().map(|r| r.worker_id.as_str()).collect();
        let b_rank = ranks.iter().position(|w| *w == b_id).expect("worker b has a rank");

        // b stops answering: a's train loop blocks in its next collective
        // until the collective's deadline, long after b's lease lapses and
        // the coordinator tells a to stop.
        unsafe { libc::kill(b.pid(), libc::SIGSTOP) };
        let failed = format!("waiting for rank {b_rank}");
        // The loop's failure and the agent's "stopped" come from two tasks,
        // in either order: wait for both.
        let a_log = wait_log(&a, "a's collective to name b, and its loop to stop", Duration::from_secs(120), |l| {
            l.lines().any(|line| line.contains("train loop failed") && line.contains(&failed))
                && l.contains("train loop stopped")
        });
        assert!(a_log.contains(&format!("timed out after {OP_TIMEOUT_S}s")), "{a_log}");
        assert!(a_log.contains("train loop stopped"), "{a_log}");

        // a kept its lease all along; b alone was removed.
        let coord_log = coord.log_text();
        assert!(coord_log.contains(&format!("worker={b_id}")) && coord_log.contains("lease lapsed"), "{coord_log}");
        let removed: Vec<&str> = coord_log.lines().filter(|l| l.contains("worker removed")).collect();
        assert!(removed.iter().all(|l| !l.contains(&format!("worker={a_id} "))), "{removed:?}");
        assert!(!a_log.contains("forgot this worker"), "{a_log}");
        let s = c.get_job(pb::GetJobRequest { job_id: id.clone() }).await.unwrap().into_inner();
        let later: Vec<_> = s.generations.iter().filter(|g| g.generation > stalled_gen).collect();
        assert!(!later.is_empty(), "{s:#?}");
        assert!(later.iter().all(|g| g.reason.contains(&b_id) && !g.reason.contains(&a_id)), "{s:#?}");

        // b wakes up, is told it was forgotten, registers again, and the job
        // goes on with both from its last checkpoint.
        unsafe { libc::kill(b.pid(), libc::SIGCONT) };
        let before = s.generation;
        let resumed = wait_for(&mut c, &id, Duration::from_secs(120), |s| {
            s.generation > before && is_phase(s, pb::JobPhase::Running) && s.world_size == 2 && s.step > 0
        })
        .await;
        let g = resumed.generations.iter().find(|g| g.generation == resumed.generation).unwrap();
        assert!(g.resumed_from_step >= 20, "{resumed:#?}");
        assert!(resumed.ranks.iter().any(|r| r.worker_id == a_id), "a keeps its id: {resumed:#?}");
        let step = resumed.step;
        wait_for(&mut c, &id, Duration::from_secs(60), |s| s.generation == resumed.generation && s.step > step + 20)
            .await;
    });
}
