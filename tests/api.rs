//! The REST API over real records: prices and re-pricing, exact costs,
//! usage totals, filters, and upstream rate limits.

mod common;

use chrono::{DateTime, FixedOffset, SecondsFormat};
use common::*;
use serde_json::{json, Value};

/// Answers every chat request with these tokens, under the requested model.
async fn metered_mock(t: Tok) -> Mock {
    Mock::start(move |seen| {
        let model = seen.json()["model"].as_str().unwrap_or("x").to_owned();
        Reply::json(completion(&model, "ok", t))
    })
    .await
}

/// Makes one request and returns its record's timestamp (ms).
async fn request(proxy: &Proxy, user: &str, model: &str) -> i64 {
    let before = proxy.queries("").await.len();
    let r = proxy.chat(user, &chat_body(model, false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let recs = proxy.wait_records(before + 1).await;
    ts_ms(&recs[before]["timestamp"])
}

fn price(valid_from: &str, q: &str, a: &str) -> String {
    format!(r#"{{"validFrom":"{valid_from}","per1KQueryTokens":{q},"per1KAnswerTokens":{a}}}"#)
}

fn costs(rows: &[std::collections::BTreeMap<String, String>]) -> Vec<String> {
    rows.iter().map(|r| r["cost"].clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_reports_are_zeros_never_nan() {
    let mock = metered_mock(Tok::new(1, 1)).await;
    let proxy = Proxy::start(&mock.url()).await;
    let r = proxy.get("/usage").await;
    assert_eq!(
        r.text(),
        r#"{"numQueries":0,"queryTokens":0,"answerTokens":0,"cost":0,"averageCostPerQuery":0,"cachedQueryTokens":0,"reasoningTokens":0,"unpricedQueries":0,"rejectedQueries":0}"#
    );
    assert_eq!(proxy.get("/queries").await.text(), "[]");
    assert_eq!(proxy.get("/ratelimits").await.text(), "{}");
    assert_eq!(proxy.get("/models").await.text(), "[]");

    request(&proxy, "alice", "gpt-x").await;
    let u = proxy.usage_raw("user=nobody").await;
    assert_eq!(u["numQueries"], "0");
    assert_eq!(u["cost"], "0");
    assert_eq!(u["averageCostPerQuery"], "0");
    let u = proxy.usage_raw("user=alice").await;
    assert_eq!(u["numQueries"], "1");
    assert_eq!(u["averageCostPerQuery"], "0", "unpriced: zero, not NaN");
    assert_eq!(u["unpricedQueries"], "1");
}

/// Records made before their model had a price cost 0 and count as
/// unpriced; adding a price re-prices them, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_price_reprices_earlier_records() {
    let mock = metered_mock(Tok::new(3243, 1399)).await;
    let proxy = Proxy::start(&mock.url()).await;
    request(&proxy, "alice", "m-new").await;
    request(&proxy, "bob", "m-new").await;
    request(&proxy, "bob", "m-other").await;
    let rows = proxy.queries_raw("").await;
    assert_eq!(costs(&rows), ["0", "0", "0"]);
    assert!(rows.iter().all(|r| r["priced"] == "false"));
    let u = proxy.usage_raw("").await;
    assert_eq!(u["unpricedQueries"], "3");
    assert_eq!(u["cost"], "0");

    let r = proxy
        .set_price("m-new", &price("2020-01-01T00:00:00Z", "0.01", "0.03"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let raw = raw_object(&r.text());
    assert_eq!(raw["name"], "\"m-new\"");
    assert_eq!(raw["repricedQueries"], "2");
    let v = r.json();
    assert_eq!(v["costs"].as_array().unwrap().len(), 1);
    assert_eq!(v["costs"][0]["validFrom"], "2020-01-01T00:00:00.000Z");

    // 3243 x 0.01/1K + 1399 x 0.03/1K = 0.0744, with no float noise.
    let rows = proxy.queries_raw("").await;
    assert_eq!(costs(&rows), ["0.0744", "0.0744", "0"]);
    assert_eq!(rows[0]["priced"], "true");
    assert_eq!(rows[2]["priced"], "false");
    let u = proxy.usage_raw("").await;
    assert_eq!(u["cost"], "0.1488");
    assert_eq!(u["averageCostPerQuery"], "0.0496");
    assert_eq!(u["unpricedQueries"], "1");
    let u = proxy.usage_raw("user=alice").await;
    assert_eq!(u["cost"], "0.0744");
    assert_eq!(u["averageCostPerQuery"], "0.0744");

    // The same row again changes nothing.
    let r = proxy
        .set_price("m-new", &price("2020-01-01T00:00:00Z", "0.01", "0.03"))
        .await;
    assert_eq!(raw_object(&r.text())["repricedQueries"], "0");
    // A row valid only in the future covers no record.
    let future = tollgate::timestamp::format_ms(now_ms() + 86_400_000);
    let r = proxy.set_price("m-new", &price(&future, "1", "1")).await;
    assert_eq!(raw_object(&r.text())["repricedQueries"], "0");
    assert_eq!(r.json()["costs"].as_array().unwrap().len(), 2);
    assert_eq!(
        costs(&proxy.queries_raw("").await),
        ["0.0744", "0.0744", "0"]
    );
}

/// Each record is priced by the row valid at its start; a new row re-prices
/// only the records it covers; the same validFrom replaces a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_priced_by_the_row_valid_at_their_start() {
    let mock = metered_mock(Tok::new(3243, 1399)).await;
    let proxy = Proxy::start(&mock.url()).await;
    let r = proxy
        .set_price("m", &price("2020-01-01T00:00:00+01:00", "0.01", "0.03"))
        .await;
    assert_eq!(raw_object(&r.text())["repricedQueries"], "0");
    let t1 = request(&proxy, "alice", "m").await;
    clock_past(t1).await;
    let b_from = now_ms();
    clock_past(b_from).await;
    let t2 = request(&proxy, "alice", "m").await;
    assert!(t1 < b_from && b_from < t2);
    assert_eq!(costs(&proxy.queries_raw("").await), ["0.0744", "0.0744"]);

    let b_text = tollgate::timestamp::format_ms(b_from);
    let r = proxy.set_price("m", &price(&b_text, "0.02", "0.06")).await;
    assert_eq!(
        raw_object(&r.text())["repricedQueries"],
        "1",
        "only the later record"
    );
    let v = r.json();
    assert_eq!(v["costs"][0]["validFrom"], "2019-12-31T23:00:00.000Z");
    assert_eq!(v["costs"][1]["validFrom"], Value::from(b_text.clone()));
    assert_eq!(costs(&proxy.queries_raw("").await), ["0.0744", "0.1488"]);

    // Written after the new row exists: priced by it straight away.
    request(&proxy, "bob", "m").await;
    assert_eq!(
        costs(&proxy.queries_raw("").await),
        ["0.0744", "0.1488", "0.1488"]
    );
    assert_eq!(proxy.usage_raw("").await["averageCostPerQuery"], "0.124");

    // Same instant, other prices: the row is replaced and its records re-priced.
    let r = proxy
        .set_price("m", &price(&b_text, "0.001", "0.002"))
        .await;
    assert_eq!(raw_object(&r.text())["repricedQueries"], "2");
    let model = proxy.get_json("/model/m").await;
    assert_eq!(model["costs"].as_array().unwrap().len(), 2);
    assert_eq!(model["costs"][1]["per1KQueryTokens"], json!(0.001));
    // 3243 x 0.001/1K + 1399 x 0.002/1K = 0.006041
    assert_eq!(
        costs(&proxy.queries_raw("").await),
        ["0.0744", "0.006041", "0.006041"]
    );
    let u = proxy.usage_raw("").await;
    assert_eq!(u["cost"], "0.086482");
    // 0.086482 / 3, rounded to the pico-dollar.
    assert_eq!(u["averageCostPerQuery"], "0.028827333333");
}

/// Prices per 1M tokens with a cached price; the model shows both units.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_million_prices_and_cached_tokens() {
    let mock = metered_mock(Tok {
        prompt: 3243,
        completion: 1399,
        cached: 1000,
        reasoning: 300,
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    let r = proxy
        .set_price(
            "m1m",
            r#"{"validFrom":"2024-01-24T14:50+01","per1MQueryTokens":2.5,"per1MAnswerTokens":10,"per1MCachedQueryTokens":1.25}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let row = raw_object(&r.json()["costs"][0].to_string());
    assert_eq!(row["validFrom"], "\"2024-01-24T13:50:00.000Z\"");
    assert_eq!(row["per1MQueryTokens"], "2.5");
    assert_eq!(row["per1KQueryTokens"], "0.0025");
    assert_eq!(row["per1MCachedQueryTokens"], "1.25");
    assert_eq!(row["per1KCachedQueryTokens"], "0.00125");
    assert_eq!(row["per1MAnswerTokens"], "10");
    assert_eq!(row["per1KAnswerTokens"], "0.01");
    request(&proxy, "alice", "m1m").await;
    // (3243-1000) x 2.5/1M + 1000 x 1.25/1M + 1399 x 10/1M = 0.0208475
    let rows = proxy.queries_raw("").await;
    assert_eq!(rows[0]["cost"], "0.0208475");
    assert_eq!(rows[0]["reasoningTokens"], "300");
    let models = proxy.get_json("/models").await;
    assert_eq!(models.as_array().unwrap().len(), 1);
    assert_eq!(models[0]["name"], "m1m");
}

/// The built-in price list is loaded into a new database, and an answer's
/// dated model is priced under its undated name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn built_in_prices_price_dated_snapshots() {
    let mock =
        Mock::start(|_| Reply::json(completion("gpt-4o-2024-08-06", "ok", Tok::new(1000, 100))))
            .await;
    let proxy = Proxy::builder(&mock.url())
        .default_prices(true)
        .start()
        .await;
    let m = proxy.get_json("/model/gpt-4o").await;
    assert_eq!(m["costs"][0]["validFrom"], "1970-01-01T00:00:00.000Z");
    assert_eq!(m["costs"][0]["per1MQueryTokens"], json!(2.5));
    assert_eq!(m["costs"][0]["per1MAnswerTokens"], json!(10));
    assert!(proxy.get_json("/models").await.as_array().unwrap().len() > 5);
    request(&proxy, "alice", "gpt-4o").await;
    // 1000 x 2.50/1M + 100 x 10/1M
    assert_eq!(proxy.queries_raw("").await[0]["cost"], "0.0035");
}

/// user, model, after and before (both exclusive), limit and offset, the old
/// README's short timestamp form, oldest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_select_the_right_records_oldest_first() {
    let mock = metered_mock(Tok::new(100, 10)).await;
    let proxy = Proxy::start(&mock.url()).await;
    let plan = [
        ("alice", "model-a"),
        ("bob", "model-a"),
        ("alice", "model-b"),
        ("o'neil+co", "model-b"),
        ("alice", "model-a"),
    ];
    let mut ts = Vec::new();
    for (u, m) in plan {
        let t = request(&proxy, u, m).await;
        ts.push(t);
        clock_past(t).await;
    }
    let all = proxy.queries("").await;
    assert_eq!(all.len(), 5);
    for w in all.windows(2) {
        assert!(
            ts_ms(&w[0]["timestamp"]) < ts_ms(&w[1]["timestamp"]),
            "oldest first"
        );
        assert!(w[0]["id"].as_i64() < w[1]["id"].as_i64());
    }
    let ids: Vec<i64> = all.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    let pick = |q: Vec<Value>| -> Vec<usize> {
        q.iter()
            .map(|r| {
                ids.iter()
                    .position(|&i| Some(i) == r["id"].as_i64())
                    .unwrap()
            })
            .collect()
    };
    let fmt = |ms: i64| tollgate::timestamp::format_ms(ms);
    let cases: Vec<(String, Vec<usize>)> = vec![
        ("user=alice".into(), vec![0, 2, 4]),
        ("user=o%27neil%2Bco".into(), vec![3]),
        ("model=model-b".into(), vec![2, 3]),
        ("user=alice&model=model-a".into(), vec![0, 4]),
        (format!("after={}", fmt(ts[1])), vec![2, 3, 4]),
        (format!("before={}", fmt(ts[3])), vec![0, 1, 2]),
        (
            format!("after={}&before={}", fmt(ts[0]), fmt(ts[4])),
            vec![1, 2, 3],
        ),
        (
            format!("after={}&before={}", fmt(ts[1]), fmt(ts[2])),
            vec![],
        ),
        (format!("after={}&user=alice", fmt(ts[0])), vec![2, 4]),
        ("limit=2".into(), vec![0, 1]),
        ("offset=3".into(), vec![3, 4]),
        ("limit=2&offset=1".into(), vec![1, 2]),
        ("limit=0".into(), vec![]),
        ("offset=9".into(), vec![]),
        ("user=alice&limit=1&offset=1".into(), vec![2]),
        ("after=2024-01-24T14:50%2B01".into(), vec![0, 1, 2, 3, 4]),
        // An unencoded `+` arrives as a space and still means the offset.
        ("after=2024-01-24T14:50+01".into(), vec![0, 1, 2, 3, 4]),
        ("before=2024-01-24T14:50%2B01".into(), vec![]),
        ("after=2024-01-24T14:50:00.000Z".into(), vec![0, 1, 2, 3, 4]),
    ];
    for (q, want) in &cases {
        assert_eq!(&pick(proxy.queries(q).await), want, "/queries?{q}");
    }
    // The same instant written with another offset selects the same records.
    let shifted = DateTime::from_timestamp_millis(ts[1])
        .unwrap()
        .with_timezone(&FixedOffset::east_opt(2 * 3600).unwrap())
        .to_rfc3339_opts(SecondsFormat::Millis, false)
        .replace('+', "%2B");
    assert_eq!(
        pick(proxy.queries(&format!("after={shifted}")).await),
        [2, 3, 4]
    );

    for (q, n) in [
        ("user=alice".to_owned(), 3),
        ("user=bob".to_owned(), 1),
        ("model=model-a".to_owned(), 3),
        (format!("after={}&before={}", fmt(ts[0]), fmt(ts[4])), 3),
        (format!("user=alice&after={}", fmt(ts[0])), 2),
        ("before=2024-01-24T14:50%2B01".to_owned(), 0),
    ] {
        let u = proxy.usage_raw(&q).await;
        assert_eq!(u["numQueries"], n.to_string(), "/usage?{q}");
        assert_eq!(u["queryTokens"], (n * 100).to_string(), "/usage?{q}");
        assert_eq!(u["answerTokens"], (n * 10).to_string(), "/usage?{q}");
    }
}

fn window(reset: &Value, before: i64, after: i64, ms: i64) {
    let at = ts_ms(reset);
    assert!(
        before + ms <= at && at <= after + ms,
        "reset {reset} must be arrival + {ms} ms: in [{}, {}]",
        before + ms,
        after + ms
    );
}

/// `/ratelimits` from the latest answer with `x-ratelimit-*` headers (a 429
/// included), resets parsed as Go durations, kept across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_follow_the_latest_answer_and_survive_a_restart() {
    let mock = Mock::start(|seen| match seen.n {
        0 => Reply::json(completion("gpt-4o", "ok", Tok::new(5, 5)))
            .header("x-ratelimit-limit-requests", "500")
            .header("x-ratelimit-remaining-requests", "499")
            .header("x-ratelimit-reset-requests", "20ms")
            .header("x-ratelimit-limit-tokens", "500000")
            .header("x-ratelimit-remaining-tokens", "486895")
            .header("x-ratelimit-reset-tokens", "1h2m3.5s"),
        1 => Reply::json(
            r#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#,
        )
        .status(429)
        .header("x-ratelimit-limit-requests", "500")
        .header("x-ratelimit-remaining-requests", "0")
        .header("x-ratelimit-reset-requests", "6m0s")
        .header("x-ratelimit-limit-tokens", "500000")
        .header("x-ratelimit-remaining-tokens", "1000")
        .header("x-ratelimit-reset-tokens", "1s200ms"),
        // No rate-limit headers: the last known values stay.
        _ => Reply::json(completion("gpt-4o", "ok", Tok::new(5, 5))),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rl.db");
    let mut proxy = Proxy::builder(&mock.url()).db(&db).start().await;
    assert_eq!(proxy.get("/ratelimits").await.text(), "{}");

    let before = now_ms();
    assert_eq!(
        proxy.chat("a", &chat_body("gpt-4o", false)).await.status,
        200
    );
    let after = now_ms();
    let rl = proxy.get_json("/ratelimits").await;
    assert_eq!(rl["requests"]["maximum"], 500);
    assert_eq!(rl["requests"]["remaining"], 499);
    window(&rl["requests"]["reset"], before, after, 20);
    assert_eq!(rl["tokens"]["maximum"], 500000);
    assert_eq!(rl["tokens"]["remaining"], 486895);
    window(&rl["tokens"]["reset"], before, after, 3_723_500);

    let before = now_ms();
    assert_eq!(
        proxy.chat("a", &chat_body("gpt-4o", false)).await.status,
        429
    );
    let after = now_ms();
    let rl = proxy.get_json("/ratelimits").await;
    assert_eq!(rl["requests"]["remaining"], 0);
    window(&rl["requests"]["reset"], before, after, 360_000);
    assert_eq!(rl["tokens"]["remaining"], 1000);
    window(&rl["tokens"]["reset"], before, after, 1_200);

    assert_eq!(
        proxy.chat("a", &chat_body("gpt-4o", false)).await.status,
        200
    );
    assert_eq!(
        proxy.get_json("/ratelimits").await,
        rl,
        "kept without new headers"
    );
    assert_eq!(proxy.wait_records(3).await.len(), 3);

    proxy.stop().await;
    let again = Proxy::builder(&mock.url()).db(&db).start().await;
    assert_eq!(again.get_json("/ratelimits").await, rl, "persisted");
    assert_eq!(again.queries("").await.len(), 3, "records persisted");
}

/// Model names of OpenAI-compatible servers carry slashes and colons; they
/// work in the path raw or percent-encoded, and price their records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_names_with_slashes_and_colons() {
    let mock = metered_mock(Tok::new(1000, 1000)).await;
    let proxy = Proxy::start(&mock.url()).await;
    let name = "meta-llama/Llama-3.1-8B-Instruct";
    let r = proxy
        .set_price(name, &price("2020-01-01T00:00:00Z", "0.0001", "0.0002"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let m = proxy
        .get_json("/model/meta-llama%2FLlama-3.1-8B-Instruct")
        .await;
    assert_eq!(m["name"], name);
    request(&proxy, "alice", name).await;
    assert_eq!(proxy.queries_raw("").await[0]["cost"], "0.0003");
    let q = proxy
        .queries("model=meta-llama%2FLlama-3.1-8B-Instruct")
        .await;
    assert_eq!(q.len(), 1);
    let r = proxy
        .set_price(
            "ft%3Agpt-4o-mini%3Aacme%3A%3Aabc",
            &price("2020-01-01T00:00:00Z", "1", "2"),
        )
        .await;
    assert_eq!(r.json()["name"], "ft:gpt-4o-mini:acme::abc");
}

/// `/usage` and `/queries` wait for queued records so that a read right
/// after a finished request sees it, also right after start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_right_after_start_sees_an_estimated_record() {
    let mock =
        Mock::start(|_| Reply::sse_events(vec![chunk("gpt-4o", "no usage here"), done()])).await;
    let proxy = Proxy::start(&mock.url()).await;
    let got = open(proxy.addr, chat_req("alice", &chat_body("gpt-4o", true)))
        .await
        .finish()
        .await
        .unwrap();
    assert!(got.ends_with(b"[DONE]\n\n"));
    let recs = proxy.queries("").await;
    assert_eq!(
        recs.len(),
        1,
        "the finished request's record is visible at once"
    );
    assert_eq!(recs[0]["estimated"], true);
}

/// Thousands of records (written straight into the database, out of time
/// order) come back from `/queries` whole and oldest first, though the
/// answer is written out in pieces; `/usage` sums them exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_query_results_are_complete_and_ordered() {
    let mock = metered_mock(Tok::new(1, 1)).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("big.db");
    let n: i64 = 3000;
    let base = 1_700_000_000_000i64;
    let rows: Vec<Seed> = (0..n)
        .map(|i| Seed {
            // A permutation of 0..n, so ids and times disagree.
            ts: base + ((i * 7919) % n) * 1000,
            user: if i % 2 == 0 { "even" } else { "odd" }.into(),
            model: "gpt-4o".into(),
            query: i + 1,
            answer: 2,
            cached: 0,
            reasoning: 0,
            cost: 1_000_000_007 * (i + 1),
            priced: true,
        })
        .collect();
    let total_cost: i128 = rows.iter().map(|r| i128::from(r.cost)).sum();
    seed_db(&mock.url(), &db, &rows).await;
    let proxy = Proxy::builder(&mock.url()).db(&db).start().await;
    let r = proxy.get("/queries").await;
    assert!(r.body.len() > 200_000, "big enough to be written in pieces");
    let all = proxy.queries("").await;
    assert_eq!(all.len() as i64, n);
    let times: Vec<i64> = all.iter().map(|r| ts_ms(&r["timestamp"])).collect();
    let want: Vec<i64> = (0..n).map(|s| base + s * 1000).collect();
    assert_eq!(times, want, "oldest first");
    let page = proxy.queries("limit=5&offset=2000").await;
    let page_times: Vec<i64> = page.iter().map(|r| ts_ms(&r["timestamp"])).collect();
    assert_eq!(page_times, want[2000..2005]);
    let u = proxy.usage_raw("").await;
    assert_eq!(u["numQueries"], n.to_string());
    assert_eq!(u["queryTokens"], (n * (n + 1) / 2).to_string());
    assert_eq!(u["cost"], dollars(total_cost));
    let avg = (total_cost + i128::from(n) / 2) / i128::from(n);
    assert_eq!(u["averageCostPerQuery"], dollars(avg));
    let u = proxy.usage_raw("user=odd").await;
    assert_eq!(u["numQueries"], (n / 2).to_string());
}

/// `/queries` narrows by status class or code and by estimated, and lists
/// newest first on request, on either store (the dashboard's filters).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_filter_by_status_and_estimated_and_order() {
    let mock = Mock::start(|seen| {
        let model = seen.json()["model"].as_str().unwrap_or("x").to_owned();
        match model.as_str() {
            "bad" => {
                Reply::json(r#"{"error":{"message":"boom","type":"server_error"}}"#).status(500)
            }
            // A stream without usage: estimated.
            "est" => {
                let mut ev = chat_stream(seen, "est", &["one", " two"], Tok::new(5, 2));
                ev.retain(|e| !String::from_utf8_lossy(e).contains("\"choices\":[]"));
                Reply::sse_events(ev)
            }
            _ => Reply::json(completion(&model, "ok", Tok::new(3, 4))),
        }
    })
    .await;
    let p = Proxy::start(&mock.url()).await;
    let calls = [
        ("good", false),
        ("bad", false),
        ("est", true),
        ("good", false),
    ];
    for (n, (model, stream)) in calls.into_iter().enumerate() {
        let r = p.chat("ann", &chat_body(model, stream)).await;
        let want = if model == "bad" { 500 } else { 200 };
        assert_eq!(r.status, want, "{}", r.text());
        p.wait_records(n + 1).await;
    }
    let models = |rows: Vec<Value>| -> Vec<String> {
        rows.iter()
            .map(|r| r["requestedModel"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(models(p.queries("").await), ["good", "bad", "est", "good"]);
    assert_eq!(
        models(p.queries("order=desc").await),
        ["good", "est", "bad", "good"]
    );
    assert_eq!(models(p.queries("status=error").await), ["bad"]);
    assert_eq!(models(p.queries("status=500").await), ["bad"]);
    assert_eq!(
        models(p.queries("status=ok").await),
        ["good", "est", "good"]
    );
    assert_eq!(models(p.queries("estimated=true").await), ["est"]);
    assert_eq!(
        models(p.queries("estimated=false&status=ok&order=desc").await),
        ["good", "good"]
    );
    assert_eq!(models(p.queries("order=desc&limit=1").await), ["good"]);
    for (q, param) in [
        ("status=fine", "status"),
        ("estimated=yes", "estimated"),
        ("order=up", "order"),
    ] {
        let r = p.get(&format!("/queries?{q}")).await;
        assert_openai_error(&r, 400, "invalid_request_error", Some(param), None);
    }
}
