//! The HTTP/JSON API against real coordinator and worker processes, with
//! mutual TLS and tokens on: every route on one replica (a job submitted
//! as JSON, followed as server-sent events to its end, its metrics,
//! checkpoints, generations and registry outcome; workers; cancel), bad
//! bodies and unknown ids answered with their JSON errors, a stranger
//! refused without changing anything, the served OpenAPI document matching
//! the routes; and a client given a follower of three replicas.

mod support;

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use support::*;

/// An HTTP client with this test binary's CA and client certificate,
/// carrying `token` (none: no token at all), speaking HTTP/2 or HTTP/1.1.
fn http(token: Option<&str>) -> reqwest::Client {
    http_client(token).build().unwrap()
}

/// `method url` with an optional body (`Content-Type`, bytes); the status,
/// the headers and the body as JSON (`null` when it is not JSON).
async fn call(
    c: &reqwest::Client,
    method: Method,
    url: &str,
    body: Option<(&str, Vec<u8>)>,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let mut req = c.request(method, url);
    if let Some((content_type, bytes)) = body {
        req = req.header(reqwest::header::CONTENT_TYPE, content_type).body(bytes);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{url}: {e:?}"));
    let (status, headers) = (resp.status(), resp.headers().clone());
    let text = resp.text().await.unwrap();
    (status, headers, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn get(c: &reqwest::Client, url: &str) -> (StatusCode, Value) {
    let (s, _, v) = call(c, Method::GET, url, None).await;
    (s, v)
}

/// Asserts an answer is the JSON error `code` with HTTP status `status`.
fn assert_error(answer: &(StatusCode, Value), status: u16, code: &str, what: &str) {
    assert_eq!(answer.0.as_u16(), status, "{what}: {}", answer.1);
    assert_eq!(answer.1["code"], code, "{what}: {}", answer.1);
    assert!(answer.1["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {}", answer.1);
}

/// Opens a job's event stream (its first status is taken when it opens).
async fn open_events(c: &reqwest::Client, url: &str) -> reqwest::Response {
    let resp = c.get(url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{url}");
    let content_type = resp.headers()[reqwest::header::CONTENT_TYPE].to_str().unwrap().to_string();
    assert!(content_type.starts_with("text/event-stream"), "{content_type}");
    resp
}

/// Reads a job's event stream to its end: (event, data) in order.
async fn follow(c: &reqwest::Client, url: &str) -> Vec<(String, Value)> {
    read_events(open_events(c, url).await).await
}

async fn read_events(mut resp: reqwest::Response) -> Vec<(String, Value)> {
    let mut text = String::new();
    let read = async {
        while let Some(chunk) = resp.chunk().await.unwrap() {
            text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    };
    // A guard against a stream that never ends, not a speed bound.
    tokio::time::timeout(Duration::from_secs(300), read).await.expect("the event stream did not end");
    let mut events = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let mut name = String::new();
        let mut data = String::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                name = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim());
            }
        }
        if !name.is_empty() {
            events.push((name, serde_json::from_str(&data).unwrap_or_else(|e| panic!("{data}: {e}"))));
        }
    }
    events
}

/// A job that waits: it needs more workers than the test starts.
const WAITING_JOB: &str = "
name: waits
model: {kind: mlp, layers: [4, 8, 2]}
data: {kind: synthetic, seed: 1, samples: 64}
train: {steps: 10, global_batch: 8, seed: 1}
workers: {min: 4, max: 4}
";

#[test]
fn every_route_on_one_replica() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_coord, url) = coordinator(d);
    let api = format!("{url}/api/v1");
    let reader = create_token(d, &url, "read", "reader");
    runtime().block_on(async {
        let admin = http(Some(admin_token()));
        let stranger = http(None);
        let forger = http(Some("flt_0000000000000000000000000000000000000000000000000000000000000000"));

        // The OpenAPI document is served as kept in the repository, to anyone.
        let (s, doc) = get(&stranger, &format!("{api}/openapi.json")).await;
        assert_eq!(s, StatusCode::OK);
        let kept: Value =
            serde_json::from_str(&std::fs::read_to_string(repo().join("docs/openapi.json")).unwrap()).unwrap();
        assert_eq!(doc, kept);
        let (s, leader) = get(&stranger, &format!("{api}/leader")).await;
        assert_eq!((s, leader["is_leader"].as_bool()), (StatusCode::OK, Some(true)), "{leader}");

        // A stranger, or a forged token, is refused and changes nothing.
        let yaml = WAITING_JOB.as_bytes().to_vec();
        let submit_url = format!("{api}/jobs?base_dir={}", d.display());
        for (who, c) in [("no token", &stranger), ("forged token", &forger)] {
            let a = call(c, Method::POST, &submit_url, Some(("application/yaml", yaml.clone()))).await;
            assert_error(&(a.0, a.2), 401, "unauthenticated", who);
            assert_error(&get(c, &format!("{api}/jobs")).await, 401, "unauthenticated", who);
            assert_error(&get(c, &format!("{api}/workers")).await, 401, "unauthenticated", who);
        }
        // A reader reads but may not submit.
        let read = http(Some(&reader));
        let a = call(&read, Method::POST, &submit_url, Some(("application/yaml", yaml.clone()))).await;
        assert_error(&(a.0, a.2), 403, "permission_denied", "a reader submitting");
        let (s, jobs) = get(&read, &format!("{api}/jobs")).await;
        assert_eq!((s, jobs["jobs"].clone()), (StatusCode::OK, json!([])), "nothing was submitted");
        // A client that speaks only HTTP/1.1 (ALPN http/1.1) is served too.
        let http1 = http_client(Some(&reader)).http1_only().build().unwrap();
        let resp = http1.get(format!("{api}/jobs")).send().await.unwrap();
        assert_eq!((resp.status(), resp.version()), (StatusCode::OK, reqwest::Version::HTTP_11));

        // Bad bodies get their JSON errors, naming what is wrong.
        let bad_yaml = b"name: bad\nmodel: {kind: mlp, layers: [4, 2]}\nbogus_field: 1\n".to_vec();
        let a = call(&admin, Method::POST, &submit_url, Some(("application/yaml", bad_yaml))).await;
        assert_error(&(a.0, a.2.clone()), 400, "invalid_argument", "an unknown field");
        assert!(a.2["message"].as_str().unwrap().contains("bogus_field"), "{}", a.2);
        let a = call(&admin, Method::POST, &format!("{api}/jobs"), Some(("application/json", b"{\"job\": ".to_vec())))
            .await;
        assert_error(&(a.0, a.2), 400, "invalid_argument", "truncated JSON");
        let a =
            call(&admin, Method::POST, &format!("{api}/jobs"), Some(("application/json", b"{\"job\": 3}".to_vec())))
                .await;
        assert_error(&(a.0, a.2), 400, "invalid_argument", "a job that is a number");
        let a = call(&admin, Method::POST, &format!("{api}/jobs"), Some(("text/csv", b"a,b".to_vec()))).await;
        assert_error(&(a.0, a.2), 400, "invalid_argument", "a CSV body");
        let a =
            call(&admin, Method::POST, &format!("{api}/jobs"), Some(("application/yaml", WAITING_JOB.into()))).await;
        assert_error(&(a.0, a.2.clone()), 400, "invalid_argument", "no base_dir");
        assert!(a.2["message"].as_str().unwrap().contains("base_dir"), "{}", a.2);

        // Unknown ids, routes and methods.
        for tail in ["", "/metrics", "/checkpoints", "/generations", "/registration", "/events"] {
            assert_error(&get(&admin, &format!("{api}/jobs/nope-1{tail}")).await, 404, "not_found", tail);
        }
        for tail in ["/cancel", "/register"] {
            let a = call(&admin, Method::POST, &format!("{api}/jobs/nope-1{tail}"), None).await;
            assert_error(&(a.0, a.2), 404, "not_found", tail);
        }
        assert_error(&get(&admin, &format!("{api}/nothing")).await, 404, "not_found", "no such route");
        let a = call(&admin, Method::DELETE, &format!("{api}/jobs"), None).await;
        assert_error(&(a.0, a.2), 405, "method_not_allowed", "DELETE /jobs");

        // A job submitted as JSON, with a registry, followed to its end.
        let registry = format!("file://{}/models", d.display());
        let job = json!({
            "name": "web",
            "model": {"kind": "mlp", "layers": [4, 8, 2]},
            "data": {"kind": "synthetic", "seed": 1, "samples": 64},
            "train": {"steps": 12, "global_batch": 8, "seed": 1},
            "workers": {"min": 1, "max": 1},
            "checkpoint": {"url": "runs", "every": 4, "keep": 2},
            "registry": {"kind": "builtin", "url": registry, "model": "web"},
        });
        let body = json!({"job": job, "base_dir": d, "submission_id": "web-once"});
        let (s, headers, created) =
            call(&admin, Method::POST, &format!("{api}/jobs"), Some(("application/json", body.to_string().into())))
                .await;
        assert_eq!(s, StatusCode::CREATED, "{created}");
        let id = created["job_id"].as_str().unwrap().to_string();
        assert_eq!(headers["location"], format!("/api/v1/jobs/{id}").as_str());
        // The same submission again is the same job.
        let (s, _, again) =
            call(&admin, Method::POST, &format!("{api}/jobs"), Some(("application/json", body.to_string().into())))
                .await;
        assert_eq!((s, again["job_id"].as_str()), (StatusCode::CREATED, Some(id.as_str())));

        let stream = open_events(&read, &format!("{api}/jobs/{id}/events")).await;
        let _worker = worker(d, &url, "w0");
        let events = read_events(stream).await;
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.last(), Some(&"end"), "{names:?}");
        let (_, end) = events.last().unwrap();
        assert_eq!(end["phase"], "succeeded", "{end}");
        let phases: Vec<&str> =
            events.iter().filter(|(n, _)| n == "phase").map(|(_, v)| v["phase"].as_str().unwrap()).collect();
        assert_eq!(phases.first(), Some(&"pending"), "{phases:?}");
        assert!(phases.contains(&"running") && phases.last() == Some(&"succeeded"), "{phases:?}");
        assert!(names.contains(&"progress"), "{names:?}");
        let streamed: Vec<u64> =
            events.iter().filter(|(n, _)| n == "metric").map(|(_, v)| v["step"].as_u64().unwrap()).collect();
        assert!(!streamed.is_empty() && streamed.windows(2).all(|w| w[0] < w[1]), "{streamed:?}");

        // What the job left: status, metric history, checkpoints, generations, registry outcome.
        let (s, status) = get(&read, &format!("{api}/jobs/{id}")).await;
        assert_eq!(
            (s, status["phase"].as_str(), status["step"].as_u64()),
            (StatusCode::OK, Some("succeeded"), Some(12))
        );
        let (_, metrics) = get(&read, &format!("{api}/jobs/{id}/metrics")).await;
        let history: Vec<u64> =
            metrics["points"].as_array().unwrap().iter().map(|p| p["step"].as_u64().unwrap()).collect();
        assert_eq!(history, streamed, "every metric point was streamed once, in order");
        assert!(metrics["points"][0]["loss"].as_f64().is_some_and(f64::is_finite), "{metrics}");
        let (_, ckpts) = get(&read, &format!("{api}/jobs/{id}/checkpoints")).await;
        let steps: Vec<u64> =
            ckpts["checkpoints"].as_array().unwrap().iter().map(|c| c["step"].as_u64().unwrap()).collect();
        assert!(!steps.is_empty() && steps.iter().all(|s| s % 4 == 0), "{ckpts}");
        assert_eq!(ckpts["latest"]["step"].as_u64(), steps.last().copied(), "{ckpts}");
        let (_, gens) = get(&read, &format!("{api}/jobs/{id}/generations")).await;
        assert!(!gens["generations"].as_array().unwrap().is_empty(), "{gens}");
        assert_eq!(gens["generations"][0]["world_size"], 1, "{gens}");
        let (_, reg) = get(&read, &format!("{api}/jobs/{id}/registration")).await;
        assert_eq!(
            (reg["registration"]["model"].as_str(), reg["registration"]["version"].as_u64()),
            (Some("web"), Some(1)),
            "{reg}"
        );
        assert!(d.join("models/web/1").is_dir(), "the registry outcome is real");
        // The trained model: its files, and the bytes of one, as the registry keeps them.
        let (s, model) = get(&read, &format!("{api}/jobs/{id}/model")).await;
        assert_eq!(s, StatusCode::OK, "{model}");
        assert!(model["location"].as_str().unwrap().contains("models/web/1"), "{model}");
        let files: Vec<&str> = model["files"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
        assert!(files.contains(&"model.safetensors"), "{model}");
        let resp = read.get(format!("{api}/jobs/{id}/model/model.safetensors")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let kept = std::fs::read(d.join("models/web/1/model.safetensors")).unwrap();
        assert_eq!(resp.bytes().await.unwrap().as_ref(), kept.as_slice());
        let missing = get(&read, &format!("{api}/jobs/{id}/model/nope.bin")).await;
        assert_error(&missing, 404, "not_found", "an unknown model file");
        // Registering again answers with the version, never a second one.
        let (s, _, again) = call(&admin, Method::POST, &format!("{api}/jobs/{id}/register"), None).await;
        assert_eq!((s, again["registration"]["version"].as_u64()), (StatusCode::OK, Some(1)), "{again}");
        assert!(!d.join("models/web/2").exists());

        // Workers.
        let (s, workers) = get(&read, &format!("{api}/workers")).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(workers["workers"].as_array().unwrap().len(), 1, "{workers}");
        assert!(workers["workers"][0]["worker_id"].as_str().is_some_and(|w| !w.is_empty()), "{workers}");

        // Cancel: a job that waits for workers, as YAML; a reader may not, the submitter may.
        let a = call(&admin, Method::POST, &submit_url, Some(("application/yaml", yaml.clone()))).await;
        assert_eq!(a.0, StatusCode::CREATED, "{}", a.2);
        let waiting = a.2["job_id"].as_str().unwrap().to_string();
        let untrained = get(&read, &format!("{api}/jobs/{waiting}/model")).await;
        assert_error(&untrained, 409, "failed_precondition", "the model of an untrained job");
        let a = call(&read, Method::POST, &format!("{api}/jobs/{waiting}/cancel"), None).await;
        assert_error(&(a.0, a.2), 403, "permission_denied", "a reader cancelling");
        let a = call(&stranger, Method::POST, &format!("{api}/jobs/{waiting}/cancel"), None).await;
        assert_error(&(a.0, a.2), 401, "unauthenticated", "a stranger cancelling");
        assert_eq!(get(&read, &format!("{api}/jobs/{waiting}")).await.1["phase"], "pending");
        let (s, _, cancelled) = call(&admin, Method::POST, &format!("{api}/jobs/{waiting}/cancel"), None).await;
        assert_eq!((s, cancelled["phase"].as_str()), (StatusCode::OK, Some("cancelled")), "{cancelled}");
        let (_, jobs) = get(&read, &format!("{api}/jobs")).await;
        let listed: Vec<&str> =
            jobs["jobs"].as_array().unwrap().iter().map(|j| j["job_id"].as_str().unwrap()).collect();
        assert_eq!(listed, [id.as_str(), waiting.as_str()]);

        // Every documented route is served (none answers "no such route").
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
                let (s, _, v) = call(
                    &admin,
                    m,
                    &format!("{url}{}", path.replace("{job_id}", &id).replace("{file}", "model.safetensors")),
                    None,
                )
                .await;
                assert!(s != StatusCode::METHOD_NOT_ALLOWED, "{method} {path}: {v}");
                assert!(!v["message"].as_str().unwrap_or_default().starts_with("no route"), "{method} {path}: {v}");
            }
        }
    });
}

