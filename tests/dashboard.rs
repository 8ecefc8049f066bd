//! The web dashboard in a real browser: headless Chromium, driven over the
//! W3C WebDriver protocol (chromedriver, plain JSON over HTTP), against a
//! cluster of three real coordinator replicas serving browsers
//! (`--browsers`) and two real workers. Through the page's DOM: the token is
//! typed into the page, the job shows in the list, its loss chart gains
//! points while it trains, the ranks table lists both ranks with where
//! their steps went and highlights one, the finished job shows the final
//! loss the API reports; a follower's dashboard shows the same, and a
//! sweep's leaderboard and chart of trials as the API ranks them. Screenshots
//! go to `$CARGO_TARGET_TMPDIR/dashboard/` (the test prints where).
//!
//! Needs Debian's `chromium` and `chromium-driver` (`scripts/bootstrap
//! --chromium`).

mod support;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use support::*;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// Generous: a loaded 2-core machine builds, trains and renders slowly.
const PATIENCE: Duration = Duration::from_secs(120);

/// Long enough to watch its chart grow (a few thousand small steps), on
/// two workers, with a validation loss now and then.
const JOB: &str = "
name: watched
model: {kind: mlp, layers: [16, 256, 256, 4]}
data: {kind: synthetic, seed: 3, samples: 4096}
train: {steps: 3000, global_batch: 64, seed: 1, optimizer: {lr: 0.001}}
eval: {data: {kind: synthetic, seed: 3, samples: 256}, every: 250, batches: 2}
workers: {min: 2, max: 2}
checkpoint: {url: runs, every: 1000, keep: 2}
";

/// A chromedriver and the Chromium session it drives; both (the whole
/// process group) are killed when dropped.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start(log: &Path) -> Browser {
        let port = cluster::free_ports(1)[0];
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("start {CHROMEDRIVER} (scripts/bootstrap --chromium installs it): {e}"));
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + PATIENCE;
        loop {
            let ready = match http.get(format!("{base}/status")).send().await {
                Ok(r) => r.text().await.ok().and_then(|t| serde_json::from_str::<Value>(&t).ok()),
                Err(_) => None,
            };
            if ready.is_some_and(|v| v["value"]["ready"] == true) {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not come up: {}", read(log));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1400,1800",
            &format!("--user-data-dir={}", profile.path().display()),
        ];
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            // The cluster's CA is this test's own.
            "acceptInsecureCerts": true,
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
        }}});
        let mut b = Browser { driver, base, session: String::new(), http, _profile: profile };
        let v = b.call(reqwest::Method::POST, "/session", caps).await;
        b.session = v["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {v}")).to_string();
        b
    }

    /// One WebDriver command; its `value`.
    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if !body.is_null() {
            req = req.header(reqwest::header::CONTENT_TYPE, "application/json").body(body.to_string());
        }
        let resp = req.send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
        let status = resp.status();
        let v: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap_or(Value::Null);
        assert!(status.is_success(), "{path}: {status} {v}");
        v["value"].clone()
    }

    async fn session(&self, method: reqwest::Method, tail: &str, body: Value) -> Value {
        self.call(method, &format!("/session/{}{tail}", self.session), body).await
    }

    async fn goto(&self, url: &str) {
        self.session(reqwest::Method::POST, "/url", json!({ "url": url })).await;
    }

    /// Runs `script` (a function body; `return` gives its value) in the page.
    async fn eval(&self, script: &str) -> Value {
        self.session(reqwest::Method::POST, "/execute/sync", json!({ "script": script, "args": [] })).await
    }

    /// Polls `script` until it returns something other than `null`/`false`.
    async fn wait(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let v = self.eval(script).await;
            if !v.is_null() && v != false {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; the page says: {}", self.text().await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn text(&self) -> Value {
        self.eval("return document.body.innerText").await
    }

    /// Types the token into the page's form and opens it.
    async fn log_in(&self, site: &str, token: &str) {
        self.goto(&format!("{site}/")).await;
        self.wait("the token form", "return !document.getElementById('login').hidden").await;
        let found = self
            .session(reqwest::Method::POST, "/element", json!({ "using": "css selector", "value": "#token" }))
            .await;
        let id = found.as_object().and_then(|o| o.values().next()).and_then(Value::as_str).unwrap().to_string();
        self.session(reqwest::Method::POST, &format!("/element/{id}/value"), json!({ "text": format!("{token}\n") }))
            .await;
        self.wait("the job list", "return document.querySelector('#jobs, #view .empty') !== null").await;
    }

    async fn screenshot(&self, path: &Path) {
        let png = self.session(reqwest::Method::GET, "/screenshot", Value::Null).await;
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
        println!("dashboard screenshot: {}", path.display());
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromedriver leads its own process group, Chromium's processes in it.
        // SAFETY: kill only sends a signal to the group this test started.
        unsafe { libc::kill(-(self.driver.id() as i32), libc::SIGKILL) };
        let _ = self.driver.wait();
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// An HTTP client of the API with this test binary's client certificate.
fn api_client() -> reqwest::Client {
    http_client(Some(admin_token())).build().unwrap()
}

/// A browser's view of the port: the CA trusted, no client certificate.
fn certless_client() -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(tls_dir().join("ca.pem")).unwrap()).unwrap();
    reqwest::Client::builder().tls_certs_only([ca]).build().unwrap()
}

