//! Projects end to end: `/projects` CRUD (admin only, bad names and bodies
//! refused by field), keys bound to a project at creation, a request held to
//! its project's limits as well as its user's (a refusal by either leaves
//! nothing reserved with the other, and says whose limit it was), records
//! carrying the project (JSON, CSV, `/queries?project=`) and `/usage`
//! grouped by and filtered on the project. Runs on PostgreSQL too
//! (`TOLLGATE_TEST_STORE=postgres`).

mod common;

use std::collections::BTreeMap;

use common::*;
use http::{Method, Request};
use serde_json::{json, Value};
use tollgate::access::AuthMode;

/// $0.01 per prompt and per answer token: the mock's 3 + 4 tokens cost
/// $0.07, while a request reserves about $0.67 (its ~170-byte body as
/// ~57 prompt tokens, plus 10 answer tokens).
const PRICE: &str =
    r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":10000,"per1MAnswerTokens":10000}"#;

async fn chat_mock() -> Mock {
    Mock::start(|_| Reply::json(completion("m", "ok", Tok::new(3, 4)))).await
}

fn req_as(user: &str) -> Request<ReqBody> {
    Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("x-user", user)
        .body(full(chat_body("m", false)))
        .unwrap()
}

fn req_with_key(key: &str) -> Request<ReqBody> {
    Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(full(chat_body("m", false)))
        .unwrap()
}

async fn put_project(p: &Proxy, name: &str, members: &[&str]) -> Resp {
    p.admin_call(
        Method::PUT,
        &format!("/projects/{name}"),
        &json!({ "members": members }).to_string(),
    )
    .await
}

async fn put_ok(p: &Proxy, path: &str, body: &str) {
    let r = p.admin_call(Method::PUT, path, body).await;
    assert_eq!(r.status, 200, "PUT {path}: {}", r.text());
}

/// The limits answer of a path, every field as raw JSON text.
async fn limits_at(p: &Proxy, path: &str) -> BTreeMap<String, String> {
    let r = p.get(path).await;
    assert_eq!(r.status, 200, "{}", r.text());
    raw_object(&r.text())
}

