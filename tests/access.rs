//! Access control and budgets (issue 6): the admin key, loopback-only admin
//! without it, user keys and the `keys` auth mode, spending limits and
//! per-minute limits that hold under concurrency, default limits, spend kept
//! across restarts, and `/me/usage`.

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use chrono::{Datelike, TimeZone, Utc};
use common::*;
use http::{HeaderMap, Method, Request};
use serde_json::{json, Value};
use tollgate::access::AuthMode;

const ADMIN: &str = "adm-3c1e9b7f0a5d-admin-key";
const UPSTREAM_KEY: &str = "sk-upstream-5e2d8c-real-openai-key";
/// The model every budget test is priced under.
const MODEL: &str = "m-budget";
/// Pico-dollars per prompt token of [`MODEL`] ($1 per 1M tokens).
const Q: i128 = 1_000_000;
/// Pico-dollars per completion token of [`MODEL`] ($2 per 1M tokens).
const A: i128 = 2_000_000;
const PRICE: &str =
    r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":1,"per1MAnswerTokens":2}"#;

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

/// A chat body for [`MODEL`] asking for at most `max_tokens` completion tokens.
fn body(max_tokens: u64) -> String {
    format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"Count to three, please."}}],"max_tokens":{max_tokens}}}"#
    )
}

/// Prompt tokens tollgate reserves for a body of `len` bytes: one per 3 bytes.
fn prompt_reserve(len: usize) -> u64 {
    (len as u64).div_ceil(3)
}

/// Pico-dollars reserved for `body` with `answer` completion tokens, at [`MODEL`]'s prices.
fn reservation(body: &str, answer: u64) -> i128 {
    i128::from(prompt_reserve(body.len())) * Q + i128::from(answer) * A
}

/// The answer-size field tollgate reads from a request body, in its order.
fn max_tokens_of(v: &Value) -> Option<u64> {
    ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .find_map(|k| v[*k].as_u64())
}

/// A mock that answers every request with a chat completion whose usage is
/// the prompt tollgate reserved (one token per 3 body bytes) and
/// `answer(max_tokens)` completion tokens; the head waits for `gate`, if any.
async fn metered(answer: fn(u64) -> u64, gate: Option<Gate>) -> Mock {
    Mock::start(move |seen| {
        let v = seen.json();
        let model = v["model"].as_str().unwrap_or(MODEL).to_owned();
        let t = Tok::new(
            prompt_reserve(seen.body.len()),
            answer(max_tokens_of(&v).unwrap_or(0)),
        );
        let r = Reply::json(completion(&model, "one two three", t));
        match &gate {
            Some(g) => r.head_after(g.clone()),
            None => r,
        }
    })
    .await
}

/// A mock answering every request with these fixed token counts.
async fn fixed(t: Tok) -> Mock {
    Mock::start(move |seen| {
        let model = seen
            .json()
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("gpt-x")
            .to_owned();
        Reply::json(completion(&model, "ok", t))
    })
    .await
}

/// A proxy in `keys` mode with the admin key and an upstream key.
async fn keys_proxy(mock: &Mock) -> Proxy {
    Proxy::builder(&mock.url())
        .admin(ADMIN)
        .auth(AuthMode::Keys)
        .token(UPSTREAM_KEY)
        .start()
        .await
}

async fn price(p: &Proxy) {
    let r = p.set_price(MODEL, PRICE).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Creates a key for `user`; returns (id, key).
async fn new_key(p: &Proxy, user: &str) -> (String, String) {
    let r = p
        .admin_call(Method::POST, &format!("/users/{user}/keys"), "")
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    (
        v["id"].as_str().expect("id").to_owned(),
        v["key"].as_str().expect("key").to_owned(),
    )
}

/// A chat request authenticated by `auth` (an `Authorization` value), no `x-user`.
fn auth_req(auth: &str, body: &str) -> Request<ReqBody> {
    Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", auth)
        .body(full(body.to_owned()))
        .unwrap()
}

/// A chat request carrying a tollgate key, as an OpenAI SDK sends its key.
fn key_req(key: &str, body: &str) -> Request<ReqBody> {
    auth_req(&format!("Bearer {key}"), body)
}

/// `PUT /users/{user}/limits` (or `/limits/default` for `None`); asserts 200.
async fn put_limits(p: &Proxy, user: Option<&str>, body: &str) -> BTreeMap<String, String> {
    let path = match user {
        Some(u) => format!("/users/{u}/limits"),
        None => "/limits/default".into(),
    };
    let r = p.admin_call(Method::PUT, &path, body).await;
    assert_eq!(r.status, 200, "PUT {path} {body}: {}", r.text());
    raw_object(&r.text())
}

/// `GET /users/{user}/limits` as raw JSON fields.
async fn limits(p: &Proxy, user: &str) -> BTreeMap<String, String> {
    let r = p.get(&format!("/users/{user}/limits")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    raw_object(&r.text())
}

fn quoted(s: &str) -> String {
    Value::from(s).to_string()
}

fn sorted_keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect();
    k.sort();
    k
}

/// Start of the UTC month containing `ms`, and of the next one.
/// `periodStart` and `periodEnd` of a limits answer are the bounds of the
/// period around the call (made between `t0` and `t1`), unless a period
/// boundary fell in between.
fn assert_period(l: &BTreeMap<String, String>, t0: i64, t1: i64, bounds: fn(i64) -> (i64, i64)) {
    let (start, end) = bounds(t0);
    if bounds(t1).0 == start {
        let v: Value = serde_json::from_str(&l["periodStart"]).unwrap();
        assert_eq!(ts_ms(&v), start);
        let v: Value = serde_json::from_str(&l["periodEnd"]).unwrap();
        assert_eq!(ts_ms(&v), end);
    }
}

fn month_bounds(ms: i64) -> (i64, i64) {
    let t = Utc.timestamp_millis_opt(ms).unwrap();
    let start = Utc
        .with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
        .unwrap();
    let (y, m) = if t.month() == 12 {
        (t.year() + 1, 1)
    } else {
        (t.year(), t.month() + 1)
    };
    let end = Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).unwrap();
    (start.timestamp_millis(), end.timestamp_millis())
}

/// Start of the UTC week (Monday) containing `ms`, and of the next one.
fn week_bounds(ms: i64) -> (i64, i64) {
    let t = Utc.timestamp_millis_opt(ms).unwrap();
    let monday = t.date_naive() - chrono::Days::new(u64::from(t.weekday().num_days_from_monday()));
    let start = monday
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
        .timestamp_millis();
    (start, start + 7 * 86_400_000)
}

/// Seconds from `ms` to `end`, rounded up (as a `retry-after`).
fn secs_until(end: i64, ms: i64) -> u64 {
    ((end - ms + 999) / 1000).max(1) as u64
}

fn retry_after(r: &Resp) -> u64 {
    r.header("retry-after")
        .unwrap_or_else(|| panic!("429 without retry-after: {}", r.text()))
        .parse()
        .expect("retry-after is whole seconds")
}

/// Runs `run` until one run starts and ends in the same UTC minute (the
/// per-minute counters restart at each minute), at most three times; returns
/// its value and the times it started and ended.
async fn in_one_minute<T, F, Fut>(mut run: F) -> (T, i64, i64)
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = T>,
{
    for attempt in 0..3 {
        let t0 = now_ms();
        let v = run(attempt).await;
        let t1 = now_ms();
        if t0.div_euclid(60_000) == t1.div_euclid(60_000) {
            return (v, t0, t1);
        }
    }
    panic!("three runs in a row crossed a minute boundary");
}

async fn metrics(p: &Proxy) -> Vec<Sample> {
    let r = p.get("/metrics").await;
    assert_eq!(r.status, 200, "{}", r.text());
    parse_metrics(&r.text())
}

