//! The REST API of the old proxy (prices, usage, queries, rate limits), with
//! its camelCase field names, plus the fields tollgate adds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::value::RawValue;

use crate::app::App;
use crate::body::ChannelBody;
use crate::budget::{Limits, Period};
use crate::error::ApiError;
use crate::http::Body;
use crate::pricing::{self, Price, PriceTable, SCALE_PER_1K, SCALE_PER_1M};
use crate::record::StoredRecord;
use crate::store::{Filter, GroupKey, UsageTotals};

/// Largest admin request body.
const MAX_ADMIN_BODY: usize = 64 << 10;
/// Size of the pieces `/queries` is written out in.
const CHUNK: usize = 64 << 10;

/// Answers a request outside `/v1/`.
pub async fn handle(
    app: &Arc<App>,
    remote: std::net::SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    match route(app, remote, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// The admin endpoints, by path.
enum Route {
    Model(String),
    Models,
    Usage,
    Queries,
    RateLimits,
    Metrics,
    UserKeys(String),
    UserLimits(String),
    DefaultLimits,
    Key(String),
}

fn classify(path: &str) -> Result<Option<Route>, ApiError> {
    let decode = |s: &str| {
        percent_decode(s, false)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ApiError::bad_request("bad name in path"))
    };
    if let Some(name) = path.strip_prefix("/model/") {
        return Ok(Some(Route::Model(decode(name)?)));
    }
    if let Some(rest) = path.strip_prefix("/users/") {
        if let Some(name) = rest.strip_suffix("/keys") {
            return Ok(Some(Route::UserKeys(decode(name)?)));
        }
        if let Some(name) = rest.strip_suffix("/limits") {
            return Ok(Some(Route::UserLimits(decode(name)?)));
        }
        return Ok(None);
    }
    if let Some(id) = path.strip_prefix("/keys/") {
        return Ok(Some(Route::Key(decode(id)?)));
    }
    Ok(match path {
        "/models" => Some(Route::Models),
        "/usage" => Some(Route::Usage),
        "/queries" => Some(Route::Queries),
        "/ratelimits" => Some(Route::RateLimits),
        "/metrics" => Some(Route::Metrics),
        "/limits/default" => Some(Route::DefaultLimits),
        _ => None,
    })
}

async fn route(
    app: &Arc<App>,
    remote: std::net::SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let query = req.uri().query().unwrap_or("").to_owned();
    let get = method == Method::GET || method == Method::HEAD;
    let not_allowed = || Err(ApiError::method_not_allowed(&method, &path));
    // Health and self-service need no admin key.
    match path.as_str() {
        "/healthz" if get => return Ok(json_response(StatusCode::OK, r#"{"status":"ok"}"#)),
        "/readyz" if get => return Ok(readyz(app)),
        "/me/usage" if get => return me_usage(app, &req).await,
        "/healthz" | "/readyz" | "/me/usage" => return not_allowed(),
        _ => {}
    }
    let Some(r) = classify(&path)? else {
        return Err(ApiError::not_found(format!("unknown path {path}")).with_code("not_found"));
    };
    crate::access::admin(app.admin_digest.as_ref(), req.headers(), remote)?;
    match (r, method.clone()) {
        (Route::Model(name), _) if get => get_model(app, &name),
        (Route::Model(name), Method::POST | Method::PUT) => set_price(app, &name, req).await,
        (Route::Models, _) if get => models(app),
        (Route::Usage, _) if get => usage(app, &query).await,
        (Route::Queries, _) if get => queries(app, &query).await,
        (Route::RateLimits, _) if get => ratelimits(app),
        (Route::Metrics, _) if get => Ok(metrics(app)),
        (Route::UserKeys(user), Method::POST) => create_key(app, &user),
        (Route::UserKeys(user), _) if get => list_keys(app, &user),
        (Route::Key(id), Method::DELETE) => revoke_key(app, &id),
        (Route::UserLimits(user), _) if get => Ok(limits_response(app, Some(&user))),
        (Route::DefaultLimits, _) if get => Ok(limits_response(app, None)),
        (Route::UserLimits(user), Method::PUT) => put_limits(app, Some(user), req).await,
        (Route::DefaultLimits, Method::PUT) => put_limits(app, None, req).await,
        (Route::UserLimits(user), Method::DELETE) => delete_limits(app, Some(user)).await,
        (Route::DefaultLimits, Method::DELETE) => delete_limits(app, None).await,
        _ => not_allowed(),
    }
}

fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(crate::http::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Appends `s` as a JSON string.
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn model_json(out: &mut String, name: &str, rows: &[Price]) {
    out.push_str("{\"name\":");
    push_json_str(out, name);
    out.push_str(",\"costs\":[");
    for (i, p) in rows.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"validFrom\":");
        push_json_str(out, &crate::timestamp::format_ms(p.valid_from));
        let mut num = |key: &str, v: i64, scale: u32| {
            out.push_str(&format!(
                ",\"{key}\":{}",
                pricing::format_scaled(v.into(), scale)
            ));
        };
        num("per1KQueryTokens", p.query, SCALE_PER_1K);
        num("per1KAnswerTokens", p.answer, SCALE_PER_1K);
        if let Some(c) = p.cached {
            num("per1KCachedQueryTokens", c, SCALE_PER_1K);
        }
        num("per1MQueryTokens", p.query, SCALE_PER_1M);
        num("per1MAnswerTokens", p.answer, SCALE_PER_1M);
        if let Some(c) = p.cached {
            num("per1MCachedQueryTokens", c, SCALE_PER_1M);
        }
        out.push('}');
    }
    out.push_str("]}");
}

fn get_model(app: &Arc<App>, name: &str) -> Result<Response<Body>, ApiError> {
    let table = app.store.prices();
    let rows = table.rows(name).ok_or_else(|| {
        ApiError::not_found(format!("no prices for model {name}")).with_code("model_not_found")
    })?;
    let mut out = String::new();
    model_json(&mut out, name, rows);
    Ok(json_response(StatusCode::OK, out))
}

fn models(app: &Arc<App>) -> Result<Response<Body>, ApiError> {
    let table: PriceTable = app.store.prices().clone();
    let mut out = String::from("[");
    for (i, name) in table.names().into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        model_json(&mut out, name, table.rows(name).unwrap_or_default());
    }
    out.push(']');
    Ok(json_response(StatusCode::OK, out))
}

/// Parses a price body: `validFrom` plus query/answer (and optionally cached)
/// prices, per 1K or per 1M tokens, never both units.
pub fn parse_price_body(body: &[u8]) -> Result<Price, ApiError> {
    let fields: BTreeMap<String, &RawValue> = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("body must be a JSON object: {e}")))?;
    const KNOWN: [&str; 7] = [
        "validFrom",
        "per1KQueryTokens",
        "per1KAnswerTokens",
        "per1KCachedQueryTokens",
        "per1MQueryTokens",
        "per1MAnswerTokens",
        "per1MCachedQueryTokens",
    ];
    if let Some(k) = fields.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(ApiError::bad_param(k, format!("unknown field {k}")));
    }
    let valid_from = match fields.get("validFrom") {
        None => return Err(ApiError::bad_param("validFrom", "validFrom is required")),
        Some(raw) => {
            let s: String = serde_json::from_str(raw.get()).map_err(|_| {
                ApiError::bad_param("validFrom", "validFrom must be a timestamp string")
            })?;
            crate::timestamp::parse(&s).ok_or_else(|| {
                ApiError::bad_param(
                    "validFrom",
                    format!("validFrom `{s}` is not a timestamp with an offset, like 2024-01-24T14:50:00Z"),
                )
            })?
        }
    };
    let has_1k = fields.keys().any(|k| k.starts_with("per1K"));
    let has_1m = fields.keys().any(|k| k.starts_with("per1M"));
    let (unit, scale) = match (has_1k, has_1m) {
        (true, true) => {
            return Err(ApiError::bad_request(
                "give prices either per 1K tokens or per 1M tokens, not both",
            ))
        }
        (false, true) => ("per1M", SCALE_PER_1M),
        _ => ("per1K", SCALE_PER_1K),
    };
    let price = |what: &str, required: bool| -> Result<Option<i64>, ApiError> {
        let key = format!("{unit}{what}");
        match fields.get(key.as_str()) {
            None if required => Err(ApiError::bad_param(&key, format!("{key} is required"))),
            None => Ok(None),
            Some(raw) => pricing::parse_scaled(raw.get(), scale)
                .map(Some)
                .map_err(|e| ApiError::bad_param(&key, format!("{key} {e}"))),
        }
    };
    let query = price("QueryTokens", true)?.unwrap_or(0);
    let answer = price("AnswerTokens", true)?.unwrap_or(0);
    let cached = price("CachedQueryTokens", false)?;
    Ok(Price {
        valid_from,
        query,
        cached,
        answer,
    })
}

