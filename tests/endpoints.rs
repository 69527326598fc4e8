//! The other metered APIs (Responses, embeddings, legacy completions), paths
//! without usage, token estimates, and stream shapes that stress the SSE
//! scanner: large events, a last event without its blank line, answers with
//! a Content-Length, and slow streams.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use serde_json::Value;

fn post(path: &str, body: &str) -> Request<ReqBody> {
    Request::post(path)
        .header("content-type", "application/json")
        .header("x-user", "alice")
        .body(full(body.to_owned()))
        .unwrap()
}

/// A streamed Responses API answer: not spliced (usage always comes in
/// `response.completed`), passed through unchanged, usage read from the
/// terminal event even when that event is far larger than the scanner keeps whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_stream_usage_comes_from_the_completed_event() {
    let long_text = "lorem ipsum ".repeat(20_000); // ~240 KB inside one event
    let completed = format!(
        "event: response.completed\ndata: {{\"type\":\"response.completed\",\"sequence_number\":5,\"response\":{{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"completed\",\"model\":\"gpt-4.1-2025-04-14\",\"output\":[{{\"type\":\"message\",\"content\":[{{\"type\":\"output_text\",\"text\":\"{long_text}\"}}]}}],\"usage\":{{\"input_tokens\":36,\"input_tokens_details\":{{\"cached_tokens\":12}},\"output_tokens\":40000,\"output_tokens_details\":{{\"reasoning_tokens\":64}},\"total_tokens\":40036}}}}}}\n\n"
    );
    let events: Vec<Bytes> = vec![
        Bytes::from("event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"in_progress\",\"model\":\"gpt-4.1-2025-04-14\",\"usage\":null}}\n\n"),
        Bytes::from("event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":3,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"lorem\"}\n\n"),
        Bytes::from(completed),
    ];
    let all = concat(&events);
    // Arbitrary splits, as a network delivers them.
    let steps: Vec<Step> = all
        .chunks(4093)
        .map(|c| Step::send(Bytes::copy_from_slice(c)))
        .collect();
    let mock = Mock::start(move |_| Reply::sse(steps.clone())).await;
    let proxy = Proxy::start(&mock.url()).await;
    let body = r#"{"model":"gpt-4.1","input":"Write lorem ipsum.","stream":true}"#;
    let got = open(proxy.addr, post("/v1/responses", body))
        .await
        .finish()
        .await
        .expect("stream completes");
    assert_eq!(got, all, "Responses stream passed through unchanged");
    assert_eq!(mock.seen()[0].body, body.as_bytes(), "not spliced");
    let rec = &proxy.wait_records(1).await[0];
    assert_eq!(rec["endpoint"], "/v1/responses");
    assert_eq!(rec["model"], "gpt-4.1-2025-04-14");
    assert_eq!(rec["queryTokens"], 36);
    assert_eq!(rec["cachedQueryTokens"], 12);
    assert_eq!(rec["answerTokens"], 40000);
    assert_eq!(rec["reasoningTokens"], 64);
    assert_eq!(rec["estimated"], false);
    assert_eq!(rec["stream"], true);
}