/// Without a client certificate, a replica serving browsers gives the page
/// to anyone and the API to a token, and refuses gRPC even with a token.
async fn certless_reach_only_the_page_and_the_api(url: &str) {
    let c = certless_client();
    let page = c.get(format!("{url}/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("/dashboard/app.js"));
    let bearer = format!("Bearer {}", admin_token());
    let jobs = c.get(format!("{url}/api/v1/jobs")).send().await.unwrap();
    assert_eq!(jobs.status(), 401, "the API still needs a token");
    let jobs = c.get(format!("{url}/api/v1/jobs")).header("authorization", &bearer).send().await.unwrap();
    assert_eq!(jobs.status(), 200);
    let grpc = c
        .post(format!("{url}/flotilla.v1.JobService/ListJobs"))
        .header("authorization", &bearer)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(vec![0u8; 5])
        .send()
        .await
        .unwrap();
    let code = grpc.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_string());
    assert_eq!(code.as_deref(), Some("16"), "gRPC without a client certificate is unauthenticated: {grpc:?}");
}

async fn get(c: &reqwest::Client, url: &str) -> Value {
    let resp = c.get(url).send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
    serde_json::from_str(&resp.text().await.unwrap()).unwrap_or(Value::Null)
}

/// The dashboard's page for one job: the number of points of its loss chart.
const LOSS_POINTS: &str =
    "const c = document.getElementById('chart-loss'); return c ? Number(c.getAttribute('data-points')) : null;";

#[test]
fn the_dashboard_shows_a_job_training_live_and_through_a_follower() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_replicas, addrs) = cluster::start_replicas_with(d, 3, &["--browsers"]);
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&shots).unwrap();
    runtime().block_on(async {
        let (leader, _) = cluster::leader_client(&addrs).await;
        let follower = addrs.iter().find(|a| **a != leader).unwrap().clone();
        let list = addrs.join(",");
        let _workers = [worker(d, &list, "w1"), worker(d, &list, "w2")];
        certless_reach_only_the_page_and_the_api(&leader).await;
        let browser = Browser::start(&d.join("chromedriver.log")).await;
        browser.log_in(&leader, admin_token()).await;

        // Submitted once the page is open, so that it watches from the start.
        let api = api_client();
        let created = api
            .post(format!("{leader}/api/v1/jobs?base_dir={}", d.display()))
            .header(reqwest::header::CONTENT_TYPE, "application/yaml")
            .body(JOB)
            .send()
            .await
            .unwrap();
        let created: Value = serde_json::from_str(&created.text().await.unwrap()).unwrap();
        let id = created["job_id"].as_str().unwrap_or_else(|| panic!("not submitted: {created}")).to_string();

        // The list shows it (it refreshes by itself).
        let row = format!("return document.querySelector('tr.job[data-job=\"{id}\"]')?.innerText ?? null");
        let text = browser.wait("the job in the list", &row).await;
        assert!(text.as_str().unwrap().contains("watched"), "{text}");

        // Its page: the loss chart gains points as steps complete.
        browser.goto(&format!("{leader}/#/jobs/{id}")).await;
        let first = browser
            .wait("the first points", &format!("const n = (() => {{ {LOSS_POINTS} }})(); return n > 0 ? n : null;"))
            .await;
        let first = first.as_u64().unwrap();
        assert!(first < 3000, "the page saw the job only once it had ended ({first} points)");
        let more = format!("const n = (() => {{ {LOSS_POINTS} }})(); return n > {first} ? n : null;");
        let second = browser.wait("more points", &more).await.as_u64().unwrap();
        assert!(second > first, "{second} points after {first}");

        // The ranks table lists both ranks, with where their steps went, and
        // highlights the slowest.
        let ranks = browser
            .wait(
                "both ranks with their step times",
                "const rows = [...document.querySelectorAll('#ranks tr.rank')];
                 if (rows.length !== 2 || rows.some(r => r.cells[5].innerText === '–')) return null;
                 return rows.map(r => ({ worker: r.cells[0].innerText, rank: Number(r.dataset.rank),
                   slow: r.classList.contains('slow') }));",
            )
            .await;
        let rows = ranks.as_array().unwrap();
        let served = get(&api, &format!("{leader}/api/v1/jobs/{id}/ranks")).await;
        for (row, rank) in rows.iter().zip(served["ranks"].as_array().unwrap()) {
            assert_eq!((&row["rank"], &row["worker"]), (&rank["rank"], &rank["worker_id"]), "{ranks} vs {served}");
        }
        assert_eq!(rows.len(), served["world_size"].as_u64().unwrap() as usize, "{served}");
        assert_eq!(rows.iter().filter(|r| r["slow"] == true).count(), 1, "one rank is highlighted: {ranks}");
        browser.screenshot(&shots.join("job-running.png")).await;

        // The finished job shows its final loss: the last the API reports.
        let shown = browser
            .wait("the final loss", "return document.getElementById('final-loss')?.getAttribute('data-value') ?? null")
            .await;
        let shown: f64 = shown.as_str().unwrap().parse().unwrap();
        let job = get(&api, &format!("{leader}/api/v1/jobs/{id}")).await;
        let points = get(&api, &format!("{leader}/api/v1/jobs/{id}/metrics")).await;
        let last = points["points"].as_array().unwrap().last().cloned().unwrap_or(Value::Null);
        assert_eq!(job["phase"], "succeeded", "{job}");
        assert_eq!(Some(shown), job["loss"].as_f64(), "the page's final loss and the job's");
        assert_eq!(Some(shown), last["loss"].as_f64(), "the page's final loss and the last metric point's");
        let drawn = browser.eval(LOSS_POINTS).await;
        assert_eq!(drawn.as_u64(), Some(points["points"].as_array().unwrap().len() as u64), "every point is drawn");
        browser.screenshot(&shots.join("job-finished.png")).await;

        // A follower's dashboard (another origin: the token is typed again)
        // shows the same job, read through its forwarding to the leader.
        browser.log_in(&follower, admin_token()).await;
        let text = browser.wait("the job in the follower's list", &row).await;
        assert!(text.as_str().unwrap().contains("succeeded"), "{text}");
        browser.screenshot(&shots.join("jobs.png")).await;
        browser.goto(&format!("{follower}/#/jobs/{id}")).await;
        let shown_there = browser
            .wait(
                "the follower's final loss",
                "return document.getElementById('final-loss')?.getAttribute('data-value') ?? null",
            )
            .await;
        assert_eq!(shown_there.as_str().unwrap().parse::<f64>().ok(), Some(shown));
        browser.screenshot(&shots.join("follower.png")).await;

        // A sweep, on the follower's page: the leaderboard ranks every trial
        // as the API does, the chart has a point per trial with a metric.
        let fixtures = repo().join("tests/fixtures/sweep");
        let body = json!({
            "sweep": read(&fixtures.join("grid.yaml")),
            "job": read(&fixtures.join("job.yaml")),
            "base_dir": d,
        });
        let created = api
            .post(format!("{leader}/api/v1/sweeps"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let created: Value = serde_json::from_str(&created.text().await.unwrap()).unwrap();
        let sweep = created["sweep_id"].as_str().unwrap_or_else(|| panic!("not submitted: {created}")).to_string();
        browser.goto(&format!("{follower}/#/sweeps/{sweep}")).await;
        let board = browser
            .wait(
                "the finished sweep's leaderboard",
                "const rows = [...document.querySelectorAll('#leaderboard tbody tr')];
                 if (!document.querySelector('#view h1')?.innerText.includes('done')) return null;
                 return rows.map(r => [r.cells[0].innerText, r.cells[1].innerText]);",
            )
            .await;
        let served = get(&api, &format!("{leader}/api/v1/sweeps/{sweep}")).await;
        let mut ranked: Vec<&Value> = served["trials"].as_array().unwrap().iter().collect();
        ranked.sort_by_key(|t| t["rank"].as_u64().unwrap_or(u64::MAX));
        let expected: Vec<Value> = ranked
            .iter()
            .map(|t| json!([t["rank"].as_u64().map_or("–".to_string(), |r| r.to_string()), t["trial"].to_string()]))
            .collect();
        assert_eq!(board, json!(expected), "the page's leaderboard and the API's: {served}");
        let measured = ranked.iter().filter(|t| t["metric"].is_number()).count() as u64;
        assert!(measured >= 2, "{served}");
        let drawn =
            browser.eval("return Number(document.getElementById('chart-trials').getAttribute('data-points'))").await;
        assert_eq!(drawn.as_u64(), Some(measured));
        browser.screenshot(&shots.join("sweep.png")).await;
    });
}
