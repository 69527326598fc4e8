//! End-to-end load benchmark: a fast mock upstream, tollgate (the real
//! binary) and, when installed, nginx as a plain `proxy_pass` floor, all driven
//! by a closed-loop keep-alive load generator from the same run.
//!
//! `cargo bench --bench load`. Environment:
//! - `TOLLGATE_BENCH_SECS` measured seconds per cell (default 5; 1 s of warm-up before each),
//! - `TOLLGATE_BENCH_CONCURRENCY` e.g. `1,32,128` (the default),
//! - `TOLLGATE_BENCH_SMOKE=1` a fraction of a second per cell at concurrency 1 and 4
//!   (also what `cargo test --all-targets` runs),
//! - `TOLLGATE_BENCH_NGINX` path of nginx (default `/usr/sbin/nginx`; `none` skips it),
//! - `TOLLGATE_BENCH_CLIENT_THREADS` / `TOLLGATE_BENCH_MOCK_THREADS` (default 2 each),
//! - `TOLLGATE_BENCH_BIN` another tollgate binary to measure (default: the one cargo built),
//! - `TOLLGATE_BENCH_BIG_MB` size of the big-stream RSS check (default 100, 0 skips it),
//! - `TOLLGATE_BENCH_AUTH=keys` runs tollgate in `--auth keys` mode with an
//!   admin key, one tollgate key per client user and a budget plus request and
//!   token limits on every user (all far above what the run spends), so every
//!   request pays for the key check and the budget reservation,
//! - `TOLLGATE_BENCH_PROXY_CPUS`, `TOLLGATE_BENCH_MOCK_CPUS`,
//!   `TOLLGATE_BENCH_CLIENT_CPUS`: CPU lists (`taskset -c` syntax, e.g. `0-3`)
//!   for the proxy under test (tollgate or nginx), the mock's threads and the
//!   load generator's threads, so a many-core host can give each its own
//!   cores (as the lab in `../shared/lab` does: 0-3, 4-9, 10-15 on 16
//!   cores); unset, everything shares every core,
//! - `TOLLGATE_BENCH_LOG` tollgate's `RUST_LOG` (default `info`: an access
//!   line per request, as in production),
//! - `TOLLGATE_BENCH_UPSTREAM=table` configures the one upstream as an
//!   `[[upstream]]` table in a TOML file rather than with `--upstream`
//!   (the same URL, the same key or none),
//! - `TOLLGATE_BENCH_SCENARIOS` subset of `chat,stream,stream+usage`, and
//!   `TOLLGATE_BENCH_TARGETS` subset of `direct,tollgate,tollgate-pg,nginx` (for profiling one cell),
//! - `--db postgres` (after `--`) or `TOLLGATE_BENCH_DB=postgres`: a second
//!   tollgate on a fresh database of the PostgreSQL server at
//!   `TOLLGATE_BENCH_PG` (or `TOLLGATE_TEST_PG`), measured right after the
//!   SQLite one in every cell (target `tollgate-pg`), with a table of
//!   PostgreSQL/SQLite ratios; its records are counted too.
//!
//! Exits non-zero when the database does not hold exactly one record per
//! request completed through tollgate, or when answers are wrong; never
//! because of a timing.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

#[allow(dead_code)]
mod common;
use common::{chat_answer, chat_request, chat_stream_events, StreamMode};

// ---------------------------------------------------------------- mock upstream

/// Everything the mock answers, built once.
struct Payloads {
    json: Bytes,
    stream: Vec<Bytes>,
    stream_usage: Vec<Bytes>,
    /// About 64 KiB of content chunk events, repeated for big streams.
    block: Bytes,
}

static PAYLOADS: LazyLock<Payloads> = LazyLock::new(|| {
    let frames = |usage| {
        // 20 chunks: role, 18 content, finish; then usage when asked, then [DONE].
        chat_stream_events(0, 18, 3, usage)
            .into_iter()
            .map(Bytes::from)
            .collect()
    };
    let events = chat_stream_events(64 << 10, 0, 3, false);
    Payloads {
        json: Bytes::from(chat_answer(1024)),
        stream: frames(false),
        stream_usage: frames(true),
        // Without the role chunk, the finish chunk and [DONE].
        block: Bytes::from(events[1..events.len() - 2].concat()),
    }
});

/// Request header asking the mock for a streamed answer of about this many bytes.
const BIG_STREAM_HEADER: &str = "x-mock-stream-bytes";

