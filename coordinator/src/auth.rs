//! Who may call what. Every request (gRPC, and the HTTP API, whose routes
//! take the rule of the gRPC method they mirror) passes [`AuthLayer`] before its
//! service sees it: the layer reads the API token (`authorization: Bearer
//! TOKEN`), finds it among the bootstrap admin tokens of this replica and
//! the tokens in the replicated state, checks that its role may call the
//! method, and hands the service a [`Caller`] in the request's extensions.
//! Services then check what depends on the request's content: a submitter
//! cancels only its own jobs, a worker reports only for itself (proving the
//! key its registration handed out) and only about its own job.
//!
//! Raft messages between replicas carry no token: they are authenticated
//! by mutual TLS and checked for membership (`raft::service`). The web
//! dashboard's files need no token (they hold no data); a coordinator that
//! serves browsers takes TLS connections without a client certificate, and
//! the layer lets those reach only the dashboard and the HTTP API.
//!
//! Tokens are `flt_` and 64 hex digits (256 random bits); only their
//! SHA-256 is stored. A token's public id is a prefix of that hash.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::{Request, Status};

use crate::coordinator::Coordinator;
use crate::state::State;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything: membership, tokens, every job.
    Admin,
    /// Submit jobs; cancel and register its own; read everything.
    Submit,
    /// Read jobs, metrics and membership.
    Read,
    /// Register as a worker and report for itself.
    Worker,
}

impl Role {
    pub fn parse(s: &str) -> Result<Role, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "submit" => Ok(Role::Submit),
            "read" => Ok(Role::Read),
            "worker" => Ok(Role::Worker),
            other => {
                Err(format!("unknown role {:?}; roles are admin, submit, read and worker", crate::limits::quote(other)))
            }
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Submit => "submit",
            Role::Read => "read",
            Role::Worker => "worker",
        }
    }
}

/// A token as the replicated state keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub name: String,
    pub role: Role,
    /// SHA-256 of the token, hex.
    pub hash: String,
    pub created_at_ms: i64,
    /// The name of the token that created it.
    pub created_by: String,
    pub revoked_at_ms: Option<i64>,
}

impl TokenRecord {
    /// The token's public id.
    pub fn id(&self) -> &str {
        public_id(&self.hash)
    }
}

/// SHA-256 of `token`, hex.
pub fn hash_token(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

fn public_id(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 32 bytes from the operating system's random source, hex.
pub fn random_hex() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).map_err(|e| std::io::Error::other(format!("the random source failed: {e}")))?;
    Ok(hex(&bytes))
}

/// A new token and its hash.
pub fn new_token() -> std::io::Result<(String, String)> {
    let token = format!("flt_{}", random_hex()?);
    let hash = hash_token(&token);
    Ok((token, hash))
}

/// Whether requests need tokens.
#[derive(Debug, Clone, Default)]
pub enum AuthMode {
    /// No tokens: every caller is an admin (`--insecure`, and in-process
    /// coordinators that tests and benches start).
    #[default]
    Open,
    /// Tokens required. `bootstrap` holds this replica's admin tokens that
    /// are not in the replicated state (names and hashes): the token file
    /// a coordinator writes on first start.
    Tokens { bootstrap: Vec<(String, String)> },
}

/// Who is calling, as the services see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub role: Role,
    /// The token's public id; empty without tokens.
    pub token_id: String,
    /// The token's name; empty without tokens.
    pub name: String,
    /// The worker key sent with the request (SHA-256, hex), if any.
    pub worker_key_hash: Option<String>,
    /// No tokens are required: every check passes.
    pub open: bool,
}

impl Caller {
    fn open() -> Caller {
        Caller { role: Role::Admin, token_id: String::new(), name: String::new(), worker_key_hash: None, open: true }
    }

