//! The proxy path: pass-through of answers and streams, the include_usage
//! splice, tool calls, header rules, and the record of a request.

mod common;

use bytes::Bytes;
use common::*;
use serde_json::{json, Value};

/// A non-streamed answer reaches the client byte for byte, and its record
/// carries every field: user, both models, tokens with the `*_details`
/// subsets, the exact cost under a price set through the API, status,
/// request id, and the request's start time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_streamed_answer_passes_through_and_is_recorded() {
    let release = Gate::new();
    let t = Tok {
        prompt: 3243,
        completion: 1399,
        cached: 1000,
        reasoning: 200,
    };
    let answer = completion("test-model-2024-08-06", "Hello, tests!", t);
    let (a, g) = (answer.clone(), release.clone());
    let mock = Mock::start(move |_| {
        Reply::json(a.clone())
            .header("x-request-id", "req_abc123")
            .head_after(g.clone())
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    let p = proxy
        .set_price(
            "test-model",
            r#"{"validFrom":"2020-01-01T00:00:00Z","per1KQueryTokens":0.01,"per1KAnswerTokens":0.03,"per1KCachedQueryTokens":0.005}"#,
        )
        .await;
    assert_eq!(p.status, 200, "{}", p.text());

    let before = now_ms();
    let addr = proxy.addr;
    let request = tokio::spawn(async move {
        send(addr, chat_req("alice", &chat_body("test-model", false))).await
    });
    let seen = mock.wait_seen(1).await;
    // The answer ends strictly after the request arrived upstream, so a
    // record stamped with the end time would fail the check below.
    clock_past(seen[0].at_ms).await;
    release.open();
    let r = within("answer", request).await.unwrap();

    assert_eq!(r.status, 200);
    assert_eq!(r.body, answer.as_bytes(), "answer bytes unchanged");
    assert_eq!(r.header("x-request-id").as_deref(), Some("req_abc123"));
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].path, "/v1/chat/completions");

    let recs = proxy.wait_records(1).await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    let rec = &recs[0];
    assert_eq!(rec["user"], "alice");
    assert_eq!(rec["requestedModel"], "test-model");
    assert_eq!(rec["model"], "test-model-2024-08-06");
    assert_eq!(rec["endpoint"], "/v1/chat/completions");
    assert_eq!(rec["queryTokens"], 3243);
    assert_eq!(rec["answerTokens"], 1399);
    assert_eq!(rec["cachedQueryTokens"], 1000);
    assert_eq!(rec["reasoningTokens"], 200);
    assert_eq!(rec["status"], 200);
    assert_eq!(rec["stream"], false);
    assert_eq!(rec["estimated"], false);
    assert_eq!(rec["priced"], true);
    assert_eq!(rec["requestId"], "req_abc123");
    let ts = ts_ms(&rec["timestamp"]);
    assert!(
        before <= ts && ts <= seen[0].at_ms,
        "timestamp {ts} must be the request start: in [{before}, {}]",
        seen[0].at_ms
    );
    let duration = rec["durationMs"].as_f64().unwrap();
    let ttfb = rec["ttfbMs"].as_f64().expect("ttfbMs set");
    assert!(ttfb >= 0.0 && duration >= ttfb, "{rec}");
    assert!(rec["id"].is_i64());

    // (3243-1000) x 0.01/1K + 1000 x 0.005/1K + 1399 x 0.03/1K = 0.0694
    let raw = proxy.queries_raw("").await;
    assert_eq!(raw[0]["cost"], "0.0694");
    let u = proxy.usage_raw("").await;
    assert_eq!(u["numQueries"], "1");
    assert_eq!(u["queryTokens"], "3243");
    assert_eq!(u["answerTokens"], "1399");
    assert_eq!(u["cachedQueryTokens"], "1000");
    assert_eq!(u["reasoningTokens"], "200");
    assert_eq!(u["cost"], "0.0694");
    assert_eq!(u["averageCostPerQuery"], "0.0694");
    assert_eq!(u["unpricedQueries"], "0");
}