/// A body of prepared frames, each handed to hyper separately as an upstream
/// writing one SSE event at a time would.
struct Frames {
    frames: VecDeque<Bytes>,
    exact: Option<u64>,
}

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(
            self.get_mut()
                .frames
                .pop_front()
                .map(|b| Ok(Frame::data(b))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        match self.exact {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

fn openai_headers(b: http::response::Builder) -> http::response::Builder {
    b.header("x-request-id", "req_0d7b9b6a1e9f4f4c8c9a6f2b3d4e5f60")
        .header("openai-processing-ms", "12")
        .header("x-ratelimit-limit-requests", "10000")
        .header("x-ratelimit-limit-tokens", "30000000")
        .header("x-ratelimit-remaining-requests", "9999")
        .header("x-ratelimit-remaining-tokens", "29999457")
        .header("x-ratelimit-reset-requests", "6ms")
        .header("x-ratelimit-reset-tokens", "1m2.172s")
}

async fn mock(req: Request<Incoming>) -> Result<Response<Frames>, Infallible> {
    let big: Option<usize> = req
        .headers()
        .get(BIG_STREAM_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let p = &*PAYLOADS;
    let find = |needle: &[u8]| memchr::memmem::find(&body, needle).is_some();
    let resp = if find(b"\"stream\":true") {
        let frames = if find(b"\"include_usage\":true") {
            &p.stream_usage
        } else {
            &p.stream
        };
        let mut frames: VecDeque<Bytes> = frames.iter().cloned().collect();
        if let Some(n) = big {
            // Role chunk, then blocks of content, then the usual ending.
            for _ in 0..n.div_ceil(p.block.len()) {
                frames.insert(1, p.block.clone());
            }
        }
        openai_headers(Response::builder())
            .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
            .body(Frames {
                frames,
                exact: None,
            })
    } else {
        openai_headers(Response::builder())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Frames {
                frames: VecDeque::from([p.json.clone()]),
                exact: Some(p.json.len() as u64),
            })
    };
    Ok(resp.expect("valid response"))
}

/// Pins the calling thread to the CPUs named by `var`, if set (through
/// `taskset` on the thread's id: the bench has no unsafe code).
fn pin_thread(var: &str) {
    let Ok(cpus) = std::env::var(var) else {
        return;
    };
    let tid = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    let Some(tid) = tid else {
        return;
    };
    let ok = Command::new("taskset")
        .args(["-p", "-c", &cpus, &tid])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "taskset -p -c {cpus} {tid} failed ({var})");
}

/// `cmd` run under `taskset -c` with the proxy CPUs, when they are set.
fn proxy_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    match std::env::var("TOLLGATE_BENCH_PROXY_CPUS") {
        Ok(cpus) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpus).arg(program);
            c
        }
        Err(_) => Command::new(program),
    }
}

/// Starts the mock on its own multi-threaded runtime in its own thread.
fn start_mock(threads: usize) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind mock");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("mock addr");
    LazyLock::force(&PAYLOADS);
    std::thread::Builder::new()
        .name("mock-upstream".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("mock-worker")
                .on_thread_start(|| pin_thread("TOLLGATE_BENCH_MOCK_CPUS"))
                .enable_all()
                .build()
                .expect("mock runtime");
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(listener).expect("mock listener");
                loop {
                    let Ok((s, _)) = l.accept().await else {
                        continue;
                    };
                    let _ = s.set_nodelay(true);
                    tokio::spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(s), service_fn(mock))
                            .await;
                    });
                }
            });
        })
        .expect("mock thread");
    addr
}

// ---------------------------------------------------------------- processes

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn wait_listening(addr: SocketAddr, child: &mut Child, what: &str) {
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited before listening: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} is not listening on {addr} after 20 s");
}