async fn rejected_metric(p: &Proxy, reason: &str) -> f64 {
    metric(
        &metrics(p).await,
        "tollgate_rejected_requests_total",
        &[("reason", reason)],
    )
    .unwrap_or(0.0)
}

/// This host's first non-loopback IPv4 address, if it has one.
fn own_address() -> Option<IpAddr> {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next()?.parse().ok())
        .filter(|ip: &IpAddr| !ip.is_loopback())
}

// ---------------------------------------------------------------------------
// The admin key.
// ---------------------------------------------------------------------------

/// With an admin key, every admin endpoint refuses requests without it, with
/// another key or scheme, and does nothing for them; with it, each works.
/// Health and `/me/usage` need no admin key; the admin key is no user key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_key_guards_every_admin_endpoint() {
    let mock = fixed(Tok::new(5, 5)).await;
    let p = Proxy::builder(&mock.url()).admin(ADMIN).start().await;
    let price_body =
        r#"{"validFrom":"2020-01-01T00:00:00Z","per1KQueryTokens":1,"per1KAnswerTokens":1}"#;
    let cases: Vec<(Method, &str, &str, u16)> = vec![
        (Method::GET, "/models", "", 200),
        (Method::GET, "/model/gpt-x", "", 404),
        (Method::POST, "/model/gpt-x", price_body, 200),
        (Method::PUT, "/model/gpt-y", price_body, 200),
        (Method::GET, "/usage", "", 200),
        (Method::GET, "/usage?group_by=user,model", "", 200),
        (Method::GET, "/queries", "", 200),
        (Method::GET, "/queries?format=csv", "", 200),
        (Method::GET, "/ratelimits", "", 200),
        (Method::GET, "/metrics", "", 200),
        (Method::GET, "/users/alice/keys", "", 200),
        (Method::POST, "/users/alice/keys", "", 201),
        (Method::GET, "/users/alice/limits", "", 200),
        (Method::PUT, "/users/alice/limits", r#"{"budget":7}"#, 200),
        (Method::DELETE, "/users/bob/limits", "", 200),
        (Method::GET, "/limits/default", "", 200),
        (
            Method::PUT,
            "/limits/default",
            r#"{"requestsPerMinute":100}"#,
            200,
        ),
        (Method::DELETE, "/limits/default", "", 200),
        (Method::DELETE, "/keys/key_doesnotexist", "", 404),
        (Method::PATCH, "/models", "", 405),
    ];
    let bad_auth = [
        None,
        Some("Bearer wrong-key".to_owned()),
        Some(format!("Basic {ADMIN}")),
        Some(format!("Bearer {ADMIN}x")),
        Some(format!("Bearer {}", &ADMIN[..ADMIN.len() - 1])),
        Some("Bearer ".to_owned()),
        Some(ADMIN.to_owned()),
    ];
    for (method, path, body, want) in &cases {
        for auth in &bad_auth {
            let mut b = Request::builder()
                .method(method.clone())
                .uri(*path)
                .header("content-type", "application/json");
            if let Some(a) = auth {
                b = b.header("authorization", a.as_str());
            }
            let r = send(p.addr, b.body(full(body.to_string())).unwrap()).await;
            assert_openai_error(
                &r,
                401,
                "invalid_request_error",
                None,
                Some("invalid_api_key"),
            );
            assert!(
                !r.text().contains(ADMIN),
                "the answer must not echo the key"
            );
        }
        let r = p.admin_call(method.clone(), path, body).await;
        assert_eq!(
            r.status.as_u16(),
            *want,
            "{method} {path} with the admin key: {}",
            r.text()
        );
    }
    // The refused calls changed nothing: one key (from the admitted POST),
    // one price row per model.
    let keys = p.get_json("/users/alice/keys").await;
    assert_eq!(keys.as_array().unwrap().len(), 1, "{keys}");
    let m = p.get_json("/model/gpt-x").await;
    assert_eq!(m["costs"].as_array().unwrap().len(), 1, "{m}");
    let r = send(
        p.addr,
        Request::put("/users/carol/limits")
            .body(full(r#"{"budget":0}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(limits(&p, "carol").await["budget"], "null");

    // Unknown paths are 404 with or without the key.
    assert_eq!(send(p.addr, get("/nothing")).await.status, 404);
    assert_eq!(p.get("/nothing").await.status, 404);
    // Health needs no key.
    let r = send(p.addr, get("/healthz")).await;
    assert_eq!(
        (r.status.as_u16(), r.text()),
        (200, r#"{"status":"ok"}"#.into())
    );
    let r = send(p.addr, get("/readyz")).await;
    assert_eq!(
        (r.status.as_u16(), r.text()),
        (200, r#"{"status":"ready"}"#.into())
    );
    // The admin key is not a user key.
    let mut req = get("/me/usage");
    req.headers_mut()
        .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    let r = send(p.addr, req).await;
    assert_openai_error(
        &r,
        401,
        "invalid_request_error",
        None,
        Some("invalid_api_key"),
    );
}

/// The admin check itself: without an admin key only loopback addresses (all
/// of 127/8 and ::1) get in, others get 403; with one, its bearer is needed
/// from anywhere, loopback included.
#[test]
fn admin_check_without_key_admits_only_loopback() {
    use tollgate::access::{admin, digest};
    let none = HeaderMap::new();
    let addr = |s: &str| -> SocketAddr { s.parse().unwrap() };
    for ok in ["127.0.0.1:9", "127.200.3.4:65000", "[::1]:9"] {
        assert!(admin(None, &none, addr(ok)).is_ok(), "{ok}");
    }
    for remote in [
        "192.0.2.7:40000",
        "10.0.0.1:1",
        "[2001:db8::1]:9",
        "0.0.0.0:1",
    ] {
        let e = admin(None, &none, addr(remote)).unwrap_err();
        assert_eq!(e.status.as_u16(), 403, "{remote}");
        assert_eq!(e.code, None);
    }
    let d = digest(ADMIN);
    let mut with = HeaderMap::new();
    with.insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    let mut wrong = HeaderMap::new();
    wrong.insert("authorization", "Bearer nope".parse().unwrap());
    for remote in ["127.0.0.1:9", "192.0.2.7:40000"] {
        assert!(admin(Some(&d), &with, addr(remote)).is_ok(), "{remote}");
        for h in [&none, &wrong] {
            let e = admin(Some(&d), h, addr(remote)).unwrap_err();
            assert_eq!(e.status.as_u16(), 401, "{remote}");
            assert_eq!(e.code, Some("invalid_api_key"));
        }
    }
}

/// A loopback client reaching a dual-stack listener (`--listen [::]:PORT`)
/// arrives as `::ffff:127.0.0.1`, which is loopback too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_mapped_loopback_is_loopback() {
    let mock = fixed(Tok::new(1, 1)).await;
    let p = Proxy::builder(&mock.url())
        .bind(std::net::Ipv6Addr::UNSPECIFIED.into())
        .start()
        .await;
    let v4 = SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), p.addr.port());
    let r = send(v4, get("/usage")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let none = HeaderMap::new();
    assert!(
        tollgate::access::admin(None, &none, "[::ffff:127.0.0.1]:9".parse().unwrap()).is_ok(),
        "IPv4-mapped loopback refused"
    );
}

/// Without an admin key, a client on a non-loopback address gets 403 from
/// every admin endpoint but can still use health and the proxy; with an admin
/// key, that client gets in with it. Runs over this host's own non-loopback
/// address (traffic stays on this host); skipped when it has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_admin_key_remote_clients_get_403() {
    let Some(ip) = own_address() else {
        eprintln!("note: this host has no non-loopback IPv4 address; test skipped");
        return;
    };
    let mock = fixed(Tok::new(5, 5)).await;
    let p = Proxy::builder(&mock.url()).bind(ip).start().await;
    assert_eq!(p.addr.ip(), ip);
    for (method, path) in [
        (Method::GET, "/usage"),
        (Method::GET, "/queries"),
        (Method::GET, "/models"),
        (Method::GET, "/metrics"),
        (Method::GET, "/ratelimits"),
        (Method::POST, "/users/alice/keys"),
        (Method::GET, "/users/alice/limits"),
        (Method::PUT, "/limits/default"),
        (Method::DELETE, "/keys/key_x"),
        (Method::POST, "/model/gpt-x"),
    ] {
        let r = send(
            p.addr,
            Request::builder()
                .method(method.clone())
                .uri(path)
                .body(full(r#"{"budget":0}"#))
                .unwrap(),
        )
        .await;
        let msg = assert_openai_error(&r, 403, "invalid_request_error", None, None);
        assert!(msg.contains("loopback"), "{method} {path}: {msg}");
    }
    // Nothing was created by the refused calls.
    assert!(p
        .state
        .store
        .accounts()
        .list_keys("alice")
        .unwrap()
        .is_empty());
    assert_eq!(send(p.addr, get("/healthz")).await.status, 200);
    assert_eq!(send(p.addr, get("/readyz")).await.status, 200);
    let r = send(p.addr, chat_req("alice", &chat_body("gpt-x", false))).await;
    assert_eq!(r.status, 200, "{}", r.text());

    let p2 = Proxy::builder(&mock.url())
        .bind(ip)
        .admin(ADMIN)
        .start()
        .await;
    let r = send(p2.addr, get("/usage")).await;
    assert_openai_error(
        &r,
        401,
        "invalid_request_error",
        None,
        Some("invalid_api_key"),
    );
    let r = p2.get("/usage").await;
    assert_eq!(r.status, 200, "{}", r.text());
}

// ---------------------------------------------------------------------------
// User keys.
// ---------------------------------------------------------------------------

/// Create (shown once, `tg-` + base62), list (never the key), use (the user
/// comes from the key, x-user ignored, upstream gets the upstream key),
/// last use, revoke (refused at once), revoke again (404).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_lifecycle_in_keys_mode() {
    let mock = fixed(Tok::new(11, 7)).await;
    let p = keys_proxy(&mock).await;

    let t0 = now_ms();
    let r = p.admin_call(Method::POST, "/users/alice/keys", "").await;
    let t1 = now_ms();
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    let created = r.json();
    assert_eq!(sorted_keys(&created), ["createdAt", "id", "key", "user"]);
    assert_eq!(created["user"], "alice");
    let key1 = created["key"].as_str().unwrap().to_owned();
    let id1 = created["id"].as_str().unwrap().to_owned();
    let body62 = key1.strip_prefix("tg-").expect("tg- prefix");
    assert!(
        body62.bytes().all(|c| c.is_ascii_alphanumeric()),
        "base62: {key1}"
    );
    // 32 random bytes are 43 base62 digits, rarely fewer.
    assert!((40..=43).contains(&body62.len()), "{key1}");
    assert!(!id1.is_empty() && !key1.contains(&id1) && !id1.contains(body62));
    let c = ts_ms(&created["createdAt"]);
    assert!(
        t0 - 1 <= c && c <= t1 + 1,
        "createdAt {c} not in [{t0}, {t1}]"
    );

    // Only the key's SHA-256 is stored.
    assert_eq!(stored_digest(&p.db, &id1), tollgate::access::digest(&key1));
    // The files themselves (SQLite; PostgreSQL's rows were checked above).
    for file in ["tollgate.db", "tollgate.db-wal"] {
        let bytes = std::fs::read(p.db.with_file_name(file)).unwrap_or_default();
        assert!(
            !bytes.windows(body62.len()).any(|w| w == body62.as_bytes()),
            "the key itself is in {file}"
        );
    }

    let (id2, key2) = new_key(&p, "alice").await;
    let (_, bob_key) = new_key(&p, "bob").await;
    assert_ne!(key1, key2);
    assert_ne!(id1, id2);

    let r = p.get("/users/alice/keys").await;
    assert_eq!(r.status, 200);
    for k in [&key1, &key2, &bob_key] {
        assert!(
            !r.text().contains(k.as_str()),
            "a listing never shows a key"
        );
    }
    assert!(!r.text().contains("tg-"), "{}", r.text());
    let list = r.json();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    let mut ids: Vec<&str> = list.iter().map(|k| k["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    let mut want = [id1.as_str(), id2.as_str()];
    want.sort_unstable();
    assert_eq!(ids, want);
    for k in list {
        assert_eq!(
            sorted_keys(k),
            ["createdAt", "id", "lastUsedAt", "revokedAt", "user"]
        );
        assert_eq!(k["user"], "alice");
        assert_eq!(k["lastUsedAt"], Value::Null);
        assert_eq!(k["revokedAt"], Value::Null);
    }
    assert_eq!(p.get("/users/nobody/keys").await.text(), "[]");

    // In keys mode x-user is ignored: the key names the user.
    let body = chat_body("gpt-x", false);
    let before_use = now_ms();
    let mut req = key_req(&key1, &body);
    req.headers_mut()
        .insert("x-user", "mallory".parse().unwrap());
    let r = send(p.addr, req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = send(p.addr, key_req(&bob_key, &body)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = mock.wait_seen(2).await;
    for s in &seen {
        assert_eq!(
            s.header("authorization").as_deref(),
            Some(format!("Bearer {UPSTREAM_KEY}").as_str())
        );
        assert_eq!(s.header_count("authorization"), 1);
        assert_eq!(s.header("x-user"), None);
        for (name, v) in &s.headers {
            assert!(
                !String::from_utf8_lossy(v.as_bytes()).contains("tg-"),
                "tollgate key leaked upstream in {name}"
            );
        }
        assert_eq!(s.body, body.as_bytes(), "body forwarded untouched");
    }
    let recs = p.wait_records(2).await;
    assert_eq!(recs[0]["user"], "alice");
    assert_eq!(recs[1]["user"], "bob");

    let list = p.get_json("/users/alice/keys").await;
    let by_id = |id: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id)
            .cloned()
            .unwrap()
    };
    let used = ts_ms(&by_id(&id1)["lastUsedAt"]);
    assert!(used >= before_use && used >= c, "lastUsedAt {used}");
    assert_eq!(by_id(&id2)["lastUsedAt"], Value::Null);

    // Revocation works at once.
    let r = p
        .admin_call(Method::DELETE, &format!("/keys/{id1}"), "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"id": id1, "user": "alice", "revoked": true})
    );
    let r = send(p.addr, key_req(&key1, &body)).await;
    assert_openai_error(
        &r,
        401,
        "invalid_request_error",
        None,
        Some("invalid_api_key"),
    );
    assert_eq!(mock.seen().len(), 2, "a revoked key never reaches upstream");
    let r = p
        .admin_call(Method::DELETE, &format!("/keys/{id1}"), "")
        .await;
    assert_openai_error(&r, 404, "invalid_request_error", None, Some("not_found"));
    let r = p.admin_call(Method::DELETE, "/keys/key_unknown", "").await;
    assert_openai_error(&r, 404, "invalid_request_error", None, Some("not_found"));

    // The other key of the same user still works.
    let r = send(p.addr, key_req(&key2, &body)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let list = p.get_json("/users/alice/keys").await;
    let revoked = list
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id1.as_str())
        .unwrap()
        .clone();
    assert!(ts_ms(&revoked["revokedAt"]) >= used);
    let users: Vec<Value> = p
        .wait_records(3)
        .await
        .iter()
        .map(|r| r["user"].clone())
        .collect();
    assert_eq!(users, [json!("alice"), json!("bob"), json!("alice")]);
}

/// In keys mode every request without a valid key is refused with 401
/// `invalid_api_key` before upstream, x-user or not; no record is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_mode_refuses_missing_unknown_and_mangled_keys() {
    let mock = fixed(Tok::new(3, 3)).await;
    let p = keys_proxy(&mock).await;
    let (_, key) = new_key(&p, "alice").await;
    let body = chat_body("gpt-x", false);
    let mut changed = key.clone().into_bytes();
    let last = changed.len() - 1;
    changed[last] = if changed[last] == b'a' { b'b' } else { b'a' };
    let changed = String::from_utf8(changed).unwrap();
    let bad = [
        format!("Bearer {key}x"),
        format!("Bearer {}", &key[..key.len() - 1]),
        format!("Bearer {changed}"),
        format!("Basic {key}"),
        key.clone(),
        format!("Bearer {ADMIN}"),
        format!("Bearer {UPSTREAM_KEY}"),
        "Bearer tg-0000000000000000000000000000000000000000000".to_owned(),
        "Bearer".to_owned(),
    ];
    for auth in &bad {
        let mut req = auth_req(auth, &body);
        req.headers_mut().insert("x-user", "alice".parse().unwrap());
        let r = send(p.addr, req).await;
        let msg = assert_openai_error(
            &r,
            401,
            "invalid_request_error",
            None,
            Some("invalid_api_key"),
        );
        assert!(!msg.contains(&key), "{auth}: {msg}");
    }
    // x-user alone is not enough.
    let r = p.chat("alice", &body).await;
    let mut no_auth = chat_req("alice", &body);
    no_auth.headers_mut().remove("authorization");
    let r2 = send(p.addr, no_auth).await;
    for r in [r, r2] {
        assert_openai_error(
            &r,
            401,
            "invalid_request_error",
            None,
            Some("invalid_api_key"),
        );
    }
    // The scheme is case-insensitive (RFC 9110), so an SDK's "bearer" works.
    let r = send(p.addr, auth_req(&format!("bearer {key}"), &body)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(mock.seen().len(), 1, "only the valid key reached upstream");
    p.state.store.flush().await;
    assert_eq!(p.queries("").await.len(), 1);
}

/// Header mode (the default) still trusts x-user, whatever key comes along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_mode_trusts_x_user() {
    let mock = fixed(Tok::new(3, 3)).await;
    let p = Proxy::builder(&mock.url())
        .admin(ADMIN)
        .token(UPSTREAM_KEY)
        .start()
        .await;
    let (_, alice_key) = new_key(&p, "alice").await;
    let body = chat_body("gpt-x", false);
    let mut req = key_req(&alice_key, &body);
    req.headers_mut().insert("x-user", "bob".parse().unwrap());
    let r = send(p.addr, req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Without x-user a key does not name the user in header mode.
    let r = send(p.addr, key_req(&alice_key, &body)).await;
    assert_openai_error(&r, 401, "invalid_request_error", None, Some("missing_user"));
    let r = p.chat("carol", &body).await;
    assert_eq!(r.status, 200);
    let recs = p.wait_records(2).await;
    assert_eq!(recs[0]["user"], "bob");
    assert_eq!(recs[1]["user"], "carol");
    let seen = mock.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0].header("authorization").as_deref(),
        Some(format!("Bearer {UPSTREAM_KEY}").as_str())
    );
}

/// What an unmodified OpenAI SDK sends with only `base_url` and `api_key`
/// changed: its usual headers, `Authorization: Bearer tg-...`, no x-user.
/// Plain, streamed and a model listing all work and are charged to the key's
/// user; without an upstream key nothing of the client's key goes upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmodified_sdk_request_in_keys_mode() {
    let mock = Mock::start(|seen| {
        if seen.path.starts_with("/v1/models") {
            return Reply::json(r#"{"object":"list","data":[]}"#);
        }
        if seen.json()["stream"] == true {
            Reply::sse_events(chat_stream(
                seen,
                "gpt-4o-mini",
                &["Hi", "!"],
                Tok::new(9, 2),
            ))
        } else {
            Reply::json(completion("gpt-4o-mini", "Hello!", Tok::new(9, 2)))
        }
    })
    .await;
    // No upstream key: the tollgate key must still not go upstream.
    let p = Proxy::builder(&mock.url())
        .admin(ADMIN)
        .auth(AuthMode::Keys)
        .start()
        .await;
    let (_, key) = new_key(&p, "alice").await;
    let sdk = |method: Method, path: &str, body: &str| {
        Request::builder()
            .method(method)
            .uri(path)
            .header("accept", "application/json")
            .header("content-type", "application/json")
            .header("user-agent", "OpenAI/Python 1.54.4")
            .header("x-stainless-lang", "python")
            .header("x-stainless-package-version", "1.54.4")
            .header("x-stainless-os", "Linux")
            .header("x-stainless-arch", "x64")
            .header("x-stainless-runtime", "CPython")
            .header("x-stainless-runtime-version", "3.12.3")
            .header("x-stainless-retry-count", "0")
            .header("authorization", format!("Bearer {key}"))
            .body(full(body.to_owned()))
            .unwrap()
    };
    let plain = r#"{"messages":[{"role":"user","content":"Say hello"}],"model":"gpt-4o-mini"}"#;
    let r = send(p.addr, sdk(Method::POST, "/v1/chat/completions", plain)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["message"]["content"], "Hello!");
    let streamed = r#"{"messages":[{"role":"user","content":"Say hello"}],"model":"gpt-4o-mini","stream":true}"#;
    let r = send(p.addr, sdk(Method::POST, "/v1/chat/completions", streamed)).await;
    assert_eq!(r.status, 200);
    assert!(r.text().ends_with("data: [DONE]\n\n"), "{}", r.text());
    assert!(!r.text().contains("\"choices\":[]"), "usage chunk stripped");
    let r = send(p.addr, sdk(Method::GET, "/v1/models", "")).await;
    assert_eq!(r.status, 200, "{}", r.text());

    let seen = mock.wait_seen(3).await;
    for s in &seen {
        assert_eq!(s.header("authorization"), None, "{}", s.path);
        assert_eq!(
            s.header("user-agent").as_deref(),
            Some("OpenAI/Python 1.54.4")
        );
    }
    assert_eq!(seen[0].body, plain.as_bytes());
    let recs = p.wait_records(3).await;
    for r in &recs {
        assert_eq!(r["user"], "alice", "{r}");
    }
    assert_eq!(recs[0]["queryTokens"], 9);
    assert_eq!(recs[1]["answerTokens"], 2);
    assert_eq!(recs[1]["estimated"], false);
}

/// The real `openai` Python SDK (from the SDK suite's environment, when it
/// was built) with only `base_url` and `api_key` changed; a revoked key
/// raises its AuthenticationError with code `invalid_api_key`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_in_keys_mode() {
    let python =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/sdk-venv/bin/python");
    if !python.exists() {
        eprintln!(
            "note: {} missing (the sdk test builds it); test skipped",
            python.display()
        );
        return;
    }
    let mock = fixed(Tok::new(12, 4)).await;
    let p = keys_proxy(&mock).await;
    let (id, key) = new_key(&p, "alice").await;
    let script = r#"
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
r = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
print("OK", r.usage.prompt_tokens, r.usage.completion_tokens)
sys.stdout.flush()
input()
try:
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    print("NOERROR")
except openai.AuthenticationError as e:
    print("AUTH", e.status_code, e.code)
"#;
    let mut child = std::process::Command::new(&python)
        .args(["-c", script, &format!("http://{}/v1", p.addr), &key])
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run python");
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let first = within("sdk first call", rx.recv()).await;
    assert_eq!(first.as_deref(), Some("OK 12 4"));
    let r = p
        .admin_call(Method::DELETE, &format!("/keys/{id}"), "")
        .await;
    assert_eq!(r.status, 200);
    use std::io::Write;
    writeln!(stdin).unwrap();
    let second = within("sdk second call", rx.recv()).await;
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        second.as_deref(),
        Some("AUTH 401 invalid_api_key"),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success());
    let recs = p.wait_records(1).await;
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["user"], "alice");
    assert_eq!(mock.seen().len(), 1);
}