async fn set_price(
    app: &Arc<App>,
    name: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body = http_body_util::Limited::new(req.into_body(), MAX_ADMIN_BODY)
        .collect()
        .await
        .map_err(|_| ApiError::bad_request("could not read the body (at most 64 KiB)"))?
        .to_bytes();
    let price = parse_price_body(&body)?;
    let repriced = app
        .store
        .set_price(name.to_owned(), price)
        .await
        .map_err(|e| ApiError::internal(format!("could not store the price: {e}")))?;
    let table = app.store.prices();
    let mut out = String::new();
    model_json(&mut out, name, table.rows(name).unwrap_or_default());
    // Keep the old shape and add what changed.
    out.pop();
    out.push_str(&format!(",\"repricedQueries\":{repriced}}}"));
    Ok(json_response(StatusCode::OK, out))
}

/// Decodes `%XX` escapes (and `+` as space in query strings).
fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Parameters of the report endpoints.
#[derive(Debug, Default)]
pub struct Params {
    /// Filters.
    pub filter: Filter,
    /// `group_by` of `/usage`.
    pub group: Vec<GroupKey>,
    /// `format=csv` of `/queries`.
    pub csv: bool,
}

/// Parses the filter parameters; `allowed` lists those the endpoint takes.
pub fn parse_filter(query: &str, allowed: &[&str]) -> Result<Filter, ApiError> {
    parse_params(query, allowed).map(|p| p.filter)
}