/// A child process stopped with SIGTERM (and waited for) when dropped.
struct Proc {
    child: Child,
    name: &'static str,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits up to `grace`; SIGKILL past it.
    fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        if let Ok(Some(s)) = self.child.try_wait() {
            return Some(s);
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop within {grace:?}; killing it", self.name);
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// Starts tollgate on the SQLite file `dir/tollgate.db`, or with `pg` on
/// that PostgreSQL URL.
fn start_tollgate(
    dir: &Path,
    upstream: SocketAddr,
    pg: Option<&str>,
) -> (Proc, SocketAddr, PathBuf) {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let db = match pg {
        Some(url) => PathBuf::from(url),
        None => dir.join("tollgate.db"),
    };
    let log_name = if pg.is_some() {
        "tollgate-pg.log"
    } else {
        "tollgate.log"
    };
    let log = std::fs::File::create(dir.join(log_name)).expect("log file");
    // TOLLGATE_BENCH_BIN runs another build (say, before and after a change).
    let bin = std::env::var_os("TOLLGATE_BENCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_tollgate")));
    let keys_mode = keys_mode();
    let mut cmd = proxy_command(bin);
    if keys_mode {
        cmd.args(["--auth", "keys"])
            .env("TOLLGATE_ADMIN_TOKEN", ADMIN_KEY)
            .env("TOLLGATE_UPSTREAM_TOKEN", "sk-bench-upstream");
    } else {
        cmd.env_remove("TOLLGATE_UPSTREAM_TOKEN");
    }
    if std::env::var("TOLLGATE_BENCH_UPSTREAM").is_ok_and(|v| v == "table") {
        let key = if keys_mode {
            cmd.env("TOLLGATE_BENCH_UPSTREAM_KEY", "sk-bench-upstream")
                .env_remove("TOLLGATE_UPSTREAM_TOKEN");
            "key_env = [\"TOLLGATE_BENCH_UPSTREAM_KEY\"]\n"
        } else {
            ""
        };
        let toml = dir.join("upstreams.toml");
        std::fs::write(
            &toml,
            format!("[[upstream]]\nname = \"bench\"\nurl = \"http://{upstream}\"\n{key}"),
        )
        .expect("write upstreams.toml");
        cmd.arg("--config").arg(&toml);
    } else {
        cmd.arg("--upstream").arg(format!("http://{upstream}"));
    }
    let mut child = cmd
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--db")
        .arg(&db)
        .args(["--shutdown-grace", "10s"])
        // Access lines on, as in production (`TOLLGATE_BENCH_LOG=warn` turns them off).
        .env(
            "RUST_LOG",
            std::env::var("TOLLGATE_BENCH_LOG").unwrap_or_else(|_| "info".into()),
        )
        .env_remove("FORWARD_TOKEN")
        .env_remove("TOLLGATE_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn tollgate");
    wait_listening(addr, &mut child, "tollgate");
    if keys_mode {
        setup_keys(addr);
    }
    (
        Proc {
            child,
            name: "tollgate",
        },
        addr,
        db,
    )
}

const ADMIN_KEY: &str = "bench-admin-key";

/// Client users; client `i` acts as user `i % USERS`.
const USERS: usize = 16;

/// One tollgate key per user, in keys mode.
static USER_KEYS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

fn keys_mode() -> bool {
    std::env::var("TOLLGATE_BENCH_AUTH").is_ok_and(|v| v == "keys")
}

/// A blocking admin call: method, path, JSON body; returns the answer body.
fn admin_call(addr: SocketAddr, method: &str, path: &str, body: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).expect("admin connect");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: tollgate\r\nauthorization: Bearer {ADMIN_KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("admin write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("admin read");
    assert!(
        out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.1 201"),
        "admin {method} {path}: {out}"
    );
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// Creates a key and generous limits (so the checks run but never refuse) per user.
fn setup_keys(addr: SocketAddr) {
    let keys = (0..USERS)
        .map(|u| {
            let user = format!("bench-user-{u}");
            admin_call(
                addr,
                "PUT",
                &format!("/users/{user}/limits"),
                r#"{"budget": 100000, "period": "month", "requestsPerMinute": 1000000000, "tokensPerMinute": 1000000000000}"#,
            );
            let created = admin_call(addr, "POST", &format!("/users/{user}/keys"), "");
            let v: serde_json::Value = serde_json::from_str(&created).expect("key json");
            v["key"].as_str().expect("key").to_owned()
        })
        .collect();
    let _ = USER_KEYS.set(keys);
}

fn start_nginx(nginx: &Path, dir: &Path, upstream: SocketAddr) -> (Proc, SocketAddr) {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let d = dir.display();
    // Plain proxy_pass with upstream keep-alive; no accounting. Defaults
    // otherwise (buffering on), which is nginx at its cheapest.
    let conf = format!(
        "worker_processes auto;
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    upstream mock {{
        server {upstream};
        keepalive 256;
        keepalive_requests 10000000;
    }}
    server {{
        listen {addr};
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
}}
"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).expect("write nginx.conf");
    let mut child = proxy_command(nginx)
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn nginx");
    wait_listening(addr, &mut child, "nginx");
    (
        Proc {
            child,
            name: "nginx",
        },
        addr,
    )
}

/// CPU time (user + system) of a process and its direct children, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    // Fields after the command name: state ppid ... utime(12th) stime(13th).
    let fields = |stat: &str| -> Option<(u32, u64)> {
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some((
            f.get(1)?.parse().ok()?,
            f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
        ))
    };
    let mut ticks = 0;
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            if let Some((ppid, t)) = fields(&stat) {
                if p == pid || ppid == pid {
                    ticks += t;
                }
            }
        }
    }
    // USER_HZ is 100 on Linux.
    ticks as f64 / 100.0
}

