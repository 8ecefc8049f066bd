//! Seeing what training does: a real Prometheus (Debian's `prometheus`,
//! `scripts/bootstrap --prometheus`) scrapes a coordinator's `/metrics`
//! (mutual TLS and a read token, as an operator's scrape config would) and
//! a worker's `--metrics-addr` listener while a small job trains, and its
//! query API must then hold the series with the values the job had; the
//! job's TensorBoard event file is read back by TensorBoard's own reader
//! (`.deps/venv`, `scripts/bootstrap --python`) and holds the losses of
//! the job's metrics.jsonl.

mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

const STEPS: u64 = 30;

fn job_yaml() -> String {
    format!(
        "
name: observed
model: {{kind: mlp, layers: [8, 16, 4]}}
data: {{kind: synthetic, seed: 3, samples: 256}}
train: {{steps: {STEPS}, global_batch: 16, seed: 1, optimizer: {{lr: 0.01}}}}
workers: {{min: 1, max: 1}}
eval: {{data: {{kind: synthetic, seed: 4, samples: 64}}, every: 10, batches: 1, batch: 32}}
metrics: {{tensorboard: tb}}
"
    )
}

/// A Prometheus server, killed when dropped.
struct Prometheus {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Prometheus {
    fn start(dir: &Path, config: &str) -> Prometheus {
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let port = free_port();
        let log = dir.join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start prometheus (scripts/bootstrap --prometheus installs it)");
        Prometheus { child, url: format!("http://127.0.0.1:{port}"), log }
    }

