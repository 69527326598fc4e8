//! Shared harness of the integration tests: the real tollgate server started
//! in-process in front of a scriptable mock OpenAI upstream, HTTP/1.1 and
//! HTTP/2 test clients, and helpers to read the REST API.
//!
//! Every test file compiles this module on its own and uses a different part
//! of it, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::value::RawValue;
use serde_json::Value;
use tempfile::TempDir;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use tollgate::app::App;
use tollgate::config::{Config, Db, PgUrl, UpstreamUrl};

/// Upper bound for any single step of a test; a hang fails the test instead of the CI job.
pub const STEP: Duration = Duration::from_secs(20);

/// Runs `f`, failing the test if it takes longer than [`STEP`].
pub async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(STEP, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {STEP:?}: {what}"),
    }
}

/// Polls `probe` until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("condition not reached within {limit:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    tollgate::timestamp::now_ms()
}

/// Waits until the wall clock has moved past `ms`, so the next request starts
/// at a later millisecond (records are ordered and filtered by ms).
pub async fn clock_past(ms: i64) {
    while now_ms() <= ms {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Parses an API timestamp into ms since the epoch.
pub fn ts_ms(v: &Value) -> i64 {
    let s = v.as_str().expect("timestamp is a string");
    tollgate::timestamp::parse(s).unwrap_or_else(|| panic!("bad timestamp {s}"))
}

// ---------------------------------------------------------------------------
// Gates: a latch a test opens to let the mock go on.
// ---------------------------------------------------------------------------

/// A latch: `wait` returns once `open` was called (before or after).
#[derive(Clone)]
pub struct Gate(Arc<watch::Sender<bool>>);

impl Default for Gate {
    fn default() -> Self {
        Gate::new()
    }
}

impl Gate {
    pub fn new() -> Gate {
        Gate(Arc::new(watch::channel(false).0))
    }

    pub fn open(&self) {
        self.0.send_replace(true);
    }

    pub async fn wait(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }
}

// ---------------------------------------------------------------------------
// The mock OpenAI upstream.
// ---------------------------------------------------------------------------

/// One request the mock received.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Order of arrival, from 0.
    pub n: usize,
    pub method: Method,
    /// Path and query.
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When the mock had read the whole request.
    pub at_ms: i64,
}

impl Seen {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("upstream body is JSON")
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    pub fn header_count(&self, name: &str) -> usize {
        self.headers.get_all(name).iter().count()
    }

    /// Whether the request asked for the streamed usage chunk, as OpenAI decides it.
    pub fn wants_usage(&self) -> bool {
        self.json()["stream_options"]["include_usage"] == Value::Bool(true)
    }
}

/// How the mock's answer body ended, as the mock saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Still being sent (or the head never went out).
    Pending,
    /// Every step ran; the body ended normally.
    Completed,
    /// The body was dropped by hyper: the peer (tollgate) closed the connection.
    PeerGone,
    /// The mock cut the connection itself (`Step::Reset`).
    Reset,
}

/// One step of a scripted answer body.
#[derive(Clone)]
pub enum Step {
    /// Sends these bytes as one chunk.
    Send(Bytes),
    /// Waits for the gate (or for the peer to go away).
    Wait(Gate),
    /// Waits this long (or until the peer goes away).
    Sleep(Duration),
    /// Kills the connection: the answer ends without its terminating chunk.
    Reset,
    /// Sends nothing more but keeps the connection open until the peer leaves.
    Hang,
}

impl Step {
    pub fn send(b: impl Into<Bytes>) -> Step {
        Step::Send(b.into())
    }
}

/// A scripted answer body.
#[derive(Clone)]
pub enum ReplyBody {
    Full(Bytes),
    Steps(Vec<Step>),
}

/// A scripted answer.
#[derive(Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: ReplyBody,
    /// The head is sent only after this gate opens.
    pub head_gate: Option<Gate>,
    /// The head is never sent.
    pub never: bool,
}

impl Reply {
    /// A 200 JSON answer.
    pub fn json(body: impl Into<Bytes>) -> Reply {
        Reply {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: ReplyBody::Full(body.into()),
            head_gate: None,
            never: false,
        }
    }

    /// A 200 SSE answer made of these steps.
    pub fn sse(steps: Vec<Step>) -> Reply {
        Reply {
            status: 200,
            headers: vec![("content-type".into(), "text/event-stream".into())],
            body: ReplyBody::Steps(steps),
            head_gate: None,
            never: false,
        }
    }

    /// An SSE answer whose events are sent one chunk each, back to back.
    pub fn sse_events(events: Vec<Bytes>) -> Reply {
        Reply::sse(events.into_iter().map(Step::Send).collect())
    }

    /// An answer whose head never comes.
    pub fn never() -> Reply {
        Reply {
            never: true,
            ..Reply::json("")
        }
    }

    pub fn status(mut self, s: u16) -> Reply {
        self.status = s;
        self
    }

    pub fn header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.into(), v.into()));
        self
    }

    pub fn head_after(mut self, g: Gate) -> Reply {
        self.head_gate = Some(g);
        self
    }
}

type Responder = Box<dyn Fn(&Seen) -> Reply + Send + Sync>;
type MockBody = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

struct MockInner {
    seen: Mutex<Vec<Seen>>,
    outcomes: Mutex<Vec<Outcome>>,
    responder: Responder,
}

impl MockInner {
    fn set_outcome(&self, n: usize, o: Outcome) {
        self.outcomes.lock().unwrap()[n] = o;
    }
}