/// A `/proc/PID/status` figure in kB (`VmHWM:` peak RSS, `VmRSS:` current RSS).
fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------- load generator

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scenario {
    Chat,
    Stream,
    StreamUsage,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Chat => "chat 1 KB, non-streaming",
            Scenario::Stream => "streaming, client without include_usage",
            Scenario::StreamUsage => "streaming, client with include_usage",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Scenario::Chat => "chat",
            Scenario::Stream => "stream",
            Scenario::StreamUsage => "stream+usage",
        }
    }

    fn body(self) -> Bytes {
        let mode = match self {
            Scenario::Chat => StreamMode::Off,
            Scenario::Stream => StreamMode::Stream,
            Scenario::StreamUsage => StreamMode::StreamWithUsage,
        };
        Bytes::from(chat_request(1024, mode))
    }

    /// Bytes every client must receive: a client that did not ask for usage
    /// never sees the usage chunk, whatever tollgate asked upstream for.
    fn expected_len(self) -> usize {
        let p = &*PAYLOADS;
        match self {
            Scenario::Chat => p.json.len(),
            Scenario::Stream => p.stream.iter().map(Bytes::len).sum(),
            Scenario::StreamUsage => p.stream_usage.iter().map(Bytes::len).sum(),
        }
    }
}

#[derive(Default)]
struct Tally {
    /// Latencies (ns) of requests started inside the measured window.
    total: Vec<u64>,
    ttfb: Vec<u64>,
    /// Every 200 answer read completely, warm-up included.
    completed: u64,
    errors: u64,
    wrong: u64,
    first_error: Option<String>,
}

impl Tally {
    fn merge(&mut self, o: Tally) {
        self.total.extend(o.total);
        self.ttfb.extend(o.ttfb);
        self.completed += o.completed;
        self.errors += o.errors;
        self.wrong += o.wrong;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Result<Sender, String> {
    let s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One connection sending requests back to back until `end`.
async fn client(
    addr: SocketAddr,
    id: usize,
    scenario: Scenario,
    body: Bytes,
    measure_from: Instant,
    end: Instant,
) -> Tally {
    let mut t = Tally::default();
    let expected = scenario.expected_len();
    let host = addr.to_string();
    let user = format!("bench-user-{}", id % USERS);
    let auth = match USER_KEYS.get() {
        Some(keys) => format!("Bearer {}", keys[id % USERS]),
        None => "Bearer sk-bench-not-a-key".to_owned(),
    };
    let mut sender: Option<Sender> = None;
    let fail = |t: &mut Tally, e: String| {
        t.errors += 1;
        t.first_error.get_or_insert(e);
    };
    while Instant::now() < end {
        let s = match &mut sender {
            Some(s) => s,
            None => match connect(addr).await {
                Ok(s) => sender.insert(s),
                Err(e) => {
                    fail(&mut t, e);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        if s.ready().await.is_err() {
            // The server closed the keep-alive connection: open another.
            sender = None;
            continue;
        }
        let req = Request::post("/v1/chat/completions")
            .header(header::HOST, host.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, auth.as_str())
            .header("x-user", user.as_str())
            .body(Full::new(body.clone()))
            .expect("request");
        let t0 = Instant::now();
        let resp = match s.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                fail(&mut t, format!("send: {e}"));
                sender = None;
                continue;
            }
        };
        let status = resp.status();
        let mut b = resp.into_body();
        let mut first = None;
        let mut got = 0usize;
        let mut broken = None;
        while let Some(f) = b.frame().await {
            match f {
                Ok(f) => {
                    if let Some(d) = f.data_ref() {
                        first.get_or_insert_with(|| t0.elapsed());
                        got += d.len();
                    }
                }
                Err(e) => {
                    broken = Some(format!("body: {e}"));
                    break;
                }
            }
        }
        let total = t0.elapsed();
        if let Some(e) = broken {
            fail(&mut t, e);
            sender = None;
            continue;
        }
        if status != StatusCode::OK {
            fail(&mut t, format!("status {status}"));
            continue;
        }
        t.completed += 1;
        if got != expected {
            t.wrong += 1;
            t.first_error
                .get_or_insert(format!("answer of {got} bytes, expected {expected}"));
        }
        if t0 >= measure_from && t0 < end {
            t.total.push(total.as_nanos() as u64);
            t.ttfb.push(first.unwrap_or(total).as_nanos() as u64);
        }
    }
    t
}

/// Streams one answer of about `bytes` bytes through `addr` while sampling the
/// RSS of `pid`. Returns (bytes received, RSS before, highest RSS during), kB.
fn big_stream(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    bytes: usize,
    pid: u32,
) -> Result<(u64, u64, u64), String> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let before = status_kb(pid, "VmRSS:").unwrap_or(0);
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut max = 0;
            while !stop.load(Ordering::Relaxed) {
                max = max.max(status_kb(pid, "VmRSS:").unwrap_or(0));
                std::thread::sleep(Duration::from_millis(2));
            }
            max
        })
    };
    let got = rt.block_on(async {
        let mut s = connect(addr).await?;
        let req = Request::post("/v1/chat/completions")
            .header(header::HOST, addr.to_string())
            .header(header::CONTENT_TYPE, "application/json")
            .header("x-user", "bench-big-stream")
            .header(
                header::AUTHORIZATION,
                match USER_KEYS.get() {
                    Some(keys) => format!("Bearer {}", keys[0]),
                    None => "Bearer sk-bench-not-a-key".to_owned(),
                },
            )
            .header(BIG_STREAM_HEADER, bytes.to_string())
            .body(Full::new(Scenario::Stream.body()))
            .map_err(|e| e.to_string())?;
        let resp = s
            .send_request(req)
            .await
            .map_err(|e| format!("send: {e}"))?;
        if resp.status() != StatusCode::OK {
            return Err(format!("status {}", resp.status()));
        }
        let mut b = resp.into_body();
        let mut got = 0u64;
        while let Some(f) = b.frame().await {
            let f = f.map_err(|e| format!("body: {e}"))?;
            if let Some(d) = f.data_ref() {
                got += d.len() as u64;
            }
        }
        Ok(got)
    });
    stop.store(true, Ordering::Relaxed);
    let max = sampler.join().unwrap_or(0);
    Ok((got?, before, max))
}

