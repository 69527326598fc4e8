//! Price list import and export: LiteLLM's map and the bundled TSV format,
//! a dry run that changes nothing, new rows valid from a given instant (so
//! history before it keeps its price), through the admin API and the
//! `tollgate prices` command.

mod common;

use common::*;
use http::{Method, Request};

const MAP: &str = r#"{
  "sample_spec": {"input_cost_per_token": 0.0, "litellm_provider": "see docs"},
  "gpt-a": {"input_cost_per_token": 2e-06, "output_cost_per_token": 8e-06, "cache_read_input_token_cost": 5e-07,
            "input_cost_per_token_flex": 1e-06, "output_cost_per_token_flex": 4e-06,
            "litellm_provider": "openai", "mode": "chat"},
  "gpt-b": {"input_cost_per_token": 1e-07, "output_cost_per_token": 4e-07, "litellm_provider": "openai"},
  "azure/gpt-a": {"input_cost_per_token": 9e-06, "output_cost_per_token": 9e-06, "litellm_provider": "azure"}
}"#;

async fn import(p: &Proxy, query: &str, body: &str) -> Resp {
    p.send_admin(
        Request::post(format!("/prices/import{query}"))
            .header("content-type", "application/json")
            .body(full(body.to_owned()))
            .unwrap(),
    )
    .await
}

