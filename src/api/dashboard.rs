//! `/dashboard`: the web page (assets embedded in the binary), its login,
//! logout and session endpoints, and [`caller`], which lets a dashboard
//! session's cookie stand in for a bearer key on the report endpoints.
//!
//! The page only reads: it calls the same REST endpoints as any client, so
//! its numbers are the API's. A session cookie is therefore accepted only on
//! GET and HEAD; every change still needs the admin key in `Authorization`,
//! which a cross-site page can neither read nor send. The cookie is HttpOnly
//! and SameSite=Strict; login takes only a JSON body (no HTML form can send
//! one) from the same origin, and logout needs the session's CSRF token.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};

use super::{json, query::GROUP_KEYS, read_body, Time};
use crate::access::session::{cookie_id, Role, Session, COOKIE, SESSION_TTL_MS};
use crate::app::App;
use crate::error::ApiError;
use crate::http::Body;

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");
/// Chart.js 4.6.1 (MIT), the UMD build from its npm package; its license is
/// `dashboard/chart.js-LICENSE.md`.
const CHART_JS: &str = include_str!("dashboard/chart.umd.min.js");

/// The header a POST of a session must carry its CSRF token in.
const CSRF_HEADER: &str = "x-tollgate-csrf";

/// Who a report request acts for.
pub(super) enum Caller {
    /// The admin (admin key, an admin session, or loopback without an admin key).
    Admin,
    /// A key holder's session: only this user's records.
    Holder(String),
}

/// The live session of a request's cookie. A key holder's session ends with
/// the key it was opened with.
fn session(app: &App, headers: &HeaderMap) -> Option<(String, Session)> {
    let id = cookie_id(headers)?;
    let s = app.sessions.get(id, crate::timestamp::now_ms())?;
    if let Role::User { key_id, .. } = &s.role {
        if !app.keys.is_active(key_id) {
            app.sessions.close(id);
            return None;
        }
    }
    Some((id.to_owned(), s))
}

/// Who a request to a report or admin endpoint acts for. A bearer key wins
/// over a cookie; a session cookie only reads (`get`).
pub(super) fn caller(
    app: &App,
    headers: &HeaderMap,
    remote: SocketAddr,
    get: bool,
) -> Result<Caller, ApiError> {
    if crate::access::bearer(headers).is_none() {
        if let Some((_, s)) = session(app, headers) {
            if !get {
                return Err(ApiError::forbidden(
                    "A dashboard session only reads; changes need Authorization: Bearer <admin key>.",
                ));
            }
            return Ok(match s.role {
                Role::Admin => Caller::Admin,
                Role::User { user, .. } => Caller::Holder(user),
            });
        }
    }
    crate::access::admin(app.admin_digest.as_ref(), headers, remote)?;
    Ok(Caller::Admin)
}

/// Answers a path under `/dashboard`.
pub(super) async fn route(
    app: &Arc<App>,
    remote: SocketAddr,
    req: Request<Incoming>,
    path: &str,
) -> Result<Response<Body>, ApiError> {
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    let post = req.method() == Method::POST;
    match path {
        "/dashboard" if get => Ok(asset(INDEX_HTML, "text/html; charset=utf-8")),
        "/dashboard/app.js" if get => Ok(asset(APP_JS, "text/javascript; charset=utf-8")),
        "/dashboard/app.css" if get => Ok(asset(APP_CSS, "text/css; charset=utf-8")),
        "/dashboard/chart.umd.min.js" if get => {
            Ok(asset(CHART_JS, "text/javascript; charset=utf-8"))
        }
        "/dashboard/session" if get => session_info(app, req.headers(), remote),
        "/dashboard/login" if post => login(app, req).await,
        "/dashboard/logout" if post => logout(app, req.headers()),
        "/dashboard"
        | "/dashboard/app.js"
        | "/dashboard/app.css"
        | "/dashboard/chart.umd.min.js"
        | "/dashboard/session"
        | "/dashboard/login"
        | "/dashboard/logout" => Err(ApiError::method_not_allowed(req.method(), path)),
        _ => Err(ApiError::not_found(format!("unknown path {path}")).with_code("not_found")),
    }
}

/// An embedded file, with headers that keep it from being framed or
/// sniffed and a policy that lets it load nothing from elsewhere.
fn asset(text: &'static str, content_type: &'static str) -> Response<Body> {
    let mut r = Response::new(crate::http::full(bytes::Bytes::from_static(
        text.as_bytes(),
    )));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Chart.js sizes its canvas through inline styles.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // Embedded in the binary: a new version must be fetched again.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// What the page learns about its session.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Info<'a> {
    /// `admin` or `user`.
    role: &'static str,
    /// The key holder's user.
    user: Option<&'a str>,
    /// Token for the session's POSTs (none without a session).
    csrf: Option<&'a str>,
    expires_at: Option<Time>,
    /// What `/usage` can group by, time aside.
    groupings: Vec<&'static str>,
}

