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
use flotilla_trainer::nccl::NcclGroup;
use flotilla_trainer::rendezvous::Rendezvous;
use tch::{Device, Kind, Tensor};
use tokio_util::sync::CancellationToken;

#[test]
fn all_reduce_and_broadcast_cuda_tensors_across_every_gpu() {
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
    let handles: Vec<_> = (0..gpus)
        .map(|rank| {
            let rdv = Rendezvous::new(rt.handle().clone(), client.clone(), &worker, &job, generation);
            std::thread::spawn(move || {
                let mut g = NcclGroup::connect(&rdv, rank, gpus, generation, rank, Duration::from_secs(60)).unwrap();
                let dev = Device::Cuda(rank);
                let mut t = Tensor::full([1 << 20], (rank + 1) as f64, (Kind::Float, dev));
                g.all_reduce_sum(&mut t).unwrap();
                let want = (gpus * (gpus + 1) / 2) as f64;
                assert_eq!(t.min().double_value(&[]), want);
                assert_eq!(t.max().double_value(&[]), want);
                let mut b = Tensor::full([1000], rank as f64, (Kind::Float, dev));
                g.broadcast(&mut b, gpus - 1).unwrap();
                assert_eq!(b.sum(Kind::Double).double_value(&[]), 1000.0 * (gpus - 1) as f64);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    rt.block_on(server.shutdown()).unwrap();
}
