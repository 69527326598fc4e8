//! Bad input and upstream failures: exact statuses, OpenAI-shape error
//! bodies, whether upstream was called, and the record each case leaves.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;

fn post(path: &str, user: Option<&str>, body: ReqBody) -> Request<ReqBody> {
    let mut b = Request::post(path).header("content-type", "application/json");
    if let Some(u) = user {
        b = b.header("x-user", u);
    }
    b.body(body).unwrap()
}

async fn answering_mock() -> Mock {
    Mock::start(|_| Reply::json(completion("gpt-4o", "ok", Tok::new(3, 1)))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_empty_user_is_401_and_upstream_is_not_called() {
    let mock = answering_mock().await;
    let mut proxy = Proxy::start(&mock.url()).await;
    let body = chat_body("gpt-4o", false);
    for proto in [Proto::H1, Proto::H2] {
        for user in [None, Some(""), Some("   ")] {
            let r = send_with(
                proxy.addr,
                proto,
                post("/v1/chat/completions", user, full(body.clone())),
            )
            .await;
            assert_openai_error(&r, 401, "invalid_request_error", None, Some("missing_user"));
        }
    }
    // A header that is not visible ASCII cannot name a user either.
    let odd = http::HeaderValue::from_bytes(b"J\xc3\xbcrgen").unwrap();
    let r = send(
        proxy.addr,
        Request::post("/v1/chat/completions")
            .header("x-user", odd)
            .body(full(body.clone()))
            .unwrap(),
    )
    .await;
    assert_openai_error(&r, 401, "invalid_request_error", None, None);
    assert!(mock.seen().is_empty(), "upstream must not be called");
    proxy.stop().await;
    assert!(db_rows(&proxy.db).is_empty(), "no record");
}

/// Bodies that are not a JSON object with a string `model`: 400 naming the
/// field where there is one, on every metered endpoint, over both protocols.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_are_400_and_upstream_is_not_called() {
    let mock = answering_mock().await;
    let mut proxy = Proxy::start(&mock.url()).await;
    let cases: Vec<(&[u8], Option<&str>)> = vec![
        (b"", None),
        (b"not json", None),
        (b"{\"model\":\"gpt-4o\",", None),
        (b"[1,2,3]", None),
        (b"\"just a string\"", None),
        (b"42", None),
        (b"null", None),
        (b"{\"model\":\"gpt-4o\"} trailing", None),
        (b"{\"model\":\"gpt\xff\xfe-4o\",\"messages\":[]}", None),
        (b"{\"messages\":[\"\xc3\x28\"],\"model\":\"gpt-4o\"}", None),
        (b"{}", Some("model")),
        (b"{\"messages\":[]}", Some("model")),
        (b"{\"model\":5}", Some("model")),
        (b"{\"model\":null}", Some("model")),
        (b"{\"model\":[\"gpt-4o\"]}", Some("model")),
        (b"{\"model\":{\"name\":\"gpt-4o\"}}", Some("model")),
    ];
    for path in [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/embeddings",
    ] {
        for (body, param) in &cases {
            for proto in [Proto::H1, Proto::H2] {
                let r = send_with(
                    proxy.addr,
                    proto,
                    post(path, Some("alice"), full(Bytes::copy_from_slice(body))),
                )
                .await;
                assert_eq!(
                    r.status,
                    400,
                    "{path} {:?} ({proto:?}): {}",
                    String::from_utf8_lossy(body),
                    r.text()
                );
                assert_openai_error(&r, 400, "invalid_request_error", *param, None);
            }
        }
    }
    assert!(mock.seen().is_empty(), "upstream must not be called");
    proxy.stop().await;
    assert!(db_rows(&proxy.db).is_empty(), "no record");
}

/// A valid JSON body padded to exactly `len` bytes.
fn body_of_len(len: usize) -> String {
    let head = r#"{"model":"gpt-4o","messages":[],"pad":""#;
    let tail = "\"}";
    let pad = len - head.len() - tail.len();
    format!("{head}{}{tail}", "x".repeat(pad))
}

/// Over the limit: 413 by Content-Length before reading, and by counting
/// the bytes of a body without one; exactly at the limit passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_max_body_are_413() {
    let mock = answering_mock().await;
    let mut proxy = Proxy::builder(&mock.url()).max_body(1024).start().await;
    let over = body_of_len(1025);
    assert_eq!(over.len(), 1025);
    for proto in [Proto::H1, Proto::H2] {
        let r = send_with(
            proxy.addr,
            proto,
            post("/v1/chat/completions", Some("alice"), full(over.clone())),
        )
        .await;
        assert_openai_error(
            &r,
            413,
            "invalid_request_error",
            None,
            Some("request_too_large"),
        );
        let pieces: Vec<Bytes> = over
            .as_bytes()
            .chunks(100)
            .map(Bytes::copy_from_slice)
            .collect();
        let r = send_with(
            proxy.addr,
            proto,
            post("/v1/chat/completions", Some("alice"), chunked(pieces)),
        )
        .await;
        assert_openai_error(
            &r,
            413,
            "invalid_request_error",
            None,
            Some("request_too_large"),
        );
    }
    // A large declared length is refused before any byte of the body is read.
    let big = body_of_len(50_000);
    let r = send(
        proxy.addr,
        post("/v1/chat/completions", Some("alice"), full(big)),
    )
    .await;
    assert_eq!(r.status, 413);
    assert!(mock.seen().is_empty(), "upstream must not be called");

    let exact = body_of_len(1024);
    let r = send(
        proxy.addr,
        post("/v1/chat/completions", Some("alice"), full(exact.clone())),
    )
    .await;
    assert_eq!(
        r.status,
        200,
        "a body of exactly --max-body passes: {}",
        r.text()
    );
    let pieces: Vec<Bytes> = exact
        .as_bytes()
        .chunks(100)
        .map(Bytes::copy_from_slice)
        .collect();
    let r = send(
        proxy.addr,
        post("/v1/chat/completions", Some("alice"), chunked(pieces)),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = mock.seen();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|s| s.body == exact.as_bytes()));
    proxy.stop().await;
    assert_eq!(
        db_rows(&proxy.db).len(),
        2,
        "records only for the requests that went upstream"
    );
}

