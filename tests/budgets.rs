//! Budgets on the endpoints whose bodies are not chat-like JSON (hardening
//! issue, defect 1): image generations reserve by `n`, size and quality,
//! audio uploads by their size, and every other endpoint that can cost
//! money by the `--reserve-floor`. Concurrent requests under a budget spend
//! at most the budget (plus the bounds the README documents).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http::{Method, Request};
use http_body_util::BodyExt;

/// The image model of these tests, priced per token like gpt-image-1.
const IMAGE_MODEL: &str = "img-test";
/// $5 per 1M prompt tokens, $50 per 1M image (answer) tokens.
const IMAGE_PRICE: &str =
    r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":5,"per1MAnswerTokens":50}"#;
/// Pico-dollars per prompt and per answer token of [`IMAGE_MODEL`].
const IQ: i128 = 5_000_000;
const IA: i128 = 50_000_000;
/// What the mock reports for one image: 40 x $5/1M + 3996 x $50/1M = $0.20.
const IMAGE_USAGE: (u64, u64) = (40, 3996);
/// Output tokens tollgate reserves for one 1024x1024 high-quality image.
const HIGH_SQUARE: i128 = 4160;

/// The audio model, priced per token like gpt-4o-transcribe.
const AUDIO_MODEL: &str = "asr-test";
const AUDIO_PRICE: &str =
    r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":6,"per1MAnswerTokens":10}"#;
/// 15000 x $6/1M + 1000 x $10/1M = $0.10 per upload.
const AUDIO_USAGE: (u64, u64) = (15_000, 1_000);
const AUDIO_COST: i128 = 100_000_000_000;

const DOLLAR: i128 = 1_000_000_000_000;