    /// The caller of `req`, as [`AuthLayer`] found it. A request that did
    /// not pass the layer is refused (a wiring mistake must not open the
    /// door).
    pub fn of<T>(req: &Request<T>) -> Result<Caller, Status> {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Status::internal("the request was not authenticated (no caller); refusing it"))
    }

    /// The token that is recorded as a job's owner.
    pub fn owner(&self) -> Option<crate::state::Owner> {
        (!self.open).then(|| crate::state::Owner { token_id: self.token_id.clone(), name: self.name.clone() })
    }

    /// May this caller act on a job owned by `owner`: an admin, or the
    /// token that submitted it.
    pub fn may_manage(&self, owner: Option<&crate::state::Owner>, what: &str) -> Result<(), Status> {
        if self.open || self.role == Role::Admin || owner.is_some_and(|o| o.token_id == self.token_id) {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "token {} may not {what}: only an admin or the token that submitted the job may",
            self.name
        )))
    }

    /// Refuses unless the request proves the key of `worker`, a
    /// registered worker.
    pub fn check_worker(&self, state: &State, worker: &str) -> Result<(), Status> {
        if self.open {
            return Ok(());
        }
        let Some(w) = state.workers.get(worker) else {
            return Err(Status::not_found(format!("worker {worker} is not registered; register again")));
        };
        match &self.worker_key_hash {
            Some(h) if !w.key_hash.is_empty() && constant_time_eq(h.as_bytes(), w.key_hash.as_bytes()) => Ok(()),
            Some(_) => Err(Status::permission_denied(format!("the worker key sent is not worker {worker}'s"))),
            None => Err(Status::permission_denied(format!(
                "a call for worker {worker} needs its key (flotilla-worker-key metadata, from Register)"
            ))),
        }
    }

    /// Refuses unless `worker` proves its key and is assigned to `job`.
    pub fn check_worker_in_job(&self, state: &State, worker: &str, job: &str) -> Result<(), Status> {
        self.check_worker(state, worker)?;
        if self.open {
            return Ok(());
        }
        let assigned = state.workers.get(worker).and_then(|w| w.job.as_deref());
        if assigned == Some(job) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!("worker {worker} is not assigned to job {job}")))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Which callers a method admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Anyone (which replica leads).
    Anyone,
    /// Replicas: authenticated by mutual TLS, checked for membership.
    Peers,
    Roles(&'static [Role]),
}

const READERS: &[Role] = &[Role::Admin, Role::Submit, Role::Read];
const SUBMITTERS: &[Role] = &[Role::Admin, Role::Submit];
const WORKERS: &[Role] = &[Role::Admin, Role::Worker];
const ADMINS: &[Role] = &[Role::Admin];

/// The access rule of a gRPC method path (`/package.Service/Method`).
/// Methods not listed need the admin role.
fn access(path: &str) -> Access {
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
    match (service, method) {
        ("flotilla.v1.JobService", "GetLeader") => Access::Anyone,
        ("flotilla.v1.JobService", "SubmitJob" | "CancelJob" | "RegisterModel" | "SubmitSweep" | "CancelSweep") => {
            Access::Roles(SUBMITTERS)
        }
        ("flotilla.v1.JobService", "GetJob" | "ListJobs" | "WatchJob" | "GetMetrics" | "GetSweep" | "ListSweeps") => {
            Access::Roles(READERS)
        }
        ("flotilla.v1.WorkerService", _) => Access::Roles(WORKERS),
        ("flotilla.raft.v1.Raft", _) => Access::Peers,
        ("flotilla.raft.v1.Cluster", "Members") => Access::Roles(READERS),
        // Prometheus's scrape: any token that may read.
        ("/metrics", "") => Access::Roles(READERS),
        _ => Access::Roles(ADMINS),
    }
}

/// Finds the caller of a request from its headers.
struct Gate {
    coordinator: Arc<Coordinator>,
}