/// Upstream 429 and 500 reach the client unchanged (status, body, headers)
/// and leave a record with that status and zero tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_error_statuses_pass_through_and_are_recorded() {
    let e429 = r#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-x on tokens per min (TPM): Limit 30000, Used 29950, Requested 200.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;
    let e500 = r#"{"error":{"message":"The server had an error while processing your request. Sorry about that!","type":"server_error","param":null,"code":null}}"#;
    let e400 = r#"{"error":{"message":"Unrecognized request argument supplied: foo","type":"invalid_request_error","param":null,"code":null}}"#;
    let mock = Mock::start(move |seen| {
        let user = seen.json()["user"].as_str().unwrap_or("").to_owned();
        match user.as_str() {
            "r429" => Reply::json(e429)
                .status(429)
                .header("retry-after", "2")
                .header("x-request-id", "req_429"),
            "r500" => Reply::json(e500)
                .status(500)
                .header("x-request-id", "req_500"),
            _ => Reply::json(e400)
                .status(400)
                .header("x-request-id", "req_400"),
        }
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    let body = |u: &str, stream: bool| {
        format!(
            r#"{{"model":"gpt-4o","user":"{u}","stream":{stream},"messages":[{{"role":"user","content":"hello"}}]}}"#
        )
    };
    for (u, status, want, stream) in [
        ("r429", 429, e429, false),
        ("r500", 500, e500, false),
        ("r400", 400, e400, false),
        ("r429", 429, e429, true),
        ("r500", 500, e500, true),
    ] {
        let r = proxy.chat("alice", &body(u, stream)).await;
        assert_eq!(r.status, status);
        assert_eq!(r.text(), want, "error body unchanged");
        if status == 429 {
            assert_eq!(r.header("retry-after").as_deref(), Some("2"));
        }
    }
    let recs = proxy.wait_records(5).await;
    let statuses: Vec<i64> = recs.iter().map(|r| r["status"].as_i64().unwrap()).collect();
    assert_eq!(statuses, [429, 500, 400, 429, 500]);
    for r in &recs {
        assert_eq!(r["queryTokens"], 0, "{r}");
        assert_eq!(r["answerTokens"], 0, "{r}");
        assert_eq!(r["estimated"], false, "{r}");
        assert_eq!(r["user"], "alice");
        assert_eq!(r["model"], "gpt-4o");
    }
    assert_eq!(recs[0]["requestId"], "req_429");
    assert_eq!(recs[1]["requestId"], "req_500");
}

/// Nothing listens upstream: 502 in OpenAI's shape, no record, no key leak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_502_without_record() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut proxy = Proxy::builder(&format!("http://{closed}"))
        .token("sk-never-leak-this")
        .start()
        .await;
    for proto in [Proto::H1, Proto::H2] {
        let r = send_with(
            proxy.addr,
            proto,
            chat_req("alice", &chat_body("gpt-4o", true)),
        )
        .await;
        assert_openai_error(
            &r,
            502,
            "upstream_error",
            None,
            Some("upstream_unreachable"),
        );
        assert!(!r.text().contains("sk-never-leak-this"));
    }
    assert_eq!(proxy.usage_raw("").await["numQueries"], "0");
    proxy.stop().await;
    assert!(db_rows(&proxy.db).is_empty(), "nothing reached upstream");
}

