//! NCCL on real GPUs (built only with `--features cuda`; run it where GPUs
//! are lent: `cargo test -p flotilla-trainer --features cuda --test nccl`).
//! One rank per visible GPU; the unique id goes through a real coordinator's
//! rendezvous board.
#![cfg(feature = "cuda")]

use std::time::Duration;

use flotilla_coordinator::CoordinatorConfig;
use flotilla_proto::v1 as pb;
use flotilla_proto::v1::job_service_client::JobServiceClient;
use flotilla_proto::v1::worker_service_client::WorkerServiceClient;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use flotilla_trainer::nccl::{check_collectives, Members, NcclGroup};
use flotilla_trainer::rendezvous::Rendezvous;
use tokio_util::sync::CancellationToken;

#[test]
fn every_collective_on_every_gpu_matches_the_cpu() {
    let gpus = tch::Cuda::device_count() as usize;
    assert!(gpus >= 1, "the cuda feature is on but libtorch sees no GPU (is libtorch_cuda linked?)");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let shutdown = CancellationToken::new();
    let (server, generation, job, (client, worker)) = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server =
            flotilla_coordinator::serve(listener, CoordinatorConfig::default(), shutdown.clone()).await.unwrap();
        let url = format!("http://{}", server.addr);
        let mut jobs = JobServiceClient::connect(url.clone()).await.unwrap();
        let channel = tonic::transport::Channel::from_shared(url).unwrap().connect().await.unwrap();
        let mut w = WorkerServiceClient::new(flotilla_proto::auth::Credentials::none().wrap(channel));
        let yaml = format!(
            "name: nccl\nmodel: {{kind: mlp, layers: [2, 2]}}\ndata: {{kind: synthetic}}\n\
             train: {{steps: 1, global_batch: {gpus}}}\nworkers: {{min: {gpus}, max: {gpus}}}\n"
        );
        let req = pb::SubmitJobRequest {
            spec_yaml: yaml,
            origin: "nccl.yaml".into(),
            base_dir: "/tmp".into(),
            ..Default::default()
        };
        let job = jobs.submit_job(req).await.unwrap().into_inner().job_id;
        let mut worker = String::new();
        for i in 0..gpus {
            let req = pb::RegisterRequest {
                data_addr: format!("127.0.0.1:{}", 6000 + i),
                hostname: "h".into(),
                pid: 1,
                ..Default::default()
            };
            worker = w.register(req).await.unwrap().into_inner().worker_id;
        }
        let status = loop {
            let s = jobs.get_job(pb::GetJobRequest { job_id: job.clone() }).await.unwrap().into_inner();
            if s.generation >= 1 {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        (server, status.generation, job, (w, worker))
    });
    // Each rank's data port: a live listener, as a worker's (the watchdog
    // probes them).
    let ports: Vec<std::net::TcpListener> =
        (0..gpus).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let members = Members {
        world_ranks: (0..gpus).collect(),
        data_addrs: ports.iter().map(|l| l.local_addr().unwrap()).collect(),
    };
    let handles: Vec<_> = (0..gpus)
        .map(|rank| {
            let rdv = Rendezvous::new(rt.handle().clone(), client.clone(), &worker, &job, generation);
            let members = members.clone();
            std::thread::spawn(move || {
                let abort = Arc::new(AtomicBool::new(false));
                let mut g = NcclGroup::connect(
                    &rdv,
                    "nccl/test",
                    rank,
                    members,
                    generation,
                    rank,
                    Duration::from_secs(60),
                    abort,
                )
                .unwrap();
                let checks = check_collectives(&mut g);
                assert!(checks.len() >= 17, "every collective, both types, even and uneven: {checks:?}");
                for c in &checks {
                    assert!(c.ok, "rank {rank}: {} failed: {}", c.name, c.detail);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    rt.block_on(server.shutdown()).unwrap();
}
