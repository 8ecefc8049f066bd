//! The HTTP/JSON API, served on the coordinator's one port beside gRPC
//! (same TLS, same tokens): a thin layer over the client operations in
//! `api` that the gRPC `JobService` calls too. Routes are listed once, in
//! [`routes`]: the router is built from the list, `auth` takes each
//! route's roles from the gRPC method it mirrors, and `docs/openapi.json`
//! is checked against it. A follower replica forwards requests to the
//! leader (`forward`). Errors are `{"code", "message"}` with the HTTP
//! status of `convert::api_error`. The web dashboard (`dashboard`) is served
//! at `/` beside the API and reads it.

pub mod dashboard;
mod events;
mod forward;
mod handlers;
pub mod json;
mod sweeps;

use std::sync::{Arc, Mutex};

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use axum::routing::{self, MethodRouter};
use http::request::Parts;
use http::{header, HeaderValue, Method, StatusCode};
use tonic::Status;

use crate::auth::Caller;
use crate::coordinator::Coordinator;

/// Every path of the HTTP API starts with this.
pub const PREFIX: &str = "/api/";
/// Where the OpenAPI document is served.
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";
/// The OpenAPI document (kept in the repository, `docs/openapi.json`).
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

/// The HTTP API's state: the coordinator, and the channel to the leader
/// that a follower forwards through.
pub(crate) struct Http {
    c: Arc<Coordinator>,
    leader: Mutex<Option<(String, tonic::transport::Channel)>>,
}

type Handler = fn() -> MethodRouter<Arc<Http>>;

/// One route of the API.
pub struct Route {
    pub method: Method,
    /// The path, with `{name}` for a path parameter.
    pub path: &'static str,
    /// The gRPC method whose roles (`auth`) apply to this route.
    pub twin: &'static str,
    /// Answered by any replica; the others are forwarded to the leader.
    pub local: bool,
    handler: Handler,
}

const GET_LEADER: &str = "/flotilla.v1.JobService/GetLeader";
const SUBMIT: &str = "/flotilla.v1.JobService/SubmitJob";
const LIST: &str = "/flotilla.v1.JobService/ListJobs";
const GET: &str = "/flotilla.v1.JobService/GetJob";
const CANCEL: &str = "/flotilla.v1.JobService/CancelJob";
const WATCH: &str = "/flotilla.v1.JobService/WatchJob";
const METRICS: &str = "/flotilla.v1.JobService/GetMetrics";
const REGISTER: &str = "/flotilla.v1.JobService/RegisterModel";
const SUBMIT_SWEEP: &str = "/flotilla.v1.JobService/SubmitSweep";
const LIST_SWEEPS: &str = "/flotilla.v1.JobService/ListSweeps";
const GET_SWEEP: &str = "/flotilla.v1.JobService/GetSweep";
const CANCEL_SWEEP: &str = "/flotilla.v1.JobService/CancelSweep";

/// Every route of the API.
pub fn routes() -> Vec<Route> {
    fn route(method: Method, path: &'static str, twin: &'static str, handler: Handler) -> Route {
        Route { method, path, twin, local: twin == GET_LEADER, handler }
    }
    use handlers as h;
    vec![
        route(Method::GET, OPENAPI_PATH, GET_LEADER, || routing::get(h::openapi)),
        route(Method::GET, "/api/v1/leader", GET_LEADER, || routing::get(h::leader)),
        route(Method::POST, "/api/v1/jobs", SUBMIT, || routing::post(h::submit)),
        route(Method::GET, "/api/v1/jobs", LIST, || routing::get(h::list_jobs)),
        route(Method::GET, "/api/v1/jobs/{job_id}", GET, || routing::get(h::get_job)),
        route(Method::POST, "/api/v1/jobs/{job_id}/cancel", CANCEL, || routing::post(h::cancel)),
        route(Method::GET, "/api/v1/jobs/{job_id}/events", WATCH, || routing::get(events::follow)),
        route(Method::GET, "/api/v1/jobs/{job_id}/metrics", METRICS, || routing::get(h::metrics)),
        route(Method::GET, "/api/v1/jobs/{job_id}/checkpoints", GET, || routing::get(h::checkpoints)),
        route(Method::GET, "/api/v1/jobs/{job_id}/generations", GET, || routing::get(h::generations)),
        route(Method::GET, "/api/v1/jobs/{job_id}/ranks", GET, || routing::get(h::ranks)),
        route(Method::GET, "/api/v1/jobs/{job_id}/registration", GET, || routing::get(h::registration)),
        route(Method::POST, "/api/v1/jobs/{job_id}/register", REGISTER, || routing::post(h::register)),
        route(Method::GET, "/api/v1/jobs/{job_id}/model", GET, || routing::get(h::model_files)),
        route(Method::GET, "/api/v1/jobs/{job_id}/model/{file}", GET, || routing::get(h::model_file)),
        route(Method::GET, "/api/v1/workers", LIST, || routing::get(h::workers)),
        route(Method::POST, "/api/v1/sweeps", SUBMIT_SWEEP, || routing::post(sweeps::submit)),
        route(Method::GET, "/api/v1/sweeps", LIST_SWEEPS, || routing::get(sweeps::list)),
        route(Method::GET, "/api/v1/sweeps/{sweep_id}", GET_SWEEP, || routing::get(sweeps::get)),
        route(Method::POST, "/api/v1/sweeps/{sweep_id}/cancel", CANCEL_SWEEP, || routing::post(sweeps::cancel)),
    ]
}

