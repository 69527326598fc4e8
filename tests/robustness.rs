//! Robustness: a locked or unwritable database, the process killed or
//! stopped under load, secrets kept out of every answer and log line, the
//! non-loopback warning, slow and lying clients, and uploads cut mid-way.
//! Records are counted every time.

mod common;

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------
// The tollgate binary, with its whole stderr kept.
// ---------------------------------------------------------------------------

struct Bin {
    child: Child,
    /// Where to connect (loopback even when bound to 0.0.0.0).
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Bin {
    fn drop(&mut self) {
        // Only if a test failed half-way: never leave the process behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address of the "tollgate listening" line, text or JSON format.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    if !line.contains("tollgate listening") {
        return None;
    }
    let text = line.find("addr=").map(|at| {
        line[at + 5..]
            .split(|c: char| c.is_whitespace())
            .next()
            .unwrap_or("")
    });
    let json = line
        .find("\"addr\":\"")
        .map(|at| line[at + 8..].split('"').next().unwrap_or(""));
    let addr: SocketAddr = text.or(json)?.parse().ok()?;
    if addr.ip().is_unspecified() {
        return Some(SocketAddr::from(([127, 0, 0, 1], addr.port())));
    }
    Some(addr)
}

impl Bin {
    /// Starts tollgate on `listen` and waits for its listening line.
    fn spawn(listen: &str, upstream: &str, db: &Path, extra: &[&str], env: &[(&str, &str)]) -> Bin {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.args(["--listen", listen, "--upstream", upstream])
            .arg("--db")
            .arg(db)
            .arg("--no-default-prices")
            .args(extra)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info");
        for k in [
            "TOLLGATE_UPSTREAM_TOKEN",
            "FORWARD_TOKEN",
            "TOLLGATE_ADMIN_TOKEN",
            "TOLLGATE_CONFIG",
        ] {
            cmd.env_remove(k);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tollgate");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            let mut tx = Some(tx);
            let mut r = BufReader::new(stderr);
            let mut buf = Vec::new();
            // Byte lines, not `lines()`: invalid UTF-8 must not stop the
            // draining (a full pipe would block the child).
            while matches!(r.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                let line = String::from_utf8_lossy(&buf).into_owned();
                buf.clear();
                if let Some(addr) = listening_addr(&line) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
                sink.lock().unwrap().push_str(&line);
            }
        });
        let addr = match rx.recv_timeout(STEP) {
            Ok(a) => a,
            Err(_) => panic!(
                "tollgate did not log its listening address: {}",
                log.lock().unwrap()
            ),
        };
        Bin {
            child,
            addr,
            log,
            reader: Some(reader),
        }
    }