/// Parses report parameters; `allowed` lists those the endpoint takes.
pub fn parse_params(query: &str, allowed: &[&str]) -> Result<Params, ApiError> {
    let mut p = Params::default();
    let f = &mut p.filter;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k, true).ok_or_else(|| ApiError::bad_request("bad query string"))?;
        let v = percent_decode(v, true)
            .ok_or_else(|| ApiError::bad_param(&k, format!("bad encoding of parameter {k}")))?;
        if !allowed.contains(&k.as_str()) {
            return Err(ApiError::bad_param(
                &k,
                format!("unknown parameter {k} (allowed: {})", allowed.join(", ")),
            ));
        }
        let time = |v: &str| {
            crate::timestamp::parse(v).ok_or_else(|| {
                ApiError::bad_param(
                    &k,
                    format!(
                        "{k} `{v}` is not a timestamp with an offset, like 2024-01-24T14:50%2B01"
                    ),
                )
            })
        };
        let number = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| ApiError::bad_param(&k, format!("{k} must be a non-negative integer")))
        };
        match k.as_str() {
            "user" => f.user = Some(v),
            "model" => f.model = Some(v),
            "after" => f.after = Some(time(&v)?),
            "before" => f.before = Some(time(&v)?),
            "limit" => f.limit = Some(number(&v)?),
            "offset" => f.offset = number(&v)?,
            "group_by" => {
                for g in v.split(',').map(str::trim).filter(|g| !g.is_empty()) {
                    let key = match g {
                        "user" => GroupKey::User,
                        "model" => GroupKey::Model,
                        "day" => GroupKey::Day,
                        "month" => GroupKey::Month,
                        other => {
                            return Err(ApiError::bad_param(
                                "group_by",
                                format!("cannot group by {other} (user, model, day, month)"),
                            ))
                        }
                    };
                    if !p.group.contains(&key) {
                        p.group.push(key);
                    }
                }
            }
            "format" => match v.as_str() {
                "json" => p.csv = false,
                "csv" => p.csv = true,
                _ => return Err(ApiError::bad_param("format", "format must be json or csv")),
            },
            _ => unreachable!("checked against allowed"),
        }
    }
    Ok(p)
}

