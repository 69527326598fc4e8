//! Holding and soaking: 10,000 concurrent slow streaming requests held open
//! at once, then a long run at steady load. Both count errors, sample
//! tollgate's memory and check that every request left exactly one record.
//!
//! `cargo bench --bench soak` (runs the tollgate binary cargo builds for the
//! bench). Environment: `TOLLGATE_SOAK_STREAMS` (default
//! 10000), `TOLLGATE_SOAK_HOLD_SECS` (how long the mock holds each stream,
//! default 20), `TOLLGATE_SOAK_SECS` (steady-load phase, default 600),
//! `TOLLGATE_SOAK_CONCURRENCY` (default 32), `TOLLGATE_BENCH_SMOKE=1` (200
//! streams, 3 s). It raises its own and tollgate's file-descriptor limit.
//! Exits non-zero on any error or missing record; never because of a timing.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

fn env<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// Streams held open by the mock right now.
static HELD: AtomicU64 = AtomicU64::new(0);

/// An answer body fed by a channel: the mock writes events when it likes.
struct Rx(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for Rx {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn chunk(text: &str) -> Bytes {
    Bytes::from(format!(
        "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}},\"finish_reason\":null}}]}}\n\n"
    ))
}

/// Slow streams when asked (`x-hold-ms`), fast ones otherwise; usage when
/// the request asks for it.
async fn mock(req: Request<Incoming>) -> Result<Response<Rx>, Infallible> {
    let hold: u64 = req
        .headers()
        .get("x-hold-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let usage = memchr::memmem::find(&body, b"\"include_usage\":true").is_some();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        HELD.fetch_add(1, Ordering::Relaxed);
        let _ = tx.send(chunk("Hello")).await;
        let steps = 4u64;
        for i in 0..steps {
            if hold > 0 {
                tokio::time::sleep(Duration::from_millis(hold / steps)).await;
            }
            if tx.send(chunk(&format!(" part{i}"))).await.is_err() {
                break;
            }
        }
        if usage {
            let _ = tx
                .send(Bytes::from_static(b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[],\"usage\":{\"prompt_tokens\":20,\"completion_tokens\":6,\"total_tokens\":26}}\n\n"))
                .await;
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
        HELD.fetch_sub(1, Ordering::Relaxed);
    });
    Ok(Response::builder()
        .header("content-type", "text/event-stream")
        .body(Rx(rx))
        .expect("response"))
}

async fn start_mock() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), service_fn(mock))
                    .await;
            });
        }
    });
    addr
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

const BODY: &[u8] = br#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Tell me a short story about a lighthouse keeper."}]}"#;

