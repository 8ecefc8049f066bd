//! Pipeline plans and memory reports over real gRPC on loopback, with
//! workers played by this test: assignments name each rank's stage and
//! replica, and what a rank reports it holds shows in the job's status for
//! its generation only.

use std::time::Duration;

use flotilla_coordinator::CoordinatorConfig;
use flotilla_proto::v1 as pb;
use flotilla_proto::v1::job_service_client::JobServiceClient;
use flotilla_proto::v1::worker_service_client::WorkerServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

const JOB: &str = "
name: pipe
model: {kind: mlp, layers: [4, 8, 8, 3]}
data: {kind: synthetic}
train: {steps: 100, global_batch: 8}
workers: {min: 2, max: 4}
parallelism: {pp: 2}
checkpoint: {url: /tmp/flotilla-memory-test, every: 10, keep: 2}
";

/// The next assignment that names a job.
async fn assigned(stream: &mut Streaming<pb::Assignment>) -> pb::Assignment {
    loop {
        let a = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("an assignment in time")
            .expect("stream healthy")
            .expect("stream open");
        if !a.job_id.is_empty() {
            return a;
        }
    }
}

async fn register(w: &mut WorkerServiceClient<Channel>, port: u16) -> (String, Streaming<pb::Assignment>) {
    let id = w
        .register(pb::RegisterRequest {
            data_addr: format!("127.0.0.1:{port}"),
            hostname: "h".into(),
            pid: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    let stream = w.assignments(pb::AssignmentsRequest { worker_id: id.clone() }).await.unwrap().into_inner();
    (id, stream)
}

fn usage(params_bytes: u64) -> pb::MemoryUsage {
    pb::MemoryUsage {
        params_bytes,
        grads_bytes: 2048,
        optimizer_bytes: 4096,
        activation_bytes: 3 << 20,
        ..Default::default()
    }
}

fn report(worker: &str, generation: u64, rank: u32, usage: Option<pb::MemoryUsage>) -> pb::MemoryReport {
    pb::MemoryReport { worker_id: worker.into(), job_id: "pipe-1".into(), generation, rank, usage, step_times: None }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_ranks_report_their_memory_for_their_generation() {
    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    // Leases long enough that no heartbeat is needed during the test.
    let cfg = CoordinatorConfig {
        lease: Duration::from_secs(60),
        start_grace: Duration::from_millis(100),
        tick: Duration::from_millis(20),
        ..CoordinatorConfig::default()
    };
    let server = flotilla_coordinator::serve(listener, cfg, shutdown.clone()).await.unwrap();
    let url = format!("http://{}", server.addr);
    let mut jobs = JobServiceClient::connect(url.clone()).await.unwrap();
    let mut w = WorkerServiceClient::connect(url.clone()).await.unwrap();

    let job = jobs
        .submit_job(pb::SubmitJobRequest {
            spec_yaml: JOB.into(),
            origin: "pipe.yaml".into(),
            base_dir: "/tmp".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    assert_eq!(job, "pipe-1");

    // Three free workers make one replica of two stages; the third waits.
    let (w1, mut s1) = register(&mut w, 6001).await;
    let (w2, mut s2) = register(&mut w, 6002).await;
    let (_w3, _s3) = register(&mut w, 6003).await;
    let a1 = assigned(&mut s1).await;
    let a2 = assigned(&mut s2).await;
    assert_eq!((a1.world_size, a1.stages, a1.rank, a1.stage, a1.replica), (2, 2, 0, 0, 0));
    assert_eq!((a2.world_size, a2.stages, a2.rank, a2.stage, a2.replica), (2, 2, 1, 1, 0));
    let generation = a1.generation;

    let get = |mut jobs: JobServiceClient<Channel>| async move {
        jobs.get_job(pb::GetJobRequest { job_id: "pipe-1".into() }).await.unwrap().into_inner()
    };
    let status = get(jobs.clone()).await;
    let ranks: Vec<_> = status.ranks.iter().map(|r| (r.worker_id.clone(), r.stage, r.replica)).collect();
    assert_eq!(ranks, vec![(w1.clone(), 0, 0), (w2.clone(), 1, 0)]);
    assert!(status.ranks.iter().all(|r| r.memory.is_none()), "no memory before a report: {status:#?}");

    w.report_memory(report(&w2, generation, 1, Some(usage(1 << 20)))).await.unwrap();
    let status = get(jobs.clone()).await;
    assert_eq!(status.ranks[1].memory, Some(usage(1 << 20)));
    assert_eq!(status.ranks[0].memory, None);
    assert_eq!(status.ranks[1].step_times, None, "a report without step times shows none");
    // A later report replaces it, with where the rank's steps went.
    let times =
        pb::StepTimes { step: 40, steps: 12, step_ms: 9.5, compute_ms: 6.0, comm_ms: 2.5, ..Default::default() };
    let mut later = report(&w2, generation, 1, Some(usage(5 << 20)));
    later.step_times = Some(times);
    w.report_memory(later).await.unwrap();
    let status = get(jobs.clone()).await;
    assert_eq!((status.ranks[1].memory.clone(), status.ranks[1].step_times), (Some(usage(5 << 20)), Some(times)));

    // Stale or future generations, ranks outside the plan, the wrong worker,
    // a missing usage and an unknown job are refused with a status.
    let refused = |r: Result<tonic::Response<pb::Ack>, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        refused(w.report_memory(report(&w1, generation - 1, 0, Some(usage(1)))).await),
        Code::FailedPrecondition
    );
    assert_eq!(
        refused(w.report_memory(report(&w1, generation + 1, 0, Some(usage(1)))).await),
        Code::FailedPrecondition
    );
    assert_eq!(refused(w.report_memory(report(&w1, generation, 2, Some(usage(1)))).await), Code::InvalidArgument);
    assert_eq!(refused(w.report_memory(report(&w1, generation, 1, Some(usage(1)))).await), Code::InvalidArgument);
    assert_eq!(refused(w.report_memory(report(&w1, generation, 0, None)).await), Code::InvalidArgument);
    let mut unknown = report(&w1, generation, 0, Some(usage(1)));
    unknown.job_id = "nope-9".into();
    assert_eq!(refused(w.report_memory(unknown).await), Code::NotFound);
    assert_eq!(get(jobs.clone()).await.ranks[1].memory, Some(usage(5 << 20)), "refusals change nothing");

    // A new generation starts without reports; the old one's are refused.
    w.report_failure(pb::FailureReport {
        worker_id: w1.clone(),
        job_id: job.clone(),
        generation,
        rank: 0,
        kind: pb::FailureKind::Fatal as i32,
        message: "test".into(),
        peer_rank: None,
    })
    .await
    .unwrap();
    while assigned(&mut s1).await.generation == generation {}
    let status = get(jobs.clone()).await;
    assert_eq!(status.generation, generation + 1);
    assert!(status.ranks.iter().all(|r| r.memory.is_none()), "{status:#?}");
    assert_eq!(refused(w.report_memory(report(&w2, generation, 1, Some(usage(1)))).await), Code::FailedPrecondition);
    w.report_memory(report(&w1, generation + 1, 0, Some(usage(7)))).await.unwrap();
    assert_eq!(get(jobs.clone()).await.ranks[0].memory, Some(usage(7)));

    shutdown.cancel();
}