async fn put_limits(p: &Proxy, user: &str, body: &str) {
    let r = p
        .admin_call(Method::PUT, &format!("/users/{user}/limits"), body)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

async fn limits(p: &Proxy, user: &str) -> BTreeMap<String, String> {
    let r = p.get(&format!("/users/{user}/limits")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    raw_object(&r.text())
}

/// Parses a dollar amount printed by the API into pico-dollars.
fn pico(s: &str) -> i128 {
    let s = s.trim_matches('"');
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let frac = format!("{frac:0<12}");
    int.parse::<i128>().unwrap() * DOLLAR + frac[..12].parse::<i128>().unwrap()
}

fn image_body() -> String {
    format!(
        r#"{{"model":"{IMAGE_MODEL}","prompt":"A lighthouse at dusk, oil on canvas","n":1,"size":"1024x1024","quality":"high"}}"#
    )
}

fn image_req(user: &str, body: &str) -> Request<ReqBody> {
    Request::post("/v1/images/generations")
        .header("content-type", "application/json")
        .header("x-user", user)
        .body(full(body.to_owned()))
        .unwrap()
}

/// Sends `n` requests at once; counts the finished ones in `done`.
fn spawn_all(
    p: &Proxy,
    n: usize,
    done: &Arc<AtomicUsize>,
    make: impl Fn() -> Request<ReqBody>,
) -> Vec<tokio::task::JoinHandle<Resp>> {
    (0..n)
        .map(|_| {
            let (addr, req, done) = (p.addr, make(), done.clone());
            tokio::spawn(async move {
                let r = send(addr, req).await;
                done.fetch_add(1, Ordering::SeqCst);
                r
            })
        })
        .collect()
}

/// The attack of the issue: 50 concurrent image generations answering
/// $0.20 each, by a user with $1 in total. Each reserves its prompt (one
/// token per 3 body bytes) plus 4160 image tokens (1024x1024, high): four
/// fit, the other 46 get 429 `budget_exceeded` without reaching upstream,
/// and spend ends at $0.80, never above the budget. Without reservations
/// all 50 went upstream and $10 was spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_image_generations_stay_within_the_budget() {
    let gate = Gate::new();
    let g = gate.clone();
    let mock = Mock::start(move |_| {
        let (i, o) = IMAGE_USAGE;
        Reply::json(format!(
            r#"{{"created":1,"data":[{{"b64_json":"aGk="}}],"usage":{{"total_tokens":{},"input_tokens":{i},"output_tokens":{o},"input_tokens_details":{{"text_tokens":{i},"image_tokens":0}}}}}}"#,
            i + o
        ))
        .head_after(g.clone())
    })
    .await;
    let p = Proxy::start(&mock.url()).await;
    assert_eq!(p.set_price(IMAGE_MODEL, IMAGE_PRICE).await.status, 200);
    put_limits(&p, "ivy", r#"{"budget":1,"period":"total"}"#).await;

    let body = image_body();
    let reserved = i128::from((body.len() as u64).div_ceil(3)) * IQ + HIGH_SQUARE * IA;
    let cost = i128::from(IMAGE_USAGE.0) * IQ + i128::from(IMAGE_USAGE.1) * IA;
    assert_eq!(cost, DOLLAR / 5);
    let fit = usize::try_from(DOLLAR / reserved).unwrap();
    assert_eq!(fit, 4);

    let done = Arc::new(AtomicUsize::new(0));
    let tasks = spawn_all(&p, 50, &done, || image_req("ivy", &body));
    eventually("46 refusals while 4 wait upstream", STEP, || async {
        (done.load(Ordering::SeqCst) >= 50 - fit).then_some(())
    })
    .await;
    assert_eq!(mock.wait_seen(fit).await.len(), fit);
    let l = limits(&p, "ivy").await;
    assert_eq!(pico(&l["reserved"]), 4 * reserved);
    assert!(pico(&l["reserved"]) <= DOLLAR);
    gate.open();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(within("request", t).await.unwrap());
    }
    let ok = answers.iter().filter(|a| a.status == 200).count();
    assert_eq!(ok, fit);
    for a in answers.iter().filter(|a| a.status != 200) {
        assert_openai_error(a, 429, "requests", None, Some("budget_exceeded"));
    }
    // The body went upstream byte for byte.
    for s in mock.seen() {
        assert_eq!(s.body, Bytes::from(body.clone()));
        assert_eq!(s.path, "/v1/images/generations");
    }
    let records = p.wait_records(fit).await;
    assert_eq!(
        records.len(),
        mock.seen().len(),
        "one record per forwarded request"
    );
    let u = p.usage_raw("").await;
    assert_eq!(u["numQueries"], fit.to_string());
    assert_eq!(u["rejectedQueries"], (50 - fit).to_string());
    let spent = pico(&u["cost"]);
    assert_eq!(spent, cost * 4);
    assert!(spent <= DOLLAR, "spent {spent} over the $1 budget");
    p.state.store.flush().await;
    let l = limits(&p, "ivy").await;
    assert_eq!(pico(&l["spent"]), spent);
    assert_eq!(l["reserved"], "0");

    // An edit (a multipart upload, its model unread before it streams)
    // reserves the largest image cost seen: $0.20 does not fit $0.15.
    let edit = |user: &str| {
        let b = format!(
            "--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{IMAGE_MODEL}\r\n--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\nPNG\r\n--XyZ--\r\n"
        );
        Request::post("/v1/images/edits")
            .header("content-type", "multipart/form-data; boundary=XyZ")
            .header("x-user", user)
            .body(full(b))
            .unwrap()
    };
    put_limits(&p, "eve", r#"{"budget":0.15,"period":"total"}"#).await;
    let r = send(p.addr, edit("eve")).await;
    assert_openai_error(&r, 429, "requests", None, Some("budget_exceeded"));
    put_limits(&p, "eve", r#"{"budget":0.25,"period":"total"}"#).await;
    assert_eq!(send(p.addr, edit("eve")).await.status, 200);
    assert_eq!(mock.seen().len(), fit + 1);
}

/// Without a size, quality or `n` the worst case is reserved (the largest
/// image, high quality), times `n`: a request for 10 such images does not
/// fit a budget that one image would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_reservations_follow_n_size_and_quality() {
    let mock = Mock::start(|_| Reply::json(r#"{"created":1,"data":[]}"#)).await;
    let p = Proxy::start(&mock.url()).await;
    assert_eq!(p.set_price(IMAGE_MODEL, IMAGE_PRICE).await.status, 200);
    // Room for one worst-case image ($0.312 of image tokens plus the prompt).
    put_limits(&p, "ian", r#"{"budget":0.35,"period":"total"}"#).await;
    let ten = format!(r#"{{"model":"{IMAGE_MODEL}","prompt":"a cat","n":10}}"#);
    let r = send(p.addr, image_req("ian", &ten)).await;
    assert_openai_error(&r, 429, "requests", None, Some("budget_exceeded"));
    let one = format!(r#"{{"model":"{IMAGE_MODEL}","prompt":"a cat"}}"#);
    assert_eq!(send(p.addr, image_req("ian", &one)).await.status, 200);
    // 10 low-quality squares: 2720 tokens, $0.136.
    let low = format!(
        r#"{{"model":"{IMAGE_MODEL}","prompt":"a cat","n":10,"size":"1024x1024","quality":"low"}}"#
    );
    assert_eq!(send(p.addr, image_req("ian", &low)).await.status, 200);
    assert_eq!(mock.seen().len(), 2);
    // Not JSON: refused before upstream in OpenAI's shape.
    let r = send(p.addr, image_req("ian", "{not json")).await;
    assert_openai_error(&r, 400, "invalid_request_error", None, None);
    assert_eq!(mock.seen().len(), 2);
}

/// A multipart audio upload of `len` bytes of audio, with a content-length.
fn audio_req(user: &str, len: usize) -> Request<ReqBody> {
    let mut b = format!(
        "--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{AUDIO_MODEL}\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.ogg\"\r\nContent-Type: audio/ogg\r\n\r\n"
    )
    .into_bytes();
    b.extend(std::iter::repeat_n(b'A', len));
    b.extend_from_slice(b"\r\n--XyZ--\r\n");
    Request::post("/v1/audio/transcriptions")
        .header("content-type", "multipart/form-data; boundary=XyZ")
        .header("x-user", user)
        .body(full(b))
        .unwrap()
}

/// Audio uploads reserve by their size, at the highest cost per byte of an
/// audio upload this process has priced: after one $0.10 upload, 20
/// concurrent uploads of the same size by a user with $0.50 left in total
/// admit exactly 4 (each reserves $0.10) and the 16 others get 429; the
/// uploads still stream (the mock sees them whole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_audio_uploads_stay_within_the_budget() {
    let gate = Gate::new();
    let g = gate.clone();
    let mock = Mock::start(move |s| {
        let (i, o) = AUDIO_USAGE;
        let r = Reply::json(format!(
            r#"{{"text":"hello","usage":{{"type":"tokens","input_tokens":{i},"output_tokens":{o},"total_tokens":{}}}}}"#,
            i + o
        ));
        // The first upload (that teaches the rate) answers at once.
        if s.n == 0 {
            r
        } else {
            r.head_after(g.clone())
        }
    })
    .await;
    let p = Proxy::start(&mock.url()).await;
    assert_eq!(p.set_price(AUDIO_MODEL, AUDIO_PRICE).await.status, 200);
    put_limits(&p, "ava", r#"{"budget":0.5,"period":"total"}"#).await;
    let r = send(p.addr, audio_req("ava", 200_000)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    p.state.store.flush().await;
    assert_eq!(pico(&limits(&p, "ava").await["spent"]), AUDIO_COST);

    let done = Arc::new(AtomicUsize::new(0));
    let tasks = spawn_all(&p, 20, &done, || audio_req("ava", 200_000));
    eventually("16 refusals while 4 wait upstream", STEP, || async {
        (done.load(Ordering::SeqCst) >= 16).then_some(())
    })
    .await;
    assert_eq!(mock.wait_seen(5).await.len(), 5);
    gate.open();
    let mut ok = 0;
    for t in tasks {
        let a = within("request", t).await.unwrap();
        if a.status == 200 {
            ok += 1;
        } else {
            assert_openai_error(&a, 429, "requests", None, Some("budget_exceeded"));
        }
    }
    assert_eq!(ok, 4);
    let seen = mock.seen();
    assert_eq!(seen.len(), 5);
    assert!(seen.iter().all(|s| s.body.len() > 200_000), "whole uploads");
    let records = p.wait_records(5).await;
    assert_eq!(records.len(), 5);
    let spent = pico(&p.usage_raw("").await["cost"]);
    assert_eq!(spent, 5 * AUDIO_COST);
    assert!(spent <= DOLLAR / 2, "spent {spent} over the $0.50 budget");

    // An upload that declares no size is taken as 25 MiB (OpenAI's audio
    // limit): about $13 at the rate seen, over a $5 budget that the same
    // upload with its content-length fits.
    put_limits(&p, "abe", r#"{"budget":5,"period":"total"}"#).await;
    let sized = audio_req("abe", 200_000);
    let (parts, body) = sized.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let chunks: Vec<Bytes> = bytes.chunks(4096).map(Bytes::copy_from_slice).collect();
    let no_length = Request::from_parts(parts, chunked(chunks));
    let r = send(p.addr, no_length).await;
    assert_openai_error(&r, 429, "requests", None, Some("budget_exceeded"));
    assert_eq!(mock.seen().len(), 5);
    let r = send(p.addr, audio_req("abe", 200_000)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(mock.seen().len(), 6);
}

/// Endpoints tollgate cannot price (text to speech here) reserve the
/// `--reserve-floor` ($0.01 by default): with $0.05 in total, 5 of 20
/// concurrent requests go upstream; free endpoints (a model list) reserve
/// nothing and pass while the budget is fully reserved; the reservations
/// settle to the recorded cost (zero) afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_paid_endpoints_reserve_the_floor() {
    let gate = Gate::new();
    let g = gate.clone();
    let mock = Mock::start(move |s| {
        if s.method == Method::GET {
            return Reply::json(r#"{"object":"list","data":[]}"#);
        }
        Reply::json("{}").head_after(g.clone())
    })
    .await;
    let p = Proxy::start(&mock.url()).await;
    put_limits(&p, "sam", r#"{"budget":0.05,"period":"total"}"#).await;
    let speech = || {
        Request::post("/v1/audio/speech")
            .header("content-type", "application/json")
            .header("x-user", "sam")
            .body(full(r#"{"model":"tts-1","input":"hi","voice":"alloy"}"#))
            .unwrap()
    };
    let done = Arc::new(AtomicUsize::new(0));
    let tasks = spawn_all(&p, 20, &done, speech);
    eventually("15 refusals while 5 wait upstream", STEP, || async {
        (done.load(Ordering::SeqCst) >= 15).then_some(())
    })
    .await;
    assert_eq!(mock.wait_seen(5).await.len(), 5);
    let l = limits(&p, "sam").await;
    assert_eq!(pico(&l["reserved"]), DOLLAR / 20);
    let models = Request::get("/v1/models")
        .header("x-user", "sam")
        .body(empty())
        .unwrap();
    assert_eq!(
        send(p.addr, models).await.status,
        200,
        "free endpoints pass"
    );
    gate.open();
    let mut ok = 0;
    for t in tasks {
        let a = within("request", t).await.unwrap();
        if a.status == 200 {
            ok += 1;
        } else {
            assert_openai_error(&a, 429, "requests", None, Some("budget_exceeded"));
        }
    }
    assert_eq!(ok, 5);
    assert_eq!(p.wait_records(6).await.len(), mock.seen().len());
    p.state.store.flush().await;
    let l = limits(&p, "sam").await;
    assert_eq!(l["reserved"], "0");
    assert_eq!(l["spent"], "0");
}