#[tokio::test]
async fn projects_are_stored_listed_and_deleted_by_admins_only() {
    let mock = chat_mock().await;
    let p = Proxy::builder(&mock.url()).admin("root-key").start().await;

    let r = put_project(&p, "search", &["bob", "ann", "bob"]).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"name": "search", "members": ["ann", "bob"], "limits": null})
    );
    // A second PUT replaces the members: 200, not 201.
    let r = put_project(&p, "search", &["ann"]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["members"], json!(["ann"]));
    assert_eq!(put_project(&p, "ads", &["ann"]).await.status, 201);
    let all = p.get_json("/projects").await;
    let names: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ads", "search"]);
    assert_eq!(
        p.get_json("/projects/search").await["members"],
        json!(["ann"])
    );

    // Limits of a project: the body of a user's, with its spend.
    put_ok(
        &p,
        "/projects/search/limits",
        r#"{"budget":2.5,"period":"day","requestsPerMinute":7}"#,
    )
    .await;
    let l = limits_at(&p, "/projects/search/limits").await;
    assert_eq!(l["budget"], "2.5");
    assert_eq!(l["period"], "\"day\"");
    assert_eq!(l["requestsPerMinute"], "7");
    assert_eq!(l["spent"], "0");
    assert_eq!(l["remaining"], "2.5");
    // Replacing the members keeps the limits.
    assert_eq!(put_project(&p, "search", &["ann", "cy"]).await.status, 200);
    assert_eq!(
        p.get_json("/projects/search").await["limits"]["budget"],
        json!(2.5)
    );
    let r = p
        .admin_call(Method::PUT, "/projects/search/limits", r#"{"budget":-1}"#)
        .await;
    assert_openai_error(&r, 400, "invalid_request_error", Some("budget"), None);
    let r = p
        .admin_call(Method::PUT, "/projects/ghost/limits", r#"{"budget":1}"#)
        .await;
    assert_openai_error(&r, 404, "invalid_request_error", None, Some("not_found"));

    // Bad names and bodies, by field.
    for path in [
        "/projects/a%20b",
        "/projects/%40project",
        "/projects/caf%C3%A9",
    ] {
        let r = p.admin_call(Method::PUT, path, r#"{"members":[]}"#).await;
        assert_openai_error(&r, 400, "invalid_request_error", Some("name"), None);
    }
    let long = format!("/projects/{}", "x".repeat(65));
    let r = p.admin_call(Method::PUT, &long, r#"{"members":[]}"#).await;
    assert_openai_error(&r, 400, "invalid_request_error", Some("name"), None);
    for (body, param) in [
        (r#"{"members":"ann"}"#, "members"),
        (r#"{"members":[" ann"]}"#, "members"),
        (r#"{"members":[""]}"#, "members"),
        ("{}", "members"),
        ("not json", "members"),
        (r#"{"members":[],"owner":"ann"}"#, "owner"),
    ] {
        let r = p.admin_call(Method::PUT, "/projects/new", body).await;
        assert_openai_error(&r, 400, "invalid_request_error", Some(param), None);
    }
    assert_eq!(p.get("/projects/new").await.status, 404);

    // Admin only.
    let r = send(p.addr, get("/projects")).await;
    assert_openai_error(
        &r,
        401,
        "invalid_request_error",
        None,
        Some("invalid_api_key"),
    );
    let r = send(
        p.addr,
        Request::put("/projects/x")
            .body(full(r#"{"members":[]}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(p.get("/projects/x").await.status, 404);

    // Delete: the project and its limits go.
    let r = p.admin_call(Method::DELETE, "/projects/search", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = p.admin_call(Method::DELETE, "/projects/search", "").await;
    assert_openai_error(&r, 404, "invalid_request_error", None, Some("not_found"));
    assert_eq!(p.get("/projects/search").await.status, 404);
    assert_eq!(p.get("/projects/search/limits").await.status, 404);
    let all = p.get_json("/projects").await;
    assert_eq!(all.as_array().unwrap().len(), 1, "{all}");
}

#[tokio::test]
async fn projects_and_their_limits_survive_a_restart() {
    let mock = chat_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let mut p = Proxy::builder(&mock.url()).db(&db).start().await;
    assert_eq!(p.set_price("m", PRICE).await.status, 200);
    assert_eq!(put_project(&p, "search", &["ann"]).await.status, 201);
    put_ok(&p, "/projects/search/limits", r#"{"budget":100}"#).await;
    assert_eq!(send(p.addr, req_as("ann")).await.status, 200);
    p.wait_records(1).await;
    p.stop().await;
    let p = Proxy::builder(&mock.url()).db(&db).start().await;
    let v = p.get_json("/projects/search").await;
    assert_eq!(v["members"], json!(["ann"]));
    assert_eq!(v["limits"]["budget"], json!(100));
    // The spend so far is read back from the records.
    assert_eq!(v["limits"]["spent"], json!(0.07), "{v}");
}

#[tokio::test]
async fn keys_are_bound_to_a_project_at_creation() {
    let mock = chat_mock().await;
    let p = Proxy::builder(&mock.url())
        .auth(AuthMode::Keys)
        .start()
        .await;
    assert_eq!(put_project(&p, "search", &["ann", "bob"]).await.status, 201);
    assert_eq!(put_project(&p, "ads", &["bob"]).await.status, 201);

    let new_key = |user: &'static str, body: &'static str| {
        let p = &p;
        async move {
            p.admin_call(Method::POST, &format!("/users/{user}/keys"), body)
                .await
        }
    };
    // ann is in one project: her key is bound to it.
    let r = new_key("ann", "").await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["project"], "search");
    let ann = r.json()["key"].as_str().unwrap().to_owned();
    // bob is in two: no project unless named.
    let r = new_key("bob", "").await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(r.json().get("project").is_none(), "{}", r.text());
    let bob_plain = r.json()["key"].as_str().unwrap().to_owned();
    let plain_id = r.json()["id"].clone();
    let r = new_key("bob", r#"{"project":"ads"}"#).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["project"], "ads");
    let bob_ads = r.json()["key"].as_str().unwrap().to_owned();
    let ads_id = r.json()["id"].clone();
    // A project the user is not in, or none of that name, or a bad name: 400.
    for body in [
        r#"{"project":"ads"}"#,
        r#"{"project":"ghost"}"#,
        r#"{"project":"a b"}"#,
    ] {
        let r = new_key("ann", body).await;
        assert_openai_error(&r, 400, "invalid_request_error", Some("project"), None);
    }
    // Listed with their projects (keys made in one millisecond list in
    // either order).
    let listed = p.get_json("/users/bob/keys").await;
    let of = |id: &Value| {
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == *id)
            .unwrap_or_else(|| panic!("{id} in {listed}"))
            .clone()
    };
    assert!(of(&plain_id).get("project").is_none(), "{listed}");
    assert_eq!(of(&ads_id)["project"], "ads");

    for k in [&ann, &bob_plain, &bob_ads] {
        let r = send(p.addr, req_with_key(k)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let recs = p.wait_records(3).await;
    let projects: Vec<&Value> = recs.iter().map(|r| &r["project"]).collect();
    assert_eq!(projects, [&json!("search"), &Value::Null, &json!("ads")]);
    // A key stays bound when its user's projects change later.
    assert_eq!(put_project(&p, "search", &["bob"]).await.status, 200);
    assert_eq!(send(p.addr, req_with_key(&ann)).await.status, 200);
    let recs = p.wait_records(4).await;
    assert_eq!(recs[3]["project"], "search");
}

#[tokio::test]
async fn header_users_are_charged_to_their_only_project() {
    let mock = chat_mock().await;
    let p = Proxy::start(&mock.url()).await;
    assert_eq!(put_project(&p, "search", &["ann", "bob"]).await.status, 201);
    assert_eq!(put_project(&p, "ads", &["bob"]).await.status, 201);
    for u in ["ann", "bob", "cy"] {
        assert_eq!(send(p.addr, req_as(u)).await.status, 200);
    }
    let recs = p.wait_records(3).await;
    let got: Vec<(&str, &Value)> = recs
        .iter()
        .map(|r| (r["user"].as_str().unwrap(), &r["project"]))
        .collect();
    assert_eq!(
        got,
        [
            ("ann", &json!("search")),
            ("bob", &Value::Null),
            ("cy", &Value::Null)
        ]
    );
}

#[tokio::test]
async fn a_project_budget_refuses_while_the_user_has_room() {
    let mock = chat_mock().await;
    let p = Proxy::builder(&mock.url())
        .reserve_answer_tokens(10)
        .start()
        .await;
    assert_eq!(p.set_price("m", PRICE).await.status, 200);
    assert_eq!(put_project(&p, "search", &["ann"]).await.status, 201);
    put_ok(
        &p,
        "/users/ann/limits",
        r#"{"budget":100,"requestsPerMinute":2}"#,
    )
    .await;
    put_ok(&p, "/projects/search/limits", r#"{"budget":0.1}"#).await;

    // The project's $0.10 cannot hold the ~$0.67 reservation; ann's $100 can.
    let r = send(p.addr, req_as("ann")).await;
    let msg = assert_openai_error(&r, 429, "requests", None, Some("budget_exceeded"));
    assert!(msg.contains("project"), "{msg}");
    assert!(mock.seen().is_empty(), "a refused request reached upstream");
    // Nothing of it stays reserved against ann.
    let l = limits_at(&p, "/users/ann/limits").await;
    assert_eq!((l["spent"].as_str(), l["reserved"].as_str()), ("0", "0"));
    let l = limits_at(&p, "/projects/search/limits").await;
    assert_eq!((l["spent"].as_str(), l["reserved"].as_str()), ("0", "0"));

    // With room in the project, ann's two requests a minute both pass: the
    // refused one was not counted against her rate either.
    put_ok(&p, "/projects/search/limits", r#"{"budget":100}"#).await;
    for _ in 0..2 {
        let r = send(p.addr, req_as("ann")).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    p.wait_records(2).await;
    // Both limits settled the real cost, 2 x $0.07.
    for path in ["/users/ann/limits", "/projects/search/limits"] {
        let l = limits_at(&p, path).await;
        assert_eq!(l["spent"], "0.14", "{path}");
        assert_eq!(l["reserved"], "0", "{path}");
    }
    assert_eq!(p.usage("").await["rejectedQueries"], 1);
}

#[tokio::test]
async fn a_user_limit_refuses_while_the_project_has_room() {
    let mock = chat_mock().await;
    let p = Proxy::builder(&mock.url())
        .reserve_answer_tokens(10)
        .start()
        .await;
    assert_eq!(p.set_price("m", PRICE).await.status, 200);
    assert_eq!(put_project(&p, "search", &["ann", "bob"]).await.status, 201);
    put_ok(&p, "/users/ann/limits", r#"{"budget":0.1}"#).await;
    put_ok(
        &p,
        "/projects/search/limits",
        r#"{"budget":100,"requestsPerMinute":1}"#,
    )
    .await;

    let r = send(p.addr, req_as("ann")).await;
    let msg = assert_openai_error(&r, 429, "requests", None, Some("budget_exceeded"));
    assert!(msg.starts_with("This user"), "{msg}");
    let l = limits_at(&p, "/projects/search/limits").await;
    assert_eq!((l["spent"].as_str(), l["reserved"].as_str()), ("0", "0"));
    // The project's one request a minute is still there for bob; then the
    // project's rate refuses, saying so.
    assert_eq!(send(p.addr, req_as("bob")).await.status, 200);
    let r = send(p.addr, req_as("bob")).await;
    let msg = assert_openai_error(&r, 429, "requests", None, Some("rate_limit_exceeded"));
    assert!(
        msg.contains("project") && msg.contains("requests-per-minute"),
        "{msg}"
    );
    assert_eq!(mock.seen().len(), 1);
}

#[tokio::test]
async fn records_and_usage_by_project() {
    let mock = chat_mock().await;
    let p = Proxy::start(&mock.url()).await;
    assert_eq!(p.set_price("m", PRICE).await.status, 200);
    assert_eq!(put_project(&p, "search", &["ann"]).await.status, 201);
    assert_eq!(put_project(&p, "ads", &["bob"]).await.status, 201);
    for u in ["ann", "ann", "bob", "cy"] {
        assert_eq!(send(p.addr, req_as(u)).await.status, 200);
    }
    let recs = p.wait_records(4).await;
    assert_eq!(recs[0]["project"], "search");
    assert_eq!(recs[3]["project"], Value::Null);

    // /queries filters by project; CSV ends with the project column.
    assert_eq!(p.queries("project=search").await.len(), 2);
    assert_eq!(p.queries("project=ads").await.len(), 1);
    assert_eq!(p.queries("project=none").await.len(), 0);
    let csv = p.get("/queries?format=csv").await.text();
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].ends_with(",customId,project"), "{}", lines[0]);
    assert!(lines[1].ends_with(",search"), "{}", lines[1]);
    assert!(lines[4].ends_with(",,"), "{}", lines[4]);

    // /usage by project, from the rollups (no time bounds) and from the
    // records (bounds inside today): the same rows.
    let want = json!([
        {"project": null, "numQueries": 1, "cost": 0.07},
        {"project": "ads", "numQueries": 1, "cost": 0.07},
        {"project": "search", "numQueries": 2, "cost": 0.14},
    ]);
    let after = tollgate::timestamp::format_ms(now_ms() - 60_000);
    let before = tollgate::timestamp::format_ms(now_ms() + 60_000);
    let bounded = format!(
        "group_by=project&after={}&before={}",
        after.replace('+', "%2B"),
        before.replace('+', "%2B")
    );
    for q in ["group_by=project", bounded.as_str()] {
        let rows = p.usage(q).await;
        let got: Vec<Value> = rows
            .as_array()
            .unwrap()
            .iter()
            .map(|r| json!({"project": r["project"], "numQueries": r["numQueries"], "cost": r["cost"]}))
            .collect();
        assert_eq!(Value::Array(got), want, "{q}: {rows}");
    }
    let u = p.usage("project=search").await;
    assert_eq!(u["numQueries"], 2);
    let rows = p.usage("group_by=project,user&project=ads").await;
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    assert_eq!(rows[0]["user"], "bob");
    assert_eq!(rows[0]["project"], "ads");

    // Bad input, by parameter.
    for (q, param) in [
        ("project=a%20b", "project"),
        ("project=ads&tag=team", "tag"),
        ("tag=team&project=ads", "project"),
        ("group_by=project,tag:team", "group_by"),
        ("group_by=tag:team&project=ads", "group_by"),
    ] {
        let r = p.get(&format!("/usage?{q}")).await;
        assert_openai_error(&r, 400, "invalid_request_error", Some(param), None);
    }
}

/// PostgreSQL only: a project made, changed or deleted on one instance
/// reaches another within a second (the `limits` version), and the other
/// holds requests to the project's limits.
#[tokio::test]
async fn projects_reach_other_instances_on_postgres() {
    if !pg_mode() {
        eprintln!("skipped: several instances need TOLLGATE_TEST_STORE=postgres");
        return;
    }
    let mock = chat_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shared.db");
    let p1 = Proxy::builder(&mock.url())
        .db(&db)
        .reserve_answer_tokens(10)
        .start()
        .await;
    let p2 = Proxy::builder(&mock.url())
        .db(&db)
        .reserve_answer_tokens(10)
        .start()
        .await;
    assert_eq!(p1.set_price("m", PRICE).await.status, 200);
    assert_eq!(put_project(&p1, "search", &["ann"]).await.status, 201);
    put_ok(&p1, "/projects/search/limits", r#"{"budget":0.1}"#).await;
    eventually("the project reaches the other instance", STEP, || async {
        let r = p2.get("/projects/search").await;
        (r.status == 200 && r.json()["limits"]["budget"] == json!(0.1)).then_some(())
    })
    .await;
    assert_eq!(p2.set_price("m", PRICE).await.status, 200);
    let r = send(p2.addr, req_as("ann")).await;
    let msg = assert_openai_error(&r, 429, "requests", None, Some("budget_exceeded"));
    assert!(msg.contains("project"), "{msg}");
    let r = p1.admin_call(Method::DELETE, "/projects/search", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    eventually("the deletion reaches the other instance", STEP, || async {
        (p2.get("/projects/search").await.status == 404).then_some(())
    })
    .await;
    assert_eq!(send(p2.addr, req_as("ann")).await.status, 200);
    let recs = p2.wait_records(1).await;
    assert_eq!(recs[0]["project"], Value::Null);
}

/// A project with a webhook of its own gets its budget alerts there (even
/// without `--alert-webhook`): each threshold once, then the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn project_alerts_go_to_the_projects_own_webhook() {
    let up = Mock::start(|_| Reply::json(completion("m", "ok", Tok::new(1000, 0)))).await;
    let hook = Mock::start(|_| Reply::json("ok")).await;
    let p = Proxy::start(&up.url()).await;
    // $0.10 per request of 1000 prompt tokens.
    let price =
        r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":100,"per1MAnswerTokens":0}"#;
    assert_eq!(p.set_price("m", price).await.status, 200);
    let url = format!("{}/hooks/search", hook.url());
    let r = p
        .admin_call(
            Method::PUT,
            "/projects/search",
            &json!({"members": ["ann"], "alerts": {"webhook": url}}).to_string(),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["alerts"], json!({"webhookHost": "127.0.0.1"}));
    let r = p
        .admin_call(
            Method::PUT,
            "/projects/search",
            r#"{"members":[],"alerts":{"webhook":"ftp://x/y"}}"#,
        )
        .await;
    assert_openai_error(&r, 400, "invalid_request_error", Some("alerts"), None);
    // A PUT without `alerts` keeps the webhook.
    assert_eq!(put_project(&p, "search", &["ann"]).await.status, 200);
    put_ok(
        &p,
        "/projects/search/limits",
        r#"{"budget":0.5,"period":"day"}"#,
    )
    .await;
    for _ in 0..3 {
        assert_eq!(send(p.addr, req_as("ann")).await.status, 200);
    }
    // $0.30 of $0.50: 50% crossed.
    let seen = hook.wait_seen(1).await;
    let m = seen[0].json();
    assert_eq!(seen[0].path, "/hooks/search");
    assert_eq!(m["event"], "budget_threshold");
    assert_eq!(m["project"], "search");
    assert!(m.get("user").is_none(), "{m}");
    assert_eq!(m["threshold"], 50);
    assert!(
        m["text"].as_str().unwrap().contains("project search"),
        "{m}"
    );
    for _ in 0..2 {
        assert_eq!(send(p.addr, req_as("ann")).await.status, 200);
    }
    // $0.50: 100% (80% noted with it), then a refusal.
    let seen = hook.wait_seen(2).await;
    assert_eq!(seen[1].json()["threshold"], 100);
    let r = send(p.addr, req_as("ann")).await;
    assert_openai_error(&r, 429, "requests", None, Some("budget_exceeded"));
    let seen = hook.wait_seen(3).await;
    assert_eq!(seen[2].json()["event"], "budget_refused");
    assert_eq!(seen[2].json()["project"], "search");
    // Once each.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(hook.seen().len(), 3);
}
