//! Budget alerts: a local webhook receiver (a mock the test owns) sees each
//! threshold once per period, a refusal once, retries after a failure, and
//! nothing again after a restart; a receiver that never answers does not
//! hold up requests.

mod common;

use std::time::Duration;

use common::*;
use http::Method;
use serde_json::Value;

/// $100 per 1M prompt tokens, answers free: each request of 1,000 prompt
/// tokens costs $0.10 and reserves little beyond its prompt.
const PRICE: &str =
    r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":100,"per1MAnswerTokens":0}"#;

async fn upstream() -> Mock {
    Mock::start(|_| Reply::json(completion("gpt-a", "ok", Tok::new(1000, 0)))).await
}

async fn proxy(upstream: &Mock, webhook: &Mock, db: Option<&std::path::Path>) -> Proxy {
    let hook: http::Uri = format!("{}/hooks/budget", webhook.url()).parse().unwrap();
    let mut b = Proxy::builder(&upstream.url()).with(move |c| c.alert_webhook = Some(hook));
    if let Some(db) = db {
        b = b.db(db);
    }
    b.start().await
}

fn posts(webhook: &Mock) -> Vec<Value> {
    webhook
        .seen()
        .iter()
        .map(|s| {
            assert_eq!(s.method, Method::POST);
            assert_eq!(s.path, "/hooks/budget");
            assert_eq!(
                s.header("content-type").as_deref(),
                Some("application/json")
            );
            s.json()
        })
        .collect()
}

async fn chat(p: &Proxy) -> u16 {
    p.chat("alice", &chat_body("gpt-a", false))
        .await
        .status
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_threshold_and_the_refusal_are_announced_once_per_period() {
    let up = upstream().await;
    // The first delivery fails: it is retried.
    let webhook = Mock::start(|seen| {
        let r = Reply::json("ok");
        if seen.n == 0 {
            r.status(500)
        } else {
            r
        }
    })
    .await;
    let mut p = proxy(&up, &webhook, None).await;
    assert_eq!(p.set_price("gpt-a", PRICE).await.status, 200);
    let r = p
        .admin_call(
            Method::PUT,
            "/users/alice/limits",
            r#"{"budget":0.5,"period":"day"}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = p
        .admin_call(
            Method::PUT,
            "/users/bob/limits",
            r#"{"budget":100,"period":"day"}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(p.chat("bob", &chat_body("gpt-a", false)).await.status, 200);

    // $0.20 of $0.50: under 50%, nothing.
    for _ in 0..2 {
        assert_eq!(chat(&p).await, 200);
    }
    // $0.30: 50% crossed, announced after one failed try.
    assert_eq!(chat(&p).await, 200);
    let seen = webhook.wait_seen(2).await;
    let fifty = seen[1].json();
    assert_eq!(seen[0].json(), fifty, "the retry resends the same message");
    assert_eq!(fifty["event"], "budget_threshold");
    assert_eq!(fifty["user"], "alice");
    assert_eq!(fifty["threshold"], 50);
    assert_eq!(fifty["period"], "day");
    assert_eq!(fifty["spent"], "0.3");
    assert_eq!(fifty["budget"], "0.5");
    let text = fifty["text"].as_str().unwrap();
    assert!(
        text.contains("alice") && text.contains("50%") && text.contains("$0.3 of $0.5"),
        "{text}"
    );
    assert!(
        fifty["periodStart"]
            .as_str()
            .unwrap()
            .ends_with("T00:00:00.000Z"),
        "{fifty}"
    );

    // $0.40: 80%.
    assert_eq!(chat(&p).await, 200);
    let seen = webhook.wait_seen(3).await;
    assert_eq!(seen[2].json()["threshold"], 80);
    // $0.50: 100%.
    assert_eq!(chat(&p).await, 200);
    let seen = webhook.wait_seen(4).await;
    assert_eq!(seen[3].json()["threshold"], 100);
    assert_eq!(seen[3].json()["spent"], "0.5");
    // Refused twice: announced once.
    for _ in 0..2 {
        assert_eq!(chat(&p).await, 429);
    }
    let seen = webhook.wait_seen(5).await;
    let refused = seen[4].json();
    assert_eq!(refused["event"], "budget_refused");
    assert_eq!(refused["user"], "alice");
    assert!(refused.get("threshold").is_none(), "{refused}");
    assert!(refused["text"].as_str().unwrap().contains("refused"));

    // Several more checks (one a second) and a restart on the same
    // database announce nothing again; bob, far below 50%, never appears.
    p.stop().await;
    let db = p.db.clone();
    let p2 = proxy(&up, &webhook, Some(&db)).await;
    assert_eq!(chat(&p2).await, 429);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let all = posts(&webhook);
    assert_eq!(all.len(), 5, "{all:#?}");
    assert!(all.iter().all(|m| m["user"] == "alice"));
    drop(p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_never_answers_does_not_hold_up_requests() {
    let up = upstream().await;
    let never = Gate::new();
    let g = never.clone();
    let webhook = Mock::start(move |_| Reply::json("ok").head_after(g.clone())).await;
    let p = proxy(&up, &webhook, None).await;
    assert_eq!(p.set_price("gpt-a", PRICE).await.status, 200);
    let r = p
        .admin_call(
            Method::PUT,
            "/users/alice/limits",
            r#"{"budget":0.2,"period":"day"}"#,
        )
        .await;
    assert_eq!(r.status, 200);
    // Crosses 50% and 100%, then is refused: three alerts, none answered.
    for _ in 0..2 {
        assert_eq!(chat(&p).await, 200);
    }
    webhook.wait_seen(1).await;
    let mut refused = 0;
    for _ in 0..20 {
        if chat(&p).await == 429 {
            refused += 1;
        }
    }
    assert_eq!(refused, 20);
    // Other users go on while the deliveries hang.
    for _ in 0..20 {
        assert_eq!(
            p.chat("carol", &chat_body("gpt-a", false)).await.status,
            200
        );
    }
    assert_eq!(p.wait_records(22).await.len(), 22);
    webhook.wait_seen(2).await;
    assert!(
        webhook.seen().len() <= 3,
        "one post per alert while unanswered"
    );
    drop(never);
}

#[test]
fn bad_alert_settings_are_refused() {
    use tollgate::config::{parse, Command};
    let run = |args: &[&str]| {
        parse(args.iter().map(|s| s.to_string()), &|_| None).map(|c| match c {
            Command::Run(c) => c,
            _ => panic!("not a run"),
        })
    };
    let c = run(&[
        "--alert-webhook",
        "https://hooks.example/x",
        "--alert-thresholds",
        "90,25%,90",
    ])
    .unwrap();
    assert_eq!(c.alert_thresholds, vec![25, 90]);
    assert_eq!(c.alert_webhook.unwrap().host(), Some("hooks.example"));
    for bad in [
        vec!["--alert-webhook", "ftp://x/y"],
        vec!["--alert-webhook", "not a url"],
        vec!["--alert-thresholds", "0,50"],
        vec!["--alert-thresholds", "150"],
        vec!["--alert-thresholds", ""],
    ] {
        let e = run(&bad).expect_err(bad[1]);
        assert!(e.to_string().contains(bad[0]), "{e}");
    }
    // The webhook URL (a Slack URL holds a secret) is not printed whole.
    let c = run(&[
        "--alert-webhook",
        "https://hooks.example/services/T0/B0/secret",
    ])
    .unwrap();
    assert!(!format!("{c:?}").contains("secret"));
}