    /// Stderr so far.
    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn signal(&self, sig: &str) {
        // Through the shell's builtin: /bin/kill is not on every minimal image.
        let ok = Command::new("sh")
            .args(["-c", &format!("kill -{sig} {}", self.child.id())])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    async fn wait_exit(&mut self) -> ExitStatus {
        let child = &mut self.child;
        eventually("tollgate exits", STEP, || {
            let st = child.try_wait().expect("try_wait");
            async move { st }
        })
        .await
    }

    /// SIGTERM, a clean exit, and the whole stderr.
    async fn stop(&mut self) -> String {
        // An answer proves the accept loop runs, and with it the signal
        // handler (see `sigterm_right_after_the_listening_line_is_a_clean_exit`).
        assert_eq!(send(self.addr, get("/healthz")).await.status, 200);
        self.signal("TERM");
        let st = self.wait_exit().await;
        let log = self.finish_log();
        assert_eq!(st.code(), Some(0), "clean exit; log:\n{log}");
        log
    }

    /// The whole stderr, once the process has exited.
    fn finish_log(&mut self) -> String {
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.log()
    }
}

// ---------------------------------------------------------------------------
// Clients that report failures instead of panicking, and shared HTTP/2
// connections.
// ---------------------------------------------------------------------------

/// Aborts a connection task when dropped.
struct Abort(JoinHandle<()>);

impl Drop for Abort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Gives a request the URI and version HTTP/2 needs.
fn for_h2(addr: SocketAddr, mut req: Request<ReqBody>) -> Request<ReqBody> {
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    *req.uri_mut() = format!("http://{addr}{pq}").parse().unwrap();
    *req.version_mut() = http::Version::HTTP_2;
    req
}

/// Sends a request on a new connection and reads the whole answer; every
/// failure (refused, reset, cut body, timeout) is an `Err`.
async fn try_send(
    addr: SocketAddr,
    proto: Proto,
    mut req: Request<ReqBody>,
) -> Result<Resp, String> {
    let exchange = async move {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let io = TokioIo::new(stream);
        let (resp, _conn) = match proto {
            Proto::H1 => {
                let (mut tx, conn) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(|e| e.to_string())?;
                let guard = Abort(tokio::spawn(async move {
                    let _ = conn.await;
                }));
                req.headers_mut()
                    .insert("host", addr.to_string().parse().unwrap());
                (
                    tx.send_request(req).await.map_err(|e| e.to_string())?,
                    guard,
                )
            }
            Proto::H2 => {
                let (mut tx, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .map_err(|e| e.to_string())?;
                let guard = Abort(tokio::spawn(async move {
                    let _ = conn.await;
                }));
                let r = tx
                    .send_request(for_h2(addr, req))
                    .await
                    .map_err(|e| e.to_string())?;
                (r, guard)
            }
        };
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Resp {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(STEP, exchange)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

/// One HTTP/2 connection that many requests share.
struct H2Conn {
    addr: SocketAddr,
    tx: hyper::client::conn::http2::SendRequest<ReqBody>,
    _conn: Abort,
}

impl H2Conn {
    async fn new(addr: SocketAddr) -> H2Conn {
        let stream = within("connect", TcpStream::connect(addr))
            .await
            .expect("connect");
        let (tx, conn) = within(
            "h2 handshake",
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)),
        )
        .await
        .expect("h2 handshake");
        H2Conn {
            addr,
            tx,
            _conn: Abort(tokio::spawn(async move {
                let _ = conn.await;
            })),
        }
    }

    /// Sends a request on this connection; the answer head, or the error.
    async fn request(&self, req: Request<ReqBody>) -> Result<Response<Incoming>, String> {
        let mut tx = self.tx.clone();
        let req = for_h2(self.addr, req);
        within("h2 answer head", async move {
            tx.ready().await.map_err(|e| format!("{e:?}"))?;
            tx.send_request(req).await.map_err(|e| format!("{e:?}"))
        })
        .await
    }
}

/// An answer body read piece by piece, with the request id upstream gave it.
struct Open {
    id: String,
    body: Incoming,
    got: Vec<u8>,
    _conn: Option<Abort>,
}

impl Open {
    fn new(resp: Response<Incoming>, conn: Option<Abort>) -> Open {
        let (parts, body) = resp.into_parts();
        assert_eq!(parts.status, 200);
        Open {
            id: parts.headers["x-request-id"].to_str().unwrap().to_owned(),
            body,
            got: Vec::new(),
            _conn: conn,
        }
    }

    /// Opens a request on its own HTTP/1.1 connection.
    async fn h1(addr: SocketAddr, mut req: Request<ReqBody>) -> Open {
        let stream = within("connect", TcpStream::connect(addr))
            .await
            .expect("connect");
        let (mut tx, conn) = within(
            "h1 handshake",
            hyper::client::conn::http1::handshake(TokioIo::new(stream)),
        )
        .await
        .expect("h1 handshake");
        let guard = Abort(tokio::spawn(async move {
            let _ = conn.await;
        }));
        req.headers_mut()
            .insert("host", addr.to_string().parse().unwrap());
        let resp = within("h1 answer head", tx.send_request(req))
            .await
            .expect("answer head");
        Open::new(resp, Some(guard))
    }

    async fn read_until(&mut self, needle: &str) {
        while !contains(&self.got, needle.as_bytes()) {
            match within("body frame", self.body.frame()).await {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        self.got.extend_from_slice(&d);
                    }
                }
                other => panic!(
                    "stream ended ({other:?}) before {needle:?}: {:?}",
                    String::from_utf8_lossy(&self.got)
                ),
            }
        }
    }

    /// Reads to the end: all bytes, or the error.
    async fn finish(mut self) -> Result<(String, Vec<u8>), String> {
        loop {
            match within("body frame", self.body.frame()).await {
                None => return Ok((self.id, self.got)),
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        self.got.extend_from_slice(&d);
                    }
                }
                Some(Err(e)) => return Err(format!("{e:?}")),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Small helpers.
// ---------------------------------------------------------------------------

/// Records in the database, read through a connection of the test's own.
fn count_rows(db: &Path) -> i64 {
    let c = rusqlite::Connection::open(db).expect("open db");
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.query_row("SELECT COUNT(*) FROM queries", [], |r| r.get(0))
        .expect("count")
}

async fn wait_rows(db: &Path, n: i64) {
    eventually("records written", STEP, || async move {
        (count_rows(db) == n).then_some(())
    })
    .await
}

/// A mock that answers chat requests at once (streamed or not), tagging
/// each answer with `x-request-id: req-N`.
async fn quick_mock() -> Mock {
    Mock::start(|seen| {
        let id = format!("req-{}", seen.n);
        let reply = if seen.json()["stream"] == true {
            Reply::sse_events(chat_stream(
                seen,
                "gpt-4o",
                &["quick", " answer"],
                Tok::new(20, 2),
            ))
        } else {
            Reply::json(completion("gpt-4o", "quick", Tok::new(20, 1)))
        };
        reply.header("x-request-id", &id)
    })
    .await
}

/// Sends `n` chat requests at once (streamed and not, both protocols) and
/// returns their request ids; every one must succeed completely.
async fn burst(addr: SocketAddr, user: &str, n: usize) -> BTreeSet<String> {
    burst_of(addr, user, n, true).await
}

/// [`burst`], with streamed requests among them or not.
async fn burst_of(addr: SocketAddr, user: &str, n: usize, streams: bool) -> BTreeSet<String> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let user = user.to_owned();
        tasks.push(tokio::spawn(async move {
            let stream = streams && i % 2 == 0;
            let proto = if i % 3 == 0 { Proto::H2 } else { Proto::H1 };
            let r = send_with(addr, proto, chat_req(&user, &chat_body("gpt-4o", stream))).await;
            assert_eq!(r.status, 200, "{}", r.text());
            if stream {
                assert!(r.body.ends_with(b"data: [DONE]\n\n"), "{}", r.text());
            }
            r.header("x-request-id").expect("request id")
        }));
    }
    let mut ids = BTreeSet::new();
    for t in tasks {
        ids.insert(within("burst request", t).await.unwrap());
    }
    assert_eq!(ids.len(), n);
    ids
}

fn request_ids(db: &Path) -> BTreeSet<String> {
    db_rows(db)
        .into_iter()
        .filter_map(|r| r.request_id)
        .collect()
}

/// Holds `BEGIN EXCLUSIVE` on the database from a connection of the test
/// (for SQLite's locking, another process) until released.
struct Lock {
    release: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    at: Instant,
}

impl Lock {
    async fn take(db: &Path) -> Lock {
        let db = db.to_owned();
        let (locked_tx, locked_rx) = tokio::sync::oneshot::channel();
        let (release, release_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let c = rusqlite::Connection::open(&db).expect("open db");
            c.busy_timeout(Duration::from_secs(10)).unwrap();
            c.execute_batch("BEGIN EXCLUSIVE").expect("exclusive lock");
            let _ = locked_tx.send(());
            // Released by the test, or by its end (the sender dropped).
            let _ = release_rx.recv();
            c.execute_batch("COMMIT").expect("release lock");
        });
        within("lock taken", locked_rx)
            .await
            .expect("locker thread");
        Lock {
            release: Some(release),
            thread: Some(thread),
            at: Instant::now(),
        }
    }

    async fn release(mut self) {
        drop(self.release.take());
        let t = self.thread.take().unwrap();
        within(
            "lock released",
            tokio::task::spawn_blocking(move || t.join()),
        )
        .await
        .unwrap()
        .expect("locker thread");
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        drop(self.release.take());
    }
}

// ---------------------------------------------------------------------------
// 1. The database file locked for seconds.
// ---------------------------------------------------------------------------

/// Another process holds the write lock for about 6 s (longer than the
/// writer's 5 s busy timeout): requests keep being served, nothing is written
/// while the lock is held, and every record is written once it is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_locked_for_seconds_keeps_serving_and_writes_every_record_after() {
    let mock = quick_mock().await;
    let mut proxy = Proxy::start(&mock.url()).await;
    let mut ids = burst(proxy.addr, "before", 4).await;
    wait_rows(&proxy.db, 4).await;

    let lock = Lock::take(&proxy.db).await;
    ids.extend(burst(proxy.addr, "during", 24).await);
    assert_eq!(proxy.get("/healthz").await.status, 200);
    // Readers are not blocked (WAL), the writer is: the new records wait.
    assert_eq!(count_rows(&proxy.db), 4, "nothing written under the lock");
    tokio::time::sleep_until((lock.at + Duration::from_secs(6)).into()).await;
    ids.extend(burst(proxy.addr, "late", 4).await);
    lock.release().await;

    wait_rows(&proxy.db, 32).await;
    let recs = proxy.wait_records(32).await;
    assert_eq!(recs.len(), 32);
    proxy.stop().await;
    let rows = db_rows(&proxy.db);
    assert_eq!(rows.len(), 32, "exactly one record per request");
    assert_eq!(request_ids(&proxy.db), ids);
    assert!(rows.iter().all(|r| r.status == 200 && !r.estimated));
}

// ---------------------------------------------------------------------------
// 2. The database refusing writes.
// ---------------------------------------------------------------------------

