//! The REST API: the seed API's endpoints (prices, usage, queries, rate limits), with
//! its camelCase field names, plus the fields tollgate adds (user keys,
//! limits, health). This module owns the router, admin authentication and
//! the helpers every resource answers with; each resource has its own file.
//!
//! Every handler runs on a worker's single-threaded runtime that also serves
//! proxied connections, so nothing here touches SQLite on that thread:
//! reads and account writes go through `blocking`, prices through the
//! store's writer thread.

mod accounts;
mod dashboard;
mod limits;
mod ops;
mod prices;
mod projects;
mod query;
mod reconcile;
mod reports;

use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::app::App;
use crate::error::ApiError;
use crate::http::Body;

pub use limits::parse_limits_body;
pub use prices::parse_price_body;
pub use projects::parse_project_body;
pub use query::{parse_filter, parse_params, Params};
pub use reports::{record_csv, record_json, usage_json};

/// Largest admin request body.
const MAX_ADMIN_BODY: usize = 64 << 10;

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
    Reconcile,
    PricesImport,
    PricesExport,
    UserKeys(String),
    UserLimits(String),
    DefaultLimits,
    AllLimits,
    Key(String),
    Projects,
    Project(String),
    ProjectLimits(String),
}

fn classify(path: &str) -> Result<Option<Route>, ApiError> {
    let decode = |s: &str| {
        query::percent_decode(s, false)
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
    if let Some(rest) = path.strip_prefix("/projects/") {
        // Project names hold no `/`: the suffix cannot be part of one.
        if let Some(name) = rest.strip_suffix("/limits") {
            return Ok(Some(Route::ProjectLimits(decode(name)?)));
        }
        return Ok(Some(Route::Project(decode(rest)?)));
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
        "/reconcile" => Some(Route::Reconcile),
        "/prices/import" => Some(Route::PricesImport),
        "/prices/export" => Some(Route::PricesExport),
        "/limits/default" => Some(Route::DefaultLimits),
        "/limits" => Some(Route::AllLimits),
        "/projects" => Some(Route::Projects),
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
        "/healthz" if get => return ops::healthz(),
        "/readyz" if get => return ops::readyz(app),
        "/me/usage" if get => return reports::me_usage(app, &req).await,
        "/healthz" | "/readyz" | "/me/usage" => return not_allowed(),
        _ => {}
    }
    if path == "/dashboard" || path.starts_with("/dashboard/") {
        return dashboard::route(app, remote, req, &path).await;
    }
    let Some(r) = classify(&path)? else {
        return Err(ApiError::not_found(format!("unknown path {path}")).with_code("not_found"));
    };
    match dashboard::caller(app, req.headers(), remote, get)? {
        dashboard::Caller::Admin => {}
        dashboard::Caller::Holder(user) => {
            return match r {
                Route::Usage => reports::usage(app, &query, Some(&user)).await,
                Route::Queries => reports::queries(app, &query, Some(&user)).await,
                Route::UserLimits(u) if u == user => limits::get(app, Some(&u)),
                _ => Err(ApiError::forbidden(
                    "A key holder's dashboard session reads only its own /usage, /queries and /users/{user}/limits.",
                )),
            };
        }
    }
    match (r, method.clone()) {
        (Route::Model(name), _) if get => prices::get_model(app, &name),
        (Route::Model(name), Method::POST | Method::PUT) => {
            prices::set_price(app, &name, req).await
        }
        (Route::Models, _) if get => prices::models(app),
        (Route::Usage, _) if get => reports::usage(app, &query, None).await,
        (Route::Queries, _) if get => reports::queries(app, &query, None).await,
        (Route::RateLimits, _) if get => ops::ratelimits(app),
        (Route::Metrics, _) if get => Ok(ops::metrics(app)),
        (Route::Reconcile, _) if get => reconcile::reconcile(app, &query).await,
        (Route::PricesImport, Method::POST) => prices::import(app, &query, req).await,
        (Route::PricesExport, _) if get => prices::export(app),
        (Route::UserKeys(user), Method::POST) => accounts::create_key(app, user, req).await,
        (Route::UserKeys(user), _) if get => accounts::list_keys(app, user).await,
        (Route::Key(id), Method::DELETE) => accounts::revoke_key(app, id).await,
        (Route::UserLimits(user), _) if get => limits::get(app, Some(&user)),
        (Route::DefaultLimits, _) if get => limits::get(app, None),
        (Route::AllLimits, _) if get => limits::list(app),
        (Route::UserLimits(user), Method::PUT) => limits::put(app, Some(user), req).await,
        (Route::DefaultLimits, Method::PUT) => limits::put(app, None, req).await,
        (Route::UserLimits(user), Method::DELETE) => limits::delete(app, Some(user)).await,
        (Route::DefaultLimits, Method::DELETE) => limits::delete(app, None).await,
        (Route::Projects, _) if get => projects::list(app),
        (Route::Project(name), _) if get => projects::get(app, &name),
        (Route::Project(name), Method::PUT) => projects::put(app, name, req).await,
        (Route::Project(name), Method::DELETE) => projects::delete(app, name).await,
        (Route::ProjectLimits(name), _) if get => projects::get_limits(app, &name),
        (Route::ProjectLimits(name), Method::PUT) => {
            projects::set_limits(app, name, Some(req)).await
        }
        (Route::ProjectLimits(name), Method::DELETE) => projects::set_limits(app, name, None).await,
        _ => not_allowed(),
    }
}

/// A JSON answer with this status.
fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Result<Response<Body>, ApiError> {
    let body = serde_json::to_vec(value).map_err(|e| ApiError::internal(e.to_string()))?;
    let mut r = Response::new(crate::http::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(r)
}

/// A 200 JSON answer.
fn ok<T: Serialize + ?Sized>(value: &T) -> Result<Response<Body>, ApiError> {
    json(StatusCode::OK, value)
}

/// A 201 JSON answer.
fn created<T: Serialize + ?Sized>(value: &T) -> Result<Response<Body>, ApiError> {
    json(StatusCode::CREATED, value)
}

/// A storage failure, as a 500.
fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(format!("storage error: {e}"))
}

/// Runs `f` on tokio's blocking pool, never on the worker thread: SQLite
/// can wait up to its busy timeout (5 s) for a lock, and the worker would
/// stop serving every proxied connection it holds meanwhile.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(internal)
}