/// Waits (at most 5 s, e.g. while the vocabulary for an estimate loads at
/// start-up) until records of requests that already ended are written,
/// so a report read right after a request sees it.
async fn settle(app: &Arc<App>) {
    let _ = tokio::time::timeout(Duration::from_secs(5), app.store.flush()).await;
}

async fn usage(app: &Arc<App>, query: &str) -> Result<Response<Body>, ApiError> {
    let p = parse_params(query, &["user", "model", "after", "before", "group_by"])?;
    settle(app).await;
    let reports = app.store.reports();
    let group = p.group.clone();
    let rows = tokio::task::spawn_blocking(move || reports.usage(&p.filter, &p.group))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(format!("could not read usage: {e}")))?;
    if group.is_empty() {
        let t = rows.into_iter().next().map(|r| r.1).unwrap_or_default();
        return Ok(json_response(StatusCode::OK, usage_json(&t)));
    }
    let mut out = String::from("[");
    for (i, (g, t)) in rows.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('{');
        for (key, v) in [
            ("user", &g.user),
            ("model", &g.model),
            ("day", &g.day),
            ("month", &g.month),
        ] {
            if let Some(v) = v {
                push_json_str(&mut out, key);
                out.push(':');
                push_json_str(&mut out, v);
                out.push(',');
            }
        }
        // Splice the totals object's members after the keys.
        out.push_str(&usage_json(t)[1..]);
    }
    out.push(']');
    Ok(json_response(StatusCode::OK, out))
}

/// The `/usage` object.
pub fn usage_json(t: &UsageTotals) -> String {
    let avg = if t.queries == 0 {
        0
    } else {
        // Rounded to the nearest pico-dollar.
        (t.cost + i128::from(t.queries) / 2) / i128::from(t.queries)
    };
    format!(
        "{{\"numQueries\":{},\"queryTokens\":{},\"answerTokens\":{},\"cost\":{},\"averageCostPerQuery\":{},\"cachedQueryTokens\":{},\"reasoningTokens\":{},\"unpricedQueries\":{},\"rejectedQueries\":{}}}",
        t.queries,
        t.query_tokens,
        t.answer_tokens,
        pricing::format_dollars(t.cost),
        pricing::format_dollars(avg),
        t.cached_tokens,
        t.reasoning_tokens,
        t.unpriced,
        t.rejected
    )
}

/// One `/queries` element.
pub fn record_json(out: &mut String, r: &StoredRecord) {
    out.push_str("{\"id\":");
    out.push_str(&r.id.to_string());
    out.push_str(",\"user\":");
    push_json_str(out, &r.user);
    out.push_str(",\"model\":");
    push_json_str(out, &r.model);
    out.push_str(",\"requestedModel\":");
    push_json_str(out, &r.requested_model);
    out.push_str(",\"endpoint\":");
    push_json_str(out, &r.endpoint);
    out.push_str(",\"timestamp\":");
    push_json_str(out, &crate::timestamp::format_ms(r.started_ms));
    out.push_str(&format!(
        ",\"queryTokens\":{},\"answerTokens\":{},\"cachedQueryTokens\":{},\"reasoningTokens\":{},\"cost\":{},\"priced\":{},\"estimated\":{},\"status\":{},\"stream\":{},\"durationMs\":{}",
        r.query_tokens,
        r.answer_tokens,
        r.cached_tokens,
        r.reasoning_tokens,
        pricing::format_dollars(r.cost.into()),
        r.priced,
        r.estimated,
        r.status,
        r.stream,
        pricing::format_scaled(r.duration_us.into(), 3),
    ));
    out.push_str(",\"ttfbMs\":");
    match r.ttfb_us {
        Some(t) => out.push_str(&pricing::format_scaled(t.into(), 3)),
        None => out.push_str("null"),
    }
    out.push_str(",\"requestId\":");
    match &r.request_id {
        Some(id) => push_json_str(out, id),
        None => out.push_str("null"),
    }
    out.push('}');
}