/// `writer_errors` from the Prometheus text.
fn writer_errors(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("writer_errors"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// Commits fail for as long as another process holds the write lock past the
/// busy timeout (chmod cannot make a file unwritable for root, and tollgate
/// keeps its file open anyway). Meanwhile: requests are served, the log says
/// why records are not written, `/readyz` is 503, records are held; once
/// writes work again every record is written and `/readyz` is 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_database_is_logged_unready_and_records_are_held() {
    let mock = quick_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tollgate.db");
    let mut bin = Bin::spawn("127.0.0.1:0", &mock.url(), &db, &[], &[]);
    let addr = bin.addr;
    let mut ids = burst(addr, "before", 2).await;
    wait_rows(&db, 2).await;
    assert_eq!(send(addr, get("/readyz")).await.status, 200);

    let lock = Lock::take(&db).await;
    ids.extend(burst(addr, "during", 6).await);
    let unready = eventually("/readyz turns 503", STEP, || async move {
        let r = send(addr, get("/readyz")).await;
        (r.status == 503).then_some(r)
    })
    .await;
    let why = unready.json();
    assert_eq!(why["status"], "unready");
    assert!(
        why["reason"].as_str().unwrap().contains("database"),
        "{why}"
    );
    // Still serving while the writes fail.
    ids.extend(burst(addr, "failing", 6).await);
    let log = bin.log();
    let line = log
        .lines()
        .find(|l| l.contains("cannot write usage records"))
        .unwrap_or_else(|| panic!("no write error in the log:\n{log}"));
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("database is locked"), "says why: {line}");
    let metrics = send(addr, get("/metrics")).await.text();
    assert!(writer_errors(&metrics) >= 1.0, "{metrics}");
    assert_eq!(count_rows(&db), 2, "records held, not written");

    lock.release().await;
    eventually("/readyz back to 200", STEP, || async move {
        (send(addr, get("/readyz")).await.status == 200).then_some(())
    })
    .await;
    wait_rows(&db, 14).await;
    let log = bin.stop().await;
    assert!(
        log.contains("usage records written after the database recovered"),
        "{log}"
    );
    assert!(!log.contains("lost"), "no record given up: {log}");
    assert_eq!(count_rows(&db), 14);
    assert_eq!(request_ids(&db), ids);
}

// ---------------------------------------------------------------------------
// 3. SIGKILL under load.
// ---------------------------------------------------------------------------

async fn num_queries(addr: SocketAddr) -> u64 {
    let r = send(addr, get("/usage")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["numQueries"].as_u64().expect("numQueries")
}

/// SIGKILL while requests stream: the database is intact, and the loss is
/// bounded.
///
/// The bound: the writer commits whatever is queued as soon as it arrives
/// (no timer-based batch window; at most 8192 records per transaction), and
/// a committed transaction survives the death of the process (WAL,
/// synchronous=NORMAL; only a power loss can take the last commits). So a
/// kill loses only the records not yet committed: requests still in flight,
/// and requests that ended during the last transaction (milliseconds). Every
/// record `/usage` has counted survives, and there is never more than one
/// record per request that reached upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_leaves_an_intact_database_and_bounded_loss() {
    let mock = Mock::start(|seen| {
        let id = format!("req-{}", seen.n);
        let reply = if seen.json()["stream"] == true {
            let mut steps = Vec::new();
            for e in chat_stream(seen, "gpt-4o", &["a", "b", "c"], Tok::new(10, 3)) {
                steps.push(Step::Send(e));
                steps.push(Step::Sleep(Duration::from_millis(3)));
            }
            Reply::sse(steps)
        } else {
            Reply::json(completion("gpt-4o", "abc", Tok::new(10, 3)))
        };
        reply.header("x-request-id", &id)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tollgate.db");
    let mut bin = Bin::spawn("127.0.0.1:0", &mock.url(), &db, &[], &[]);
    let addr = bin.addr;

    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicUsize::new(0));
    let completed = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..12usize {
        let (stop, started, completed) = (stop.clone(), started.clone(), completed.clone());
        workers.push(tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let stream = (w + i) % 2 == 0;
                let proto = if (w + i) % 3 == 0 {
                    Proto::H2
                } else {
                    Proto::H1
                };
                started.fetch_add(1, Ordering::SeqCst);
                let req = chat_req(&format!("w{w}"), &chat_body("gpt-4o", stream));
                if let Ok(r) = try_send(addr, proto, req).await {
                    if r.status == 200 && (!stream || r.body.ends_with(b"data: [DONE]\n\n")) {
                        completed.fetch_add(1, Ordering::SeqCst);
                    }
                }
                i += 1;
            }
        }));
    }
    let c = completed.clone();
    eventually("load is flowing", STEP, || {
        let n = c.load(Ordering::SeqCst);
        async move { (n >= 150).then_some(()) }
    })
    .await;
    // Every request completed so far is counted by /usage (records are
    // queued before the client sees the end).
    let done_before = completed.load(Ordering::SeqCst) as u64;
    let counted = eventually(
        "/usage counts the completed requests",
        STEP,
        || async move {
            let n = num_queries(addr).await;
            (n >= done_before).then_some(n)
        },
    )
    .await;
    let c = completed.clone();
    eventually("load still flowing", STEP, || {
        let n = c.load(Ordering::SeqCst) as u64;
        async move { (n >= done_before + 50).then_some(()) }
    })
    .await;
    bin.signal("KILL");
    let st = bin.wait_exit().await;
    assert_eq!(st.code(), None, "killed by the signal");
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        within("worker stops", w).await.unwrap();
    }
    let sent = started.load(Ordering::SeqCst) as i64;
    // Let the mock finish reading what tollgate wrote before it died.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reached = mock.seen().len() as i64;

    let c = rusqlite::Connection::open(&db).expect("open after kill");
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    let rows: i64 = c
        .query_row("SELECT COUNT(*) FROM queries", [], |r| r.get(0))
        .unwrap();
    // Records and their daily rollups are written in one transaction.
    let rolled: i64 = c
        .query_row(
            "SELECT COALESCE(SUM(queries), 0) FROM usage_daily",
            [],
            |r| r.get(0),
        )
        .unwrap();
    drop(c);
    assert_eq!(rolled, rows, "rollups match the records");
    assert!(
        rows >= counted as i64,
        "every counted record survives: {rows} < {counted}"
    );
    assert!(
        rows <= reached,
        "at most one record per upstream call: {rows} > {reached}"
    );
    assert!(rows <= sent, "{rows} > {sent}");
    let ids = db_rows(&db);
    let unique: BTreeSet<_> = ids.iter().filter_map(|r| r.request_id.clone()).collect();
    assert_eq!(
        unique.len(),
        ids.iter().filter(|r| r.request_id.is_some()).count(),
        "no record written twice"
    );

    // The killed database is usable as it is.
    let mut again = Bin::spawn("127.0.0.1:0", &mock.url(), &db, &[], &[]);
    assert_eq!(num_queries(again.addr).await as i64, rows);
    let r = send(again.addr, chat_req("after", &chat_body("gpt-4o", false))).await;
    assert_eq!(r.status, 200);
    again.stop().await;
    assert_eq!(count_rows(&db), rows + 1);
}

// ---------------------------------------------------------------------------
// 4. SIGTERM under load.
// ---------------------------------------------------------------------------

