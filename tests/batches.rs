//! The Batch API metered end to end, against a mock upstream that speaks it
//! (create, status `in_progress` then a terminal state, output and error
//! files): one record per result line at the batch tier (half the standard
//! price), tagged with the batch and carrying its `customId`; `/usage`
//! filtered and grouped by batch; a batch followed across a restart and
//! metered once; a cancelled batch meters what completed; a client cannot
//! get batch prices by asking. Runs on PostgreSQL too
//! (`TOLLGATE_TEST_STORE=postgres`).

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use http::{Method, Request};
use serde_json::json;
use tollgate::access::AuthMode;

const MODEL: &str = "gpt-4o-mini";
/// $0.15 / $0.60 per 1M tokens: batch lines cost half.
const PRICE: &str =
    r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":0.15,"per1MAnswerTokens":0.6}"#;
const BATCH: &str = "batch_abc123";

/// The state the mock reports for the batch, and the files it has.
#[derive(Clone)]
struct Upstream {
    state: Arc<Mutex<&'static str>>,
}

impl Upstream {
    fn set(&self, s: &'static str) {
        *self.state.lock().unwrap() = s;
    }
}

fn line(custom_id: &str, prompt: u64, completion: u64) -> String {
    json!({
        "id": format!("batch_req_{custom_id}"),
        "custom_id": custom_id,
        "response": {
            "status_code": 200,
            "request_id": format!("req_{custom_id}"),
            "body": {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1_700_000_000,
                "model": "gpt-4o-mini-2024-07-18",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
            }
        },
        "error": null
    })
    .to_string()
}

