//! The web dashboard: one page of plain HTML, CSS and JavaScript, embedded
//! in the binary (no network needed to load it), served at `/` by every
//! replica. The page holds no data: it asks for an API token and reads
//! everything through the HTTP API (`/api/v1/…`) with it, so a follower's
//! page works through the API's forwarding to the leader.

use axum::response::{IntoResponse, Response};
use axum::routing;
use http::{header, HeaderValue};

const INDEX: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/style.css");

/// The paths the dashboard serves, with their content and its type.
const ASSETS: [(&str, &str, &str); 3] = [
    ("/", INDEX, "text/html; charset=utf-8"),
    ("/dashboard/app.js", SCRIPT, "text/javascript; charset=utf-8"),
    ("/dashboard/style.css", STYLE, "text/css; charset=utf-8"),
];

/// Whether `path` is one of the dashboard's files (served to anyone: they
/// hold no data).
pub fn serves(path: &str) -> bool {
    ASSETS.iter().any(|(p, _, _)| *p == path)
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut resp = body.into_response();
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // The page runs only its own script and talks only to this origin.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; \
             base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    resp
}

/// The dashboard's routes.
pub fn router() -> axum::Router {
    let mut router = axum::Router::new();
    for (path, body, content_type) in ASSETS {
        router = router.route(path, routing::get(move || async move { asset(body, content_type) }));
    }
    router
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_asset_is_served_with_its_type_and_the_page_loads_only_its_own() {
        use tower::ServiceExt;
        for (path, body, content_type) in ASSETS {
            let req = http::Request::get(path).body(axum::body::Body::empty()).unwrap();
            let resp = router().oneshot(req).await.unwrap();
            assert_eq!(resp.status(), 200, "{path}");
            assert_eq!(resp.headers()[header::CONTENT_TYPE], content_type, "{path}");
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
            assert_eq!(bytes, body.as_bytes(), "{path}");
            assert!(serves(path));
        }
        assert!(!serves("/api/v1/jobs") && !serves("/flotilla.v1.JobService/ListJobs"));
        // Every asset the page names is one of ours: nothing from elsewhere.
        for name in ["/dashboard/app.js", "/dashboard/style.css"] {
            assert!(INDEX.contains(name), "index.html loads {name}");
        }
        assert!(!INDEX.contains("http://") && !INDEX.contains("https://"), "index.html names no other site");
        // The script's one URL is SVG's namespace, a name, not a place.
        let svg = "http://www.w3.org/2000/svg";
        assert_eq!(SCRIPT.matches("http").count(), SCRIPT.matches(svg).count(), "app.js names no other site");
    }
}
