//! The metered proxy for everything under `/v1/`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::access::AuthMode;
use crate::app::App;
use crate::body::{MeteredBody, UploadBody};
use crate::budget::Refusal;
use crate::endpoint::Endpoint;
use crate::error::ApiError;
use crate::http::Body;
use crate::meter::{self, JsonScanner, Meter, Observer, SseScanner, Upload};
use crate::record::{Record, Rejected};

/// Longest a request waits for room in the usage queue before a 503.
const QUEUE_WAIT: Duration = Duration::from_secs(10);

/// Headers that describe one connection, not the message (RFC 9110 7.6.1).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    let hop: Vec<HeaderName> = h.keys().filter(|n| is_hop_by_hop(n)).cloned().collect();
    for n in hop {
        h.remove(n);
    }
}

/// The user a request is charged to.
fn user_of(req: &Request<Incoming>) -> Result<String, ApiError> {
    match req.headers().get("x-user").map(|v| v.to_str()) {
        Some(Ok(u)) if !u.trim().is_empty() => Ok(u.trim().to_owned()),
        Some(Err(_)) => Err(ApiError::unauthorized(
            "The x-user header must be visible ASCII text.",
        )),
        _ => Err(ApiError::unauthorized(
            "Missing x-user header: tollgate charges every request to a user.",
        )
        .with_code("missing_user")),
    }
}

/// Reads a request body up to `limit` bytes.
async fn read_body(body: Incoming, limit: u64) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit as usize).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::too_large(limit)),
        Err(e) => Err(ApiError::bad_request(format!(
            "could not read the request body: {e}"
        ))),
    }
}

/// Forwards one API request upstream and meters it.
pub async fn handle(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    match forward(app, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn forward(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let started = Instant::now();
    let started_ms = crate::timestamp::now_ms();
    let cfg = &app.config;
    let (user, key_id) = match cfg.auth {
        AuthMode::Header => (user_of(&req)?, None),
        AuthMode::Keys => {
            let k = crate::access::user_from_key(&app.keys, req.headers(), started_ms)
                .inspect_err(|_| app.metrics.rejected("invalid_api_key"))?;
            (k.user.clone(), Some(k.id.clone()))
        }
    };
    let endpoint = Endpoint::classify(req.method(), req.uri().path());
    let (mut parts, body) = req.into_parts();

    let mut strip = false;
    let mut stream = false;
    let mut requested_model = String::new();
    let mut sent_bytes = Bytes::new();
    let mut upload = None;
    let mut max_tokens = None;
    let mut choices = 1;
    let upstream_body = if endpoint.needs_model() {
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > cfg.max_body) {
            return Err(ApiError::too_large(cfg.max_body));
        }
        let bytes = read_body(body, cfg.max_body).await?;
        let info = meter::parse_request(&bytes).map_err(|e| match e.param() {
            Some(p) => ApiError::bad_param(p, e.message()),
            None => ApiError::bad_request(e.message()),
        })?;
        stream = info.stream;
        max_tokens = info.max_tokens;
        choices = info.choices;
        requested_model = info.model;
        sent_bytes = bytes;
        if info.stream && !info.include_usage && endpoint.usage_on_request() {
            if let Some(spliced) = meter::splice_include_usage(&sent_bytes) {
                sent_bytes = Bytes::from(spliced);
                strip = true;
            }
        }
        parts.headers.remove(header::CONTENT_LENGTH);
        // Usage is read from the answer, so it must not be compressed.
        parts.headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        crate::http::full(sent_bytes.clone())
    } else {
        let sniff = (endpoint == Endpoint::Media).then(|| {
            parts.headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
            parts
                .headers
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"multipart/"))
        });
        let (b, progress) = UploadBody::new(body, sniff);
        upload = Some(progress);
        b.boxed_unsync()
    };

    let hold = if app.budgets.active() {
        let (cost, tokens) = reservation(
            app,
            endpoint,
            &requested_model,
            sent_bytes.len(),
            max_tokens,
            choices,
            started_ms,
        );
        match app.budgets.check(&user, cost, tokens, started_ms) {
            Ok(h) => h,
            Err(refusal) => {
                let (code, err) = match refusal {
                    Refusal::Budget { retry_after } => (
                        "budget_exceeded",
                        ApiError::too_many(
                            "budget_exceeded",
                            format!("User {user} has used up their budget for this period."),
                            retry_after,
                        ),
                    ),
                    Refusal::Rate { what, retry_after } => (
                        "rate_limit_exceeded",
                        ApiError::too_many(
                            "rate_limit_exceeded",
                            format!("User {user} is over their {what}-per-minute limit."),
                            Some(retry_after),
                        ),
                    ),
                };
                app.store.reject(Rejected {
                    at_ms: started_ms,
                    user,
                    model: requested_model,
                    reason: code,
                });
                return Err(err);
            }
        }
    } else {
        None
    };

    let slot = app
        .store
        .reserve(QUEUE_WAIT)
        .await
        .ok_or_else(|| ApiError::unavailable("usage store is far behind; try again shortly"))?;

    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    let uri = cfg
        .upstream
        .uri_for(path_and_query)
        .map_err(|e| ApiError::bad_request(format!("bad request path: {e}")))?;
    let endpoint_path = parts.uri.path().to_owned();
    let mut headers = std::mem::take(&mut parts.headers);
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    headers.remove("x-user");
    match &app.auth_header {
        Some(v) => {
            headers.insert(header::AUTHORIZATION, v.clone());
        }
        // A tollgate key is never sent upstream.
        None if cfg.auth == AuthMode::Keys => {
            headers.remove(header::AUTHORIZATION);
        }
        None => {}
    }
    let mut up = Request::new(upstream_body);
    *up.method_mut() = parts.method;
    *up.uri_mut() = uri;
    *up.headers_mut() = headers;

    let record = Record {
        user,
        requested_model,
        endpoint: endpoint_path,
        started_ms,
        stream,
        key_id,
        hold,
        ..Record::default()
    };
    let mut meter = Meter::new(
        app.store.clone(),
        app.metrics.in_flight.clone(),
        slot,
        record,
        started,
        endpoint,
        sent_bytes,
    );
    if let Some(u) = &upload {
        meter.upload(u.clone());
    }

    meter.overhead(started.elapsed());
    let resp = match answer_head(
        app.upstream.send(up),
        upload.as_deref(),
        cfg.upstream_idle_timeout,
    )
    .await
    {
        Ok(Ok(r)) => r,
        Ok(Err(_)) if upload.as_ref().is_some_and(|u| u.failed()) => {
            // The client broke off its own upload (or framed it badly).
            meter.failed(499);
            return Err(ApiError::bad_request(
                "the request body could not be read to its end",
            ));
        }
        Ok(Err(e)) => {
            if matches!(e, crate::upstream::UpstreamError::Connect(_)) {
                // Never reached upstream: nothing was spent, nothing to record.
                meter.cancel();
                return Err(ApiError::bad_gateway(format!(
                    "upstream {} is unreachable",
                    cfg.upstream
                ))
                .with_code("upstream_unreachable"));
            }
            meter.failed(502);
            return Err(ApiError::bad_gateway(format!(
                "upstream failed before answering: {}",
                error_chain(&e)
            )));
        }
        Err(_) => {
            meter.failed(504);
            return Err(ApiError::gateway_timeout(format!(
                "upstream sent no answer within {:?}",
                cfg.upstream_idle_timeout
            )));
        }
    };

    let (mut parts, body) = resp.into_parts();
    if let Some(raw) = crate::ratelimit::Raw::capture(&parts.headers, crate::timestamp::now_ms()) {
        app.store.set_ratelimits(raw);
    }
    let request_id = parts
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let ok = parts.status.is_success();
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let encoded = parts
        .headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes() != b"identity");
    let observer = if endpoint == Endpoint::Other || encoded {
        Observer::Ignore
    } else if content_type.starts_with("text/event-stream") {
        Observer::Sse(SseScanner::new(endpoint.stream_kind(), strip && ok))
    } else if content_type.contains("json") {
        Observer::Json(JsonScanner::default())
    } else {
        Observer::Ignore
    };
    let strips = matches!(&observer, Observer::Sse(_)) && strip && ok;
    meter.answered(parts.status.as_u16(), request_id, observer);
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::SET_COOKIE);
    if strips {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    let body = MeteredBody::new(body, meter, cfg.upstream_idle_timeout);
    Ok(Response::from_parts(parts, body.boxed_unsync()))
}

