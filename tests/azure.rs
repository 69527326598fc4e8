//! Azure OpenAI upstreams: clients call `/v1/...` with `model`; tollgate
//! sends it to the model's deployment path with `api-version` and the key
//! as `api-key`, and prices the record by the deployment's base model
//! whatever model name Azure answers with, streams included. A
//! `[[fallback]]` from OpenAI to Azure is recorded attempt by attempt.

mod common;

use common::*;
use serde_json::Value;
use tollgate::config::{Azure, Deployment, Fallback, NamedUpstream, Trust, UpstreamUrl};

/// What an Azure mock insists on: the deployment path of `deployment`, the
/// API version and the key as `api-key`, never `Authorization`. Answers
/// with a model name of Azure's own.
async fn azure_mock(deployment: &'static str) -> Mock {
    Mock::start(move |seen| {
        let want = format!("/openai/deployments/{deployment}/chat/completions?api-version=2024-06-01");
        let bad = if seen.path != want {
            Some(format!("path {} is not {want}", seen.path))
        } else if seen.header("api-key").as_deref() != Some("az-secret") {
            Some("no api-key".to_owned())
        } else if seen.header("authorization").is_some() {
            Some("an authorization header".to_owned())
        } else {
            None
        };
        if let Some(why) = bad {
            return Reply::json(format!(
                r#"{{"error":{{"message":"{why}","type":"invalid_request_error","param":null,"code":"mock"}}}}"#
            ))
            .status(404);
        }
        if seen.json()["stream"] == true {
            Reply::sse(
                chat_stream(seen, "azure-answer-name", &["hi", " there"], Tok::new(1_000_000, 1_000_000))
                    .into_iter()
                    .map(Step::Send)
                    .collect(),
            )
        } else {
            Reply::json(completion(
                "azure-answer-name",
                "hi",
                Tok::new(1_000_000, 1_000_000),
            ))
        }
    })
    .await
}

fn azure(name: &str, mock: &Mock, keys: &[&str]) -> NamedUpstream {
    NamedUpstream {
        name: name.into(),
        url: UpstreamUrl::parse(&mock.url()).unwrap(),
        keys: keys.iter().map(|k| k.to_string()).collect(),
        models: vec![],
        trust: Trust::default(),
        azure: Some(Azure {
            api_version: "2024-06-01".into(),
            deployments: vec![
                Deployment {
                    model: "gpt-4o".into(),
                    deployment: "my-4o".into(),
                    base_model: Some("base-4o".into()),
                },
                Deployment {
                    model: "plain".into(),
                    deployment: "plain-deploy".into(),
                    base_model: None,
                },
            ],
        }),
    }
}

fn openai(name: &str, mock: &Mock, keys: &[&str]) -> NamedUpstream {
    NamedUpstream {
        name: name.into(),
        url: UpstreamUrl::parse(&mock.url()).unwrap(),
        keys: keys.iter().map(|k| k.to_string()).collect(),
        models: vec![],
        trust: Trust::default(),
        azure: None,
    }
}

