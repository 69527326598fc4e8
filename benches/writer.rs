//! The writer thread's sustained records/second into SQLite (WAL, batched),
//! or into PostgreSQL (binary `COPY`) with `TOLLGATE_BENCH_PG` set to a
//! server URL, on a database that already holds 1M records, fed the way the
//! proxy feeds it: `Store::reserve` then `Store::submit`, then `Store::flush`.
//!
//! `cargo bench --bench writer`. Environment: `TOLLGATE_BENCH_WRITER_PREFILL`
//! (default 1000000), `TOLLGATE_BENCH_WRITER_RECORDS` (default 1000000),
//! `TOLLGATE_BENCH_SMOKE=1` (20000 of each; also the default under `cargo test`),
//! `TOLLGATE_BENCH_PG=postgres://user@host:port/db` (a fresh database is
//! made on that server for the run and dropped after).
//! Exits non-zero only when records go missing, never because of a timing.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::config::PgUrl;
use tollgate::metrics::Metrics;
use tollgate::record::Priced;
use tollgate::record::Record;
use tollgate::record::Usage;
use tollgate::store::{postgres, sqlite};
use tollgate::store::{Accounts, Backend, Reports, Store};

/// 2026-11-26T00:00:00Z: records look recent.
const BASE_MS: i64 = 1_764_115_200_000;
const USERS: u64 = 500;

/// Record `i` of a realistic mix: many users, dated answer models, a third streamed.
fn record(i: u64) -> Record {
    let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let (requested, answered) = match h % 4 {
        0 => ("gpt-4o", "gpt-4o-2024-08-06"),
        1 => ("gpt-4.1-mini", "gpt-4.1-mini-2025-04-14"),
        _ => ("gpt-4o-mini", "gpt-4o-mini-2024-07-18"),
    };
    let query = 200 + h % 3000;
    Record {
        user: format!("user-{}", (h >> 20) % USERS),
        requested_model: requested.to_owned(),
        model: answered.to_owned(),
        endpoint: "/v1/chat/completions".to_owned(),
        // About 2,000 requests a second of history.
        started_ms: BASE_MS + (i / 2) as i64,
        duration_us: 300_000 + h % 4_000_000,
        ttfb_us: Some(150_000 + h % 400_000),
        status: 200,
        stream: h % 3 == 0,
        usage: Usage {
            query,
            answer: 20 + (h >> 8) % 800,
            cached: if h % 5 == 0 { query / 2 } else { 0 },
            reasoning: 0,
            ..Usage::default()
        },
        estimated: false,
        request_id: Some(format!("req_{h:032x}")),
        overhead_us: 40 + h % 60,
        ..Record::default()
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn rows(path: &Path) -> u64 {
    let c = rusqlite::Connection::open(path).expect("open for counting");
    c.query_row("SELECT COUNT(*) FROM queries", [], |r| r.get::<_, i64>(0))
        .expect("count") as u64
}

/// Runs `f` against the PostgreSQL server at `server` on a fresh database.
fn with_pg_db<T>(server: &str, f: impl FnOnce(&str) -> T) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let sql = |url: String, sql: String| {
        rt.block_on(async move {
            let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("connect to TOLLGATE_BENCH_PG");
            let task = tokio::spawn(conn);
            c.batch_execute(&sql).await.expect("bench database");
            drop(c);
            let _ = task.await;
        })
    };
    let name = format!("tollgate_bench_{}", std::process::id());
    sql(server.to_owned(), format!("DROP DATABASE IF EXISTS {name}"));
    sql(server.to_owned(), format!("CREATE DATABASE {name}"));
    let mut cfg: tokio_postgres::Config = server.parse().expect("TOLLGATE_BENCH_PG");
    cfg.dbname(&name);
    let base = server.split('?').next().unwrap_or(server);
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let host_part = match base[after_scheme..].find('/') {
        Some(i) => &base[..after_scheme + i],
        None => base,
    };
    let out = f(&format!("{host_part}/{name}"));
    sql(
        server.to_owned(),
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
    );
    out
}

/// Records in the PostgreSQL database at `url`.
fn pg_rows(url: &str) -> u64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect for counting");
        tokio::spawn(conn);
        c.query_one("SELECT count(*) FROM queries", &[])
            .await
            .expect("count")
            .get::<_, i64>(0) as u64
    })
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not and gets the smoke run.
    let bench = std::env::args().any(|a| a == "--bench");
    let smoke = !bench
        || std::env::args().any(|a| a == "--test")
        || std::env::var_os("TOLLGATE_BENCH_SMOKE").is_some_and(|v| v != "0");
    let (d_prefill, d_records) = if smoke {
        (20_000, 20_000)
    } else {
        (1_000_000, 1_000_000)
    };
    let prefill = env_u64("TOLLGATE_BENCH_WRITER_PREFILL", d_prefill);
    let n = env_u64("TOLLGATE_BENCH_WRITER_RECORDS", d_records);

    if let Ok(server) = std::env::var("TOLLGATE_BENCH_PG") {
        println!("store: PostgreSQL (binary COPY), a fresh database on TOLLGATE_BENCH_PG");
        let ok = with_pg_db(&server, |url| {
            let pg = PgUrl::parse(url).expect("PostgreSQL URL");
            let (mut backend, reports, accounts) =
                postgres::open(&pg, true).expect("open database");
            if let Some(sql) = writer_sql() {
                backend
                    .execute_batch(&sql)
                    .expect("TOLLGATE_BENCH_WRITER_SQL");
            }
            measure(backend, reports, accounts, prefill, n, 100_000.0, || {
                pg_rows(url)
            })
        });
        if !ok {
            std::process::exit(1);
        }
        return;
    }
    println!("store: SQLite");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("writer-bench.db");
    let (backend, reports, accounts) = sqlite::open(&path, true).expect("open database");
    if let Some(sql) = writer_sql() {
        backend
            .execute_batch(&sql)
            .expect("TOLLGATE_BENCH_WRITER_SQL");
    }
    if !measure(backend, reports, accounts, prefill, n, 200_000.0, || {
        rows(&path)
    }) {
        std::process::exit(1);
    }
}