    /// The samples of an instant query: (labels, value).
    async fn query(&self, http: &reqwest::Client, q: &str) -> Vec<(Value, f64)> {
        let Ok(resp) = http.get(format!("{}/api/v1/query", self.url)).query(&[("query", q)]).send().await else {
            return Vec::new();
        };
        let body: Value = resp.json().await.unwrap_or_default();
        body["data"]["result"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter_map(|s| Some((s["metric"].clone(), s["value"][1].as_str()?.parse::<f64>().ok()?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Polls `q` until its one sample satisfies `ok` (a generous deadline:
    /// scrapes are a second apart); returns the value.
    async fn wait_for(&self, http: &reqwest::Client, q: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let got = self.query(http, q).await;
            if let [(_, v)] = got.as_slice() {
                if ok(*v) {
                    return *v;
                }
            }
            assert!(
                Instant::now() < deadline,
                "prometheus never had `{q}` as wanted; last {got:?}\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// An HTTP client with this test binary's CA and client certificate.
fn tls_client(token: Option<&str>) -> reqwest::Client {
    http_client(token).build().unwrap()
}

/// The worker's advertised metrics address, from `/api/v1/workers`.
async fn advertised_metrics_addr(admin: &reqwest::Client, url: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(resp) = admin.get(format!("{url}/api/v1/workers")).send().await {
            let body: Value = resp.json().await.unwrap_or_default();
            if let Some(addr) = body["workers"][0]["metrics_addr"].as_str().filter(|a| !a.is_empty()) {
                return addr.to_string();
            }
        }
        assert!(Instant::now() < deadline, "the worker never registered its metrics address");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// (step, loss) of every line of a metrics.jsonl.
fn losses(path: &Path) -> Vec<(u64, f64)> {
    read_metrics(path).into_iter().map(|(step, loss, _)| (step, loss)).collect()
}

#[test]
fn prometheus_scrapes_the_coordinator_and_a_worker_and_tensorboard_reads_the_event_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_coordinator, url) = coordinator(d);
    let _worker = worker_with_args(d, &url, "w1", &["--op-timeout-s", "20", "--metrics-addr", "127.0.0.1:0"]);
    let reader = create_token(d, &url, "read", "prometheus");
    let worker_token = create_token(d, &url, "worker", "not-a-reader");
    let job = job_file(d, "job", &job_yaml());
    let out = flotilla(d, &["submit", job.to_str().unwrap(), "--coordinator", &url, "--wait"]);
    assert!(out.status.success(), "submit --wait: {}", String::from_utf8_lossy(&out.stderr));
    let history = losses(&d.join("runs/observed-1/final/metrics.jsonl"));
    assert_eq!(history.len() as u64, STEPS, "{history:?}");

    let rt = runtime();
    rt.block_on(async {
        // Who may scrape the coordinator: a reading role, nobody else.
        let metrics_url = format!("{url}/metrics");
        let resp = tls_client(None).get(&metrics_url).send().await.unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::UNAUTHORIZED);
        let resp = tls_client(Some(&worker_token)).get(&metrics_url).send().await.unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::FORBIDDEN);
        let resp = tls_client(Some(&reader)).get(&metrics_url).send().await.unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::OK);
        assert!(resp.headers()[reqwest::header::CONTENT_TYPE].to_str().unwrap().starts_with("text/plain"));
        let text = resp.text().await.unwrap();
        assert!(text.contains("flotilla_jobs{phase=\"succeeded\"} 1"), "{text}");

        let admin = tls_client(Some(admin_token()));
        let worker_addr = advertised_metrics_addr(&admin, &url).await;
        assert!(worker_addr.starts_with("127.0.0.1:") && !worker_addr.ends_with(":0"), "{worker_addr}");
        // The worker's listener serves /metrics and nothing else.
        let plain = reqwest::Client::new();
        let resp = plain.get(format!("http://{worker_addr}/nothing")).send().await.unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::NOT_FOUND);

        // A real Prometheus, configured as an operator would.
        let tls = tls_dir();
        let token_file = d.join("prometheus.token");
        std::fs::write(&token_file, &reader).unwrap();
        let coordinator_addr = url.trim_start_matches("https://");
        let config = format!(
            "global: {{scrape_interval: 1s, scrape_timeout: 1s}}
scrape_configs:
  - job_name: flotilla-coordinator
    scheme: https
    authorization: {{credentials_file: {token}}}
    tls_config: {{ca_file: {ca}, cert_file: {cert}, key_file: {key}}}
    static_configs: [{{targets: ['{coordinator_addr}']}}]
  - job_name: flotilla-worker
    static_configs: [{{targets: ['{worker_addr}']}}]
",
            token = token_file.display(),
            ca = tls.join("ca.pem").display(),
            cert = tls.join("client.pem").display(),
            key = tls.join("client.key").display(),
        );
        let prom = Prometheus::start(d, &config);
        prom.wait_for(&plain, "up{job=\"flotilla-coordinator\"}", |v| v == 1.0).await;
        prom.wait_for(&plain, "up{job=\"flotilla-worker\"}", |v| v == 1.0).await;

        // The coordinator's series.
        prom.wait_for(&plain, "flotilla_jobs{phase=\"succeeded\"}", |v| v == 1.0).await;
        prom.wait_for(&plain, "flotilla_jobs{phase=\"running\"}", |v| v == 0.0).await;
        prom.wait_for(&plain, "flotilla_queue_length", |v| v == 0.0).await;
        prom.wait_for(&plain, "flotilla_workers{state=\"free\"}", |v| v == 1.0).await;
        prom.wait_for(&plain, "flotilla_generations_total{reason=\"start\"}", |v| v == 1.0).await;
        prom.wait_for(&plain, "flotilla_generations_total{reason=\"restart\"}", |v| v == 0.0).await;
        prom.wait_for(&plain, "flotilla_workers_lost_total", |v| v == 0.0).await;
        prom.wait_for(&plain, "flotilla_leader", |v| v == 1.0).await;
        prom.wait_for(&plain, "flotilla_raft_term", |v| v >= 1.0).await;
        let applied = prom.wait_for(&plain, "flotilla_raft_applied_index", |v| v >= 1.0).await;
        prom.wait_for(&plain, "flotilla_raft_commit_index", |v| v >= applied).await;
        prom.wait_for(&plain, "sum(flotilla_proposal_duration_seconds_count{outcome=\"ok\"})", |v| v >= 3.0).await;
        let registered = "flotilla_rpc_requests_total{method=\"/flotilla.v1.WorkerService/Register\",code=\"OK\"}";
        prom.wait_for(&plain, registered, |v| v == 1.0).await;
        let refused = "sum(flotilla_rpc_refused_total)";
        prom.wait_for(&plain, refused, |v| v >= 2.0).await;

        // The worker's: one step histogram sample per step run, the last
        // step's loss, time in every phase, collective traffic.
        let rank = "job_id=\"observed-1\",rank=\"0\",stage=\"0\",replica=\"0\"";
        prom.wait_for(&plain, &format!("flotilla_step_seconds_count{{{rank}}}"), |v| v == STEPS as f64).await;
        prom.wait_for(&plain, &format!("flotilla_step{{{rank}}}"), |v| v == STEPS as f64).await;
        let phases = format!("count(flotilla_step_phase_seconds_count{{{rank}}} == {STEPS})");
        prom.wait_for(&plain, &phases, |v| v == 5.0).await;
        let last = history.last().unwrap().1;
        let loss = prom.wait_for(&plain, &format!("flotilla_loss{{{rank}}}"), |v| v > 0.0).await;
        assert!((loss - last).abs() <= 1e-9 * last.abs(), "prometheus has loss {loss}, metrics.jsonl {last}");
        prom.wait_for(&plain, &format!("flotilla_learning_rate{{{rank}}}"), |v| v > 0.0).await;
        prom.wait_for(&plain, &format!("flotilla_eval_loss{{{rank}}}"), |v| v > 0.0).await;
        prom.wait_for(&plain, "sum(flotilla_collective_bytes_total)", |v| v > 0.0).await;
        prom.wait_for(&plain, &format!("flotilla_samples_per_second{{{rank}}}"), |v| v > 0.0).await;

        // Every series Prometheus has is documented; every one the Grafana
        // dashboard queries is documented and (but for those of events this
        // job never has) was scraped.
        let documented = documented_series();
        let scraped: std::collections::BTreeSet<String> = prom
            .query(&plain, "group by (__name__) ({__name__=~\"flotilla_.+\"})")
            .await
            .into_iter()
            .map(|(labels, _)| base_name(labels["__name__"].as_str().unwrap()).to_string())
            .collect();
        let undocumented: Vec<&String> = scraped.iter().filter(|n| !documented.contains(*n)).collect();
        assert!(undocumented.is_empty(), "series not in docs/observability.md: {undocumented:?}");
        let dashboard = std::fs::read_to_string(repo().join("deploy/grafana/flotilla.json")).unwrap();
        let dashboard: Value = serde_json::from_str(&dashboard).expect("the Grafana dashboard is JSON");
        let queried = dashboard_series(&dashboard);
        assert!(queried.len() >= 20, "{queried:?}");
        let never_here =
            ["flotilla_tokens_per_second", "flotilla_checkpoint_blocked_seconds", "flotilla_checkpoint_seconds"];
        for name in &queried {
            assert!(
                documented.contains(name),
                "the dashboard queries {name}, which docs/observability.md does not list"
            );
            assert!(
                scraped.contains(name) || never_here.contains(&name.as_str()),
                "the dashboard queries {name}, never scraped"
            );
        }
        prom.wait_for(&plain, "flotilla_memory_bytes{kind=\"params\"}", |v| {
            v == ((8 * 16 + 16) + (16 * 4 + 4)) as f64 * 4.0
        })
        .await;
    });

    // TensorBoard's own reader finds every step's loss, as f32.
    let tb = tensorboard_scalars(&d.join("tb"));
    let tb_loss = tb["train/loss"].as_array().expect("train/loss in the event file");
    assert_eq!(tb_loss.len(), history.len(), "{tb_loss:?}");
    for ((step, loss), got) in history.iter().zip(tb_loss) {
        assert_eq!(got[0].as_u64(), Some(*step));
        let got = got[1].as_f64().unwrap();
        assert_eq!(got, *loss as f32 as f64, "step {step}: tensorboard {got}, metrics.jsonl {loss}");
    }
    for tag in ["train/lr", "train/grad_norm", "train/samples_per_sec"] {
        assert_eq!(tb[tag].as_array().map(Vec::len), Some(STEPS as usize), "{tag}");
    }
    let evals: Vec<u64> = tb["eval/loss"].as_array().unwrap().iter().map(|p| p[0].as_u64().unwrap()).collect();
    assert_eq!(evals, vec![10, 20, 30]);
}

/// A series' name without a histogram's suffix.
fn base_name(name: &str) -> &str {
    ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name)
}

/// The names in the first column of docs/observability.md's tables.
fn documented_series() -> std::collections::BTreeSet<String> {
    let doc = std::fs::read_to_string(repo().join("docs/observability.md")).unwrap();
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `flotilla_"))
        .filter_map(|l| l.split('`').next())
        .map(|n| format!("flotilla_{n}"))
        .collect()
}

/// Every `flotilla_*` series the dashboard's queries name.
fn dashboard_series(dashboard: &Value) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let panels = dashboard["panels"].as_array().expect("panels");
    for target in panels.iter().filter_map(|p| p["targets"].as_array()).flatten() {
        let expr = target["expr"].as_str().expect("a query");
        for (i, _) in expr.match_indices("flotilla_") {
            let name: String = expr[i..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
            names.insert(base_name(&name).to_string());
        }
    }
    names
}

/// Every scalar tag of the event files in `dir`, as TensorBoard's
/// `EventAccumulator` reads them: `{tag: [[step, value], ...]}`.
fn tensorboard_scalars(dir: &Path) -> Value {
    let script = "
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={'scalars': 0})
acc.Reload()
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()['scalars']}))
";
    let out = Command::new(oracle_python()).args(["-c", script, dir.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "tensorboard's reader: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}
