//! Reconciliation against OpenAI's Costs API, served by a mock that speaks
//! its shape (daily buckets, line items, pages), beside records made by real
//! requests through the proxy.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use http::Method;

const ADMIN_KEY: &str = "sk-admin-costs";

/// Two requests to gpt-4o and one to gpt-4o-mini through the proxy; OpenAI's
/// costs agree on gpt-4o (split into input and output line items, on two
/// pages) and disagree on gpt-4o-mini and on web search calls.
async fn costs_mock(today_s: i64, seen_pages: Arc<Mutex<Vec<String>>>) -> Mock {
    Mock::start(move |seen| {
        if seen.path.starts_with("/v1/organization/costs") {
            seen_pages.lock().unwrap().push(seen.path.clone());
            if seen.header("authorization").as_deref() != Some(&format!("Bearer {ADMIN_KEY}")) {
                return Reply::json(r#"{"error":{"message":"bad key","type":"invalid_request_error"}}"#)
                    .status(401);
            }
            let first = !seen.path.contains("page=");
            let body = if first {
                format!(
                    r#"{{"object":"page","data":[{{"object":"bucket","start_time":{today_s},"end_time":{},"results":[
                        {{"object":"organization.costs.result","amount":{{"value":0.005,"currency":"usd"}},"line_item":"gpt-4o-2024-08-06, input","project_id":null}},
                        {{"object":"organization.costs.result","amount":{{"value":0.01,"currency":"usd"}},"line_item":"gpt-4o-2024-08-06, output","project_id":null}}
                    ]}}],"has_more":true,"next_page":"page 2/x"}}"#,
                    today_s + 86_400
                )
            } else {
                format!(
                    r#"{{"object":"page","data":[{{"object":"bucket","start_time":{today_s},"end_time":{},"results":[
                        {{"object":"organization.costs.result","amount":{{"value":0.05021,"currency":"usd"}},"line_item":"gpt-4o-mini-2024-07-18, input","project_id":null}},
                        {{"object":"organization.costs.result","amount":{{"value":0.05,"currency":"usd"}},"line_item":"web search tool calls","project_id":null}}
                    ]}}],"has_more":false,"next_page":null}}"#,
                    today_s + 86_400
                )
            };
            return Reply::json(body);
        }
        let model = seen.json()["model"].as_str().unwrap_or("").to_owned();
        let (answered, t) = if model == "gpt-4o" {
            ("gpt-4o-2024-08-06", Tok::new(1000, 500))
        } else {
            ("gpt-4o-mini-2024-07-18", Tok::new(1000, 100))
        };
        Reply::json(completion(answered, "ok", t))
    })
    .await
}

fn today() -> (String, i64) {
    let now = chrono::Utc::now();
    let day = now.format("%Y-%m-%d").to_string();
    let start = now.timestamp().div_euclid(86_400) * 86_400;
    (day, start)
}

