//! Reports at scale: `/usage` over a month and `/queries` streaming a
//! million rows, on a database of 20 million records.
//!
//! `cargo bench --bench reports` (TOLLGATE_BENCH_SMOKE=1 for a 200k-record
//! run in seconds). The filled database is kept in `target/bench-reports-projects-N.db`
//! so later runs skip the fill.
//!
//! With `TOLLGATE_BENCH_PG=postgres://...` the same `/usage` queries also run
//! on PostgreSQL, over the same records (database `tollgate_reports_projects_N` on that
//! server, filled once by `generate_series` in SQL and kept), side by side.
//! Records carry tags and a project, with their rollups, so `group_by=tag:`
//! and `group_by=project` are measured too.

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use tollgate::store::{postgres, sqlite, Filter, GroupKey, Reports};

const DAY: i64 = 86_400_000;
/// 2025-01-01T00:00:00Z.
const START: i64 = 1_735_689_600_000;
const USERS: u64 = 200;
/// Each user in one of these projects (a seventh of the records without).
const PROJECTS: u64 = 20;
const MODELS: [&str; 12] = [
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "o3",
    "o4-mini",
    "gpt-5",
    "gpt-5-mini",
    "gpt-5-nano",
    "text-embedding-3-small",
    "gpt-4o-2024-08-06",
];