/// A mock OpenAI upstream (HTTP/1.1) that the test scripts through a
/// responder, and that records every request it received.
pub struct Mock {
    pub addr: SocketAddr,
    /// Serves HTTPS rather than plain HTTP.
    tls: bool,
    inner: Arc<MockInner>,
    accept: JoinHandle<()>,
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Mock {
    pub async fn start(responder: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Mock {
        Mock::start_with(None, responder).await
    }

    /// A mock serving HTTPS with `tls` (its certificate and key).
    pub async fn start_tls(
        tls: Arc<tokio_rustls::rustls::ServerConfig>,
        responder: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> Mock {
        Mock::start_with(Some(tokio_rustls::TlsAcceptor::from(tls)), responder).await
    }

    async fn start_with(
        tls: Option<tokio_rustls::TlsAcceptor>,
        responder: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> Mock {
        let https = tls.is_some();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind mock");
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(MockInner {
            seen: Mutex::new(Vec::new()),
            outcomes: Mutex::new(Vec::new()),
            responder: Box::new(responder),
        });
        let acc_inner = inner.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let inner = acc_inner.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| mock_handle(inner.clone(), req));
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        Some(tls) => {
                            // A failed handshake (the client refused the
                            // certificate) just ends the connection.
                            if let Ok(stream) = tls.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                            }
                        }
                    }
                });
            }
        });
        Mock {
            addr,
            tls: https,
            inner,
            accept,
        }
    }

    /// The base URL to give tollgate as `--upstream`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.inner.seen.lock().unwrap().clone()
    }

    pub fn outcome(&self, n: usize) -> Outcome {
        self.inner.outcomes.lock().unwrap()[n]
    }

    /// Waits until at least `count` requests arrived.
    pub async fn wait_seen(&self, count: usize) -> Vec<Seen> {
        eventually("mock received the requests", STEP, || async {
            let s = self.seen();
            (s.len() >= count).then_some(s)
        })
        .await
    }

    /// Waits until the answer to request `n` is no longer pending.
    pub async fn wait_outcome(&self, n: usize) -> Outcome {
        eventually("mock answer finished", STEP, || async {
            let o = self.inner.outcomes.lock().unwrap().get(n).copied();
            o.filter(|o| *o != Outcome::Pending)
        })
        .await
    }
}

async fn mock_handle(
    inner: Arc<MockInner>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let seen = {
        let mut all = inner.seen.lock().unwrap();
        let s = Seen {
            n: all.len(),
            method: parts.method,
            path: parts
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default(),
            headers: parts.headers,
            body,
            at_ms: now_ms(),
        };
        all.push(s.clone());
        inner.outcomes.lock().unwrap().push(Outcome::Pending);
        s
    };
    let reply = (inner.responder)(&seen);
    if let Some(g) = &reply.head_gate {
        g.wait().await;
    }
    if reply.never {
        std::future::pending::<()>().await;
    }
    let body: MockBody = match reply.body {
        ReplyBody::Full(b) => {
            inner.set_outcome(seen.n, Outcome::Completed);
            Full::new(b).map_err(|e| match e {}).boxed_unsync()
        }
        ReplyBody::Steps(steps) => {
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(drive(steps, tx, inner.clone(), seen.n));
            ChannelBody(rx).boxed_unsync()
        }
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::from_u16(reply.status).unwrap();
    for (k, v) in &reply.headers {
        resp.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    Ok(resp)
}

type FrameResult = Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>;

/// Runs the steps of a scripted body, noting how it ended.
async fn drive(steps: Vec<Step>, tx: mpsc::Sender<FrameResult>, inner: Arc<MockInner>, n: usize) {
    for step in steps {
        let gone = match step {
            Step::Send(b) => tx.send(Ok(Frame::data(b))).await.is_err(),
            Step::Wait(g) => tokio::select! {
                _ = g.wait() => false,
                _ = tx.closed() => true,
            },
            Step::Sleep(d) => tokio::select! {
                _ = tokio::time::sleep(d) => false,
                _ = tx.closed() => true,
            },
            Step::Reset => {
                // hyper drops what it has not written when a body fails, so
                // the failure waits until the last frame was taken (the
                // channel is empty) and hyper has had a turn to flush it.
                if let Ok(permit) = tx.reserve().await {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    permit.send(Err("mock: connection reset".into()));
                }
                inner.set_outcome(n, Outcome::Reset);
                return;
            }
            Step::Hang => {
                tx.closed().await;
                true
            }
        };
        if gone {
            inner.set_outcome(n, Outcome::PeerGone);
            return;
        }
    }
    inner.set_outcome(n, Outcome::Completed);
}

struct ChannelBody(mpsc::Receiver<FrameResult>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.get_mut().0.poll_recv(cx)
    }
}

// ---------------------------------------------------------------------------
// OpenAI payloads.
// ---------------------------------------------------------------------------

/// Token counts a mock answer reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tok {
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
    pub reasoning: u64,
}

impl Tok {
    pub fn new(prompt: u64, completion: u64) -> Tok {
        Tok {
            prompt,
            completion,
            ..Tok::default()
        }
    }

    pub fn json(&self) -> String {
        format!(
            r#"{{"prompt_tokens":{},"completion_tokens":{},"total_tokens":{},"prompt_tokens_details":{{"cached_tokens":{},"audio_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":{},"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}}"#,
            self.prompt,
            self.completion,
            self.prompt + self.completion,
            self.cached,
            self.reasoning
        )
    }
}

/// A non-streamed chat completion.
pub fn completion(model: &str, content: &str, t: Tok) -> String {
    format!(
        r#"{{"id":"chatcmpl-abc123","object":"chat.completion","created":1700000000,"model":"{model}","choices":[{{"index":0,"message":{{"role":"assistant","content":{},"refusal":null}},"logprobs":null,"finish_reason":"stop"}}],"usage":{},"system_fingerprint":"fp_44709d6fcb"}}"#,
        serde_json::to_string(content).unwrap(),
        t.json()
    )
}

