//! Resource limits against hostile or careless clients: absurd token
//! counts (reservations that wrapped around), clients that leave before a
//! non-streamed answer is complete, and request bodies that stall or pile
//! up in memory.

mod common;

use std::time::Duration;

use common::*;
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ADMIN: &str = "adm-limits-3c1d-admin-key";
const MODEL: &str = "gpt-4o-mini";

/// A mock answering every request with a chat completion of fixed usage.
async fn chat_mock() -> Mock {
    Mock::start(|_| Reply::json(completion(MODEL, "ok", Tok::new(10, 5)))).await
}

fn chat_with(extra: &str) -> String {
    format!(r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"hi"}}],{extra}}}"#)
}

async fn put_limits(p: &Proxy, user: &str, body: &str) {
    let path = format!("/users/{user}/limits");
    let r = p.admin_call(Method::PUT, &path, body).await;
    assert_eq!(r.status, 200, "PUT {path} {body}: {}", r.text());
}

// ---------------------------------------------------------------------------
// Token counts that wrapped the reservation (defect 4).
// ---------------------------------------------------------------------------

/// With a limit of 1000 tokens a minute, answer sizes whose reservation
/// wrapped around (`max_tokens: u64::MAX`; `n: 2` with `max_tokens: 2^63`)
/// are refused with a 400 naming the field the client used, and never
/// forwarded; so are answer counts past OpenAI's bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_answer_sizes_are_refused_naming_the_field() {
    let mock = chat_mock().await;
    let p = Proxy::builder(&mock.url()).admin(ADMIN).start().await;
    put_limits(&p, "wrap", r#"{"tokensPerMinute":1000}"#).await;
    let cases = [
        (r#""max_tokens":18446744073709551615"#, "max_tokens"),
        (r#""n":2,"max_tokens":9223372036854775808"#, "max_tokens"),
        (
            r#""max_completion_tokens":9223372036854775808,"n":2"#,
            "max_completion_tokens",
        ),
        (r#""max_output_tokens":4000000000"#, "max_output_tokens"),
        (r#""max_tokens":10,"n":1000000000000"#, "n"),
        (r#""best_of":129"#, "best_of"),
    ];
    for (extra, field) in cases {
        let r = p.chat("wrap", &chat_with(extra)).await;
        assert_openai_error(&r, 400, "invalid_request_error", Some(field), None);
    }
    assert!(mock.seen().is_empty(), "nothing was forwarded");
}

/// Values at the bound are reserved without wrapping: far over the
/// limit, refused with a 429 by it (not forwarded); a small request passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answer_sizes_at_the_bound_are_refused_by_the_limit() {
    let mock = chat_mock().await;
    let p = Proxy::builder(&mock.url()).admin(ADMIN).start().await;
    put_limits(&p, "bound", r#"{"tokensPerMinute":1000}"#).await;
    for extra in [
        r#""max_tokens":1000000000,"n":128"#,
        r#""max_completion_tokens":1000000000,"best_of":128"#,
    ] {
        let r = p.chat("bound", &chat_with(extra)).await;
        assert_openai_error(&r, 429, "requests", None, Some("rate_limit_exceeded"));
    }
    assert!(mock.seen().is_empty(), "nothing was forwarded");
    let r = p.chat("bound", &chat_with(r#""max_tokens":10"#)).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

// ---------------------------------------------------------------------------
// Slow and piled-up request bodies (defect 10).
// ---------------------------------------------------------------------------

/// Opens a raw connection and sends a request head and the first part of
/// its body; the rest never comes while the stream is held.
async fn stalled(
    addr: std::net::SocketAddr,
    path: &str,
    declared: usize,
    sent: usize,
) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nx-user: slow\r\ncontent-type: application/json\r\ncontent-length: {declared}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&vec![b' '; sent]).await.unwrap();
    s
}

/// Reads what the server answers on `s` until it closes the connection.
async fn answer_of(mut s: TcpStream) -> String {
    let mut got = Vec::new();
    within("the server answers and closes", s.read_to_end(&mut got))
        .await
        .expect("read");
    String::from_utf8_lossy(&got).into_owned()
}

/// A JSON body that stops halfway is answered 408 (`body_timeout`) once
/// `--body-timeout` passes without a byte, and nothing is forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_json_body_gets_408() {
    let mock = chat_mock().await;
    let p = Proxy::builder(&mock.url())
        .with(|c| c.body_timeout = Duration::from_millis(300))
        .start()
        .await;
    let s = stalled(p.addr, "/v1/chat/completions", 1000, 500).await;
    let text = answer_of(s).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains(r#""code":"body_timeout""#), "{text}");
    assert!(mock.seen().is_empty());
}

/// A streamed upload that stalls fails after `--body-timeout`: the client
/// gets a 408 and the record (the request reached upstream) says 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_upload_gets_408() {
    let mock = Mock::start(|_| Reply::json(r#"{"text":"hi"}"#)).await;
    let p = Proxy::builder(&mock.url())
        .with(|c| c.body_timeout = Duration::from_millis(300))
        .start()
        .await;
    let s = stalled(p.addr, "/v1/audio/transcriptions", 100_000, 1000).await;
    let text = answer_of(s).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains(r#""code":"body_timeout""#), "{text}");
    let recs = p.wait_records(1).await;
    assert_eq!(recs[0]["status"], 408, "{}", recs[0]);
}

/// With `--max-buffered` nearly taken by one slow body, a second body that
/// does not fit waits, then gets a 503 with `retry-after`; once the first
/// is gone its room is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_bodies_are_capped() {
    let mock = chat_mock().await;
    let p = Proxy::builder(&mock.url())
        .max_body(64 << 10)
        .with(|c| c.max_buffered = 64 << 10)
        .start()
        .await;
    let total = p.state.buffered.available_permits();
    let first = stalled(p.addr, "/v1/chat/completions", 60_000, 10).await;
    eventually("the first body holds its room", STEP, || async {
        (p.state.buffered.available_permits() < total).then_some(())
    })
    .await;
    let big = chat_with(&format!(r#""user":"{}""#, "x".repeat(20_000)));
    let r = p.chat("second", &big).await;
    assert_openai_error(&r, 503, "server_error", None, Some("server_busy"));
    assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    assert!(mock.seen().is_empty());
    drop(first);
    eventually("the room is given back", STEP, || async {
        (p.state.buffered.available_permits() == total).then_some(())
    })
    .await;
    let r = p.chat("second", &big).await;
    assert_eq!(r.status, 200, "{}", r.text());
    eventually("the forwarded body gives its room back", STEP, || async {
        (p.state.buffered.available_permits() == total).then_some(())
    })
    .await;
}

// ---------------------------------------------------------------------------
// Clients leaving a non-streamed request early (defect 9).
// ---------------------------------------------------------------------------

/// Client connections tollgate serves right now.
fn connections(p: &Proxy) -> i64 {
    (0..p.state.workers)
        .map(|n| p.state.metrics.worker_connections(n).get())
        .sum()
}

/// Waits until tollgate has noticed every client connection closed (and so
/// dropped the requests they carried).
async fn clients_gone(p: &Proxy) {
    eventually("tollgate noticed the client leave", STEP, || async {
        (connections(p) == 0).then_some(())
    })
    .await;
}

/// A mock answering a non-streamed chat completion (61 + 7 tokens) whose
/// head waits for `head` and whose body waits for `body` halfway.
async fn held_answer(head: Gate, body: Gate) -> Mock {
    Mock::start(move |_| {
        let text = completion(MODEL, "all said", Tok::new(61, 7));
        let (a, b) = text.split_at(text.len() / 2);
        Reply {
            headers: vec![("content-type".into(), "application/json".into())],
            ..Reply::sse(vec![
                Step::send(a.to_owned()),
                Step::Wait(body.clone()),
                Step::send(b.to_owned()),
            ])
        }
        .head_after(head.clone())
    })
    .await
}

async fn abort_before_head(mode: tollgate::config::ClientAbort) -> (Mock, Proxy) {
    let (head, body) = (Gate::new(), Gate::new());
    let mock = held_answer(head.clone(), body.clone()).await;
    body.open();
    let p = Proxy::builder(&mock.url())
        .with(|c| c.client_abort = mode)
        .start()
        .await;
    let addr = p.addr;
    let pending = tokio::spawn(async move {
        open(addr, chat_req("leaver", &chat_body(MODEL, false))).await;
    });
    mock.wait_seen(1).await;
    pending.abort();
    clients_gone(&p).await;
    head.open();
    (mock, p)
}

/// `finish` (the default): a client that leaves before the answer head
/// does not stop the exchange; the answer is read to its end and recorded
/// with its real usage and status, marked client-aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_before_the_head_finish_records_the_real_usage() {
    let (mock, p) = abort_before_head(Default::default()).await;
    assert_eq!(mock.wait_outcome(0).await, Outcome::Completed);
    let rec = &p.wait_records(1).await[0];
    assert_eq!(rec["status"], 200, "{rec}");
    assert_eq!(
        (&rec["queryTokens"], &rec["answerTokens"]),
        (&61.into(), &7.into()),
        "{rec}"
    );
    assert_eq!(rec["estimated"], false, "{rec}");
    assert_eq!(rec["clientAborted"], true, "{rec}");
    let csv = p.get("/queries?format=csv").await.text();
    assert!(
        csv.lines()
            .next()
            .unwrap()
            .ends_with(",clientAborted,tags,upstream,imageQueryTokens,imageAnswerTokens,imageInputCost,imageOutputCost,toolCost,units,customId,project"),
        "{csv}"
    );
    // clientAborted, then the (empty) tags, then the upstream, then no
    // image tokens, image or tool costs, units, customId and project.
    assert!(
        csv.lines()
            .nth(1)
            .unwrap()
            .ends_with(",true,,default,0,0,0,0,0,,,"),
        "{csv}"
    );
}

/// `cancel`: today's behaviour, a 499 record with an estimate of the prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_before_the_head_cancel_records_499() {
    let (_mock, p) = abort_before_head(tollgate::config::ClientAbort::Cancel).await;
    let rec = &p.wait_records(1).await[0];
    assert_eq!(rec["status"], 499, "{rec}");
    assert_eq!(rec["estimated"], true, "{rec}");
    assert_eq!(rec["answerTokens"], 0, "{rec}");
    assert_eq!(rec["clientAborted"], true, "{rec}");
}

async fn abort_mid_body(mode: tollgate::config::ClientAbort) -> (Mock, Proxy) {
    let (head, body) = (Gate::new(), Gate::new());
    head.open();
    let mock = held_answer(head, body.clone()).await;
    let p = Proxy::builder(&mock.url())
        .with(|c| c.client_abort = mode)
        .start()
        .await;
    let mut s = open(p.addr, chat_req("leaver", &chat_body(MODEL, false))).await;
    assert!(s.next().await.is_some_and(|r| r.is_ok()), "first half");
    drop(s);
    clients_gone(&p).await;
    body.open();
    (mock, p)
}

/// `finish`: a client that leaves halfway through the answer body leaves
/// the rest to a background read; the record has the real usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_mid_body_finish_records_the_real_usage() {
    let (mock, p) = abort_mid_body(Default::default()).await;
    assert_eq!(mock.wait_outcome(0).await, Outcome::Completed);
    let rec = &p.wait_records(1).await[0];
    assert_eq!(rec["status"], 200, "{rec}");
    assert_eq!(
        (&rec["queryTokens"], &rec["answerTokens"]),
        (&61.into(), &7.into()),
        "{rec}"
    );
    assert_eq!(rec["estimated"], false, "{rec}");
    assert_eq!(rec["clientAborted"], true, "{rec}");
}

/// `cancel`: the upstream connection is closed and the record is an estimate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_mid_body_cancel_closes_upstream() {
    let (mock, p) = abort_mid_body(tollgate::config::ClientAbort::Cancel).await;
    assert_eq!(mock.wait_outcome(0).await, Outcome::PeerGone);
    let rec = &p.wait_records(1).await[0];
    assert_eq!(rec["status"], 200, "{rec}");
    assert_eq!(rec["estimated"], true, "{rec}");
    assert_eq!(rec["clientAborted"], true, "{rec}");
}