fn vm(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Fills the database with `n` records spread over one year, in SQL: about
/// a million rows a second, rollups built the way a migration builds them.
fn fill(path: &std::path::Path, n: u64) {
    let (backend, _, _) = sqlite::open(path, false).expect("open");
    let step = 365 * DAY / n as i64;
    let models = MODELS
        .iter()
        .enumerate()
        .map(|(i, m)| format!("WHEN {i} THEN '{m}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let started = Instant::now();
    backend
        .execute_batch(&format!(
            "PRAGMA synchronous = OFF;
             BEGIN;
             WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {last})
             INSERT INTO queries (user, model, requested_model, endpoint, ts, duration_us, ttfb_us, status, stream,
                                  query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, priced, estimated, request_id, tags, project)
             SELECT 'user-' || (i * 7919 % {USERS}), CASE i % 12 {models} END, 'gpt-4o', '/v1/chat/completions',
                    {START} + i * {step}, 800000, 300000, 200, i % 2,
                    500 + i % 1000, 100 + i % 300, i % 200, i % 50, (500 + i % 1000) * 2500000, 1, 0, NULL,
                    CASE i % 5 WHEN 0 THEN 'feature=autocomplete,team=search' WHEN 1 THEN 'feature=chat'
                               WHEN 2 THEN 'feature=summary,team=ads' WHEN 3 THEN 'team=search' ELSE '' END,
                    CASE WHEN i % 7 = 6 THEN NULL ELSE 'proj-' || (i * 7919 % {USERS} % {PROJECTS}) END
             FROM n;
             INSERT INTO usage_daily (day, user, model, queries, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, unpriced)
             SELECT ts / 86400000, user, model, COUNT(*), SUM(query_tokens), SUM(answer_tokens), SUM(cached_tokens),
                    SUM(reasoning_tokens), SUM(cost), SUM(1 - priced)
             FROM queries GROUP BY 1, 2, 3;
             INSERT INTO usage_daily_tags (tag_key, day, tag_value, user, model, queries, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, unpriced)
             SELECT 'feature', ts / 86400000, substr(tags, 9, instr(tags || ',', ',') - 9), user, model, COUNT(*), SUM(query_tokens),
                    SUM(answer_tokens), SUM(cached_tokens), SUM(reasoning_tokens), SUM(cost), SUM(1 - priced)
             FROM queries WHERE tags LIKE 'feature=%' GROUP BY 1, 2, 3, 4, 5;
             INSERT INTO usage_daily_tags (tag_key, day, tag_value, user, model, queries, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, unpriced)
             SELECT 'team', ts / 86400000, substr(tags, instr(tags, 'team=') + 5), user, model, COUNT(*), SUM(query_tokens),
                    SUM(answer_tokens), SUM(cached_tokens), SUM(reasoning_tokens), SUM(cost), SUM(1 - priced)
             FROM queries WHERE instr(tags, 'team=') > 0 GROUP BY 1, 2, 3, 4, 5;
             INSERT INTO usage_daily_tags (tag_key, day, tag_value, user, model, queries, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, unpriced)
             SELECT '@project', ts / 86400000, project, user, model, COUNT(*), SUM(query_tokens),
                    SUM(answer_tokens), SUM(cached_tokens), SUM(reasoning_tokens), SUM(cost), SUM(1 - priced)
             FROM queries WHERE project IS NOT NULL GROUP BY 1, 2, 3, 4, 5;
             COMMIT;
             PRAGMA synchronous = NORMAL;",
            last = n - 1
        ))
        .expect("fill");
    println!(
        "filled {n} records in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The PostgreSQL twin of `fill`: the same records, by `generate_series`,
/// in the monthly partitions the writer would have made, then the rollups
/// from them in one `INSERT ... SELECT`.
fn fill_pg(url: &tollgate::config::PgUrl, n: u64) {
    let (mut backend, _, _) = postgres::open(url, false).expect("open PostgreSQL");
    let step = 365 * DAY / n as i64;
    let models = MODELS
        .iter()
        .enumerate()
        .map(|(i, m)| format!("WHEN {i} THEN '{m}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let started = Instant::now();
    // The writer's connection gives up on a statement after a minute; this
    // fill is one statement over 20M rows.
    backend
        .execute_batch("SET statement_timeout = 0")
        .expect("no statement timeout");
    backend
        .execute_batch(&format!(
            "TRUNCATE queries, usage_daily, usage_daily_tags;
             DO $$ DECLARE m int; s timestamptz; BEGIN
             FOR m IN 0..12 LOOP
                 s := timestamptz '2025-01-01 00:00:00+00' + make_interval(months => m);
                 EXECUTE format('CREATE TABLE IF NOT EXISTS queries_y%sm%s PARTITION OF queries FOR VALUES FROM (%s) TO (%s)',
                     extract(year FROM s AT TIME ZONE 'UTC')::int,
                     lpad(extract(month FROM s AT TIME ZONE 'UTC')::int::text, 2, '0'),
                     (extract(epoch FROM s) * 1000)::bigint,
                     (extract(epoch FROM s + interval '1 month') * 1000)::bigint);
             END LOOP; END $$;
             INSERT INTO queries (username, model, requested_model, endpoint, ts, duration_us, ttfb_us, status, stream,
                                  query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, priced, estimated, request_id, tags, project)
             SELECT 'user-' || (i * 7919 % {USERS}), CASE i % 12 {models} END, 'gpt-4o', '/v1/chat/completions',
                    {START} + i * {step}, 800000, 300000, 200, i % 2 = 1,
                    500 + i % 1000, 100 + i % 300, i % 200, i % 50, (500 + i % 1000) * 2500000, true, false, NULL,
                    CASE i % 5 WHEN 0 THEN 'feature=autocomplete,team=search' WHEN 1 THEN 'feature=chat'
                               WHEN 2 THEN 'feature=summary,team=ads' WHEN 3 THEN 'team=search' ELSE '' END,
                    CASE WHEN i % 7 = 6 THEN NULL ELSE 'proj-' || (i * 7919 % {USERS} % {PROJECTS}) END
             FROM generate_series(0::bigint, {last}::bigint) AS i;
             INSERT INTO usage_daily (day, username, model, queries, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, unpriced)
             SELECT ts / 86400000, username, model, count(*), sum(query_tokens), sum(answer_tokens), sum(cached_tokens),
                    sum(reasoning_tokens), sum(cost), sum(CASE WHEN priced THEN 0 ELSE 1 END)
             FROM queries GROUP BY 1, 2, 3;
             INSERT INTO usage_daily_tags (tag_key, day, tag_value, username, model, queries, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, unpriced)
             SELECT k, ts / 86400000, v, username, model, count(*), sum(query_tokens), sum(answer_tokens), sum(cached_tokens),
                    sum(reasoning_tokens), sum(cost), sum(CASE WHEN priced THEN 0 ELSE 1 END)
             FROM (SELECT q.*, t.k, t.v FROM queries q CROSS JOIN LATERAL (VALUES
                     ('feature', CASE WHEN q.tags LIKE 'feature=%' THEN split_part(substr(q.tags, 9), ',', 1) END),
                     ('team', CASE WHEN strpos(q.tags, 'team=') > 0 THEN substr(q.tags, strpos(q.tags, 'team=') + 5) END),
                     ('@project', q.project)) AS t(k, v)) x
             WHERE v IS NOT NULL GROUP BY 1, 2, 3, 4, 5;",
            last = n - 1
        ))
        .expect("fill PostgreSQL");
    // Each on its own: VACUUM refuses to run in the batch's transaction.
    for sql in [
        "VACUUM ANALYZE queries",
        "VACUUM ANALYZE usage_daily",
        "VACUUM ANALYZE usage_daily_tags",
    ] {
        backend.execute_batch(sql).expect("vacuum");
    }
    println!(
        "filled {n} records into PostgreSQL in {:.1} s (generate_series in one INSERT ... SELECT, rollups by one INSERT ... SELECT ... GROUP BY)",
        started.elapsed().as_secs_f64()
    );
}

/// The PostgreSQL database of the run: `tollgate_reports_N` on the server,
/// made and filled when it does not hold `n` records yet.
fn pg_reports(server: &str, n: u64) -> std::sync::Arc<postgres::PgReports> {
    let name = format!("tollgate_reports_projects_{n}");
    let base = server.split('?').next().unwrap_or(server);
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let host_part = match base[after_scheme..].find('/') {
        Some(i) => &base[..after_scheme + i],
        None => base,
    };
    let url = format!("{host_part}/{name}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let query = |url: String, sql: String| -> Option<i64> {
        rt.block_on(async move {
            let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .ok()?;
            let task = tokio::spawn(conn);
            let out = c.query_one(&sql, &[]).await.ok().map(|r| r.get(0));
            drop(c);
            let _ = task.await;
            out
        })
    };
    let exists = query(
        server.to_owned(),
        format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'"),
    )
    .expect("connect to TOLLGATE_BENCH_PG");
    if exists == 0 {
        query(server.to_owned(), format!("CREATE DATABASE {name}"));
    }
    let pg = tollgate::config::PgUrl::parse(&url).expect("URL");
    let have = query(url.clone(), "SELECT count(*) FROM queries".into()).unwrap_or(0);
    if have != n as i64 {
        fill_pg(&pg, n);
    }
    let (_, reports, _) = postgres::open(&pg, false).expect("open PostgreSQL");
    println!("PostgreSQL database: {url} ({n} records over 365 days)");
    reports
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let smoke = std::env::var_os("TOLLGATE_BENCH_SMOKE").is_some();
    let n: u64 = if smoke { 200_000 } else { 20_000_000 };
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(format!("bench-reports-projects-{n}.db"));
    if !path.exists() {
        // `target/` of the checkout, which a CARGO_TARGET_DIR elsewhere leaves unmade.
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("bench database folder");
        }
        fill(&path, n);
    }
    let (_backend, reports, _) = sqlite::open(&path, false).expect("open");
    let size_mb = std::fs::metadata(&path).map(|m| m.len() >> 20).unwrap_or(0);
    println!(
        "database: {} ({size_mb} MiB, {n} records over 365 days)",
        path.display()
    );

    // March 2025, bounds as users write them: after is exclusive, so the
    // first day is a partial one.
    let after = tollgate::timestamp::parse("2025-03-01T00:00:00Z");
    let before = tollgate::timestamp::parse("2025-04-01T00:00:00Z");
    let month = |user: Option<&str>, model: Option<&str>| Filter {
        user: user.map(str::to_owned),
        model: model.map(str::to_owned),
        after,
        before,
        ..Filter::default()
    };
    let cases: Vec<(&str, Filter, Vec<GroupKey>)> = vec![
        ("month, no filter", month(None, None), vec![]),
        ("month, user", month(Some("user-17"), None), vec![]),
        ("month, model", month(None, Some("gpt-4o-mini")), vec![]),
        (
            "month, user+model",
            month(Some("user-17"), Some("o3")),
            vec![],
        ),
        (
            "month, group_by=user",
            month(None, None),
            vec![GroupKey::User],
        ),
        (
            "month, group_by=user,model",
            month(None, None),
            vec![GroupKey::User, GroupKey::Model],
        ),
        (
            "month, group_by=day",
            month(None, None),
            vec![GroupKey::Day],
        ),
        (
            "month, user, group_by=model",
            month(Some("user-17"), None),
            vec![GroupKey::Model],
        ),
        (
            "month at 13:37, group_by=month",
            Filter {
                after: tollgate::timestamp::parse("2025-03-01T13:37:00Z"),
                before: tollgate::timestamp::parse("2025-04-01T13:37:00Z"),
                ..Filter::default()
            },
            vec![GroupKey::Month],
        ),
        (
            "all time, group_by=month",
            Filter::default(),
            vec![GroupKey::Month],
        ),
        (
            "month, group_by=tag:feature",
            Filter {
                group_tag: Some("feature".into()),
                ..month(None, None)
            },
            vec![GroupKey::Tag],
        ),
        (
            "month, tag=team=search, group_by=tag:team,model",
            Filter {
                tag: Some(tollgate::tags::TagFilter::parse("team=search").expect("tag")),
                group_tag: Some("team".into()),
                ..month(None, None)
            },
            vec![GroupKey::Tag, GroupKey::Model],
        ),
        (
            "month, group_by=project",
            Filter {
                group_tag: Some(tollgate::projects::ROLLUP_KEY.into()),
                ..month(None, None)
            },
            vec![GroupKey::Tag],
        ),
        (
            "month, project=proj-3, group_by=model",
            Filter {
                tag: Some(tollgate::tags::TagFilter {
                    key: tollgate::projects::ROLLUP_KEY.into(),
                    value: Some("proj-3".into()),
                }),
                ..month(None, None)
            },
            vec![GroupKey::Model],
        ),
    ];
    let pg = std::env::var("TOLLGATE_BENCH_PG")
        .ok()
        .filter(|u| !u.is_empty())
        .map(|server| pg_reports(&server, n));
    let time = |reports: &dyn Reports, f: &Filter, g: &[GroupKey]| {
        let mut times = Vec::new();
        let mut out = Vec::new();
        for _ in 0..21 {
            let t = Instant::now();
            out = reports.usage(f, g).expect("usage");
            times.push(t.elapsed());
        }
        let total: u64 = out.iter().map(|(_, t)| t.queries).sum();
        (out, total, median(times))
    };
    println!("\n/usage (median of 21 runs; target < 50 ms at 20M records)");
    if pg.is_some() {
        println!("| query | rows | numQueries | SQLite median ms | PostgreSQL median ms | PostgreSQL/SQLite |");
        println!("|---|---|---|---|---|---|");
    } else {
        println!("| query | rows | numQueries | median ms |");
        println!("|---|---|---|---|");
    }
    for (name, f, g) in &cases {
        let (out, total, m) = time(&*reports, f, g);
        match &pg {
            Some(pg) => {
                let (pg_out, _, pm) = time(&**pg, f, g);
                // The same records: the same answer, or the figures mean nothing.
                assert_eq!(pg_out, out, "{name}: PostgreSQL answers differently");
                println!(
                    "| {name} | {} | {total} | {:.2} | {:.2} | {:.2} |",
                    out.len(),
                    m.as_secs_f64() * 1e3,
                    pm.as_secs_f64() * 1e3,
                    pm.as_secs_f64() / m.as_secs_f64()
                );
            }
            None => println!(
                "| {name} | {} | {total} | {:.2} |",
                out.len(),
                m.as_secs_f64() * 1e3
            ),
        }
    }

    // /queries through the real HTTP endpoint: a million rows streamed to a
    // client that reads and discards them; the server's memory must not grow
    // with the row count.
    let rows: u64 = if smoke { 100_000 } else { 1_000_000 };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let config = tollgate::config::Config {
            db: tollgate::config::Db::Sqlite(path.clone()),
            default_prices: false,
            ..tollgate::config::Config::default()
        };
        let state = tollgate::app::App::build(config).expect("state");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(tollgate::server::run(listener, state, async {
            let _ = stopped.await;
        }));
        let client = hyper_util::client::legacy::Client::builder(
            hyper_util::rt::TokioExecutor::new(),
        )
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
        for format in ["json", "csv"] {
            let rss_before = vm("VmRSS:");
            let uri: http::Uri = format!("http://{addr}/queries?limit={rows}&format={format}")
                .parse()
                .expect("uri");
            let t = Instant::now();
            let resp = client.get(uri).await.expect("get");
            let mut body = resp.into_body();
            let (mut bytes, mut peak) = (0u64, 0u64);
            while let Some(frame) = body.frame().await {
                if let Ok(d) = frame.expect("frame").into_data() {
                    bytes += d.len() as u64;
                }
                peak = peak.max(vm("VmRSS:"));
            }
            let secs = t.elapsed().as_secs_f64();
            println!(
                "\n/queries?format={format}: {rows} rows, {} MiB in {secs:.2} s ({:.0} rows/s); process RSS before {} MiB, peak while streaming {} MiB (+{} MiB)",
                bytes >> 20,
                rows as f64 / secs,
                rss_before >> 10,
                peak >> 10,
                peak.saturating_sub(rss_before) >> 10
            );
        }
        let _ = stop.send(());
        let _ = server.await;
    });
}