/// One SSE event carrying `data`.
pub fn event(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

/// A streamed chat chunk with this delta (a JSON object) and finish reason.
pub fn chunk_with(model: &str, delta: &str, finish: Option<&str>, usage_null: bool) -> Bytes {
    let finish = match finish {
        Some(f) => format!("\"{f}\""),
        None => "null".into(),
    };
    let usage = if usage_null { r#","usage":null"# } else { "" };
    event(&format!(
        r#"{{"id":"chatcmpl-abc123","object":"chat.completion.chunk","created":1700000000,"model":"{model}","system_fingerprint":"fp_44709d6fcb","choices":[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}}}]{usage}}}"#
    ))
}

/// A streamed content chunk.
pub fn chunk(model: &str, text: &str) -> Bytes {
    chunk_with(
        model,
        &format!(r#"{{"content":{}}}"#, serde_json::to_string(text).unwrap()),
        None,
        false,
    )
}

/// The usage-only chunk (`"choices":[]`).
pub fn usage_chunk(model: &str, t: Tok) -> Bytes {
    event(&format!(
        r#"{{"id":"chatcmpl-abc123","object":"chat.completion.chunk","created":1700000000,"model":"{model}","system_fingerprint":"fp_44709d6fcb","choices":[],"usage":{}}}"#,
        t.json()
    ))
}

pub fn done() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

/// A complete chat stream as OpenAI sends it: role chunk, one chunk per word,
/// finish chunk, the usage chunk when the request asked for it, `[DONE]`.
/// Returns (events before the usage chunk, the usage chunk if sent, `[DONE]`).
pub fn chat_stream(seen: &Seen, model: &str, words: &[&str], t: Tok) -> Vec<Bytes> {
    let with_usage = seen.wants_usage();
    let mut v = vec![chunk_with(
        model,
        r#"{"role":"assistant","content":"","refusal":null}"#,
        None,
        with_usage,
    )];
    for w in words {
        v.push(chunk_with(
            model,
            &format!(r#"{{"content":{}}}"#, serde_json::to_string(w).unwrap()),
            None,
            with_usage,
        ));
    }
    v.push(chunk_with(model, "{}", Some("stop"), with_usage));
    if with_usage {
        v.push(usage_chunk(model, t));
    }
    v.push(done());
    v
}

/// Concatenates events.
pub fn concat(events: &[Bytes]) -> Vec<u8> {
    events.iter().flat_map(|e| e.iter().copied()).collect()
}

/// A typical chat request body.
pub fn chat_body(model: &str, stream: bool) -> String {
    format!(
        r#"{{"model":"{model}","messages":[{{"role":"system","content":"You are terse."}},{{"role":"user","content":"Say hello to the integration tests, please."}}],"stream":{stream}}}"#
    )
}

// ---------------------------------------------------------------------------
// The proxy under test, in-process.
// ---------------------------------------------------------------------------

/// A running tollgate server with its own temporary database.
pub struct Proxy {
    pub addr: SocketAddr,
    pub state: Arc<App>,
    pub db: PathBuf,
    /// The admin key the helpers send, when the proxy was started with one.
    pub admin: Option<String>,
    stop_tx: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    _dir: Option<TempDir>,
    /// The PostgreSQL database of this proxy alone (dropped with it).
    _pg: Option<Arc<PgDb>>,
}

pub struct ProxyBuilder {
    config: Config,
    dir: Option<TempDir>,
    bind: std::net::IpAddr,
    /// The path that names the database (a file, or under PostgreSQL the
    /// key of a database made for it).
    db: PathBuf,
    pg: Option<Arc<PgDb>>,
}

impl ProxyBuilder {
    pub fn token(mut self, t: &str) -> Self {
        self.config.upstream_token = Some(t.into());
        self
    }

    pub fn idle(mut self, d: Duration) -> Self {
        self.config.upstream_idle_timeout = d;
        self
    }

    pub fn max_body(mut self, n: u64) -> Self {
        self.config.max_body = n;
        self
    }

    pub fn grace(mut self, d: Duration) -> Self {
        self.config.shutdown_grace = d;
        self
    }

    pub fn default_prices(mut self, on: bool) -> Self {
        self.config.default_prices = on;
        self
    }

    /// Uses this database file instead of a fresh one (e.g. to restart on it).
    pub fn db(mut self, path: &Path) -> Self {
        self.config.db = store_for(path);
        self.db = path.to_owned();
        self.dir = None;
        self.pg = None;
        self
    }

    /// Sets the admin key; the `Proxy` helpers then send it.
    pub fn admin(mut self, key: &str) -> Self {
        self.config.admin_token = Some(key.into());
        self
    }

    pub fn auth(mut self, mode: tollgate::access::AuthMode) -> Self {
        self.config.auth = mode;
        self
    }

    pub fn reserve_answer_tokens(mut self, n: u64) -> Self {
        self.config.reserve_answer_tokens = n;
        self
    }

    pub fn retain_days(mut self, days: u32) -> Self {
        self.config.retain_days = Some(days);
        self
    }

    /// Changes any other setting.
    pub fn with(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(&mut self.config);
        self
    }

    /// Listens on this address (port chosen by the system) instead of 127.0.0.1.
    pub fn bind(mut self, ip: std::net::IpAddr) -> Self {
        self.bind = ip;
        self
    }

    pub async fn start(mut self) -> Proxy {
        let listener = TcpListener::bind(SocketAddr::new(self.bind, 0))
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        self.config.listen = addr;
        let db = self.db.clone();
        let admin = self.config.admin_token.clone();
        let state = tollgate::app::App::build(self.config).expect("tollgate state");
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(tollgate::server::run(listener, state.clone(), async move {
            let _ = stop_rx.await;
        }));
        Proxy {
            addr,
            state,
            db,
            admin,
            stop_tx: Some(stop_tx),
            task: Some(task),
            _dir: self.dir,
            _pg: self.pg,
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        // The database goes once the server let go of the app (its store
        // writes what it holds at shutdown), not under it.
        if let Some(pg) = self._pg.take() {
            let app = self.state.clone();
            std::thread::spawn(move || {
                let t = std::time::Instant::now();
                while Arc::strong_count(&app) > 1 && t.elapsed() < Duration::from_secs(60) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                drop(app);
                drop(pg);
            });
        }
    }
}

impl Proxy {
    /// A proxy in front of `upstream` (a base URL) with test-friendly settings:
    /// short timeouts, a fresh database, no built-in prices.
    pub fn builder(upstream: &str) -> ProxyBuilder {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("tollgate.db");
        // Under PostgreSQL a fresh database per proxy, dropped with it.
        let pg = pg_mode().then(|| Arc::new(PgDb::create()));
        let db = match &pg {
            Some(pg) => {
                PG_DBS.lock().unwrap().insert(path.clone(), pg.url.clone());
                Db::Postgres(PgUrl::parse(&pg.url).unwrap())
            }
            None => Db::Sqlite(path.clone()),
        };
        let config = Config {
            upstream: UpstreamUrl::parse(upstream).expect("upstream URL"),
            db,
            upstream_token: None,
            upstream_connect_timeout: Duration::from_secs(2),
            upstream_idle_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            header_timeout: Duration::from_secs(2),
            default_prices: false,
            // One attempt per request, as the tests written before retries
            // expect (an upstream 5xx passes straight through); the tests
            // of retries set their own count.
            upstream_retries: 0,
            ..Config::default()
        };
        ProxyBuilder {
            config,
            dir: Some(dir),
            bind: std::net::Ipv4Addr::LOCALHOST.into(),
            db: path,
            pg,
        }
    }

    pub async fn start(upstream: &str) -> Proxy {
        Proxy::builder(upstream).start().await
    }

    /// Signals shutdown and waits until the server has drained and written
    /// every record.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            within("server shutdown", t).await.expect("server task");
        }
    }

    /// Signals shutdown without waiting; returns the server task.
    pub fn signal_stop(&mut self) -> JoinHandle<()> {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        self.task.take().expect("server running")
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.send_admin(get(path)).await
    }

    /// Sends a request with the admin key, if the proxy has one.
    pub async fn send_admin(&self, mut req: Request<ReqBody>) -> Resp {
        if let Some(k) = &self.admin {
            req.headers_mut()
                .insert("authorization", format!("Bearer {k}").parse().unwrap());
        }
        send(self.addr, req).await
    }

    /// An admin request with a JSON body (or none when `body` is empty).
    pub async fn admin_call(&self, method: Method, path: &str, body: &str) -> Resp {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(full(body.to_owned()))
            .unwrap();
        self.send_admin(req).await
    }

    /// GET returning JSON; asserts 200.
    pub async fn get_json(&self, path: &str) -> Value {
        let r = self.get(path).await;
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
        r.json()
    }

    pub async fn usage(&self, query: &str) -> Value {
        self.get_json(&format!("/usage?{query}")).await
    }

    /// `/usage` with every field as its raw JSON text (numbers exactly as printed).
    pub async fn usage_raw(&self, query: &str) -> BTreeMap<String, String> {
        let r = self.get(&format!("/usage?{query}")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        raw_object(&r.text())
    }

    pub async fn queries(&self, query: &str) -> Vec<Value> {
        match self.get_json(&format!("/queries?{query}")).await {
            Value::Array(a) => a,
            other => panic!("/queries is not an array: {other}"),
        }
    }

    /// `/queries` with every field as its raw JSON text.
    pub async fn queries_raw(&self, query: &str) -> Vec<BTreeMap<String, String>> {
        let r = self.get(&format!("/queries?{query}")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let rows: Vec<BTreeMap<String, Box<RawValue>>> =
            serde_json::from_slice(&r.body).expect("/queries JSON");
        rows.into_iter()
            .map(|m| {
                m.into_iter()
                    .map(|(k, v)| (k, v.get().to_owned()))
                    .collect()
            })
            .collect()
    }

    /// Waits until `/queries` holds at least `n` records, and returns them.
    pub async fn wait_records(&self, n: usize) -> Vec<Value> {
        eventually("records written", STEP, || async {
            let q = self.queries("").await;
            (q.len() >= n).then_some(q)
        })
        .await
    }

    pub async fn set_price(&self, model: &str, body: &str) -> Resp {
        self.send_admin(
            Request::post(format!("/model/{model}"))
                .header("content-type", "application/json")
                .body(full(body.to_owned()))
                .unwrap(),
        )
        .await
    }

    /// POSTs a chat completion request as `user`.
    pub async fn chat(&self, user: &str, body: &str) -> Resp {
        send(self.addr, chat_req(user, body)).await
    }
}

/// Every field of a JSON object, as raw JSON text.
pub fn raw_object(text: &str) -> BTreeMap<String, String> {
    let m: BTreeMap<String, Box<RawValue>> =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("not a JSON object ({e}): {text}"));
    m.into_iter()
        .map(|(k, v)| (k, v.get().to_owned()))
        .collect()
}

/// Every field of every object of a JSON array, as raw JSON text.
pub fn raw_array(text: &str) -> Vec<BTreeMap<String, String>> {
    let rows: Vec<BTreeMap<String, Box<RawValue>>> =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("not a JSON array ({e}): {text}"));
    rows.into_iter()
        .map(|m| {
            m.into_iter()
                .map(|(k, v)| (k, v.get().to_owned()))
                .collect()
        })
        .collect()
}

/// Rows of the database, read directly (after the server stopped).
pub fn db_rows(path: &Path) -> Vec<DbRow> {
    if let Some(url) = pg_url_of(path) {
        let rows = pg_query(&url, "SELECT username, status, request_id, estimated, query_tokens, answer_tokens, stream FROM queries ORDER BY id");
        return rows
            .iter()
            .map(|r| DbRow {
                user: r.get(0),
                status: i64::from(r.get::<_, i32>(1)),
                request_id: r.get(2),
                estimated: r.get(3),
                query_tokens: r.get(4),
                answer_tokens: r.get(5),
                stream: r.get(6),
            })
            .collect();
    }
    let c = rusqlite::Connection::open(path).expect("open db");
    let mut st = c
        .prepare("SELECT user, status, request_id, estimated, query_tokens, answer_tokens, stream FROM queries ORDER BY id")
        .unwrap();
    st.query_map([], |r| {
        Ok(DbRow {
            user: r.get(0)?,
            status: r.get(1)?,
            request_id: r.get(2)?,
            estimated: r.get(3)?,
            query_tokens: r.get(4)?,
            answer_tokens: r.get(5)?,
            stream: r.get(6)?,
        })
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

#[derive(Debug, Clone)]
pub struct DbRow {
    pub user: String,
    pub status: i64,
    pub request_id: Option<String>,
    pub estimated: bool,
    pub query_tokens: i64,
    pub answer_tokens: i64,
    pub stream: bool,
}

// ---------------------------------------------------------------------------
// Test clients.
// ---------------------------------------------------------------------------

/// Body of every request the test clients send.
pub type ReqBody = UnsyncBoxBody<Bytes, Infallible>;

pub fn full(b: impl Into<Bytes>) -> ReqBody {
    Full::new(b.into()).boxed_unsync()
}

pub fn empty() -> ReqBody {
    full(Bytes::new())
}

/// A body of these pieces with no known length: sent chunked (HTTP/1.1) or
/// without content-length (HTTP/2).
pub fn chunked(pieces: Vec<Bytes>) -> ReqBody {
    Chunks(pieces.into()).boxed_unsync()
}

struct Chunks(VecDeque<Bytes>);

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

pub fn get(path: &str) -> Request<ReqBody> {
    Request::get(path).body(empty()).unwrap()
}

/// A chat completion request as `user` (no `x-user` header when empty).
pub fn chat_req(user: &str, body: &str) -> Request<ReqBody> {
    let mut b = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-client");
    if !user.is_empty() {
        b = b.header("x-user", user);
    }
    b.body(full(body.to_owned())).unwrap()
}

/// A whole answer.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("answer is not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }
}

/// Checks an error answer in OpenAI's shape: exactly
/// `{"error":{"message","type","param","code"}}` with a non-empty message.
pub fn assert_openai_error(
    r: &Resp,
    status: u16,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> String {
    assert_eq!(r.status.as_u16(), status, "status; body: {}", r.text());
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json"),
        "error content-type"
    );
    let v = r.json();
    let outer = v.as_object().expect("error body is an object");
    assert_eq!(outer.len(), 1, "only `error` at top level: {v}");
    let e = v["error"].as_object().expect("`error` is an object");
    let mut keys: Vec<&str> = e.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["code", "message", "param", "type"],
        "error fields: {v}"
    );
    let msg = e["message"].as_str().expect("message is a string");
    assert!(!msg.is_empty(), "message is empty");
    assert_eq!(e["type"], Value::from(kind), "type: {v}");
    assert_eq!(
        e["param"],
        param.map_or(Value::Null, Value::from),
        "param: {v}"
    );
    assert_eq!(
        e["code"],
        code.map_or(Value::Null, Value::from),
        "code: {v}"
    );
    msg.to_owned()
}

/// Aborts a client connection when dropped: dropping a client object is how
/// tests disconnect.
pub struct ConnGuard(JoinHandle<()>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Which HTTP version a test client speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    H1,
    /// HTTP/2 with prior knowledge (no upgrade).
    H2,
}

/// An answer whose body is read piece by piece.
pub struct Streaming {
    pub status: StatusCode,
    pub headers: HeaderMap,
    body: Incoming,
    /// Everything received so far.
    pub got: Vec<u8>,
    _conn: ConnGuard,
}

impl Streaming {
    /// The next data chunk; `None` at the end; `Err` when the stream broke.
    pub async fn next(&mut self) -> Option<Result<Bytes, String>> {
        loop {
            match within("next body frame", self.body.frame()).await {
                None => return None,
                Some(Err(e)) => return Some(Err(format!("{e:?}"))),
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        self.got.extend_from_slice(&d);
                        return Some(Ok(d));
                    }
                }
            }
        }
    }

    /// Reads until the received bytes contain `needle`.
    pub async fn read_until(&mut self, needle: &str) {
        while !contains(&self.got, needle.as_bytes()) {
            match self.next().await {
                Some(Ok(_)) => {}
                other => panic!(
                    "stream ended ({other:?}) before {needle:?}; got {:?}",
                    String::from_utf8_lossy(&self.got)
                ),
            }
        }
    }

    /// Reads to the end: `Ok(all bytes)` or `Err((bytes so far, error))`.
    pub async fn finish(mut self) -> Result<Vec<u8>, (Vec<u8>, String)> {
        loop {
            match self.next().await {
                None => return Ok(self.got),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err((self.got, e)),
            }
        }
    }
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

/// Sends a request on a new connection and returns the answer head; the
/// body is read through the returned [`Streaming`].
pub async fn open_with(addr: SocketAddr, proto: Proto, mut req: Request<ReqBody>) -> Streaming {
    within("answer head", async move {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let io = TokioIo::new(stream);
        let resp = match proto {
            Proto::H1 => {
                let (mut tx, conn) = hyper::client::conn::http1::handshake(io)
                    .await
                    .expect("http1 handshake");
                let guard = ConnGuard(tokio::spawn(async move {
                    let _ = conn.await;
                }));
                req.headers_mut()
                    .insert("host", addr.to_string().parse().unwrap());
                let r = tx.send_request(req).await.expect("answer head (h1)");
                (r, guard)
            }
            Proto::H2 => {
                let (mut tx, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .expect("http2 handshake");
                let guard = ConnGuard(tokio::spawn(async move {
                    let _ = conn.await;
                }));
                let pq = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_else(|| "/".into());
                *req.uri_mut() = format!("http://{addr}{pq}").parse().unwrap();
                *req.version_mut() = http::Version::HTTP_2;
                let r = tx.send_request(req).await.expect("answer head (h2)");
                (r, guard)
            }
        };
        let (resp, guard) = resp;
        let (parts, body) = resp.into_parts();
        Streaming {
            status: parts.status,
            headers: parts.headers,
            body,
            got: Vec::new(),
            _conn: guard,
        }
    })
    .await
}

pub async fn open(addr: SocketAddr, req: Request<ReqBody>) -> Streaming {
    open_with(addr, Proto::H1, req).await
}

/// Sends a request over HTTP/1.1 on a new connection and reads the whole answer.
pub async fn send(addr: SocketAddr, req: Request<ReqBody>) -> Resp {
    send_with(addr, Proto::H1, req).await
}

/// Same over HTTP/2 (prior knowledge).
pub async fn send_h2(addr: SocketAddr, req: Request<ReqBody>) -> Resp {
    send_with(addr, Proto::H2, req).await
}

pub async fn send_with(addr: SocketAddr, proto: Proto, req: Request<ReqBody>) -> Resp {
    let s = open_with(addr, proto, req).await;
    let (status, headers) = (s.status, s.headers.clone());
    let body = match s.finish().await {
        Ok(b) => b,
        Err((got, e)) => panic!(
            "answer body broke: {e}; got {:?}",
            String::from_utf8_lossy(&got)
        ),
    };
    Resp {
        status,
        headers,
        body: Bytes::from(body),
    }
}

// ---------------------------------------------------------------------------
// Seeding a database with records of any time.
// ---------------------------------------------------------------------------

/// A record written straight into the database (for times a live request cannot have).
#[derive(Clone, Debug)]
pub struct Seed {
    pub ts: i64,
    pub user: String,
    pub model: String,
    pub query: i64,
    pub answer: i64,
    pub cached: i64,
    pub reasoning: i64,
    /// Pico-dollars.
    pub cost: i64,
    pub priced: bool,
}

/// Creates the database at `db` (through a server start), inserts `rows`,
/// and marks it as schema 1 so the next start rebuilds the daily rollups from
/// the records, as it does for a database of an older tollgate.
///
/// Under PostgreSQL the rows go in through the store's own writer (records
/// and rollups together), which is how a PostgreSQL database gets them.
pub async fn seed_db(upstream: &str, db: &Path, rows: &[Seed]) {
    Proxy::builder(upstream).db(db).start().await.stop().await;
    if let Some(url) = pg_url_of(db) {
        let rows = rows.to_vec();
        tokio::task::spawn_blocking(move || seed_pg(&url, &rows))
            .await
            .unwrap();
        return;
    }
    let mut c = rusqlite::Connection::open(db).unwrap();
    let tx = c.transaction().unwrap();
    for (i, r) in rows.iter().enumerate() {
        tx.execute(
            "INSERT INTO queries (user, model, requested_model, endpoint, ts, duration_us, ttfb_us, status, stream, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, priced, estimated, request_id)
             VALUES (?1, ?2, ?2, '/v1/chat/completions', ?3, 1000, 500, 200, 0, ?4, ?5, ?6, ?7, ?8, ?9, 0, ?10)",
            rusqlite::params![
                r.user,
                r.model,
                r.ts,
                r.query,
                r.answer,
                r.cached,
                r.reasoning,
                r.cost,
                r.priced,
                format!("seed-{i}")
            ],
        )
        .unwrap();
    }
    tx.execute("DELETE FROM usage_daily", []).unwrap();
    tx.pragma_update(None, "user_version", 1).unwrap();
    tx.commit().unwrap();
}

/// One kept-alive HTTP/1.1 connection, for tests that make many requests.
pub struct KeepAlive {
    addr: SocketAddr,
    tx: hyper::client::conn::http1::SendRequest<ReqBody>,
    _conn: ConnGuard,
}

impl KeepAlive {
    pub async fn new(addr: SocketAddr) -> KeepAlive {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("http1 handshake");
        let guard = ConnGuard(tokio::spawn(async move {
            let _ = conn.await;
        }));
        KeepAlive {
            addr,
            tx,
            _conn: guard,
        }
    }

    pub async fn get(&mut self, path: &str) -> Resp {
        let mut req = get(path);
        req.headers_mut()
            .insert("host", self.addr.to_string().parse().unwrap());
        within("keep-alive request", async {
            self.tx.ready().await.expect("connection ready");
            let resp = self.tx.send_request(req).await.expect("answer");
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.expect("body").to_bytes();
            Resp {
                status: parts.status,
                headers: parts.headers,
                body,
            }
        })
        .await
    }
}

// ---------------------------------------------------------------------------
// Prometheus / OpenMetrics text.
// ---------------------------------------------------------------------------

/// One sample of a metrics exposition.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the samples of a Prometheus/OpenMetrics text exposition (comment
/// lines skipped). Label values may hold escaped quotes and commas.
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, labels, rest) = match line.find('{') {
            Some(open) if open < line.find(' ').unwrap_or(usize::MAX) => {
                let mut labels = BTreeMap::new();
                let b = line.as_bytes();
                let mut i = open + 1;
                while b[i] != b'}' {
                    let eq = i + line[i..].find('=').expect("label =");
                    let key = line[i..eq].trim_start_matches(',').to_owned();
                    assert_eq!(b[eq + 1], b'"', "label value quoted: {line}");
                    let mut j = eq + 2;
                    let mut val = String::new();
                    while b[j] != b'"' {
                        if b[j] == b'\\' {
                            j += 1;
                            val.push(match b[j] {
                                b'n' => '\n',
                                c => c as char,
                            });
                        } else {
                            let c = line[j..].chars().next().unwrap();
                            val.push(c);
                            j += c.len_utf8() - 1;
                        }
                        j += 1;
                    }
                    labels.insert(key, val);
                    i = j + 1;
                    if b[i] == b',' {
                        i += 1;
                    }
                }
                (&line[..open], labels, &line[i + 1..])
            }
            _ => {
                let sp = line.find(' ').expect("sample value");
                (&line[..sp], BTreeMap::new(), &line[sp..])
            }
        };
        let value = rest
            .split_whitespace()
            .next()
            .expect("sample value")
            .parse::<f64>()
            .unwrap_or_else(|e| panic!("bad sample value ({e}): {line}"));
        out.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    out
}

/// The value of the sample with this name and exactly these labels.
pub fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    samples
        .iter()
        .find(|s| s.name == name && s.labels == want)
        .map(|s| s.value)
}

// ---------------------------------------------------------------------------
// The binary, with its logs.
// ---------------------------------------------------------------------------

/// The tollgate binary, running, with its stderr collected line by line.
pub struct LoggedBin {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for LoggedBin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary on an ephemeral loopback port without default prices
/// and any key from the environment, plus `args` and `env`.
pub fn spawn_logged(args: &[&str], env: &[(&str, &str)]) -> LoggedBin {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.args(["--listen", "127.0.0.1:0", "--no-default-prices"])
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("TOLLGATE_UPSTREAM_TOKEN")
        .env_remove("FORWARD_TOKEN")
        .env_remove("TOLLGATE_ADMIN_TOKEN")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn tollgate");
    let stderr = child.stderr.take().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let l = lines.clone();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            if line.contains("tollgate listening") {
                // The listening address, not the upstream's on the same line.
                let addr_at = line.find("addr").unwrap_or(0);
                if let Some(at) = line[addr_at..].find("127.0.0.1:").map(|i| i + addr_at) {
                    let port: String = line[at + 10..]
                        .chars()
                        .take_while(char::is_ascii_digit)
                        .collect();
                    if let (Some(tx), Ok(addr)) = (tx.take(), format!("127.0.0.1:{port}").parse()) {
                        let _ = tx.send(addr);
                    }
                }
            }
            l.lock().unwrap().push(line);
        }
    });
    let addr: SocketAddr = rx
        .recv_timeout(STEP)
        .expect("tollgate logs its listening address");
    LoggedBin { child, addr, lines }
}

