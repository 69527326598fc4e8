//! Faults on either side: clients that leave, upstreams that break, and
//! exactly one record per request under concurrency.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;

/// Steps of a long stream that pauses after its first event until `gate`
/// opens, then keeps sending so a dead peer is noticed on write too.
fn long_stream(seen: &Seen, gate: &Gate) -> Vec<Step> {
    let ev = chat_stream(seen, "gpt-4o-mini", &["Once", " upon"], Tok::new(50, 400));
    let mut steps = vec![Step::Send(ev[0].clone()), Step::Send(ev[1].clone())];
    steps.push(Step::Wait(gate.clone()));
    for i in 0..400 {
        steps.push(Step::Send(chunk("gpt-4o-mini", &format!(" word{i}"))));
        steps.push(Step::Sleep(Duration::from_millis(10)));
    }
    steps.extend(ev[2..].iter().cloned().map(Step::Send));
    steps
}

/// The client leaves mid-stream: tollgate closes the upstream connection
/// (the mock sees its answer body dropped) and records the request with
/// estimated tokens, since the usage chunk never came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_mid_stream_cancels_upstream_and_is_recorded() {
    let gate = Gate::new();
    let g = gate.clone();
    let mock = Mock::start(move |seen| Reply::sse(long_stream(seen, &g))).await;
    let proxy = Proxy::start(&mock.url()).await;
    let mut s = open(
        proxy.addr,
        chat_req("alice", &chat_body("gpt-4o-mini", true)),
    )
    .await;
    s.read_until("Once").await;
    drop(s);
    gate.open();
    assert_eq!(
        mock.wait_outcome(0).await,
        Outcome::PeerGone,
        "upstream answer must be cut when the client leaves"
    );
    let recs = proxy.wait_records(1).await;
    let rec = &recs[0];
    assert_eq!(rec["status"], 200);
    assert_eq!(rec["stream"], true);
    assert_eq!(rec["estimated"], true);
    assert!(rec["queryTokens"].as_i64().unwrap() > 0, "{rec}");
    assert!(
        rec["answerTokens"].as_i64().unwrap() > 0,
        "streamed text counted: {rec}"
    );
    assert!(
        rec["answerTokens"].as_i64().unwrap() < 400,
        "not upstream's figure: {rec}"
    );
}

/// Same over HTTP/2, where leaving resets one stream, not the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_mid_stream_over_http2() {
    let gate = Gate::new();
    let g = gate.clone();
    let mock = Mock::start(move |seen| Reply::sse(long_stream(seen, &g))).await;
    let proxy = Proxy::start(&mock.url()).await;
    let mut s = open_with(
        proxy.addr,
        Proto::H2,
        chat_req("alice", &chat_body("gpt-4o-mini", true)),
    )
    .await;
    s.read_until("Once").await;
    drop(s);
    gate.open();
    assert_eq!(mock.wait_outcome(0).await, Outcome::PeerGone);
    let rec = &proxy.wait_records(1).await[0];
    assert_eq!(rec["status"], 200);
    assert_eq!(rec["estimated"], true);
}

/// The client leaves before the answer head: record with status 499
/// (`--client-abort cancel`; `finish` is tests/limits.rs's business).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_before_the_head_is_recorded_as_499() {
    let mock = Mock::start(|_| Reply::never()).await;
    let proxy = Proxy::builder(&mock.url())
        .idle(Duration::from_secs(60))
        .with(|c| c.client_abort = tollgate::config::ClientAbort::Cancel)
        .start()
        .await;
    let addr = proxy.addr;
    let pending = tokio::spawn(async move {
        open(addr, chat_req("alice", &chat_body("gpt-4o", false))).await;
    });
    mock.wait_seen(1).await;
    pending.abort();
    let recs = proxy.wait_records(1).await;
    let rec = &recs[0];
    assert_eq!(rec["status"], 499);
    assert_eq!(rec["user"], "alice");
    assert_eq!(rec["requestedModel"], "gpt-4o");
    assert_eq!(rec["estimated"], true, "prompt tokens were spent: {rec}");
    assert!(rec["queryTokens"].as_i64().unwrap() > 0);
    assert_eq!(rec["ttfbMs"], serde_json::Value::Null);
    assert_eq!(rec["clientAborted"], true);
}

