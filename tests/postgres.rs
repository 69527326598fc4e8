//! The PostgreSQL store against a real server (`TOLLGATE_TEST_PG`, e.g.
//! from `.ci/pg-server start`): records and rollups agree, instances
//! starting together migrate once, a newer schema is refused, retention
//! drops whole months, a database that goes away under load loses no
//! record, and prices, keys, limits and upstream rate limits changed
//! through one instance apply on the others within a second. Without a server each test says loudly that it is skipped (CI
//! fails instead).

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use common::*;
use hyper::Method;
use tokio::net::{TcpListener, TcpStream};
use tollgate::config::{BudgetOffline, Db, PgUrl};
use tollgate::record::{Priced, Record, Usage};
use tollgate::store::{postgres, Backend, Filter, GroupKey, Reports};

const DAY: i64 = 86_400_000;

fn rec(user: &str, model: &str, ts: i64, q: u64, a: u64, cost: i64, priced: bool) -> Priced {
    Priced {
        record: Record {
            user: user.into(),
            requested_model: model.into(),
            model: model.into(),
            endpoint: "/v1/chat/completions".into(),
            started_ms: ts,
            duration_us: 1000,
            status: 200,
            usage: Usage {
                query: q,
                answer: a,
                cached: q / 3,
                reasoning: a / 2,
                ..Usage::default()
            },
            ..Default::default()
        },
        cost,
        priced,
    }
}

/// Per (day, user, model) sums from the records, and the rollups, as text rows.
fn sums(url: &str) -> (Vec<String>, Vec<String>) {
    let from_records = pg_query(
        url,
        "SELECT format('%s|%s|%s|%s|%s|%s|%s|%s|%s|%s', day, username, model, count(*), sum(query_tokens), sum(answer_tokens), sum(cached_tokens), sum(reasoning_tokens), sum(cost), sum(CASE WHEN priced THEN 0 ELSE 1 END)) AS row
         FROM (SELECT floor(ts / 86400000.0)::bigint AS day, * FROM queries) q GROUP BY day, username, model ORDER BY row",
    );
    let from_rollups = pg_query(
        url,
        "SELECT format('%s|%s|%s|%s|%s|%s|%s|%s|%s|%s', day, username, model, queries, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, unpriced)
         FROM usage_daily ORDER BY 1",
    );
    let text = |rows: Vec<tokio_postgres::Row>| rows.iter().map(|r| r.get(0)).collect();
    (text(from_records), text(from_rollups))
}