/// SIGTERM with 200 streams in flight (100 on their own HTTP/1.1
/// connections, 100 multiplexed on 4 HTTP/2 connections): the streams
/// finish, the exit code is 0, and every request the clients saw complete
/// has exactly its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_hundreds_of_streams_in_flight_records_every_one() {
    let gate = Gate::new();
    let g = gate.clone();
    let mock = Mock::start(move |seen| {
        let id = format!("req-{}", seen.n);
        let reply = if seen.json()["stream"] == true {
            let ev = chat_stream(seen, "gpt-4o", &["slow", " stream"], Tok::new(20, 2));
            let mut steps = vec![Step::Send(ev[0].clone()), Step::Send(ev[1].clone())];
            steps.push(Step::Wait(g.clone()));
            steps.extend(ev[2..].iter().cloned().map(Step::Send));
            Reply::sse(steps)
        } else {
            Reply::json(completion("gpt-4o", "fast", Tok::new(20, 1)))
        };
        reply.header("x-request-id", &id)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tollgate.db");
    let mut bin = Bin::spawn(
        "127.0.0.1:0",
        &mock.url(),
        &db,
        &["--shutdown-grace", "15s"],
        &[],
    );
    let addr = bin.addr;
    let mut completed = burst_of(addr, "fast", 10, false).await;

    let h2: Arc<Vec<H2Conn>> = Arc::new({
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(H2Conn::new(addr).await);
        }
        v
    });
    let mut opening = Vec::new();
    for i in 0..200usize {
        let h2 = h2.clone();
        opening.push(tokio::spawn(async move {
            let req = chat_req("slow", &chat_body("gpt-4o", true));
            let mut s = if i % 2 == 0 {
                Open::h1(addr, req).await
            } else {
                let resp = h2[i % 4].request(req).await.expect("h2 answer head");
                Open::new(resp, None)
            };
            s.read_until("slow").await;
            s
        }));
    }
    let mut streams = Vec::new();
    for t in opening {
        streams.push(within("stream opens", t).await.unwrap());
    }
    assert_eq!(mock.seen().len(), 210);

    bin.signal("TERM");
    eventually("listener closed", STEP, || async move {
        TcpStream::connect(addr).await.is_err().then_some(())
    })
    .await;
    assert!(bin.child.try_wait().unwrap().is_none(), "still draining");
    gate.open();
    let mut finishing = Vec::new();
    for s in streams {
        finishing.push(tokio::spawn(s.finish()));
    }
    for t in finishing {
        let (id, got) = within("stream finishes", t)
            .await
            .unwrap()
            .expect("stream completes during the grace period");
        assert!(got.ends_with(b"data: [DONE]\n\n"));
        completed.insert(id);
    }
    drop(h2);
    let st = bin.wait_exit().await;
    let log = bin.finish_log();
    assert_eq!(st.code(), Some(0), "clean exit; log:\n{log}");
    assert!(!log.contains("grace period over"), "{log}");

    let rows = db_rows(&db);
    assert_eq!(rows.len(), 210, "one record per request");
    assert_eq!(completed.len(), 210);
    assert_eq!(request_ids(&db), completed);
    assert_eq!(rows.iter().filter(|r| r.stream).count(), 200);
    assert!(rows.iter().all(|r| r.status == 200 && !r.estimated));
}

// ---------------------------------------------------------------------------
// 5. Secrets.
// ---------------------------------------------------------------------------

const UPSTREAM_KEY: &str = "sk-proj-Zq8UPSTREAMx7Lk2Vb9Rt4Yw6Nm3Hc5Jd1Pf0GsQ";
const ADMIN_KEY: &str = "tg-admin-Qw3ADMINv8Ht5Lp2Xz7Kc4Nb6Md9Rf1Sj0Yg";

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = c
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=c.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// Every 20-character piece of the key, plainly and base64-encoded (at each
/// of the three alignments, so the key inside any larger encoded value is
/// caught too).
fn fingerprints(key: &str) -> Vec<String> {
    let mut forms = vec![key.to_owned()];
    for pad in ["", "x", "xx"] {
        let enc = base64(format!("{pad}{key}").as_bytes());
        // Characters at the edges depend on the neighbours.
        forms.push(enc[4..enc.len() - 4].to_owned());
    }
    let mut out = Vec::new();
    for f in forms {
        let b = f.as_bytes();
        for w in b.windows(20) {
            out.push(String::from_utf8(w.to_vec()).unwrap());
        }
    }
    out
}

fn assert_no_secret(what: &str, hay: &[u8]) {
    for key in [UPSTREAM_KEY, ADMIN_KEY] {
        for piece in fingerprints(key) {
            assert!(
                !contains(hay, piece.as_bytes()),
                "{what} holds {piece:?} (from a key)"
            );
        }
    }
}

/// Headers that describe the mock's connection or set cookies.
const UPSTREAM_ONLY: [&str; 5] = [
    "set-cookie",
    "keep-alive",
    "x-upstream-hop",
    "proxy-authenticate",
    "trailer",
];

/// One answer as text: status, every header, body.
fn transcript(r: &Resp) -> Vec<u8> {
    let mut t = format!("{}\n", r.status).into_bytes();
    for (k, v) in &r.headers {
        t.extend_from_slice(k.as_str().as_bytes());
        t.extend_from_slice(b": ");
        t.extend_from_slice(v.as_bytes());
        t.push(b'\n');
    }
    t.extend_from_slice(&r.body);
    t.extend_from_slice(b"\n\n");
    t
}

