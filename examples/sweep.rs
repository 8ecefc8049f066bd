//! Scripting experiments: a learning-rate sweep over the quickstart job,
//! submitted to a running coordinator, with each run's final loss read back
//! from its metrics.
//!
//! ```sh
//! flotilla coordinator &
//! flotilla worker & flotilla worker &
//! cargo run --example sweep -- http://127.0.0.1:7070
//! ```

use flotilla::proto::v1 as pb;
use flotilla::proto::v1::job_service_client::JobServiceClient;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::args().nth(1).unwrap_or_else(|| "http://127.0.0.1:7070".into());
    let template = std::fs::read_to_string("configs/quickstart.yaml")?;
    // Check the template once here; the coordinator checks every variant again.
    flotilla::jobspec::parse(&template, "configs/quickstart.yaml")?;
    let mut client = JobServiceClient::connect(url).await?;
    let base_dir = std::env::current_dir()?.display().to_string();

    let mut runs = Vec::new();
    for lr in [0.0003, 0.001, 0.003, 0.01] {
        let yaml = template
            .replace("name: quickstart", &format!("name: sweep-lr{}", (lr * 1e4) as u32))
            .replace("lr: 0.003", &format!("lr: {lr}"));
        let req = pb::SubmitJobRequest {
            spec_yaml: yaml,
            origin: format!("sweep lr={lr}"),
            base_dir: base_dir.clone(),
            ..Default::default()
        };
        let job = client.submit_job(req).await?.into_inner().job_id;
        println!("submitted {job} (lr {lr})");
        runs.push((lr, job));
    }

    // Jobs run one after another on the free workers; follow each to its end.
    for (lr, job) in &runs {
        let mut watch = client.watch_job(pb::WatchJobRequest { job_id: job.clone() }).await?.into_inner();
        let mut last = None;
        while let Some(status) = watch.message().await? {
            last = Some(status);
        }
        let status = last.expect("the watch sends at least one status");
        let points = client.get_metrics(pb::GetMetricsRequest { job_id: job.clone() }).await?.into_inner().points;
        let tail: Vec<f64> = points.iter().rev().take(10).map(|p| p.loss).collect();
        let mean = tail.iter().sum::<f64>() / tail.len().max(1) as f64;
        println!(
            "lr {lr:<7} {job:<16} {:<10} loss over the last 10 steps {mean:.4}",
            match status.phase {
                p if p == pb::JobPhase::Succeeded as i32 => "succeeded",
                _ => "did not succeed",
            }
        );
    }
    Ok(())
}
