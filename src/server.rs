//! The HTTP server: worker threads, routing, graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::body::Body;
use crate::config::Config;
use crate::store::{sqlite, Store};

/// Everything a request handler needs.
pub struct State {
    /// The validated settings.
    pub config: Config,
    /// The upstream and its idle connections.
    pub upstream: crate::upstream::Upstream,
    /// Server worker threads (one per available core).
    pub workers: usize,
    /// Where records go and reports come from.
    pub store: Arc<Store>,
    /// `Bearer <upstream token>`, prepared once.
    pub auth_header: Option<HeaderValue>,
    /// SHA-256 of the admin key, if one is set.
    pub admin_digest: Option<crate::access::Digest>,
    /// Active user keys.
    pub keys: crate::access::Keys,
    /// Limits and live spend.
    pub budgets: Arc<crate::budget::Budgets>,
}

/// Loads users' keys and limits, and each limited user's spend in the
/// current period (so a restart does not reset anyone's spend).
fn load_accounts(
    store: &Store,
    keys: &crate::access::Keys,
    budgets: &crate::budget::Budgets,
) -> Result<(), crate::store::StoreError> {
    let reports = store.reports();
    let accounts = reports.accounts();
    for (info, digest) in accounts.active_keys()? {
        keys.insert(crate::access::KeyEntry {
            id: info.id,
            user: info.user,
            digest,
            last_used: std::sync::atomic::AtomicI64::new(info.last_used_ms.unwrap_or(0)),
        });
    }
    for (user, l) in accounts.all_limits()? {
        match user {
            Some(u) => budgets.set_limits(&u, Some(l)),
            None => budgets.set_default(Some(l)),
        }
    }
    rebuild_spend(store, budgets)
}

/// Reads every limited user's spend in their current period from the database.
pub fn rebuild_spend(
    store: &Store,
    budgets: &crate::budget::Budgets,
) -> Result<(), crate::store::StoreError> {
    use crate::budget::Period;
    use crate::store::{Filter, GroupKey};
    let now = crate::timestamp::now_ms();
    let reports = store.reports();
    for period in [Period::Day, Period::Week, Period::Month, Period::Total] {
        let start = period.start(now);
        let f = Filter {
            after: (period != Period::Total).then(|| start - 1),
            ..Filter::default()
        };
        let mut spent: std::collections::HashMap<String, i128> = reports
            .usage(&f, &[GroupKey::User])?
            .into_iter()
            .filter_map(|(g, t)| Some((g.user?, t.cost)))
            .collect();
        let users: Vec<String> = spent.keys().cloned().collect();
        for u in users {
            if budgets
                .limits_of(&u)
                .is_some_and(|(l, _)| l.period == period)
            {
                budgets.set_spent(&u, start, spent.remove(&u).unwrap_or(0));
            }
        }
    }
    Ok(())
}

/// Why the server could not start.
#[derive(Debug)]
pub struct StartError {
    /// The setting at fault.
    pub setting: &'static str,
    /// What went wrong.
    pub message: String,
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid {}: {}", self.setting, self.message)
    }
}

impl std::error::Error for StartError {}

/// Opens the store and builds the shared state.
pub fn state(config: Config) -> Result<Arc<State>, StartError> {
    let (backend, reports) =
        sqlite::open(&config.db, config.default_prices).map_err(|e| StartError {
            setting: "--db",
            message: format!("{}: {e}", config.db.display()),
        })?;
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let retain = config
        .retain_days
        .map(|d| std::time::Duration::from_secs(u64::from(d) * 86_400));
    let store = Store::start(backend, reports, metrics, retain).map_err(|e| StartError {
        setting: "--db",
        message: e.to_string(),
    })?;
    let keys = crate::access::Keys::default();
    let budgets = Arc::new(crate::budget::Budgets::default());
    load_accounts(&store, &keys, &budgets).map_err(|e| StartError {
        setting: "--db",
        message: format!("cannot load keys and limits: {e}"),
    })?;
    let auth_header = match &config.upstream_token {
        Some(t) => {
            let mut v = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| StartError {
                setting: "TOLLGATE_UPSTREAM_TOKEN",
                message: "not a valid header value".into(),
            })?;
            v.set_sensitive(true);
            Some(v)
        }
        None => None,
    };
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok(Arc::new(State {
        upstream: crate::upstream::Upstream::new(&config, workers),
        workers,
        admin_digest: config.admin_token.as_deref().map(crate::access::digest),
        config,
        store,
        auth_header,
        keys,
        budgets,
    }))
}

