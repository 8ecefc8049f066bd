//! `flotilla slurm render` on a real one-node Slurm cluster on loopback:
//! `sbatch` of the rendered script trains a 2-worker job to completion, and
//! `scancel --signal=USR1` of a running job commits a checkpoint before the
//! workers end.

mod support;

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use flotilla::proto::v1 as pb;
use support::slurm::SlurmCluster;
use support::*;

/// One cluster at a time: each test's cluster owns every job process it leaves.
static ONE_CLUSTER: Mutex<()> = Mutex::new(());

fn render(dir: &Path, job: &Path, port: u16) -> std::path::PathBuf {
    let out = flotilla(
        dir,
        &[
            "slurm",
            "render",
            job.to_str().unwrap(),
            "--coordinator-host",
            "127.0.0.1",
            "--coordinator-port",
            &port.to_string(),
            "--preemption-grace-s",
            "30",
        ],
    );
    assert!(out.status.success(), "slurm render: {}", String::from_utf8_lossy(&out.stderr));
    let script = dir.join("job.sbatch");
    std::fs::write(&script, &out.stdout).unwrap();
    script
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn output_of(dir: &Path, name: &str, slurm_job: &str) -> String {
    std::fs::read_to_string(dir.join(format!("flotilla-flotilla-{name}-{slurm_job}.out"))).unwrap_or_default()
}

#[test]
fn sbatch_of_the_rendered_script_trains_a_two_worker_job() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let cluster = SlurmCluster::start(dir.path());
    let job = job_file(
        dir.path(),
        "job",
        "name: tiny\nmodel: {kind: mlp, layers: [16, 32, 4]}\ndata: {kind: synthetic, seed: 1, samples: 1024}\n\
         train: {steps: 40, global_batch: 32}\nworkers: {min: 2, max: 2}\ncheckpoint: {url: runs, every: 20}\n",
    );
    let script = render(dir.path(), &job, free_port());
    let id = cluster.sbatch(dir.path(), &script);
    cluster.wait_gone(&id, Duration::from_secs(180));
    let out = output_of(dir.path(), "tiny", &id);
    let show = cluster.show_job(&id);
    assert!(show.contains("JobState=COMPLETED") && show.contains("ExitCode=0:0"), "{show}\n{out}");
    assert!(out.contains("flotilla: workers finished (exit 0)"), "{out}");
    // Two tasks, one job: both found the same one, and each ran the rank it asked for.
    assert_eq!(out.matches("job submitted (or found submitted) job=tiny-1").count(), 2, "{out}");
    assert!(!out.contains("tiny-2"), "a second job was created: {out}");
    for task in 0..2 {
        let prefix = format!("{task}: ");
        let lines: Vec<&str> = out.lines().filter(|l| l.trim_start().starts_with(&prefix)).collect();
        assert!(lines.iter().any(|l| l.contains(&format!("rank_hint={task} from=\"SLURM_PROCID\""))), "{out}");
        assert!(
            lines.iter().any(|l| l.contains(&format!("starting train loop job=tiny-1 gen=1 rank={task} world=2"))),
            "task {task} did not get rank {task}: {out}"
        );
        assert!(lines.iter().any(|l| l.contains("job succeeded; worker done")), "{out}");
    }
    let run = dir.path().join("runs/tiny-1");
    assert!(run.join("final/model.safetensors").exists(), "{out}");
    assert!(run.join("step-00000020/manifest.json").exists(), "{out}");
    // The coordinator's log, kept per Slurm job, has the job succeeded on 2 workers.
    let (_restarted, url) = restart_coordinator(dir.path(), &id);
    runtime().block_on(async {
        let mut c = client(&url).await;
        let s = c.get_job(pb::GetJobRequest { job_id: "tiny-1".into() }).await.unwrap().into_inner();
        assert!(is_phase(&s, pb::JobPhase::Succeeded), "{s:#?}");
        assert_eq!((s.step, s.generations.len(), s.generations[0].world_size), (40, 1, 2), "{s:#?}");
    });
}