struct Cell {
    rps: f64,
    total: Vec<u64>,
    ttfb: Vec<u64>,
    cpu_per_req_us: Option<f64>,
    tally: Tally,
}

fn pct(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q) as usize).min(sorted.len() - 1);
    sorted[i] as f64 / 1000.0
}

fn run_cell(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    scenario: Scenario,
    conc: usize,
    warm: Duration,
    secs: Duration,
    pid: Option<u32>,
) -> Cell {
    let body = scenario.body();
    let start = Instant::now();
    let measure_from = start + warm;
    let end = measure_from + secs;
    let mut cpu0 = None;
    let tally = rt.block_on(async {
        let tasks: Vec<_> = (0..conc)
            .map(|i| tokio::spawn(client(addr, i, scenario, body.clone(), measure_from, end)))
            .collect();
        if let Some(pid) = pid {
            tokio::time::sleep_until(measure_from.into()).await;
            cpu0 = Some(cpu_seconds(pid));
        }
        let mut all = Tally::default();
        for t in tasks {
            all.merge(t.await.expect("client task"));
        }
        all
    });
    let cpu_per_req_us = pid.zip(cpu0).map(|(pid, c0)| {
        // The clients finish their last request just past `end`; close enough
        // over a multi-second window.
        (cpu_seconds(pid) - c0) * 1e6 / tally.total.len().max(1) as f64
    });
    let mut total = tally.total.clone();
    let mut ttfb = tally.ttfb.clone();
    total.sort_unstable();
    ttfb.sort_unstable();
    Cell {
        rps: total.len() as f64 / secs.as_secs_f64(),
        total,
        ttfb,
        cpu_per_req_us,
        tally,
    }
}

// ---------------------------------------------------------------- report

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn fmt_us(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v >= 10_000.0 {
        format!("{:.1} ms", v / 1000.0)
    } else {
        format!("{v:.0} us")
    }
}

fn signed_us(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:+.0} us")
    }
}

/// The PostgreSQL server to compare against, when asked for (`--db
/// postgres` or `TOLLGATE_BENCH_DB=postgres`).
fn pg_mode(args: &[String]) -> Option<String> {
    let asked = args
        .windows(2)
        .any(|w| w[0] == "--db" && w[1] == "postgres")
        || args.iter().any(|a| a == "--db=postgres")
        || std::env::var("TOLLGATE_BENCH_DB").is_ok_and(|v| v == "postgres");
    if !asked {
        return None;
    }
    assert!(
        !keys_mode(),
        "--db postgres measures header mode only (each instance would need keys of its own)"
    );
    let url = std::env::var("TOLLGATE_BENCH_PG")
        .or_else(|_| std::env::var("TOLLGATE_TEST_PG"))
        .ok()
        .filter(|u| !u.is_empty());
    Some(url.expect(
        "--db postgres needs TOLLGATE_BENCH_PG (or TOLLGATE_TEST_PG): eval \"$(.ci/pg-server start)\"",
    ))
}

/// A fresh database on the server, dropped at the end.
struct PgBenchDb {
    server: String,
    name: String,
    url: String,
}