// ---------------------------------------------------------------------------
// Budgets.
// ---------------------------------------------------------------------------

/// 200 concurrent requests at a user with room for exactly 10: the
/// reservations alone stop the other 190 while the 10 are still upstream;
/// the 190 get 429 `budget_exceeded` with `retry-after` (the month's end),
/// never reach upstream and leave no record; spend ends exactly at the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_holds_under_200_concurrent_requests() {
    let gate = Gate::new();
    let mock = metered(|max| max, Some(gate.clone())).await;
    let p = keys_proxy(&mock).await;
    price(&p).await;
    let (_, key) = new_key(&p, "alice").await;
    let b = body(100);
    let r = reservation(&b, 100);
    let budget = 10 * r;
    let l = put_limits(
        &p,
        Some("alice"),
        &format!(r#"{{"budget":{},"period":"month"}}"#, dollars(budget)),
    )
    .await;
    assert_eq!(l["budget"], dollars(budget));
    assert_eq!(l["spent"], "0");
    assert_eq!(l["remaining"], dollars(budget));

    let t0 = now_ms();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (addr, key, b, done) = (p.addr, key.clone(), b.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let r = send(addr, key_req(&key, &b)).await;
            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            r
        }));
    }
    // While the admitted requests wait upstream, everyone else is refused.
    eventually("190 refusals while 10 are upstream", STEP, || async {
        (done.load(std::sync::atomic::Ordering::SeqCst) >= 190).then_some(())
    })
    .await;
    assert_eq!(mock.wait_seen(10).await.len(), 10);
    assert_eq!(done.load(std::sync::atomic::Ordering::SeqCst), 190);
    let l = limits(&p, "alice").await;
    assert_eq!(l["spent"], "0");
    assert_eq!(l["reserved"], dollars(budget));
    assert_eq!(l["remaining"], "0");
    gate.open();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(within("request", t).await.unwrap());
    }
    let t1 = now_ms();
    let ok = answers.iter().filter(|a| a.status == 200).count();
    assert_eq!(ok, 10);
    let (_, month_end) = month_bounds(t0);
    for a in answers.iter().filter(|a| a.status != 200) {
        assert_openai_error(a, 429, "requests", None, Some("budget_exceeded"));
        let ra = retry_after(a);
        assert!(
            (secs_until(month_end, t1)..=secs_until(month_end, t0)).contains(&ra),
            "retry-after {ra}"
        );
    }
    assert_eq!(mock.seen().len(), 10, "refused requests never go upstream");

    assert_eq!(p.wait_records(10).await.len(), 10);
    for rec in &p.queries_raw("").await {
        assert_eq!(rec["user"], quoted("alice"));
        assert_eq!(rec["cost"], dollars(r), "settled == reserved: {rec:?}");
    }
    let u = p.usage_raw("").await;
    assert_eq!(u["numQueries"], "10");
    assert_eq!(u["cost"], dollars(budget), "spend ends at the budget");
    assert_eq!(u["rejectedQueries"], "190");
    assert_eq!(p.usage_raw("user=alice").await["rejectedQueries"], "190");
    assert_eq!(
        p.usage_raw(&format!("user=alice&model={MODEL}")).await["rejectedQueries"],
        "190"
    );
    assert_eq!(p.usage_raw("user=bob").await["rejectedQueries"], "0");
    assert_eq!(rejected_metric(&p, "budget_exceeded").await, 190.0);
    let l = limits(&p, "alice").await;
    assert_eq!(l["spent"], dollars(budget));
    assert_eq!(l["reserved"], "0");
    assert_eq!(l["remaining"], "0");
    // Settled spend refuses too.
    let r = send(p.addr, key_req(&key, &b)).await;
    assert_openai_error(&r, 429, "requests", None, Some("budget_exceeded"));
    assert_eq!(mock.seen().len(), 10);
}