/// Upstream accepts but never answers: 504 after the idle timeout, and a
/// record with status 504 and an estimated prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_upstream_is_504_after_the_idle_timeout() {
    let mock = Mock::start(|_| Reply::never()).await;
    let proxy = Proxy::builder(&mock.url())
        .idle(Duration::from_secs(1))
        .token("sk-never-leak-this")
        .start()
        .await;
    let started = std::time::Instant::now();
    let r = proxy.chat("alice", &chat_body("gpt-4o", false)).await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "not before the configured timeout"
    );
    assert_openai_error(&r, 504, "upstream_error", None, Some("timeout"));
    assert!(!r.text().contains("sk-never-leak-this"));
    assert_eq!(mock.seen().len(), 1, "upstream was called");
    let recs = proxy.wait_records(1).await;
    let rec = &recs[0];
    assert_eq!(rec["status"], 504);
    assert_eq!(rec["estimated"], true);
    assert!(
        rec["queryTokens"].as_i64().unwrap() > 0,
        "prompt estimated: {rec}"
    );
    assert_eq!(rec["answerTokens"], 0);
    assert_eq!(rec["ttfbMs"], serde_json::Value::Null);
    assert_eq!(rec["requestId"], serde_json::Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_are_404_and_wrong_methods_405() {
    let mock = answering_mock().await;
    let proxy = Proxy::start(&mock.url()).await;
    for proto in [Proto::H1, Proto::H2] {
        for path in [
            "/",
            "/nope",
            "/v2/chat/completions",
            "/v1",
            "/usage/x",
            "/model",
        ] {
            let r = send_with(proxy.addr, proto, get(path)).await;
            assert_openai_error(&r, 404, "invalid_request_error", None, Some("not_found"));
        }
        for (method, path) in [
            ("POST", "/usage"),
            ("DELETE", "/queries"),
            ("PUT", "/ratelimits"),
            ("POST", "/models"),
            ("DELETE", "/model/gpt-4o"),
            ("PATCH", "/model/gpt-4o"),
        ] {
            let req = Request::builder()
                .method(method)
                .uri(path)
                .body(empty())
                .unwrap();
            let r = send_with(proxy.addr, proto, req).await;
            assert_openai_error(&r, 405, "invalid_request_error", None, None);
        }
    }
    assert!(mock.seen().is_empty());
}

/// Every bad query parameter is a 400 naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_query_parameters_are_400_naming_the_parameter() {
    let mock = answering_mock().await;
    let proxy = Proxy::start(&mock.url()).await;
    let cases = [
        ("/usage?foo=1", "foo"),
        ("/usage?limit=5", "limit"),
        ("/usage?offset=5", "offset"),
        ("/usage?after=yesterday", "after"),
        ("/usage?before=2024-13-01T00:00Z", "before"),
        ("/usage?after=2024-01-24T14:50", "after"),
        ("/queries?limit=-1", "limit"),
        ("/queries?limit=ten", "limit"),
        ("/queries?offset=1.5", "offset"),
        ("/queries?user=a&bogus=b", "bogus"),
        ("/queries?before=%ZZ", "before"),
    ];
    let mut checked = 0;
    for proto in [Proto::H1, Proto::H2] {
        for (path, param) in cases {
            let r = send_with(proxy.addr, proto, get(path)).await;
            assert_openai_error(&r, 400, "invalid_request_error", Some(param), None);
            checked += 1;
        }
    }
    assert_eq!(checked, 22);
    // A bare date is a valid bound (midnight UTC), not an error.
    assert_eq!(proxy.get("/queries?after=2024-01-24").await.status, 200);
}

