//! Several upstreams: routing by model name and glob, records naming the
//! upstream that served (`/queries`, `/usage?group_by=upstream`), key pools
//! used in turn, a key answered 429 resting until its reset while the
//! request goes on on another key, 5xx retried before the answer head and
//! never after the first byte, and a keyless self-hosted upstream with its
//! own (zero) price.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use serde_json::Value;
use tollgate::config::{Fallback, NamedUpstream, Trust, UpstreamUrl};

fn upstream(name: &str, mock: &Mock, models: &[&str], keys: &[&str]) -> NamedUpstream {
    NamedUpstream {
        name: name.into(),
        url: UpstreamUrl::parse(&mock.url()).unwrap(),
        keys: keys.iter().map(|k| k.to_string()).collect(),
        models: models.iter().map(|m| m.to_string()).collect(),
        trust: Trust::default(),
        azure: None,
    }
}

/// A mock answering every chat with `model` and 5 + 2 tokens.
async fn answering(model: &'static str) -> Mock {
    Mock::start(move |_| Reply::json(completion(model, "hi", Tok::new(5, 2)))).await
}

async fn proxy_of(ups: Vec<NamedUpstream>) -> Proxy {
    proxy_with(ups, vec![], 2).await
}

async fn proxy_with(ups: Vec<NamedUpstream>, fallbacks: Vec<Fallback>, retries: u32) -> Proxy {
    Proxy::builder("http://127.0.0.1:9")
        .with(move |c| {
            c.upstreams = ups;
            c.fallbacks = fallbacks;
            c.upstream_retries = retries;
        })
        .start()
        .await
}

fn fallback(model: &str, upstreams: &[&str]) -> Fallback {
    Fallback {
        model: model.into(),
        upstreams: upstreams.iter().map(|u| u.to_string()).collect(),
    }
}

