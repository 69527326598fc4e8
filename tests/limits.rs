//! Resource limits against hostile or careless clients: absurd token
//! counts (reservations that wrapped around), clients that leave before a
//! non-streamed answer is complete, and request bodies that stall or pile
//! up in memory.

mod common;

use common::*;
use http::Method;

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