async fn queries(app: &Arc<App>, query: &str) -> Result<Response<Body>, ApiError> {
    let p = parse_params(
        query,
        &[
            "user", "model", "after", "before", "limit", "offset", "format",
        ],
    )?;
    settle(app).await;
    let reports = app.store.reports();
    let (tx, body) = ChannelBody::new(4);
    let csv = p.csv;
    let f = p.filter;
    tokio::task::spawn_blocking(move || {
        let mut buf = String::with_capacity(CHUNK + 1024);
        buf.push_str(if csv { CSV_HEADER } else { "[" });
        let mut first = true;
        let mut alive = true;
        let res = reports.queries(&f, &mut |r| {
            if csv {
                record_csv(&mut buf, &r);
            } else {
                if !first {
                    buf.push(',');
                }
                record_json(&mut buf, &r);
            }
            first = false;
            if buf.len() >= CHUNK {
                let piece = Bytes::from(std::mem::take(&mut buf));
                alive = tx.blocking_send(Ok(piece)).is_ok();
            }
            alive
        });
        match res {
            Ok(()) => {
                if !csv {
                    buf.push(']');
                }
                let _ = tx.blocking_send(Ok(Bytes::from(buf)));
            }
            Err(e) => {
                // The status is already sent: end the body with an error.
                tracing::error!(error = %e, "reading /queries failed");
                let _ = tx.blocking_send(Err(Box::new(e)));
            }
        }
    });
    let mut r = Response::new(body.boxed_unsync());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if csv {
            "text/csv; charset=utf-8"
        } else {
            "application/json"
        }),
    );
    Ok(r)
}

const CSV_HEADER: &str = "id,user,model,requestedModel,endpoint,timestamp,queryTokens,answerTokens,cachedQueryTokens,reasoningTokens,cost,priced,estimated,status,stream,durationMs,ttfbMs,requestId\r\n";

/// Appends a CSV field, quoted when it needs to be (RFC 4180).
fn push_csv(out: &mut String, s: &str) {
    if s.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&s.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(s);
    }
}

/// One `/queries?format=csv` row.
pub fn record_csv(out: &mut String, r: &StoredRecord) {
    out.push_str(&r.id.to_string());
    for s in [&r.user, &r.model, &r.requested_model, &r.endpoint] {
        out.push(',');
        push_csv(out, s);
    }
    out.push_str(&format!(
        ",{},{},{},{},{},{},{},{},{},{},{},",
        crate::timestamp::format_ms(r.started_ms),
        r.query_tokens,
        r.answer_tokens,
        r.cached_tokens,
        r.reasoning_tokens,
        pricing::format_dollars(r.cost.into()),
        r.priced,
        r.estimated,
        r.status,
        r.stream,
        pricing::format_scaled(r.duration_us.into(), 3),
    ));
    if let Some(t) = r.ttfb_us {
        out.push_str(&pricing::format_scaled(t.into(), 3));
    }
    out.push(',');
    if let Some(id) = &r.request_id {
        push_csv(out, id);
    }
    out.push_str("\r\n");
}

