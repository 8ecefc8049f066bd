//! The coordinator over real gRPC on loopback, with workers played by this
//! test: assignment streams, lapsed leases committing new generations,
//! growth at checkpoints, stale reports and the end of a job.

use std::time::Duration;

use flotilla_coordinator::CoordinatorConfig;
use flotilla_proto::v1 as pb;
use flotilla_proto::v1::job_service_client::JobServiceClient;
use flotilla_proto::v1::worker_service_client::WorkerServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::Streaming;

const JOB: &str = "
name: lease
model: {kind: mlp, layers: [4, 8, 3]}
data: {kind: synthetic}
train: {steps: 100, global_batch: 8}
workers: {min: 1, max: 2}
checkpoint: {url: /tmp/flotilla-lease-test, every: 10, keep: 2}
";

async fn next(stream: &mut Streaming<pb::Assignment>) -> pb::Assignment {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an assignment in time")
        .expect("stream healthy")
        .expect("stream open")
}

/// The next assignment of a different job or generation than `previous`
/// (a committed checkpoint also refreshes the current one's list).
async fn next_change(stream: &mut Streaming<pb::Assignment>, previous: &pb::Assignment) -> pb::Assignment {
    loop {
        let a = next(stream).await;
        if a.job_id != previous.job_id || a.generation != previous.generation {
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

/// Heartbeats `id` until the token is cancelled.
fn keep_alive(mut w: WorkerServiceClient<Channel>, id: String) -> CancellationToken {
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        while !token.is_cancelled() {
            let _ = w.heartbeat(pb::HeartbeatRequest { worker_id: id.clone() }).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    stop
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_generations_growth_and_completion_over_grpc() {
    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cfg = CoordinatorConfig {
        lease: Duration::from_millis(600),
        heartbeat_interval: Duration::from_millis(100),
        start_grace: Duration::from_millis(200),
        comm_grace: Duration::from_secs(2),
        tick: Duration::from_millis(50),
        ..CoordinatorConfig::default()
    };
    let server = flotilla_coordinator::serve(listener, cfg, shutdown.clone()).await.unwrap();
    let url = format!("http://{}", server.addr);
    let mut jobs = JobServiceClient::connect(url.clone()).await.unwrap();
    let mut w = WorkerServiceClient::connect(url.clone()).await.unwrap();

    let job = jobs
        .submit_job(pb::SubmitJobRequest {
            spec_yaml: JOB.into(),
            origin: "lease.yaml".into(),
            base_dir: "/tmp".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    assert_eq!(job, "lease-1");

    let bad = w
        .register(pb::RegisterRequest {
            data_addr: "nowhere".into(),
            hostname: "h".into(),
            pid: 1,
            ..Default::default()
        })
        .await;
    assert_eq!(bad.unwrap_err().code(), tonic::Code::InvalidArgument);

    let (w1, mut s1) = register(&mut w, 5001).await;
    let (w2, mut s2) = register(&mut w, 5002).await;
    let hb1 = keep_alive(w.clone(), w1.clone());
    let hb2 = keep_alive(w.clone(), w2.clone());
    assert_eq!(next(&mut s1).await.job_id, "", "idle before the job starts");
    assert_eq!(next(&mut s2).await.job_id, "");

    // Both free workers join generation 1 (max 2, so no start grace).
    let a1 = next(&mut s1).await;
    let a2 = next(&mut s2).await;
    assert_eq!((a1.job_id.as_str(), a1.generation, a1.world_size), ("lease-1", 1, 2));
    assert_eq!((a1.rank, a2.rank), (0, 1));
    assert_eq!(a1.peers, vec!["127.0.0.1:5001", "127.0.0.1:5002"]);
    assert!(a1.checkpoints.is_empty());
    assert_eq!(a1.output_dir, "/tmp/flotilla-lease-test/lease-1");
    let spec = flotilla_jobspec::JobSpec::from_json(&a1.spec_json).unwrap();
    assert_eq!(spec.train.steps, 100);

    // The rendezvous board of generation 1 (how NCCL ids travel).
    let put = |generation, value: &[u8]| pb::RendezvousPut {
        job_id: job.clone(),
        generation,
        key: "nccl-unique-id".into(),
        value: value.to_vec(),
        worker_id: String::new(),
    };
    let get = |generation| pb::RendezvousGet {
        job_id: job.clone(),
        generation,
        key: "nccl-unique-id".into(),
        worker_id: String::new(),
    };
    let early = w.lookup_rendezvous(get(1)).await.unwrap_err();
    assert_eq!(early.code(), tonic::Code::NotFound);
    w.publish_rendezvous(put(1, b"id-of-gen-1")).await.unwrap();
    assert_eq!(w.lookup_rendezvous(get(1)).await.unwrap().into_inner().value, b"id-of-gen-1");
    let future = w.publish_rendezvous(put(7, b"x")).await.unwrap_err();
    assert_eq!(future.code(), tonic::Code::FailedPrecondition);
    let huge = w.publish_rendezvous(put(1, &vec![0u8; 100_000])).await.unwrap_err();
    assert_eq!(huge.code(), tonic::Code::InvalidArgument);

    // A checkpoint of generation 1 is committed and retained.
    let commit = |generation, step| pb::CheckpointCommit {
        worker_id: w1.clone(),
        job_id: job.clone(),
        generation,
        step,
        location: format!("/tmp/flotilla-lease-test/lease-1/step-{step:08}"),
        blocked_ms: 0.5,
        total_ms: 20.0,
    };
    let kept = w.commit_checkpoint(commit(1, 10)).await.unwrap().into_inner().retained_steps;
    assert_eq!(kept, vec![10]);

    // Worker 2 stops heartbeating: its lease lapses, generation 2 runs on worker 1 alone.
    hb2.cancel();
    let a1 = next_change(&mut s1, &a1).await;
    assert_eq!((a1.generation, a1.world_size, a1.rank), (2, 1, 0));
    assert_eq!(a1.checkpoints.iter().map(|c| c.step).collect::<Vec<_>>(), vec![10], "resume from step 10");
    let gone = loop {
        match tokio::time::timeout(Duration::from_secs(5), s2.message()).await.expect("stream ends in time") {
            Ok(Some(a)) => assert_eq!(a.generation, 1, "only refreshes of generation 1 before the end"),
            Ok(None) => panic!("the stream ended without saying why"),
            Err(status) => break status,
        }
    };
    assert_eq!(gone.code(), tonic::Code::NotFound, "the lost worker is told to register again");
    let hb = w.heartbeat(pb::HeartbeatRequest { worker_id: w2.clone() }).await;
    assert_eq!(hb.unwrap_err().code(), tonic::Code::NotFound);

    // Generation 1's board is closed; generation 2 starts empty.
    assert_eq!(w.lookup_rendezvous(get(1)).await.unwrap_err().code(), tonic::Code::FailedPrecondition);
    assert_eq!(w.lookup_rendezvous(get(2)).await.unwrap_err().code(), tonic::Code::NotFound);

    // Reports from generation 1 are stale now.
    let stale = w
        .report_progress(pb::ProgressReport { job_id: job.clone(), generation: 1, step: 11, ..Default::default() })
        .await;
    assert_eq!(stale.unwrap_err().code(), tonic::Code::FailedPrecondition);
    w.report_progress(pb::ProgressReport {
        job_id: job.clone(),
        generation: 2,
        step: 15,
        loss: 0.5,
        ..Default::default()
    })
    .await
    .unwrap();

    // A new worker joins at the next checkpoint: generation 3 on two workers from step 20.
    let (w3, mut s3) = register(&mut w, 5003).await;
    let hb3 = keep_alive(w.clone(), w3.clone());
    assert_eq!(next(&mut s3).await.job_id, "");
    let kept = w.commit_checkpoint(commit(2, 20)).await.unwrap().into_inner().retained_steps;
    assert_eq!(kept, vec![10, 20]);
    let a1 = next_change(&mut s1, &a1).await;
    let a3 = next(&mut s3).await;
    assert_eq!((a1.generation, a1.world_size, a1.rank, a3.rank), (3, 2, 0, 1));
    assert_eq!(a3.checkpoints[0].step, 20);

    let status = jobs.get_job(pb::GetJobRequest { job_id: job.clone() }).await.unwrap().into_inner();
    let reasons: Vec<&str> = status.generations.iter().map(|g| g.reason.as_str()).collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons[1].contains("lease lapsed"), "{reasons:?}");
    assert_eq!(reasons[2], "workers joined");
    assert_eq!(status.step, 15);
    let latest = status.latest_checkpoint.expect("a committed checkpoint");
    assert_eq!((latest.step, latest.blocked_ms, latest.total_ms), (20, 0.5, 20.0), "timings are kept with it");

    // Finishing from a stale generation changes nothing; the current one ends the job.
    let finish = |generation| pb::FinishReport {
        worker_id: w1.clone(),
        job_id: job.clone(),
        generation,
        step: 100,
        final_model: "/tmp/flotilla-lease-test/lease-1/final/model.safetensors".into(),
    };
    w.report_finished(finish(2)).await.unwrap();
    let mut watch = jobs.watch_job(pb::WatchJobRequest { job_id: job.clone() }).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.phase, pb::JobPhase::Running as i32);
    w.report_finished(finish(3)).await.unwrap();
    let mut last = first;
    while let Some(s) = tokio::time::timeout(Duration::from_secs(5), watch.message()).await.unwrap().unwrap() {
        last = s;
    }
    assert_eq!(last.phase, pb::JobPhase::Succeeded as i32, "the watch ends with the final status");
    assert_eq!(next_change(&mut s1, &a1).await.job_id, "", "workers are idle again");
    assert_eq!(next(&mut s3).await.job_id, "");

    hb1.cancel();
    hb3.cancel();
    drop((s1, s3));
    server.shutdown().await.unwrap();
}

/// A worker that reconnects with the id it was given keeps that id and its
/// place; a retried submission returns the job the first attempt created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_workers_and_retried_submissions_are_not_duplicated() {
    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = flotilla_coordinator::serve(listener, CoordinatorConfig::default(), shutdown.clone()).await.unwrap();
    let url = format!("http://{}", server.addr);
    let mut jobs = JobServiceClient::connect(url.clone()).await.unwrap();
    let mut w = WorkerServiceClient::connect(url.clone()).await.unwrap();

    let info = jobs.get_leader(pb::GetLeaderRequest {}).await.unwrap().into_inner();
    assert!(info.is_leader, "a single replica leads");

    let (id, _stream) = register(&mut w, 7001).await;
    let again = |worker_id: String, port: u16| pb::RegisterRequest {
        data_addr: format!("127.0.0.1:{port}"),
        hostname: "h".into(),
        pid: 2,
        worker_id,
        rank_hint: None,
        metrics_addr: String::new(),
        device: String::new(),
    };
    let back = w.register(again(id.clone(), 7001)).await.unwrap().into_inner().worker_id;
    assert_eq!(back, id, "the same worker keeps its id");
    // An id the coordinator does not know, or one claimed from another
    // address, gets a new worker.
    let other = w.register(again(id.clone(), 7002)).await.unwrap().into_inner().worker_id;
    assert_ne!(other, id);
    let unknown = w.register(again("w-999".into(), 7003)).await.unwrap().into_inner().worker_id;
    assert!(unknown != id && unknown != "w-999");

    let submit = |sub: &str| pb::SubmitJobRequest {
        spec_yaml: JOB.into(),
        origin: "lease.yaml".into(),
        base_dir: "/tmp".into(),
        submission_id: sub.into(),
    };
    let first = jobs.submit_job(submit("s-1")).await.unwrap().into_inner().job_id;
    let retry = jobs.submit_job(submit("s-1")).await.unwrap().into_inner().job_id;
    let second = jobs.submit_job(submit("s-2")).await.unwrap().into_inner().job_id;
    assert_eq!(first, retry);
    assert_ne!(first, second);
    let listed = jobs.list_jobs(pb::ListJobsRequest {}).await.unwrap().into_inner().jobs;
    assert_eq!(listed.len(), 2, "{listed:?}");

    shutdown.cancel();
    server.wait().await.unwrap();
}