/// Every bad price body is a 400 naming the field (or explaining the unit clash).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_price_bodies_are_400_naming_the_field() {
    let mock = answering_mock().await;
    let proxy = Proxy::start(&mock.url()).await;
    let ok_from = r#""validFrom":"2024-01-01T00:00:00Z""#;
    let cases: Vec<(String, Option<&str>)> = vec![
        ("not json".into(), None),
        ("[1]".into(), None),
        (
            r#"{"per1KQueryTokens":0.01,"per1KAnswerTokens":0.03}"#.into(),
            Some("validFrom"),
        ),
        (
            r#"{"validFrom":"last tuesday","per1KQueryTokens":0.01,"per1KAnswerTokens":0.03}"#
                .into(),
            Some("validFrom"),
        ),
        (
            r#"{"validFrom":12345,"per1KQueryTokens":0.01,"per1KAnswerTokens":0.03}"#.into(),
            Some("validFrom"),
        ),
        (
            format!(r#"{{{ok_from},"per1KAnswerTokens":0.03}}"#),
            Some("per1KQueryTokens"),
        ),
        (
            format!(r#"{{{ok_from},"per1KQueryTokens":0.01}}"#),
            Some("per1KAnswerTokens"),
        ),
        (
            format!(r#"{{{ok_from},"per1KQueryTokens":-0.01,"per1KAnswerTokens":0.03}}"#),
            Some("per1KQueryTokens"),
        ),
        (
            format!(r#"{{{ok_from},"per1KQueryTokens":0.01,"per1KAnswerTokens":"0.03"}}"#),
            Some("per1KAnswerTokens"),
        ),
        (
            format!(r#"{{{ok_from},"per1KQueryTokens":1e400,"per1KAnswerTokens":0.03}}"#),
            Some("per1KQueryTokens"),
        ),
        (
            format!(
                r#"{{{ok_from},"per1KQueryTokens":0.01,"per1KAnswerTokens":0.03,"per1KCachedQueryTokens":-1}}"#
            ),
            Some("per1KCachedQueryTokens"),
        ),
        (
            format!(r#"{{{ok_from},"per1MQueryTokens":2.5}}"#),
            Some("per1MAnswerTokens"),
        ),
        (
            format!(r#"{{{ok_from},"per1MQueryTokens":null,"per1MAnswerTokens":10}}"#),
            Some("per1MQueryTokens"),
        ),
        (
            format!(
                r#"{{{ok_from},"per1KQueryTokens":0.01,"per1KAnswerTokens":0.03,"costPerToken":1}}"#
            ),
            Some("costPerToken"),
        ),
        (
            format!(
                r#"{{{ok_from},"per1KQueryTokens":0.01,"per1KAnswerTokens":0.03,"per1MQueryTokens":10}}"#
            ),
            None,
        ),
    ];
    for proto in [Proto::H1, Proto::H2] {
        for (body, param) in &cases {
            let req = Request::post("/model/test-model")
                .header("content-type", "application/json")
                .body(full(body.clone()))
                .unwrap();
            let r = send_with(proxy.addr, proto, req).await;
            assert_eq!(r.status, 400, "{body}: {}", r.text());
            assert_openai_error(&r, 400, "invalid_request_error", *param, None);
        }
    }
    let r = proxy.get("/model/test-model").await;
    assert_openai_error(
        &r,
        404,
        "invalid_request_error",
        None,
        Some("model_not_found"),
    );
}

/// Oversized request headers are refused with 431 before routing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_431() {
    let mock = answering_mock().await;
    let proxy = Proxy::start(&mock.url()).await;
    for proto in [Proto::H1, Proto::H2] {
        let req = Request::post("/v1/chat/completions")
            .header("x-user", "alice")
            .header("x-big", "a".repeat(100_000))
            .body(full(chat_body("gpt-4o", false)))
            .unwrap();
        let r = send_with(proxy.addr, proto, req).await;
        assert_eq!(r.status, 431, "{proto:?}");
    }
    assert!(mock.seen().is_empty());
}

/// Issue 5 asks for an OpenAI-shape body on every refusal, 431 included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_431_has_an_openai_error_body() {
    let mock = answering_mock().await;
    let proxy = Proxy::start(&mock.url()).await;
    let req = Request::post("/v1/chat/completions")
        .header("x-user", "alice")
        .header("x-big", "a".repeat(100_000))
        .body(full(chat_body("gpt-4o", false)))
        .unwrap();
    let r = send(proxy.addr, req).await;
    assert_openai_error(
        &r,
        431,
        "invalid_request_error",
        None,
        Some("request_header_fields_too_large"),
    );
}