/// Largest request head answered normally. hyper's own limit is set above it
/// so that oversized heads get tollgate's 431 in OpenAI's shape; only heads
/// past hyper's limit get hyper's bare 431.
const MAX_HEADER_BYTES: usize = 32 << 10;

async fn route(
    state: Arc<State>,
    remote: std::net::SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let head: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if head > MAX_HEADER_BYTES {
        return Ok(crate::error::ApiError::headers_too_large(MAX_HEADER_BYTES).into_response());
    }
    if req.uri().path().starts_with("/v1/") {
        Ok(crate::proxy::handle(&state, req).await)
    } else {
        Ok(crate::api::handle(&state, remote, req).await)
    }
}

/// Waits until a new connection has sent its first bytes: a request line, or
/// the whole HTTP/2 preface. hyper's header timeout only starts once it knows
/// the protocol, so a client that sends nothing (or trickles the preface)
/// would otherwise hold its connection forever.
async fn first_bytes(stream: &tokio::net::TcpStream, limit: std::time::Duration) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 24];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => return false,
        };
        if n == 0 {
            return false;
        }
        if n == PREFACE.len() || buf[..n] != PREFACE[..n] {
            return true;
        }
        // Part of the preface: peek again once more has arrived (peek
        // answers at once while bytes wait, so the deadline is checked here).
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Serves until `shutdown` completes, then stops accepting, lets in-flight
/// requests finish within the grace period, and writes every pending record.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let state = state(config)?;
    serve(listener, state, shutdown).await;
    Ok(())
}

/// [`run`] with a state built by [`state`].
pub async fn serve(listener: TcpListener, state: Arc<State>, shutdown: impl Future<Output = ()>) {
    if let Ok(addr) = listener.local_addr() {
        if !addr.ip().is_loopback() {
            if state.admin_digest.is_none() {
                tracing::warn!(
                    %addr,
                    "listening on a non-loopback address without an admin key: the admin endpoints (/model, /usage, /queries, /ratelimits, /users, /metrics) answer only to loopback clients; set TOLLGATE_ADMIN_TOKEN to use them remotely"
                );
            }
            if state.config.auth == crate::access::AuthMode::Header {
                tracing::warn!(
                    %addr,
                    "listening on a non-loopback address with --auth header: the x-user header is trusted, so anyone who can reach this port can spend as any user; use --auth keys"
                );
            }
        }
        tracing::info!(%addr, upstream = %state.config.upstream, db = %state.config.db.display(), "tollgate listening");
        if state.admin_digest.is_none() {
            tracing::info!("no admin key (TOLLGATE_ADMIN_TOKEN): admin endpoints answer only to loopback clients");
        }
    }
    // One single-threaded runtime per core, each accepting from the same
    // socket: a connection, its upstream connection and its body all live on
    // one thread, as in nginx's workers. A multi-threaded runtime woke a second
    // thread (futex) for most events only to find nothing to steal.
    let listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot hand the listening socket to the workers");
            return;
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut inboxes = Vec::new();
    let mut handoff = Vec::new();
    for _ in 0..state.workers {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        handoff.push(tx);
        inboxes.push(rx);
    }
    let shared = Arc::new(Workers {
        loads: (0..state.workers)
            .map(|n| state.store.metrics().worker_connections(n))
            .collect(),
        handoff,
    });
    let mut finished = Vec::new();
    for (n, inbox) in inboxes.into_iter().enumerate() {
        let l = match listener.try_clone() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot share the listening socket");
                break;
            }
        };
        let (st, stop, shared) = (state.clone(), stop_rx.clone(), shared.clone());
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name(format!("tollgate-w{n}"))
            .spawn(move || {
                crate::upstream::set_worker(n);
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(worker(n, l, inbox, shared, st, stop)),
                    Err(e) => tracing::error!(error = %e, "cannot start a worker runtime"),
                }
                drop(done_tx);
            });
        match spawned {
            Ok(_) => finished.push(done_rx),
            Err(e) => tracing::error!(error = %e, "cannot start a worker thread"),
        }
    }
    drop(listener);
    if finished.is_empty() {
        tracing::error!("no worker could start; shutting down");
    } else {
        shutdown.await;
    }
    let _ = stop_tx.send(true);
    for done in finished {
        let _ = done.await;
    }
    let store = state.store.clone();
    let _ = tokio::task::spawn_blocking(move || store.close()).await;
    tracing::info!("all usage records written; bye");
}

