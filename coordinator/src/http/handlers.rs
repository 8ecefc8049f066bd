//! The API's handlers: parse the request, call `api`, answer JSON.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::response::Response;
use flotilla_proto::v1 as pb;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_stream::StreamExt;
use tonic::Status;

use super::{json as j, ok_json, ApiError, Http, JobId, Who};
use crate::api;
use crate::limits::Bounded;

type Answer = Result<Response, ApiError>;

fn ok(value: Value) -> Answer {
    Ok(ok_json(StatusCode::OK, value))
}

pub(super) async fn openapi() -> Response {
    let mut resp = Response::new(axum::body::Body::from(super::OPENAPI));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

pub(super) async fn leader(State(h): State<Arc<Http>>) -> Answer {
    ok(json!({ "is_leader": h.c.store.is_leader(), "leader": h.c.store.leader_hint().unwrap_or_default() }))
}

/// Options of a submission: in the query string (a YAML body) or beside
/// the job in a JSON body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SubmitOptions {
    base_dir: Option<String>,
    origin: Option<String>,
    submission_id: Option<String>,
}

/// A JSON submission: the job file as an object (the same fields as its
/// YAML) or as YAML text, and the options.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitBody {
    job: Value,
    base_dir: Option<String>,
    origin: Option<String>,
    submission_id: Option<String>,
}

fn invalid(message: String) -> ApiError {
    ApiError::from(Status::invalid_argument(message))
}

/// The job file's text and the options of a submission's body.
fn parse_submission(headers: &HeaderMap, body: &[u8], query: SubmitOptions) -> Result<pb::SubmitJobRequest, ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("application/yaml");
    let mime = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    let (spec_yaml, opts) = match mime.as_str() {
        "application/json" => {
            let b: SubmitBody = serde_json::from_slice(body)
                .map_err(|e| invalid(format!("the request body is not a submission: {e}")))?;
            let spec = match b.job {
                Value::String(text) => text,
                // Pretty, so that a job-file error's line points into it.
                v @ Value::Object(_) => serde_json::to_string_pretty(&v).unwrap_or_default(),
                other => {
                    return Err(invalid(format!(
                        "job must be the job file as an object, or its YAML text; got {}",
                        crate::limits::quote(&other.to_string())
                    )))
                }
            };
            let opts = SubmitOptions {
                base_dir: b.base_dir.or(query.base_dir),
                origin: b.origin.or(query.origin),
                submission_id: b.submission_id.or(query.submission_id),
            };
            (spec, opts)
        }
        "application/yaml" | "application/x-yaml" | "text/yaml" | "text/x-yaml" | "text/plain" => {
            let text =
                String::from_utf8(body.to_vec()).map_err(|e| invalid(format!("the job file is not UTF-8: {e}")))?;
            (text, query)
        }
        other => {
            return Err(invalid(format!(
                "Content-Type {} is not accepted: send the job file as application/yaml, or a submission as \
                 application/json",
                crate::limits::quote(other)
            )))
        }
    };
    let req = pb::SubmitJobRequest {
        spec_yaml,
        origin: opts.origin.unwrap_or_else(|| "request body".into()),
        base_dir: opts.base_dir.unwrap_or_default(),
        submission_id: opts.submission_id.unwrap_or_default(),
    };
    req.check()?;
    Ok(req)
}

