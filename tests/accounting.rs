//! Accounting that matches the invoice: service tiers priced at their own
//! rates (the answer's tier, else the request's), in whole answers and in
//! streams of both chat and the Responses API, shown per record with the
//! cost split by part, and grouped by tier in `/usage`.

mod common;

use common::*;
use serde_json::{json, Value};

/// Prompt 1000 (200 cached), completion 100 (30 reasoning).
const TOK: Tok = Tok {
    prompt: 1000,
    completion: 100,
    cached: 200,
    reasoning: 30,
};

/// `,"service_tier":"x"` or nothing.
fn tier_field(tier: &Value) -> String {
    match tier.as_str() {
        Some(t) => format!(r#","service_tier":"{t}""#),
        None => String::new(),
    }
}

fn responses_usage() -> String {
    r#"{"input_tokens":1000,"input_tokens_details":{"cached_tokens":200},"output_tokens":100,"output_tokens_details":{"reasoning_tokens":30},"total_tokens":1100}"#.into()
}

fn responses_object(model: &str, tier: &Value, status: &str, usage: &str) -> String {
    format!(
        r#"{{"id":"resp_1","object":"response","created_at":1700000000,"status":"{status}","model":"{model}","output":[{{"type":"message","id":"msg_1","status":"completed","role":"assistant","content":[{{"type":"output_text","text":"hi \"service_tier\":\"priority\"","annotations":[]}}]}}]{},"usage":{usage}}}"#,
        tier_field(tier)
    )
}

/// Answers as the request's `x_answer` says: `x_tier` is the tier the answer
/// reports (`null`: none), `x_shape` the answer's shape.
async fn tier_mock() -> Mock {
    Mock::start(|seen| {
        let req = seen.json();
        let model = req["model"].as_str().unwrap_or("x").to_owned();
        let tier = req["x_answer"]["tier"].clone();
        let tf = tier_field(&tier);
        match req["x_answer"]["shape"].as_str().unwrap_or("") {
            "chat" => {
                let body = completion(&model, "ok", TOK);
                // The tier sits among the answer's own fields, at the end.
                let body = format!("{}{tf}}}", body.strip_suffix('}').unwrap());
                Reply::json(body)
            }
            "chat_stream" => {
                let chunk = |delta: &str, finish: &str, usage: &str| {
                    event(&format!(
                        r#"{{"id":"c1","object":"chat.completion.chunk","created":1700000000,"model":"{model}"{tf},"choices":[{{"index":0,"delta":{delta},"finish_reason":{finish}}}]{usage}}}"#
                    ))
                };
                let mut events = vec![
                    chunk(r#"{"role":"assistant","content":""}"#, "null", ""),
                    chunk(r#"{"content":"ok"}"#, "null", ""),
                    chunk("{}", r#""stop""#, ""),
                ];
                if seen.wants_usage() {
                    events.push(event(&format!(
                        r#"{{"id":"c1","object":"chat.completion.chunk","created":1700000000,"model":"{model}"{tf},"choices":[],"usage":{}}}"#,
                        TOK.json()
                    )));
                }
                events.push(done());
                Reply::sse_events(events)
            }
            "responses" => Reply::json(responses_object(
                &model,
                &tier,
                "completed",
                &responses_usage(),
            )),
            "responses_stream" => {
                // Created says what was asked (auto); completed what was used.
                let created = responses_object(&model, &json!("auto"), "in_progress", "null");
                let done = responses_object(&model, &tier, "completed", &responses_usage());
                Reply::sse_events(vec![
                    bytes::Bytes::from(format!(
                        "event: response.created\ndata: {{\"type\":\"response.created\",\"response\":{created}}}\n\n"
                    )),
                    bytes::Bytes::from(
                        "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"hi\"}\n\n",
                    ),
                    bytes::Bytes::from(format!(
                        "event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{done}}}\n\n"
                    )),
                ])
            }
            other => panic!("unknown shape {other:?}"),
        }
    })
    .await
}

/// Sends one request for `gpt-5` asking for tier `asked` (`null`: none),
/// answered in `shape` reporting tier `answered`.
async fn ask(proxy: &Proxy, shape: &str, asked: Value, answered: Value) {
    let responses = shape.starts_with("responses");
    let stream = shape.ends_with("stream");
    let mut body = json!({
        "model": "gpt-5",
        "stream": stream,
        "x_answer": {"shape": shape, "tier": answered},
    });
    if !asked.is_null() {
        body["service_tier"] = asked;
    }
    if responses {
        body["input"] = json!("hi");
    } else {
        body["messages"] = json!([{"role": "user", "content": "hi"}]);
    }
    let path = if responses {
        "/v1/responses"
    } else {
        "/v1/chat/completions"
    };
    let req = http::Request::post(path)
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-client")
        .header("x-user", "alice")
        .body(full(body.to_string()))
        .unwrap();
    let r = send(proxy.addr, req).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// gpt-5 from the built-in list: standard 1.25 / 0.125 / 10, flex 0.625 /
/// 0.0625 / 5, priority 2.50 / 0.25 / 20 (USD per 1M tokens). With 800
/// uncached, 200 cached and 100 answer tokens:
/// - standard: 0.001 + 0.000025 + 0.001 = 0.002025
/// - flex: 0.0005 + 0.0000125 + 0.0005 = 0.0010125
/// - priority: 0.002 + 0.00005 + 0.002 = 0.00405
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_tiers_are_priced_at_their_own_rates() {
    let mock = tier_mock().await;
    let proxy = Proxy::builder(&mock.url())
        .default_prices(true)
        .start()
        .await;
    let cases: [(&str, Value, Value, &str, &str, &str); 8] = [
        // shape, asked, answered, recorded tier, cost, tier adjustment
        (
            "chat",
            json!("flex"),
            json!("flex"),
            "flex",
            "0.0010125",
            "-0.0010125",
        ),
        (
            "chat",
            json!("flex"),
            Value::Null,
            "flex",
            "0.0010125",
            "-0.0010125",
        ),
        (
            "chat",
            json!("priority"),
            json!("default"),
            "default",
            "0.002025",
            "0",
        ),
        (
            "chat_stream",
            json!("auto"),
            json!("priority"),
            "priority",
            "0.00405",
            "0.002025",
        ),
        ("chat_stream", Value::Null, Value::Null, "", "0.002025", "0"),
        (
            "responses",
            json!("flex"),
            json!("flex"),
            "flex",
            "0.0010125",
            "-0.0010125",
        ),
        (
            "responses_stream",
            json!("auto"),
            json!("flex"),
            "flex",
            "0.0010125",
            "-0.0010125",
        ),
        // A tier tollgate does not know is not priced as one.
        ("chat", json!("turbo"), json!("turbo"), "", "0.002025", "0"),
    ];
    for (shape, asked, answered, ..) in &cases {
        ask(&proxy, shape, asked.clone(), answered.clone()).await;
    }
    let recs = proxy.wait_records(cases.len()).await;
    let raw = proxy.queries_raw("").await;
    for (i, (shape, asked, answered, tier, cost, adjustment)) in cases.iter().enumerate() {
        let what = format!("case {i}: {shape} asked {asked} answered {answered}");
        let r = &recs[i];
        assert_eq!(r["queryTokens"], 1000, "{what}");
        assert_eq!(r["cachedQueryTokens"], 200, "{what}");
        assert_eq!(r["answerTokens"], 100, "{what}");
        assert_eq!(r["reasoningTokens"], 30, "{what}");
        assert_eq!(r["serviceTier"].as_str().unwrap_or(""), *tier, "{what}");
        assert_eq!(raw[i]["cost"], *cost, "{what}");
        let parts = &raw[i];
        assert_eq!(parts["tierAdjustment"], *adjustment, "{what}");
        // The parts add up to the cost, exactly.
        let pico = |s: &str| tollgate::pricing::parse_scaled(s, 12).unwrap();
        let sum: i64 = [
            "inputCost",
            "cachedInputCost",
            "outputCost",
            "audioInputCost",
            "audioOutputCost",
        ]
        .iter()
        .map(|k| pico(&parts[*k]))
        .sum();
        assert_eq!(sum, pico(cost), "{what}");
    }
    // Flex: 800 x 0.625/1M, 200 x 0.0625/1M, 100 x 5/1M.
    let flex = &raw[0];
    assert_eq!(flex["inputCost"], "0.0005");
    assert_eq!(flex["cachedInputCost"], "0.0000125");
    assert_eq!(flex["outputCost"], "0.0005");
    assert_eq!(flex["tierRates"], "\"flex\"");
    assert_eq!(raw[2]["tierRates"], "null");

    // The CSV carries the same.
    let csv = proxy.get("/queries?format=csv").await.text();
    let mut lines = csv.lines();
    let head: Vec<&str> = lines.next().unwrap().split(',').collect();
    let row: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| row[head.iter().position(|h| *h == name).unwrap()];
    assert_eq!(col("serviceTier"), "flex");
    assert_eq!(col("cost"), "0.0010125");
    assert_eq!(col("inputCost"), "0.0005");
    assert_eq!(col("cachedInputCost"), "0.0000125");
    assert_eq!(col("outputCost"), "0.0005");
    assert_eq!(col("tierRates"), "flex");
    assert_eq!(col("tierAdjustment"), "-0.0010125");

    // Grouped by tier: exact sums; records without a tier under null.
    let by_tier = proxy.get_json("/usage?group_by=tier").await;
    let rows = by_tier.as_array().unwrap();
    let text = proxy.get("/usage?group_by=tier").await.text();
    let raw_rows = raw_array(&text);
    let find = |t: &str| {
        let i = rows
            .iter()
            .position(|r| {
                r["serviceTier"] == json!(t) || (t == "null" && r["serviceTier"].is_null())
            })
            .unwrap_or_else(|| panic!("no row for {t}: {text}"));
        (&rows[i], &raw_rows[i])
    };
    let (flex_row, flex_raw) = find("flex");
    assert_eq!(flex_row["numQueries"], 4);
    assert_eq!(flex_raw["cost"], "0.00405");
    let (p, p_raw) = find("priority");
    assert_eq!(p["numQueries"], 1);
    assert_eq!(p_raw["cost"], "0.00405");
    let (d, d_raw) = find("default");
    assert_eq!(d["numQueries"], 1);
    assert_eq!(d_raw["cost"], "0.002025");
    let (n, n_raw) = find("null");
    assert_eq!(n["numQueries"], 2);
    assert_eq!(n_raw["cost"], "0.00405");
    assert_eq!(rows.len(), 4, "{text}");
    // 4 x 0.0010125 + 0.00405 + 3 x 0.002025
    assert_eq!(proxy.usage_raw("").await["cost"], "0.014175");
}

/// Tier rates are set through `POST /model/{name}`, shown in both units,
/// stored (a restart keeps them) and re-price the records they cover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_prices_are_set_shown_and_reprice() {
    let mock = tier_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let mut proxy = Proxy::builder(&mock.url()).db(&db).start().await;
    let r = proxy
        .set_price(
            "gpt-5",
            r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":1.25,"per1MAnswerTokens":10,"per1MCachedQueryTokens":0.125}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    ask(&proxy, "chat", json!("flex"), json!("flex")).await;
    proxy.wait_records(1).await;
    // No flex rates yet: standard prices.
    assert_eq!(proxy.queries_raw("").await[0]["cost"], "0.002025");
    let r = proxy
        .set_price(
            "gpt-5",
            r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":1.25,"per1MAnswerTokens":10,"per1MCachedQueryTokens":0.125,
                "per1MFlexQueryTokens":0.625,"per1MFlexAnswerTokens":5,"per1MFlexCachedQueryTokens":0.0625,
                "per1MPriorityQueryTokens":2.5,"per1MPriorityAnswerTokens":20}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let row = raw_object(&r.json()["costs"][0].to_string());
    assert_eq!(raw_object(&r.text())["repricedQueries"], "1");
    assert_eq!(row["per1MFlexQueryTokens"], "0.625");
    assert_eq!(row["per1KFlexQueryTokens"], "0.000625");
    assert_eq!(row["per1MFlexCachedQueryTokens"], "0.0625");
    assert_eq!(row["per1MFlexAnswerTokens"], "5");
    assert_eq!(row["per1MPriorityAnswerTokens"], "20");
    assert!(!row.contains_key("per1MPriorityCachedQueryTokens"));
    assert_eq!(proxy.queries_raw("").await[0]["cost"], "0.0010125");
    assert_eq!(proxy.usage_raw("").await["cost"], "0.0010125");
    // Priority without its own cached rate: cached tokens at its query rate.
    ask(&proxy, "chat", json!("priority"), json!("priority")).await;
    proxy.wait_records(2).await;
    // 1000 x 2.5/1M + 100 x 20/1M
    assert_eq!(proxy.queries_raw("").await[1]["cost"], "0.0045");

    proxy.stop().await;
    let proxy = Proxy::builder(&mock.url()).db(&db).start().await;
    let m = proxy.get("/model/gpt-5").await.text();
    assert!(m.contains(r#""per1MFlexQueryTokens":0.625"#), "{m}");
    let recs = proxy.queries_raw("").await;
    assert_eq!(recs[0]["serviceTier"], "\"flex\"");
    assert_eq!(recs[1]["serviceTier"], "\"priority\"");

    // Half a tier is refused, naming the missing field.
    let r = proxy
        .set_price(
            "gpt-5",
            r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":1,"per1MAnswerTokens":1,"per1MFlexQueryTokens":0.5}"#,
        )
        .await;
    assert_openai_error(
        &r,
        400,
        "invalid_request_error",
        Some("per1MFlexAnswerTokens"),
        None,
    );
    let r = proxy
        .set_price(
            "gpt-5",
            r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":1,"per1MAnswerTokens":1,"per1MPriorityCachedQueryTokens":0.5}"#,
        )
        .await;
    assert_openai_error(
        &r,
        400,
        "invalid_request_error",
        Some("per1MPriorityQueryTokens"),
        None,
    );
}

/// Chat usage with audio: prompt 1000 (600 audio), completion 500 (400 audio).
const AUDIO_USAGE: &str = r#"{"prompt_tokens":1000,"completion_tokens":500,"total_tokens":1500,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":600},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":400}}"#;

/// Audio tokens are priced at the model's audio rates and text tokens at
/// its text rates, in whole answers and streams, chat and Responses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_tokens_are_priced_at_audio_rates() {
    let mock = Mock::start(|seen| {
        let req = seen.json();
        let model = req["model"].as_str().unwrap_or("x").to_owned();
        if seen.path == "/v1/responses" {
            return Reply::json(format!(
                r#"{{"id":"resp_1","object":"response","status":"completed","model":"{model}","output":[],"usage":{{"input_tokens":1000,"input_tokens_details":{{"cached_tokens":0,"audio_tokens":600}},"output_tokens":500,"output_tokens_details":{{"reasoning_tokens":0,"audio_tokens":400}},"total_tokens":1500}}}}"#
            ));
        }
        if req["stream"] == json!(true) {
            return Reply::sse_events(vec![
                event(&format!(
                    r#"{{"id":"c1","object":"chat.completion.chunk","model":"{model}","choices":[{{"index":0,"delta":{{"audio":{{"id":"a1","transcript":"hi"}}}},"finish_reason":"stop"}}]}}"#
                )),
                event(&format!(
                    r#"{{"id":"c1","object":"chat.completion.chunk","model":"{model}","choices":[],"usage":{AUDIO_USAGE}}}"#
                )),
                done(),
            ]);
        }
        Reply::json(format!(
            r#"{{"id":"c1","object":"chat.completion","model":"{model}","choices":[{{"index":0,"message":{{"role":"assistant","content":null,"audio":{{"id":"a1","data":"AAAA","transcript":"hi"}}}},"finish_reason":"stop"}}],"usage":{AUDIO_USAGE}}}"#
        ))
    })
    .await;
    let proxy = Proxy::builder(&mock.url())
        .default_prices(true)
        .start()
        .await;
    let chat = |model: &str, stream: bool| {
        json!({"model": model, "stream": stream, "modalities": ["text", "audio"],
               "audio": {"voice": "alloy", "format": "pcm16"},
               "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
    };
    for stream in [false, true] {
        let r = proxy
            .chat("alice", &chat("gpt-4o-audio-preview", stream))
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let req = http::Request::post("/v1/responses")
        .header("content-type", "application/json")
        .header("x-user", "alice")
        .body(full(
            json!({"model": "gpt-4o-mini-audio-preview", "input": "hi"}).to_string(),
        ))
        .unwrap();
    assert_eq!(send(proxy.addr, req).await.status, 200);
    let recs = proxy.wait_records(3).await;
    let raw = proxy.queries_raw("").await;
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r["queryTokens"], 1000, "record {i}");
        assert_eq!(r["answerTokens"], 500, "record {i}");
        assert_eq!(r["audioQueryTokens"], 600, "record {i}");
        assert_eq!(r["audioAnswerTokens"], 400, "record {i}");
        assert_eq!(r["estimated"], false, "record {i}");
    }
    // gpt-4o-audio-preview: text 2.50 / 10, audio 40 / 80 per 1M:
    // 400 x 2.5/1M + 600 x 40/1M + 100 x 10/1M + 400 x 80/1M
    // = 0.001 + 0.024 + 0.001 + 0.032 = 0.058
    for i in [0, 1] {
        assert_eq!(raw[i]["cost"], "0.058", "record {i}");
        let parts = &raw[i];
        assert_eq!(parts["inputCost"], "0.001");
        assert_eq!(parts["audioInputCost"], "0.024");
        assert_eq!(parts["outputCost"], "0.001");
        assert_eq!(parts["audioOutputCost"], "0.032");
    }
    // gpt-4o-mini-audio-preview: text 0.15 / 0.60, audio 10 / 20 per 1M:
    // 0.00006 + 0.006 + 0.00006 + 0.008 = 0.01412
    assert_eq!(raw[2]["cost"], "0.01412");
    assert_eq!(proxy.usage_raw("").await["cost"], "0.13012");
    let csv = proxy.get("/queries?format=csv").await.text();
    let mut lines = csv.lines();
    let head: Vec<&str> = lines.next().unwrap().split(',').collect();
    let row: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| row[head.iter().position(|h| *h == name).unwrap()];
    assert_eq!(col("audioQueryTokens"), "600");
    assert_eq!(col("audioInputCost"), "0.024");
    assert_eq!(col("audioOutputCost"), "0.032");

    // Audio rates through the API, and a model without them: audio tokens
    // at the text rates.
    let r = proxy
        .set_price(
            "voice-x",
            r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":1,"per1MAnswerTokens":2,"per1MAudioQueryTokens":10,"per1MAudioAnswerTokens":20}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let row = raw_object(&r.json()["costs"][0].to_string());
    assert_eq!(row["per1MAudioQueryTokens"], "10");
    assert_eq!(row["per1KAudioAnswerTokens"], "0.02");
    proxy
        .set_price(
            "text-x",
            r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":1,"per1MAnswerTokens":2}"#,
        )
        .await;
    proxy.chat("bob", &chat("voice-x", false)).await;
    proxy.chat("bob", &chat("text-x", false)).await;
    proxy.wait_records(5).await;
    let raw = proxy.queries_raw("user=bob").await;
    // 400 x 1 + 600 x 10 + 100 x 2 + 400 x 20 (per 1M) = 0.0146
    assert_eq!(raw[0]["cost"], "0.0146");
    // 1000 x 1 + 500 x 2 (per 1M) = 0.002
    assert_eq!(raw[1]["cost"], "0.002");
}