/// A mock answering every request with `status` and an OpenAI error.
async fn failing(status: u16, request_id: &'static str) -> Mock {
    Mock::start(move |_| {
        Reply::json(r#"{"error":{"message":"no","type":"server_error","param":null,"code":null}}"#)
            .status(status)
            .header("retry-after", "60")
            .header("x-request-id", request_id)
    })
    .await
}

/// Records in the order they were written (one request's share its start).
async fn records_in_order(proxy: &Proxy, n: usize) -> Vec<Value> {
    proxy.wait_records(n).await;
    proxy.queries("order=asc").await
}

/// The key a request came with upstream.
fn key_of(s: &Seen) -> String {
    s.header("authorization").unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_to_the_first_upstream_serving_their_model() {
    let openai = answering("gpt-4o-mini-2024-07-18").await;
    let local = answering("llama-3-8b").await;
    let rest = answering("other").await;
    let proxy = proxy_of(vec![
        upstream("openai", &openai, &["gpt-4o*", "o1"], &["sk-openai"]),
        upstream("local", &local, &["llama-*"], &[]),
        // Would serve gpt-4o too, but comes later.
        upstream("rest", &rest, &[], &["sk-rest"]),
    ])
    .await;

    for model in ["gpt-4o-mini", "llama-3-8b", "o1", "o1-mini", "gpt-4o"] {
        let r = proxy.chat("alice", &chat_body(model, false)).await;
        assert_eq!(r.status, 200, "{model}: {}", r.text());
    }
    let models = |m: &Mock| -> Vec<String> {
        m.seen()
            .iter()
            .map(|s| s.json()["model"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(models(&openai), ["gpt-4o-mini", "o1", "gpt-4o"]);
    assert_eq!(models(&local), ["llama-3-8b"]);
    assert_eq!(models(&rest), ["o1-mini"]);
    assert!(openai
        .seen()
        .iter()
        .all(|s| key_of(s) == "Bearer sk-openai"));
    assert!(rest.seen().iter().all(|s| key_of(s) == "Bearer sk-rest"));

    let recs = proxy.wait_records(5).await;
    let by_model: BTreeMap<String, Value> = recs
        .iter()
        .map(|r| {
            (
                r["requestedModel"].as_str().unwrap().to_owned(),
                r["upstream"].clone(),
            )
        })
        .collect();
    assert_eq!(by_model["gpt-4o-mini"], "openai");
    assert_eq!(by_model["llama-3-8b"], "local");
    assert_eq!(by_model["o1-mini"], "rest");

    let usage = proxy.usage("group_by=upstream").await;
    let counts: BTreeMap<String, u64> = usage
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["upstream"].as_str().unwrap().to_owned(),
                u["numQueries"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        counts,
        BTreeMap::from([
            ("local".to_owned(), 1),
            ("openai".to_owned(), 3),
            ("rest".to_owned(), 1)
        ])
    );
    let csv = proxy.get("/queries?format=csv").await.text();
    // The upstream column, then the image, unit, customId and project columns added after it.
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let at = header
        .iter()
        .position(|h| *h == "upstream")
        .expect("upstream column");
    assert_eq!(header[at + 1..].len(), 8, "{csv}");
    assert!(
        csv.lines().skip(1).all(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            ["openai", "local", "rest"].contains(&cells[at])
        }),
        "{csv}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_no_upstream_serves_is_refused_without_a_record() {
    let openai = answering("gpt-4o").await;
    let proxy = proxy_of(vec![upstream("openai", &openai, &["gpt-*"], &["sk-a"])]).await;
    let r = proxy.chat("alice", &chat_body("claude-3", false)).await;
    assert_openai_error(
        &r,
        404,
        "invalid_request_error",
        Some("model"),
        Some("model_not_found"),
    );
    assert!(openai.seen().is_empty());
    let r = proxy.chat("alice", &chat_body("gpt-4o", false)).await;
    assert_eq!(r.status, 200);
    assert_eq!(proxy.wait_records(1).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_a_pool_are_used_in_turn() {
    let mock = answering("gpt-4o").await;
    let proxy = proxy_of(vec![upstream("openai", &mock, &[], &["k1", "k2", "k3"])]).await;
    for _ in 0..6 {
        let r = proxy.chat("alice", &chat_body("gpt-4o", false)).await;
        assert_eq!(r.status, 200);
    }
    let mut uses: BTreeMap<String, usize> = BTreeMap::new();
    for s in mock.seen() {
        *uses.entry(key_of(&s)).or_default() += 1;
    }
    assert_eq!(
        uses,
        BTreeMap::from([
            ("Bearer k1".to_owned(), 2),
            ("Bearer k2".to_owned(), 2),
            ("Bearer k3".to_owned(), 2)
        ])
    );
    assert_eq!(proxy.wait_records(6).await.len(), 6);
}

/// Key `k1` is rate limited: its 429 (with a minute's `retry-after`) is
/// recorded, the request goes on with `k2` and the client sees only the
/// success; `k1` is not used again while it rests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_answered_429_rests_and_the_request_moves_to_another_key() {
    let mock = Mock::start(|s| {
        if key_of(s) == "Bearer k1" {
            Reply::json(r#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#)
                .status(429)
                .header("retry-after", "60")
                .header("x-request-id", "req_limited")
        } else {
            Reply::json(completion("gpt-4o", "hi", Tok::new(5, 2)))
        }
    })
    .await;
    let proxy = proxy_of(vec![upstream("openai", &mock, &[], &["k1", "k2"])]).await;
    for _ in 0..4 {
        let r = proxy.chat("alice", &chat_body("gpt-4o", false)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let keys: Vec<String> = mock.seen().iter().map(key_of).collect();
    let k1: Vec<usize> = (0..keys.len())
        .filter(|&i| keys[i] == "Bearer k1")
        .collect();
    assert_eq!(k1.len(), 1, "k1 once, then it rests: {keys:?}");
    assert_eq!(keys.len(), 5, "{keys:?}");
    assert_eq!(keys[k1[0] + 1], "Bearer k2", "the retry takes k2: {keys:?}");

    let recs = proxy.wait_records(5).await;
    let limited: Vec<&Value> = recs.iter().filter(|r| r["status"] == 429).collect();
    assert_eq!(limited.len(), 1, "{recs:?}");
    assert_eq!(limited[0]["requestId"], "req_limited");
    assert_eq!(limited[0]["queryTokens"], 0);
    assert_eq!(limited[0]["upstream"], "openai");
    assert_eq!(recs.iter().filter(|r| r["status"] == 200).count(), 4);
}

/// With every key resting, the client gets upstream's 429 as it came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_no_other_key_goes_to_the_client() {
    let mock = Mock::start(|_| {
        Reply::json(r#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#)
            .status(429)
            .header("retry-after", "60")
    })
    .await;
    let proxy = proxy_of(vec![upstream("openai", &mock, &[], &["k1", "k2"])]).await;
    let r = proxy.chat("alice", &chat_body("gpt-4o", false)).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after").as_deref(), Some("60"));
    assert_eq!(mock.seen().len(), 2, "each key once");
    let r = proxy.chat("alice", &chat_body("gpt-4o", false)).await;
    assert_eq!(r.status, 429);
    assert_eq!(mock.seen().len(), 3, "both rest: one try, no retry");
    let recs = proxy.wait_records(3).await;
    assert!(recs.iter().all(|r| r["status"] == 429), "{recs:?}");
}

/// A 5xx before the answer head is retried (up to --upstream-retries), each
/// attempt recorded; the client sees the first success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_is_retried_and_each_attempt_recorded() {
    let n = Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    let mock = Mock::start(move |_| {
        if c.fetch_add(1, Ordering::SeqCst) < 2 {
            Reply::json(r#"{"error":{"message":"overloaded","type":"server_error","param":null,"code":null}}"#)
                .status(503)
        } else {
            Reply::json(completion("gpt-4o", "hi", Tok::new(5, 2)))
        }
    })
    .await;
    let proxy = proxy_of(vec![upstream("openai", &mock, &[], &["k1"])]).await;
    let mut req = chat_req("alice", &chat_body("gpt-4o", true));
    req.headers_mut()
        .insert("x-tollgate-tags", "team=search".parse().unwrap());
    let r = send(proxy.addr, req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(mock.seen().len(), 3);
    let recs = proxy.wait_records(3).await;
    let mut statuses: Vec<i64> = recs.iter().map(|r| r["status"].as_i64().unwrap()).collect();
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 503, 503]);
    // Every attempt is the request's: the retried ones keep its tags.
    for rec in &recs {
        assert_eq!(rec["tags"], serde_json::json!({"team": "search"}), "{rec}");
    }

    // Past the retries, the client gets upstream's 5xx.
    n.store(0, Ordering::SeqCst);
    let proxy = Proxy::builder("http://127.0.0.1:9")
        .with({
            let u = upstream("openai", &mock, &[], &["k1"]);
            move |c| {
                c.upstreams = vec![u];
                c.upstream_retries = 1;
            }
        })
        .start()
        .await;
    let r = proxy.chat("alice", &chat_body("gpt-4o", false)).await;
    assert_eq!(r.status, 503);
    assert_eq!(mock.seen().len(), 5);
    assert_eq!(proxy.wait_records(2).await.len(), 2);
}

/// A stream that fails after its first bytes reached the client is never
/// sent again: one upstream request, one metered record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_failing_midway_is_metered_not_retried() {
    let mock = Mock::start(|seen| {
        let ev = chat_stream(seen, "gpt-4o", &["partial", " answer"], Tok::new(70, 9));
        Reply::sse(vec![
            Step::Send(ev[0].clone()),
            Step::Send(ev[1].clone()),
            Step::Reset,
        ])
    })
    .await;
    let proxy = proxy_of(vec![upstream("openai", &mock, &[], &["k1", "k2"])]).await;
    let s = open(proxy.addr, chat_req("alice", &chat_body("gpt-4o", true))).await;
    assert_eq!(s.status, 200);
    let (got, _) = s.finish().await.expect_err("the stream ends with an error");
    assert!(contains(&got, b"partial"));
    let recs = proxy.wait_records(1).await;
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["status"], 200);
    assert_eq!(recs[0]["estimated"], true);
    assert!(recs[0]["queryTokens"].as_i64().unwrap() > 0);
    assert_eq!(mock.seen().len(), 1, "not sent again");
}

/// A self-hosted upstream (vLLM, Ollama) has no key and its own price rows,
/// zero included: its records are priced, at no cost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_hosted_upstream_without_keys_has_its_own_zero_price() {
    let vllm = Mock::start(|_| Reply::json(completion("llama-3-8b", "hi", Tok::new(50, 20)))).await;
    let openai = answering("gpt-4o").await;
    let proxy = proxy_of(vec![
        upstream("vllm", &vllm, &["llama-*"], &[]),
        upstream("openai", &openai, &[], &["sk-openai"]),
    ])
    .await;
    let p = proxy
        .set_price(
            "llama-3-8b",
            r#"{"validFrom":"2020-01-01T00:00:00Z","per1KQueryTokens":0,"per1KAnswerTokens":0}"#,
        )
        .await;
    assert_eq!(p.status, 200, "{}", p.text());
    let req = http::Request::post("/v1/chat/completions")
        .header("x-user", "alice")
        .header("authorization", "Bearer client-own")
        .header("content-type", "application/json")
        .body(full(chat_body("llama-3-8b", false)))
        .unwrap();
    let r = send(proxy.addr, req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Keyless: in header mode the client's own Authorization passes on.
    assert_eq!(key_of(&vllm.seen()[0]), "Bearer client-own");
    let recs = proxy.wait_records(1).await;
    assert_eq!(recs[0]["upstream"], "vllm");
    assert_eq!(recs[0]["queryTokens"], 50);
    assert_eq!(recs[0]["answerTokens"], 20);
    assert_eq!(recs[0]["priced"], true);
    assert_eq!(recs[0]["cost"], 0);
    assert!(openai.seen().is_empty());
}

/// A model's `[[fallback]]` list is tried in order: the first upstream
/// answers 503 (each retry recorded), the second has every key rate
/// limited (429), the third serves. The client sees one answer naming the
/// third in `x-tollgate-upstream`; each failed attempt left one record
/// naming its own upstream and status, with no tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_list_is_tried_in_order_and_each_attempt_recorded() {
    let first = failing(503, "req_first").await;
    let second = failing(429, "req_second").await;
    let third = answering("gpt-4o-2024-08-06").await;
    let unrelated = answering("gpt-4o").await;
    let proxy = proxy_with(
        vec![
            upstream("unrelated", &unrelated, &["gpt-4o"], &["sk-u"]),
            upstream("first", &first, &["gpt-4o"], &["sk-1"]),
            upstream("second", &second, &["gpt-*"], &["sk-2a", "sk-2b"]),
            upstream("third", &third, &[], &["sk-3"]),
        ],
        vec![fallback("gpt-4o*", &["first", "second", "third"])],
        1,
    )
    .await;
    let r = proxy.chat("alice", &chat_body("gpt-4o", false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-tollgate-upstream").as_deref(), Some("third"));
    assert!(
        unrelated.seen().is_empty(),
        "the fallback list wins over routing"
    );
    assert_eq!(first.seen().len(), 2, "one retry on the first upstream");
    assert_eq!(second.seen().len(), 2, "each key once, then both rest");
    assert_eq!(third.seen().len(), 1);
    assert_eq!(key_of(&third.seen()[0]), "Bearer sk-3");

    let recs = records_in_order(&proxy, 5).await;
    let seen: Vec<(String, i64)> = recs
        .iter()
        .map(|r| {
            (
                r["upstream"].as_str().unwrap().to_owned(),
                r["status"].as_i64().unwrap(),
            )
        })
        .collect();
    let want = [
        ("first", 503),
        ("first", 503),
        ("second", 429),
        ("second", 429),
        ("third", 200),
    ];
    assert_eq!(
        seen,
        want.map(|(u, s)| (u.to_owned(), s)).to_vec(),
        "{recs:?}"
    );
    for r in &recs[..4] {
        assert_eq!(r["queryTokens"], 0, "{r}");
        assert_eq!(r["requestedModel"], "gpt-4o");
    }
    assert_eq!(recs[0]["requestId"], "req_first");
    assert_eq!(recs[2]["requestId"], "req_second");
    assert_eq!(recs[4]["queryTokens"], 5);
    assert_eq!(recs[4]["answerTokens"], 2);

    // Now both keys of `second` rest: it is skipped after one 503 round on
    // `first`... and a model outside the list's pattern is routed as before.
    let r = proxy.chat("alice", &chat_body("gpt-4", false)).await;
    assert_eq!(r.status, 429, "gpt-4 goes to `second` alone: {}", r.text());
    assert_eq!(r.header("x-tollgate-upstream").as_deref(), Some("second"));
}

/// An upstream that cannot be reached is passed over without a record; the
/// answer of a single upstream names it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_falls_back_without_a_record() {
    let good = answering("gpt-4o").await;
    let mut down = upstream("down", &good, &["gpt-4o"], &["sk-d"]);
    down.url = UpstreamUrl::parse("http://127.0.0.1:9").unwrap();
    let proxy = proxy_with(
        vec![down, upstream("good", &good, &[], &["sk-g"])],
        vec![fallback("gpt-4o", &["down", "good"])],
        0,
    )
    .await;
    let r = proxy.chat("alice", &chat_body("gpt-4o", true)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-tollgate-upstream").as_deref(), Some("good"));
    let r = proxy.chat("alice", &chat_body("gpt-4o-mini", false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-tollgate-upstream").as_deref(), Some("good"));
    let recs = proxy.wait_records(2).await;
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert!(recs
        .iter()
        .all(|r| r["upstream"] == "good" && r["status"] == 200));
}

/// A stream that fails after its first bytes reached the client is metered
/// and never sent to the fallback upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_fallback_after_the_first_byte() {
    let broken = Mock::start(|seen| {
        let ev = chat_stream(seen, "gpt-4o", &["partial", " answer"], Tok::new(70, 9));
        Reply::sse(vec![
            Step::Send(ev[0].clone()),
            Step::Send(ev[1].clone()),
            Step::Reset,
        ])
    })
    .await;
    let spare = answering("gpt-4o").await;
    let proxy = proxy_with(
        vec![
            upstream("broken", &broken, &["gpt-4o"], &["sk-b"]),
            upstream("spare", &spare, &["gpt-4o"], &["sk-s"]),
        ],
        vec![fallback("gpt-4o", &["broken", "spare"])],
        2,
    )
    .await;
    let s = open(proxy.addr, chat_req("alice", &chat_body("gpt-4o", true))).await;
    assert_eq!(s.status, 200);
    assert_eq!(
        s.headers.get("x-tollgate-upstream").map(|v| v.as_bytes()),
        Some(&b"broken"[..])
    );
    let (got, _) = s.finish().await.expect_err("the stream ends with an error");
    assert!(contains(&got, b"partial"));
    let recs = proxy.wait_records(1).await;
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["upstream"], "broken");
    assert_eq!(recs[0]["estimated"], true);
    assert_eq!(broken.seen().len(), 1);
    assert!(spare.seen().is_empty(), "not sent to the fallback");
}

/// A single upstream's answers name it (`default` for `--upstream`), errors
/// passed through included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_name_their_upstream() {
    let mock = failing(400, "req_x").await;
    let proxy = Proxy::builder(&mock.url()).start().await;
    let r = proxy.chat("alice", &chat_body("gpt-4o", false)).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.header("x-tollgate-upstream").as_deref(), Some("default"));
}

/// `/ratelimits` keeps each key's latest `x-ratelimit-*` headers (a 429
/// that moved the request to another key included), the key shown by the
/// first 8 hex digits of its SHA-256, never the key itself; the top-level
/// fields stay the latest answer's, as with one upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimits_are_kept_per_upstream_and_key_without_secrets() {
    let keyed = Mock::start(|s| {
        let remaining = if key_of(s) == "Bearer sk-secret-one" {
            "0"
        } else {
            "20"
        };
        let r = if remaining == "0" {
            Reply::json(r#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#)
                .status(429)
                .header("retry-after", "60")
        } else {
            Reply::json(completion("gpt-4o", "hi", Tok::new(5, 2)))
        };
        r.header("x-ratelimit-limit-requests", "500")
            .header("x-ratelimit-remaining-requests", remaining)
            .header("x-ratelimit-reset-requests", "1s")
    })
    .await;
    let local = Mock::start(|_| {
        Reply::json(completion("llama-3-8b", "hi", Tok::new(5, 2)))
            .header("x-ratelimit-remaining-tokens", "77")
    })
    .await;
    let proxy = proxy_of(vec![
        upstream(
            "openai",
            &keyed,
            &["gpt-*"],
            &["sk-secret-one", "sk-secret-two"],
        ),
        upstream("local", &local, &["llama-*"], &[]),
    ])
    .await;
    for model in ["gpt-4o", "gpt-4o", "llama-3-8b"] {
        let r = proxy.chat("alice", &chat_body(model, false)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let text = proxy.get("/ratelimits").await.text();
    assert!(!text.contains("sk-secret"), "{text}");
    let rl: Value = serde_json::from_str(&text).unwrap();
    let id = |k: &str| -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, k.as_bytes());
        d.as_ref()[..4].iter().map(|b| format!("{b:02x}")).collect()
    };
    let ups = rl["upstreams"].as_array().expect("per key").clone();
    assert_eq!(ups.len(), 3, "{rl}");
    assert_eq!(ups[0]["upstream"], "openai");
    assert_eq!(ups[0]["key"].as_str(), Some(id("sk-secret-one").as_str()));
    assert_eq!(ups[0]["requests"]["remaining"], 0);
    assert_eq!(ups[1]["key"].as_str(), Some(id("sk-secret-two").as_str()));
    assert_eq!(ups[1]["requests"]["remaining"], 20);
    assert_eq!(ups[1]["requests"]["maximum"], 500);
    assert_eq!(ups[2]["upstream"], "local");
    assert_eq!(ups[2]["key"], Value::Null);
    assert_eq!(ups[2]["tokens"]["remaining"], 77);
    // The latest answer's, as before.
    assert_eq!(rl["tokens"]["remaining"], 77);
}