/// The client leaves after the usage chunk but before `[DONE]`: the record
/// keeps upstream's real usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_after_the_usage_chunk_keeps_the_real_usage() {
    let gate = Gate::new();
    let g = gate.clone();
    let mock = Mock::start(move |seen| {
        let mut ev = chat_stream(seen, "gpt-4o", &["all", " said"], Tok::new(61, 7));
        let last = ev.pop().unwrap();
        let mut steps: Vec<Step> = ev.into_iter().map(Step::Send).collect();
        steps.push(Step::Wait(g.clone()));
        steps.push(Step::Send(last));
        Reply::sse(steps)
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    let body = r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;
    let mut s = open(proxy.addr, chat_req("alice", body)).await;
    s.read_until("\"choices\":[]").await;
    drop(s);
    // The gate stays shut: the mock can only end by noticing the cut.
    assert_eq!(mock.wait_outcome(0).await, Outcome::PeerGone);
    drop(gate);
    let rec = &proxy.wait_records(1).await[0];
    assert_eq!(rec["estimated"], false);
    assert_eq!(rec["queryTokens"], 61);
    assert_eq!(rec["answerTokens"], 7);
}

/// Upstream resets the connection mid-stream: the client's stream ends with
/// an error (not a clean end), and the record is written with estimates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reset_mid_stream_ends_the_client_stream_with_an_error() {
    let mock = Mock::start(|seen| {
        let ev = chat_stream(seen, "gpt-4o", &["partial", " answer"], Tok::new(70, 9));
        Reply::sse(vec![
            Step::Send(ev[0].clone()),
            Step::Send(ev[1].clone()),
            Step::Send(ev[2].clone()),
            Step::Reset,
        ])
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    let s = open(proxy.addr, chat_req("alice", &chat_body("gpt-4o", true))).await;
    assert_eq!(s.status, 200);
    let (got, _err) = s.finish().await.expect_err("stream must end with an error");
    assert!(
        contains(&got, b"partial"),
        "events before the reset arrived"
    );
    assert!(!contains(&got, b"[DONE]"));
    assert_eq!(mock.outcome(0), Outcome::Reset);
    let rec = &proxy.wait_records(1).await[0];
    assert_eq!(rec["status"], 200);
    assert_eq!(rec["estimated"], true);
    assert!(rec["queryTokens"].as_i64().unwrap() > 0);
    assert!(rec["answerTokens"].as_i64().unwrap() > 0);
}

/// Upstream sends the usage chunk, then dies before `[DONE]`: the record has
/// upstream's real usage, not an estimate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_chunk_then_death_keeps_the_real_usage() {
    let t = Tok {
        prompt: 777,
        completion: 55,
        cached: 512,
        reasoning: 13,
    };
    let mock = Mock::start(move |seen| {
        let mut ev = chat_stream(seen, "gpt-4o", &["so", " close"], t);
        ev.pop(); // no [DONE]
        let mut steps: Vec<Step> = ev.into_iter().map(Step::Send).collect();
        steps.push(Step::Reset);
        Reply::sse(steps)
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    let s = open(proxy.addr, chat_req("alice", &chat_body("gpt-4o", true))).await;
    let (got, _) = s.finish().await.expect_err("stream ends with an error");
    assert!(
        !contains(&got, b"\"choices\":[]"),
        "usage chunk still stripped"
    );
    let rec = &proxy.wait_records(1).await[0];
    assert_eq!(rec["estimated"], false);
    assert_eq!(rec["queryTokens"], 777);
    assert_eq!(rec["answerTokens"], 55);
    assert_eq!(rec["cachedQueryTokens"], 512);
    assert_eq!(rec["reasoningTokens"], 13);
}

/// A 200 whose body is garbage is passed through as is and recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_200_is_passed_through_and_recorded() {
    let garbage: &[u8] = b"\x00\x01<html>not json {\"usage\":{\"prompt_tokens\": oops\xff\xfe";
    let mock = Mock::start(move |seen| {
        if seen.json()["stream"] == true {
            Reply::sse(vec![Step::send(garbage), Step::send("data: {broken\n\n")])
        } else {
            Reply::json(garbage)
        }
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    let r = proxy.chat("alice", &chat_body("gpt-4o", false)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, garbage);
    let s = open(proxy.addr, chat_req("alice", &chat_body("gpt-4o", true))).await;
    let got = s.finish().await.expect("garbage stream ends cleanly");
    let mut want = garbage.to_vec();
    want.extend_from_slice(b"data: {broken\n\n");
    assert_eq!(got, want);
    let recs = proxy.wait_records(2).await;
    for rec in &recs {
        assert_eq!(rec["status"], 200);
        assert_eq!(rec["model"], "gpt-4o");
        assert_eq!(
            rec["estimated"], true,
            "no usage in a garbage answer: {rec}"
        );
    }
}

/// Silence mid-stream past the idle timeout ends the client's stream with an
/// error and leaves a record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_mid_stream_past_the_idle_timeout_ends_the_stream() {
    let mock = Mock::start(|seen| {
        let ev = chat_stream(seen, "gpt-4o", &["then", " nothing"], Tok::new(5, 5));
        Reply::sse(vec![
            Step::Send(ev[0].clone()),
            Step::Send(ev[1].clone()),
            Step::Hang,
        ])
    })
    .await;
    let proxy = Proxy::builder(&mock.url())
        .idle(Duration::from_secs(1))
        .start()
        .await;
    let s = open(proxy.addr, chat_req("alice", &chat_body("gpt-4o", true))).await;
    let (got, _) = s
        .finish()
        .await
        .expect_err("idle stream ends with an error");
    assert!(contains(&got, b"then"));
    assert_eq!(mock.wait_outcome(0).await, Outcome::PeerGone);
    let rec = &proxy.wait_records(1).await[0];
    assert_eq!(rec["status"], 200);
    assert_eq!(rec["estimated"], true);
}

/// 60 concurrent requests of every kind (plain, streamed with and without
/// include_usage, upstream errors) leave exactly one record each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_record_per_request_under_concurrency() {
    let mock = Mock::start(|seen| {
        let id = format!("req-{}", seen.n);
        let v = seen.json();
        let reply = if v["user"] == "fail" {
            Reply::json(
                r#"{"error":{"message":"boom","type":"server_error","param":null,"code":null}}"#,
            )
            .status(500)
        } else if v["stream"] == true {
            let ev = chat_stream(seen, "gpt-4o", &["a", "b", "c"], Tok::new(10, 3));
            let mut steps = Vec::new();
            for e in ev {
                steps.push(Step::Send(e));
                steps.push(Step::Sleep(Duration::from_millis(2)));
            }
            Reply::sse(steps)
        } else {
            Reply::json(completion("gpt-4o", "abc", Tok::new(10, 3)))
        };
        reply.header("x-request-id", &id)
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    let mut tasks = Vec::new();
    for i in 0..60 {
        let addr = proxy.addr;
        let body = match i % 4 {
            0 => chat_body("gpt-4o", false),
            1 => chat_body("gpt-4o", true),
            2 => r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"x"}]}"#.to_owned(),
            _ => r#"{"model":"gpt-4o","user":"fail","messages":[{"role":"user","content":"x"}]}"#.to_owned(),
        };
        let proto = if i % 3 == 0 { Proto::H2 } else { Proto::H1 };
        tasks.push(tokio::spawn(async move {
            let r = send_with(addr, proto, chat_req(&format!("user{}", i % 5), &body)).await;
            (r.status.as_u16(), r.header("x-request-id").unwrap())
        }));
    }
    let mut ids = BTreeSet::new();
    let mut failed = 0;
    for t in tasks {
        let (status, id) = within("concurrent request", t).await.unwrap();
        if status == 500 {
            failed += 1;
        } else {
            assert_eq!(status, 200);
        }
        ids.insert(id);
    }
    assert_eq!(ids.len(), 60);
    assert_eq!(failed, 15);
    let recs = proxy.wait_records(60).await;
    assert_eq!(recs.len(), 60, "exactly one record per request");
    let rec_ids: BTreeSet<String> = recs
        .iter()
        .map(|r| r["requestId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(rec_ids, ids);
    let u = proxy.usage_raw("").await;
    assert_eq!(u["numQueries"], "60");
    assert_eq!(u["queryTokens"], (45 * 10).to_string());
    assert_eq!(u["answerTokens"], (45 * 3).to_string());
    assert!(recs.iter().all(|r| r["estimated"] == false));
    let mut proxy = proxy;
    proxy.stop().await;
    assert_eq!(db_rows(&proxy.db).len(), 60, "nothing more after the drain");
}

/// Estimates count streamed text once: a stream of one-token chunks
/// (`" hello"`) without usage is estimated at one answer token per chunk
/// that went through, whether it ends properly, upstream resets it after k
/// chunks, or the client leaves after k chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_without_usage_are_estimated_one_token_per_one_token_chunk() {
    let mock = Mock::start(|seen| {
        // The user message says how many chunks to send and how to end.
        let spec = seen.json()["messages"][0]["content"]
            .as_str()
            .unwrap()
            .to_owned();
        let (k, how) = spec.split_once(' ').unwrap();
        let mut steps = vec![Step::Send(chunk_with(
            "gpt-4o",
            r#"{"role":"assistant","content":""}"#,
            None,
            false,
        ))];
        for _ in 0..k.parse::<usize>().unwrap() {
            steps.push(Step::Send(chunk("gpt-4o", " hello")));
        }
        match how {
            "done" => {
                steps.push(Step::Send(chunk_with("gpt-4o", "{}", Some("stop"), false)));
                steps.push(Step::Send(done()));
            }
            "reset" => steps.push(Step::Reset),
            _ => {
                steps.push(Step::send(": sent\n\n"));
                steps.push(Step::Hang);
            }
        }
        Reply::sse(steps)
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    let cases = [
        (10, "done"),
        (1, "done"),
        (5, "reset"),
        (4, "reset"),
        (10, "reset"),
        (5, "leave"),
        (8, "leave"),
    ];
    for (n, (k, how)) in cases.iter().enumerate() {
        let body = serde_json::json!({
            "model": "gpt-4o",
            "stream": true,
            "messages": [{"role": "user", "content": format!("{k} {how}")}],
        })
        .to_string();
        let mut s = open(proxy.addr, chat_req("alice", &body)).await;
        match *how {
            "done" => {
                s.finish().await.expect("complete stream");
            }
            "reset" => {
                s.finish().await.expect_err("reset stream");
            }
            _ => {
                s.read_until(": sent").await;
                drop(s);
                assert_eq!(mock.wait_outcome(n).await, Outcome::PeerGone);
            }
        }
        let recs = proxy.wait_records(n + 1).await;
        let rec = &recs[n];
        assert_eq!(rec["estimated"], true, "{rec}");
        let got = rec["answerTokens"].as_i64().unwrap();
        assert!(
            (k - 1..=k + 1).contains(&got),
            "{k} one-token chunks then {how}: estimated {got} answer tokens"
        );
    }
}
