//! `tollgate migrate` (the real binary) from a SQLite database a real proxy
//! filled into the real PostgreSQL server (`TOLLGATE_TEST_PG`, e.g. from
//! `.ci/pg-server start`): a proxy on PostgreSQL then answers what the
//! SQLite proxy answered, a second run copies nothing, a run after new
//! records copies only those; and its errors (missing file, newer schema,
//! bad URL) are clear and never show the password. Without a server the
//! PostgreSQL tests say loudly that they are skipped (CI fails instead).

mod common;

use std::path::Path;
use std::process::Output;

use common::*;
use hyper::Method;
use tollgate::config::{Db, PgUrl};

const ADMIN: &str = "admin-key-migrate-0123456789abcdef";

/// Runs `tollgate migrate` with these arguments.
fn migrate(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("migrate")
        .args(args)
        .env_remove("PGPASSWORD")
        .output()
        .expect("run tollgate migrate")
}

fn run_ok(from: &Path, to: &str) -> String {
    let out = migrate(&["--from", from.to_str().unwrap(), "--to", to]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "migrate failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn stderr_of(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The value after `label` on the report line that starts with it.
fn count(report: &str, label: &str) -> u64 {
    let line = report
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no `{label}` line in:\n{report}"));
    line.trim_start()[label.len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// A chat request carrying a tollgate key.
fn with_key(key: &str, model: &str) -> hyper::Request<ReqBody> {
    hyper::Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(full(chat_body(model, false)))
        .unwrap()
}

/// Everything the reports answer that a migration must carry.
async fn answers(p: &Proxy) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for path in [
        "/usage",
        "/usage?group_by=user,model",
        "/usage?group_by=day",
        "/usage?user=alice",
        "/queries",
        "/queries?format=csv",
        "/model/m-a",
        "/model/m-b",
        "/users/alice/limits",
        "/limits/default",
        "/users/alice/keys",
        "/users/bob/keys",
        "/projects",
        "/usage?group_by=project",
        "/queries?project=team",
    ] {
        let r = p.get(path).await;
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
        out.push((path.to_owned(), r.text()));
    }
    out
}

fn key_of(r: &Resp) -> (String, String) {
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    (
        v["id"].as_str().unwrap().to_owned(),
        v["key"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_database_moves_to_postgres_and_a_second_run_adds_nothing() {
    let Some(_) = pg_or_skip("a_sqlite_database_moves_to_postgres_and_a_second_run_adds_nothing")
    else {
        return;
    };
    let mock = Mock::start(|seen| {
        let model = seen.json()["model"].as_str().unwrap_or("x").to_owned();
        Reply::json(completion(&model, "ok", Tok::new(1000, 500)))
            .header("x-request-id", &format!("req-{}", seen.n))
            .header("x-ratelimit-limit-requests", "500")
            .header("x-ratelimit-remaining-requests", "499")
            .header("x-ratelimit-reset-requests", "20ms")
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openai-queries.db");
    let f = file.clone();
    // On SQLite whatever store the harness runs the other suites on.
    let sqlite = Proxy::builder(&mock.url())
        .admin(ADMIN)
        .auth(tollgate::access::AuthMode::Keys)
        .with(move |c| c.db = Db::Sqlite(f))
        .start()
        .await;
    // Two prices of one model (its history) and one of another.
    for (model, body) in [
        (
            "m-a",
            r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":1,"per1MAnswerTokens":2}"#,
        ),
        (
            "m-a",
            r#"{"validFrom":"2021-01-01T00:00:00Z","per1MQueryTokens":3,"per1MAnswerTokens":4,"per1MCachedQueryTokens":1}"#,
        ),
        (
            "m-b",
            r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":5,"per1MAnswerTokens":6}"#,
        ),
    ] {
        let r = sqlite.set_price(model, body).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // alice's key is bound to her only project.
    let r = sqlite
        .admin_call(Method::PUT, "/projects/team", r#"{"members":["alice"]}"#)
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = sqlite
        .admin_call(Method::PUT, "/projects/team/limits", r#"{"budget":1000}"#)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let (_, alice) = key_of(
        &sqlite
            .admin_call(Method::POST, "/users/alice/keys", "")
            .await,
    );
    let (bob_id, bob) = key_of(&sqlite.admin_call(Method::POST, "/users/bob/keys", "").await);
    let (_, carol) = key_of(
        &sqlite
            .admin_call(Method::POST, "/users/carol/keys", "")
            .await,
    );
    for (path, body) in [
        (
            "/users/alice/limits",
            r#"{"budget":25,"period":"month","requestsPerMinute":1000,"tokensPerMinute":2000000}"#,
        ),
        ("/users/carol/limits", r#"{"requestsPerMinute":1}"#),
        ("/limits/default", r#"{"budget":5,"period":"day"}"#),
    ] {
        let r = sqlite.admin_call(Method::PUT, path, body).await;
        assert_eq!(r.status, 200, "PUT {path}: {}", r.text());
    }
    for i in 0..6 {
        let model = if i % 3 == 0 { "m-b" } else { "m-a" };
        let r = send(sqlite.addr, with_key(&alice, model)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(send(sqlite.addr, with_key(&bob, "m-c")).await.status, 200);
    // Carol's second request in the minute is refused: a rejection.
    assert_eq!(send(sqlite.addr, with_key(&carol, "m-a")).await.status, 200);
    assert_eq!(send(sqlite.addr, with_key(&carol, "m-a")).await.status, 429);
    let r = sqlite
        .admin_call(Method::DELETE, &format!("/keys/{bob_id}"), "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    sqlite.wait_records(8).await;
    sqlite.state.store.flush().await;
    let want = answers(&sqlite).await;
    let usage = sqlite.usage("").await;
    assert_eq!(usage["numQueries"], 8);
    assert_eq!(usage["rejectedQueries"], 1, "{usage}");

    // The proxy keeps running on the file: the source is only read.
    let db = PgDb::create();
    let report = run_ok(&file, &db.url);
    assert!(report.contains("first run for this file"), "{report}");
    assert_eq!(count(&report, "records:"), 8, "{report}");
    assert_eq!(count(&report, "rejections:"), 1, "{report}");
    assert_eq!(count(&report, "prices:"), 3, "{report}");
    assert_eq!(count(&report, "keys:"), 3, "{report}");
    assert_eq!(count(&report, "limits:"), 3, "{report}");
    assert_eq!(count(&report, "projects:"), 1, "{report}");
    let pg_counts = |url: &str| -> Vec<i64> {
        [
            "SELECT count(*) FROM queries",
            "SELECT coalesce(sum(queries), 0)::bigint FROM usage_daily",
            "SELECT coalesce(sum(cost), 0)::bigint FROM usage_daily",
            "SELECT count(*) FROM rejections",
            "SELECT count(*) FROM prices",
            "SELECT count(*) FROM api_keys",
            "SELECT count(*) FROM limits",
            "SELECT count(*) FROM projects",
        ]
        .iter()
        .map(|q| pg_query(url, q)[0].get(0))
        .collect()
    };
    let first = pg_counts(&db.url);
    assert_eq!(first, vec![8, 8, first[2], 1, 3, 3, 3, 1]);
    // The key digests are copied, never a key: no key text is in the database.
    let keys = pg_query(&db.url, "SELECT id, digest FROM api_keys ORDER BY id");
    for row in &keys {
        let digest: Vec<u8> = row.get(1);
        assert_eq!(digest.len(), 32);
        assert_eq!(digest, stored_digest(&file, row.get::<_, &str>(0)));
    }

    let url = PgUrl::parse(&db.url).unwrap();
    let pg = Proxy::builder(&mock.url())
        .admin(ADMIN)
        .auth(tollgate::access::AuthMode::Keys)
        .with(move |c| c.db = Db::Postgres(url))
        .start()
        .await;
    let got = answers(&pg).await;
    for ((path, w), (_, g)) in want.iter().zip(&got) {
        assert_eq!(g, w, "GET {path} on PostgreSQL after the migration");
    }
    assert_eq!(
        pg.get("/ratelimits").await.text(),
        sqlite.get("/ratelimits").await.text()
    );

    // Again: nothing doubles.
    let report = run_ok(&file, &db.url);
    assert!(report.contains("continuing an earlier run"), "{report}");
    assert_eq!(count(&report, "records:"), 0, "{report}");
    assert_eq!(count(&report, "rejections:"), 0, "{report}");
    assert_eq!(count(&report, "daily rollups:"), 0, "{report}");
    assert_eq!(count(&report, "prices:"), 0, "{report}");
    assert_eq!(count(&report, "keys:"), 0, "{report}");
    assert_eq!(count(&report, "projects:"), 0, "{report}");
    assert_eq!(pg_counts(&db.url), first);
    for ((path, w), (_, g)) in want.iter().zip(&answers(&pg).await) {
        assert_eq!(g, w, "GET {path} after a second run");
    }

    // New records on the SQLite proxy: the next run copies only those.
    for _ in 0..3 {
        assert_eq!(send(sqlite.addr, with_key(&alice, "m-a")).await.status, 200);
    }
    sqlite.wait_records(11).await;
    let report = run_ok(&file, &db.url);
    assert_eq!(count(&report, "records:"), 3, "{report}");
    assert_eq!(count(&report, "daily rollups:"), 0, "{report}");
    let want = answers(&sqlite).await;
    for ((path, w), (_, g)) in want.iter().zip(&answers(&pg).await) {
        // Limits answer `spent`, which the PostgreSQL proxy re-reads only when
        // its limits change; the stored answers are compared above.
        if path.contains("limits") || path == "/projects" {
            continue;
        }
        assert_eq!(g, w, "GET {path} after copying new records");
    }
    let counts = pg_counts(&db.url);
    assert_eq!((counts[0], counts[1]), (11, 11));

    // The created key works on PostgreSQL, the revoked one is refused.
    assert_eq!(send(pg.addr, with_key(&alice, "m-a")).await.status, 200);
    let refused = send(pg.addr, with_key(&bob, "m-a")).await;
    assert_openai_error(
        &refused,
        401,
        "invalid_request_error",
        None,
        Some("invalid_api_key"),
    );
    // Limits are carried: carol's one request a minute.
    let carol_first = send(pg.addr, with_key(&carol, "m-a")).await.status;
    let carol_second = send(pg.addr, with_key(&carol, "m-a")).await.status;
    assert!(
        carol_first == 429 || carol_second == 429,
        "carol's limit of 1 rpm: {carol_first}, {carol_second}"
    );
    pg.wait_records(12).await;
    // Rollups agree with the records, row for row.
    let by_records = pg_query(
        &db.url,
        "SELECT format('%s|%s|%s|%s|%s', ts / 86400000, username, model, count(*), sum(cost)) AS row FROM queries GROUP BY ts / 86400000, username, model ORDER BY row",
    );
    let by_rollups = pg_query(
        &db.url,
        "SELECT format('%s|%s|%s|%s|%s', day, username, model, queries, cost) FROM usage_daily ORDER BY 1",
    );
    let text =
        |rows: Vec<tokio_postgres::Row>| -> Vec<String> { rows.iter().map(|r| r.get(0)).collect() };
    assert_eq!(text(by_records), text(by_rollups));
}

#[test]
fn a_missing_file_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.db");
    let out = migrate(&[
        "--from",
        missing.to_str().unwrap(),
        "--to",
        "postgres://u@127.0.0.1:1/x",
    ]);
    let e = stderr_of(&out);
    assert!(e.contains("nope.db: no such file"), "{e}");
    assert!(!missing.exists(), "the source is never created");
}

#[test]
fn a_newer_sqlite_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("newer.db");
    let c = rusqlite::Connection::open(&file).unwrap();
    c.pragma_update(None, "user_version", 9999).unwrap();
    drop(c);
    let out = migrate(&[
        "--from",
        file.to_str().unwrap(),
        "--to",
        "postgres://u@127.0.0.1:1/x",
    ]);
    let e = stderr_of(&out);
    assert!(
        e.contains("database schema version 9999 is newer than this tollgate"),
        "{e}"
    );
}

#[test]
fn bad_urls_are_refused_without_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("empty.db");
    std::fs::write(&file, b"").unwrap();
    let from = file.to_str().unwrap();
    for (to, says) in [
        ("postgres://u:s3cr3t-pw@host:notaport/x", "invalid --to"),
        ("/some/file.db", "must be a postgres:// URL"),
    ] {
        let e = stderr_of(&migrate(&["--from", from, "--to", to]));
        assert!(e.contains(says), "{to}: {e}");
        assert!(!e.contains("s3cr3t-pw"), "{e}");
    }
    let e = stderr_of(&migrate(&["--from", from]));
    assert!(e.contains("invalid --to"), "{e}");
}

/// A server that is not there: the error names the URL without its password.
#[test]
fn an_unreachable_server_is_named_without_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("db.db");
    // A current-schema database, made by the store itself.
    tollgate::store::sqlite::open(&file, false).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let to = format!("postgres://u:s3cr3t-pw@127.0.0.1:{port}/x");
    let e = stderr_of(&migrate(&["--from", file.to_str().unwrap(), "--to", &to]));
    assert!(e.contains("--to postgres://u:<redacted>@127.0.0.1"), "{e}");
    assert!(!e.contains("s3cr3t-pw"), "{e}");
}