/// When requests cost less than they reserved, settlement gives the
/// difference back: after a concurrent first wave (exactly the 10 that fit
/// by reservation), more requests fit, exactly as many as
/// `k * cost + reservation <= budget` allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settling_below_the_reservation_frees_room() {
    let gate = Gate::new();
    // A quarter of the answer the request asked for.
    let mock = metered(|max| max / 4, Some(gate.clone())).await;
    let p = Proxy::builder(&mock.url()).start().await;
    price(&p).await;
    let b = body(100);
    let r = reservation(&b, 100);
    let cost = reservation(&b, 25);
    let budget = 10 * r;
    put_limits(
        &p,
        Some("dave"),
        &format!(r#"{{"budget":{},"period":"total"}}"#, dollars(budget)),
    )
    .await;
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut wave = Vec::new();
    for _ in 0..30 {
        let (addr, b, done) = (p.addr, b.clone(), done.clone());
        wave.push(tokio::spawn(async move {
            let r = send(addr, chat_req("dave", &b)).await;
            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            r
        }));
    }
    // The gate opens only once the other 20 were refused: a request the
    // proxy had not yet read when the first 10 settled would fit.
    eventually("20 refusals while 10 are upstream", STEP, || async {
        (done.load(std::sync::atomic::Ordering::SeqCst) >= 20).then_some(())
    })
    .await;
    mock.wait_seen(10).await;
    let l = limits(&p, "dave").await;
    assert_eq!(l["reserved"], dollars(budget));
    gate.open();
    let mut statuses = Vec::new();
    for t in wave {
        let a = within("request", t).await.unwrap();
        if a.status == 429 {
            assert_openai_error(&a, 429, "requests", None, Some("budget_exceeded"));
            assert_eq!(
                a.header("retry-after"),
                None,
                "a total budget never frees up"
            );
        }
        statuses.push(a.status.as_u16());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 10);
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 20);
    p.state.store.flush().await;
    let l = limits(&p, "dave").await;
    assert_eq!(l["spent"], dollars(10 * cost));
    assert_eq!(l["reserved"], "0");

    // Request k (from 0) fits while k * cost + reservation <= budget.
    let fits = usize::try_from((budget - r) / cost + 1).unwrap();
    assert!(fits > 10);
    let mut more = 0;
    loop {
        let a = p.chat("dave", &b).await;
        if a.status == 429 {
            assert_openai_error(&a, 429, "requests", None, Some("budget_exceeded"));
            break;
        }
        assert_eq!(a.status, 200, "{}", a.text());
        more += 1;
        assert!(more <= fits, "more requests than the budget allows");
        // Settlement happens when the record is written.
        p.state.store.flush().await;
    }
    assert_eq!(10 + more, fits);
    p.state.store.flush().await;
    let spent = i128::try_from(fits).unwrap() * cost;
    assert!(spent <= budget);
    assert_eq!(limits(&p, "dave").await["spent"], dollars(spent));
    assert_eq!(p.usage_raw("user=dave").await["cost"], dollars(spent));
    assert_eq!(p.usage_raw("user=dave").await["rejectedQueries"], "21");
}