fn info(s: Option<&Session>) -> Info<'_> {
    let user = match s.map(|s| &s.role) {
        Some(Role::User { user, .. }) => Some(user.as_str()),
        _ => None,
    };
    let groupings = GROUP_KEYS
        .iter()
        .map(|(n, _)| *n)
        // Projects are grouped through the tag rollups, not a `GroupKey`.
        .chain(["project"])
        .filter(|n| !matches!(*n, "day" | "month"))
        // A key holder sees only their own records: by user is one row.
        .filter(|n| user.is_none() || *n != "user")
        .collect();
    Info {
        role: if user.is_some() { "user" } else { "admin" },
        user,
        csrf: s.map(|s| s.csrf.as_str()),
        expires_at: s.map(|s| Time(s.expires_ms)),
        groupings,
    }
}

/// `GET /dashboard/session`: the cookie's session; without one, admin when
/// the admin endpoints would let this request in (loopback with no admin
/// key), else 401.
fn session_info(
    app: &App,
    headers: &HeaderMap,
    remote: SocketAddr,
) -> Result<Response<Body>, ApiError> {
    if let Some((_, s)) = session(app, headers) {
        return json(StatusCode::OK, &info(Some(&s)));
    }
    crate::access::admin(app.admin_digest.as_ref(), headers, remote)
        .map_err(|_| ApiError::unauthorized("Not logged in.").with_code("not_logged_in"))?;
    json(StatusCode::OK, &info(None))
}

/// Refuses a POST that a page of another origin sent: browsers always send
/// `Origin` on cross-origin POSTs.
fn same_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, h)| h);
    match (origin_host, host) {
        (Some(o), Some(h)) if o.eq_ignore_ascii_case(h) => Ok(()),
        _ => Err(ApiError::forbidden(
            "Cross-origin request refused: log in from the dashboard page itself.",
        )),
    }
}

/// `POST /dashboard/login` with `{"key": "..."}`: the admin key opens an
/// admin session, a user key a session limited to that user.
async fn login(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    same_origin(req.headers())?;
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        });
    if !is_json {
        return Err(ApiError::bad_request(
            "The login body must be JSON (Content-Type: application/json): {\"key\": \"...\"}.",
        ));
    }
    let forwarded_https = req
        .headers()
        .get("x-forwarded-proto")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
    let body = read_body(req).await?;
    #[derive(Deserialize)]
    struct Login {
        key: String,
    }
    let l: Login = serde_json::from_slice(&body)
        .map_err(|_| ApiError::bad_param("key", "the body must be {\"key\": \"...\"}"))?;
    let key = l.key.trim();
    let role = match (&app.admin_digest, app.keys.find(key)) {
        (Some(admin), _) if crate::access::constant_time_eq(&crate::access::digest(key), admin) => {
            Role::Admin
        }
        (_, Some(e)) => Role::User {
            user: e.user.clone(),
            key_id: e.id.clone(),
        },
        _ => {
            return Err(ApiError::unauthorized(
                "Incorrect key: log in with the admin key or your tollgate key (tg-...).",
            )
            .with_code("invalid_api_key"))
        }
    };
    let (id, s) = app.sessions.open(role, crate::timestamp::now_ms());
    let mut r = json(StatusCode::OK, &info(Some(&s)))?;
    let cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_TTL_MS / 1000,
        if forwarded_https { "; Secure" } else { "" }
    );
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(|e| ApiError::internal(e.to_string()))?,
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

/// `POST /dashboard/logout`: ends the session (its CSRF token in
/// `x-tollgate-csrf`) and clears the cookie.
fn logout(app: &App, headers: &HeaderMap) -> Result<Response<Body>, ApiError> {
    same_origin(headers)?;
    if let Some((id, s)) = session(app, headers) {
        let sent = headers
            .get(CSRF_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !crate::access::constant_time_eq(sent, s.csrf.as_bytes()) {
            return Err(ApiError::forbidden(
                "Logout needs the session's token in x-tollgate-csrf.",
            ));
        }
        app.sessions.close(&id);
    }
    #[derive(Serialize)]
    struct Out {
        #[serde(rename = "loggedOut")]
        logged_out: bool,
    }
    let mut r = json(StatusCode::OK, &Out { logged_out: true })?;
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&format!(
            "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
        ))
        .map_err(|e| ApiError::internal(e.to_string()))?,
    );
    Ok(r)
}