/// The first event reaches the client while upstream is still holding the
/// rest back: the mock sends the remainder only after the test has read the
/// first event through the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_events_reach_the_client_before_upstream_finishes() {
    let gate = Gate::new();
    let g = gate.clone();
    let mock = Mock::start(move |seen| {
        let ev = chat_stream(
            seen,
            "gpt-4o-mini",
            &["Hello", " there", "!"],
            Tok::new(25, 3),
        );
        let mut steps = vec![Step::Send(ev[0].clone()), Step::Send(ev[1].clone())];
        steps.push(Step::Wait(g.clone()));
        steps.extend(ev[2..].iter().cloned().map(Step::Send));
        Reply::sse(steps)
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    let mut s = open(proxy.addr, chat_req("bob", &chat_body("gpt-4o-mini", true))).await;
    assert_eq!(s.status, 200);
    assert_eq!(
        s.headers.get("content-type").unwrap(),
        "text/event-stream",
        "content type passes through"
    );
    s.read_until("Hello").await;
    assert_eq!(
        mock.outcome(0),
        Outcome::Pending,
        "upstream has not sent the rest yet"
    );
    gate.open();
    let got = s.finish().await.expect("stream completes");
    let seen = mock.seen();
    let ev = chat_stream(
        &seen[0],
        "gpt-4o-mini",
        &["Hello", " there", "!"],
        Tok::new(25, 3),
    );
    let without_usage: Vec<Bytes> = ev
        .iter()
        .filter(|e| !contains(e, b"\"choices\":[]"))
        .cloned()
        .collect();
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&concat(&without_usage))
    );
    assert_eq!(mock.wait_outcome(0).await, Outcome::Completed);
    let rec = &proxy.wait_records(1).await[0];
    assert_eq!(rec["stream"], true);
    assert_eq!(rec["queryTokens"], 25);
    assert_eq!(rec["answerTokens"], 3);
    assert_eq!(rec["estimated"], false);
}

/// Sends a streaming chat request and returns (client bytes, upstream request, all upstream events).
async fn stream_through(body: &str) -> (Vec<u8>, Seen, Vec<Bytes>, Proxy, Mock) {
    let mock = Mock::start(|seen| {
        Reply::sse_events(chat_stream(
            seen,
            "gpt-4o-2024-08-06",
            &["Hi", "!"],
            Tok {
                prompt: 31,
                completion: 2,
                cached: 16,
                reasoning: 0,
            },
        ))
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    let s = open(proxy.addr, chat_req("carol", body)).await;
    assert_eq!(s.status, 200);
    let got = s.finish().await.expect("stream completes");
    let seen = mock.seen().remove(0);
    let ev = chat_stream(
        &seen,
        "gpt-4o-2024-08-06",
        &["Hi", "!"],
        Tok {
            prompt: 31,
            completion: 2,
            cached: 16,
            reasoning: 0,
        },
    );
    (got, seen, ev, proxy, mock)
}

/// include_usage is merged into the client's stream_options (keeping its
/// other members), the rest of the body is untouched, the client does not
/// get the usage-only chunk, and the record has upstream's usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn include_usage_is_spliced_into_existing_stream_options_and_the_usage_chunk_stripped() {
    let messages = r#"[ {"role":"user" , "content":"Spaces  and \u00e9scapes \"kept\""} ]"#;
    let body = format!(
        r#"{{"model":"gpt-4o","messages":{messages},"stream":true,"stream_options":{{"include_obfuscation":false}},"temperature":0.2}}"#
    );
    let (got, seen, ev, proxy, _mock) = stream_through(&body).await;

    let mut expected: Value = serde_json::from_str(&body).unwrap();
    expected["stream_options"] = json!({"include_obfuscation": false, "include_usage": true});
    assert_eq!(
        seen.json(),
        expected,
        "upstream body = client body + include_usage"
    );
    assert!(
        contains(&seen.body, format!("\"messages\":{messages}").as_bytes()),
        "other members forwarded byte for byte: {}",
        String::from_utf8_lossy(&seen.body)
    );
    assert_eq!(
        seen.header("content-length"),
        Some(seen.body.len().to_string()),
        "content-length matches the spliced body"
    );

    assert!(
        ev.iter().any(|e| contains(e, b"\"choices\":[]")),
        "mock sent usage"
    );
    assert!(!contains(&got, b"\"choices\":[]"), "usage chunk stripped");
    let without_usage: Vec<Bytes> = ev
        .iter()
        .filter(|e| !contains(e, b"\"choices\":[]"))
        .cloned()
        .collect();
    assert_eq!(
        got,
        concat(&without_usage),
        "everything else byte-identical"
    );
    assert!(got.ends_with(b"data: [DONE]\n\n"));

    let rec = &proxy.wait_records(1).await[0];
    assert_eq!(rec["queryTokens"], 31);
    assert_eq!(rec["answerTokens"], 2);
    assert_eq!(rec["cachedQueryTokens"], 16);
    assert_eq!(rec["estimated"], false);
    assert_eq!(rec["model"], "gpt-4o-2024-08-06");
    assert_eq!(rec["requestedModel"], "gpt-4o");
    assert_eq!(rec["stream"], true);
}

/// Every shape of a request that did not ask for usage gets it upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn include_usage_is_added_whatever_stream_options_holds() {
    let cases = [
        (
            r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"a"}]}"#,
            json!({"include_usage": true}),
        ),
        (
            r#"{"model":"gpt-4o","stream":true,"stream_options":null,"messages":[{"role":"user","content":"a"}]}"#,
            json!({"include_usage": true}),
        ),
        (
            r#"{"model":"gpt-4o","stream":true,"stream_options":{},"messages":[{"role":"user","content":"a"}]}"#,
            json!({"include_usage": true}),
        ),
        (
            r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":false,"x":1},"messages":[{"role":"user","content":"a"}]}"#,
            json!({"include_usage": true, "x": 1}),
        ),
    ];
    for (body, options) in cases {
        let (got, seen, ev, proxy, _mock) = stream_through(body).await;
        let mut expected: Value = serde_json::from_str(body).unwrap();
        expected["stream_options"] = options;
        assert_eq!(seen.json(), expected, "body {body}");
        assert!(!contains(&got, b"\"choices\":[]"), "body {body}");
        assert_eq!(got.len(), concat(&ev).len() - ev[ev.len() - 2].len());
        let rec = &proxy.wait_records(1).await[0];
        assert_eq!(rec["estimated"], false, "body {body}");
        assert_eq!(rec["queryTokens"], 31, "body {body}");
    }
}

