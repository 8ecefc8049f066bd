//! A follower replica forwards API requests to the leader: it passes the
//! request on, token and body unchanged, over an HTTP/2 connection made
//! like its Raft connections (the process's TLS client configuration), and
//! streams the leader's answer back, event streams included. The answer
//! carries the leader's address in `flotilla-leader`. The leader checks the
//! token again; a request is forwarded at most once (`flotilla-forwarded`),
//! so two replicas that each think the other leads answer `not_leader`
//! instead of passing it back and forth.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderName, HeaderValue};
use tonic::Status;
use tower::ServiceExt;

use super::{ApiError, Http};

/// Set on a request a replica forwards.
const FORWARDED: HeaderName = HeaderName::from_static("flotilla-forwarded");
/// Set on an answer that a replica forwarded: the leader's address.
const LEADER: HeaderName = HeaderName::from_static("flotilla-leader");

/// Headers about one connection, which are not passed on.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    header::HOST,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
];

pub(super) async fn to_leader(State(h): State<Arc<Http>>, req: Request, next: Next) -> Response {
    if h.c.store.is_leader() || super::local(req.method(), req.uri().path()) {
        return next.run(req).await;
    }
    let hint = h.c.store.leader_hint();
    let leader = match hint {
        Some(l) if !req.headers().contains_key(&FORWARDED) => l,
        _ => return ApiError::from(flotilla_proto::leader::not_leader(hint.as_deref())).into_response(),
    };
    match forward(&h, &leader, req).await {
        Ok(mut resp) => {
            if let Ok(v) = HeaderValue::from_str(&leader) {
                resp.headers_mut().insert(LEADER, v);
            }
            resp
        }
        Err(e) => {
            tracing::warn!(%leader, error = %e, "could not forward an API request to the leader");
            ApiError::from(Status::unavailable(format!("could not reach the leader {leader}: {e}"))).into_response()
        }
    }
}

/// The channel to `leader`, made once per leader.
fn channel(h: &Http, leader: &str) -> Result<tonic::transport::Channel, String> {
    let mut cached = h.leader.lock().expect("leader channel lock");
    if let Some((addr, ch)) = cached.as_ref() {
        if addr == leader {
            return Ok(ch.clone());
        }
    }
    let ch = flotilla_proto::tls::endpoint(leader)?.connect_lazy();
    *cached = Some((leader.to_string(), ch.clone()));
    Ok(ch)
}

async fn forward(h: &Http, leader: &str, req: Request) -> Result<Response, String> {
    let ch = channel(h, leader)?;
    let (mut parts, body) = req.into_parts();
    for name in HOP_BY_HOP {
        parts.headers.remove(name);
    }
    parts.headers.insert(FORWARDED, HeaderValue::from_static("1"));
    parts.version = http::Version::HTTP_2;
    let req = http::Request::from_parts(parts, tonic::body::Body::new(body));
    let resp = ch.oneshot(req).await.map_err(|e| flotilla_proto::leader::error_chain(&e))?;
    Ok(resp.map(axum::body::Body::new))
}