/// What the workers share: how many connections each serves (the
/// `tollgate_connections` gauges), and a way to hand a connection to another.
struct Workers {
    loads: Vec<Gauge>,
    handoff: Vec<tokio::sync::mpsc::UnboundedSender<(std::net::TcpStream, SocketAddr)>>,
}

impl Workers {
    /// Counts a connection that worker `n` accepted against the least loaded
    /// worker, at once, so that decisions made before that worker picks it
    /// up already see it. Returns it when `n` keeps it; a connection that
    /// cannot be handed over (that worker is gone) is kept too.
    fn place(
        &self,
        n: usize,
        stream: tokio::net::TcpStream,
        remote: SocketAddr,
    ) -> Option<(tokio::net::TcpStream, SocketAddr)> {
        let least = (0..self.loads.len())
            .min_by_key(|&i| self.loads[i].get())
            .unwrap_or(n);
        if self.loads[least].get() >= self.loads[n].get() {
            self.loads[n].inc();
            return Some((stream, remote));
        }
        self.loads[least].inc();
        let std = match stream.into_std() {
            Ok(std) => std,
            Err(_) => {
                // The socket is already closed.
                self.loads[least].dec();
                return None;
            }
        };
        match self.handoff[least].send((std, remote)) {
            Ok(()) => None,
            Err(back) => {
                self.loads[least].dec();
                let (std, remote) = back.0;
                let stream = tokio::net::TcpStream::from_std(std).ok()?;
                self.loads[n].inc();
                Some((stream, remote))
            }
        }
    }
}

/// Counts a connection against its worker while it lives.
struct Load<'a>(&'a Gauge);

impl Drop for Load<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One worker: accepts and serves connections on its own thread until told
/// to stop, then drains them within the grace period.
///
/// Every worker wakes for a new connection and whichever accepts first gets
/// it, which can leave one thread with most of a fixed set of keep-alive
/// connections (there is no work stealing between threads). So a worker that
/// serves more connections than another passes a new one to the least loaded.
async fn worker(
    n: usize,
    listener: std::net::TcpListener,
    mut inbox: tokio::sync::mpsc::UnboundedReceiver<(std::net::TcpStream, SocketAddr)>,
    shared: Arc<Workers>,
    state: Arc<State>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "worker cannot listen");
            return;
        }
    };
    state.upstream.spawn_reaper();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(state.config.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES * 4);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size((MAX_HEADER_BYTES * 4) as u32);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut conns = JoinSet::new();
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => match shared.place(n, stream, remote) {
                    Some(kept) => kept,
                    None => continue,
                },
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
            Some((std, remote)) = inbox.recv() => match tokio::net::TcpStream::from_std(std) {
                Ok(stream) => (stream, remote),
                Err(_) => {
                    shared.loads[n].dec();
                    continue;
                }
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        let _ = stream.set_nodelay(true);
        let st = state.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let shared = shared.clone();
        conns.spawn(async move {
            let _load = Load(&shared.loads[n]);
            if !first_bytes(&stream, st.config.header_timeout).await {
                return;
            }
            let svc = service_fn(move |req| route(st.clone(), remote, req));
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            let _ = watcher.watch(conn.into_owned()).await;
        });
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    let grace = state.config.shutdown_grace;
    tracing::info!(
        in_flight = conns.len(),
        "shutting down: no longer accepting"
    );
    let drained = tokio::time::timeout(grace, graceful.shutdown()).await;
    // Whatever is left: connections that never sent a request, or (past the
    // grace period) requests cut short, whose records are still written.
    if drained.is_err() {
        tracing::warn!(
            remaining = conns.len(),
            "grace period over: cutting the remaining connections (their records are still written)"
        );
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}