/// A client that asked for usage itself gets the stream untouched, usage
/// chunk included, and its body reaches upstream unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_asking_for_usage_gets_the_stream_byte_for_byte() {
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#;
    let (got, seen, ev, proxy, _mock) = stream_through(body).await;
    assert_eq!(seen.body, body.as_bytes(), "request forwarded unchanged");
    assert!(contains(&got, b"\"choices\":[]"), "usage chunk kept");
    assert_eq!(got, concat(&ev), "stream byte-identical");
    let rec = &proxy.wait_records(1).await[0];
    assert_eq!(rec["queryTokens"], 31);
    assert_eq!(rec["estimated"], false);
}

/// Requests that do not stream are never spliced, even with stream_options.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_streaming_requests_are_never_spliced() {
    let mock = Mock::start(|_| Reply::json(completion("gpt-4o", "ok", Tok::new(9, 1)))).await;
    let proxy = Proxy::start(&mock.url()).await;
    let bodies = [
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"stream":false}"#,
        r#"{"model":"gpt-4o","stream":false,"stream_options":{"include_obfuscation":true},"messages":[]}"#,
        r#"{"model":"gpt-4o","stream":"true","messages":[]}"#,
    ];
    for b in bodies {
        let r = proxy.chat("dave", b).await;
        assert_eq!(r.status, 200);
    }
    let seen = mock.seen();
    for (s, b) in seen.iter().zip(bodies) {
        assert_eq!(s.body, b.as_bytes());
    }
    let recs = proxy.wait_records(4).await;
    assert!(recs
        .iter()
        .all(|r| r["stream"] == false && r["queryTokens"] == 9));
}

