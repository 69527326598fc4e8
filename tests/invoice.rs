//! Accounting that matches the invoice, part two: image generations priced
//! per image token kind or per image (dall-e's price rules), built-in tool
//! calls of the Responses API priced per call, transcriptions priced by
//! tokens or by the minute and speech by characters or estimated tokens;
//! each in whole answers and streams, with the exact cost of every part
//! and `/usage` totals that are the exact sums.

mod common;

use common::*;
use serde_json::{json, Value};

const IMAGE_USAGE: &str = r#"{"total_tokens":4210,"input_tokens":50,"input_tokens_details":{"text_tokens":40,"image_tokens":10},"output_tokens":4160}"#;

fn audio_reply(bytes: &'static [u8]) -> Reply {
    Reply {
        headers: vec![("content-type".into(), "audio/mpeg".into())],
        ..Reply::json(bytes)
    }
}

fn sse(name: &str, data: &str) -> bytes::Bytes {
    bytes::Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// A Responses object of `model` with these output items, 1000 input and
/// 100 output tokens.
fn response(model: &str, items: &[&str]) -> String {
    format!(
        r#"{{"id":"resp_1","object":"response","created_at":1700000000,"status":"completed","model":"{model}","output":[{}],"tools":[{{"type":"web_search"}},{{"type":"code_interpreter","container":{{"type":"auto"}}}}],"usage":{{"input_tokens":1000,"input_tokens_details":{{"cached_tokens":0}},"output_tokens":100,"output_tokens_details":{{"reasoning_tokens":0}},"total_tokens":1100}}}}"#,
        items.join(",")
    )
}

const WEB: &str = r#"{"type": "web_search_call", "id": "ws_1", "status": "completed", "action": {"type": "search", "query": "\"type\": \"web_search_call\""}}"#;
const FILE: &str =
    r#"{"type":"file_search_call","id":"fs_1","status":"completed","queries":["q"]}"#;
const CODE_A1: &str = r#"{"type":"code_interpreter_call","id":"ci_1","status":"completed","container_id":"cntr_a","code":"1+1"}"#;
const CODE_A2: &str = r#"{"type":"code_interpreter_call","id":"ci_2","status":"completed","container_id":"cntr_a","code":"2+2"}"#;
const MESSAGE: &str = r#"{"type":"message","id":"msg_1","status":"completed","role":"assistant","content":[{"type":"output_text","text":"done","annotations":[]}]}"#;

fn image_call(result_len: usize) -> String {
    format!(
        r#"{{"type":"image_generation_call","id":"ig_1","status":"completed","result":"{}"}}"#,
        "A".repeat(result_len)
    )
}

async fn invoice_mock() -> Mock {
    Mock::start(|seen| {
        let path = seen.path.as_str();
        if path.starts_with("/v1/audio/transcriptions") || path.starts_with("/v1/audio/translations") {
            let body = String::from_utf8_lossy(&seen.body).into_owned();
            return if body.contains("whisper-1") {
                Reply::json(r#"{"text":"hello","usage":{"type":"duration","seconds":37}}"#)
            } else if body.contains("gpt-4o-mini-transcribe") {
                Reply::sse_events(vec![
                    sse("transcript.text.delta", r#"{"type":"transcript.text.delta","delta":"hel"}"#),
                    sse("transcript.text.done", r#"{"type":"transcript.text.done","text":"hello","usage":{"type":"tokens","input_tokens":60,"input_token_details":{"text_tokens":0,"audio_tokens":60},"output_tokens":10,"total_tokens":70}}"#),
                ])
            } else {
                Reply::json(r#"{"text":"hello","usage":{"type":"tokens","input_tokens":120,"input_token_details":{"text_tokens":20,"audio_tokens":100},"output_tokens":50,"total_tokens":170}}"#)
            };
        }
        if path.starts_with("/v1/audio/speech") {
            return audio_reply(b"ID3\x04\x00fake mp3 frames");
        }
        let req = seen.json();
        let model = req["model"].as_str().unwrap_or("").to_owned();
        match req["x_case"].as_str().unwrap_or("") {
            "image" => Reply::json(format!(
                r#"{{"created":1700000000,"data":[{{"b64_json":"AAAA"}}],"usage":{IMAGE_USAGE}}}"#
            )),
            "image_stream" => Reply::sse_events(vec![
                sse("image_generation.partial_image", r#"{"type":"image_generation.partial_image","b64_json":"AA","partial_image_index":0}"#),
                sse("image_generation.completed", &format!(
                    r#"{{"type":"image_generation.completed","b64_json":"AAAA","usage":{IMAGE_USAGE}}}"#
                )),
            ]),
            // dall-e: no usage, one URL per image.
            "per_image" => {
                let n = req["n"].as_u64().unwrap_or(1) as usize;
                let urls = vec![r#"{"url":"https://example.invalid/i.png"}"#; n].join(",");
                Reply::json(format!(r#"{{"created":1700000000,"data":[{urls}]}}"#))
            }
            "tools" => Reply::json(response(
                "gpt-4o-2024-08-06",
                &[WEB, WEB, FILE, MESSAGE],
            )),
            // Generated images far larger than the windows usage is read
            // from, with a call between them: in neither window.
            "tools_big" => {
                let img = image_call(3 << 20);
                Reply::json(response("gpt-5", &[&img, WEB, &img, MESSAGE]))
            }
            "tools_stream" => {
                let img = image_call(16);
                let items = [WEB, CODE_A1, CODE_A2, img.as_str(), MESSAGE];
                let mut events = vec![sse(
                    "response.created",
                    &format!(r#"{{"type":"response.created","response":{}}}"#, response(&model, &[])),
                )];
                for (i, it) in items.iter().enumerate() {
                    events.push(sse(
                        "response.output_item.added",
                        &format!(r#"{{"type":"response.output_item.added","output_index":{i},"item":{it}}}"#),
                    ));
                    events.push(sse(
                        "response.output_item.done",
                        &format!(r#"{{"type":"response.output_item.done","output_index":{i},"item":{it}}}"#),
                    ));
                }
                events.push(sse(
                    "response.completed",
                    &format!(r#"{{"type":"response.completed","response":{}}}"#, response(&model, &items)),
                ));
                Reply::sse_events(events)
            }
            other => panic!("unknown case {other:?}"),
        }
    })
    .await
}

fn post(path: &str, user: &str, body: Value) -> http::Request<ReqBody> {
    http::Request::post(path)
        .header("content-type", "application/json")
        .header("x-user", user)
        .body(full(body.to_string()))
        .unwrap()
}

fn transcription(path: &str, model: &str, stream: bool) -> http::Request<ReqBody> {
    let mut b =
        format!("--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n");
    if stream {
        b.push_str("--XyZ\r\nContent-Disposition: form-data; name=\"stream\"\r\n\r\ntrue\r\n");
    }
    b.push_str("--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.ogg\"\r\nContent-Type: audio/ogg\r\n\r\nOggS-fake-audio\r\n--XyZ--\r\n");
    http::Request::post(path)
        .header("content-type", "multipart/form-data; boundary=XyZ")
        .header("x-user", "ann")
        .body(full(b))
        .unwrap()
}

fn pico(s: &str) -> i64 {
    tollgate::pricing::parse_scaled(s.trim_matches('"'), 12).unwrap()
}

const PARTS: [&str; 8] = [
    "inputCost",
    "cachedInputCost",
    "outputCost",
    "audioInputCost",
    "audioOutputCost",
    "imageInputCost",
    "imageOutputCost",
    "toolCost",
];

/// One case: the request, then what its record must show: (field, raw
/// JSON text) pairs, the cost parts included.
struct Case {
    what: &'static str,
    req: http::Request<ReqBody>,
    expect: Vec<(&'static str, &'static str)>,
}

fn cases() -> Vec<Case> {
    let img = |case: &str, stream: bool| {
        post(
            "/v1/images/generations",
            "ann",
            json!({"model": "gpt-image-1", "prompt": "a cat", "x_case": case, "stream": stream}),
        )
    };
    let per_image = |model: &str, extra: Value| {
        let mut b = json!({"model": model, "prompt": "a cat", "x_case": "per_image"});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        post("/v1/images/generations", "ann", b)
    };
    let resp = |model: &str, case: &str, stream: bool| {
        post(
            "/v1/responses",
            "ann",
            json!({"model": model, "input": "find it", "tools": [{"type": "web_search"}], "x_case": case, "stream": stream}),
        )
    };
    // gpt-image-1: text in $5, image in $10, image out $40 per 1M tokens.
    let image_parts = vec![
        ("queryTokens", "50"),
        ("answerTokens", "4160"),
        ("imageQueryTokens", "10"),
        ("imageAnswerTokens", "4160"),
        ("inputCost", "0.0002"),
        ("imageInputCost", "0.0001"),
        ("imageOutputCost", "0.1664"),
        ("outputCost", "0"),
        ("cost", "0.1667"),
        ("units", r#""""#),
    ];
    vec![
        Case {
            what: "gpt-image-1 JSON",
            req: img("image", false),
            expect: image_parts.clone(),
        },
        Case {
            what: "gpt-image-1 stream",
            req: img("image_stream", true),
            expect: image_parts,
        },
        // dall-e-3 hd 1024x1792: $0.12 an image.
        Case {
            what: "dall-e-3 hd tall x2",
            req: per_image(
                "dall-e-3",
                json!({"n": 2, "size": "1024x1792", "quality": "hd"}),
            ),
            expect: vec![
                ("queryTokens", "0"),
                ("imageOutputCost", "0.24"),
                ("cost", "0.24"),
                ("units", r#""images=2 size=1024x1792 quality=hd""#),
            ],
        },
        // The defaults: 1024x1024 standard, $0.04.
        Case {
            what: "dall-e-3 defaults",
            req: per_image("dall-e-3", json!({})),
            expect: vec![
                ("imageOutputCost", "0.04"),
                ("cost", "0.04"),
                ("units", r#""images=1""#),
            ],
        },
        // dall-e-2's rules name no quality: $0.016 an image at 256x256.
        Case {
            what: "dall-e-2 small x3",
            req: per_image("dall-e-2", json!({"n": 3, "size": "256x256"})),
            expect: vec![
                ("imageOutputCost", "0.048"),
                ("cost", "0.048"),
                ("units", r#""images=3 size=256x256""#),
            ],
        },
        // gpt-4o (a dated snapshot answered): 1000 x $2.50 + 100 x $10 per
        // 1M, two web searches at gpt-4o's $25/1K, one file search at $2.50/1K.
        Case {
            what: "Responses JSON with web and file search",
            req: resp("gpt-4o", "tools", false),
            expect: vec![
                ("inputCost", "0.0025"),
                ("outputCost", "0.001"),
                ("toolCost", "0.0525"),
                ("cost", "0.056"),
                ("units", r#""web_search_call=2 file_search_call=1""#),
            ],
        },
        // gpt-5: 1000 x $1.25 + 100 x $10 per 1M; one web search at the
        // generic $10/1K, two image generation calls at $0.042, the search
        // and the second image 3 MiB into the answer.
        Case {
            what: "Responses JSON, calls between large images",
            req: resp("gpt-5", "tools_big", false),
            expect: vec![
                ("inputCost", "0.00125"),
                ("outputCost", "0.001"),
                ("toolCost", "0.094"),
                ("cost", "0.09625"),
                ("units", r#""web_search_call=1 image_generation_call=2""#),
            ],
        },
        // Streamed: one web search ($0.01), two code interpreter calls in
        // one container ($0.03), one image generation ($0.042); each item
        // is in its own event and again in response.completed.
        Case {
            what: "Responses stream with tools",
            req: resp("gpt-5", "tools_stream", true),
            expect: vec![
                ("inputCost", "0.00125"),
                ("outputCost", "0.001"),
                ("toolCost", "0.082"),
                ("cost", "0.08425"),
                (
                    "units",
                    r#""web_search_call=1 code_interpreter_call=1 image_generation_call=1""#,
                ),
            ],
        },
        // whisper-1: $0.006 a minute, 37 s.
        Case {
            what: "whisper-1 transcription (duration)",
            req: transcription("/v1/audio/transcriptions", "whisper-1", false),
            expect: vec![
                ("queryTokens", "0"),
                ("audioInputCost", "0.0037"),
                ("cost", "0.0037"),
                ("units", r#""seconds=37""#),
            ],
        },
        // gpt-4o-transcribe: 20 text x $2.50 + 100 audio x $6 + 50 out x $10 per 1M.
        Case {
            what: "gpt-4o-transcribe translation (tokens)",
            req: transcription("/v1/audio/translations", "gpt-4o-transcribe", false),
            expect: vec![
                ("queryTokens", "120"),
                ("audioQueryTokens", "100"),
                ("answerTokens", "50"),
                ("inputCost", "0.00005"),
                ("audioInputCost", "0.0006"),
                ("outputCost", "0.0005"),
                ("cost", "0.00115"),
            ],
        },
        // gpt-4o-mini-transcribe streamed: 60 audio x $3 + 10 out x $5 per 1M.
        Case {
            what: "gpt-4o-mini-transcribe stream (tokens)",
            req: transcription("/v1/audio/transcriptions", "gpt-4o-mini-transcribe", true),
            expect: vec![
                ("queryTokens", "60"),
                ("audioQueryTokens", "60"),
                ("answerTokens", "10"),
                ("audioInputCost", "0.00018"),
                ("outputCost", "0.00005"),
                ("cost", "0.00023"),
            ],
        },
        // tts-1: $15 per 1M characters; "Hello, wörld!" is 13.
        Case {
            what: "tts-1 speech (characters)",
            req: post(
                "/v1/audio/speech",
                "ann",
                json!({"model": "tts-1", "input": "Hello, wörld!", "voice": "alloy"}),
            ),
            expect: vec![
                ("queryTokens", "0"),
                ("inputCost", "0.000195"),
                ("cost", "0.000195"),
                ("estimated", "false"),
                ("units", r#""characters=13""#),
            ],
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_tools_transcriptions_and_speech_are_priced_per_part() {
    let mock = invoice_mock().await;
    let proxy = Proxy::builder(&mock.url())
        .default_prices(true)
        .start()
        .await;
    let cases = cases();
    let n = cases.len();
    let mut expected = Vec::new();
    for c in cases {
        let r = send(proxy.addr, c.req).await;
        assert_eq!(r.status, 200, "{}: {}", c.what, r.text());
        expected.push((c.what, c.expect));
    }
    // Token-priced speech: the input's tokens, estimated.
    let r = send(
        proxy.addr,
        post(
            "/v1/audio/speech",
            "bob",
            json!({"model": "gpt-4o-mini-tts", "input": "Hello there, how are you today?", "voice": "alloy"}),
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    proxy.wait_records(n + 1).await;
    let raw = proxy.queries_raw("").await;
    assert_eq!(raw.len(), n + 1);
    let mut total: i64 = 0;
    for (i, (what, expect)) in expected.iter().enumerate() {
        let rec = &raw[i];
        for (field, want) in expect {
            assert_eq!(rec[*field], *want, "{what}: {field} in {rec:?}");
        }
        assert_eq!(rec["priced"], "true", "{what}");
        let sum: i64 = PARTS.iter().map(|p| pico(&rec[*p])).sum();
        assert_eq!(
            sum,
            pico(&rec["cost"]),
            "{what}: the parts add up to the cost"
        );
        total += pico(&rec["cost"]);
    }
    let tts = &raw[n];
    assert_eq!(tts["estimated"], "true", "{tts:?}");
    let q: i64 = tts["queryTokens"].parse().unwrap();
    assert!((5..=12).contains(&q), "{tts:?}");
    // $0.60 per 1M input tokens: 600,000 pico-dollars each.
    assert_eq!(pico(&tts["cost"]), q * 600_000, "{tts:?}");
    assert_eq!(pico(&tts["inputCost"]), q * 600_000, "{tts:?}");

    // /usage: the exact sum, per user too.
    let usage = proxy.usage_raw("").await;
    assert_eq!(pico(&usage["cost"]), total + q * 600_000);
    assert_eq!(usage["numQueries"], (n + 1).to_string());
    let ann = proxy.usage_raw("user=ann").await;
    assert_eq!(pico(&ann["cost"]), total);
    // Known figure: the cases above add up to $0.903175.
    assert_eq!(total, pico("0.903175"));

    // The CSV shows the same parts and units.
    let csv = proxy.get("/queries?format=csv").await.text();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let dalle = csv.lines().nth(3).unwrap();
    assert!(
        dalle.ends_with(",0,0,0,0.24,0,images=2 size=1024x1792 quality=hd,,"),
        "{dalle}"
    );
    assert!(col("upstream") < col("imageQueryTokens"));
    assert!(col("imageQueryTokens") < col("units"));
}

/// A price change re-prices records keeping their per-unit parts: a new
/// gpt-5 row changes the tokens' cost, the tool calls stay priced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repricing_keeps_tool_calls() {
    let mock = invoice_mock().await;
    let proxy = Proxy::builder(&mock.url())
        .default_prices(true)
        .start()
        .await;
    let r = send(
        proxy.addr,
        post(
            "/v1/responses",
            "ann",
            json!({"model": "gpt-5", "input": "x", "x_case": "tools_stream", "stream": true}),
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    proxy.wait_records(1).await;
    assert_eq!(proxy.queries_raw("").await[0]["cost"], "0.08425");
    let r = proxy
        .set_price(
            "gpt-5",
            r#"{"validFrom":"2000-01-01T00:00:00Z","per1MQueryTokens":2,"per1MAnswerTokens":20}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // 1000 x $2 + 100 x $20 per 1M = 0.004, plus 0.082 of tools.
    let rec = &proxy.queries_raw("").await[0];
    assert_eq!(rec["cost"], "0.086", "{rec:?}");
    assert_eq!(rec["toolCost"], "0.082", "{rec:?}");
    assert_eq!(proxy.usage_raw("").await["cost"], "0.086");
}

/// Budgets settle on the tool calls' cost: with a $0.10 budget, a first
/// Responses call costs $0.08425 ($0.082 of it tools) and the user's spend
/// says so. Its reservation was its tokens only (which tools will be called
/// is not known before), so what is left ($0.01575) may still admit a
/// second call on one instance (under PostgreSQL's leases the overrun of
/// the first is charged to the lease, which refuses it); either way the
/// spend is the exact sum of what was admitted and the budget then refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_settle_on_tool_costs() {
    let mock = invoice_mock().await;
    let proxy = Proxy::builder(&mock.url())
        .default_prices(true)
        .start()
        .await;
    let r = proxy
        .admin_call(
            http::Method::PUT,
            "/users/ann/limits",
            r#"{"budget":0.1,"period":"total"}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let ask = || {
        post(
            "/v1/responses",
            "ann",
            json!({"model": "gpt-5", "input": "x", "x_case": "tools_stream", "stream": true, "max_output_tokens": 100}),
        )
    };
    let spent = || async {
        proxy.state.store.flush().await;
        raw_object(&proxy.get("/users/ann/limits").await.text())["spent"].clone()
    };
    assert_eq!(send(proxy.addr, ask()).await.status, 200);
    assert_eq!(spent().await, "0.08425");
    let mut admitted = 1;
    loop {
        let r = send(proxy.addr, ask()).await;
        if r.status != 200 {
            assert_openai_error(&r, 429, "requests", None, Some("budget_exceeded"));
            break;
        }
        admitted += 1;
        assert!(admitted <= 2, "a spent budget kept admitting");
    }
    let want = if admitted == 1 { "0.08425" } else { "0.1685" };
    assert_eq!(spent().await, want);
    assert_eq!(mock.seen().len(), admitted);
}

/// Image and unit prices set through the API: `per1MImage...Tokens` and
/// `perUnit` (here a tool's own row, which wins for every model without a
/// family row), shown back by `GET /model/{name}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_and_unit_prices_are_set_through_the_api() {
    let mock = invoice_mock().await;
    let proxy = Proxy::start(&mock.url()).await;
    let r = proxy
        .set_price(
            "gpt-image-1",
            r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":4,"per1MAnswerTokens":30,"per1MImageQueryTokens":8,"per1MImageAnswerTokens":32}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    for (model, body) in [
        (
            "gpt-5",
            r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":1,"per1MAnswerTokens":10}"#,
        ),
        (
            "web_search_call",
            r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":0,"per1MAnswerTokens":0,"perUnit":0.02}"#,
        ),
        (
            "code_interpreter_call",
            r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":0,"per1MAnswerTokens":0,"perUnit":0.05}"#,
        ),
        (
            "image_generation_call",
            r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":0,"per1MAnswerTokens":0,"perUnit":0.1}"#,
        ),
    ] {
        let r = proxy.set_price(model, body).await;
        assert_eq!(r.status, 200, "{model}: {}", r.text());
    }
    let shown = proxy.get("/model/web_search_call").await.text();
    assert!(shown.contains(r#""perUnit":0.02"#), "{shown}");
    let shown = proxy.get("/model/gpt-image-1").await.text();
    assert!(shown.contains(r#""per1MImageAnswerTokens":32"#), "{shown}");
    let r = proxy
        .set_price(
            "x",
            r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":0,"per1MAnswerTokens":0,"perUnit":-1}"#,
        )
        .await;
    assert_openai_error(&r, 400, "invalid_request_error", Some("perUnit"), None);

    let img = post(
        "/v1/images/generations",
        "ann",
        json!({"model": "gpt-image-1", "prompt": "a cat", "x_case": "image"}),
    );
    assert_eq!(send(proxy.addr, img).await.status, 200);
    let tools = post(
        "/v1/responses",
        "ann",
        json!({"model": "gpt-5", "input": "x", "x_case": "tools_stream", "stream": true}),
    );
    assert_eq!(send(proxy.addr, tools).await.status, 200);
    proxy.wait_records(2).await;
    let raw = proxy.queries_raw("").await;
    // 40 x $4 + 10 x $8 + 4160 x $32 per 1M.
    assert_eq!(raw[0]["inputCost"], "0.00016");
    assert_eq!(raw[0]["imageInputCost"], "0.00008");
    assert_eq!(raw[0]["imageOutputCost"], "0.13312");
    assert_eq!(raw[0]["cost"], "0.13336");
    // 1000 x $1 + 100 x $10 per 1M, then 0.02 + 0.05 + 0.1 of tools.
    assert_eq!(raw[1]["toolCost"], "0.17");
    assert_eq!(raw[1]["cost"], "0.172");
}