/// What a request reserves, read from `reserved` while it waits upstream:
/// one prompt token per 3 body bytes plus `max_completion_tokens`, else
/// `max_tokens`, else `max_output_tokens`, else the configured default; no
/// answer for embeddings; nothing for an unpriced model. Settlement returns it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservation_follows_the_request() {
    let current: Arc<Mutex<Gate>> = Arc::new(Mutex::new(Gate::new()));
    let cur = current.clone();
    let mock = Mock::start(move |_| {
        Reply::json(completion(MODEL, "ok", Tok::new(1, 1))).head_after(cur.lock().unwrap().clone())
    })
    .await;
    let p = Proxy::builder(&mock.url())
        .reserve_answer_tokens(300)
        .start()
        .await;
    price(&p).await;
    put_limits(&p, Some("erin"), r#"{"budget":1000,"period":"total"}"#).await;
    let m = MODEL;
    let cases: Vec<(&str, String, i128)> = vec![
        (
            "/v1/chat/completions",
            format!(r#"{{"model":"{m}","messages":[],"max_tokens":100}}"#),
            100,
        ),
        (
            "/v1/chat/completions",
            format!(
                r#"{{"model":"{m}","messages":[],"max_tokens":100,"max_completion_tokens":50}}"#
            ),
            50,
        ),
        (
            "/v1/chat/completions",
            format!(
                r#"{{"model":"{m}","messages":[{{"role":"user","content":"no limit given"}}]}}"#
            ),
            300,
        ),
        (
            "/v1/responses",
            format!(r#"{{"model":"{m}","input":"hello","max_output_tokens":70}}"#),
            70,
        ),
        (
            "/v1/completions",
            format!(r#"{{"model":"{m}","prompt":"once upon","max_tokens":9}}"#),
            9,
        ),
        (
            "/v1/embeddings",
            format!(r#"{{"model":"{m}","input":"some text"}}"#),
            0,
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"unpriced-model","messages":[],"max_tokens":100}"#.to_owned(),
            -1,
        ),
    ];
    for (i, (path, body, answer)) in cases.iter().enumerate() {
        let gate = Gate::new();
        *current.lock().unwrap() = gate.clone();
        let req = Request::post(*path)
            .header("content-type", "application/json")
            .header("x-user", "erin")
            .body(full(body.clone()))
            .unwrap();
        let addr = p.addr;
        let t = tokio::spawn(async move { send(addr, req).await });
        mock.wait_seen(i + 1).await;
        let want = if *answer < 0 {
            0
        } else {
            i128::from(prompt_reserve(body.len())) * Q + answer * A
        };
        assert_eq!(
            limits(&p, "erin").await["reserved"],
            dollars(want),
            "{path} {body}"
        );
        gate.open();
        assert_eq!(within("answer", t).await.unwrap().status, 200);
        p.state.store.flush().await;
        assert_eq!(limits(&p, "erin").await["reserved"], "0", "{path} {body}");
    }
}

/// A request with `n` choices may produce `n` answers of `max_tokens` each,
/// so its worst case is `n` times the answer; reserving one answer lets a
/// single request spend past the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservation_covers_every_choice() {
    let mock = Mock::start(|seen| {
        let v = seen.json();
        let n = v["n"].as_u64().unwrap_or(1);
        let t = Tok::new(
            prompt_reserve(seen.body.len()),
            n * max_tokens_of(&v).unwrap_or(0),
        );
        Reply::json(completion(MODEL, "many", t))
    })
    .await;
    let p = Proxy::builder(&mock.url()).start().await;
    price(&p).await;
    let b = format!(r#"{{"model":"{MODEL}","messages":[],"max_tokens":100,"n":4}}"#);
    // Room for the body's prompt and one answer, not four.
    let budget = reservation(&b, 100);
    put_limits(
        &p,
        Some("fay"),
        &format!(r#"{{"budget":{},"period":"total"}}"#, dollars(budget)),
    )
    .await;
    let _ = p.chat("fay", &b).await;
    p.state.store.flush().await;
    let spent = p.usage_raw("user=fay").await["cost"].clone();
    let spent = tollgate::pricing::parse_scaled(&spent, 12).unwrap();
    assert!(
        i128::from(spent) <= budget,
        "spent {} of a {} budget",
        dollars(spent.into()),
        dollars(budget)
    );
}

/// `requestsPerMinute`: the calendar minute's extra requests get 429
/// `rate_limit_exceeded` with `retry-after` up to the next minute; other
/// users are not affected; refusals are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_minute_limit() {
    let mock = fixed(Tok::new(5, 5)).await;
    let p = Proxy::builder(&mock.url()).start().await;
    let body = chat_body("gpt-x", false);
    let (pr, mr, br) = (&p, &mock, &body);
    let ((user, answers, seen_before, seen_after, metric_delta), t0, t1) =
        in_one_minute(|attempt| {
            let (p, mock, body) = (pr, mr, br);
            async move {
                let user = format!("rpm-{attempt}");
                put_limits(p, Some(&user), r#"{"requestsPerMinute":3}"#).await;
                let m0 = rejected_metric(p, "rate_limit_exceeded").await;
                let seen_before = mock.seen().len();
                let mut answers = Vec::new();
                for _ in 0..5 {
                    answers.push(p.chat(&user, body).await);
                }
                let other = p.chat("someone-else", body).await;
                assert_eq!(other.status, 200);
                let seen_after = mock.seen().len();
                let m1 = rejected_metric(p, "rate_limit_exceeded").await;
                (user, answers, seen_before, seen_after, m1 - m0)
            }
        })
        .await;
    let statuses: Vec<u16> = answers.iter().map(|a| a.status.as_u16()).collect();
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    let next_minute = (t0.div_euclid(60_000) + 1) * 60_000;
    for a in &answers[3..] {
        let msg = assert_openai_error(a, 429, "requests", None, Some("rate_limit_exceeded"));
        assert!(msg.contains("requests"), "{msg}");
        let ra = retry_after(a);
        assert!(ra <= 60);
        assert!(
            (secs_until(next_minute, t1)..=secs_until(next_minute, t0)).contains(&ra),
            "retry-after {ra}"
        );
    }
    assert_eq!(seen_after - seen_before, 4, "3 of the user's, 1 of another");
    assert_eq!(metric_delta, 2.0);
    let u = p.usage_raw(&format!("user={user}")).await;
    assert_eq!(u["numQueries"], "3");
    assert_eq!(u["rejectedQueries"], "2");
}

/// `tokensPerMinute` counts the reserved tokens (prompt estimate plus the
/// answer asked for), settled to the real ones: the third request of a
/// two-request allowance is refused, and so is a request whose reservation
/// alone is over the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_per_minute_limit() {
    let mock = metered(|max| max, None).await;
    let p = Proxy::builder(&mock.url()).start().await;
    let b = body(100);
    let per_request = prompt_reserve(b.len()) + 100;
    let (pr, mr, br) = (&p, &mock, &b);
    let ((answers, too_big, seen), t0, t1) = in_one_minute(|attempt| {
        let (p, mock, b) = (pr, mr, br);
        async move {
            let user = format!("tpm-{attempt}");
            put_limits(
                p,
                Some(&user),
                &format!(
                    r#"{{"tokensPerMinute":{}}}"#,
                    2 * per_request + per_request / 2
                ),
            )
            .await;
            let seen0 = mock.seen().len();
            let mut answers = Vec::new();
            for _ in 0..3 {
                answers.push(p.chat(&user, b).await);
            }
            let small = format!("tpm-small-{attempt}");
            put_limits(
                p,
                Some(&small),
                &format!(r#"{{"tokensPerMinute":{}}}"#, per_request - 1),
            )
            .await;
            let too_big = p.chat(&small, b).await;
            (answers, too_big, mock.seen().len() - seen0)
        }
    })
    .await;
    let statuses: Vec<u16> = answers.iter().map(|a| a.status.as_u16()).collect();
    assert_eq!(statuses, [200, 200, 429]);
    let next_minute = (t0.div_euclid(60_000) + 1) * 60_000;
    for a in [&answers[2], &too_big] {
        let msg = assert_openai_error(a, 429, "requests", None, Some("rate_limit_exceeded"));
        assert!(msg.contains("tokens"), "{msg}");
        let ra = retry_after(a);
        assert!(
            ra <= 60 && (secs_until(next_minute, t1)..=secs_until(next_minute, t0)).contains(&ra),
            "retry-after {ra}"
        );
    }
    assert_eq!(seen, 2);
}

/// Default limits apply to every user without their own (each user with
/// their own counter); a user's own limits replace them entirely; deleting
/// either falls back as expected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_limits_apply_to_users_without_their_own() {
    let mock = metered(|max| max, None).await;
    let p = Proxy::builder(&mock.url()).start().await;
    price(&p).await;
    let b = body(100);
    let r = reservation(&b, 100);
    // Room for one request per user (not two).
    let budget = r + r / 2;
    let d = put_limits(
        &p,
        None,
        &format!(r#"{{"budget":{},"period":"total"}}"#, dollars(budget)),
    )
    .await;
    assert_eq!(
        d,
        BTreeMap::from([
            ("user".into(), "null".into()),
            ("default".into(), "true".into()),
            ("budget".into(), dollars(budget)),
            ("period".into(), quoted("total")),
            ("requestsPerMinute".into(), "null".into()),
            ("tokensPerMinute".into(), "null".into()),
        ])
    );
    assert_eq!(raw_object(&p.get("/limits/default").await.text()), d);
    // Own limits without a budget: the default budget does not apply.
    let own = put_limits(&p, Some("frank"), r#"{"requestsPerMinute":1000}"#).await;
    assert_eq!(own["default"], "false");
    assert_eq!(own["budget"], "null");
    assert_eq!(own["remaining"], "null");

    for user in ["erin", "gina"] {
        assert_eq!(p.chat(user, &b).await.status, 200, "{user}'s first");
        let a = p.chat(user, &b).await;
        assert_openai_error(&a, 429, "requests", None, Some("budget_exceeded"));
        assert_eq!(
            a.header("retry-after"),
            None,
            "a total budget never frees up"
        );
    }
    for _ in 0..3 {
        assert_eq!(p.chat("frank", &b).await.status, 200, "own limits win");
    }
    p.state.store.flush().await;
    let e = limits(&p, "erin").await;
    assert_eq!(e["default"], "true");
    assert_eq!(e["budget"], dollars(budget));
    assert_eq!(e["spent"], dollars(r));
    assert_eq!(e["remaining"], dollars(budget - r));
    assert_eq!(e["periodStart"], "null");
    assert_eq!(e["periodEnd"], "null");

    // Without own limits, frank falls under the default, with his spend.
    let after = p
        .admin_call(Method::DELETE, "/users/frank/limits", "")
        .await;
    assert_eq!(after.status, 200);
    let f = raw_object(&after.text());
    assert_eq!(f["default"], "true");
    assert_eq!(f["spent"], dollars(3 * r));
    let a = p.chat("frank", &b).await;
    assert_openai_error(&a, 429, "requests", None, Some("budget_exceeded"));

    // Without the default, nobody is limited.
    let r = p.admin_call(Method::DELETE, "/limits/default", "").await;
    assert_eq!(r.status, 200);
    assert_eq!(raw_object(&r.text())["budget"], "null");
    assert_eq!(p.chat("erin", &b).await.status, 200);
    assert_eq!(limits(&p, "erin").await["default"], "false");
    let u = p.usage_raw("").await;
    assert_eq!(u["rejectedQueries"], "3");
}

/// Limits bodies: every field optional, `null` meaning none, PUT replaces the
/// whole set; a bad field is a 400 naming it and changes nothing; GET shows
/// the calendar-aligned period in UTC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_bodies_are_validated_and_replace() {
    let mock = fixed(Tok::new(1, 1)).await;
    let p = Proxy::builder(&mock.url()).admin(ADMIN).start().await;
    let t0 = now_ms();
    let l = put_limits(
        &p,
        Some("hank"),
        r#"{"budget":5.5,"period":"week","requestsPerMinute":7,"tokensPerMinute":null}"#,
    )
    .await;
    let t1 = now_ms();
    assert_eq!(l["user"], quoted("hank"));
    assert_eq!(l["default"], "false");
    assert_eq!(l["budget"], "5.5");
    assert_eq!(l["period"], quoted("week"));
    assert_eq!(l["requestsPerMinute"], "7");
    assert_eq!(l["tokensPerMinute"], "null");
    assert_eq!(l["spent"], "0");
    assert_eq!(l["reserved"], "0");
    assert_eq!(l["remaining"], "5.5");
    assert_period(&l, t0, t1, week_bounds);
    let bad: [(&str, &str); 12] = [
        (r#"{"budget":"ten"}"#, "budget"),
        (r#"{"budget":-1}"#, "budget"),
        (r#"{"budget":0.0000000000001}"#, "budget"),
        (r#"{"budget":true}"#, "budget"),
        (r#"{"period":"year"}"#, "period"),
        (r#"{"period":3}"#, "period"),
        (r#"{"requestsPerMinute":-1}"#, "requestsPerMinute"),
        (r#"{"requestsPerMinute":1.5}"#, "requestsPerMinute"),
        (r#"{"tokensPerMinute":"5"}"#, "tokensPerMinute"),
        (r#"{"budjet":1}"#, "budjet"),
        (r#"{"budget":1,"rpm":2}"#, "rpm"),
        (r#"{"period":"Week"}"#, "period"),
    ];
    for (body, param) in bad {
        let r = p.admin_call(Method::PUT, "/users/hank/limits", body).await;
        assert_openai_error(&r, 400, "invalid_request_error", Some(param), None);
    }
    for body in ["[1]", "not json", ""] {
        let r = p.admin_call(Method::PUT, "/users/hank/limits", body).await;
        assert_openai_error(&r, 400, "invalid_request_error", None, None);
    }
    assert_eq!(limits(&p, "hank").await["budget"], "5.5", "unchanged");
    // PUT replaces: what is not given is gone, the period back to month.
    let t0 = now_ms();
    let l = put_limits(&p, Some("hank"), r#"{"tokensPerMinute":9}"#).await;
    let t1 = now_ms();
    assert_eq!(l["budget"], "null");
    assert_eq!(l["period"], quoted("month"));
    assert_eq!(l["requestsPerMinute"], "null");
    assert_eq!(l["tokensPerMinute"], "9");
    assert_eq!(l["remaining"], "null");
    assert_period(&l, t0, t1, month_bounds);
    let l = put_limits(&p, Some("hank"), r#"{"budget":0,"period":"day"}"#).await;
    assert_eq!(l["budget"], "0");
    assert_eq!(l["period"], quoted("day"));
    // No limits at all: just the settings, no spend.
    let r = p.admin_call(Method::DELETE, "/users/hank/limits", "").await;
    assert_eq!(
        r.json(),
        json!({"user":"hank","default":false,"budget":null,"period":"month","requestsPerMinute":null,"tokensPerMinute":null})
    );
    let r = p.get("/users/nobody/limits").await;
    assert_eq!(r.json()["budget"], Value::Null);
    let r = p.admin_call(Method::POST, "/users/hank/limits", "{}").await;
    assert_eq!(r.status, 405);
}

/// Spend before a limit is set counts against it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_before_the_limit_counts() {
    let mock = metered(|max| max, None).await;
    let p = Proxy::builder(&mock.url()).start().await;
    price(&p).await;
    let b = body(100);
    let r = reservation(&b, 100);
    for _ in 0..2 {
        assert_eq!(p.chat("ivan", &b).await.status, 200);
    }
    let l = put_limits(
        &p,
        Some("ivan"),
        &format!(
            r#"{{"budget":{},"period":"month"}}"#,
            dollars(2 * r + r / 2)
        ),
    )
    .await;
    assert_eq!(l["spent"], dollars(2 * r));
    assert_eq!(l["remaining"], dollars(r / 2));
    let a = p.chat("ivan", &b).await;
    assert_openai_error(&a, 429, "requests", None, Some("budget_exceeded"));
}

/// Spend, keys, revocations and limits live in the database: a new server on
/// the same file refuses what the old one would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_and_keys_survive_a_restart() {
    let mock = metered(|max| max, None).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tollgate.db");
    let start = || {
        Proxy::builder(&mock.url())
            .db(&db)
            .admin(ADMIN)
            .auth(AuthMode::Keys)
            .token(UPSTREAM_KEY)
            .start()
    };
    let b = body(100);
    let r = reservation(&b, 100);
    let budget = 4 * r + r / 2;
    let mut p1 = start().await;
    price(&p1).await;
    let (_, alice) = new_key(&p1, "alice").await;
    let (revoked_id, revoked) = new_key(&p1, "alice").await;
    let (_, bob) = new_key(&p1, "bob").await;
    put_limits(
        &p1,
        Some("alice"),
        &format!(r#"{{"budget":{},"period":"month"}}"#, dollars(budget)),
    )
    .await;
    // bob is under the default, with a daily budget.
    put_limits(
        &p1,
        None,
        &format!(r#"{{"budget":{},"period":"day"}}"#, dollars(r)),
    )
    .await;
    for _ in 0..3 {
        assert_eq!(send(p1.addr, key_req(&alice, &b)).await.status, 200);
    }
    assert_eq!(send(p1.addr, key_req(&bob, &b)).await.status, 200);
    let a = send(p1.addr, key_req(&bob, &b)).await;
    assert_eq!(a.status, 429);
    let r1 = p1
        .admin_call(Method::DELETE, &format!("/keys/{revoked_id}"), "")
        .await;
    assert_eq!(r1.status, 200);
    let before = limits(&p1, "alice").await;
    assert_eq!(before["spent"], dollars(3 * r));
    let keys_before = p1.get_json("/users/alice/keys").await;
    p1.stop().await;

    let p2 = start().await;
    let after = limits(&p2, "alice").await;
    assert_eq!(after, before, "spend and limits rebuilt from the database");
    assert_eq!(limits(&p2, "bob").await["spent"], dollars(r));
    assert_eq!(p2.get_json("/users/alice/keys").await, keys_before);
    let l = p2.get_json("/users/alice/keys").await;
    assert!(
        l.as_array()
            .unwrap()
            .iter()
            .any(|k| k["lastUsedAt"].is_string()),
        "last use kept: {l}"
    );
    let a = send(p2.addr, key_req(&revoked, &b)).await;
    assert_openai_error(
        &a,
        401,
        "invalid_request_error",
        None,
        Some("invalid_api_key"),
    );
    let a = send(p2.addr, key_req(&bob, &b)).await;
    assert_openai_error(&a, 429, "requests", None, Some("budget_exceeded"));
    // One more fits (4 of 4.5), then the budget refuses.
    assert_eq!(send(p2.addr, key_req(&alice, &b)).await.status, 200);
    let a = send(p2.addr, key_req(&alice, &b)).await;
    assert_openai_error(&a, 429, "requests", None, Some("budget_exceeded"));
    p2.state.store.flush().await;
    assert_eq!(limits(&p2, "alice").await["spent"], dollars(4 * r));
    assert_eq!(p2.usage_raw("").await["rejectedQueries"], "3");
    assert_eq!(mock.seen().len(), 5);
}

/// `/me/usage`: a user's own usage and budget, with their key and without
/// the admin key; nothing without a valid user key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn me_usage_shows_the_callers_own_usage_and_budget() {
    let mock = metered(|max| max, None).await;
    let p = keys_proxy(&mock).await;
    price(&p).await;
    let (alice_id, alice) = new_key(&p, "alice").await;
    let (_, bob) = new_key(&p, "bob").await;
    let b = body(100);
    let r = reservation(&b, 100);
    put_limits(
        &p,
        Some("alice"),
        &format!(
            r#"{{"budget":{},"period":"month","requestsPerMinute":1000}}"#,
            dollars(2 * r)
        ),
    )
    .await;
    for key in [&alice, &alice, &alice, &bob] {
        send(p.addr, key_req(key, &b)).await;
    }
    let me = |key: &str| {
        let mut req = get("/me/usage");
        req.headers_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
        send(p.addr, req)
    };
    let a = me(&alice).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let v = a.json();
    assert_eq!(sorted_keys(&v), ["limits", "usage", "user"]);
    assert_eq!(v["user"], "alice");
    assert_eq!(v["usage"], p.usage("user=alice").await);
    assert_eq!(v["usage"]["numQueries"], 2);
    assert_eq!(v["usage"]["rejectedQueries"], 1);
    let raw = raw_object(&a.text());
    assert_eq!(raw_object(&raw["usage"])["cost"], dollars(2 * r));
    let lim = raw_object(&raw["limits"]);
    assert_eq!(lim, limits(&p, "alice").await);
    assert_eq!(lim["spent"], dollars(2 * r));
    assert_eq!(lim["remaining"], "0");
    assert_eq!(lim["requestsPerMinute"], "1000");

    let v = me(&bob).await.json();
    assert_eq!(v["user"], "bob");
    assert_eq!(v["usage"]["numQueries"], 1);
    assert_eq!(v["limits"]["budget"], Value::Null);

    let r = send(p.addr, get("/me/usage")).await;
    assert_openai_error(
        &r,
        401,
        "invalid_request_error",
        None,
        Some("invalid_api_key"),
    );
    let mut req = get("/me/usage");
    req.headers_mut().insert("x-user", "alice".parse().unwrap());
    let r = send(p.addr, req).await;
    assert_openai_error(
        &r,
        401,
        "invalid_request_error",
        None,
        Some("invalid_api_key"),
    );
    assert_eq!(me("tg-nope").await.status, 401);
    p.admin_call(Method::DELETE, &format!("/keys/{alice_id}"), "")
        .await;
    assert_eq!(me(&alice).await.status, 401, "revoked");
    let r = p.admin_call(Method::POST, "/me/usage", "").await;
    assert_eq!(r.status, 405);
}

/// Start-up says when admin endpoints answer only to loopback clients, and
/// says nothing of the kind when an admin key is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_says_when_admin_endpoints_are_loopback_only() {
    let mock = fixed(Tok::new(1, 1)).await;
    for admin in [None, Some(ADMIN)] {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.db");
        let env: Vec<(&str, &str)> = admin
            .map(|a| ("TOLLGATE_ADMIN_TOKEN", a))
            .into_iter()
            .collect();
        let mut bin = spawn_logged(
            &["--upstream", &mock.url(), "--db", db.to_str().unwrap()],
            &env,
        );
        // The listening line comes after the admin notice, if any.
        let r = send(bin.addr, get("/usage")).await;
        assert_eq!(r.status, if admin.is_some() { 401 } else { 200 });
        bin.stop().await;
        let notice = bin
            .lines()
            .iter()
            .any(|l| l.contains("no admin key") && l.contains("loopback"));
        assert_eq!(notice, admin.is_none(), "{:#?}", bin.lines());
        assert!(bin.lines().iter().all(|l| !l.contains(ADMIN)));
    }
}