async fn mock() -> Mock {
    Mock::start(|seen| {
        let model = seen.json()["model"].as_str().unwrap_or("x").to_owned();
        Reply::json(completion(&model, "ok", Tok::new(1_000_000, 1_000_000)))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_litellm_map_is_diffed_then_imported_from_an_instant() {
    let m = mock().await;
    let p = Proxy::start(&m.url()).await;
    let old = r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":1,"per1MAnswerTokens":1}"#;
    assert_eq!(p.set_price("gpt-a", old).await.status, 200);
    assert_eq!(p.chat("ann", &chat_body("gpt-a", false)).await.status, 200);
    // 1M + 1M tokens at $1 + $1.
    assert_eq!(p.wait_records(1).await[0]["cost"], 2.0);

    let r = import(&p, "?dryRun=true", MAP).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["dryRun"], true);
    assert_eq!(v["added"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["added"][0]["name"], "gpt-b");
    assert_eq!(
        v["added"][0]["price"]["per1MQueryTokens"].to_string(),
        "0.1"
    );
    assert_eq!(v["changed"][0]["name"], "gpt-a");
    assert_eq!(v["changed"][0]["from"]["per1MQueryTokens"].to_string(), "1");
    assert_eq!(v["changed"][0]["to"]["per1MQueryTokens"].to_string(), "2");
    assert_eq!(
        v["changed"][0]["to"]["per1MCachedQueryTokens"].to_string(),
        "0.5"
    );
    assert_eq!(
        v["changed"][0]["to"]["per1MFlexQueryTokens"].to_string(),
        "1"
    );
    assert_eq!(v["unchanged"], serde_json::json!([]));
    // The dry run changed nothing.
    assert_eq!(
        p.get_json("/model/gpt-a").await["costs"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(p.get("/model/gpt-b").await.status, 404);

    let r = import(&p, "", MAP).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["dryRun"], false);
    let costs = p.get_json("/model/gpt-a").await["costs"].clone();
    assert_eq!(costs.as_array().unwrap().len(), 2, "{costs}");
    assert_eq!(costs[1]["per1MAnswerTokens"].to_string(), "8");
    // The record made before keeps its price; a new one gets the new one.
    assert_eq!(p.chat("ann", &chat_body("gpt-a", false)).await.status, 200);
    let recs = p.wait_records(2).await;
    assert_eq!(recs[0]["cost"], 2.0);
    assert_eq!(recs[1]["cost"], 10.0);
    // Importing again changes nothing.
    let again = import(&p, "", MAP).await.json();
    assert_eq!(again["unchanged"], serde_json::json!(["gpt-a", "gpt-b"]));
    assert_eq!(again["added"], serde_json::json!([]));

    // The export is the TSV format, and imports back to "unchanged".
    let r = p.get("/prices/export").await;
    assert_eq!(r.status, 200);
    let tsv = r.text();
    let row = tsv.lines().find(|l| l.starts_with("gpt-a\t")).unwrap();
    // All 15 columns: the image and unit prices are none here.
    assert_eq!(row, "gpt-a\t2\t0.5\t8\t1\t-\t4\t-\t-\t-\t-\t-\t-\t-\t-");
    let back = import(&p, "?dryRun=true", &tsv).await.json();
    assert_eq!(
        back["unchanged"],
        serde_json::json!(["gpt-a", "gpt-b"]),
        "{back}"
    );
    // A change in any one rate is a change (here the cached price alone,
    // in a 12-column row, as lists before image prices were written).
    let v = import(&p, "?dryRun=true", "gpt-a 2 0.25 8 1 - 4 - - - - -\n")
        .await
        .json();
    assert_eq!(v["changed"][0]["name"], "gpt-a", "{v}");
    assert_eq!(
        v["changed"][0]["from"]["per1MCachedQueryTokens"].to_string(),
        "0.5"
    );
    assert_eq!(
        v["changed"][0]["to"]["per1MCachedQueryTokens"].to_string(),
        "0.25"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lists_and_parameters_are_refused_by_name() {
    let m = mock().await;
    let p = Proxy::start(&m.url()).await;
    let r = import(&p, "", "gpt-x 1 2\n").await;
    let msg = assert_openai_error(&r, 400, "invalid_request_error", None, None);
    assert!(msg.starts_with("line 1:"), "{msg}");
    let r = import(&p, "", "{\"m\": [").await;
    assert_openai_error(&r, 400, "invalid_request_error", None, None);
    let r = import(&p, "?validFrom=yesterday", "gpt-x 1 - 2\n").await;
    assert_openai_error(&r, 400, "invalid_request_error", Some("validFrom"), None);
    let r = import(&p, "?dry=1", "gpt-x 1 - 2\n").await;
    assert_openai_error(&r, 400, "invalid_request_error", Some("dry"), None);
    let r = p.admin_call(Method::GET, "/prices/import", "").await;
    assert_eq!(r.status, 405);
    assert_eq!(p.get("/model/gpt-x").await.status, 404);
}

/// `tollgate prices import FILE [--dry-run] [--valid-from T]` and
/// `tollgate prices export` on the proxy's database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_imports_and_exports() {
    if pg_mode() {
        return; // the command is given the SQLite file below
    }
    let m = mock().await;
    let mut p = Proxy::start(&m.url()).await;
    p.stop().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prices.json");
    std::fs::write(&file, MAP).unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["prices"])
            .args(args)
            .args(["--db", p.db.to_str().unwrap(), "--no-default-prices"])
            .output()
            .expect("run tollgate prices");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let f = file.to_str().unwrap();
    let (code, out, err) = run(&["import", f, "--dry-run"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("+ gpt-a: input 2 cached 0.5 output 8"),
        "{out}"
    );
    assert!(
        out.contains("2 added, 0 changed, 0 unchanged; would add 2"),
        "{out}"
    );
    let (_, out, _) = run(&["export"]);
    assert!(!out.contains("gpt-a"), "the dry run stored nothing: {out}");
    let (code, out, err) = run(&["import", f, "--valid-from", "2026-01-01T00:00:00Z"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("added 2 price rows valid from 2026-01-01T00:00:00"),
        "{out}"
    );
    let (_, out, _) = run(&["export"]);
    assert!(out.contains("gpt-b\t0.1\t-\t0.4\t"), "{out}");
    let (code, _, err) = run(&["import", "/nonexistent/prices.tsv"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("cannot read"), "{err}");
    let (code, _, err) = run(&["import", f, "--valid-from", "soon"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--valid-from"), "{err}");
    let (code, _, err) = run(&["frobnicate"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("prices import FILE"), "{err}");
}