/// The worst-case cost (pico-dollars) and tokens a request may spend: a
/// prompt of at most one token per 3 bytes of body plus the answer size it
/// asks for times the answers it asks for (or the configured default), at
/// the requested model's prices.
fn reservation(
    app: &App,
    endpoint: Endpoint,
    model: &str,
    body_len: usize,
    max_tokens: Option<u64>,
    choices: u64,
    now_ms: i64,
) -> (i128, u64) {
    if !endpoint.needs_model() {
        return (0, 0);
    }
    let prompt = (body_len as u64).div_ceil(3);
    let answer = if endpoint == Endpoint::Embeddings {
        0
    } else {
        max_tokens
            .unwrap_or(app.config.reserve_answer_tokens)
            .saturating_mul(choices)
    };
    let cost = app
        .store
        .prices()
        .lookup(model, model, now_ms)
        .map_or(0, |(_, p)| {
            i128::from(prompt) * i128::from(p.query) + i128::from(answer) * i128::from(p.answer)
        });
    (cost, prompt + answer)
}

/// Waits for upstream's answer head. The idle timeout counts from the
/// request's last byte: a streamed upload that keeps moving is never cut.
async fn answer_head<F: std::future::Future>(
    fut: F,
    upload: Option<&Upload>,
    idle: Duration,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    tokio::pin!(fut);
    let mut deadline = Instant::now() + idle;
    loop {
        match tokio::time::timeout_at(deadline.into(), &mut fut).await {
            Ok(out) => return Ok(out),
            Err(elapsed) => {
                let moved = upload.map(|u| u.last_activity() + idle);
                match moved {
                    Some(d) if d > Instant::now() => deadline = d,
                    _ => return Err(elapsed),
                }
            }
        }
    }
}

/// An error and its causes on one line, for logs and 502 messages.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
