//! The API's sweep handlers: submit (JSON: the sweep file and its base job,
//! each as an object or as YAML text), list, get (with the leaderboard),
//! cancel.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::response::Response;
use flotilla_proto::v1 as pb;
use http::{header, HeaderValue, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use tonic::Status;

use super::{json as j, ok_json, ApiError, Http, Who};
use crate::api;
use crate::limits::Bounded;

type Answer = Result<Response, ApiError>;

fn invalid(message: String) -> ApiError {
    ApiError::from(Status::invalid_argument(message))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitSweepBody {
    sweep: Value,
    job: Value,
    base_dir: Option<String>,
    origin: Option<String>,
    job_origin: Option<String>,
    submission_id: Option<String>,
}

/// An object as pretty JSON (so an error's line points into it), or text.
fn text(field: &str, v: Value) -> Result<String, ApiError> {
    match v {
        Value::String(t) => Ok(t),
        v @ Value::Object(_) => Ok(serde_json::to_string_pretty(&v).unwrap_or_default()),
        other => Err(invalid(format!(
            "{field} must be an object or YAML text; got {}",
            crate::limits::quote(&other.to_string())
        ))),
    }
}

pub(super) async fn submit(
    State(h): State<Arc<Http>>,
    Who(caller): Who,
    body: Result<Bytes, BytesRejection>,
) -> Answer {
    api::lead(&h.c)?;
    let body = body.map_err(|e| invalid(format!("the request body: {}", e.body_text())))?;
    let b: SubmitSweepBody = serde_json::from_slice(&body)
        .map_err(|e| invalid(format!("the request body is not a sweep submission: {e}")))?;
    let req = pb::SubmitSweepRequest {
        sweep_yaml: text("sweep", b.sweep)?,
        sweep_origin: b.origin.unwrap_or_else(|| "sweep".into()),
        job_yaml: text("job", b.job)?,
        job_origin: b.job_origin.unwrap_or_else(|| "job".into()),
        base_dir: b.base_dir.unwrap_or_default(),
        submission_id: b.submission_id.unwrap_or_default(),
    };
    req.check()?;
    let id = api::submit_sweep(&h.c, &caller, req).await?;
    let mut resp = ok_json(StatusCode::CREATED, json!({ "sweep_id": id }));
    if let Ok(location) = HeaderValue::from_str(&format!("/api/v1/sweeps/{id}")) {
        resp.headers_mut().insert(header::LOCATION, location);
    }
    Ok(resp)
}

fn sweep_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(id) = path.map_err(|e| invalid(format!("the sweep id in the path: {}", e.body_text())))?;
    crate::limits::check_id("sweep_id", &id)?;
    Ok(id)
}

pub(super) async fn list(State(h): State<Arc<Http>>) -> Answer {
    let sweeps = api::list_sweeps(&h.c).await?;
    Ok(ok_json(StatusCode::OK, json!({ "sweeps": sweeps.iter().map(j::sweep).collect::<Vec<_>>() })))
}

pub(super) async fn get(State(h): State<Arc<Http>>, path: Result<Path<String>, PathRejection>) -> Answer {
    let id = sweep_id(path)?;
    Ok(ok_json(StatusCode::OK, j::sweep(&api::get_sweep(&h.c, &id).await?)))
}

pub(super) async fn cancel(
    State(h): State<Arc<Http>>,
    Who(caller): Who,
    path: Result<Path<String>, PathRejection>,
) -> Answer {
    api::lead(&h.c)?;
    let id = sweep_id(path)?;
    Ok(ok_json(StatusCode::OK, j::sweep(&api::cancel_sweep(&h.c, &caller, &id).await?)))
}