fn metrics(app: &Arc<App>) -> Response<Body> {
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

fn readyz(app: &Arc<App>) -> Response<Body> {
    match app.store.unready() {
        None => json_response(StatusCode::OK, r#"{"status":"ready"}"#),
        Some(why) => {
            let mut out = String::from(r#"{"status":"unready","reason":"#);
            push_json_str(&mut out, &why);
            out.push('}');
            json_response(StatusCode::SERVICE_UNAVAILABLE, out)
        }
    }
}

fn ratelimits(app: &Arc<App>) -> Result<Response<Body>, ApiError> {
    let body = match app.store.ratelimits() {
        Some(rl) => serde_json::to_vec(&rl).map_err(|e| ApiError::internal(e.to_string()))?,
        None => b"{}".to_vec(),
    };
    Ok(json_response(StatusCode::OK, body))
}

fn created(body: String) -> Response<Body> {
    json_response(StatusCode::CREATED, body)
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(format!("storage error: {e}"))
}

fn opt_time(out: &mut String, key: &str, ms: Option<i64>) {
    out.push_str(&format!(",\"{key}\":"));
    match ms {
        Some(t) => push_json_str(out, &crate::timestamp::format_ms(t)),
        None => out.push_str("null"),
    }
}

fn create_key(app: &Arc<App>, user: &str) -> Result<Response<Body>, ApiError> {
    let key = crate::access::new_key();
    let digest = crate::access::digest(&key);
    let info = crate::store::KeyInfo {
        id: crate::access::new_key_id(),
        user: user.to_owned(),
        created_ms: crate::timestamp::now_ms(),
        last_used_ms: None,
        revoked_ms: None,
    };
    app.store
        .accounts()
        .create_key(&info, &digest)
        .map_err(internal)?;
    app.keys.insert(crate::access::KeyEntry {
        id: info.id.clone(),
        user: info.user.clone(),
        digest,
        last_used: std::sync::atomic::AtomicI64::new(0),
    });
    let mut out = String::from("{\"id\":");
    push_json_str(&mut out, &info.id);
    out.push_str(",\"user\":");
    push_json_str(&mut out, user);
    out.push_str(",\"key\":");
    push_json_str(&mut out, &key);
    opt_time(&mut out, "createdAt", Some(info.created_ms));
    out.push('}');
    Ok(created(out))
}

fn list_keys(app: &Arc<App>, user: &str) -> Result<Response<Body>, ApiError> {
    let keys = app.store.accounts().list_keys(user).map_err(internal)?;
    let mut out = String::from("[");
    for (i, k) in keys.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"id\":");
        push_json_str(&mut out, &k.id);
        out.push_str(",\"user\":");
        push_json_str(&mut out, &k.user);
        opt_time(&mut out, "createdAt", Some(k.created_ms));
        let last = k.last_used_ms.max(app.keys.last_used(&k.id));
        opt_time(&mut out, "lastUsedAt", last);
        opt_time(&mut out, "revokedAt", k.revoked_ms);
        out.push('}');
    }
    out.push(']');
    Ok(json_response(StatusCode::OK, out))
}

fn revoke_key(app: &Arc<App>, id: &str) -> Result<Response<Body>, ApiError> {
    // Out of memory first: the key stops working before the answer.
    app.keys.remove(id);
    match app
        .store
        .accounts()
        .revoke_key(id, crate::timestamp::now_ms())
        .map_err(internal)?
    {
        Some(user) => {
            let mut out = String::from("{\"id\":");
            push_json_str(&mut out, id);
            out.push_str(",\"user\":");
            push_json_str(&mut out, &user);
            out.push_str(",\"revoked\":true}");
            Ok(json_response(StatusCode::OK, out))
        }
        None => Err(ApiError::not_found(format!("no active key {id}")).with_code("not_found")),
    }
}

/// Parses a limits body: `budget` (dollars), `period`, `requestsPerMinute`,
/// `tokensPerMinute`; every field optional, `null` meaning no limit.
pub fn parse_limits_body(body: &[u8]) -> Result<Limits, ApiError> {
    let fields: BTreeMap<String, &RawValue> = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("body must be a JSON object: {e}")))?;
    let mut l = Limits::default();
    for (k, raw) in &fields {
        let v = raw.get().trim();
        if v == "null" {
            continue;
        }
        match k.as_str() {
            "budget" => {
                l.budget =
                    Some(pricing::parse_scaled(v, 12).map_err(|e| {
                        ApiError::bad_param("budget", format!("budget (dollars) {e}"))
                    })?)
            }
            "period" => {
                let s: String = serde_json::from_str(v).unwrap_or_default();
                l.period = Period::parse(&s).ok_or_else(|| {
                    ApiError::bad_param("period", "period must be day, week, month or total")
                })?;
            }
            "requestsPerMinute" | "tokensPerMinute" => {
                let n: u64 = v.parse().map_err(|_| {
                    ApiError::bad_param(k, format!("{k} must be a non-negative integer"))
                })?;
                if k == "requestsPerMinute" {
                    l.rpm = Some(n);
                } else {
                    l.tpm = Some(n);
                }
            }
            other => {
                return Err(ApiError::bad_param(other, format!("unknown field {other}")));
            }
        }
    }
    Ok(l)
}