/// Experiments with connection settings, e.g. "PRAGMA cache_size=-65536"
/// (`TOLLGATE_BENCH_WRITER_SQL`, run on the write connection).
fn writer_sql() -> Option<String> {
    let sql = std::env::var("TOLLGATE_BENCH_WRITER_SQL").ok()?;
    println!("applied to the write connection: {sql}");
    Some(sql)
}

/// Prefills, measures `Backend::write` alone, then the writer thread fed
/// like the proxy feeds it; false when records went missing.
fn measure<B: Backend>(
    mut backend: B,
    reports: Arc<dyn Reports>,
    accounts: Arc<dyn Accounts>,
    prefill: u64,
    n: u64,
    target: f64,
    rows: impl Fn() -> u64,
) -> bool {
    // Prefill straight through the backend in big transactions.
    let t = Instant::now();
    let mut batch = Vec::with_capacity(50_000);
    for i in 0..prefill {
        batch.push(Priced {
            record: record(i),
            cost: 1_000_000,
            priced: true,
        });
        if batch.len() == batch.capacity() || i + 1 == prefill {
            backend.write(&batch, None).expect("prefill write");
            batch.clear();
        }
    }
    let fill = t.elapsed();
    println!(
        "prefill: {prefill} records in {:.2} s ({:.0} records/s through Backend::write, 50k per transaction)",
        fill.as_secs_f64(),
        prefill as f64 / fill.as_secs_f64()
    );

    // The database alone, in batches the size the writer thread makes under
    // load: splits the cost between SQLite and the store's own work.
    let probe = (n / 5).clamp(1, 200_000);
    let mut batches: Vec<Vec<Priced>> = Vec::new();
    for i in 0..probe {
        if batches.last().is_none_or(|b| b.len() == 8192) {
            batches.push(Vec::with_capacity(8192));
        }
        batches.last_mut().expect("a batch").push(Priced {
            record: record(prefill + i),
            cost: 1_000_000,
            priced: true,
        });
    }
    let t = Instant::now();
    for b in &batches {
        backend.write(b, None).expect("probe write");
    }
    let alone = t.elapsed();
    println!(
        "Backend::write alone on the filled database: {probe} records in 8192-record transactions, {:.0} records/s",
        probe as f64 / alone.as_secs_f64()
    );
    let prefill = prefill + probe;

    let store: Arc<Store> = Store::start(
        backend,
        reports,
        accounts,
        Arc::new(Metrics::default()),
        None,
    )
    .expect("start store");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let window = (n / 10).max(1);
    let (elapsed, windows) = rt.block_on(async {
        // The estimator thread loads the tokenizer vocabularies first and
        // flushes pass through it: wait for that outside the timing.
        store.flush().await;
        let t = Instant::now();
        let mut marks = Vec::new();
        let mut last = t;
        for i in 0..n {
            let slot = store
                .reserve(Duration::from_secs(30))
                .await
                .expect("the writer freed room within 30 s");
            store.submit(record(prefill + i), slot);
            if (i + 1) % window == 0 {
                let now = Instant::now();
                marks.push(now - last);
                last = now;
            }
        }
        store.flush().await;
        (t.elapsed(), marks)
    });
    let store2 = store.clone();
    std::thread::spawn(move || store2.close())
        .join()
        .expect("close");

    let rate = n as f64 / elapsed.as_secs_f64();
    // Submission runs ahead of the writer by at most the queue capacity, so
    // past the first windows each window's rate is the writer's.
    let per_window: Vec<String> = windows
        .iter()
        .map(|d| format!("{:.0}", window as f64 / d.as_secs_f64()))
        .collect();
    println!(
        "writer: {n} records reserve+submit+flush in {:.3} s = {rate:.0} records/s (target >= {target:.0}: {})",
        elapsed.as_secs_f64(),
        if rate >= target { "met" } else { "MISSED" }
    );
    println!(
        "per {window}-record window (records/s): {}",
        per_window.join(" ")
    );
    let have = rows();
    let want = prefill + n;
    if have == want {
        println!("PASS: database holds {have} records = prefill + submitted");
        true
    } else {
        println!("FAIL: database holds {have} records, expected {want}");
        false
    }
}
