//! Operations endpoints: `/healthz`, `/readyz`, `/metrics` and
//! `/ratelimits`. All answer from memory.

use std::sync::Arc;

use http::{header, HeaderValue, Response, StatusCode};
use serde::Serialize;

use super::{json, ok};
use crate::app::App;
use crate::error::ApiError;
use crate::http::Body;

/// `/healthz` and `/readyz`.
#[derive(Serialize)]
struct Status {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// `GET /healthz`: the process answers.
pub(super) fn healthz() -> Result<Response<Body>, ApiError> {
    ok(&Status {
        status: "ok",
        reason: None,
    })
}

/// `GET /readyz`: 503 while the store cannot keep up.
pub(super) fn readyz(app: &Arc<App>) -> Result<Response<Body>, ApiError> {
    match app.store.unready() {
        None => ok(&Status {
            status: "ready",
            reason: None,
        }),
        Some(why) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &Status {
                status: "unready",
                reason: Some(why),
            },
        ),
    }
}

/// `GET /metrics`, in OpenMetrics text.
pub(super) fn metrics(app: &Arc<App>) -> Response<Body> {
    // The rate-limit gauges are set here, from the latest headers, rather
    // than on every answer.
    if let Some(rl) = app.store.ratelimits() {
        app.metrics.ratelimits(&rl);
    }
    let text = app.metrics.encode(app.store.queue_depth());
    let mut r = Response::new(crate::http::full(text));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}

/// `GET /ratelimits`: the latest upstream rate-limit headers, `{}` before
/// any; with `[[upstream]]` tables also `upstreams`, per upstream and key.
pub(super) fn ratelimits(app: &Arc<App>) -> Result<Response<Body>, ApiError> {
    #[derive(serde::Serialize)]
    struct Answer {
        #[serde(flatten)]
        latest: crate::ratelimit::RateLimits,
        #[serde(skip_serializing_if = "Option::is_none")]
        upstreams: Option<Vec<crate::upstreams::KeyLimits>>,
    }
    ok(&Answer {
        latest: app.store.ratelimits().unwrap_or_default(),
        upstreams: (!app.config.upstreams.is_empty()).then(|| app.upstreams.ratelimits()),
    })
}