impl LoggedBin {
    /// Every stderr line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// SIGTERM, then waits for exit 0.
    pub async fn stop(&mut self) {
        let ok = std::process::Command::new("sh")
            .args(["-c", &format!("kill -TERM {}", self.child.id())])
            .status()
            .expect("run kill")
            .success();
        assert!(ok);
        let child = &mut self.child;
        let st = eventually("tollgate exits", STEP, || {
            let st = child.try_wait().expect("try_wait");
            async move { st }
        })
        .await;
        assert!(st.success(), "{st:?}");
    }
}

/// Pico-dollars as a plain decimal, written independently of tollgate's formatter.
pub fn dollars(pico: i128) -> String {
    let neg = pico < 0;
    let p = pico.unsigned_abs();
    let s = format!("{}.{:012}", p / 1_000_000_000_000, p % 1_000_000_000_000);
    let s = s.trim_end_matches('0').trim_end_matches('.').to_owned();
    if neg {
        format!("-{s}")
    } else {
        s
    }
}

// ---------------------------------------------------------------------------
// PostgreSQL: the same tests over a PostgreSQL store.
// ---------------------------------------------------------------------------

/// The test server's URL (`TOLLGATE_TEST_PG`, e.g. from `.ci/pg-server
/// start`). Under CI a missing server fails the test: PostgreSQL tests are
/// never skipped there.
pub fn pg_server() -> Option<String> {
    match std::env::var("TOLLGATE_TEST_PG") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run the PostgreSQL tests: TOLLGATE_TEST_PG is not set"
            );
            None
        }
    }
}