/// Events split anywhere across chunks and separated by CRLF are stripped
/// correctly too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_chunk_is_stripped_across_arbitrary_chunk_splits_and_crlf() {
    let mock = Mock::start(|seen| {
        let ev = chat_stream(seen, "gpt-4o", &["one", "two", "three"], Tok::new(40, 3));
        let crlf: Vec<u8> = String::from_utf8(concat(&ev))
            .unwrap()
            .replace("\n\n", "\r\n\r\n")
            .into_bytes();
        let steps = crlf
            .chunks(7)
            .map(|c| Step::send(Bytes::copy_from_slice(c)))
            .collect();
        Reply::sse(steps)
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    let got = open(proxy.addr, chat_req("erin", &chat_body("gpt-4o", true)))
        .await
        .finish()
        .await
        .expect("stream completes");
    let seen = mock.seen().remove(0);
    let ev = chat_stream(&seen, "gpt-4o", &["one", "two", "three"], Tok::new(40, 3));
    let expected: String = ev
        .iter()
        .filter(|e| !contains(e, b"\"choices\":[]"))
        .map(|e| String::from_utf8_lossy(e).replace("\n\n", "\r\n\r\n"))
        .collect();
    assert_eq!(String::from_utf8_lossy(&got), expected);
    let rec = &proxy.wait_records(1).await[0];
    assert_eq!(rec["queryTokens"], 40);
    assert_eq!(rec["answerTokens"], 3);
    assert_eq!(rec["estimated"], false);
}

const TOOLS_BODY: &str = r#"{
  "model" : "gpt-4.1",
  "messages": [
    {"role": "developer", "content": "Use tools when useful."},
    {"role": "user", "name": "ann", "content": [
        {"type": "text", "text": "What's the weather in Z\u00fcrich? \ud83c\udf26"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}}
    ]},
    {"role": "assistant", "content": null, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Zürich\"}"}}
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 7.5}"}
  ],
  "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather by city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": false},
     "strict": true}}],
  "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
  "parallel_tool_calls": false,
  "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}},
  "max_completion_tokens": 300,
  "a_field_from_the_future": {"nested": [1, 2.50, -0.0, 1e3, true, null, "x"]}
}"#;

/// Tools, tool_choice, tool-role messages, content-part arrays and unknown
/// fields reach upstream byte for byte; a tool-call answer comes back unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_pass_through_byte_for_byte() {
    let answer = r#"{"id":"chatcmpl-t1","object":"chat.completion","created":1700000000,"model":"gpt-4.1-2025-04-14","choices":[{"index":0,"message":{"role":"assistant","content":null,"tool_calls":[{"id":"call_2","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Z\\u00fcrich\"}"}}],"refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":120,"completion_tokens":18,"total_tokens":138,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}},"service_tier":"default"}"#;
    let mock = Mock::start(move |_| Reply::json(answer)).await;
    let proxy = Proxy::start(&mock.url()).await;
    let r = proxy.chat("frank", TOOLS_BODY).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, answer.as_bytes(), "tool-call answer unchanged");
    let seen = mock.seen();
    assert_eq!(
        String::from_utf8_lossy(&seen[0].body),
        TOOLS_BODY,
        "request forwarded byte for byte"
    );
    let rec = &proxy.wait_records(1).await[0];
    assert_eq!(rec["model"], "gpt-4.1-2025-04-14");
    assert_eq!(rec["requestedModel"], "gpt-4.1");
    assert_eq!(rec["queryTokens"], 120);
    assert_eq!(rec["answerTokens"], 18);
}

/// A streamed tool call: the request (spliced for usage) keeps every other
/// byte, and the tool-call deltas reach the client unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_tool_calls_pass_through() {
    let model = "gpt-4.1-2025-04-14";
    let deltas = [
        r#"{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_9","type":"function","function":{"name":"get_weather","arguments":""}}],"refusal":null}"#,
        r#"{"tool_calls":[{"index":0,"function":{"arguments":"{\"ci"}}]}"#,
        r#"{"tool_calls":[{"index":0,"function":{"arguments":"ty\":\"Z\u00fcrich\"}"}}]}"#,
    ];
    let mock = Mock::start(move |seen| {
        let mut ev: Vec<Bytes> = deltas
            .iter()
            .map(|d| chunk_with(model, d, None, seen.wants_usage()))
            .collect();
        ev.push(chunk_with(
            model,
            "{}",
            Some("tool_calls"),
            seen.wants_usage(),
        ));
        if seen.wants_usage() {
            ev.push(usage_chunk(model, Tok::new(130, 21)));
        }
        ev.push(done());
        Reply::sse_events(ev)
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    let body = TOOLS_BODY.replacen(
        "\"model\" : \"gpt-4.1\",",
        "\"model\" : \"gpt-4.1\", \"stream\": true,",
        1,
    );
    let got = open(proxy.addr, chat_req("frank", &body))
        .await
        .finish()
        .await
        .expect("stream completes");
    let seen = mock.seen().remove(0);
    let mut expected: Value = serde_json::from_str(&body).unwrap();
    expected["stream_options"] = json!({"include_usage": true});
    assert_eq!(seen.json(), expected);
    let tools_at = body.find("\"tools\"").unwrap();
    assert!(
        contains(&seen.body, &body.as_bytes()[tools_at..]),
        "tools, tool_choice and later fields forwarded byte for byte"
    );
    let mut want: Vec<Bytes> = deltas
        .iter()
        .map(|d| chunk_with(model, d, None, true))
        .collect();
    want.push(chunk_with(model, "{}", Some("tool_calls"), true));
    want.push(done());
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&concat(&want))
    );
    let rec = &proxy.wait_records(1).await[0];
    assert_eq!(rec["queryTokens"], 130);
    assert_eq!(rec["answerTokens"], 21);
    assert_eq!(rec["estimated"], false);
}