async fn start(ups: Vec<NamedUpstream>, fallbacks: Vec<Fallback>) -> Proxy {
    let proxy = Proxy::builder("http://127.0.0.1:9")
        .with(move |c| {
            c.upstreams = ups;
            c.fallbacks = fallbacks;
        })
        .start()
        .await;
    // $1 + $1 a million tokens for the base model; Azure's own answer name
    // costs a hundred times more, so a record priced by it shows.
    for (model, per) in [("base-4o", 1), ("azure-answer-name", 100), ("plain", 3)] {
        let r = proxy
            .set_price(
                model,
                &format!(
                    r#"{{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":{per},"per1MAnswerTokens":{per}}}"#
                ),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    proxy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_deployments_are_called_by_model_and_priced_by_their_base_model() {
    let mock = azure_mock("my-4o").await;
    let proxy = start(vec![azure("az", &mock, &["az-secret"])], vec![]).await;
    let req = http::Request::post("/v1/chat/completions")
        .header("x-user", "alice")
        .header("authorization", "Bearer client-own")
        .header("content-type", "application/json")
        .body(full(chat_body("gpt-4o", false)))
        .unwrap();
    let r = send(proxy.addr, req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-tollgate-upstream").as_deref(), Some("az"));

    // Streamed: include_usage spliced in, the usage chunk read and removed.
    let r = proxy.chat("alice", &chat_body("gpt-4o", true)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("hi"), "{}", r.text());
    assert!(!r.text().contains("\"usage\":{"), "{}", r.text());
    let seen = mock.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].json()["stream_options"]["include_usage"], true);

    let recs = proxy.wait_records(2).await;
    for r in &recs {
        assert_eq!(r["upstream"], "az", "{r}");
        assert_eq!(r["requestedModel"], "gpt-4o");
        assert_eq!(r["model"], "base-4o", "{r}");
        assert_eq!(r["queryTokens"], 1_000_000);
        assert_eq!(r["answerTokens"], 1_000_000);
        assert_eq!(r["estimated"], false);
        assert_eq!(r["priced"], true);
        assert_eq!(r["cost"], 2.0, "priced by the base model: {r}");
    }
}

/// Without a base model the deployment's records are priced by the model
/// the client asked for; a request without a model goes to `/openai/...`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_base_model_the_requested_model_prices_and_modelless_paths_keep_their_shape() {
    let mock = azure_mock("plain-deploy").await;
    let proxy = start(vec![azure("az", &mock, &["az-secret"])], vec![]).await;
    let r = proxy.chat("alice", &chat_body("plain", false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let recs = proxy.wait_records(1).await;
    assert_eq!(recs[0]["model"], "plain");
    assert_eq!(recs[0]["cost"], 6.0, "{:?}", recs[0]);

    let r = send(
        proxy.addr,
        http::Request::get("/v1/models?limit=2")
            .header("x-user", "alice")
            .body(full(""))
            .unwrap(),
    )
    .await;
    // The mock refuses anything but a deployment path, naming what it got.
    assert_eq!(r.status, 404);
    assert!(
        r.text()
            .contains("path /openai/models?limit=2&api-version=2024-06-01 is not"),
        "{}",
        r.text()
    );
    // A model the resource has no deployment of is not served by it.
    let r = proxy.chat("alice", &chat_body("gpt-4o-mini", false)).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
}

/// OpenAI first, Azure as its fallback: OpenAI's 429 (every key resting)
/// is recorded under `openai`, Azure serves, priced by its base model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_falls_back_to_an_azure_deployment() {
    let limited = Mock::start(|_| {
        Reply::json(r#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#)
            .status(429)
            .header("retry-after", "60")
    })
    .await;
    let az = azure_mock("my-4o").await;
    let proxy = start(
        vec![
            openai("openai", &limited, &["sk-openai"]),
            azure("azure-east", &az, &["az-secret"]),
        ],
        vec![Fallback {
            model: "gpt-4o".into(),
            upstreams: vec!["openai".into(), "azure-east".into()],
        }],
    )
    .await;
    let r = proxy.chat("alice", &chat_body("gpt-4o", true)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("x-tollgate-upstream").as_deref(),
        Some("azure-east")
    );
    assert_eq!(
        limited.seen()[0].header("authorization").as_deref(),
        Some("Bearer sk-openai")
    );
    assert!(limited.seen()[0].header("api-key").is_none());
    proxy.wait_records(2).await;
    let recs: Vec<Value> = proxy.queries("order=asc").await;
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert_eq!(recs[0]["upstream"], "openai");
    assert_eq!(recs[0]["status"], 429);
    assert_eq!(recs[0]["queryTokens"], 0);
    assert_eq!(recs[1]["upstream"], "azure-east");
    assert_eq!(recs[1]["status"], 200);
    assert_eq!(recs[1]["cost"], 2.0);
}

/// Clients may call tollgate the way `AzureOpenAI` SDKs do:
/// `/openai/deployments/{model}/...?api-version=...` with the key as
/// `api-key`. The path's deployment is the model asked for; the record is
/// the `/v1/` endpoint's; upstream gets its own deployment, API version
/// and key, never the client's tollgate key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_shaped_client_paths_are_served_like_v1() {
    let mock = azure_mock("my-4o").await;
    let ups = vec![azure("az", &mock, &["az-secret"])];
    let proxy = Proxy::builder("http://127.0.0.1:9")
        .admin("adm-key")
        .auth(tollgate::access::AuthMode::Keys)
        .with(move |c| c.upstreams = ups)
        .start()
        .await;
    let p = proxy
        .set_price(
            "base-4o",
            r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":1,"per1MAnswerTokens":1}"#,
        )
        .await;
    assert_eq!(p.status, 200, "{}", p.text());
    let r = proxy
        .admin_call(http::Method::POST, "/users/alice/keys", "")
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let key = r.json()["key"].as_str().unwrap().to_owned();
    let call = |path: &str, body: String| {
        http::Request::post(path)
            .header("api-key", key.as_str())
            .header("content-type", "application/json")
            .body(full(body))
            .unwrap()
    };
    let r = send(
        proxy.addr,
        call(
            "/openai/deployments/gpt-4o/chat/completions?api-version=2024-02-01",
            chat_body("gpt-4o", true),
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-tollgate-upstream").as_deref(), Some("az"));
    let seen = mock.seen();
    assert_eq!(seen.len(), 1);
    assert!(
        !seen[0]
            .headers
            .iter()
            .any(|(_, v)| v.as_bytes() == key.as_bytes()),
        "the tollgate key never goes upstream"
    );
    let recs = proxy.wait_records(1).await;
    assert_eq!(recs[0]["user"], "alice");
    assert_eq!(recs[0]["endpoint"], "/v1/chat/completions");
    assert_eq!(recs[0]["requestedModel"], "gpt-4o");
    assert_eq!(recs[0]["cost"], 2.0, "{:?}", recs[0]);

    // The body may not name another model than the path's deployment.
    let r = send(
        proxy.addr,
        call(
            "/openai/deployments/gpt-4o/chat/completions?api-version=2024-02-01",
            chat_body("plain", false),
        ),
    )
    .await;
    assert_openai_error(&r, 400, "invalid_request_error", Some("model"), None);
    // A deployment that is not a plain name never goes anywhere.
    let r = send(
        proxy.addr,
        call(
            "/openai/deployments/..%2Fx/chat/completions",
            chat_body("gpt-4o", false),
        ),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = send(
        proxy.addr,
        call(
            "/openai/deployments/gpt-4o/../../../admin",
            chat_body("gpt-4o", false),
        ),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(mock.seen().len(), 1);
}