/// Says loudly that a PostgreSQL test is skipped (no server given), and
/// returns the server URL otherwise.
pub fn pg_or_skip(test: &str) -> Option<String> {
    let url = pg_server();
    if url.is_none() {
        eprintln!(
            "\n!!! SKIPPED {test}: no PostgreSQL server. Start one with\n!!!   eval \"$(.ci/pg-server start)\"\n!!! (sets TOLLGATE_TEST_PG), then run the tests again.\n"
        );
    }
    url
}

/// Whether the harness puts every proxy on PostgreSQL
/// (`TOLLGATE_TEST_STORE=postgres`, with `TOLLGATE_TEST_PG`).
pub fn pg_mode() -> bool {
    let on = std::env::var("TOLLGATE_TEST_STORE").is_ok_and(|v| v == "postgres");
    assert!(
        !on || std::env::var("TOLLGATE_TEST_PG").is_ok_and(|v| !v.is_empty()),
        "TOLLGATE_TEST_STORE=postgres needs TOLLGATE_TEST_PG (the server URL)"
    );
    on
}

/// The PostgreSQL database each path stands for (under PostgreSQL, paths
/// given to `.db()` and `seed_db` name databases, made the first time).
static PG_DBS: Mutex<BTreeMap<PathBuf, String>> = Mutex::new(BTreeMap::new());

