//! Chaos with every protection on: three coordinator replicas (embedded
//! Raft) and three workers, all real processes on loopback, API tokens
//! required and every data link authenticated. At random steps, chosen
//! from a printed seed, a worker is killed with `kill -9` (and a new one
//! started in its place) or the leading replica is killed (and restarted on
//! its data directory). The job ends with weights bit-identical to an
//! undisturbed run of the same world size.
//!
//! Repeat a run with `FLOTILLA_CHAOS_SEED=<seed> cargo test --test chaos`.

mod support;

use std::time::Duration;

use flotilla::proto::v1 as pb;
use support::cluster::*;
use support::*;

const STEPS: u64 = 3000;

fn job() -> String {
    format!(
        "
name: chaos
model: {{kind: mlp, layers: [16, 64, 64, 4]}}
data: {{kind: synthetic, seed: 7, samples: 3072}}
train: {{steps: {STEPS}, global_batch: 24, micro_batch: 8, seed: 11}}
workers: {{min: 3, max: 3}}
checkpoint: {{url: runs, every: 50, keep: 100}}
"
    )
}

/// A small deterministic generator (xorshift64*), so that a seed replays.
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seed() -> u64 {
    match std::env::var("FLOTILLA_CHAOS_SEED") {
        Ok(s) => s.parse().expect("FLOTILLA_CHAOS_SEED is a number"),
        Err(_) => {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
            (t.as_nanos() as u64) ^ u64::from(std::process::id()) | 1
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    Worker(usize),
    Leader,
}

#[test]
fn workers_and_the_leader_killed_at_random_steps_change_no_weight() {
    let seed = seed();
    println!("FLOTILLA_CHAOS_SEED={seed}");
    let mut dice = Dice(seed);
    // Three worker kills and two leader kills, at distinct random steps in
    // the middle of the run.
    let mut faults: Vec<(u64, Fault)> = (0..5)
        .map(|i| {
            let at = STEPS / 10 + dice.below(STEPS / 2);
            (at, if i < 3 { Fault::Worker(dice.below(3) as usize) } else { Fault::Leader })
        })
        .collect();
    faults.sort_by_key(|f| f.0);
    println!("faults: {faults:?}");

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // The undisturbed run, same world size.
    let quiet = d.join("quiet");
    std::fs::create_dir_all(&quiet).unwrap();
    let quiet_job = job_file(&quiet, "job", &job());
    let out = flotilla(&quiet, &["run", quiet_job.to_str().unwrap(), "--workers", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let undisturbed = read_tensors(&quiet.join("runs/chaos-1/final/model.safetensors"));

    let ports = free_ports(3);
    let addrs: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
    let list = addrs.join(",");
    let mut replicas: Vec<Proc> = (1..=3).map(|id| replica(d, id, &ports)).collect();
    let mut workers: Vec<Proc> = (0..3).map(|i| worker(d, &list, &format!("worker-{i}"))).collect();
    let job_path = job_file(d, "job", &job());
    let out = flotilla(d, &["submit", job_path.to_str().unwrap(), "--coordinator", &list]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();

    let rt = runtime();
    let mut spawned = 3;
    let (mut worker_kills, mut leader_kills) = (0, 0);
    rt.block_on(async {
        for (at, fault) in &faults {
            let s = wait_job(&addrs, &id, Duration::from_secs(300), "the fault's step", |s| {
                s.step >= *at || is_phase(s, pb::JobPhase::Succeeded) || is_phase(s, pb::JobPhase::Failed)
            })
            .await;
            if !is_phase(&s, pb::JobPhase::Running) && !is_phase(&s, pb::JobPhase::Waiting) {
                println!("the job ended before the fault at step {at}");
                break;
            }
            match fault {
                Fault::Worker(i) => {
                    println!("step {}: kill -9 worker {i} (generation {})", s.step, s.generation);
                    workers[*i].kill9();
                    workers[*i] = worker(d, &list, &format!("worker-{spawned}"));
                    spawned += 1;
                    worker_kills += 1;
                    // The job resumes in a new generation with the new worker.
                    let g = s.generation;
                    wait_job(&addrs, &id, Duration::from_secs(180), "a new generation", |s| {
                        s.generation > g || is_phase(s, pb::JobPhase::Succeeded)
                    })
                    .await;
                }
                Fault::Leader => {
                    let (leader, _) = leader_client(&addrs).await;
                    let index = addrs.iter().position(|a| *a == leader).unwrap();
                    println!("step {}: kill -9 the leading replica {}", s.step, index + 1);
                    replicas[index].kill9();
                    let (next, _) = leader_client(&addrs).await;
                    assert_ne!(next, leader);
                    replicas[index] = replica(d, index + 1, &ports);
                    leader_kills += 1;
                }
            }
        }
        let done = wait_job(&addrs, &id, Duration::from_secs(600), "the job to end", |s| {
            is_phase(s, pb::JobPhase::Succeeded) || is_phase(s, pb::JobPhase::Failed)
        })
        .await;
        assert!(is_phase(&done, pb::JobPhase::Succeeded), "{done:#?}");
        println!(
            "done: {} generations, {} worker kills, {} leader kills",
            done.generations.len(),
            worker_kills,
            leader_kills
        );
        for g in &done.generations {
            println!(
                "  generation {}: {} workers, from step {}: {}",
                g.generation, g.world_size, g.resumed_from_step, g.reason
            );
        }
        assert!(done.generations.len() > worker_kills.min(1), "{done:#?}");
    });
    assert!(worker_kills + leader_kills > 0, "no fault happened before the job ended; make it longer");
    let chaotic = read_tensors(&d.join(format!("runs/{id}/final/model.safetensors")));
    assert_eq!(chaotic, undisturbed, "the final weights differ from the undisturbed run's (seed {seed})");
}