impl Gate {
    fn check(&self, path: &str, headers: &http::HeaderMap) -> Result<Option<Caller>, Status> {
        let rule = access(path);
        let bootstrap = match &self.coordinator.cfg.auth {
            AuthMode::Open => return Ok(Some(Caller::open())),
            AuthMode::Tokens { bootstrap } => bootstrap,
        };
        let roles = match rule {
            Access::Anyone | Access::Peers => return Ok(None),
            Access::Roles(roles) => roles,
        };
        let token = bearer(headers)?;
        let hash = hash_token(token);
        let state = self.coordinator.state();
        let found = bootstrap
            .iter()
            .find(|(_, h)| constant_time_eq(h.as_bytes(), hash.as_bytes()))
            .map(|(name, h)| (name.clone(), Role::Admin, public_id(h).to_string()))
            .or_else(|| {
                state
                    .tokens
                    .values()
                    .find(|t| t.revoked_at_ms.is_none() && constant_time_eq(t.hash.as_bytes(), hash.as_bytes()))
                    .map(|t| (t.name.clone(), t.role, t.id().to_string()))
            });
        let Some((name, role, token_id)) = found else {
            return Err(Status::unauthenticated("the API token is unknown or revoked"));
        };
        if !roles.contains(&role) {
            let method = path.rsplit('/').next().unwrap_or(path);
            return Err(Status::permission_denied(format!(
                "token {name} has the {} role, which may not call {method} (allowed: {})",
                role.as_str(),
                roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
        let worker_key_hash = headers
            .get(flotilla_proto::auth::WORKER_KEY_METADATA)
            .and_then(|v| v.to_str().ok())
            .map(|k| hash_token(k.trim()));
        Ok(Some(Caller { role, token_id, name, worker_key_hash, open: false }))
    }
}

fn bearer(headers: &http::HeaderMap) -> Result<&str, Status> {
    let Some(value) = headers.get(flotilla_proto::auth::AUTHORIZATION) else {
        return Err(Status::unauthenticated(
            "no API token: pass --token-file FILE or set FLOTILLA_TOKEN (the coordinator wrote an admin \
             token file on first start; `flotilla token create` makes more)",
        ));
    };
    let value = value.to_str().map_err(|_| Status::unauthenticated("the authorization header is not text"))?;
    value
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Status::unauthenticated("the authorization header is not `Bearer TOKEN`"))
}

/// Whether the request came over TLS without a client certificate.
fn without_client_certificate<B>(req: &http::Request<B>) -> bool {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    req.extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .is_some_and(|info| info.peer_certs().is_none_or(|certs| certs.is_empty()))
}

/// The tower layer that authenticates every request of a coordinator's
/// server (see the module's doc).
#[derive(Clone)]
pub struct AuthLayer {
    gate: Arc<Gate>,
}

impl AuthLayer {
    pub fn new(coordinator: Arc<Coordinator>) -> AuthLayer {
        AuthLayer { gate: Arc::new(Gate { coordinator }) }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService { inner, gate: self.gate.clone() }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    gate: Arc<Gate>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // An HTTP API route takes the rule of the gRPC method it mirrors;
        // the dashboard's files are open.
        let path = req.uri().path();
        let api = crate::http::is_api(path);
        let page = crate::http::dashboard::serves(path);
        // `/metrics` is HTTP too: its refusals carry an HTTP status.
        let http = api || path == crate::telemetry::PATH;
        let rule = match (api, page) {
            (true, _) => crate::http::twin(req.method(), path),
            (false, true) => crate::http::DASHBOARD_TWIN,
            (false, false) => path,
        };
        // A TLS connection without a client certificate (taken only when
        // the coordinator serves browsers) reaches the dashboard and the
        // HTTP API, never gRPC nor `/metrics`: workers, replicas, the CLI
        // and Prometheus present one.
        let checked = if !api && !page && without_client_certificate(&req) {
            Err(Status::unauthenticated(
                "this connection presented no client certificate: only the dashboard and the HTTP API (/api/) \
                 take such connections",
            ))
        } else {
            self.gate.check(rule, req.headers())
        };
        match checked {
            Ok(caller) => {
                if let Some(caller) = caller {
                    req.extensions_mut().insert(caller);
                }
                Box::pin(self.inner.call(req))
            }
            Err(status) => {
                tracing::debug!(path = %req.uri().path(), code = ?status.code(), "request refused");
                let code =
                    if status.code() == tonic::Code::Unauthenticated { "unauthenticated" } else { "permission_denied" };
                metrics::counter!("flotilla_rpc_refused_total", "code" => code).increment(1);
                let response = if http {
                    crate::http::error_response(&status).map(tonic::body::Body::new)
                } else {
                    status.into_http()
                };
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_map_to_roles_and_unknown_ones_need_an_admin() {
        assert_eq!(access("/flotilla.v1.JobService/GetLeader"), Access::Anyone);
        assert_eq!(access("/flotilla.v1.JobService/SubmitJob"), Access::Roles(SUBMITTERS));
        assert_eq!(access("/flotilla.v1.JobService/ListJobs"), Access::Roles(READERS));
        assert_eq!(access("/flotilla.v1.JobService/SubmitSweep"), Access::Roles(SUBMITTERS));
        assert_eq!(access("/flotilla.v1.JobService/CancelSweep"), Access::Roles(SUBMITTERS));
        assert_eq!(access("/flotilla.v1.JobService/GetSweep"), Access::Roles(READERS));
        assert_eq!(access("/flotilla.v1.JobService/ListSweeps"), Access::Roles(READERS));
        assert_eq!(access("/flotilla.v1.WorkerService/Heartbeat"), Access::Roles(WORKERS));
        assert_eq!(access("/flotilla.raft.v1.Raft/Vote"), Access::Peers);
        assert_eq!(access("/flotilla.raft.v1.Cluster/AddMember"), Access::Roles(ADMINS));
        assert_eq!(access("/flotilla.v1.TokenService/CreateToken"), Access::Roles(ADMINS));
        assert_eq!(access("/flotilla.v1.JobService/NoSuchMethod"), Access::Roles(ADMINS));
        assert_eq!(access("garbage"), Access::Roles(ADMINS));
        assert_eq!(access("/metrics"), Access::Roles(READERS), "a read token scrapes");
        assert_eq!(access("/metrics/x"), Access::Roles(ADMINS));
    }

    #[test]
    fn tokens_are_random_and_only_their_hash_identifies_them() {
        let (a, ha) = new_token().unwrap();
        let (b, hb) = new_token().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("flt_") && a.len() == 68, "{a}");
        assert_eq!(hash_token(&a), ha);
        assert_ne!(ha, hb);
        assert_eq!(ha.len(), 64);
        assert_eq!(public_id(&ha).len(), 12);
    }

    #[test]
    fn roles_parse_and_print_the_same() {
        for r in [Role::Admin, Role::Submit, Role::Read, Role::Worker] {
            assert_eq!(Role::parse(r.as_str()).unwrap(), r);
        }
        assert!(Role::parse("root").unwrap_err().contains("admin, submit, read and worker"));
    }
}