/// The databases made for paths: kept until the process ends (a test
/// restarts on them), on a server that is thrown away after the run.
static PG_KEPT: Mutex<Vec<Arc<PgDb>>> = Mutex::new(Vec::new());

/// The store a path names: the file itself, or under PostgreSQL its database.
fn store_for(path: &Path) -> Db {
    if !pg_mode() {
        return Db::Sqlite(path.to_owned());
    }
    let url = PG_DBS
        .lock()
        .unwrap()
        .entry(path.to_owned())
        .or_insert_with(|| {
            let db = Arc::new(PgDb::create());
            let url = db.url.clone();
            PG_KEPT.lock().unwrap().push(db);
            url
        })
        .clone();
    Db::Postgres(PgUrl::parse(&url).unwrap())
}

/// The PostgreSQL URL of the database a path names, if it is one.
pub fn pg_url_of(path: &Path) -> Option<String> {
    PG_DBS.lock().unwrap().get(path).cloned()
}

/// The runtime driving the harness's own PostgreSQL connections.
fn pg_rt() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// Runs `f` on the harness runtime from any thread, test tasks included.
pub fn pg_block<T: Send + 'static>(f: impl Future<Output = T> + Send + 'static) -> T {
    futures_executor::block_on(pg_rt().spawn(f)).unwrap()
}