async fn batch_mock() -> (Mock, Upstream) {
    let up = Upstream {
        state: Arc::new(Mutex::new("in_progress")),
    };
    let state = up.state.clone();
    let mock = Mock::start(move |seen| {
        let path = seen.path.as_str();
        let batch = |status: &str| {
            let (out, err) = match status {
                "completed" => (json!("file-out"), json!("file-err")),
                "cancelled" => (json!("file-part"), json!(null)),
                _ => (json!(null), json!(null)),
            };
            json!({
                "id": BATCH, "object": "batch", "endpoint": "/v1/chat/completions",
                "input_file_id": "file-in", "completion_window": "24h", "status": status,
                "output_file_id": out, "error_file_id": err,
            })
            .to_string()
        };
        match (&seen.method, path) {
            (&Method::POST, "/v1/batches") => Reply::json(batch("validating")),
            (&Method::GET, p) if p == format!("/v1/batches/{BATCH}") => {
                Reply::json(batch(&state.lock().unwrap()))
            }
            (&Method::GET, "/v1/files/file-out/content") => Reply::json(format!(
                "{}\n{}\n",
                line("req-1", 1000, 200),
                line("req-2", 2000, 100)
            )),
            (&Method::GET, "/v1/files/file-err/content") => Reply::json(
                json!({
                    "id": "batch_req_3", "custom_id": "req-3",
                    "response": {"status_code": 400, "request_id": "req_3",
                                 "body": {"error": {"message": "bad", "type": "invalid_request_error"}}},
                    "error": null
                })
                .to_string(),
            ),
            (&Method::GET, "/v1/files/file-part/content") => {
                Reply::json(format!("{}\n", line("req-1", 1000, 200)))
            }
            (&Method::POST, "/v1/chat/completions") => {
                Reply::json(completion(MODEL, "ok", Tok::new(1000, 200)))
            }
            _ => Reply::json(r#"{"error":{"message":"unknown"}}"#).status(404),
        }
    })
    .await;
    (mock, up)
}

fn builder(mock: &Mock) -> ProxyBuilder {
    builder_with_key(mock, "sk-upstream")
}

/// An instance whose upstream key tells its polls apart from others'.
fn builder_with_key(mock: &Mock, key: &str) -> ProxyBuilder {
    Proxy::builder(&mock.url())
        .token(key)
        .with(|c| c.batch_poll = Duration::from_millis(5))
}

fn create_req(user: &str, tags: &str) -> Request<ReqBody> {
    Request::post("/v1/batches")
        .header("content-type", "application/json")
        .header("x-user", user)
        .header("x-tollgate-tags", tags)
        .body(full(
            r#"{"input_file_id":"file-in","endpoint":"/v1/chat/completions","completion_window":"24h"}"#,
        ))
        .unwrap()
}

/// How many times the mock was asked for the batch's status.
fn polls(mock: &Mock) -> usize {
    let p = format!("/v1/batches/{BATCH}");
    mock.seen()
        .iter()
        .filter(|s| s.method == Method::GET && s.path == p)
        .count()
}

async fn wait_polls(mock: &Mock, n: usize) {
    eventually("batch polled", STEP, || async {
        (polls(mock) >= n).then_some(())
    })
    .await;
}

/// `tollgate_batches_ended_total{outcome}` of one instance.
async fn ended(p: &Proxy, outcome: &str) -> f64 {
    let r = p.get("/metrics").await;
    assert_eq!(r.status, 200, "{}", r.text());
    metric(
        &parse_metrics(&r.text()),
        "tollgate_batches_ended_total",
        &[("outcome", outcome)],
    )
    .unwrap_or(0.0)
}

/// The batch lines' records, by customId.
async fn lines(p: &Proxy) -> BTreeMap<String, BTreeMap<String, String>> {
    p.queries_raw("tag=batch")
        .await
        .into_iter()
        .map(|r| (r["customId"].trim_matches('"').to_owned(), r))
        .collect()
}

#[tokio::test]
async fn a_completed_batch_is_metered_line_by_line_at_batch_prices() {
    let (mock, up) = batch_mock().await;
    let p = builder(&mock).start().await;
    assert_eq!(p.set_price(MODEL, PRICE).await.status, 200);
    let r = p
        .admin_call(
            Method::PUT,
            "/users/ann/limits",
            r#"{"budget":1,"period":"total"}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // ann's only project is charged for the batch's lines too.
    let r = p
        .admin_call(Method::PUT, "/projects/ads", r#"{"members":["ann"]}"#)
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = p
        .admin_call(
            Method::PUT,
            "/projects/ads/limits",
            r#"{"budget":1,"period":"total"}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = send(p.addr, create_req("ann", "team=ads")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Followed while it runs, with backoff, on the upstream's own key.
    wait_polls(&mock, 2).await;
    assert!(mock
        .seen()
        .iter()
        .filter(|s| s.path.starts_with("/v1/batches/"))
        .all(|s| s.header("authorization").as_deref() == Some("Bearer sk-upstream")));
    up.set("completed");
    // The creation's own record, then one per line.
    let all = p.wait_records(4).await;
    p.state.store.flush().await;
    let got = lines(&p).await;
    assert_eq!(got.len(), 3, "{got:?}");
    let one = &got["req-1"];
    assert_eq!(one["user"], "\"ann\"");
    assert_eq!(one["model"], "\"gpt-4o-mini-2024-07-18\"");
    assert_eq!(one["endpoint"], "\"/v1/chat/completions\"");
    assert_eq!(one["status"], "200");
    assert_eq!(one["queryTokens"], "1000");
    assert_eq!(one["answerTokens"], "200");
    assert_eq!(one["requestId"], "\"req_req-1\"");
    // 1000 x 0.15 + 200 x 0.60 per 1M = 0.00027 standard; half in a batch.
    assert_eq!(one["cost"], "0.000135");
    assert_eq!(one["inputCost"], "0.000075");
    assert_eq!(one["outputCost"], "0.00006");
    assert_eq!(one["serviceTier"], "\"batch\"");
    assert_eq!(one["tierRates"], "\"batch\"");
    assert_eq!(one["tierAdjustment"], "-0.000135");
    assert_eq!(one["estimated"], "false");
    assert_eq!(one["project"], "\"ads\"");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&one["tags"]).unwrap(),
        json!({"batch": BATCH, "team": "ads"})
    );
    // 2000 x 0.15 + 100 x 0.60 per 1M = 0.00036; half.
    assert_eq!(got["req-2"]["cost"], "0.00018");
    assert_eq!(got["req-2"]["queryTokens"], "2000");
    // The error file's line: its status, no tokens, no cost.
    let err = &got["req-3"];
    assert_eq!(err["status"], "400");
    assert_eq!(err["queryTokens"], "0");
    assert_eq!(err["cost"], "0");
    // The creation itself: free, no customId, no batch tag.
    let created = all
        .iter()
        .find(|r| r["endpoint"] == "/v1/batches")
        .expect("the creation's record");
    assert_eq!(created["customId"], serde_json::Value::Null);
    assert_eq!(created["cost"], 0);

    // Reports filter and group by batch from the tag rollups.
    let u = p.usage_raw(&format!("tag=batch={BATCH}")).await;
    assert_eq!(u["numQueries"], "3");
    assert_eq!(u["queryTokens"], "3000");
    assert_eq!(u["cost"], "0.000315");
    // The lines count in the user's budget at once (no restart needed).
    let l = raw_object(&p.get("/users/ann/limits").await.text());
    assert_eq!(l["spent"], "0.000315");
    let l = raw_object(&p.get("/projects/ads/limits").await.text());
    assert_eq!(l["spent"], "0.000315");
    let u = p.usage_raw("project=ads").await;
    assert_eq!(u["cost"], "0.000315");
    let by = p.usage("group_by=tag:batch").await;
    let groups: BTreeMap<Option<String>, u64> = by
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["tags"]["batch"].as_str().map(str::to_owned),
                g["numQueries"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        groups,
        BTreeMap::from([(None, 1), (Some(BATCH.to_owned()), 3)])
    );
    // CSV: customId, then the project.
    let csv = p.get("/queries?format=csv&tag=batch").await.text();
    assert!(
        csv.lines().next().unwrap().ends_with(",customId,project"),
        "{csv}"
    );
    assert!(csv.lines().any(|l| l.ends_with(",req-2,ads")), "{csv}");

    // Metered once: each result file was read once, and the batch is no
    // longer polled once metered.
    let reads = |f: &str| {
        let path = format!("/v1/files/{f}/content");
        mock.seen().iter().filter(|s| s.path == path).count()
    };
    assert_eq!((reads("file-out"), reads("file-err")), (1, 1));
    assert_eq!(p.queries("").await.len(), 4);

    // A new price re-prices the stored lines, still at the batch tier:
    // 1000 x 0.30 + 200 x 0.60 per 1M = 0.00042, half.
    let r = p
        .set_price(
            MODEL,
            r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":0.3,"per1MAnswerTokens":0.6}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let got = lines(&p).await;
    assert_eq!(got["req-1"]["cost"], "0.00021");
    assert_eq!(got["req-1"]["serviceTier"], "\"batch\"");
}

#[tokio::test]
async fn a_batch_survives_a_restart_and_is_metered_once() {
    let (mock, up) = batch_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let mut first = builder(&mock).db(&db).start().await;
    assert_eq!(first.set_price(MODEL, PRICE).await.status, 200);
    let r = send(first.addr, create_req("bob", "")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    wait_polls(&mock, 1).await;
    first.stop().await;
    drop(first);
    // Two instances on the database: both load the open batch, both may
    // read its files, one claims it. It completes only once both follow it
    // (an instance starting after it was metered has nothing to follow).
    let mut second = builder_with_key(&mock, "sk-second").db(&db).start().await;
    let mut third = builder_with_key(&mock, "sk-third").db(&db).start().await;
    eventually("both instances follow the batch", STEP, || async {
        let seen = mock.seen();
        let polled = |key: &str| {
            seen.iter().any(|s| {
                s.path.starts_with("/v1/batches/")
                    && s.header("authorization").as_deref() == Some(key)
            })
        };
        (polled("Bearer sk-second") && polled("Bearer sk-third")).then_some(())
    })
    .await;
    up.set("completed");
    let ended = |outcome: &'static str| {
        let (second, third) = (&second, &third);
        async move { ended(second, outcome).await + ended(third, outcome).await }
    };
    eventually("both followers done with the batch", STEP, || async {
        (ended("metered").await + ended("metered_elsewhere").await >= 2.0).then_some(())
    })
    .await;
    assert_eq!(ended("metered").await, 1.0);
    assert_eq!(ended("metered_elsewhere").await, 1.0);
    second.stop().await;
    third.stop().await;
    drop((second, third));
    let last = builder(&mock).db(&db).start().await;
    let got = lines(&last).await;
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got["req-1"]["user"], "\"bob\"");
    assert_eq!(got["req-1"]["cost"], "0.000135");
    assert_eq!(last.queries("").await.len(), 4);
}

#[tokio::test]
async fn a_cancelled_batch_meters_what_completed() {
    let (mock, up) = batch_mock().await;
    // Keys mode: batches pass without --allow-unmetered, charged to the key's user.
    let p = builder(&mock)
        .admin("admin-key")
        .auth(AuthMode::Keys)
        .start()
        .await;
    assert_eq!(p.set_price(MODEL, PRICE).await.status, 200);
    let r = p.admin_call(Method::POST, "/users/cat/keys", "").await;
    assert_eq!(r.status, 201, "{}", r.text());
    let key = r.json()["key"].as_str().unwrap().to_owned();
    let r = send(
        p.addr,
        Request::post("/v1/batches")
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {key}"))
            .body(full(r#"{"input_file_id":"file-in","endpoint":"/v1/chat/completions","completion_window":"24h"}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    wait_polls(&mock, 1).await;
    up.set("cancelled");
    p.wait_records(2).await;
    p.state.store.flush().await;
    let got = lines(&p).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got["req-1"]["user"], "\"cat\"");
    assert_eq!(got["req-1"]["cost"], "0.000135");
}

#[tokio::test]
async fn a_client_asking_for_the_batch_tier_pays_standard_prices() {
    let (mock, _up) = batch_mock().await;
    let p = builder(&mock).start().await;
    assert_eq!(p.set_price(MODEL, PRICE).await.status, 200);
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "service_tier": "batch"});
    let r = p.chat("dan", &body.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    p.wait_records(1).await;
    let rec = &p.queries_raw("").await[0];
    assert_eq!(rec["cost"], "0.00027");
    assert_eq!(rec["serviceTier"], "null");
    assert_eq!(rec["tierAdjustment"], "0");
}
