//! Hardening (issue 13): each test reproduces an attack a hostile client or
//! a misbehaving upstream tried, and shows it no longer works.

mod common;

use std::collections::BTreeSet;

use common::*;
use http::{Method, Request};
use serde_json::Value;
use tollgate::access::AuthMode;

const ADMIN: &str = "adm-hardening-7f3e-admin-key";

/// A mock that answers every request with a priced chat completion for
/// whatever model was asked, and records what it saw.
async fn chat_mock() -> Mock {
    Mock::start(|seen| {
        let model = serde_json::from_slice::<Value>(&seen.body)
            .ok()
            .and_then(|v| v["model"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "none".into());
        Reply::json(completion(&model, "ok", Tok::new(10, 5)))
    })
    .await
}

fn post(path: &str, user: &str, body: &str) -> Request<ReqBody> {
    Request::post(path)
        .header("content-type", "application/json")
        .header("x-user", user)
        .body(full(body.to_owned()))
        .unwrap()
}

// ---------------------------------------------------------------------------
// 2. The text access log
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_values_cannot_forge_access_lines() {
    let mock = chat_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let mut bin = spawn_logged(
        &["--upstream", &mock.url(), "--db", db.to_str().unwrap()],
        &[],
    );
    // JSON escapes: the model holds a newline, quotes and a whole fake line.
    let forged_model =
        r#"m\n2026-11-27T00:00:00.000000Z  INFO tollgate::access: request user=\"mallory\" cost=0"#;
    let sends = [
        ("bob endpoint=/v1/free cost=0", "gpt-4o".to_string()),
        ("carol", forged_model.to_string()),
        ("dave\t", r"esc\u001b[31m\u0000\r".to_string()),
    ];
    for (user, model) in &sends {
        let body =
            format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
        let r = send(bin.addr, post("/v1/chat/completions", user, &body)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let lines = eventually("three access lines", STEP, || async {
        let access: Vec<String> = bin
            .lines()
            .into_iter()
            .filter(|l| l.contains("tollgate::access"))
            .collect();
        (access.len() >= 3).then_some(access)
    })
    .await;
    bin.stop().await;
    assert_eq!(lines.len(), 3, "a forged line: {lines:#?}");
    for l in &lines {
        assert!(
            !l.chars().any(char::is_control),
            "a raw control character: {l:?}"
        );
        assert_eq!(l.matches(" status=").count(), 1, "{l}");
    }
    assert!(
        lines[0].contains(r#"user="bob endpoint=/v1/free cost=0""#),
        "{}",
        lines[0]
    );
    assert!(
        lines[0].contains(r#"endpoint="/v1/chat/completions""#),
        "{}",
        lines[0]
    );
    assert!(lines[1].contains(r#"user="carol""#), "{}", lines[1]);
    assert!(lines[1].contains(r#"\n2026-11-27"#), "{}", lines[1]);
}

// ---------------------------------------------------------------------------
// 5. Credentials in --upstream
// ---------------------------------------------------------------------------

#[test]
fn upstream_url_with_credentials_is_refused_without_echoing_them() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--db",
            db.to_str().unwrap(),
            "--upstream",
            "http://user:hunter2@127.0.0.1:9",
        ])
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run tollgate");
    let deadline = std::time::Instant::now() + STEP;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("tollgate started with credentials in --upstream");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--upstream"), "{err}");
    assert!(!err.contains("hunter2"), "the password is echoed: {err}");
}

#[tokio::test]
async fn an_unreachable_upstream_is_not_named_to_clients() {
    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/secret-prefix");
    let p = Proxy::start(&url).await;
    let r = p.chat("alice", &chat_body("gpt-4o", false)).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(!r.text().contains(&port.to_string()), "{}", r.text());
    assert!(!r.text().contains("secret-prefix"), "{}", r.text());
    assert_openai_error(
        &r,
        502,
        "upstream_error",
        None,
        Some("upstream_unreachable"),
    );
}

// ---------------------------------------------------------------------------
// 6. HEAD over HTTP/2
// ---------------------------------------------------------------------------

#[tokio::test]
async fn head_over_http2_has_no_body() {
    let mock = chat_mock().await;
    let p = Proxy::start(&mock.url()).await;
    for path in ["/healthz", "/usage"] {
        let req = Request::builder()
            .method(Method::HEAD)
            .uri(path)
            .body(empty())
            .unwrap();
        let r = send_h2(p.addr, req).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(r.body.is_empty(), "{path}: HEAD answered {:?}", r.text());
    }
}

// ---------------------------------------------------------------------------
// 7. Path variants
// ---------------------------------------------------------------------------

#[tokio::test]
async fn path_variants_of_chat_are_metered_as_chat() {
    let mock = chat_mock().await;
    let p = Proxy::start(&mock.url()).await;
    p.set_price(
        "gpt-4o",
        r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":1,"per1MAnswerTokens":2}"#,
    )
    .await;
    let variants = [
        "/v1//chat/completions",
        "/v1/chat/%63ompletions",
        "/v1/Chat/Completions",
        "/v1/./chat/completions",
        "/v1/x/../chat/completions",
    ];
    for path in variants {
        let r = send(p.addr, post(path, "eve", &chat_body("gpt-4o", false))).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    let seen = mock.wait_seen(variants.len()).await;
    for s in &seen {
        assert_eq!(s.path, "/v1/chat/completions", "forwarded as is");
    }
    let recs = p.wait_records(variants.len()).await;
    for r in &recs {
        assert_eq!(r["endpoint"], "/v1/chat/completions", "{r}");
        assert_eq!(r["queryTokens"], 10, "{r}");
        assert_ne!(r["cost"].as_str(), Some("0"), "metered at $0: {r}");
    }
}

#[tokio::test]
async fn paths_leaving_v1_or_hiding_separators_never_reach_upstream() {
    let mock = chat_mock().await;
    let p = Proxy::builder(&mock.url())
        .token("sk-upstream-key")
        .start()
        .await;
    for path in [
        "/v1/../anything",
        "/v1/x/../../admin",
        "/v1/%2e%2e/admin",
        "/v1/chat%2Fcompletions",
        "/v1/chat/completions%00",
    ] {
        let r = send(p.addr, post(path, "eve", &chat_body("gpt-4o", false))).await;
        assert_openai_error(&r, 400, "invalid_request_error", None, Some("invalid_path"));
    }
    assert!(mock.seen().is_empty(), "something was forwarded");
}

// ---------------------------------------------------------------------------
// 8. Endpoints that spend without a record of cost
// ---------------------------------------------------------------------------

#[tokio::test]
async fn unmeterable_endpoints_are_refused_in_keys_mode_unless_opened() {
    let mock = chat_mock().await;
    let doors = [
        "/v1/containers",
        "/v1/fine_tuning/jobs",
        "/v1/realtime/sessions",
        "/v1/realtime/client_secrets",
        "/v1/threads/thread_1/runs",
    ];
    let p = Proxy::builder(&mock.url())
        .admin(ADMIN)
        .auth(AuthMode::Keys)
        .start()
        .await;
    let r = p.admin_call(Method::POST, "/users/eve/keys", "").await;
    assert_eq!(r.status, 201, "{}", r.text());
    let key = r.json()["key"].as_str().unwrap().to_owned();
    let keyed = |path: &str| {
        Request::post(path)
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {key}"))
            .body(full(r#"{"model":"gpt-4o"}"#))
            .unwrap()
    };
    for path in doors {
        let r = send(p.addr, keyed(path)).await;
        assert_openai_error(
            &r,
            403,
            "invalid_request_error",
            None,
            Some("unmetered_endpoint"),
        );
        assert!(r.text().contains("--allow-unmetered"), "{}", r.text());
    }
    assert!(mock.seen().is_empty(), "an unmetered door was opened");
    // Metered endpoints still pass.
    let r = send(p.addr, keyed("/v1/chat/completions")).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // The admin can open a family on purpose.
    let opened = Proxy::builder(&mock.url())
        .admin(ADMIN)
        .auth(AuthMode::Keys)
        .with(|c| c.allow_unmetered = Some(vec!["containers".into()]))
        .start()
        .await;
    let r = opened.admin_call(Method::POST, "/users/eve/keys", "").await;
    let key = r.json()["key"].as_str().unwrap().to_owned();
    let batch = Request::post("/v1/containers")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(full("{}"))
        .unwrap();
    assert_eq!(send(opened.addr, batch).await.status, 200);
    let tune = Request::post("/v1/fine_tuning/jobs")
        .header("authorization", format!("Bearer {key}"))
        .body(full("{}"))
        .unwrap();
    assert_eq!(send(opened.addr, tune).await.status, 403);
}

// ---------------------------------------------------------------------------
// 11. Metrics series
// ---------------------------------------------------------------------------

#[tokio::test]
async fn client_chosen_labels_cannot_grow_metrics_without_bound() {
    let mock = chat_mock().await;
    let p = Proxy::builder(&mock.url())
        .with(|c| c.metrics_max_users = 5)
        .start()
        .await;
    // 300 unique 4 KB model names, and users past the cap.
    for i in 0..300 {
        let model = format!("m{i}-{}", "x".repeat(4000));
        let user = format!("user-{}", i % 20);
        let r = p.chat(&user, &chat_body(&model, false)).await;
        assert_eq!(r.status, 200);
    }
    // Control characters in label values.
    for model in [
        "tab\\tmodel",
        "esc\\u001bmodel",
        "nul\\u0000model",
        "cr\\rmodel",
    ] {
        let r = p.chat("ctl\tuser", &chat_body(model, false)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    p.wait_records(304).await;
    p.state.store.flush().await;
    let r = p.get("/metrics").await;
    let text = r.text();
    assert!(
        text.len() < 200_000,
        "/metrics grew to {} bytes",
        text.len()
    );
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "a control character reached /metrics"
    );
    let samples = parse_metrics(&text);
    let values = |name: &str, label: &str| -> BTreeSet<String> {
        samples
            .iter()
            .filter(|s| s.name == name)
            .filter_map(|s| s.labels.get(label).cloned())
            .collect()
    };
    let users = values("tollgate_tokens_total", "user");
    assert!(users.len() <= 6, "users: {users:?}");
    assert!(users.contains("other"), "{users:?}");
    let models = values("tollgate_requests_total", "model");
    assert!(models.len() <= 257, "{} model series", models.len());
    assert!(models.contains("other"));
    // Every request is still counted, under some label.
    let total: f64 = samples
        .iter()
        .filter(|s| s.name == "tollgate_requests_total")
        .map(|s| s.value)
        .sum();
    assert_eq!(total, 304.0);
}

// ---------------------------------------------------------------------------
// 3. Huge token counts from an upstream
// ---------------------------------------------------------------------------

/// Upstream answers `"prompt_tokens": 9223372036854775807`, plain and
/// streamed: counts past the plausibility bound (10^12) are a broken answer,
/// so both records are estimated (flagged, with counted tokens, not the
/// huge value), the usage chunk tollgate asked for is still stripped, and
/// `/usage` answers 200 with sane totals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_upstream_token_counts_are_estimated_not_stored() {
    let huge = Tok {
        prompt: i64::MAX as u64,
        completion: 5,
        ..Tok::default()
    };
    let mock = Mock::start(move |seen| {
        if seen.json()["stream"] == true {
            Reply::sse_events(chat_stream(seen, "gpt-4o", &["Hello", " there"], huge))
        } else {
            Reply::json(completion("gpt-4o", "Hello there", huge))
        }
    })
    .await;
    let p = Proxy::start(&mock.url()).await;
    let r = p.chat("alice", &chat_body("gpt-4o", false)).await;
    assert_eq!(r.status, 200);
    let s = open(p.addr, chat_req("alice", &chat_body("gpt-4o", true))).await;
    let got = s.finish().await.expect("stream ends cleanly");
    assert!(contains(&got, b"there"));
    assert!(
        !contains(&got, b"9223372036854775807"),
        "the usage chunk tollgate asked for is still stripped"
    );
    let recs = p.wait_records(2).await;
    let mut query_sum = 0;
    for rec in &recs {
        assert_eq!(rec["estimated"], true, "{rec}");
        let q = rec["queryTokens"].as_i64().unwrap();
        assert!(q > 0 && q < 1_000, "prompt estimated: {rec}");
        let a = rec["answerTokens"].as_i64().unwrap();
        assert!((1..=3).contains(&a), "answer counted from the text: {rec}");
        query_sum += q;
    }
    let u = p.usage("").await;
    assert_eq!(u["numQueries"], 2);
    assert_eq!(u["queryTokens"], query_sum);
    let g = p.usage("group_by=user,model,day").await;
    assert_eq!(g[0]["queryTokens"], query_sum, "{g}");
}

/// A database that already holds huge counts (records of i64::MAX tokens
/// and cost, a daily rollup that SQLite turned into a REAL past i64, one
/// that wrapped negative): the start-up rebuild of the rollups, `/usage`
/// flat and grouped over whole and partial days, and `/queries` all answer
/// 200; token totals saturate at i64::MAX, never fail, never go negative.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_over_stored_huge_counts_saturates_instead_of_failing() {
    const DAY: i64 = 86_400_000;
    const HOUR: i64 = 3_600_000;
    const D0: i64 = 19_000 * DAY;
    let max = i64::MAX;
    let mock = chat_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let seed = |ts: i64, user: &str, n: i64, cost: i64| Seed {
        ts,
        user: user.into(),
        model: "gpt-4o".into(),
        query: n,
        answer: n,
        cached: n,
        reasoning: n,
        cost,
        priced: true,
    };
    let seeds = [
        seed(D0 + HOUR, "poison", max, max),
        seed(D0 + 2 * HOUR, "poison", max, max),
        seed(D0 + 3 * HOUR, "alice", 10, 1_000),
        seed(D0 + DAY + HOUR, "poison", max, max),
    ];
    // Marked as an old schema: the next start rebuilds the rollups by summing these.
    seed_db(&mock.url(), &db, &seeds).await;
    Proxy::builder(&mock.url())
        .db(&db)
        .start()
        .await
        .stop()
        .await;
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(
            "INSERT INTO usage_daily (day, user, model, queries, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, unpriced)
             VALUES (19010, 'real', 'gpt-4o', 2, 1.8446744073709552e19, 1.8446744073709552e19, 0, 0, 1.8446744073709552e19, 0),
                    (19010, 'wrapped', 'gpt-4o', 2, -2, -2, -2, -2, 5, 0);",
        )
        .unwrap();
    }
    let p = Proxy::builder(&mock.url()).db(&db).start().await;
    let fmt = tollgate::timestamp::format_ms;
    let cases = [
        String::new(),
        "group_by=user".into(),
        "group_by=user,model,day".into(),
        "group_by=month".into(),
        "user=poison".into(),
        // Partial days, read from the records.
        format!("after={}&before={}", fmt(D0), fmt(D0 + 4 * HOUR)),
        format!("after={}&before={}", fmt(D0 + 1), fmt(D0 + DAY + 2 * HOUR)),
        format!("after={}&group_by=day", fmt(D0 + 90 * 60_000)),
    ];
    for q in &cases {
        let r = p.get(&format!("/usage?{q}")).await;
        assert_eq!(r.status, 200, "/usage?{q}: {}", r.text());
        let rows = match r.json() {
            Value::Array(a) => a,
            one => vec![one],
        };
        for row in rows {
            for k in [
                "queryTokens",
                "answerTokens",
                "cachedQueryTokens",
                "reasoningTokens",
            ] {
                let v = row[k].as_u64().unwrap_or_else(|| panic!("{q}: {row}"));
                assert!(v <= max as u64, "{q}: {k} past i64::MAX: {row}");
            }
        }
    }
    let raw = p.usage_raw("").await;
    assert_eq!(raw["queryTokens"], max.to_string(), "saturated");
    assert_eq!(raw["numQueries"], "8");
    let raw = p
        .usage_raw(&format!("after={}&before={}", fmt(D0), fmt(D0 + 4 * HOUR)))
        .await;
    assert_eq!(
        raw["queryTokens"],
        max.to_string(),
        "saturated over records"
    );
    assert_eq!(raw["numQueries"], "3");
    let by_user = p.usage("group_by=user").await;
    let of = |u: &str| {
        by_user
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["user"] == u)
            .unwrap_or_else(|| panic!("{u}: {by_user}"))
            .clone()
    };
    assert_eq!(of("alice")["queryTokens"], 10, "sane rows stay exact");
    assert_eq!(of("alice")["cachedQueryTokens"], 10);
    assert_eq!(of("poison")["queryTokens"], max);
    assert_eq!(of("real")["queryTokens"], max);
    assert_eq!(of("wrapped")["queryTokens"], 0, "never negative");
    // A whole saturated day minus the records before the range start stays
    // saturated (one huge record is still in range), not max - max = 0.
    let later = p
        .usage(&format!("after={}&group_by=user", fmt(D0 + 90 * 60_000)))
        .await;
    let later_of = |u: &str| {
        later
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["user"] == u)
            .unwrap_or_else(|| panic!("{u}: {later}"))["queryTokens"]
            .clone()
    };
    assert_eq!(later_of("poison"), max);
    assert_eq!(later_of("alice"), 10);
    let recs = p.queries("").await;
    assert_eq!(recs.len(), 4);
    assert_eq!(recs[0]["queryTokens"], max);
}