/// A connection of the test's own (no TLS: the test server is local).
pub async fn pg_client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to the test PostgreSQL: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Runs one query on `url` and returns its rows.
pub fn pg_query(url: &str, sql: &str) -> Vec<tokio_postgres::Row> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    pg_block(async move {
        let c = pg_client(&url).await;
        c.query(&sql, &[]).await.unwrap()
    })
}

/// Runs statements on `url`.
pub fn pg_exec(url: &str, sql: &str) {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    pg_block(async move {
        let c = pg_client(&url).await;
        c.batch_execute(&sql).await.unwrap()
    })
}

/// `url` with another database name.
pub fn pg_url_with_db(url: &str, db: &str) -> String {
    let mut c: tokio_postgres::Config = url.parse().unwrap();
    c.dbname(db);
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let base = match base[after_scheme..].find('/') {
        Some(i) => &base[..after_scheme + i],
        None => base,
    };
    format!("{base}/{db}{query}")
}

/// A database of its own on the test server, dropped at the end.
pub struct PgDb {
    pub url: String,
    name: String,
    server: String,
}

impl PgDb {
    pub fn create() -> PgDb {
        let server = pg_server().expect("TOLLGATE_TEST_PG");
        let mut r = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r).unwrap();
        let name: String = format!(
            "tg_test_{}",
            r.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        pg_exec(&server, &format!("CREATE DATABASE {name}"));
        PgDb {
            url: pg_url_with_db(&server, &name),
            name,
            server,
        }
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // Best effort: the server is thrown away after the run anyway.
        let _ = std::thread::spawn(move || {
            pg_block(async move {
                let c = pg_client(&server).await;
                let _ = c
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            })
        })
        .join();
    }
}