fn limits_json(app: &Arc<App>, user: Option<&str>) -> String {
    let now = crate::timestamp::now_ms();
    let (limits, is_default) = match user {
        Some(u) => match app.budgets.limits_of(u) {
            Some((l, d)) => (Some(l), d),
            None => (None, false),
        },
        None => (app.budgets.default_limits(), true),
    };
    let mut out = String::from("{\"user\":");
    match user {
        Some(u) => push_json_str(&mut out, u),
        None => out.push_str("null"),
    }
    let num = |v: Option<String>| v.unwrap_or_else(|| "null".into());
    let l = limits.unwrap_or_default();
    out.push_str(&format!(
        ",\"default\":{is_default},\"budget\":{},\"period\":\"{}\",\"requestsPerMinute\":{},\"tokensPerMinute\":{}",
        num(l.budget.map(|b| pricing::format_dollars(b.into()))),
        l.period.as_str(),
        num(l.rpm.map(|v| v.to_string())),
        num(l.tpm.map(|v| v.to_string())),
    ));
    if let (Some(u), Some(l)) = (user, limits) {
        let (spent, reserved) = app.budgets.spent(u, now);
        out.push_str(&format!(
            ",\"spent\":{},\"reserved\":{}",
            pricing::format_dollars(spent),
            pricing::format_dollars(reserved)
        ));
        let remaining = l
            .budget
            .map(|b| pricing::format_dollars((i128::from(b) - spent - reserved).max(0)));
        out.push_str(&format!(",\"remaining\":{}", num(remaining)));
        let start = (l.period != Period::Total).then(|| l.period.start(now));
        opt_time(&mut out, "periodStart", start);
        opt_time(&mut out, "periodEnd", l.period.end(now));
    }
    out.push('}');
    out
}

fn limits_response(app: &Arc<App>, user: Option<&str>) -> Response<Body> {
    json_response(StatusCode::OK, limits_json(app, user))
}

async fn put_limits(
    app: &Arc<App>,
    user: Option<String>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body = http_body_util::Limited::new(req.into_body(), MAX_ADMIN_BODY)
        .collect()
        .await
        .map_err(|_| ApiError::bad_request("could not read the body (at most 64 KiB)"))?
        .to_bytes();
    let l = parse_limits_body(&body)?;
    save_limits(app, user.as_deref(), Some(l)).await?;
    Ok(limits_response(app, user.as_deref()))
}

async fn delete_limits(app: &Arc<App>, user: Option<String>) -> Result<Response<Body>, ApiError> {
    save_limits(app, user.as_deref(), None).await?;
    Ok(limits_response(app, user.as_deref()))
}

async fn save_limits(
    app: &Arc<App>,
    user: Option<&str>,
    l: Option<Limits>,
) -> Result<(), ApiError> {
    app.store
        .accounts()
        .save_limits(user, l.as_ref())
        .map_err(internal)?;
    match user {
        Some(u) => app.budgets.set_limits(u, l),
        None => app.budgets.set_default(l),
    }
    // Spend so far in the (new) period counts from now on.
    settle(app).await;
    let st = app.clone();
    tokio::task::spawn_blocking(move || st.rebuild_spend())
        .await
        .map_err(internal)?
        .map_err(internal)
}

async fn me_usage(app: &Arc<App>, req: &Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let key = crate::access::user_from_key(&app.keys, req.headers(), crate::timestamp::now_ms())?;
    let user = key.user.clone();
    settle(app).await;
    let reports = app.store.reports();
    let f = Filter {
        user: Some(user.clone()),
        ..Filter::default()
    };
    let rows = tokio::task::spawn_blocking(move || reports.usage(&f, &[]))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    let t = rows.into_iter().next().map(|r| r.1).unwrap_or_default();
    let mut out = String::from("{\"user\":");
    push_json_str(&mut out, &user);
    out.push_str(",\"usage\":");
    out.push_str(&usage_json(&t));
    out.push_str(",\"limits\":");
    out.push_str(&limits_json(app, Some(&user)));
    out.push('}');
    Ok(json_response(StatusCode::OK, out))
}

#[cfg(test)]
mod tests;