async fn seeded(p: &Proxy) {
    for (model, input, output) in [
        ("gpt-4o-2024-08-06", "2.5", "10"),
        ("gpt-4o-mini-2024-07-18", "0.15", "0.6"),
    ] {
        let body = format!(
            r#"{{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":{input},"per1MAnswerTokens":{output}}}"#
        );
        let r = p
            .admin_call(Method::POST, &format!("/model/{model}"), &body)
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    for model in ["gpt-4o", "gpt-4o", "gpt-4o-mini"] {
        let r = send(p.addr, chat_req("alice", &chat_body(model, false))).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    p.wait_records(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_compares_each_day_and_model_exactly() {
    let (day, start) = today();
    let pages = Arc::new(Mutex::new(Vec::new()));
    let mock = costs_mock(start, pages.clone()).await;
    let p = Proxy::builder(&mock.url())
        .with(|c| c.openai_admin_key = Some(ADMIN_KEY.into()))
        .start()
        .await;
    seeded(&p).await;
    let r = p.get(&format!("/reconcile?from={day}&to={day}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let lines = v["lines"].as_array().unwrap();
    let line = |item: &str| {
        lines
            .iter()
            .find(|l| l["item"] == item)
            .unwrap_or_else(|| panic!("no line for {item}: {v}"))
            .clone()
    };
    // 2 x (1000 x $2.50 + 500 x $10) / 1M = $0.015 both sides.
    let g = line("gpt-4o-2024-08-06");
    assert_eq!(g["day"], day.as_str());
    assert_eq!(g["openai"].to_string(), "0.015");
    assert_eq!(g["tollgate"].to_string(), "0.015");
    assert_eq!(g["difference"].to_string(), "0");
    assert_eq!(g["flagged"], false);
    // 1000 x $0.15 + 100 x $0.60 per 1M = $0.00021 against OpenAI's $0.05021.
    let m = line("gpt-4o-mini-2024-07-18");
    assert_eq!(m["tollgate"].to_string(), "0.00021");
    assert_eq!(m["openai"].to_string(), "0.05021");
    assert_eq!(m["difference"].to_string(), "-0.05");
    assert_eq!(m["flagged"], true);
    let w = line("web search tool calls");
    assert_eq!(w["tollgate"].to_string(), "0");
    assert_eq!(w["flagged"], true);
    assert_eq!(lines.len(), 3, "{v}");
    assert_eq!(v["flagged"], 2);
    assert_eq!(v["openai"].to_string(), "0.11521");
    assert_eq!(v["tollgate"].to_string(), "0.01521");
    // Both pages were read, the second by its (escaped) token, for one day.
    let pages = pages.lock().unwrap().clone();
    assert_eq!(pages.len(), 2, "{pages:?}");
    assert!(pages[0].contains(&format!("start_time={start}&end_time={}", start + 86_400)));
    assert!(pages[0].contains("bucket_width=1d") && pages[0].contains("group_by=line_item"));
    assert!(pages[1].ends_with("&page=page%202%2Fx"), "{}", pages[1]);
    // A larger threshold flags only the bigger difference... none is above $0.06.
    let r = p
        .get(&format!("/reconcile?from={day}&to={day}&threshold=0.06"))
        .await;
    assert_eq!(r.json()["flagged"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_periods_a_missing_key_and_a_refusing_api_are_clear_errors() {
    let (day, start) = today();
    let mock = costs_mock(start, Arc::default()).await;
    let p = Proxy::start(&mock.url()).await;
    let r = p.get(&format!("/reconcile?from={day}&to={day}")).await;
    assert_openai_error(&r, 503, "server_error", None, Some("no_openai_admin_key"));
    for (q, param) in [
        (format!("from={day}"), "to"),
        ("from=2026-13-01&to=2026-12-01".to_owned(), "from"),
        (format!("from={day}&to={day}&threshold=lots"), "threshold"),
        (format!("from={day}&to={day}&user=x"), "user"),
    ] {
        let r = p.get(&format!("/reconcile?{q}")).await;
        assert_eq!(r.status, 400, "{q}: {}", r.text());
        assert_eq!(r.json()["error"]["param"], param, "{q}: {}", r.text());
    }
    let wrong = Proxy::builder(&mock.url())
        .with(|c| c.openai_admin_key = Some("sk-wrong".into()))
        .start()
        .await;
    let r = wrong.get(&format!("/reconcile?from={day}&to={day}")).await;
    let msg = assert_openai_error(&r, 502, "upstream_error", None, None);
    assert!(msg.contains("401") && msg.contains("bad key"), "{msg}");
    assert!(!msg.contains("sk-wrong"));
}

/// `tollgate reconcile` prints the same comparison and exits 1 when a line
/// is over the threshold; the key comes from the environment only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_prints_the_comparison_and_exits_1_on_differences() {
    if pg_mode() {
        return; // the command is given the SQLite file below
    }
    let (day, start) = today();
    let mock = costs_mock(start, Arc::default()).await;
    let mut p = Proxy::start(&mock.url()).await;
    seeded(&p).await;
    p.stop().await;
    let run = |key: Option<&str>, threshold: &str| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.args([
            "reconcile",
            "--from",
            &day,
            "--to",
            &day,
            "--threshold",
            threshold,
        ])
        .args(["--db", p.db.to_str().unwrap(), "--upstream", &mock.url()])
        .env_remove("TOLLGATE_OPENAI_ADMIN_KEY")
        .env_remove("OPENAI_ADMIN_KEY");
        if let Some(k) = key {
            cmd.env("OPENAI_ADMIN_KEY", k);
        }
        cmd.output().expect("run tollgate reconcile")
    };
    let out = run(Some(ADMIN_KEY), "0.01");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = |item: &str| {
        stdout
            .lines()
            .find(|l| l.contains(item))
            .unwrap_or_else(|| panic!("no {item} in {stdout}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(row("gpt-4o-2024-08-06")[2..], ["0.015", "0.015", "0"]);
    assert_eq!(
        row("gpt-4o-mini-2024-07-18")[2..5],
        ["0.05021", "0.00021", "-0.05"]
    );
    assert!(row("gpt-4o-mini-2024-07-18").contains(&"<--"));
    assert_eq!(row("total")[1..], ["0.11521", "0.01521", "-0.1"]);
    assert!(stdout.contains("2 line(s) differ"), "{stdout}");
    let out = run(Some(ADMIN_KEY), "1");
    assert_eq!(out.status.code(), Some(0));
    let out = run(None, "1");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TOLLGATE_OPENAI_ADMIN_KEY"), "{err}");
    // No flag takes the key.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "reconcile",
            "--from",
            &day,
            "--to",
            &day,
            "--openai-admin-key",
            "sk",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