/// The API's router, to be merged with the gRPC routes.
pub fn router(c: Arc<Coordinator>) -> axum::Router {
    let state = Arc::new(Http { c, leader: Mutex::new(None) });
    // One method router per path (GET and POST of /jobs share one), with
    // the JSON answer for the methods it lacks.
    let mut paths: Vec<(&'static str, MethodRouter<Arc<Http>>)> = Vec::new();
    for r in routes() {
        match paths.iter_mut().find(|(p, _)| *p == r.path) {
            Some((_, methods)) => *methods = std::mem::take(methods).merge((r.handler)()),
            None => paths.push((r.path, (r.handler)())),
        }
    }
    let mut router = axum::Router::new();
    for (path, methods) in paths {
        router = router.route(path, methods.fallback(handlers::method_not_allowed));
    }
    router
        .route("/api/{*rest}", routing::any(handlers::no_such_route))
        .layer(axum::middleware::from_fn_with_state(state.clone(), forward::to_leader))
        // Every replica answers for itself (never forwarded).
        .route(crate::telemetry::PATH, routing::get(handlers::metrics_text))
        .with_state(state)
        // Every replica serves the page itself; its API calls are forwarded.
        .merge(dashboard::router())
}

/// Whether `path` belongs to the HTTP API.
pub fn is_api(path: &str) -> bool {
    path.starts_with(PREFIX)
}

/// Whether a route's pattern matches `path`.
fn matches(pattern: &str, path: &str) -> bool {
    let (mut p, mut q) = (pattern.split('/'), path.split('/'));
    loop {
        match (p.next(), q.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a.starts_with('{') => {
                if b.is_empty() {
                    return false;
                }
            }
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// The route `method path` takes, if any.
fn find(method: &Method, path: &str) -> Option<Route> {
    routes().into_iter().find(|r| r.method == *method && matches(r.path, path))
}

/// The gRPC method whose access rule `auth` applies to an API request. A
/// request for no route needs a reader's token, so that a stranger learns
/// nothing, not even which routes exist.
pub fn twin(method: &Method, path: &str) -> &'static str {
    find(method, path).map_or(GET, |r| r.twin)
}

/// The access rule of the dashboard's files: anyone (they hold no data).
pub const DASHBOARD_TWIN: &str = GET_LEADER;

/// Whether an API request is answered by any replica (not forwarded).
fn local(method: &Method, path: &str) -> bool {
    find(method, path).is_some_and(|r| r.local)
}

/// An error as the API sends it: `{"code", "message"}` (and `leader`, the
/// leader's address, for `not_leader`) with its HTTP status.
pub fn error_response(s: &Status) -> http::Response<String> {
    let (status, _) = crate::convert::api_error(s);
    let body = error_body(s);
    let mut resp = http::Response::new(format!("{body}\n"));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The JSON of an error.
fn error_body(s: &Status) -> serde_json::Value {
    let (_, code) = crate::convert::api_error(s);
    let mut body = serde_json::json!({ "code": code, "message": s.message() });
    if let Some(leader) = flotilla_proto::leader::leader_hint(s) {
        body["leader"] = leader.into();
    }
    body
}

/// A handler's error.
#[derive(Debug)]
pub(crate) struct ApiError(Status);

impl From<Status> for ApiError {
    fn from(s: Status) -> Self {
        ApiError(s)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(&self.0).map(axum::body::Body::from)
    }
}

/// A JSON answer.
fn ok_json(status: StatusCode, value: serde_json::Value) -> Response {
    let mut resp = Response::new(axum::body::Body::from(format!("{value}\n")));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The caller, as `auth` found it (a request that did not pass the layer is
/// refused, as in the gRPC services).
pub(crate) struct Who(Caller);

impl<S: Send + Sync> FromRequestParts<S> for Who {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .map(Who)
            .ok_or_else(|| ApiError(Status::internal("the request was not authenticated (no caller); refusing it")))
    }
}

/// The `{job_id}` of a route's path, bounded like the gRPC field.
pub(crate) struct JobId(String);

impl<S: Send + Sync> FromRequestParts<S> for JobId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path(id) = axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError(Status::invalid_argument(format!("the job id in the path: {e}"))))?;
        crate::limits::check_id("job_id", &id)?;
        Ok(JobId(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_segments() {
        assert!(matches("/api/v1/jobs/{job_id}", "/api/v1/jobs/abc"));
        assert!(!matches("/api/v1/jobs/{job_id}", "/api/v1/jobs/"));
        assert!(!matches("/api/v1/jobs/{job_id}", "/api/v1/jobs/abc/metrics"));
        assert!(matches("/api/v1/jobs", "/api/v1/jobs"));
        assert!(!matches("/api/v1/jobs", "/api/v1/jobsx"));
    }

    #[test]
    fn each_route_takes_the_roles_of_its_grpc_twin() {
        assert_eq!(twin(&Method::POST, "/api/v1/jobs"), SUBMIT);
        assert_eq!(twin(&Method::GET, "/api/v1/jobs"), LIST);
        assert_eq!(twin(&Method::POST, "/api/v1/jobs/j1/cancel"), CANCEL);
        assert_eq!(twin(&Method::GET, "/api/v1/jobs/j1/events"), WATCH);
        assert_eq!(twin(&Method::GET, OPENAPI_PATH), GET_LEADER);
        // No such route: a reader's token, never none.
        assert_eq!(twin(&Method::DELETE, "/api/v1/jobs/j1"), GET);
        assert_eq!(twin(&Method::GET, "/api/v1/nothing"), GET);
        assert!(local(&Method::GET, "/api/v1/leader"));
        assert!(!local(&Method::GET, "/api/v1/jobs"));
    }

    fn coordinator() -> Arc<Coordinator> {
        let store = Arc::new(crate::store::MemStore::new(crate::state::State::new(crate::state::DEFAULT_MAX_RESTARTS)));
        Coordinator::new(store, Default::default(), Default::default())
    }

    async fn ask(method: Method, path: &str, caller: Option<Caller>) -> (u16, serde_json::Value) {
        use tower::ServiceExt;
        let mut req = http::Request::builder().method(method).uri(path).body(axum::body::Body::empty()).unwrap();
        if let Some(c) = caller {
            req.extensions_mut().insert(c);
        }
        let resp = router(coordinator()).oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or_default())
    }

    /// The router builds (one method router per path) and answers JSON,
    /// and a handler that needs a caller refuses a request without one.
    #[tokio::test]
    async fn the_router_answers_json_and_fails_closed() {
        let admin = Caller {
            role: crate::Role::Admin,
            token_id: "t".into(),
            name: "admin".into(),
            worker_key_hash: None,
            open: false,
        };
        assert_eq!(ask(Method::GET, "/api/v1/jobs", None).await, (200, serde_json::json!({ "jobs": [] })));
        let (status, body) = ask(Method::GET, "/api/v1/jobs/j-1", None).await;
        assert_eq!((status, body["code"].as_str()), (404, Some("not_found")), "{body}");
        let (status, body) = ask(Method::DELETE, "/api/v1/jobs", None).await;
        assert_eq!((status, body["code"].as_str()), (405, Some("method_not_allowed")), "{body}");
        let (status, body) = ask(Method::GET, "/api/v1/nothing", None).await;
        assert_eq!((status, body["code"].as_str()), (404, Some("not_found")), "{body}");
        let (status, body) = ask(Method::POST, "/api/v1/jobs/j-1/cancel", None).await;
        assert_eq!((status, body["code"].as_str()), (500, Some("internal")), "no caller: {body}");
        let (status, body) = ask(Method::POST, "/api/v1/jobs/j-1/cancel", Some(admin)).await;
        assert_eq!((status, body["code"].as_str()), (404, Some("not_found")), "{body}");
    }

    /// The OpenAPI document lists exactly the routes of [`routes`].
    #[test]
    fn the_openapi_document_lists_exactly_the_routes() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("docs/openapi.json is JSON");
        assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "not OpenAPI 3: {}", doc["openapi"]);
        let mut documented = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("path item") {
                if ["get", "post", "put", "delete", "patch", "head", "options"].contains(&method.as_str()) {
                    assert!(op["operationId"].is_string(), "{method} {path} has no operationId");
                    assert!(op["responses"]["default"].is_object(), "{method} {path} does not document its errors");
                    documented.push(format!("{} {path}", method.to_uppercase()));
                }
            }
        }
        let mut served: Vec<String> = routes().iter().map(|r| format!("{} {}", r.method, r.path)).collect();
        documented.sort();
        served.sort();
        assert_eq!(documented, served, "docs/openapi.json and http::routes() disagree");
    }
}