/// Non-streamed Responses and embeddings answers: usage read, bytes unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_and_embeddings_are_metered() {
    let resp = r#"{"id":"resp_2","object":"response","created_at":1741476542,"status":"completed","model":"o4-mini-2025-04-16","output":[{"type":"reasoning","id":"rs_1","summary":[]},{"type":"message","id":"msg_2","role":"assistant","content":[{"type":"output_text","text":"Done.","annotations":[]}]}],"usage":{"input_tokens":120,"input_tokens_details":{"cached_tokens":100},"output_tokens":300,"output_tokens_details":{"reasoning_tokens":256},"total_tokens":420}}"#;
    let emb = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.0023064255,-0.009327292,0.015797347]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
    let mock = Mock::start(move |seen| {
        if seen.path == "/v1/responses" {
            Reply::json(resp)
        } else {
            Reply::json(emb)
        }
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    let r = send(proxy.addr, post("/v1/responses", r#"{"model":"o4-mini","input":[{"role":"user","content":[{"type":"input_text","text":"hi"}]}],"reasoning":{"effort":"high"}}"#)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, resp.as_bytes());
    let r = send(
        proxy.addr,
        post(
            "/v1/embeddings",
            r#"{"model":"text-embedding-3-small","input":"The food was delicious and the waiter..."}"#,
        ),
    )
    .await;
    assert_eq!(r.body, emb.as_bytes());
    let recs = proxy.wait_records(2).await;
    assert_eq!(recs[0]["endpoint"], "/v1/responses");
    assert_eq!(recs[0]["model"], "o4-mini-2025-04-16");
    assert_eq!(recs[0]["queryTokens"], 120);
    assert_eq!(recs[0]["cachedQueryTokens"], 100);
    assert_eq!(recs[0]["answerTokens"], 300);
    assert_eq!(recs[0]["reasoningTokens"], 256);
    assert_eq!(recs[1]["endpoint"], "/v1/embeddings");
    assert_eq!(recs[1]["queryTokens"], 8);
    assert_eq!(recs[1]["answerTokens"], 0);
    assert!(recs.iter().all(|r| r["estimated"] == false));
}

/// Legacy completions streams are spliced and stripped like chat streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_completions_stream_is_spliced_and_stripped() {
    let chunk = |t: &str| {
        event(&format!(
            r#"{{"id":"cmpl-1","object":"text_completion","created":1700000000,"choices":[{{"text":"{t}","index":0,"logprobs":null,"finish_reason":null}}],"model":"gpt-3.5-turbo-instruct"}}"#
        ))
    };
    let usage = event(
        r#"{"id":"cmpl-1","object":"text_completion","created":1700000000,"choices":[],"model":"gpt-3.5-turbo-instruct","usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#,
    );
    let events = vec![chunk("Hello"), chunk(" you"), usage.clone(), done()];
    let ev = events.clone();
    let mock = Mock::start(move |seen| {
        if seen.wants_usage() {
            Reply::sse_events(ev.clone())
        } else {
            Reply::sse_events(ev.iter().filter(|e| **e != usage).cloned().collect())
        }
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    let body = r#"{"model":"gpt-3.5-turbo-instruct","prompt":"Say hello","stream":true}"#;
    let got = open(proxy.addr, post("/v1/completions", body))
        .await
        .finish()
        .await
        .unwrap();
    assert_eq!(
        mock.seen()[0].json()["stream_options"]["include_usage"],
        true
    );
    assert_eq!(got, concat(&[events[0].clone(), events[1].clone(), done()]));
    let rec = &proxy.wait_records(1).await[0];
    assert_eq!(rec["endpoint"], "/v1/completions");
    assert_eq!(rec["queryTokens"], 5);
    assert_eq!(rec["answerTokens"], 2);
    assert_eq!(rec["estimated"], false);
}

/// Paths without usage are forwarded as they are (method, query string,
/// body) and recorded with zero tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_paths_pass_through_and_are_recorded() {
    let list = r#"{"object":"list","data":[{"id":"gpt-4o","object":"model","created":1715367049,"owned_by":"system"}]}"#;
    let mock = Mock::start(move |_| Reply::json(list).header("x-request-id", "req_models")).await;
    let proxy = Proxy::start(&mock.url()).await;
    let r = send(
        proxy.addr,
        Request::get("/v1/models?limit=2&after=x%20y")
            .header("x-user", "alice")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, list.as_bytes());
    let r = send(
        proxy.addr,
        Request::delete("/v1/files/file-abc")
            .header("x-user", "alice")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = mock.seen();
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].path, "/v1/models?limit=2&after=x%20y");
    assert_eq!(seen[1].method, "DELETE");
    assert_eq!(seen[1].path, "/v1/files/file-abc");
    let recs = proxy.wait_records(2).await;
    assert_eq!(recs[0]["endpoint"], "/v1/models");
    assert_eq!(recs[0]["requestId"], "req_models");
    assert_eq!(recs[1]["endpoint"], "/v1/files/file-abc");
    for r in &recs {
        assert_eq!(r["status"], 200);
        assert_eq!(r["queryTokens"], 0);
        assert_eq!(r["answerTokens"], 0);
        assert_eq!(r["estimated"], false);
    }
}

/// Tokens of `s` in the encoding tiktoken names.
fn tokens(enc: &tiktoken_rs::CoreBPE, s: &str) -> u64 {
    enc.encode_ordinary(s).len() as u64
}

/// An upstream that ignores include_usage: the record is estimated with the
/// model's encoding (o200k for gpt-4o, cl100k for gpt-4): the prompt by the
/// cookbook's count, the answer from the text actually streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_usage_is_estimated_with_the_model_encoding() {
    // Text whose token counts differ a lot between the two encodings.
    let answer =
        "सभी मनुष्यों को गौरव और अधिकारों के मामले में जन्मजात स्वतन्त्रता और समानता प्राप्त है। ".repeat(4);
    let question = "Übersetze bitte: 人人生而自由，在尊严和权利上一律平等。";
    let a = answer.clone();
    let mock = Mock::start(move |seen| {
        let model = seen.json()["model"].as_str().unwrap().to_owned();
        Reply::sse_events(vec![chunk(&model, &a), done()])
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    let o200k = tiktoken_rs::o200k_base().unwrap();
    let cl100k = tiktoken_rs::cl100k_base().unwrap();
    for (model, enc, other) in [("gpt-4o", &o200k, &cl100k), ("gpt-4-0613", &cl100k, &o200k)] {
        let body = serde_json::json!({
            "model": model,
            "stream": true,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "name": "ann", "content": question},
            ],
        })
        .to_string();
        let got = open(proxy.addr, chat_req("alice", &body))
            .await
            .finish()
            .await
            .unwrap();
        assert!(contains(&got, answer.as_bytes()));
        let recs = proxy.wait_records(1 + usize::from(model != "gpt-4o")).await;
        let rec = recs.last().unwrap();
        assert_eq!(rec["estimated"], true);
        // 3 per message, each value, +1 for a name, +3 reply priming.
        let prompt = 3
            + (3 + tokens(enc, "system") + tokens(enc, "Be brief."))
            + (3 + tokens(enc, "user") + tokens(enc, "ann") + 1 + tokens(enc, question));
        assert_eq!(rec["queryTokens"], prompt, "{model}");
        let est = rec["answerTokens"].as_u64().unwrap();
        let right = tokens(enc, &answer);
        let wrong = tokens(other, &answer);
        assert!(
            right.abs_diff(wrong) > right / 3,
            "text separates the encodings"
        );
        assert!(
            est >= right && est <= right + 3,
            "{model}: estimate {est}, true count {right} (other encoding {wrong})"
        );
    }
}

/// A stream whose last event lacks its blank line still reaches the client
/// whole, and the usage chunk is still removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_without_blank_line_is_delivered() {
    let mock = Mock::start(|seen| {
        let mut ev = chat_stream(seen, "gpt-4o", &["tail"], Tok::new(8, 1));
        ev.pop();
        ev.push(Bytes::from_static(b"data: [DONE]\n"));
        Reply::sse_events(ev)
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    let got = open(proxy.addr, chat_req("alice", &chat_body("gpt-4o", true)))
        .await
        .finish()
        .await
        .unwrap();
    assert!(
        got.ends_with(b"data: [DONE]\n"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert!(!contains(&got, b"\"choices\":[]"));
    let rec = &proxy.wait_records(1).await[0];
    assert_eq!(rec["queryTokens"], 8);
    assert_eq!(rec["estimated"], false);
}

/// An SSE answer sent with a Content-Length: once the usage chunk is
/// removed the length no longer holds, and the client must still get a
/// well-formed answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripped_answer_with_content_length_stays_well_formed() {
    let mock = Mock::start(|seen| {
        let ev = chat_stream(seen, "gpt-4o", &["sized"], Tok::new(8, 1));
        Reply {
            body: ReplyBody::Full(Bytes::from(concat(&ev))),
            ..Reply::sse(vec![])
        }
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    for proto in [Proto::H1, Proto::H2] {
        let s = open_with(
            proxy.addr,
            proto,
            chat_req("alice", &chat_body("gpt-4o", true)),
        )
        .await;
        if let Some(cl) = s.headers.get("content-length") {
            let n: usize = cl.to_str().unwrap().parse().unwrap();
            let got = s.finish().await.expect("complete answer");
            assert_eq!(n, got.len(), "Content-Length matches the body");
        } else {
            let got = s.finish().await.expect("complete answer");
            assert!(!contains(&got, b"\"choices\":[]"));
            assert!(got.ends_with(b"data: [DONE]\n\n"));
        }
    }
    let recs = proxy.wait_records(2).await;
    assert!(recs
        .iter()
        .all(|r| r["estimated"] == false && r["queryTokens"] == 8));
}

/// Events far larger than the scanner's window pass through intact, and the
/// usage chunk after them is still found and removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_events_pass_through_intact() {
    let big = "x".repeat(300_000);
    let b = big.clone();
    let mock = Mock::start(move |seen| {
        let ev = chat_stream(seen, "gpt-4o", &[&b, "end"], Tok::new(9, 75000));
        let all = concat(&ev);
        Reply::sse(
            all.chunks(65_000)
                .map(|c| Step::send(Bytes::copy_from_slice(c)))
                .collect(),
        )
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    let got = open(proxy.addr, chat_req("alice", &chat_body("gpt-4o", true)))
        .await
        .finish()
        .await
        .unwrap();
    let seen = mock.seen().remove(0);
    let want: Vec<Bytes> = chat_stream(&seen, "gpt-4o", &[&big, "end"], Tok::new(9, 75000))
        .into_iter()
        .filter(|e| !contains(e, b"\"choices\":[]"))
        .collect();
    assert_eq!(got.len(), concat(&want).len());
    assert!(got == concat(&want), "bytes identical");
    let rec = &proxy.wait_records(1).await[0];
    assert_eq!(rec["answerTokens"], 75000);
    assert_eq!(rec["estimated"], false);
}

/// A stream slower in total than the idle timeout, but never silent that
/// long, is not cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_but_steady_stream_outlives_the_idle_timeout() {
    let mock = Mock::start(|seen| {
        let mut steps = Vec::new();
        for e in chat_stream(
            seen,
            "gpt-4o",
            &["a", "b", "c", "d", "e", "f"],
            Tok::new(4, 6),
        ) {
            steps.push(Step::Sleep(Duration::from_millis(250)));
            steps.push(Step::Send(e));
        }
        Reply::sse(steps)
    })
    .await;
    let proxy = Proxy::builder(&mock.url())
        .idle(Duration::from_millis(800))
        .start()
        .await;
    let started = std::time::Instant::now();
    let got = open(proxy.addr, chat_req("alice", &chat_body("gpt-4o", true)))
        .await
        .finish()
        .await
        .expect("not cut by the idle timeout");
    // Only meaningful when the whole stream took longer than the timeout.
    assert!(started.elapsed() > Duration::from_millis(800));
    assert!(got.ends_with(b"data: [DONE]\n\n"));
    let rec = &proxy.wait_records(1).await[0];
    assert_eq!(rec["answerTokens"], 6);
    assert_eq!(rec["estimated"], false);
}

/// A mid-stream error event from upstream reaches the client unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mid_stream_error_event_passes_through() {
    let err = event(
        r#"{"error":{"message":"The server had an error","type":"server_error","param":null,"code":null}}"#,
    );
    let e = err.clone();
    let mock = Mock::start(move |seen| {
        let ev = chat_stream(seen, "gpt-4o", &["x"], Tok::new(1, 1));
        Reply::sse_events(vec![ev[0].clone(), e.clone()])
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    let got = open(proxy.addr, chat_req("alice", &chat_body("gpt-4o", true)))
        .await
        .finish()
        .await
        .unwrap();
    assert!(got.ends_with(&err));
    let rec: Value = proxy.wait_records(1).await.remove(0);
    assert_eq!(rec["estimated"], true);
}
