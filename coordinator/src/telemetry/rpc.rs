//! A tower layer that counts the server's calls and times them, by method
//! and status code: `flotilla_rpc_requests_total` and
//! `flotilla_rpc_duration_seconds` (a streaming call's time is the
//! stream's life). It sits inside `auth`, so it sees only admitted calls;
//! `auth` counts its refusals itself. Labels are bounded: an HTTP API
//! call is labelled with the gRPC method it mirrors, and a gRPC path that
//! names no method (`UNIMPLEMENTED`) is `unknown`.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderMap, Request, Response};
use http_body::{Body as _, Frame};

type BoxFuture<T, E> = Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

/// The layer (see the module's doc).
#[derive(Clone, Copy, Default)]
pub struct RpcMetricsLayer;

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics { inner }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
}

/// What a call is labelled with.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Call {
    /// `grpc` or `http`.
    protocol: &'static str,
    /// The gRPC method path, or for the HTTP API the one it mirrors.
    method: String,
}

/// The labels of a request for `path`.
fn call_of(method: &http::Method, path: &str) -> Call {
    if crate::http::is_api(path) {
        Call { protocol: "http", method: crate::http::twin(method, path).to_string() }
    } else if path == super::PATH {
        Call { protocol: "http", method: super::PATH.to_string() }
    } else {
        Call { protocol: "grpc", method: path.chars().take(crate::limits::MAX_ID).collect() }
    }
}

/// The gRPC status code's name, from its number.
fn grpc_code(headers: &HeaderMap) -> Option<&'static str> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(match tonic::Code::from(code) {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    })
}

/// Records a finished call.
fn record(call: &Call, code: &str, started: Instant) {
    let method = if code == "UNIMPLEMENTED" { "unknown".to_string() } else { call.method.clone() };
    let labels = [("protocol", call.protocol.to_string()), ("method", method), ("code", code.to_string())];
    metrics::counter!("flotilla_rpc_requests_total", &labels).increment(1);
    metrics::histogram!("flotilla_rpc_duration_seconds", &labels).record(started.elapsed().as_secs_f64());
}

impl<S, B> tower::Service<Request<B>> for RpcMetrics<S>
where
    S: tower::Service<Request<B>, Response = Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let call = call_of(req.method(), req.uri().path());
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            // An HTTP answer is done when its status is known; a gRPC one
            // when its trailers arrive (or at once, trailers-only).
            let code = match call.protocol {
                "http" => Some(resp.status().as_u16().to_string()),
                _ => grpc_code(resp.headers()).map(str::to_string),
            };
            let (parts, body) = resp.into_parts();
            let body = Counted { inner: body, call, code, started, recorded: false };
            Ok(Response::from_parts(parts, tonic::body::Body::new(body)))
        })
    }
}

/// A response body that records its call when it ends (or is dropped).
struct Counted {
    inner: tonic::body::Body,
    call: Call,
    code: Option<String>,
    started: Instant,
    recorded: bool,
}

impl Counted {
    fn finish(&mut self, ended: bool) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        let code = match (&self.code, ended) {
            (Some(c), _) => c.as_str(),
            (None, true) => "OK",
            // The client went away before the call ended.
            (None, false) => "CANCELLED",
        };
        record(&self.call, code, self.started);
    }
}

impl http_body::Body for Counted {
    type Data = <tonic::body::Body as http_body::Body>::Data;
    type Error = <tonic::body::Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_code) {
                    this.code = Some(code.to_string());
                }
            }
            Poll::Ready(Some(Err(_))) => {
                this.code.get_or_insert_with(|| "INTERNAL".to_string());
                this.finish(true);
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let ended = self.inner.is_end_stream();
        self.finish(ended);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn calls_are_labelled_with_bounded_values() {
        let grpc = call_of(&Method::POST, "/flotilla.v1.JobService/GetJob");
        assert_eq!(grpc, Call { protocol: "grpc", method: "/flotilla.v1.JobService/GetJob".into() });
        let api = call_of(&Method::GET, "/api/v1/jobs/j-1");
        assert_eq!(api, Call { protocol: "http", method: "/flotilla.v1.JobService/GetJob".into() });
        let api = call_of(&Method::GET, "/api/v1/whatever/else");
        assert_eq!(api.method, "/flotilla.v1.JobService/GetJob", "an unknown API path takes the default rule");
        assert_eq!(call_of(&Method::GET, "/metrics").method, "/metrics");
        let long = format!("/{}", "x".repeat(10_000));
        assert!(call_of(&Method::POST, &long).method.len() <= crate::limits::MAX_ID);
    }

    #[test]
    fn grpc_status_codes_are_named() {
        let mut h = HeaderMap::new();
        assert_eq!(grpc_code(&h), None);
        h.insert("grpc-status", "5".parse().unwrap());
        assert_eq!(grpc_code(&h), Some("NOT_FOUND"));
        h.insert("grpc-status", "junk".parse().unwrap());
        assert_eq!(grpc_code(&h), None);
    }
}
