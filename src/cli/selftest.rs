//! `flotilla selftest nccl`: NCCL on this machine's GPUs, the way jobs use
//! it. A coordinator in this process hands out one generation of a job with
//! a rank per visible GPU; the ranks (threads here) make a communicator
//! through its rendezvous board and check every collective against the
//! same collective computed on the CPU. `--hang` instead checks that the
//! watchdog ends an operation that can never finish. Writes the checks as
//! JSON; exit 0 when all pass, 1 when one fails, 3 when NCCL cannot run
//! here (a build without the `cuda` feature, no GPU, no NCCL library).

use std::path::Path;

/// Exit code: nothing to check here.
pub const EXIT_UNAVAILABLE: i32 = 3;

#[cfg(not(feature = "cuda"))]
pub async fn nccl(_json: &Path, _hang: bool) -> anyhow::Result<i32> {
    eprintln!("flotilla selftest nccl: this binary was built without the `cuda` feature");
    Ok(EXIT_UNAVAILABLE)
}

#[cfg(feature = "cuda")]
pub async fn nccl(json: &Path, hang: bool) -> anyhow::Result<i32> {
    use std::time::{Duration, Instant};

    use anyhow::Context;
    use flotilla_coordinator::CoordinatorConfig;
    use flotilla_proto::v1 as pb;
    use flotilla_proto::v1::job_service_client::JobServiceClient;
    use flotilla_proto::v1::worker_service_client::WorkerServiceClient;
    use flotilla_trainer::nccl::{self, Members, NcclGroup};
    use flotilla_trainer::rendezvous::Rendezvous;
    use serde_json::json;
    use tokio_util::sync::CancellationToken;

    if let Err(why) = nccl::available() {
        eprintln!("flotilla selftest nccl: {why}");
        return Ok(EXIT_UNAVAILABLE);
    }
    let gpus = flotilla_trainer::device::visible_gpus();
    if gpus == 0 {
        eprintln!("flotilla selftest nccl: libtorch sees no GPU");
        return Ok(EXIT_UNAVAILABLE);
    }
    let gpus = if hang { 1 } else { gpus };
    let started = Instant::now();
    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server = flotilla_coordinator::serve(listener, CoordinatorConfig::default(), shutdown.clone())
        .await
        .context("start the coordinator")?;
    let url = format!("http://{}", server.addr);
    let mut jobs = JobServiceClient::connect(url.clone()).await?;
    let channel = tonic::transport::Channel::from_shared(url)?.connect().await?;
    let mut workers = WorkerServiceClient::new(flotilla_proto::auth::Credentials::none().wrap(channel));
    let yaml = format!(
        "name: nccl-selftest\nmodel: {{kind: mlp, layers: [2, 2]}}\ndata: {{kind: synthetic}}\n\
         train: {{steps: 1, global_batch: {gpus}}}\nworkers: {{min: {gpus}, max: {gpus}}}\n"
    );
    let req = pb::SubmitJobRequest {
        spec_yaml: yaml,
        origin: "selftest.yaml".into(),
        base_dir: std::env::temp_dir().display().to_string(),
        ..Default::default()
    };
    let job = jobs.submit_job(req).await?.into_inner().job_id;
    // Each rank's data port: a live listener, as a worker's is (the
    // watchdog probes them).
    let ports: Vec<std::net::TcpListener> =
        (0..gpus).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
    let addrs: Vec<std::net::SocketAddr> = ports.iter().map(|l| l.local_addr()).collect::<Result<_, _>>()?;
    let mut worker = String::new();
    for (i, addr) in addrs.iter().enumerate() {
        let req = pb::RegisterRequest {
            data_addr: addr.to_string(),
            hostname: "selftest".into(),
            pid: std::process::id(),
            device: format!("cuda:{i}"),
            ..Default::default()
        };
        worker = workers.register(req).await?.into_inner().worker_id;
    }
    let generation = loop {
        let s = jobs.get_job(pb::GetJobRequest { job_id: job.clone() }).await?.into_inner();
        if s.generation >= 1 {
            break s.generation;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(60), "the coordinator never planned the job");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let handle = tokio::runtime::Handle::current();
    let members = Members { world_ranks: (0..gpus).collect(), data_addrs: addrs };
    let ranks: Vec<_> = (0..gpus)
        .map(|rank| {
            let rdv = Rendezvous::new(handle.clone(), workers.clone(), &worker, &job, generation);
            let members = members.clone();
            std::thread::spawn(move || -> Result<serde_json::Value, String> {
                let abort = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let connected = Instant::now();
                let mut g = NcclGroup::connect(
                    &rdv,
                    "nccl/selftest",
                    rank,
                    members,
                    generation,
                    rank,
                    Duration::from_secs(60),
                    abort,
                )
                .map_err(|e| e.to_string())?;
                let connect_s = connected.elapsed().as_secs_f64();
                if hang {
                    let (took, error) = nccl::check_watchdog(&mut g, Duration::from_secs(2))?;
                    return Ok(json!({"rank": rank, "connect_s": connect_s, "watchdog": {
                        "deadline_s": 2.0, "failed_after_s": took.as_secs_f64(),
                        // Whether the deadline ended it, or NCCL refused the
                        // receive at once (the hang was then not exercised).
                        "deadline_path": error.contains("did not finish within"),
                        "error": error, "ok": took < Duration::from_secs(10)}}));
                }
                let checks = nccl::check_collectives(&mut g);
                Ok(json!({"rank": rank, "connect_s": connect_s, "checks": checks}))
            })
        })
        .collect();
    let mut results = Vec::new();
    for r in ranks {
        let joined = tokio::task::spawn_blocking(move || r.join()).await?;
        results.push(match joined {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => json!({"error": e}),
            Err(_) => json!({"error": "the rank's thread panicked"}),
        });
    }
    drop(ports);
    let _ = server.shutdown().await;
    shutdown.cancel();
    let passed = |v: &serde_json::Value| {
        v.get("error").is_none()
            && v["checks"].as_array().is_none_or(|c| c.iter().all(|c| c["ok"] == true))
            && v["watchdog"]["ok"] != false
    };
    let ok = results.iter().all(passed);
    for r in &results {
        for c in r["checks"].as_array().into_iter().flatten() {
            println!(
                "rank {} {:<40} {} {}",
                r["rank"],
                c["name"].as_str().unwrap_or(""),
                if c["ok"] == true { "ok  " } else { "FAIL" },
                c["detail"].as_str().unwrap_or("")
            );
        }
        if !r["watchdog"].is_null() {
            println!("rank {} watchdog: {}", r["rank"], r["watchdog"]);
        }
        if let Some(e) = r.get("error") {
            println!("rank {}: error: {e}", r["rank"]);
        }
    }
    let version = nccl::version().unwrap_or(0);
    let report = json!({
        "ok": ok,
        "gpus": gpus,
        "nccl_version": version,
        "mode": if hang { "watchdog" } else { "collectives" },
        "seconds": started.elapsed().as_secs_f64(),
        "ranks": results,
    });
    std::fs::write(json, serde_json::to_vec_pretty(&report)?).with_context(|| format!("write {}", json.display()))?;
    println!("nccl selftest: {} ({} GPU(s), NCCL {version})", if ok { "passed" } else { "FAILED" }, gpus);
    Ok(if ok { 0 } else { 1 })
}