fn pg_sql<T>(url: &str, f: impl AsyncFnOnce(&tokio_postgres::Client) -> T) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect to the bench PostgreSQL");
        let task = tokio::spawn(conn);
        let out = f(&c).await;
        drop(c);
        let _ = task.await;
        out
    })
}

impl PgBenchDb {
    fn create(server: &str) -> PgBenchDb {
        let name = format!("tollgate_load_{}", std::process::id());
        // Two statements: several in one batch run as one transaction,
        // which DROP/CREATE DATABASE refuse.
        pg_sql(server, async |c| {
            for sql in [
                format!("DROP DATABASE IF EXISTS {name}"),
                format!("CREATE DATABASE {name}"),
            ] {
                c.batch_execute(&sql).await.expect("bench database");
            }
        });
        let base = server.split('?').next().unwrap_or(server);
        let after_scheme = base.find("://").map_or(0, |i| i + 3);
        let host_part = match base[after_scheme..].find('/') {
            Some(i) => &base[..after_scheme + i],
            None => base,
        };
        PgBenchDb {
            server: server.to_owned(),
            url: format!("{host_part}/{name}"),
            name,
        }
    }

    fn rows(&self) -> u64 {
        pg_sql(&self.url, async |c| {
            c.query_one("SELECT count(*) FROM queries", &[])
                .await
                .map_or(0, |r| r.get::<_, i64>(0) as u64)
        })
    }
}