/// Several writers (instances) write overlapping days, users and models in
/// batches: the rollups are the records' sums, row for row, and the
/// reports read the same totals from either.
#[test]
fn records_and_rollups_agree_after_batches_from_several_instances() {
    let Some(_) = pg_or_skip("records_and_rollups_agree_after_batches_from_several_instances")
    else {
        return;
    };
    let db = PgDb::create();
    let url = PgUrl::parse(&db.url).unwrap();
    let now = now_ms();
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let url = url.clone();
            std::thread::spawn(move || {
                let (mut b, _, _) = postgres::open(&url, false).unwrap();
                for batch in 0..5 {
                    let recs: Vec<Priced> = (0..400)
                        .map(|i| {
                            let n = w * 10_000 + batch * 1000 + i;
                            rec(
                                &format!("u{}", n % 5),
                                &format!("m{}", n % 3),
                                // Across three months, with days' edges.
                                now - (n % 90) * DAY - (n * 7919) % DAY,
                                (n % 50) as u64,
                                (n % 20) as u64,
                                n * 1_000_003,
                                n % 11 != 0,
                            )
                        })
                        .collect();
                    b.write(&recs, None).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let (records, rollups) = sums(&db.url);
    assert!(!records.is_empty());
    assert_eq!(records, rollups);
    let n: i64 = pg_query(&db.url, "SELECT count(*) FROM queries")[0].get(0);
    assert_eq!(n, 3 * 5 * 400);
    // One partition per month touched (and the month after the latest).
    let parts: i64 = pg_query(
        &db.url,
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'queries'::regclass",
    )[0]
    .get(0);
    assert!((4..=6).contains(&parts), "{parts} partitions");
    // A report over a range cut in the middle of days reads records at the
    // edges and rollups between: it must equal the records' own sums.
    let (_, reports, _) = postgres::open(&url, false).unwrap();
    let f = Filter {
        after: Some(now - 40 * DAY + 12_345_678),
        before: Some(now - 3 * DAY - 7_654_321),
        ..Filter::default()
    };
    let rows = reports.usage(&f, &[GroupKey::User]).unwrap();
    let want = pg_query(
        &db.url,
        &format!(
            "SELECT username, count(*), sum(cost)::text FROM queries WHERE ts > {} AND ts < {} GROUP BY 1 ORDER BY 1",
            f.after.unwrap(),
            f.before.unwrap()
        ),
    );
    assert_eq!(rows.len(), want.len());
    for ((g, t), w) in rows.iter().zip(&want) {
        assert_eq!(g.user.as_deref(), Some(w.get::<_, &str>(0)));
        assert_eq!(t.queries as i64, w.get::<_, i64>(1));
        assert_eq!(t.cost.to_string(), w.get::<_, String>(2));
    }
}

/// Eight instances starting at once on a new database: every one starts,
/// and each schema step was applied exactly once (the advisory lock; without
/// it, concurrent `CREATE TABLE`s fail or a step's row is written twice).
#[test]
fn instances_starting_together_migrate_once() {
    let Some(_) = pg_or_skip("instances_starting_together_migrate_once") else {
        return;
    };
    let db = PgDb::create();
    let url = PgUrl::parse(&db.url).unwrap();
    let barrier = Arc::new(Barrier::new(8));
    let starts: Vec<_> = (0..8)
        .map(|_| {
            let (url, barrier) = (url.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                postgres::open(&url, true).map(|_| ())
            })
        })
        .collect();
    for s in starts {
        s.join().unwrap().expect("every instance starts");
    }
    let steps = pg_query(
        &db.url,
        "SELECT version FROM tollgate_schema ORDER BY version",
    );
    let steps: Vec<i32> = steps.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        steps,
        (1..=postgres::SCHEMA_VERSION).collect::<Vec<_>>(),
        "each step once"
    );
    // The built-in prices were loaded once too (no duplicate rows possible,
    // but the marker says one loader ran).
    let loaded: i64 = pg_query(
        &db.url,
        "SELECT count(*) FROM meta WHERE key = 'default_prices_loaded'",
    )[0]
    .get(0);
    assert_eq!(loaded, 1);
    let prices: i64 = pg_query(&db.url, "SELECT count(*) FROM prices")[0].get(0);
    assert_eq!(
        prices as usize,
        tollgate::pricing::default_prices().len(),
        "built-in prices"
    );
}

/// A database migrated by a newer tollgate is refused with a clear message
/// naming `--db`, and is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused() {
    let Some(_) = pg_or_skip("a_newer_schema_is_refused") else {
        return;
    };
    let db = PgDb::create();
    let url = PgUrl::parse(&db.url).unwrap();
    let u = url.clone();
    tokio::task::spawn_blocking(move || postgres::open(&u, false).map(|_| ()))
        .await
        .unwrap()
        .unwrap();
    let newer = postgres::SCHEMA_VERSION + 1;
    pg_exec(
        &db.url,
        &format!("INSERT INTO tollgate_schema VALUES ({newer}, 'from the future', 0)"),
    );
    let config = tollgate::config::Config {
        db: Db::Postgres(url),
        default_prices: false,
        ..Default::default()
    };
    let e = tollgate::app::App::build(config).err().expect("refused");
    assert_eq!(e.setting, "--db");
    assert!(
        e.message.ends_with(&format!(
            "database schema version {newer} is newer than this tollgate ({}); upgrade tollgate",
            postgres::SCHEMA_VERSION
        )),
        "{}",
        e.message
    );
    let steps: i64 = pg_query(&db.url, "SELECT count(*) FROM tollgate_schema")[0].get(0);
    // Every step of this build, and the newer one.
    assert_eq!(steps, i64::from(postgres::SCHEMA_VERSION) + 1);
}

/// Retention drops the partitions of months wholly past the cutoff and
/// deletes the older records of the month the cutoff falls in; newer records
/// and every rollup stay.
#[test]
fn retention_drops_whole_months() {
    let Some(_) = pg_or_skip("retention_drops_whole_months") else {
        return;
    };
    let db = PgDb::create();
    let url = PgUrl::parse(&db.url).unwrap();
    let (mut b, _, _) = postgres::open(&url, false).unwrap();
    let now = now_ms();
    let recs: Vec<Priced> = (0..200)
        .map(|i| rec("ann", "m", now - i * DAY, 5, 5, 100, true))
        .collect();
    b.write(&recs, None).unwrap();
    let parts = |url: &str| -> i64 {
        pg_query(
            url,
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'queries'::regclass",
        )[0]
        .get(0)
    };
    let before = parts(&db.url);
    assert!(before >= 7, "{before}");
    let rollups_before = sums(&db.url).1;
    let cutoff = now - 45 * DAY;
    let mut gone = 0;
    loop {
        let n = b.delete_before(cutoff, 10).unwrap();
        if n == 0 {
            break;
        }
        gone += n;
    }
    assert!(gone > 0);
    let left: Vec<i64> = pg_query(&db.url, "SELECT ts FROM queries ORDER BY ts")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left.len(), 46, "records at or after the cutoff stay");
    assert!(left.iter().all(|&t| t >= cutoff));
    let after = parts(&db.url);
    assert!(after <= 4 && after < before, "{before} -> {after}");
    assert_eq!(sums(&db.url).1, rollups_before, "rollups are kept");
}