/// Neither key appears in any answer or in any log line (at trace level,
/// text and JSON formats), whatever the request: success, stream, upstream
/// 401/500, 502 refused, 504 timeout, bad input, the admin endpoints with
/// and without the admin key. Upstream's cookies and hop-by-hop headers never
/// reach the client, on errors and streams too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_never_leak_into_answers_or_logs() {
    let masked = format!(
        "Incorrect API key provided: sk-proj-****{}. You can find your API key at https://platform.openai.com/account/api-keys.",
        &UPSTREAM_KEY[UPSTREAM_KEY.len() - 4..]
    );
    let e401 = serde_json::json!({"error":{"message":masked,"type":"invalid_request_error","param":null,"code":"invalid_api_key"}}).to_string();
    let mock = Mock::start(move |seen| {
        let v: Value = serde_json::from_slice(&seen.body).unwrap_or(Value::Null);
        let reply = match v["user"].as_str().unwrap_or("") {
            "u401" => Reply::json(e401.clone()).status(401),
            "u500" => Reply::json(
                r#"{"error":{"message":"The server had an error","type":"server_error","param":null,"code":null}}"#,
            )
            .status(500),
            "silent" => Reply::never(),
            _ if v["stream"] == true => Reply::sse_events(chat_stream(
                seen,
                "gpt-4o",
                &["secret", "-free"],
                Tok::new(9, 2),
            )),
            _ if seen.path.starts_with("/v1/models") => {
                Reply::json(r#"{"object":"list","data":[{"id":"gpt-4o","object":"model"}]}"#)
            }
            _ => Reply::json(completion("gpt-4o", "fine", Tok::new(9, 1))),
        };
        reply
            .header("set-cookie", "__cf_bm=abc; path=/; HttpOnly")
            .header("keep-alive", "timeout=5")
            .header("connection", "x-upstream-hop")
            .header("x-upstream-hop", "1")
            .header("proxy-authenticate", "Basic realm=\"up\"")
            .header("x-ratelimit-limit-tokens", "30000")
            .header("x-ratelimit-remaining-tokens", "29000")
            .header("x-ratelimit-reset-tokens", "2s")
            .header("x-ratelimit-limit-requests", "500")
            .header("x-ratelimit-remaining-requests", "499")
            .header("x-ratelimit-reset-requests", "120ms")
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let keys = [
        ("TOLLGATE_UPSTREAM_TOKEN", UPSTREAM_KEY),
        ("TOLLGATE_ADMIN_TOKEN", ADMIN_KEY),
        ("RUST_LOG", "trace"),
    ];
    let mut bin = Bin::spawn(
        "127.0.0.1:0",
        &mock.url(),
        &dir.path().join("a.db"),
        // One attempt per request: the record count below is per request.
        &[
            "--upstream-idle-timeout",
            "1s",
            "--max-body",
            "4KiB",
            "--upstream-retries",
            "0",
        ],
        &keys,
    );
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut refused = Bin::spawn(
        "127.0.0.1:0",
        &format!("http://{closed}"),
        &dir.path().join("b.db"),
        &["--log-format", "json"],
        &keys,
    );
    let (addr, addr_502) = (bin.addr, refused.addr);

    let chat = |user: &str, stream: bool| {
        let body = format!(
            r#"{{"model":"gpt-4o","user":"{user}","stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#
        );
        chat_req("alice", &body)
    };
    let admin = |method: &str, path: &str, key: Option<&str>, body: &str| {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(k) = key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        b.body(full(body.to_owned())).unwrap()
    };
    type Make = Box<dyn Fn() -> Request<ReqBody>>;
    let proxied: Vec<(u16, Make)> = vec![
        (200, Box::new(move || chat("ok", false))),
        (200, Box::new(move || chat("ok", true))),
        (401, Box::new(move || chat("u401", false))),
        (401, Box::new(move || chat("u401", true))),
        (500, Box::new(move || chat("u500", false))),
        (504, Box::new(move || chat("silent", false))),
        (
            200,
            Box::new(|| {
                Request::get("/v1/models")
                    .header("x-user", "alice")
                    .body(empty())
                    .unwrap()
            }),
        ),
        (400, Box::new(|| chat_req("alice", "not json"))),
        (400, Box::new(|| chat_req("alice", r#"{"model":5}"#))),
        (401, Box::new(|| chat_req("", &chat_body("gpt-4o", false)))),
        (
            413,
            Box::new(|| {
                chat_req(
                    "alice",
                    &format!(r#"{{"model":"gpt-4o","pad":"{}"}}"#, "x".repeat(5000)),
                )
            }),
        ),
    ];
    let a = |m: &'static str, p: &'static str, k: Option<&'static str>, b: &'static str| -> Make {
        Box::new(move || admin(m, p, k, b))
    };
    let admin_calls: Vec<(u16, Make)> = vec![
        (200, a("GET", "/ratelimits", Some(ADMIN_KEY), "")),
        (200, a("GET", "/usage", Some(ADMIN_KEY), "")),
        (200, a("GET", "/queries", Some(ADMIN_KEY), "")),
        (200, a("GET", "/metrics", Some(ADMIN_KEY), "")),
        (200, a("GET", "/models", Some(ADMIN_KEY), "")),
        (400, a("GET", "/usage?foo=1", Some(ADMIN_KEY), "")),
        (
            400,
            a(
                "POST",
                "/model/gpt-4o",
                Some(ADMIN_KEY),
                "{\"validFrom\":1}",
            ),
        ),
        (401, a("GET", "/usage", None, "")),
        (401, a("GET", "/queries", Some("tg-admin-wrong"), "")),
        (401, a("GET", "/ratelimits", Some(&UPSTREAM_KEY[..30]), "")),
        (405, a("DELETE", "/usage", Some(ADMIN_KEY), "")),
        (404, a("GET", "/nope", Some(ADMIN_KEY), "")),
        (200, a("GET", "/healthz", None, "")),
        (200, a("GET", "/readyz", None, "")),
    ];

    let mut all = Vec::new();
    for proto in [Proto::H1, Proto::H2] {
        for (want, make) in &proxied {
            let r = send_with(addr, proto, make()).await;
            assert_eq!(r.status.as_u16(), *want, "{proto:?}: {}", r.text());
            for h in UPSTREAM_ONLY {
                assert_eq!(r.header(h), None, "{h} reached the client ({proto:?})");
            }
            if let Some(c) = r.header("connection") {
                assert!(!c.contains("x-upstream-hop"), "{c}");
            }
            all.extend(transcript(&r));
        }
        let r = send_with(addr_502, proto, chat("ok", true)).await;
        assert_eq!(r.status, 502, "{}", r.text());
        all.extend(transcript(&r));
    }
    // The admin endpoints after the records exist, so they have content.
    let recs = eventually("records written", STEP, || async move {
        let r = send(addr, admin("GET", "/queries", Some(ADMIN_KEY), "")).await;
        let n = r.json().as_array().map_or(0, Vec::len);
        (n >= 14).then_some(n)
    })
    .await;
    assert_eq!(
        recs, 14,
        "6 chat requests that reached upstream and /v1/models, over both protocols"
    );
    for proto in [Proto::H1, Proto::H2] {
        for (want, make) in &admin_calls {
            let r = send_with(addr, proto, make()).await;
            assert_eq!(r.status.as_u16(), *want, "{proto:?} {}", r.text());
            all.extend(transcript(&r));
        }
    }
    let rl = send(addr, admin("GET", "/ratelimits", Some(ADMIN_KEY), "")).await;
    assert_eq!(rl.json()["tokens"]["remaining"], 29000, "{}", rl.text());

    let log_a = bin.stop().await;
    let log_b = refused.stop().await;
    // The keys were in use, and the logs are the verbose ones.
    assert!(mock
        .seen()
        .iter()
        .all(|s| s.header("authorization") == Some(format!("Bearer {UPSTREAM_KEY}"))));
    assert!(log_a.contains("TRACE"), "trace level is on");
    assert!(log_a.contains("tollgate::access"), "access lines are there");
    assert!(log_b.contains("\"level\":\"TRACE\""), "JSON trace lines");
    assert!(
        log_b.contains("unreachable") || log_b.contains("refused"),
        "{log_b}"
    );

    assert_no_secret("an answer", &all);
    assert_no_secret("the log", log_a.as_bytes());
    assert_no_secret("the JSON log", log_b.as_bytes());
    // The check itself would catch a leak.
    assert!(std::panic::catch_unwind(|| assert_no_secret(
        "probe",
        format!(
            "Authorization: Basic {}",
            base64(format!("u:{UPSTREAM_KEY}").as_bytes())
        )
        .as_bytes()
    ))
    .is_err());
}

// ---------------------------------------------------------------------------
// 6. Binding beyond loopback.
// ---------------------------------------------------------------------------

fn non_loopback_warnings(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("WARN") && l.contains("non-loopback"))
        .collect()
}

/// Listening on 0.0.0.0 warns loudly that the admin endpoints and the
/// x-user header are open to whoever reaches the port; loopback does not
/// warn, nor does a non-loopback address with an admin key and user keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_loopback_bind_warns_loudly_and_loopback_does_not() {
    let mock = quick_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tollgate.db");

    let mut open = Bin::spawn("0.0.0.0:0", &mock.url(), &db, &[], &[]);
    assert_eq!(send(open.addr, get("/healthz")).await.status, 200);
    let log = open.stop().await;
    let warns = non_loopback_warnings(&log);
    assert!(
        warns.iter().any(|l| l.contains("admin endpoints")),
        "warning about the admin endpoints:\n{log}"
    );
    assert!(
        warns.iter().any(|l| l.contains("x-user")),
        "warning about trusting x-user:\n{log}"
    );

    let mut local = Bin::spawn("127.0.0.1:0", &mock.url(), &db, &[], &[]);
    let log = local.stop().await;
    assert!(non_loopback_warnings(&log).is_empty(), "{log}");

    let mut locked_down = Bin::spawn(
        "0.0.0.0:0",
        &mock.url(),
        &db,
        &["--auth", "keys"],
        &[("TOLLGATE_ADMIN_TOKEN", ADMIN_KEY)],
    );
    let log = locked_down.stop().await;
    assert!(non_loopback_warnings(&log).is_empty(), "{log}");
}

// ---------------------------------------------------------------------------
// 7. Slow request heads.
// ---------------------------------------------------------------------------

/// How a trickled connection ended.
#[derive(Debug)]
struct Trickle {
    /// Bytes written before tollgate closed the connection (`None`: never closed).
    closed_after: Option<usize>,
    /// What tollgate sent back.
    got: Vec<u8>,
}

/// Writes `head` one byte every 300 ms, watching for the close; with
/// `then_wait`, keeps watching that long after the last byte.
async fn trickle(addr: SocketAddr, head: &[u8], then_wait: Duration) -> Trickle {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // Reads until the tick ends; true when the connection is closed.
    async fn watch(s: &mut TcpStream, got: &mut Vec<u8>, buf: &mut [u8], tick: Duration) -> bool {
        let until = tokio::time::Instant::now() + tick;
        loop {
            match tokio::time::timeout_at(until, s.read(buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            }
        }
    }
    for (i, b) in head.iter().enumerate() {
        if s.write_all(&[*b]).await.is_err() {
            return Trickle {
                closed_after: Some(i),
                got,
            };
        }
        if watch(&mut s, &mut got, &mut buf, Duration::from_millis(300)).await {
            return Trickle {
                closed_after: Some(i + 1),
                got,
            };
        }
    }
    let closed = watch(&mut s, &mut got, &mut buf, then_wait).await;
    Trickle {
        closed_after: closed.then_some(head.len()),
        got,
    }
}

/// A client sending its request head one byte every 300 ms is cut off by
/// the header timeout (1 s) long before the head is complete; a normal
/// client is served meanwhile; nothing is recorded for the slow one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_head_is_cut_by_the_header_timeout() {
    let mock = quick_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tollgate.db");
    let mut bin = Bin::spawn(
        "127.0.0.1:0",
        &mock.url(),
        &db,
        &["--header-timeout", "1s"],
        &[],
    );
    let addr = bin.addr;
    let body = chat_body("gpt-4o", false);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: tollgate\r\nx-user: slow\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let slow = tokio::spawn({
        let head = head.clone();
        async move { trickle(addr, head.as_bytes(), Duration::ZERO).await }
    });
    // Let the slow client get its connection and first bytes in.
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Served while the slow client holds its connection.
    let r = send(addr, chat_req("normal", &body)).await;
    assert_eq!(r.status, 200);
    let t = within("slow client", slow).await.unwrap();
    let n = t.closed_after.expect("tollgate closes the connection");
    assert!(n < head.len(), "closed before the head was complete: {t:?}");
    assert!(
        t.got.is_empty() || t.got.starts_with(b"HTTP/1.1 408"),
        "nothing but a timeout answer: {:?}",
        String::from_utf8_lossy(&t.got)
    );
    bin.stop().await;
    let rows = db_rows(&db);
    assert_eq!(rows.len(), 1, "only the normal client is recorded");
    assert_eq!(rows[0].user, "normal");
    assert_eq!(mock.seen().len(), 1);
}

/// A connection that sends nothing (or trickles the HTTP/2 preface) must be
/// closed by the header timeout too; otherwise idle sockets pile up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_or_trickled_preface_connections_are_closed_by_the_header_timeout() {
    let mock = quick_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tollgate.db");
    let mut bin = Bin::spawn(
        "127.0.0.1:0",
        &mock.url(),
        &db,
        &["--header-timeout", "1s"],
        &[],
    );
    let addr = bin.addr;
    // Ten header timeouts of silence: far past the limit, short for a test.
    let silent = tokio::spawn(async move { trickle(addr, b"", Duration::from_secs(10)).await });
    let preface = tokio::spawn(async move {
        trickle(
            addr,
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            Duration::from_secs(3),
        )
        .await
    });
    let silent = within("silent client", silent).await.unwrap();
    let preface = within("preface client", preface).await.unwrap();
    bin.stop().await;
    assert!(
        silent.closed_after.is_some() && preface.closed_after.is_some_and(|n| n < 24),
        "kept open: silent {silent:?}, trickled preface {preface:?}"
    );
}

// ---------------------------------------------------------------------------
// 8. Uploads cut mid-way.
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UploadEnd {
    Reading,
    Complete,
    Broken,
}

#[derive(Clone, Debug)]
struct Upload {
    path: String,
    bytes: usize,
    end: UploadEnd,
}

/// An upstream that reads every request body frame by frame and notes how
/// it ended (the common mock only sees whole bodies).
struct UploadMock {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Upload>>>,
    _accept: Abort,
}

impl UploadMock {
    async fn start() -> UploadMock {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Upload>>> = Arc::default();
        let s = seen.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let n = {
                                let mut all = seen.lock().unwrap();
                                all.push(Upload {
                                    path: req.uri().path().to_owned(),
                                    bytes: 0,
                                    end: UploadEnd::Reading,
                                });
                                all.len() - 1
                            };
                            let mut body = req.into_body();
                            let end = loop {
                                match body.frame().await {
                                    None => break UploadEnd::Complete,
                                    Some(Err(_)) => break UploadEnd::Broken,
                                    Some(Ok(f)) => {
                                        let len = f.data_ref().map_or(0, Bytes::len);
                                        seen.lock().unwrap()[n].bytes += len;
                                    }
                                }
                            };
                            seen.lock().unwrap()[n].end = end;
                            let mut r = Response::new(Full::new(Bytes::from_static(
                                br#"{"id":"file-abc123","object":"file","text":"hello"}"#,
                            )));
                            r.headers_mut()
                                .insert("content-type", "application/json".parse().unwrap());
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        UploadMock {
            addr,
            seen,
            _accept: Abort(accept),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<Upload> {
        self.seen.lock().unwrap().clone()
    }

    async fn wait_bytes(&self, n: usize) {
        eventually("upload bytes reach upstream", STEP, || async move {
            self.seen()
                .first()
                .is_some_and(|u| u.bytes >= n)
                .then_some(())
        })
        .await
    }

    async fn wait_end(&self) -> Upload {
        eventually("upstream upload ends", STEP, || async move {
            self.seen()
                .into_iter()
                .next()
                .filter(|u| u.end != UploadEnd::Reading)
        })
        .await
    }
}

/// The start of a multipart upload naming `model`, then file bytes.
fn multipart_start(field: &str, value: &str) -> Vec<u8> {
    let mut b = format!(
        "--XyZ\r\nContent-Disposition: form-data; name=\"{field}\"\r\n\r\n{value}\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    b.extend(std::iter::repeat_n(b'A', 3000));
    b
}

/// An HTTP/1.1 chunk.
fn chunk_of(data: &[u8]) -> Vec<u8> {
    let mut c = format!("{:x}\r\n", data.len()).into_bytes();
    c.extend_from_slice(data);
    c.extend_from_slice(b"\r\n");
    c
}

/// Uploads to `path` (chunked, over HTTP/1.1), then drops the connection
/// mid-body. Returns what upstream saw and the record, after checking that
/// there is exactly one.
async fn leave_mid_upload_h1(path: &str, field: &str, value: &str) -> (Upload, Value) {
    let up = UploadMock::start().await;
    let mut proxy = Proxy::start(&up.url()).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: tollgate\r\nx-user: uploader\r\ncontent-type: multipart/form-data; boundary=XyZ\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let data = multipart_start(field, value);
    for piece in data.chunks(1000) {
        s.write_all(&chunk_of(piece)).await.unwrap();
    }
    up.wait_bytes(data.len()).await;
    drop(s);
    let u = up.wait_end().await;
    let rec = proxy.wait_records(1).await.remove(0);
    proxy.stop().await;
    assert_eq!(db_rows(&proxy.db).len(), 1, "{path}: exactly one record");
    assert_eq!(up.seen().len(), 1);
    (u, rec)
}

/// A body that yields `first`, then stays open until dropped.
struct Dangling(Option<Bytes>, mpsc::Receiver<()>);

impl http_body::Body for Dangling {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(b) = this.0.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        match this.1.poll_recv(cx) {
            Poll::Ready(_) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Same over HTTP/2: the client's connection dies mid-upload.
async fn leave_mid_upload_h2() -> (Upload, Value) {
    let up = UploadMock::start().await;
    let mut proxy = Proxy::start(&up.url()).await;
    let conn = H2Conn::new(proxy.addr).await;
    let data = multipart_start("model", "whisper-1");
    let (_keep, rx) = mpsc::channel(1);
    let req = Request::post("/v1/audio/transcriptions")
        .header("x-user", "uploader")
        .header("content-type", "multipart/form-data; boundary=XyZ")
        .body(Dangling(Some(Bytes::from(data.clone())), rx).boxed_unsync())
        .unwrap();
    let pending = tokio::spawn(async move {
        let _ = conn.request(req).await;
        conn
    });
    up.wait_bytes(data.len()).await;
    // The connection task goes with the client.
    pending.abort();
    let u = up.wait_end().await;
    let rec = proxy.wait_records(1).await.remove(0);
    proxy.stop().await;
    assert_eq!(db_rows(&proxy.db).len(), 1, "exactly one record");
    (u, rec)
}

/// The client drops its connection in the middle of a chunked upload to a
/// streamed endpoint (one not buffered for metering): tollgate cuts the
/// upstream request (upstream sees its body break, not end), and exactly one
/// record is written.
///
/// Its status today: 502 over HTTP/1.1 (the upstream call fails on the
/// broken body before any answer, and proxy.rs maps every non-connect error
/// to 502; hyper's HTTP/1.1 server polls the handler to completion), 499 or
/// 502 over HTTP/2 (whichever comes first: hyper dropping the handler on the
/// stream reset, or the upstream call failing). See
/// `client_leaving_mid_upload_is_recorded_as_499` for what it should be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_mid_upload_cuts_upstream_and_is_recorded_once() {
    for (path, field, value) in [
        ("/v1/files", "purpose", "batch"),
        ("/v1/audio/transcriptions", "model", "whisper-1"),
    ] {
        let (u, rec) = leave_mid_upload_h1(path, field, value).await;
        assert_eq!(u.path, path);
        assert_eq!(u.end, UploadEnd::Broken, "{path}: upstream saw {u:?}");
        assert_eq!(rec["user"], "uploader", "{rec}");
        assert_eq!(rec["endpoint"], path, "{rec}");
        assert!(rec["status"] == 502 || rec["status"] == 499, "{rec}");
        if field == "model" {
            assert_eq!(rec["requestedModel"], "whisper-1", "{rec}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_mid_upload_over_http2_is_recorded_once() {
    let (u, rec) = leave_mid_upload_h2().await;
    assert_eq!(u.end, UploadEnd::Broken, "upstream saw {u:?}");
    assert!(rec["status"] == 502 || rec["status"] == 499, "{rec}");
    assert_eq!(rec["requestedModel"], "whisper-1", "{rec}");
}

/// A client that leaves mid-upload is a client gone (499), as before the
/// answer head of any other request, whatever the protocol and timing; 502
/// would blame upstream in the usage data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_mid_upload_is_recorded_as_499() {
    let (_, rec) = leave_mid_upload_h1("/v1/files", "purpose", "batch").await;
    assert_eq!(rec["status"], 499, "HTTP/1.1: {rec}");
    let (_, rec) = leave_mid_upload_h2().await;
    assert_eq!(rec["status"], 499, "HTTP/2: {rec}");
}

// ---------------------------------------------------------------------------
// 9. Bodies that lie about their length.
// ---------------------------------------------------------------------------

/// Writes `bytes` on a new connection, optionally half-closes, and reads
/// until tollgate closes (bounded).
async fn raw_exchange(addr: SocketAddr, bytes: &[u8], half_close: bool) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // Tollgate may answer and close before reading everything: a failed
    // write is part of the outcome, not a test error.
    let _ = s.write_all(bytes).await;
    if half_close {
        let _ = s.shutdown().await;
    }
    let mut got = Vec::new();
    let _ = within("tollgate closes the connection", async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    got
}

/// Reads until an answer head is complete or the connection closes (bounded).
async fn read_head(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    within("answer head", async {
        let mut buf = [0u8; 4096];
        while !contains(&got, b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    got
}

/// The status codes of the HTTP/1.1 answers in `raw`.
fn statuses(raw: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(raw);
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(at, _)| text[at + 9..at + 12].parse().ok())
        .collect()
}

/// Content-Length says 10 and 1000 bytes come; says 1000 and 10 come before
/// the client half-closes or leaves: a clean 400 or a closed connection,
/// never a crash, an upstream call or a record; the server goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_lying_about_their_length_are_refused_without_a_record() {
    let mock = quick_mock().await;
    let mut proxy = Proxy::start(&mock.url()).await;
    let addr = proxy.addr;
    let mut body = format!(
        r#"{{"model":"gpt-4o","messages":[],"pad":"{}"}}"#,
        "x".repeat(960)
    )
    .into_bytes();
    body.truncate(1000);
    let head = |len: usize| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: tollgate\r\nx-user: liar\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n"
        )
        .into_bytes()
    };

    // Too short a length: the first 10 bytes are the body (not JSON: 400),
    // the rest is garbage where the next request head should be.
    let mut short = head(10);
    short.extend_from_slice(&body);
    let got = raw_exchange(addr, &short, false).await;
    let st = statuses(&got);
    assert_eq!(
        st.first(),
        Some(&400),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(st.iter().all(|s| *s == 400), "{st:?}");
    assert!(contains(&got, br#""type":"invalid_request_error""#));

    // Too long a length, then a half-close: the body is cut short.
    let mut long = head(1000);
    long.extend_from_slice(&body[..10]);
    let got = raw_exchange(addr, &long, true).await;
    assert_eq!(statuses(&got), [400], "{:?}", String::from_utf8_lossy(&got));
    assert!(contains(&got, b"could not read the request body"));

    // Too long a length, then the client leaves.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&long).await.unwrap();
    drop(s);

    // A chunked body with a broken chunk size.
    let bad_chunk = b"POST /v1/chat/completions HTTP/1.1\r\nhost: tollgate\r\nx-user: liar\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n";
    let got = raw_exchange(addr, bad_chunk, false).await;
    assert_eq!(statuses(&got), [400], "{:?}", String::from_utf8_lossy(&got));
    assert!(contains(&got, br#""type":"invalid_request_error""#));

    let r = proxy.chat("honest", &chat_body("gpt-4o", false)).await;
    assert_eq!(r.status, 200, "still serving");
    proxy.stop().await;
    let rows = db_rows(&proxy.db);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].user, "honest");
    assert_eq!(mock.seen().len(), 1, "no lying body went upstream");
}

// ---------------------------------------------------------------------------
// 10. HTTP/2 bad input not covered elsewhere.
// ---------------------------------------------------------------------------

/// Over HTTP/2, a content-length that disagrees with the DATA frames
/// (either way) resets that stream only: no upstream call, no record, and
/// the same connection goes on serving. A non-ASCII x-user is a 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_lying_content_length_and_bad_user_are_refused() {
    let mock = quick_mock().await;
    let mut proxy = Proxy::start(&mock.url()).await;
    let conn = H2Conn::new(proxy.addr).await;
    let body = chat_body("gpt-4o", false);
    for declared in [10, body.len() + 500] {
        let req = Request::post("/v1/chat/completions")
            .header("x-user", "liar")
            .header("content-type", "application/json")
            .header("content-length", declared)
            .body(full(body.clone()))
            .unwrap();
        // The h2 layer refuses the mismatch before tollgate reads a byte.
        match conn.request(req).await {
            Err(e) => assert!(
                e.contains("Reset") && e.contains("PROTOCOL_ERROR"),
                "declared {declared}: {e}"
            ),
            Ok(r) => panic!("declared {declared}: answered {}", r.status()),
        }
    }
    let odd = http::HeaderValue::from_bytes(b"J\xc3\xbcrgen").unwrap();
    let req = Request::post("/v1/chat/completions")
        .header("x-user", odd)
        .body(full(body.clone()))
        .unwrap();
    let r = conn.request(req).await.expect("answer");
    let (parts, b) = r.into_parts();
    let r = Resp {
        status: parts.status,
        headers: parts.headers,
        body: b.collect().await.unwrap().to_bytes(),
    };
    assert_openai_error(&r, 401, "invalid_request_error", None, None);

    let ok = conn
        .request(chat_req("honest", &body))
        .await
        .expect("same connection still serves");
    assert_eq!(ok.status(), 200);
    let _ = ok.into_body().collect().await.unwrap();
    proxy.stop().await;
    let rows = db_rows(&proxy.db);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(mock.seen().len(), 1);
}

/// An upload that takes longer than the upstream idle timeout while its
/// bytes keep flowing is not a silent upstream: upstream cannot answer
/// before the body is complete, so the wait for the answer head must not
/// count the upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_streamed_upload_is_not_an_upstream_timeout() {
    let up = UploadMock::start().await;
    let proxy = Proxy::builder(&up.url())
        .idle(Duration::from_secs(1))
        .start()
        .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let head = "POST /v1/files HTTP/1.1\r\nhost: tollgate\r\nx-user: uploader\r\ncontent-type: multipart/form-data; boundary=XyZ\r\ntransfer-encoding: chunked\r\n\r\n";
    s.write_all(head.as_bytes()).await.unwrap();
    let data = multipart_start("purpose", "batch");
    // A piece every 250 ms: never silent for long, 2.5 s in all.
    for piece in data.chunks(300) {
        if s.write_all(&chunk_of(piece)).await.is_err() {
            break; // tollgate gave up on the request
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let _ = s.write_all(&chunk_of(b"\r\n--XyZ--\r\n")).await;
    let _ = s.write_all(b"0\r\n\r\n").await;
    let got = read_head(&mut s).await;
    assert_eq!(
        statuses(&got).first(),
        Some(&200),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    let u = up.wait_end().await;
    assert_eq!(u.end, UploadEnd::Complete, "{u:?}");
    let rec = &proxy.wait_records(1).await[0];
    assert_eq!(rec["status"], 200, "{rec}");
}

extern "C" {
    /// kill(2) from the C library std already links: a signal sent within
    /// microseconds, where spawning `kill` takes milliseconds.
    fn kill(pid: i32, sig: i32) -> i32;
}

/// SIGTERM right after start-up (a supervisor stopping a service it just
/// started) is a clean shutdown too.
#[test]
fn sigterm_right_after_the_listening_line_is_a_clean_exit() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tollgate.db");
    let mut killed = 0;
    for _ in 0..50 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "http://127.0.0.1:9",
            ])
            .arg("--db")
            .arg(&db)
            .arg("--no-default-prices")
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tollgate");
        let pid = child.id() as i32;
        let mut r = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        while matches!(r.read_line(&mut line), Ok(n) if n > 0) {
            if line.contains("tollgate listening") {
                // SAFETY: plain kill(2) on our own child, which has not been reaped.
                assert_eq!(unsafe { kill(pid, 15) }, 0);
                break;
            }
            line.clear();
        }
        // Drain the rest so the child never blocks on a full pipe.
        std::io::copy(&mut r, &mut std::io::sink()).unwrap();
        let st = child.wait().unwrap();
        if std::os::unix::process::ExitStatusExt::signal(&st) == Some(15) {
            killed += 1;
        } else {
            assert_eq!(st.code(), Some(0), "{st:?}");
        }
    }
    assert_eq!(killed, 0, "of 50 starts, {killed} died on the signal");
}