/// A coordinator on the log that the batch script's coordinator kept.
fn restart_coordinator(dir: &Path, slurm_job: &str) -> (Proc, String) {
    let data = dir.join(format!("flotilla-coordinator/{slurm_job}/data"));
    assert!(data.exists(), "{} is missing", data.display());
    spawn_coordinator(&dir.join("restarted.log"), &["--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()])
}

#[test]
fn scancel_usr1_commits_a_checkpoint_before_the_workers_end() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let cluster = SlurmCluster::start(dir.path());
    let job = job_file(
        dir.path(),
        "job",
        "name: long\nmodel: {kind: mlp, layers: [16, 32, 4]}\ndata: {kind: synthetic, seed: 1, samples: 1024}\n\
         train: {steps: 100000000, global_batch: 32}\nworkers: {min: 2, max: 2}\ncheckpoint: {url: runs, every: 0}\n",
    );
    let port = free_port();
    let script = render(dir.path(), &job, port);
    let id = cluster.sbatch(dir.path(), &script);
    let url = format!("http://127.0.0.1:{port}");
    let before = runtime().block_on(async {
        let mut c = client_when_up(&url, &cluster, &id, dir.path()).await;
        // The workers submit the job once they are up.
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while c.get_job(pb::GetJobRequest { job_id: "long-1".into() }).await.is_err() {
            assert!(std::time::Instant::now() < deadline, "never submitted: {}", output_of(dir.path(), "long", &id));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        wait_for(&mut c, "long-1", Duration::from_secs(120), |s| s.step >= 20 && s.world_size == 2).await.step
    });
    let out = cluster.cmd("scancel", &["--signal=USR1", &id]);
    assert!(out.status.success(), "scancel: {}", String::from_utf8_lossy(&out.stderr));
    cluster.wait_gone(&id, Duration::from_secs(60));

    let out = output_of(dir.path(), "long", &id);
    // Both workers took USR1 as a preemption notice, waited for the checkpoint,
    // were released by the coordinator, and left with the preempted code.
    assert_eq!(out.matches("preemption notice source=\"signal\"").count(), 2, "{out}");
    let written = out.find("checkpoint written job=long-1").unwrap_or_else(|| panic!("no checkpoint: {out}"));
    for task in 0..2 {
        let left = out
            .lines()
            .position(|l| {
                l.trim_start().starts_with(&format!("{task}: ")) && l.contains("left the job on a preemption notice")
            })
            .unwrap_or_else(|| panic!("task {task} did not leave on the notice: {out}"));
        let left_at: usize = out.lines().take(left).map(|l| l.len() + 1).sum();
        assert!(written < left_at, "task {task} left before the checkpoint was written: {out}");
    }
    assert!(out.contains("Exited with exit code 75"), "{out}");
    assert!(out.contains("flotilla: workers finished (exit 75)"), "{out}");

    // The coordinator's log (kept per Slurm job) has the checkpoint committed
    // at the step of the notice: a coordinator restarted on it says so.
    let (mut restarted, url) = restart_coordinator(dir.path(), &id);
    runtime().block_on(async {
        let mut c = client(&url).await;
        let s = wait_for(&mut c, "long-1", Duration::from_secs(20), |s| s.latest_checkpoint.is_some()).await;
        let ckpt = s.latest_checkpoint.clone().unwrap();
        assert!(ckpt.step >= before, "checkpoint at {} taken before the notice at {before}", ckpt.step);
        assert!(is_phase(&s, pb::JobPhase::Waiting), "{s:#?}");
        assert!(s.generations.last().unwrap().reason.contains("preempted"), "{s:#?}");
        let folder = dir.path().join(format!("runs/long-1/step-{:08}", ckpt.step));
        assert!(folder.join("manifest.json").exists(), "{} has no manifest", folder.display());
    });
    restarted.kill9();
}

/// A client of the coordinator the batch script starts, once it is up.
async fn client_when_up(
    url: &str,
    cluster: &SlurmCluster,
    job: &str,
    dir: &Path,
) -> flotilla::proto::v1::job_service_client::JobServiceClient<flotilla::proto::auth::AuthChannel> {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(c) = support::channel(url).await.map(flotilla::proto::v1::job_service_client::JobServiceClient::new) {
            return c;
        }
        assert!(
            std::time::Instant::now() < deadline && cluster.in_queue(job),
            "the batch script's coordinator never came up: {}\n{}",
            cluster.show_job(job),
            output_of(dir, "long", job)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