/// Writes seeds through the store's PostgreSQL writer.
fn seed_pg(url: &str, rows: &[Seed]) {
    use tollgate::store::Backend;
    let url = PgUrl::parse(url).unwrap();
    let (mut backend, _, _) = tollgate::store::postgres::open(&url, false).unwrap();
    let batch: Vec<tollgate::record::Priced> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| tollgate::record::Priced {
            record: tollgate::record::Record {
                user: r.user.clone(),
                requested_model: r.model.clone(),
                model: r.model.clone(),
                endpoint: "/v1/chat/completions".into(),
                started_ms: r.ts,
                duration_us: 1000,
                ttfb_us: Some(500),
                status: 200,
                usage: tollgate::record::Usage {
                    query: r.query.max(0) as u64,
                    answer: r.answer.max(0) as u64,
                    cached: r.cached.max(0) as u64,
                    reasoning: r.reasoning.max(0) as u64,
                    ..tollgate::record::Usage::default()
                },
                request_id: Some(format!("seed-{i}")),
                ..Default::default()
            },
            cost: r.cost,
            priced: r.priced,
        })
        .collect();
    for chunk in batch.chunks(8192) {
        backend.write(chunk, None).unwrap();
    }
}

/// Holds the database so that the writer cannot commit until
/// [`WriteLock::release`]: SQLite's write lock, or under PostgreSQL an
/// exclusive lock on the rollups (the writer's lock wait times out).
pub struct WriteLock(WriteLockInner);

enum WriteLockInner {
    Sqlite(rusqlite::Connection),
    Pg(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>),
}

impl WriteLock {
    pub fn take(path: &Path) -> WriteLock {
        if let Some(url) = pg_url_of(path) {
            let (locked_tx, locked_rx) = std::sync::mpsc::channel();
            let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
            let t = std::thread::spawn(move || {
                let client = pg_block(async move { pg_client(&url).await });
                futures_executor::block_on(
                    client.batch_execute("BEGIN; LOCK TABLE usage_daily IN EXCLUSIVE MODE"),
                )
                .unwrap();
                locked_tx.send(()).unwrap();
                let _ = release_rx.recv();
                futures_executor::block_on(client.batch_execute("ROLLBACK")).unwrap();
            });
            locked_rx.recv().unwrap();
            return WriteLock(WriteLockInner::Pg(release_tx, t));
        }
        let lock = rusqlite::Connection::open(path).unwrap();
        lock.busy_timeout(Duration::from_secs(10)).unwrap();
        lock.execute_batch("BEGIN IMMEDIATE").unwrap();
        WriteLock(WriteLockInner::Sqlite(lock))
    }

    pub fn release(self) {
        match self.0 {
            WriteLockInner::Sqlite(c) => c.execute_batch("ROLLBACK").unwrap(),
            WriteLockInner::Pg(tx, t) => {
                tx.send(()).unwrap();
                t.join().unwrap();
            }
        }
    }
}

/// The digest stored for a key id.
pub fn stored_digest(path: &Path, id: &str) -> Vec<u8> {
    if let Some(url) = pg_url_of(path) {
        let (url, id) = (url, id.to_owned());
        return pg_block(async move {
            let c = pg_client(&url).await;
            c.query_one("SELECT digest FROM api_keys WHERE id = $1", &[&id])
                .await
                .unwrap()
                .get(0)
        });
    }
    let c = rusqlite::Connection::open(path).unwrap();
    let d = c
        .query_row("SELECT digest FROM api_keys WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .unwrap();
    c.execute_batch("PRAGMA wal_checkpoint(PASSIVE)").unwrap();
    d
}