#[test]
fn a_client_given_a_follower_works() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ports = cluster::free_ports(3);
    let _replicas: Vec<Proc> = (1..=3).map(|i| cluster::replica(d, i, &ports)).collect();
    runtime().block_on(async {
        let admin = http(Some(admin_token()));
        // A follower that knows the leader.
        let follower = loop {
            let mut found = None;
            for port in &ports {
                let url = format!("https://127.0.0.1:{port}");
                if let Ok(r) = admin.get(format!("{url}/api/v1/leader")).send().await {
                    let v: Value = r.json().await.unwrap_or(Value::Null);
                    if v["is_leader"] == false && v["leader"].as_str().is_some_and(|l| !l.is_empty()) {
                        found = Some(url);
                    }
                }
            }
            if let Some(url) = found {
                break url;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let api = format!("{follower}/api/v1");

        // A stranger is refused by the follower itself.
        assert_error(&get(&http(None), &format!("{api}/jobs")).await, 401, "unauthenticated", "a stranger");

        let submit_url = format!("{api}/jobs?base_dir={}", d.display());
        let (s, headers, created) =
            call(&admin, Method::POST, &submit_url, Some(("application/yaml", WAITING_JOB.into()))).await;
        assert_eq!(s, StatusCode::CREATED, "{created}");
        let leader = headers["flotilla-leader"].to_str().unwrap().to_string();
        let port = follower.rsplit(':').next().unwrap();
        assert!(!leader.ends_with(&format!(":{port}")), "the leader answered, not {follower}: {leader}");
        let id = created["job_id"].as_str().unwrap().to_string();

        // Every read route, through the follower.
        let (s, job) = get(&admin, &format!("{api}/jobs/{id}")).await;
        assert_eq!((s, job["phase"].as_str()), (StatusCode::OK, Some("pending")), "{job}");
        for tail in ["metrics", "checkpoints", "generations", "registration"] {
            let (s, v) = get(&admin, &format!("{api}/jobs/{id}/{tail}")).await;
            assert_eq!((s, v["job_id"].as_str()), (StatusCode::OK, Some(id.as_str())), "{tail}: {v}");
        }
        let (s, workers) = get(&admin, &format!("{api}/workers")).await;
        assert_eq!((s, workers["workers"].clone()), (StatusCode::OK, json!([])));
        let (_, jobs) = get(&admin, &format!("{api}/jobs")).await;
        assert_eq!(jobs["jobs"].as_array().unwrap().len(), 1, "{jobs}");

        // Errors come back as the leader gave them.
        assert_error(&get(&admin, &format!("{api}/jobs/nope-1")).await, 404, "not_found", "an unknown id");
        let a = call(&admin, Method::POST, &submit_url, Some(("application/yaml", b"name: [".to_vec()))).await;
        assert_error(&(a.0, a.2), 400, "invalid_argument", "bad YAML");

        // Events through the follower, to the end: the job is cancelled meanwhile.
        let events = {
            let follow_url = format!("{api}/jobs/{id}/events");
            let stream = tokio::spawn({
                let admin = admin.clone();
                async move { follow(&admin, &follow_url).await }
            });
            let (s, _, cancelled) = call(&admin, Method::POST, &format!("{api}/jobs/{id}/cancel"), None).await;
            assert_eq!((s, cancelled["phase"].as_str()), (StatusCode::OK, Some("cancelled")), "{cancelled}");
            stream.await.unwrap()
        };
        let (name, end) = events.last().unwrap();
        assert_eq!((name.as_str(), end["phase"].as_str()), ("end", Some("cancelled")), "{events:?}");
    });
}