/// Reads an admin request body (at most [`MAX_ADMIN_BODY`]).
async fn read_body(req: Request<Incoming>) -> Result<bytes::Bytes, ApiError> {
    Ok(
        http_body_util::Limited::new(req.into_body(), MAX_ADMIN_BODY)
            .collect()
            .await
            .map_err(|_| ApiError::bad_request("could not read the body (at most 64 KiB)"))?
            .to_bytes(),
    )
}

/// Waits (at most 5 s, e.g. while the vocabulary for an estimate loads at
/// start-up) until records of requests that already ended are written, so
/// that a report read (or spend rebuilt) right after a request sees it.
async fn catch_up(app: &Arc<App>) {
    let _ = tokio::time::timeout(Duration::from_secs(5), app.store.flush()).await;
}

/// A decimal written exactly as [`crate::pricing::format_scaled`] writes
/// `value / 10^scale`, as a JSON number: through a float it would lose
/// digits (costs are integers of pico-dollars).
#[derive(Debug, Clone, Copy)]
struct Scaled(i128, u32);

impl Scaled {
    /// Pico-dollars as dollars.
    fn dollars(pico: i128) -> Scaled {
        Scaled(pico, 12)
    }
}

impl Serialize for Scaled {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = crate::pricing::format_scaled(self.0, self.1);
        RawValue::from_string(text)
            .map_err(serde::ser::Error::custom)?
            .serialize(s)
    }
}

/// A canonical tag list (see [`crate::tags`]) as a JSON object:
/// `{"team":"search","urgent":""}` (a bare word's value is empty).
#[derive(Debug, Clone, Copy)]
struct TagsJson<'a>(&'a str);

impl TagsJson<'_> {
    /// Whether the list holds no tag.
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for TagsJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        for (k, v) in crate::tags::pairs(self.0) {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// A timestamp (ms since the epoch), written as `crate::timestamp::format_ms` does.
#[derive(Debug, Clone, Copy)]
struct Time(i64);

impl Serialize for Time {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::timestamp::format_ms(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_and_times_are_written_exactly() {
        #[derive(Serialize)]
        struct Row {
            cost: Scaled,
            none: Option<Scaled>,
            at: Time,
        }
        let row = Row {
            cost: Scaled::dollars(123_456_789_012_345),
            none: None,
            at: Time(0),
        };
        assert_eq!(
            serde_json::to_string(&row).unwrap(),
            r#"{"cost":123.456789012345,"none":null,"at":"1970-01-01T00:00:00.000Z"}"#
        );
        assert_eq!(serde_json::to_string(&Scaled(-5, 3)).unwrap(), "-0.005");
        assert_eq!(serde_json::to_string(&Scaled::dollars(0)).unwrap(), "0");
    }
}