impl Drop for PgBenchDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        pg_sql(&self.server, async |c| {
            let _ = c
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        });
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bench = args.iter().any(|a| a == "--bench");
    let smoke = !bench
        || args.iter().any(|a| a == "--test")
        || std::env::var_os("TOLLGATE_BENCH_SMOKE").is_some_and(|v| v != "0");
    let (warm, secs, concs) = if smoke {
        (
            Duration::from_millis(50),
            Duration::from_millis(250),
            vec![1, 4],
        )
    } else {
        let secs: f64 = env_or("TOLLGATE_BENCH_SECS", 5.0);
        let concs: Vec<usize> = std::env::var("TOLLGATE_BENCH_CONCURRENCY")
            .unwrap_or_else(|_| "1,32,128".into())
            .split(',')
            .filter_map(|c| c.trim().parse().ok())
            .collect();
        (
            Duration::from_secs_f64((secs / 5.0).clamp(0.2, 1.0)),
            Duration::from_secs_f64(secs),
            concs,
        )
    };
    let client_threads: usize = env_or("TOLLGATE_BENCH_CLIENT_THREADS", 2);
    let mock_threads: usize = env_or("TOLLGATE_BENCH_MOCK_THREADS", 2);
    let nginx_path = PathBuf::from(
        std::env::var("TOLLGATE_BENCH_NGINX").unwrap_or_else(|_| "/usr/sbin/nginx".into()),
    );

    let dir = tempfile::tempdir().expect("temp dir");
    // nginx workers run as an unprivileged user and need to reach their temp paths.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755));
    }
    let mock = start_mock(mock_threads);
    let (mut tollgate, tollgate_addr, db) = start_tollgate(dir.path(), mock, None);
    let pg = pg_mode(&args).map(|server| PgBenchDb::create(&server));
    let mut tollgate_pg = pg
        .as_ref()
        .map(|d| start_tollgate(dir.path(), mock, Some(&d.url)));
    let mut nginx = (nginx_path.exists()).then(|| start_nginx(&nginx_path, dir.path(), mock));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(client_threads)
        .thread_name("load-client")
        .on_thread_start(|| pin_thread("TOLLGATE_BENCH_CLIENT_CPUS"))
        .enable_all()
        .build()
        .expect("client runtime");

    let mut targets: Vec<(&str, SocketAddr, Option<u32>)> = vec![
        ("direct", mock, None),
        ("tollgate", tollgate_addr, Some(tollgate.pid())),
    ];
    if let Some((p, a, _)) = &tollgate_pg {
        targets.push(("tollgate-pg", *a, Some(p.pid())));
    }
    if let Some((p, a)) = &nginx {
        targets.push(("nginx", *a, Some(p.pid())));
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load bench: tollgate auth mode {}, {} s per cell after {} ms warm-up, concurrency {concs:?}, client threads {client_threads}, mock threads {mock_threads}, nginx {}; load average at start: {}",
        if keys_mode() { "keys (a key per user, budgets and limits on)" } else { "header" },
        secs.as_secs_f64(),
        warm.as_millis(),
        if nginx.is_some() { nginx_path.display().to_string() } else { "not found (skipped)".into() },
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    );

    let wanted = |var: &str, name: &str| {
        std::env::var(var)
            .map(|v| v.split(',').any(|w| w.trim() == name))
            .unwrap_or(true)
    };
    targets.retain(|(name, _, _)| wanted("TOLLGATE_BENCH_TARGETS", name));
    let scenarios: Vec<Scenario> = [Scenario::Chat, Scenario::Stream, Scenario::StreamUsage]
        .into_iter()
        .filter(|s| wanted("TOLLGATE_BENCH_SCENARIOS", s.short()))
        .collect();
    let mut tollgate_completed = 0u64;
    let mut pg_completed = 0u64;
    let mut pg_ratios = String::new();
    let _ = writeln!(
        pg_ratios,
        "| scenario | c | PostgreSQL/SQLite req/s | added p50 (PostgreSQL - SQLite) | added p99 |"
    );
    let _ = writeln!(pg_ratios, "|---|---|---|---|---|");
    let mut problems: Vec<String> = Vec::new();
    let mut report = String::new();
    let mut ratios = String::new();
    let _ = writeln!(
        ratios,
        "| scenario | c | tollgate/direct req/s | tollgate/nginx req/s | added p50 vs direct | added p99 vs direct | added TTFB p50 vs direct | added p50 vs nginx | added p99 vs nginx |"
    );
    let _ = writeln!(ratios, "|---|---|---|---|---|---|---|---|---|");
    for scenario in scenarios {
        let streams = scenario != Scenario::Chat;
        let _ = writeln!(report, "\n### {}\n", scenario.name());
        let _ = writeln!(
            report,
            "| c | target | req/s | p50 | p99 | p99.9 |{} proxy CPU/req |",
            if streams {
                " TTFB p50 | TTFB p99 |"
            } else {
                ""
            }
        );
        let _ = writeln!(
            report,
            "|---|---|---|---|---|---|{}---|",
            if streams { "---|---|" } else { "" }
        );
        for &conc in &concs {
            let mut cells = Vec::new();
            for &(name, addr, pid) in &targets {
                print!("  {} c={conc} {name} ... ", scenario.short());
                let _ = std::io::stdout().flush();
                let cell = run_cell(&rt, addr, scenario, conc, warm, secs, pid);
                println!(
                    "{:.0} req/s, p50 {}, p99 {}",
                    cell.rps,
                    fmt_us(pct(&cell.total, 0.5)),
                    fmt_us(pct(&cell.total, 0.99))
                );
                if name == "tollgate" {
                    tollgate_completed += cell.tally.completed;
                }
                if name == "tollgate-pg" {
                    pg_completed += cell.tally.completed;
                }
                if cell.tally.errors > 0 || cell.tally.wrong > 0 || cell.total.is_empty() {
                    problems.push(format!(
                        "{} c={conc} {name}: {} errors, {} wrong answers, {} measured (first: {})",
                        scenario.short(),
                        cell.tally.errors,
                        cell.tally.wrong,
                        cell.total.len(),
                        cell.tally.first_error.as_deref().unwrap_or("-")
                    ));
                }
                let _ = writeln!(
                    report,
                    "| {conc} | {name} | {:.0} | {} | {} | {} |{} {} |",
                    cell.rps,
                    fmt_us(pct(&cell.total, 0.5)),
                    fmt_us(pct(&cell.total, 0.99)),
                    fmt_us(pct(&cell.total, 0.999)),
                    if streams {
                        format!(
                            " {} | {} |",
                            fmt_us(pct(&cell.ttfb, 0.5)),
                            fmt_us(pct(&cell.ttfb, 0.99))
                        )
                    } else {
                        String::new()
                    },
                    cell.cpu_per_req_us
                        .map_or("-".into(), |c| format!("{c:.0} us")),
                );
                cells.push((name, cell));
            }
            let get = |n: &str| cells.iter().find(|(name, _)| *name == n).map(|(_, c)| c);
            if let (Some(t), Some(p)) = (get("tollgate"), get("tollgate-pg")) {
                let _ = writeln!(
                    pg_ratios,
                    "| {} | {conc} | {:.3} | {} | {} |",
                    scenario.short(),
                    p.rps / t.rps,
                    signed_us(pct(&p.total, 0.5) - pct(&t.total, 0.5)),
                    signed_us(pct(&p.total, 0.99) - pct(&t.total, 0.99)),
                );
            }
            let (Some(d), Some(t)) = (get("direct"), get("tollgate")) else {
                continue;
            };
            let ng = get("nginx");
            let added = |a: &Cell, b: &Cell, q: f64, ttfb: bool| {
                if ttfb {
                    pct(&a.ttfb, q) - pct(&b.ttfb, q)
                } else {
                    pct(&a.total, q) - pct(&b.total, q)
                }
            };
            let _ = writeln!(
                ratios,
                "| {} | {conc} | {:.2} | {} | {} | {} | {} | {} | {} |",
                scenario.short(),
                t.rps / d.rps,
                ng.map_or("-".into(), |n| format!("{:.2}", t.rps / n.rps)),
                signed_us(added(t, d, 0.5, false)),
                signed_us(added(t, d, 0.99, false)),
                if streams {
                    signed_us(added(t, d, 0.5, true))
                } else {
                    "-".into()
                },
                ng.map_or("-".into(), |n| signed_us(added(t, n, 0.5, false))),
                ng.map_or("-".into(), |n| signed_us(added(t, n, 0.99, false))),
            );
        }
    }

    let hwm = status_kb(tollgate.pid(), "VmHWM:");
    let big_mb: usize = if smoke {
        10
    } else {
        env_or("TOLLGATE_BENCH_BIG_MB", 100)
    };
    let mut big_line = String::new();
    if big_mb > 0 && targets.iter().any(|(n, _, _)| *n == "tollgate") {
        let want = big_mb << 20;
        match big_stream(&rt, tollgate_addr, want, tollgate.pid()) {
            Ok((got, before, max)) => {
                tollgate_completed += 1;
                if (got as usize) < want {
                    problems.push(format!("big stream: {got} bytes, expected over {want}"));
                }
                big_line = format!(
                    "{:.0} MB stream through tollgate: RSS {:.1} MB before, {:.1} MB at most during it ({:+.1} MB; target < 2 MB)",
                    got as f64 / (1 << 20) as f64,
                    before as f64 / 1024.0,
                    max as f64 / 1024.0,
                    (max as f64 - before as f64) / 1024.0
                );
            }
            Err(e) => problems.push(format!("big stream: {e}")),
        }
    }
    let status = tollgate.stop(Duration::from_secs(30));
    // PostgreSQL: exactly one record per request completed through it too.
    let pg_check = tollgate_pg
        .take()
        .zip(pg.as_ref())
        .map(|((mut p, _, _), d)| {
            let st = p.stop(Duration::from_secs(30));
            let rows = d.rows();
            (st, rows)
        });
    if let Some((mut p, _)) = nginx.take() {
        p.stop(Duration::from_secs(10));
    }
    let rows: Option<u64> = rusqlite::Connection::open(&db).ok().and_then(|c| {
        c.query_row("SELECT COUNT(*) FROM queries", [], |r| r.get::<_, i64>(0))
            .ok()
            .map(|n| n as u64)
    });
    let estimated: Option<u64> = rusqlite::Connection::open(&db).ok().and_then(|c| {
        c.query_row(
            "SELECT COUNT(*) FROM queries WHERE estimated = 1 OR status != 200",
            [],
            |r| r.get::<_, i64>(0),
        )
        .ok()
        .map(|n| n as u64)
    });

    println!("{report}");
    println!("### ratios (same run)\n\n{ratios}");
    println!(
        "tollgate peak RSS (VmHWM): {}",
        hwm.map_or("unknown".into(), |k| format!("{:.1} MB", k as f64 / 1024.0))
    );
    if !big_line.is_empty() {
        println!("{big_line}");
    }
    println!(
        "tollgate exit: {}",
        status.map_or("unknown".into(), |s| s.to_string())
    );
    let db_ok = rows == Some(tollgate_completed) && status.is_some_and(|s| s.success());
    println!(
        "{}: database holds {} records; {tollgate_completed} requests completed through tollgate; {} records estimated or not 200",
        if db_ok { "PASS" } else { "FAIL" },
        rows.map_or("?".into(), |r| r.to_string()),
        estimated.map_or("?".into(), |r| r.to_string()),
    );
    if let Some((st, rows)) = pg_check {
        println!("### PostgreSQL beside SQLite (same run, back to back per cell)\n\n{pg_ratios}");
        let ok = rows == pg_completed && st.is_some_and(|s| s.success());
        println!(
            "{}: PostgreSQL database holds {rows} records; {pg_completed} requests completed through tollgate-pg",
            if ok { "PASS" } else { "FAIL" }
        );
        if !ok {
            problems.push(format!(
                "tollgate-pg: {rows} records for {pg_completed} requests (exit {st:?})"
            ));
        }
    }
    drop(pg);
    for p in &problems {
        println!("PROBLEM: {p}");
    }
    if !db_ok || !problems.is_empty() {
        if let Ok(log) = std::fs::read_to_string(dir.path().join("tollgate-pg.log")) {
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!("tollgate-pg log (newest first):\n{}", tail.join("\n"));
        }
        if let Ok(log) = std::fs::read_to_string(dir.path().join("tollgate.log")) {
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!(
                "tollgate log (last lines, newest first):\n{}",
                tail.join("\n")
            );
        }
        std::process::exit(1);
    }
    drop(tollgate);
}