/// Answer headers that describe the mock's connection or set cookies.
fn noisy(reply: Reply) -> Reply {
    reply
        .header("set-cookie", "__cf_bm=abc; path=/; HttpOnly")
        .header("set-cookie", "_cfuvid=def; path=/")
        .header("keep-alive", "timeout=5")
        .header("connection", "x-upstream-hop")
        .header("x-upstream-hop", "1")
        .header("proxy-authenticate", "Basic realm=\"up\"")
        .header("x-request-id", "req_headers")
        .header("openai-processing-ms", "42")
        .header("openai-version", "2020-10-01")
        .header("x-ratelimit-limit-requests", "500")
        .header("x-ratelimit-remaining-requests", "499")
        .header("x-ratelimit-reset-requests", "120ms")
        .header("x-ratelimit-limit-tokens", "30000")
        .header("x-ratelimit-remaining-tokens", "29000")
        .header("x-ratelimit-reset-tokens", "2s")
}

fn header_rich_request(body: &str) -> http::Request<ReqBody> {
    http::Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-client")
        .header("x-user", "gina")
        .header("connection", "keep-alive, x-client-hop")
        .header("x-client-hop", "1")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("openai-organization", "org-tollgate")
        .header("openai-project", "proj_123")
        .header("openai-beta", "assistants=v2")
        .header("x-custom-thing", "kept")
        .header("accept-encoding", "gzip, br")
        .body(full(body.to_owned()))
        .unwrap()
}

/// The configured key replaces the client's Authorization; hop-by-hop
/// headers and x-user stay behind; OpenAI and custom headers pass; upstream's
/// cookies and hop-by-hop headers do not reach the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_rules_with_a_configured_key() {
    let mock =
        Mock::start(|_| noisy(Reply::json(completion("gpt-4o", "hi", Tok::new(5, 1))))).await;
    let proxy = Proxy::builder(&mock.url())
        .token("sk-upstream-secret")
        .start()
        .await;
    let body = chat_body("gpt-4o", false);
    let r = send(proxy.addr, header_rich_request(&body)).await;
    assert_eq!(r.status, 200);

    let seen = mock.seen().remove(0);
    assert_eq!(
        seen.header("authorization").as_deref(),
        Some("Bearer sk-upstream-secret")
    );
    assert_eq!(seen.header_count("authorization"), 1);
    for h in [
        "x-user",
        "connection",
        "keep-alive",
        "x-client-hop",
        "te",
        "proxy-authorization",
    ] {
        assert_eq!(seen.header(h), None, "{h} must not be forwarded");
    }
    assert_eq!(
        seen.header("openai-organization").as_deref(),
        Some("org-tollgate")
    );
    assert_eq!(seen.header("openai-project").as_deref(), Some("proj_123"));
    assert_eq!(seen.header("openai-beta").as_deref(), Some("assistants=v2"));
    assert_eq!(seen.header("x-custom-thing").as_deref(), Some("kept"));
    assert_eq!(
        seen.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(
        seen.header("accept-encoding").as_deref(),
        Some("identity"),
        "usage must be readable"
    );
    assert_eq!(seen.header("host"), Some(mock.addr.to_string()));
    assert_eq!(seen.header("content-length"), Some(body.len().to_string()));

    for h in [
        "set-cookie",
        "keep-alive",
        "x-upstream-hop",
        "proxy-authenticate",
        "connection",
    ] {
        assert_eq!(r.header(h), None, "{h} must not reach the client");
    }
    assert_eq!(r.header("x-request-id").as_deref(), Some("req_headers"));
    assert_eq!(r.header("openai-processing-ms").as_deref(), Some("42"));
    assert_eq!(r.header("openai-version").as_deref(), Some("2020-10-01"));
    for (h, v) in [
        ("x-ratelimit-limit-requests", "500"),
        ("x-ratelimit-remaining-requests", "499"),
        ("x-ratelimit-reset-requests", "120ms"),
        ("x-ratelimit-limit-tokens", "30000"),
        ("x-ratelimit-remaining-tokens", "29000"),
        ("x-ratelimit-reset-tokens", "2s"),
    ] {
        assert_eq!(r.header(h).as_deref(), Some(v), "{h}");
    }
    assert!(!r.text().contains("sk-upstream-secret"));
}