/// One streamed request on its own connection; true when the whole stream arrived.
async fn one(addr: SocketAddr, hold_ms: u64, user: &str) -> bool {
    let Ok(s) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let Ok((mut send, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await else {
        return false;
    };
    tokio::spawn(conn);
    let req = Request::post("/v1/chat/completions")
        .header("host", "tollgate")
        .header("content-type", "application/json")
        .header("x-user", user)
        .header("x-hold-ms", hold_ms.to_string())
        .body(Full::new(Bytes::from_static(BODY)))
        .expect("request");
    let Ok(resp) = send.send_request(req).await else {
        return false;
    };
    if !resp.status().is_success() {
        return false;
    }
    match resp.into_body().collect().await {
        Ok(b) => b.to_bytes().ends_with(b"data: [DONE]\n\n"),
        Err(_) => false,
    }
}

fn count_records(db: &std::path::Path) -> i64 {
    let c = rusqlite::Connection::open(db).expect("open db");
    c.query_row("SELECT COUNT(*) FROM queries", [], |r| r.get(0))
        .expect("count")
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // 10,000 streams need about 20,000 sockets here and 20,000 in tollgate.
    if std::env::var_os("TOLLGATE_SOAK_RAISED").is_none() {
        let me = std::env::current_exe().expect("exe");
        let args: Vec<String> = std::env::args().skip(1).collect();
        let status = Command::new("sh")
            .arg("-c")
            .arg("ulimit -n 200000 2>/dev/null || ulimit -n 65536; exec \"$0\" \"$@\"")
            .arg(me)
            .args(args)
            .env("TOLLGATE_SOAK_RAISED", "1")
            .status()
            .expect("re-exec with a raised fd limit");
        std::process::exit(status.code().unwrap_or(1));
    }
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    if let Some(l) = limits.lines().find(|l| l.starts_with("Max open files")) {
        println!("{l}");
    }
    let smoke = std::env::var_os("TOLLGATE_BENCH_SMOKE").is_some_and(|v| v != "0");
    let streams: u64 = if smoke {
        200
    } else {
        env("TOLLGATE_SOAK_STREAMS", 10_000)
    };
    let hold_secs: u64 = if smoke {
        2
    } else {
        env("TOLLGATE_SOAK_HOLD_SECS", 20)
    };
    let soak_secs: u64 = if smoke {
        3
    } else {
        env("TOLLGATE_SOAK_SECS", 600)
    };
    let conc: usize = env("TOLLGATE_SOAK_CONCURRENCY", 32);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mock = rt.block_on(start_mock());
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("soak.db");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_tollgate"));
    let mut child = Command::new(&bin)
        .args([
            "--listen",
            &addr.to_string(),
            "--upstream",
            &format!("http://{mock}"),
        ])
        .arg("--db")
        .arg(&db)
        .args(["--shutdown-grace", "30s"])
        .env("RUST_LOG", "warn")
        .env_remove("TOLLGATE_UPSTREAM_TOKEN")
        .env_remove("FORWARD_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start tollgate");
    let pid = child.id();
    let until = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < until, "tollgate did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rss0 = rss_kib(pid, "VmRSS:");
    println!("tollgate pid {pid}, RSS at start {} MiB", rss0 >> 10);

    // Phase 1: hold `streams` slow streams open at once.
    let ok = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let (peak_held, peak_rss, all_ok) = rt.block_on(async {
        let mut tasks = Vec::with_capacity(streams as usize);
        for i in 0..streams {
            let ok = ok.clone();
            tasks.push(tokio::spawn(async move {
                if one(addr, hold_secs * 1000, &format!("hold-{}", i % 100)).await {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        let (mut peak_held, mut peak_rss) = (0, 0);
        let watch_until = Instant::now() + Duration::from_secs(hold_secs + 120);
        while Instant::now() < watch_until && tasks.iter().any(|t| !t.is_finished()) {
            peak_held = peak_held.max(HELD.load(Ordering::Relaxed));
            peak_rss = peak_rss.max(rss_kib(pid, "VmRSS:"));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for t in tasks {
            let _ = t.await;
        }
        (peak_held, peak_rss, ok.load(Ordering::Relaxed))
    });
    println!(
        "hold: {streams} streams, {peak_held} held open at once by upstream, {all_ok} completed OK, {} failed, in {:.1} s; tollgate RSS peak {} MiB",
        streams - all_ok,
        started.elapsed().as_secs_f64(),
        peak_rss >> 10
    );

    // Phase 2: steady closed-loop load (half plain streams, half with usage asked).
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut samples: Vec<(u64, u64)> = Vec::new();
    rt.block_on(async {
        let end = Instant::now() + Duration::from_secs(soak_secs);
        let mut workers = Vec::new();
        for w in 0..conc {
            let (done, failed) = (done.clone(), failed.clone());
            workers.push(tokio::spawn(async move {
                while Instant::now() < end {
                    if one(addr, 0, &format!("soak-{}", w % 8)).await {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        let t0 = Instant::now();
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_secs(if smoke { 1 } else { 10 })).await;
            samples.push((t0.elapsed().as_secs(), rss_kib(pid, "VmRSS:")));
        }
        for w in workers {
            let _ = w.await;
        }
    });
    let (done, failed) = (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let rss: Vec<u64> = samples.iter().map(|s| s.1 >> 10).collect();
    println!(
        "soak: {soak_secs} s at concurrency {conc}: {done} requests OK ({:.0}/s), {failed} failed; RSS MiB first {} min {} max {} last {}",
        done as f64 / soak_secs as f64,
        rss.first().copied().unwrap_or(0),
        rss.iter().min().copied().unwrap_or(0),
        rss.iter().max().copied().unwrap_or(0),
        rss.last().copied().unwrap_or(0)
    );
    println!(
        "RSS samples (s, MiB): {}",
        samples
            .iter()
            .map(|(t, r)| format!("{t}:{}", r >> 10))
            .collect::<Vec<_>>()
            .join(" ")
    );

    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let status = child.wait().expect("wait tollgate");
    let records = count_records(&db);
    let expected = all_ok + done;
    println!(
        "tollgate exit: {status}; records {records}, requests completed {expected} (+{} that failed)",
        (streams - all_ok) + failed
    );
    let pass = status.success()
        && all_ok == streams
        && failed == 0
        && records as u64 >= expected
        && records as u64 <= expected + (streams - all_ok) + failed;
    println!("{}", if pass { "PASS" } else { "FAIL" });
    if !pass {
        std::process::exit(1);
    }
}