/// A TCP relay between tollgate and the database that the test can cut:
/// cutting closes every relayed connection and refuses new ones.
struct Relay {
    port: u16,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Relay {
    /// A relay to the database at `url`, and the URL through the relay.
    async fn to(url: &str, server: &str) -> (Relay, String) {
        let cfg: tokio_postgres::Config = url.parse().unwrap();
        let (host, port) = match (&cfg.get_hosts()[0], cfg.get_ports()[0]) {
            (tokio_postgres::config::Host::Tcp(h), p) => (h.clone(), p),
            _ => panic!("TOLLGATE_TEST_PG must be a TCP URL: {server}"),
        };
        let target = tokio::net::lookup_host((host.as_str(), port))
            .await
            .unwrap()
            .next()
            .unwrap();
        let relay = Relay::start(target).await;
        let relayed = format!(
            "postgres://{}@127.0.0.1:{}/{}",
            cfg.get_user().unwrap_or("postgres"),
            relay.port,
            cfg.get_dbname().unwrap()
        );
        (relay, relayed)
    }

    async fn start(target: std::net::SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (c, cs) = (cut.clone(), conns.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if c.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let t = tokio::spawn(async move {
                    if let Ok(mut out) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                cs.lock().unwrap().push(t.abort_handle());
            }
        });
        Relay { port, cut, conns }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// The database goes away under load for a few seconds: the proxy keeps
/// answering, `/readyz` says the database refuses writes, and when it comes
/// back every record is written, once, with rollups that agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_away_under_load_loses_no_record() {
    let Some(server) = pg_or_skip("database_away_under_load_loses_no_record") else {
        return;
    };
    let db = PgDb::create();
    let (relay, relayed) = Relay::to(&db.url, &server).await;
    let mock = Mock::start(|seen| {
        Reply::json(completion("gpt-m", "ok", Tok::new(10, 3)))
            .header("x-request-id", &format!("req-{}", seen.n))
    })
    .await;
    let p = Proxy::builder(&mock.url())
        .with(|c| c.db = Db::Postgres(PgUrl::parse(&relayed).unwrap()))
        .start()
        .await;
    let burst = |n: usize| {
        let addr = p.addr;
        async move {
            let sends = (0..n).map(|i| async move {
                send(
                    addr,
                    chat_req(&format!("u{}", i % 4), &chat_body("gpt-m", false)),
                )
                .await
                .status
            });
            futures_util::future::join_all(sends).await
        }
    };
    assert!(burst(20).await.iter().all(|&s| s == 200));
    p.wait_records(20).await;

    relay.cut();
    // Requests go on being served while the database is away.
    let mut served = 0;
    let deadline = std::time::Instant::now() + STEP;
    let why = loop {
        let statuses = burst(10).await;
        assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
        served += 10;
        let r = send(p.addr, get("/readyz")).await;
        if r.status == 503 {
            break r.json();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "readyz never turned 503"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        why["reason"].as_str().unwrap().contains("database"),
        "{why}"
    );
    assert_eq!(send(p.addr, get("/healthz")).await.status, 200);
    // A little longer away, under load.
    for _ in 0..5 {
        assert!(burst(10).await.iter().all(|&s| s == 200));
        served += 10;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    relay.restore();

    let total = 20 + served;
    eventually("readyz back to 200", STEP, || async {
        (send(p.addr, get("/readyz")).await.status == 200).then_some(())
    })
    .await;
    let recs = p.wait_records(total).await;
    assert_eq!(recs.len(), total, "every record, once");
    let ids: BTreeSet<String> = recs
        .iter()
        .map(|r| r["requestId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), total);
    assert_eq!(p.usage("").await["numQueries"], total);
    let (records, rollups) = sums(&db.url);
    assert_eq!(records, rollups);
}

/// Within this, a change made through one instance applies on the others
/// (the issue's promise; the instances poll every 250 ms).
const SHARED_WITHIN: Duration = Duration::from_secs(1);

/// A chat request carrying a tollgate key.
fn with_key(key: &str, model: &str) -> hyper::Request<ReqBody> {
    hyper::Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(full(chat_body(model, false)))
        .unwrap()
}

/// Two instances on one database: a key created on A works on B, a price
/// set on A prices B's next records, limits set on A refuse on B, and a key
/// revoked on A is refused by B, each within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prices_keys_and_limits_set_on_one_instance_apply_on_the_others() {
    let Some(_) = pg_or_skip("prices_keys_and_limits_set_on_one_instance_apply_on_the_others")
    else {
        return;
    };
    const ADMIN: &str = "admin-key-shared-state-0123456789";
    let db = PgDb::create();
    let mock = Mock::start(|seen| {
        let model = seen.json()["model"].as_str().unwrap_or("x").to_owned();
        Reply::json(completion(&model, "ok", Tok::new(1000, 500)))
    })
    .await;
    let start = || {
        let url = PgUrl::parse(&db.url).unwrap();
        Proxy::builder(&mock.url())
            .admin(ADMIN)
            .auth(tollgate::access::AuthMode::Keys)
            .default_prices(false)
            .with(move |c| c.db = Db::Postgres(url))
            .start()
    };
    let a = start().await;
    let b = start().await;

    // A key created on A authenticates on B.
    let r = a.admin_call(Method::POST, "/users/alice/keys", "").await;
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    let (id, key) = (
        v["id"].as_str().unwrap().to_owned(),
        v["key"].as_str().unwrap().to_owned(),
    );
    eventually("B accepts the key created on A", SHARED_WITHIN, || async {
        (send(b.addr, with_key(&key, "m-other")).await.status == 200).then_some(())
    })
    .await;

    // A price set on A prices B's next record.
    let r = a
        .set_price(
            "m-shared",
            r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":1,"per1MAnswerTokens":2}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    eventually("B knows the price set on A", SHARED_WITHIN, || async {
        (b.get("/model/m-shared").await.status == 200).then_some(())
    })
    .await;
    let before = b.queries("").await.len();
    let r = send(b.addr, with_key(&key, "m-shared")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    b.wait_records(before + 1).await;
    let rows = b.queries_raw("model=m-shared").await;
    let last = rows.last().unwrap();
    // 1000 x $1/1M + 500 x $2/1M, priced by B as it wrote the record.
    assert_eq!(last["priced"], "true");
    assert_eq!(last["cost"], "0.002");
    // Uses of a key (its `last_used`, written with records) are not a
    // change of the keys for the other instances to reload.
    let keys: i64 = pg_query(
        &db.url,
        "SELECT version FROM tollgate_state WHERE name = 'keys'",
    )[0]
    .get(0);
    assert_eq!(keys, 1, "only the key's creation counts");

    // Limits set on A refuse on B.
    let r = a
        .admin_call(
            Method::PUT,
            "/users/alice/limits",
            r#"{"requestsPerMinute":1}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let refused = eventually("B applies the limits set on A", SHARED_WITHIN, || async {
        let r = send(b.addr, with_key(&key, "m-other")).await;
        (r.status != 200).then_some(r)
    })
    .await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    let r = a
        .admin_call(Method::DELETE, "/users/alice/limits", "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());

    // A key revoked on A is refused by B.
    let r = a
        .admin_call(Method::DELETE, &format!("/keys/{id}"), "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let refused = eventually("B refuses the key revoked on A", SHARED_WITHIN, || async {
        let r = send(b.addr, with_key(&key, "m-other")).await;
        (r.status != 200 && r.status != 429).then_some(r)
    })
    .await;
    assert_openai_error(
        &refused,
        401,
        "invalid_request_error",
        None,
        Some("invalid_api_key"),
    );
    // And stays refused.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(send(b.addr, with_key(&key, "m-other")).await.status, 401);
}

/// The latest upstream rate limits seen by one instance are those every
/// instance reports, once stored with its batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_rate_limits_seen_by_one_instance_are_reported_by_the_others() {
    let Some(_) =
        pg_or_skip("upstream_rate_limits_seen_by_one_instance_are_reported_by_the_others")
    else {
        return;
    };
    let db = PgDb::create();
    let mock = Mock::start(|_| {
        Reply::json(completion("gpt-m", "ok", Tok::new(5, 5)))
            .header("x-ratelimit-limit-requests", "500")
            .header("x-ratelimit-remaining-requests", "499")
            .header("x-ratelimit-reset-requests", "20ms")
            .header("x-ratelimit-limit-tokens", "500000")
            .header("x-ratelimit-remaining-tokens", "486895")
            .header("x-ratelimit-reset-tokens", "1h2m3.5s")
    })
    .await;
    let start = || on_db(&mock, &db.url).start();
    let a = start().await;
    let b = start().await;
    assert_eq!(b.get("/ratelimits").await.text(), "{}");
    assert_eq!(a.chat("u", &chat_body("gpt-m", false)).await.status, 200);
    let seen = a.get("/ratelimits").await.text();
    assert!(seen.contains("486895"), "{seen}");
    // Stored with A's batch, then read by B's poll.
    a.wait_records(1).await;
    eventually("B reports A's rate limits", SHARED_WITHIN, || async {
        let text = b.get("/ratelimits").await.text();
        (text != "{}").then_some(text)
    })
    .await;
    assert_eq!(b.get("/ratelimits").await.text(), seen);
}

/// A request whose reservation is exactly its cost: no prompt price, 1000
/// answer tokens asked for and answered, at $1 per 1M answer tokens: $0.001.
const LEASED_COST: i64 = 1_000_000_000;
const LEASED_PRICE: &str =
    r#"{"validFrom":"2020-01-01T00:00:00Z","per1MQueryTokens":0,"per1MAnswerTokens":1}"#;

/// An in-process instance in front of `mock` on the database at `url`.
fn on_db(mock: &Mock, url: &str) -> ProxyBuilder {
    let url = PgUrl::parse(url).unwrap();
    Proxy::builder(&mock.url()).with(move |c| c.db = Db::Postgres(url))
}

fn leased_req(user: &str) -> hyper::Request<ReqBody> {
    chat_req(
        user,
        r#"{"model":"m-lease","max_tokens":1000,"messages":[{"role":"user","content":"hi"}]}"#,
    )
}

async fn leased_mock() -> Mock {
    Mock::start(|_| Reply::json(completion("m-lease", "ok", Tok::new(3, 1000)))).await
}

fn pg_count(url: &str, sql: &str) -> i64 {
    pg_query(url, sql)[0].get(0)
}

/// Three instances on one database, 300 concurrent requests of one user
/// spread over them under a budget of 100 such requests: the instances
/// together admit no more than the budget (each admits against its lease,
/// not against the whole budget: without leases each admits about 100),
/// about all of it is admitted (leases adapt, nobody starves), every
/// request that reached upstream left exactly one record, and the refused
/// get budget 429s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_one_budget_without_overrun() {
    let Some(_) = pg_or_skip("three_instances_share_one_budget_without_overrun") else {
        return;
    };
    let db = PgDb::create();
    let mock = leased_mock().await;
    let start = || on_db(&mock, &db.url).default_prices(false).start();
    let a = start().await;
    assert_eq!(a.set_price("m-lease", LEASED_PRICE).await.status, 200);
    let r = a
        .admin_call(
            Method::PUT,
            "/users/pat/limits",
            r#"{"budget":0.1,"period":"month"}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let b = start().await;
    let c = start().await;
    let addrs = [a.addr, b.addr, c.addr];
    let sends = (0..300).map(|i| async move { send(addrs[i % 3], leased_req("pat")).await });
    let answers = futures_util::future::join_all(sends).await;
    let admitted = answers.iter().filter(|r| r.status == 200).count();
    for r in answers.iter().filter(|r| r.status != 200) {
        assert_openai_error(r, 429, "requests", None, Some("budget_exceeded"));
    }
    let upstream = mock.seen().len();
    assert_eq!(upstream, admitted, "only admitted requests reach upstream");
    eventually("every record written", STEP, || async {
        (pg_count(&db.url, "SELECT count(*) FROM queries") == admitted as i64).then_some(())
    })
    .await;
    let spent = pg_count(&db.url, "SELECT sum(cost)::bigint FROM queries");
    eprintln!(
        "three instances: admitted {admitted} of 300, spent {spent} pico-dollars of a {} budget",
        100 * LEASED_COST
    );
    // Reservations equal costs here, so the per-request bound is 0.
    assert!(spent <= 100 * LEASED_COST, "spent {spent} over the budget");
    assert!(admitted >= 90, "only {admitted} admitted: starved");
    let (records, rollups) = sums(&db.url);
    assert_eq!(records, rollups);
}

/// The database away with budgets leased: each instance goes on admitting
/// against the lease it holds; once that lease has lapsed (it cannot be
/// renewed), an instance refuses with 503 (`--budget-offline refuse`, the
/// default) or admits against the budget as it knows it (`admit`). When the
/// database is back, leases are granted again and every record is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_with_the_database_away_spend_the_lease_then_refuse() {
    let Some(server) = pg_or_skip("budgets_with_the_database_away_spend_the_lease_then_refuse")
    else {
        return;
    };
    let db = PgDb::create();
    let (relay, relayed) = Relay::to(&db.url, &server).await;
    let mock = leased_mock().await;
    let start = |offline: BudgetOffline| {
        let url = PgUrl::parse(&relayed).unwrap();
        Proxy::builder(&mock.url())
            .default_prices(false)
            .with(move |c| {
                c.db = Db::Postgres(url);
                c.budget_offline = offline;
            })
            .start()
    };
    let refuse = start(BudgetOffline::Refuse).await;
    let admit = start(BudgetOffline::Admit).await;
    assert_eq!(refuse.set_price("m-lease", LEASED_PRICE).await.status, 200);
    let r = refuse
        .admin_call(
            Method::PUT,
            "/users/pat/limits",
            r#"{"budget":0.1,"period":"month"}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Both instances learn the limit and the price, then hold a lease.
    for p in [&refuse, &admit] {
        eventually("price shared", STEP, || async {
            (p.get("/model/m-lease").await.status == 200).then_some(())
        })
        .await;
        eventually("limit shared and a lease taken", STEP, || async {
            let r = send(p.addr, leased_req("pat")).await;
            (r.status == 200 && p.state.budgets.lease_of("pat").0 > 0).then_some(())
        })
        .await;
    }
    let mut admitted = mock.seen().len();

    relay.cut();
    // Right after the cut both still admit, against the lease they hold.
    for p in [&refuse, &admit] {
        let r = send(p.addr, leased_req("pat")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        admitted += 1;
    }
    // Every lease lapses within its time to live of the cut (none can be
    // renewed after it).
    tokio::time::sleep(tollgate::budget::lease::LEASE_TTL + Duration::from_secs(1)).await;
    let r = send(refuse.addr, leased_req("pat")).await;
    assert_openai_error(&r, 503, "server_error", None, Some("service_unavailable"));
    assert!(r.text().contains("budget database"), "{}", r.text());
    let r = send(admit.addr, leased_req("pat")).await;
    assert_eq!(r.status, 200, "--budget-offline admit: {}", r.text());
    admitted += 1;
    let why = send(refuse.addr, get("/readyz")).await;
    assert_eq!(why.status, 503);
    assert!(why.text().contains("database"), "{}", why.text());
    assert_eq!(
        mock.seen().len(),
        admitted,
        "the refused did not go upstream"
    );

    relay.restore();
    eventually("leases granted again", STEP, || async {
        (send(refuse.addr, leased_req("pat")).await.status == 200).then_some(())
    })
    .await;
    admitted += 1;
    assert_eq!(mock.seen().len(), admitted);
    eventually("every record written", STEP, || async {
        (pg_count(&db.url, "SELECT count(*) FROM queries") == admitted as i64).then_some(())
    })
    .await;
    let spent = pg_count(&db.url, "SELECT sum(cost)::bigint FROM queries");
    assert_eq!(spent, admitted as i64 * LEASED_COST);
    assert!(spent <= 100 * LEASED_COST);
    let (records, rollups) = sums(&db.url);
    assert_eq!(records, rollups);
}

/// Three instances, one user with per-minute limits, 90 concurrent
/// requests spread over them: each instance admits against its slice of
/// the minute's allowance, so together they admit no more than the limit
/// (without leases each would admit the whole limit), and no instance is
/// starved. Requests first (`requestsPerMinute`), then tokens
/// (`tokensPerMinute`: what the records used stays within it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_minute_limits_hold_across_instances() {
    let Some(_) = pg_or_skip("per_minute_limits_hold_across_instances") else {
        return;
    };
    let db = PgDb::create();
    let mock = leased_mock().await;
    let start = || on_db(&mock, &db.url).start();
    let a = start().await;
    let b = start().await;
    let c = start().await;
    let addrs = [a.addr, b.addr, c.addr];
    // Every instance knows the limits before the burst.
    let all = [&a, &b, &c];
    let set = |user: &'static str, limits: &'static str| async move {
        let r = all[0]
            .admin_call(Method::PUT, &format!("/users/{user}/limits"), limits)
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        for p in all {
            eventually("limits shared", STEP, || async {
                p.state.budgets.limits_of(user).is_some().then_some(())
            })
            .await;
        }
    };
    // The burst stays inside one calendar minute.
    let in_minute = || async {
        let into = now_ms().rem_euclid(60_000);
        if into > 45_000 {
            tokio::time::sleep(Duration::from_millis((61_000 - into) as u64)).await;
        }
    };
    let burst = |user: &'static str| async move {
        let sends = (0..90).map(|i| async move { send(addrs[i % 3], leased_req(user)).await });
        futures_util::future::join_all(sends).await
    };
    let check = |answers: &[Resp]| {
        let ok = answers.iter().filter(|r| r.status == 200).count();
        for r in answers.iter().filter(|r| r.status != 200) {
            assert_openai_error(r, 429, "requests", None, Some("rate_limit_exceeded"));
            let after: u64 = r.header("retry-after").unwrap().parse().unwrap();
            assert!((1..=60).contains(&after), "retry-after {after}");
        }
        ok
    };

    set("rita", r#"{"requestsPerMinute":30}"#).await;
    in_minute().await;
    let ok = check(&burst("rita").await);
    eprintln!("requestsPerMinute 30 over three instances: {ok} of 90 admitted");
    assert!(ok <= 30, "{ok} admitted: over the limit");
    assert!(ok >= 20, "only {ok} admitted: starved");
    assert_eq!(mock.seen().len(), ok);

    // Each request reserves its prompt estimate and max_tokens (1000).
    let tpm = 30 * 1000;
    set("tom", r#"{"tokensPerMinute":30000}"#).await;
    in_minute().await;
    let ok = check(&burst("tom").await);
    eprintln!("tokensPerMinute {tpm} over three instances: {ok} of 90 admitted");
    assert!(ok >= 15, "only {ok} admitted: starved");
    eventually("records written", STEP, || async {
        (pg_count(
            &db.url,
            "SELECT count(*) FROM queries WHERE username = 'tom'",
        ) == ok as i64)
            .then_some(())
    })
    .await;
    let used = pg_count(
        &db.url,
        "SELECT sum(query_tokens + answer_tokens)::bigint FROM queries WHERE username = 'tom'",
    );
    assert!(used <= tpm, "{used} tokens used of {tpm}");
}

/// A project's budget is leased like a user's: three instances, 300
/// concurrent requests of three members spread over them, a project budget
/// of 100 such requests (the users have no limits of their own): together
/// the instances admit no more than the project's budget, and about all of
/// it (without project leases each instance admits the whole budget).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_one_project_budget_without_overrun() {
    let Some(_) = pg_or_skip("three_instances_share_one_project_budget_without_overrun") else {
        return;
    };
    let db = PgDb::create();
    let mock = leased_mock().await;
    let start = || on_db(&mock, &db.url).default_prices(false).start();
    let a = start().await;
    assert_eq!(a.set_price("m-lease", LEASED_PRICE).await.status, 200);
    let members = ["pia", "pat", "pam"];
    let r = a
        .admin_call(
            Method::PUT,
            "/projects/team",
            r#"{"members":["pia","pat","pam"]}"#,
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = a
        .admin_call(
            Method::PUT,
            "/projects/team/limits",
            r#"{"budget":0.1,"period":"month"}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let b = start().await;
    let c = start().await;
    for p in [&a, &b, &c] {
        eventually(
            "the project and its limits on every instance",
            STEP,
            || async {
                (p.state.project_budgets.limits_of("team").is_some()
                    && p.state.projects.only_project_of("pam").as_deref() == Some("team")
                    && p.get("/model/m-lease").await.status == 200)
                    .then_some(())
            },
        )
        .await;
    }
    let addrs = [a.addr, b.addr, c.addr];
    let sends =
        (0..300).map(|i| async move { send(addrs[i % 3], leased_req(members[i / 3 % 3])).await });
    let answers = futures_util::future::join_all(sends).await;
    let admitted = answers.iter().filter(|r| r.status == 200).count();
    for r in answers.iter().filter(|r| r.status != 200) {
        assert_openai_error(r, 429, "requests", None, Some("budget_exceeded"));
        assert!(r.text().contains("project"), "{}", r.text());
    }
    assert_eq!(
        mock.seen().len(),
        admitted,
        "only admitted requests reach upstream"
    );
    eventually("every record written", STEP, || async {
        (pg_count(&db.url, "SELECT count(*) FROM queries") == admitted as i64).then_some(())
    })
    .await;
    let spent = pg_count(
        &db.url,
        "SELECT sum(cost)::bigint FROM queries WHERE project = 'team'",
    );
    eprintln!(
        "three instances, one project: admitted {admitted} of 300, spent {spent} pico-dollars of a {} budget",
        100 * LEASED_COST
    );
    assert_eq!(spent, admitted as i64 * LEASED_COST);
    assert!(
        spent <= 100 * LEASED_COST,
        "spent {spent} over the project budget"
    );
    assert!(admitted >= 90, "only {admitted} admitted: starved");
}

/// The real binary, on PostgreSQL.
struct Bin(std::process::Child, std::net::SocketAddr);

impl Drop for Bin {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_pg_bin(upstream: &str, db: &str) -> Bin {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            upstream,
            "--db",
            db,
        ])
        .arg("--no-default-prices")
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .env_remove("TOLLGATE_UPSTREAM_TOKEN")
        .env_remove("FORWARD_TOKEN")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn tollgate");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let Some(at) = line.find("tollgate listening") else {
                continue;
            };
            let rest = &line[at..];
            let Some(i) = rest.find("127.0.0.1:") else {
                continue;
            };
            let port: String = rest[i + 10..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if let (Some(tx), Ok(addr)) = (tx.take(), format!("127.0.0.1:{port}").parse()) {
                let _ = tx.send(addr);
            }
        }
    });
    let addr = rx.recv_timeout(STEP).expect("tollgate logs its address");
    Bin(child, addr)
}

fn admin_req(method: Method, path: &str, body: &str) -> hyper::Request<ReqBody> {
    hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(full(body.to_owned()))
        .unwrap()
}

/// Sends requests to `addr` one after another until one is refused;
/// returns how many were admitted.
async fn admitted_until_refused(addr: std::net::SocketAddr, user: &str) -> usize {
    let mut n = 0;
    loop {
        let r = send(addr, leased_req(user)).await;
        if r.status != 200 {
            assert_openai_error(&r, 429, "requests", None, Some("budget_exceeded"));
            return n;
        }
        n += 1;
        assert!(n <= 100, "never refused");
    }
}

/// `kill -9` of a tollgate process holding a lease: its slice stays out of
/// the pool until the lease expires (the other instance admits only what
/// is left beside it), then returns, and the budget is spent exactly, no
/// more. Without leases the other instance admits the whole remaining
/// budget at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instances_lease_returns_after_its_expiry() {
    let Some(_) = pg_or_skip("a_killed_instances_lease_returns_after_its_expiry") else {
        return;
    };
    let db = PgDb::create();
    let mock = leased_mock().await;
    let mut a = spawn_pg_bin(&mock.url(), &db.url);
    let r = send(a.1, admin_req(Method::POST, "/model/m-lease", LEASED_PRICE)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = send(
        a.1,
        admin_req(
            Method::PUT,
            "/users/kim/limits",
            r#"{"budget":0.02,"period":"total"}"#,
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // A's first request takes half of the 20 requests' budget as its lease.
    assert_eq!(send(a.1, leased_req("kim")).await.status, 200);
    eventually("A's record written, its lease less it", STEP, || async {
        let rows = pg_query(
            &db.url,
            "SELECT amount FROM budget_leases WHERE username = 'kim' AND expires_at > now()",
        );
        let amounts: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        (pg_count(&db.url, "SELECT count(*) FROM queries") == 1 && amounts == [9 * LEASED_COST])
            .then_some(())
    })
    .await;
    a.0.kill().unwrap();
    a.0.wait().unwrap();

    let url = PgUrl::parse(&db.url).unwrap();
    let b = Proxy::builder(&mock.url())
        .default_prices(false)
        .with(move |c| c.db = Db::Postgres(url))
        .start()
        .await;
    // A's 9 stay leased: of 20, 1 spent, B gets the other 10.
    let before = admitted_until_refused(b.addr, "kim").await;
    let a_live = pg_count(
        &db.url,
        "SELECT count(*) FROM budget_leases WHERE username = 'kim' AND amount > 0 AND expires_at > now()",
    );
    eprintln!("B admitted {before} while A's lease was held (A's lease live after: {a_live})");
    assert_eq!(before, 10, "B spent A's leased slice before it expired");
    // A's lease expires, and B can spend its slice.
    eventually("A's lease returns to the pool", STEP, || async {
        (send(b.addr, leased_req("kim")).await.status == 200).then_some(())
    })
    .await;
    let after = 1 + admitted_until_refused(b.addr, "kim").await;
    eprintln!("B admitted {after} more after A's lease expired");
    assert_eq!(1 + before + after, 20, "the whole budget, and no more");
    b.wait_records(20).await;
    assert_eq!(
        pg_count(&db.url, "SELECT sum(cost)::bigint FROM queries"),
        20 * LEASED_COST
    );
    assert_eq!(mock.seen().len(), 20);
}