/// Without a configured key the client's own Authorization is forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_authorization_passes_without_a_configured_key() {
    let mock =
        Mock::start(|_| noisy(Reply::json(completion("llama3", "hi", Tok::new(5, 1))))).await;
    let proxy = Proxy::start(&mock.url()).await;
    let r = send(proxy.addr, header_rich_request(&chat_body("llama3", false))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("set-cookie"), None);
    let seen = mock.seen().remove(0);
    assert_eq!(
        seen.header("authorization").as_deref(),
        Some("Bearer sk-client")
    );
    assert_eq!(seen.header("x-user"), None);
    assert_eq!(
        seen.header("openai-organization").as_deref(),
        Some("org-tollgate")
    );
}

/// Streaming passthrough and the usage strip over HTTP/2, headers included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_over_http2() {
    let gate = Gate::new();
    let g = gate.clone();
    let mock = Mock::start(move |seen| {
        let ev = chat_stream(seen, "gpt-4o", &["h2", " works"], Tok::new(12, 2));
        let mut steps = vec![
            Step::Send(ev[0].clone()),
            Step::Send(ev[1].clone()),
            Step::Wait(g.clone()),
        ];
        steps.extend(ev[2..].iter().cloned().map(Step::Send));
        noisy(Reply::sse(steps))
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    let mut s = open_with(
        proxy.addr,
        Proto::H2,
        chat_req("hank", &chat_body("gpt-4o", true)),
    )
    .await;
    assert_eq!(s.status, 200);
    assert!(s.headers.get("set-cookie").is_none());
    assert!(s.headers.get("keep-alive").is_none());
    assert_eq!(s.headers.get("x-request-id").unwrap(), "req_headers");
    s.read_until("h2").await;
    assert_eq!(mock.outcome(0), Outcome::Pending);
    gate.open();
    let got = s.finish().await.expect("h2 stream completes");
    let seen = mock.seen().remove(0);
    assert_eq!(seen.header("x-user"), None);
    let ev = chat_stream(&seen, "gpt-4o", &["h2", " works"], Tok::new(12, 2));
    let want: Vec<Bytes> = ev
        .into_iter()
        .filter(|e| !contains(e, b"\"choices\":[]"))
        .collect();
    assert_eq!(got, concat(&want));
    let rec = &proxy.wait_records(1).await[0];
    assert_eq!(rec["user"], "hank");
    assert_eq!(rec["queryTokens"], 12);
    assert_eq!(rec["estimated"], false);
}

/// A non-streamed request over HTTP/2 is proxied and recorded like over HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_streamed_over_http2() {
    let answer = completion("gpt-4o", "hello over h2", Tok::new(11, 4));
    let a = answer.clone();
    let mock = Mock::start(move |_| Reply::json(a.clone())).await;
    let proxy = Proxy::start(&mock.url()).await;
    let body = chat_body("gpt-4o", false);
    let r = send_h2(proxy.addr, chat_req("ivy", &body)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, answer.as_bytes());
    assert_eq!(mock.seen()[0].body, body.as_bytes());
    let rec = &proxy.wait_records(1).await[0];
    assert_eq!(rec["user"], "ivy");
    assert_eq!(rec["answerTokens"], 4);
}
