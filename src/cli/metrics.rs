//! `--metrics-addr`: a small plain-HTTP listener that serves this process's
//! Prometheus series at `GET /metrics` and nothing else. It has no TLS and
//! no tokens, so it is bound only where the operator says (a pod's
//! address, a cluster network, loopback). The coordinator's own `/metrics`
//! sits on its API port behind TLS and tokens instead.

use std::net::SocketAddr;

use anyhow::Context;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use tokio_util::sync::CancellationToken;

/// Binds `addr` and serves the process's series until `token` fires;
/// returns the bound address (a port of 0 picks one).
pub async fn serve(addr: SocketAddr, token: CancellationToken) -> anyhow::Result<SocketAddr> {
    flotilla_coordinator::telemetry::recorder();
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("bind the metrics address {addr}"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new()
        .route(flotilla_coordinator::telemetry::PATH, axum::routing::get(metrics))
        .fallback(|| async { (StatusCode::NOT_FOUND, "only /metrics is served here\n") });
    tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(token.cancelled_owned()).await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "the metrics listener stopped");
        }
    });
    tracing::info!(%bound, "serving metrics");
    Ok(bound)
}

async fn metrics() -> impl IntoResponse {
    let text = tokio::task::spawn_blocking(flotilla_coordinator::telemetry::render_process).await.unwrap_or_default();
    ([(header::CONTENT_TYPE, flotilla_coordinator::telemetry::CONTENT_TYPE)], text)
}