pub(super) async fn submit(
    State(h): State<Arc<Http>>,
    Who(caller): Who,
    query: Result<Query<SubmitOptions>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Answer {
    api::lead(&h.c)?;
    let Query(query) = query.map_err(|e| invalid(format!("the query string: {}", e.body_text())))?;
    let body = body.map_err(|e| invalid(format!("the request body: {}", e.body_text())))?;
    let req = parse_submission(&headers, &body, query)?;
    let job_id = api::submit(&h.c, &caller, req).await?;
    let mut resp = ok_json(StatusCode::CREATED, json!({ "job_id": job_id }));
    if let Ok(location) = HeaderValue::from_str(&format!("/api/v1/jobs/{job_id}")) {
        resp.headers_mut().insert(header::LOCATION, location);
    }
    Ok(resp)
}

pub(super) async fn list_jobs(State(h): State<Arc<Http>>) -> Answer {
    api::lead(&h.c)?;
    let jobs = api::list_jobs(&h.c).await?;
    ok(json!({ "jobs": jobs.iter().map(j::job).collect::<Vec<_>>() }))
}

pub(super) async fn get_job(State(h): State<Arc<Http>>, JobId(job): JobId) -> Answer {
    api::lead(&h.c)?;
    ok(j::job(&api::get_job(&h.c, &job).await?))
}

pub(super) async fn cancel(State(h): State<Arc<Http>>, Who(caller): Who, JobId(job): JobId) -> Answer {
    api::lead(&h.c)?;
    ok(j::job(&api::cancel(&h.c, &caller, &job).await?))
}

pub(super) async fn register(State(h): State<Arc<Http>>, Who(caller): Who, JobId(job): JobId) -> Answer {
    api::lead(&h.c)?;
    ok(j::job(&api::register_model(&h.c, &caller, &job).await?))
}

pub(super) async fn metrics(State(h): State<Arc<Http>>, JobId(job): JobId) -> Answer {
    api::lead(&h.c)?;
    let points = api::metrics(&h.c, &job)?;
    ok(json!({ "job_id": job, "points": points.iter().map(j::metric).collect::<Vec<_>>() }))
}

pub(super) async fn checkpoints(State(h): State<Arc<Http>>, JobId(job): JobId) -> Answer {
    api::lead(&h.c)?;
    let s = api::get_job(&h.c, &job).await?;
    ok(json!({
        "job_id": s.job_id,
        "latest": s.latest_checkpoint.as_ref().map(j::checkpoint),
        "checkpoints": s.checkpoints.iter().map(j::checkpoint).collect::<Vec<_>>(),
    }))
}

pub(super) async fn generations(State(h): State<Arc<Http>>, JobId(job): JobId) -> Answer {
    api::lead(&h.c)?;
    let s = api::get_job(&h.c, &job).await?;
    ok(json!({
        "job_id": s.job_id,
        "generation": s.generation,
        "restarts": s.restarts,
        "generations": s.generations.iter().map(j::generation).collect::<Vec<_>>(),
    }))
}

/// The ranks of the job's running generation, and which is the slowest
/// (the longest mean step among those that reported where their steps went).
pub(super) async fn ranks(State(h): State<Arc<Http>>, JobId(job): JobId) -> Answer {
    api::lead(&h.c)?;
    let s = api::get_job(&h.c, &job).await?;
    let slowest = s
        .ranks
        .iter()
        .filter_map(|r| r.step_times.map(|t| (r.rank, t.step_ms)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(rank, _)| rank);
    ok(json!({
        "job_id": s.job_id,
        "generation": s.generation,
        "world_size": s.world_size,
        "slowest_rank": slowest,
        "ranks": s.ranks.iter().map(j::rank).collect::<Vec<_>>(),
    }))
}

pub(super) async fn registration(State(h): State<Arc<Http>>, JobId(job): JobId) -> Answer {
    api::lead(&h.c)?;
    let s = api::get_job(&h.c, &job).await?;
    ok(json!({
        "job_id": s.job_id,
        "phase": j::phase(s.phase),
        "final_model": s.final_model,
        "registration": j::registration(s.registration.as_ref()),
    }))
}

pub(super) async fn model_files(State(h): State<Arc<Http>>, JobId(job): JobId) -> Answer {
    api::lead(&h.c)?;
    let (storage, files) = api::model_files(&h.c, &job).await?;
    let files: Vec<Value> = files.iter().map(|(name, bytes)| json!({ "name": name, "bytes": bytes })).collect();
    ok(json!({ "job_id": job, "location": storage.url(), "files": files }))
}

pub(super) async fn model_file(
    State(h): State<Arc<Http>>,
    path: Result<axum::extract::Path<(String, String)>, axum::extract::rejection::PathRejection>,
) -> Answer {
    api::lead(&h.c)?;
    let axum::extract::Path((job, file)) = path.map_err(|e| invalid(format!("the path: {}", e.body_text())))?;
    crate::limits::check_id("job_id", &job)?;
    let (size, chunks) = api::model_file(&h.c, &job, &file).await?;
    let body = axum::body::Body::from_stream(chunks.map(|c| c.map(Bytes::from)));
    let mut resp = Response::new(body);
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    Ok(resp)
}

pub(super) async fn workers(State(h): State<Arc<Http>>) -> Answer {
    api::lead(&h.c)?;
    let workers = api::workers(&h.c).await?;
    ok(json!({ "workers": workers.iter().map(j::worker).collect::<Vec<_>>() }))
}

/// A route asked with a method it does not have: 405, code
/// `method_not_allowed` (a routing answer, not a domain error).
pub(super) async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let message = format!("{method} is not a method of {}", crate::limits::quote(uri.path()));
    ok_json(StatusCode::METHOD_NOT_ALLOWED, json!({ "code": "method_not_allowed", "message": message }))
}

pub(super) async fn no_such_route(method: Method, uri: Uri) -> ApiError {
    ApiError::from(Status::not_found(format!(
        "no route {method} {}; the routes are in {}",
        crate::limits::quote(uri.path()),
        super::OPENAPI_PATH
    )))
}

/// `GET /metrics`: this replica's series, in Prometheus's text format.
pub(super) async fn metrics_text(State(h): State<Arc<Http>>, Who(_): Who) -> Response {
    let mut resp = Response::new(axum::body::Body::from(crate::telemetry::render(&h.c)));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(crate::telemetry::CONTENT_TYPE));
    resp
}
